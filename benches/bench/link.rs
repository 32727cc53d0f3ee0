//! Phase 7, links: both agents under the same steady load, shipping to
//! VictoriaMetrics across a link that is shaped (256 kbit/s, 1 Mbit/s),
//! slow to answer (600 ms round trip), flapping (5 s down, 5 s up) or
//! black-holed. Each agent runs in the host's network namespace; the remote
//! runs in a namespace of the bench's own, reached over a veth pair (see
//! [`Lab`]). What crossed the link is read from the veth's own counters, what
//! arrived from the remote's (`vm_rows_inserted_total`), polled from inside
//! the namespace so that the polls do not cross the link.
//!
//! Per profile: lines/s delivered (and, on a shaped link, the payload's
//! bytes/s over the link's), wire bytes per line delivered (both
//! directions, retries and probes included), the time to notice a black hole
//! (ours: status `link` turns `stalled` or `down`; vmagent:
//! `vmagent_remotewrite_errors_total` grows), and the time from the link's
//! return to the first line arriving. Both agents run with their defaults.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::gen::{Generator, Mix};
use crate::procs::{self, Proc};
use crate::report::{median, Row, Target};
use crate::{baseline, load, write_url, Ctx, Samples, Who};

/// The steady load: `WRITES_PER_SECOND` writes of `LINES_PER_WRITE` lines
/// of the metrics mix, to each agent alike.
const LINES_PER_WRITE: usize = 50;
const WRITES_PER_SECOND: f64 = 8.0;
const POOL_WRITES: usize = 256;
/// How often the agent, vmagent, the remote and the veth are sampled.
const POLL: Duration = Duration::from_millis(100);
/// The one-way delay of the delaying proxy (600 ms round trip).
pub const ONE_WAY: Duration = Duration::from_millis(300);
/// The range the bench's lab takes a /30 from (the tests use 10.213/16).
const RANGE: (u8, u8) = (10, 214);
const BLOCKS: u32 = 1 << 14;
const VM_PORT: u16 = 8428;

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `tc tbf` on both veth ends: rate, burst, and the rate in bytes/s.
    Shaped(&'static str, &'static str, f64),
    /// Through the delaying proxy.
    Delayed,
    Flapping,
    BlackHole,
}

struct Profile {
    name: String,
    kind: Kind,
    /// TOML added to edge-replicator's config (vmagent runs as always).
    extra: &'static str,
}

/// Phase lengths in seconds.
struct Times {
    warm: f64,
    window: f64,
    flapping: f64,
    hole: f64,
    after: f64,
    drain_cap: f64,
}

impl Times {
    fn new(quick: bool) -> Times {
        if quick {
            Times {
                warm: 5.0,
                window: 20.0,
                flapping: 20.0,
                hole: 12.0,
                after: 10.0,
                drain_cap: 90.0,
            }
        } else {
            Times {
                warm: 10.0,
                window: 45.0,
                flapping: 60.0,
                hole: 60.0,
                after: 20.0,
                drain_cap: 300.0,
            }
        }
    }
}

/// Runs `cmd`; its output, or a message naming it.
fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<Output, String> {
    run(Command::new("ip").args(args))
}

/// A network namespace `erbench-<pid>` joined to the host by a veth pair
/// `eb<block>h`/`eb<block>n` on a /30 of 10.214.0.0/16, as the tests' lab
/// (tests/util/netlab.rs) but in a range of its own, so that a bench and
/// the tests can run at once. It touches no host interface and no host
/// firewall rule; dropping it deletes the pair and the namespace.
struct Lab {
    ns: String,
    host_if: String,
    ns_if: String,
    ns_ip: Ipv4Addr,
    blocked: bool,
    shaped: bool,
}

