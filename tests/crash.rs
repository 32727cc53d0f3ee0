//! Crashes: the agent is killed (SIGKILL) at seeded random moments while
//! writers keep writing, or aborts itself at a chosen crash point (a power
//! cut in the middle of a group commit, a settlement, a dead-letter move, a
//! source checkpoint, a hold). After every restart the queue must open cleanly and
//! account for every line it acknowledged; at the end every acknowledged line
//! must be at a real remote.
//!
//! The agent ships through a counting proxy in front of VictoriaMetrics, so
//! the lines a crash makes the agent send twice are measured, not guessed.
//!
//! Requests in flight together (`max_in_flight`) are killed against the
//! fault-injecting remote, which answers late, out of order, and sometimes
//! not at all.
//!
//! `CRASH_KILLS` (default 50) sets the number of kills of the crash loop and
//! `CRASH_SEED` its seed (printed, so a failure can be replayed); `make soak`
//! runs it with many more kills.

mod fault;
mod util;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use util::*;

/// Batches are kept small so that "about one batch resent per kill" is a
/// bound with teeth, and a run holds many batches.
const BATCH_SIZE: &str = "64kB";
const BATCH_BYTES: u64 = 64_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A point: writer `w`, sequence number `seq` (its timestamp in ms).
type Point = (u32, i64);

/// Writers posting unique points to the agent without pause, recording
/// which were acknowledged (204) and which got no clear answer.
struct Load {
    base_ms: i64,
    acked: Mutex<HashSet<Point>>,
    acked_count: AtomicU64,
    unanswered: AtomicU64,
    stop: AtomicBool,
}

impl Load {
    fn line(&self, w: u32, seq: i64) -> String {
        let ts = (self.base_ms + seq) * 1_000_000;
        format!(
            "crash,w={w},site=plant\\ 7 value={seq},temp={:.2},n={seq}i,ok=true {ts}\n",
            20.0 + (seq % 100) as f64 / 10.0
        )
    }

