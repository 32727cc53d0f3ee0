//! The endpoints InfluxDB clients call besides writes: `/ready` in
//! InfluxDB 2.x's shape, query and management paths answered in the API's
//! own error shape (this is a write-only agent, and the data is over there),
//! header names spelled on the wire as InfluxDB spells them, and the
//! start-up log naming a `*` replication's real destination.

mod util;

use util::*;

fn agent_with(tokens: &[&str], local_bucket: &str) -> (Sink, Agent) {
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), local_bucket, None);
    config.tokens = tokens.iter().map(|t| t.to_string()).collect();
    let agent = Agent::start(config);
    (sink, agent)
}

#[test]
fn ready_answers_in_influxdb_2_shape() {
    let (_sink, agent) = agent_with(&[], "b");
    let r = agent.get("/ready");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "ready", "{v}");
    let started = v["started"].as_str().expect("started is a string");
    let started = humantime::parse_rfc3339(started)
        .unwrap_or_else(|e| panic!("started {started:?} is not RFC 3339: {e}"));
    assert!(started <= std::time::SystemTime::now(), "{v}");
    let up = v["up"].as_str().expect("up is a string");
    assert!(
        up.ends_with('s') && up.starts_with(|c: char| c.is_ascii_digit()),
        "up {up:?} is not a Go duration"
    );
}

#[test]
fn header_names_go_out_in_influxdb_spelling() {
    let (_sink, agent) = agent_with(&[], "b");
    for path in ["/ping", "/health", "/ready", "/query?q=SHOW+DATABASES"] {
        let answer = raw_http(
            agent.port,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n"),
            b"",
        );
        let head = answer.split("\r\n\r\n").next().unwrap();
        for name in ["X-Influxdb-Version: ", "X-Influxdb-Build: "] {
            assert!(
                head.lines().any(|l| l.starts_with(name)),
                "GET {path}: no {name:?} spelled so in:\n{head}"
            );
        }
    }
    // v1 errors carry X-Influxdb-Error, which clients also read by name.
    let answer = raw_http(
        agent.port,
        "POST /write?db=nope HTTP/1.1\r\nHost: localhost\r\n",
        b"m f=1",
    );
    assert_eq!(raw_status(&answer), 404, "{answer}");
    assert!(answer.contains("\r\nX-Influxdb-Error: "), "{answer}");
}

