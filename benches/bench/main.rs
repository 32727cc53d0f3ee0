//! `make bench`: edge-replicator measured side by side with vmagent (Debian's
//! `victoria-metrics` package) and against the hardware's own limits, in one
//! run, on the same data, with the same client.
//!
//! 1. durable ingest with the remote down (hey, 5,000-line bodies, 4 clients):
//!    lines/s, ack latency, CPU per million lines, disk bytes per byte, RSS;
//! 2. end to end with the remote up (a discarding sink): ingest, then until
//!    everything was delivered;
//! 3. a backlog of at least 1 GiB: start-to-ready and RSS with it, its drain
//!    to the discarding sink (against the single-core gzip limit of the same
//!    data, measured here with the agent's own flate2 backend) and to
//!    VictoriaMetrics;
//! 4. an outage and recovery of the remote under steady load, plotted;
//! 5. idle cost: wakeups per second and CPU per hour with nothing to do
//!    (empty queue, data queued for a dead remote, a polled `[[tail]]`);
//! 6. peak RSS while 16 and 64 clients post one large body each at once;
//! 7. links: a steady load over a 256 kbit/s and a 1 Mbit/s link, a 600 ms
//!    round trip, a link flapping 5 s down, 5 s up, and a black hole, to
//!    VictoriaMetrics in a network namespace (`link.rs`; needs root);
//! 8. the bandwidth cap: bytes per second at the remote against a cap of
//!    32 and 128 kB/s, draining a backlog over loopback (`cap.rs`);
//! 9. a long round trip: a backlog drained through a 600 ms round trip with
//!    `max_in_flight` 1, 2 and 4, and by vmagent (`rtt.rs`);
//! 10. live first: after an outage on a 1 Mbit/s cap, how soon a fresh line
//!     reaches the remote through a backlog, and the drain's length, with
//!     `send_order` `live_first` and `oldest_first` (`live.rs`);
//! 11. with `BENCH_ONLY=profile` only (`make profile`): the agent under
//!     `perf` while it ingests each mix, a flame graph each, and the share of
//!     each stage (`profile.rs`).
//!
//! Results: a markdown table (medians, with min–max over the runs, and
//! ratios taken run by run) printed and written to `target/bench/`, with a
//! JSON of every sample and `outage.svg`. `BENCH_QUICK=1` shrinks everything
//! to a smoke test. Without `--bench` (as `cargo test` starts it) only the
//! data generator is checked.

mod cap;
mod gen;
mod link;
mod live;
mod load;
mod procs;
mod profile;
mod quiet;
mod report;
mod rtt;
mod sink;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::json;

use gen::{Generator, Mix};
use procs::{field, Proc};
use report::{median, quantile, Row, Sample, Target};
use sink::Sink;

const LINES_PER_BODY: usize = 5_000;
const CLIENTS: usize = 4;
const GIB: u64 = 1 << 30;
const BATCH_SIZE: usize = 500_000;
const GZIP_LEVEL: u32 = 6;

/// How much of everything; `BENCH_QUICK=1` makes it a smoke test.
struct Sizes {
    quick: bool,
    runs: usize,
    requests: usize,
    pool_bodies: usize,
    backlog_bytes: u64,
    drain_runs: usize,
    gzip_min_bytes: usize,
    outage: (f64, f64, f64),
}

impl Sizes {
    fn from_env() -> Sizes {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
        let runs = std::env::var("BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok());
        if quick {
            Sizes {
                quick,
                runs: runs.unwrap_or(2),
                requests: 40,
                pool_bodies: 8,
                backlog_bytes: 24 << 20,
                drain_runs: runs.unwrap_or(2),
                gzip_min_bytes: 8 << 20,
                outage: (12.0, 3.0, 6.0),
            }
        } else {
            Sizes {
                quick,
                runs: runs.unwrap_or(5),
                requests: 600,
                pool_bodies: 64,
                backlog_bytes: GIB,
                drain_runs: runs.unwrap_or(3),
                gzip_min_bytes: 256 << 20,
                outage: (40.0, 8.0, 20.0),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Ours,
    Vm,
}

/// `BENCH_BASELINE=path`: another build of edge-replicator takes vmagent's
/// place, to measure a change against the code before it in the same run.
fn baseline() -> Option<&'static PathBuf> {
    static B: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    B.get_or_init(|| std::env::var_os("BENCH_BASELINE").map(PathBuf::from))
        .as_ref()
}

/// The name of the second column.
fn other_name() -> &'static str {
    if baseline().is_some() {
        "baseline"
    } else {
        "vmagent"
    }
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Ours => "edge-replicator",
            Who::Vm => other_name(),
        }
    }

