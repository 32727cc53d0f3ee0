//! The processes under test (edge-replicator, vmagent) and the real remote
//! (VictoriaMetrics), with what /proc tells about them: CPU time, bytes
//! written to storage, resident memory.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// GET `url`; the status and body, or None when nothing answered.
pub fn get(agent: &ureq::Agent, url: &str) -> Option<(u16, String)> {
    let mut r = agent.get(url).call().ok()?;
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    Some((status, body))
}

/// Memory of a process, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    /// Peak resident set (VmHWM).
    pub peak: u64,
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
}

/// `BENCH_CPUS` (e.g. `0`, `0,1` or `0-1`): the CPUs the agents under test
/// are pinned to, as `taskset -c` would, to measure them on as many cores as
/// a small board has. The servers and clients of the bench are not pinned.
pub fn pinned_cpus_spec() -> Option<String> {
    std::env::var("BENCH_CPUS")
        .ok()
        .filter(|s| !s.trim().is_empty())
}

fn pinned_cpus() -> Option<libc::cpu_set_t> {
    let spec = pinned_cpus_spec()?;
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for part in spec.split(',') {
        let (lo, hi) = match part.trim().split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>(), b.trim().parse::<usize>()),
            None => (part.trim().parse(), part.trim().parse()),
        };
        let (Ok(lo), Ok(hi)) = (lo, hi) else {
            panic!("BENCH_CPUS={spec}: expected CPU numbers like 0, 0,1 or 0-1");
        };
        let cpus = std::mem::size_of::<libc::cpu_set_t>() * 8;
        assert!(
            hi < cpus,
            "BENCH_CPUS={spec}: CPU {hi} is past the {cpus} a set holds"
        );
        for cpu in lo..=hi {
            // SAFETY: `cpu` is within the set (checked above).
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
    }
    Some(set)
}

/// Whether `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A child process killed when dropped.
pub struct Proc {
    pub name: &'static str,
    child: Option<Child>,
    pub log: PathBuf,
    pub started: Instant,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open a log file");
        let started = Instant::now();
        let cpus = if matches!(name, "edge-replicator" | "vmagent") {
            pinned_cpus()
        } else {
            None
        };
        // SAFETY: prctl and sched_setaffinity are async-signal-safe, and
        // the CPU set is built before the fork; the child dies with the
        // harness, even when the harness is killed.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(set) = &cpus {
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup a log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name,
            child: Some(child),
            log,
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn proc_file(&self, what: &str) -> String {
        fs::read_to_string(format!("/proc/{}/{what}", self.pid())).unwrap_or_default()
    }