impl Lab {
    /// Builds the lab, or says why this machine cannot.
    fn new() -> Result<Lab, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (network namespaces)".into());
        }
        for program in ["ip", "tc", "iptables"] {
            if !procs::have(program) {
                return Err(format!(
                    "{program} is missing (scripts/install-bench-deps.sh)"
                ));
            }
        }
        let range = format!("{}.{}.0.0/16", RANGE.0, RANGE.1);
        for how in ["root", "match"] {
            let out = ip(&["-4", "-o", "route", "show", how, &range])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let foreign: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("default"))
                .filter(|l| !l.contains(" dev eb"))
                .collect();
            if !foreign.is_empty() {
                return Err(format!("this machine routes {range}: {foreign:?}"));
            }
        }
        remove_stale_namespaces();
        let pid = std::process::id();
        let ns = format!("erbench-{pid}");
        ip(&["netns", "add", &ns])?;
        let start = (pid.wrapping_mul(2_654_435_761) >> 8) % BLOCKS;
        let mut claimed = None;
        for i in 0..256 {
            let block = (start + i) % BLOCKS;
            let (host_if, ns_if) = (format!("eb{block}h"), format!("eb{block}n"));
            match ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ]) {
                Ok(_) => {
                    claimed = Some((block, host_if, ns_if));
                    break;
                }
                Err(e) if e.contains("exists") => continue,
                Err(e) => {
                    let _ = ip(&["netns", "del", &ns]);
                    return Err(e);
                }
            }
        }
        let Some((block, host_if, ns_if)) = claimed else {
            let _ = ip(&["netns", "del", &ns]);
            return Err("no free /30 for a veth pair".into());
        };
        let base = u32::from(Ipv4Addr::new(RANGE.0, RANGE.1, 0, 0)) + block * 4;
        let (host_ip, ns_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let lab = Lab {
            ns,
            host_if,
            ns_if,
            ns_ip,
            blocked: false,
            shaped: false,
        };
        // From here on, Drop removes whatever was made.
        let (host_addr, ns_addr) = (format!("{host_ip}/30"), format!("{ns_ip}/30"));
        let steps: [&[&str]; 6] = [
            &["link", "set", &lab.ns_if, "netns", &lab.ns],
            &["addr", "add", &host_addr, "dev", &lab.host_if],
            &["link", "set", &lab.host_if, "up"],
            &["-n", &lab.ns, "addr", "add", &ns_addr, "dev", &lab.ns_if],
            &["-n", &lab.ns, "link", "set", &lab.ns_if, "up"],
            &["-n", &lab.ns, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step)?;
        }
        Ok(lab)
    }

    fn in_ns(&self, program: &str, args: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args))
        .unwrap_or_else(|e| panic!("lab {}: {e}", self.ns));
    }

    /// Drops every packet on the namespace's end (iptables inside it).
    fn black_hole(&mut self) {
        if !self.blocked {
            self.in_ns(
                "iptables",
                &["-I", "INPUT", "-i", &self.ns_if, "-j", "DROP"],
            );
            self.in_ns(
                "iptables",
                &["-I", "OUTPUT", "-o", &self.ns_if, "-j", "DROP"],
            );
            self.blocked = true;
        }
    }

    fn restore(&mut self) {
        if self.blocked {
            self.in_ns(
                "iptables",
                &["-D", "INPUT", "-i", &self.ns_if, "-j", "DROP"],
            );
            self.in_ns(
                "iptables",
                &["-D", "OUTPUT", "-o", &self.ns_if, "-j", "DROP"],
            );
            self.blocked = false;
        }
    }

    /// Both directions to `rate` with a token bucket on each veth end.
    fn shape(&mut self, rate: &str, burst: &str) {
        let tbf = [
            "root", "tbf", "rate", rate, "burst", burst, "latency", "400ms",
        ];
        run(Command::new("tc")
            .args(["qdisc", "replace", "dev", &self.host_if])
            .args(tbf))
        .unwrap_or_else(|e| panic!("lab {}: {e}", self.ns));
        let mut args = vec!["qdisc", "replace", "dev", &self.ns_if];
        args.extend(tbf);
        self.in_ns("tc", &args);
        self.shaped = true;
    }

    fn unshape(&mut self) {
        if self.shaped {
            let _ = run(Command::new("tc").args(["qdisc", "del", "dev", &self.host_if, "root"]));
            self.in_ns("tc", &["qdisc", "del", "dev", &self.ns_if, "root"]);
            self.shaped = false;
        }
    }

    fn url(&self) -> String {
        format!("http://{}:{VM_PORT}", self.ns_ip)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.ns]) {
            eprintln!("bench: {e}");
        }
    }
}

