//! `[telemetry]`: the agent's own health, written as line protocol into its
//! own queue.
//!
//! A fleet sits behind NAT: nobody can scrape `/metrics` on a gateway. So
//! every `interval` the agent takes a reading of itself and queues it in a
//! local bucket like any write; a replication takes that bucket to the
//! remote. Because the readings are queued, an outage does not lose them:
//! when the link returns, the remote receives the queue-depth history of the
//! outage, stamped with the times the readings were taken, which is what an
//! operator of hundreds of gateways needs to see which ones suffered and how.
//!
//! Two measurements, both tagged `instance` (`instance_id`, default the
//! host name):
//!
//! - `edge_replicator_replication`, tagged `replication` and `remote`: queued
//!   bytes, remaining lines, oldest entry age, the delivered, dropped,
//!   expired, non-retryable and dead-lettered line counters, state, latest
//!   status code, and compressed bytes sent;
//! - `edge_replicator_agent`: uptime, version, bytes free on the file system
//!   of `data_dir`, the size of the queue file and the map it may grow to,
//!   resident memory, CPU seconds, the clock's state (`crate::clock`) and
//!   the lines stamped while it was not synchronised.
//!
//! The readings count in the counters of the replication that carries them,
//! like any other lines. A reading the queue refuses (full, with
//! `when_full = "reject"`) is dropped with a warning: the next one follows.
//! Formatting is pure ([`lines`]); the thread only reads and queues.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use log::{debug, warn};

use crate::config::Telemetry;
use crate::ingest::{now_ns, Ingest};
use crate::lineproto::{self, Precision};
use crate::queue::{Queue, Write};
use crate::source::Stopper;
use crate::status::ReplStatus;
use crate::sync::Locked;

/// One replication's reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplReading {
    pub name: String,
    pub remote: String,
    pub queued_bytes: u64,
    pub remaining_lines: u64,
    pub oldest_age_seconds: u64,
    pub delivered_lines: u64,
    pub dropped_full_lines: u64,
    pub expired_lines: u64,
    pub dropped_non_retryable_lines: u64,
    pub dead_lettered_lines: u64,
    pub state: &'static str,
    pub latest_code: Option<u16>,
    /// Compressed request bodies put on the wire, accepted or not.
    pub wire_bytes_sent: u64,
}

impl ReplReading {
    pub fn of(r: &ReplStatus, now_ns: u64) -> ReplReading {
        let c = r.queue.counters();
        let s = r.ship.locked().clone();
        ReplReading {
            name: r.name.clone(),
            remote: r.remote.clone(),
            queued_bytes: c.queued_bytes,
            remaining_lines: c.queued_lines,
            oldest_age_seconds: c
                .oldest_enqueued_ns
                .map_or(0, |t| now_ns.saturating_sub(t) / 1_000_000_000),
            delivered_lines: c.delivered_lines,
            dropped_full_lines: c.dropped_full_lines,
            expired_lines: c.expired_lines,
            dropped_non_retryable_lines: c.dropped_non_retryable_lines,
            dead_lettered_lines: c.dead_lettered_lines,
            state: s.state.as_str(),
            latest_code: s.latest_code,
            wire_bytes_sent: s.wire_bytes_sent,
        }
    }
}

/// The agent's reading; a figure the system would not give is left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReading {
    pub uptime_seconds: u64,
    pub disk_free_bytes: Option<u64>,
    pub queue_file_bytes: Option<u64>,
    pub map_size_bytes: u64,
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    /// [`crate::clock::ClockState`] by name: a reading stamped while the
    /// clock was not synchronised says so itself.
    pub clock: &'static str,
    /// Lines stamped while the clock was not synchronised, since the start.
    pub lines_stamped_unsynchronised: u64,
}

