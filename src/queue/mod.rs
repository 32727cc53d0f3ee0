//! The durable queue: one LMDB environment holding, per replication, an
//! append-only log of entries, its read position and its counters, and the
//! lanes of its held destinations.
//!
//! # Layout
//!
//! Five databases in one environment under `<data_dir>/queue/`: `entries`
//! (the main logs), `lanes` (the held lanes), `meta` (names, ids, each
//! replication's [`Meta`] record, each lane's record and the source
//! checkpoints), `dead` (the dead-letter stores) and `windows` (open
//! downsampling windows). Every key and record format, and the format
//! versions, are in [`schema`]; the entry format is in [`entry`].
//!
//! # Held lanes: settling out of order
//!
//! An entry holds the lines of one destination (one write's local bucket,
//! `db` or `db/rp`), and a batch of a replication that sends each bucket to
//! its own name holds one bucket. When the remote refuses one destination
//! as a whole (404, a 403 on one bucket), [`Queue::hold`] moves that
//! destination's entries from the main log, in one transaction, into a
//! lane of their own: key `[id][lane][seq]` in `lanes`, with a record in
//! `meta` (its head, next sequence, lines, bytes, since when and why). Later
//! writes to it join the lane. Each log (the main log, every lane) has its
//! own head and is settled in order from it; the logs settle independently
//! of each other. The main log keeps its sequence numbers: the entries a
//! hold moved leave gaps, which reading and removal skip. A lane is shipped
//! again as it is (nothing moves back); it ends, record and all, once it is
//! empty (delivered, evicted or expired) or moved to the dead-letter store.
//! A lane's lines are queued lines: they count in the replication's queued
//! lines and bytes (and the lane's own record), `drop_oldest` evicts the
//! oldest head of any log, and `max_age` expires in every log, counted as
//! for the main log.
//!
//! A live batch (`send_order = "live_first"`) is the other way the main log
//! gets gaps: whole entries past the head, and past the batch whose
//! settlement is on its way, read by [`Queue::read_live`] from where
//! [`Queue::live_start`] says the newest lines begin, and deleted by their
//! settlement without moving the head. An entry is live only if each of its
//! lines is stamped later than the entry before it was queued (less
//! [`STAMP_SLACK_NS`]), so that no older line, sent after it, rewrites one
//! of its points at the remote.
//!
//! # Where things are
//!
//! - This file: opening the environment, and the read path (batches,
//!   dead-letter listing, checkpoints), which uses read transactions only.
//! - [`schema`]: the on-disk format: keys, the meta record, format versions.
//! - [`entry`]: the format of one entry.
//! - [`writer`]: the writer thread's group commit; what it does to a log is
//!   in a file per feature: `writer::log` (appending, eviction, expiry,
//!   settlement), `writer::dead_letter`, `writer::windows` (downsampling)
//!   and `writer::append` (a write's transform and bounds).
//! - [`mapguard`]: a SIGBUS reading the map becomes a clear error.
//!
//! # Invariants
//!
//! - Only the writer thread opens write transactions, and every change to a
//!   replication's entries and its `Meta` happens in the same transaction, so
//!   the counters on disk always match the entries on disk.
//! - Group commit: the writer takes every request waiting in its channel (and
//!   lingers up to `commit_interval` while more writes are being prepared,
//!   unless the group already holds 256 KiB of lines),
//!   applies them all in one write transaction and answers them only after the
//!   commit returned, i.e. after LMDB's fsync when `durability = "fsync"`.
//! - Conservation: for every replication `accepted + aggregate = delivered +
//!   queued + dropped_full + expired + dropped_non_retryable + dead_lettered +
//!   filtered + late + downsampled` ([`Counters::inflow_lines`] equals
//!   [`Counters::accounted_lines`]). Status reads a snapshot the writer
//!   publishes after each commit, never a half applied group.
//! - Entries are removed only by [`Queue::settle`] (after a 2xx, or with the
//!   lines the remote refused), by `when_full = "drop_oldest"` eviction, by
//!   `max_age` expiry (all three in `writer::log`), when set aside as
//!   corrupt (`writer::dead_letter`), or when a held lane is moved to the
//!   dead-letter store (`writer::lanes`); each is counted. A hold moves
//!   entries without removing any: queued lines and bytes do not change.
//! - Out-of-order settlement: within one log (the main log, or one lane)
//!   entries leave in order, from its head; a replication's queued lines
//!   are those of its main log plus those of its lanes, and a lane record
//!   exists exactly while its lane holds an entry.
//! - A source checkpoint ([`Write::checkpoint`]) commits in the transaction
//!   that queues the lines read up to it, or not at all.
//! - Start-up reads one `Meta` and one entry header per replication: its time
//!   and memory do not grow with the backlog.
//!
//! # Crash behaviour
//!
//! LMDB commits are atomic; after a crash the queue is exactly as of the last
//! commit. A batch shipped but not yet settled is shipped again after a
//! restart; every queued line carries a timestamp, so the remote overwrites
//! instead of duplicating.
//!
//! A hold commits with the move of its entries and the lane's record, or
//! not at all: after a crash before it, the destination's lines are still
//! in the main log and are held again at the next refusal; after it, the
//! lane is tried again at once. A lane's settlement, like the main log's,
//! commits with its removal; a batch of a lane delivered but not settled is
//! sent again (an overwrite). Lane numbers are not reused while a
//! replication has lanes, so a settlement that arrives for a lane moved to
//! the dead-letter store meanwhile finds nothing to remove. The meta record
//! says `version 3` while a replication has a lane, which older releases
//! refuse (they would not see the lane's lines); once the lanes are gone it
//! says `version 2` again.

mod entry;
mod mapguard;
mod schema;
mod writer;

pub use entry::{Corruption, Deflated};

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, WithoutTls};

use crate::config::{Durability, WhenFull};
use crate::lineproto;
use crate::sync::Locked;
use crate::transform::Transform;
pub(crate) use schema::Log;
use schema::{
    checkpoint_key, key_range, key_seq, lane_meta_key, meta_key, repl_keys, LaneRecord, Meta,
};

/// A position in a replication's log: an entry and a byte offset in its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub seq: u64,
    pub off: u32,
}