#[test]
fn query_and_management_paths_say_the_agent_is_write_only() {
    let (sink, agent) = agent_with(&["s3cret"], "b");
    let destination = format!("{}/api/v2/write?org=test-org&bucket=b", sink.url());
    // v1 /query: InfluxDB 1.x's {"error": ...}, as `influx -import` and the
    // v1 clients expect.
    for auth in ["Authorization: Token s3cret\r\n", ""] {
        for request in [
            "GET /query?q=SHOW+DATABASES",
            "POST /query?q=CREATE+DATABASE+x",
        ] {
            let answer = raw_http(
                agent.port,
                &format!("{request} HTTP/1.1\r\nHost: localhost\r\n{auth}"),
                b"",
            );
            assert_eq!(raw_status(&answer), 501, "{answer}");
            let v = raw_json(&answer);
            let message = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
            assert!(message.contains("write-only"), "{message}");
            assert!(message.contains("/query"), "{message}");
            // Where the data goes is told to those allowed to write.
            assert_eq!(
                message.contains(&destination),
                !auth.is_empty(),
                "{auth:?}: {message}"
            );
        }
    }
    // v2 query and management paths: {"code": ..., "message": ...}.
    for request in [
        "POST /api/v2/query?org=o",
        "GET /api/v2/buckets",
        "GET /api/v2/orgs",
        "POST /api/v2/delete?bucket=b",
        "GET /api/v2/dbrps",
    ] {
        let answer = raw_http(
            agent.port,
            &format!("{request} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Token s3cret\r\n"),
            b"",
        );
        assert_eq!(raw_status(&answer), 501, "{request}: {answer}");
        let v = raw_json(&answer);
        assert_eq!(v["code"], "not implemented", "{request}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains("write-only"), "{message}");
        assert!(message.contains(&destination), "{message}");
    }
    // Paths that are neither stay a plain 404.
    let answer = raw_http(
        agent.port,
        "GET /nothing HTTP/1.1\r\nHost: localhost\r\n",
        b"",
    );
    assert_eq!(raw_status(&answer), 404, "{answer}");
    assert_eq!(
        agent.write_v2("b", "m f=1", &Opts::new().token("s3cret")).0,
        204
    );
}

#[test]
fn a_star_replication_logs_where_each_write_goes() {
    let (sink, agent) = agent_with(&[], "*");
    let log = agent.log();
    let want = format!(
        "{}/api/v2/write?org=test-org&bucket={{bucket}}&precision=ns (each write's own bucket)",
        sink.url()
    );
    assert!(log.contains(&want), "no {want:?} in:\n{log}");
    assert!(!log.contains("same+as+local"), "{log}");
}

/// The lines the sink accepted, as (series and fields, timestamp).
fn points_at(sink: &Sink) -> Vec<(String, i64)> {
    sink.lines_accepted()
        .iter()
        .map(|l| split_time(l))
        .collect()
}

/// `dead-letter list --json` of replication r1: (lines, reason) per record.
fn dead_letter_reasons(agent: &Agent) -> Vec<(u64, String)> {
    let out = agent.cli(&["dead-letter", "list", "--replication", "r1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    v["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (field(d, "lines"), str_field(d, "reason").to_string()))
        .collect()
}

/// The clock guard on a board that booted with its clock in 1970: every
/// write waits in the queue (across a restart) while the clock is before the
/// build date; once it is synchronised, a line the agent stamped goes with
/// the time it arrived, as the synchronised clock tells it, a line with its
/// own time keeps it, and a line stamped before the build date is set aside
/// with reason `clock`. A line stamped in a boot that ended before the clock
/// was synchronised cannot be dated: it is set aside, never sent.
#[test]
fn the_clock_guard_holds_writes_until_the_clock_is_known_and_stamps_their_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    // The wall clock the agent reads is 50 years behind: early 1970s.
    let behind = 50 * 365 * 86_400;
    std::fs::write(&clock, format!("before-build offset=-{behind} boot=first")).unwrap();
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    // The defaults of [clock].
    config.clock = String::new();
    let launch = Launch::new().env("EDGE_REPLICATOR_CLOCK_FILE", clock.to_str().unwrap());
    let mut agent = Agent::start_with(config, &launch);

    let own = now_ns() - 3_600_000_000_000;
    let before = now_ns();
    let body = format!("m,k=stamped v=1\nm,k=own v=2 {own}\nm,k=early v=3 1000000000\n");
    let (status, text) = agent.write_v2("b", body, &Opts::new());
    let after = now_ns();
    assert_eq!(status, 204, "{text}");
    let v = agent.replications();
    assert_eq!(v["clock"]["state"], "before-build", "{v}");
    assert_eq!(v["clock"]["holding"], true, "{v}");
    wait_until(DEADLINE, "state clock", || {
        str_field(&agent.replication("r1"), "state") == "clock"
    });
    let r = agent.replication("r1");
    assert_eq!(field(&r, "remainingLines"), 3, "{r}");
    let out = agent.cli(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("the queue holds what is written until it is synchronised"),
        "{stdout}"
    );

    // Held across a restart in the same boot.
    agent.sigterm_and_wait();
    agent.spawn_with(&launch);
    wait_until(DEADLINE, "state clock after a restart", || {
        str_field(&agent.replication("r1"), "state") == "clock"
    });
    assert!(sink.lines_accepted().is_empty(), "sent while held");

    // The time service sets the clock.
    std::fs::write(&clock, "synchronised boot=first").unwrap();
    let r = agent.wait_drained("r1");
    assert_eq!(field(&r, "deliveredLines"), 2, "{r}");
    assert_eq!(field(&r, "deadLetteredLines"), 1, "{r}");
    assert_eq!(str_field(&r, "state"), "running", "{r}");
    let points = points_at(&sink);
    assert_eq!(points.len(), 2, "{points:?}");
    assert_eq!(points[0].0, "m,k=stamped v=1");
    assert!(
        (before - 1_000_000_000..=after + 1_000_000_000).contains(&points[0].1),
        "stamped with its arrival ({before}..{after}), not the 1970 clock: {points:?}"
    );
    assert_eq!(points[1], ("m,k=own v=2".to_string(), own));
    let dead = dead_letter_reasons(&agent);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, 1);
    assert!(dead[0].1.starts_with("clock: timestamp before"), "{dead:?}");
    assert_eq!(agent.replications()["clock"]["linesRestamped"], 1);

    // A write in a boot whose clock never synchronised, then a reboot.
    std::fs::write(&clock, format!("before-build offset=-{behind} boot=second")).unwrap();
    let (status, text) = agent.write_v2("b", "m,k=lost v=4\n", &Opts::new());
    assert_eq!(status, 204, "{text}");
    agent.kill9();
    std::fs::write(&clock, "synchronised boot=third").unwrap();
    agent.spawn_with(&launch);
    let r = agent.wait_drained("r1");
    assert_eq!(field(&r, "deadLetteredLines"), 2, "{r}");
    assert_eq!(field(&r, "deliveredLines"), 2, "{r}");
    assert_eq!(points_at(&sink).len(), 2, "the undatable line was sent");
    let dead = dead_letter_reasons(&agent);
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead[1].1.starts_with("clock: stamped on arrival"),
        "{dead:?}"
    );
    assert!(agent
        .log()
        .contains("set aside in the dead-letter store: clock:"));
}

