//! End to end for `[[tail]]`: line-protocol files written by the test are
//! followed by the agent and arrive at a real VictoriaMetrics, through rename
//! rotation, copytruncate, a new file matching the glob, a partial last line,
//! invalid lines, a graceful restart and a SIGKILL, all while a writer keeps
//! appending. Counts are exact: the replication's `acceptedLines` (kept
//! across restarts) equals the lines written (nothing queued twice), and
//! VictoriaMetrics holds every one of them (nothing lost). A string value
//! holding newlines, appended in pieces cut inside it, arrives at a real
//! InfluxDB 1.6 as one point.

mod util;

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use util::*;

fn append(path: &Path, text: &str) {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn accepted(agent: &Agent) -> u64 {
    field(&agent.replication("r1"), "acceptedLines")
}

/// The tail source's status entry for `path`, if followed.
fn followed(agent: &Agent, path: &Path) -> Option<Value> {
    let name = path.display().to_string();
    agent.source("tail")["files"]
        .as_array()?
        .iter()
        .find(|f| f["path"] == name.as_str())
        .cloned()
}

/// Waits until the agent has queued everything `path` holds.
fn wait_consumed(agent: &Agent, path: &Path) {
    let size = fs::metadata(path).unwrap().len();
    wait_eq(
        DEADLINE,
        &format!("offset of {}", path.display()),
        Some(size),
        || followed(agent, path).and_then(|f| f["offset"].as_u64()),
    );
}

#[test]
fn tailed_files_arrive_exactly_once_through_rotation_and_restarts() {
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    let config = AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "files", None);
    let launch = Launch::new().append(&format!(
        "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"50ms\"\n",
        toml_str(&dir.join("*.lp").display().to_string())
    ));
    let mut agent = Agent::start_with(config, &launch);

    let all = lines("tl", 9, 6_101, ts_ago(Duration::from_secs(7200)));
    let mut source = all.lines().map(|l| format!("{l}\n"));
    let mut take = |n: usize| -> String { source.by_ref().take(n).collect() };
    let mut expected = 0u64;

    // A file, and a last line that arrives in two writes.
    let a = dir.join("a.lp");
    append(&a, &take(1_000));
    let line = take(1);
    let (head, rest) = line.split_at(line.len() / 2);
    append(&a, head);
    expected += 1_000;
    wait_eq(
        DEADLINE,
        "accepted before the line is finished",
        expected,
        || accepted(&agent),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(accepted(&agent), expected, "half a line was queued");
    append(&a, rest);
    expected += 1;
    wait_eq(
        DEADLINE,
        "accepted after the line is finished",
        expected,
        || accepted(&agent),
    );

    // Rotation by rename: the writer keeps its handle on the old file for a
    // while, and a new a.lp starts.
    let mut old = OpenOptions::new().append(true).open(&a).unwrap();
    fs::rename(&a, dir.join("a.lp.1")).unwrap();
    old.write_all(take(200).as_bytes()).unwrap();
    append(&a, &take(300));
    old.write_all(take(100).as_bytes()).unwrap();
    drop(old);
    expected += 600;
    wait_eq(DEADLINE, "accepted after rename rotation", expected, || {
        accepted(&agent)
    });

    // Copytruncate: once everything is read, the file is copied (to a name the
    // glob does not match) and truncated, and the writer goes on.
    let b = dir.join("b.lp");
    append(&b, &take(500));
    expected += 500;
    wait_consumed(&agent, &b);
    fs::copy(&b, dir.join("b.lp.1")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&b, &take(400));
    expected += 400;
    // A new file matching the glob.
    append(&dir.join("c.lp"), &take(500));
    append(&dir.join("c.txt"), "not followed\n");
    expected += 500;
    wait_eq(
        DEADLINE,
        "accepted after copytruncate and a new file",
        expected,
        || accepted(&agent),
    );

    // Restarts while a writer appends.
    let d = dir.join("d.lp");
    let chunk: Vec<String> = (0..60).map(|_| take(50)).collect();
    expected += 60 * 50;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for c in &chunk {
                append(&d, c);
                std::thread::sleep(Duration::from_millis(40));
            }
        });
        std::thread::sleep(Duration::from_millis(600));
        assert!(agent.sigterm_and_wait().success());
        agent.restart();
        std::thread::sleep(Duration::from_millis(700));
        agent.kill9();
        agent.restart();
        writer.join().unwrap();
    });
    wait_eq(DEADLINE, "accepted after restarts", expected, || {
        accepted(&agent)
    });

    // Invalid lines: skipped, counted, logged with file, line and column,
    // never with their text.
    let e = dir.join("e.lp");
    let good = take(100);
    let mut text = String::new();
    for (i, l) in good.lines().enumerate() {
        text += l;
        text += "\n";
        if i % 40 == 0 {
            text += "tl,bad=1 value=\n";
        }
    }
    append(&e, &text);
    expected += 100;
    wait_eq(DEADLINE, "accepted after invalid lines", expected, || {
        accepted(&agent)
    });
    let status = agent.source("tail");
    assert_eq!(status["invalidLines"], 3, "{status:#}");
    let bad_line = text.lines().position(|l| l.contains("bad=1")).unwrap() + 1;
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "{}:{bad_line}:16: missing field value",
            e.display()
        )),
        "the log names file, line, column and reason"
    );
    assert!(!log.contains("bad=1"), "the log quotes an invalid line");

    assert_eq!(source.next(), None, "every generated line was written");
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "acceptedLines"), 6_101, "{rep:#}");
    wait_eq(DEADLINE, "samples of tl_value at the remote", 6_101, || {
        vm.count("tl_value")
    });
    let want: HashSet<Key> = line_keys(&all).into_iter().collect();
    assert_eq!(vm.keys("tl_value"), want);
    wait_eq(DEADLINE, "r1 remainingLines", 0, || {
        field(&agent.replication("r1"), "remainingLines")
    });
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "deliveredLines"), 6_101, "{rep:#}");
    assert_conserved(&rep);

    // The rotated file was finished and dropped; the others are followed.
    wait_until(DEADLINE, "a.lp.1 no longer followed", || {
        followed(&agent, &dir.join("a.lp.1")).is_none()
    });
    let status = agent.source("tail");
    assert_eq!(status["state"], "following", "{status:#}");
    assert_eq!(status["lagBytes"], 0, "{status:#}");
    let paths: HashSet<String> = status["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    let want: HashSet<String> = ["a.lp", "b.lp", "c.lp", "d.lp", "e.lp"]
        .iter()
        .map(|n| dir.join(n).display().to_string())
        .collect();
    assert_eq!(paths, want);
    let metrics = agent.metrics();
    let label = format!("source=\"tail {}\"", dir.join("*.lp").display());
    assert_eq!(
        metric_value(
            &metrics,
            "edge_replicator_source_lines_invalid_total",
            &label
        ),
        Some(3.0),
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "edge_replicator_source_lines_total", &label)
            .is_some_and(|v| v > 0.0),
        "{metrics}"
    );
}

