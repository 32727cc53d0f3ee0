//! Ingest: turns a write (from the HTTP API or a tailed source) into queued
//! lines. Validation and timestamp normalisation happen here; routing picks
//! every replication that takes the write's local bucket; one queue append
//! commits the lines for all of them at once.

pub mod auth;
pub mod body;
pub mod budget;
pub mod conns;
pub mod http;

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{BrowserGuard, Replication, Secret};
use crate::lineproto::{self, Precision, Summary};
use crate::queue::{self, Preparing, Queue, QueueError, ReplHandle, Segment, Write};
use crate::ship::link::Link;
use crate::status::{IngestStats, ReplStatus, SourceStatus};
use crate::sync::RwLocked;

/// Bodies above this size are validated on a blocking thread so one large
/// write does not stall the runtime's other connections.
const INLINE_VALIDATION_LIMIT: usize = 256 << 10;

/// How a write is compressed before it is queued.
#[derive(Debug, Clone, Copy)]
pub struct Deflate {
    pub level: u32,
    /// Bytes of lines per segment, at most.
    pub chunk: usize,
    /// Some replication transforms the lines, so they are queued too.
    pub lines_needed: bool,
}

/// Writes of at least this many bytes of lines are compressed when queued.
/// Smaller ones are queued as lines and compressed together when shipped: a
/// segment of a few lines would compress poorly.
pub const DEFLATE_MIN: usize = 32 << 10;

/// A replication as the router sees it.
pub struct Route {
    pub config: Replication,
    pub handle: Arc<ReplHandle>,
    /// Its remote speaks the v1 API (InfluxDB 1.x), which has no unsigned
    /// integers.
    pub v1: bool,
    /// Where its lines go (a write URL), told to clients that ask this
    /// write-only agent a query.
    pub destination: String,
}

/// The part of the config a write is checked and routed against; replaced
/// as a whole when the config is reloaded.
pub struct Routing {
    pub routes: Vec<Route>,
    pub statuses: Vec<Arc<ReplStatus>>,
    pub tokens: Vec<Secret>,
    /// `listen.allowed_hosts`, `listen.allowed_origins`, `listen.metrics_open`.
    pub browsers: BrowserGuard,
    pub max_body_size: u64,
    /// `listen.max_request_memory`: the limit of [`Ingest::memory`].
    pub max_request_memory: u64,
    /// `listen.header_timeout` and `listen.body_timeout`.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

/// Everything a write needs; shared by all connections.
pub struct Ingest {
    pub queue: Arc<Queue>,
    routing: RwLock<Arc<Routing>>,
    pub stats: IngestStats,
    /// The uplink's cap and budgets, for status and metrics.
    pub link: Arc<Link>,
    /// Statuses of the running `[[tail]]` and `[[influxdb_wal]]` sources.
    sources: RwLock<Vec<Arc<SourceStatus>>>,
    /// When the agent started, for `GET /ready`: the wall-clock time it
    /// reports and the monotonic instant its uptime is counted from.
    pub started: (SystemTime, Instant),
    /// Memory held by API requests in progress (see [`budget`]).
    pub memory: Arc<budget::Budget>,
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

/// The wall time lines without a timestamp are given (see [`crate::clock`]).
pub fn now_ns() -> i64 {
    crate::clock::wall_ns()
}

/// Where a write goes: the local bucket its lines are queued as, and for a
/// v1 write with a retention policy, the database whose replications take
/// it when none takes `db/rp` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub bucket: String,
    fallback: Option<String>,
}

impl Destination {
    /// A write to local bucket `bucket` (v2 API, sources).
    pub fn bucket(bucket: &str) -> Destination {
        Destination {
            bucket: bucket.to_string(),
            fallback: None,
        }
    }

