//! What operators see: the replication status (`GET /api/v2/replications`,
//! typed in [`report`], which `edge-replicator status` reads back) and
//! Prometheus metrics (`GET /metrics`).
//!
//! Queue counters come from the snapshot the queue writer publishes after each
//! commit, so the conservation invariant holds in every answer; the shipping
//! state (running, backoff, paused; latest answer of the remote) is kept here
//! by the replication's worker.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::queue::ReplHandle;
use crate::ship::link::BudgetReading;
use crate::sync::Locked;

mod report;

pub use report::{
    BudgetReport, ClockReport, FollowedReport, HeldReport, ReplicationReport, Sending,
    SourceReport, StatusReport, Timestamp,
};

/// Where a replication's worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Shipping, or idle with nothing queued.
    #[default]
    Running,
    /// Waiting before retrying after a failure.
    Backoff,
    /// The remote refused our credentials or bucket; retrying slowly.
    Paused,
    /// A data budget of `[link]` is spent: nothing is sent until it starts
    /// again.
    Budget,
    /// The next lines are held by the clock guard until the system clock
    /// is synchronised (see [`crate::clock`]).
    Clock,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Running,
        State::Backoff,
        State::Paused,
        State::Budget,
        State::Clock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Backoff => "backoff",
            State::Paused => "paused",
            State::Budget => "budget",
            State::Clock => "clock",
        }
    }
}

/// What the last attempt showed of the way to the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// The remote answered (whatever it said), or nothing was tried yet.
    #[default]
    Up,
    /// A transfer made no progress for `stall_timeout`, or the remote did
    /// not answer within `timeout`: packets go nowhere (a black hole, a
    /// link that died mid-request).
    Stalled,
    /// No connection: refused, reset, unresolvable, TLS failed.
    Down,
}

impl Link {
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Up => "up",
            Link::Stalled => "stalled",
            Link::Down => "down",
        }
    }
}

/// Shipping state of one replication, written by its worker.
#[derive(Debug, Clone, Default)]
pub struct ShipStatus {
    pub state: State,
    pub latest_code: Option<u16>,
    pub latest_error: String,
    /// The cause of failure last logged, so that a warning is logged once
    /// per change of cause, not once per attempt.
    pub logged_cause: String,
    pub next_retry: Option<SystemTime>,
    /// Failed attempts by status code, or "transport" for no answer.
    pub errors: BTreeMap<String, u64>,
    /// Compressed bytes of batches the remote accepted.
    pub bytes_accepted: u64,
    /// Compressed request bodies put on the wire, accepted or not (a body
    /// abandoned half-way counts the part that went).
    pub wire_bytes_sent: u64,
    pub batches_sent: u64,
    pub link: Link,
    /// When `link` last changed (`None`: not since the start).
    pub link_since: Option<SystemTime>,
    /// While a request is under way: body bytes gone so far, and of how many.
    pub sending: Option<(u64, u64)>,
    /// TCP connects made to see whether an unreachable remote is back.
    pub probes: u64,
    /// Lines delivered ahead of an older backlog (`send_order = "live_first"`).
    pub live_first_lines: u64,
    /// The byte limit of the next batch: `batch_size`, or less after
    /// stalls (see the ship module).
    pub batch_limit: u64,
}

impl ShipStatus {
    /// Records what an attempt showed of the link.
    pub fn set_link(&mut self, link: Link) {
        if self.link != link {
            self.link = link;
            self.link_since = Some(SystemTime::now());
        }
    }
}

/// One replication as operators see it.
#[derive(Debug)]
pub struct ReplStatus {
    pub name: String,
    pub remote: String,
    pub local_bucket: String,
    pub remote_bucket: String,
    pub max_queue_bytes: u64,
    pub queue: Arc<ReplHandle>,
    pub ship: Mutex<ShipStatus>,
}

