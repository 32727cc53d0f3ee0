//! `make fleet-sim`: a reconnect storm. A fleet of gateways (real
//! `edge-replicator run` processes, release build, one data_dir and port
//! each) writes steadily to one remote, VictoriaMetrics behind a
//! rate-limiting proxy (`proxy.rs`). After a warm-up the remote disappears
//! (connections refused) for `FLEET_OUTAGE`, then returns while writing goes
//! on. Measured at the proxy: the steady request rate, the peak after the
//! outage and their ratio (goal: at most 3×), the 429s sent and whether each
//! agent's next request honoured the `Retry-After`; from the agents' status:
//! the time from the remote's return until every agent's queue was drained;
//! and at the end, lines written == delivered == at VictoriaMetrics.
//!
//! Settings (environment): `FLEET_AGENTS` (200), `FLEET_OUTAGE` (120s),
//! `FLEET_WARMUP` (60s), `FLEET_TAIL` (30s of writing after the drain),
//! `FLEET_SERIES` (5 series per agent, one point each per second),
//! `FLEET_RATE_LIMIT` (requests per second the proxy lets through; default
//! 3 × the agents' steady rate of one request per agent per second),
//! `FLEET_RETRY_AFTER` (2, seconds), `FLEET_DRAIN_TIMEOUT` (600s),
//! `FLEET_BATCH_SIZE` (the agents' `batch_size`, 500kB as shipped; a small
//! one makes the outage's backlog many batches per agent).
//!
//! Results in `target/fleet-sim/`: `results.md`, `results.json` (figures and
//! every per-second count) and `fleet.svg`. Without `--bench` (as `cargo
//! test --all-targets` starts it) it does nothing.

// json! of the figures nests deeper than the default limit.
#![recursion_limit = "256"]

mod plot;
#[allow(dead_code)]
#[path = "../bench/procs.rs"]
mod procs;
mod proxy;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use procs::{field, Proc};
use proxy::Proxy;

struct Settings {
    agents: usize,
    outage: f64,
    warmup: f64,
    tail: f64,
    series: usize,
    rate_limit: usize,
    retry_after: u64,
    drain_timeout: f64,
    batch_size: String,
}

fn env_secs(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .or_else(|| {
                humantime::parse_duration(v.trim())
                    .ok()
                    .map(|d| d.as_secs_f64())
            })
            .unwrap_or_else(|| panic!("{name}={v:?}: not a duration (\"120s\", \"2m\", \"90\")")),
        Err(_) => default,
    }
}

fn env_num(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: not a number")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let agents = env_num("FLEET_AGENTS", 200).max(1);
        Settings {
            agents,
            outage: env_secs("FLEET_OUTAGE", 120.0),
            warmup: env_secs("FLEET_WARMUP", 60.0),
            tail: env_secs("FLEET_TAIL", 30.0),
            series: env_num("FLEET_SERIES", 5).max(1),
            // Each agent ships about one request per write, one write a second.
            rate_limit: env_num("FLEET_RATE_LIMIT", 3 * agents).max(1),
            retry_after: env_num("FLEET_RETRY_AFTER", 2) as u64,
            drain_timeout: env_secs("FLEET_DRAIN_TIMEOUT", 600.0),
            batch_size: std::env::var("FLEET_BATCH_SIZE").unwrap_or_else(|_| "500kB".into()),
        }
    }
}

/// 200 agents, each with sockets to the writers, the proxy and the status
/// poller, need more descriptors than a default soft limit of 1024 here.
fn raise_open_files() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

struct Agent {
    proc: Proc,
    port: u16,
}

