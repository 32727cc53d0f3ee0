//! `[[replication]]`: which local bucket goes to which remote, how much of it is kept
//! while the remote is away, and what is changed on the way (filters, tags,
//! `[replication.downsample]`). Its own module because these rules are the queue's and
//! the shipper's contract, and the checks between replications (one stream each) sit
//! with them.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;

use super::units::{duration_value, positive, size_value, Scalar, MIB};
use super::{check_name, invalid, non_empty, Api, ConfigError, Remote, Validator};

/// `max_queue_size` when the key is left out.
const DEFAULT_MAX_QUEUE_SIZE: u64 = 256 * MIB;
/// `max_age` when the key is left out: a week (`0` keeps entries forever).
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
/// `priority` when the key is left out.
const DEFAULT_PRIORITY: u8 = 5;
/// `batch_size` when the key is left out.
const DEFAULT_BATCH_SIZE: u64 = 500_000;
/// The smallest `batch_size`: 1 kB.
const MIN_BATCH_SIZE: u64 = 1_000;
/// `gzip_level` when the key is left out.
const DEFAULT_GZIP_LEVEL: u32 = 6;
/// The longest `batch_wait`: lines wait in the queue for company at most
/// this long.
const MAX_BATCH_WAIT: Duration = Duration::from_secs(600);

/// `live_window` when the key is left out.
const DEFAULT_LIVE_WINDOW: Duration = Duration::from_secs(60);
/// `downsample.allowed_lateness` when the key is left out.
const DEFAULT_ALLOWED_LATENESS: Duration = Duration::from_secs(30);

/// What a full queue does with a new write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WhenFull {
    /// Evict whole oldest entries (counted) to make room.
    DropOldest,
    /// Refuse the write with 503 and `Retry-After`.
    Reject,
}

impl WhenFull {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::DropOldest => "drop_oldest",
            WhenFull::Reject => "reject",
        }
    }
}

/// A replication stream: one `[[replication]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub name: String,
    /// Name of the [`Remote`] it ships to; always defined.
    pub remote: String,
    /// Local bucket it takes, or `"*"` for every bucket.
    pub local_bucket: String,
    /// Bucket on the remote; `None` means the local bucket's name. For a v1 remote
    /// `"db"` or `"db/rp"`.
    pub remote_bucket: Option<String>,
    /// Bound on unsent bytes.
    pub max_queue_size: u64,
    /// Entries older than this are dropped; `None` keeps them forever.
    pub max_age: Option<Duration>,
    pub when_full: WhenFull,
    pub drop_non_retryable_data: bool,
    /// Largest batch in bytes before compression.
    pub batch_size: u64,
    /// gzip level, 0 to 9.
    pub gzip_level: u32,
    /// 1 to 9, higher first: who gets a capped link, and the last tenth of
    /// a data budget (`[link]`).
    pub priority: u8,
    /// `send_order = "live_first"`: lines queued within this window before
    /// now go ahead of a backlog older than it; `None` for `"oldest_first"`.
    pub live_window: Option<Duration>,
    /// `batch_wait`: how long a batch smaller than half `batch_size` waits
    /// for more lines before it goes; `None`: the default, which depends on
    /// the link (see `ship::Worker::batch_wait`).
    pub batch_wait: Option<Duration>,
    /// Measurement globs (`*`, `?`) a line must match to be sent; empty: all.
    pub include_measurements: Vec<String>,
    /// Measurement globs whose lines are not sent.
    pub exclude_measurements: Vec<String>,
    /// Tags added to every line sent; a line's own tag of the same key is replaced.
    pub add_tags: BTreeMap<String, String>,
    /// Send per-window aggregates instead of raw points.
    pub downsample: Option<Downsample>,
}

/// `[replication.downsample]`: aggregate per series and epoch-aligned window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downsample {
    pub every: Duration,
    /// A window is closed (and its aggregate queued) this long after it ends.
    pub allowed_lateness: Duration,
    /// Per-field aggregate overriding the default (numeric: mean, others: last).
    pub fields: BTreeMap<String, Aggregate>,
}

/// How a field is aggregated over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregate {
    Mean,
    Last,
    Max,
    Min,
    Sum,
    Count,
}

impl Aggregate {
    pub fn parse(s: &str) -> Option<Aggregate> {
        Some(match s {
            "mean" => Aggregate::Mean,
            "last" => Aggregate::Last,
            "max" => Aggregate::Max,
            "min" => Aggregate::Min,
            "sum" => Aggregate::Sum,
            "count" => Aggregate::Count,
            _ => return None,
        })
    }
}

impl Replication {
    /// Whether lines are changed on the way (filters, tags, downsampling).
    pub fn transforms(&self) -> bool {
        !self.include_measurements.is_empty()
            || !self.exclude_measurements.is_empty()
            || !self.add_tags.is_empty()
            || self.downsample.is_some()
    }