/// Counters of the local write API.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub requests: AtomicU64,
    /// Shared with the task that awaits a write's commit, which counts the
    /// lines even when the client hung up meanwhile.
    pub lines_written: Arc<AtomicU64>,
    pub lines_invalid: AtomicU64,
    pub bytes_received: AtomicU64,
    pub refused_too_large: AtomicU64,
    pub refused_full: AtomicU64,
    pub refused_auth: AtomicU64,
    /// Requests refused with 403: a foreign `Origin`, or a `Host` that is
    /// neither loopback nor listed on a listener without tokens.
    pub refused_browser: AtomicU64,
    /// Writes refused with 503 because the request memory budget stayed full.
    pub refused_memory: AtomicU64,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The `GET /api/v2/replications` answer.
pub fn report(
    replications: &[Arc<ReplStatus>],
    sources: &[Arc<SourceStatus>],
    budgets: &[BudgetReading],
) -> StatusReport {
    let now = now_ns();
    StatusReport {
        replications: replications.iter().map(|r| r.report(now)).collect(),
        sources: sources.iter().map(|s| s.report()).collect(),
        budgets: budgets.iter().map(budget_report).collect(),
        clock: Some(ClockReport {
            state: crate::clock::state().as_str().to_string(),
            not_before: Timestamp(crate::clock::not_before()),
            lines_stamped_unsynchronised: crate::clock::stamped_untrusted(),
            holding: crate::clock::holds(),
            lines_restamped: crate::clock::restamped(),
        }),
    }
}

fn unix_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

fn budget_report(b: &BudgetReading) -> BudgetReport {
    BudgetReport {
        period: b.period.name().to_string(),
        budget_bytes: b.limit,
        budget_used: b.used,
        budget_left: b.left(),
        budget_resets_at: Timestamp(unix_time(b.resets_at)),
    }
}