    /// Both orders alternate between runs, so drift in the machine's load
    /// does not always favour the same side.
    fn order(run: usize) -> [Who; 2] {
        if run.is_multiple_of(2) {
            [Who::Ours, Who::Vm]
        } else {
            [Who::Vm, Who::Ours]
        }
    }

    /// Starts it in `dir` on `port`, shipping to the remote at `remote`
    /// (`http://host:port`), and waits until it answers /health.
    fn start(
        self,
        ctx: &Ctx,
        dir: &Path,
        port: u16,
        remote: &str,
        max_backoff: &str,
    ) -> (Proc, Duration) {
        self.start_with(ctx, dir, port, remote, max_backoff, "")
    }

    /// [`Who::start`], with `extra` TOML in edge-replicator's config
    /// (vmagent has no equivalent and ignores it).
    fn start_with(
        self,
        ctx: &Ctx,
        dir: &Path,
        port: u16,
        remote: &str,
        max_backoff: &str,
        extra: &str,
    ) -> (Proc, Duration) {
        let bin = match (self, baseline()) {
            (Who::Vm, Some(b)) => Some(b),
            (Who::Ours, _) => Some(&ctx.bin),
            (Who::Vm, None) => None,
        };
        let mut p = match bin {
            Some(bin) => procs::start_agent(
                bin,
                &procs::AgentSpec {
                    dir,
                    port,
                    remote_url: remote,
                    max_backoff,
                    extra,
                    remote_extra: "",
                },
            ),
            None => procs::start_vmagent(dir, port, &format!("{remote}/api/v1/write")),
        };
        let ready = p.wait_ready(
            &format!("http://127.0.0.1:{port}/health"),
            Duration::from_secs(120),
        );
        (p, ready)
    }

