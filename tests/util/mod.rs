//! Shared helpers for the integration tests: real remotes (VictoriaMetrics,
//! InfluxDB 1.6), the agent binary under test, an HTTP client, a line-protocol
//! generator and polling with deadlines.
//!
//! Every helper owns its ports and temporary directories, so tests stay
//! independent and can run in parallel. Processes are killed on drop; when a
//! test panics, the tail of each process's log is printed to help the reader.
//! Nothing here sleeps as an assertion: waits poll a condition until a
//! generous deadline and then fail naming what they waited for.
#![allow(dead_code)]

mod netlab;
mod process;
mod remotes;

// Each test binary uses a part of these.
#[allow(unused_imports)]
pub use netlab::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use remotes::*;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::Value;
use tempfile::TempDir;

/// The deadline for anything that should happen "soon" (delivery, readiness).
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Path of the agent binary cargo built for these tests.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edge-replicator"))
}

/// A command that runs the agent binary. `EDGE_REPLICATOR_TEST_RUNNER` (set by
/// `make test-cross`) puts an emulator in front of it: without binfmt_misc an
/// ARM binary cannot be exec'd directly, but qemu-user can run it.
pub fn agent_command() -> Command {
    let runner = std::env::var("EDGE_REPLICATOR_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(emulator) => {
            let mut c = Command::new(emulator);
            c.args(words).arg(agent_bin());
            c
        }
        None => Command::new(agent_bin()),
    }
}

/// `cmd` run with `listener` handed over as systemd does it: the socket as
/// fd 3, `LISTEN_FDS=1` and `LISTEN_PID` naming the process. A shell sets
/// the pid it then `exec`s into, since only the child knows its own pid.
pub fn socket_activated(cmd: Command, listener: &TcpListener) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut wrapped = Command::new("/bin/sh");
    wrapped
        .arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$@""#)
        .arg("sh")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    let fd = listener.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (dup2, fcntl); `fd` stays open in the parent while the child starts.
    // dup2 onto 3 clears close-on-exec; if the socket is already fd 3, fcntl
    // clears it instead.
    unsafe {
        wrapped.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    wrapped
}

/// The repository root (where Cargo.toml lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------
// Test prerequisites
// ---------------------------------------------------------------------------

/// Finds `program` on PATH (and in /usr/bin, /usr/sbin). A name containing a
/// slash is taken as a path relative to the repository root.
///
/// When it is missing: under CI (`CI=true`) that is a broken setup, so panic;
/// elsewhere print a loud SKIP line and return `None` so the test can return.
pub fn require(program: &str) -> Option<PathBuf> {
    match find_program(program) {
        Some(path) => Some(path),
        None => missing(program),
    }
}

fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = repo_root().join(program);
        return path.is_file().then_some(path);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A prerequisite `what` is missing: panics under `CI=true`, else prints a
/// SKIP line and returns `None`.
pub fn missing<T>(what: &str) -> Option<T> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is missing; CI must run scripts/install-test-deps.sh before the tests");
    }
    eprintln!(
        "\n*** SKIP: {what} is missing; run scripts/install-test-deps.sh (as root) to enable this test ***\n"
    );
    None
}

/// The venv Python with PyPI `influxdb-client` importable (see
/// scripts/install-test-deps.sh), or `None` after a SKIP line.
pub fn require_python_client() -> Option<PathBuf> {
    let python = require("target/pyenv/bin/python")?;
    let ok = Command::new(&python)
        .args(["-c", "import influxdb_client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Some(python)
    } else {
        missing("PyPI influxdb-client in target/pyenv")
    }
}

// ---------------------------------------------------------------------------
// Time, ports, polling
// ---------------------------------------------------------------------------

/// A normalised line's point (series and fields) and its timestamp.
pub fn split_time(line: &[u8]) -> (String, i64) {
    let l = String::from_utf8_lossy(line);
    let (point, ts) = l.trim_end().rsplit_once(' ').expect("a timestamp");
    (point.to_string(), ts.parse().expect("a timestamp"))
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i64
}

/// A start timestamp `ago` before now, rounded down to a whole millisecond
/// (VictoriaMetrics keeps millisecond precision).
pub fn ts_ago(ago: Duration) -> i64 {
    let t = now_ns() - ago.as_nanos() as i64;
    t - t.rem_euclid(1_000_000)
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(now_ns() as u128);
    h.write_u32(std::process::id());
    h.finish()
}

/// A loopback TCP port that was free a moment ago, never handed out twice in
/// this process: for servers that cannot be handed a socket (VictoriaMetrics,
/// influxd). It is only a guess: another process may bind it first. So a
/// server started on it is trusted only once [`listening_ports`] shows that
/// the child itself listens there ([`spawn_server`]); the agent and the
/// in-process remotes are handed sockets bound on port 0 instead.
///
/// Ports come from below the kernel's ephemeral range: a port taken from the
/// ephemeral range could be reused as the source port of some outgoing
/// connection while its server is stopped, and the restart would then fail to
/// bind it.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut given = GIVEN.get_or_init(Default::default).lock().unwrap();
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (20_000u32, ephemeral_low.max(20_001));
    let span = high - low;
    let start = (random_u64() % span as u64) as u32;
    for i in 0..span.min(2_000) {
        let port = (low + (start + i) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    // Fall back to the kernel's choice.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port();
    given.insert(port);
    port
}

/// A loopback port where connections are refused, kept so for as long as
/// this value lives: a socket is bound to it but never listens, so no other
/// server can take the port meanwhile (as one could take a port merely
/// picked as "free").
pub struct ClosedPort {
    reserved: ReservedPort,
    pub port: u16,
}

impl ClosedPort {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.reserved.port)
    }

    /// The socket, for options a test sets before it listens.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.reserved._socket.as_fd()
    }

    /// Starts listening on the port: from now on connections are accepted.
    pub fn listen(self) -> std::net::TcpListener {
        use std::os::fd::AsRawFd;
        let socket = self.reserved._socket;
        // SAFETY: listen on a descriptor this value owns.
        let rc = unsafe { libc::listen(socket.as_raw_fd(), 128) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        std::net::TcpListener::from(socket)
    }
}