    /// User + system CPU seconds used so far (all threads).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = self.proc_file("stat");
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat(5), counted after the command name.
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        ticks as f64 / hz
    }

    /// Seconds its threads have run so far, to the nanosecond (the first
    /// field of each thread's `schedstat`): what an idle process uses is a
    /// tick or two of `cpu_seconds` in minutes, too coarse to compare. A
    /// thread that ended meanwhile takes its time with it, so this is for
    /// processes at rest, falling back to `cpu_seconds` where the kernel
    /// keeps no `schedstat`.
    pub fn run_seconds(&self) -> f64 {
        let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0.0;
        };
        let mut ns = 0u64;
        for t in tasks.flatten() {
            let Some(run) = fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            else {
                return self.cpu_seconds();
            };
            ns += run;
        }
        ns as f64 / 1e9
    }

    /// Bytes this process caused to be sent to storage (`write_bytes`).
    pub fn write_bytes(&self) -> u64 {
        self.proc_file("io")
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn mem(&self) -> Mem {
        let status = self.proc_file("status");
        let kb = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        Mem {
            peak: kb("VmHWM:"),
            rss: kb("VmRSS:"),
            anon: kb("RssAnon:"),
            file: kb("RssFile:"),
        }
    }

    /// Context switches of all its threads so far (voluntary and not): how
    /// often it woke up, which is what an idle process costs a battery.
    pub fn context_switches(&self) -> u64 {
        let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .flatten()
            .map(|t| fs::read_to_string(t.path().join("status")).unwrap_or_default())
            .flat_map(|status| {
                status
                    .lines()
                    .filter_map(|l| {
                        l.strip_prefix("voluntary_ctxt_switches:")
                            .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                    })
                    .filter_map(|v| v.trim().parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Polls `url` until it answers 200; the time since the spawn.
    pub fn wait_ready(&mut self, url: &str, timeout: Duration) -> Duration {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(500)))
            .build()
            .new_agent();
        loop {
            if let Ok(r) = agent.get(url).call() {
                if r.status().as_u16() == 200 {
                    return self.started.elapsed();
                }
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {st} on start; see {}",
                    self.name,
                    self.log.display()
                );
            }
            assert!(
                self.started.elapsed() < timeout,
                "{} not ready within {timeout:?}; see {}",
                self.name,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Settings of an edge-replicator instance.
pub struct AgentSpec<'a> {
    pub dir: &'a Path,
    pub port: u16,
    pub remote_url: &'a str,
    pub max_backoff: &'a str,
    /// TOML appended to the config (e.g. a `[[tail]]` table).
    pub extra: &'a str,
    /// TOML appended to the `[[remote]]` table (e.g. `max_in_flight`).
    pub remote_extra: &'a str,
}

/// Writes a config under `spec.dir` and starts the agent on it.
pub fn start_agent(bin: &Path, spec: &AgentSpec) -> Proc {
    fs::create_dir_all(spec.dir).expect("create the agent's directory");
    let config = spec.dir.join("config.toml");
    let text = format!(
        r#"data_dir = "{dir}"
log_level = "warn"

[listen]
address = "127.0.0.1:{port}"
max_body_size = "64MiB"

[queue]
commit_interval = "10ms"
durability = "fsync"
map_size = "8GiB"

# The boards measured keep a synchronised clock, and the generated lines are
# stamped in 2025: this machine may read as unsynchronised (no time
# service), which must not hold writes here.
[clock]
wait_for_sync = "1s"
send_before_build = true

[[remote]]
name = "remote"
url = "{url}"
api = "v2"
org = "bench"
max_backoff = "{max_backoff}"
{remote_extra}
[[replication]]
name = "bench"
remote = "remote"
local_bucket = "*"
remote_bucket = "bench"
max_queue_size = "3GiB"
max_age = "0"
batch_size = "500kB"
gzip_level = 6
{extra}"#,
        extra = spec.extra,
        remote_extra = spec.remote_extra,
        dir = spec.dir.join("data").display(),
        port = spec.port,
        url = spec.remote_url,
        max_backoff = spec.max_backoff,
    );
    fs::write(&config, text).expect("write the agent's config");
    spawn_agent(bin, &config, spec.dir.join("agent.log"))
}

/// `edge-replicator run --config CONFIG`, its output in `log`.
pub fn spawn_agent(bin: &Path, config: &Path, log: PathBuf) -> Proc {
    Proc::spawn(
        "edge-replicator",
        Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG"),
        log,
    )
}

/// Starts vmagent with its disk buffer under `dir`.
pub fn start_vmagent(dir: &Path, port: u16, remote_url: &str) -> Proc {
    start_vmagent_with(dir, port, remote_url, &[])
}

/// [`start_vmagent`] with more flags.
pub fn start_vmagent_with(dir: &Path, port: u16, remote_url: &str, flags: &[String]) -> Proc {
    fs::create_dir_all(dir).expect("create vmagent's directory");
    Proc::spawn(
        "vmagent",
        Command::new("vmagent")
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-remoteWrite.url={remote_url}"))
            .arg(format!(
                "-remoteWrite.tmpDataPath={}",
                dir.join("data").display()
            ))
            .arg("-loggerLevel=WARN")
            .args(flags),
        dir.join("vmagent.log"),
    )
}

/// Starts VictoriaMetrics with its storage under `dir`.
pub fn start_victoria(dir: &Path, port: u16) -> Proc {
    fs::create_dir_all(dir).expect("create VictoriaMetrics' directory");
    let mut p = Proc::spawn(
        "victoria-metrics",
        Command::new("victoria-metrics")
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", dir.join("data").display()))
            .arg("-retentionPeriod=100y")
            .arg("-loggerLevel=WARN"),
        dir.join("victoria-metrics.log"),
    );
    p.wait_ready(
        &format!("http://127.0.0.1:{port}/health"),
        Duration::from_secs(30),
    );
    p
}

/// The replication's status object from the agent's API.
pub fn agent_status(http: &ureq::Agent, port: u16) -> Option<serde_json::Value> {
    let (code, body) = get(
        http,
        &format!("http://127.0.0.1:{port}/api/v2/replications"),
    )?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["replications"].get(0).cloned()
}

pub fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name].as_u64().unwrap_or(0)
}

/// Sum of a metric's samples (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// vmagent's data not yet delivered (memory and disk) and requests answered 2xx.
pub fn vmagent_pending(http: &ureq::Agent, port: u16) -> Option<(f64, f64)> {
    let (_, text) = get(http, &format!("http://127.0.0.1:{port}/metrics"))?;
    let pending = metric_sum(&text, "vmagent_remotewrite_pending_data_bytes");
    let ok: f64 = text
        .lines()
        .filter(|l| l.starts_with("vmagent_remotewrite_requests_total{") && l.contains("\"2XX\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some((pending, ok))
}

/// Copies a directory tree (the pristine backlog into a work copy).
pub fn copy_tree(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        st.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
}
