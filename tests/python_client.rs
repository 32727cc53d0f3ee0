//! The official Python `influxdb-client` (PyPI, in the venv that
//! scripts/install-test-deps.sh creates at target/pyenv) writes through the
//! agent with its batching write API and gzip; every point arrives at
//! VictoriaMetrics.

mod util;

use std::process::Command;
use std::time::Duration;

use util::*;

#[test]
fn python_influxdb_client_batches_with_gzip_arrive() {
    let Some(python) = require_python_client() else {
        return;
    };
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let mut config = AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "sensors", None);
    config.tokens = vec!["py-token".into()];
    let agent = Agent::start(config);

    const N: u64 = 20_000;
    let start = ts_ago(Duration::from_secs(3600));
    let script = repo_root().join("tests/python/write_with_client.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--url", &agent.url()])
        .args(["--token", "py-token"])
        .args(["--bucket", "sensors"])
        .args(["--measurement", "py"])
        .args(["--count", &N.to_string()])
        .args(["--start-ns", &start.to_string()])
        .output()
        .expect("run tests/python/write_with_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let outcome: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("client summary is not JSON ({e}): {stdout}"));
    assert_eq!(outcome["errors"], serde_json::json!([]), "{outcome}");
    assert!(
        outcome["batches_ok"].as_u64().unwrap_or(0) >= N / 1000,
        "{outcome}"
    );

    wait_eq(
        DEADLINE,
        "samples of py_value at VictoriaMetrics",
        N,
        || vm.count("py_value"),
    );
    assert_eq!(vm.count("py_seq"), N);
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "acceptedLines"), N, "{rep:#}");
    assert_conserved(&rep);
}

#[test]
fn python_influxdb_client_sees_a_ready_write_only_agent() {
    let Some(python) = require_python_client() else {
        return;
    };
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "sensors", None);
    config.tokens = vec!["py-token".into()];
    let agent = Agent::start(config);
    let script = repo_root().join("tests/python/ready_and_query.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--url", &agent.url()])
        .args(["--token", "py-token"])
        .output()
        .expect("run tests/python/ready_and_query.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("client summary is not JSON ({e}): {stdout}"));
    assert_eq!(v["ready"]["status"], "ready", "{v}");
    assert!(v["ready"]["started"].is_string(), "{v}");
    assert!(v["ready"]["up"].is_string(), "{v}");
    assert_eq!(v["ping"], true, "{v}");
    for call in ["query", "buckets"] {
        assert_eq!(v[call]["status"], 501, "{call}: {v}");
        let body = v[call]["body"].as_str().unwrap_or_default();
        assert!(body.contains("write-only"), "{call}: {v}");
        assert!(body.contains(&sink.url()), "{call}: {v}");
    }
}
