//! A fault-injecting remote: an InfluxDB-shaped HTTP/1.1 server on a loopback
//! port that misbehaves on purpose, so the delivery tests can prove each row
//! of the README's "What happens on each remote answer".
//!
//! It is hand-rolled on `std::net` rather than built on a server crate
//! because a well-behaved server cannot do what the tests need: reset a
//! connection without answering, send half a status line, stall past the
//! client's timeout, or dribble a body one byte at a time.
//!
//! Every request is recorded (target, headers, gzip-decoded body) and answered
//! by the next scripted [`Action`] if any, else by a rule (`Fn(&Request) ->
//! Action`), else with 204. The remote "commits" a request's lines to the
//! accepted set when it starts a 2xx answer to a client that is still
//! connected: a line in that set is one the agent could have seen acknowledged.
//! A partial write ([`Action::Partial`], built by the [`dialect`]s of the
//! InfluxDB family) commits only the lines the remote took, whatever its code.
//!
//! Everything is bounded: reads time out, stalls and slow bodies give up as
//! soon as the server stops, and dropping the server stops and joins every
//! thread. When a test panics, the tail of the request log is printed.
#![allow(dead_code)]

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flate2::read::MultiGzDecoder;

/// How long a connection may sit idle (no request bytes) before the server
/// closes it; the agent must cope with that like any real server's timeout.
const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// Granularity of every blocking wait, so a stop is noticed quickly.
const TICK: Duration = Duration::from_millis(50);
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 256 * 1024 * 1024;

/// One request as the remote received it.
#[derive(Debug)]
pub struct Request {
    /// Order of arrival at this server, from 0.
    pub seq: usize,
    /// Which TCP connection carried it (keep-alive reuse shows as repeats).
    pub conn: usize,
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Body bytes on the wire (after de-chunking, before gunzip).
    pub wire_len: usize,
    /// The body after `Content-Encoding: gzip` was undone.
    pub body: String,
    /// Why the body could not be gunzipped, if it could not.
    pub decode_error: Option<String>,
    /// When the request's head and body had been read.
    pub at: Instant,
    pub at_system: SystemTime,
    /// When the remote began writing its answer: the agent cannot have
    /// read it earlier, so a wait the agent starts on the answer starts
    /// after this (a thread preempted between writing and recording could
    /// record [`Request::answered`] after the agent's wait began).
    pub answer_began: OnceLock<Instant>,
    /// When the remote finished answering (unset if it never answered).
    pub answered: OnceLock<Instant>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// A query parameter, percent-decoded.
    pub fn query(&self, key: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    /// The body's non-empty lines.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.body.split('\n').filter(|l| !l.is_empty())
    }

    pub fn line_count(&self) -> usize {
        self.lines().count()
    }

    /// Size of the decompressed body.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// The `Authorization` header equals `Token <token>`.
    pub fn has_token(&self, token: &str) -> bool {
        self.header("authorization") == Some(&format!("Token {token}"))
    }
}

/// What the remote does with one request.
#[derive(Clone)]
pub enum Action {
    /// Answer with this status, extra headers and body.
    Status(u16, Vec<(String, String)>, String),
    /// Answer `code` with `Retry-After: <n>` (delta seconds).
    RetryAfterSecs(u16, u64),
    /// Answer `code` with `Retry-After: <HTTP date>`.
    RetryAfterDate(u16, SystemTime),
    /// Say nothing for this long, then do the inner action (unless the
    /// client hung up meanwhile, in which case the connection is closed).
    Stall(Duration, Box<Action>),
    /// Close the socket without answering, with SO_LINGER 0 so the client
    /// gets a TCP RST.
    Reset,
    /// Send part of a status line and headers, then close.
    Truncated,
    /// Send the head of a `code` answer with a body of `len` bytes, then the
    /// body one byte per `pause`.
    SlowBody(u16, usize, Duration),
    /// Commit exactly these lines (a partial write), then answer like
    /// `Status`, whatever the code: the [`dialect`]s build it.
    Partial(Vec<String>, u16, Vec<(String, String)>, String),
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Status(code, headers, body) => {
                write!(f, "{code}")?;
                for (k, v) in headers {
                    write!(f, " {k}: {v};")?;
                }
                if !body.is_empty() {
                    let short: String = body.chars().take(60).collect();
                    write!(f, " {short:?}")?;
                }
                Ok(())
            }
            Action::RetryAfterSecs(code, n) => write!(f, "{code} Retry-After: {n}"),
            Action::RetryAfterDate(code, t) => {
                write!(f, "{code} Retry-After: {}", httpdate::fmt_http_date(*t))
            }
            Action::Stall(d, then) => write!(f, "stall {d:?} then {then:?}"),
            Action::Reset => write!(f, "reset"),
            Action::Truncated => write!(f, "truncated answer"),
            Action::SlowBody(code, len, pause) => {
                write!(f, "{code} with a slow {len}-byte body ({pause:?}/byte)")
            }
            Action::Partial(lines, code, headers, body) => {
                write!(f, "partial write of {} lines, then ", lines.len())?;
                Action::Status(*code, headers.clone(), body.clone()).fmt(f)
            }
        }
    }
}