/// Escapes a tag value: `,`, `=`, ` ` and `\` take a backslash.
fn tag(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, ',' | '=' | ' ' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Line protocol of one reading at `ts_ns`.
pub fn lines(instance: &str, ts_ns: i64, agent: &AgentReading, repls: &[ReplReading]) -> String {
    let inst = tag(instance);
    let mut out = String::new();
    for r in repls {
        let _ = write!(
            out,
            "edge_replicator_replication,instance={inst},replication={},remote={} \
             queued_bytes={}i,remaining_lines={}i,oldest_age_seconds={}i,\
             delivered_lines={}i,dropped_full_lines={}i,expired_lines={}i,\
             dropped_non_retryable_lines={}i,dead_lettered_lines={}i,\
             state=\"{}\",wire_bytes_sent={}i",
            tag(&r.name),
            tag(&r.remote),
            r.queued_bytes,
            r.remaining_lines,
            r.oldest_age_seconds,
            r.delivered_lines,
            r.dropped_full_lines,
            r.expired_lines,
            r.dropped_non_retryable_lines,
            r.dead_lettered_lines,
            r.state,
            r.wire_bytes_sent,
        );
        if let Some(code) = r.latest_code {
            let _ = write!(out, ",latest_code={code}i");
        }
        let _ = writeln!(out, " {ts_ns}");
    }
    let _ = write!(
        out,
        "edge_replicator_agent,instance={inst} uptime_seconds={}i,version=\"{}\",map_size_bytes={}i,\
         clock=\"{}\",lines_stamped_unsynchronised={}i",
        agent.uptime_seconds,
        env!("CARGO_PKG_VERSION"),
        agent.map_size_bytes,
        agent.clock,
        agent.lines_stamped_unsynchronised,
    );
    for (k, v) in [
        ("disk_free_bytes", agent.disk_free_bytes),
        ("queue_file_bytes", agent.queue_file_bytes),
        ("rss_bytes", agent.rss_bytes),
    ] {
        if let Some(v) = v {
            let _ = write!(out, ",{k}={v}i");
        }
    }
    if let Some(cpu) = agent.cpu_seconds.filter(|c| c.is_finite()) {
        let _ = write!(out, ",cpu_seconds={cpu}");
    }
    let _ = writeln!(out, " {ts_ns}");
    out
}

/// Bytes an unprivileged user may still write on the file system of `dir`.
fn disk_free(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct passed; the path is NUL-terminated
    // and both outlive the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0)
            .then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

/// Resident memory, from `/proc/self/statm` (pages).
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| pages.saturating_mul(p))
}

/// User plus system CPU time of the process.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage fills the struct passed, which outlives the call.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0).then(|| {
            let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            t(ru.ru_utime) + t(ru.ru_stime)
        })
    }
}