/// Namespaces `erbench-<pid>` of a bench that no longer runs.
fn remove_stale_namespaces() {
    let Ok(out) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("erbench-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench: removing namespace {name} left by process {pid}");
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Bytes that crossed host interface `iface` so far, both directions.
fn wire_bytes(iface: &str) -> u64 {
    ["rx_bytes", "tx_bytes"]
        .iter()
        .map(|c| {
            fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{c}"))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Moves the calling thread into namespace `ns`: its sockets open there.
fn enter(ns: &str) {
    let f = fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("open namespace {ns}: {e}"));
    // SAFETY: setns on an open namespace file; only this thread moves.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {ns}: {}",
        std::io::Error::last_os_error()
    );
}

/// Rows VictoriaMetrics inserted so far (one per field), all protocols.
fn vm_rows(http: &ureq::Agent, url: &str) -> Option<f64> {
    let (code, text) = procs::get(http, &format!("{url}/metrics"))?;
    (code == 200).then(|| procs::metric_sum(&text, "vm_rows_inserted_total"))
}

/// A thread sampling something every [`POLL`], optionally from inside a
/// namespace, until finished.
struct Sampler<T> {
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<(f64, T)>>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Clone + Send + 'static> Sampler<T> {
    fn start(
        ns: Option<String>,
        t0: Instant,
        mut f: impl FnMut() -> Option<T> + Send + 'static,
    ) -> Sampler<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let out = Arc::new(Mutex::new(Vec::new()));
        let (flag, into) = (stop.clone(), out.clone());
        let thread = thread::spawn(move || {
            if let Some(ns) = ns {
                enter(&ns);
            }
            while !flag.load(Ordering::Acquire) {
                let t = t0.elapsed().as_secs_f64();
                if let Some(v) = f() {
                    into.lock().unwrap().push((t, v));
                }
                thread::sleep(POLL);
            }
        });
        Sampler {
            stop,
            out,
            thread: Some(thread),
        }
    }

    fn last(&self) -> Option<T> {
        self.out.lock().unwrap().last().map(|(_, v)| v.clone())
    }

    fn finish(mut self) -> Vec<(f64, T)> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.out.lock().unwrap())
    }
}

impl<T> Drop for Sampler<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The value of the last sample at or before `t` (the first one if none).
fn at<T: Copy>(samples: &[(f64, T)], t: f64) -> Option<T> {
    samples
        .iter()
        .take_while(|(s, _)| *s <= t)
        .last()
        .or(samples.first())
        .map(|(_, v)| *v)
}

/// A TCP proxy on loopback that delays every chunk by [`ONE_WAY`] in each
/// direction, in order, and a new connection by a round trip: a 600 ms RTT
/// link without netem.
pub struct DelayProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl DelayProxy {
    pub fn start(upstream: SocketAddr) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the delaying proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (flag, all) = (stop.clone(), conns.clone());
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let all = all.clone();
                        thread::spawn(move || {
                            let _ = client.set_nonblocking(false);
                            thread::sleep(2 * ONE_WAY);
                            let Ok(up) =
                                TcpStream::connect_timeout(&upstream, Duration::from_secs(10))
                            else {
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = up.set_nodelay(true);
                            let clones = (
                                client.try_clone(),
                                client.try_clone(),
                                up.try_clone(),
                                up.try_clone(),
                            );
                            let (Ok(c1), Ok(c2), Ok(u1), Ok(u2)) = clones else {
                                return;
                            };
                            all.lock().unwrap().extend([c1, u1]);
                            pump(client, u2);
                            pump(up, c2);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => break,
                }
            }
        });
        DelayProxy {
            port,
            stop,
            conns,
            thread: Some(thread),
        }
    }
}

/// Forwards `from` to `to`, each chunk [`ONE_WAY`] after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let (tx, rx) = mpsc::channel::<Option<(Instant, Vec<u8>)>>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    if tx
                        .send(Some((Instant::now() + ONE_WAY, buf[..n].to_vec())))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    thread::spawn(move || {
        for chunk in rx {
            let Some((due, data)) = chunk else {
                let _ = to.shutdown(Shutdown::Write);
                return;
            };
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            if to.write_all(&data).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    });
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether the second column speaks the agent's API (a baseline build).
fn agent_api(who: Who) -> bool {
    who == Who::Ours || baseline().is_some()
}

/// What one agent did on one profile.
#[derive(Default)]
struct Outcome {
    lines_per_second: f64,
    wire_per_line: f64,
    detect: f64,
    first_delivery: f64,
    raw: Value,
}

/// The data the load sends, and what VictoriaMetrics makes of it.
struct Load {
    pool: Arc<Vec<Vec<u8>>>,
    /// Rows (fields) VictoriaMetrics inserts per body of the pool.
    rows_of: Vec<f64>,
    rows_per_line: f64,
    bytes_per_line: f64,
}

impl Load {
    fn lines_per_second() -> f64 {
        WRITES_PER_SECOND * LINES_PER_WRITE as f64
    }

    /// Rows the remote holds once the first `writes` writes arrived.
    fn rows_for(&self, writes: u64) -> f64 {
        (0..writes as usize)
            .map(|i| self.rows_of[i % self.rows_of.len()])
            .sum()
    }
}

/// Fields in a body of the metrics mix (no strings, no escapes): the rows
/// VictoriaMetrics makes of it.
fn fields(body: &[u8]) -> f64 {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|f| f.split(',').count() as f64)
        .sum()
}