/// With `from_beginning = false`, what the files held at the first start is
/// left alone; what is appended later (and across a restart) is queued.
#[test]
fn from_beginning_false_starts_at_the_end_once() {
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let f = files.path().join("m.lp");
    let start = ts_ago(Duration::from_secs(3600));
    let all = lines("fb", 3, 300, start);
    let parts: Vec<&str> = all.lines().collect();
    append(&f, &(parts[..100].join("\n") + "\n"));
    let config = AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "files", None);
    let launch = Launch::new().append(&format!(
        "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"50ms\"\nfrom_beginning = false\n",
        toml_str(&f.display().to_string())
    ));
    let mut agent = Agent::start_with(config, &launch);
    wait_until(DEADLINE, "m.lp followed", || followed(&agent, &f).is_some());
    append(&f, &(parts[100..200].join("\n") + "\n"));
    wait_eq(DEADLINE, "accepted", 100, || accepted(&agent));
    assert!(agent.sigterm_and_wait().success());
    append(&f, &(parts[200..].join("\n") + "\n"));
    agent.restart();
    wait_eq(DEADLINE, "accepted after restart", 200, || accepted(&agent));
    wait_eq(DEADLINE, "samples of fb_value", 200, || {
        vm.count("fb_value")
    });
    let want: HashSet<Key> = line_keys(&(parts[100..].join("\n") + "\n"))
        .into_iter()
        .collect();
    assert_eq!(vm.keys("fb_value"), want);
}

