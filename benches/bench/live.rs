//! Live first: after an outage, how soon the present reaches the remote
//! through a backlog, and what that costs the drain. The agent takes a
//! backlog while the remote (the discarding sink) answers 503, on a link
//! capped at 1 Mbit/s (`[link] max_bandwidth`); a probe writer adds one
//! line stamped now every 200 ms from shortly before the remote comes back
//! until the backlog has drained. Measured for `send_order = "live_first"`
//! and `"oldest_first"`: the time from the remote's return to the first
//! probe line at the remote, the median delay of the probe lines written
//! during the drain, and the drain's length.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{baseline, write_url, Ctx, Row, Target, Who};
use crate::report::median;
use crate::sink::Sink;
use crate::{load, procs};

/// The probe lines' measurement.
const PROBE: &str = "liveprobe";
/// One probe line this often.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// `live_window` for the run: the backlog is made older than it before the
/// remote comes back (the default, 1m, would add a minute a run).
const WINDOW: Duration = Duration::from_secs(5);
const ORDERS: [&str; 2] = ["live_first", "oldest_first"];

/// One run's figures.
struct Outcome {
    first: f64,
    delay: f64,
    drain: f64,
}

pub fn live(ctx: &Ctx, rows: &mut Vec<Row>, raw: &mut serde_json::Map<String, serde_json::Value>) {
    if baseline().is_some() {
        eprintln!("bench: live: skipped (a baseline build may not know send_order)");
        return;
    }
    let s = &ctx.sizes;
    let backlog: u64 = if s.quick { 16 << 20 } else { 200 << 20 };
    let runs = if s.quick { 1 } else { s.drain_runs.min(2) };
    let mut out: Vec<Vec<Outcome>> = ORDERS.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        let mut order: Vec<usize> = (0..ORDERS.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for k in order {
            let o = one(ctx, ORDERS[k], backlog);
            eprintln!(
                "bench: live {}: first fresh line {:.1} s after the remote came back, median probe delay {:.1} s, drained in {:.0} s",
                ORDERS[k], o.first, o.delay, o.drain
            );
            out[k].push(o);
        }
    }
    let mb = backlog >> 20;
    let pick = |k: usize, f: fn(&Outcome) -> f64| -> Vec<f64> { out[k].iter().map(f).collect() };
    for (k, name) in ORDERS.iter().enumerate() {
        rows.push(Row::alone(
            &format!("1 Mbit/s, {mb} MiB backlog, {name}: remote back to first fresh line (s)"),
            pick(k, |o| o.first),
        ));
        rows.push(Row::alone(
            &format!("1 Mbit/s, {mb} MiB backlog, {name}: a fresh line's delay during the drain, median (s)"),
            pick(k, |o| o.delay),
        ));
    }
    let ratio: Vec<f64> = out[0]
        .iter()
        .zip(&out[1])
        .map(|(l, o)| l.drain / o.drain)
        .collect();
    rows.push(
        Row::alone(
            &format!("1 Mbit/s, {mb} MiB backlog: drain (s), live_first"),
            pick(0, |o| o.drain),
        )
        .with_ratio(ratio, "× oldest_first", Target::AtMost(1.05)),
    );
    eprintln!(
        "bench: live: drain medians {:.0} s live_first, {:.0} s oldest_first",
        median(&pick(0, |o| o.drain)),
        median(&pick(1, |o| o.drain))
    );
    let js = |k: usize| {
        json!({"firstSeconds": pick(k, |o| o.first), "delaySeconds": pick(k, |o| o.delay),
               "drainSeconds": pick(k, |o| o.drain)})
    };
    raw.insert(
        "live".into(),
        json!({"backlogBytes": backlog, "capBytesPerSecond": 125_000, "liveWindowSeconds": WINDOW.as_secs(),
               "liveFirst": js(0), "oldestFirst": js(1)}),
    );
}

fn one(ctx: &Ctx, order: &str, backlog: u64) -> Outcome {
    eprintln!("bench: live {order}: filling {} MiB", backlog >> 20);
    let dir = ctx.work.join("live");
    let _ = fs::remove_dir_all(&dir);
    let sink = Sink::start(procs::free_port());
    sink.stats.down.store(true, Ordering::Release);
    *sink.stats.watch.lock().unwrap() = Some(PROBE.into());
    let port = procs::free_port();
    let extra = format!(
        "send_order = \"{order}\"\nlive_window = \"{}s\"\n\n[link]\nmax_bandwidth = \"1Mbit/s\"\n",
        WINDOW.as_secs()
    );
    let mut p = procs::start_agent(
        &ctx.bin,
        &procs::AgentSpec {
            dir: &dir,
            port,
            remote_url: &sink.url(),
            max_backoff: "1s",
            extra: &extra,
            remote_extra: "",
        },
    );
    p.wait_ready(
        &format!("http://127.0.0.1:{port}/health"),
        Duration::from_secs(120),
    );
    load::fill(&write_url(port), &ctx.pool, 2, backlog);
    thread::sleep(WINDOW + Duration::from_secs(1));
    // Probe lines, from 2 s before the remote comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let url = write_url(port);
        thread::spawn(move || {
            let http = procs::http();
            let mut written = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let line = format!("{PROBE},n={n} v={n}i {ns}\n");
                if http.post(&url).send(line.as_bytes()).is_ok() {
                    written.push((n, Instant::now()));
                    n += 1;
                }
                thread::sleep(PROBE_EVERY);
            }
            written
        })
    };
    thread::sleep(Duration::from_secs(2));
    sink.stats.down.store(false, Ordering::Release);
    let back = Instant::now();
    let drain = Who::Ours.wait_drained(&ctx.http, port, Some(&sink), back);
    stop.store(true, Ordering::Release);
    let written = writer.join().expect("the probe writer");
    // The last probes may still be on their way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.stats.seen.lock().unwrap().len() < written.len() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let seen = sink.stats.seen.lock().unwrap().clone();
    let first = seen
        .values()
        .map(|t| t.saturating_duration_since(back).as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    let delays: Vec<f64> = written
        .iter()
        .filter(|(_, at)| *at >= back)
        .filter_map(|(n, at)| {
            seen.get(n)
                .map(|t| t.saturating_duration_since(*at).as_secs_f64())
        })
        .collect();
    let missing = written
        .iter()
        .filter(|(n, _)| !seen.contains_key(n))
        .count();
    assert_eq!(missing, 0, "{order}: {missing} probe lines never arrived");
    p.stop(Duration::from_secs(60));
    drop(sink);
    let _ = fs::remove_dir_all(&dir);
    Outcome {
        first,
        delay: median(&delays),
        drain,
    }
}
