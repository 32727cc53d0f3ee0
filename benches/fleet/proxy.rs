//! The fleet's remote as the agents see it: a rate-limiting HTTP proxy in
//! front of VictoriaMetrics. Above `limit` requests in the last second it
//! answers 429 with `Retry-After`; the rest it forwards. It counts, per
//! second, the requests, 429s, bytes and connections it saw, and per agent
//! (each agent's remote URL carries `org=agent-N`) whether the request after
//! a 429 came no sooner than the `Retry-After` said. While "down" it has no
//! listener at all (connections are refused, as by a host whose service is
//! down) and the connections it had are cut.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use flate2::read::GzDecoder;

/// What the proxy saw in one second.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Sec {
    /// HTTP requests received (429s included).
    pub requests: u64,
    /// Answered 429.
    pub throttled: u64,
    /// Forwarded and answered 2xx by VictoriaMetrics.
    pub ok: u64,
    /// Forwarded and answered otherwise, or not answered.
    pub failed: u64,
    /// Request body bytes (compressed, as on the wire).
    pub bytes: u64,
    /// TCP connections accepted (the agents' probes among them).
    pub connections: u64,
}

/// One agent as the proxy sees it.
#[derive(Debug, Default)]
pub struct Track {
    /// The last 429 sent to it not yet followed by a request: when, and
    /// the seconds its `Retry-After` said.
    pending: Option<(Instant, u64)>,
    pub requests: u64,
    pub throttled: u64,
    pub honoured: u64,
    pub early: u64,
    /// How much too early, in seconds, each early request came.
    pub early_by: Vec<f64>,
    /// Seconds since the remote came back to the agent's first request
    /// answered 2xx.
    pub first_ok_after_return: Option<f64>,
    pub first_request_after_return: Option<f64>,
}

pub struct Shared {
    t0: Instant,
    upstream: String,
    limit: usize,
    retry_after: u64,
    down: AtomicBool,
    /// The listener is closed (acknowledges `down`).
    closed: AtomicBool,
    stop: AtomicBool,
    /// When the listener last came back after an outage.
    up_since: Mutex<Option<Instant>>,
    secs: Mutex<Vec<Sec>>,
    window: Mutex<VecDeque<Instant>>,
    pub agents: Vec<Mutex<Track>>,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    /// Lines in bodies VictoriaMetrics answered 2xx.
    pub lines_forwarded: AtomicU64,
    /// Requests that named no agent.
    pub anonymous: AtomicU64,
    http: ureq::Agent,
}

pub struct Proxy {
    pub port: u16,
    pub shared: Arc<Shared>,
}

