//! The agent on a bad link, end to end: VictoriaMetrics runs in a network
//! namespace of the test's own ([`NetLab`]), reached over a veth pair that
//! the test black-holes (iptables inside the namespace), flaps, and shapes
//! to a crawl (`tc tbf`). Every test compares the set of points written with
//! the set the remote holds, checks conservation of lines, and follows the
//! link in status (`up`, `stalled`, `down`).
//!
//! Needs root, iproute2 and iptables (scripts/install-test-deps.sh); under
//! `CI=true` a missing prerequisite fails the test, elsewhere it is skipped.

mod util;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

/// `stall_timeout` of the remote in these tests (the default is 10 s).
const STALL: Duration = Duration::from_secs(3);

/// How long to wait, beyond what a test is about, on a shared, noisy machine.
const MARGIN: Duration = Duration::from_secs(10);

/// The remote `vm` in `lab` at `url`, with a short `stall_timeout` and
/// `probe_interval` so that outages of seconds show.
fn remote(url: &str) -> RemoteConfig {
    let mut r = RemoteConfig::v2("vm", url);
    r.stall_timeout = Some(format!("{}s", STALL.as_secs()));
    r.probe_interval = Some("2s".into());
    r.connect_timeout = "2s".into();
    r
}

/// An agent with replication `r1` from local bucket `sensors` to `url`.
fn agent_for(url: &str, tweak: impl FnOnce(&mut AgentConfig)) -> Agent {
    let mut config = AgentConfig::single(remote(url), "sensors", Some("edge"));
    tweak(&mut config);
    Agent::start(config)
}

fn keys_of(body: &str) -> HashSet<Key> {
    line_keys(body).into_iter().collect()
}

/// Writes `body` to `sensors`; panics unless the agent acknowledged it.
fn write(agent: &Agent, body: &str) {
    let (status, text) = agent.write_v2("sensors", body, &Opts::new());
    assert_eq!(status, 204, "write refused: {text}");
}

/// Polls r1's status until `cond` holds (within `timeout`); returns it.
fn wait_status(
    agent: &Agent,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let waited = Instant::now();
    wait_until(timeout, what, || {
        last = agent.replication("r1");
        cond(&last)
    });
    eprintln!("{what}: after {:?}", waited.elapsed());
    last
}

/// Exact delivery: the remote holds exactly the points written, and r1
/// counted each of them delivered once.
fn assert_delivered_exactly(
    vm: &VictoriaMetrics,
    metric: &str,
    written: &HashSet<Key>,
    rep: &Value,
) {
    assert_conserved(rep);
    let n = written.len() as u64;
    assert_eq!(field(rep, "acceptedLines"), n, "{rep:#}");
    assert_eq!(field(rep, "deliveredLines"), n, "{rep:#}");
    wait_eq(
        DEADLINE,
        &format!("distinct samples of {metric}"),
        n,
        || vm.keys(metric).len() as u64,
    );
    let held = vm.keys(metric);
    let missing = written.difference(&held).count();
    let foreign = held.difference(written).count();
    assert!(
        missing == 0 && foreign == 0,
        "the remote holds other points than were written: {missing} missing, {foreign} never written"
    );
    assert!(
        field(rep, "wireBytesSent") >= field(rep, "wireBytesAccepted")
            && field(rep, "wireBytesAccepted") > 0,
        "wire counters: {rep:#}"
    );
}

/// A client writing `per_write` lines of `metric` to the agent every
/// `every` until stopped; keeps the keys of every acknowledged line.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HashSet<Key>>>,
}

