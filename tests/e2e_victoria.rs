//! End to end against a real VictoriaMetrics (InfluxDB v2 write API remote):
//! writers → agent → queue → gzip batches → VictoriaMetrics, counted back
//! exactly. Remote outages, agent crashes (SIGKILL) and clean restarts
//! (SIGTERM) must lose no acknowledged line, and the status counters must
//! conserve lines at every reading.

mod util;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

/// A VictoriaMetrics and an agent with one replication `r1` from local
/// bucket `sensors` to it; `tweak` adjusts the config first.
fn setup(tweak: impl FnOnce(&mut AgentConfig)) -> Option<(VictoriaMetrics, Agent)> {
    let vm = VictoriaMetrics::start()?;
    let mut config =
        AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "sensors", Some("edge"));
    tweak(&mut config);
    let agent = Agent::start(config);
    Some((vm, agent))
}

fn keys_of(body: &str) -> HashSet<Key> {
    line_keys(body).into_iter().collect()
}

/// Waits until r1 is in backoff with an error recorded (remote down).
fn wait_backoff(agent: &Agent) -> Value {
    let mut last = Value::Null;
    wait_until(
        DEADLINE,
        "r1 state \"backoff\" with latestErrorMessage set",
        || {
            last = agent.replication("r1");
            str_field(&last, "state") == "backoff"
                && !str_field(&last, "latestErrorMessage").is_empty()
        },
    );
    last
}

fn queued_bytes_metric(agent: &Agent) -> f64 {
    let text = agent.metrics();
    metric_value(
        &text,
        "replications_queue_current_bytes_queued",
        "replication=\"r1\"",
    )
    .unwrap_or_else(|| panic!("no replications_queue_current_bytes_queued for r1 in:\n{text}"))
}

/// (a) 40,000 lines from 8 concurrent writers, with every body shape
/// (plain/gzip × Content-Length/chunked), all arrive, exactly once.
#[test]
fn concurrent_writers_all_arrive() {
    let Some((vm, agent)) = setup(|_| {}) else {
        return;
    };
    const WRITERS: usize = 8;
    const REQUESTS: usize = 10;
    const LINES: usize = 500;
    let base = ts_ago(Duration::from_secs(3600));
    let expected = Mutex::new(HashSet::new());
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (agent, expected) = (&agent, &expected);
            s.spawn(move || {
                for j in 0..REQUESTS {
                    let start = base + ((w * REQUESTS + j) as i64) * 100_000_000;
                    let body = lines("cw", 8, LINES, start);
                    let opts = Opts::shape(w + j);
                    let (status, text) = agent.write_v2("sensors", &body, &opts);
                    assert_eq!(status, 204, "writer {w} request {j} ({opts:?}): {text}");
                    expected.lock().unwrap().extend(line_keys(&body));
                }
            });
        }
    });
    let expected = expected.into_inner().unwrap();
    let total = (WRITERS * REQUESTS * LINES) as u64;
    assert_eq!(
        expected.len() as u64,
        total,
        "generator keys must be unique"
    );

    wait_eq(
        DEADLINE,
        "samples of cw_value at VictoriaMetrics",
        total,
        || vm.count("cw_value"),
    );
    assert!(
        vm.keys("cw_value") == expected,
        "the points that arrived are not the ones written"
    );

    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), total, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), total, "{rep:#}");
    assert_eq!(rep["localBucket"], "sensors");
    assert_eq!(rep["remoteBucket"], "edge");
    assert_eq!(rep["remote"], "vm");
}

