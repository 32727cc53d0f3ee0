//! Delivery semantics on intermittent links: every row of the "Shipping"
//! table of DESIGN.md, proved against a fault-injecting remote
//! (`tests/fault`) and, for restarts, a real VictoriaMetrics.
//!
//! Each test builds its own remote(s) and agent on free loopback ports, waits
//! on conditions with deadlines (never sleeps as an assertion) and asserts
//! only lower bounds on timing: "the agent waited at least what the remote
//! asked", never "it was fast". The fault remote prints its request log when
//! a test fails, the harness the agent's log.
//!
//! The randomized schedule takes its seed from `DELIVERY_SEED` (default
//! fixed); the seed is printed when the test fails.

mod fault;
mod util;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fault::{Action, FaultServer, Request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use util::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A v2 remote at `url` with the short timings these tests use.
fn remote_at(name: &str, url: &str) -> RemoteConfig {
    RemoteConfig {
        min_backoff: "50ms".into(),
        max_backoff: "500ms".into(),
        timeout: "2s".into(),
        connect_timeout: "500ms".into(),
        ..RemoteConfig::v2(name, url)
    }
}

fn remote(name: &str, server: &FaultServer) -> RemoteConfig {
    remote_at(name, &server.url())
}

/// One remote and replication `r1` from local bucket `b` to remote bucket `b`.
fn single(remote: RemoteConfig, tweak: impl FnOnce(&mut ReplicationConfig)) -> AgentConfig {
    let mut config = AgentConfig::single(remote, "b", None);
    tweak(&mut config.replications[0]);
    config
}

/// The status of `name`, checked for conservation (every reading must add up).
fn status(agent: &Agent, name: &str) -> Value {
    let rep = agent.replication(name);
    assert_conserved(&rep);
    rep
}

/// Waits until `name` reports `state` (and returns that status).
fn wait_state(agent: &Agent, name: &str, state: &str, timeout: Duration) -> Value {
    let mut rep = Value::Null;
    wait_until(timeout, &format!("{name} state {state:?}"), || {
        rep = status(agent, name);
        str_field(&rep, "state") == state
    });
    rep
}

/// The non-empty lines of a body, as owned strings.
fn split(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

fn join(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// Asserts that the remote committed exactly `expected` (as a set), naming a
/// few of the missing and unexpected lines when not.
fn assert_accepted_exactly(server: &FaultServer, expected: &HashSet<String>) {
    let got = server.accepted();
    if &got == expected {
        return;
    }
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(expected).take(5).collect();
    panic!(
        "remote has {} distinct lines, expected {}; {} missing (e.g. {missing:?}); {} unexpected (e.g. {extra:?})",
        got.len(),
        expected.len(),
        expected.difference(&got).count(),
        got.difference(expected).count(),
    );
}

/// A line the agent accepts but the fault remote's `refuse_poison` rule refuses.
fn poison(tag: &str, ts: i64) -> String {
    format!("poison,kind={tag} value=1 {ts}")
}

/// InfluxDB's answer to a batch holding a line it will never take.
fn refuse_poison(req: &Request) -> Action {
    match req.lines().find(|l| l.starts_with("poison")) {
        Some(bad) => Action::influx_error(
            400,
            &format!("unable to parse '{bad}': poison pill refused by the fault remote"),
        ),
        None => Action::ok(),
    }
}

/// Sets its flag when dropped, so helper threads in a `thread::scope` stop
/// even when the scope's body panics (otherwise the test would hang).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Prints the seed of a randomized test if it fails.
struct SeedReport(u64);

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\n*** randomized fault schedule failed with seed {0}; replay with DELIVERY_SEED={0} ***\n",
                self.0
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The fault remote itself
// ---------------------------------------------------------------------------

/// The fault remote does what the other tests rely on: decodes gzip and
/// chunked bodies, keeps connections alive, commits only on 2xx, and its
/// faults really are faults to an HTTP client. A failure here means
/// `tests/fault` is broken, not the agent.
#[test]
fn fault_remote_self_check() {
    let server = FaultServer::start();
    let client = http();
    let url = format!("{}/api/v2/write", server.url());
    let params = [("org", "o"), ("bucket", "b")];
    for i in 0..4 {
        let body = format!("m,i={i} v=1 1\nm,i={i} v=2 2\n");
        let r = post_write(&client, &url, &params, body.as_bytes(), &Opts::shape(i));
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let reqs = server.requests();
    assert_eq!(reqs.len(), 4);
    assert!(reqs
        .iter()
        .all(|r| r.line_count() == 2 && r.decode_error.is_none()));
    assert_eq!(reqs[3].header("content-encoding"), Some("gzip"));
    assert_eq!(reqs[3].query("bucket").as_deref(), Some("b"));
    assert_eq!(
        reqs.iter().map(|r| r.conn).collect::<HashSet<_>>().len(),
        1,
        "keep-alive"
    );
    assert_eq!(server.accepted_len(), 8);

    server.script([
        Action::influx_error(400, "nope"),
        Action::RetryAfterSecs(429, 7),
        Action::Reset,
        Action::Truncated,
        Action::stall(Duration::from_millis(200), Action::status(503)),
    ]);
    let r = post_write(&client, &url, &params, b"x v=1 1\n", &Opts::new());
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (400, Some("nope"))
    );
    let r = post_write(&client, &url, &params, b"x v=1 1\n", &Opts::new());
    assert_eq!((r.status, r.header("retry-after")), (429, Some("7")));
    assert!(
        try_post_write(&client, &url, &params, b"x v=1 1\n", &Opts::new()).is_err(),
        "reset"
    );
    assert!(
        try_post_write(&client, &url, &params, b"x v=1 1\n", &Opts::new()).is_err(),
        "truncated"
    );
    let r = post_write(&client, &url, &params, b"x v=1 1\n", &Opts::new());
    assert_eq!(r.status, 503);
    assert!(!server.has_accepted("x v=1 1"), "only 2xx commits");

    // A client that gives up during a stall does not get its lines committed.
    server.script([Action::stall(Duration::from_secs(2), Action::ok())]);
    let stalled = server.request_count();
    let impatient = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(300)))
        .build()
        .new_agent();
    assert!(try_post_write(&impatient, &url, &params, b"late v=1 1\n", &Opts::new()).is_err());
    wait_until(
        Duration::from_secs(10),
        "the stalled request to end",
        || {
            server
                .request(stalled)
                .is_some_and(|r| r.answered.get().is_some())
        },
    );
    assert!(!server.has_accepted("late v=1 1"));
    // A slow body outlasts a short client timeout.
    server.script([Action::SlowBody(500, 20, Duration::from_millis(100))]);
    // (Read whole, the 500 bytes would arrive after 2 s and the post succeed.)
    let r = try_post_write(&impatient, &url, &params, b"y v=1 1\n", &Opts::new());
    assert!(
        r.is_err() || r.as_ref().unwrap().body.starts_with("(error"),
        "{r:?}"
    );
}

// ---------------------------------------------------------------------------
// 400/422: bisect to the refused lines
// ---------------------------------------------------------------------------

/// (a) One poison line among 5,000: exactly that line is dead-lettered, every
/// other line reaches the remote, and the remote's message is logged.
#[test]
fn poison_line_among_thousands_is_dead_lettered_alone() {
    let server = FaultServer::with_rule(refuse_poison);
    let agent = Agent::start(single(remote("cloud", &server), |r| {
        r.batch_size = "100kB".into();
    }));
    let base = ts_ago(Duration::from_secs(3600));
    let mut all = split(&lines("pa", 7, 5_000, base));
    let bad = poison("a", base + 7);
    all.insert(2_777, bad.clone());
    let (code, text) = agent.write_v2("b", join(&all), &Opts::new());
    assert_eq!(code, 204, "{text}");

    let rep = agent.wait_drained("r1");
    let good: HashSet<String> = all.iter().filter(|l| **l != bad).cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert!(!server.has_accepted(&bad));
    assert_eq!(field(&rep, "acceptedLines"), 5_001, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 5_000, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 1, "{rep:#}");
    assert_eq!(field(&rep, "droppedNonRetryableLines"), 0, "{rep:#}");
    assert!(
        agent
            .log()
            .contains("poison pill refused by the fault remote"),
        "the remote's message should be logged"
    );
    // The stream is not stuck behind the poison: later data flows.
    let more = split(&lines("pa2", 3, 50, base + 10_000_000_000));
    assert_eq!(agent.write_v2("b", join(&more), &Opts::new()).0, 204);
    wait_until(DEADLINE, "the 50 later lines at the remote", || {
        more.iter().all(|l| server.has_accepted(l))
    });
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 5_050, "{rep:#}");
}

/// (b) The same with `drop_non_retryable_data = true`: the poison line is
/// dropped and counted, nothing dead-lettered.
#[test]
fn poison_line_is_dropped_and_counted_when_configured() {
    let server = FaultServer::with_rule(refuse_poison);
    let agent = Agent::start(single(remote("cloud", &server), |r| {
        r.batch_size = "100kB".into();
        r.extra = "drop_non_retryable_data = true\n".into();
    }));
    let base = ts_ago(Duration::from_secs(3600));
    let mut all = split(&lines("pb", 7, 5_000, base));
    let bad = poison("b", base + 7);
    all.insert(1_234, bad.clone());
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    let rep = agent.wait_drained("r1");
    let good: HashSet<String> = all.iter().filter(|l| **l != bad).cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 5_000, "{rep:#}");
    assert_eq!(field(&rep, "droppedNonRetryableLines"), 1, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 0, "{rep:#}");
}

/// 422 (e.g. beyond retention) is treated like 400: only the refused lines
/// are set aside, several of them spread over several batches.
#[test]
fn unprocessable_lines_are_isolated_across_batches() {
    let server =
        FaultServer::with_rule(|req| match req.lines().find(|l| l.starts_with("poison")) {
            Some(_) => Action::influx_error(
                422,
                "failure writing points: points beyond retention policy",
            ),
            None => Action::ok(),
        });
    let agent = Agent::start(single(remote("cloud", &server), |r| {
        r.batch_size = "8kB".into();
    }));
    let base = ts_ago(Duration::from_secs(3600));
    let mut all = split(&lines("pu", 5, 1_000, base));
    let bad: Vec<String> = (0..6).map(|i| poison(&format!("u{i}"), base + i)).collect();
    for (i, b) in bad.iter().enumerate() {
        all.insert(i * 170 + 3, b.clone());
    }
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    let rep = agent.wait_drained("r1");
    let good: HashSet<String> = all.iter().filter(|l| !bad.contains(l)).cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 1_000, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 6, "{rep:#}");
}

// ---------------------------------------------------------------------------
// What each InfluxDB answers: transient 400s, partial writes, named lines
// ---------------------------------------------------------------------------

/// `n` lines of equal length (bisection halves fall exactly between them),
/// all good; `bad` makes one of them refused by the dialect rules below.
fn even_lines(tag: &str, n: usize, base: i64) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{tag},s={i:06} v=1,note=\"{}\" {}",
                "n".repeat(60),
                base + i as i64
            )
        })
        .collect()
}

/// The same line, refused by [`is_bad`] (and of the same length).
fn bad(line: &str) -> String {
    line.replacen(" v=1,", " v=0,", 1)
}

fn is_bad(line: &str) -> bool {
    line.contains(" v=0,")
}

/// Writes `all` as one batch and waits until it has left the queue.
fn write_and_drain(agent: &Agent, all: &[String]) -> Value {
    let (code, text) = agent.write_v2("b", join(all), &Opts::new());
    assert_eq!(code, 204, "{text}");
    agent.wait_drained("r1")
}

/// Requests made since `from`, as (lines, refused lines) each.
fn sent_since(server: &FaultServer, from: usize) -> Vec<(usize, usize)> {
    server.requests()[from..]
        .iter()
        .map(|r| (r.line_count(), r.lines().filter(|l| is_bad(l)).count()))
        .collect()
}

/// InfluxDB 3 Core answers `400 wal buffer full` while its write buffer is
/// full: that is about the server, so the batch waits (state `backoff`, the
/// message in status) and is delivered whole once the remote recovers;
/// nothing is bisected, dropped or dead-lettered, even with
/// `drop_non_retryable_data = true`.
#[test]
fn wal_buffer_full_400_is_waited_out_not_set_aside() {
    let full = Arc::new(AtomicBool::new(true));
    let f = full.clone();
    let server = FaultServer::with_rule(move |_| {
        if f.load(Ordering::SeqCst) {
            fault::dialect::wal_full()
        } else {
            Action::ok()
        }
    });
    let agent = Agent::start(single(remote("core", &server), |r| {
        r.extra = "drop_non_retryable_data = true\n".into();
    }));
    let all = even_lines("wf", 2_000, ts_ago(Duration::from_secs(3600)));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    let rep = wait_state(&agent, "r1", "backoff", DEADLINE);
    assert!(
        str_field(&rep, "latestErrorMessage").contains("wal buffer full"),
        "{rep:#}"
    );
    wait_requests(&server, 3, DEADLINE);
    full.store(false, Ordering::SeqCst);
    let rep = agent.wait_drained("r1");
    assert_accepted_exactly(&server, &all.iter().cloned().collect());
    assert_eq!(field(&rep, "deliveredLines"), 2_000, "{rep:#}");
    assert_eq!(field(&rep, "droppedNonRetryableLines"), 0, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 0, "{rep:#}");
    // Every request carried the whole batch: none was cut in pieces.
    for (lines, _) in sent_since(&server, 0) {
        assert_eq!(lines, 2_000, "{}", server.summary(10));
    }
}