    /// Runs writer `w` until `stop`: bodies of 1 to 300 lines, the four
    /// body shapes in turn.
    fn writer(self: Arc<Self>, w: u32, url: String, seed: u64) {
        let http = http();
        let mut rng = StdRng::seed_from_u64(seed ^ (w as u64) << 32);
        let mut seq: i64 = 0;
        let mut i = 0;
        while !self.stop.load(Ordering::Relaxed) {
            let n = rng.random_range(1..=300);
            let body: String = (seq..seq + n).map(|s| self.line(w, s)).collect();
            let r = try_post_write(
                &http,
                &format!("{url}/api/v2/write"),
                &[("bucket", "crash")],
                body.as_bytes(),
                &Opts::shape(i),
            );
            match r {
                Ok(r) if r.status == 204 => {
                    let mut acked = self.acked.lock().unwrap();
                    acked.extend((seq..seq + n).map(|s| (w, s)));
                    self.acked_count.fetch_add(n as u64, Ordering::SeqCst);
                }
                Ok(r) if r.status == 503 => {
                    // Stopping (SIGTERM is not used here, but harmless).
                    self.unanswered.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(r) => panic!("writer {w}: unexpected answer {}: {}", r.status, r.body),
                Err(_) => {
                    // Killed mid-request, or down: these lines may or may
                    // not have been committed.
                    self.unanswered.fetch_add(n as u64, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(5));
                }
            }
            seq += n;
            i += 1;
        }
    }
}

/// VictoriaMetrics behind a counting proxy, and an agent shipping to it.
struct Rig {
    vm: VictoriaMetrics,
    proxy: Sink,
    agent: Agent,
    load: Arc<Load>,
    writers: Vec<thread::JoinHandle<()>>,
}

impl Rig {
    fn start(seed: u64, writers: u32) -> Option<Rig> {
        let vm = VictoriaMetrics::start()?;
        let proxy = Sink::forward_to(&vm.url());
        let mut config = AgentConfig::single(RemoteConfig::v2("vm", &proxy.url()), "crash", None);
        config.replications[0].batch_size = BATCH_SIZE.into();
        let agent = Agent::start(config);
        let load = Arc::new(Load {
            base_ms: ts_ago(Duration::from_secs(6 * 3600)) / 1_000_000,
            acked: Default::default(),
            acked_count: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let writers = (0..writers)
            .map(|w| {
                let (load, url) = (load.clone(), agent.url());
                thread::spawn(move || load.writer(w, url, seed))
            })
            .collect();
        Some(Rig {
            vm,
            proxy,
            agent,
            load,
            writers,
        })
    }

    /// Checks a freshly restarted agent: it opened its queue without
    /// complaint, its counters add up, and it counts at least every line it
    /// acknowledged before the crash.
    fn check_reopened(&mut self, cycle: usize) {
        let log = self.agent.log_since_last("start");
        for bad in ["ERROR", "panicked", "corrupt", "checksum", "set aside"] {
            assert!(
                !log.contains(bad),
                "cycle {cycle}: restart log mentions {bad:?}:\n{log}"
            );
        }
        // Acks counted first: each of them was committed before the status read.
        let acked = self.load.acked_count.load(Ordering::SeqCst);
        let rep = self.agent.replication("r1");
        assert_conserved(&rep);
        let accepted = field(&rep, "acceptedLines");
        assert!(
            accepted >= acked,
            "cycle {cycle}: the reopened queue counts {accepted} accepted lines, but {acked} were acknowledged: {rep:#}"
        );
    }

    /// Stops the writers, lets the agent drain, and checks that every
    /// acknowledged point is at VictoriaMetrics. Returns (acknowledged
    /// lines, lines sent more than once).
    fn finish(mut self) -> (u64, u64) {
        self.load.stop.store(true, Ordering::Relaxed);
        for w in self.writers.drain(..) {
            w.join().expect("writer thread");
        }
        wait_until(Duration::from_secs(180), "queue drained", || {
            let rep = self.agent.replication("r1");
            assert_conserved(&rep);
            field(&rep, "remainingLines") == 0
        });
        let rep = self.agent.replication("r1");
        for c in ["droppedFullLines", "expiredLines", "deadLetteredLines"] {
            assert_eq!(field(&rep, c), 0, "{c}: {rep:#}");
        }
        // What the remote acknowledged to the agent, counted with repeats.
        let mut sent: HashMap<Point, u32> = HashMap::new();
        for line in self.proxy.lines_accepted() {
            let text = String::from_utf8(line).unwrap();
            *sent
                .entry(parse_point(&text, self.load.base_ms))
                .or_default() += 1;
        }
        let total: u64 = sent.values().map(|&n| n as u64).sum();
        let resent = total - sent.len() as u64;
        let acked = self.load.acked.lock().unwrap();
        let mut at_vm = vm_points(&self.vm, self.load.base_ms);
        let mut missing: Vec<&Point> = acked.iter().filter(|p| !at_vm.contains(p)).collect();
        // VictoriaMetrics answers 204 before every row it took is searchable,
        // and its force_flush can miss rows that are on their way into a
        // searchable part at that moment: such rows show up a moment later.
        // A row that never shows up is a loss.
        let first_missing = missing.len();
        let asked = Instant::now();
        while !missing.is_empty() && asked.elapsed() < Duration::from_secs(30) {
            thread::sleep(Duration::from_millis(500));
            at_vm = vm_points(&self.vm, self.load.base_ms);
            missing = acked.iter().filter(|p| !at_vm.contains(p)).collect();
        }
        if first_missing > 0 && missing.is_empty() {
            eprintln!(
                "victoria-metrics showed {first_missing} of {} acknowledged points only {:.1?} \
                 after the first export",
                acked.len(),
                asked.elapsed()
            );
        }
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged points are not at the remote, e.g. {:?}\n{}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)],
            self.where_they_went(&missing, &sent)
        );
        // Nothing reaches the remote that was not written.
        let delivered = field(&rep, "deliveredLines");
        assert_eq!(
            delivered,
            sent.len() as u64,
            "deliveredLines counts each line once"
        );
        assert_eq!(at_vm.len(), sent.len(), "the remote holds what was sent");
        (acked.len() as u64, resent)
    }
}