impl Action {
    /// 204 No Content, as InfluxDB answers a good write.
    pub fn ok() -> Action {
        Action::Status(204, Vec::new(), String::new())
    }

    /// `code` with no body.
    pub fn status(code: u16) -> Action {
        Action::Status(code, Vec::new(), String::new())
    }

    /// `code` with InfluxDB v2's error body `{"code":..,"message":..}`.
    pub fn influx_error(code: u16, message: &str) -> Action {
        let kind = match code {
            400 => "invalid",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not found",
            413 => "request too large",
            422 => "unprocessable entity",
            429 => "too many requests",
            503 => "unavailable",
            _ => "internal error",
        };
        let body = serde_json::json!({ "code": kind, "message": message }).to_string();
        Action::Status(
            code,
            vec![(
                "Content-Type".into(),
                "application/json; charset=utf-8".into(),
            )],
            body,
        )
    }

    pub fn stall(d: Duration, then: Action) -> Action {
        Action::Stall(d, Box::new(then))
    }
}

/// How the members of the InfluxDB family answer a write holding lines they
/// refuse (`refused` picks them), after the agent's reference
/// (`influxdb-write-answers.md`). Line numbers are 1-based physical lines of
/// the decompressed body, as the remotes count them.
pub mod dialect {
    use super::{Action, Request};

    fn json(code: u16, body: serde_json::Value) -> Action {
        Action::Status(
            code,
            vec![(
                "Content-Type".into(),
                "application/json; charset=utf-8".into(),
            )],
            body.to_string(),
        )
    }

    fn partial(written: Vec<String>, answer: Action) -> Action {
        match answer {
            Action::Status(code, headers, body) => Action::Partial(written, code, headers, body),
            other => other,
        }
    }

    /// The body's physical lines, numbered from 1, split into the refused
    /// ones and the others.
    fn sort(req: &Request, refused: impl Fn(&str) -> bool) -> (Vec<(usize, String)>, Vec<String>) {
        let body = req.body.strip_suffix('\n').unwrap_or(&req.body);
        let (mut bad, mut good) = (Vec::new(), Vec::new());
        for (i, line) in body.split('\n').enumerate() {
            if refused(line) {
                bad.push((i + 1, line.to_string()));
            } else if !line.is_empty() {
                good.push(line.to_string());
            }
        }
        (bad, good)
    }

    /// InfluxDB 3 Core's v2 endpoint while its write buffer is full: a 400
    /// about the server, for every request alike.
    pub fn wal_full() -> Action {
        Action::influx_error(400, "error from wal: wal buffer full, please try again")
    }

    /// OSS 2.x: writes the other lines and answers 422 with only a count.
    pub fn oss_partial(req: &Request, refused: impl Fn(&str) -> bool) -> Action {
        let (bad, good) = sort(req, refused);
        if bad.is_empty() {
            return Action::ok();
        }
        let message = format!(
            "failure writing points to database: partial write: points beyond retention policy dropped={}",
            bad.len()
        );
        partial(
            good,
            json(
                422,
                serde_json::json!({"code": "unprocessable entity", "message": message}),
            ),
        )
    }

    /// OSS 1.x: writes what it can and answers 400 `partial write:`; its
    /// `dropped=N` counts type conflicts only, and a line it cannot parse
    /// (quoted) comes with `dropped=0` when there is no conflict.
    pub fn oss1(
        req: &Request,
        conflict: impl Fn(&str) -> bool,
        unparseable: impl Fn(&str) -> bool,
    ) -> Action {
        let (conflicts, _) = sort(req, &conflict);
        let (broken, _) = sort(req, &unparseable);
        let (_, good) = sort(req, |l| conflict(l) || unparseable(l));
        let message = if !conflicts.is_empty() {
            format!(
                "partial write: field type conflict: input field \"v\" on measurement \"m\" is type float, already exists as type integer dropped={}",
                conflicts.len()
            )
        } else if let Some((_, line)) = broken.first() {
            format!("partial write: unable to parse '{line}': invalid field format dropped=0")
        } else {
            return Action::ok();
        };
        partial(good, json(400, serde_json::json!({ "error": message })))
    }