/// A remote whose 400 says nothing about lines and is the same for every
/// piece refuses because of itself: the agent tries a few pieces, finds
/// nothing accepted and nothing different said, and waits instead of
/// setting every line aside.
#[test]
fn the_same_refusal_for_every_piece_is_a_backoff() {
    // Two rounds of refusals, then the remote is well again.
    let server = FaultServer::with_rule(|req| {
        if req.seq < 24 {
            Action::influx_error(400, "write rejected by the fault remote's proxy")
        } else {
            Action::ok()
        }
    });
    let agent = Agent::start(single(remote("proxy", &server), |r| {
        r.extra = "drop_non_retryable_data = true\n".into();
    }));
    let all = even_lines("sr", 1_024, ts_ago(Duration::from_secs(3600)));
    let rep = write_and_drain(&agent, &all);
    assert_accepted_exactly(&server, &all.iter().cloned().collect());
    assert_eq!(field(&rep, "deliveredLines"), 1_024, "{rep:#}");
    assert_eq!(field(&rep, "droppedNonRetryableLines"), 0, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 0, "{rep:#}");
    // Each round: the batch halved down to its first line (11 requests for
    // 1,024 lines), then the second line alone, then the wait.
    let round = [1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 1];
    let expected: Vec<usize> = round.iter().chain(&round).chain(&[1024]).copied().collect();
    let sizes: Vec<usize> = sent_since(&server, 0).iter().map(|(n, _)| *n).collect();
    assert_eq!(sizes, expected, "{}", server.summary(30));
    assert!(
        agent
            .log()
            .contains("fault remote's proxy (1024 lines waiting in this batch); retrying"),
        "the wait and the remote's words are logged"
    );
}

/// OSS 2.x answers 422 `partial write: ... dropped=N` having written the
/// rest: the agent bisects only until N refused lines are found and sends
/// nothing more of that batch. With the refused line first among 4,096, that
/// is one request per halving (13), where a full bisection took 25. A batch
/// refused whole (`dropped=` all its lines) costs one request.
#[test]
fn oss_partial_write_stops_bisecting_once_the_count_is_found() {
    let server = FaultServer::with_rule(|req| fault::dialect::oss_partial(req, is_bad));
    let agent = Agent::start(single(remote("oss", &server), |r| {
        r.batch_size = "512KiB".into();
    }));
    let base = ts_ago(Duration::from_secs(3600));
    let mut all = even_lines("op", 4_096, base);
    all[0] = bad(&all[0]);
    let rep = write_and_drain(&agent, &all);
    let good: HashSet<String> = all[1..].iter().cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 4_095, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 1, "{rep:#}");
    let sent = sent_since(&server, 0);
    let sizes: Vec<usize> = sent.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        sizes,
        [4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1],
        "{}",
        server.summary(15)
    );

    // Every line of the next batch beyond retention: one request.
    let before = server.request_count();
    let old: Vec<String> = even_lines("oq", 50, base + 10_000)
        .iter()
        .map(|l| bad(l))
        .collect();
    let rep = write_and_drain(&agent, &old);
    assert_eq!(sent_since(&server, before), [(50, 50)]);
    assert_eq!(field(&rep, "deliveredLines"), 4_095, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 51, "{rep:#}");
    assert_accepted_exactly(&server, &good);
}

/// OSS 1.x counts only type conflicts in `dropped=N`, and answers a line it
/// cannot parse with `dropped=0`: finding that line must not use up the
/// count, or the conflicting line found after it would pass for written.
#[test]
fn oss_1x_parse_errors_do_not_use_up_the_conflict_count() {
    let unparseable = |l: &str| l.contains(" v=2,");
    let server = FaultServer::with_rule(move |req| fault::dialect::oss1(req, is_bad, unparseable));
    let agent = Agent::start(single(remote("oss1", &server), |_| {}));
    let mut all = even_lines("o1", 1_024, ts_ago(Duration::from_secs(3600)));
    all[0] = all[0].replacen(" v=1,", " v=2,", 1);
    all[1_023] = bad(&all[1_023]);
    let rep = write_and_drain(&agent, &all);
    let good: HashSet<String> = all[1..1_023].iter().cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 1_022, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 2, "{rep:#}");
}

/// Cloud Serverless answers 400 naming the refused lines (`error parsing
/// line N (1-based)`) having written the others, but its body reads the same
/// as a Dedicated or Clustered one that wrote nothing: the agent sets exactly
/// the named lines aside and sends the rest once more, without them. One
/// refused line in a batch of nearly 500 kB costs 2 requests, and so do three.
#[test]
fn serverless_named_lines_cost_two_requests() {
    let server = FaultServer::with_rule(|req| fault::dialect::serverless(req, is_bad, 0));
    let agent = Agent::start(single(remote("serverless", &server), |r| {
        r.batch_size = "512KiB".into();
    }));
    let base = ts_ago(Duration::from_secs(3600));
    let mut all = even_lines("sl", 4_700, base);
    all[2_777] = bad(&all[2_777]);
    let bytes: usize = all.iter().map(|l| l.len() + 1).sum();
    assert!(bytes > 480_000 && bytes < 512 * 1024, "{bytes}");
    let rep = write_and_drain(&agent, &all);
    assert_eq!(
        sent_since(&server, 0),
        [(4_700, 1), (4_699, 0)],
        "{}",
        server.summary(5)
    );
    let good: HashSet<String> = all.iter().filter(|l| !is_bad(l)).cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 4_699, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 1, "{rep:#}");
    assert_eq!(dead_letters(&agent).0, 1);

    let before = server.request_count();
    let mut more = even_lines("sm", 1_000, base + 100_000);
    for i in [0, 500, 999] {
        more[i] = bad(&more[i]);
    }
    let rep = write_and_drain(&agent, &more);
    assert_eq!(sent_since(&server, before), [(1_000, 3), (997, 0)]);
    assert_eq!(field(&rep, "deliveredLines"), 4_699 + 997, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 4, "{rep:#}");
}

/// InfluxDB 3 Core with partial writes lists every refused line and says
/// the write was partial: those lines are set aside and the rest counted
/// delivered without resending, in one request, whether the status is a
/// 400 or a 2xx carrying the details.
#[test]
fn core_partial_writes_cost_one_request() {
    let server = FaultServer::with_rule(|req| fault::dialect::core_partial(req, is_bad, 400));
    let agent = Agent::start(single(remote("core", &server), |r| {
        r.extra = "drop_non_retryable_data = true\n".into();
    }));
    let base = ts_ago(Duration::from_secs(3600));
    let mut all = even_lines("cp", 3_000, base);
    for i in [3, 1_500, 2_999] {
        all[i] = bad(&all[i]);
    }
    let rep = write_and_drain(&agent, &all);
    assert_eq!(
        sent_since(&server, 0),
        [(3_000, 3)],
        "{}",
        server.summary(5)
    );
    let mut good: HashSet<String> = all.iter().filter(|l| !is_bad(l)).cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 2_997, "{rep:#}");
    assert_eq!(field(&rep, "droppedNonRetryableLines"), 3, "{rep:#}");

    server.set_rule(|req| fault::dialect::core_partial(req, is_bad, 201));
    let before = server.request_count();
    let mut more = even_lines("cq", 500, base + 100_000);
    more[250] = bad(&more[250]);
    let rep = write_and_drain(&agent, &more);
    assert_eq!(sent_since(&server, before), [(500, 1)]);
    good.extend(more.iter().filter(|l| !is_bad(l)).cloned());
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 2_997 + 499, "{rep:#}");
    assert_eq!(field(&rep, "droppedNonRetryableLines"), 4, "{rep:#}");
}

/// InfluxDB 3 Core's v1 endpoint refuses the whole batch and names only its
/// first bad line (`data.line_number`, quoting it): the agent sets that line
/// aside and sends the rest again, until nothing is refused; nothing written
/// is lost and only the named lines are set aside.
#[test]
fn core_whole_batch_refusals_set_aside_the_named_line_and_resend() {
    let server = FaultServer::with_rule(|req| fault::dialect::core_v1(req, is_bad));
    let agent = Agent::start(single(remote("core-v1", &server), |_| {}));
    let mut all = even_lines("cv", 2_000, ts_ago(Duration::from_secs(3600)));
    all[10] = bad(&all[10]);
    all[1_990] = bad(&all[1_990]);
    let rep = write_and_drain(&agent, &all);
    assert_eq!(
        sent_since(&server, 0),
        [(2_000, 2), (1_999, 1), (1_998, 0)],
        "{}",
        server.summary(5)
    );
    let good: HashSet<String> = all.iter().filter(|l| !is_bad(l)).cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 1_998, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 2, "{rep:#}");
}

/// A 30 kB error body naming 90 lines is read (only a prefix of it is
/// logged): exactly those lines are set aside, in 2 requests.
#[test]
fn long_error_bodies_are_read_and_only_their_log_is_cut() {
    let server = FaultServer::with_rule(|req| fault::dialect::serverless(req, is_bad, 300));
    let agent = Agent::start(single(remote("serverless", &server), |_| {}));
    let mut all = even_lines("lb", 3_000, ts_ago(Duration::from_secs(3600)));
    for i in 0..90 {
        all[i * 31 + 5] = bad(&all[i * 31 + 5]);
    }
    let rep = write_and_drain(&agent, &all);
    let sent = sent_since(&server, 0);
    assert_eq!(sent, [(3_000, 90), (2_910, 0)], "{}", server.summary(5));
    let good: HashSet<String> = all.iter().filter(|l| !is_bad(l)).cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 2_910, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 90, "{rep:#}");
    let log = agent.log();
    assert!(
        log.contains("error parsing line 6 (1-based)"),
        "the remote's words are logged"
    );
    assert!(log.contains("more bytes)"), "the logged message is cut");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4 * 1024, "a log line of {longest} bytes");
}

// ---------------------------------------------------------------------------
// 413: split in halves
// ---------------------------------------------------------------------------

/// (c) A remote that refuses bodies over 8 KiB (measured decompressed; the
/// agent sends gzip) still gets every line; a single line longer than the
/// limit is dead-lettered.
#[test]
fn too_large_answers_split_batches_down_to_one_line() {
    const LIMIT: usize = 8 * 1024;
    let server = FaultServer::with_rule(|req| {
        if req.body_len() > LIMIT {
            Action::influx_error(413, "request body too large: limit is 8 KiB (fault remote)")
        } else {
            Action::ok()
        }
    });
    let agent = Agent::start(single(remote("cloud", &server), |_| {}));
    let base = ts_ago(Duration::from_secs(3600));
    let mut all = split(&lines("tl", 7, 3_000, base));
    let giant = format!(
        "tl_giant,sensor=g text=\"{}\" {}",
        "x".repeat(12_000),
        base + 1
    );
    assert!(giant.len() > LIMIT);
    all.insert(1_500, giant.clone());
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    let rep = agent.wait_drained("r1");
    let good: HashSet<String> = all.iter().filter(|l| **l != giant).cloned().collect();
    assert_accepted_exactly(&server, &good);
    assert_eq!(field(&rep, "deliveredLines"), 3_000, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 1, "{rep:#}");
    assert_eq!(field(&rep, "droppedNonRetryableLines"), 0, "{rep:#}");
    for req in server.requests() {
        assert!(
            req.decode_error.is_none(),
            "request #{} body: {:?}",
            req.seq,
            req.decode_error
        );
        assert_eq!(
            req.header("content-encoding"),
            Some("gzip"),
            "request #{}",
            req.seq
        );
    }
}

// ---------------------------------------------------------------------------
// 401/403/404: pause, keep the data, reload resumes
// ---------------------------------------------------------------------------

