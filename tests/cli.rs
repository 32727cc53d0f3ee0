//! The command line: `check-config` exit codes and messages (0, or 78 with
//! one line naming the bad key), `run` refusing a bad config, and `status`
//! (table and `--json`) asking a running agent.

mod util;

use std::fs;
use std::process::Output;
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