/// Line and byte counters of one replication, as last committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub accepted_lines: u64,
    pub accepted_bytes: u64,
    pub delivered_lines: u64,
    pub delivered_bytes: u64,
    pub dropped_full_lines: u64,
    pub expired_lines: u64,
    pub dropped_non_retryable_lines: u64,
    pub dead_lettered_lines: u64,
    /// Unsent lines still queued.
    pub queued_lines: u64,
    /// Unsent payload bytes still queued.
    pub queued_bytes: u64,
    /// Enqueue time of the oldest unsent entry.
    pub oldest_enqueued_ns: Option<u64>,
    /// Writes refused for this replication (`when_full = "reject"`).
    pub rejected_lines: u64,
    pub rejected_bytes: u64,
    /// Lines and bytes now held in the dead-letter store.
    pub dead_letter_lines: u64,
    pub dead_letter_bytes: u64,
    /// Dead-lettered lines purged (by an operator, or evicted from a full
    /// dead-letter store). They stay counted in `dead_lettered_lines`.
    pub dead_letter_purged_lines: u64,
    /// Lines a replication's filters excluded.
    pub filtered_lines: u64,
    /// Downsampling: lines for windows already closed (dropped), lines
    /// folded into windows, and aggregate lines the closed windows queued.
    pub late_lines: u64,
    pub downsampled_lines: u64,
    pub aggregate_lines: u64,
    /// The head of the log as of the last commit (the position in `Meta` is
    /// the one persisted; this copy lets a worker notice that eviction or
    /// expiry removed lines of a batch it is still retrying).
    pub head: Pos,
}

impl Counters {
    /// Takes `lines` and `bytes` that left the queue out of the queued
    /// counts (never below zero); returns the lines taken, to be counted
    /// under why they left.
    fn unqueue(&mut self, lines: u64, bytes: u64) -> u64 {
        let lines = lines.min(self.queued_lines);
        self.queued_lines -= lines;
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
        lines
    }

    /// Lines that came in: accepted from writers, plus the aggregates that
    /// closed windows produced.
    pub fn inflow_lines(&self) -> u64 {
        self.accepted_lines + self.aggregate_lines
    }

    /// Where they went; equal to [`Counters::inflow_lines`] at every commit.
    pub fn accounted_lines(&self) -> u64 {
        self.delivered_lines
            + self.queued_lines
            + self.dropped_full_lines
            + self.expired_lines
            + self.dropped_non_retryable_lines
            + self.dead_lettered_lines
            + self.filtered_lines
            + self.late_lines
            + self.downsampled_lines
    }
}

/// What the queue needs to know about a replication.
#[derive(Debug, Clone)]
pub struct ReplSpec {
    pub name: String,
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub max_age: Option<Duration>,
    /// Filters, added tags, downsampling; applied by the writer.
    pub transform: Option<Arc<Transform>>,
}

/// Options of the environment.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    pub map_size: u64,
    pub durability: Durability,
    pub commit_interval: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error(
        "replication \"{replication}\" queue is full ({max} bytes) and when_full is \"reject\""
    )]
    Full { replication: String, max: u64 },
    #[error(
        "a write of {bytes} bytes is larger than replication \"{replication}\" max_queue_size ({max} bytes)"
    )]
    TooLarge {
        replication: String,
        bytes: u64,
        max: u64,
    },
    #[error("queue storage is full: {0}")]
    StorageFull(String),
    /// `message` says what failed, for operators, with the text of the error
    /// that caused it (if any); `source` keeps that error itself.
    #[error("queue storage error: {message}")]
    Storage {
        message: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("data directory {0} is in use by another edge-replicator process")]
    Locked(PathBuf),
    #[error("replication \"{replication}\" entry {seq} is corrupt: {why}")]
    Corrupt {
        replication: String,
        seq: u64,
        why: Corruption,
    },
    #[error("queue is shut down")]
    Closed,
}

/// The error that caused a [`QueueError::Storage`], shared so that errors
/// can be cloned. It derefs to the error itself, which is what
/// [`std::error::Error::source`] then returns (so that it can be downcast).
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl std::ops::Deref for Cause {
    type Target = dyn std::error::Error + Send + Sync;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl QueueError {
    /// A storage error no other error caused.
    pub(crate) fn storage(message: impl Into<String>) -> QueueError {
        QueueError::Storage {
            message: message.into(),
            source: None,
        }
    }

    /// A storage error caused by `source`; `message` includes its text.
    pub(crate) fn storage_from(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> QueueError {
        QueueError::Storage {
            message: message.into(),
            source: Some(Cause(Arc::new(source))),
        }
    }

    /// A storage error with `what` (what the queue was doing) before its
    /// message, keeping its source; other errors as they are.
    fn context(self, what: impl std::fmt::Display) -> QueueError {
        match self {
            QueueError::Storage { message, source } => QueueError::Storage {
                message: format!("{what}: {message}"),
                source,
            },
            other => other,
        }
    }
}

impl From<heed::Error> for QueueError {
    fn from(e: heed::Error) -> Self {
        match &e {
            heed::Error::Mdb(heed::MdbError::MapFull) => QueueError::StorageFull(format!(
                "{e} (raise queue.map_size, or lower max_queue_size)"
            )),
            heed::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
                QueueError::StorageFull(format!("{e} (disk full)"))
            }
            heed::Error::Io(io) if io.raw_os_error() == Some(libc::EDQUOT) => {
                QueueError::StorageFull(format!("{e} (disk quota exceeded)"))
            }
            // LMDB reports a short write, which is how a filling disk
            // usually shows, as EIO.
            heed::Error::Io(io) if io.raw_os_error() == Some(libc::EIO) => {
                QueueError::StorageFull(format!("{e} (disk full, or a failing storage device)"))
            }
            _ => QueueError::storage_from(e.to_string(), e),
        }
    }
}

/// A batch read from a replication's log, not yet settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The head when the batch was read.
    pub from: Pos,
    /// Position just past the batch's last line.
    pub to: Pos,
    pub lines: u64,
    pub bytes: u64,
    /// Local bucket of the batch's lines (batches do not mix buckets when
    /// `split_buckets` was asked for).
    pub bucket: String,
    pub oldest_enqueued_ns: u64,
    /// The log the batch was read from: 0 for the main log, else the held
    /// lane's number; its settlement goes to the same log.
    pub lane: u32,
    /// Whole entries read from the middle of the main log, ahead of its
    /// head ([`Queue::read_live`]): settling it removes those entries and
    /// leaves the head where it is.
    pub live: bool,
}

