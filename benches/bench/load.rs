//! Load clients. `hey` (the same client for both agents, as in the reference
//! figures) measures ingest; an in-harness loader fills backlogs with many
//! distinct bodies and paces the load through an outage.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// What one `hey` run saw.
#[derive(Debug, Clone)]
pub struct HeyRun {
    /// First request sent to last answer received.
    pub seconds: f64,
    /// Ack latency of every successful request, in seconds.
    pub latencies: Vec<f64>,
    pub ok: usize,
    pub failed: usize,
}

/// `hey -n requests -c clients` POSTing `body_file` to `url`.
pub fn hey(url: &str, body_file: &Path, requests: usize, clients: usize) -> HeyRun {
    let out = Command::new("hey")
        .args(["-n", &requests.to_string(), "-c", &clients.to_string()])
        .args([
            "-m",
            "POST",
            "-T",
            "text/plain; charset=utf-8",
            "-t",
            "60",
            "-o",
            "csv",
        ])
        .arg("-D")
        .arg(body_file)
        .arg(url)
        .output()
        .expect("run hey (apt-get install hey)");
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut first, mut last) = (f64::MAX, 0f64);
    let mut latencies = Vec::new();
    let mut failed = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(rt), Ok(code), Ok(offset)) = (
            f[0].parse::<f64>(),
            f[6].parse::<u16>(),
            f[7].parse::<f64>(),
        ) else {
            continue;
        };
        first = first.min(offset);
        last = last.max(offset + rt);
        if (200..300).contains(&code) {
            latencies.push(rt);
        } else {
            failed += 1;
        }
    }
    let ok = latencies.len();
    failed += requests.saturating_sub(ok + failed);
    HeyRun {
        seconds: if ok > 0 { last - first } else { f64::NAN },
        latencies,
        ok,
        failed,
    }
}

/// Counters of an in-harness load.
#[derive(Debug, Default)]
pub struct Sent {
    pub bodies: AtomicU64,
    pub bytes: AtomicU64,
    pub failed: AtomicU64,
}

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Posts `body` once on a connection of its own: the answer's status, 0
/// when nothing answered.
pub fn post_once(url: &str, body: &[u8]) -> u16 {
    status(&client(), url, body)
}

fn status(agent: &ureq::Agent, url: &str, body: &[u8]) -> u16 {
    match agent
        .post(url)
        .header("Content-Type", "text/plain; charset=utf-8")
        .send(body)
    {
        Ok(mut r) => {
            let _ = r.body_mut().read_to_vec();
            r.status().as_u16()
        }
        Err(_) => 0,
    }
}

fn post(agent: &ureq::Agent, url: &str, body: &[u8]) -> bool {
    (200..300).contains(&status(agent, url, body))
}

/// Sends bodies from `pool` round robin with `clients` connections until
/// `target_bytes` were acknowledged. Returns the seconds it took.
pub fn fill(
    url: &str,
    pool: &Arc<Vec<Vec<u8>>>,
    clients: usize,
    target_bytes: u64,
) -> (Arc<Sent>, f64) {
    let sent = Arc::new(Sent::default());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (url, pool, sent, next) =
                (url.to_string(), pool.clone(), sent.clone(), next.clone());
            thread::spawn(move || {
                let agent = client();
                while sent.bytes.load(Ordering::Acquire) < target_bytes {
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    let body = &pool[i % pool.len()];
                    if post(&agent, &url, body) {
                        sent.bodies.fetch_add(1, Ordering::AcqRel);
                        sent.bytes.fetch_add(body.len() as u64, Ordering::AcqRel);
                    } else {
                        sent.failed.fetch_add(1, Ordering::AcqRel);
                        assert!(
                            sent.failed.load(Ordering::Acquire) < 100,
                            "more than 100 writes to {url} failed"
                        );
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("loader thread");
    }
    (sent, started.elapsed().as_secs_f64())
}

/// Sends `per_second` bodies a second from one connection until `stop`.
pub fn paced(
    url: &str,
    pool: Arc<Vec<Vec<u8>>>,
    per_second: f64,
    stop: Arc<AtomicBool>,
) -> (thread::JoinHandle<()>, Arc<Sent>) {
    let sent = Arc::new(Sent::default());
    let s = sent.clone();
    let url = url.to_string();
    let h = thread::spawn(move || {
        let agent = client();
        let started = Instant::now();
        let mut i = 0usize;
        while !stop.load(Ordering::Acquire) {
            let due = started + Duration::from_secs_f64(i as f64 / per_second);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let body = &pool[i % pool.len()];
            if post(&agent, &url, body) {
                s.bodies.fetch_add(1, Ordering::AcqRel);
                s.bytes.fetch_add(body.len() as u64, Ordering::AcqRel);
            } else {
                s.failed.fetch_add(1, Ordering::AcqRel);
            }
            i += 1;
        }
    });
    (h, sent)
}