/// (b) Remote down: writes are still acknowledged and queued, the status
/// says why nothing moves; remote back: everything is delivered.
#[test]
fn remote_down_queues_then_delivers() {
    let Some((mut vm, agent)) = setup(|_| {}) else {
        return;
    };
    let base = ts_ago(Duration::from_secs(3600));
    let first = lines("rd", 10, 1_000, base);
    assert_eq!(agent.write_v2("sensors", &first, &Opts::new()).0, 204);
    wait_eq(DEADLINE, "samples of rd_value", 1_000, || {
        vm.count("rd_value")
    });
    wait_eq(DEADLINE, "r1 deliveredLines", 1_000, || {
        field(&agent.replication("r1"), "deliveredLines")
    });

    vm.stop();
    let mut all = keys_of(&first);
    for j in 0..4 {
        let body = lines("rd", 10, 1_000, base + (j + 1) * 1_000_000_000);
        let (status, text) = agent.write_v2("sensors", &body, &Opts::shape(j as usize));
        assert_eq!(status, 204, "write {j} with the remote down: {text}");
        all.extend(line_keys(&body));
    }

    let rep = wait_backoff(&agent);
    assert_eq!(field(&rep, "remainingLines"), 4_000, "{rep:#}");
    assert_eq!(field(&rep, "acceptedLines"), 5_000, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 1_000, "{rep:#}");
    assert!(field(&rep, "currentQueueSizeBytes") > 0, "{rep:#}");
    assert_conserved(&rep);
    assert!(
        queued_bytes_metric(&agent) > 0.0,
        "queued bytes metric is 0 with a backlog"
    );

    vm.restart();
    wait_eq(
        DEADLINE,
        "samples of rd_value after the remote came back",
        5_000,
        || vm.count("rd_value"),
    );
    assert!(vm.keys("rd_value") == all);
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 5_000, "{rep:#}");
    wait_until(DEADLINE, "r1 state \"running\"", || {
        str_field(&agent.replication("r1"), "state") == "running"
    });
    assert_eq!(queued_bytes_metric(&agent), 0.0);
}

/// (c) SIGKILL while holding a backlog, with writes in flight: every line
/// that was acknowledged arrives after the agent and the remote restart.
#[test]
fn sigkill_with_backlog_loses_no_acknowledged_line() {
    let Some((mut vm, mut agent)) = setup(|_| {}) else {
        return;
    };
    vm.stop();
    let base = ts_ago(Duration::from_secs(3600));
    let mut acked = HashSet::new();
    let mut sent = 0u64;
    for j in 0..10i64 {
        let body = lines("ck", 8, 400, base + j * 1_000_000_000);
        let (status, text) = agent.write_v2("sensors", &body, &Opts::shape(j as usize));
        assert_eq!(status, 204, "{text}");
        acked.extend(line_keys(&body));
        sent += 400;
    }

    // A writer keeps going while the agent is killed under it.
    let stop = AtomicBool::new(false);
    let in_flight_acked = Mutex::new((HashSet::new(), 0u64, 0u64)); // keys, acks, sent
    std::thread::scope(|s| {
        s.spawn(|| {
            // 100 lines over 8 series span 13 ms; requests are 100 ms apart.
            for j in 0..5_000i64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = lines("ck", 8, 100, base + 100_000_000_000 + j * 100_000_000);
                in_flight_acked.lock().unwrap().2 += 100;
                match agent.try_write_v2("sensors", body.as_bytes(), &Opts::shape(j as usize)) {
                    Ok(r) if r.status == 204 => {
                        let mut g = in_flight_acked.lock().unwrap();
                        g.0.extend(line_keys(&body));
                        g.1 += 1;
                    }
                    Ok(r) => panic!("write answered {} before the kill: {}", r.status, r.body),
                    Err(_) => break, // the agent is gone
                }
            }
        });
        wait_until(
            DEADLINE,
            "20 acknowledged writes during the run-up to the kill",
            || in_flight_acked.lock().unwrap().1 >= 20,
        );
        kill_pid(agent.pid(), "KILL");
        stop.store(true, Ordering::Relaxed);
    });
    agent.kill9(); // reaps the process killed above
    let (more, _, more_sent) = in_flight_acked.into_inner().unwrap();
    acked.extend(more);
    sent += more_sent;

    agent.restart();
    let rep = agent.replication("r1");
    assert_conserved(&rep);
    assert!(
        field(&rep, "remainingLines") >= acked.len() as u64,
        "{} lines were acknowledged but only {} are queued after SIGKILL: {rep:#}",
        acked.len(),
        field(&rep, "remainingLines")
    );
    assert_eq!(field(&rep, "deliveredLines"), 0, "{rep:#}");

    vm.restart();
    let rep = agent.wait_drained("r1");
    let delivered = field(&rep, "deliveredLines");
    wait_eq(
        DEADLINE,
        "samples of ck_value == deliveredLines",
        delivered,
        || vm.count("ck_value"),
    );
    let arrived = vm.keys("ck_value");
    let lost: Vec<&Key> = acked.difference(&arrived).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged lines never arrived, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        arrived.len() as u64 <= sent,
        "more points arrived than were ever sent"
    );
}