/// SIGHUP: a source whose settings changed restarts from its checkpoint (no
/// line read twice), and an added one starts.
#[test]
fn a_reload_restarts_changed_sources_from_their_checkpoints() {
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let (a, b) = (files.path().join("a"), files.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let tail = |dir: &Path, poll: &str| {
        format!(
            "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"{poll}\"\n",
            toml_str(&dir.join("*.lp").display().to_string())
        )
    };
    let config = AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "files", None);
    let mut agent = Agent::start_with(config, &Launch::new().append(&tail(&a, "50ms")));
    let all = lines("rl", 4, 600, ts_ago(Duration::from_secs(3600)));
    let parts: Vec<String> = all.lines().map(|l| format!("{l}\n")).collect();
    append(&a.join("x.lp"), &parts[..300].concat());
    wait_eq(DEADLINE, "accepted before the reload", 300, || {
        accepted(&agent)
    });

    let changed = Launch::new()
        .append(&tail(&a, "80ms"))
        .append(&tail(&b, "50ms"));
    agent.write_config_with(&changed);
    agent.sighup();
    wait_eq(DEADLINE, "sources after the reload", 2, || {
        agent.sources().len()
    });
    append(&a.join("x.lp"), &parts[300..500].concat());
    append(&b.join("y.lp"), &parts[500..].concat());
    wait_eq(DEADLINE, "accepted after the reload", 600, || {
        accepted(&agent)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(accepted(&agent), 600, "a line was read twice");
    wait_eq(DEADLINE, "samples of rl_value", 600, || {
        vm.count("rl_value")
    });
    assert!(agent.log().contains("stopping (removed or changed)"));
    assert!(agent.sigterm_and_wait().success());
}

/// Backpressure: with `when_full = "reject"` and the remote down, the source
/// waits at the bound (its checkpoint does not move past refused lines), and
/// once the remote is back every line arrives, once.
#[test]
fn a_full_reject_queue_makes_the_source_wait_not_skip() {
    let Some(mut vm) = VictoriaMetrics::start() else {
        return;
    };
    vm.stop();
    let files = tempfile::tempdir().unwrap();
    let f = files.path().join("m.lp");
    let mut config = AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "files", None);
    let r = &mut config.replications[0];
    r.when_full = "reject".into();
    r.max_queue_size = "20kB".into();
    r.batch_size = "5kB".into();
    let launch = Launch::new().append(&format!(
        "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"50ms\"\n",
        toml_str(&f.display().to_string())
    ));
    let agent = Agent::start_with(config, &launch);
    let all = lines("bp", 5, 2_000, ts_ago(Duration::from_secs(3600)));
    append(&f, &all);
    wait_until(DEADLINE, "the source to be blocked", || {
        agent.source("tail")["state"] == "blocked"
    });
    let rep = agent.replication("r1");
    assert!(field(&rep, "currentQueueSizeBytes") <= 20_000, "{rep:#}");
    assert!(field(&rep, "acceptedLines") < 2_000, "{rep:#}");
    let status = agent.source("tail");
    assert!(status["retries"].as_u64().unwrap() > 0, "{status:#}");
    assert!(status["lagBytes"].as_u64().unwrap() > 0, "{status:#}");

    vm.restart();
    wait_eq(DEADLINE, "accepted once the remote is back", 2_000, || {
        accepted(&agent)
    });
    wait_eq(DEADLINE, "samples of bp_value", 2_000, || {
        vm.count("bp_value")
    });
    let want: HashSet<Key> = line_keys(&all).into_iter().collect();
    assert_eq!(vm.keys("bp_value"), want);
    wait_until(DEADLINE, "the source to follow again", || {
        agent.source("tail")["state"] == "following"
    });
    assert_eq!(agent.source("tail")["lagBytes"], 0);
}

/// The body from the report of a point injected through a string value.
const MULTI_LINE: &str = "applog,app=web msg=\"request failed:\n\
                          injected,host=x value=42 1764000000000000000\n\
                          end\" 1764000000000000000\n";

/// A tailed file holding a string value with newlines, appended in pieces
/// cut inside the string (so the point straddles polls), arrives at a real
/// InfluxDB 1.6 as the one `applog` point, with no `injected` point.
#[test]
fn a_string_holding_newlines_arrives_whole_at_influx16() {
    let Some(influx) = Influx16::start() else {
        return;
    };
    influx.create_db("edge");
    let files = tempfile::tempdir().unwrap();
    let f = files.path().join("app.lp");
    let config = AgentConfig::single(
        RemoteConfig::v1("influx", &influx.url()),
        "files",
        Some("edge"),
    );
    let launch = Launch::new().append(&format!(
        "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"5ms\"\n",
        toml_str(&f.display().to_string())
    ));
    let agent = Agent::start_with(config, &launch);
    let inside = MULTI_LINE.find("value=42").unwrap();
    append(&f, &MULTI_LINE[..inside]);
    // The agent has measured the first two lines and left them: the point
    // has not ended yet.
    wait_until(DEADLINE, "app.lp followed with its bytes lagging", || {
        followed(&agent, &f).is_some_and(|s| s["lagBytes"] == inside as u64)
    });
    assert_eq!(followed(&agent, &f).unwrap()["offset"], 0);
    append(&f, &MULTI_LINE[inside..]);
    let t = ts_ago(Duration::from_secs(60));
    append(&f, &format!("marker v=1 {t}\n"));
    wait_consumed(&agent, &f);
    wait_eq(DEADLINE, "count(v) of marker", 1, || {
        influx.count("edge", "marker", "v")
    });
    let names = influx.query(Some("edge"), "SHOW MEASUREMENTS");
    assert_eq!(
        names["results"][0]["series"][0]["values"],
        serde_json::json!([["applog"], ["marker"]])
    );
    let rows = influx.query(Some("edge"), "SELECT app, msg FROM applog");
    assert_eq!(
        rows["results"][0]["series"][0]["values"],
        serde_json::json!([[
            "2025-11-24T16:00:00Z",
            "web",
            "request failed:\ninjected,host=x value=42 1764000000000000000\nend"
        ]])
    );
    let status = agent.source("tail");
    assert_eq!(status["invalidLines"], 0, "{status:#}");
    assert_eq!(accepted(&agent), 2);
}

/// Times the agent's source thread has gone to sleep and been woken
/// (voluntary context switches), from /proc.
fn source_wakeups(agent: &Agent) -> u64 {
    let tasks = format!("/proc/{}/task", agent.pid());
    let mut found = None;
    for task in fs::read_dir(&tasks).unwrap().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "source" {
            continue;
        }
        let status = fs::read_to_string(task.path().join("status")).unwrap();
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches in /proc status");
        assert!(found.is_none(), "one source thread expected");
        found = Some(n);
    }
    found.expect("the source thread")
}