    /// Polls until everything it took was delivered; seconds since `from`.
    fn wait_drained(
        self,
        http: &ureq::Agent,
        port: u16,
        sink: Option<&Sink>,
        from: Instant,
    ) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut last_ok = -1.0;
        loop {
            assert!(
                Instant::now() < deadline,
                "{} did not drain within an hour",
                self.name()
            );
            let quiet = sink.is_none_or(|s| s.stats.inflight.load(Ordering::Acquire) == 0);
            let agent_api = self == Who::Ours || baseline().is_some();
            match self {
                _ if agent_api => {
                    if let Some(st) = procs::agent_status(http, port) {
                        if field(&st, "currentQueueSizeBytes") == 0
                            && field(&st, "remainingLines") == 0
                            && field(&st, "deliveredLines") > 0
                        {
                            return from.elapsed().as_secs_f64();
                        }
                    }
                }
                _ => {
                    if let Some((pending, ok)) = procs::vmagent_pending(http, port) {
                        let t = from.elapsed().as_secs_f64();
                        if pending == 0.0 && ok > 0.0 && ok == last_ok && quiet {
                            return t;
                        }
                        last_ok = ok;
                    }
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Shared by every phase.
struct Ctx {
    bin: PathBuf,
    work: PathBuf,
    http: ureq::Agent,
    sizes: Sizes,
    pool: Arc<Vec<Vec<u8>>>,
    body_files: Vec<(Mix, PathBuf, usize)>,
}

fn write_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/api/v2/write?org=bench&bucket=bench&precision=ns")
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        gen::self_check();
        profile::self_check();
        println!(
            "bench: data generator and profile stages checked; `make bench` runs the benchmarks"
        );
        return;
    }
    let sizes = Sizes::from_env();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/bench");
    let work = out.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).expect("create target/bench/work");
    for tool in ["vmagent", "victoria-metrics", "hey"] {
        assert!(
            procs::have(tool),
            "{tool} is missing: run scripts/install-bench-deps.sh (as root)"
        );
    }
    eprintln!("bench: generating data");
    let mut g = Generator::new(Mix::Metrics, 42);
    let pool: Vec<Vec<u8>> = (0..sizes.pool_bodies)
        .map(|_| g.body(LINES_PER_BODY))
        .collect();
    let logs = Generator::new(Mix::Logs, 43).body(LINES_PER_BODY);
    let small = Generator::new(Mix::Small, 44).body(LINES_PER_BODY);
    let mut body_files = Vec::new();
    for (mix, body) in [
        (Mix::Metrics, &pool[0]),
        (Mix::Logs, &logs),
        (Mix::Small, &small),
    ] {
        let path = work.join(format!("{}.lp", mix.name()));
        fs::write(&path, body).expect("write a body file");
        body_files.push((mix, path, body.len()));
    }
    let ctx = Ctx {
        // BENCH_AGENT=path measures another build of the agent.
        bin: std::env::var_os("BENCH_AGENT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edge-replicator"))),
        work,
        http: procs::http(),
        sizes,
        pool: Arc::new(pool),
        body_files,
    };
    let machine = machine();
    eprintln!("bench: {machine}");
    let mut rows = Vec::new();
    let mut raw = serde_json::Map::new();
    // BENCH_ONLY=ingest,e2e,backlog,outage,idle,memory,link,cap,rtt,live runs some phases only.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |phase: &str| only.is_empty() || only.split(',').any(|p| p.trim() == phase);
    let ingest_rate = if run("ingest") {
        ingest(&ctx, &mut rows, &mut raw)
    } else {
        500_000.0
    };
    if run("e2e") {
        end_to_end(&ctx, &mut rows, &mut raw);
    }
    let drain_rate = if run("backlog") {
        backlog(&ctx, &mut rows, &mut raw)
    } else {
        300_000.0
    };
    let outage = if run("outage") {
        outage(&ctx, ingest_rate.min(drain_rate), &mut raw)
    } else {
        String::new()
    };
    if run("idle") {
        quiet::idle(&ctx, &mut rows, &mut raw);
    }
    if run("memory") {
        quiet::memory(&ctx, &mut rows, &mut raw);
    }
    let links = if run("link") {
        link::link(&ctx, &mut rows, &mut raw)
    } else {
        String::new()
    };
    if run("cap") {
        cap::cap(&ctx, &mut rows, &mut raw);
    }
    if run("rtt") {
        rtt::rtt(&ctx, &mut rows, &mut raw);
    }
    if run("live") {
        live::live(&ctx, &mut rows, &mut raw);
    }
    // Not part of a plain `make bench`: `make profile` asks for it.
    let profiled = if only.split(',').any(|p| p.trim() == "profile") {
        profile::profile(&ctx, &out)
    } else {
        String::new()
    };

    let table = report::table(&rows, other_name());
    let mut mode = if ctx.sizes.quick {
        " (BENCH_QUICK=1: small sizes, not representative)".to_string()
    } else {
        String::new()
    };
    if let Some(cpus) = procs::pinned_cpus_spec() {
        mode += &format!(" Both agents pinned to CPU {cpus} (BENCH_CPUS).");
    }
    let md = format!(
        "Machine: {machine}.{mode}\n\nMedians over the runs, (min–max) beside them; ratios are taken run by run, \
each agent measured in the same run, one after the other.\n\n{table}\n{outage}\n\n{links}\n\n{profiled}\n"
    );
    println!("\n{md}");
    fs::write(out.join("results.md"), &md).expect("write results.md");
    let results = json!({
        "machine": machine,
        "quick": ctx.sizes.quick,
        "rows": report::rows_json(&rows),
        "raw": raw,
    });
    fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .expect("write results.json");
    let _ = fs::remove_dir_all(&ctx.work);
    eprintln!(
        "bench: wrote {}/results.md, results.json, outage.svg",
        out.display()
    );
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let fs_type = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", env!("CARGO_MANIFEST_DIR")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let vmagent = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "victoria-metrics"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "{cores} × {model}, {:.0} GiB RAM, Linux {}, {fs_type} file system; vmagent {vmagent} (Debian)",
        mem_kb as f64 / (1 << 20) as f64,
        kernel.trim()
    )
}

/// Per agent and run: the samples of one measure.
#[derive(Default)]
struct Samples {
    ours: Vec<f64>,
    theirs: Vec<f64>,
}

impl Samples {
    fn push(&mut self, who: Who, v: f64) {
        match who {
            Who::Ours => self.ours.push(v),
            Who::Vm => self.theirs.push(v),
        }
    }

    fn row(&self, what: &str, target: Target) -> Row {
        Row::versus(what, self.ours.clone(), self.theirs.clone(), target)
    }

    fn json(&self) -> serde_json::Value {
        json!({"edgeReplicator": self.ours, "vmagent": self.theirs})
    }
}