impl Rig {
    /// For a failure report: which ports were whose, what the proxy saw
    /// and answered, and what VictoriaMetrics holds, so that a loss can be
    /// told from a harness that read the wrong server.
    fn where_they_went(&self, missing: &[&Point], sent: &HashMap<Point, u32>) -> String {
        let requests = self.proxy.requests();
        let mut answers: HashMap<u16, usize> = HashMap::new();
        for r in &requests {
            *answers
                .entry(r.status.get().copied().unwrap_or(0))
                .or_default() += 1;
        }
        let through_proxy = missing.iter().filter(|p| sent.contains_key(*p)).count();
        // The requests that carried missing points: how long before this
        // report each was answered.
        let missing: HashSet<&Point> = missing.iter().copied().collect();
        let carriers: Vec<String> = requests
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.lines().iter().any(|l| {
                    let text = String::from_utf8_lossy(l);
                    missing.contains(&parse_point(&text, self.load.base_ms))
                })
            })
            .map(|(i, r)| format!("#{i} ({} B, {:.1?} ago)", r.wire.len(), r.at.elapsed()))
            .collect();
        let series = self.vm.export("{__name__=~\"crash_.*\"}").len();
        format!(
            "ports: agent {}, proxy {}, victoria-metrics {} (pid {:?}, listening on {:?}); \
             the proxy got {} requests, answered {:?}; {through_proxy} of the missing points \
             were accepted through it, in requests {carriers:?}; victoria-metrics holds \
             {series} crash_* series",
            self.agent.port,
            self.proxy.port,
            self.vm.port,
            self.vm.pid(),
            self.vm.pid().map(listening_ports),
            requests.len(),
            answers,
        )
    }
}

fn parse_point(line: &str, base_ms: i64) -> Point {
    let w = line
        .strip_prefix("crash,w=")
        .and_then(|r| r.split(',').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("not a crash line: {line:?}"));
    let ts: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    (w, ts / 1_000_000 - base_ms)
}

fn vm_points(vm: &VictoriaMetrics, base_ms: i64) -> HashSet<Point> {
    let mut out = HashSet::new();
    for series in vm.export("crash_value") {
        let w: u32 = series["metric"]["w"].as_str().unwrap().parse().unwrap();
        for ts in series["timestamps"].as_array().unwrap() {
            out.insert((w, ts.as_i64().unwrap() - base_ms));
        }
    }
    out
}

/// SIGKILL at seeded random moments under concurrent load: sometimes in the
/// middle of start-up, mostly while writes commit and batches ship.
#[test]
fn sigkill_loop_under_load_loses_nothing_acknowledged() {
    let kills = env_u64("CRASH_KILLS", 50) as usize;
    let seed = env_u64("CRASH_SEED", 0x5eed_c0de);
    eprintln!("crash loop: {kills} kills, CRASH_SEED={seed}");
    let Some(mut rig) = Rig::start(seed, 3) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut during_startup = 0;
    for cycle in 0..kills {
        thread::sleep(Duration::from_millis(rng.random_range(20..400)));
        rig.agent.kill9();
        if rng.random_bool(0.15) {
            // Killed again while it opens its queue and starts up.
            rig.agent.launch_with(&Launch::new());
            thread::sleep(Duration::from_millis(rng.random_range(0..30)));
            if rig.agent.is_running() {
                rig.agent.kill9();
            } else {
                panic!("cycle {cycle}: the agent exited on its own during start-up");
            }
            during_startup += 1;
        }
        rig.agent.spawn_with(&Launch::new());
        rig.check_reopened(cycle);
    }
    let elapsed = started.elapsed();
    let unanswered = rig.load.unanswered.load(Ordering::Relaxed);
    let (acked, resent) = rig.finish();
    let kills_total = kills + during_startup;
    eprintln!(
        "crash loop: {kills_total} SIGKILLs ({during_startup} during start-up) in {:.0?}; \
         {acked} lines acknowledged, all delivered; {unanswered} lines without an answer; \
         {resent} lines sent twice ({:.1} per kill)",
        elapsed,
        resent as f64 / kills as f64
    );
    // About one batch per kill at most: the batch in flight when it died.
    let line_len = 75;
    let per_batch = BATCH_BYTES / line_len;
    assert!(
        resent <= kills as u64 * per_batch,
        "{resent} lines resent over {kills} kills: more than one batch ({per_batch} lines) per kill"
    );
}