/// How much earlier than the entry before it was queued a line may be
/// stamped and still go live ([`Queue::live_start`]): the time from a
/// write's arrival, when the agent stamps it, to its commit.
pub const STAMP_SLACK_NS: i64 = 5_000_000_000;

/// A batch as stored: runs of lines, and deflate segments of lines that
/// were compressed when they were queued, in order.
#[derive(Debug, Default)]
pub struct Shipment {
    buf: Vec<u8>,
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lines(std::ops::Range<usize>),
    Segment(std::ops::Range<usize>, Deflated),
}

impl Shipment {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pieces.clear();
    }

    fn push_lines(&mut self, lines: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(lines);
        // Runs of lines from consecutive entries are compressed together.
        match self.pieces.last_mut() {
            Some(Piece::Lines(r)) if r.end == start => r.end = self.buf.len(),
            _ => self.pieces.push(Piece::Lines(start..self.buf.len())),
        }
    }

    fn push_segment(&mut self, seg: &[u8], d: Deflated) {
        let start = self.buf.len();
        self.buf.extend_from_slice(seg);
        self.pieces.push(Piece::Segment(start..self.buf.len(), d));
    }

    /// The batch as one gzip member: lines are compressed at `level`,
    /// segments are taken as they are.
    pub fn gzip(&self, level: u32, reuse: Vec<u8>) -> Vec<u8> {
        let mut body = crate::deflate::GzipBody::new(reuse);
        for p in &self.pieces {
            match p {
                Piece::Lines(r) => body.push_lines(&self.buf[r.clone()], level),
                Piece::Segment(r, d) => body.push_segment(&self.buf[r.clone()], d.len, d.crc),
            }
        }
        body.finish()
    }

    /// Whether any of the batch's entries were stored deflated.
    pub fn has_segments(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Segment(..)))
    }

    /// Appends the batch's lines to `out`, inflating segments.
    pub fn lines_into(&self, out: &mut Vec<u8>) -> Result<(), Corruption> {
        for p in &self.pieces {
            match p {
                Piece::Lines(r) => out.extend_from_slice(&self.buf[r.clone()]),
                Piece::Segment(r, d) => {
                    crate::deflate::inflate_segment(&self.buf[r.clone()], d.len as usize, out)
                        .map_err(|_| Corruption::BadSegment)?
                }
            }
        }
        Ok(())
    }
}

/// Lines compressed once, before they reach the queue, for replications
/// that queue them unchanged: each segment becomes one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub data: Vec<u8>,
    pub lines: u32,
    pub deflated: Deflated,
}

/// Cuts `lines` (whole points, each ending in '\n') into segments of at most
/// `chunk` bytes of points (a longer point alone), compressed at `level`.
/// Cuts fall between points: a string value holding a newline stays whole.
pub fn deflate_lines(lines: &[u8], chunk: usize, level: u32) -> Vec<Segment> {
    let mut out = Vec::with_capacity(lines.len() / chunk.max(1) + 1);
    let mut rest = lines;
    while !rest.is_empty() {
        let cut = if rest.len() <= chunk {
            rest.len()
        } else {
            lineproto::last_point_end(&rest[..chunk])
                .or_else(|| lineproto::point_end(rest).map(|i| i + 1))
                .unwrap_or(rest.len())
        };
        out.push(deflate_segment(&rest[..cut], level));
        rest = &rest[cut..];
    }
    out
}

/// One segment of whole points, compressed at `level`.
pub fn deflate_segment(part: &[u8], level: u32) -> Segment {
    let mut data = Vec::new();
    let crc = crate::deflate::segment(part, level, &mut data);
    Segment {
        data,
        lines: lineproto::count_points(part) as u32,
        deflated: Deflated {
            len: part.len() as u32,
            crc,
        },
    }
}

/// How a shipped batch ended. Lines of the batch not named here were delivered.
#[derive(Debug, Clone, Default)]
pub struct Settlement {
    /// Local bucket of the refused lines (kept with them for a replay).
    pub bucket: String,
    /// The remote's answer that refused them.
    pub reason: String,
    /// Refused lines kept in the dead-letter store (each ending in '\n').
    pub dead_letter: Vec<u8>,
    pub dead_lines: u64,
    /// Refused lines dropped (`drop_non_retryable_data`).
    pub dropped_lines: u64,
}

/// Lines to queue, with where they came from.
#[derive(Debug, Default)]
pub struct Write {
    pub targets: Vec<Arc<ReplHandle>>,
    /// Local bucket the lines were written to.
    pub bucket: String,
    /// Whole lines, each ending in '\n', with ns timestamps.
    pub payload: Vec<u8>,
    pub lines: u64,
    /// A source's position after these lines (a tailed file's offset, a WAL
    /// segment's), committed in the same transaction: after a crash the
    /// source resumes exactly after the lines that were queued.
    pub checkpoint: Option<Checkpoint>,
    /// Set when the clock guard holds the write ([`crate::clock::on_write`]):
    /// its entries wait, untransformed, until released.
    pub clock: Option<crate::clock::Anchor>,
}

/// A source position stored beside the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub key: String,
    pub value: Vec<u8>,
}

/// One record of a dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: u64,
    /// When the lines were first queued (ns since the epoch).
    pub at_ns: u64,
    pub lines: u64,
    pub bytes: u64,
    pub bucket: String,
    /// The remote's answer (or the checksum failure) that put them here.
    pub reason: String,
    /// False for damaged entries, which are kept only for inspection.
    pub replayable: bool,
    /// The refused lines themselves (lossy UTF-8), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// Wakes threads waiting for a change; a generation counter avoids lost wake-ups.
#[derive(Debug, Default)]
pub struct Signal {
    generation: Mutex<u64>,
    cv: Condvar,
}

impl Signal {
    pub fn notify(&self) {
        *self.generation.locked() += 1;
        self.cv.notify_all();
    }