/// Builds the load's bodies and checks, by posting them all straight to
/// VictoriaMetrics (from inside the namespace), that it makes one row of
/// each field; if not, its own count is taken. It inserts asynchronously,
/// after its answer: the count is read once it stopped moving.
fn calibrate(ns: &str, url: &str) -> Load {
    let mut g = Generator::new(Mix::Metrics, 45);
    let pool: Vec<Vec<u8>> = (0..POOL_WRITES).map(|_| g.body(LINES_PER_WRITE)).collect();
    let mut rows_of: Vec<f64> = pool.iter().map(|b| fields(b)).collect();
    let parsed: f64 = rows_of.iter().sum();
    let (ns, url, bodies) = (ns.to_string(), url.to_string(), pool.clone());
    let inserted = thread::spawn(move || {
        enter(&ns);
        let http = procs::http();
        let write = format!("{url}/api/v2/write?org=bench&bucket=bench&precision=ns");
        let before = vm_rows(&http, &url).expect("VictoriaMetrics /metrics");
        for b in &bodies {
            let code = load::post_once(&write, b);
            assert!((200..300).contains(&code), "calibration write: {code}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = (f64::NAN, Instant::now());
        while Instant::now() < deadline {
            let n = vm_rows(&http, &url).unwrap_or(f64::NAN) - before;
            if n >= parsed || (n == last.0 && last.1.elapsed() > Duration::from_secs(3)) {
                return n;
            }
            if n != last.0 {
                last = (n, Instant::now());
            }
            thread::sleep(POLL);
        }
        last.0
    })
    .join()
    .expect("calibration");
    if inserted.is_finite() && inserted > 0.0 && (inserted - parsed).abs() > 0.5 {
        eprintln!("bench: VictoriaMetrics made {inserted} rows of {parsed} fields");
        rows_of.iter_mut().for_each(|r| *r *= inserted / parsed);
    }
    let lines = (POOL_WRITES * LINES_PER_WRITE) as f64;
    let bytes: usize = pool.iter().map(Vec::len).sum();
    Load {
        rows_per_line: rows_of.iter().sum::<f64>() / lines,
        bytes_per_line: bytes as f64 / lines,
        rows_of,
        pool: Arc::new(pool),
    }
}

/// One agent, one profile: start it, load it, disturb the link as the
/// profile says, stop the load, wait until everything arrived (or
/// `drain_cap`), and read the figures off the samples.
#[allow(clippy::too_many_arguments)]
fn run_one(
    ctx: &Ctx,
    lab: &mut Lab,
    load_: &Load,
    profile: &Profile,
    times: &Times,
    who: Who,
    remote: &str,
    tag: &str,
) -> Outcome {
    let dir = ctx.work.join(format!("link-{tag}-{}", who.name()));
    let _ = fs::remove_dir_all(&dir);
    let port = procs::free_port();
    let (mut p, _) = who.start_with(ctx, &dir, port, remote, "5m", profile.extra);
    let t0 = Instant::now();
    // The remote, from inside the namespace.
    let vm_url = lab.url();
    let rows = {
        let http = procs::http();
        let url = vm_url.clone();
        Sampler::start(Some(lab.ns.clone()), t0, move || vm_rows(&http, &url))
    };
    // The veth and the agent, from the host.
    let host = {
        let http = procs::http();
        let iface = lab.host_if.clone();
        let api = agent_api(who);
        Sampler::start(None, t0, move || {
            let wire = wire_bytes(&iface);
            // Noticed: ours says the link is not up; vmagent counts errors.
            let noticed = if api {
                let st = procs::agent_status(&http, port)?;
                let link = st["link"].as_str().unwrap_or("");
                f64::from(u8::from(link == "stalled" || link == "down"))
            } else {
                let (_, text) = procs::get(&http, &format!("http://127.0.0.1:{port}/metrics"))?;
                procs::metric_sum(&text, "vmagent_remotewrite_errors_total")
            };
            Some((wire, noticed))
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, sent) = load::paced(
        &write_url(port),
        load_.pool.clone(),
        WRITES_PER_SECOND,
        stop.clone(),
    );
    // The schedule: (seconds since start, link down?).
    let mut events: Vec<(f64, bool)> = Vec::new();
    let end = match profile.kind {
        Kind::Shaped(..) | Kind::Delayed => times.warm + times.window,
        Kind::Flapping => {
            let mut t = times.warm;
            while t < times.warm + times.flapping {
                events.push((t, true));
                events.push((t + 5.0, false));
                t += 10.0;
            }
            times.warm + times.flapping
        }
        Kind::BlackHole => {
            events.push((times.warm, true));
            events.push((times.warm + times.hole, false));
            times.warm + times.hole + times.after
        }
    };
    for &(t, down) in &events {
        if let Some(wait) = Duration::from_secs_f64(t).checked_sub(t0.elapsed()) {
            thread::sleep(wait);
        }
        if down {
            lab.black_hole();
        } else {
            lab.restore();
        }
    }
    if let Some(wait) = Duration::from_secs_f64(end).checked_sub(t0.elapsed()) {
        thread::sleep(wait);
    }
    stop.store(true, Ordering::Release);
    writer.join().expect("load thread");
    lab.restore();
    let load_stop = t0.elapsed().as_secs_f64();
    let writes = sent.bodies.load(Ordering::Acquire);
    let failed = sent.failed.load(Ordering::Acquire);
    // Until everything written arrived (resends may count twice at the
    // remote; they are few next to the load).
    let rows0 = rows.out.lock().unwrap().first().map_or(0.0, |(_, r)| *r);
    let expected = rows0 + load_.rows_for(writes);
    let drain_deadline = Instant::now() + Duration::from_secs_f64(times.drain_cap);
    let mut drained = false;
    while Instant::now() < drain_deadline {
        if rows.last().is_some_and(|r| r >= expected) {
            drained = true;
            break;
        }
        thread::sleep(POLL);
    }
    let drain_seconds = t0.elapsed().as_secs_f64() - load_stop;
    thread::sleep(Duration::from_millis(300));
    let rows = rows.finish();
    let host = host.finish();
    let agent_delivered = if agent_api(who) {
        procs::agent_status(&ctx.http, port).map(|st| procs::field(&st, "deliveredLines"))
    } else {
        None
    };
    p.stop(Duration::from_secs(60));
    let _ = fs::remove_dir_all(&dir);

    let rows_at = |t: f64| at(&rows, t).unwrap_or(f64::NAN);
    let lines_between = |a: f64, b: f64| (rows_at(b) - rows_at(a)) / load_.rows_per_line;
    let mut o = Outcome {
        lines_per_second: f64::NAN,
        detect: f64::NAN,
        first_delivery: f64::NAN,
        ..Outcome::default()
    };
    match profile.kind {
        Kind::Shaped(..) | Kind::Delayed => {
            o.lines_per_second = lines_between(times.warm, end) / times.window;
        }
        Kind::Flapping => {
            o.lines_per_second = lines_between(times.warm, end) / times.flapping;
        }
        Kind::BlackHole => {}
    }
    // Wire bytes over the whole run, per line that arrived in it.
    let wire = host.last().map_or(0, |(_, (w, _))| *w) - host.first().map_or(0, |(_, (w, _))| *w);
    let delivered = (rows.last().map_or(0.0, |(_, r)| *r) - rows0) / load_.rows_per_line;
    o.wire_per_line = wire as f64 / delivered;
    // After each return of the link: the first line to arrive, before the
    // next outage (or the end of the run).
    let ups: Vec<f64> = events.iter().filter(|e| !e.1).map(|e| e.0).collect();
    let mut firsts = Vec::new();
    for &up in &ups {
        let until = events
            .iter()
            .find(|e| e.1 && e.0 > up)
            .map_or(f64::INFINITY, |e| e.0);
        let base = rows_at(up);
        let first = rows
            .iter()
            .find(|(t, r)| *t > up && *t <= until && *r > base)
            .map(|(t, _)| t - up);
        firsts.push(first.unwrap_or(f64::NAN));
    }
    o.first_delivery = median(&firsts);
    // A black hole noticed while it lasted.
    if let (Kind::BlackHole, Some(&(down, _)), Some(&up)) =
        (profile.kind, events.first(), ups.first())
    {
        let before = at(&host, down).map_or(0.0, |(_, n)| n);
        o.detect = host
            .iter()
            .find(|(t, (_, n))| *t >= down && *t <= up && *n > before)
            .map_or(f64::NAN, |(t, _)| t - down);
    }
    o.raw = json!({
        "agent": who.name(), "writes": writes, "failedWrites": failed,
        "linesWritten": writes * LINES_PER_WRITE as u64, "linesArrived": delivered,
        "agentDeliveredLines": agent_delivered, "wireBytes": wire, "drained": drained,
        "drainSecondsAfterLoad": drain_seconds, "events": events, "firstDeliveries": firsts,
        "detectSeconds": o.detect, "linesPerSecond": o.lines_per_second,
        "rowsSamples": rows.iter().step_by(5).collect::<Vec<_>>(),
        "wireSamples": host.iter().step_by(5).map(|(t, (w, n))| (t, w, n)).collect::<Vec<_>>(),
    });
    if !drained {
        eprintln!(
            "bench: {} on {}: not everything arrived within {} s of the load's end",
            who.name(),
            profile.name,
            times.drain_cap
        );
    }
    o
}

/// Phase 7. Returns the notes printed under the table.
pub fn link(
    ctx: &Ctx,
    rows: &mut Vec<Row>,
    raw: &mut serde_json::Map<String, serde_json::Value>,
) -> String {
    let times = Times::new(ctx.sizes.quick);
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize);
    let mut lab = match Lab::new() {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!("bench: link phase skipped: {why}");
            return format!("Links: not measured ({why}).");
        }
    };
    eprintln!("bench: link lab {} on {}", lab.ns, lab.host_if);
    let vm_dir = ctx.work.join("link-victoria-metrics");
    let _ = fs::remove_dir_all(&vm_dir);
    fs::create_dir_all(&vm_dir).expect("create VictoriaMetrics' directory");
    let mut vm = Proc::spawn(
        "victoria-metrics",
        Command::new("ip")
            .args(["netns", "exec", &lab.ns, "victoria-metrics"])
            .arg(format!("-httpListenAddr={}:{VM_PORT}", lab.ns_ip))
            .arg(format!(
                "-storageDataPath={}",
                vm_dir.join("data").display()
            ))
            .arg("-retentionPeriod=100y")
            .arg("-loggerLevel=WARN"),
        vm_dir.join("victoria-metrics.log"),
    );
    vm.wait_ready(&format!("{}/health", lab.url()), Duration::from_secs(60));
    let load_ = calibrate(&lab.ns, &lab.url());
    let offered = Load::lines_per_second();
    eprintln!(
        "bench: link load {offered:.0} lines/s, {:.0} bytes and {:.2} rows per line",
        load_.bytes_per_line, load_.rows_per_line
    );
    let profiles = [
        Profile {
            name: "256 kbit/s".into(),
            kind: Kind::Shaped("256kbit", "16kb", 256e3 / 8.0),
            extra: "",
        },
        // A metered link as the README's worked example sets one up: a data
        // budget, so batches wait for company (`batch_wait`, 5 s by
        // default) and go ordered by series at level 9.
        Profile {
            name: "256 kbit/s metered".into(),
            kind: Kind::Shaped("256kbit", "16kb", 256e3 / 8.0),
            extra: "\n[link]\nmonthly_budget = \"900MB\"\n",
        },
        Profile {
            name: "1 Mbit/s".into(),
            kind: Kind::Shaped("1mbit", "32kb", 1e6 / 8.0),
            extra: "",
        },
        Profile {
            name: "600 ms RTT".into(),
            kind: Kind::Delayed,
            extra: "",
        },
        Profile {
            name: "flapping 5 s/5 s".into(),
            kind: Kind::Flapping,
            extra: "",
        },
        Profile {
            name: format!("{:.0} s black hole", times.hole),
            kind: Kind::BlackHole,
            extra: "",
        },
    ];
    // `BENCH_LINK=256,RTT`: only the profiles whose names hold one of these.
    let only: Vec<String> = std::env::var("BENCH_LINK")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    let profiles: Vec<Profile> = profiles
        .into_iter()
        .filter(|p| only.is_empty() || only.iter().any(|o| p.name.contains(o.as_str())))
        .collect();
    let upstream = SocketAddr::from((lab.ns_ip, VM_PORT));
    let mut per_profile = serde_json::Map::new();
    for (i, profile) in profiles.iter().enumerate() {
        let [mut lps, mut ratio, mut ceiling, mut wire, mut detect, mut first] =
            std::array::from_fn(|_| Samples::default());
        let mut outcomes = Vec::new();
        let proxy = match profile.kind {
            Kind::Shaped(rate, burst, _) => {
                lab.shape(rate, burst);
                None
            }
            Kind::Delayed => Some(DelayProxy::start(upstream)),
            Kind::Flapping | Kind::BlackHole => None,
        };
        let remote = match &proxy {
            Some(p) => format!("http://127.0.0.1:{}", p.port),
            None => lab.url(),
        };
        for run in 0..runs {
            for who in Who::order(run) {
                eprintln!(
                    "bench: link {}, {offered:.0} lines/s: {} run {}",
                    profile.name,
                    who.name(),
                    run + 1
                );
                let o = run_one(
                    ctx,
                    &mut lab,
                    &load_,
                    profile,
                    &times,
                    who,
                    &remote,
                    &format!("{i}"),
                );
                lps.push(who, o.lines_per_second);
                if let Kind::Shaped(_, _, cap) = profile.kind {
                    ratio.push(who, o.lines_per_second * load_.bytes_per_line / cap);
                    ceiling.push(who, cap / o.wire_per_line);
                }
                wire.push(who, o.wire_per_line);
                detect.push(who, o.detect);
                first.push(who, o.first_delivery);
                outcomes.push(o.raw);
            }
        }
        drop(proxy);
        lab.unshape();
        let name = &profile.name;
        match profile.kind {
            Kind::Shaped(..) => {
                rows.push(lps.row(&format!("link {name}: lines/s delivered"), Target::None));
                rows.push(ratio.row(
                    &format!("link {name}: payload bytes/s ÷ link bytes/s"),
                    Target::None,
                ));
                rows.push(ceiling.row(
                    &format!("link {name}: link bytes/s ÷ wire bytes per line (lines/s)"),
                    Target::None,
                ));
            }
            Kind::Delayed | Kind::Flapping => {
                rows.push(lps.row(&format!("link {name}: lines/s delivered"), Target::None));
            }
            Kind::BlackHole => {
                rows.push(detect.row(
                    &format!("link {name}: noticed after (s; n/a: not while it lasted)"),
                    Target::None,
                ));
            }
        }
        if matches!(profile.kind, Kind::Flapping | Kind::BlackHole) {
            rows.push(first.row(
                &format!("link {name}: link up to first line delivered (s)"),
                Target::None,
            ));
        }
        rows.push(wire.row(
            &format!("link {name}: wire bytes per line delivered"),
            Target::None,
        ));
        per_profile.insert(
            name.clone(),
            json!({
                "linesPerSecond": lps.json(), "payloadOverLink": ratio.json(), "linkBoundLinesPerSecond": ceiling.json(),
                "wireBytesPerLine": wire.json(), "detectSeconds": detect.json(),
                "firstDeliverySeconds": first.json(), "runs": outcomes,
            }),
        );
    }
    vm.stop(Duration::from_secs(30));
    drop(lab);
    let _ = fs::remove_dir_all(&vm_dir);
    raw.insert(
        "link".into(),
        json!({
            "offeredLinesPerSecond": offered, "bytesPerLine": load_.bytes_per_line,
            "rowsPerLine": load_.rows_per_line, "profiles": per_profile,
            "seconds": {"warm": times.warm, "window": times.window, "flapping": times.flapping,
                        "blackHole": times.hole, "afterBlackHole": times.after},
        }),
    );
    format!(
        "Links: {offered:.0} lines/s of the metrics mix ({:.0} bytes a line) offered to each agent, \
both with their defaults, shipping to VictoriaMetrics over a veth pair; wire bytes are the veth's \
own counters, both directions, over the whole run (load, then until everything arrived); lines \
delivered are counted at the remote. A black hole is noticed by ours when status says `link` \
`stalled` or `down`, by vmagent when `vmagent_remotewrite_errors_total` grows.",
        load_.bytes_per_line
    )
}
