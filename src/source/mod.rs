//! Sources: lines that do not arrive over HTTP but are read from local write
//! logs, each source on its own thread.
//!
//! - [`tail`] follows line-protocol files (a path or a glob) through rotation
//!   by rename and by copytruncate.
//! - [`wal`] follows the TSM write-ahead log of a local InfluxDB 1.x or OSS
//!   2.x database and rebuilds line protocol from it ([`wal_format`]).
//!
//! # Exactly once, through checkpoints
//!
//! A source's position (file offsets, WAL segments and offsets) is stored only
//! as a queue checkpoint, committed in the same LMDB transaction as the lines
//! read up to it ([`crate::queue::Write::checkpoint`]). A source advances its
//! in-memory position only after that commit returned. After a crash it
//! resumes from the last checkpoint: lines before it are queued, lines after
//! it are read again; none is lost and none is queued twice.
//!
//! # Backpressure
//!
//! Lines pass the same validation as HTTP writes ([`crate::lineproto::normalize`])
//! and are routed like a write to the source's bucket. A write refused because
//! a `when_full = "reject"` queue is full, or because the storage is full,
//! commits nothing: the source waits (backing off up to 5 s) and sends the same
//! lines again. It never skips them; meanwhile the files and segments wait on
//! disk. A WAL segment InfluxDB deletes while the source waits is a gap (see
//! [`wal`]); a tailed file keeps its data until rotation removes it.
//!
//! # Threads
//!
//! [`Sources`] starts one thread per configured source after the shipping
//! streams, restarts the ones whose config changed on reload (their
//! checkpoints make that exact), and stops them all before the queue closes.

mod notify;
pub mod tail;
pub mod wal;
pub mod wal_format;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};

use crate::config::{Config, InfluxdbWal, Tail};
use crate::ingest::{now_ns, Ingest};
use crate::lineproto::{self, LineError, Precision, Summary};
use crate::queue::{Checkpoint, Queue, QueueError, Write};
use crate::status::{SourceState, SourceStatus};
use crate::sync::Locked;

/// Most payload bytes one write of a source carries (less when a target's
/// `max_queue_size` is small).
pub const MAX_WRITE_BYTES: usize = 1 << 20;

/// A stop flag a source thread can sleep on, or wait on through a
/// [`notify::Watcher`].
#[derive(Debug, Default)]
pub struct Stopper {
    stopped: Mutex<bool>,
    cv: Condvar,
    /// Written when stopping: ends a wait on a watcher.
    wake: Mutex<Option<std::os::fd::OwnedFd>>,
}

impl Stopper {
    pub fn stop(&self) {
        let mut stopped = self.stopped.locked();
        *stopped = true;
        if let Some(fd) = self.wake.locked().as_ref() {
            notify::signal(fd);
        }
        self.cv.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.locked()
    }

    /// Sleeps up to `d`; true when the source was told to stop.
    pub fn sleep(&self, d: Duration) -> bool {
        let guard = self.stopped.locked();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, d, |s| !*s)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard
    }

    /// Stopping also writes `fd` (a watcher's stop descriptor), at once if
    /// the source was told to stop already.
    fn wake_on_stop(&self, fd: std::os::fd::OwnedFd) {
        let stopped = self.stopped.locked();
        if *stopped {
            notify::signal(&fd);
        }
        *self.wake.locked() = Some(fd);
    }
}

/// Why a source's write did not commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkError {
    /// The source is stopping; nothing was committed.
    Stopped,
    /// The payload is larger than a target's `max_queue_size`; nothing was
    /// committed. The source sends fewer lines at once.
    TooLarge,
}

/// Validates and normalises `body` (whole points) as an HTTP write is
/// validated, and counts its invalid lines in `status`; `log` is handed each
/// reported invalid line, since what names a line (a file and line, a WAL
/// shard and segment) and whether its text may be logged is the source's.
fn validate(
    status: &SourceStatus,
    body: &[u8],
    precision: Precision,
    log: impl Fn(&LineError),
) -> (Vec<u8>, Summary) {
    let mut out = Vec::with_capacity(body.len() + body.len() / 8 + 32);
    let now = now_ns();
    let summary = lineproto::normalize(body, precision, now, &mut out);
    status
        .invalid_lines
        .fetch_add(summary.error_count, Ordering::Relaxed);
    *status.anchor.locked() = crate::clock::on_write(now, summary.stamped, summary.earliest);
    summary.errors.iter().for_each(log);
    (out, summary)
}

/// A source's reader: each poll reads what is new, commits it with the
/// position after it, and returns; `Err` when the source is stopping.
trait Follow {
    fn poll(&mut self, sink: &mut dyn Sink) -> Result<(), SinkError>;

    /// Directories whose changes should wake the source; `None`: it polls.
    fn watch_dirs(&self) -> Option<std::collections::BTreeSet<std::path::PathBuf>> {
        None
    }
}