/// The agent aborts itself at a crash point (as a power cut would stop it
/// there), is restarted, and goes on; several times per point.
fn crash_points_under_load(points: &[&str], rounds: usize) {
    let seed = env_u64("CRASH_SEED", 0xc0ffee);
    let Some(mut rig) = Rig::start(seed, 2) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut crashes = 0;
    for point in points {
        for round in 0..rounds {
            let n = rng.random_range(1..20);
            rig.agent.kill9();
            let spec = format!("{point}:{n}");
            // It may reach the point before it answers /health.
            rig.agent
                .launch_with(&Launch::new().env("EDGE_REPLICATOR_CRASH_AT", &spec));
            let status = rig
                .agent
                .wait_exit(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("{spec}: the agent did not reach the crash point"));
            assert_eq!(
                status.signal(),
                Some(libc::SIGABRT),
                "{spec}: expected an abort, got {status}"
            );
            let log = rig.agent.log_since_last("start");
            assert!(
                log.contains(&format!("crash point \"{point}\" reached")),
                "{spec}: {log}"
            );
            rig.agent.spawn_with(&Launch::new());
            rig.check_reopened(round);
            crashes += 1;
        }
    }
    let (acked, resent) = rig.finish();
    eprintln!(
        "crash points {points:?}: {crashes} crashes; {acked} lines acknowledged, all delivered; \
         {resent} lines sent twice"
    );
}

#[test]
fn crash_in_group_commit_loses_nothing_acknowledged() {
    crash_points_under_load(&["commit", "committed"], 4);
}

#[test]
fn crash_while_settling_a_shipped_batch_loses_nothing() {
    crash_points_under_load(&["settle"], 5);
}

/// One write at a time, no remote: a crash just before the commit loses the
/// write that was not answered (the transaction never happened), a crash
/// just after it keeps the write although it was never answered (a client's
/// retry then overwrites). Either way the queue holds whole writes only.
#[test]
fn a_write_is_in_the_queue_exactly_when_its_commit_happened() {
    for (point, kept) in [("commit-write", false), ("committed-write", true)] {
        let closed = closed_port();
        let config = AgentConfig::single(RemoteConfig::v2("down", &closed.url()), "b", None);
        let mut agent = Agent::start(config);
        let base = ts_ago(Duration::from_secs(3600));
        let acked = 100;
        let r = agent.write_v2_reply("b", lines("cw", 5, acked, base).as_bytes(), &Opts::new());
        assert_eq!(r.status, 204, "{}", r.body);
        agent.kill9();
        // Armed at the first commit that queues lines: this write's (the
        // writer's housekeeping commits queue none).
        let crash = Launch::new().env("EDGE_REPLICATOR_CRASH_AT", point);
        agent.launch_with(&crash);
        if let Err(status) = agent.wait_ready(Duration::from_secs(30)) {
            panic!("{point}: the agent exited ({status}) before any write");
        }
        let before = field(&agent.replication("r1"), "remainingLines");
        let body = lines("cw", 5, 40, base + 1_000_000_000);
        if let Ok(r) = agent.try_write_v2("b", body.as_bytes(), &Opts::new()) {
            panic!(
                "{point}: a write was answered ({}) although the crash point was armed",
                r.status
            );
        }
        let status = agent
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{point}: the agent did not crash on the write"));
        assert_eq!(status.signal(), Some(libc::SIGABRT), "{point}: {status}");
        agent.spawn_with(&Launch::new());
        let rep = agent.replication("r1");
        assert_conserved(&rep);
        let expected = if kept { before + 40 } else { before };
        assert_eq!(
            field(&rep, "remainingLines"),
            expected,
            "{point}: queue after the crash: {rep:#}"
        );
    }
}