const MB: f64 = 1e6;

/// Phase 1, durable ingest with the remote down.
/// Returns our median ingest rate of the metrics mix, in lines/s.
fn ingest(
    ctx: &Ctx,
    rows: &mut Vec<Row>,
    raw: &mut serde_json::Map<String, serde_json::Value>,
) -> f64 {
    let s = &ctx.sizes;
    let mut ours = f64::NAN;
    let mut ready = Samples::default();
    let mut idle_rss = Samples::default();
    for (mix, file, body_len) in &ctx.body_files {
        let [mut rate, mut p50, mut p99, mut cpu, mut disk, mut peak] =
            std::array::from_fn(|_| Samples::default());
        for run in 0..s.runs {
            for who in Who::order(run) {
                eprintln!(
                    "bench: ingest, {} mix, remote down: {} run {}",
                    mix.name(),
                    who.name(),
                    run + 1
                );
                let dir = ctx.work.join(format!("ingest-{}", who.name()));
                let _ = fs::remove_dir_all(&dir);
                let (port, dead) = (procs::free_port(), procs::free_port());
                let (mut p, t) =
                    who.start(ctx, &dir, port, &format!("http://127.0.0.1:{dead}"), "5m");
                thread::sleep(Duration::from_millis(300));
                if *mix == Mix::Metrics {
                    ready.push(who, t.as_secs_f64() * 1e3);
                    idle_rss.push(who, p.mem().rss as f64 / MB);
                }
                let (cpu0, io0) = (p.cpu_seconds(), p.write_bytes());
                let h = load::hey(&write_url(port), file, s.requests, CLIENTS);
                assert!(
                    h.failed == 0,
                    "{}: {} of {} writes failed",
                    who.name(),
                    h.failed,
                    s.requests
                );
                // Let background flushes land before reading the counters.
                thread::sleep(Duration::from_secs(1));
                let (cpu1, io1, mem) = (p.cpu_seconds(), p.write_bytes(), p.mem());
                let lines = (h.ok * LINES_PER_BODY) as f64;
                rate.push(who, lines / h.seconds);
                p50.push(who, quantile(&h.latencies, 0.5) * 1e3);
                p99.push(who, quantile(&h.latencies, 0.99) * 1e3);
                cpu.push(who, (cpu1 - cpu0) / (lines / 1e6));
                disk.push(who, (io1 - io0) as f64 / (h.ok * body_len) as f64);
                peak.push(who, mem.peak as f64 / MB);
                p.stop(Duration::from_secs(60));
                let _ = fs::remove_dir_all(&dir);
            }
        }
        let m = mix.name();
        if *mix == Mix::Metrics {
            ours = median(&rate.ours);
        }
        rows.push(rate.row(
            &format!("durable ingest, {m} mix, remote down (lines/s)"),
            Target::AtLeast(1.0),
        ));
        if *mix == Mix::Metrics {
            rows.push(p50.row("ack latency p50 (ms)", Target::None));
            rows.push(p99.row("ack latency p99 (ms)", Target::None));
        }
        rows.push(cpu.row(
            &format!("CPU s per million lines ingested, {m} mix"),
            Target::None,
        ));
        let ours = disk.ours.clone();
        rows.push(
            Row::versus(
                &format!("disk bytes written per ingested byte, {m} mix"),
                ours.clone(),
                disk.theirs.clone(),
                Target::None,
            )
            .with_ratio(ours, "(ours)", Target::AtMost(1.0)),
        );
        rows.push(peak.row(
            &format!("peak RSS while ingesting, {m} mix (MB)"),
            Target::AtMost(0.5),
        ));
        raw.insert(
            format!("ingest_{m}"),
            json!({
                "linesPerSecond": rate.json(), "p50Ms": p50.json(), "p99Ms": p99.json(),
                "cpuSecondsPerMillionLines": cpu.json(), "diskBytesPerIngestedByte": disk.json(),
                "peakRssMB": peak.json(), "bodyBytes": body_len, "linesPerBody": LINES_PER_BODY,
                "requests": s.requests, "clients": CLIENTS,
            }),
        );
    }
    rows.push(idle_rss.row("RSS idle, empty queue (MB)", Target::AtMost(0.5)));
    rows.push(ready.row("start to ready, empty queue (ms)", Target::None));
    raw.insert("startEmptyMs".into(), ready.json());
    raw.insert("idleRssEmptyMB".into(), idle_rss.json());
    ours
}

