//! Metered links (`[link]`): a data budget stops sending when it is spent,
//! survives a restart, and gives way to a larger one on reload; a capped link
//! never carries more than the cap allows.

mod util;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

fn budgets(agent: &Agent) -> Value {
    agent.replications()["budgets"].clone()
}

fn sink_agent(link: &str, batch: &str) -> (Sink, Agent, Launch) {
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    config.replications[0].batch_size = batch.into();
    let launch = Launch::new().append(link);
    let agent = Agent::start_with(config, &launch);
    (sink, agent, launch)
}

/// `n` lines that gzip compresses little (about 25 bytes a line): each
/// carries 16 pseudo-random bytes in hex.
fn noisy_lines(measurement: &str, n: usize) -> String {
    let ts = ts_ago(Duration::from_secs(600));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = String::new();
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let y = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        out.push_str(&format!(
            "{measurement},sensor=s{} v={}i,h=\"{x:016x}{y:016x}\" {}\n",
            i % 20,
            x % 1000,
            ts + i as i64
        ));
    }
    out
}

fn accepted_keys(sink: &Sink) -> HashSet<String> {
    sink.lines_accepted()
        .into_iter()
        .map(|l| String::from_utf8(l).unwrap())
        .collect()
}

/// A daily budget of 30 kB: shipping stops once it is spent (state
/// `budget`, the budget in status), nothing more reaches the remote, a
/// restart does not hand out a new budget, and a reload with a larger one
/// lets everything through, exactly once.
#[test]
fn a_spent_budget_stops_sending_until_a_larger_one() {
    let (sink, mut agent, _) = sink_agent("[link]\ndaily_budget = \"30kB\"\n", "4kB");
    let body = noisy_lines("metered", 3_000);
    let written: HashSet<String> = body.lines().map(str::to_string).collect();
    assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 204);

    wait_eq(DEADLINE, "r1 state", "budget".to_string(), || {
        str_field(&agent.replication("r1"), "state").to_string()
    });
    let rep = agent.replication("r1");
    assert!(field(&rep, "remainingLines") > 0, "{rep:#}");
    assert!(rep["nextRetryAt"].is_string(), "{rep:#}");
    let b = budgets(&agent);
    assert_eq!(b[0]["period"], "day", "{b:#}");
    assert_eq!(b[0]["budgetBytes"], 30_000, "{b:#}");
    assert_eq!(b[0]["budgetLeft"], 0, "{b:#}");
    let used = b[0]["budgetUsed"].as_u64().unwrap();
    // Spent, overshot by at most the batch under way and its HTTP.
    assert!((30_000..30_000 + 8_000).contains(&used), "{b:#}");
    let wire: u64 = sink.requests().iter().map(|r| r.wire.len() as u64).sum();
    assert!(
        wire <= used,
        "{wire} body bytes reached the remote, {used} counted"
    );
    let metrics = agent.metrics();
    assert_eq!(
        metric_value(&metrics, "edge_replicator_link_budget_used_bytes", "day"),
        Some(used as f64)
    );

    // Nothing more goes while the budget is spent, across a restart too.
    let requests = sink.requests().len();
    assert!(agent.sigterm_and_wait().success());
    agent.restart();
    wait_eq(
        DEADLINE,
        "r1 state after a restart",
        "budget".to_string(),
        || str_field(&agent.replication("r1"), "state").to_string(),
    );
    assert!(budgets(&agent)[0]["budgetUsed"].as_u64().unwrap() >= used);
    assert_eq!(
        sink.requests().len(),
        requests,
        "sent with the budget spent"
    );

    // A larger budget on reload: the rest goes, and everything arrived once.
    agent.write_config_with(&Launch::new().append("[link]\ndaily_budget = \"50MB\"\n"));
    agent.sighup();
    let rep = agent.wait_drained("r1");
    assert_eq!(str_field(&rep, "state"), "running");
    assert_eq!(accepted_keys(&sink), written);
    assert_eq!(sink.lines_accepted().len(), written.len(), "a line twice");
}