/// A crash as refused lines move to the dead-letter store: after the
/// restart the batch is sent again, the same lines are refused again, and
/// they are dead-lettered once, not twice, with every good line delivered.
#[test]
fn crash_while_moving_refused_lines_to_dead_letter() {
    let Some(influx) = Influx16::start() else {
        return;
    };
    influx.create_db("dl");
    let base = ts_ago(Duration::from_secs(1800));
    // The field is an integer at the remote: floats for it are refused.
    let r = influx.write("dl", &format!("conf,k=seed value=1i {base}\n"));
    assert_eq!(r.status, 204, "{}", r.body);
    let config = AgentConfig::single(RemoteConfig::v1("influx", &influx.url()), "dl", Some("dl"));
    let mut agent = Agent::stopped(config);
    agent.write_config_with(&Launch::new());
    let mut poison_total = 0;
    let mut good_total = 0;
    for round in 0..2i64 {
        agent.launch_with(&Launch::new().env("EDGE_REPLICATOR_CRASH_AT", "dead-letter"));
        agent
            .wait_ready(Duration::from_secs(30))
            .expect("agent starts");
        let mut body = String::new();
        for i in 0..300i64 {
            let ts = base + (round * 1000 + i + 1) * 1_000_000;
            if i % 97 == 13 {
                body += &format!("conf,k=p{round}x{i} value=1.5 {ts}\n");
                poison_total += 1;
            } else {
                body += &format!("good,k=g value={i}i {ts}\n");
                good_total += 1;
            }
        }
        let (status, text) = agent.write_v1("dl", None, &body, &Opts::new());
        assert_eq!(status, 204, "{text}");
        let exit = agent
            .wait_exit(Duration::from_secs(60))
            .expect("the agent reaches the dead-letter crash point");
        assert_eq!(exit.signal(), Some(libc::SIGABRT), "{exit}");
        agent.spawn_with(&Launch::new());
        wait_until(DEADLINE, "refused lines dead-lettered", || {
            let rep = agent.replication("r1");
            assert_conserved(&rep);
            field(&rep, "remainingLines") == 0
        });
        let rep = agent.replication("r1");
        assert_eq!(field(&rep, "deadLetteredLines"), poison_total, "{rep:#}");
        assert_eq!(field(&rep, "deliveredLines"), good_total, "{rep:#}");
        let out = agent.cli(&["dead-letter", "list", "--json", "--replication", "r1"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let lines: u64 = list["deadLetters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["lines"].as_u64().unwrap())
            .sum();
        assert_eq!(lines, poison_total, "stored once: {list:#}");
        agent.sigterm_and_wait();
    }
    assert_eq!(influx.count("dl", "good", "value"), good_total);
}

/// A crash as a tailed file's new position commits with the lines read up
/// to it: after the restart the file is read on from the position committed
/// last, so every line is queued exactly once (`acceptedLines` equals the
/// lines written) and delivered.
#[test]
fn crash_while_committing_a_source_checkpoint_queues_each_line_once() {
    let sink = Sink::accept_all();
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("metrics.lp");
    let config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "files", None);
    let launch = Launch::new().append(&format!(
        "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"50ms\"\n",
        toml_str(&path.display().to_string())
    ));
    let mut agent = Agent::stopped(config);
    agent.write_config_with(&launch);
    let all = lines("ckpt", 7, 4 * 700, ts_ago(Duration::from_secs(3600)));
    let all: Vec<&str> = all.lines().collect();
    let mut written = 0;
    let crash = launch.clone().env("EDGE_REPLICATOR_CRASH_AT", "checkpoint");
    for (round, chunk) in all.chunks(700).enumerate() {
        let text: String = chunk.iter().map(|l| format!("{l}\n")).collect();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .unwrap();
        written += chunk.len() as u64;
        agent.launch_with(&crash);
        let status = agent
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("round {round}: the checkpoint crash point was not reached"));
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "round {round}: {status}"
        );
        agent.spawn_with(&launch);
        wait_eq(DEADLINE, "every line queued", written, || {
            field(&agent.replication("r1"), "acceptedLines")
        });
        thread::sleep(Duration::from_millis(300));
        let rep = agent.replication("r1");
        assert_eq!(
            field(&rep, "acceptedLines"),
            written,
            "queued twice: {rep:#}"
        );
        agent.kill9();
    }
    agent.spawn_with(&launch);
    wait_eq(DEADLINE, "every line delivered", written, || {
        field(&agent.replication("r1"), "deliveredLines")
    });
    let sent: HashSet<Vec<u8>> = sink.lines_accepted().into_iter().collect();
    assert_eq!(sent.len() as u64, written);
    assert!(all.iter().all(|l| sent.contains(l.as_bytes())));
}