/// Samples VmRSS of `pid` every 100 ms until stopped.
fn rss_sampler(pid: u32) -> (Arc<AtomicBool>, thread::JoinHandle<Vec<[f64; 3]>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = thread::spawn(move || {
        let mut v = Vec::new();
        while !s.load(Ordering::Acquire) {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let mb = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|x| x.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                    .map(|kb| kb * 1024.0 / MB)
            };
            if let (Some(rss), Some(anon), Some(file)) =
                (mb("VmRSS:"), mb("RssAnon:"), mb("RssFile:"))
            {
                v.push([rss, anon, file]);
            }
            thread::sleep(Duration::from_millis(100));
        }
        v
    });
    (stop, h)
}

/// Phase 2, end to end with the remote up: from the first write until the
/// last line was delivered.
fn end_to_end(
    ctx: &Ctx,
    rows: &mut Vec<Row>,
    raw: &mut serde_json::Map<String, serde_json::Value>,
) {
    let s = &ctx.sizes;
    let file = &ctx.body_files[0].1;
    let [mut ingest, mut e2e, mut steady, mut steady_anon, mut steady_file, mut peak, mut cpu] =
        std::array::from_fn(|_| Samples::default());
    for run in 0..s.runs {
        for who in Who::order(run) {
            eprintln!(
                "bench: end to end, remote up: {} run {}",
                who.name(),
                run + 1
            );
            let dir = ctx.work.join(format!("e2e-{}", who.name()));
            let _ = fs::remove_dir_all(&dir);
            let sink = Sink::start(procs::free_port());
            let port = procs::free_port();
            let (mut p, _) = who.start(ctx, &dir, port, &sink.url(), "5m");
            let (stop, sampler) = rss_sampler(p.pid());
            let cpu0 = p.cpu_seconds();
            let t0 = Instant::now();
            let h = load::hey(&write_url(port), file, s.requests, CLIENTS);
            assert!(h.failed == 0, "{}: {} writes failed", who.name(), h.failed);
            let t = who.wait_drained(&ctx.http, port, Some(&sink), t0);
            let cpu1 = p.cpu_seconds();
            stop.store(true, Ordering::Release);
            let rss = sampler.join().unwrap();
            let lines = (h.ok * LINES_PER_BODY) as f64;
            ingest.push(who, lines / h.seconds);
            e2e.push(who, lines / t);
            let part = |i: usize| median(&rss.iter().map(|r| r[i]).collect::<Vec<_>>());
            steady.push(who, part(0));
            steady_anon.push(who, part(1));
            steady_file.push(who, part(2));
            peak.push(who, p.mem().peak as f64 / MB);
            cpu.push(who, (cpu1 - cpu0) / (lines / 1e6));
            p.stop(Duration::from_secs(60));
            let _ = fs::remove_dir_all(&dir);
        }
    }
    rows.push(ingest.row("ingest, remote up (lines/s)", Target::None));
    rows.push(e2e.row(
        "end to end, remote up: written until all delivered (lines/s)",
        Target::None,
    ));
    rows.push(cpu.row("CPU s per million lines, ingest + delivery", Target::None));
    rows.push(steady.row("steady RSS under load, remote up (MB)", Target::AtMost(0.5)));
    rows.push(steady_anon.row("  of which anonymous (MB)", Target::None));
    rows.push(steady_file.row(
        "  of which file-backed: the queue's map, the binary (MB)",
        Target::None,
    ));
    rows.push(peak.row("peak RSS, remote up (MB)", Target::AtMost(0.5)));
    raw.insert(
        "endToEnd".into(),
        json!({"ingestLinesPerSecond": ingest.json(), "endToEndLinesPerSecond": e2e.json(),
               "cpuSecondsPerMillionLines": cpu.json(), "steadyRssMB": steady.json(), "steadyRssAnonMB": steady_anon.json(),
               "steadyRssFileMB": steady_file.json(), "peakRssMB": peak.json()}),
    );
}