    /// Cloud Serverless (IOx with partial writes): writes the other lines
    /// and answers 400 naming up to 100 refused ones, `"line"` the first.
    /// Each named line's message is `pad` bytes longer, to make long bodies.
    pub fn serverless(req: &Request, refused: impl Fn(&str) -> bool, pad: usize) -> Action {
        let (bad, good) = sort(req, refused);
        let Some(&(first, _)) = bad.first() else {
            return Action::ok();
        };
        let mut message =
            String::from("failed to parse line protocol: errors encountered on line(s):");
        for (n, _) in bad.iter().take(100) {
            message.push_str(&format!(
                "\nerror parsing line {n} (1-based): Invalid field value{}",
                ".".repeat(pad)
            ));
        }
        partial(
            good,
            json(
                400,
                serde_json::json!({"code": "invalid", "line": first, "message": message}),
            ),
        )
    }

    /// InfluxDB 3 Core's v1 endpoint (partial writes off): writes nothing
    /// and names the first refused line, quoting it.
    pub fn core_v1(req: &Request, refused: impl Fn(&str) -> bool) -> Action {
        let (bad, _) = sort(req, refused);
        let Some((n, line)) = bad.first() else {
            return Action::ok();
        };
        json(
            400,
            serde_json::json!({
                "error": "parsing failed for write_lp endpoint",
                "data": {"original_line": line, "line_number": n, "error_message": "invalid column type"},
            }),
        )
    }

    /// InfluxDB 3 with partial writes on: writes the other lines and lists
    /// every refused one, with the status `code` (a 400, or a 2xx).
    pub fn core_partial(req: &Request, refused: impl Fn(&str) -> bool, code: u16) -> Action {
        let (bad, good) = sort(req, refused);
        if bad.is_empty() {
            return Action::ok();
        }
        let data: Vec<_> = bad
            .iter()
            .map(|(n, line)| {
                serde_json::json!({"original_line": line, "line_number": n, "error_message": "invalid column type"})
            })
            .collect();
        partial(
            good,
            json(
                code,
                serde_json::json!({"error": "partial write of line protocol occurred", "data": data}),
            ),
        )
    }
}

type Rule = Arc<dyn Fn(&Request) -> Action + Send + Sync>;

struct Shared {
    stop: AtomicBool,
    script: Mutex<VecDeque<Action>>,
    rule: Mutex<Rule>,
    requests: Mutex<Vec<Arc<Request>>>,
    log: Mutex<Vec<String>>,
    accepted: Mutex<Accepted>,
    next_seq: AtomicUsize,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Default)]
struct Accepted {
    lines: HashSet<String>,
    /// Lines committed, counting repeats (a retried batch counts twice).
    total: u64,
    requests: u64,
}

/// The fault-injecting remote. Stops on drop.
pub struct FaultServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultServer {
    /// A remote that answers 204 to everything until scripted.
    pub fn start() -> FaultServer {
        FaultServer::with_rule(|_| Action::ok())
    }

    /// A remote that answers each request as `rule` says (after the script).
    pub fn with_rule(rule: impl Fn(&Request) -> Action + Send + Sync + 'static) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        FaultServer::on(listener, rule)
    }