/// A TCP socket with SO_REUSEPORT set, bound to `ip`:`port` (0: any).
fn reuseport_socket(ip: std::net::Ipv4Addr, port: u16) -> std::os::fd::OwnedFd {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket calls on a descriptor created here and owned by
    // the returned OwnedFd; the option and address values outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let socket = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_REUSEPORT: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(ip).to_be();
        addr.sin_port = port.to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len);
        assert_eq!(
            rc,
            0,
            "bind {ip}:{port}: {}",
            std::io::Error::last_os_error()
        );
        socket
    }
}

/// A port held for one server across its restarts: a socket bound to it
/// (SO_REUSEPORT) that never listens, so no other server can bind the port
/// and, while the server is down, connections to it are refused. Each
/// process of the server gets a listening socket of its own on the same
/// port ([`ReservedPort::listener`]); the kernel sends connections only to
/// listening sockets.
pub struct ReservedPort {
    _socket: std::os::fd::OwnedFd,
    ip: std::net::Ipv4Addr,
    pub port: u16,
}

impl ReservedPort {
    pub fn new(ip: std::net::Ipv4Addr) -> ReservedPort {
        use std::os::fd::AsRawFd;
        let socket = reuseport_socket(ip, 0);
        // SAFETY: getsockname writes at most `len` bytes into `bound`.
        let port = unsafe {
            let mut bound: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::getsockname(
                socket.as_raw_fd(),
                (&mut bound as *mut libc::sockaddr_in).cast(),
                &mut len,
            );
            assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
            u16::from_be(bound.sin_port)
        };
        ReservedPort {
            _socket: socket,
            ip,
            port,
        }
    }

    /// A new listening socket on the reserved port.
    pub fn listener(&self) -> TcpListener {
        use std::os::fd::AsRawFd;
        let socket = reuseport_socket(self.ip, self.port);
        // SAFETY: listen on a socket owned here.
        let rc = unsafe { libc::listen(socket.as_raw_fd(), 1024) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        TcpListener::from(socket)
    }
}

/// See [`ClosedPort`].
pub fn closed_port() -> ClosedPort {
    let reserved = ReservedPort::new(std::net::Ipv4Addr::LOCALHOST);
    ClosedPort {
        port: reserved.port,
        reserved,
    }
}

/// Polls `cond` until it holds or `timeout` passes; then panics naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Polls `get` until it returns `expected`; on timeout panics with the last
/// value seen, which usually says more than "timed out".
pub fn wait_eq<T: PartialEq + std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    expected: T,
    mut get: impl FnMut() -> T,
) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        let last = get();
        if last == expected {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what} == {expected:?}; last seen {last:?}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// Spawns `cmd`; under an emulator, makes sure the child got past its exec.
///
/// qemu-user can deadlock a child forked from a multi-threaded program
/// before it execs (seen in `tests/tls.rs` under `make test-cross`: the
/// child asleep on a futex inside the emulator, its command line still the
/// test binary's). Such a child is killed and the command spawned again; a
/// native run never waits here.
pub fn spawn_past_exec(cmd: &mut Command) -> Child {
    // Before its exec the child's command line (as the kernel shows it:
    // the emulator's) still names this test binary.
    let me = std::env::current_exe().unwrap_or_default();
    let me = me.to_string_lossy().into_owned().into_bytes();
    for attempt in 1..=5 {
        let mut child = cmd.spawn().expect("spawn");
        if slowdown() == 1 {
            return child;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let cmdline = fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
            let forked_only = !me.is_empty() && cmdline.windows(me.len()).any(|w| w == me);
            if !forked_only || child.try_wait().ok().flatten().is_some() {
                return child;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "spawn attempt {attempt}: the child did not exec within 10 s (emulator); again"
                );
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("the child never got past its exec in 5 attempts");
}

/// How many times slower than native the agent may run: 10 when it runs
/// under an emulator (`EDGE_REPLICATOR_TEST_RUNNER`, set by `make
/// test-cross`), else 1. It stretches how long a client waits for an answer;
/// deadlines that are part of what a test asserts are left alone.
pub fn slowdown() -> u32 {
    let emulated = std::env::var("EDGE_REPLICATOR_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty());
    if emulated {
        10
    } else {
        1
    }
}

/// An HTTP client that reports 4xx/5xx as statuses rather than errors.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60) * slowdown()))
        .timeout_connect(Some(Duration::from_secs(5)))
        .build()
        .new_agent()
}

/// A response reduced to what tests look at.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: HashMap<String, String>,
}

impl Reply {
    fn from(mut resp: ureq::http::Response<ureq::Body>) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .lossy_utf8(true)
            .read_to_string()
            .unwrap_or_else(|e| format!("(error reading body: {e})"));
        Reply {
            status,
            body,
            headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {:?}", self.body))
    }
}

fn get(http: &ureq::Agent, url: &str, auth: Option<&str>) -> Result<Reply, ureq::Error> {
    let mut req = http.get(url);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    req.call().map(Reply::from)
}

/// An HTTP Basic `Authorization` value.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Sends `request` (the request line and headers, each ending in CRLF,
/// without the blank line; `Connection: close` is added) on a fresh
/// connection to 127.0.0.1:`port` and returns the answer as it came off the
/// wire: status line, headers in their own spelling, body.
pub fn raw_http(port: u16, request: &str, body: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60) * slowdown()))
        .unwrap();
    let head = format!(
        "{request}Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw answer from [`raw_http`].
pub fn raw_status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

/// The body of a raw answer from [`raw_http`], parsed as JSON.
pub fn raw_json(answer: &str) -> Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {answer:?}"))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// How a write request is made.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    /// Send the body gzip-compressed with `Content-Encoding: gzip`.
    pub gzip: bool,
    /// Send with `Transfer-Encoding: chunked` instead of `Content-Length`.
    pub chunked: bool,
    /// `precision` query parameter (omitted when `None`).
    pub precision: Option<String>,
    /// Full `Authorization` header value, e.g. `Token abc` or `Bearer abc`.
    pub authorization: Option<String>,
    /// Further query parameters (e.g. v1 `u`, `p`).
    pub query: Vec<(String, String)>,
}