/// Batches of whole lines of at most `BATCH_SIZE` bytes, as the agent cuts them.
fn batches(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let cut = if rest.len() <= BATCH_SIZE {
            rest.len()
        } else {
            memchr::memrchr(b'\n', &rest[..BATCH_SIZE]).map_or(rest.len(), |i| i + 1)
        };
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

/// The single-core gzip limit: MB/s of gzip at the agent's level and with its
/// flate2 backend, on batches of the backlog's data.
fn gzip_limit(ctx: &Ctx) -> (f64, f64) {
    let data: Vec<u8> = ctx.pool.concat();
    let parts = batches(&data);
    let (mut raw, mut packed) = (0usize, 0usize);
    let started = Instant::now();
    while raw < ctx.sizes.gzip_min_bytes || started.elapsed() < Duration::from_secs(2) {
        for p in &parts {
            let mut e = GzEncoder::new(
                Vec::with_capacity(p.len() / 4),
                Compression::new(GZIP_LEVEL),
            );
            e.write_all(p).unwrap();
            packed += e.finish().unwrap().len();
            raw += p.len();
        }
    }
    (
        raw as f64 / started.elapsed().as_secs_f64() / MB,
        raw as f64 / packed as f64,
    )
}

/// Phase 3, a backlog of at least 1 GiB: start, RSS, drain to a sink and
/// to VictoriaMetrics. Returns our median drain rate in lines/s.
fn backlog(
    ctx: &Ctx,
    rows: &mut Vec<Row>,
    raw: &mut serde_json::Map<String, serde_json::Value>,
) -> f64 {
    let s = &ctx.sizes;
    let remote_port = procs::free_port();
    let remote = format!("http://127.0.0.1:{remote_port}");
    let mut lines_queued = [0u64; 2];
    let mut bytes_queued = [0u64; 2];
    let mut fill_rate = Samples::default();
    for (i, who) in [Who::Ours, Who::Vm].into_iter().enumerate() {
        eprintln!(
            "bench: building a {} MiB backlog in {}",
            s.backlog_bytes >> 20,
            who.name()
        );
        let dir = ctx.work.join(format!("backlog-{}", who.name()));
        let port = procs::free_port();
        let (mut p, _) = who.start(ctx, &dir, port, &remote, "5m");
        let (sent, secs) = load::fill(&write_url(port), &ctx.pool, CLIENTS, s.backlog_bytes);
        let bodies = sent.bodies.load(Ordering::Acquire);
        lines_queued[i] = bodies * LINES_PER_BODY as u64;
        bytes_queued[i] = sent.bytes.load(Ordering::Acquire);
        fill_rate.push(who, lines_queued[i] as f64 / secs);
        if who == Who::Ours || baseline().is_some() {
            let st = procs::agent_status(&ctx.http, port).expect("agent status");
            assert_eq!(
                field(&st, "remainingLines"),
                lines_queued[i],
                "every acknowledged line is queued"
            );
        }
        p.stop(Duration::from_secs(120));
    }
    let backlog_mib = bytes_queued[0] as f64 / GIB as f64 * 1024.0;
    let [mut start, mut rss_backlog, mut drain, mut drain_mb, mut drain_peak, mut drain_cpu] =
        std::array::from_fn(|_| Samples::default());
    // Resident memory at the end of a drain: the process's own (anonymous)
    // and mapped file pages (LMDB reads through a memory map).
    let [mut drain_anon, mut drain_file, mut sink_bytes] =
        std::array::from_fn(|_| Samples::default());
    let (mut gzip_mbs, mut gzip_ratio, mut vs_gzip) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..s.drain_runs {
        eprintln!("bench: single-core gzip limit, run {}", run + 1);
        let (g, ratio) = gzip_limit(ctx);
        gzip_mbs.push(g);
        gzip_ratio.push(ratio);
        for who in Who::order(run) {
            let i = who as usize;
            eprintln!(
                "bench: {} MiB backlog in {}: start, then drain to a sink, run {}",
                backlog_mib as u64,
                who.name(),
                run + 1
            );
            let pristine = ctx.work.join(format!("backlog-{}", who.name()));
            let dir = ctx.work.join(format!("drain-{}", who.name()));
            procs::copy_tree(&pristine, &dir);
            // Start with the remote still down: time to ready, and memory
            // with the backlog on disk.
            let port = procs::free_port();
            let (mut p, t) = who.start(ctx, &dir, port, &remote, "5m");
            start.push(who, t.as_secs_f64() * 1e3);
            thread::sleep(Duration::from_secs(1));
            rss_backlog.push(who, p.mem().rss as f64 / MB);
            p.stop(Duration::from_secs(60));
            // The remote comes back; start again and drain.
            let sink = Sink::start(remote_port);
            let (mut p, _) = who.start(ctx, &dir, port, &remote, "5m");
            let from = Instant::now();
            let cpu0 = p.cpu_seconds();
            let secs = who.wait_drained(&ctx.http, port, Some(&sink), from);
            let cpu1 = p.cpu_seconds();
            sink_bytes.push(who, sink.stats.bytes.load(Ordering::Acquire) as f64);
            let lines = lines_queued[i] as f64;
            drain.push(who, lines / secs);
            drain_mb.push(who, bytes_queued[i] as f64 / secs / MB);
            let mem = p.mem();
            drain_peak.push(who, mem.peak as f64 / MB);
            drain_anon.push(who, mem.anon as f64 / MB);
            drain_file.push(who, mem.file as f64 / MB);
            drain_cpu.push(who, (cpu1 - cpu0) / (lines / 1e6));
            if who == Who::Ours {
                vs_gzip.push(bytes_queued[i] as f64 / secs / MB / g);
            }
            p.stop(Duration::from_secs(60));
            drop(sink);
            let _ = fs::remove_dir_all(&dir);
        }
    }
    // Once each: the same backlog into a real remote.
    let mut to_vm = Samples::default();
    for who in [Who::Ours, Who::Vm] {
        eprintln!(
            "bench: drain of the backlog in {} to VictoriaMetrics",
            who.name()
        );
        let i = who as usize;
        let pristine = ctx.work.join(format!("backlog-{}", who.name()));
        let dir = ctx.work.join(format!("drain-{}", who.name()));
        procs::copy_tree(&pristine, &dir);
        let vm_dir = ctx.work.join("victoria-metrics");
        let _ = fs::remove_dir_all(&vm_dir);
        let mut vm = procs::start_victoria(&vm_dir, remote_port);
        let port = procs::free_port();
        let (mut p, _) = who.start(ctx, &dir, port, &remote, "5m");
        let secs = who.wait_drained(&ctx.http, port, None, Instant::now());
        to_vm.push(who, lines_queued[i] as f64 / secs);
        p.stop(Duration::from_secs(60));
        vm.stop(Duration::from_secs(60));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&vm_dir);
    }
    let label = format!("{backlog_mib:.0} MiB");
    rows.push(fill_rate.row(
        "backlog build, distinct bodies, remote down (lines/s)",
        Target::None,
    ));
    rows.push(start.row(
        &format!("start to ready with a {label} backlog (ms)"),
        Target::None,
    ));
    rows.push(rss_backlog.row(
        &format!("RSS idle with a {label} backlog (MB)"),
        Target::AtMost(0.5),
    ));
    rows.push(drain.row(
        &format!("drain of {label} to a discarding sink (lines/s)"),
        Target::None,
    ));
    let ours_mb = drain_mb.ours.clone();
    rows.push(
        Row::versus(
            "drain to the sink (MB/s of line protocol)",
            ours_mb,
            drain_mb.theirs.clone(),
            Target::None,
        )
        .with_ratio(vs_gzip.clone(), "× gzip limit", Target::AtLeast(0.8)),
    );
    rows.push(Row::alone(
        &format!("single-core gzip limit, level {GZIP_LEVEL}, 500 kB batches (MB/s)"),
        gzip_mbs.clone(),
    ));
    rows.push(drain_cpu.row("CPU s per million lines drained", Target::None));
    rows.push(drain_peak.row(
        &format!("peak RSS while draining {label} (MB)"),
        Target::AtMost(0.5),
    ));
    rows.push(to_vm.row(
        &format!("drain of {label} to VictoriaMetrics (lines/s)"),
        Target::None,
    ));
    // Our start with the backlog against the 1 s target.
    let start_ours = start.ours.clone();
    rows.push(
        Row::alone(
            &format!("start to ready with a {label} backlog, ours (s)"),
            start_ours.iter().map(|v| v / 1e3).collect(),
        )
        .with_ratio(
            start_ours.iter().map(|v| v / 1e3).collect(),
            "s",
            Target::AtMost(1.0),
        ),
    );
    // RSS with the backlog against RSS empty, ours.
    raw.insert(
        "backlog".into(),
        json!({
            "bytes": bytes_queued, "lines": lines_queued, "buildLinesPerSecond": fill_rate.json(),
            "startMs": start.json(), "idleRssMB": rss_backlog.json(),
            "drainLinesPerSecond": drain.json(), "drainMBps": drain_mb.json(), "drainPeakRssMB": drain_peak.json(),
            "drainEndRssAnonMB": drain_anon.json(), "drainBytesAtSink": sink_bytes.json(), "drainEndRssFileMB": drain_file.json(),
            "drainCpuSecondsPerMillionLines": drain_cpu.json(), "gzipLimitMBps": gzip_mbs,
            "gzipRatio": gzip_ratio, "drainOverGzipLimit": vs_gzip,
            "drainToVictoriaMetricsLinesPerSecond": to_vm.json(),
        }),
    );
    median(&drain.ours)
}