impl Proxy {
    pub fn start(upstream: String, agents: usize, limit: usize, retry_after: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .max_idle_connections(agents + 16)
            .max_idle_connections_per_host(agents + 16)
            .build()
            .into();
        let shared = Arc::new(Shared {
            t0: Instant::now(),
            upstream,
            limit,
            retry_after,
            down: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            up_since: Mutex::new(None),
            secs: Mutex::new(Vec::new()),
            window: Mutex::new(VecDeque::new()),
            agents: (0..agents).map(|_| Mutex::new(Track::default())).collect(),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            lines_forwarded: AtomicU64::new(0),
            anonymous: AtomicU64::new(0),
            http,
        });
        let sh = shared.clone();
        thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(Some(listener), port, &sh))
            .expect("start the proxy");
        Proxy { port, shared }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes the listener and cuts every connection (`true`), or listens
    /// again (`false`); returns once done.
    pub fn set_down(&self, down: bool) {
        let sh = &self.shared;
        sh.down.store(down, Ordering::Release);
        while sh.closed.load(Ordering::Acquire) != down {
            thread::sleep(Duration::from_millis(1));
        }
        if down {
            for c in sh.conns.lock().unwrap().values() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// Seconds since the proxy started: the clock of every figure.
    pub fn now(&self) -> f64 {
        self.shared.t0.elapsed().as_secs_f64()
    }

    pub fn secs(&self) -> Vec<Sec> {
        self.shared.secs.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for c in self.shared.conns.lock().unwrap().values() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Shared {
    fn count(&self, at: Instant, f: impl FnOnce(&mut Sec)) {
        let i = at.saturating_duration_since(self.t0).as_secs() as usize;
        let mut secs = self.secs.lock().unwrap();
        if secs.len() <= i {
            secs.resize(i + 1, Sec::default());
        }
        f(&mut secs[i]);
    }

    /// Admits a request unless `limit` were admitted in the last second.
    fn admit(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap();
        while w
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(1))
        {
            w.pop_front();
        }
        if w.len() >= self.limit {
            return false;
        }
        w.push_back(now);
        true
    }

    fn since_return(&self, now: Instant) -> Option<f64> {
        self.up_since
            .lock()
            .unwrap()
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
    }
}

fn accept_loop(mut listener: Option<TcpListener>, port: u16, sh: &Arc<Shared>) {
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        if sh.down.load(Ordering::Acquire) {
            if listener.take().is_some() {
                sh.closed.store(true, Ordering::Release);
            }
            thread::sleep(Duration::from_millis(2));
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                // Same port again (std sets SO_REUSEADDR on listeners).
                let l = loop {
                    match TcpListener::bind(("127.0.0.1", port)) {
                        Ok(l) => break l,
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                };
                l.set_nonblocking(true).expect("a non-blocking listener");
                *sh.up_since.lock().unwrap() = Some(Instant::now());
                sh.closed.store(false, Ordering::Release);
                listener.insert(l)
            }
        };
        match l.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_nodelay(true);
                sh.count(Instant::now(), |s| s.connections += 1);
                let id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
                if let Ok(c) = conn.try_clone() {
                    sh.conns.lock().unwrap().insert(id, c);
                }
                let sh = sh.clone();
                let _ = thread::Builder::new()
                    .name("proxy-conn".into())
                    .stack_size(256 << 10)
                    .spawn(move || {
                        serve(conn, &sh);
                        sh.conns.lock().unwrap().remove(&id);
                    });
            }
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

struct Request {
    target: String,
    encoding: Option<String>,
    body: Vec<u8>,
}

fn read_request(r: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let target = line.split_whitespace().nth(1)?.to_string();
    let mut length = 0usize;
    let mut chunked = false;
    let mut encoding = None;
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok()?;
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("content-encoding") {
                encoding = Some(v.to_string());
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let size =
                usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16).ok()?;
            if size == 0 {
                loop {
                    line.clear();
                    if r.read_line(&mut line).ok()? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).ok()?;
            line.clear();
            r.read_line(&mut line).ok()?;
        }
    } else {
        body.resize(length, 0);
        r.read_exact(&mut body).ok()?;
    }
    Some(Request {
        target,
        encoding,
        body,
    })
}

/// `N` of `org=agent-N` in the request target.
fn agent_of(target: &str) -> Option<usize> {
    let query = target.split_once('?')?.1;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "org")
        .and_then(|(_, v)| v.strip_prefix("agent-")?.parse().ok())
}

fn count_lines(body: &[u8], gzip: bool) -> u64 {
    let mut text = Vec::new();
    if gzip {
        if GzDecoder::new(body).read_to_end(&mut text).is_err() {
            return 0;
        }
    } else {
        text.extend_from_slice(body);
    }
    text.split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count() as u64
}

fn answer(w: &mut impl Write, status: u16, extra: &str, body: &[u8]) -> bool {
    let head = format!(
        "HTTP/1.1 {status} {}\r\n{extra}Content-Length: {}\r\n\r\n",
        http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown"),
        body.len()
    );
    w.write_all(head.as_bytes()).is_ok() && w.write_all(body).is_ok()
}

fn serve(conn: TcpStream, sh: &Shared) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::with_capacity(64 << 10, conn);
    while let Some(req) = read_request(&mut r) {
        if sh.down.load(Ordering::Acquire) || sh.stop.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        sh.count(now, |s| {
            s.requests += 1;
            s.bytes += req.body.len() as u64;
        });
        let agent = agent_of(&req.target).filter(|&i| i < sh.agents.len());
        let since_return = sh.since_return(now);
        if let Some(i) = agent {
            let mut t = sh.agents[i].lock().unwrap();
            t.requests += 1;
            if let Some((at, secs)) = t.pending.take() {
                let gap = now.saturating_duration_since(at).as_secs_f64();
                // A millisecond of slack for the clock's granularity.
                if gap + 0.001 >= secs as f64 {
                    t.honoured += 1;
                } else {
                    t.early += 1;
                    t.early_by.push(secs as f64 - gap);
                }
            }
            if t.first_request_after_return.is_none() {
                t.first_request_after_return = since_return;
            }
        } else {
            sh.anonymous.fetch_add(1, Ordering::Relaxed);
        }
        if !sh.admit(now) {
            let ok = answer(
                &mut w,
                429,
                &format!("Retry-After: {}\r\n", sh.retry_after),
                b"rate limited\n",
            );
            let sent = Instant::now();
            sh.count(sent, |s| s.throttled += 1);
            if let Some(i) = agent {
                let mut t = sh.agents[i].lock().unwrap();
                t.throttled += 1;
                t.pending = Some((sent, sh.retry_after));
            }
            if !ok {
                return;
            }
            continue;
        }
        let mut up = sh
            .http
            .post(format!("{}{}", sh.upstream, req.target))
            .header("Content-Type", "text/plain; charset=utf-8");
        let gzip = req
            .encoding
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case("gzip"));
        if gzip {
            up = up.header("Content-Encoding", "gzip");
        }
        let (status, body) = match up.send(&req.body[..]) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let body = resp.body_mut().read_to_vec().unwrap_or_default();
                (status, body)
            }
            Err(e) => (502, format!("upstream: {e}\n").into_bytes()),
        };
        let done = Instant::now();
        if (200..300).contains(&status) {
            sh.count(done, |s| s.ok += 1);
            sh.lines_forwarded
                .fetch_add(count_lines(&req.body, gzip), Ordering::Relaxed);
            if let Some(i) = agent {
                let mut t = sh.agents[i].lock().unwrap();
                if t.first_ok_after_return.is_none() {
                    t.first_ok_after_return = sh.since_return(done);
                }
            }
        } else {
            sh.count(done, |s| s.failed += 1);
        }
        if !answer(&mut w, status, "", &body) {
            return;
        }
    }
}