/// The telemetry thread; stopped and joined on drop.
pub struct Reporter {
    stop: Arc<Stopper>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the thread that queues a reading every `config.interval`.
pub fn start(
    config: Telemetry,
    ingest: Arc<Ingest>,
    queue: Arc<Queue>,
    data_dir: PathBuf,
    map_size: u64,
    started: Instant,
) -> std::io::Result<Reporter> {
    let stop = Arc::new(Stopper::default());
    let stopper = stop.clone();
    let thread = thread::Builder::new()
        .name("telemetry".into())
        .spawn(move || {
            let mut warned = false;
            // The first reading waits an interval too: at start the queue
            // holds only what the last run left, which the last run's
            // readings already described.
            while !stopper.sleep(config.interval) {
                let now = now_ns();
                let routing = ingest.routing();
                let repls: Vec<ReplReading> = routing
                    .statuses
                    .iter()
                    .map(|r| ReplReading::of(r, now.max(0) as u64))
                    .collect();
                let targets = routing.targets(&crate::ingest::Destination::bucket(&config.bucket));
                drop(routing);
                let agent = AgentReading {
                    uptime_seconds: started.elapsed().as_secs(),
                    disk_free_bytes: disk_free(&data_dir),
                    queue_file_bytes: std::fs::metadata(data_dir.join("queue").join("data.mdb"))
                        .ok()
                        .map(|m| m.len()),
                    map_size_bytes: map_size,
                    rss_bytes: rss(),
                    cpu_seconds: cpu_seconds(),
                    clock: crate::clock::state().as_str(),
                    lines_stamped_unsynchronised: crate::clock::stamped_untrusted(),
                };
                let text = lines(&config.instance_id, now, &agent, &repls);
                let mut payload = Vec::with_capacity(text.len());
                let summary = lineproto::normalize(
                    text.as_bytes(),
                    Precision::Nanoseconds,
                    now,
                    &mut payload,
                );
                if summary.error_count > 0 || targets.is_empty() {
                    if !warned {
                        warn!(
                            "telemetry: no replication takes bucket \"{}\" now, or a reading is \
                             not valid line protocol; readings are skipped",
                            config.bucket
                        );
                        warned = true;
                    }
                    continue;
                }
                let w = Write {
                    targets,
                    bucket: config.bucket.clone(),
                    payload,
                    lines: summary.lines,
                    checkpoint: None,
                    // A reading is stamped with the clock: while the guard
                    // holds, it waits for the clock's true time too.
                    clock: crate::clock::on_write(now, summary.stamped, summary.earliest),
                };
                match queue.write_blocking(w) {
                    Ok(()) => {
                        ingest
                            .stats
                            .lines_written
                            .fetch_add(summary.lines, Ordering::Relaxed);
                        debug!("telemetry: {} lines queued", summary.lines);
                        warned = false;
                    }
                    Err(e) => warn!("telemetry: reading not queued: {e}"),
                }
            }
        })?;
    Ok(Reporter {
        stop,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_valid_line_protocol_with_every_figure() {
        let agent = AgentReading {
            uptime_seconds: 61,
            disk_free_bytes: Some(1 << 30),
            queue_file_bytes: None,
            map_size_bytes: 64 << 20,
            rss_bytes: Some(9 << 20),
            cpu_seconds: Some(1.25),
            clock: "unsynchronised",
            lines_stamped_unsynchronised: 12,
        };
        let repl = ReplReading {
            name: "r1".into(),
            remote: "cloud eu".into(),
            queued_bytes: 4096,
            remaining_lines: 100,
            oldest_age_seconds: 30,
            delivered_lines: 7,
            state: "backoff",
            latest_code: Some(503),
            wire_bytes_sent: 1000,
            ..ReplReading::default()
        };
        let text = lines("gw=17, hall", 1_700_000_000_000_000_000, &agent, &[repl]);
        let mut out = Vec::new();
        let summary = lineproto::normalize(text.as_bytes(), Precision::Nanoseconds, 0, &mut out);
        assert_eq!((summary.lines, summary.error_count), (2, 0), "{text}");
        let mut rows = text.lines();
        let repl_line = rows.next().unwrap();
        assert!(
            repl_line.starts_with(
                "edge_replicator_replication,instance=gw\\=17\\,\\ hall,replication=r1,remote=cloud\\ eu "
            ),
            "{repl_line}"
        );
        for f in [
            "remaining_lines=100i",
            "queued_bytes=4096i",
            "oldest_age_seconds=30i",
            "state=\"backoff\"",
            "latest_code=503i",
            "wire_bytes_sent=1000i",
        ] {
            assert!(repl_line.contains(f), "{f} in {repl_line}");
        }
        assert!(repl_line.ends_with(" 1700000000000000000"), "{repl_line}");
        let agent_line = rows.next().unwrap();
        for f in [
            "uptime_seconds=61i",
            "disk_free_bytes=1073741824i",
            "rss_bytes=9437184i",
            "cpu_seconds=1.25",
            "clock=\"unsynchronised\"",
            "lines_stamped_unsynchronised=12i",
            concat!("version=\"", env!("CARGO_PKG_VERSION"), "\""),
        ] {
            assert!(agent_line.contains(f), "{f} in {agent_line}");
        }
        assert!(!agent_line.contains("queue_file_bytes"), "{agent_line}");
    }

    #[test]
    fn the_system_figures_are_read() {
        assert!(disk_free(Path::new("/")).is_some());
        assert!(rss().is_some_and(|b| b > 0));
        assert!(cpu_seconds().is_some_and(|c| c >= 0.0));
    }
}