impl Opts {
    pub fn new() -> Opts {
        Opts::default()
    }
    pub fn gzip(mut self, on: bool) -> Opts {
        self.gzip = on;
        self
    }
    pub fn chunked(mut self, on: bool) -> Opts {
        self.chunked = on;
        self
    }
    pub fn precision(mut self, p: &str) -> Opts {
        self.precision = Some(p.to_string());
        self
    }
    /// `Authorization: Token <token>`.
    pub fn token(mut self, token: &str) -> Opts {
        self.authorization = Some(format!("Token {token}"));
        self
    }
    pub fn authorization(mut self, value: &str) -> Opts {
        self.authorization = Some(value.to_string());
        self
    }
    pub fn query(mut self, key: &str, value: &str) -> Opts {
        self.query.push((key.to_string(), value.to_string()));
        self
    }
    /// The four body shapes a writer can use, picked by `i`.
    pub fn shape(i: usize) -> Opts {
        Opts::new().gzip(i % 2 == 1).chunked(i / 2 % 2 == 1)
    }
}

/// POSTs `body` to `url` with `params` and `opts`; transport errors panic.
pub fn post_write(
    http: &ureq::Agent,
    url: &str,
    params: &[(&str, &str)],
    body: &[u8],
    opts: &Opts,
) -> Reply {
    try_post_write(http, url, params, body, opts)
        .unwrap_or_else(|e| panic!("POST {url} ({opts:?}) failed without an HTTP answer: {e}"))
}

/// As `post_write`, but a transport error (e.g. the server died) is an `Err`.
pub fn try_post_write(
    http: &ureq::Agent,
    url: &str,
    params: &[(&str, &str)],
    body: &[u8],
    opts: &Opts,
) -> Result<Reply, String> {
    let mut req = http.post(url);
    for (k, v) in params {
        req = req.query(*k, *v);
    }
    if let Some(p) = &opts.precision {
        req = req.query("precision", p);
    }
    for (k, v) in &opts.query {
        req = req.query(k, v);
    }
    if let Some(a) = &opts.authorization {
        req = req.header("Authorization", a);
    }
    req = req.header("Content-Type", "text/plain; charset=utf-8");
    let payload = if opts.gzip {
        req = req.header("Content-Encoding", "gzip");
        gzip(body)
    } else {
        body.to_vec()
    };
    let result = if opts.chunked {
        // A reader of unknown length makes ureq use chunked transfer encoding.
        req.send(ureq::SendBody::from_owned_reader(std::io::Cursor::new(
            payload,
        )))
    } else {
        req.send(payload)
    };
    result.map(Reply::from).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// Line protocol
// ---------------------------------------------------------------------------

/// `n` lines of `measurement` spread round-robin over `series` series, with
/// timestamps from `start_ts_ns` in 1 ms steps per series.
///
/// Each line has realistic tags (one with an escaped space) and fields: a
/// float `value` (the field tests count: one sample of `<measurement>_value`
/// per line), a float, an integer, a boolean and a string. Every (series,
/// timestamp) pair is unique at millisecond granularity, so counts are exact
/// even at VictoriaMetrics' ms precision. Lines are `\n`-terminated.
pub fn lines(measurement: &str, series: usize, n: usize, start_ts_ns: i64) -> String {
    assert!(series > 0);
    let mut out = String::with_capacity(n * 140);
    for i in 0..n {
        let s = i % series;
        let k = (i / series) as i64;
        let ts = start_ts_ns + k * 1_000_000;
        out.push_str(&format!(
            "{measurement},host=gw-{host:04},site=plant\\ {site},sensor=s{s} \
             value={value:.3},temp={temp:.2},seq={i}i,ok={ok},status=\"ok {i}\" {ts}\n",
            host = s % 7,
            site = s % 3,
            value = 20.0 + (i % 1000) as f64 / 8.0,
            temp = -5.0 + (k % 400) as f64 / 4.0,
            ok = i % 5 != 0,
        ));
    }
    out
}

/// Identity of a point as VictoriaMetrics exports it: (sensor tag, ms).
pub type Key = (String, i64);

/// Keys of the lines `lines()` produced (parses only that format).
pub fn line_keys(body: &str) -> Vec<Key> {
    body.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let sensor_at = l.find(",sensor=").expect("line has a sensor tag") + 8;
            let rest = &l[sensor_at..];
            let end = rest.find([',', ' ']).unwrap();
            let ts: i64 = l.rsplit(' ').next().unwrap().parse().expect("timestamp");
            (rest[..end].to_string(), ts.div_euclid(1_000_000))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Status helpers
// ---------------------------------------------------------------------------

pub const COUNTERS: [&str; 9] = [
    "deliveredLines",
    "remainingLines",
    "droppedFullLines",
    "expiredLines",
    "droppedNonRetryableLines",
    "deadLetteredLines",
    "filteredLines",
    "lateLines",
    "downsampledLines",
];

/// A numeric field of a replication status object; panics naming it if absent.
pub fn field(rep: &Value, name: &str) -> u64 {
    rep.get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("status has no unsigned integer {name:?}: {rep}"))
}

pub fn str_field<'a>(rep: &'a Value, name: &str) -> &'a str {
    rep.get(name).and_then(Value::as_str).unwrap_or("")
}

/// accepted + aggregate = delivered + remaining + droppedFull + expired +
/// droppedNonRetryable + deadLettered + filtered + late + downsampled (the
/// last four terms are zero unless the replication transforms lines).
pub fn assert_conserved(rep: &Value) {
    let inflow = field(rep, "acceptedLines") + field(rep, "aggregateLines");
    let sum: u64 = COUNTERS.iter().map(|c| field(rep, c)).sum();
    assert_eq!(inflow, sum, "conservation of lines broken: {rep:#}");
}

/// The value of the first sample of `name` whose labels contain `label`
/// (e.g. `replication="r1"`), from Prometheus text.
pub fn metric_value(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| label.is_empty() || l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

// ---------------------------------------------------------------------------
// Agent configuration
// ---------------------------------------------------------------------------

/// A `[[remote]]` table.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub name: String,
    pub url: String,
    pub api: String,
    pub token: Option<String>,
    pub org: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub min_backoff: String,
    pub max_backoff: String,
    pub timeout: String,
    pub connect_timeout: String,
    /// `stall_timeout`, when a test sets it (else the agent's default).
    pub stall_timeout: Option<String>,
    /// `probe_interval`, when a test sets it (else the agent's default).
    pub probe_interval: Option<String>,
    /// `max_in_flight`, when a test sets it (else the agent's default).
    pub max_in_flight: Option<u32>,
}