/// (d) SIGTERM with a backlog exits 0; the restarted agent reports the same
/// counters and then delivers the backlog.
#[test]
fn sigterm_exits_zero_and_restart_resumes_counters() {
    let Some((mut vm, mut agent)) = setup(|_| {}) else {
        return;
    };
    let base = ts_ago(Duration::from_secs(3600));
    let body = lines("st", 5, 2_000, base);
    assert_eq!(
        agent.write_v2("sensors", &body, &Opts::new().gzip(true)).0,
        204
    );
    wait_eq(DEADLINE, "r1 deliveredLines", 2_000, || {
        field(&agent.replication("r1"), "deliveredLines")
    });
    vm.stop();
    let body = lines("st", 5, 1_000, base + 10_000_000_000);
    assert_eq!(agent.write_v2("sensors", &body, &Opts::new()).0, 204);
    let before = wait_backoff(&agent);

    let status = agent.sigterm_and_wait();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");

    agent.restart();
    let after = agent.replication("r1");
    for key in COUNTERS.iter().chain(&[
        "acceptedLines",
        "currentQueueSizeBytes",
        "maxQueueSizeBytes",
    ]) {
        assert_eq!(
            after[key], before[key],
            "{key} changed across SIGTERM + restart:\nbefore {before:#}\nafter {after:#}"
        );
    }
    assert_eq!(field(&after, "remainingLines"), 1_000);

    vm.restart();
    wait_eq(DEADLINE, "samples of st_value", 3_000, || {
        vm.count("st_value")
    });
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 3_000, "{rep:#}");
    assert_eq!(field(&rep, "acceptedLines"), 3_000, "{rep:#}");
}

/// The numbers that appear in `text` as whole words.
fn numbers_in(text: &str) -> HashSet<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// (e) A body with 2 bad lines among 10: 400 naming them, the 8 good lines
/// are kept and arrive.
#[test]
fn bad_lines_are_named_and_good_lines_kept() {
    let Some((vm, agent)) = setup(|_| {}) else {
        return;
    };
    let good = lines("bl", 8, 8, ts_ago(Duration::from_secs(600)));
    let mut body: Vec<String> = good.lines().map(String::from).collect();
    let ts = now_ns();
    // Line 3: a field without a value; line 7: a float that is not one.
    body.insert(2, format!("bl,sensor=bad1 value= {ts}"));
    body.insert(6, format!("bl,sensor=bad2 value=12abc {ts}"));
    let body = body.join("\n") + "\n";

    let reply = agent.write_v2_reply("sensors", body.as_bytes(), &Opts::new());
    assert_eq!(
        reply.status, 400,
        "body with bad lines 3 and 7: {}",
        reply.body
    );
    let json = reply.json();
    assert_eq!(json["code"], "invalid", "{json}");
    let message = json["message"].as_str().unwrap_or_default();
    let numbers = numbers_in(message);
    assert!(
        numbers.contains(&3) && numbers.contains(&7),
        "the message should name lines 3 and 7: {message:?}"
    );

    wait_eq(
        DEADLINE,
        "samples of bl_value (the 8 good lines)",
        8,
        || vm.count("bl_value"),
    );
    assert!(vm.keys("bl_value") == keys_of(&good));
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), 8, "{rep:#}");
}

/// (e) A bucket no replication takes is 404, over v2 and v1; nothing queued.
#[test]
fn unknown_bucket_is_404() {
    let Some((_vm, agent)) = setup(|_| {}) else {
        return;
    };
    let body = lines("nb", 2, 4, ts_ago(Duration::from_secs(600)));
    let reply = agent.write_v2_reply("nope", body.as_bytes(), &Opts::new());
    assert_eq!(reply.status, 404, "{}", reply.body);
    // Answered before its body was read: the connection is not reusable,
    // and the answer says so.
    assert_eq!(reply.header("connection"), Some("close"));
    let json = reply.json();
    assert_eq!(json["code"], "not found", "{json}");
    assert!(
        json["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nope"),
        "the message should name the bucket: {json}"
    );
    let (status, text) = agent.write_v1("nope", None, &body, &Opts::new());
    assert_eq!(status, 404, "v1 db=nope: {text}");
    assert_eq!(field(&agent.replication("r1"), "acceptedLines"), 0);
}

