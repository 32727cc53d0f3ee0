//! A long round trip: how fast a backlog drains when every answer takes
//! 600 ms to come back and the link is not otherwise a limit. Each agent
//! takes a backlog while the remote (the discarding sink, behind the
//! delaying proxy of `link.rs`) answers 503; then the remote comes back and
//! the drain is timed until everything was delivered. Ours runs with
//! `max_in_flight` 1, 2 and 4 (the default is 2), vmagent with its defaults.

use std::fs;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{baseline, write_url, Ctx, Row, Samples, Target, Who, LINES_PER_BODY};
use crate::link::{DelayProxy, ONE_WAY};
use crate::report::median;
use crate::sink::Sink;
use crate::{load, procs};

/// The settings of `max_in_flight` measured.
const IN_FLIGHT: [usize; 3] = [1, 2, 4];

/// The phase: drain lines/s per setting, against vmagent's, and each
/// setting's drain rate over one request at a time.
pub fn rtt(ctx: &Ctx, rows: &mut Vec<Row>, raw: &mut serde_json::Map<String, serde_json::Value>) {
    if baseline().is_some() {
        eprintln!("bench: rtt: skipped (a baseline build may not know max_in_flight)");
        return;
    }
    let s = &ctx.sizes;
    // About 200,000 lines: half a minute at one request in flight.
    let backlog: u64 = if s.quick { 8 << 20 } else { 27 << 20 };
    let mut per: Vec<Samples> = IN_FLIGHT.iter().map(|_| Samples::default()).collect();
    let mut vm = Samples::default();
    for run in 0..s.drain_runs {
        let mut settings: Vec<Option<usize>> = IN_FLIGHT.iter().copied().map(Some).collect();
        settings.push(None);
        if run % 2 == 1 {
            settings.reverse();
        }
        for setting in settings {
            let who = if setting.is_some() {
                Who::Ours
            } else {
                Who::Vm
            };
            let label = setting.map_or(who.name().to_string(), |n| format!("max_in_flight {n}"));
            eprintln!("bench: rtt {label}: run {}", run + 1);
            let dir = ctx.work.join("rtt");
            let _ = fs::remove_dir_all(&dir);
            let sink = Sink::start(procs::free_port());
            sink.stats.down.store(true, Ordering::Release);
            let proxy = DelayProxy::start(SocketAddr::from(([127, 0, 0, 1], sink.port)));
            let remote = format!("http://127.0.0.1:{}", proxy.port);
            let port = procs::free_port();
            let mut p = match setting {
                Some(n) => procs::start_agent(
                    &ctx.bin,
                    &procs::AgentSpec {
                        dir: &dir,
                        port,
                        remote_url: &remote,
                        max_backoff: "1s",
                        extra: "",
                        remote_extra: &format!("max_in_flight = {n}\n"),
                    },
                ),
                None => procs::start_vmagent(&dir, port, &format!("{remote}/api/v1/write")),
            };
            p.wait_ready(
                &format!("http://127.0.0.1:{port}/health"),
                Duration::from_secs(120),
            );
            let (sent, _) = load::fill(&write_url(port), &ctx.pool, 2, backlog);
            let lines = sent.bodies.load(Ordering::Acquire) * LINES_PER_BODY as u64;
            sink.stats.down.store(false, Ordering::Release);
            let up = Instant::now();
            let secs = who.wait_drained(&ctx.http, port, Some(&sink), up);
            let rate = lines as f64 / secs;
            eprintln!("bench: rtt {label}: {lines} lines in {secs:.1} s, {rate:.0} lines/s");
            match setting {
                Some(n) => {
                    let k = IN_FLIGHT.iter().position(|&x| x == n).expect("a setting");
                    per[k].push(Who::Ours, rate);
                }
                None => vm.push(Who::Vm, rate),
            }
            p.stop(Duration::from_secs(60));
            drop(proxy);
            drop(sink);
            let _ = fs::remove_dir_all(&dir);
        }
    }
    let rtt_ms = 2 * ONE_WAY.as_millis();
    let one = per[0].ours.clone();
    let mut measured = serde_json::Map::new();
    for (k, n) in IN_FLIGHT.iter().enumerate() {
        let ours = per[k].ours.clone();
        let what = format!("{rtt_ms} ms RTT: backlog drain lines/s, max_in_flight {n}");
        let mut row = Row::versus(&what, ours.clone(), vm.theirs.clone(), Target::None);
        if *n > 1 {
            let over_one: Vec<f64> = ours.iter().zip(&one).map(|(a, b)| a / b).collect();
            row = row.with_ratio(over_one, "× max_in_flight 1 (ours)", Target::None);
        }
        eprintln!(
            "bench: rtt max_in_flight {n}: median {:.0} lines/s",
            median(&ours)
        );
        rows.push(row);
        measured.insert(format!("maxInFlight{n}"), json!(ours));
    }
    measured.insert("vmagent".into(), json!(vm.theirs));
    raw.insert(
        "rtt".into(),
        json!({"roundTripMs": rtt_ms, "backlogBytes": backlog, "linesPerSecond": measured}),
    );
}
