//! Ingest: turns a write (from the HTTP API or a tailed source) into queued
//! lines. Validation and timestamp normalisation happen here; routing picks
//! every replication that takes the write's local bucket; one queue append
//! commits the lines for all of them at once.

pub mod auth;
pub mod body;
pub mod http;

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Replication, Secret};
use crate::lineproto::{self, Precision, Summary};
use crate::queue::{Preparing, Queue, QueueError, ReplHandle};
use crate::status::{IngestStats, ReplStatus, SourceStatus};

/// Bodies above this size are validated on a blocking thread so one large
/// write does not stall the runtime's other connections.
const INLINE_VALIDATION_LIMIT: usize = 256 << 10;

/// A replication as the router sees it.
pub struct Route {
    pub config: Replication,
    pub handle: Arc<ReplHandle>,
}

/// The part of the config a write is checked and routed against; replaced
/// as a whole when the config is reloaded.
pub struct Routing {
    pub routes: Vec<Route>,
    pub statuses: Vec<Arc<ReplStatus>>,
    pub tokens: Vec<Secret>,
    pub max_body_size: u64,
    /// `listen.header_timeout` and `listen.body_timeout`.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

/// Everything a write needs; shared by all connections.
pub struct Ingest {
    pub queue: Arc<Queue>,
    routing: RwLock<Arc<Routing>>,
    pub stats: IngestStats,
    /// Statuses of the running `[[tail]]` and `[[influxdb_wal]]` sources.
    sources: RwLock<Vec<Arc<SourceStatus>>>,
}

/// Why a write was not (fully) taken.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("bucket \"{0}\" not found")]
    NoRoute(String),
    /// Some lines were invalid; the valid ones (if any) are queued.
    #[error("{message}")]
    Invalid { message: String, queued_lines: u64 },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Routing {
    /// Replications that take `bucket`.
    pub fn targets(&self, bucket: &str) -> Vec<Arc<ReplHandle>> {
        self.routes
            .iter()
            .filter(|r| r.config.takes_bucket(bucket))
            .map(|r| r.handle.clone())
            .collect()
    }

    /// The local bucket of a v1 write: `db/rp` when a replication takes it,
    /// else `db`.
    pub fn v1_bucket(&self, db: &str, rp: &str) -> String {
        if !rp.is_empty() {
            let full = format!("{db}/{rp}");
            if self.routes.iter().any(|r| r.config.local_bucket == full) {
                return full;
            }
        }
        db.to_string()
    }

    /// The status of replication `name`.
    pub fn status(&self, name: &str) -> Option<&Arc<ReplStatus>> {
        self.statuses.iter().find(|s| s.name == name)
    }
}

impl Ingest {
    pub fn new(queue: Arc<Queue>, routing: Routing) -> Ingest {
        Ingest {
            queue,
            routing: RwLock::new(Arc::new(routing)),
            stats: IngestStats::default(),
            sources: RwLock::new(Vec::new()),
        }
    }

    /// The routing in force now.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read().unwrap().clone()
    }

    /// The running sources, for status and metrics.
    pub fn sources(&self) -> Vec<Arc<SourceStatus>> {
        self.sources.read().unwrap().clone()
    }

    /// Publishes the sources now running.
    pub fn set_sources(&self, sources: Vec<Arc<SourceStatus>>) {
        *self.sources.write().unwrap() = sources;
    }

    /// Replaces the routing (config reload); writes in progress finish with the old one.
    pub fn set_routing(&self, routing: Routing) {
        *self.routing.write().unwrap() = Arc::new(routing);
    }

    /// Validates `body`, stamps and normalises it, and queues the valid
    /// lines for every replication taking `bucket`. Returns the lines queued.
    /// `preparing` (see [`Queue::preparing`]) is released as soon as the
    /// lines are handed to the queue writer, before the commit is awaited.
    pub async fn write(
        &self,
        bucket: &str,
        precision: Precision,
        body: bytes::Bytes,
        preparing: Option<Preparing<'_>>,
    ) -> Result<u64, WriteError> {
        let targets = self.routing().targets(bucket);
        if targets.is_empty() {
            return Err(WriteError::NoRoute(bucket.to_string()));
        }
        let now = now_ns();
        let (payload, summary) = if body.len() > INLINE_VALIDATION_LIMIT {
            tokio::task::spawn_blocking(move || validate(&body, precision, now))
                .await
                .map_err(|e| QueueError::Storage(format!("validation task failed: {e}")))?
        } else {
            validate(&body, precision, now)
        };
        self.stats
            .bytes_received
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        self.stats
            .lines_invalid
            .fetch_add(summary.error_count, Ordering::Relaxed);
        let lines = summary.lines;
        if lines > 0 {
            let committed = self
                .queue
                .append(targets, bucket.to_string(), payload, lines);
            drop(preparing);
            committed.await.unwrap_or(Err(QueueError::Closed))?;
            self.stats.lines_written.fetch_add(lines, Ordering::Relaxed);
        }
        if summary.error_count > 0 {
            let total = lines + summary.error_count;
            return Err(WriteError::Invalid {
                message: lineproto::describe_errors(&summary, total),
                queued_lines: lines,
            });
        }
        Ok(lines)
    }
}

fn validate(body: &[u8], precision: Precision, now: i64) -> (Vec<u8>, Summary) {
    // Normalised lines grow by at most a timestamp each; most already have one.
    let mut out = Vec::with_capacity(body.len() + body.len() / 8 + 32);
    let summary = lineproto::normalize(body, precision, now, &mut out);
    (out, summary)
}