fn start_agent(bin: &Path, dir: &Path, i: usize, proxy_url: &str, batch_size: &str) -> Agent {
    fs::create_dir_all(dir).expect("create an agent's directory");
    let port = procs::free_port();
    let config = dir.join("config.toml");
    // The shipped config's defaults (backoff, probe_interval, batch_size
    // unless FLEET_BATCH_SIZE, gzip_level) except: durability "os", because here every agent shares
    // one disk where a real fleet has one each, and 200 fsyncs a second on
    // it would measure the disk, not the reconnects; and a 64 MiB queue,
    // ample for the outage's backlog. `org` names the agent to the proxy.
    let text = format!(
        r#"data_dir = "{data}"
log_level = "info"

[listen]
address = "127.0.0.1:{port}"

[queue]
durability = "os"

# The boards simulated keep a synchronised clock; this machine may read as
# unsynchronised (no time service), which must not hold their writes.
[clock]
wait_for_sync = "1s"

[[remote]]
name = "central"
url = "{proxy_url}"
api = "v2"
org = "agent-{i}"

[[replication]]
name = "fleet"
remote = "central"
local_bucket = "fleet"
max_queue_size = "64MiB"
batch_size = "{batch_size}"
"#,
        data = dir.join("data").display(),
    );
    fs::write(&config, text).expect("write an agent's config");
    let proc = procs::spawn_agent(bin, &config, dir.join("agent.log"));
    Agent { proc, port }
}

/// A `key: N kB` line of a /proc file, in bytes.
fn proc_kb(path: &str, key: &str) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Resident memory, and its proportional share (PSS: pages shared with
/// other agents, the binary's among them, divided among the sharers).
fn mem_of(pid: u32) -> (u64, u64) {
    (
        proc_kb(&format!("/proc/{pid}/status"), "VmRSS:"),
        proc_kb(&format!("/proc/{pid}/smaps_rollup"), "Pss:"),
    )
}

fn client(conns: usize) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .max_idle_connections(conns + 4)
        .max_idle_connections_per_host(1)
        .build()
        .into()
}

/// The load: each agent gets one write a second of `series` lines (one point
/// per series), the agents' writes spread evenly over the second.
struct Load {
    stop: AtomicBool,
    lines_acked: AtomicU64,
    posts_failed: AtomicU64,
}

fn writer(
    load: &Load,
    mine: &[usize],
    ports: &[u16],
    series: usize,
    start: Instant,
) -> Result<(), String> {
    let http = client(mine.len());
    let n = ports.len() as f64;
    let mut body = String::new();
    for tick in 0u64.. {
        for &i in mine {
            let due = start + Duration::from_secs_f64(tick as f64 + i as f64 / n);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if load.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("a clock after 1970")
                .as_nanos();
            body.clear();
            for s in 0..series {
                let _ = writeln!(
                    body,
                    "fleet,agent=a{i},series=s{s} value={}.{s},tick={tick}i {ts}",
                    i * 7 + s
                );
            }
            let url = format!(
                "http://127.0.0.1:{}/api/v2/write?bucket=fleet&precision=ns",
                ports[i]
            );
            match http.post(&url).send(body.as_str()) {
                Ok(r) if r.status().as_u16() == 204 => {
                    load.lines_acked.fetch_add(series as u64, Ordering::Relaxed);
                }
                Ok(r) => {
                    load.posts_failed.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("agent {i} answered a write {}", r.status()));
                }
                Err(e) => {
                    load.posts_failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("fleet: a write to agent {i} failed: {e}");
                }
            }
        }
    }
    Ok(())
}

/// What the status poller saw.
#[derive(Default)]
struct Watch {
    /// (t, agents with unsent lines, unsent lines in all, probes so far).
    backlog: Vec<(f64, u64, u64, u64)>,
    /// When each agent was first seen with nothing unsent after the return.
    drained_at: Vec<Option<f64>>,
    /// The remote's return, once it happened.
    returned: Option<f64>,
    rss_total_peak: u64,
    pss_total_peak: u64,
    /// (t, RSS of all agents, PSS of all agents).
    rss: Vec<(f64, u64, u64)>,
}

