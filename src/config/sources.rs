//! `[[tail]]` and `[[influxdb_wal]]`: data the agent follows itself on the gateway's disk
//! rather than being sent. Both route into a local bucket as an HTTP write would, and
//! share the rule that a replication must take that bucket; what is particular to each
//! (a glob of line-protocol files, an InfluxDB WAL folder) stays in its own block here.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{duration_value, positive, Scalar};
use super::{invalid, ConfigError, Replication, Validator};
use crate::lineproto::Precision;

/// `[[tail]]` `poll_interval` when the key is left out.
const DEFAULT_TAIL_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// `[[influxdb_wal]]` `poll_interval` when the key is left out.
const DEFAULT_WAL_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A followed line-protocol file (or glob of files): one `[[tail]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// An absolute path, or a glob pattern of paths (`*`, `?`, `[...]`).
    pub path: PathBuf,
    /// Local bucket the lines are routed as; always taken by a replication.
    pub bucket: String,
    /// Unit of the files' timestamps.
    pub precision: Precision,
    pub poll_interval: Duration,
    /// Whether files present at the very first start are read from their
    /// start (true) or their end; files appearing later are always read whole.
    pub from_beginning: bool,
    /// Whether a matched path that is (or passes through, below the
    /// pattern's fixed directories) a symbolic link is read. Off by default:
    /// whoever can write in a tailed directory could otherwise point a link
    /// at any file the agent can read and have it logged or shipped.
    pub follow_symlinks: bool,
}

/// A followed InfluxDB TSM WAL: one `[[influxdb_wal]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfluxdbWal {
    /// 1.x `wal-dir`, or 2.x `<engine-path>/wal`.
    pub wal_dir: PathBuf,
    /// 1.x database name, or 2.x bucket ID: the folder under `wal_dir`.
    pub database: String,
    /// Local bucket the points are routed as; always taken by a replication.
    pub bucket: String,
    pub poll_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTail {
    path: String,
    bucket: String,
    precision: Option<String>,
    poll_interval: Option<Scalar>,
    from_beginning: Option<bool>,
    follow_symlinks: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInfluxdbWal {
    wal_dir: String,
    database: String,
    bucket: Option<String>,
    poll_interval: Option<Scalar>,
}

impl Validator<'_> {
    /// `[[tail]]` and `[[influxdb_wal]]`. A source's bucket must be taken by a
    /// replication: its lines would have nowhere to go.
    pub(super) fn sources(
        &mut self,
        tails: Vec<RawTail>,
        wals: Vec<RawInfluxdbWal>,
        replications: &[Replication],
    ) -> Result<(Vec<Tail>, Vec<InfluxdbWal>), ConfigError> {
        let bucket = |label: &str, b: String| -> Result<String, ConfigError> {
            let key = format!("{label}: bucket");
            if b.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
            if b.contains('*') {
                let why = format!("{b:?}: a source writes to one bucket, not a pattern");
                return Err(invalid(key, why));
            }
            if !replications.iter().any(|r| r.takes_bucket(&b)) {
                let why = format!(
                    "{b:?} is not taken by any replication (no local_bucket = {b:?} or \"*\")"
                );
                return Err(invalid(key, why));
            }
            Ok(b)
        };
        let poll = |key: String, v: Option<Scalar>, default: Duration| {
            positive(&key, duration_value(&key, v, default)?)
        };
        let mut out_tails: Vec<Tail> = Vec::with_capacity(tails.len());
        for (i, t) in tails.into_iter().enumerate() {
            let label = format!("tail[{i}]");
            let key = |field: &str| format!("{label}: {field}");
            if t.path.is_empty() {
                return Err(invalid(key("path"), "must not be empty"));
            }
            let path = self.resolve(&t.path);
            let Some(text) = path.to_str() else {
                return Err(invalid(key("path"), "must be valid UTF-8"));
            };
            if let Err(e) = glob::Pattern::new(text) {
                let why = format!("{text:?} is not a valid glob pattern: {}", e.msg);
                return Err(invalid(key("path"), why));
            }
            if text.ends_with('/') {
                let why = format!("{text:?} names a directory; use e.g. \"{text}*.lp\"");
                return Err(invalid(key("path"), why));
            }
            if let Some(j) = out_tails.iter().position(|o| o.path == path) {
                let why = format!("{text:?} is already followed by tail[{j}]");
                return Err(invalid(key("path"), why));
            }
            let precision = match t.precision.as_deref() {
                None | Some("ns") => Precision::Nanoseconds,
                Some("us") => Precision::Microseconds,
                Some("ms") => Precision::Milliseconds,
                Some("s") => Precision::Seconds,
                Some(other) => {
                    let why =
                        format!("invalid value {other:?} (use \"ns\", \"us\", \"ms\" or \"s\")");
                    return Err(invalid(key("precision"), why));
                }
            };
            out_tails.push(Tail {
                path,
                bucket: bucket(&label, t.bucket)?,
                precision,
                poll_interval: poll(
                    key("poll_interval"),
                    t.poll_interval,
                    DEFAULT_TAIL_POLL_INTERVAL,
                )?,
                from_beginning: t.from_beginning.unwrap_or(true),
                follow_symlinks: t.follow_symlinks.unwrap_or(false),
            });
        }
        let mut out_wals: Vec<InfluxdbWal> = Vec::with_capacity(wals.len());
        for (i, w) in wals.into_iter().enumerate() {
            let label = format!("influxdb_wal[{i}]");
            let key = |field: &str| format!("{label}: {field}");
            if w.wal_dir.is_empty() {
                return Err(invalid(key("wal_dir"), "must not be empty"));
            }
            let wal_dir = self.resolve(&w.wal_dir);
            let db = w.database;
            if db.is_empty() || db == "." || db == ".." || db.contains(['/', '\0']) {
                let why = format!(
                    "{db:?} is not a folder name under wal_dir (a 1.x database, or a 2.x bucket ID)"
                );
                return Err(invalid(key("database"), why));
            }
            let same = |o: &InfluxdbWal| o.wal_dir == wal_dir && o.database == db;
            if let Some(j) = out_wals.iter().position(same) {
                let why = format!("{db:?} in {wal_dir:?} is already followed by influxdb_wal[{j}]");
                return Err(invalid(key("database"), why));
            }
            let b = w.bucket.unwrap_or_else(|| db.clone());
            out_wals.push(InfluxdbWal {
                bucket: bucket(&label, b)?,
                poll_interval: poll(
                    key("poll_interval"),
                    w.poll_interval,
                    DEFAULT_WAL_POLL_INTERVAL,
                )?,
                wal_dir,
                database: db,
            });
        }
        Ok((out_tails, out_wals))
    }
}