    /// A v1 write to database `db` and retention policy `rp` (may be empty).
    /// Its lines are queued as `db/rp` when a retention policy is named, so
    /// that the database and the retention policy travel with them: a
    /// replication of every bucket (`*`) sends them to `db` and `rp` at a v1
    /// remote and to bucket `db/rp` at a v2 one. A replication of `db/rp`
    /// takes them if there is one, else a replication of `db`, which sends
    /// them where it sends everything.
    pub fn v1(db: &str, rp: &str) -> Destination {
        if rp.is_empty() {
            return Destination::bucket(db);
        }
        Destination {
            bucket: format!("{db}/{rp}"),
            fallback: Some(db.to_string()),
        }
    }
}

impl Routing {
    /// Replications that take a write to `dest`.
    fn taking<'a>(&'a self, dest: &'a Destination) -> impl Iterator<Item = &'a Route> + Clone {
        let named = |b: &str| {
            self.routes
                .iter()
                .any(|r| r.config.local_bucket != "*" && r.config.local_bucket == b)
        };
        let bucket = match &dest.fallback {
            Some(db) if !named(&dest.bucket) => db.as_str(),
            _ => dest.bucket.as_str(),
        };
        self.routes
            .iter()
            .filter(move |r| r.config.takes_bucket(bucket))
    }

    /// Replications that take a write to `dest`.
    pub fn targets(&self, dest: &Destination) -> Vec<Arc<ReplHandle>> {
        self.taking(dest).map(|r| r.handle.clone()).collect()
    }

    /// How writes to `dest` are compressed when queued: the segment size
    /// and gzip level (at most [`crate::ship::reencode::INGEST_LEVEL`]) of
    /// the first replication taking them unchanged (without filters, tags
    /// or downsampling), if any.
    pub fn deflate(&self, dest: &Destination) -> Option<Deflate> {
        let mut taking = self.taking(dest);
        let plain = taking.clone().find(|r| !r.config.transforms())?;
        let batch = plain.config.batch_size as usize;
        Some(Deflate {
            // A low level: compression is most of the write path's CPU,
            // and the shipper compresses again where the link is slow.
            level: plain
                .config
                .gzip_level
                .min(crate::ship::reencode::INGEST_LEVEL),
            // A quarter of a batch: batches fill to at least 3/4.
            chunk: (batch / 4).max(DEFLATE_MIN).min(batch.max(1)),
            lines_needed: taking.any(|r| r.config.transforms()),
        })
    }

    /// The status of replication `name`.
    pub fn status(&self, name: &str) -> Option<&Arc<ReplStatus>> {
        self.statuses.iter().find(|s| s.name == name)
    }
}

impl Ingest {
    pub fn new(queue: Arc<Queue>, routing: Routing, link: Arc<Link>) -> Ingest {
        Ingest {
            queue,
            link,
            routing: RwLock::new(Arc::new(routing)),
            stats: IngestStats::default(),
            sources: RwLock::new(Vec::new()),
            started: (SystemTime::now(), Instant::now()),
            memory: budget::Budget::new(),
        }
    }

    /// The routing in force now.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read_locked().clone()
    }

    /// The running sources, for status and metrics.
    pub fn sources(&self) -> Vec<Arc<SourceStatus>> {
        self.sources.read_locked().clone()
    }

    /// Publishes the sources now running.
    pub fn set_sources(&self, sources: Vec<Arc<SourceStatus>>) {
        *self.sources.write_locked() = sources;
    }

    /// Replaces the routing (config reload); writes in progress finish with the old one.
    pub fn set_routing(&self, routing: Routing) {
        *self.routing.write_locked() = Arc::new(routing);
    }

