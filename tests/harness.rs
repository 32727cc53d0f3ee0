//! Checks the test harness itself against the real servers: that the
//! line-protocol generator is accepted as written and that the count-back
//! helpers are exact (samples, not series; replays not double counted).
//! A failure here means the environment or `util` is broken, not the agent.

mod util;

use std::process::{Command, Stdio};
use std::time::Duration;
use util::*;

#[test]
fn victoria_counts_generated_lines_exactly() {
    let Some(mut vm) = VictoriaMetrics::start() else {
        return;
    };
    let http = http();
    let url = format!("{}/api/v2/write", vm.url());
    let start = ts_ago(Duration::from_secs(3600));
    let body = lines("hv", 7, 3_000, start);
    assert_eq!(line_keys(&body).len(), 3_000);
    for (i, chunk) in body.lines().collect::<Vec<_>>().chunks(500).enumerate() {
        let part = chunk.join("\n") + "\n";
        let r = post_write(
            &http,
            &url,
            &[("bucket", "b")],
            part.as_bytes(),
            &Opts::shape(i),
        );
        assert_eq!(r.status, 204, "{}", r.body);
    }
    // The same points again: must not be counted twice.
    let r = post_write(
        &http,
        &url,
        &[("bucket", "b")],
        body.as_bytes(),
        &Opts::new(),
    );
    assert_eq!(r.status, 204);
    wait_eq(DEADLINE, "samples of hv_value", 3_000, || {
        vm.count("hv_value")
    });
    let expected: std::collections::HashSet<Key> = line_keys(&body).into_iter().collect();
    assert_eq!(vm.keys("hv_value"), expected);
    // Survives a stop and restart on the same port and storage.
    vm.stop();
    vm.restart();
    wait_eq(DEADLINE, "samples of hv_value after restart", 3_000, || {
        vm.count("hv_value")
    });
}

#[test]
fn influx16_counts_generated_lines_exactly() {
    let Some(mut influx) = Influx16::start() else {
        return;
    };
    influx.create_db("hdb");
    assert_eq!(influx.count("hdb", "hm", "value"), 0);
    let body = lines("hm", 5, 2_000, ts_ago(Duration::from_secs(3600)));
    let r = influx.write("hdb", &body);
    assert_eq!(r.status, 204, "{}", r.body);
    let r = influx.write("hdb", &body);
    assert_eq!(r.status, 204, "{}", r.body);
    wait_eq(DEADLINE, "count(value) of hm", 2_000, || {
        influx.count("hdb", "hm", "value")
    });
    assert_eq!(influx.count("hdb", "hm", "status"), 2_000);
    influx.restart();
    assert_eq!(influx.count("hdb", "hm", "value"), 2_000);
}

#[test]
fn free_ports_are_distinct() {
    let ports: std::collections::HashSet<u16> = (0..50).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 50);
}

/// Regression: crash tests failed at random with every acknowledged point
/// "missing", because a server was started on a port picked as free and
/// taken as ready when *something* answered on that port. If another
/// process took the port in between, its server answered, ours exited
/// unnoticed, and the test wrote to and read from two different servers.
/// A server is ours only when the child itself listens on the port.
#[test]
fn a_server_on_a_taken_port_is_not_mistaken_for_ours() {
    let Some(first) = VictoriaMetrics::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("second.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(require("victoria-metrics").unwrap());
    cmd.arg(format!("-httpListenAddr=127.0.0.1:{}", first.port))
        .arg(format!(
            "-storageDataPath={}",
            dir.path().join("data").display()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let http = http();
    let url = format!("{}/health", first.url());
    let ready = || http.get(&url).call().is_ok_and(|r| r.status() == 200);
    match spawn_server(
        "second victoria-metrics",
        &mut cmd,
        first.port,
        &log_path,
        ready,
    ) {
        Spawned::PortTaken => {}
        Spawned::Ready(mut child) => {
            let _ = child.kill();
            panic!("a server that could not bind its port was taken as ready");
        }
    }
}

/// The agent serves the socket it is handed (systemd socket activation),
/// whatever `listen.address` says, and refuses a handed-over socket that
/// other hosts can reach when no token guards it.
#[test]
fn the_agent_serves_the_socket_it_is_handed() {
    let closed = closed_port();
    let mut agent = Agent::stopped(AgentConfig::single(
        RemoteConfig::v2("down", &closed.url()),
        "b",
        None,
    ));
    // The config names a port the agent must not bind.
    let other = closed_port();
    let text = agent.render_with(&Launch::new()).replace(
        &format!("127.0.0.1:{}", agent.port),
        &format!("127.0.0.1:{}", other.port),
    );
    std::fs::write(agent.config_path(), &text).unwrap();
    agent.spawn_with(&Launch::new());
    let body = lines("handed", 1, 10, ts_ago(Duration::from_secs(60)));
    let (status, body) = agent.write_v2("b", &body, &Opts::new());
    assert_eq!(status, 204, "{body}");
    assert!(
        agent.log().contains("serving the socket handed over"),
        "{}",
        agent.log()
    );
    agent.sigterm_and_wait();

    // No tokens, and a socket bound to every interface: refused, exit 78.
    let open = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let mut cmd = agent_command();
    cmd.args(["run", "--config"]).arg(agent.config_path());
    let out = socket_activated(cmd, &open)
        .stdin(Stdio::null())
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("listen.tokens: required when the write API listens on 0.0.0.0:"),
        "{stderr}"
    );
}
