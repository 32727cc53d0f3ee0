//! What an agent costs when little happens, and what many large writes at
//! once cost in memory:
//!
//! - idle: wakeups (context switches of all threads) per second and CPU
//!   seconds per hour (the threads' run time from `schedstat`, to the
//!   nanosecond: an idle agent uses a clock tick or two in two minutes)
//!   with an empty queue and a dead remote, with data
//!   queued for a dead remote, and (edge-replicator alone, against vmagent's
//!   empty idle) with a `[[tail]]` source on its defaults (woken by changes
//!   to its files, looking again every 10 s);
//! - memory: peak RSS while 16 and 64 clients each post one large body at
//!   once (remote down), with the agent's default memory budget.
//!
//! Both are figures of the process itself (its own CPU time, its own
//! context switches, its own peak), so a busy machine moves them little.

use std::fs;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::json;

use super::{write_url, Ctx, Row, Samples, Target, Who, MB};
use crate::gen::{Generator, Mix};
use crate::{load, procs};

/// One idle measurement: wakeups per second and CPU seconds per hour.
struct Idle {
    wakeups: Samples,
    cpu_per_hour: Samples,
}

/// Phase 5: idle cost.
pub fn idle(ctx: &Ctx, rows: &mut Vec<Row>, raw: &mut serde_json::Map<String, serde_json::Value>) {
    let s = &ctx.sizes;
    let window = if s.quick {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(120)
    };
    let tail_dir = ctx.work.join("idle-tail");
    fs::create_dir_all(&tail_dir).expect("create the tailed directory");
    fs::write(tail_dir.join("quiet.lp"), "").expect("create the tailed file");
    let tail = format!(
        "\n[[tail]]\npath = \"{}/*.lp\"\nbucket = \"bench\"\n",
        tail_dir.display()
    );
    let cases: [(&str, &str, bool); 3] = [
        ("empty queue, dead remote", "", false),
        ("data queued, dead remote", "", true),
        (
            "a [[tail]] source (default poll_interval), empty queue",
            &tail,
            false,
        ),
    ];
    let mut measured = Vec::new();
    for (what, extra, queued) in cases {
        let mut m = Idle {
            wakeups: Samples::default(),
            cpu_per_hour: Samples::default(),
        };
        for run in 0..s.drain_runs {
            for who in Who::order(run) {
                // vmagent has no tail source: it is measured idle instead.
                eprintln!("bench: idle, {what}: {} run {}", who.name(), run + 1);
                let dir = ctx.work.join(format!("idle-{}", who.name()));
                let _ = fs::remove_dir_all(&dir);
                let (port, dead) = (procs::free_port(), procs::free_port());
                let remote = format!("http://127.0.0.1:{dead}");
                let (mut p, _) = who.start_with(ctx, &dir, port, &remote, "5m", extra);
                if queued {
                    let code = load::post_once(&write_url(port), &ctx.pool[0]);
                    assert!(
                        (200..300).contains(&code),
                        "{}: a write got {code}",
                        who.name()
                    );
                }
                // Start-up and the first retries are not idle.
                thread::sleep(Duration::from_secs(5));
                let (cs0, cpu0) = (p.context_switches(), p.run_seconds());
                thread::sleep(window);
                let (cs1, cpu1) = (p.context_switches(), p.run_seconds());
                let secs = window.as_secs_f64();
                m.wakeups.push(who, (cs1 - cs0) as f64 / secs);
                m.cpu_per_hour.push(who, (cpu1 - cpu0) / secs * 3600.0);
                p.stop(Duration::from_secs(60));
                let _ = fs::remove_dir_all(&dir);
            }
        }
        rows.push(m.wakeups.row(
            &format!("idle wakeups per second, {what}"),
            Target::AtMost(0.25),
        ));
        rows.push(m.cpu_per_hour.row(
            &format!("idle CPU s per hour, {what}"),
            Target::AtMost(0.25),
        ));
        measured.push(json!({
            "case": what, "windowSeconds": window.as_secs_f64(),
            "wakeupsPerSecond": m.wakeups.json(), "cpuSecondsPerHour": m.cpu_per_hour.json(),
        }));
    }
    raw.insert("idle".into(), json!(measured));
}