/// (e) A gzip bomb (40 MiB of zeros, about 40 kB on the wire) against a
/// 1 MiB limit is 413 without taking the agent down; bodies under the limit
/// still go through.
#[test]
fn gzip_bomb_is_413_and_agent_stays_healthy() {
    let Some((vm, agent)) = setup(|c| c.max_body_size = "1MiB".into()) else {
        return;
    };
    let bomb = gzip(&vec![0u8; 40 << 20]);
    assert!(bomb.len() < 1 << 20, "the bomb must be small on the wire");
    for chunked in [false, true] {
        let mut req = ureq_post(&agent, "/api/v2/write?org=o&bucket=sensors");
        req = req.header("Content-Encoding", "gzip");
        let reply = if chunked {
            req.send(ureq::SendBody::from_owned_reader(std::io::Cursor::new(
                bomb.clone(),
            )))
        } else {
            req.send(&bomb[..])
        };
        let reply =
            reply.unwrap_or_else(|e| panic!("gzip bomb (chunked={chunked}): no answer: {e}"));
        assert_eq!(reply.status().as_u16(), 413, "gzip bomb, chunked={chunked}");
        assert_eq!(
            agent.get("/health").status,
            200,
            "agent unhealthy after a gzip bomb"
        );
    }

    // Just under the limit after decompression: accepted.
    let mut body = String::new();
    let mut n = 0;
    let start = ts_ago(Duration::from_secs(600));
    while body.len() < 900 << 10 {
        body.push_str(&lines("gb", 4, 100, start + n as i64 * 100_000_000));
        n += 1;
    }
    let lines_sent = n as u64 * 100;
    let (status, text) = agent.write_v2("sensors", &body, &Opts::new().gzip(true));
    assert_eq!(
        status,
        204,
        "a {} byte body under the 1 MiB limit: {text}",
        body.len()
    );
    wait_eq(DEADLINE, "samples of gb_value", lines_sent, || {
        vm.count("gb_value")
    });
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), lines_sent, "{rep:#}");
}

fn ureq_post(agent: &Agent, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
    http().post(format!("{}{path}", agent.url()))
}

/// (e) With `tokens = ["s3cret"]`: no or wrong token 401; `Token`, `Bearer`,
/// v1 `u`/`p` and Basic are accepted; `/health` stays open.
#[test]
fn tokens_are_checked() {
    let Some((vm, agent)) = setup(|c| c.tokens = vec!["s3cret".into()]) else {
        return;
    };
    let start = ts_ago(Duration::from_secs(600));
    let one = |i: i64| lines("au", 1, 1, start + i * 1_000_000);
    let refused = [
        (
            "v2 without a token",
            agent.write_v2("sensors", one(0), &Opts::new()),
        ),
        (
            "v2 with a wrong token",
            agent.write_v2("sensors", one(0), &Opts::new().token("nope")),
        ),
        (
            "v1 without credentials",
            agent.write_v1("sensors", None, one(0), &Opts::new()),
        ),
        (
            "v1 with a wrong password",
            agent.write_v1(
                "sensors",
                None,
                one(0),
                &Opts::new().query("u", "x").query("p", "nope"),
            ),
        ),
    ];
    for (what, (status, text)) in refused {
        assert_eq!(status, 401, "{what}: {text}");
    }
    let accepted = [
        (
            "Token",
            agent.write_v2("sensors", one(1), &Opts::new().token("s3cret")),
        ),
        (
            "Bearer",
            agent.write_v2(
                "sensors",
                one(2),
                &Opts::new().authorization("Bearer s3cret"),
            ),
        ),
        (
            "v1 u/p",
            agent.write_v1(
                "sensors",
                None,
                one(3),
                &Opts::new().query("u", "x").query("p", "s3cret"),
            ),
        ),
        (
            "v1 Basic",
            // base64("x:s3cret")
            agent.write_v1(
                "sensors",
                None,
                one(4),
                &Opts::new().authorization("Basic eDpzM2NyZXQ="),
            ),
        ),
    ];
    for (what, (status, text)) in accepted {
        assert_eq!(status, 204, "{what}: {text}");
    }
    let health = http()
        .get(format!("{}/health", agent.url()))
        .call()
        .expect("GET /health");
    assert_eq!(
        health.status().as_u16(),
        200,
        "/health must not need a token"
    );

    wait_eq(DEADLINE, "samples of au_value", 4, || vm.count("au_value"));
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), 4, "{rep:#}");
}

