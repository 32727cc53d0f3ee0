//! The bandwidth cap's accuracy, on a link that is not itself the limit
//! (loopback): bytes per second arriving at the remote against the cap, for
//! edge-replicator's `[link] max_bandwidth` and vmagent's
//! `-remoteWrite.rateLimit`.
//!
//! Each agent takes a backlog while the remote answers 503, then the remote
//! comes back and the agent drains it at its cap. The remote counts a
//! request's body when the request ends, so the rate is taken between
//! request ends: the bytes of every request that ended after the first one
//! over the time from the first end to the last, within the window. Whole
//! requests are counted whatever their size, and a burst at the start (a
//! bucket that begins full) is outside the figure only if it fits in the
//! first request.
//!
//! Bodies only: edge-replicator's cap also counts the HTTP around them
//! (about 400 bytes a request), so its body rate sits a little under it.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{baseline, write_url, Ctx, Row, Samples, Target, Who};
use crate::report::median;
use crate::sink::Sink;
use crate::{load, procs};

/// The caps measured, bytes per second.
const CAPS: [u64; 2] = [32_000, 128_000];

/// Phase 8: bytes per second at the remote against the cap.
pub fn cap(ctx: &Ctx, rows: &mut Vec<Row>, raw: &mut serde_json::Map<String, serde_json::Value>) {
    if baseline().is_some() {
        eprintln!("bench: cap: skipped (a baseline build has no vmagent flags to compare)");
        return;
    }
    let s = &ctx.sizes;
    let window = Duration::from_secs(if s.quick { 30 } else { 90 });
    let mut measured = Vec::new();
    for cap in CAPS {
        let mut m = Samples::default();
        let mut requests = Samples::default();
        for run in 0..s.drain_runs {
            for who in Who::order(run) {
                eprintln!(
                    "bench: cap {} kB/s: {} run {}",
                    cap / 1000,
                    who.name(),
                    run + 1
                );
                let dir = ctx.work.join(format!("cap-{}", who.name()));
                let _ = fs::remove_dir_all(&dir);
                let sink = Sink::start(procs::free_port());
                sink.stats
                    .down
                    .store(true, std::sync::atomic::Ordering::Release);
                let port = procs::free_port();
                let mut p = match who {
                    Who::Ours => {
                        let extra = format!("\n[link]\nmax_bandwidth = \"{cap}B/s\"\n");
                        Who::Ours
                            .start_with(ctx, &dir, port, &sink.url(), "1s", &extra)
                            .0
                    }
                    Who::Vm => procs::start_vmagent_with(
                        &dir,
                        port,
                        &format!("{}/api/v1/write", sink.url()),
                        &[format!("-remoteWrite.rateLimit={cap}")],
                    ),
                };
                p.wait_ready(
                    &format!("http://127.0.0.1:{port}/health"),
                    Duration::from_secs(120),
                );
                // At about 20 bytes a line on the wire (the cheaper of the
                // two encodings), enough lines for twice the window.
                let lines = cap * 2 * window.as_secs() / 20;
                let raw_bytes = lines * 135;
                load::fill(&write_url(port), &ctx.pool, 2, raw_bytes);
                sink.stats
                    .down
                    .store(false, std::sync::atomic::Ordering::Release);
                let (rate, ends) = rate_between_ends(&sink, window);
                m.push(who, rate / cap as f64);
                requests.push(who, ends as f64);
                p.stop(Duration::from_secs(60));
                drop(sink);
                let _ = fs::remove_dir_all(&dir);
            }
        }
        let off = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .map(|r| if *r >= 1.0 { *r } else { 1.0 / r })
                .collect()
        };
        let what = format!(
            "cap {} kB/s: body bytes/s at the remote ÷ the cap",
            cap / 1000
        );
        let ours_off = off(&m.ours);
        rows.push(
            Row::versus(&what, m.ours.clone(), m.theirs.clone(), Target::None).with_ratio(
                ours_off,
                "× off the cap (ours)",
                Target::AtMost(1.10),
            ),
        );
        eprintln!(
            "bench: cap {} kB/s: requests counted, median: ours {}, vmagent {}",
            cap / 1000,
            median(&requests.ours),
            median(&requests.theirs)
        );
        measured.push(json!({
            "capBytesPerSecond": cap, "windowSeconds": window.as_secs_f64(),
            "rateOverCap": m.json(), "requestsCounted": requests.json(),
        }));
    }
    raw.insert("cap".into(), json!(measured));
}

/// Bytes per second between the first and the last request end seen within
/// `window` of the first, and how many request ends that spans.
fn rate_between_ends(sink: &Sink, window: Duration) -> (f64, usize) {
    let bytes = || sink.stats.bytes.load(std::sync::atomic::Ordering::Acquire);
    let deadline = Instant::now() + window + Duration::from_secs(60);
    let mut ends: Vec<(Instant, u64)> = Vec::new();
    let mut last = bytes();
    while Instant::now() < deadline {
        let b = bytes();
        if b != last {
            ends.push((Instant::now(), b));
            last = b;
        }
        if let Some((first, _)) = ends.first() {
            if first.elapsed() >= window {
                break;
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    match (ends.first(), ends.last()) {
        (Some(&(t0, b0)), Some(&(t1, b1))) if ends.len() >= 3 => {
            ((b1 - b0) as f64 / (t1 - t0).as_secs_f64(), ends.len() - 1)
        }
        _ => (f64::NAN, ends.len().saturating_sub(1)),
    }
}