    /// A remote serving on a socket the test bound (for example a port
    /// that refused connections until now).
    pub fn on(
        listener: TcpListener,
        rule: impl Fn(&Request) -> Action + Send + Sync + 'static,
    ) -> FaultServer {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            script: Mutex::new(VecDeque::new()),
            rule: Mutex::new(Arc::new(rule)),
            requests: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            accepted: Mutex::new(Accepted::default()),
            next_seq: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = thread::Builder::new()
            .name(format!("fault-{}", addr.port()))
            .spawn(move || accept_loop(listener, s))
            .expect("spawn fault server");
        FaultServer {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Replaces the rule for requests that find the script empty.
    pub fn set_rule(&self, rule: impl Fn(&Request) -> Action + Send + Sync + 'static) {
        *self.shared.rule.lock().unwrap() = Arc::new(rule);
    }

    /// Appends actions for the next requests, one each, before the rule.
    pub fn script(&self, actions: impl IntoIterator<Item = Action>) {
        self.shared.script.lock().unwrap().extend(actions);
    }

    /// Scripted actions not used yet.
    pub fn script_left(&self) -> usize {
        self.shared.script.lock().unwrap().len()
    }

    pub fn requests(&self) -> Vec<Arc<Request>> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    pub fn request(&self, seq: usize) -> Option<Arc<Request>> {
        self.shared.requests.lock().unwrap().get(seq).cloned()
    }

    /// Every distinct line the remote committed.
    pub fn accepted(&self) -> HashSet<String> {
        self.shared.accepted.lock().unwrap().lines.clone()
    }

    /// Number of distinct lines committed.
    pub fn accepted_len(&self) -> usize {
        self.shared.accepted.lock().unwrap().lines.len()
    }

    /// Lines committed counting repeats, and the number of answers that
    /// committed lines (2xx and partial writes).
    pub fn accepted_totals(&self) -> (u64, u64) {
        let a = self.shared.accepted.lock().unwrap();
        (a.total, a.requests)
    }

    pub fn has_accepted(&self, line: &str) -> bool {
        self.shared.accepted.lock().unwrap().lines.contains(line)
    }

    /// One line per request: what came and what the remote did.
    pub fn summary(&self, last: usize) -> String {
        let log = self.shared.log.lock().unwrap();
        let from = log.len().saturating_sub(last);
        let mut out = format!(
            "fault remote {} ({} requests; showing the last {}):\n",
            self.addr,
            log.len(),
            log.len() - from
        );
        for l in &log[from..] {
            out.push_str("  ");
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.summary(40));
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for h in conns {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conn_id = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let id = conn_id;
                conn_id += 1;
                let s = shared.clone();
                let handle = thread::Builder::new()
                    .name(format!("fault-conn-{id}"))
                    .spawn(move || serve(stream, s, id));
                match handle {
                    Ok(h) => {
                        let mut conns = shared.conns.lock().unwrap();
                        // Reap finished connections so the list stays short.
                        let (done, live): (Vec<_>, Vec<_>) =
                            conns.drain(..).partition(|h| h.is_finished());
                        for h in done {
                            let _ = h.join();
                        }
                        *conns = live;
                        conns.push(h);
                    }
                    Err(e) => eprintln!("fault server: cannot spawn a connection thread: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => {
                eprintln!("fault server: accept: {e}");
                thread::sleep(TICK);
            }
        }
    }
}

/// Reads a connection's bytes with short timeouts so that a stop or a long
/// idle period ends it.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
enum ReadEnd {
    /// The client closed (or reset) the connection.
    Closed,
    /// The server is stopping, or the connection idled too long.
    Stop,
    Bad(String),
}

impl Conn {
    /// Reads more bytes into `buf`.
    fn fill(&mut self) -> Result<(), ReadEnd> {
        let idle_since = Instant::now();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Err(ReadEnd::Stop);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    if idle_since.elapsed() > IDLE_LIMIT {
                        return Err(ReadEnd::Stop);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(ReadEnd::Closed),
            }
        }
    }

    /// Takes bytes up to and including `delim`.
    fn take_until(&mut self, delim: &[u8], limit: usize) -> Result<Vec<u8>, ReadEnd> {
        let mut searched = 0;
        loop {
            if let Some(pos) = find(&self.buf[searched..], delim) {
                let end = searched + pos + delim.len();
                return Ok(self.buf.drain(..end).collect());
            }
            searched = self.buf.len().saturating_sub(delim.len() - 1);
            if self.buf.len() > limit {
                return Err(ReadEnd::Bad("header or chunk line too long".into()));
            }
            self.fill()?;
        }
    }

    fn take_exact(&mut self, n: usize) -> Result<Vec<u8>, ReadEnd> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

struct Head {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

fn parse_head(raw: &[u8]) -> Result<Head, ReadEnd> {
    let text = std::str::from_utf8(raw).map_err(|_| ReadEnd::Bad("head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadEnd::Bad(format!("bad request line {request_line:?}")));
    };
    let mut headers = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| ReadEnd::Bad(format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Head {
        method: method.into(),
        target: target.into(),
        version: version.into(),
        headers,
    })
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn read_body(conn: &mut Conn, headers: &[(String, String)]) -> Result<Vec<u8>, ReadEnd> {
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut body = Vec::new();
        loop {
            let line = conn.take_until(b"\r\n", 4096)?;
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let size_text = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| ReadEnd::Bad(format!("bad chunk size {text:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let t = conn.take_until(b"\r\n", MAX_HEAD)?;
                    if t == b"\r\n" {
                        return Ok(body);
                    }
                }
            }
            if body.len() + size > MAX_BODY {
                return Err(ReadEnd::Bad("chunked body too large".into()));
            }
            body.extend(conn.take_exact(size)?);
            if conn.take_exact(2)? != b"\r\n" {
                return Err(ReadEnd::Bad("chunk not followed by CRLF".into()));
            }
        }
    }
    let len = match header(headers, "content-length") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ReadEnd::Bad(format!("bad Content-Length {v:?}")))?,
        None => 0,
    };
    if len > MAX_BODY {
        return Err(ReadEnd::Bad("body too large".into()));
    }
    conn.take_exact(len)
}

fn serve(stream: TcpStream, shared: Arc<Shared>, conn_id: usize) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(TICK));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        shared: shared.clone(),
    };
    loop {
        // Wait for the next request; a clean close between requests is normal.
        if conn.buf.is_empty() {
            if let Err(end) = conn.fill() {
                if let ReadEnd::Bad(why) = end {
                    note(&shared, format!("conn {conn_id}: {why}"));
                }
                return;
            }
        }
        let raw = match conn.take_until(b"\r\n\r\n", MAX_HEAD) {
            Ok(raw) => raw,
            Err(ReadEnd::Bad(why)) => {
                note(&shared, format!("conn {conn_id}: bad request: {why}"));
                let _ = conn.stream.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return;
            }
            Err(_) => return,
        };
        let head = match parse_head(&raw) {
            Ok(h) => h,
            Err(end) => {
                note(&shared, format!("conn {conn_id}: {end:?}"));
                return;
            }
        };
        let expects_continue =
            header(&head.headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue
            && conn
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .is_err()
        {
            return;
        }
        let wire = match read_body(&mut conn, &head.headers) {
            Ok(b) => b,
            Err(end) => {
                note(
                    &shared,
                    format!("conn {conn_id}: body of {} not read: {end:?}", head.target),
                );
                return;
            }
        };
        let gzipped = header(&head.headers, "content-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("gzip"));
        let (body, decode_error) = if gzipped {
            let mut out = Vec::new();
            match MultiGzDecoder::new(&wire[..]).read_to_end(&mut out) {
                Ok(_) => (out, None),
                Err(e) => (wire.clone(), Some(format!("gunzip: {e}"))),
            }
        } else {
            (wire.clone(), None)
        };
        let keep_alive = !(head.version == "HTTP/1.0"
            || header(&head.headers, "connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")));
        let req = Arc::new(Request {
            seq: shared.next_seq.fetch_add(1, Ordering::SeqCst),
            conn: conn_id,
            method: head.method,
            target: head.target,
            headers: head.headers,
            wire_len: wire.len(),
            body: String::from_utf8_lossy(&body).into_owned(),
            decode_error,
            at: Instant::now(),
            at_system: SystemTime::now(),
            answer_began: OnceLock::new(),
            answered: OnceLock::new(),
        });
        shared.requests.lock().unwrap().push(req.clone());
        let action = {
            let scripted = shared.script.lock().unwrap().pop_front();
            match scripted {
                Some(a) => a,
                None => {
                    let rule = shared.rule.lock().unwrap().clone();
                    rule(&req)
                }
            }
        };
        let described = format!(
            "#{} conn {} {} {} lines, {} B decoded, {} B on the wire{} -> {action:?}",
            req.seq,
            conn_id,
            req.target,
            req.line_count(),
            req.body_len(),
            req.wire_len,
            req.decode_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
        );
        let outcome = act(&mut conn, &shared, &req, action);
        let _ = req.answered.set(Instant::now());
        note(&shared, format!("{described}: {}", outcome.describe()));
        match outcome {
            Outcome::Answered if keep_alive => continue,
            _ => return,
        }
    }
}

fn note(shared: &Shared, line: String) {
    shared.log.lock().unwrap().push(line);
}

enum Outcome {
    /// A full answer was written; the connection can carry more requests.
    Answered,
    /// The connection was closed on purpose (reset, truncation, slow body).
    Closed(&'static str),
    /// The client hung up, or writing failed.
    Gone(String),
    Stopped,
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Answered => "answered".into(),
            Outcome::Closed(how) => format!("closed ({how})"),
            Outcome::Gone(why) => format!("client gone ({why})"),
            Outcome::Stopped => "server stopping".into(),
        }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn response_head(code: u16, headers: &[(String, String)], body_len: usize) -> String {
    let mut h = format!("HTTP/1.1 {code} {}\r\n", reason(code));
    if code != 204 && code >= 200 {
        h.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("X-Influxdb-Build: fault-remote\r\n\r\n");
    h
}

/// The client has closed its side (EOF) or reset the connection.
fn peer_gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let gone = match stream.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    gone
}

/// Sleeps `d` in ticks; false if the server stopped meanwhile.
fn pause(shared: &Shared, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        thread::sleep((until - now).min(TICK));
    }
}

/// Commits the request's lines: the remote has decided to say 2xx.
fn commit(shared: &Shared, req: &Request) {
    commit_lines(shared, req.lines());
}

/// Commits these lines (all of a request's, or those a partial write took).
fn commit_lines<'a>(shared: &Shared, lines: impl Iterator<Item = &'a str>) {
    let mut a = shared.accepted.lock().unwrap();
    for l in lines {
        a.total += 1;
        a.lines.insert(l.to_string());
    }
    a.requests += 1;
}