/// Every precision is normalised to ns; a line without timestamp gets the
/// receive time.
#[test]
fn precisions_are_normalised_and_missing_timestamps_stamped() {
    let Some((vm, agent)) = setup(|_| {}) else {
        return;
    };
    let t_s = ts_ago(Duration::from_secs(3600)) / 1_000_000_000;
    let t_ms = t_s * 1_000 + 1;
    let cases: [(&str, &str, i64, i64); 7] = [
        // (sensor, precision, timestamp as written, expected ms)
        ("v2s", "s", t_s, t_s * 1_000),
        ("v2ms", "ms", t_ms, t_ms),
        ("v2us", "us", t_ms * 1_000 + 999, t_ms),
        ("v2ns", "ns", t_ms * 1_000_000 + 999_999, t_ms),
        ("v1u", "u", t_ms * 1_000 + 1, t_ms),
        ("v1ms", "ms", t_ms + 5, t_ms + 5),
        ("v1h", "h", t_s / 3_600, t_s / 3_600 * 3_600_000),
    ];
    for (sensor, precision, ts, _) in cases {
        let body = format!("pr,sensor={sensor} value=1 {ts}\n");
        let opts = Opts::new().precision(precision);
        let (status, text) = if sensor.starts_with("v1") {
            agent.write_v1("sensors", None, &body, &opts)
        } else {
            agent.write_v2("sensors", &body, &opts)
        };
        assert_eq!(status, 204, "{sensor} precision={precision}: {text}");
    }
    let before_ms = now_ns() / 1_000_000;
    let (status, text) = agent.write_v2("sensors", "pr,sensor=nots value=1\n", &Opts::new());
    assert_eq!(status, 204, "line without timestamp: {text}");
    let after_ms = now_ns() / 1_000_000;

    wait_eq(
        DEADLINE,
        "samples of pr_value",
        cases.len() as u64 + 1,
        || vm.count("pr_value"),
    );
    let got: std::collections::HashMap<String, i64> = vm
        .samples("pr_value")
        .into_iter()
        .map(|(labels, ts, _)| (labels["sensor"].as_str().unwrap().to_string(), ts))
        .collect();
    for (sensor, precision, ts, want) in cases {
        assert_eq!(got[sensor], want, "{sensor}: {ts} at precision={precision}");
    }
    let stamped = got["nots"];
    assert!(
        (before_ms - 1..=after_ms + 1).contains(&stamped),
        "receive time {stamped} not within [{before_ms}, {after_ms}]"
    );
}

/// v1 `db` + `rp` routes to a `db/rp` bucket, falling back to `db`.
#[test]
fn v1_db_and_rp_route_to_buckets() {
    let Some((vm, agent)) = setup(|c| {
        let vm = c.remotes[0].name.clone();
        c.replications[0].local_bucket = "telegraf".into();
        c.replications
            .push(ReplicationConfig::new("r2", &vm, "metrics/weekly").remote_bucket("weekly"));
    }) else {
        return;
    };
    let start = ts_ago(Duration::from_secs(600));
    let writes = [
        (Some("autogen"), "telegraf", 10), // falls back to "telegraf"
        (None, "telegraf", 20),
        (Some("weekly"), "metrics", 30),
    ];
    for (i, (rp, db, n)) in writes.into_iter().enumerate() {
        let body = lines("v1r", 2, n, start + i as i64 * 1_000_000_000);
        let (status, text) = agent.write_v1(db, rp, &body, &Opts::new().precision("ns"));
        assert_eq!(status, 204, "db={db} rp={rp:?}: {text}");
    }
    let (status, text) = agent.write_v1("metrics", None, lines("v1r", 1, 1, start), &Opts::new());
    assert_eq!(status, 404, "db=metrics without rp has no bucket: {text}");

    wait_eq(DEADLINE, "samples of v1r_value", 60, || {
        vm.count("v1r_value")
    });
    assert_eq!(field(&agent.replication("r1"), "acceptedLines"), 30);
    assert_eq!(field(&agent.replication("r2"), "acceptedLines"), 30);
    assert_eq!(agent.replication("r2")["localBucket"], "metrics/weekly");
}

