//! `[telemetry]` end to end: the agent's readings of itself are queued like
//! any write, so after an outage the remote holds the queue-depth history of
//! the outage, stamped with the times the readings were taken, under the
//! configured instance.

mod util;

use std::time::Duration;

use util::*;

#[test]
fn the_remote_receives_the_queue_depth_history_of_an_outage() {
    let Some(mut vm) = VictoriaMetrics::start() else {
        return;
    };
    // One replication takes every bucket: the sensors' and the telemetry's.
    let config = AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "*", None);
    let mut launch = Launch::new();
    launch.edits.push(std::sync::Arc::new(|text: String| {
        text + "\n[telemetry]\nbucket = \"edge_telemetry\"\ninterval = \"1s\"\ninstance_id = \"gw-17\"\n"
    }));
    let agent = Agent::start_with(config, &launch);
    let depth = "edge_replicator_replication_remaining_lines";
    wait_until(DEADLINE, "a first reading at the remote", || {
        vm.count(depth) > 0
    });

    // The outage: the remote goes away, sensors keep writing, readings go on.
    vm.stop();
    let down_ms = now_ns() / 1_000_000;
    let accepted_at_down = field(&agent.replication("r1"), "acceptedLines");
    let body = lines("m", 10, 500, ts_ago(Duration::from_secs(60)));
    assert_eq!(agent.write_v2("sensors", &body, &Opts::new()).0, 204);
    // Four readings queued since the remote went away (two lines each); a
    // reading taken just before `down_ms` may be among them, so three are
    // asked of the remote below.
    wait_until(DEADLINE, "four readings queued during the outage", || {
        field(&agent.replication("r1"), "acceptedLines") >= accepted_at_down + 500 + 4 * 2
    });
    let up_ms = now_ns() / 1_000_000;
    // Everything queued so far was taken before the remote came back.
    let queued_by_then = field(&agent.replication("r1"), "acceptedLines");
    vm.restart();
    wait_until(DEADLINE, "the outage's lines delivered", || {
        field(&agent.replication("r1"), "deliveredLines") >= queued_by_then
    });
    assert_eq!(vm.count("m_value"), 500);

    let during: Vec<(serde_json::Value, i64, f64)> = vm
        .samples(depth)
        .into_iter()
        .filter(|(_, ts, _)| (down_ms..=up_ms).contains(ts))
        .collect();
    assert!(
        during.len() >= 3,
        "readings taken during the outage: {during:?}"
    );
    for (labels, _, v) in &during {
        assert_eq!(labels["instance"], "gw-17", "{labels}");
        assert_eq!(labels["replication"], "r1", "{labels}");
        assert_eq!(labels["remote"], "vm", "{labels}");
        assert!(v.fract() == 0.0, "a count of lines: {v}");
    }
    let deepest = during.iter().map(|(_, _, v)| *v).fold(0.0, f64::max);
    assert!(
        deepest >= 500.0,
        "the outage's backlog shows in its history: {during:?}"
    );
    // The depth rose during the outage, reading after reading.
    let mut ordered = during.clone();
    ordered.sort_by_key(|(_, ts, _)| *ts);
    assert!(
        ordered.windows(2).all(|w| w[0].2 <= w[1].2),
        "the queue only grows while the remote is away: {ordered:?}"
    );
    let uptime = vm.samples("edge_replicator_agent_uptime_seconds");
    assert!(
        uptime.iter().any(|(l, _, _)| l["instance"] == "gw-17"),
        "{uptime:?}"
    );
}

/// Readings taken while the board's clock is before the build date wait in
/// the queue, and reach the remote stamped with when they were taken, as the
/// synchronised clock tells it.
#[test]
fn readings_taken_before_the_clock_is_set_arrive_with_their_true_times() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "before-build offset=-1500000000 boot=telemetry").unwrap();
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "*", None);
    config.clock = String::new();
    let launch = Launch::new()
        .env("EDGE_REPLICATOR_CLOCK_FILE", clock.to_str().unwrap())
        .append(
            "[telemetry]\nbucket = \"edge_telemetry\"\ninterval = \"1s\"\ninstance_id = \"gw-9\"\n",
        );
    let started = now_ns();
    let agent = Agent::start_with(config, &launch);
    wait_until(DEADLINE, "three readings queued", || {
        field(&agent.replication("r1"), "acceptedLines") >= 6
    });
    let taken_by = now_ns();
    assert!(sink.lines_accepted().is_empty(), "sent while held");
    std::fs::write(&clock, "synchronised boot=telemetry").unwrap();
    wait_until(DEADLINE, "the readings delivered", || {
        field(&agent.replication("r1"), "deliveredLines") >= 6
    });
    let lines = sink.lines_accepted();
    let held: Vec<i64> = lines
        .iter()
        .map(|l| split_time(l).1)
        .filter(|ts| *ts <= taken_by)
        .collect();
    assert!(held.len() >= 6, "{lines:?}");
    for ts in held {
        assert!(
            ts >= started - 1_000_000_000,
            "a reading stamped {ts}, before the agent started ({started}): the wrong clock's"
        );
    }
}