impl Writer {
    fn start(agent: &Agent, metric: &str, per_write: usize, every: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{}/api/v2/write", agent.url());
        let (metric, flag) = (metric.to_string(), stop.clone());
        let base = ts_ago(Duration::from_secs(7_200));
        let thread = std::thread::spawn(move || {
            let client = http();
            let mut keys = HashSet::new();
            let mut i = 0i64;
            while !flag.load(Ordering::SeqCst) {
                let body = lines(&metric, 10, per_write, base + i * 1_000_000_000);
                let reply = post_write(
                    &client,
                    &url,
                    &[("org", "test-org"), ("bucket", "sensors")],
                    body.as_bytes(),
                    &Opts::new(),
                );
                assert_eq!(reply.status, 204, "write {i}: {}", reply.body);
                keys.extend(line_keys(&body));
                i += 1;
                std::thread::sleep(every);
            }
            keys
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops writing; the keys of every line written.
    fn finish(mut self) -> HashSet<Key> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().unwrap().join() {
            Ok(keys) => keys,
            Err(e) => std::panic::resume_unwind(e),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a watcher saw of r1's status, polled every 100 ms: each change of
/// `link` (with the time since the watch began), and the largest body seen
/// under way (`sending`).
#[derive(Default, Debug)]
struct Seen {
    links: Vec<(Duration, String)>,
    max_sending: u64,
}

/// Watches r1's status in the background until dropped or finished.
struct Watch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    fn start(agent: &Agent) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let url = format!("{}/api/v2/replications", agent.url());
        let (flag, out) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let client = http();
            let began = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                let status: Option<Value> = client
                    .get(&url)
                    .call()
                    .ok()
                    .and_then(|mut r| r.body_mut().read_to_string().ok())
                    .and_then(|t| serde_json::from_str(&t).ok());
                if let Some(rep) = status.as_ref().and_then(|s| s["replications"].get(0)) {
                    let link = str_field(rep, "link").to_string();
                    let mut seen = out.lock().unwrap();
                    if seen.links.last().map(|(_, l)| l) != Some(&link) {
                        seen.links.push((began.elapsed(), link));
                    }
                    if let Some(bytes) = rep["sending"]["bytes"].as_u64() {
                        seen.max_sending = seen.max_sending.max(bytes);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.take().unwrap().join();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The link states seen, in order, without times.
fn states(seen: &Seen) -> Vec<&str> {
    seen.links.iter().map(|(_, l)| l.as_str()).collect()
}

/// A writer keeps writing while the link black-holes every packet for 15 s
/// with a batch in flight (the link shaped, so batches take a while): the
/// request is abandoned within `stall_timeout`, status says `stalled`, the
/// link is `up` again soon after it returns, and every point arrives once.
#[test]
fn a_black_hole_mid_post_stalls_then_everything_arrives() {
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    let agent = agent_for(&vm.url(), |_| {});
    lab.shape("256kbit", "16kb");
    let watch = Watch::start(&agent);
    let writer = Writer::start(&agent, "bh", 200, Duration::from_millis(250));
    wait_status(&agent, DEADLINE, "a first delivery", |rep| {
        field(rep, "deliveredLines") > 0
    });
    // A backlog, so that a large body (about 40 kB, a second or more on
    // this link) goes out; the black hole opens while it is under way.
    let base = ts_ago(Duration::from_secs(3 * 7_200));
    let mut backlog = HashSet::new();
    for i in 0..8 {
        let body = lines("bh", 10, 1_000, base + i * 1_000_000_000);
        write(&agent, &body);
        backlog.extend(keys_of(&body));
    }
    let mut rep = Value::Null;
    let deadline = Instant::now() + DEADLINE;
    while rep["sending"]["bytes"].as_u64().unwrap_or(0) < 20_000 {
        assert!(
            Instant::now() < deadline,
            "no large body under way: {rep:#}"
        );
        std::thread::sleep(Duration::from_millis(10));
        rep = agent.replication("r1");
    }
    eprintln!("black hole with {} under way", rep["sending"]);
    lab.black_hole();
    let dropped = Instant::now();
    let rep = wait_status(&agent, STALL + MARGIN, "link stalled", |rep| {
        str_field(rep, "link") == "stalled"
    });
    eprintln!("stalled {:?} after the black hole began", dropped.elapsed());
    assert!(
        str_field(&rep, "latestErrorMessage").contains("stalled"),
        "{rep:#}"
    );
    assert!(rep["linkSince"].is_string(), "{rep:#}");
    let stalled_since = rep["linkSince"].clone();
    while dropped.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let rep = agent.replication("r1");
    assert_ne!(str_field(&rep, "link"), "up", "{rep:#}");
    assert!(field(&rep, "remainingLines") > 0, "{rep:#}");
    assert_conserved(&rep);

    lab.restore();
    let restored = Instant::now();
    let rep = wait_status(&agent, DEADLINE, "link up again", |rep| {
        str_field(rep, "link") == "up"
    });
    eprintln!("up {:?} after the link returned", restored.elapsed());
    assert_ne!(rep["linkSince"], stalled_since, "{rep:#}");
    let mut written = writer.finish();
    written.extend(backlog);
    let rep = agent.wait_drained_within("r1", Duration::from_secs(120));
    let seen = watch.finish();
    eprintln!("link states seen: {:?}", seen.links);
    lab.unshape();
    let states = states(&seen);
    let stalled_at = states.iter().position(|l| *l == "stalled");
    assert!(
        states.first() == Some(&"up") && stalled_at.is_some_and(|i| states[i..].contains(&"up")),
        "expected up, stalled, ..., up: {states:?}"
    );
    assert_delivered_exactly(&vm, "bh_value", &written, &rep);
    assert!(
        agent.log().contains("the link to the remote stalls"),
        "no log line about the stall"
    );
}

/// The link goes away for 3 s and comes back for 3 s, four times, while a
/// writer writes: every point arrives once, and status followed the link.
#[test]
fn a_flapping_link_loses_nothing() {
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    let agent = agent_for(&vm.url(), |_| {});
    let watch = Watch::start(&agent);
    let writer = Writer::start(&agent, "flap", 200, Duration::from_millis(100));
    wait_status(&agent, DEADLINE, "a first delivery", |rep| {
        field(rep, "deliveredLines") > 0
    });
    for _ in 0..4 {
        lab.black_hole();
        std::thread::sleep(Duration::from_secs(3));
        lab.restore();
        std::thread::sleep(Duration::from_secs(3));
    }
    let written = writer.finish();
    let rep = agent.wait_drained_within("r1", Duration::from_secs(120));
    let seen = watch.finish();
    eprintln!("link states seen: {:?}", seen.links);
    assert!(
        states(&seen).iter().any(|l| *l != "up"),
        "the link never looked anything but up: the outages proved nothing"
    );
    assert_eq!(str_field(&rep, "link"), "up", "{rep:#}");
    assert_delivered_exactly(&vm, "flap_value", &written, &rep);
}

/// A backlog over a 256 kbit/s link: it drains, `sending` shows bodies under
/// way, the wire counters add up, and no line is both dropped and delivered.
#[test]
fn a_backlog_crosses_a_256_kbit_link() {
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    lab.shape("256kbit", "16kb");
    let agent = agent_for(&vm.url(), |_| {});
    let watch = Watch::start(&agent);
    let base = ts_ago(Duration::from_secs(3_600));
    let mut written = HashSet::new();
    for i in 0..20 {
        let body = lines("tbf", 10, 1_000, base + i * 1_000_000_000);
        write(&agent, &body);
        written.extend(keys_of(&body));
    }
    let queued = Instant::now();
    let rep = agent.wait_drained_within("r1", Duration::from_secs(120));
    let seen = watch.finish();
    eprintln!(
        "drained in {:?}: {} wire bytes sent, {} accepted, largest body under way {} bytes",
        queued.elapsed(),
        field(&rep, "wireBytesSent"),
        field(&rep, "wireBytesAccepted"),
        seen.max_sending
    );
    // Reading the points back need not crawl.
    lab.unshape();
    assert!(seen.max_sending > 0, "never saw a body under way: {seen:?}");
    for c in [
        "droppedFullLines",
        "expiredLines",
        "droppedNonRetryableLines",
        "deadLetteredLines",
    ] {
        assert_eq!(field(&rep, c), 0, "{c}: {rep:#}");
    }
    assert_delivered_exactly(&vm, "tbf_value", &written, &rep);
}

/// A queue too small for what is written over a 256 kbit/s link, with
/// `drop_oldest`: the oldest lines are evicted while batches are on the way
/// (which may take lines of the batch under way). Every line is counted
/// once, delivered or dropped,
/// and the remote holds exactly as many points as were counted delivered.
#[test]
fn lines_evicted_on_a_slow_link_are_counted_once() {
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    lab.shape("256kbit", "16kb");
    let agent = agent_for(&vm.url(), |c| {
        // No stall here: an abandoned body may still reach the remote.
        c.remotes[0].stall_timeout = Some("30s".into());
        c.remotes[0].timeout = "30s".into();
        let r = &mut c.replications[0];
        r.max_queue_size = "200kB".into();
        r.batch_size = "100kB".into();
        r.when_full = "drop_oldest".into();
    });
    let base = ts_ago(Duration::from_secs(3_600));
    let mut written = HashSet::new();
    // Spread over a few seconds, so that evictions meet batches under way.
    for i in 0..30 {
        let body = lines("ev", 10, 1_000, base + i * 1_000_000_000);
        write(&agent, &body);
        written.extend(keys_of(&body));
        std::thread::sleep(Duration::from_millis(100));
    }
    let rep = agent.wait_drained_within("r1", Duration::from_secs(120));
    lab.unshape();
    let delivered = field(&rep, "deliveredLines");
    let dropped = field(&rep, "droppedFullLines");
    eprintln!("{delivered} lines delivered, {dropped} evicted");
    assert!(
        dropped > 0,
        "nothing was evicted: the test proves nothing: {rep:#}"
    );
    assert_eq!(delivered + dropped, 30_000, "{rep:#}");
    wait_until(DEADLINE, "samples of ev_value >= deliveredLines", || {
        vm.keys("ev_value").len() as u64 >= delivered
    });
    let held = vm.keys("ev_value");
    assert!(
        held.is_subset(&written),
        "the remote holds points never written"
    );
    assert_eq!(
        held.len() as u64,
        delivered,
        "the remote holds another number of points than were counted delivered: {rep:#}"
    );
}

/// A 12 kbit/s link carries a 20 kB body in about 13 s, longer than
/// `stall_timeout` (10 s here) and than the remote's `timeout` (5 s). The
/// body fits in the kernel's send buffer, so the socket takes it at once and
/// the agent then waits for the answer while TCP still sends it: a send queue that keeps shrinking is progress, not a
/// stall. The batch goes once (`wireBytesSent` equals `wireBytesAccepted`),
/// the link is never reported `stalled`, and every point arrives once.
/// (Before the send queue was watched, this link was reported stalled and
/// the batch resent in halves: 30.7 kB on the wire for 10.4 kB accepted.)
#[test]
fn a_12_kbit_link_carries_a_batch_without_a_stall() {
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    lab.shape("12kbit", "4kb");
    let agent = agent_for(&vm.url(), |c| {
        c.replications[0].batch_size = "200kB".into();
        // The default: a shaper this thin drops packets, and TCP's
        // retransmission backoff alone can leave the send queue still for
        // the 3 s the other tests use.
        c.remotes[0].stall_timeout = Some("10s".into());
    });
    let watch = Watch::start(&agent);
    let body = lines("slow", 10, 1_600, ts_ago(Duration::from_secs(3_600)));
    let written = keys_of(&body);
    write(&agent, &body);

    let rep = agent.wait_drained_within("r1", Duration::from_secs(120));
    let seen = watch.finish();
    eprintln!(
        "over 12 kbit/s: {} wire bytes sent, {} accepted; link states seen: {:?}",
        field(&rep, "wireBytesSent"),
        field(&rep, "wireBytesAccepted"),
        seen.links
    );
    assert!(!states(&seen).contains(&"stalled"), "{seen:?}");
    assert_eq!(field(&rep, "batchLimitBytes"), 200_000, "{rep:#}");
    assert_eq!(
        field(&rep, "wireBytesSent"),
        field(&rep, "wireBytesAccepted"),
        "a body went more than once: {rep:#}"
    );
    assert_delivered_exactly(&vm, "slow_value", &written, &rep);
}

/// Two remotes that cannot be reached: one refuses connections (nothing
/// listens in the namespace yet), one has a host name that does not
/// resolve. Status says so, the lines stay queued; once VictoriaMetrics
/// listens, the first drains.
#[test]
fn refused_and_unresolvable_remotes_keep_the_data() {
    let Some(lab) = NetLab::new() else { return };
    let Some(mut vm) = VictoriaMetrics::stopped_in(&lab) else {
        return;
    };
    let agent = agent_for(&vm.url(), |c| {
        let mut nowhere = remote("http://er-no-such-host.invalid:8428");
        nowhere.name = "nowhere".into();
        c.remotes.push(nowhere);
        // Waits longer than `probe_interval` are spent probing.
        for r in &mut c.remotes {
            r.min_backoff = "5s".into();
            r.max_backoff = "60s".into();
        }
        c.replications
            .push(ReplicationConfig::new("r2", "nowhere", "sensors").remote_bucket("edge"));
    });
    let body = lines("away", 10, 500, ts_ago(Duration::from_secs(3_600)));
    let written = keys_of(&body);
    write(&agent, &body);

    for name in ["r1", "r2"] {
        let mut rep = Value::Null;
        wait_until(DEADLINE, &format!("{name} backing off, link down"), || {
            rep = agent.replication(name);
            str_field(&rep, "state") == "backoff" && str_field(&rep, "link") == "down"
        });
        eprintln!("{name}: {}", str_field(&rep, "latestErrorMessage"));
        assert_eq!(field(&rep, "remainingLines"), 500, "{rep:#}");
        assert_eq!(field(&rep, "deliveredLines"), 0, "{rep:#}");
        assert!(rep["linkSince"].is_string(), "{rep:#}");
        assert_conserved(&rep);
    }
    let r1 = agent.replication("r1");
    assert!(
        str_field(&r1, "latestErrorMessage").contains("refused"),
        "{r1:#}"
    );
    let r2 = agent.replication("r2");
    let why = str_field(&r2, "latestErrorMessage").to_lowercase();
    assert!(
        ["resolve", "dns", "lookup", "name"]
            .iter()
            .any(|w| why.contains(w)),
        "{r2:#}"
    );
    wait_status(&agent, DEADLINE, "a failed probe", |rep| {
        field(rep, "probes") >= 1
    });

    vm.restart();
    let rep = agent.wait_drained("r1");
    assert_eq!(str_field(&rep, "link"), "up", "{rep:#}");
    assert_delivered_exactly(&vm, "away_value", &written, &rep);
    let r2 = agent.replication("r2");
    assert_eq!(field(&r2, "remainingLines"), 500, "{r2:#}");
    assert_eq!(str_field(&r2, "link"), "down", "{r2:#}");
    assert_conserved(&r2);
}

/// The agent is stopped (SIGTERM) while a POST hangs in a black hole, and
/// started again while the link is still out: it exits promptly, keeps
/// every line, and drains once the link returns.
#[test]
fn a_restart_during_an_outage_loses_nothing() {
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    let mut agent = agent_for(&vm.url(), |c| {
        // Neither would end the hanging POST before the agent exits.
        c.remotes[0].stall_timeout = Some("60s".into());
        c.remotes[0].timeout = "60s".into();
        c.shutdown_timeout = "60s".into();
    });
    let base = ts_ago(Duration::from_secs(3_600));
    let mut written = HashSet::new();
    let first = lines("rs", 10, 1_000, base);
    write(&agent, &first);
    written.extend(keys_of(&first));
    wait_status(&agent, DEADLINE, "first lines delivered", |rep| {
        field(rep, "deliveredLines") == 1_000
    });

    lab.black_hole();
    let second = lines("rs", 10, 2_000, base + 1_000_000_000);
    write(&agent, &second);
    written.extend(keys_of(&second));
    wait_status(
        &agent,
        DEADLINE,
        "a POST under way in the black hole",
        |rep| !rep["sending"].is_null(),
    );
    // Let it hang a moment: the POST is surely past its connect.
    std::thread::sleep(Duration::from_secs(1));
    let stopping = Instant::now();
    let status = agent.sigterm_and_wait();
    let took = stopping.elapsed();
    eprintln!("exited {took:?} after SIGTERM with a POST in a black hole");
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(30),
        "SIGTERM took {took:?} with a POST hanging (stall_timeout 60 s)"
    );

    agent.restart();
    let third = lines("rs", 10, 1_000, base + 2_000_000_000);
    write(&agent, &third);
    written.extend(keys_of(&third));
    let rep = wait_status(&agent, DEADLINE, "link down after the restart", |rep| {
        str_field(rep, "link") != "up" && str_field(rep, "state") == "backoff"
    });
    assert_eq!(field(&rep, "remainingLines"), 3_000, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 1_000, "{rep:#}");
    assert_conserved(&rep);

    lab.restore();
    let rep = agent.wait_drained("r1");
    assert_eq!(str_field(&rep, "link"), "up", "{rep:#}");
    assert_delivered_exactly(&vm, "rs_value", &written, &rep);
}

/// A daily budget on a real link, spent by attempts into a black hole as
/// much as by deliveries: once it is spent nothing more crosses the link (no
/// request, no probe, no reconnect: the veth's own counters stand still),
/// the lines wait, and a larger budget on reload lets every one of them
/// through, once. The budget's count is checked against the IP bytes that
/// crossed the veth, both ways: never less, and for a delivery at most a
/// fifth more.
#[test]
fn a_budget_spent_into_a_black_hole_stops_all_traffic_until_raised() {
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    let config = AgentConfig::single(remote(&vm.url()), "sensors", Some("edge"));
    let agent = Agent::start_with(
        config,
        &Launch::new().append("[link]\ndaily_budget = \"12kB\"\n"),
    );
    // A first write goes while the link is up, so that the next request is
    // under way on an open connection when the link goes dark.
    let base = ts_ago(Duration::from_secs(3_600));
    let first = lines("bud", 10, 10, base);
    write(&agent, &first);
    wait_status(&agent, DEADLINE, "the first lines delivered", |rep| {
        field(rep, "deliveredLines") == 10
    });
    lab.black_hole();
    let before = lab.wire_bytes();
    let body = lines("bud", 10, 3_000, base + 1_000_000_000);
    write(&agent, &body);
    let mut written = keys_of(&first);
    written.extend(keys_of(&body));
    let rep = wait_status(&agent, DEADLINE + MARGIN, "the budget spent", |rep| {
        str_field(rep, "state") == "budget"
    });
    assert_eq!(field(&rep, "deliveredLines"), 10, "{rep:#}");
    assert_eq!(field(&rep, "remainingLines"), 3_000, "{rep:#}");
    let budget = &agent.replications()["budgets"][0];
    let used = budget["budgetUsed"].as_u64().unwrap();
    assert!(used >= 12_000, "{budget:#}");
    let spent_on_link = lab.wire_bytes() - before;
    eprintln!("budget: {used} bytes counted, {spent_on_link} IP bytes crossed the veth");
    assert!(
        spent_on_link > 0 && field(&rep, "wireBytesSent") > 0,
        "nothing was attempted: {rep:#}"
    );
    assert!(
        used >= spent_on_link,
        "{spent_on_link} bytes crossed the link, {used} counted"
    );

    // Spent: longer than a probe interval and a backoff, nothing moves.
    let still = lab.wire_bytes();
    std::thread::sleep(Duration::from_secs(6));
    let moved = lab.wire_bytes() - still;
    assert!(
        moved < 1_000,
        "{moved} bytes crossed the link with the budget spent"
    );
    assert_eq!(str_field(&agent.replication("r1"), "state"), "budget");

    lab.restore();
    let (before, used_before) = (lab.wire_bytes(), used);
    agent.write_config_with(&Launch::new().append("[link]\ndaily_budget = \"50MB\"\n"));
    agent.sighup();
    let rep = agent.wait_drained("r1");
    let crossed = lab.wire_bytes() - before;
    let used = agent.replications()["budgets"][0]["budgetUsed"]
        .as_u64()
        .unwrap()
        - used_before;
    eprintln!("delivery: {used} bytes counted, {crossed} IP bytes crossed the veth");
    // What the budget counts covers what a carrier would, without
    // overstating it much.
    assert!(
        used >= crossed && used <= crossed + crossed / 5,
        "{used} bytes counted for {crossed} that crossed the link"
    );
    assert_delivered_exactly(&vm, "bud_value", &written, &rep);
}

/// A cap of 16 kB/s on a real link: while a backlog drains, the IP bytes
/// that cross the veth (bodies, HTTP, TCP/IP framing, both ways) come no
/// faster than the cap allows: its one second's worth at the start, the cap
/// after, and a fifth on top for what the cap does not count (framing: 7 %
/// with full segments). A slow machine can only make the drain slower, so
/// the bound holds however busy it is. Every line arrives. (The cap once
/// granted the bytes that trickled in since the last grant, a few at a
/// time, each written as a packet of its own: 1.4 MB crossed the link for
/// 50 kB of bodies.)
#[test]
fn a_capped_link_carries_no_more_than_the_cap_across_the_veth() {
    const CAP: f64 = 16_000.0;
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    let mut config = AgentConfig::single(remote(&vm.url()), "sensors", Some("edge"));
    config.replications[0].batch_size = "64kB".into();
    let agent = Agent::start_with(
        config,
        &Launch::new().append("[link]\nmax_bandwidth = \"16kB/s\"\n"),
    );
    let body = lines("cap", 10, 4_000, ts_ago(Duration::from_secs(3_600)));
    let before = lab.wire_bytes();
    let started = Instant::now();
    write(&agent, &body);
    let rep = agent.wait_drained("r1");
    let took = started.elapsed().as_secs_f64();
    let crossed = (lab.wire_bytes() - before) as f64;
    eprintln!(
        "{crossed} IP bytes in {took:.1} s: {:.0} bytes/s against a cap of {CAP}; bodies {}",
        crossed / took,
        field(&rep, "wireBytesSent")
    );
    assert!(
        crossed > 3.0 * CAP,
        "too little to measure a cap: {crossed} bytes"
    );
    assert!(
        crossed <= 1.2 * CAP * (took + 1.0),
        "{crossed} bytes crossed in {took:.1} s under a cap of {CAP} bytes/s"
    );
    assert_delivered_exactly(&vm, "cap_value", &keys_of(&body), &rep);
}

/// The lab itself: its namespace and veth pair exist while it lives, its
/// black hole stops connections to the remote and lets them through again
/// once restored, and nothing of it is left after it is dropped.
#[test]
fn the_lab_removes_what_it_made() {
    let Some(lab) = NetLab::new() else { return };
    let Some(vm) = VictoriaMetrics::start_in(&lab) else {
        return;
    };
    let namespaces = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect::<Vec<_>>()
    };
    let (ns, host_if) = (lab.ns.clone(), lab.host_if.clone());
    let interface = std::path::Path::new("/sys/class/net").join(&host_if);
    assert!(namespaces().contains(&ns), "{ns} not in {:?}", namespaces());
    assert!(interface.exists(), "{host_if} missing");

    let addr = std::net::SocketAddr::from((lab.ns_ip, vm.port));
    let connect = || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    assert!(
        connect().is_ok(),
        "the remote is not reachable over the veth"
    );
    lab.black_hole();
    assert!(
        connect().is_err(),
        "a connection went through the black hole"
    );
    lab.restore();
    assert!(
        connect().is_ok(),
        "the remote is not reachable after restore"
    );

    drop(vm);
    drop(lab);
    assert!(!namespaces().contains(&ns), "{ns} left behind");
    assert!(!interface.exists(), "{host_if} left behind");
}
