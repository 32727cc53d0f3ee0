//! The command line: `check-config` exit codes and messages (0, or 78 with
//! one line naming the bad key), `run` refusing a bad config, and `status`
//! (table, `--json`, and `--watch` following a backlog as it drains) asking a
//! running agent.

mod util;

use std::fs;
use std::io::Read as _;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;

/// A valid config, as text, with its data dir in `dir`. The remote is a
/// port nobody listens on: nothing here needs a real remote.
fn valid_config(dir: &std::path::Path) -> String {
    let remote = format!("http://127.0.0.1:{}", free_port());
    let mut config = AgentConfig::single(RemoteConfig::v2("cloud", &remote), "sensors", None);
    config.replications[0].name = "sensors".into();
    config.render(&dir.join("data"), &format!("127.0.0.1:{}", free_port()))
}

fn with_config(text: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    fs::write(&path, text).unwrap();
    let mut all = args.to_vec();
    all.extend(["--config", path.to_str().unwrap()]);
    run_cli(&all)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_config_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = with_config(&valid_config(dir.path()), &["check-config"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "valid config refused: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("ok (1 remotes, 1 replications, data_dir"),
        "{}",
        text(&out)
    );
    // Sources are counted too.
    let with_tail = valid_config(dir.path())
        + &format!(
            "\n[[tail]]\npath = {:?}\nbucket = \"sensors\"\n",
            dir.path().join("*.lp").display().to_string()
        );
    let out = with_config(&with_tail, &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("1 replications, 1 tail sources, data_dir"),
        "{}",
        text(&out)
    );
}

/// Each case: what is wrong, how to break the valid config, the key the
/// one-line message must name.
#[test]
fn check_config_names_the_bad_key() {
    type Break = fn(String) -> String;
    let cases: &[(&str, Break, &str)] = &[
        (
            "unknown top-level key",
            |c| format!("bogus_key = 1\n{c}"),
            "bogus_key",
        ),
        (
            "unknown key in [[replication]]",
            |c| format!("{c}max_queue_sizee = \"1MiB\"\n"),
            "max_queue_sizee",
        ),
        (
            "unknown key in [listen]",
            |c| c.replace("[listen]\n", "[listen]\nadress = \"127.0.0.1:1\"\n"),
            "adress",
        ),
        (
            "bad size",
            |c| {
                c.replace(
                    "max_queue_size = \"256MiB\"",
                    "max_queue_size = \"12 potatoes\"",
                )
            },
            "max_queue_size",
        ),
        (
            "bad duration",
            |c| c.replace("max_age = \"7d\"", "max_age = \"7 fortnights\""),
            "max_age",
        ),
        (
            "undefined remote",
            |c| c.replace("remote = \"cloud\"", "remote = \"nowhere\""),
            "remote",
        ),
        (
            "bad when_full",
            |c| c.replace("when_full = \"drop_oldest\"", "when_full = \"sometimes\""),
            "when_full",
        ),
        (
            "gzip level out of range",
            |c| c.replace("gzip_level = 6", "gzip_level = 12"),
            "gzip_level",
        ),
        (
            "no tokens on a non-loopback address",
            |c| c.replace("address = \"127.0.0.1:", "address = \"0.0.0.0:"),
            "tokens",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let valid = valid_config(dir.path());
    let mut failures = Vec::new();
    for (what, breaks, key) in cases {
        let broken = breaks(valid.clone());
        assert_ne!(broken, valid, "case {what:?} did not change the config");
        let out = with_config(&broken, &["check-config"]);
        let all = text(&out);
        let lines: Vec<&str> = all.lines().filter(|l| !l.trim().is_empty()).collect();
        if out.status.code() != Some(78) {
            failures.push(format!(
                "{what}: exit {:?}, want 78; output {all:?}",
                out.status.code()
            ));
        } else if lines.len() != 1 {
            failures.push(format!(
                "{what}: want one line, got {}: {all:?}",
                lines.len()
            ));
        } else if !lines[0].contains(key) {
            failures.push(format!("{what}: message does not name {key:?}: {all:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "check-config:\n{}",
        failures.join("\n")
    );
}

#[test]
fn check_config_on_a_missing_or_unparsable_file_is_78() {
    let out = run_cli(&[
        "check-config",
        "--config",
        "/nonexistent/edge-replicator.toml",
    ]);
    assert_eq!(out.status.code(), Some(78), "missing file: {}", text(&out));
    assert!(
        text(&out).contains("/nonexistent/edge-replicator.toml"),
        "{}",
        text(&out)
    );
    let out = with_config("data_dir = [unclosed\n", &["check-config"]);
    assert_eq!(
        out.status.code(),
        Some(78),
        "TOML syntax error: {}",
        text(&out)
    );
}

#[test]
fn run_refuses_a_bad_config_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let broken = format!("bogus_key = 1\n{}", valid_config(dir.path()));
    let out = with_config(&broken, &["run"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("bogus_key"), "{}", text(&out));
}

/// Starts an agent whose remote is down and queues 123 lines in `sensors`.
fn agent_with_backlog(tokens: &[&str]) -> Agent {
    let remote = closed_port();
    let mut config = AgentConfig::single(
        RemoteConfig::v2("cloud", &remote.url()),
        "sensors",
        Some("edge"),
    );
    config.tokens = tokens.iter().map(|t| t.to_string()).collect();
    let mut agent = Agent::start(config);
    agent.keep(remote);
    let body = lines("cli", 3, 123, ts_ago(Duration::from_secs(60)));
    let opts = match tokens.first() {
        Some(t) => Opts::new().token(t),
        None => Opts::new(),
    };
    let (status, text) = agent.write_v2("sensors", &body, &opts);
    assert_eq!(status, 204, "{text}");
    agent
}

#[test]
fn status_prints_a_table() {
    let agent = agent_with_backlog(&[]);
    let out = agent.cli(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status failed: {}", text(&out));
    for word in ["r1", "cloud", "sensors", "edge", "123"] {
        assert!(
            stdout.contains(word),
            "status table lacks {word:?}:\n{stdout}"
        );
    }
    assert!(
        stdout.lines().count() >= 2,
        "want a header and a row per replication:\n{stdout}"
    );
}

#[test]
fn status_json_matches_the_api() {
    let agent = agent_with_backlog(&[]);
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "status --json failed: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", text(&out)));
    let reps = json["replications"]
        .as_array()
        .unwrap_or_else(|| panic!("no replications array: {json}"));
    assert_eq!(reps.len(), 1, "{json}");
    let rep = &reps[0];
    assert_eq!(rep["name"], "r1");
    assert_eq!(rep["remote"], "cloud");
    assert_eq!(rep["localBucket"], "sensors");
    assert_eq!(rep["remoteBucket"], "edge");
    assert_eq!(field(rep, "acceptedLines"), 123, "{rep:#}");
    assert_eq!(field(rep, "remainingLines"), 123, "{rep:#}");
    assert_conserved(rep);
    let api = agent.replication("r1");
    assert_eq!(rep["maxQueueSizeBytes"], api["maxQueueSizeBytes"]);
}

#[test]
fn status_works_when_tokens_are_required() {
    let agent = agent_with_backlog(&["cli-secret"]);
    let out = agent.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status --json with tokens: {}",
        text(&out)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", text(&out)));
    assert_eq!(
        field(&json["replications"][0], "acceptedLines"),
        123,
        "{json}"
    );
}

#[test]
fn status_without_a_running_agent_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = with_config(&valid_config(dir.path()), &["status"]);
    assert!(
        !out.status.success(),
        "status succeeded with no agent: {}",
        text(&out)
    );
    assert_ne!(
        out.status.code(),
        Some(78),
        "the config is fine: {}",
        text(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "no message on stderr"
    );
}

/// `status --watch` while a backlog drains: a remote refuses (503) until
/// it comes up, then the watch shows the replication draining (a rate out,
/// a filled bar, an ETA), ends with the queue empty, fits `COLUMNS`, and,
/// piped, prints successive blocks without terminal codes. `--count N`
/// stops after N refreshes.
#[test]
fn status_watch_follows_a_backlog_as_it_drains() {
    // The remote takes each batch after a short pause once up, so the
    // drain spans several refreshes however fast the machine is.
    let up = Arc::new(AtomicBool::new(false));
    let sink = {
        let up = up.clone();
        Sink::start(move |_| {
            if up.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                (204, String::new())
            } else {
                (503, "{\"message\":\"down for maintenance\"}".to_string())
            }
        })
    };
    let mut config = AgentConfig::single(RemoteConfig::v2("cloud", &sink.url()), "sensors", None);
    config.replications[0].batch_size = "2kB".into();
    config.replications[0].max_queue_size = "1MiB".into();
    let agent = Agent::start(config);
    let body = lines("m", 10, 3000, ts_ago(Duration::from_secs(600)));
    assert_eq!(agent.write_v2("sensors", &body, &Opts::new()).0, 204);
    wait_until(DEADLINE, "the remote's refusal in the status", || {
        agent.replication("r1")["latestResponseCode"] == 503
    });

    let mut child = agent_command()
        .args(["status", "--watch", "--interval", "100ms", "--config"])
        .arg(agent.config_path())
        .env("COLUMNS", "40")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn status --watch");
    let output = Arc::new(Mutex::new(String::new()));
    let reader = {
        let output = output.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let seen = |what: &str| output.lock().unwrap().contains(what);
    wait_until(DEADLINE, "a block with the whole backlog", || {
        seen("  left     3000 lines, eta -")
    });
    up.store(true, Ordering::SeqCst);
    wait_until(DEADLINE, "a block with the queue empty", || {
        seen("  left     0 lines, eta -")
    });
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap();
    let text = output.lock().unwrap().clone();

    assert!(
        !text.contains('\u{1b}'),
        "terminal codes in a pipe: {text:?}"
    );
    for l in text.lines() {
        assert!(l.chars().count() <= 40, "wider than COLUMNS=40: {l:?}");
    }
    let blocks: Vec<&str> = text
        .split("edge-replicator status +")
        .filter(|b| !b.is_empty())
        .collect();
    assert!(blocks.len() >= 3, "{text}");
    // While the remote refused: the state, the error, a bar with the backlog.
    let first = blocks[0];
    assert!(
        first.lines().next().unwrap().ends_with("s every 100ms"),
        "the header fits 40 columns whole: {first}"
    );
    assert!(first.contains("r1 -> cloud  backoff"), "{first}");
    assert!(first.contains("  error    HTTP 503"), "{first}");
    assert!(first.contains("  [#"), "{first}");
    // While draining: lines going out, compressed bytes sent, a bar still
    // filled and a time left.
    let draining = blocks.iter().find(|b| {
        let out_rate = b
            .lines()
            .find_map(|l| l.strip_prefix("  lines/s  in "))
            .and_then(|l| l.split("  out ").nth(1))
            .unwrap_or("-");
        let eta = b
            .lines()
            .find_map(|l| l.split(", eta ").nth(1))
            .unwrap_or("-");
        !["-", "0"].contains(&out_rate) && eta.starts_with(|c: char| c.is_ascii_digit())
    });
    let draining = draining.unwrap_or_else(|| panic!("no block shows the drain:\n{text}"));
    eprintln!("edge-replicator status +{draining}");
    assert!(draining.contains("r1 -> cloud  running"), "{draining}");
    assert!(draining.contains("  wire     "), "{draining}");
    assert!(draining.contains("/s gzip"), "{draining}");
    assert!(draining.contains("  [#"), "{draining}");
    assert_eq!(sink.lines_accepted().len(), 3000);

    // --count: that many refreshes, then exit 0.
    let out = agent.cli(&["status", "--watch", "--interval", "100ms", "--count", "2"]);
    assert!(out.status.success(), "{}", self::text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("edge-replicator status +").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("  left     0 lines, eta -"), "{stdout}");
}

#[test]
fn status_watch_refuses_a_too_short_interval() {
    let agent = agent_with_backlog(&[]);
    let out = agent.cli(&["status", "--watch", "--interval", "1ms", "--count", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("at least 100ms"), "{}", text(&out));
}