impl RemoteConfig {
    /// An InfluxDB v2 API remote with short backoffs for tests.
    pub fn v2(name: &str, url: &str) -> RemoteConfig {
        RemoteConfig {
            name: name.into(),
            url: url.into(),
            api: "v2".into(),
            token: Some("test-token".into()),
            org: Some("test-org".into()),
            username: None,
            password: None,
            min_backoff: "100ms".into(),
            max_backoff: "1s".into(),
            timeout: "5s".into(),
            connect_timeout: "1s".into(),
            stall_timeout: None,
            probe_interval: None,
            max_in_flight: None,
        }
    }

    /// An InfluxDB 1.x API remote with short backoffs for tests.
    pub fn v1(name: &str, url: &str) -> RemoteConfig {
        RemoteConfig {
            api: "v1".into(),
            token: None,
            org: None,
            ..RemoteConfig::v2(name, url)
        }
    }
}

/// A `[[replication]]` table.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    pub name: String,
    pub remote: String,
    pub local_bucket: String,
    pub remote_bucket: Option<String>,
    pub max_queue_size: String,
    pub max_age: String,
    pub when_full: String,
    pub batch_size: String,
    pub gzip_level: u32,
    /// Raw TOML appended to the table (filters, `add_tags`, `[replication.downsample]`).
    pub extra: String,
}

impl ReplicationConfig {
    pub fn new(name: &str, remote: &str, local_bucket: &str) -> ReplicationConfig {
        ReplicationConfig {
            name: name.into(),
            remote: remote.into(),
            local_bucket: local_bucket.into(),
            remote_bucket: None,
            max_queue_size: "256MiB".into(),
            max_age: "7d".into(),
            when_full: "drop_oldest".into(),
            batch_size: "500kB".into(),
            gzip_level: 6,
            extra: String::new(),
        }
    }

    pub fn remote_bucket(mut self, b: &str) -> ReplicationConfig {
        self.remote_bucket = Some(b.into());
        self
    }
}

/// The agent's whole config file, minus `data_dir` and `listen.address`,
/// which the harness fills in.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub shutdown_timeout: String,
    pub log_level: String,
    pub tokens: Vec<String>,
    pub max_body_size: String,
    pub commit_interval: String,
    pub durability: String,
    pub remotes: Vec<RemoteConfig>,
    pub replications: Vec<ReplicationConfig>,
    /// The keys of `[clock]`. By default lines stamped long before the
    /// build are sent as they are: tests write fixed times, which age.
    pub clock: String,
}

/// TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            shutdown_timeout: "10s".into(),
            log_level: "info".into(),
            tokens: Vec::new(),
            max_body_size: "32MiB".into(),
            commit_interval: "10ms".into(),
            durability: "fsync".into(),
            remotes: Vec::new(),
            replications: Vec::new(),
            clock: "send_before_build = true\n".into(),
        }
    }
}

impl AgentConfig {
    /// One remote and one replication `r1` taking `local_bucket` to
    /// `remote_bucket`.
    pub fn single(
        remote: RemoteConfig,
        local_bucket: &str,
        remote_bucket: Option<&str>,
    ) -> AgentConfig {
        let mut rep = ReplicationConfig::new("r1", &remote.name, local_bucket);
        rep.remote_bucket = remote_bucket.map(String::from);
        AgentConfig {
            remotes: vec![remote],
            replications: vec![rep],
            ..AgentConfig::default()
        }
    }

    pub fn render(&self, data_dir: &Path, address: &str) -> String {
        let mut t = String::new();
        let list = |v: &[String]| v.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ");
        t += &format!("data_dir = {}\n", toml_str(&data_dir.display().to_string()));
        t += &format!("shutdown_timeout = {}\n", toml_str(&self.shutdown_timeout));
        t += &format!("log_level = {}\n\n", toml_str(&self.log_level));
        t += "[listen]\n";
        t += &format!("address = {}\n", toml_str(address));
        t += &format!("tokens = [{}]\n", list(&self.tokens));
        t += &format!("max_body_size = {}\n\n", toml_str(&self.max_body_size));
        t += "[queue]\n";
        t += &format!("commit_interval = {}\n", toml_str(&self.commit_interval));
        t += &format!("durability = {}\n", toml_str(&self.durability));
        t += &format!("\n[clock]\n{}", self.clock);
        for r in &self.remotes {
            t += "\n[[remote]]\n";
            t += &format!("name = {}\n", toml_str(&r.name));
            t += &format!("url = {}\n", toml_str(&r.url));
            t += &format!("api = {}\n", toml_str(&r.api));
            for (k, v) in [
                ("token", &r.token),
                ("org", &r.org),
                ("username", &r.username),
                ("password", &r.password),
            ] {
                if let Some(v) = v {
                    t += &format!("{k} = {}\n", toml_str(v));
                }
            }
            t += &format!("min_backoff = {}\n", toml_str(&r.min_backoff));
            t += &format!("max_backoff = {}\n", toml_str(&r.max_backoff));
            t += &format!("timeout = {}\n", toml_str(&r.timeout));
            t += &format!("connect_timeout = {}\n", toml_str(&r.connect_timeout));
            if let Some(v) = &r.stall_timeout {
                t += &format!("stall_timeout = {}\n", toml_str(v));
            }
            if let Some(v) = &r.probe_interval {
                t += &format!("probe_interval = {}\n", toml_str(v));
            }
            if let Some(n) = r.max_in_flight {
                t += &format!("max_in_flight = {n}\n");
            }
        }
        for r in &self.replications {
            t += "\n[[replication]]\n";
            t += &format!("name = {}\n", toml_str(&r.name));
            t += &format!("remote = {}\n", toml_str(&r.remote));
            t += &format!("local_bucket = {}\n", toml_str(&r.local_bucket));
            if let Some(b) = &r.remote_bucket {
                t += &format!("remote_bucket = {}\n", toml_str(b));
            }
            t += &format!("max_queue_size = {}\n", toml_str(&r.max_queue_size));
            t += &format!("max_age = {}\n", toml_str(&r.max_age));
            t += &format!("when_full = {}\n", toml_str(&r.when_full));
            t += &format!("batch_size = {}\n", toml_str(&r.batch_size));
            t += &format!("gzip_level = {}\n", r.gzip_level);
            t += &r.extra;
        }
        t
    }
}

