//! A remote that discards: answers every request 204 after reading its body
//! (or 503 while "down"), counting requests and bytes. Small on purpose, so
//! that a drain measures the agent, not the remote. When asked to watch for
//! lines of a measurement ([`Stats::watch`]), it gunzips the bodies it
//! accepts and notes when each such line (by its `n=` tag) first arrived.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub inflight: AtomicI64,
    /// While set, requests are answered 503 (an outage behind a proxy).
    pub down: AtomicBool,
    stop: AtomicBool,
    /// Lines of this measurement (`m,n=<i> ...`) are looked for in the
    /// bodies accepted, and when each `n` first arrived kept in `seen`.
    pub watch: Mutex<Option<String>>,
    pub seen: Mutex<HashMap<u64, Instant>>,
}

pub struct Sink {
    pub port: u16,
    pub stats: Arc<Stats>,
}

impl Sink {
    pub fn start(port: u16) -> Sink {
        // The previous sink on this port may still be letting it go.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("cannot bind the sink to port {port}: {e}"),
            }
        };
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    let _ = thread::Builder::new()
                        .name("sink-conn".into())
                        .spawn(move || serve(conn, &st));
                }
            })
            .expect("start the sink thread");
        Sink { port, stats }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stats.stop.store(true, Ordering::Release);
        self.stats.down.store(true, Ordering::Release);
        // Wakes the accept loop so that it sees the flag and lets the port go.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, st: &Stats) {
    let _ = conn.set_nodelay(true);
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::with_capacity(256 << 10, conn);
    let mut line = String::new();
    let mut sink = vec![0u8; 256 << 10];
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 || st.stop.load(Ordering::Acquire) {
            return;
        }
        st.inflight.fetch_add(1, Ordering::AcqRel);
        let mut length: u64 = 0;
        let mut chunked = false;
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                st.inflight.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("transfer-encoding")
                    && v.to_ascii_lowercase().contains("chunked")
                {
                    chunked = true;
                }
            }
        }
        let mut body = 0u64;
        if chunked {
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    st.inflight.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
                let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                    .unwrap_or(0);
                if size == 0 {
                    // Trailer section ends with an empty line.
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                if !discard(&mut r, size, &mut sink) {
                    st.inflight.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
                body += size;
                line.clear();
                let _ = r.read_line(&mut line);
            }
        } else {
            let watching = st.watch.lock().unwrap().clone();
            match watching {
                Some(m) if !st.down.load(Ordering::Acquire) => {
                    let mut raw = vec![0u8; length as usize];
                    if r.read_exact(&mut raw).is_err() {
                        st.inflight.fetch_sub(1, Ordering::AcqRel);
                        return;
                    }
                    note_watched(st, &m, &raw);
                }
                _ => {
                    if !discard(&mut r, length, &mut sink) {
                        st.inflight.fetch_sub(1, Ordering::AcqRel);
                        return;
                    }
                }
            }
            body = length;
        }
        let answer: &[u8] = if st.down.load(Ordering::Acquire) {
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        } else {
            st.requests.fetch_add(1, Ordering::AcqRel);
            st.bytes.fetch_add(body, Ordering::AcqRel);
            b"HTTP/1.1 204 No Content\r\n\r\n"
        };
        let ok = w.write_all(answer).is_ok();
        st.inflight.fetch_sub(1, Ordering::AcqRel);
        if !ok {
            return;
        }
    }
}

/// Notes the first arrival of each line of measurement `m` in a gzip body.
fn note_watched(st: &Stats, m: &str, gz: &[u8]) {
    let mut text = String::new();
    if flate2::read::MultiGzDecoder::new(gz)
        .read_to_string(&mut text)
        .is_err()
    {
        return;
    }
    let now = Instant::now();
    let prefix = format!("{m},n=");
    let mut seen = st.seen.lock().unwrap();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&prefix) {
            let n = rest.split([' ', ',']).next().and_then(|v| v.parse().ok());
            if let Some(n) = n {
                seen.entry(n).or_insert(now);
            }
        }
    }
}

fn discard(r: &mut impl Read, mut n: u64, buf: &mut [u8]) -> bool {
    while n > 0 {
        let want = buf.len().min(n as usize);
        match r.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return false,
            Ok(k) => n -= k as u64,
        }
    }
    true
}
