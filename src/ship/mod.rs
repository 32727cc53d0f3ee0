//! Shipping: one worker thread per replication reads a batch of whole lines
//! from the head of its queue, gzips it once, POSTs it to the remote, and
//! settles it in the queue only after the remote answered 2xx.
//!
//! Every other answer leaves the batch queued and is retried: with
//! exponential backoff and full jitter for server and transport errors,
//! after `Retry-After` for 429/503, and slowly ("paused") for answers that
//! say our token or bucket is wrong. The worker sleeps on a signal so that
//! shutdown and config reloads interrupt any wait at once.

pub mod backoff;
pub mod client;

use std::io::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, SystemTime};

use flate2::write::GzEncoder;
use flate2::Compression;
use log::{debug, error, info, warn};

use crate::queue::{Batch, Pos, Queue, QueueError, ReplHandle, Settlement, Shipment, Signal};
use crate::status::{ReplStatus, State};
pub use client::{Answer, Client};

/// What to do after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: settle the batch.
    Delivered,
    /// 429, 503: wait as the remote asked (or back off).
    Throttled,
    /// 408, other 5xx, no answer: back off and retry.
    Retry,
    /// 413: the body is too large for the remote.
    TooLarge,
    /// 400, 422: the remote refuses some of the data.
    Refused,
    /// 401, 403, 404: credentials or bucket wrong; pause.
    Unauthorized,
}

/// Classifies an answer (the table of the design's "Shipping" section).
pub fn classify(answer: &Answer) -> Verdict {
    match answer {
        Answer::Transport(_) => Verdict::Retry,
        Answer::Status { code, .. } => match *code {
            200..=299 => Verdict::Delivered,
            429 | 503 => Verdict::Throttled,
            413 => Verdict::TooLarge,
            400 | 422 => Verdict::Refused,
            401 | 403 | 404 => Verdict::Unauthorized,
            _ => Verdict::Retry,
        },
    }
}

/// Stop flag, wake-up signal and liveness beat shared by the agent and a worker.
#[derive(Debug, Default)]
pub struct Control {
    stop: AtomicBool,
    pub wake: Signal,
    /// Seconds since the Unix epoch when the worker last made progress or
    /// started a bounded wait; a watchdog compares it with the clock.
    beat: AtomicU64,
}

impl Control {
    /// Records that the worker is alive.
    pub fn beat(&self) {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.beat.store(now, Ordering::Relaxed);
    }

    /// When the worker last beat (Unix seconds; 0 before it started).
    pub fn last_beat(&self) -> u64 {
        self.beat.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify();
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// Per-replication shipping settings.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    pub batch_size: usize,
    pub gzip_level: u32,
    /// Fixed remote bucket; `None` sends each batch to its local bucket's name.
    pub remote_bucket: Option<String>,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub drop_non_retryable_data: bool,
}

/// Where and how a worker ships; replaced as a whole on a config reload.
pub struct Target {
    pub client: Client,
    pub config: ShipConfig,
}

/// A worker's current [`Target`], swappable while it runs.
pub type SharedTarget = Arc<RwLock<Arc<Target>>>;

pub struct Worker {
    pub queue: Arc<Queue>,
    pub repl: Arc<ReplHandle>,
    pub status: Arc<ReplStatus>,
    pub target: SharedTarget,
    pub control: Arc<Control>,
}

/// A settlement sent to the queue and not yet confirmed durable.
struct Settling {
    /// Where the settled batch ends: the next batch starts there.
    to: Pos,
    reply: tokio::sync::oneshot::Receiver<Result<(), QueueError>>,
}

/// Why a batch was not settled.
enum Unsettled {
    /// The worker was told to stop.
    Stopped,
    /// Eviction or expiry removed lines of the batch while it waited for a
    /// retry: read it again rather than deliver lines already counted as dropped.
    Stale,
}

impl Worker {
    pub fn spawn(self) -> std::io::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name(format!("ship-{}", self.repl.name))
            .spawn(move || self.run())
    }