impl Follow for tail::Tailer {
    fn poll(&mut self, sink: &mut dyn Sink) -> Result<(), SinkError> {
        tail::Tailer::poll(self, sink)
    }

    fn watch_dirs(&self) -> Option<std::collections::BTreeSet<std::path::PathBuf>> {
        tail::Tailer::watch_dirs(self)
    }
}

impl Follow for wal::WalFollower {
    fn poll(&mut self, sink: &mut dyn Sink) -> Result<(), SinkError> {
        wal::WalFollower::poll(self, sink)
    }
}

/// What became of a source's write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// The lines and the position after them are committed.
    Queued,
    /// Refused as too large: read fewer lines and write again.
    Shrink,
    /// Refused as too large although it could not be read smaller: the lines
    /// can never be queued. They are counted invalid and the position moves
    /// past them with nothing queued; the source logs what it skipped.
    Skipped,
}

/// Writes `payload` (`lines` lines of retention policy `rp`) with the
/// position after it; a refusal as too large becomes [`Written::Shrink`]
/// while the source `can_shrink` what it reads at once, else
/// [`Written::Skipped`]. Either way nothing is ever queued twice or lost
/// without a count.
fn write_whole(
    sink: &mut dyn Sink,
    status: &SourceStatus,
    rp: &str,
    payload: &[u8],
    lines: u64,
    checkpoint: &[u8],
    can_shrink: bool,
) -> Result<Written, SinkError> {
    match sink.write_rp(rp, payload, lines, checkpoint) {
        Ok(()) => Ok(Written::Queued),
        Err(SinkError::TooLarge) if can_shrink => Ok(Written::Shrink),
        Err(SinkError::TooLarge) => {
            status.invalid_lines.fetch_add(lines, Ordering::Relaxed);
            sink.write(&[], 0, checkpoint)?;
            Ok(Written::Skipped)
        }
        Err(e) => Err(e),
    }
}

/// Where a source commits its lines and position: the queue in the agent, a
/// model in tests.
pub trait Sink {
    /// Commits `payload` (`lines` normalised lines, possibly none) together
    /// with the source's new checkpoint, or nothing. Waits out backpressure.
    fn write(&mut self, payload: &[u8], lines: u64, checkpoint: &[u8]) -> Result<(), SinkError>;
    /// As [`Sink::write`], for lines of InfluxDB retention policy `rp` (a
    /// WAL shard's): the queue keeps a policy other than `autogen` with
    /// them, as it keeps a v1 write's `rp`.
    fn write_rp(
        &mut self,
        rp: &str,
        payload: &[u8],
        lines: u64,
        checkpoint: &[u8],
    ) -> Result<(), SinkError> {
        let _ = rp;
        self.write(payload, lines, checkpoint)
    }
    /// The checkpoint committed last, when the source starts.
    fn checkpoint(&self) -> Option<Vec<u8>>;
    /// Most payload bytes one write should carry.
    fn budget(&self) -> usize;
}

/// The agent's sink: routes to the replications taking the bucket and
/// commits through the queue writer.
pub struct QueueSink {
    pub queue: Arc<Queue>,
    pub ingest: Arc<Ingest>,
    pub key: String,
    pub bucket: String,
    pub status: Arc<SourceStatus>,
    pub stop: Arc<Stopper>,
}

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The retention policy InfluxDB creates with a database (1.x) and the only
/// one 2.x has: its lines are queued as the bucket itself.
const DEFAULT_RP: &str = "autogen";

impl Sink for QueueSink {
    fn write(&mut self, payload: &[u8], lines: u64, checkpoint: &[u8]) -> Result<(), SinkError> {
        self.write_rp(DEFAULT_RP, payload, lines, checkpoint)
    }