    pub fn generation(&self) -> u64 {
        *self.generation.locked()
    }

    /// Waits until the generation moves past `seen` or `timeout` passes;
    /// returns the generation seen last.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.generation.locked();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |g| *g == seen)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard
    }
}

/// A destination held in a lane of its own, as last committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub lane: u32,
    /// The local bucket (`db` or `db/rp`) whose lines are held.
    pub bucket: String,
    /// The remote's answer, as last heard.
    pub code: u16,
    pub message: String,
    /// When the destination was first held (ns since the epoch).
    pub since_ns: u64,
    pub lines: u64,
    pub bytes: u64,
    /// The lane's head (a worker notices eviction or expiry by it).
    pub head: Pos,
    pub oldest_enqueued_ns: Option<u64>,
}

/// A replication's live view of the queue: its id, counters and data signal.
#[derive(Debug)]
pub struct ReplHandle {
    pub id: u32,
    pub name: String,
    counters: Mutex<Counters>,
    held: Mutex<Vec<Held>>,
    /// Held buckets an operator asked to retry now.
    release: Mutex<std::collections::BTreeSet<String>>,
    /// Notified after a commit that appended to this replication.
    pub data: Signal,
}

impl ReplHandle {
    pub fn counters(&self) -> Counters {
        *self.counters.locked()
    }

    /// The held destinations, oldest hold first.
    pub fn held(&self) -> Vec<Held> {
        self.held.locked().clone()
    }

    /// Asks the worker to retry held `bucket` now; false if it is not held.
    pub fn release(&self, bucket: &str) -> bool {
        if !self.held.locked().iter().any(|h| h.bucket == bucket) {
            return false;
        }
        self.release.locked().insert(bucket.to_string());
        self.data.notify();
        true
    }

    /// Takes the request to retry `bucket` now, if an operator made one.
    pub fn take_release(&self, bucket: &str) -> bool {
        self.release.locked().remove(bucket)
    }
}

pub(crate) type Db = Database<Bytes, Bytes>;

struct Shared {
    env: Env<WithoutTls>,
    entries: Db,
    meta: Db,
    dead: Db,
    /// Downsampling state (see [`schema::window_key`]).
    windows: Db,
    /// Held lanes' entries (see [`schema::lane_key`]).
    lanes: Db,
    /// Writes that have started reading their body but not yet reached the
    /// writer: the writer lingers for them (bounded by `commit_interval`).
    preparing: AtomicUsize,
    /// Write transactions committed (group commit shows as far fewer
    /// commits than writes).
    commits: AtomicU64,
    /// Entry bytes read since the map was last released.
    read_since_release: AtomicUsize,
    /// Where LMDB mapped the data file, when /proc says.
    map: Option<(usize, usize)>,
    _lock: File,
    /// Turns a SIGBUS reading the map (a truncated file, a failing medium)
    /// into a clear error and exit 1.
    _map_guard: mapguard::Guard,
}

/// The queue. Appends and settlements go to the writer thread; batches are
/// read directly with read transactions from any thread.
pub struct Queue {
    shared: Arc<Shared>,
    tx: mpsc::Sender<writer::Command>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    handles: Vec<Arc<ReplHandle>>,
}

/// Counts a write as being prepared while alive (see `Shared::preparing`).
pub struct Preparing<'a>(&'a AtomicUsize);

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Entry bytes read between two releases of the map.
const RELEASE_EVERY: usize = 256 << 10;

impl Shared {
    /// The database holding `log`'s entries.
    fn db(&self, log: Log) -> Db {
        match log {
            Log::Main(_) => self.entries,
            Log::Lane(..) => self.lanes,
        }
    }

    /// Counts bytes read from the map; now and then, and once a log is read
    /// to its end, unmaps what was read: memory must not grow with the
    /// backlog.
    fn read_bytes(&self, n: usize, at_end: bool) {
        let read = self.read_since_release.fetch_add(n, Ordering::Relaxed) + n;
        if read >= RELEASE_EVERY || (at_end && read > 0) {
            self.read_since_release.store(0, Ordering::Relaxed);
            if let Some(map) = self.map {
                release_map(map);
            }
        }
    }
}