/// A crash in the commit that holds a destination (a `*` replication, a
/// database the remote lacks): the hold commits with the move of its lines
/// or not at all. After the restart the lines are still queued, held again
/// at the next 404, and the other database's lines arrive; a kill while it
/// is held keeps the hold; once the database exists, a reload delivers the
/// held lines. Lines are conserved at every reading.
#[test]
fn crash_while_holding_a_destination_loses_nothing() {
    let Some(influx) = Influx16::start() else {
        return;
    };
    influx.create_db("plant");
    let mut remote = RemoteConfig::v1("influx", &influx.url());
    remote.max_backoff = "60s".into();
    let mut agent = Agent::stopped(AgentConfig::single(remote, "*", None));
    agent.write_config_with(&Launch::new());
    agent.launch_with(&Launch::new().env("EDGE_REPLICATOR_CRASH_AT", "hold"));
    agent
        .wait_ready(Duration::from_secs(30))
        .expect("agent starts");
    let base = ts_ago(Duration::from_secs(900));
    let body = |m: &str, n: i64| -> String {
        (0..n)
            .map(|i| format!("{m},k=a value={i}i {}\n", base + i * 1_000_000))
            .collect()
    };
    assert_eq!(
        agent
            .write_v1("plant", None, body("ok1", 300), &Opts::new())
            .0,
        204
    );
    assert_eq!(
        agent
            .write_v1("typo_db", None, body("typo", 200), &Opts::new())
            .0,
        204
    );
    let exit = agent
        .wait_exit(Duration::from_secs(60))
        .expect("the agent reaches the hold crash point");
    assert_eq!(exit.signal(), Some(libc::SIGABRT), "{exit}");

    agent.spawn_with(&Launch::new());
    // Behind the lines the crash left in the main log.
    assert_eq!(
        agent
            .write_v1("plant", None, body("ok2", 300), &Opts::new())
            .0,
        204
    );
    let held_alone = |agent: &Agent| {
        let rep = agent.replication("r1");
        assert_conserved(&rep);
        rep["heldDestinations"][0]["lines"] == 200
            && rep["remainingLines"] == 200
            && rep["acceptedLines"] == 800
    };
    wait_until(DEADLINE, "typo_db held again after the restart", || {
        held_alone(&agent)
    });
    wait_eq(DEADLINE, "count(value) of ok1 and ok2", 600, || {
        influx.count("plant", "ok1", "value") + influx.count("plant", "ok2", "value")
    });

    // Killed while held: the hold is on disk, and is tried again at once.
    let pid = agent.pid();
    // SAFETY: signals our own child process.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let exit = agent.wait_exit(Duration::from_secs(30)).expect("killed");
    assert_eq!(exit.signal(), Some(libc::SIGKILL), "{exit}");
    agent.spawn_with(&Launch::new());
    wait_until(DEADLINE, "typo_db still held after a kill", || {
        held_alone(&agent)
    });

    influx.create_db("typo_db");
    agent.sighup();
    wait_eq(
        Duration::from_secs(30),
        "count(value) of typo after CREATE DATABASE + SIGHUP",
        200,
        || influx.count("typo_db", "typo", "value"),
    );
    let rep = agent.wait_drained("r1");
    assert_conserved(&rep);
    assert_eq!(field(&rep, "deliveredLines"), 800, "{rep:#}");
    assert_eq!(rep["heldDestinations"], serde_json::json!([]), "{rep:#}");
    agent.sigterm_and_wait();
}