/// The clock is synchronised while the worker is still busy with lines
/// queued before the held ones (the remote is down), and the board reboots
/// before the clock is synchronised again: the held lines are dated with the
/// offset the agent recorded in the boot they arrived in, not set aside.
#[test]
fn lines_held_in_a_boot_whose_clock_was_set_are_dated_after_a_reboot() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "synchronised boot=one").unwrap();
    let up = std::sync::Arc::new(AtomicBool::new(false));
    let remote_up = up.clone();
    let sink = Sink::start(move |_| match remote_up.load(Ordering::SeqCst) {
        true => (204, String::new()),
        false => (503, "down".to_string()),
    });
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    config.clock = String::new();
    let launch = Launch::new().env("EDGE_REPLICATOR_CLOCK_FILE", clock.to_str().unwrap());
    let mut agent = Agent::start_with(config, &launch);
    let own = now_ns() - 60_000_000_000;
    assert_eq!(
        agent
            .write_v2("b", format!("first v=1 {own}\n"), &Opts::new())
            .0,
        204
    );
    let behind = 45 * 365 * 86_400;
    std::fs::write(&clock, format!("before-build offset=-{behind} boot=one")).unwrap();
    let before = now_ns();
    assert_eq!(agent.write_v2("b", "held v=2\n", &Opts::new()).0, 204);
    let after = now_ns();
    // Synchronised in this boot, while the worker retries the first line.
    std::fs::write(&clock, "synchronised boot=one").unwrap();
    wait_until(DEADLINE, "the first line retried", || {
        sink.requests().len() >= 2
    });
    wait_until(DEADLINE, "the offset recorded", || {
        agent.log().contains("the clock guard lets go")
    });
    agent.kill9();

    // Rebooted, the clock not set yet, the remote back.
    std::fs::write(&clock, format!("before-build offset=-{behind} boot=two")).unwrap();
    up.store(true, Ordering::SeqCst);
    agent.spawn_with(&launch);
    wait_until(DEADLINE, "both lines at the remote", || {
        sink.lines_accepted().len() == 2
    });
    let points = points_at(&sink);
    assert_eq!(points[0], ("first v=1".to_string(), own));
    assert_eq!(points[1].0, "held v=2");
    assert!(
        (before - 1_000_000_000..=after + 1_000_000_000).contains(&points[1].1),
        "dated with the first boot's offset ({before}..{after}): {points:?}"
    );
    assert_eq!(field(&agent.replication("r1"), "deadLetteredLines"), 0);
}