/// Drops the page table entries of `[start, end)`, LMDB's map of the data
/// file. Reading a backlog maps its pages into the agent one by one (and
/// the kernel maps their neighbours along); the kernel keeps them in its
/// page cache either way, but mapped, they count as the agent's resident
/// memory, which would then grow with every page read, up to the size of
/// the backlog.
fn release_map((start, end): (usize, usize)) {
    // SAFETY: the range is LMDB's shared mapping of the data file, which
    // stays mapped while the environment is open. The environment is opened
    // without WRITEMAP, so the map is read-only (the writer builds pages in
    // its own memory and writes them with pwrite): MADV_DONTNEED only drops
    // page table entries, and the next access maps the same file pages
    // again, so neither LMDB nor its readers can tell.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

fn lock_data_dir(dir: &Path) -> Result<File, QueueError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("LOCK");
    let file = File::create(&path).map_err(|e| {
        QueueError::storage_from(format!("cannot create {}: {e}", path.display()), e)
    })?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(QueueError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

impl Queue {
    /// Opens (or creates) the queue under `dir` for the given replications.
    /// Replications found on disk but not given stay on disk untouched.
    pub fn open(dir: &Path, opts: &QueueOptions, repls: &[ReplSpec]) -> Result<Queue, QueueError> {
        let qdir = dir.join("queue");
        fs::create_dir_all(&qdir).map_err(|e| {
            QueueError::storage_from(format!("cannot create {}: {e}", qdir.display()), e)
        })?;
        let lock = lock_data_dir(dir)?;
        check_foreign_files(&qdir)?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(opts.map_size as usize).max_dbs(8);
        if opts.durability == Durability::Os {
            // SAFETY: NO_SYNC trades durability of the last commits on power
            // loss for speed, which is what `durability = "os"` asks for; it
            // cannot corrupt the environment.
            unsafe { options.flags(EnvFlags::NO_SYNC) };
        }
        // SAFETY: the data directory is locked above, so no other process of
        // ours maps it; heed's remaining requirement is not to open the same
        // path twice in this process, which `open` is called once for.
        let env = unsafe { options.open(&qdir) }.map_err(|e| {
            QueueError::storage_from(
                format!(
                    "cannot open the queue in {}: {e} (is it an edge-replicator data_dir?)",
                    qdir.display()
                ),
                e,
            )
        })?;
        let map_guard = mapguard::guard(&qdir.join("data.mdb"));
        let (entries, meta, dead, windows, lanes) = (|| {
            let mut wtxn = env.write_txn()?;
            let entries: Db = env.create_database(&mut wtxn, Some(schema::ENTRIES))?;
            let meta: Db = env.create_database(&mut wtxn, Some(schema::META))?;
            let dead: Db = env.create_database(&mut wtxn, Some(schema::DEAD))?;
            let windows: Db = env.create_database(&mut wtxn, Some(schema::WINDOWS))?;
            // Absent from data dirs of releases before held lanes: created
            // empty, which is what they hold.
            let lanes: Db = env.create_database(&mut wtxn, Some(schema::LANES))?;
            wtxn.commit()?;
            Ok((entries, meta, dead, windows, lanes))
        })()
        .map_err(|e| opening(&qdir, e))?;
        let shared = Arc::new(Shared {
            env,
            entries,
            meta,
            dead,
            windows,
            lanes,
            preparing: AtomicUsize::new(0),
            commits: AtomicU64::new(0),
            read_since_release: AtomicUsize::new(0),
            map: mapguard::mapped_range(&qdir.join("data.mdb")),
            _lock: lock,
            _map_guard: map_guard,
        });

        let (tx, rx) = mpsc::channel();
        let mut w = writer::Writer::new(shared.clone(), rx, opts.commit_interval);
        let handles = repls
            .iter()
            .map(|spec| w.attach(spec))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.context(format_args!("opening the queue in {}", qdir.display())))?;
        let writer = thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || w.run())
            .map_err(|e| {
                QueueError::storage_from(format!("cannot start the writer thread: {e}"), e)
            })?;
        Ok(Queue {
            shared,
            tx,
            writer: Mutex::new(Some(writer)),
            handles,
        })
    }

    /// Handles of the replications given to `open`, in the same order.
    pub fn handles(&self) -> &[Arc<ReplHandle>] {
        &self.handles
    }

    /// Attaches a replication while the queue runs (a config reload), or
    /// takes new bounds for one already attached.
    pub fn attach(&self, spec: ReplSpec) -> Result<Arc<ReplHandle>, QueueError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(writer::Command::Attach { spec, reply })
            .map_err(|_| QueueError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(QueueError::Closed))
    }

    /// Stops expiring a replication removed from the config; its entries,
    /// counters and dead letters stay on disk until it is attached again.
    pub fn detach(&self, name: &str) {
        let _ = self.tx.send(writer::Command::Detach {
            name: name.to_string(),
        });
    }

    /// Write transactions committed since the queue opened.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Marks a write as being prepared until the guard drops.
    pub fn preparing(&self) -> Preparing<'_> {
        self.shared.preparing.fetch_add(1, Ordering::AcqRel);
        Preparing(&self.shared.preparing)
    }

    /// Appends `payload` (whole lines, each ending in '\n', ns timestamps) to
    /// every target replication in one atomic step. The answer arrives after
    /// the commit that holds it is durable.
    pub fn append(
        &self,
        targets: Vec<Arc<ReplHandle>>,
        bucket: String,
        payload: Vec<u8>,
        lines: u64,
    ) -> tokio::sync::oneshot::Receiver<Result<(), QueueError>> {
        self.write(Write {
            targets,
            bucket,
            payload,
            lines,
            checkpoint: None,
            clock: None,
        })
    }

    /// Appends and blocks until durable (for threads outside the runtime).
    pub fn append_blocking(
        &self,
        targets: Vec<Arc<ReplHandle>>,
        bucket: String,
        payload: Vec<u8>,
        lines: u64,
    ) -> Result<(), QueueError> {
        self.append(targets, bucket, payload, lines)
            .blocking_recv()
            .unwrap_or(Err(QueueError::Closed))
    }

    /// Queues a [`Write`]: its lines and its checkpoint (if any) commit in
    /// one transaction, or neither does.
    pub fn write(&self, w: Write) -> tokio::sync::oneshot::Receiver<Result<(), QueueError>> {
        self.write_deflated(w, None)
    }

    /// [`Queue::write`] with the payload also compressed as `segments`
    /// ([`deflate_lines`]): replications that queue lines unchanged store
    /// the segments, so the lines are never compressed again; the others
    /// (filters, tags, downsampling) store what their transform makes.
    pub fn write_deflated(
        &self,
        w: Write,
        segments: Option<Vec<Segment>>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), QueueError>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let cmd = writer::Command::Append(writer::Append {
            write: w,
            segments,
            reply,
        });
        if let Err(mpsc::SendError(writer::Command::Append(a))) = self.tx.send(cmd) {
            let _ = a.reply.send(Err(QueueError::Closed));
        }
        rx
    }

    /// [`Queue::write`] for threads outside the runtime.
    pub fn write_blocking(&self, w: Write) -> Result<(), QueueError> {
        self.write(w)
            .blocking_recv()
            .unwrap_or(Err(QueueError::Closed))
    }

    /// The value last committed for a source checkpoint `key`.
    pub fn checkpoint(&self, key: &str) -> Result<Option<Vec<u8>>, QueueError> {
        let s = &self.shared;
        let rtxn = s.env.read_txn()?;
        Ok(s.meta.get(&rtxn, &checkpoint_key(key))?.map(<[u8]>::to_vec))
    }

    /// Reads the next batch of `repl`: whole lines from the head, at most
    /// `max_bytes` (a single longer line is returned alone). With
    /// `split_buckets` a batch holds lines of one local bucket only.
    pub fn read_batch(
        &self,
        repl: &ReplHandle,
        max_bytes: usize,
        split_buckets: bool,
        out: &mut Vec<u8>,
    ) -> Result<Option<Batch>, QueueError> {
        let mut shipment = Shipment::default();
        let batch = self.read_shipment(repl, None, max_bytes, split_buckets, &mut shipment)?;
        out.clear();
        shipment
            .lines_into(out)
            .map_err(|why| QueueError::Corrupt {
                replication: repl.name.clone(),
                seq: batch.as_ref().map_or(0, |b| b.from.seq),
                why,
            })?;
        Ok(batch)
    }

    /// Reads the next batch of `repl` as [`read_batch`](Self::read_batch)
    /// does, but starting at `from` when that is past the head (the end of a
    /// batch whose settlement is still being committed), and leaving
    /// deflated entries deflated, so that shipping never compresses them
    /// again.
    pub fn read_shipment(
        &self,
        repl: &ReplHandle,
        from: Option<Pos>,
        max_bytes: usize,
        split_buckets: bool,
        out: &mut Shipment,
    ) -> Result<Option<Batch>, QueueError> {
        out.clear();
        let s = &self.shared;
        let rtxn = s.env.read_txn()?;
        let Some(meta) = self.meta_of(&rtxn, repl)? else {
            return Ok(None);
        };
        let log = Log::Main(repl.id);
        let batch = self.read_log(
            &rtxn,
            repl,
            log,
            (meta.head, meta.next_seq),
            from,
            max_bytes,
            split_buckets,
            out,
        )?;
        drop(rtxn);
        s.read_bytes(out.buf.len(), batch.is_none());
        Ok(batch)
    }

    /// `repl`'s meta record, as of `rtxn`.
    fn meta_of(
        &self,
        rtxn: &heed::RoTxn<WithoutTls>,
        repl: &ReplHandle,
    ) -> Result<Option<Meta>, QueueError> {
        Ok(self
            .shared
            .meta
            .get(rtxn, &meta_key(repl.id))?
            .and_then(Meta::decode))
    }

    /// Where the newest lines of `repl`'s main log begin, for sending them
    /// before a backlog (`send_order = "live_first"`): the first of the
    /// entries queued at or after `since_ns` that follow both the head entry
    /// and `after`, taking from the newest back no more than `max_bytes` of
    /// lines (at least one entry). `None` when no entry qualifies.
    ///
    /// The remote keeps the last write of a point (series and time), and
    /// these lines will arrive before the older ones. So an entry is taken
    /// only if each of its lines is stamped later than the entry before it
    /// was queued, less [`STAMP_SLACK_NS`]: then no older line (stamped,
    /// clocks permitting, before it was queued) writes the same point, but
    /// for one stamped in those last seconds. The slack lets through lines
    /// the agent stamped on arrival that were queued in the same group
    /// commit as the entry before them, or just after it. Lines a writer
    /// backfills with old timestamps, and everything before them, go in
    /// their turn.
    pub fn live_start(
        &self,
        repl: &ReplHandle,
        since_ns: u64,
        after: u64,
        max_bytes: usize,
    ) -> Result<Option<u64>, QueueError> {
        let s = &self.shared;
        let rtxn = s.env.read_txn()?;
        let Some(meta) = self.meta_of(&rtxn, repl)? else {
            return Ok(None);
        };
        let log = Log::Main(repl.id);
        let lo = meta.head.seq.max(after) + 1;
        // Nothing goes ahead of lines the clock guard holds.
        if lo >= meta.next_seq || meta.clock_held > 0 {
            return Ok(None);
        }
        let (head, hi) = (log.key(meta.head.seq), log.key(meta.next_seq));
        // Entries taken, newest first, and the earliest stamp of the last.
        let mut taken: Vec<u64> = Vec::new();
        let mut earliest = i64::MAX;
        let mut bytes = 0usize;
        let mut lines = Vec::new();
        for item in s.db(log).rev_range(&rtxn, &key_range(&head, &hi))? {
            let (key, raw) = item?;
            let seq = log.seq(key);
            let Ok(e) = entry::decode_unchecked(raw) else {
                // When it was queued is not known.
                taken.pop();
                break;
            };
            // This entry was queued before the one taken last: is every
            // line of that one stamped later?
            let bound = i64::try_from(e.enqueued_ns).map(|q| q.saturating_sub(STAMP_SLACK_NS));
            if bound.map_or(true, |q| earliest <= q) {
                taken.pop();
                break;
            }
            let len = e.deflated.map_or(e.payload.len(), |d| d.len as usize);
            let fits = taken.is_empty() || bytes + len <= max_bytes;
            if seq < lo || e.enqueued_ns < since_ns || !fits {
                break;
            }
            lines.clear();
            let read = match e.deflated {
                None => {
                    lines.extend_from_slice(e.payload);
                    Ok(())
                }
                Some(d) => crate::deflate::inflate_segment(e.payload, d.len as usize, &mut lines),
            };
            if read.is_err() {
                break;
            }
            earliest = lineproto::points(&lines)
                .map(|p| lineproto::series_and_time(p).1)
                .min()
                .unwrap_or(i64::MAX);
            bytes += len;
            taken.push(seq);
        }
        Ok(taken.last().copied())
    }

    /// Reads whole entries of `repl`'s main log from entry `start` on (as
    /// [`live_start`](Self::live_start) found it), up to a change of bucket
    /// when `split_buckets`: a batch that settles out of order, ahead of the
    /// head.
    pub fn read_live(
        &self,
        repl: &ReplHandle,
        start: u64,
        split_buckets: bool,
        out: &mut Shipment,
    ) -> Result<Option<Batch>, QueueError> {
        let from = Pos { seq: start, off: 0 };
        let batch = self.read_shipment(repl, Some(from), usize::MAX, split_buckets, out)?;
        // Only a batch that starts where it was asked starts an entry: the
        // head may have passed it meanwhile.
        Ok(batch
            .filter(|b| b.from == from)
            .map(|b| Batch { live: true, ..b }))
    }

    /// Reads the next batch of held lane `lane` of `repl` as
    /// [`read_shipment`](Self::read_shipment) reads the main log; `None`
    /// when the lane is empty or gone.
    pub fn read_lane(
        &self,
        repl: &ReplHandle,
        lane: u32,
        from: Option<Pos>,
        max_bytes: usize,
        out: &mut Shipment,
    ) -> Result<Option<Batch>, QueueError> {
        out.clear();
        let s = &self.shared;
        let rtxn = s.env.read_txn()?;
        let Some(rec) = s
            .meta
            .get(&rtxn, &lane_meta_key(repl.id, lane))?
            .and_then(LaneRecord::decode)
        else {
            return Ok(None);
        };
        let log = Log::Lane(repl.id, lane);
        let batch = self.read_log(
            &rtxn,
            repl,
            log,
            (rec.head, rec.next_seq),
            from,
            max_bytes,
            true,
            out,
        )?;
        drop(rtxn);
        s.read_bytes(out.buf.len(), batch.is_none());
        Ok(batch)
    }

    /// Reads a batch from `log`, whose head and next sequence are `bounds`.
    #[allow(clippy::too_many_arguments)]
    fn read_log(
        &self,
        rtxn: &heed::RoTxn<WithoutTls>,
        repl: &ReplHandle,
        log: Log,
        (head, next_seq): (Pos, u64),
        from: Option<Pos>,
        max_bytes: usize,
        split_buckets: bool,
        out: &mut Shipment,
    ) -> Result<Option<Batch>, QueueError> {
        let s = &self.shared;
        let start_pos = from.map_or(head, |f| f.max(head));
        if start_pos.seq >= next_seq {
            return Ok(None);
        }
        let range = log.key(start_pos.seq)..log.key(next_seq);
        let mut batch: Option<Batch> = None;
        let mut from_pos = start_pos;
        let mut taken = 0usize;
        for item in s
            .db(log)
            .range(rtxn, &key_range(&range.start, &range.end))?
        {
            let (key, raw) = item?;
            let seq = log.seq(key);
            let e = match entry::decode(raw) {
                Ok(e) => e,
                // A damaged entry is reported when it is first in line, so
                // the caller can set it aside; otherwise the batch ends before it.
                Err(why) if batch.is_none() => {
                    return Err(QueueError::Corrupt {
                        replication: repl.name.clone(),
                        seq,
                        why,
                    })
                }
                Err(_) => break,
            };
            if e.clock.is_some() {
                // Held by the clock guard: nothing from here on goes until
                // it is released.
                break;
            }
            let start = if seq == start_pos.seq {
                start_pos.off as usize
            } else {
                0
            };
            if batch.is_none() && start > 0 && (e.deflated.is_some() || start >= e.payload.len()) {
                // Wholly in the batch before, whose settlement is on its way.
                from_pos = Pos {
                    seq: seq + 1,
                    off: 0,
                };
                continue;
            }
            let b = batch.get_or_insert_with(|| Batch {
                from: from_pos,
                to: from_pos,
                lines: 0,
                bytes: 0,
                bucket: e.bucket.to_string(),
                oldest_enqueued_ns: e.enqueued_ns,
                lane: log.lane(),
                live: false,
            });
            if split_buckets && b.bucket != e.bucket {
                break;
            }
            let room = max_bytes.saturating_sub(taken);
            if let Some(d) = e.deflated {
                // Taken whole or not at all (a lone one larger than a batch
                // travels alone).
                let len = d.len as usize;
                if len > room && taken > 0 {
                    break;
                }
                out.push_segment(e.payload, d);
                b.lines += e.lines as u64;
                b.bytes += len as u64;
                b.to = Pos { seq, off: d.len };
                taken += len;
                if taken >= max_bytes {
                    break;
                }
                continue;
            }
            let start = start.min(e.payload.len());
            let avail = &e.payload[start..];
            let (take, whole) = if avail.len() <= room {
                (avail.len(), true)
            } else if let Some(i) = lineproto::last_point_end(&avail[..room]) {
                // `start` is always a point boundary, so this cut is one too.
                (i, false)
            } else if taken == 0 {
                // One point longer than a batch: it travels alone.
                (
                    lineproto::point_end(avail).map_or(avail.len(), |i| i + 1),
                    false,
                )
            } else {
                break;
            };
            let part = &avail[..take];
            out.push_lines(part);
            taken += take;
            b.lines += if start == 0 && whole {
                e.lines as u64
            } else {
                lineproto::count_points(part) as u64
            };
            b.bytes += take as u64;
            b.to = Pos {
                seq,
                off: (start + take) as u32,
            };
            if !whole || taken >= max_bytes {
                break;
            }
        }
        Ok(batch)
    }

    /// Removes a shipped batch from the head of `repl`'s log, counting its
    /// lines as delivered except those the settlement names; blocks until the
    /// change is durable.
    pub fn settle(
        &self,
        repl: &Arc<ReplHandle>,
        batch: &Batch,
        s: Settlement,
    ) -> Result<(), QueueError> {
        self.settle_async(repl, batch, s)
            .blocking_recv()
            .unwrap_or(Err(QueueError::Closed))
    }

    /// [`settle`](Self::settle) without waiting: the answer arrives once the
    /// change is durable. Settlements apply in the order they are sent, so a
    /// worker can read and ship the next batch (from this one's end) while
    /// this one commits.
    pub fn settle_async(
        &self,
        repl: &Arc<ReplHandle>,
        batch: &Batch,
        s: Settlement,
    ) -> tokio::sync::oneshot::Receiver<Result<(), QueueError>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let cmd = writer::Command::Settle(writer::Settle {
            repl: repl.clone(),
            from: batch.from,
            to: batch.to,
            lines: batch.lines,
            bytes: batch.bytes,
            lane: batch.lane,
            live: batch.live,
            settlement: s,
            reply,
        });
        if let Err(mpsc::SendError(writer::Command::Settle(st))) = self.tx.send(cmd) {
            let _ = st.reply.send(Err(QueueError::Closed));
        }
        rx
    }

    /// Moves a corrupt entry out of the log into the dead-letter store.
    pub fn set_aside(&self, repl: &Arc<ReplHandle>, seq: u64) -> Result<(), QueueError> {
        self.set_aside_in(repl, 0, seq)
    }

    /// [`set_aside`](Self::set_aside) for an entry of log `lane` (0: the
    /// main log, else a held lane).
    pub fn set_aside_in(
        &self,
        repl: &Arc<ReplHandle>,
        lane: u32,
        seq: u64,
    ) -> Result<(), QueueError> {
        self.call(|reply| writer::Command::SetAside {
            repl: repl.clone(),
            lane,
            seq,
            reply,
        })
    }

    /// Holds destination `bucket` of `repl` (the local bucket, `db` or
    /// `db/rp`, its lines are queued as) after the remote answered `code`
    /// with `message` for it alone: its queued entries move, in one
    /// transaction, from the main log into a lane of their own, as do its
    /// later writes, so that the other destinations keep flowing. For a
    /// destination already held, records the answer. Returns the lines
    /// moved.
    pub fn hold(
        &self,
        repl: &Arc<ReplHandle>,
        bucket: &str,
        code: u16,
        message: &str,
    ) -> Result<u64, QueueError> {
        self.call_count(|reply| writer::Command::Hold {
            repl: repl.clone(),
            bucket: bucket.to_string(),
            code,
            message: message.to_string(),
            reply,
        })
    }

    /// Whether `repl`'s main log holds entries the clock guard holds.
    pub fn clock_held(&self, repl: &ReplHandle) -> bool {
        let Ok(rtxn) = self.shared.env.read_txn() else {
            return false;
        };
        self.meta_of(&rtxn, repl)
            .ok()
            .flatten()
            .is_some_and(|m| m.clock_held > 0)
    }

    /// Releases the entries at the head of `repl`'s main log that the clock
    /// guard no longer holds (see `writer::clock`). Returns 0 when none could
    /// go: the guard still holds the first of them.
    pub fn release_clock(&self, repl: &Arc<ReplHandle>) -> Result<u64, QueueError> {
        self.call_count(|reply| writer::Command::ReleaseClock {
            repl: repl.clone(),
            reply,
        })
    }

    /// Moves every line of held destination `bucket` of `repl` to the
    /// dead-letter store (counted as dead-lettered) and ends its hold.
    /// Returns the lines moved (0 if it is not held).
    pub fn dead_letter_held(
        &self,
        repl: &Arc<ReplHandle>,
        bucket: &str,
    ) -> Result<u64, QueueError> {
        self.call_count(|reply| writer::Command::HeldDeadLetter {
            repl: repl.clone(),
            bucket: bucket.to_string(),
            reply,
        })
    }

    fn call(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), QueueError>>) -> writer::Command,
    ) -> Result<(), QueueError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| QueueError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(QueueError::Closed))
    }

    /// The records of a replication's dead-letter store, oldest first;
    /// `with_data` includes the refused lines.
    pub fn dead_letters(
        &self,
        repl: &ReplHandle,
        with_data: bool,
    ) -> Result<Vec<DeadLetter>, QueueError> {
        let s = &self.shared;
        let rtxn = s.env.read_txn()?;
        let (lo, hi) = repl_keys(repl.id);
        let mut out = Vec::new();
        for item in s.dead.range(&rtxn, &key_range(&lo, &hi))? {
            let (key, raw) = item?;
            let (reason, bytes) = entry::decode_dead(raw);
            out.push(match entry::decode(bytes) {
                Ok(e) => DeadLetter {
                    id: key_seq(key),
                    at_ns: e.enqueued_ns,
                    lines: e.lines as u64,
                    bytes: e.lines_len() as u64,
                    bucket: e.bucket.to_string(),
                    reason,
                    replayable: true,
                    data: with_data.then(|| String::from_utf8_lossy(e.payload).into_owned()),
                },
                Err(why) => DeadLetter {
                    id: key_seq(key),
                    at_ns: 0,
                    lines: 0,
                    bytes: bytes.len() as u64,
                    bucket: String::new(),
                    reason: format!("{reason} ({why})"),
                    replayable: false,
                    data: with_data.then(|| String::from_utf8_lossy(bytes).into_owned()),
                },
            });
        }
        Ok(out)
    }

    /// Moves the replayable dead letters of `repl` back into its log, as new
    /// entries, as far as its queue bound allows. Returns the lines moved.
    pub fn replay_dead_letters(&self, repl: &Arc<ReplHandle>) -> Result<u64, QueueError> {
        self.call_count(|reply| writer::Command::DeadLetter {
            repl: repl.clone(),
            op: writer::DeadLetterOp::Replay,
            reply,
        })
    }

    /// Drops every dead letter of `repl`. Returns the lines purged.
    pub fn purge_dead_letters(&self, repl: &Arc<ReplHandle>) -> Result<u64, QueueError> {
        self.call_count(|reply| writer::Command::DeadLetter {
            repl: repl.clone(),
            op: writer::DeadLetterOp::Purge,
            reply,
        })
    }

    fn call_count(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<u64, QueueError>>) -> writer::Command,
    ) -> Result<u64, QueueError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| QueueError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(QueueError::Closed))
    }

    /// Commits what is pending and stops the writer thread; later calls
    /// get [`QueueError::Closed`].
    pub fn close(&self) {
        let _ = self.tx.send(writer::Command::Shutdown);
        if let Some(w) = self.writer.locked().take() {
            let _ = w.join();
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.close();
    }
}

