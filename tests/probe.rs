//! `check-config --probe` against real remotes: VictoriaMetrics takes the
//! empty write, InfluxDB 1.6 with auth enabled takes it with the right user
//! and names auth with a wrong password and the database when it is missing,
//! and a dead port names connect. Each failure is one line with a fix, the
//! exit code is 69, and no credential appears in the output. (The TLS case
//! is in tests/tls.rs, beside its test CA.)

mod util;

use std::fs;
use std::process::Output;

use util::*;

/// Runs `check-config --probe` on `config`; returns the exit code and
/// stdout plus stderr.
fn probe(config: &AgentConfig) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let text = config.render(
        &dir.path().join("data"),
        &format!("127.0.0.1:{}", free_port()),
    );
    fs::write(&path, text).unwrap();
    let out: Output = run_cli(&[
        "check-config",
        "--probe",
        "--config",
        path.to_str().unwrap(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    (out.status.code(), text)
}

/// The output's lines about remote `name`.
fn lines_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let head = format!("remote \"{name}\" (");
    text.lines().filter(|l| l.starts_with(&head)).collect()
}

#[test]
fn victoria_metrics_takes_the_empty_write() {
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let config = AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "sensors", None);
    let (code, text) = probe(&config);
    assert_eq!(code, Some(0), "{text}");
    let lines = lines_of(&text, "vm");
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains(": ok: "), "{text}");
    assert!(lines[0].contains("\"sensors\" accepted"), "{text}");
    assert!(!text.contains("test-token"), "the token leaked: {text}");
    // Nothing was written: an empty write is only a question.
    assert!(vm.export("{__name__!=\"\"}").is_empty());
}

#[test]
fn influxdb_with_auth_names_the_credentials_or_the_database() {
    let (user, password) = ("edge", "pw-do-not-print-7731");
    let Some(influx) = Influx16::start_with_auth(user, password) else {
        return;
    };
    influx.create_db("telemetry");
    let basic = basic_auth(user, password);
    let encoded = basic.trim_start_matches("Basic ");
    let remote = |name: &str, password: &str| RemoteConfig {
        username: Some(user.into()),
        password: Some(password.into()),
        ..RemoteConfig::v1(name, &influx.url())
    };
    let secret_free = |text: &str| {
        assert!(!text.contains(password), "the password leaked: {text}");
        assert!(
            !text.contains(encoded),
            "the Basic credentials leaked: {text}"
        );
    };

    // Right credentials, an existing database (with and without a rp).
    let mut config = AgentConfig::single(remote("influx", password), "telemetry", None);
    config
        .replications
        .push(ReplicationConfig::new("r2", "influx", "other").remote_bucket("telemetry/autogen"));
    let (code, text) = probe(&config);
    assert_eq!(code, Some(0), "{text}");
    let lines = lines_of(&text, "influx");
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("\"telemetry\" accepted"), "{text}");
    assert!(
        lines[0].contains("\"telemetry/autogen\" accepted"),
        "{text}"
    );
    secret_free(&text);

    // A wrong password: one line, about auth, naming what to fix.
    let wrong = "wrong-pw-do-not-print-5120";
    let config = AgentConfig::single(remote("influx", wrong), "telemetry", None);
    let (code, text) = probe(&config);
    assert_eq!(code, Some(69), "{text}");
    let lines = lines_of(&text, "influx");
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("auth failed"), "{text}");
    assert!(lines[0].contains("username and password"), "{text}");
    assert!(!text.contains(wrong), "the wrong password leaked: {text}");
    secret_free(&text);

    // A database that does not exist: the line names it and the replication.
    let mut config = AgentConfig::single(remote("influx", password), "telemetry", None);
    config
        .replications
        .push(ReplicationConfig::new("lost", "influx", "x").remote_bucket("nodb"));
    let (code, text) = probe(&config);
    assert_eq!(code, Some(69), "{text}");
    let lines = lines_of(&text, "influx");
    assert_eq!(lines.len(), 1, "only the missing database fails: {text}");
    assert!(
        lines[0].contains("destination failed for \"nodb\""),
        "{text}"
    );
    assert!(lines[0].contains("create database \"nodb\""), "{text}");
    assert!(lines[0].contains("replication \"lost\""), "{text}");
    secret_free(&text);
}

#[test]
fn a_dead_port_is_named_as_connect_and_other_remotes_are_still_probed() {
    let dead = closed_port();
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let mut config = AgentConfig::single(RemoteConfig::v2("dead", &dead.url()), "a", None);
    config.remotes.push(RemoteConfig::v2("vm", &vm.url()));
    config
        .replications
        .push(ReplicationConfig::new("r2", "vm", "b"));
    let (code, text) = probe(&config);
    assert_eq!(code, Some(69), "{text}");
    let dead_lines = lines_of(&text, "dead");
    assert_eq!(dead_lines.len(), 1, "{text}");
    assert!(dead_lines[0].contains("connect failed"), "{text}");
    assert!(
        dead_lines[0].contains(&format!("127.0.0.1:{}", dead.port)),
        "{text}"
    );
    assert!(dead_lines[0].contains("fix: "), "{text}");
    let vm_lines = lines_of(&text, "vm");
    assert_eq!(vm_lines.len(), 1, "{text}");
    assert!(vm_lines[0].contains(": ok: "), "{text}");
    assert!(text.contains("1 of 2 remotes failed the probe"), "{text}");
    assert!(!text.contains("test-token"), "the token leaked: {text}");
}