// ---------------------------------------------------------------------------
// The agent under test
// ---------------------------------------------------------------------------

/// Runs `edge-replicator` with `args` to completion (60 s deadline).
pub fn run_cli(args: &[&str]) -> Output {
    let mut cmd = agent_command();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_past_exec(&mut cmd);
    // Drain the pipes in threads so a chatty child cannot block on them.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_exit(&mut child, Duration::from_secs(60)) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("edge-replicator {args:?} did not exit within 60 s");
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// The agent, running `edge-replicator run` on a free loopback port with its
/// config, data dir and log (stderr) in a temp dir. Killed on drop; when the
/// test panics the log's tail is printed.
pub struct Agent {
    child: Option<Child>,
    pub port: u16,
    /// The agent's port, held for the agent's whole life (see
    /// [`ReservedPort`]): each process of this agent is handed a listening
    /// socket of its own on it, as systemd would hand it (`LISTEN_FDS`), so
    /// the port is never free between a pick and a bind, nothing else can
    /// take it across restarts, and whatever answers on it is this agent.
    reserved: ReservedPort,
    /// Ports kept refusing for as long as the agent runs (see [`Agent::keep`]).
    closed: Vec<ClosedPort>,
    pub config: AgentConfig,
    dir: TempDir,
    http: ureq::Agent,
}

impl Agent {
    /// Writes the config and starts the agent; returns once `/health` is 200.
    pub fn start(config: AgentConfig) -> Agent {
        let mut agent = Agent::stopped(config);
        agent.write_config();
        agent.spawn();
        agent
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// (Re)writes config.toml from `self.config` (e.g. before `sighup`).
    pub fn write_config(&self) {
        let text = self
            .config
            .render(&self.data_dir(), &format!("127.0.0.1:{}", self.port));
        fs::write(self.config_path(), text).unwrap();
    }

    fn auth(&self) -> Option<String> {
        self.config.tokens.first().map(|t| format!("Token {t}"))
    }

    fn spawn(&mut self) {
        self.spawn_with(&Launch::new());
    }

    /// `edge-replicator run` for this agent, to serve `listener`.
    fn run_command(&self, listener: &TcpListener) -> Command {
        let mut cmd = agent_command();
        cmd.arg("run").arg("--config").arg(self.config_path());
        socket_activated(cmd, listener)
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent is running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGTERM, then waits (60 s at most) for the exit status.
    pub fn sigterm_and_wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent is running");
        signal(&child, "TERM");
        match wait_exit(&mut child, Duration::from_secs(60)) {
            Some(status) => {
                mark_log(&self.log_path(), &format!("exited after SIGTERM: {status}"));
                status
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent still running 60 s after SIGTERM");
            }
        }
    }

    /// SIGHUP: reload the config.
    pub fn sighup(&self) {
        signal(self.child.as_ref().expect("agent is running"), "HUP");
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent is running");
        let _ = child.kill();
        let _ = child.wait();
        mark_log(&self.log_path(), "SIGKILL");
    }

    /// Starts again with the same config, port and data dir.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart() needs the agent stopped first (sigterm_and_wait or kill9)"
        );
        self.spawn();
    }

    fn write(&self, path: &str, params: &[(&str, &str)], body: &[u8], opts: &Opts) -> Reply {
        post_write(
            &self.http,
            &format!("{}{path}", self.url()),
            params,
            body,
            opts,
        )
    }

    /// `POST /api/v2/write?org=test-org&bucket=BUCKET`.
    pub fn write_v2_reply(&self, bucket: &str, body: &[u8], opts: &Opts) -> Reply {
        self.write(
            "/api/v2/write",
            &[("org", "test-org"), ("bucket", bucket)],
            body,
            opts,
        )
    }

    /// As `write_v2_reply`, but a transport error is an `Err`.
    pub fn try_write_v2(&self, bucket: &str, body: &[u8], opts: &Opts) -> Result<Reply, String> {
        try_post_write(
            &self.http,
            &format!("{}/api/v2/write", self.url()),
            &[("org", "test-org"), ("bucket", bucket)],
            body,
            opts,
        )
    }

    pub fn write_v2(&self, bucket: &str, body: impl AsRef<[u8]>, opts: &Opts) -> (u16, String) {
        let r = self.write_v2_reply(bucket, body.as_ref(), opts);
        (r.status, r.body)
    }

    /// `POST /write?db=DB[&rp=RP]`.
    pub fn write_v1_reply(&self, db: &str, rp: Option<&str>, body: &[u8], opts: &Opts) -> Reply {
        let mut params = vec![("db", db)];
        if let Some(rp) = rp {
            params.push(("rp", rp));
        }
        self.write("/write", &params, body, opts)
    }

    pub fn write_v1(
        &self,
        db: &str,
        rp: Option<&str>,
        body: impl AsRef<[u8]>,
        opts: &Opts,
    ) -> (u16, String) {
        let r = self.write_v1_reply(db, rp, body.as_ref(), opts);
        (r.status, r.body)
    }

    /// GET `path` (with the first configured token, if any).
    pub fn get(&self, path: &str) -> Reply {
        get(
            &self.http,
            &format!("{}{path}", self.url()),
            self.auth().as_deref(),
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `GET /api/v2/replications`.
    pub fn replications(&self) -> Value {
        let r = self.get("/api/v2/replications");
        assert_eq!(r.status, 200, "GET /api/v2/replications: {}", r.body);
        r.json()
    }

    /// The status object of replication `name`.
    pub fn replication(&self, name: &str) -> Value {
        let all = self.replications();
        all["replications"]
            .as_array()
            .unwrap_or_else(|| panic!("no replications array: {all}"))
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no replication {name:?} in {all}"))
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        r.body
    }

    /// `edge-replicator ARGS --config <this agent's config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let config = self.config_path();
        let mut all: Vec<&str> = args.to_vec();
        all.push("--config");
        all.push(config.to_str().unwrap());
        run_cli(&all)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        print_tail_if_panicking("agent", &self.log_path(), 80);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Launch options, exits and memory of the agent under test
// ---------------------------------------------------------------------------

/// What `AgentConfig` cannot say: variables for the agent's environment
/// (e.g. `EDGE_REPLICATOR_CRASH_AT`) and edits of the rendered config text
/// (keys the struct has no field for, such as `ca_file` or `map_size`).
#[derive(Clone, Default)]
pub struct Launch {
    pub env: Vec<(String, String)>,
    /// Applied in order to the rendered config.
    pub edits: Vec<std::sync::Arc<dyn Fn(String) -> String + Send + Sync>>,
    /// `RLIMIT_AS` for the agent's process, in bytes (`ulimit -v`).
    pub address_space: Option<u64>,
    /// `RLIMIT_NOFILE` (soft and hard) for the agent's process (`ulimit -n`).
    pub open_files: Option<u64>,
}

impl Launch {
    pub fn new() -> Launch {
        Launch::default()
    }

    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the agent with at most `bytes` of address space, as on a
    /// 32-bit board or under `ulimit -v`.
    pub fn address_space_limit(mut self, bytes: u64) -> Launch {
        self.address_space = Some(bytes);
        self
    }

    /// Runs the agent with at most `n` open descriptors, soft and hard (a
    /// distribution's default soft limit is 1024).
    pub fn open_files_limit(mut self, n: u64) -> Launch {
        self.open_files = Some(n);
        self
    }

    /// Inserts `lines` (TOML, newline-terminated) after the first line of
    /// the rendered config equal to `anchor`, e.g. `[listen]`, `[queue]` or
    /// `name = "cloud"` (the first key of a `[[remote]]` table).
    pub fn insert_after(mut self, anchor: &str, lines: &str) -> Launch {
        let (anchor, lines) = (anchor.to_string(), lines.to_string());
        self.edits.push(std::sync::Arc::new(move |text: String| {
            insert_after(&text, &anchor, &lines)
        }));
        self
    }

    /// Removes every line of the rendered config equal to `line`.
    pub fn remove_line(mut self, line: &str) -> Launch {
        let line = line.to_string();
        self.edits.push(std::sync::Arc::new(move |text: String| {
            text.lines()
                .filter(|l| *l != line)
                .map(|l| format!("{l}\n"))
                .collect()
        }));
        self
    }
}

/// `text` with `lines` inserted after the first line equal to `anchor`;
/// panics when there is no such line.
pub fn insert_after(text: &str, anchor: &str, lines: &str) -> String {
    let mut out = String::with_capacity(text.len() + lines.len());
    let mut done = false;
    for l in text.lines() {
        out.push_str(l);
        out.push('\n');
        if !done && l == anchor {
            out.push_str(lines);
            if !lines.ends_with('\n') {
                out.push('\n');
            }
            done = true;
        }
    }
    assert!(done, "no line {anchor:?} in the config:\n{text}");
    out
}

impl Agent {
    /// As `start`, with `launch`'s config edits and environment.
    pub fn start_with(config: AgentConfig, launch: &Launch) -> Agent {
        let mut agent = Agent::stopped(config);
        agent.write_config_with(launch);
        agent.spawn_with(launch);
        agent
    }

    /// Keeps `port` refusing connections for as long as this agent lives
    /// (a remote that is down for the whole test).
    pub fn keep(&mut self, port: ClosedPort) {
        self.closed.push(port);
    }

    /// An agent with its temp dir and port, config not written, not running.
    pub fn stopped(config: AgentConfig) -> Agent {
        Agent::stopped_at(config, "127.0.0.1")
    }

    /// As `stopped`, with the agent's socket bound to `ip` (e.g. "0.0.0.0"
    /// for a test about a socket other hosts could reach); tests still talk
    /// to it over loopback.
    pub fn stopped_at(config: AgentConfig, ip: &str) -> Agent {
        let reserved = ReservedPort::new(ip.parse().expect("an IPv4 address"));
        Agent {
            child: None,
            port: reserved.port,
            reserved,
            closed: Vec::new(),
            config,
            dir: tempfile::Builder::new().prefix("agent-").tempdir().unwrap(),
            http: http(),
        }
    }

    /// The config text `write_config_with(launch)` writes.
    pub fn render_with(&self, launch: &Launch) -> String {
        let mut text = self
            .config
            .render(&self.data_dir(), &format!("127.0.0.1:{}", self.port));
        for edit in &launch.edits {
            text = edit(text);
        }
        text
    }

    /// (Re)writes config.toml with `launch`'s edits.
    pub fn write_config_with(&self, launch: &Launch) {
        fs::write(self.config_path(), self.render_with(launch)).unwrap();
    }

    /// Starts the process with `launch`'s environment and returns at once.
    pub fn launch_with(&mut self, launch: &Launch) {
        assert!(self.child.is_none(), "agent already running");
        mark_log(&self.log_path(), "start");
        let log = log_file(&self.log_path());
        // The process's own listening socket: when the process dies it
        // closes, and connections waiting for it are refused at once, as
        // they would be by an agent that bound its port itself.
        let listener = self.reserved.listener();
        let mut cmd = self.run_command(&listener);
        // The clock reads as synchronised unless a test says otherwise: a
        // machine just booted, with no time service, would have the clock
        // guard hold every write for its first minutes.
        let clock = self.dir.path().join("clock-synchronised");
        std::fs::write(&clock, "synchronised\n").unwrap();
        cmd.env("RUST_BACKTRACE", "1")
            .env("EDGE_REPLICATOR_CLOCK_FILE", &clock)
            .env_remove("JOURNAL_STREAM")
            .env_remove("EDGE_REPLICATOR_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &launch.env {
            cmd.env(k, v);
        }
        let limits = [
            (libc::RLIMIT_AS, launch.address_space),
            (libc::RLIMIT_NOFILE, launch.open_files),
        ];
        if limits.iter().any(|(_, v)| v.is_some()) {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe and touches only the
            // child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    for (resource, value) in limits {
                        let Some(v) = value else { continue };
                        let v = libc::rlim_t::try_from(v).unwrap_or(libc::RLIM_INFINITY);
                        let limit = libc::rlimit {
                            rlim_cur: v,
                            rlim_max: v,
                        };
                        if libc::setrlimit(resource, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(spawn_past_exec(&mut cmd));
        // The child holds it now (spawn returns once the child has exec'd).
        drop(listener);
    }

    /// Waits until `/health` answers 200 (`Ok`) or the process exits (`Err`
    /// with its status); panics after `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), ExitStatus> {
        let url = format!("{}/health", self.url());
        let deadline = Instant::now() + timeout;
        // The socket is the test's: a request sent before the agent serves
        // it waits in the backlog rather than being refused, so each probe
        // gives up soon and the loop looks at the process again.
        let probe = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2) * slowdown()))
            .build()
            .new_agent();
        loop {
            let child = self.child.as_mut().expect("agent is running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                mark_log(&self.log_path(), &format!("exited: {status}"));
                return Err(status);
            }
            if matches!(get(&probe, &url, None), Ok(r) if r.status == 200) {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "agent /health not 200 within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `launch_with`, then waits for `/health`; panics if the agent exits.
    pub fn spawn_with(&mut self, launch: &Launch) {
        self.launch_with(launch);
        if let Err(status) = self.wait_ready(Duration::from_secs(30)) {
            panic!("agent exited with {status} before /health answered 200");
        }
    }

    /// Waits up to `timeout` for the agent to exit on its own (a crash
    /// point, a fatal error); `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("agent is running");
        let status = wait_exit(child, timeout)?;
        self.child = None;
        mark_log(&self.log_path(), &format!("exited: {status}"));
        Some(status)
    }

    /// The log written since the last harness mark `what` (e.g. "start").
    pub fn log_since_last(&self, what: &str) -> String {
        let log = self.log();
        let mark = format!("===== test harness: {what} =====");
        match log.rfind(&mark) {
            Some(i) => log[i + mark.len()..].to_string(),
            None => log,
        }
    }

    /// Waits (up to [`DEADLINE`]) until replication `name` has nothing left
    /// to send and an empty queue; returns its status, checked for
    /// conservation.
    pub fn wait_drained(&self, name: &str) -> Value {
        self.wait_drained_within(name, DEADLINE)
    }

    /// [`Agent::wait_drained`] with a deadline of its own.
    pub fn wait_drained_within(&self, name: &str, timeout: Duration) -> Value {
        let mut rep = Value::Null;
        wait_until(timeout, &format!("{name} drained"), || {
            rep = self.replication(name);
            field(&rep, "remainingLines") == 0 && field(&rep, "currentQueueSizeBytes") == 0
        });
        assert_conserved(&rep);
        rep
    }

    /// Peak resident memory of the running agent so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM")
    }

    /// Resident memory of the running agent now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS")
    }
}

/// A `kB` field of /proc/PID/status.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------
// A small scriptable remote
// ---------------------------------------------------------------------------

/// One request a [`Sink`] received.
#[derive(Debug)]
pub struct SinkRequest {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body as sent (gzip when `Content-Encoding: gzip`).
    pub wire: Vec<u8>,
    /// The body with `Content-Encoding: gzip` undone.
    pub body: Vec<u8>,
    /// The status the sink answered.
    pub status: OnceLock<u16>,
    /// When the request had been read whole.
    pub at: Instant,
}

impl SinkRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Non-empty lines of the (decoded) body.
    pub fn lines(&self) -> Vec<&[u8]> {
        self.body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect()
    }

    pub fn answered_2xx(&self) -> bool {
        self.status.get().is_some_and(|s| (200..300).contains(s))
    }
}