/// The data budgets of `[link]` in Prometheus text format (nothing when
/// none is set).
pub fn budget_metrics_text(budgets: &[BudgetReading]) -> String {
    if budgets.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for (name, help, value) in [
        (
            "edge_replicator_link_budget_bytes",
            "Bytes the data budget of the period allows.",
            (|b: &BudgetReading| b.limit) as fn(&BudgetReading) -> u64,
        ),
        (
            "edge_replicator_link_budget_used_bytes",
            "Bytes on the wire in the current period (all remotes, HTTP and probes).",
            |b: &BudgetReading| b.used,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for b in budgets {
            let _ = writeln!(out, "{name}{{period=\"{}\"}} {}", b.period.name(), value(b));
        }
    }
    out
}

impl ReplStatus {
    /// This replication as the status shows it, `now_ns` being the time of
    /// the answer.
    pub fn report(&self, now_ns: u64) -> ReplicationReport {
        let c = self.queue.counters();
        let s = self.ship.locked().clone();
        ReplicationReport {
            name: self.name.clone(),
            remote: self.remote.clone(),
            local_bucket: self.local_bucket.clone(),
            remote_bucket: self.remote_bucket.clone(),
            max_queue_size_bytes: self.max_queue_bytes,
            current_queue_size_bytes: c.queued_bytes,
            remaining_lines: c.queued_lines,
            oldest_entry_age_seconds: c
                .oldest_enqueued_ns
                .map(|t| now_ns.saturating_sub(t) / 1_000_000_000),
            latest_response_code: s.latest_code,
            latest_error_message: s.latest_error,
            state: s.state,
            link: s.link,
            link_since: s.link_since.map(Timestamp),
            sending: s
                .sending
                .map(|(bytes_done, bytes)| Sending { bytes_done, bytes }),
            batch_limit_bytes: s.batch_limit,
            probes: s.probes,
            wire_bytes_sent: Some(s.wire_bytes_sent),
            wire_bytes_accepted: s.bytes_accepted,
            next_retry_at: s.next_retry.map(Timestamp),
            accepted_lines: c.accepted_lines,
            delivered_lines: c.delivered_lines,
            dropped_full_lines: c.dropped_full_lines,
            expired_lines: c.expired_lines,
            dropped_non_retryable_lines: c.dropped_non_retryable_lines,
            dead_lettered_lines: c.dead_lettered_lines,
            rejected_lines: c.rejected_lines,
            filtered_lines: c.filtered_lines,
            late_lines: c.late_lines,
            downsampled_lines: c.downsampled_lines,
            aggregate_lines: c.aggregate_lines,
            dead_letter_lines: c.dead_letter_lines,
            held_destinations: self.queue.held().iter().map(held_report).collect(),
        }
    }
}

/// A held destination as the status shows it.
pub fn held_report(h: &crate::queue::Held) -> HeldReport {
    let (bucket, rp) = match h.bucket.split_once('/') {
        Some((db, rp)) => (db.to_string(), Some(rp.to_string())),
        None => (h.bucket.clone(), None),
    };
    HeldReport {
        destination: h.bucket.clone(),
        bucket,
        rp,
        code: h.code,
        message: h.message.clone(),
        since: Timestamp(UNIX_EPOCH + std::time::Duration::from_nanos(h.since_ns)),
        lines: h.lines,
        bytes: h.bytes,
    }
}

/// Prometheus text exposition. Names follow InfluxDB's replication metrics
/// where one exists.
pub fn metrics_text(list: &[Arc<ReplStatus>], ingest: &IngestStats) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let per_repl = |f: &dyn Fn(&ReplStatus) -> f64| -> Vec<(String, f64)> {
        list.iter()
            .map(|r| (format!("{{replication=\"{}\"}}", r.name), f(r)))
            .collect()
    };
    let c = |r: &ReplStatus| r.queue.counters();
    family(
        "replications_queue_total_points_queued",
        "counter",
        "Lines accepted into the replication's queue.",
        per_repl(&|r| c(r).accepted_lines as f64),
    );
    family(
        "replications_queue_total_bytes_queued",
        "counter",
        "Bytes accepted into the replication's queue.",
        per_repl(&|r| c(r).accepted_bytes as f64),
    );
    family(
        "replications_queue_current_bytes_queued",
        "gauge",
        "Unsent bytes in the replication's queue.",
        per_repl(&|r| c(r).queued_bytes as f64),
    );
    family(
        "replications_queue_remaining_lines",
        "gauge",
        "Unsent lines in the replication's queue.",
        per_repl(&|r| c(r).queued_lines as f64),
    );
    family(
        "replications_queue_max_bytes",
        "gauge",
        "The replication's max_queue_size.",
        per_repl(&|r| r.max_queue_bytes as f64),
    );
    family(
        "replications_queue_oldest_entry_age_seconds",
        "gauge",
        "Age of the oldest unsent entry (0 when empty).",
        per_repl(&|r| {
            c(r).oldest_enqueued_ns
                .map_or(0.0, |t| now_ns().saturating_sub(t) as f64 / 1e9)
        }),
    );
    family(
        "replications_queue_remote_write_bytes_sent",
        "counter",
        "Compressed request bodies the remote accepted (InfluxDB's name).",
        per_repl(&|r| r.ship.locked().bytes_accepted as f64),
    );
    family(
        "replications_queue_remote_write_wire_bytes_sent",
        "counter",
        "Compressed request bodies put on the wire, accepted or not.",
        per_repl(&|r| r.ship.locked().wire_bytes_sent as f64),
    );
    family(
        "replications_queue_remote_live_first_lines",
        "counter",
        "Lines delivered ahead of an older backlog (send_order = \"live_first\").",
        per_repl(&|r| r.ship.locked().live_first_lines as f64),
    );
    family(
        "replications_queue_remote_probes",
        "counter",
        "TCP connects made to see whether an unreachable remote is back.",
        per_repl(&|r| r.ship.locked().probes as f64),
    );
    family(
        "replications_queue_remote_link",
        "gauge",
        "The link to the remote as the last attempt showed it: 0 up, 1 stalled, 2 down.",
        per_repl(&|r| r.ship.locked().link as u8 as f64),
    );
    let per_held = |f: &dyn Fn(&crate::queue::Held) -> u64| -> Vec<(String, f64)> {
        list.iter()
            .flat_map(|r| {
                r.queue
                    .held()
                    .iter()
                    .map(|h| {
                        (
                            format!(
                                "{{replication=\"{}\",destination=\"{}\"}}",
                                r.name,
                                label_value(&h.bucket)
                            ),
                            f(h) as f64,
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    family(
        "edge_replicator_held_lines",
        "gauge",
        "Unsent lines of a destination held after the remote refused it alone (also counted in the queue's lines).",
        per_held(&|h| h.lines),
    );
    family(
        "edge_replicator_held_bytes",
        "gauge",
        "Unsent bytes of a held destination (also counted in the queue's bytes).",
        per_held(&|h| h.bytes),
    );
    family(
        "replications_queue_delivered_lines",
        "counter",
        "Lines the remote accepted.",
        per_repl(&|r| c(r).delivered_lines as f64),
    );
    family(
        "replications_downsample_lines",
        "counter",
        "Raw lines folded into windows, and aggregate lines closed windows queued.",
        list.iter()
            .flat_map(|r| {
                let k = c(r);
                [
                    ("folded", k.downsampled_lines),
                    ("aggregate", k.aggregate_lines),
                ]
                .map(|(kind, v)| {
                    (
                        format!("{{replication=\"{}\",kind=\"{kind}\"}}", r.name),
                        v as f64,
                    )
                })
            })
            .collect(),
    );
    family(
        "replications_queue_dropped_lines",
        "counter",
        "Lines removed unsent, by reason.",
        list.iter()
            .flat_map(|r| {
                let k = c(r);
                [
                    ("full", k.dropped_full_lines),
                    ("expired", k.expired_lines),
                    ("non_retryable", k.dropped_non_retryable_lines),
                    ("dead_letter", k.dead_lettered_lines),
                    ("filtered", k.filtered_lines),
                    ("late", k.late_lines),
                ]
                .map(|(why, v)| {
                    (
                        format!("{{replication=\"{}\",reason=\"{why}\"}}", r.name),
                        v as f64,
                    )
                })
            })
            .collect(),
    );
    family(
        "replications_queue_points_failed_to_queue",
        "counter",
        "Lines refused because the queue was full (when_full = \"reject\").",
        per_repl(&|r| c(r).rejected_lines as f64),
    );
    family(
        "replications_queue_bytes_failed_to_queue",
        "counter",
        "Bytes refused because the queue was full (when_full = \"reject\").",
        per_repl(&|r| c(r).rejected_bytes as f64),
    );
    family(
        "replications_queue_remote_write_errors",
        "counter",
        "Failed attempts to write to the remote, by status code.",
        list.iter()
            .flat_map(|r| {
                r.ship
                    .lock()
                    .unwrap()
                    .errors
                    .iter()
                    .map(|(code, n)| {
                        (
                            format!("{{replication=\"{}\",code=\"{code}\"}}", r.name),
                            *n as f64,
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect(),
    );
    family(
        "replications_state",
        "gauge",
        "1 for the replication's current state.",
        list.iter()
            .flat_map(|r| {
                let cur = r.ship.locked().state;
                State::ALL.map(|s| {
                    (
                        format!("{{replication=\"{}\",state=\"{}\"}}", r.name, s.as_str()),
                        if s == cur { 1.0 } else { 0.0 },
                    )
                })
            })
            .collect(),
    );
    let g = |a: &AtomicU64| vec![(String::new(), a.load(Ordering::Relaxed) as f64)];
    family(
        "edge_replicator_write_requests_total",
        "counter",
        "Write requests received.",
        g(&ingest.requests),
    );
    family(
        "edge_replicator_write_lines_total",
        "counter",
        "Valid lines written.",
        g(&ingest.lines_written),
    );
    family(
        "edge_replicator_write_lines_invalid_total",
        "counter",
        "Invalid lines refused.",
        g(&ingest.lines_invalid),
    );
    family(
        "edge_replicator_write_bytes_total",
        "counter",
        "Request body bytes received (after decompression).",
        g(&ingest.bytes_received),
    );
    family(
        "edge_replicator_write_refused_too_large_total",
        "counter",
        "Writes refused with 413.",
        g(&ingest.refused_too_large),
    );
    family(
        "edge_replicator_write_refused_full_total",
        "counter",
        "Writes refused because a queue or the disk was full.",
        g(&ingest.refused_full),
    );
    family(
        "edge_replicator_write_refused_auth_total",
        "counter",
        "Writes refused with 401.",
        g(&ingest.refused_auth),
    );
    family(
        "edge_replicator_requests_refused_browser_total",
        "counter",
        "Requests refused with 403: an Origin not in listen.allowed_origins, or (without tokens) a Host neither loopback nor in listen.allowed_hosts.",
        g(&ingest.refused_browser),
    );
    let clock = crate::clock::state();
    family(
        "edge_replicator_clock_state",
        "gauge",
        "1 for what the agent knows of the system clock: synchronised by a time service, unsynchronised, before-build (earlier than the agent's build: wrong), unknown.",
        crate::clock::ClockState::ALL
            .iter()
            .map(|s| {
                let v = if *s == clock { 1.0 } else { 0.0 };
                (format!("{{state=\"{}\"}}", s.as_str()), v)
            })
            .collect(),
    );
    family(
        "edge_replicator_lines_stamped_unsynchronised_total",
        "counter",
        "Lines without a timestamp that the agent stamped while the system clock was not synchronised.",
        vec![(String::new(), crate::clock::stamped_untrusted() as f64)],
    );
    family(
        "edge_replicator_clock_holding",
        "gauge",
        "1 while the clock guard holds writes until the system clock is synchronised.",
        vec![(String::new(), f64::from(u8::from(crate::clock::holds())))],
    );
    family(
        "edge_replicator_lines_restamped_total",
        "counter",
        "Lines stamped while the clock was not synchronised that were given the time they arrived once it was.",
        vec![(String::new(), crate::clock::restamped() as f64)],
    );
    family(
        "edge_replicator_write_refused_memory_total",
        "counter",
        "Writes refused with 503 because requests in progress held listen.max_request_memory.",
        g(&ingest.refused_memory),
    );
    out
}

/// A file or WAL shard a source follows, as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Followed {
    /// The file's path, or the shard's `<rp>/<shard id>`.
    pub path: String,
    /// WAL sources: the segment being read.
    pub segment: Option<u64>,
    /// Bytes of the file (or segment) committed to the queue.
    pub offset: u64,
    /// Bytes written but not yet queued (a partial last line included).
    pub lag_bytes: u64,
}

/// Where a source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    /// Reading, or caught up with what it follows.
    Following,
    /// Nothing to follow yet: no file matches, no WAL directory.
    #[default]
    Waiting,
    /// The queue refuses the lines; they are retried.
    Blocked,
}

impl SourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Following => "following",
            SourceState::Waiting => "waiting",
            SourceState::Blocked => "blocked",
        }
    }
}

/// The changing part of a source's status.
#[derive(Debug, Clone, Default)]
pub struct SourceDetail {
    pub state: SourceState,
    pub latest_error: String,
    pub followed: Vec<Followed>,
    pub last_queued: Option<SystemTime>,
}

/// One source (`[[tail]]`, `[[influxdb_wal]]`) as operators see it; written
/// by its thread.
#[derive(Debug)]
pub struct SourceStatus {
    /// `tail` or `influxdb_wal`.
    pub kind: &'static str,
    /// What it follows, also the metrics label.
    pub name: String,
    pub bucket: String,
    /// Lines committed to the queue.
    pub lines: AtomicU64,
    /// Lines skipped as invalid (logged with their file and line, or WAL
    /// segment and offset).
    pub invalid_lines: AtomicU64,
    /// Read errors and damaged WAL entries or tails.
    pub errors: AtomicU64,
    /// Writes waited out because a queue or the storage was full.
    pub retries: AtomicU64,
    /// WAL segments removed before they were (wholly) read.
    pub segments_missed: AtomicU64,
    /// WAL delete entries passed over (deletes are not replicated).
    pub deletes_skipped: AtomicU64,
    pub detail: Mutex<SourceDetail>,
    /// The clock guard's anchor for the lines the source validated last
    /// (`None`: not held), taken by the write that queues them: a source's
    /// one thread validates a read, then writes it.
    pub anchor: Mutex<Option<crate::clock::Anchor>>,
}

impl SourceStatus {
    pub fn new(kind: &'static str, name: String, bucket: &str) -> SourceStatus {
        SourceStatus {
            kind,
            name,
            bucket: bucket.to_string(),
            lines: AtomicU64::new(0),
            invalid_lines: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            segments_missed: AtomicU64::new(0),
            deletes_skipped: AtomicU64::new(0),
            detail: Mutex::new(SourceDetail::default()),
            anchor: Mutex::new(None),
        }
    }

    /// What the source follows now: `waiting` while nothing, else
    /// `following`.
    pub fn set_followed(&self, followed: Vec<Followed>) {
        let mut d = self.detail.locked();
        d.state = if followed.is_empty() {
            SourceState::Waiting
        } else {
            SourceState::Following
        };
        d.followed = followed;
    }

    /// A read error: logged, counted, and shown as the latest error.
    pub fn error(&self, msg: String) {
        log::warn!("{}: {msg}", self.name);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.detail.locked().latest_error = msg;
    }

    fn lag_bytes(&self) -> u64 {
        let d = self.detail.locked();
        d.followed.iter().map(|f| f.lag_bytes).sum()
    }

    /// This source as the status shows it.
    pub fn report(&self) -> SourceReport {
        let d = self.detail.locked().clone();
        let followed: Vec<FollowedReport> = d
            .followed
            .iter()
            .map(|f| FollowedReport {
                path: f.path.clone(),
                segment: f.segment,
                offset: f.offset,
                lag_bytes: f.lag_bytes,
            })
            .collect();
        let count = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let wal = self.kind == "influxdb_wal";
        let (files, shards) = if wal {
            (None, Some(followed))
        } else {
            (Some(followed), None)
        };
        SourceReport {
            kind: self.kind.to_string(),
            name: self.name.clone(),
            bucket: self.bucket.clone(),
            state: d.state,
            lines_queued: count(&self.lines),
            invalid_lines: count(&self.invalid_lines),
            errors: count(&self.errors),
            retries: count(&self.retries),
            lag_bytes: d.followed.iter().map(|f| f.lag_bytes).sum(),
            last_queued_at: d.last_queued.map(Timestamp),
            latest_error_message: d.latest_error,
            wal_segments_missed: wal.then(|| count(&self.segments_missed)),
            deletes_skipped: wal.then(|| count(&self.deletes_skipped)),
            files,
            shards,
        }
    }
}

/// Prometheus label value: `\`, `"` and newlines escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text for the sources, appended to [`metrics_text`].
pub fn sources_metrics_text(list: &[Arc<SourceStatus>]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, f: &dyn Fn(&SourceStatus) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in list {
            let _ = writeln!(
                out,
                "{name}{{source=\"{}\",kind=\"{}\"}} {}",
                label_value(&s.name),
                s.kind,
                f(s)
            );
        }
    };
    family(
        "edge_replicator_source_lines_total",
        "counter",
        "Lines a source committed to the queue.",
        &|s| s.lines.load(Ordering::Relaxed),
    );
    family(
        "edge_replicator_source_lines_invalid_total",
        "counter",
        "Lines a source skipped as invalid.",
        &|s| s.invalid_lines.load(Ordering::Relaxed),
    );
    family(
        "edge_replicator_source_errors_total",
        "counter",
        "Read errors and damaged entries met by a source.",
        &|s| s.errors.load(Ordering::Relaxed),
    );
    family(
        "edge_replicator_source_retries_total",
        "counter",
        "Writes a source waited out because a queue or the storage was full.",
        &|s| s.retries.load(Ordering::Relaxed),
    );
    family(
        "edge_replicator_source_lag_bytes",
        "gauge",
        "Bytes written to the followed files or segments and not yet queued.",
        &|s| s.lag_bytes(),
    );
    family(
        "edge_replicator_wal_segments_missed_total",
        "counter",
        "WAL segments InfluxDB removed before the source read them (wholly).",
        &|s| s.segments_missed.load(Ordering::Relaxed),
    );
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::config::{Durability, WhenFull};
    use crate::queue::{Queue, QueueOptions, ReplSpec};

    /// A whole millisecond: what RFC 3339 with milliseconds keeps.
    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// A replication with something in every field, and a source of each
    /// kind; the queue lives in `dir`.
    fn sample(dir: &std::path::Path) -> (Queue, StatusReport) {
        let q = Queue::open(
            dir,
            &QueueOptions {
                map_size: 64 << 20,
                durability: Durability::Fsync,
                commit_interval: Duration::from_millis(1),
            },
            &[ReplSpec {
                name: "r1".into(),
                max_bytes: 1 << 20,
                when_full: WhenFull::DropOldest,
                max_age: None,
                transform: None,
            }],
        )
        .unwrap();
        let h = q.handles()[0].clone();
        q.append_blocking(vec![h.clone()], "b".into(), b"m f=1i 1\n".to_vec(), 1)
            .unwrap();
        let repl = Arc::new(ReplStatus {
            name: "r1".into(),
            remote: "cloud".into(),
            local_bucket: "b".into(),
            remote_bucket: "rb".into(),
            max_queue_bytes: 1 << 20,
            queue: h,
            ship: Mutex::new(ShipStatus {
                state: State::Backoff,
                latest_code: Some(503),
                latest_error: "HTTP 503: busy".into(),
                logged_cause: "HTTP 503: busy".into(),
                next_retry: Some(at(1_772_366_400_250)),
                errors: BTreeMap::from([("503".to_string(), 2)]),
                bytes_accepted: 10,
                wire_bytes_sent: 30,
                batches_sent: 1,
                link: Link::Stalled,
                link_since: Some(at(1_772_366_399_000)),
                sending: Some((5, 20)),
                probes: 3,
                live_first_lines: 0,
                batch_limit: 4096,
            }),
        });
        let tail = Arc::new(SourceStatus::new("tail", "tail /a".into(), "b"));
        {
            let mut d = tail.detail.locked();
            d.state = SourceState::Blocked;
            d.latest_error = "queue full".into();
            d.last_queued = Some(at(1_772_366_398_125));
            d.followed = vec![Followed {
                path: "/a".into(),
                segment: None,
                offset: 7,
                lag_bytes: 2,
            }];
        }
        let wal = Arc::new(SourceStatus::new(
            "influxdb_wal",
            "influxdb_wal /w".into(),
            "db",
        ));
        wal.segments_missed.store(1, Ordering::Relaxed);
        wal.detail.locked().followed = vec![Followed {
            path: "autogen/3".into(),
            segment: Some(4),
            offset: 9,
            lag_bytes: 0,
        }];
        let budget = BudgetReading {
            period: crate::ship::link::Period::Month,
            limit: 1_000_000_000,
            used: 250_000_000,
            // 2027-01-01T00:00:00Z
            resets_at: 1_798_761_600,
        };
        let r = report(&[repl], &[tail, wal], &[budget]);
        (q, r)
    }

    fn keys(v: &Value) -> BTreeSet<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn a_report_reads_back_as_the_agent_sent_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_q, sent) = sample(dir.path());
        let json = serde_json::to_string(&sent).unwrap();
        let read: StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(read, sent);

        let v: Value = serde_json::from_str(&json).unwrap();
        let r = &v["replications"][0];
        assert_eq!(r["state"], "backoff");
        assert_eq!(r["link"], "stalled");
        assert_eq!(r["nextRetryAt"], "2026-03-01T12:00:00.250Z");
        assert_eq!(r["linkSince"], "2026-03-01T11:59:59.000Z");
        assert_eq!(
            r["sending"],
            serde_json::json!({"bytesDone": 5, "bytes": 20})
        );
        assert_eq!(r["remainingLines"], 1);
        assert!(r["oldestEntryAgeSeconds"].is_u64(), "{r}");
        let tail = &v["sources"][0];
        assert_eq!(tail["state"], "blocked");
        assert_eq!(tail["lastQueuedAt"], "2026-03-01T11:59:58.125Z");
        assert_eq!(
            tail["files"],
            serde_json::json!([{"path": "/a", "offset": 7, "lagBytes": 2}])
        );
        let wal = &v["sources"][1];
        assert_eq!(wal["state"], "waiting");
        assert_eq!(wal["lastQueuedAt"], Value::Null);
        assert_eq!(
            wal["shards"],
            serde_json::json!([{"path": "autogen/3", "segment": 4, "offset": 9, "lagBytes": 0}])
        );
    }

    #[test]
    fn states_read_as_their_metric_labels() {
        for s in State::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for l in [Link::Up, Link::Stalled, Link::Down] {
            assert_eq!(serde_json::to_value(l).unwrap(), l.as_str());
        }
        for (s, text) in [
            (SourceState::Following, "following"),
            (SourceState::Waiting, "waiting"),
            (SourceState::Blocked, "blocked"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), text);
            assert_eq!(s.as_str(), text);
            assert_eq!(
                serde_json::from_value::<SourceState>(text.into()).unwrap(),
                s
            );
        }
    }

    /// The keys are a public API: these are the ones the README lists.
    #[test]
    fn the_keys_are_those_the_readme_documents() {
        let dir = tempfile::tempdir().unwrap();
        let (_q, sent) = sample(dir.path());
        let v = serde_json::to_value(&sent).unwrap();
        let replication = [
            "name",
            "remote",
            "localBucket",
            "remoteBucket",
            "maxQueueSizeBytes",
            "currentQueueSizeBytes",
            "remainingLines",
            "oldestEntryAgeSeconds",
            "latestResponseCode",
            "latestErrorMessage",
            "state",
            "nextRetryAt",
            "link",
            "linkSince",
            "sending",
            "batchLimitBytes",
            "probes",
            "wireBytesSent",
            "wireBytesAccepted",
            "acceptedLines",
            "deliveredLines",
            "droppedFullLines",
            "expiredLines",
            "droppedNonRetryableLines",
            "deadLetteredLines",
            "rejectedLines",
            "filteredLines",
            "lateLines",
            "downsampledLines",
            "aggregateLines",
            "deadLetterLines",
            "heldDestinations",
        ];
        let source = [
            "kind",
            "name",
            "bucket",
            "state",
            "linesQueued",
            "invalidLines",
            "errors",
            "retries",
            "lagBytes",
            "lastQueuedAt",
            "latestErrorMessage",
        ];
        assert_eq!(
            keys(&v),
            BTreeSet::from(["replications", "sources", "budgets", "clock"])
        );
        assert_eq!(
            keys(&v["clock"]),
            BTreeSet::from([
                "state",
                "notBefore",
                "linesStampedUnsynchronised",
                "holding",
                "linesRestamped"
            ])
        );
        let budget = [
            "period",
            "budgetBytes",
            "budgetUsed",
            "budgetLeft",
            "budgetResetsAt",
        ];
        assert_eq!(keys(&v["budgets"][0]), BTreeSet::from(budget));
        assert_eq!(v["budgets"][0]["budgetLeft"], 750_000_000);
        assert_eq!(
            v["budgets"][0]["budgetResetsAt"],
            "2027-01-01T00:00:00.000Z"
        );
        assert_eq!(keys(&v["replications"][0]), BTreeSet::from(replication));
        let tail: BTreeSet<&str> = source.into_iter().chain(["files"]).collect();
        assert_eq!(keys(&v["sources"][0]), tail);
        let wal: BTreeSet<&str> = source
            .into_iter()
            .chain(["shards", "walSegmentsMissed", "deletesSkipped"])
            .collect();
        assert_eq!(keys(&v["sources"][1]), wal);
        assert_eq!(
            keys(&v["replications"][0]["sending"]),
            BTreeSet::from(["bytesDone", "bytes"])
        );

        let readme = include_str!("../README.md");
        for key in replication.iter().chain(&wal).chain(&tail).chain(&budget) {
            assert!(
                readme.contains(&format!("`{key}`")),
                "the README does not document `{key}`"
            );
        }
        assert!(readme.contains(r#"`{"bytesDone", "bytes"}`"#));
    }

    #[test]
    fn a_missing_key_is_an_error_not_a_blank() {
        let dir = tempfile::tempdir().unwrap();
        let (_q, sent) = sample(dir.path());
        let mut v = serde_json::to_value(&sent).unwrap();
        v["replications"][0]
            .as_object_mut()
            .unwrap()
            .remove("deliveredLines");
        let e = serde_json::from_value::<StatusReport>(v).unwrap_err();
        assert!(e.to_string().contains("deliveredLines"), "{e}");
    }

    #[test]
    fn source_labels_are_escaped() {
        let text = sources_metrics_text(&[Arc::new(SourceStatus::new(
            "tail",
            "tail /a \"b\"".into(),
            "b",
        ))]);
        assert!(
            text.contains(
                "edge_replicator_source_lines_total{source=\"tail /a \\\"b\\\"\",kind=\"tail\"} 0"
            ),
            "{text}"
        );
    }
}