    fn target(&self) -> Arc<Target> {
        self.target.read().unwrap().clone()
    }

    fn run(self) {
        let name = &self.repl.name;
        let mut shipment = Shipment::default();
        let mut lines = Vec::new();
        // The batch delivered last, while the queue commits its settlement:
        // the next batch is read from its end and shipped meanwhile.
        let mut settling: Option<Settling> = None;
        debug!("replication \"{name}\": worker started");
        while !self.control.stopped() {
            self.control.beat();
            let seen = self.repl.data.generation();
            let t = self.target();
            let split = t.config.remote_bucket.is_none();
            let from = settling.as_ref().map(|s| s.to);
            let read = self.queue.read_shipment(
                &self.repl,
                from,
                t.config.batch_size,
                split,
                &mut shipment,
            );
            let batch = match read {
                Ok(Some(b)) => b,
                Ok(None) if settling.is_some() => {
                    // Nothing past the batch in flight: wait for its
                    // settlement, then look again.
                    if let Err(QueueError::Closed) = self.confirm(&mut settling) {
                        break;
                    }
                    continue;
                }
                Ok(None) => {
                    self.status.ship.lock().unwrap().next_retry = None;
                    self.repl.data.wait_past(seen, Duration::from_secs(1));
                    continue;
                }
                Err(QueueError::Corrupt { seq, why, .. }) => {
                    let _ = self.confirm(&mut settling);
                    error!(
                        "replication \"{name}\": entry {seq} is corrupt ({why}); setting it aside"
                    );
                    if let Err(e) = self.queue.set_aside(&self.repl, seq) {
                        error!("replication \"{name}\": cannot set entry {seq} aside: {e}");
                        self.sleep(Duration::from_secs(1));
                    }
                    continue;
                }
                Err(e) => {
                    error!("replication \"{name}\": cannot read the queue: {e}");
                    self.sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let settlement = match self.deliver(&batch, &shipment, &mut lines) {
                Ok(s) => s,
                Err(Unsettled::Stale) => continue,
                Err(Unsettled::Stopped) => break,
            };
            match self.confirm(&mut settling) {
                Ok(()) => {}
                Err(QueueError::Closed) => break,
                // This batch followed one that could not be settled: both
                // are read and sent again (the remote overwrites).
                Err(_) => continue,
            }
            settling = Some(Settling {
                to: batch.to,
                reply: self.queue.settle_async(&self.repl, &batch, settlement),
            });
        }
        let _ = self.confirm(&mut settling);
        debug!("replication \"{name}\": worker stopped");
    }

    /// Waits until the settlement in flight (if any) is durable.
    fn confirm(&self, settling: &mut Option<Settling>) -> Result<(), QueueError> {
        let Some(s) = settling.take() else {
            return Ok(());
        };
        let r = s.reply.blocking_recv().unwrap_or(Err(QueueError::Closed));
        if let Err(e) = &r {
            // Delivered but not settled: the batch is sent again later,
            // which the remote treats as an overwrite.
            error!(
                "replication \"{}\": cannot settle a delivered batch: {e}",
                self.repl.name
            );
            if !matches!(e, QueueError::Closed) {
                self.sleep(Duration::from_secs(1));
            }
        }
        r
    }

    /// Sends the batch until every line is delivered or refused for good.
    /// The first attempt sends the batch as stored, as one gzip member (lines
    /// compressed when queued are not compressed again). A 413 splits the
    /// failing part in halves; a 400/422 bisects it until the refused lines
    /// stand alone (resending good lines is harmless: they overwrite).
    /// Anything else is retried after a wait.
    fn deliver(
        &self,
        batch: &Batch,
        shipment: &Shipment,
        lines: &mut Vec<u8>,
    ) -> Result<Settlement, Unsettled> {
        let mut settlement = Settlement {
            bucket: batch.bucket.clone(),
            ..Settlement::default()
        };
        let whole = 0..batch.bytes as usize;
        // The batch's lines, inflated only when a part must be cut out.
        let mut have_lines = false;
        // Parts still to send, the next one last.
        let mut pending: Vec<Range<usize>> = Vec::with_capacity(16);
        pending.push(whole.clone());
        let mut body: Option<(Range<usize>, u32, Vec<u8>)> = None;
        let mut attempt: u32 = 0;
        while let Some(part) = pending.last().cloned() {
            if self.control.stopped() {
                return Err(Unsettled::Stopped);
            }
            if self.repl.counters().head > batch.from {
                debug!("replication \"{}\": lines of the batch in hand were evicted or expired; reading again", self.repl.name);
                return Err(Unsettled::Stale);
            }
            self.control.beat();
            let t = self.target();
            let level = t.config.gzip_level;
            // Compress each part once, not once per retry.
            if !matches!(&body, Some((r, l, _)) if *r == part && *l == level) {
                let reuse = body.take().map(|(_, _, b)| b).unwrap_or_default();
                let gz = if part == whole {
                    shipment.gzip(level, reuse)
                } else {
                    self.inflated(shipment, lines, &mut have_lines)?;
                    gzip(&lines[part.clone()], level)
                };
                body = Some((part.clone(), level, gz));
            }
            let gz = &body.as_ref().expect("set above").2;
            let bucket = t.config.remote_bucket.as_deref().unwrap_or(&batch.bucket);
            let answer = t.client.post(&t.client.write_url(bucket), gz);
            let verdict = classify(&answer);
            match verdict {
                Verdict::Delivered => {
                    pending.pop();
                    attempt = 0;
                    self.record_success(gz.len());
                }
                Verdict::TooLarge | Verdict::Refused => {
                    pending.pop();
                    self.record_answer(&answer, State::Running, None);
                    self.inflated(shipment, lines, &mut have_lines)?;
                    let slice = &lines[part.clone()];
                    let n = crate::lineproto::count_points(slice);
                    if n > 1 {
                        let mid = split_point(slice);
                        debug!(
                            "replication \"{}\": {}; splitting {n} lines",
                            self.repl.name,
                            message(&answer)
                        );
                        pending.push(part.start + mid..part.end);
                        pending.push(part.start..part.start + mid);
                    } else {
                        self.refuse(&mut settlement, slice, verdict, &answer, &t.config);
                    }
                }
                Verdict::Throttled | Verdict::Retry | Verdict::Unauthorized => {
                    attempt = attempt.saturating_add(1);
                    let wait = wait_for(&t.config, verdict, &answer, attempt);
                    let state = if verdict == Verdict::Unauthorized {
                        State::Paused
                    } else {
                        State::Backoff
                    };
                    self.record_answer(&answer, state, Some((wait, batch.lines)));
                    self.sleep(wait);
                }
            }
        }
        Ok(settlement)
    }

    /// Puts the batch's lines in `lines` (once).
    fn inflated(
        &self,
        shipment: &Shipment,
        lines: &mut Vec<u8>,
        done: &mut bool,
    ) -> Result<(), Unsettled> {
        if *done {
            return Ok(());
        }
        lines.clear();
        if let Err(why) = shipment.lines_into(lines) {
            // Checksummed when read, so this is not damage on disk; try
            // again later rather than send or drop what cannot be read.
            error!(
                "replication \"{}\": cannot read back a compressed batch: {why}",
                self.repl.name
            );
            self.sleep(Duration::from_secs(1));
            return Err(Unsettled::Stale);
        }
        *done = true;
        Ok(())
    }

    /// A single line the remote refused for good: dead letter, or dropped.
    fn refuse(
        &self,
        s: &mut Settlement,
        line: &[u8],
        verdict: Verdict,
        answer: &Answer,
        config: &ShipConfig,
    ) {
        let why = message(answer);
        let excerpt = String::from_utf8_lossy(&line[..line.len().min(200)]);
        // A string value's newlines would split the log record.
        let excerpt = excerpt.trim_end().replace('\n', "\\n");
        if verdict == Verdict::Refused && config.drop_non_retryable_data {
            s.dropped_lines += 1;
            warn!(
                "replication \"{}\": remote refused a line ({why}); dropped: {excerpt}",
                self.repl.name
            );
        } else {
            s.dead_lines += 1;
            s.dead_letter.extend_from_slice(line);
            if s.reason.is_empty() {
                s.reason = why.clone();
            }
            warn!(
                "replication \"{}\": remote refused a line ({why}); moved to the dead-letter store: {excerpt}",
                self.repl.name
            );
        }
    }

    fn record_success(&self, sent_bytes: usize) {
        let mut s = self.status.ship.lock().unwrap();
        if s.state != State::Running {
            info!(
                "replication \"{}\": remote accepts writes again",
                self.repl.name
            );
        }
        s.state = State::Running;
        s.latest_code = Some(204);
        s.latest_error.clear();
        s.next_retry = None;
        s.bytes_sent += sent_bytes as u64;
        s.batches_sent += 1;
    }

    /// Records a failed attempt; `retry` is the wait before the next one and
    /// the lines waiting, when the batch is retried as a whole.
    fn record_answer(&self, answer: &Answer, state: State, retry: Option<(Duration, u64)>) {
        let (code, text) = match answer {
            Answer::Status { code, message, .. } => (Some(*code), message.clone()),
            Answer::Transport(m) => (None, m.clone()),
        };
        let mut s = self.status.ship.lock().unwrap();
        let changed = s.latest_error != text || s.state != state;
        *s.errors
            .entry(code.map_or("transport".into(), |c| c.to_string()))
            .or_default() += 1;
        s.latest_code = code;
        s.latest_error = text.clone();
        s.state = state;
        s.next_retry = retry.map(|(wait, _)| SystemTime::now() + wait);
        drop(s);
        // Log once per change of cause, not once per attempt.
        if let (true, Some((wait, lines))) = (changed, retry) {
            warn!(
                "replication \"{}\": {text} ({lines} lines waiting in this batch); {} in {:.1}s",
                self.repl.name,
                if state == State::Paused {
                    "paused, retrying"
                } else {
                    "retrying"
                },
                wait.as_secs_f64()
            );
        }
    }

    /// Sleeps up to `d`; a stop or a reload wakes it early.
    fn sleep(&self, d: Duration) {
        self.control.beat();
        let seen = self.control.wake.generation();
        if !self.control.stopped() {
            self.control.wake.wait_past(seen, d);
        }
    }
}

/// How long to wait before retrying after `verdict`.
pub fn wait_for(c: &ShipConfig, verdict: Verdict, answer: &Answer, attempt: u32) -> Duration {
    let jittered = backoff::delay(attempt, c.min_backoff, c.max_backoff, rand::random::<f64>());
    match (verdict, answer) {
        (
            Verdict::Throttled,
            Answer::Status {
                retry_after: Some(v),
                ..
            },
        ) => backoff::retry_after(v, SystemTime::now(), c.max_backoff)
            // Never sooner than min_backoff: "0" or a date already past (a
            // gateway clock ahead of the server's) must not become a busy loop.
            .map_or(jittered, |d| d.max(c.min_backoff)),
        // Credentials or bucket wrong: nothing changes until someone fixes
        // the config, so retry at the slowest pace (a reload wakes us).
        (Verdict::Unauthorized, _) => c.max_backoff,
        _ => jittered,
    }
}

fn message(answer: &Answer) -> String {
    match answer {
        Answer::Status { message, .. } => message.clone(),
        Answer::Transport(m) => m.clone(),
    }
}

/// Where to cut whole points (each ending in '\n') into two non-empty halves:
/// the point boundary nearest before the middle, else the first after it.
/// Never inside a string value, even one that holds newlines.
fn split_point(lines: &[u8]) -> usize {
    let mid = lines.len() / 2;
    crate::lineproto::last_point_end(&lines[..mid])
        .or_else(|| crate::lineproto::point_end(lines).map(|i| i + 1))
        .unwrap_or(lines.len())
}

/// Compresses a batch into one gzip member.
pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        Compression::new(level),
    );
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Answer {
        Answer::Status {
            code,
            message: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn classification_table() {
        for (code, v) in [
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (429, Verdict::Throttled),
            (503, Verdict::Throttled),
            (408, Verdict::Retry),
            (500, Verdict::Retry),
            (502, Verdict::Retry),
            (413, Verdict::TooLarge),
            (400, Verdict::Refused),
            (422, Verdict::Refused),
            (401, Verdict::Unauthorized),
            (403, Verdict::Unauthorized),
            (404, Verdict::Unauthorized),
            (301, Verdict::Retry),
            (302, Verdict::Retry),
            (307, Verdict::Retry),
        ] {
            assert_eq!(classify(&status(code)), v, "status {code}");
        }
        assert_eq!(classify(&Answer::Transport("reset".into())), Verdict::Retry);
    }

    #[test]
    fn split_points_fall_between_lines() {
        assert_eq!(split_point(b"a\nb\n"), 2);
        assert_eq!(split_point(b"a\nb\nc\nd\n"), 4);
        assert_eq!(split_point(b"aaaaaaaaaa\nb\n"), 11);
        assert_eq!(split_point(b"a\nbbbbbbbbbbbb\n"), 2);
        // A string value holding newlines is one point: never cut inside it.
        assert_eq!(split_point(b"a s=\"1\n2\n3\n4\n5\" 1\nb f=1 2\n"), 18);
        assert_eq!(split_point(b"a f=1 1\nb s=\"1\n2\n3\n4\n5\" 2\n"), 8);
        assert_eq!(split_point(b"a s=\"\n\n\n\n\" 1\nb s=\"\n\n\n\n\" 2\n"), 13);
        for text in ["x\ny\n", "long line here\nz\n", "q\nlong line here\n"] {
            let p = split_point(text.as_bytes());
            assert!(
                p > 0 && p < text.len() && text.as_bytes()[p - 1] == b'\n',
                "{text:?} at {p}"
            );
        }
    }

    #[test]
    fn waits_follow_the_answer() {
        let c = ShipConfig {
            batch_size: 1000,
            gzip_level: 6,
            remote_bucket: None,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            drop_non_retryable_data: false,
        };
        let throttled = |v: &str| Answer::Status {
            code: 429,
            message: String::new(),
            retry_after: Some(v.into()),
        };
        assert_eq!(
            wait_for(&c, Verdict::Throttled, &throttled("7"), 1),
            Duration::from_secs(7)
        );
        assert_eq!(
            wait_for(&c, Verdict::Throttled, &throttled("7000"), 1),
            Duration::from_secs(60)
        );
        assert_eq!(
            wait_for(&c, Verdict::Throttled, &throttled("0"), 1),
            c.min_backoff
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(30));
        assert_eq!(
            wait_for(&c, Verdict::Throttled, &throttled(&past), 1),
            c.min_backoff
        );
        assert_eq!(
            wait_for(&c, Verdict::Unauthorized, &status(401), 1),
            Duration::from_secs(60)
        );
        for attempt in 1..20 {
            let d = wait_for(&c, Verdict::Retry, &status(500), attempt);
            assert!(d >= c.min_backoff && d <= c.max_backoff, "{d:?}");
        }
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let data = b"m f=1 1\n".repeat(1000);
        let gz = gzip(&data, 6);
        assert!(gz.len() < data.len() / 10);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }
}