type SinkHandler = dyn Fn(&SinkRequest) -> (u16, String) + Send + Sync;

/// An HTTP/1.1 server on a loopback port that records every request and
/// answers with `handler` (status and JSON body), or forwards it to a real
/// remote ([`Sink::forward_to`]), which makes it a counting proxy: it sees
/// every line the agent sends, including the ones sent twice.
///
/// Deliberately small: keep-alive, `Content-Length` bodies (what the agent
/// sends), no pipelining. Stops and joins its threads on drop.
pub struct Sink {
    pub port: u16,
    requests: std::sync::Arc<Mutex<Vec<std::sync::Arc<SinkRequest>>>>,
    handler: std::sync::Arc<Mutex<std::sync::Arc<SinkHandler>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// A sink answering every request with `handler`'s status and body.
    pub fn start(handler: impl Fn(&SinkRequest) -> (u16, String) + Send + Sync + 'static) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind sink");
        Sink::serve(listener, std::sync::Arc::new(handler), |s| s)
    }

    /// A sink that answers 204 to everything.
    pub fn accept_all() -> Sink {
        Sink::start(|_| (204, String::new()))
    }

    /// A proxy to `upstream` (e.g. a VictoriaMetrics URL): each request is
    /// sent on with its body and `Content-Encoding`, and the upstream's
    /// answer is passed back.
    pub fn forward_to(upstream: &str) -> Sink {
        let upstream = upstream.trim_end_matches('/').to_string();
        let client = http();
        Sink::start(move |req| {
            let mut r = client.post(format!("{upstream}{}", req.target));
            if let Some(enc) = req.header("content-encoding") {
                r = r.header("Content-Encoding", enc);
            }
            match r.send(&req.wire[..]).map(Reply::from) {
                Ok(reply) => (reply.status, reply.body),
                Err(e) => (502, format!("{{\"message\":\"upstream: {e}\"}}")),
            }
        })
    }