/// An LMDB error met while opening the queue in `qdir`, naming it; damage
/// and foreign files get a hint at what to do.
fn opening(qdir: &Path, e: heed::Error) -> QueueError {
    use heed::MdbError::*;
    if matches!(
        e,
        heed::Error::Mdb(
            Corrupted | Incompatible | PageNotFound | Invalid | VersionMismatch | Panic
        )
    ) {
        QueueError::storage_from(
            format!(
                "the queue in {} is damaged or was not written by edge-replicator: {e} (move the data_dir aside, or restore it from a copy)",
                qdir.display()
            ),
            e,
        )
    } else {
        QueueError::from(e).context(format_args!("opening the queue in {}", qdir.display()))
    }
}

/// A data directory holding files LMDB did not write is probably a mistake
/// (a wrong path); refuse it with a clear message instead of mapping it.
fn check_foreign_files(qdir: &Path) -> Result<(), QueueError> {
    let data = qdir.join("data.mdb");
    match fs::metadata(&data) {
        Ok(m) if !m.is_file() => Err(QueueError::storage(format!(
            "{} is not a regular file",
            data.display()
        ))),
        Ok(m) if m.len() > 0 && m.len() < 2 * 4096 => Err(QueueError::storage(format!(
            "{} is too small to be an LMDB environment ({} bytes)",
            data.display(),
            m.len()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(QueueError::storage_from(
            format!("cannot read {}: {e}", data.display()),
            e,
        )),
    }
}

#[cfg(test)]
mod tests;