/// A board without a real-time clock: while the clock is not synchronised
/// (here read from the test's clock file, as the agent's debug builds allow),
/// status, metrics and the `status` command say so, lines the agent stamps
/// are counted, and the log warns once; once synchronised, the count stops
/// and the log says the time is confirmed again. Lines with their own
/// timestamps are never counted.
#[test]
fn an_unsynchronised_clock_is_shown_and_the_lines_stamped_with_it_counted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "unsynchronised").unwrap();
    let sink = Sink::accept_all();
    let config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    // The guard holds writes only in the first second after boot: this
    // test is about what is shown and counted.
    let mut config = config;
    config.clock = "wait_for_sync = \"1s\"\n".into();
    let launch = Launch::new().env("EDGE_REPLICATOR_CLOCK_FILE", clock.to_str().unwrap());
    let agent = Agent::start_with(config, &launch);
    let clock_of = |agent: &Agent| agent.replications()["clock"].clone();

    let v = clock_of(&agent);
    assert_eq!(v["state"], "unsynchronised", "{v}");
    assert_eq!(v["holding"], false, "{v}");
    assert_eq!(v["linesStampedUnsynchronised"], 0, "{v}");
    let not_before = humantime::parse_rfc3339(v["notBefore"].as_str().unwrap()).unwrap();
    assert!(not_before <= std::time::SystemTime::now(), "{v}");

    // Two lines without a timestamp, one with: two counted.
    let own = now_ns() - 60_000_000_000;
    let (status, text) = agent.write_v2("b", format!("m v=1\nm v=2\nm v=3 {own}\n"), &Opts::new());
    assert_eq!(status, 204, "{text}");
    let (status, text) = agent.write_v2("b", "m v=4\n", &Opts::new());
    assert_eq!(status, 204, "{text}");
    assert_eq!(clock_of(&agent)["linesStampedUnsynchronised"], 3);
    let metrics = agent.metrics();
    assert!(
        metrics.contains("edge_replicator_lines_stamped_unsynchronised_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edge_replicator_clock_state{state=\"unsynchronised\"} 1")
            && metrics.contains("edge_replicator_clock_state{state=\"synchronised\"} 0"),
        "{metrics}"
    );
    let out = agent.cli(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("clock: unsynchronised (no time service has set it); 3 lines without a timestamp were stamped with it"),
        "{stdout}"
    );
    let log = agent.log();
    assert_eq!(
        log.matches("the system clock is unsynchronised").count(),
        1,
        "one warning, not one per write:\n{log}"
    );

    // The time service sets the clock.
    std::fs::write(&clock, "synchronised").unwrap();
    let (status, text) = agent.write_v2("b", "m v=5\n", &Opts::new());
    assert_eq!(status, 204, "{text}");
    let v = clock_of(&agent);
    assert_eq!(v["state"], "synchronised", "{v}");
    assert_eq!(v["linesStampedUnsynchronised"], 3, "{v}");
    assert!(agent.log().contains("the system clock is synchronised"));
    let out = agent.cli(&["status"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("clock:"),
        "a synchronised clock needs no line"
    );
    // Every line arrives, counted or not.
    agent.wait_drained("r1");
    assert_eq!(sink.lines_accepted().len(), 5);
}

/// A query the agent does not serve is answered after its body is read, so
/// the client's connection stays open for its next request: the official
/// clients pool connections, and one closing under them fails their next
/// call. The body comes in two parts, the second a moment later, and a ping
/// follows on the same connection.
#[test]
fn a_refused_query_leaves_the_connection_usable() {
    use std::io::{BufRead, BufReader, Read, Write};
    let (_sink, agent) = agent_with(&[], "b");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let query = "from(bucket: \"b\") |> range(start: -1h)";
    let head = format!(
        "POST /api/v2/query?org=test-org HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/vnd.flux\r\nContent-Length: {}\r\n\r\n",
        query.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(&query.as_bytes()[..10]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    conn.write_all(&query.as_bytes()[10..]).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let read_answer = |reader: &mut BufReader<std::net::TcpStream>| -> (String, Vec<String>) {
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            headers.push(h.trim().to_ascii_lowercase());
        }
        let len: usize = headers
            .iter()
            .find_map(|h| {
                h.strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).unwrap();
        (status, headers)
    };
    let (status, headers) = read_answer(&mut reader);
    assert!(status.starts_with("HTTP/1.1 501"), "{status}");
    assert!(
        !headers.iter().any(|h| h == "connection: close"),
        "{headers:?}"
    );
    conn.write_all(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, _) = read_answer(&mut reader);
    assert!(
        status.starts_with("HTTP/1.1 204"),
        "the same connection answers: {status:?}"
    );
}