/// Phase 6: peak RSS while `clients` post one large body each at once.
pub fn memory(
    ctx: &Ctx,
    rows: &mut Vec<Row>,
    raw: &mut serde_json::Map<String, serde_json::Value>,
) {
    let s = &ctx.sizes;
    // Below both agents' largest body (32 MiB by default for each);
    // BENCH_MEMORY_BODY_MIB sets it (ours alone takes up to 32 MiB).
    let body_bytes: usize = std::env::var("BENCH_MEMORY_BODY_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(if s.quick { 4 << 20 } else { 24 << 20 }, |mib| mib << 20);
    let mut g = Generator::new(Mix::Metrics, 45);
    let mut body = Vec::with_capacity(body_bytes + (1 << 20));
    while body.len() < body_bytes {
        body.extend_from_slice(&g.body(5_000));
    }
    let body = Arc::new(body);
    let mut measured = Vec::new();
    for clients in [16usize, 64] {
        let mut peak = Samples::default();
        let mut anon = Samples::default();
        let mut taken = Samples::default();
        for run in 0..s.drain_runs {
            for who in Who::order(run) {
                eprintln!(
                    "bench: memory, {clients} concurrent {} MB bodies: {} run {}",
                    body.len() >> 20,
                    who.name(),
                    run + 1
                );
                let dir = ctx.work.join(format!("memory-{}", who.name()));
                let _ = fs::remove_dir_all(&dir);
                let (port, dead) = (procs::free_port(), procs::free_port());
                let remote = format!("http://127.0.0.1:{dead}");
                let (mut p, _) = who.start(ctx, &dir, port, &remote, "5m");
                let url = write_url(port);
                let (stop, sampler) = anon_sampler(p.pid());
                let posts: Vec<_> = (0..clients)
                    .map(|_| {
                        let (url, body) = (url.clone(), body.clone());
                        thread::spawn(move || load::post_once(&url, &body))
                    })
                    .collect();
                let codes: Vec<u16> = posts.into_iter().map(|h| h.join().unwrap()).collect();
                let ok = codes.iter().filter(|c| (200..300).contains(*c)).count();
                let refused = codes.iter().filter(|c| matches!(c, 429 | 503)).count();
                assert_eq!(
                    ok + refused,
                    clients,
                    "{}: answers other than 2xx, 429 or 503: {codes:?}",
                    who.name()
                );
                stop.store(true, std::sync::atomic::Ordering::Release);
                anon.push(who, sampler.join().unwrap());
                peak.push(who, p.mem().peak as f64 / MB);
                taken.push(who, ok as f64);
                p.stop(Duration::from_secs(60));
                let _ = fs::remove_dir_all(&dir);
            }
        }
        let mb = body.len() >> 20;
        rows.push(peak.row(
            &format!("peak RSS, {clients} concurrent {mb} MB bodies, remote down (MB)"),
            Target::AtMost(0.25),
        ));
        rows.push(anon.row(
            &format!("peak anonymous RSS (sampled), {clients} concurrent {mb} MB bodies (MB)"),
            Target::AtMost(0.25),
        ));
        rows.push(taken.row(
            &format!("bodies taken of {clients} (the rest got 503 + Retry-After)"),
            Target::None,
        ));
        measured.push(json!({
            "clients": clients, "bodyBytes": body.len(),
            "peakRssMB": peak.json(), "peakAnonRssMB": anon.json(), "bodiesTaken": taken.json(),
        }));
    }
    raw.insert("memoryUnderConcurrency".into(), json!(measured));
}

/// The largest RssAnon of `pid` seen every 10 ms until stopped, in MB:
/// memory the process itself holds, without the file pages (the queue's
/// map, the binary) that the kernel can take back. VmHWM has no such
/// counterpart, hence the sampling.
fn anon_sampler(pid: u32) -> (Arc<std::sync::atomic::AtomicBool>, thread::JoinHandle<f64>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = thread::spawn(move || {
        let mut peak = 0.0f64;
        while !s.load(Ordering::Acquire) {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|x| x.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            {
                peak = peak.max(kb * 1024.0 / MB);
            }
            thread::sleep(Duration::from_millis(10));
        }
        peak
    });
    (stop, h)
}