/// (d) A wrong token pauses the stream without losing anything and retries
/// only slowly; rewriting the config with the right token and SIGHUP resumes
/// it at once (well before `max_backoff` = 60 s) and delivers everything.
#[test]
fn unauthorized_pauses_and_reload_with_right_token_resumes_at_once() {
    let server = FaultServer::with_rule(|req| {
        if req.has_token("right-token") {
            Action::ok()
        } else {
            Action::influx_error(
                401,
                "unauthorized access: token is not valid (fault remote)",
            )
        }
    });
    let mut r = remote("cloud", &server);
    r.token = Some("wrong-token".into());
    r.max_backoff = "60s".into();
    let mut agent = Agent::start(single(r, |_| {}));
    let base = ts_ago(Duration::from_secs(3600));
    let first = split(&lines("ua", 5, 1_000, base));
    assert_eq!(agent.write_v2("b", join(&first), &Opts::new()).0, 204);

    let rep = wait_state(&agent, "r1", "paused", DEADLINE);
    assert_eq!(rep["latestResponseCode"], 401, "{rep:#}");
    assert!(
        str_field(&rep, "latestErrorMessage").contains("token is not valid"),
        "the remote's message belongs in the status: {rep:#}"
    );
    assert!(
        rep["nextRetryAt"].is_string(),
        "a paused stream says when it retries: {rep:#}"
    );
    assert_eq!(field(&rep, "remainingLines"), 1_000, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 0, "{rep:#}");

    // Writes are still taken and kept while paused.
    let second = split(&lines("ua2", 5, 500, base + 10_000_000_000));
    assert_eq!(agent.write_v2("b", join(&second), &Opts::new()).0, 204);
    wait_eq(DEADLINE, "r1 remainingLines while paused", 1_500, || {
        field(&status(&agent, "r1"), "remainingLines")
    });

    // "Retry slowly": with max_backoff 60 s, no retry storm at min_backoff.
    std::thread::sleep(Duration::from_secs(1));
    let attempts = server.request_count();
    assert!(
        attempts <= 2,
        "a paused stream retried {attempts} times within ~1 s"
    );
    assert_eq!(server.accepted_len(), 0);

    agent.config.remotes[0].token = Some("right-token".into());
    agent.write_config();
    let reloaded = Instant::now();
    agent.sighup();
    let expected: HashSet<String> = first.iter().chain(&second).cloned().collect();
    wait_eq(
        Duration::from_secs(20),
        "lines at the remote after the reload (max_backoff is 60 s: a worker not woken by SIGHUP fails this)",
        expected.len(),
        || server.accepted_len(),
    );
    eprintln!("delivered {:?} after SIGHUP", reloaded.elapsed());
    assert_accepted_exactly(&server, &expected);
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 1_500, "{rep:#}");
    assert_eq!(str_field(&rep, "state"), "running", "{rep:#}");
    assert!(agent.is_running(), "SIGHUP must not stop the agent");
}

