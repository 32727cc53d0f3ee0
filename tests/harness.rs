//! Checks the test harness itself against the real servers: that the
//! line-protocol generator is accepted as written and that the count-back
//! helpers are exact (samples, not series; replays not double counted).
//! A failure here means the environment or `util` is broken, not the agent.

mod util;

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
