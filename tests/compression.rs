//! Lines are compressed once: large writes when they are queued, small ones
//! together when they are shipped. Either way a batch must reach the remote
//! as one gzip member holding every line: some remotes (InfluxDB 3) read
//! only the first member of a body and would drop the rest after a 204.

mod util;

use std::collections::HashSet;
use std::io::Read as _;

use util::*;

/// What a strict remote reads: the first gzip member only.
fn first_member(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(wire)
        .read_to_end(&mut out)
        .expect("a valid gzip member");
    out
}

/// Queues `bodies` while the remote is down, so that batches are cut from a
/// backlog, then lets it answer with `answer`; returns the requests it
/// answered 2xx and r1's status, having checked that each body is exactly
/// one gzip member and that every line arrived once.
fn drain_backlog(
    bodies: &[String],
    answer: impl Fn(&SinkRequest) -> (u16, String) + Send + Sync + 'static,
) -> (Vec<std::sync::Arc<SinkRequest>>, serde_json::Value) {
    let sink = Sink::start(|_| (503, String::new()));
    let agent = Agent::start(AgentConfig::single(
        RemoteConfig::v2("sink", &sink.url()),
        "b",
        None,
    ));
    for body in bodies {
        let (status, text) = agent.write_v2("b", body, &Opts::new());
        assert_eq!(status, 204, "{text}");
    }
    sink.set_handler(answer);
    wait_until(DEADLINE, "queue drained", || {
        field(&agent.replication("r1"), "remainingLines") == 0
    });
    let requests: Vec<_> = sink
        .requests()
        .into_iter()
        .filter(|r| r.answered_2xx())
        .collect();
    let mut got = Vec::new();
    for r in &requests {
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(first_member(&r.wire), r.body, "one gzip member");
        got.extend(r.lines().into_iter().map(|l| l.to_vec()));
    }
    let sent: Vec<&str> = bodies.iter().flat_map(|b| b.lines()).collect();
    assert_eq!(got.len(), sent.len(), "every line once");
    let got: HashSet<Vec<u8>> = got.into_iter().collect();
    assert!(sent.iter().all(|l| got.contains(l.as_bytes())));
    let rep = agent.replication("r1");
    assert_conserved(&rep);
    assert_eq!(field(&rep, "deliveredLines"), sent.len() as u64);
    (requests, rep)
}

#[test]
fn large_and_small_writes_arrive_whole_in_single_member_batches() {
    let base = ts_ago(std::time::Duration::from_secs(600));
    // Alternate writes well above and well below the size compressed at
    // ingest, so batches mix both kinds.
    let bodies: Vec<String> = (0..12)
        .map(|i| {
            let n = if i % 3 == 0 { 6000 } else { 40 };
            lines("z", 17, n, base + i * 100_000_000_000)
        })
        .collect();
    let bytes: usize = bodies.iter().map(String::len).sum();
    let (requests, _) = drain_backlog(&bodies, |_| (204, String::new()));
    for r in &requests {
        assert!(r.body.len() <= 500_000, "{} bytes in a batch", r.body.len());
    }
    // Batches are filled, not one request per write.
    assert!(
        requests.len() <= bytes / 350_000 + 2,
        "{} requests for {bytes} bytes",
        requests.len()
    );
}

/// The body the agent sends when it compresses a batch's lines again: one
/// gzip member at the default `gzip_level`.
fn gzip6(lines: &[u8]) -> usize {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(lines).unwrap();
    enc.finish().unwrap().len()
}

/// Writes large enough to be deflated when queued (at a low level, for the
/// writers' sake), drained through a remote answering with `answer`.
fn drain_large_writes(
    answer: impl Fn(&SinkRequest) -> (u16, String) + Send + Sync + 'static,
) -> Vec<std::sync::Arc<SinkRequest>> {
    let base = ts_ago(std::time::Duration::from_secs(600));
    let bodies: Vec<String> = (0..8)
        .map(|i| lines("z", 50, 3000, base + i * 100_000_000_000))
        .collect();
    drain_backlog(&bodies, answer).0
}

/// How the body compares with the lines compressed at level 6: 1.0 when
/// compressed again, more when sent as stored.
fn against_gzip6(r: &SinkRequest) -> f64 {
    r.wire.len() as f64 / gzip6(&r.body) as f64
}

#[test]
fn where_the_link_is_slow_writes_deflated_when_queued_go_compressed_again() {
    // Answers a third of a second after each request: the link, not the
    // agent's CPU, bounds the drain.
    let requests = drain_large_writes(|_| {
        std::thread::sleep(std::time::Duration::from_millis(300));
        (204, String::new())
    });
    assert!(requests.len() >= 2, "{} requests", requests.len());
    for r in &requests {
        let ratio = against_gzip6(r);
        assert!(
            ratio < 1.01,
            "a {}-byte body is {ratio:.3}× the lines at level 6: sent as stored",
            r.wire.len()
        );
    }
}

#[test]
fn where_the_link_is_fast_writes_deflated_when_queued_go_as_stored() {
    let requests = drain_large_writes(|_| (204, String::new()));
    let ratios: Vec<f64> = requests.iter().map(|r| against_gzip6(r)).collect();
    // The first batch is compressed again (the link's cost is not known
    // yet); once the remote has answered as fast as compressing takes, the
    // stored segments go as they are: more bytes, no CPU.
    assert!(ratios[0] < 1.01, "first body {:.3}× level 6", ratios[0]);
    assert!(
        ratios[1..].iter().any(|&r| r > 1.05),
        "every body compressed again: {ratios:.3?}"
    );
}