fn write_answer(conn: &mut Conn, code: u16, headers: &[(String, String)], body: &str) -> Outcome {
    let mut out = response_head(code, headers, body.len()).into_bytes();
    if code != 204 {
        out.extend_from_slice(body.as_bytes());
    }
    match conn
        .stream
        .write_all(&out)
        .and_then(|_| conn.stream.flush())
    {
        Ok(()) => Outcome::Answered,
        Err(e) => Outcome::Gone(e.to_string()),
    }
}

fn act(conn: &mut Conn, shared: &Shared, req: &Request, action: Action) -> Outcome {
    match action {
        Action::Partial(written, code, headers, body) => {
            if peer_gone(&conn.stream) {
                return Outcome::Gone("hung up before the answer".into());
            }
            commit_lines(shared, written.iter().map(String::as_str));
            let _ = req.answer_began.set(Instant::now());
            write_answer(conn, code, &headers, &body)
        }
        Action::Status(code, headers, body) => {
            if peer_gone(&conn.stream) {
                return Outcome::Gone("hung up before the answer".into());
            }
            if (200..300).contains(&code) {
                commit(shared, req);
            }
            let _ = req.answer_began.set(Instant::now());
            write_answer(conn, code, &headers, &body)
        }
        Action::RetryAfterSecs(code, n) => {
            let msg = format!("slow down: retry after {n} s");
            let Action::Status(_, mut headers, body) = Action::influx_error(code, &msg) else {
                unreachable!()
            };
            headers.push(("Retry-After".into(), n.to_string()));
            act(conn, shared, req, Action::Status(code, headers, body))
        }
        Action::RetryAfterDate(code, at) => {
            let date = httpdate::fmt_http_date(at);
            let msg = format!("slow down: retry after {date}");
            let Action::Status(_, mut headers, body) = Action::influx_error(code, &msg) else {
                unreachable!()
            };
            headers.push(("Retry-After".into(), date));
            act(conn, shared, req, Action::Status(code, headers, body))
        }
        Action::Stall(d, then) => {
            if !pause(shared, d) {
                return Outcome::Stopped;
            }
            if peer_gone(&conn.stream) {
                return Outcome::Gone(format!("hung up during a {d:?} stall"));
            }
            act(conn, shared, req, *then)
        }
        Action::Reset => {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket descriptor and a properly sized option value.
            unsafe {
                libc::setsockopt(
                    conn.stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const libc::linger as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            Outcome::Closed("RST")
        }
        Action::Truncated => {
            let _ = conn
                .stream
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Type: text/pl")
                .and_then(|_| conn.stream.flush());
            let _ = conn.stream.shutdown(Shutdown::Both);
            Outcome::Closed("truncated")
        }
        Action::SlowBody(code, len, per_byte) => {
            if peer_gone(&conn.stream) {
                return Outcome::Gone("hung up before the answer".into());
            }
            if (200..300).contains(&code) {
                commit(shared, req);
            }
            let head = response_head(code, &[], len);
            if let Err(e) = conn.stream.write_all(head.as_bytes()) {
                return Outcome::Gone(e.to_string());
            }
            for _ in 0..len {
                if !pause(shared, per_byte) {
                    return Outcome::Stopped;
                }
                if let Err(e) = conn.stream.write_all(b" ") {
                    return Outcome::Gone(format!("during the slow body: {e}"));
                }
            }
            Outcome::Closed("slow body sent")
        }
    }
}

/// Seconds since the epoch, floored: what an HTTP date can express.
pub fn http_date_floor(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}