/// Phase 4, steady load through an outage of the remote and its recovery
/// (ours), from two paced clients.
fn outage(
    ctx: &Ctx,
    capacity: f64,
    raw: &mut serde_json::Map<String, serde_json::Value>,
) -> String {
    let (total, down_at, up_at) = ctx.sizes.outage;
    // 30 % of what the agent sustains (ingest and drain, whichever is
    // lower): headroom to catch up after the outage.
    let per_second = (0.3 * capacity / LINES_PER_BODY as f64).max(1.0);
    eprintln!(
        "bench: outage of the remote under {:.0} lines/s",
        per_second * LINES_PER_BODY as f64
    );
    let sink = Sink::start(procs::free_port());
    let dir = ctx.work.join("outage");
    let port = procs::free_port();
    let max_backoff = "5s";
    let (mut p, _) = Who::Ours.start(ctx, &dir, port, &sink.url(), max_backoff);
    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..2)
        .map(|_| {
            load::paced(
                &write_url(port),
                ctx.pool.clone(),
                per_second / 2.0,
                stop.clone(),
            )
            .0
        })
        .collect();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut prev: Option<(f64, u64, u64)> = None;
    let mut down = false;
    while started.elapsed().as_secs_f64() < total {
        let t = started.elapsed().as_secs_f64();
        if !down && t >= down_at && t < up_at {
            sink.stats.down.store(true, Ordering::Release);
            down = true;
        }
        if down && t >= up_at {
            sink.stats.down.store(false, Ordering::Release);
            down = false;
        }
        if let Some(st) = procs::agent_status(&ctx.http, port) {
            let (q, d, a) = (
                field(&st, "currentQueueSizeBytes"),
                field(&st, "deliveredLines"),
                field(&st, "acceptedLines"),
            );
            if let Some((t0, d0, a0)) = prev {
                let dt = (t - t0).max(1e-3);
                samples.push(Sample {
                    t,
                    queue_mb: q as f64 / MB,
                    delivered_klps: (d - d0) as f64 / dt / 1e3,
                    accepted_klps: (a - a0) as f64 / dt / 1e3,
                });
            }
            prev = Some((t, d, a));
        }
        thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Release);
    for l in loaders {
        l.join().unwrap();
    }
    p.stop(Duration::from_secs(60));
    let _ = fs::remove_dir_all(&dir);
    // Recovery: from the remote's return until the queue is back to what it
    // held before the outage.
    let before = samples
        .iter()
        .filter(|s| s.t < down_at)
        .map(|s| s.queue_mb)
        .fold(0.0, f64::max);
    let recovered = samples
        .iter()
        .find(|s| s.t > up_at && s.queue_mb <= before + 1.0)
        .map(|s| s.t - up_at);
    let peak_queue = samples.iter().map(|s| s.queue_mb).fold(0.0, f64::max);
    let title = format!(
        "edge-replicator: remote down {down_at:.0}–{up_at:.0} s under {:.0} k lines/s (max_backoff {max_backoff})",
        per_second * LINES_PER_BODY as f64 / 1e3
    );
    let svg = report::outage_svg(&samples, (down_at, up_at), &title);
    let out = ctx.work.parent().unwrap().join("outage.svg");
    fs::write(&out, svg).expect("write outage.svg");
    raw.insert(
        "outage".into(),
        json!({"samples": samples, "down": [down_at, up_at], "linesPerSecond": per_second * LINES_PER_BODY as f64,
               "peakQueueMB": peak_queue, "recoverySeconds": recovered}),
    );
    format!(
        "Outage (target/bench/outage.svg): {:.0} k lines/s offered, remote down for {:.0} s: the queue peaked at {:.0} MB \
and was back to its pre-outage depth {} after the remote returned.",
        per_second * LINES_PER_BODY as f64 / 1e3,
        up_at - down_at,
        peak_queue,
        recovered.map_or("not within the run".to_string(), |s| format!("{s:.1} s")),
    )
}