/// 403 and 404 pause too, keep everything, and are retried at `max_backoff`
/// without any reload: once the remote is fixed, everything arrives.
#[test]
fn forbidden_and_missing_bucket_pause_then_retry_at_max_backoff() {
    let fixed = Arc::new(AtomicBool::new(false));
    let f = fixed.clone();
    let forbidden = FaultServer::with_rule(move |_| {
        if f.load(Ordering::SeqCst) {
            Action::ok()
        } else {
            Action::influx_error(403, "insufficient permissions for write (fault remote)")
        }
    });
    let f = fixed.clone();
    let missing = FaultServer::with_rule(move |_| {
        if f.load(Ordering::SeqCst) {
            Action::ok()
        } else {
            Action::influx_error(404, "bucket \"b\" not found (fault remote)")
        }
    });
    let mut r403 = remote("r403", &forbidden);
    r403.max_backoff = "1s".into();
    let mut r404 = remote("r404", &missing);
    r404.max_backoff = "1s".into();
    let config = AgentConfig {
        remotes: vec![r403, r404],
        replications: vec![
            ReplicationConfig::new("p403", "r403", "b"),
            ReplicationConfig::new("p404", "r404", "b"),
        ],
        ..AgentConfig::default()
    };
    let agent = Agent::start(config);
    let all = split(&lines("fm", 5, 400, ts_ago(Duration::from_secs(3600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    for (name, code) in [("p403", 403), ("p404", 404)] {
        let rep = wait_state(&agent, name, "paused", DEADLINE);
        assert_eq!(rep["latestResponseCode"], code, "{rep:#}");
        assert_eq!(field(&rep, "remainingLines"), 400, "{rep:#}");
        assert_eq!(
            field(&rep, "deadLetteredLines") + field(&rep, "droppedNonRetryableLines"),
            0
        );
    }
    // Several slow retries, each refused again: logged once, not per attempt.
    wait_until(DEADLINE, "3 attempts at the 403 remote", || {
        forbidden.request_count() >= 3
    });
    let logged = agent
        .log()
        .matches("insufficient permissions for write")
        .count();
    assert_eq!(
        logged, 1,
        "the remote's message should be logged once per change, not per attempt"
    );
    fixed.store(true, Ordering::SeqCst);
    let expected: HashSet<String> = all.into_iter().collect();
    for (name, server) in [("p403", &forbidden), ("p404", &missing)] {
        let rep = agent.wait_drained(name);
        assert_eq!(field(&rep, "deliveredLines"), 400, "{rep:#}");
        assert_accepted_exactly(server, &expected);
    }
}

/// SIGHUP with a new URL for a remote that is down moves the stream to the
/// new address at once, although its backoff (60 s and more) is far from
/// over.
#[test]
fn reload_with_a_new_url_takes_effect_at_once() {
    let server = FaultServer::start();
    let closed = closed_port();
    let mut r = remote_at("cloud", &closed.url());
    r.min_backoff = "60s".into();
    r.max_backoff = "120s".into();
    let mut agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("nu", 3, 300, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    let rep = wait_state(&agent, "r1", "backoff", DEADLINE);
    assert_eq!(field(&rep, "remainingLines"), 300, "{rep:#}");
    assert!(!str_field(&rep, "latestErrorMessage").is_empty(), "{rep:#}");

    agent.config.remotes[0].url = server.url();
    agent.write_config();
    agent.sighup();
    wait_eq(
        Duration::from_secs(20),
        "lines at the new URL (the old backoff has 60 s or more to go)",
        300,
        || server.accepted_len(),
    );
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 300, "{rep:#}");
}

/// A remote whose port refuses connections: every attempt fails alike, the
/// warning is logged once and not once per attempt, and every reading of
/// status that shows the link down also shows why (no HTTP code, the
/// transport's message), never the link's state beside an older answer.
#[test]
fn a_refusing_port_is_logged_once_and_status_says_why_with_the_link() {
    let closed = closed_port();
    let mut r = remote_at("cloud", &closed.url());
    r.min_backoff = "50ms".into();
    r.max_backoff = "100ms".into();
    r.probe_interval = Some("100ms".into());
    let agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("rp", 3, 30, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let rep = status(&agent, "r1");
        if str_field(&rep, "link") == "down" {
            assert!(rep["latestResponseCode"].is_null(), "{rep:#}");
            assert!(
                !str_field(&rep, "latestErrorMessage").is_empty(),
                "the link is down and status does not say why: {rep:#}"
            );
        }
        let attempts = metric_value(
            &agent.metrics(),
            "replications_queue_remote_write_errors",
            "code=\"transport\"",
        )
        .unwrap_or(0.0);
        if attempts >= 4.0 {
            break;
        }
        assert!(Instant::now() < deadline, "4 failed attempts: {rep:#}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = agent.log();
    let warned = log.lines().filter(|l| l.contains("retrying in")).count();
    assert_eq!(warned, 1, "logged once per cause, not per attempt:\n{log}");
}

/// SIGHUP adds and removes replications: an added one starts at once; a
/// removed one stops but keeps its queue, which it delivers when added back.
/// Lines written while it was absent are not its business.
#[test]
fn reload_adds_and_removes_replications_keeping_their_queue() {
    let one = FaultServer::start();
    let two = FaultServer::start();
    let mut agent = Agent::start(single(remote("one", &one), |_| {}));
    let base = ts_ago(Duration::from_secs(3600));
    let batch = |k: i64, n: usize| split(&lines("ar", 3, n, base + k * 10_000_000_000));

    let second = (
        remote("two", &two),
        ReplicationConfig::new("r2", "two", "b"),
    );
    agent.config.remotes.push(second.0.clone());
    agent.config.replications.push(second.1.clone());
    agent.write_config();
    agent.sighup();
    wait_until(DEADLINE, "r2 in the status after SIGHUP", || {
        agent.replications()["replications"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["name"] == "r2"))
    });
    let first = batch(0, 100);
    assert_eq!(agent.write_v2("b", join(&first), &Opts::new()).0, 204);
    agent.wait_drained("r2");
    assert_eq!(two.accepted_len(), 100);

    // r2's remote goes down; its lines wait in its queue.
    two.set_rule(|_| Action::status(500));
    let held = batch(1, 50);
    assert_eq!(agent.write_v2("b", join(&held), &Opts::new()).0, 204);
    wait_state(&agent, "r2", "backoff", DEADLINE);
    assert_eq!(field(&status(&agent, "r2"), "remainingLines"), 50);

    agent.config.remotes.pop();
    agent.config.replications.pop();
    agent.write_config();
    agent.sighup();
    wait_until(DEADLINE, "r2 gone from the status after SIGHUP", || {
        agent.replications()["replications"]
            .as_array()
            .is_some_and(|a| a.iter().all(|r| r["name"] != "r2"))
    });
    let while_absent = batch(2, 20);
    assert_eq!(
        agent.write_v2("b", join(&while_absent), &Opts::new()).0,
        204
    );

    two.set_rule(|_| Action::ok());
    agent.config.remotes.push(second.0);
    agent.config.replications.push(second.1);
    agent.write_config();
    agent.sighup();
    let mut rep = Value::Null;
    wait_until(DEADLINE, "r2 back and drained", || {
        let all = agent.replications();
        match all["replications"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == "r2"))
        {
            Some(r) => {
                rep = r.clone();
                field(&rep, "remainingLines") == 0
            }
            None => false,
        }
    });
    assert_conserved(&rep);
    let expected: HashSet<String> = first.iter().chain(&held).cloned().collect();
    assert_accepted_exactly(&two, &expected);
    assert_eq!(field(&rep, "deliveredLines"), 150, "{rep:#}");
    let r1 = agent.wait_drained("r1");
    assert_eq!(field(&r1, "deliveredLines"), 170, "{r1:#}");
    assert!(agent.is_running());
}

// ---------------------------------------------------------------------------
// 429/503: Retry-After
// ---------------------------------------------------------------------------

/// Time from the start of the remote's answer to request `seq` until request
/// `seq + 1` arrived.
fn gap_after(server: &FaultServer, seq: usize) -> Duration {
    let a = server.request(seq).expect("request");
    let b = server.request(seq + 1).expect("next request");
    let answered = *a.answer_began.get().expect("request was answered");
    b.at.saturating_duration_since(answered)
}

/// Waits until request number `seq` has arrived at `server`.
fn wait_requests(server: &FaultServer, n: usize, timeout: Duration) {
    wait_until(timeout, &format!("{n} requests at the remote"), || {
        server.request_count() >= n
    });
}

/// (e) 429 with `Retry-After: 3` (delta seconds): the status says backoff,
/// and the retry comes no earlier than 3 s later.
#[test]
fn retry_after_seconds_is_honoured() {
    let server = FaultServer::start();
    server.script([Action::RetryAfterSecs(429, 3)]);
    let mut r = remote("cloud", &server);
    r.max_backoff = "30s".into();
    let agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("ra", 3, 30, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    wait_requests(&server, 1, DEADLINE);
    let mut rep = Value::Null;
    wait_until(
        Duration::from_millis(2_500),
        "r1 in backoff after the 429",
        || {
            rep = status(&agent, "r1");
            str_field(&rep, "state") == "backoff" && rep["latestResponseCode"] == 429
        },
    );
    assert!(rep["nextRetryAt"].is_string(), "{rep:#}");
    assert!(
        str_field(&rep, "latestErrorMessage").contains("slow down"),
        "{rep:#}"
    );

    wait_until(DEADLINE, "all lines at the remote", || {
        server.accepted_len() == all.len()
    });
    let gap = gap_after(&server, 0);
    eprintln!("Retry-After: 3 -> retried after {gap:?}");
    assert!(
        gap >= Duration::from_millis(2_850),
        "retried {gap:?} after Retry-After: 3"
    );
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 30, "{rep:#}");
}

/// (e) 503 with `Retry-After: <HTTP date>` about 4 s ahead: the retry waits
/// until that date.
#[test]
fn retry_after_http_date_is_honoured() {
    let server = FaultServer::start();
    let at = fault::http_date_floor(SystemTime::now() + Duration::from_secs(5));
    server.script([Action::RetryAfterDate(503, at)]);
    let mut r = remote("cloud", &server);
    r.max_backoff = "30s".into();
    let agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("rd", 3, 30, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    wait_until(DEADLINE, "all lines at the remote", || {
        server.accepted_len() == all.len()
    });
    let first = server.request(0).unwrap();
    let asked = at.duration_since(first.at_system).unwrap_or_default();
    let gap = gap_after(&server, 0);
    eprintln!("Retry-After date {asked:?} ahead -> retried after {gap:?}");
    assert!(
        asked >= Duration::from_secs(1),
        "test setup too slow: the date was only {asked:?} ahead"
    );
    assert!(
        gap + Duration::from_millis(300) >= asked,
        "retried {gap:?} after an answer asking for {asked:?}"
    );
    agent.wait_drained("r1");
}

/// (e) A huge Retry-After, in seconds or as a date a day ahead, is capped at
/// `max_backoff` (1 s here): the retries come after about 1 s, not after an
/// hour.
#[test]
fn huge_retry_after_is_capped_at_max_backoff() {
    let server = FaultServer::start();
    server.script([
        Action::RetryAfterSecs(429, 3_600),
        Action::RetryAfterDate(503, SystemTime::now() + Duration::from_secs(86_400)),
    ]);
    let mut r = remote("cloud", &server);
    r.max_backoff = "1s".into();
    let agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("rh", 3, 30, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    wait_until(
        Duration::from_secs(20),
        "all lines at the remote (an uncapped Retry-After would take an hour)",
        || server.accepted_len() == all.len(),
    );
    for seq in 0..2 {
        let gap = gap_after(&server, seq);
        eprintln!("huge Retry-After #{seq} -> retried after {gap:?}");
        // Capped means "wait max_backoff", not "ignore the header and use
        // min_backoff" (50 ms).
        assert!(
            gap >= Duration::from_millis(800),
            "retry {seq} came {gap:?} after a capped Retry-After (max_backoff 1 s)"
        );
    }
    agent.wait_drained("r1");
}

/// A `Retry-After` of 0, or an HTTP date already past (a gateway whose clock
/// runs ahead of the remote's), must not turn into a retry loop without
/// pause: retries stay at least `min_backoff` apart.
#[test]
fn zero_or_past_retry_after_does_not_hammer_the_remote() {
    let zero = FaultServer::with_rule(|_| Action::RetryAfterSecs(503, 0));
    let past = SystemTime::now() - Duration::from_secs(3_600);
    let stale = FaultServer::with_rule(move |_| Action::RetryAfterDate(429, past));
    let tune = |mut r: RemoteConfig| {
        r.min_backoff = "200ms".into();
        r.max_backoff = "1s".into();
        r
    };
    let config = AgentConfig {
        remotes: vec![tune(remote("zero", &zero)), tune(remote("stale", &stale))],
        replications: vec![
            ReplicationConfig::new("r-zero", "zero", "b"),
            ReplicationConfig::new("r-stale", "stale", "b"),
        ],
        ..AgentConfig::default()
    };
    let agent = Agent::start(config);
    let all = split(&lines("rz", 3, 30, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    for (what, server) in [
        ("Retry-After: 0", &zero),
        ("a Retry-After date in the past", &stale),
    ] {
        wait_requests(server, 6, DEADLINE);
        let n = server.request_count();
        let shortest = (0..n - 1).map(|seq| gap_after(server, seq)).min().unwrap();
        assert!(
            shortest >= Duration::from_millis(150),
            "after {what} the agent retried within {shortest:?} (min_backoff 200 ms); {n} requests so far"
        );
    }
    zero.set_rule(|_| Action::ok());
    stale.set_rule(|_| Action::ok());
    for name in ["r-zero", "r-stale"] {
        let rep = agent.wait_drained(name);
        assert_eq!(field(&rep, "deliveredLines"), 30, "{rep:#}");
    }
}

/// A redirect is not a delivery. A captive portal (hotel, cellular) answers
/// the POST with 30x to a login page that says 200: the lines must stay
/// queued, not be counted as delivered to a remote that never saw them.
#[test]
fn redirects_are_never_counted_as_deliveries() {
    let codes = [301u16, 302, 303, 307, 308];
    let servers: Vec<FaultServer> = codes
        .iter()
        .map(|&code| {
            FaultServer::with_rule(move |req| {
                if req.path() == "/portal" {
                    Action::Status(
                        200,
                        vec![("Content-Type".into(), "text/html".into())],
                        "<html>please log in</html>".into(),
                    )
                } else {
                    Action::Status(
                        code,
                        vec![("Location".into(), "/portal".into())],
                        String::new(),
                    )
                }
            })
        })
        .collect();
    let config = AgentConfig {
        remotes: codes
            .iter()
            .zip(&servers)
            .map(|(c, s)| remote(&format!("x{c}"), s))
            .collect(),
        replications: codes
            .iter()
            .map(|c| ReplicationConfig::new(&format!("r{c}"), &format!("x{c}"), "b"))
            .collect(),
        ..AgentConfig::default()
    };
    let agent = Agent::start(config);
    let all = split(&lines("rx", 3, 30, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    let posts = |s: &FaultServer| s.requests().iter().filter(|r| r.method == "POST").count();
    wait_until(
        DEADLINE,
        "3 attempts at every redirecting remote, or the lines gone",
        || {
            codes.iter().zip(&servers).all(|(c, s)| {
                posts(s) >= 3 || field(&status(&agent, &format!("r{c}")), "remainingLines") == 0
            })
        },
    );
    let mut lost = Vec::new();
    for (c, s) in codes.iter().zip(&servers) {
        let rep = status(&agent, &format!("r{c}"));
        assert_eq!(s.accepted_len(), 0);
        if field(&rep, "deliveredLines") > 0 || field(&rep, "remainingLines") != 30 {
            lost.push(format!(
                "HTTP {c}: deliveredLines {} remainingLines {} (the remote accepted nothing)",
                field(&rep, "deliveredLines"),
                field(&rep, "remainingLines")
            ));
        }
    }
    assert!(
        lost.is_empty(),
        "redirects counted as deliveries:\n{}",
        lost.join("\n")
    );
    for s in &servers {
        s.set_rule(|_| Action::ok());
    }
    let expected: HashSet<String> = all.into_iter().collect();
    for (c, s) in codes.iter().zip(&servers) {
        agent.wait_drained(&format!("r{c}"));
        assert_accepted_exactly(s, &expected);
    }
}

// ---------------------------------------------------------------------------
// 408, 5xx, transport errors: back off and retry, never give up
// ---------------------------------------------------------------------------

/// (e) A run of 500, 502, 503 (no Retry-After), 504, 408 then success:
/// each retry waits at least `min_backoff`, the same lines are resent, and
/// everything is delivered once the remote recovers.
#[test]
fn server_errors_back_off_then_deliver() {
    let server = FaultServer::start();
    server.script([
        Action::influx_error(500, "internal error (fault remote)"),
        Action::status(502),
        Action::status(503),
        Action::influx_error(504, "gateway timeout (fault remote)"),
        Action::status(408),
        Action::influx_error(500, "still broken (fault remote)"),
    ]);
    let mut r = remote("cloud", &server);
    r.min_backoff = "200ms".into();
    r.max_backoff = "1s".into();
    let agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("se", 3, 100, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    wait_requests(&server, 1, DEADLINE);
    let rep = wait_state(&agent, "r1", "backoff", Duration::from_secs(5));
    assert!(rep["latestResponseCode"].is_u64(), "{rep:#}");
    wait_until(DEADLINE, "all lines at the remote", || {
        server.accepted_len() == all.len()
    });
    assert_eq!(server.script_left(), 0);
    let reqs = server.requests();
    assert!(
        reqs.len() >= 7,
        "6 failures then a success, got {} requests",
        reqs.len()
    );
    let written: HashSet<String> = all.iter().cloned().collect();
    for (seq, req) in reqs.iter().enumerate().take(6) {
        assert!(
            req.lines().all(|l| written.contains(l)),
            "request #{seq} sent unknown lines"
        );
        let gap = gap_after(&server, seq);
        assert!(
            gap >= Duration::from_millis(180),
            "retry after request #{seq} came after {gap:?}, below min_backoff 200 ms"
        );
    }
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 100, "{rep:#}");
    assert_eq!(str_field(&rep, "state"), "running", "{rep:#}");
    let code = rep["latestResponseCode"].as_u64().unwrap_or(0);
    assert!(
        (200..300).contains(&code),
        "latest answer should be the success: {rep:#}"
    );
}

/// (e) Resets, a truncated answer, a stall far beyond `timeout`, slow bodies:
/// each is retried and nothing is lost. The stall proves the request timeout
/// works: the retry comes long before the stall would have ended.
#[test]
fn transport_faults_are_retried_and_lose_nothing() {
    let server = FaultServer::start();
    server.script([
        Action::Reset,
        Action::Truncated,
        Action::stall(Duration::from_secs(60), Action::ok()),
        Action::SlowBody(500, 100, Duration::from_millis(100)),
        Action::SlowBody(200, 100, Duration::from_millis(100)),
        Action::Reset,
    ]);
    let mut r = remote("cloud", &server);
    r.timeout = "1s".into();
    let agent = Agent::start(single(r, |r| r.batch_size = "2kB".into()));
    let all = split(&lines("tf", 3, 60, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    wait_until(DEADLINE, "all lines at the remote", || {
        server.accepted_len() == all.len()
    });
    assert_eq!(server.script_left(), 0);
    let stalled = gap_after_arrival(&server, 2);
    eprintln!("after a 60 s stall with timeout 1 s, the retry came {stalled:?} later");
    assert!(
        stalled < Duration::from_secs(30),
        "the request after a 60 s stall came {stalled:?} later: is `timeout` (1 s) applied?"
    );
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 60, "{rep:#}");
    let expected: HashSet<String> = all.into_iter().collect();
    assert_accepted_exactly(&server, &expected);
}

/// A TLS failure (an `https://` URL whose server does not speak TLS) is a
/// transport error like any other: backoff, data kept, never given up; once
/// the URL is fixed (reload), everything is delivered.
#[test]
fn tls_errors_back_off_and_keep_the_data() {
    // Answers every connection with plain-HTTP bytes, which no TLS client accepts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (st, hs) = (stop.clone(), handshakes.clone());
    let not_tls = std::thread::spawn(move || {
        while !st.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    use std::io::Write as _;
                    hs.fetch_add(1, Ordering::SeqCst);
                    let _ =
                        conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let _stop = SetOnDrop(&stop);
    let server = FaultServer::start();
    let mut agent = Agent::start(single(
        remote_at("cloud", &format!("https://127.0.0.1:{port}")),
        |_| {},
    ));
    let all = split(&lines("tls", 3, 100, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    wait_until(DEADLINE, "3 TLS attempts", || {
        handshakes.load(Ordering::SeqCst) >= 3
    });
    let rep = status(&agent, "r1");
    assert_eq!(str_field(&rep, "state"), "backoff", "{rep:#}");
    assert!(!str_field(&rep, "latestErrorMessage").is_empty(), "{rep:#}");
    assert_eq!(field(&rep, "remainingLines"), 100, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 0, "{rep:#}");

    agent.config.remotes[0].url = server.url();
    agent.write_config();
    agent.sighup();
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 100, "{rep:#}");
    assert_accepted_exactly(&server, &all.into_iter().collect());
    stop.store(true, Ordering::SeqCst);
    not_tls.join().unwrap();
}

/// Time between the arrivals of requests `seq` and `seq + 1`.
fn gap_after_arrival(server: &FaultServer, seq: usize) -> Duration {
    let a = server.request(seq).expect("request");
    let b = server.request(seq + 1).expect("next request");
    b.at.saturating_duration_since(a.at)
}

/// Keep-alive and protocol shape: many batches over one or two connections,
/// each a gzip v2 write with the token, org, bucket, ns precision, the
/// agent's User-Agent, and at most `batch_size` bytes of whole lines.
#[test]
fn batches_reuse_the_connection_and_speak_influx_v2() {
    let server = FaultServer::start();
    let agent = Agent::start(single(remote("cloud", &server), |r| {
        r.batch_size = "4kB".into();
    }));
    let all = split(&lines("ka", 5, 300, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    agent.wait_drained("r1");
    let expected: HashSet<String> = all.into_iter().collect();
    assert_accepted_exactly(&server, &expected);
    let reqs = server.requests();
    assert!(
        reqs.len() >= 5,
        "300 lines of ~140 B in 4 kB batches: got {} requests",
        reqs.len()
    );
    let conns: HashSet<usize> = reqs.iter().map(|r| r.conn).collect();
    assert!(
        conns.len() <= 2,
        "{} requests used {} connections: keep-alive not reused",
        reqs.len(),
        conns.len()
    );
    for req in &reqs {
        assert_eq!(req.method, "POST");
        assert_eq!(req.path(), "/api/v2/write", "{}", req.target);
        assert_eq!(
            req.query("org").as_deref(),
            Some("test-org"),
            "{}",
            req.target
        );
        assert_eq!(req.query("bucket").as_deref(), Some("b"), "{}", req.target);
        assert_eq!(
            req.query("precision").as_deref(),
            Some("ns"),
            "{}",
            req.target
        );
        assert!(req.has_token("test-token"), "{:?}", req.headers);
        assert_eq!(req.header("content-encoding"), Some("gzip"));
        assert!(req.decode_error.is_none(), "{:?}", req.decode_error);
        assert!(
            req.header("user-agent")
                .is_some_and(|u| u.starts_with("edge-replicator/")),
            "{:?}",
            req.headers
        );
        assert!(
            req.body_len() <= 4_000,
            "a {} B batch exceeds batch_size 4kB",
            req.body_len()
        );
        assert!(req.body.ends_with('\n'), "whole lines only");
    }
}

// ---------------------------------------------------------------------------
// Independence of replications
// ---------------------------------------------------------------------------

/// (f) Four replications of the same bucket: to a closed port, to a remote
/// that accepts connections and never answers, to a remote refusing the
/// token, and to a healthy remote. The healthy one delivers everything
/// promptly while the others hold all their lines.
#[test]
fn a_dead_or_paused_remote_never_delays_a_healthy_one() {
    let healthy = FaultServer::start();
    let blackhole =
        FaultServer::with_rule(|_| Action::stall(Duration::from_secs(600), Action::ok()));
    let refusing =
        FaultServer::with_rule(|_| Action::influx_error(401, "unauthorized access (fault remote)"));
    let closed = closed_port();
    let dead_url = closed.url();

    let mut dead = remote_at("dead", &dead_url);
    dead.min_backoff = "1s".into();
    dead.max_backoff = "300s".into();
    dead.connect_timeout = "5s".into();
    let mut hole = remote("hole", &blackhole);
    hole.timeout = "300s".into();
    let mut paused = remote("paused", &refusing);
    paused.max_backoff = "300s".into();
    let config = AgentConfig {
        remotes: vec![dead, hole, paused, remote("healthy", &healthy)],
        replications: vec![
            ReplicationConfig::new("r-dead", "dead", "b"),
            ReplicationConfig::new("r-hole", "hole", "b"),
            ReplicationConfig::new("r-paused", "paused", "b"),
            ReplicationConfig::new("r-healthy", "healthy", "b"),
        ],
        ..AgentConfig::default()
    };
    let agent = Agent::start(config);
    let base = ts_ago(Duration::from_secs(3600));
    let mut written = HashSet::new();
    for j in 0..10 {
        let body = lines("fo", 5, 200, base + j * 1_000_000_000);
        let (code, text) = agent.write_v2("b", &body, &Opts::shape(j as usize));
        assert_eq!(code, 204, "write {j}: {text}");
        written.extend(split(&body));
    }
    wait_eq(
        Duration::from_secs(30),
        "lines at the healthy remote (the others back off for minutes)",
        written.len(),
        || healthy.accepted_len(),
    );
    assert_accepted_exactly(&healthy, &written);
    wait_state(&agent, "r-dead", "backoff", DEADLINE);
    wait_state(&agent, "r-paused", "paused", DEADLINE);
    assert!(
        blackhole.request_count() >= 1,
        "the blackhole remote got no request"
    );
    for name in ["r-dead", "r-hole", "r-paused"] {
        let rep = status(&agent, name);
        assert_eq!(field(&rep, "deliveredLines"), 0, "{rep:#}");
        assert_eq!(field(&rep, "remainingLines"), 2_000, "{rep:#}");
    }
    // And it keeps going while the others are still stuck.
    let more = lines("fo2", 5, 500, base + 100_000_000_000);
    assert_eq!(agent.write_v2("b", &more, &Opts::new()).0, 204);
    written.extend(split(&more));
    wait_eq(
        Duration::from_secs(30),
        "later lines at the healthy remote",
        written.len(),
        || healthy.accepted_len(),
    );
    let rep = agent.wait_drained("r-healthy");
    assert_eq!(field(&rep, "deliveredLines"), 2_500, "{rep:#}");
    assert_eq!(field(&status(&agent, "r-dead"), "remainingLines"), 2_500);
}

// ---------------------------------------------------------------------------
// Dead-letter store: list, replay, purge
// ---------------------------------------------------------------------------

fn cli_ok(agent: &Agent, args: &[&str]) -> String {
    let out = agent.cli(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "edge-replicator {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// `dead-letter list --json`: (total lines over all records, every reason).
fn dead_letters(agent: &Agent) -> (u64, Vec<String>) {
    let text = cli_ok(
        agent,
        &["dead-letter", "list", "--replication", "r1", "--json"],
    );
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("`dead-letter list --json` is not JSON ({e}):\n{text}"));
    let list = v["deadLetters"]
        .as_array()
        .unwrap_or_else(|| panic!("no deadLetters array: {v}"))
        .clone();
    let lines = list.iter().map(|d| field(d, "lines")).sum();
    let reasons = list
        .iter()
        .map(|d| str_field(d, "reason").to_string())
        .collect();
    (lines, reasons)
}

/// Dead-lettered lines can be listed (with the remote's reason), replayed
/// after the remote is fixed (they are then delivered; a line still refused
/// comes back) and purged; the counters conserve throughout.
#[test]
fn dead_letter_list_replay_purge() {
    let server = FaultServer::with_rule(refuse_poison);
    let agent = Agent::start(single(remote("cloud", &server), |_| {}));
    let base = ts_ago(Duration::from_secs(3600));
    let mut all = split(&lines("dl", 4, 200, base));
    let (pa, pb) = (poison("a", base + 1), poison("b", base + 2));
    all.insert(50, pa.clone());
    all.insert(150, pb.clone());
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deadLetteredLines"), 2, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 200, "{rep:#}");

    let listed = cli_ok(&agent, &["dead-letter", "list", "--replication", "r1"]);
    assert!(
        listed.contains("2 lines"),
        "`dead-letter list` should count 2 lines:\n{listed}"
    );
    assert!(
        listed.contains("poison pill refused"),
        "and give the remote's reason:\n{listed}"
    );
    let with_lines = cli_ok(
        &agent,
        &["dead-letter", "list", "--replication", "r1", "--lines"],
    );
    for p in [&pa, &pb] {
        assert!(
            with_lines.contains(p.as_str()),
            "`--lines` should show {p:?}:\n{with_lines}"
        );
    }
    let (n, reasons) = dead_letters(&agent);
    assert_eq!(n, 2, "{reasons:?}");
    let out = agent.cli(&[
        "dead-letter",
        "list",
        "--replication",
        "no-such-replication",
    ]);
    assert!(
        !out.status.success(),
        "an unknown replication must be an error"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-replication"),
        "the error should name the replication: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The remote now takes `a` but still refuses `b`.
    let pb_rule = pb.clone();
    server.set_rule(move |req| {
        if req.lines().any(|l| l == pb_rule) {
            Action::influx_error(400, "still refusing poison b (fault remote)")
        } else {
            Action::ok()
        }
    });
    let replayed = cli_ok(&agent, &["dead-letter", "replay", "--replication", "r1"]);
    assert!(
        replayed.contains('2'),
        "replay should say how many lines: {replayed}"
    );
    wait_until(DEADLINE, "the replayed line a at the remote", || {
        server.has_accepted(&pa)
    });
    let mut rep = Value::Null;
    wait_until(DEADLINE, "b refused again and set aside", || {
        rep = status(&agent, "r1");
        field(&rep, "remainingLines") == 0 && dead_letters(&agent).0 == 1
    });
    assert_eq!(field(&rep, "deliveredLines"), 201, "{rep:#}");
    assert!(!server.has_accepted(&pb));
    let (n, reasons) = dead_letters(&agent);
    assert_eq!(n, 1, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("still refusing poison b")),
        "{reasons:?}"
    );

    let purged = cli_ok(&agent, &["dead-letter", "purge", "--replication", "r1"]);
    assert!(
        purged.contains('1'),
        "purge should say how many lines: {purged}"
    );
    assert_eq!(dead_letters(&agent).0, 0, "purged, yet listed");
    let rep = status(&agent, "r1");
    assert_eq!(field(&rep, "remainingLines"), 0, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 201, "{rep:#}");
    // Replay of an empty store is harmless.
    cli_ok(&agent, &["dead-letter", "replay", "--replication", "r1"]);
    assert_eq!(field(&status(&agent, "r1"), "remainingLines"), 0);
}

/// A point whose string value holds newlines; `tag` makes it unique, and a
/// continuation line looks like a point of its own.
fn multi_line_point(tag: &str, ts: i64) -> String {
    format!("applog,k={tag} msg=\"failed {tag}:\nfake,host=x value=42 {ts}\nend\",n=1i {ts}\n")
}

/// A remote that refuses any body holding `POISON` (400) or larger than
/// 1 KiB (413), and records a body cut inside a string (an odd number of
/// quotes: these points have no escaped ones) as refused with its own reason.
fn refuse_poison_and_large(req: &Request) -> Action {
    if req.body.matches('"').count() % 2 == 1 {
        Action::influx_error(400, "body cut inside a string (fault remote)")
    } else if req.body.len() > 1024 {
        Action::influx_error(413, "too large (fault remote)")
    } else if req.body.contains("POISON") {
        Action::influx_error(400, "poison point refused by the fault remote")
    } else {
        Action::ok()
    }
}

/// 413 splitting and 400 bisection cut between points, never inside a
/// string holding newlines: the refused multi-line point is dead-lettered
/// whole, as one line, listed with its newlines and replayed whole.
#[test]
fn splitting_and_bisection_never_cut_inside_a_string() {
    let server = FaultServer::with_rule(refuse_poison_and_large);
    let agent = Agent::start(single(remote("cloud", &server), |_| {}));
    let base = ts_ago(Duration::from_secs(3600));
    let mut body = String::new();
    let mut good = Vec::new();
    for i in 0..40i64 {
        let p = multi_line_point(&format!("p{i}"), base + i);
        body.push_str(&p);
        good.push(p);
    }
    let bad = multi_line_point("POISON", base + 100);
    let cut = good[..17].concat().len();
    body.insert_str(cut, &bad);
    let (code, text) = agent.write_v2("b", &body, &Opts::new());
    assert_eq!(code, 204, "{text}");

    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), 41, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 40, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 1, "{rep:#}");
    let expected: HashSet<String> = good
        .iter()
        .flat_map(|p| p.lines().map(String::from))
        .collect();
    assert_accepted_exactly(&server, &expected);
    // Both kinds of split happened, and no body was cut inside a string.
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.body_len() > 1024), "no 413");
    assert!(
        requests
            .iter()
            .any(|r| r.body_len() <= 1024 && r.body.contains("POISON") && r.body.len() > bad.len()),
        "no bisection"
    );
    assert!(requests
        .iter()
        .all(|r| r.body.matches('"').count() % 2 == 0));
    let text = cli_ok(
        &agent,
        &[
            "dead-letter",
            "list",
            "--replication",
            "r1",
            "--json",
            "--lines",
        ],
    );
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    let list = v["deadLetters"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v:#}");
    assert_eq!(list[0]["data"], bad.as_str(), "{v:#}");
    assert!(
        str_field(&list[0], "reason").contains("poison point refused"),
        "{v:#}"
    );
    // The log names the point on one record, its newlines written as `\n`.
    assert!(
        agent.log().contains(r#"msg="failed POISON:\nfake,host=x"#),
        "{}",
        agent.log()
    );
    // The table shows a string's newlines as the continuation of its point.
    let table = cli_ok(
        &agent,
        &["dead-letter", "list", "--replication", "r1", "--lines"],
    );
    let shown: Vec<&str> = bad.lines().collect();
    let want = format!(
        "\n    {}\n      {}\n      {}\n",
        shown[0], shown[1], shown[2]
    );
    assert!(table.contains(&want), "{table}");

    // Fixed remote: the replayed point arrives whole.
    server.set_rule(|req| {
        if req.body.matches('"').count() % 2 == 1 {
            Action::influx_error(400, "body cut inside a string (fault remote)")
        } else {
            Action::ok()
        }
    });
    cli_ok(&agent, &["dead-letter", "replay", "--replication", "r1"]);
    wait_until(DEADLINE, "the replayed point at the remote", || {
        bad.lines().all(|l| server.has_accepted(l))
    });
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 41, "{rep:#}");
    assert_eq!(dead_letters(&agent).0, 0);
}

// ---------------------------------------------------------------------------
// Randomized fault schedule
// ---------------------------------------------------------------------------

/// A remote that fails at random (transient faults only: resets, truncated
/// answers, stalls, slow bodies, 5xx, 408, 429/503 with Retry-After) and
/// otherwise answers deterministically: 413 over 12 KiB decompressed, 400 to
/// a batch holding a poison line, else 204.
fn chaos(seed: u64) -> impl Fn(&Request) -> Action + Send + Sync + 'static {
    let rng = Mutex::new(StdRng::seed_from_u64(seed));
    move |req| {
        let mut rng = rng.lock().unwrap();
        let r: f64 = rng.random();
        let transient = match r {
            r if r < 0.06 => Some(Action::Reset),
            r if r < 0.10 => Some(Action::Truncated),
            r if r < 0.12 => Some(Action::stall(Duration::from_millis(1_500), Action::ok())),
            r if r < 0.14 => Some(Action::SlowBody(500, 30, Duration::from_millis(50))),
            r if r < 0.22 => Some(Action::influx_error(500, "internal error (chaos)")),
            r if r < 0.25 => Some(Action::status(502)),
            r if r < 0.27 => Some(Action::status(408)),
            r if r < 0.31 => Some(Action::RetryAfterSecs(503, rng.random_range(0..=1))),
            r if r < 0.34 => Some(Action::RetryAfterDate(
                429,
                SystemTime::now() + Duration::from_secs(1),
            )),
            _ => None,
        };
        if let Some(a) = transient {
            return a;
        }
        if req.body_len() > 12 * 1024 {
            return Action::influx_error(413, "request too large (chaos)");
        }
        refuse_poison(req)
    }
}

/// (g) 200 writes from 4 writers fanned out to two replications whose
/// remotes fail at random. Afterwards, for each replication: the counters
/// conserve (and did at every reading), every good line is at the remote,
/// every poison line was dead-lettered (r1) or dropped and counted (r2).
#[test]
fn randomized_fault_schedule_conserves_and_delivers() {
    let seed = std::env::var("DELIVERY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_611u64);
    let _report = SeedReport(seed);
    eprintln!("randomized fault schedule: seed {seed} (DELIVERY_SEED)");
    let server1 = FaultServer::with_rule(chaos(seed ^ 0x1111));
    let server2 = FaultServer::with_rule(chaos(seed ^ 0x2222));
    let tune = |mut r: RemoteConfig| {
        r.min_backoff = "20ms".into();
        r.max_backoff = "300ms".into();
        r.timeout = "700ms".into();
        r.connect_timeout = "500ms".into();
        r
    };
    let mut rep1 = ReplicationConfig::new("r1", "one", "g");
    rep1.batch_size = "16kB".into();
    let mut rep2 = ReplicationConfig::new("r2", "two", "g");
    rep2.batch_size = "16kB".into();
    rep2.extra = "drop_non_retryable_data = true\n".into();
    let config = AgentConfig {
        remotes: vec![tune(remote("one", &server1)), tune(remote("two", &server2))],
        replications: vec![rep1, rep2],
        ..AgentConfig::default()
    };
    let agent = Agent::start(config);

    // Conservation at every reading, while everything is in motion.
    let done = AtomicBool::new(false);
    let broken: Mutex<Vec<Value>> = Mutex::new(Vec::new());
    let readings = std::sync::atomic::AtomicUsize::new(0);
    let base = ts_ago(Duration::from_secs(7200));
    let written: Mutex<(Vec<String>, Vec<String>)> = Mutex::new((Vec::new(), Vec::new()));
    std::thread::scope(|s| {
        let _stop_monitor = SetOnDrop(&done);
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                for rep in agent.replications()["replications"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    let sum: u64 = COUNTERS.iter().map(|c| field(&rep, c)).sum();
                    if field(&rep, "acceptedLines") != sum {
                        broken.lock().unwrap().push(rep);
                    }
                }
                readings.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let (agent, written) = (&agent, &written);
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w));
                    let mut seq = 0u64;
                    for j in 0..50usize {
                        let n = rng.random_range(5..=60);
                        let mut good = Vec::new();
                        let mut bad = Vec::new();
                        let mut body = Vec::new();
                        for _ in 0..n {
                            seq += 1;
                            let ts = base + ((w * 1_000_000 + seq) * 1_000) as i64;
                            let line = if rng.random_bool(0.004) {
                                let l = format!("poison,writer=w{w} seq={seq}i {ts}");
                                bad.push(l.clone());
                                l
                            } else {
                                let l = format!(
                                    "g,writer=w{w},sensor=s{} value={:.3},seq={seq}i,note=\"write {j}\" {ts}",
                                    seq % 5,
                                    rng.random::<f64>() * 100.0
                                );
                                good.push(l.clone());
                                l
                            };
                            body.push(line);
                        }
                        let (code, text) = agent.write_v2("g", join(&body), &Opts::shape(j));
                        assert_eq!(code, 204, "writer {w} write {j}: {text}");
                        let mut wr = written.lock().unwrap();
                        wr.0.extend(good);
                        wr.1.extend(bad);
                    }
                })
            })
            .collect();
        for h in writers {
            h.join().expect("writer panicked");
        }
        for name in ["r1", "r2"] {
            agent.wait_drained_within(name, Duration::from_secs(180));
        }
        done.store(true, Ordering::SeqCst);
    });
    let (good, bad) = written.into_inner().unwrap();
    let broken = broken.into_inner().unwrap();
    assert!(
        broken.is_empty(),
        "conservation broken in {} readings, first: {:#}",
        broken.len(),
        broken[0]
    );
    assert!(readings.load(Ordering::Relaxed) > 0);
    eprintln!(
        "randomized: {} good and {} poison lines; remote 1 saw {} requests, remote 2 {}",
        good.len(),
        bad.len(),
        server1.request_count(),
        server2.request_count()
    );
    assert!(
        !bad.is_empty(),
        "seed {seed} produced no poison line; the test would prove less"
    );
    let expected: HashSet<String> = good.iter().cloned().collect();
    let total = (good.len() + bad.len()) as u64;
    for (name, server) in [("r1", &server1), ("r2", &server2)] {
        let rep = status(&agent, name);
        assert_accepted_exactly(server, &expected);
        assert_eq!(field(&rep, "acceptedLines"), total, "{rep:#}");
        assert_eq!(field(&rep, "deliveredLines"), good.len() as u64, "{rep:#}");
        assert_eq!(
            field(&rep, "droppedFullLines") + field(&rep, "expiredLines"),
            0,
            "{rep:#}"
        );
        let (dead, dropped) = (
            field(&rep, "deadLetteredLines"),
            field(&rep, "droppedNonRetryableLines"),
        );
        if name == "r1" {
            assert_eq!((dead, dropped), (bad.len() as u64, 0), "{rep:#}");
        } else {
            assert_eq!((dead, dropped), (0, bad.len() as u64), "{rep:#}");
        }
    }
}

// ---------------------------------------------------------------------------
// Real remote restarts
// ---------------------------------------------------------------------------

/// (h) VictoriaMetrics stopped and restarted 5 times while writers run:
/// every accepted line is there afterwards, counted back exactly.
///
/// The server is stopped with the harness's `stop()` (flush, SIGTERM), not
/// SIGKILL: VictoriaMetrics may lose its own last second of acknowledged
/// data on SIGKILL, which would blame the agent for the remote's loss.
#[test]
fn victoria_metrics_restarted_mid_stream_loses_nothing() {
    let Some(mut vm) = VictoriaMetrics::start() else {
        return;
    };
    let mut r = RemoteConfig::v2("vm", &vm.url());
    r.min_backoff = "50ms".into();
    r.max_backoff = "500ms".into();
    r.connect_timeout = "500ms".into();
    let mut config = AgentConfig::single(r, "sensors", Some("edge"));
    config.replications[0].batch_size = "32kB".into();
    let agent = Agent::start(config);
    let base = ts_ago(Duration::from_secs(3600));
    let done = AtomicBool::new(false);
    let expected: Mutex<HashSet<Key>> = Mutex::new(HashSet::new());
    let mut outages = 0;
    std::thread::scope(|s| {
        let _stop_writers = SetOnDrop(&done);
        for w in 0..2usize {
            let (agent, expected, done) = (&agent, &expected, &done);
            s.spawn(move || {
                let mut j = 0usize;
                while !done.load(Ordering::SeqCst) || j < 20 {
                    let start = base + ((w * 100_000 + j) as i64) * 100_000_000;
                    let body = lines("vr", 8, 200, start);
                    let (code, text) = agent.write_v2("sensors", &body, &Opts::shape(j));
                    assert_eq!(code, 204, "writer {w} write {j}: {text}");
                    expected.lock().unwrap().extend(line_keys(&body));
                    j += 1;
                    std::thread::sleep(Duration::from_millis(40));
                }
            });
        }
        for round in 0..5u64 {
            std::thread::sleep(Duration::from_millis(300 + 100 * round));
            vm.stop();
            // The agent must notice the outage while data is flowing.
            wait_until(
                DEADLINE,
                "r1 in backoff while VictoriaMetrics is down",
                || str_field(&status(&agent, "r1"), "state") == "backoff",
            );
            outages += 1;
            std::thread::sleep(Duration::from_millis(300));
            vm.restart();
        }
        done.store(true, Ordering::SeqCst);
    });
    assert_eq!(outages, 5);
    let expected = expected.into_inner().unwrap();
    let total = expected.len() as u64;
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), total, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), total, "{rep:#}");
    wait_eq(
        DEADLINE,
        "samples of vr_value at VictoriaMetrics",
        total,
        || vm.count("vr_value"),
    );
    assert!(
        vm.keys("vr_value") == expected,
        "the points at VictoriaMetrics are not the ones written"
    );
}

// ---------------------------------------------------------------------------
// The link: stalls, batches that fit, prompt shutdown
// ---------------------------------------------------------------------------

/// A remote that accepts connections and reads requests but never answers
/// (a black hole past the TCP handshake).
fn black_hole() -> Action {
    Action::stall(Duration::from_secs(600), Action::ok())
}

/// SIGTERM while the only POST hangs on a black hole: the agent exits 0
/// without waiting for it (neither `stall_timeout` nor `shutdown_timeout`,
/// both far above the bound asserted here), and after a restart every line
/// it acknowledged is delivered.
#[test]
fn sigterm_during_a_black_hole_exits_at_once_and_keeps_the_batch() {
    let server = FaultServer::with_rule(|_| black_hole());
    let mut r = remote("hole", &server);
    r.timeout = "300s".into();
    r.stall_timeout = Some("300s".into());
    let mut config = single(r, |_| {});
    config.shutdown_timeout = "120s".into();
    let mut agent = Agent::start(config);
    let all = split(&lines("sd", 3, 90, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    wait_requests(&server, 1, DEADLINE);
    // The POST is under way: status shows how much of its body went.
    wait_until(DEADLINE, "status shows the batch being sent", || {
        let rep = status(&agent, "r1");
        rep["sending"]["bytes"].as_u64().is_some_and(|b| b > 0)
            && rep["sending"]["bytesDone"] == rep["sending"]["bytes"]
    });

    let asked = Instant::now();
    let exit = agent.sigterm_and_wait();
    let took = asked.elapsed();
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    eprintln!("exited {took:?} after SIGTERM with a POST hanging");
    // Waiting for the POST would take stall_timeout (300 s), and for the
    // worker shutdown_timeout (120 s): both far beyond this bound.
    assert!(
        took < Duration::from_secs(60),
        "SIGTERM took {took:?}: shutdown waited for the hanging POST"
    );
    assert!(
        agent.log().contains("its batch stays queued"),
        "{}",
        agent.log()
    );

    server.set_rule(|_| Action::ok());
    agent.restart();
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 90, "{rep:#}");
    assert_eq!(field(&rep, "acceptedLines"), 90, "{rep:#}");
    let expected: HashSet<String> = all.into_iter().collect();
    assert_accepted_exactly(&server, &expected);
}

/// A remote that stops answering: the transfer is abandoned after
/// `stall_timeout` (not the 300 s `timeout`), status says the link is
/// `stalled` since a given time, the attempts' bodies count as sent on the
/// wire but not accepted, and once the remote answers again the batch is
/// delivered and the link is `up`.
#[test]
fn a_stalled_link_shows_in_status_and_the_batch_goes_when_it_recovers() {
    let server = FaultServer::with_rule(|_| black_hole());
    let mut r = remote("hole", &server);
    r.timeout = "300s".into();
    r.stall_timeout = Some("1s".into());
    let agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("st", 3, 120, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    // Two abandoned attempts prove the first was given up on, not waited out.
    wait_requests(&server, 2, DEADLINE);
    let rep = wait_until_status(&agent, "link stalled", |rep| {
        str_field(rep, "link") == "stalled"
    });
    assert!(rep["linkSince"].is_string(), "{rep:#}");
    assert!(
        str_field(&rep, "latestErrorMessage").contains("stall"),
        "{rep:#}"
    );
    assert_eq!(field(&rep, "deliveredLines"), 0, "{rep:#}");
    assert_eq!(field(&rep, "wireBytesAccepted"), 0, "{rep:#}");
    assert!(field(&rep, "wireBytesSent") > 0, "{rep:#}");
    let metrics = agent.get("/metrics").body;
    assert!(
        metric_value(
            &metrics,
            "replications_queue_remote_write_wire_bytes_sent",
            "r1"
        )
        .is_some_and(|v| v > 0.0),
        "{metrics}"
    );

    server.set_rule(|_| Action::ok());
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 120, "{rep:#}");
    assert_eq!(str_field(&rep, "link"), "up", "{rep:#}");
    assert!(
        field(&rep, "wireBytesSent") > field(&rep, "wireBytesAccepted"),
        "the abandoned attempts went on the wire too: {rep:#}"
    );
    let expected: HashSet<String> = all.into_iter().collect();
    assert_accepted_exactly(&server, &expected);
}

/// A link that carries only small requests: every body above `LIMIT`
/// compressed bytes stalls. The agent halves its batches after each stall
/// until they fit, and delivers every line.
#[test]
fn batches_shrink_until_the_link_carries_them() {
    const LIMIT: usize = 3_000;
    let server = FaultServer::with_rule(|req| {
        if req.wire_len > LIMIT {
            black_hole()
        } else {
            Action::ok()
        }
    });
    let mut r = remote("narrow", &server);
    r.stall_timeout = Some("1s".into());
    let agent = Agent::start(single(r, |r| r.batch_size = "500kB".into()));
    let all = split(&lines("fit", 50, 3_000, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    let rep = agent.wait_drained_within("r1", Duration::from_secs(180));
    assert_eq!(field(&rep, "deliveredLines"), 3_000, "{rep:#}");
    let expected: HashSet<String> = all.into_iter().collect();
    assert_accepted_exactly(&server, &expected);
    let requests = server.requests();
    let first = &requests[0];
    assert!(
        first.wire_len > LIMIT,
        "the first batch already fit ({} bytes): the test proves nothing",
        first.wire_len
    );
    let carried = requests.iter().filter(|r| r.wire_len <= LIMIT).count();
    let stalled = requests.len() - carried;
    eprintln!(
        "{} requests: {stalled} too large for the link, {carried} carried; first {} bytes",
        requests.len(),
        first.wire_len
    );
    assert!(
        field(&rep, "batchLimitBytes") < 500_000,
        "the batch limit grew back to batch_size although larger batches stall: {rep:#}"
    );
}

/// Polls the status of `r1` until `cond` holds (within [`DEADLINE`]).
fn wait_until_status(agent: &Agent, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    wait_until(DEADLINE, what, || {
        last = status(agent, "r1");
        cond(&last)
    });
    last
}

/// A remote that cannot be reached (connections refused) while the agent
/// backs off for 2 minutes: probes every `probe_interval` find it back, and
/// the batch goes long before the backoff would have ended.
#[test]
fn probes_find_the_remote_back_before_the_backoff_ends() {
    let closed = closed_port();
    let mut r = remote_at("away", &closed.url());
    r.min_backoff = "120s".into();
    r.max_backoff = "300s".into();
    r.probe_interval = Some("1s".into());
    let agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("pb", 3, 30, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    let rep = wait_until_status(&agent, "link down, backing off", |rep| {
        str_field(rep, "link") == "down" && str_field(rep, "state") == "backoff"
    });
    assert_eq!(field(&rep, "deliveredLines"), 0, "{rep:#}");
    wait_until_status(&agent, "a failed probe", |rep| field(rep, "probes") >= 1);

    let server = FaultServer::on(closed.listen(), |_| Action::ok());
    let opened = Instant::now();
    // Well within the 120 s the backoff would otherwise last.
    let rep = agent.wait_drained("r1");
    eprintln!(
        "delivered {:?} after the remote came back (probe_interval 1 s, backoff 120 s)",
        opened.elapsed()
    );
    assert_eq!(field(&rep, "deliveredLines"), 30, "{rep:#}");
    assert_eq!(str_field(&rep, "link"), "up", "{rep:#}");
    assert!(
        agent.log().contains("a probe reached the remote"),
        "{}",
        agent.log()
    );
    let expected: HashSet<String> = all.into_iter().collect();
    assert_accepted_exactly(&server, &expected);
}

/// A remote that asked to wait (`Retry-After`) is not probed: it answered,
/// and its pace wins.
#[test]
fn a_remote_that_asked_to_wait_is_not_probed() {
    let server = FaultServer::start();
    server.script([Action::RetryAfterSecs(503, 3)]);
    let mut r = remote("busy", &server);
    r.min_backoff = "100ms".into();
    r.max_backoff = "300s".into();
    r.probe_interval = Some("100ms".into());
    let agent = Agent::start(single(r, |_| {}));
    let all = split(&lines("ra", 3, 30, ts_ago(Duration::from_secs(600))));
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "probes"), 0, "{rep:#}");
    let waited = gap_after(&server, 0);
    assert!(
        waited >= Duration::from_secs(3),
        "retried {waited:?} after a Retry-After of 3 s"
    );
    let expected: HashSet<String> = all.into_iter().collect();
    assert_accepted_exactly(&server, &expected);
}

/// A remote that reads the head of a request and a few kB of its body, then
/// stops reading, its receive buffer kept tiny so that the agent's writes
/// soon block: a link that dies mid-body. Every connection it takes is
/// held open, unread, until it is dropped.
struct MidBodyStall {
    port: u16,
    stop: Arc<AtomicBool>,
    taken: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MidBodyStall {
    fn start() -> MidBodyStall {
        use std::io::Read as _;
        use std::os::fd::AsRawFd as _;
        let closed = closed_port();
        let port = closed.port;
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt on a socket `closed` owns, before it listens,
        // so that every accepted connection inherits the small buffer.
        let rc = unsafe {
            libc::setsockopt(
                closed.fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let listener = closed.listen();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (st, tk) = (stop.clone(), taken.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_read_timeout(Some(Duration::from_millis(500)))
                            .unwrap();
                        let mut buf = vec![0u8; 8192];
                        let _ = conn.read(&mut buf);
                        tk.fetch_add(1, Ordering::SeqCst);
                        held.push(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        MidBodyStall {
            port,
            stop,
            taken,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for MidBodyStall {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A link that dies in the middle of a body: the agent's writes block, the
/// request is abandoned after `stall_timeout` with only part of the body
/// gone, status says `stalled`, and the lines are delivered once the
/// replication points at a remote that answers.
#[test]
fn a_body_that_stops_moving_is_abandoned_and_delivered_later() {
    let stalling = MidBodyStall::start();
    let mut r = remote_at("cloud", &stalling.url());
    r.timeout = "300s".into();
    r.stall_timeout = Some("1s".into());
    let mut agent = Agent::start(single(r, |r| r.batch_size = "16MB".into()));
    // Lines that compress poorly, so that a batch's body (about 7 MB) is
    // larger than what the sockets' buffers hold (Linux grows a send buffer
    // up to 4 MiB).
    let mut rng = StdRng::seed_from_u64(13);
    let base = ts_ago(Duration::from_secs(600));
    let all: Vec<String> = (0..150_000)
        .map(|i| {
            let noise: String = (0..64)
                .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
                .collect();
            format!("mb,k=v s=\"{noise}\" {}", base + i)
        })
        .collect();
    assert_eq!(agent.write_v2("b", join(&all), &Opts::new()).0, 204);

    let rep = wait_until_status(&agent, "link stalled mid-body", |rep| {
        str_field(rep, "link") == "stalled"
    });
    assert!(
        str_field(&rep, "latestErrorMessage").contains("nothing sent"),
        "{rep:#}"
    );
    assert!(stalling.taken.load(Ordering::SeqCst) >= 1);
    assert_eq!(field(&rep, "wireBytesAccepted"), 0, "{rep:#}");
    let sent = field(&rep, "wireBytesSent");
    assert!(sent > 0, "{rep:#}");
    eprintln!("abandoned after {sent} body bytes had gone");

    let server = FaultServer::start();
    agent.config.remotes[0].url = server.url();
    agent.write_config();
    agent.sighup();
    // 150,000 lines go through a debug build and the fault remote's gunzip.
    let rep = agent.wait_drained_within("r1", Duration::from_secs(300));
    assert_eq!(field(&rep, "deliveredLines"), 150_000, "{rep:#}");
    assert_eq!(str_field(&rep, "link"), "up", "{rep:#}");
    let expected: HashSet<String> = all.into_iter().collect();
    assert_accepted_exactly(&server, &expected);
}

// ---------------------------------------------------------------------------
// Held destinations: a 404 for one bucket of a `*` replication
// ---------------------------------------------------------------------------

/// The held destinations of `name`'s status, by destination.
fn held(agent: &Agent, name: &str) -> Vec<Value> {
    status(agent, name)["heldDestinations"]
        .as_array()
        .unwrap_or_else(|| panic!("no heldDestinations array"))
        .clone()
}

/// A replication of every bucket (`*`) to the same names: a write to a
/// bucket the remote lacks (404) holds that bucket alone; the others keep
/// flowing, in order, while it waits (and is not retried before
/// `max_backoff`, 60 s here). Status, the status table and `/metrics` show
/// it. Once the remote has the bucket, `held release` delivers its lines,
/// nothing twice; a second missing bucket goes to the dead-letter store
/// with `held dead-letter`. Lines are conserved at every reading.
#[test]
fn a_missing_bucket_is_held_alone_and_the_others_keep_flowing() {
    let created = Arc::new(Mutex::new(HashSet::<String>::new()));
    let c = created.clone();
    let server = FaultServer::with_rule(move |req| {
        let bucket = req.query("bucket").unwrap_or_default();
        if bucket.starts_with("typo") && !c.lock().unwrap().contains(&bucket) {
            Action::influx_error(
                404,
                &format!("bucket \"{bucket}\" not found (fault remote)"),
            )
        } else {
            Action::ok()
        }
    });
    let mut r = remote("cloud", &server);
    r.max_backoff = "60s".into();
    let agent = Agent::start(AgentConfig::single(r, "*", None));
    let base = ts_ago(Duration::from_secs(3600));
    let good1 = split(&lines("good1", 3, 300, base));
    let typo = split(&lines("typo", 3, 200, base + 1_000_000_000));
    let good2 = split(&lines("good2", 3, 300, base + 2_000_000_000));
    let other = split(&lines("other", 3, 100, base + 3_000_000_000));
    assert_eq!(agent.write_v2("good", join(&good1), &Opts::new()).0, 204);
    assert_eq!(agent.write_v2("typo", join(&typo), &Opts::new()).0, 204);
    assert_eq!(agent.write_v2("good", join(&good2), &Opts::new()).0, 204);
    assert_eq!(agent.write_v2("other", join(&other), &Opts::new()).0, 204);

    // Everything but the missing bucket arrives, well before max_backoff.
    let flowing: HashSet<String> = good1.iter().chain(&good2).chain(&other).cloned().collect();
    wait_eq(
        Duration::from_secs(20),
        "lines of the healthy buckets at the remote (a stalled replication waits 60 s)",
        flowing.len(),
        || server.accepted_len(),
    );
    assert_accepted_exactly(&server, &flowing);
    // The remote has a batch a moment before its settlement commits.
    let mut rep = Value::Null;
    wait_until(
        DEADLINE,
        "typo held with 200 lines, the rest settled",
        || {
            rep = status(&agent, "r1");
            rep["heldDestinations"][0]["lines"] == 200 && field(&rep, "deliveredLines") == 700
        },
    );
    assert_eq!(str_field(&rep, "state"), "running", "{rep:#}");
    assert_eq!(field(&rep, "remainingLines"), 200, "{rep:#}");
    let h = &rep["heldDestinations"][0];
    assert_eq!(str_field(h, "destination"), "typo", "{rep:#}");
    assert_eq!(str_field(h, "bucket"), "typo", "{rep:#}");
    assert_eq!(field(h, "code"), 404, "{rep:#}");
    assert!(str_field(h, "message").contains("not found"), "{rep:#}");
    assert!(str_field(h, "since").ends_with('Z'), "{rep:#}");
    assert!(field(h, "bytes") > 0, "{rep:#}");
    let metrics = agent.metrics();
    assert!(
        metrics.contains("edge_replicator_held_lines{replication=\"r1\",destination=\"typo\"} 200"),
        "{metrics}"
    );
    let table = cli_ok(&agent, &["status"]);
    assert!(
        table.contains("DESTINATION") && table.contains("typo"),
        "{table}"
    );
    let list = cli_ok(&agent, &["held", "list", "--replication", "r1"]);
    assert!(list.contains("1 held destinations, 200 lines"), "{list}");

    // Still flowing while held: later writes to healthy buckets arrive, later
    // writes to the held one join it.
    let good3 = split(&lines("good3", 3, 100, base + 4_000_000_000));
    let typo2 = split(&lines("typo", 3, 50, base + 5_000_000_000));
    assert_eq!(agent.write_v2("good", join(&good3), &Opts::new()).0, 204);
    assert_eq!(agent.write_v2("typo", join(&typo2), &Opts::new()).0, 204);
    let flowing: HashSet<String> = flowing.into_iter().chain(good3).collect();
    wait_eq(DEADLINE, "good3 at the remote", flowing.len(), || {
        server.accepted_len()
    });
    wait_until(DEADLINE, "typo held with 250 lines", || {
        held(&agent, "r1")
            .first()
            .is_some_and(|h| field(h, "lines") == 250)
    });
    assert_accepted_exactly(&server, &flowing);
    let (total, _) = server.accepted_totals();
    assert_eq!(total, flowing.len() as u64, "nothing was sent twice");

    // The bucket is created; a release retries at once (max_backoff is 60 s).
    created.lock().unwrap().insert("typo".into());
    let out = cli_ok(&agent, &["held", "release", "--replication", "r1", "typo"]);
    assert!(out.contains("retrying now"), "{out}");
    let all: HashSet<String> = flowing.iter().chain(&typo).chain(&typo2).cloned().collect();
    wait_eq(
        Duration::from_secs(20),
        "held lines at the remote after the release",
        all.len(),
        || server.accepted_len(),
    );
    assert_accepted_exactly(&server, &all);
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 1_050, "{rep:#}");
    assert!(held(&agent, "r1").is_empty());
    let (total, _) = server.accepted_totals();
    assert_eq!(total, all.len() as u64, "nothing was sent twice");

    // A second missing bucket: moved to the dead-letter store by the operator.
    let lost = split(&lines("typo_db", 3, 40, base + 6_000_000_000));
    assert_eq!(agent.write_v2("typo_db", join(&lost), &Opts::new()).0, 204);
    wait_until(DEADLINE, "typo_db held", || {
        held(&agent, "r1").iter().any(|h| field(h, "lines") == 40)
    });
    let out = agent.cli(&["held", "release", "--replication", "r1", "nothing"]);
    assert!(!out.status.success(), "releasing what is not held fails");
    let out = cli_ok(
        &agent,
        &["held", "dead-letter", "--replication", "r1", "typo_db"],
    );
    assert!(
        out.contains("40 lines moved to the dead-letter store"),
        "{out}"
    );
    let rep = status(&agent, "r1");
    assert!(held(&agent, "r1").is_empty(), "{rep:#}");
    assert_eq!(field(&rep, "remainingLines"), 0, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 40, "{rep:#}");
    let (dead, reasons) = dead_letters(&agent);
    assert_eq!(dead, 40);
    assert!(reasons.iter().all(|r| r.contains("404")), "{reasons:?}");
    assert_accepted_exactly(&server, &all);
}

/// A 401 concerns every destination: a `*` replication pauses as a whole,
/// holding nothing apart.
#[test]
fn unauthorized_still_pauses_a_replication_of_every_bucket() {
    let server =
        FaultServer::with_rule(|_| Action::influx_error(401, "unauthorized access (fault remote)"));
    let agent = Agent::start(AgentConfig::single(remote("cloud", &server), "*", None));
    let base = ts_ago(Duration::from_secs(600));
    assert_eq!(
        agent
            .write_v2("a", lines("ua", 1, 10, base), &Opts::new())
            .0,
        204
    );
    assert_eq!(
        agent
            .write_v2("b", lines("ub", 1, 10, base), &Opts::new())
            .0,
        204
    );
    let rep = wait_state(&agent, "r1", "paused", DEADLINE);
    assert_eq!(rep["latestResponseCode"], 401, "{rep:#}");
    assert!(held(&agent, "r1").is_empty(), "{rep:#}");
    assert_eq!(field(&rep, "remainingLines"), 20, "{rep:#}");
}

/// A point's identity at the remote: its series key and timestamp (the
/// test's lines hold no escaped spaces).
fn point_of(line: &str) -> (String, String) {
    let series = line.split(' ').next().unwrap_or_default();
    let ts = line.rsplit(' ').next().unwrap_or_default();
    (series.into(), ts.into())
}

/// Pairs of requests (by arrival) that were at the remote together: the
/// later one had arrived whole before the earlier one's answer began.
fn in_flight_together(reqs: &[Arc<Request>]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (i, a) in reqs.iter().enumerate() {
        let Some(done) = a.answer_began.get() else {
            continue;
        };
        for (j, b) in reqs.iter().enumerate().skip(i + 1) {
            if b.at < *done {
                pairs.push((i, j));
            }
        }
    }
    pairs
}

/// Writes `rounds` small writes of 20 points each over 8 series, then the
/// last round's points again with other values: lines the remote must
/// apply after the first ones, in the batch right after them. Returns every
/// line, in order.
fn write_with_rewrites(agent: &Agent, rounds: usize) -> Vec<String> {
    let base = ts_ago(Duration::from_secs(600));
    let round = |r: usize, value: usize| -> Vec<String> {
        (0..20)
            .map(|i| {
                let n = r * 20 + i;
                format!("ahead,k=s{} v={value}i {}", n % 8, base + n as i64)
            })
            .collect()
    };
    let mut all = Vec::new();
    for r in 0..rounds {
        all.extend(round(r, r));
    }
    all.extend(round(rounds - 1, 1_000));
    for chunk in all.chunks(20) {
        assert_eq!(agent.write_v2("b", join(chunk), &Opts::new()).0, 204);
    }
    all
}

/// `max_in_flight`: with answers slow to come back (a link's round trip),
/// the batches after the one at the head go at the same time, and the
/// answers come back out of order; every line is delivered and counted
/// once, two requests at the remote together never hold the same point, and
/// a point written again reaches the remote only after the first write was
/// answered. With `max_in_flight = 1` no two requests are ever there together.
#[test]
fn slow_answers_send_batches_ahead_and_settle_each_line_once() {
    for max_in_flight in [4, 1] {
        // Even requests wait 400 ms, odd ones 100 ms: answers overtake.
        let server = FaultServer::with_rule(|req| {
            let wait = if req.seq % 2 == 0 { 400 } else { 100 };
            Action::stall(Duration::from_millis(wait), Action::ok())
        });
        let mut r = remote("cloud", &server);
        r.max_in_flight = Some(max_in_flight);
        let agent = Agent::start(single(r, |r| r.batch_size = "1kB".into()));
        let all = write_with_rewrites(&agent, 16);
        let rep = agent.wait_drained("r1");
        assert_conserved(&rep);
        assert_eq!(field(&rep, "deliveredLines"), all.len() as u64, "{rep:#}");
        let expected: HashSet<String> = all.iter().cloned().collect();
        assert_accepted_exactly(&server, &expected);

        let reqs = server.requests();
        let together = in_flight_together(&reqs);
        eprintln!(
            "max_in_flight {max_in_flight}: {} requests, {} pairs at the remote together",
            reqs.len(),
            together.len()
        );
        if max_in_flight == 1 {
            assert!(together.is_empty(), "{together:?}");
            continue;
        }
        assert!(
            !together.is_empty(),
            "no two of {} requests were in flight together",
            reqs.len()
        );
        let mut overtaken = 0;
        for &(i, j) in &together {
            let (a, b) = (&reqs[i], &reqs[j]);
            let pa: HashSet<_> = a.lines().map(point_of).collect();
            let shared: Vec<_> = b.lines().map(point_of).filter(|p| pa.contains(p)).collect();
            assert!(
                shared.is_empty(),
                "requests #{i} and #{j} were in flight together with the same points {shared:?}"
            );
            if b.answered.get() < a.answered.get() {
                overtaken += 1;
            }
        }
        assert!(overtaken > 0, "no answer overtook another: {together:?}");
        // The second write of each point arrived after the first's answer
        // began (the agent cannot have read it before), unless both went
        // in one request, in their order.
        let n = all.len();
        for line in &all[n - 40..n - 20] {
            let again = all[n - 20..]
                .iter()
                .find(|l| point_of(l) == point_of(line))
                .expect("written again");
            for first in reqs.iter().filter(|q| q.lines().any(|l| l == line)) {
                for second in reqs.iter().filter(|q| q.lines().any(|l| l == again)) {
                    if first.seq == second.seq {
                        continue;
                    }
                    let began = first.answer_began.get().expect("answered");
                    assert!(
                        second.at > *began,
                        "{again} (request #{}) arrived before {line} (request #{}) was answered",
                        second.seq,
                        first.seq
                    );
                }
            }
        }
    }
}

/// A batch sent ahead that fails, or follows one that did, is sent again
/// the ordinary way: nothing is lost or counted twice, and the failures
/// are counted.
#[test]
fn a_batch_sent_ahead_that_fails_goes_again_in_order() {
    let server = FaultServer::with_rule(|req| {
        let then = match req.seq % 5 {
            2 => Action::influx_error(500, "internal error (fault remote)"),
            4 => Action::Reset,
            _ => Action::ok(),
        };
        Action::stall(Duration::from_millis(150), then)
    });
    let mut r = remote("cloud", &server);
    r.max_in_flight = Some(3);
    let agent = Agent::start(single(r, |r| r.batch_size = "1kB".into()));
    let all = write_with_rewrites(&agent, 40);
    let rep = agent.wait_drained("r1");
    assert_conserved(&rep);
    assert_eq!(field(&rep, "deliveredLines"), all.len() as u64, "{rep:#}");
    assert_eq!(field(&rep, "droppedNonRetryableLines"), 0, "{rep:#}");
    let expected: HashSet<String> = all.iter().cloned().collect();
    assert_accepted_exactly(&server, &expected);
    let reqs = server.requests();
    assert!(!in_flight_together(&reqs).is_empty(), "nothing went ahead");
    let errors = agent.metrics();
    let counted = metric_value(
        &errors,
        "replications_queue_remote_write_errors",
        "code=\"500\"",
    )
    .unwrap_or(0.0);
    let failed = reqs.iter().filter(|q| q.seq % 5 == 2).count();
    assert_eq!(counted as usize, failed, "every 500 counted once");
}

/// `send_order`: after an outage, with `live_first` (the default) the lines
/// queued within `live_window` reach the remote right after the batch that
/// found the link back, ahead of the backlog, which drains after them; with
/// `oldest_first` they come last. Either way every line arrives once and is
/// counted once.
#[test]
fn after_an_outage_fresh_lines_go_before_the_backlog() {
    for order in ["live_first", "oldest_first"] {
        let server = FaultServer::with_rule(|_| Action::status(503));
        let mut r = remote("cloud", &server);
        r.max_backoff = "200ms".into();
        // One request at a time: requests in flight together may arrive in
        // either order, and arrival is what this test reads.
        r.max_in_flight = Some(1);
        let agent = Agent::start(single(r, |r| {
            r.batch_size = "1kB".into();
            r.extra = format!("send_order = \"{order}\"\nlive_window = \"3s\"\n");
        }));
        let base = ts_ago(Duration::from_secs(600));
        let batch = |tag: &str, from: usize, n: usize| -> Vec<String> {
            (from..from + n)
                .map(|i| format!("{tag},k=s{} v={i}i {}", i % 4, base + i as i64))
                .collect()
        };
        let mut old = Vec::new();
        for w in 0..20 {
            let lines = batch("old", w * 25, 25);
            assert_eq!(agent.write_v2("b", join(&lines), &Opts::new()).0, 204);
            old.extend(lines);
        }
        // The backlog grows older than the window; then a writer backfills
        // a point of it with another value, and fresh lines come.
        std::thread::sleep(Duration::from_millis(3_500));
        let rewrite = format!("old,k=s3 v=999999i {}", base + 7);
        assert_eq!(agent.write_v2("b", &rewrite, &Opts::new()).0, 204);
        old.push(rewrite.clone());
        // Later than the backfill was queued (ts_ago rounds down to the ms).
        let now = ts_ago(Duration::ZERO) + 1_000_000;
        let fresh: Vec<String> = (0..10)
            .map(|i| format!("fresh,k=s{} v={i}i {}", i % 4, now + i))
            .collect();
        assert_eq!(agent.write_v2("b", join(&fresh), &Opts::new()).0, 204);
        let back = server.request_count();
        server.set_rule(|_| Action::stall(Duration::from_millis(60), Action::ok()));
        let rep = agent.wait_drained("r1");
        assert_conserved(&rep);
        let total = old.len() + fresh.len();
        assert_eq!(field(&rep, "deliveredLines"), total as u64, "{rep:#}");
        let expected: HashSet<String> = old.iter().chain(&fresh).cloned().collect();
        assert_accepted_exactly(&server, &expected);

        // Arrival numbers of the requests holding a line that `matches`.
        let sent = |matches: &dyn Fn(&str) -> bool| -> Vec<usize> {
            server
                .requests()
                .iter()
                .filter(|q| q.lines().any(matches))
                .map(|q| q.seq)
                .collect()
        };
        let first_fresh = *sent(&|l| l.starts_with("fresh"))
            .iter()
            .min()
            .expect("fresh lines sent");
        let last_old = *sent(&|l| l.starts_with("old"))
            .iter()
            .max()
            .expect("old lines sent");
        let live = metric_value(
            &agent.metrics(),
            "replications_queue_remote_live_first_lines",
            "r1",
        )
        .unwrap_or(-1.0);
        eprintln!(
            "{order}: {} requests, the first after the outage #{back}; first with a fresh line #{first_fresh}, last with an old one #{last_old}; {live} lines live first",
            server.request_count(),
        );
        // The backfilled value went after the one it rewrites: it is the
        // one the remote keeps.
        let point = format!("old,k=s3 v=7i {}", base + 7);
        let last_write = |line: &str| sent(&|l| l == line).into_iter().max();
        assert!(
            last_write(&point) < last_write(&rewrite),
            "{rewrite} went before {point}"
        );
        if order == "live_first" {
            // The batch in hand when the remote came back, then the fresh
            // lines (a request or two of 503 may straddle the change).
            assert!(
                first_fresh <= back + 3 && first_fresh + 10 < last_old,
                "fresh lines went at #{first_fresh}: the remote was back at #{back}, the backlog drained until #{last_old}"
            );
            assert_eq!(live, fresh.len() as f64);
        } else {
            assert!(first_fresh >= last_old, "#{first_fresh} before #{last_old}");
            assert_eq!(live, 0.0);
        }
    }
}

/// A batch sent first after an outage (`live_first`) to a bucket the remote
/// lacks holds that bucket once, as the backlog's batch would: its lines
/// (and any of the backlog's) wait in a lane, and the 404 is not asked for
/// again between every two batches of the backlog.
#[test]
fn a_fresh_batch_for_a_missing_bucket_holds_it_once() {
    let server = FaultServer::with_rule(|_| Action::status(503));
    let mut r = remote("cloud", &server);
    r.max_backoff = "60s".into();
    r.min_backoff = "100ms".into();
    r.max_in_flight = Some(1);
    let mut config = AgentConfig::single(r, "*", None);
    config.replications[0].batch_size = "1kB".into();
    config.replications[0].extra = "live_window = \"2s\"\n".into();
    let agent = Agent::start(config);
    let base = ts_ago(Duration::from_secs(600));
    let mut good = Vec::new();
    for w in 0..15 {
        let lines: Vec<String> = (0..25)
            .map(|i| format!("good,k=s{} v={i}i {}", i % 4, base + (w * 25 + i) as i64))
            .collect();
        assert_eq!(agent.write_v2("good", join(&lines), &Opts::new()).0, 204);
        good.extend(lines);
    }
    std::thread::sleep(Duration::from_millis(2_500));
    let now = ts_ago(Duration::ZERO) + 1_000_000;
    let typo: Vec<String> = (0..5).map(|i| format!("typo v={i}i {}", now + i)).collect();
    assert_eq!(agent.write_v2("typo", join(&typo), &Opts::new()).0, 204);
    server.set_rule(|req| {
        if req.query("bucket").as_deref() == Some("typo") {
            Action::influx_error(404, "bucket \"typo\" not found (fault remote)")
        } else {
            Action::stall(Duration::from_millis(30), Action::ok())
        }
    });
    let expected: HashSet<String> = good.iter().cloned().collect();
    wait_until(DEADLINE, "the backlog at the remote", || {
        server.accepted_len() == expected.len()
    });
    assert_accepted_exactly(&server, &expected);
    let mut rep = Value::Null;
    wait_until(DEADLINE, "typo held with its 5 lines", || {
        rep = status(&agent, "r1");
        rep["heldDestinations"][0]["lines"] == 5 && field(&rep, "deliveredLines") == 375
    });
    let refused = server
        .requests()
        .iter()
        .filter(|q| q.query("bucket").as_deref() == Some("typo"))
        .count();
    // One: the held lane's first retry waits max_backoff (60 s).
    assert_eq!(
        refused,
        1,
        "requests to the missing bucket: {}",
        server.summary(10)
    );
}