    /// Validates `body`, stamps and normalises it, and queues the valid
    /// lines for every replication taking `bucket`. Returns the lines queued.
    /// `preparing` (see [`Queue::preparing`]) is released as soon as the
    /// lines are handed to the queue writer, before the commit is awaited.
    pub async fn write(
        &self,
        dest: &Destination,
        precision: Precision,
        body: bytes::Bytes,
        preparing: Option<Preparing<'_>>,
    ) -> Result<u64, WriteError> {
        let bucket = dest.bucket.as_str();
        let routing = self.routing();
        let targets = routing.targets(dest);
        if targets.is_empty() {
            return Err(WriteError::NoRoute(bucket.to_string()));
        }
        let deflate = routing.deflate(dest);
        // Only InfluxDB 1.x remotes take these lines, and they have no
        // unsigned type: the writer hears of such a value now, as it would
        // from InfluxDB 1.x itself, instead of the remote refusing it later.
        let refuse_unsigned = routing.taking(dest).all(|r| r.v1);
        drop(routing);
        let now = now_ns();
        let (payload, summary, segments) =
            if body.len() > INLINE_VALIDATION_LIMIT || body.len() >= DEFLATE_MIN {
                tokio::task::spawn_blocking(move || {
                    prepare(body, precision, now, refuse_unsigned, deflate)
                })
                .await
                .map_err(|e| QueueError::storage_from(format!("validation task failed: {e}"), e))?
            } else {
                prepare(body, precision, now, refuse_unsigned, None)
            };
        let received = segments.as_ref().map_or(payload.len() as u64, |s| {
            s.iter().map(|s| s.deflated.len as u64).sum()
        });
        self.stats
            .bytes_received
            .fetch_add(received, Ordering::Relaxed);
        self.stats
            .lines_invalid
            .fetch_add(summary.error_count, Ordering::Relaxed);
        let anchor = crate::clock::on_write(now, summary.stamped, summary.earliest);
        let lines = summary.lines;
        if lines > 0 {
            let w = Write {
                targets,
                bucket: bucket.to_string(),
                payload,
                lines,
                checkpoint: None,
                clock: anchor,
            };
            let committed = self.queue.write_deflated(w, segments);
            drop(preparing);
            // Awaited and counted in a task of its own: a client that hangs
            // up drops this future, but the lines are committed all the same
            // and the counter must say so.
            let written = self.stats.lines_written.clone();
            tokio::spawn(async move {
                let result = committed.await.unwrap_or(Err(QueueError::Closed));
                if result.is_ok() {
                    written.fetch_add(lines, Ordering::Relaxed);
                }
                result
            })
            .await
            .unwrap_or(Err(QueueError::Closed))?;
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

/// Validates and normalises a body; with `deflate` (level, segment size),
/// also compresses the lines once, here, where writes are handled in
/// parallel, instead of in the single shipping worker at every send. When
/// only the compressed segments are queued, each is made as soon as its
/// lines are, so the body's normalised copy is never held whole beside it:
/// under concurrent writes that was a second copy of every body.
fn prepare(
    body: bytes::Bytes,
    precision: Precision,
    now: i64,
    refuse_unsigned: bool,
    deflate: Option<Deflate>,
) -> (Vec<u8>, Summary, Option<Vec<Segment>>) {
    // Only segments are queued, each at least a write worth compressing:
    // they are made as the lines are. Otherwise (nothing to compress, a
    // replication that transforms the lines and needs them whole too, or a
    // tiny `batch_size`) the lines are made whole first.
    let Some(d) = deflate.filter(|d| !d.lines_needed && d.chunk >= DEFLATE_MIN) else {
        // Normalised lines grow by at most a timestamp each; most already have one.
        let mut out = Vec::with_capacity(body.len() + body.len() / 8 + 32);
        let summary = lineproto::normalize_with(&body, precision, now, refuse_unsigned, &mut out);
        // The body is not needed past here: free it before compressing.
        drop(body);
        let Some(d) = deflate.filter(|_| out.len() >= DEFLATE_MIN) else {
            return (out, summary, None);
        };
        let segments = queue::deflate_lines(&out, d.chunk, d.level);
        if !d.lines_needed {
            // Only the segments are queued: free the lines before the commit.
            out = Vec::new();
        }
        return (out, summary, Some(segments));
    };
    let (mut out, mut segments) = (Vec::new(), Vec::new());
    let summary = lineproto::normalize_chunked(
        &body,
        precision,
        now,
        refuse_unsigned,
        &mut out,
        d.chunk,
        |run| segments.push(queue::deflate_segment(run, d.level)),
    );
    drop(body);
    // Nothing went out as a segment (one goes only once the lines made pass
    // `d.chunk`, at least DEFLATE_MIN): `out` holds all the lines, and a
    // write too small to be worth compressing is queued as lines.
    if segments.is_empty() && out.len() < DEFLATE_MIN {
        return (out, summary, None);
    }
    if !out.is_empty() {
        segments.push(queue::deflate_segment(&out, d.level));
    }
    (Vec::new(), summary, Some(segments))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const NOW: i64 = 1_700_000_000_000_000_000;

    /// A body of `n` points of every kind a writer sends: timestamped and
    /// not, strings holding newlines, blank and comment lines, invalid
    /// lines, and now and then one point longer than a segment.
    fn body(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.max(1);
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut b = Vec::new();
        for i in 0..n {
            let line = match next() % 10 {
                0 => format!("cpu,host=h{i} v={i}i"),
                1 => format!("log,app=a msg=\"first\nsecond {i}\" {}", NOW + i as i64),
                2 => String::new(),
                3 => "# a comment".to_string(),
                4 => format!("bad line {i}"),
                5 if next() % 50 == 0 => {
                    format!("big,k=v s=\"{}\" {}", "x".repeat(40_000), NOW + i as i64)
                }
                _ => format!(
                    "m,host=gw{},site=s{} v={},n={}i {}",
                    next() % 7,
                    next() % 3,
                    next() % 1000,
                    i,
                    NOW + i as i64
                ),
            };
            b.extend_from_slice(line.as_bytes());
            b.push(b'\n');
        }
        b
    }

    /// The lines made whole, then cut and compressed: what `prepare` did
    /// before it compressed as it went.
    fn whole(b: &[u8], d: Deflate) -> (Summary, Option<Vec<Segment>>) {
        let mut out = Vec::new();
        let summary = lineproto::normalize_with(b, Precision::Nanoseconds, NOW, false, &mut out);
        let segments =
            (out.len() >= DEFLATE_MIN).then(|| queue::deflate_lines(&out, d.chunk, d.level));
        (summary, segments)
    }

    #[test]
    fn segments_made_as_lines_are_made_are_those_of_the_whole_lines() {
        for (seed, n, chunk) in [
            (1, 20, DEFLATE_MIN),
            (2, 600, DEFLATE_MIN),
            (3, 3_000, DEFLATE_MIN),
            (4, 3_000, 125_000),
            (5, 20_000, 125_000),
            (6, 9_000, 40_000),
        ] {
            let b = body(seed, n);
            let d = Deflate {
                level: 2,
                chunk,
                lines_needed: false,
            };
            let (summary, segments) = whole(&b, d);
            let (payload, got, got_segments) = prepare(
                Bytes::from(b.clone()),
                Precision::Nanoseconds,
                NOW,
                false,
                Some(d),
            );
            assert_eq!(got, summary, "seed {seed}");
            assert!(
                summary.error_count > 0 || n < 50,
                "seed {seed}: the body has bad lines"
            );
            match (segments, got_segments) {
                (None, None) => {
                    let mut out = Vec::new();
                    lineproto::normalize(&b, Precision::Nanoseconds, NOW, &mut out);
                    assert_eq!(
                        payload, out,
                        "seed {seed}: a small write is queued as lines"
                    );
                }
                (Some(want), Some(got)) => {
                    assert!(payload.is_empty(), "seed {seed}: only segments are queued");
                    assert!(want.len() > 1 || n < 1000, "seed {seed}: several segments");
                    assert_eq!(got.len(), want.len(), "seed {seed}");
                    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(g.lines, w.lines, "seed {seed} segment {k}");
                        assert_eq!(g.deflated, w.deflated, "seed {seed} segment {k}");
                        assert_eq!(g.data, w.data, "seed {seed} segment {k}");
                    }
                }
                (w, g) => panic!(
                    "seed {seed}: segments {:?} against {:?}",
                    w.map(|s| s.len()),
                    g.map(|s| s.len())
                ),
            }
        }
    }

    #[test]
    fn lines_a_transform_needs_are_queued_whole_beside_their_segments() {
        let b = body(7, 3_000);
        let d = Deflate {
            level: 2,
            chunk: DEFLATE_MIN,
            lines_needed: true,
        };
        let mut out = Vec::new();
        lineproto::normalize(&b, Precision::Nanoseconds, NOW, &mut out);
        let (payload, _, segments) =
            prepare(Bytes::from(b), Precision::Nanoseconds, NOW, false, Some(d));
        assert_eq!(payload, out);
        let segments = segments.expect("compressed too");
        let lines: u32 = segments.iter().map(|s| s.lines).sum();
        assert_eq!(lines as usize, lineproto::count_points(&out));
    }
}
