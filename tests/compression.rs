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

#[test]
fn large_and_small_writes_arrive_whole_in_single_member_batches() {
    // Down while the writes arrive, so that batches are cut from a backlog.
    let sink = Sink::start(|_| (503, String::new()));
    let agent = Agent::start(AgentConfig::single(
        RemoteConfig::v2("sink", &sink.url()),
        "b",
        None,
    ));
    let base = ts_ago(std::time::Duration::from_secs(600));
    let mut sent: Vec<String> = Vec::new();
    let mut bytes = 0;
    for i in 0..12 {
        // Alternate writes well above and well below the size compressed at
        // ingest, so batches mix both kinds.
        let n = if i % 3 == 0 { 6000 } else { 40 };
        let body = lines("z", 17, n, base + i * 100_000_000_000);
        let (status, text) = agent.write_v2("b", &body, &Opts::new());
        assert_eq!(status, 204, "{text}");
        bytes += body.len();
        sent.extend(body.lines().map(String::from));
    }
    sink.set_handler(|_| (204, String::new()));
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
        let strict = first_member(&r.wire);
        assert_eq!(strict, r.body, "the body is exactly one gzip member");
        assert!(strict.len() <= 500_000, "{} bytes in a batch", strict.len());
        got.extend(r.lines().into_iter().map(|l| l.to_vec()));
    }
    assert_eq!(got.len(), sent.len(), "every line once");
    let got: HashSet<Vec<u8>> = got.into_iter().collect();
    assert!(sent.iter().all(|l| got.contains(l.as_bytes())));
    // Batches are filled, not one request per write.
    assert!(
        requests.len() <= bytes / 350_000 + 2,
        "{} requests for {bytes} bytes",
        requests.len()
    );
    let rep = agent.replication("r1");
    assert_conserved(&rep);
    assert_eq!(field(&rep, "deliveredLines"), sent.len() as u64);
}