/// `max_in_flight`: killed while several requests are in flight, their
/// answers coming back late, out of order and sometimes failing, the agent
/// counts each line delivered once. The model is the list of acknowledged
/// lines: after every restart `deliveredLines + remainingLines` is exactly
/// their number (a batch answered but not settled before the kill is sent
/// again, and counted only when its settlement commits); at the end the
/// remote holds each of them and `deliveredLines` is their number.
#[test]
fn killed_with_requests_in_flight_counts_each_line_once() {
    let seed = env_u64("CRASH_SEED", 0xa4ead);
    eprintln!("requests in flight under kills: CRASH_SEED={seed}");
    let answers = Mutex::new(StdRng::seed_from_u64(seed ^ 0x5a5a));
    let server = fault::FaultServer::with_rule(move |_| {
        let mut rng = answers.lock().unwrap();
        let wait = Duration::from_millis(rng.random_range(60..400));
        let then = match rng.random_range(0..10) {
            0 => fault::Action::status(503),
            1 => fault::Action::Reset,
            _ => fault::Action::ok(),
        };
        fault::Action::stall(wait, then)
    });
    let mut remote = RemoteConfig::v2("cloud", &server.url());
    remote.min_backoff = "50ms".into();
    remote.max_backoff = "300ms".into();
    remote.max_in_flight = Some(4);
    let mut config = AgentConfig::single(remote, "b", None);
    config.replications[0].batch_size = "1kB".into();
    let mut agent = Agent::start(config);
    let mut rng = StdRng::seed_from_u64(seed);
    let base = ts_ago(Duration::from_secs(600));
    let mut acked: Vec<String> = Vec::new();
    for cycle in 0..12 {
        for _ in 0..rng.random_range(1..6) {
            let n = acked.len();
            let body: Vec<String> = (n..n + 20)
                .map(|i| format!("inflight,k=s{} v={i}i {}", i % 8, base + i as i64))
                .collect();
            let (code, text) = agent.write_v2("b", body.join("\n") + "\n", &Opts::new());
            assert_eq!(code, 204, "cycle {cycle}: {text}");
            acked.extend(body);
        }
        thread::sleep(Duration::from_millis(rng.random_range(50..900)));
        agent.kill9();
        agent.restart();
        let rep = agent.replication("r1");
        assert_conserved(&rep);
        assert_eq!(
            field(&rep, "deliveredLines") + field(&rep, "remainingLines"),
            acked.len() as u64,
            "cycle {cycle}: a line counted twice or lost: {rep:#}"
        );
    }
    let rep = agent.wait_drained("r1");
    assert_conserved(&rep);
    assert_eq!(field(&rep, "deliveredLines"), acked.len() as u64, "{rep:#}");
    let expected: HashSet<String> = acked.into_iter().collect();
    let got = server.accepted();
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    assert!(missing.is_empty(), "not at the remote: {missing:?}");
    assert_eq!(
        got.len(),
        expected.len(),
        "lines the agent never acknowledged"
    );
    let reqs = server.requests();
    let together = reqs.iter().enumerate().any(|(i, a)| {
        a.answer_began
            .get()
            .is_some_and(|done| reqs[i + 1..].iter().any(|b| b.at < *done))
    });
    assert!(
        together,
        "no two of {} requests were in flight together",
        reqs.len()
    );
    agent.sigterm_and_wait();
}

/// A crash in the commit that releases lines the clock guard held: nothing
/// of the release happened, so after the restart the same lines are
/// released again, once: each stamped line is delivered with its arrival
/// time, and the line stamped before the build date is set aside once.
#[test]
fn crash_while_releasing_lines_held_for_the_clock_releases_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    let behind = 40 * 365 * 86_400;
    std::fs::write(&clock, format!("before-build offset=-{behind} boot=crash")).unwrap();
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    config.clock = String::new();
    let launch = Launch::new().env("EDGE_REPLICATOR_CLOCK_FILE", clock.to_str().unwrap());
    let mut agent = Agent::start_with(config, &launch);
    let before = util::now_ns();
    let mut body: String = (0..30).map(|i| format!("held,n={i} v=1\n")).collect();
    body.push_str("held,n=early v=2 1000000000\n");
    let r = agent.write_v2_reply("b", body.as_bytes(), &Opts::new());
    let after = util::now_ns();
    assert_eq!(r.status, 204, "{}", r.body);
    wait_until(DEADLINE, "state clock", || {
        str_field(&agent.replication("r1"), "state") == "clock"
    });
    agent.kill9();

    std::fs::write(&clock, "synchronised boot=crash").unwrap();
    agent.launch_with(
        &launch
            .clone()
            .env("EDGE_REPLICATOR_CRASH_AT", "clock-release"),
    );
    let status = agent
        .wait_exit(Duration::from_secs(60))
        .expect("the agent did not crash on the release");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
    assert!(sink.lines_accepted().is_empty(), "sent before the release");

    agent.spawn_with(&launch);
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 30, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 1, "{rep:#}");
    let lines = sink.lines_accepted();
    assert_eq!(lines.len(), 30);
    for l in &lines {
        let (l, ts) = split_time(l);
        assert!(
            (before - 1_000_000_000..=after + 1_000_000_000).contains(&ts),
            "{l}: not stamped with its arrival ({before}..{after})"
        );
    }
}