    /// Whether writes to the local `bucket` go to this replication.
    pub fn takes_bucket(&self, bucket: &str) -> bool {
        self.local_bucket == bucket || self.local_bucket == "*"
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReplication {
    name: String,
    remote: String,
    local_bucket: String,
    remote_bucket: Option<String>,
    max_queue_size: Option<Scalar>,
    max_age: Option<Scalar>,
    when_full: Option<String>,
    drop_non_retryable_data: Option<bool>,
    batch_size: Option<Scalar>,
    gzip_level: Option<i64>,
    priority: Option<i64>,
    send_order: Option<String>,
    live_window: Option<Scalar>,
    batch_wait: Option<Scalar>,
    include_measurements: Option<Vec<String>>,
    exclude_measurements: Option<Vec<String>>,
    add_tags: Option<BTreeMap<String, String>>,
    downsample: Option<RawDownsample>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDownsample {
    every: Scalar,
    allowed_lateness: Option<Scalar>,
    fields: Option<BTreeMap<String, String>>,
}

impl Validator<'_> {
    /// Every `[[replication]]`: a valid name no other replication has, a defined
    /// remote, and no two that send the same bucket to the same place.
    pub(super) fn replications(
        &mut self,
        raw: Vec<RawReplication>,
        remotes: &[Remote],
    ) -> Result<Vec<Replication>, ConfigError> {
        let mut replications: Vec<Replication> = Vec::with_capacity(raw.len());
        let mut names = HashMap::new();
        for (i, r) in raw.into_iter().enumerate() {
            check_name("replication", i, &r.name, &mut names)?;
            let label = format!("replication \"{}\"", r.name);
            let Some(remote) = remotes.iter().find(|remote| remote.name == r.remote) else {
                return Err(invalid(
                    label,
                    format!("remote {:?} is not defined", r.remote),
                ));
            };
            let replication = self.replication(&label, r, remote.api)?;
            for other in &replications {
                if other.remote == replication.remote
                    && other.local_bucket == replication.local_bucket
                    && target(other, &other.local_bucket)
                        == target(&replication, &other.local_bucket)
                {
                    return Err(invalid(
                        label,
                        format!(
                            "same local_bucket {:?}, remote {:?} and remote_bucket as replication {:?}",
                            replication.local_bucket, replication.remote, other.name
                        ),
                    ));
                }
            }
            replications.push(replication);
        }
        self.overlap_warnings(&replications);
        Ok(replications)
    }

    fn replication(
        &mut self,
        label: &str,
        r: RawReplication,
        api: Api,
    ) -> Result<Replication, ConfigError> {
        let key = |field: &str| format!("{label}: {field}");
        let local_bucket = r.local_bucket;
        if local_bucket.is_empty() {
            return Err(invalid(
                key("local_bucket"),
                "must not be empty (use \"*\" for every bucket)",
            ));
        }
        if local_bucket != "*" && local_bucket.contains('*') {
            return Err(invalid(
                key("local_bucket"),
                format!("{local_bucket:?}: patterns are not supported (use a bucket name, or \"*\" for every bucket)"),
            ));
        }
        let remote_bucket = non_empty(&key("remote_bucket"), r.remote_bucket)?;
        if let (Some(rb), Api::V1) = (&remote_bucket, api) {
            let parts: Vec<&str> = rb.split('/').collect();
            if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(invalid(
                    key("remote_bucket"),
                    format!(
                        "{rb:?} is not \"db\" or \"db/rp\" (remote {:?} has api = \"v1\")",
                        r.remote
                    ),
                ));
            }
        }
        let max_queue_size = size_value(
            &key("max_queue_size"),
            r.max_queue_size,
            DEFAULT_MAX_QUEUE_SIZE,
        )?;
        if max_queue_size == 0 {
            return Err(invalid(key("max_queue_size"), "must be greater than 0"));
        }
        let max_age = match duration_value(&key("max_age"), r.max_age, DEFAULT_MAX_AGE)? {
            d if d.is_zero() => None,
            d => Some(d),
        };
        let when_full = match r.when_full.as_deref() {
            None | Some("drop_oldest") => WhenFull::DropOldest,
            Some("reject") => WhenFull::Reject,
            Some(other) => {
                return Err(invalid(
                    key("when_full"),
                    format!("invalid value {other:?} (use \"drop_oldest\" or \"reject\")"),
                ))
            }
        };
        let live_window = positive(
            &key("live_window"),
            duration_value(&key("live_window"), r.live_window, DEFAULT_LIVE_WINDOW)?,
        )?;
        let live_window = match r.send_order.as_deref() {
            None | Some("live_first") => Some(live_window),
            Some("oldest_first") => None,
            Some(other) => {
                return Err(invalid(
                    key("send_order"),
                    format!("invalid value {other:?} (use \"live_first\" or \"oldest_first\")"),
                ))
            }
        };
        let batch_wait = r
            .batch_wait
            .map(|v| duration_value(&key("batch_wait"), Some(v), Duration::ZERO))
            .transpose()?;
        if batch_wait.is_some_and(|w| w > MAX_BATCH_WAIT) {
            return Err(invalid(key("batch_wait"), "must be at most 10m"));
        }
        let batch_size = size_value(&key("batch_size"), r.batch_size, DEFAULT_BATCH_SIZE)?;
        if batch_size < MIN_BATCH_SIZE {
            return Err(invalid(
                key("batch_size"),
                format!("{batch_size} bytes is less than the minimum, 1kB"),
            ));
        }
        if batch_size > max_queue_size {
            return Err(invalid(
                key("batch_size"),
                format!("{batch_size} bytes is more than max_queue_size ({max_queue_size} bytes)"),
            ));
        }
        let gzip_level = match r.gzip_level {
            None => DEFAULT_GZIP_LEVEL,
            Some(level @ 0..=9) => level as u32,
            Some(level) => {
                return Err(invalid(
                    key("gzip_level"),
                    format!("{level} is not a level from 0 to 9"),
                ))
            }
        };
        let priority = match r.priority {
            None => DEFAULT_PRIORITY,
            Some(p @ 1..=9) => p as u8,
            Some(p) => {
                return Err(invalid(
                    key("priority"),
                    format!("{p} is not a priority from 1 to 9"),
                ))
            }
        };
        let globs = |field: &str, list: Option<Vec<String>>| -> Result<Vec<String>, ConfigError> {
            let list = list.unwrap_or_default();
            if let Some(bad) = list.iter().find(|g| g.is_empty()) {
                return Err(invalid(
                    key(field),
                    format!("{bad:?}: a pattern must not be empty"),
                ));
            }
            Ok(list)
        };
        let include_measurements = globs("include_measurements", r.include_measurements)?;
        let exclude_measurements = globs("exclude_measurements", r.exclude_measurements)?;
        let add_tags = r.add_tags.unwrap_or_default();
        for (k, v) in &add_tags {
            if k.is_empty() || v.is_empty() {
                return Err(invalid(
                    key("add_tags"),
                    format!("{k:?} = {v:?}: tag keys and values must not be empty"),
                ));
            }
            if k.chars().chain(v.chars()).any(|c| c.is_control()) {
                return Err(invalid(
                    key("add_tags"),
                    format!("{k:?}: control characters are not allowed in tags"),
                ));
            }
            if k == "_measurement" || k == "_field" || k == "time" {
                return Err(invalid(
                    key("add_tags"),
                    format!("{k:?} is a reserved key in InfluxDB"),
                ));
            }
        }
        let downsample = match r.downsample {
            None => None,
            Some(d) => {
                let every =
                    duration_value(&key("downsample.every"), Some(d.every), Duration::ZERO)?;
                if every < Duration::from_secs(1) || every.subsec_nanos() != 0 {
                    return Err(invalid(
                        key("downsample.every"),
                        "must be a whole number of seconds, at least 1s",
                    ));
                }
                let allowed_lateness = duration_value(
                    &key("downsample.allowed_lateness"),
                    d.allowed_lateness,
                    DEFAULT_ALLOWED_LATENESS,
                )?;
                let mut fields = BTreeMap::new();
                for (field, agg) in d.fields.unwrap_or_default() {
                    let Some(a) = Aggregate::parse(&agg) else {
                        return Err(invalid(
                            key(&format!("downsample.fields.{field}")),
                            format!("{agg:?} is not an aggregate (use mean, last, max, min, sum or count)"),
                        ));
                    };
                    fields.insert(field, a);
                }
                Some(Downsample {
                    every,
                    allowed_lateness,
                    fields,
                })
            }
        };
        Ok(Replication {
            name: r.name,
            remote: r.remote,
            local_bucket,
            remote_bucket,
            max_queue_size,
            max_age,
            when_full,
            drop_non_retryable_data: r.drop_non_retryable_data.unwrap_or(false),
            batch_size,
            gzip_level,
            priority,
            live_window,
            batch_wait,
            include_measurements,
            exclude_measurements,
            add_tags,
            downsample,
        })
    }

    /// A `"*"` replication and a named one that send the same bucket to the same place
    /// double the traffic; allowed (replays overwrite), but worth a line in the log.
    fn overlap_warnings(&mut self, replications: &[Replication]) {
        for all in replications.iter().filter(|r| r.local_bucket == "*") {
            for one in replications.iter().filter(|r| r.local_bucket != "*") {
                if one.remote == all.remote
                    && target(one, &one.local_bucket) == target(all, &one.local_bucket)
                {
                    self.warnings.push(format!(
                        "replication \"{}\" and replication \"{}\" both send bucket {:?} to remote \"{}\"",
                        all.name, one.name, one.local_bucket, one.remote
                    ));
                }
            }
        }
    }
}

/// The remote bucket `r` writes a line of local `bucket` to.
fn target<'a>(r: &'a Replication, bucket: &'a str) -> &'a str {
    r.remote_bucket.as_deref().unwrap_or(bucket)
}