/// A cap of 8 kB/s: the bodies reach the remote no faster than the cap
/// allows (the bucket starts with one second's worth), and all arrive.
#[test]
fn a_capped_link_carries_no_more_than_the_cap() {
    const CAP: f64 = 8_000.0;
    let (sink, agent, _) = sink_agent("[link]\nmax_bandwidth = \"8kB/s\"\n", "16kB");
    let body = noisy_lines("capped", 1_600);
    let written: HashSet<String> = body.lines().map(str::to_string).collect();
    let started = Instant::now();
    assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 204);
    agent.wait_drained("r1");
    let took = started.elapsed().as_secs_f64();
    let wire: u64 = sink.requests().iter().map(|r| r.wire.len() as u64).sum();
    eprintln!(
        "{wire} body bytes in {took:.2} s: {:.0} B/s",
        wire as f64 / took
    );
    assert!(
        wire > 24_000,
        "only {wire} bytes: the test needs several seconds' worth"
    );
    // A lower bound on the time taken: a slow machine only makes it longer.
    assert!(
        wire as f64 <= CAP * (took + 1.0),
        "{wire} body bytes in {took:.2} s through a cap of {CAP} B/s"
    );
    assert_eq!(accepted_keys(&sink), written);
}

/// On a budgeted link a batch goes in whichever form is smaller: as stored,
/// or ordered by series at gzip level 9. Here 1,000 series with long random
/// tag values are written interleaved, so a series' key comes back only
/// every 70 kB, beyond gzip's 32 kB window: ordered by series, each key is
/// compressed once. The batch arrives in series order and in well under the
/// bytes the same lines take in arrival order.
#[test]
fn a_metered_link_sends_a_batch_ordered_by_series_when_that_is_smaller() {
    let (sink, agent, _) = sink_agent("[link]\ndaily_budget = \"1GB\"\n", "500kB");
    let ts = ts_ago(Duration::from_secs(600));
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let ids: Vec<String> = (0..1_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let y = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            format!("{x:016x}{y:016x}{:08x}", x >> 32)
        })
        .collect();
    let mut body = String::new();
    for round in 0..3 {
        for id in &ids {
            body.push_str(&format!("m,id={id} v={round}i {}\n", ts + round));
        }
    }
    let written: HashSet<String> = body.lines().map(str::to_string).collect();
    assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 204);
    agent.wait_drained("r1");
    assert_eq!(accepted_keys(&sink), written);
    let arrival = gzip(body.as_bytes()).len();
    let wire: usize = sink.requests().iter().map(|r| r.wire.len()).sum();
    assert!(
        wire * 10 < arrival * 6,
        "{wire} bytes on the wire; {arrival} in arrival order"
    );
    for r in sink.requests() {
        let text = String::from_utf8(r.body.clone()).unwrap();
        let keys: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "not in series order");
    }
}

/// On a metered link a small batch of fresh lines waits (5 s by default)
/// for more before it goes: twenty writes a tenth of a second apart reach
/// the remote in one or two requests instead of about twenty, each request
/// being headers and acknowledgements paid for whatever it carries. With
/// `batch_wait = "0s"` each write goes on its own again.
#[test]
fn small_writes_share_a_request_on_a_metered_link() {
    let send = |sink: &Sink, agent: &Agent| {
        let base = ts_ago(Duration::from_secs(60));
        for w in 0..20 {
            let body: String = (0..5)
                .map(|i| format!("m,w={w} v={i}i {}\n", base + (w * 5 + i) as i64))
                .collect();
            assert_eq!(agent.write_v2("b", body, &Opts::new()).0, 204);
            std::thread::sleep(Duration::from_millis(100));
        }
        agent.wait_drained("r1");
        assert_eq!(sink.lines_accepted().len(), 100);
        sink.requests().len()
    };
    let (sink, agent, _) = sink_agent("[link]\ndaily_budget = \"100MB\"\n", "500kB");
    let requests = send(&sink, &agent);
    assert!((1..=2).contains(&requests), "{requests} requests");
    drop(agent);

    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    config.replications[0].extra = "batch_wait = \"0s\"\n".into();
    let launch = Launch::new().append("[link]\ndaily_budget = \"100MB\"\n");
    let agent = Agent::start_with(config, &launch);
    let requests = send(&sink, &agent);
    assert!(requests >= 5, "{requests} requests without a wait");
}