/// `local_bucket = "*"` takes every bucket.
#[test]
fn wildcard_replication_takes_every_bucket() {
    let Some((vm, agent)) = setup(|c| c.replications[0].local_bucket = "*".into()) else {
        return;
    };
    let start = ts_ago(Duration::from_secs(600));
    for (i, bucket) in ["a", "b", "telegraf/autogen"].into_iter().enumerate() {
        let body = lines("wc", 3, 9, start + i as i64 * 1_000_000_000);
        let (status, text) = agent.write_v2(bucket, &body, &Opts::new());
        assert_eq!(status, 204, "bucket {bucket}: {text}");
    }
    let (status, text) = agent.write_v1(
        "x",
        Some("y"),
        lines("wc", 3, 9, start + 9_000_000_000),
        &Opts::new(),
    );
    assert_eq!(status, 204, "v1 x/y: {text}");
    wait_eq(DEADLINE, "samples of wc_value", 36, || vm.count("wc_value"));
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), 36, "{rep:#}");
}

const FLOOD_WRITES: u64 = 80;
const FLOOD_LINES: u64 = 400;

/// Writes 80 bodies of 400 lines (about 4 MB in all: more than 256 KiB even
/// if the queue compresses 10:1) with the remote down; returns (reply, keys)
/// per request.
fn flood(agent: &Agent, measurement: &str) -> Vec<(Reply, Vec<Key>)> {
    let base = ts_ago(Duration::from_secs(3600));
    (0..FLOOD_WRITES as i64)
        .map(|j| {
            let body = lines(
                measurement,
                4,
                FLOOD_LINES as usize,
                base + j * 1_000_000_000,
            );
            let reply = agent.write_v2_reply("sensors", body.as_bytes(), &Opts::shape(j as usize));
            (reply, line_keys(&body))
        })
        .collect()
}

fn bounded_queue(when_full: &str) -> impl FnOnce(&mut AgentConfig) + '_ {
    move |c| {
        let r = &mut c.replications[0];
        r.max_queue_size = "256KiB".into();
        r.batch_size = "64kB".into();
        r.when_full = when_full.into();
    }
}

/// `when_full = "reject"`: a full queue answers 503 with Retry-After; what
/// was acknowledged is exactly what is queued and later delivered.
#[test]
fn when_full_reject_answers_503_with_retry_after() {
    let Some((mut vm, agent)) = setup(bounded_queue("reject")) else {
        return;
    };
    vm.stop();
    let replies = flood(&agent, "wr");
    let mut acked = HashSet::new();
    let mut rejected = 0;
    for (reply, keys) in &replies {
        match reply.status {
            204 => acked.extend(keys.iter().cloned()),
            503 => {
                rejected += 1;
                let retry = reply
                    .header("Retry-After")
                    .unwrap_or_else(|| panic!("503 without Retry-After: {:?}", reply.headers));
                assert!(
                    retry.trim().parse::<u64>().is_ok() || httpdate_like(retry),
                    "Retry-After {retry:?} is neither seconds nor an HTTP date"
                );
            }
            other => panic!("unexpected {other} while filling the queue: {}", reply.body),
        }
    }
    assert!(
        rejected > 0,
        "about 4 MB into a 256 KiB queue and nothing was rejected"
    );
    assert!(
        !acked.is_empty(),
        "nothing at all fitted into a 256 KiB queue"
    );

    let rep = agent.replication("r1");
    assert_conserved(&rep);
    assert_eq!(field(&rep, "maxQueueSizeBytes"), 256 * 1024, "{rep:#}");
    assert!(
        field(&rep, "currentQueueSizeBytes") <= 256 * 1024,
        "{rep:#}"
    );
    assert_eq!(field(&rep, "acceptedLines"), acked.len() as u64, "{rep:#}");
    assert_eq!(field(&rep, "remainingLines"), acked.len() as u64, "{rep:#}");
    assert_eq!(field(&rep, "droppedFullLines"), 0, "{rep:#}");

    vm.restart();
    wait_eq(DEADLINE, "samples of wr_value", acked.len() as u64, || {
        vm.count("wr_value")
    });
    assert!(vm.keys("wr_value") == acked);
    agent.wait_drained("r1");
}

fn httpdate_like(s: &str) -> bool {
    s.ends_with(" GMT") && s.len() >= 29
}