/// A tailed file wakes its source when written (a new file, an append, a
/// file in a directory made after the start), and an idle source sleeps:
/// the rescan is set to an hour, so every line below arrives because the
/// kernel reported a change, and the thread wakes a few times in two idle
/// seconds where polling every 5 ms would wake it four hundred times. Under
/// qemu the emulator's own signals wake it too: 31 times in 2 s was seen,
/// hence a bound of 100, still a quarter of what polling costs.
#[test]
fn tailed_files_wake_their_source_and_an_idle_source_sleeps() {
    let sink = Sink::accept_all();
    let files = tempfile::tempdir().unwrap();
    let pattern = files.path().join("*").join("*.lp");
    let config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "files", None);
    let launch = Launch::new()
        .env("EDGE_REPLICATOR_TAIL_RESCAN_MS", "3600000")
        .append(&format!(
            "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"5ms\"\nfrom_beginning = true\n",
            toml_str(&pattern.display().to_string())
        ));
    let agent = Agent::start_with(config, &launch);
    let start = ts_ago(Duration::from_secs(3600));
    let all = lines("wake", 3, 300, start);
    let parts: Vec<&str> = all.lines().collect();
    let chunk = |r: std::ops::Range<usize>| parts[r].join("\n") + "\n";

    // A directory, then a file in it, after the source started.
    fs::create_dir(files.path().join("a")).unwrap();
    let a = files.path().join("a").join("1.lp");
    append(&a, &chunk(0..100));
    wait_eq(DEADLINE, "accepted from a new file", 100, || {
        accepted(&agent)
    });

    let before = source_wakeups(&agent);
    std::thread::sleep(Duration::from_secs(2));
    let idle = source_wakeups(&agent) - before;
    assert!(
        idle < 100,
        "the idle source woke {idle} times in 2 s (polling every 5 ms: about 400)"
    );

    append(&a, &chunk(100..200));
    wait_eq(DEADLINE, "accepted after an append", 200, || {
        accepted(&agent)
    });
    fs::create_dir(files.path().join("b")).unwrap();
    append(&files.path().join("b").join("2.lp"), &chunk(200..300));
    wait_eq(DEADLINE, "accepted from a second directory", 300, || {
        accepted(&agent)
    });
    wait_until(DEADLINE, "delivered", || {
        field(&agent.replication("r1"), "remainingLines") == 0
    });
    let got: usize = sink
        .requests()
        .iter()
        .filter(|r| r.answered_2xx())
        .map(|r| r.lines().len())
        .sum();
    assert_eq!(got, 300, "every line once");
}

