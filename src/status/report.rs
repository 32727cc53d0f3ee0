//! The `GET /api/v2/replications` answer as types: the agent serializes
//! them, `edge-replicator status` and `status --watch` read them back. The
//! JSON keys are a public API (README, *Status*); one type for both sides
//! means a key renamed on one side fails to parse instead of showing as "-".
//!
//! Times are RFC 3339 in UTC with milliseconds (`2026-03-01T12:00:00.250Z`).

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Link, SourceState, State};

/// The whole answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub replications: Vec<ReplicationReport>,
    /// Absent from agents that predate sources: read as none.
    #[serde(default)]
    pub sources: Vec<SourceReport>,
    /// The data budgets of `[link]`, when any is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetReport>,
    /// The system clock; absent from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockReport>,
}

/// What the agent knows of the system clock (`crate::clock`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClockReport {
    /// `synchronised`, `unsynchronised`, `before-build` or `unknown`.
    pub state: String,
    /// The build date of the agent: a clock earlier than this is wrong.
    pub not_before: Timestamp,
    /// Lines without a timestamp stamped while the clock was not
    /// synchronised, since the agent started.
    pub lines_stamped_unsynchronised: u64,
    /// Whether the clock guard holds writes now (their lines wait in the
    /// queue for the clock; see `crate::clock`). Absent from reports of
    /// agents before the guard.
    #[serde(default)]
    pub holding: bool,
    /// Lines given the time of their arrival once the guard let them go,
    /// since the agent started.
    #[serde(default)]
    pub lines_restamped: u64,
}

/// One data budget of `[link]`: all remotes' bytes on the wire in the
/// current day or month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetReport {
    /// `"day"` or `"month"`.
    pub period: String,
    pub budget_bytes: u64,
    pub budget_used: u64,
    pub budget_left: u64,
    pub budget_resets_at: Timestamp,
}

/// One replication.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationReport {
    pub name: String,
    pub remote: String,
    pub local_bucket: String,
    pub remote_bucket: String,
    pub max_queue_size_bytes: u64,
    /// Unsent bytes.
    pub current_queue_size_bytes: u64,
    pub remaining_lines: u64,
    /// `None` (null) while the queue is empty.
    pub oldest_entry_age_seconds: Option<u64>,
    pub latest_response_code: Option<u16>,
    pub latest_error_message: String,
    pub state: State,
    pub link: Link,
    pub link_since: Option<Timestamp>,
    /// The request body under way, if any.
    pub sending: Option<Sending>,
    pub batch_limit_bytes: u64,
    pub probes: u64,
    /// Compressed request bodies put on the wire, accepted or not. `None`
    /// only from agents older than the key (`status --watch` then shows
    /// the queue's change instead).
    #[serde(default)]
    pub wire_bytes_sent: Option<u64>,
    pub wire_bytes_accepted: u64,
    pub next_retry_at: Option<Timestamp>,
    pub accepted_lines: u64,
    pub delivered_lines: u64,
    pub dropped_full_lines: u64,
    pub expired_lines: u64,
    pub dropped_non_retryable_lines: u64,
    pub dead_lettered_lines: u64,
    pub rejected_lines: u64,
    pub filtered_lines: u64,
    pub late_lines: u64,
    pub downsampled_lines: u64,
    pub aggregate_lines: u64,
    /// Lines held in the dead-letter store now.
    pub dead_letter_lines: u64,
    /// Destinations held apart after the remote refused them alone (their
    /// lines count in `remainingLines` and the queue's bytes). Absent from
    /// agents that predate holds: read as none.
    #[serde(default)]
    pub held_destinations: Vec<HeldReport>,
}

/// A held destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldReport {
    /// The destination as `edge-replicator held` names it: the local
    /// bucket its lines were written to (`db` or `db/rp`).
    pub destination: String,
    /// The bucket (or database) it is sent to, and the retention policy,
    /// if the write named one.
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rp: Option<String>,
    /// The remote's answer, as last heard.
    pub code: u16,
    pub message: String,
    /// When it was first held.
    pub since: Timestamp,
    pub lines: u64,
    pub bytes: u64,
}

impl Default for Timestamp {
    fn default() -> Timestamp {
        Timestamp(SystemTime::UNIX_EPOCH)
    }
}

/// Progress of the request body under way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sending {
    pub bytes_done: u64,
    pub bytes: u64,
}

/// One source (`[[tail]]`, `[[influxdb_wal]]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceReport {
    /// `tail` or `influxdb_wal`.
    pub kind: String,
    pub name: String,
    pub bucket: String,
    pub state: SourceState,
    pub lines_queued: u64,
    pub invalid_lines: u64,
    pub errors: u64,
    pub retries: u64,
    /// Written to the followed files or segments, not yet queued.
    pub lag_bytes: u64,
    pub last_queued_at: Option<Timestamp>,
    pub latest_error_message: String,
    /// Tail sources: the files followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FollowedReport>>,
    /// WAL sources: the shards followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<Vec<FollowedReport>>,
    /// WAL sources only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_segments_missed: Option<u64>,
    /// WAL sources only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletes_skipped: Option<u64>,
}

/// A file, or a WAL shard, a source follows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FollowedReport {
    /// The file's path, or the shard's `<rp>/<shard id>`.
    pub path: String,
    /// WAL shards: the segment being read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<u64>,
    pub offset: u64,
    pub lag_bytes: u64,
}

/// A moment of the status: RFC 3339, UTC, milliseconds (read back, it has
/// lost what was finer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub SystemTime);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text)
            .map(Timestamp)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not RFC 3339 UTC: {e}")))
    }
}