/// `when_full = "drop_oldest"`: writes keep succeeding, the oldest entries
/// are evicted and counted, the newest are delivered.
#[test]
fn when_full_drop_oldest_counts_and_keeps_the_newest() {
    let Some((mut vm, agent)) = setup(bounded_queue("drop_oldest")) else {
        return;
    };
    vm.stop();
    let replies = flood(&agent, "wd");
    for (j, (reply, _)) in replies.iter().enumerate() {
        assert_eq!(
            reply.status, 204,
            "write {j} with drop_oldest: {}",
            reply.body
        );
    }
    let rep = agent.replication("r1");
    assert_conserved(&rep);
    assert_eq!(
        field(&rep, "acceptedLines"),
        FLOOD_WRITES * FLOOD_LINES,
        "{rep:#}"
    );
    assert!(field(&rep, "droppedFullLines") > 0, "{rep:#}");
    assert!(
        field(&rep, "currentQueueSizeBytes") <= 256 * 1024,
        "{rep:#}"
    );
    let dropped_metric_seen = agent.metrics().contains("r1");
    assert!(
        dropped_metric_seen,
        "/metrics does not mention replication r1"
    );

    vm.restart();
    let rep = agent.wait_drained("r1");
    let delivered = field(&rep, "deliveredLines");
    assert_eq!(
        delivered + field(&rep, "droppedFullLines"),
        FLOOD_WRITES * FLOOD_LINES,
        "{rep:#}"
    );
    // Everything was sent once the queue is drained; wait for it to show.
    wait_until(DEADLINE, "samples of wd_value >= deliveredLines", || {
        vm.count("wd_value") >= delivered
    });
    let arrived = vm.keys("wd_value");
    let per_write: Vec<usize> = replies
        .iter()
        .map(|(_, keys)| keys.iter().filter(|k| arrived.contains(k)).count())
        .collect();
    let newest: HashSet<Key> = replies.last().unwrap().1.iter().cloned().collect();
    assert!(
        newest.is_subset(&arrived),
        "the newest write was evicted instead of the oldest; lines arrived per write: {per_write:?}"
    );
    let oldest: HashSet<Key> = replies[0].1.iter().cloned().collect();
    assert!(
        oldest.is_disjoint(&arrived),
        "lines of the oldest write arrived although they were counted in droppedFullLines \
         (delivered {delivered}, arrived {}); lines arrived per write: {per_write:?}",
        arrived.len()
    );
    assert_eq!(
        arrived.len() as u64,
        delivered,
        "points at the remote != deliveredLines; lines arrived per write: {per_write:?}"
    );
}

/// The conservation invariant holds at every reading while data flows.
#[test]
fn status_conserves_lines_while_flowing() {
    let Some((_vm, agent)) = setup(|_| {}) else {
        return;
    };
    let base = ts_ago(Duration::from_secs(3600));
    let done = AtomicBool::new(false);
    let readings = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let deadline = Instant::now() + DEADLINE;
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                assert_conserved(&agent.replication("r1"));
                readings.fetch_add(1, Ordering::Relaxed);
            }
        });
        for j in 0..30i64 {
            let body = lines("cf", 6, 300, base + j * 1_000_000_000);
            assert_eq!(
                agent.write_v2("sensors", &body, &Opts::shape(j as usize)).0,
                204
            );
        }
        agent.wait_drained("r1");
        done.store(true, Ordering::Relaxed);
    });
    assert!(readings.into_inner() > 0);
}

/// Regression: a path that merely ends like a dead-letter endpoint once
/// reached a slice past its start; it must be a plain 404 (or 401), and the
/// agent must keep answering.
#[test]
fn short_dead_letter_paths_are_404_and_the_agent_stays_up() {
    let Some((_vm, agent)) = setup(|_| {}) else {
        return;
    };
    for path in [
        "/dead-letter/replay",
        "/x/dead-letter/replay",
        "/api/v2/replications//dead-letter",
    ] {
        let reply = http()
            .post(&format!("{}{path}", agent.url()))
            .send_empty()
            .expect("the agent answers");
        assert!(
            matches!(reply.status().as_u16(), 404 | 405),
            "{path}: {}",
            reply.status()
        );
    }
    assert_eq!(
        http()
            .get(&format!("{}/health", agent.url()))
            .call()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}