/// The clock guard and a tailed file: lines the file gives without a
/// timestamp, read while the board's clock is before the build date, are
/// queued but not sent; once the clock is synchronised they arrive stamped
/// with the time they were read, not with the wrong clock's.
#[test]
fn tailed_lines_without_a_timestamp_wait_for_the_clock_and_keep_their_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    fs::write(&clock, "before-build offset=-1500000000 boot=tail").unwrap();
    let files = tempfile::tempdir().unwrap();
    let f = files.path().join("m.lp");
    append(&f, "");
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "files", None);
    config.clock = String::new();
    let launch = Launch::new()
        .env("EDGE_REPLICATOR_CLOCK_FILE", clock.to_str().unwrap())
        .append(&format!(
            "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"50ms\"\n",
            toml_str(&f.display().to_string())
        ));
    let agent = Agent::start_with(config, &launch);
    wait_until(DEADLINE, "m.lp followed", || followed(&agent, &f).is_some());
    let before = now_ns();
    append(&f, "m,k=a v=1\nm,k=b v=2\n");
    wait_eq(DEADLINE, "accepted", 2, || accepted(&agent));
    let after = now_ns();
    wait_until(DEADLINE, "state clock", || {
        str_field(&agent.replication("r1"), "state") == "clock"
    });
    assert!(sink.lines_accepted().is_empty(), "sent while held");

    fs::write(&clock, "synchronised boot=tail").unwrap();
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 2, "{rep:#}");
    for l in sink.lines_accepted() {
        let (l, ts) = split_time(&l);
        assert!(
            (before - 1_000_000_000..=after + 1_000_000_000).contains(&ts),
            "{l}: not stamped with when it was read ({before}..{after})"
        );
    }
}