fn poll_loop(watch: &Mutex<Watch>, stop: &AtomicBool, ports: &[u16], pids: &[u32], proxy: &Proxy) {
    let http = client(ports.len());
    let mut last_rss = -10.0;
    while !stop.load(Ordering::Acquire) {
        let began = proxy.now();
        let returned = watch.lock().unwrap().returned;
        let mut backlogged = 0;
        let mut lines = 0;
        let mut probes = 0;
        let mut drained = Vec::new();
        for (i, &port) in ports.iter().enumerate() {
            let Some(st) = procs::agent_status(&http, port) else {
                continue;
            };
            let left = field(&st, "remainingLines");
            lines += left;
            probes += field(&st, "probes");
            if left > 0 {
                backlogged += 1;
            } else if returned.is_some_and(|r| began >= r) {
                drained.push(i);
            }
        }
        let t = proxy.now();
        let mut w = watch.lock().unwrap();
        w.backlog.push((t, backlogged, lines, probes));
        for i in drained {
            w.drained_at[i].get_or_insert(t);
        }
        if t - last_rss >= 5.0 {
            last_rss = t;
            let (rss, pss) = pids
                .iter()
                .map(|&p| mem_of(p))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            w.rss.push((t, rss, pss));
            w.rss_total_peak = w.rss_total_peak.max(rss);
            w.pss_total_peak = w.pss_total_peak.max(pss);
        }
        drop(w);
        let spent = proxy.now() - began;
        if spent < 1.0 {
            thread::sleep(Duration::from_secs_f64(1.0 - spent));
        }
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Samples at VictoriaMetrics: (all, distinct by series and timestamp).
fn vm_count(http: &ureq::Agent, port: u16) -> Option<(u64, u64)> {
    let _ = procs::get(
        http,
        &format!("http://127.0.0.1:{port}/internal/force_flush"),
    );
    let (code, body) = procs::get(
        http,
        &format!("http://127.0.0.1:{port}/api/v1/export?match[]=fleet_value"),
    )?;
    if code != 200 {
        return None;
    }
    let (mut all, mut distinct) = (0, 0);
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).ok()?;
        let ts = v["timestamps"].as_array()?;
        let mut set: Vec<i64> = ts.iter().filter_map(Value::as_i64).collect();
        all += set.len() as u64;
        set.sort_unstable();
        set.dedup();
        distinct += set.len() as u64;
    }
    Some((all, distinct))
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("fleet: `make fleet-sim` runs the fleet simulation");
        return;
    }
    let cfg = Settings::from_env();
    let nofile = raise_open_files();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/release/edge-replicator");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release`",
        bin.display()
    );
    let out = root.join("target/fleet-sim");
    let work = out.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).expect("create target/fleet-sim/work");
    let n = cfg.agents;
    eprintln!(
        "fleet: {n} agents, {} series each, warm-up {}s, outage {}s, rate limit {}/s, \
         Retry-After {}s, open files {nofile}",
        cfg.series, cfg.warmup, cfg.outage, cfg.rate_limit, cfg.retry_after
    );

    let vm_port = procs::free_port();
    let mut vm = procs::start_victoria(&work.join("victoria-metrics"), vm_port);
    let proxy = Proxy::start(
        format!("http://127.0.0.1:{vm_port}"),
        n,
        cfg.rate_limit,
        cfg.retry_after,
    );

    let mut agents: Vec<Agent> = (0..n)
        .map(|i| {
            start_agent(
                &bin,
                &work.join(format!("agent-{i:03}")),
                i,
                &proxy.url(),
                &cfg.batch_size,
            )
        })
        .collect();
    let spawned = Instant::now();
    for a in &mut agents {
        a.proc.wait_ready(
            &format!("http://127.0.0.1:{}/health", a.port),
            Duration::from_secs(60),
        );
    }
    eprintln!(
        "fleet: {n} agents ready in {:.1} s",
        spawned.elapsed().as_secs_f64()
    );
    let ports: Arc<Vec<u16>> = Arc::new(agents.iter().map(|a| a.port).collect());
    let pids: Vec<u32> = agents.iter().map(|a| a.proc.pid()).collect();

    let watch = Arc::new(Mutex::new(Watch {
        drained_at: vec![None; n],
        ..Watch::default()
    }));
    let poll_stop = Arc::new(AtomicBool::new(false));
    let proxy = Arc::new(proxy);
    let poller = {
        let (watch, stop, ports, proxy) = (
            watch.clone(),
            poll_stop.clone(),
            ports.clone(),
            proxy.clone(),
        );
        thread::spawn(move || poll_loop(&watch, &stop, &ports, &pids, &proxy))
    };

    let load = Arc::new(Load {
        stop: AtomicBool::new(false),
        lines_acked: AtomicU64::new(0),
        posts_failed: AtomicU64::new(0),
    });
    let threads = n.div_ceil(25).clamp(1, 8);
    let t_write = proxy.now();
    let start = Instant::now();
    let writers: Vec<_> = (0..threads)
        .map(|k| {
            let mine: Vec<usize> = (k..n).step_by(threads).collect();
            let (load, ports) = (load.clone(), ports.clone());
            let series = cfg.series;
            thread::spawn(move || writer(&load, &mine, &ports, series, start))
        })
        .collect();

    let sleep_until = |t: f64| {
        let left = t - proxy.now();
        if left > 0.0 {
            thread::sleep(Duration::from_secs_f64(left));
        }
    };
    sleep_until(t_write + cfg.warmup);
    proxy.set_down(true);
    let t_down = proxy.now();
    eprintln!("fleet: remote down at {:.1} s", t_down - t_write);
    sleep_until(t_down + cfg.outage);
    proxy.set_down(false);
    let t_up = proxy.now();
    watch.lock().unwrap().returned = Some(t_up);
    eprintln!("fleet: remote back at {:.1} s", t_up - t_write);

    let drained = loop {
        let w = watch.lock().unwrap();
        if w.drained_at.iter().all(Option::is_some) {
            break w.drained_at.iter().flatten().fold(t_up, |a, &b| a.max(b)) - t_up;
        }
        let left = w.drained_at.iter().filter(|d| d.is_none()).count();
        drop(w);
        if proxy.now() - t_up > cfg.drain_timeout {
            eprintln!(
                "fleet: {left} agents still had unsent lines {} s after the return",
                cfg.drain_timeout
            );
            break f64::NAN;
        }
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!("fleet: every agent drained {drained:.1} s after the return");
    sleep_until(proxy.now() + cfg.tail);
    load.stop.store(true, Ordering::Release);
    let mut write_errors = Vec::new();
    for w in writers {
        if let Err(e) = w.join().expect("a writer panicked") {
            write_errors.push(e);
        }
    }
    let t_stop = proxy.now();

    // Everything acknowledged must leave every queue.
    let http = client(n);
    let final_deadline = Instant::now() + Duration::from_secs(300);
    let statuses: Vec<Value> = loop {
        let st: Vec<Value> = ports
            .iter()
            .map(|&p| procs::agent_status(&http, p).unwrap_or(Value::Null))
            .collect();
        let done = st
            .iter()
            .all(|s| s.is_object() && field(s, "remainingLines") == 0);
        if done || Instant::now() > final_deadline {
            break st;
        }
        thread::sleep(Duration::from_millis(500));
    };
    poll_stop.store(true, Ordering::Release);
    poller.join().expect("the poller panicked");
    let sum = |name: &str| statuses.iter().map(|s| field(s, name)).sum::<u64>();
    let (accepted, delivered, remaining, probes) = (
        sum("acceptedLines"),
        sum("deliveredLines"),
        sum("remainingLines"),
        sum("probes"),
    );
    let lost = sum("droppedFullLines")
        + sum("expiredLines")
        + sum("droppedNonRetryableLines")
        + sum("deadLetteredLines");
    let hwm: Vec<f64> = agents.iter().map(|a| a.proc.mem().peak as f64).collect();
    let cpu: f64 = agents.iter().map(|a| a.proc.cpu_seconds()).sum();
    let vm_mem = vm.mem();
    let vm_cpu = vm.cpu_seconds();
    let lines_acked = load.lines_acked.load(Ordering::Relaxed);

    // VictoriaMetrics may show a row a moment after its 204.
    let asked = Instant::now();
    let (vm_all, vm_distinct) = loop {
        let c = vm_count(&http, vm_port).unwrap_or((0, 0));
        if c.1 >= lines_acked || asked.elapsed() > Duration::from_secs(30) {
            break c;
        }
        thread::sleep(Duration::from_millis(500));
    };

    // SIGTERM to all at once, then wait for each.
    for a in &agents {
        // SAFETY: kill(2) on a child not reaped yet.
        unsafe { libc::kill(a.proc.pid() as i32, libc::SIGTERM) };
    }
    for a in &mut agents {
        a.proc.stop(Duration::from_secs(10));
    }
    vm.stop(Duration::from_secs(10));

    // Figures from the proxy's seconds.
    let secs = proxy.secs();
    let at = |i: usize| i as f64 + 0.5;
    let whole = |from: f64, to: f64| {
        secs.iter()
            .enumerate()
            .filter(move |(i, _)| *i as f64 >= from && (*i + 1) as f64 <= to)
    };
    // Steady: the warm-up after every agent wrote a few times.
    let settle = (cfg.warmup / 4.0).min(10.0);
    let steady_secs: Vec<f64> = whole(t_write + settle, t_down)
        .map(|(_, s)| s.requests as f64)
        .collect();
    let steady = steady_secs.iter().sum::<f64>() / steady_secs.len().max(1) as f64;
    let steady_max = steady_secs.iter().copied().fold(0.0, f64::max);
    let (peak_i, peak) = secs
        .iter()
        .enumerate()
        .filter(|(i, _)| at(*i) >= t_up && (*i as f64) < t_stop)
        .map(|(i, s)| (i, s.requests))
        .max_by_key(|&(_, r)| r)
        .unwrap_or((0, 0));
    let peak = peak as f64;
    // What got through: above the rate limit the rest were 429s.
    let peak_ok = secs
        .iter()
        .enumerate()
        .filter(|(i, _)| at(*i) >= t_up && (*i as f64) < t_stop)
        .map(|(_, s)| s.ok)
        .max()
        .unwrap_or(0);
    let ratio = peak / steady;
    let throttled: u64 = secs.iter().map(|s| s.throttled).sum();
    let requests: u64 = secs.iter().map(|s| s.requests).sum();
    let failed: u64 = secs.iter().map(|s| s.failed).sum();
    let tracks: Vec<_> = proxy
        .shared
        .agents
        .iter()
        .map(|t| std::mem::take(&mut *t.lock().unwrap()))
        .collect();
    let honoured: u64 = tracks.iter().map(|t| t.honoured).sum();
    let early: u64 = tracks.iter().map(|t| t.early).sum();
    let early_by: Vec<f64> = tracks.iter().flat_map(|t| t.early_by.clone()).collect();
    let first_ok: Vec<f64> = tracks
        .iter()
        .filter_map(|t| t.first_ok_after_return)
        .collect();
    let first_req: Vec<f64> = tracks
        .iter()
        .filter_map(|t| t.first_request_after_return)
        .collect();
    let all_back = if first_ok.len() == n {
        quantile(&first_ok, 1.0)
    } else {
        f64::NAN
    };
    let forwarded = proxy.shared.lines_forwarded.load(Ordering::Relaxed);
    let w = watch.lock().unwrap();
    let rss_peak = w.rss_total_peak;
    let pss_peak = w.pss_total_peak;
    // Probes while the remote was down, from the agents' counters (the
    // proxy cannot see them: nothing listens).
    let probes_at = |t: f64| {
        w.backlog
            .iter()
            .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
            .map_or((t, 0), |b| (b.0, b.3))
    };
    let ((pa, pn), (pb, pm)) = (probes_at(t_down), probes_at(t_up));
    let outage_probes = pm.saturating_sub(pn) as f64 / (pb - pa).max(1.0);
    let conservation = lines_acked == accepted
        && accepted == delivered
        && remaining == 0
        && lost == 0
        && vm_distinct == lines_acked
        && write_errors.is_empty();

    let figures = json!({
        "agents": n,
        "series_per_agent": cfg.series,
        "writes_per_agent_per_s": 1,
        "warmup_s": cfg.warmup,
        "outage_s": cfg.outage,
        "rate_limit_per_s": cfg.rate_limit,
        "retry_after_s": cfg.retry_after,
        "batch_size": cfg.batch_size,
        "steady_requests_per_s": steady,
        "steady_max_requests_per_s": steady_max,
        "peak_requests_per_s_after_outage": peak,
        "peak_at_s_after_return": at(peak_i) - t_up,
        "peak_2xx_per_s_after_outage": peak_ok,
        "peak_over_steady": ratio,
        "goal_peak_over_steady": 3.0,
        "probes_per_s_during_outage": outage_probes,
        "requests": requests,
        "requests_failed_upstream": failed,
        "throttled_429": throttled,
        "throttled_honoured": honoured,
        "throttled_early": early,
        "throttled_unanswered": throttled - honoured - early,
        "early_by_s_max": early_by.iter().copied().fold(0.0, f64::max),
        "first_request_after_return_s": {
            "median": quantile(&first_req, 0.5), "p90": quantile(&first_req, 0.9),
            "max": quantile(&first_req, 1.0), "agents": first_req.len(),
        },
        "first_delivery_after_return_s": {
            "median": quantile(&first_ok, 0.5), "p90": quantile(&first_ok, 0.9),
            "max": quantile(&first_ok, 1.0), "agents": first_ok.len(),
        },
        "every_agent_delivering_after_return_s": all_back,
        "every_agent_drained_after_return_s": drained,
        "probes": probes,
        "lines_written_acknowledged": lines_acked,
        "lines_accepted_by_agents": accepted,
        "lines_delivered_by_agents": delivered,
        "lines_forwarded_2xx_by_proxy": forwarded,
        "lines_lost_by_agents": lost,
        "lines_remaining": remaining,
        "samples_at_victoriametrics": vm_all,
        "distinct_samples_at_victoriametrics": vm_distinct,
        "write_posts_failed": load.posts_failed.load(Ordering::Relaxed),
        "write_errors": write_errors,
        "conservation": conservation,
        "rss_agents_total_peak_mb": mb(rss_peak),
        "pss_agents_total_peak_mb": mb(pss_peak),
        "rss_agent_peak_mb": { "median": quantile(&hwm, 0.5) / 1e6, "max": quantile(&hwm, 1.0) / 1e6 },
        "rss_victoriametrics_peak_mb": mb(vm_mem.peak),
        "cpu_agents_s": cpu,
        "cpu_victoriametrics_s": vm_cpu,
        "wall_s": t_stop - t_write,
    });

    let rel = |t: f64| t - t_write;
    let points: Vec<plot::Point> = secs
        .iter()
        .enumerate()
        .filter(|(i, _)| at(*i) >= t_write && (*i as f64) < t_stop)
        .map(|(i, s)| plot::Point {
            t: rel(at(i)),
            requests: s.requests as f64,
            throttled: s.throttled as f64,
            connections: s.connections as f64,
        })
        .collect();
    let backlog: Vec<plot::Backlog> = w
        .backlog
        .windows(2)
        .filter(|b| b[1].0 >= t_write && b[1].0 <= t_stop)
        .map(|b| plot::Backlog {
            t: rel(b[1].0),
            agents: b[1].1 as f64,
            probes: b[1].3.saturating_sub(b[0].3) as f64 / (b[1].0 - b[0].0),
        })
        .collect();
    let svg = plot::svg(
        &points,
        &backlog,
        &plot::Marks {
            outage: (rel(t_down), rel(t_up)),
            steady,
            limit: cfg.rate_limit as f64,
            agents: n as f64,
        },
        &format!(
            "{n} agents, remote down {:.0} s: requests/s at the remote (peak/steady {ratio:.2})",
            cfg.outage
        ),
    );

    let md = format!(
        "# Fleet simulation\n\n\
         {n} edge-replicator agents (release build), each writing {series} lines (one point per \
         series) once a second, shipping to VictoriaMetrics behind a proxy that answers 429 + \
         `Retry-After: {ra}` above {limit} requests/s; `batch_size` {batch}; the remote refused \
         connections for {outage:.0} s after a {warmup:.0} s warm-up.\n\n\
         | measure | value |\n| --- | --- |\n\
         | steady request rate (mean of whole seconds; max) | {steady:.1}/s; {steady_max:.0}/s |\n\
         | peak request rate after the outage (at +{peak_at:.0} s) | {peak:.0}/s |\n\
         | peak / steady (goal ≤ 3) | {ratio:.2} |\n\
         | peak of requests answered 2xx after the outage | {peak_ok}/s |\n\
         | 429s sent / honoured / early / not followed | {throttled} / {honoured} / {early} / {unfollowed} |\n\
         | probes/s during the outage, mean (agents' `probes`); in all | {outage_probes:.1}/s; {probes} |\n\
         | return → first delivery, median / p90 / every agent | {fo50:.1} / {fo90:.1} / {all_back:.1} s |\n\
         | return → every agent drained (remainingLines = 0) | {drained:.1} s |\n\
         | lines written (acknowledged) | {lines_acked} |\n\
         | lines delivered (agents' deliveredLines) | {delivered} |\n\
         | lines forwarded with a 2xx by the proxy | {forwarded} |\n\
         | samples at VictoriaMetrics (distinct) | {vm_all} ({vm_distinct}) |\n\
         | written == delivered == at VictoriaMetrics | {cons} |\n\
         | memory of all agents together, peak: RSS / PSS | {rss:.0} / {pss:.0} MB |\n\
         | RSS per agent, peak: median / max | {hm50:.1} / {hmax:.1} MB |\n\
         | VictoriaMetrics peak RSS | {vmrss:.0} MB |\n\
         | CPU: agents / VictoriaMetrics over {wall:.0} s | {cpu:.0} s / {vm_cpu:.0} s |\n",
        series = cfg.series,
        ra = cfg.retry_after,
        batch = cfg.batch_size,
        limit = cfg.rate_limit,
        outage = cfg.outage,
        warmup = cfg.warmup,
        peak_at = at(peak_i) - t_up,
        unfollowed = throttled - honoured - early,
        fo50 = quantile(&first_ok, 0.5),
        fo90 = quantile(&first_ok, 0.9),
        cons = if conservation { "yes" } else { "**no**" },
        rss = mb(rss_peak),
        pss = mb(pss_peak),
        hm50 = quantile(&hwm, 0.5) / 1e6,
        hmax = quantile(&hwm, 1.0) / 1e6,
        vmrss = mb(vm_mem.peak),
        wall = t_stop - t_write,
    );
    let per_second: Vec<Value> = secs
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"t": rel(at(i)), "sec": s}))
        .collect();
    let results = json!({
        "figures": figures,
        "timeline_s": {"writing": 0.0, "down": rel(t_down), "up": rel(t_up), "stop": rel(t_stop)},
        "per_second": per_second,
        "backlog": w.backlog.iter().map(|b| json!({"t": rel(b.0), "agents": b.1, "lines": b.2, "probes": b.3})).collect::<Vec<_>>(),
        "memory_agents_total": w.rss.iter().map(|r| json!({"t": rel(r.0), "rss": r.1, "pss": r.2})).collect::<Vec<_>>(),
        "first_delivery_after_return_s": first_ok,
    });
    fs::write(out.join("results.md"), &md).expect("write results.md");
    fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results).expect("JSON"),
    )
    .expect("write results.json");
    fs::write(out.join("fleet.svg"), svg).expect("write fleet.svg");
    println!("{md}");
    println!(
        "fleet: results in {}/results.md, results.json, fleet.svg",
        out.display()
    );
    if !conservation {
        eprintln!(
            "fleet: lines do not add up: written {lines_acked}, accepted {accepted}, delivered \
             {delivered}, remaining {remaining}, lost {lost}, at VictoriaMetrics {vm_distinct}; \
             write errors {write_errors:?}"
        );
        std::process::exit(1);
    }
}