    fn write_rp(
        &mut self,
        rp: &str,
        payload: &[u8],
        lines: u64,
        checkpoint: &[u8],
    ) -> Result<(), SinkError> {
        let dest = if rp == DEFAULT_RP {
            crate::ingest::Destination::bucket(&self.bucket)
        } else {
            crate::ingest::Destination::v1(&self.bucket, rp)
        };
        let mut delay = RETRY_MIN;
        let mut logged = false;
        let anchor = self.status.anchor.locked().take();
        loop {
            if self.stop.is_stopped() {
                return Err(SinkError::Stopped);
            }
            let targets = if lines > 0 {
                self.ingest.routing().targets(&dest)
            } else {
                Vec::new()
            };
            let why = if lines > 0 && targets.is_empty() {
                format!("no replication takes bucket \"{}\"; waiting", self.bucket)
            } else {
                let w = Write {
                    targets,
                    bucket: dest.bucket.clone(),
                    payload: payload.to_vec(),
                    lines,
                    checkpoint: Some(Checkpoint {
                        key: self.key.clone(),
                        value: checkpoint.to_vec(),
                    }),
                    clock: anchor,
                };
                match self.queue.write_blocking(w) {
                    Ok(()) => {
                        self.status.lines.fetch_add(lines, Ordering::Relaxed);
                        let mut d = self.status.detail.locked();
                        if lines > 0 {
                            d.last_queued = Some(SystemTime::now());
                        }
                        if d.state == SourceState::Blocked {
                            d.state = SourceState::Following;
                            info!("{}: queue accepts lines again", self.status.name);
                        }
                        return Ok(());
                    }
                    Err(QueueError::TooLarge { .. }) => return Err(SinkError::TooLarge),
                    // A replication detached by a reload, or the queue
                    // closing: the routing (or the stop flag) changes soon.
                    Err(QueueError::Closed) => "the queue is not taking writes; waiting".into(),
                    Err(e) => format!("{e}; waiting and retrying the same lines"),
                }
            };
            self.status.retries.fetch_add(1, Ordering::Relaxed);
            {
                let mut d = self.status.detail.locked();
                d.state = SourceState::Blocked;
                d.latest_error = why.clone();
            }
            if !logged {
                warn!("{}: {why}", self.status.name);
                logged = true;
            }
            if self.stop.sleep(delay) {
                return Err(SinkError::Stopped);
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    fn checkpoint(&self) -> Option<Vec<u8>> {
        match self.queue.checkpoint(&self.key) {
            Ok(v) => v,
            Err(e) => {
                error!(
                    "{}: cannot read its checkpoint ({e}); starting without one",
                    self.status.name
                );
                None
            }
        }
    }

    fn budget(&self) -> usize {
        let routing = self.ingest.routing();
        routing
            .routes
            .iter()
            .filter(|r| r.config.takes_bucket(&self.bucket))
            .map(|r| (r.config.max_queue_size / 2).max(1) as usize)
            .fold(MAX_WRITE_BYTES, usize::min)
    }
}

/// A source as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    Tail(Tail),
    Wal(InfluxdbWal),
}

impl SourceConfig {
    /// The queue checkpoint key: stable across restarts and bucket changes.
    pub fn checkpoint_key(&self) -> String {
        match self {
            SourceConfig::Tail(t) => format!("tail:{}", t.path.display()),
            SourceConfig::Wal(w) => format!("wal:{}:{}", w.wal_dir.display(), w.database),
        }
    }

    fn bucket(&self) -> &str {
        match self {
            SourceConfig::Tail(t) => &t.bucket,
            SourceConfig::Wal(w) => &w.bucket,
        }
    }

    fn status(&self) -> SourceStatus {
        match self {
            SourceConfig::Tail(t) => {
                SourceStatus::new("tail", format!("tail {}", t.path.display()), &t.bucket)
            }
            SourceConfig::Wal(w) => SourceStatus::new(
                "influxdb_wal",
                format!("influxdb_wal {}/{}", w.wal_dir.display(), w.database),
                &w.bucket,
            ),
        }
    }
}

/// Every source of a config.
pub fn configured(config: &Config) -> Vec<SourceConfig> {
    config
        .tails
        .iter()
        .cloned()
        .map(SourceConfig::Tail)
        .chain(config.influxdb_wals.iter().cloned().map(SourceConfig::Wal))
        .collect()
}

struct Running {
    config: SourceConfig,
    status: Arc<SourceStatus>,
    stop: Arc<Stopper>,
    thread: thread::JoinHandle<()>,
}

/// The running sources.
#[derive(Default)]
pub struct Sources {
    running: Vec<Running>,
}

impl Sources {
    /// Starts the sources of `config` that are not running, stops those no
    /// longer configured (or configured differently), and publishes their
    /// statuses.
    pub fn apply(&mut self, config: &Config, queue: &Arc<Queue>, ingest: &Arc<Ingest>) {
        let wanted = configured(config);
        let (keep, gone): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| wanted.contains(&r.config));
        if !gone.is_empty() {
            for r in &gone {
                info!("{}: stopping (removed or changed)", r.status.name);
            }
            stop_all(gone);
        }
        self.running = keep;
        for c in wanted {
            if self.running.iter().any(|r| r.config == c) {
                continue;
            }
            match start(c.clone(), queue.clone(), ingest.clone()) {
                Ok(r) => self.running.push(r),
                Err(e) => error!("{}: cannot start a thread: {e}", c.checkpoint_key()),
            }
        }
        ingest.set_sources(self.running.iter().map(|r| r.status.clone()).collect());
    }

    /// Stops every source; returns when their threads ended (or after 10 s).
    pub fn stop(&mut self) {
        stop_all(std::mem::take(&mut self.running));
    }
}

fn start(config: SourceConfig, queue: Arc<Queue>, ingest: Arc<Ingest>) -> std::io::Result<Running> {
    let status = Arc::new(config.status());
    let stop = Arc::new(Stopper::default());
    let sink = QueueSink {
        queue,
        ingest,
        key: config.checkpoint_key(),
        bucket: config.bucket().to_string(),
        status: status.clone(),
        stop: stop.clone(),
    };
    let thread = {
        let (config, status, stop) = (config.clone(), status.clone(), stop.clone());
        thread::Builder::new()
            .name("source".into())
            .spawn(move || run(config, sink, status, stop))?
    };
    Ok(Running {
        config,
        status,
        stop,
        thread,
    })
}

fn run(config: SourceConfig, mut sink: QueueSink, status: Arc<SourceStatus>, stop: Arc<Stopper>) {
    let saved = sink.checkpoint();
    let (bucket, poll, watching, mut follower): (_, _, _, Box<dyn Follow>) = match config {
        SourceConfig::Tail(t) => (
            t.bucket.clone(),
            t.poll_interval,
            true,
            Box::new(tail::Tailer::new(t, status.clone(), saved)),
        ),
        SourceConfig::Wal(w) => (
            w.bucket.clone(),
            w.poll_interval,
            false,
            Box::new(wal::WalFollower::new(w, status.clone(), saved)),
        ),
    };
    // Tailed files wake their source when they change; the WAL is polled.
    let mut watcher = watching
        .then(|| {
            notify::Watcher::new()
                .and_then(|w| {
                    stop.wake_on_stop(w.stop_fd()?);
                    Ok(w)
                })
                .map_err(|e| warn!("{}: cannot watch for changes ({e}); polling", status.name))
                .ok()
        })
        .flatten();
    info!(
        "{}: following into bucket \"{bucket}\" ({})",
        status.name,
        match watcher {
            Some(_) => format!("woken by changes, at most every {poll:?}"),
            None => format!("poll every {poll:?}"),
        }
    );
    let rescan = notify::rescan();
    while follower.poll(&mut sink).is_ok() {
        let watched = watcher
            .as_mut()
            .map_or(notify::Watched::No, |w| w.watch(follower.watch_dirs()));
        // Polls stay `poll` apart; changes meanwhile are pending on the watcher.
        if stop.sleep(poll) {
            break;
        }
        if watched == notify::Watched::Same {
            let w = watcher.as_ref().expect("watched");
            if w.wait(rescan.saturating_sub(poll)) == notify::Woke::Stopped {
                break;
            }
        }
    }
    info!("{}: stopped", status.name);
}

fn stop_all(list: Vec<Running>) {
    for r in &list {
        r.stop.stop();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for r in list {
        while !r.thread.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if r.thread.is_finished() {
            if r.thread.join().is_err() {
                error!("{}: its thread panicked", r.status.name);
            }
        } else {
            warn!(
                "{}: still busy after 10 s; left behind (its position is only saved with committed lines)",
                r.status.name
            );
        }
    }
}

/// A sink for unit tests: a list of committed lines and the last checkpoint,
/// with crashes on demand.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    #[derive(Debug, Default)]
    pub struct MemorySink {
        pub lines: Vec<String>,
        pub checkpoint: Option<Vec<u8>>,
        pub writes: usize,
        /// The next write fails as if the process died before its commit.
        pub crash_next: bool,
        /// Payloads larger than this are refused as too large.
        pub max_payload: Option<usize>,
        pub budget: Option<usize>,
    }

    impl Sink for MemorySink {
        fn write(
            &mut self,
            payload: &[u8],
            lines: u64,
            checkpoint: &[u8],
        ) -> Result<(), SinkError> {
            if std::mem::take(&mut self.crash_next) {
                return Err(SinkError::Stopped);
            }
            if self.max_payload.is_some_and(|m| payload.len() > m) {
                return Err(SinkError::TooLarge);
            }
            let text = std::str::from_utf8(payload).expect("utf-8 payload");
            let got: Vec<String> = crate::lineproto::points(payload)
                .map(|p| String::from_utf8(p.strip_suffix(b"\n").unwrap_or(p).to_vec()).unwrap())
                .collect();
            assert_eq!(got.len() as u64, lines, "line count of {text:?}");
            assert!(payload.is_empty() || payload.ends_with(b"\n"));
            self.lines.extend(got);
            self.checkpoint = Some(checkpoint.to_vec());
            self.writes += 1;
            Ok(())
        }

        fn checkpoint(&self) -> Option<Vec<u8>> {
            self.checkpoint.clone()
        }

        fn budget(&self) -> usize {
            self.budget.unwrap_or(MAX_WRITE_BYTES)
        }
    }

    pub fn status() -> Arc<SourceStatus> {
        Arc::new(SourceStatus::new("test", "test".into(), "b"))
    }
}