    /// Serves `listener`, wrapping each accepted connection with `wrap`
    /// (identity for plain HTTP; a TLS stream for an HTTPS remote).
    pub fn serve<S: Read + Write + Send + 'static>(
        listener: TcpListener,
        handler: std::sync::Arc<SinkHandler>,
        wrap: impl Fn(std::net::TcpStream) -> S + Send + Sync + 'static,
    ) -> Sink {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let requests: Arc<Mutex<Vec<Arc<SinkRequest>>>> = Default::default();
        let handler = Arc::new(Mutex::new(handler));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, h, s) = (requests.clone(), handler.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let _ = stream.set_nodelay(true);
                        stream
                            .set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        let (r, h, s) = (r.clone(), h.clone(), s.clone());
                        let stream = wrap(stream);
                        conns.push(std::thread::spawn(move || {
                            sink_connection(stream, &r, &h, &s)
                        }));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
                conns.retain(|c: &std::thread::JoinHandle<()>| !c.is_finished());
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Sink {
            port,
            requests,
            handler,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replaces the handler for requests from now on.
    pub fn set_handler(
        &self,
        handler: impl Fn(&SinkRequest) -> (u16, String) + Send + Sync + 'static,
    ) {
        *self.handler.lock().unwrap() = std::sync::Arc::new(handler);
    }

    pub fn requests(&self) -> Vec<std::sync::Arc<SinkRequest>> {
        self.requests.lock().unwrap().clone()
    }

    /// Lines of every request answered 2xx, counted with repeats.
    pub fn lines_accepted(&self) -> Vec<Vec<u8>> {
        self.requests()
            .iter()
            .filter(|r| r.answered_2xx())
            .flat_map(|r| {
                r.lines()
                    .into_iter()
                    .map(<[u8]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads into `buf` until `pred` holds for it; false on EOF, error or stop.
fn sink_read_until(
    stream: &mut impl Read,
    buf: &mut Vec<u8>,
    stop: &std::sync::atomic::AtomicBool,
    pred: impl Fn(&[u8]) -> bool,
) -> bool {
    let mut chunk = [0u8; 64 * 1024];
    while !pred(buf) {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

fn sink_connection(
    mut stream: impl Read + Write,
    requests: &Mutex<Vec<std::sync::Arc<SinkRequest>>>,
    handler: &Mutex<std::sync::Arc<SinkHandler>>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n");
        if !sink_read_until(&mut stream, &mut buf, stop, |b| head_end(b).is_some()) {
            return;
        }
        let end = head_end(&buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let target = first.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if !sink_read_until(&mut stream, &mut buf, stop, |b| b.len() >= len) {
            return;
        }
        let wire: Vec<u8> = buf.drain(..len).collect();
        let body = if header("content-encoding").is_some_and(|e| e.eq_ignore_ascii_case("gzip")) {
            let mut out = Vec::new();
            let _ = flate2::read::MultiGzDecoder::new(&wire[..]).read_to_end(&mut out);
            out
        } else {
            wire.clone()
        };
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let req = std::sync::Arc::new(SinkRequest {
            method,
            target,
            headers,
            wire,
            body,
            status: OnceLock::new(),
            at: Instant::now(),
        });
        let handler = handler.lock().unwrap().clone();
        let (status, text) = handler(&req);
        let _ = req.status.set(status);
        requests.lock().unwrap().push(req);
        let reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if stream.write_all(reply.as_bytes()).is_err() || stream.flush().is_err() || close {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Sources: [[tail]] files and [[influxdb_wal]] WALs
// ---------------------------------------------------------------------------

impl Launch {
    /// Appends `toml` (e.g. `[[tail]]` or `[[influxdb_wal]]` tables) to the
    /// rendered config.
    pub fn append(mut self, toml: &str) -> Launch {
        let toml = toml.to_string();
        self.edits.push(std::sync::Arc::new(move |text: String| {
            format!("{text}\n{toml}\n")
        }));
        self
    }
}

impl Agent {
    /// The `sources` array of `GET /api/v2/replications`.
    pub fn sources(&self) -> Vec<Value> {
        let all = self.replications();
        all["sources"]
            .as_array()
            .unwrap_or_else(|| panic!("no sources array: {all}"))
            .clone()
    }

    /// The status of the first source of `kind` (`tail`, `influxdb_wal`).
    pub fn source(&self, kind: &str) -> Value {
        let all = self.sources();
        all.iter()
            .find(|s| s["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} source in {all:?}"))
    }
}

/// A small encoder of InfluxDB's TSM WAL (`tsdb/engine/tsm1/wal.go`), for
/// tests of the `[[influxdb_wal]]` source that need layouts or contents no
/// local InfluxDB produces (2.x, uint64 values, damaged tails).
pub mod tsm_wal {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Float(f64),
        Integer(i64),
        Boolean(bool),
        String(String),
        Unsigned(u64),
    }

    impl Value {
        fn kind(&self) -> u8 {
            match self {
                Value::Float(_) => 1,
                Value::Integer(_) => 2,
                Value::Boolean(_) => 3,
                Value::String(_) => 4,
                Value::Unsigned(_) => 5,
            }
        }
    }

    /// One field of one point: escaped series key, unescaped field key.
    #[derive(Debug, Clone)]
    pub struct Field {
        pub series: String,
        pub field: String,
        pub time: i64,
        pub value: Value,
    }

    /// `[type][u32 BE length][snappy block]`.
    pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let block = snap::raw::Encoder::new()
            .compress_vec(payload)
            .expect("snappy");
        let mut out = vec![kind];
        out.extend_from_slice(&(block.len() as u32).to_be_bytes());
        out.extend_from_slice(&block);
        out
    }

    /// A write entry holding `fields`, one key per series and field (in
    /// reverse key order, as a Go map may give them).
    pub fn write_entry(fields: &[Field]) -> Vec<u8> {
        let mut keys: BTreeMap<String, Vec<&Field>> = BTreeMap::new();
        for f in fields {
            keys.entry(format!("{}#!~#{}", f.series, f.field))
                .or_default()
                .push(f);
        }
        let mut payload = Vec::new();
        for (key, values) in keys.iter().rev() {
            payload.push(values[0].value.kind());
            payload.extend_from_slice(&(key.len() as u16).to_be_bytes());
            payload.extend_from_slice(key.as_bytes());
            payload.extend_from_slice(&(values.len() as u32).to_be_bytes());
            for v in values {
                assert_eq!(v.value.kind(), values[0].value.kind(), "one type per key");
                payload.extend_from_slice(&v.time.to_be_bytes());
                match &v.value {
                    Value::Float(x) => payload.extend_from_slice(&x.to_bits().to_be_bytes()),
                    Value::Integer(x) => payload.extend_from_slice(&x.to_be_bytes()),
                    Value::Boolean(x) => payload.push(*x as u8),
                    Value::String(s) => {
                        payload.extend_from_slice(&(s.len() as u32).to_be_bytes());
                        payload.extend_from_slice(s.as_bytes());
                    }
                    Value::Unsigned(x) => payload.extend_from_slice(&x.to_be_bytes()),
                }
            }
        }
        frame(1, &payload)
    }

    /// A delete entry (type 2) of series keys.
    pub fn delete_entry(keys: &[&str]) -> Vec<u8> {
        frame(2, keys.join("\n").as_bytes())
    }

    /// `<dir>/_NNNNN.wal`.
    pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
        dir.join(format!("_{id:05}.wal"))
    }
}
