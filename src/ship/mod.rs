//! Shipping: one worker thread per replication reads a batch of whole lines
//! from the head of its queue, gzips it once, POSTs it to the remote, and
//! settles it in the queue only after the remote answered 2xx.
//!
//! Every other answer leaves the batch queued and is retried: with
//! exponential backoff and full jitter for server and transport errors,
//! after `Retry-After` for 429/503, and slowly ("paused") for answers that
//! say our token or bucket is wrong. The worker sleeps on a signal so that
//! shutdown and config reloads interrupt any wait at once.
//!
//! Where answers are slow to come back, the batches after the head batch go
//! at the same time on threads of their own, one attempt each, and settle
//! after it, in queue order ([`ahead`]).
//!
//! A replication that sends each bucket to its own name (`local_bucket =
//! "*"` without `remote_bucket`) has many destinations: an answer about one
//! of them (404 bucket or database not found, 403 on a bucket) holds only
//! that one ([`Queue::hold`] moves its lines to a lane of their own) and
//! the worker goes on with the others. Each held lane is tried again every
//! `max_backoff`, at once after a reload or an operator's release, one
//! batch at a time between the main log's batches; once a batch of it is
//! delivered, its lines flow again, in their order.
//!
//! A 400/422 sets lines aside only on evidence that they are at fault, read
//! from the answer by [`answer`]: the InfluxDB family names refused lines,
//! counts them, or says nothing usable (then the batch is bisected), and
//! some of its 400s are about the server (then the batch waits). Reading the
//! answer saves a bisection and the resending of lines already written,
//! which Cloud Serverless bills as data-in.

pub mod ahead;
pub mod answer;
pub mod backoff;
pub mod client;
pub mod link;
pub mod reencode;
pub mod transport;

use std::cell::Cell;
use std::collections::HashMap;
use std::io::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use flate2::write::GzEncoder;
use flate2::Compression;
use log::{debug, error, info, warn};

use crate::queue::{Batch, Pos, Queue, QueueError, ReplHandle, Settlement, Shipment, Signal};
use crate::status::{Link, ReplStatus, State};
use crate::sync::{Locked, RwLocked};
pub use client::{Answer, Client};

/// The gzip level of batches sent over a capped or budgeted link.
const THRIFTY_GZIP_LEVEL: u32 = 9;

/// How long a worker with an empty queue waits for a write before it looks
/// again anyway: looking every second was a third of an idle agent's CPU.
const IDLE_LOOK: Duration = Duration::from_secs(5);
/// `batch_wait` by default on a link with a cap or a data budget.
const METERED_BATCH_WAIT: Duration = Duration::from_secs(5);

/// Deliveries in a row after which a batch limit lowered by stalls doubles.
/// Growing after every delivery would send every other batch too large for
/// a link that carries only the smaller one, and each costs a stall.
const GROW_AFTER: u32 = 4;

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
    /// 400, 422: the remote refuses some of the data (the body may say
    /// which lines, or how many).
    Refused,
    /// 401, 403, 404: credentials or bucket wrong; pause.
    Unauthorized,
}

/// Classifies an answer (the README's "What happens on each remote answer"). A
/// 400 or 422 whose message puts the cause on the server (Core's `wal buffer
/// full`, a soft-deleted database, limits) is retried like a 5xx: the lines
/// are fine and must not be set aside for it.
pub fn classify(answer: &Answer) -> Verdict {
    match answer {
        Answer::Transport(_) => Verdict::Retry,
        Answer::Status { code, detail, .. } => match *code {
            200..=299 => Verdict::Delivered,
            429 | 503 => Verdict::Throttled,
            413 => Verdict::TooLarge,
            400 | 422 if detail.server_side => Verdict::Retry,
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
    pub probe_interval: Duration,
    pub drop_non_retryable_data: bool,
    /// 1 to 9, higher first, on a capped link or the last of a budget.
    pub priority: u8,
    /// Requests in flight at once when answers are slow (`max_in_flight`).
    pub max_in_flight: usize,
    /// `send_order = "live_first"`: lines queued this recently go ahead of
    /// an older backlog ([`Worker::send_live`]); `None`: oldest first.
    pub live_window: Option<Duration>,
    /// `batch_wait`, when set ([`Worker::batch_wait`] gives the default).
    pub batch_wait: Option<Duration>,
    /// The queue's bounds (`max_queue_size` when `drop_oldest` evicts,
    /// `max_age`): how far eviction and expiry are from the lines in flight.
    pub evict_above: Option<u64>,
    pub max_age: Option<Duration>,
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
    /// The uplink all workers share: its cap and budgets.
    pub link: Arc<link::Link>,
    /// Whether entries deflated when queued are compressed again.
    pub reencode: Cell<reencode::Reencode>,
    /// How long the last delivered request waited for its answer after its
    /// body had gone; `None` after a failed one. Decides sending ahead.
    pub answer_wait: Cell<Option<Duration>>,
}

/// What a POST touches besides its body. Shared by reference with the
/// threads that send batches ahead ([`ahead`]), so it holds nothing of the
/// worker's own cells.
struct Wire<'a> {
    name: &'a str,
    status: &'a ReplStatus,
    link: &'a link::Link,
    control: &'a Control,
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
    /// The remote refused the batch's destination alone (its code and
    /// message): hold it, and go on with the others.
    Held(u16, String),
}

/// Whether `answer` concerns the batch's destination alone: a 404 (bucket
/// or database not found) or a 403 (no permission on that bucket), when
/// the replication sends to more than one destination. A 401 concerns
/// every destination; with a single destination, holding it is pausing.
pub fn holds_destination(answer: &Answer, config: &ShipConfig) -> bool {
    config.remote_bucket.is_none()
        && matches!(
            answer,
            Answer::Status {
                code: 403 | 404,
                ..
            }
        )
}

/// When each held destination (by local bucket) is tried next.
type HeldDue = HashMap<String, Instant>;

/// How a 400/422 was read.
enum Reading {
    /// The refusal is about lines: they were set aside, or the part split.
    AboutLines,
    /// Every piece was refused alike down to a lone line: nothing says the
    /// lines are at fault, so the batch waits like after a 5xx.
    AboutServer,
}

/// What the answers to one batch have shown so far about its refusals.
#[derive(Debug, Default)]
struct Evidence {
    /// The message of the batch's first refusal.
    first: Option<String>,
    /// A later refusal said something else.
    varied: bool,
    /// The remote wrote some piece of the batch.
    accepted: bool,
}

/// A part the remote wrote except for `left` lines it has not named
/// (`partial write: ... dropped=N`): once they are found by bisection, the
/// rest of the part is known written and is not sent again.
#[derive(Debug)]
struct Counted {
    part: Range<usize>,
    left: u64,
}

impl Counted {
    fn holds(&self, at: usize) -> bool {
        self.part.start <= at && at < self.part.end
    }
}

/// The state of one batch's delivery: the parts still to send (byte ranges
/// of the batch's lines, the next one last) and what the answers said.
struct Delivery {
    settlement: Settlement,
    /// The whole batch as it now stands in the lines.
    whole: Range<usize>,
    /// Refused lines were cut out of the lines, which no longer match the
    /// batch as stored.
    cut: bool,
    pending: Vec<Range<usize>>,
    counted: Vec<Counted>,
    evidence: Evidence,
    /// A lone line refused with nothing to show it is at fault, and the
    /// answer: set aside if the rest of the batch shows the refusals are
    /// about lines, else the batch waits.
    suspect: Option<(Range<usize>, Answer)>,
}

impl Delivery {
    /// Replaces `part` (the next to send) by its two halves.
    fn split(&mut self, part: &Range<usize>, slice: &[u8]) {
        let mid = split_point(slice);
        self.pending.pop();
        self.pending.push(part.start + mid..part.end);
        self.pending.push(part.start..part.start + mid);
    }

    /// Sends the whole batch (as it now stands) again, forgetting what the
    /// answers said; lines already set aside stay set aside.
    fn restart(&mut self) {
        self.pending.clear();
        self.pending.push(self.whole.clone());
        self.counted.clear();
        self.evidence = Evidence::default();
        self.suspect = None;
    }

    /// `k` lines refused with a count were found at `at`: every count
    /// holding them has that many fewer left to find. Lines refused for
    /// another reason do not count: InfluxDB 1.x counts type conflicts in
    /// `dropped=N` but answers a line it cannot parse with `dropped=0`, so
    /// counting those would end the search early and take a refused line
    /// for a written one.
    fn found(&mut self, at: usize, k: u64) {
        for c in self.counted.iter_mut().filter(|c| c.holds(at)) {
            c.left = c.left.saturating_sub(k);
        }
    }

    /// Parts whose refused lines were all found were written otherwise:
    /// their pieces still pending are not sent.
    fn drop_finished(&mut self) {
        while let Some(i) = self.counted.iter().position(|c| c.left == 0) {
            let done = self.counted.swap_remove(i);
            while self
                .pending
                .last()
                .is_some_and(|p| done.part.start <= p.start && p.end <= done.part.end)
            {
                self.pending.pop();
            }
        }
        // A part emptied by a cut has nothing to send.
        while self.pending.last().is_some_and(|p| p.is_empty()) {
            self.pending.pop();
        }
    }

    /// Takes the `named` lines (ranges within `part`, the next part to
    /// send) out of `lines`, so that the rest of the part goes again as one
    /// request; every range after the cut moves back.
    fn cut_out(&mut self, lines: &mut Vec<u8>, part: &Range<usize>, named: &[Range<usize>]) {
        let mut removed = 0;
        for r in named.iter().rev() {
            lines.drain(part.start + r.start..part.start + r.end);
            removed += r.len();
        }
        let end = part.end;
        let shift = |r: &mut Range<usize>| {
            if r.start >= end {
                r.start -= removed;
                r.end -= removed;
            } else if r.end >= end {
                r.end -= removed;
            }
        };
        self.pending.iter_mut().for_each(shift);
        self.counted.iter_mut().for_each(|c| shift(&mut c.part));
        shift(&mut self.whole);
        self.cut = true;
    }
}

/// A part of one line as a set-aside takes it: all of it, even if it
/// lacked its '\n', so that no byte leaves the queue uncounted.
fn one_line(slice: &[u8]) -> Vec<Range<usize>> {
    std::iter::once(0..slice.len()).collect()
}

/// The ranges of each whole line (point, ending in its '\n') of `lines`, as
/// `lineproto::points` cuts them: a string value's newline does not end a
/// line. Bytes after the last whole point are not in any range.
fn line_ranges(lines: &[u8]) -> Vec<Range<usize>> {
    let mut start = 0;
    crate::lineproto::points(lines)
        .take_while(|point| point.ends_with(b"\n"))
        .map(|point| {
            let r = start..start + point.len();
            start = r.end;
            r
        })
        .collect()
}

impl Worker {
    pub fn spawn(self) -> std::io::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name(format!("ship-{}", self.repl.name))
            .spawn(move || self.run())
    }

    fn target(&self) -> Arc<Target> {
        self.target.read_locked().clone()
    }

    fn run(self) {
        let name = &self.repl.name;
        let mut shipment = Shipment::default();
        let mut lines = Vec::new();
        // The batch delivered last, while the queue commits its settlement:
        // the next batch is read from its end and shipped meanwhile.
        let mut settling: Option<Settling> = None;
        // The byte limit of the next batch: halved after a batch the link
        // did not carry, doubled after GROW_AFTER deliveries in a row, up
        // to batch_size.
        let mut fit = usize::MAX;
        let mut carried = 0;
        let mut due = HeldDue::new();
        let mut reloads = self.control.wake.generation();
        debug!("replication \"{name}\": worker started");
        'work: while !self.control.stopped() {
            self.control.beat();
            let seen = self.repl.data.generation();
            let lane_shipped = match self.retry_held(
                &mut due,
                &mut reloads,
                &mut settling,
                &mut shipment,
                &mut lines,
                &mut fit,
            ) {
                Some(shipped) => shipped,
                None => break,
            };
            let t = self.target();
            let split = t.config.remote_bucket.is_none();
            // Lines queued within `live_window` go ahead of an older
            // backlog, one batch between two of the backlog's.
            if let Some(window) = t.config.live_window {
                let after = settling.as_ref().map_or(0, |s| s.to.seq);
                if self
                    .send_live(
                        &t,
                        window,
                        after,
                        &mut due,
                        &mut shipment,
                        &mut lines,
                        &mut fit,
                    )
                    .is_none()
                {
                    break;
                }
            }
            let from = settling.as_ref().map(|s| s.to);
            fit = fit.min(t.config.batch_size);
            self.status.ship.locked().batch_limit = fit as u64;
            let read = self
                .queue
                .read_shipment(&self.repl, from, fit, split, &mut shipment);
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
                Ok(None) if self.queue.clock_held(&self.repl) => {
                    // The clock guard holds the next lines: released as soon
                    // as it lets them go, looked at every second meanwhile.
                    if !self.release_clock() && !lane_shipped {
                        self.repl.data.wait_past(seen, Duration::from_secs(1));
                    }
                    continue;
                }
                Ok(None) => {
                    self.status.ship.locked().next_retry = None;
                    if !lane_shipped {
                        // Appends, releases, replays, reloads and stopping
                        // all notify `data`: the timeout is a safety net, and
                        // the pace of held lanes' retries while any is held.
                        let look = if self.repl.held().is_empty() {
                            IDLE_LOOK
                        } else {
                            Duration::from_secs(1)
                        };
                        self.repl.data.wait_past(seen, look);
                    }
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
            // A small batch of fresh lines waits for more (`batch_wait`):
            // every request costs its headers, acknowledgements and round
            // trip, whatever it carries. A write or a stop wakes it.
            if let Some(left) = self.lingers(&t, &batch, fit) {
                self.repl.data.wait_past(seen, left);
                continue;
            }
            let limit = fit;
            // On a link whose answers are slow, the batches that follow go
            // at the same time, one attempt each; they settle after this one.
            let ahead = if ahead::wanted(
                t.config.max_in_flight,
                self.link.limited(),
                self.answer_wait.get(),
            ) && self.removal_far(&t)
            {
                self.read_ahead(&t, &batch, &shipment, fit, split)
            } else {
                Vec::new()
            };
            let again =
                t.config.gzip_level > reencode::INGEST_LEVEL && self.reencode.get().wanted();
            let wire = self.wire();
            let (delivered, answers) = thread::scope(|scope| {
                let sent: Vec<_> = ahead
                    .iter()
                    .map(|(b, sh)| {
                        let (wire, t) = (&wire, &t);
                        thread::Builder::new()
                            .name(format!("ahead-{name}"))
                            .spawn_scoped(scope, move || wire.send_ahead(t, b, sh, again))
                            .ok()
                    })
                    .collect();
                let delivered = self.deliver(&batch, &shipment, &mut lines, &mut fit);
                let answers: Vec<_> = sent
                    .into_iter()
                    .map(|h| h.and_then(|h| h.join().ok().flatten()))
                    .collect();
                (delivered, answers)
            });
            for (answer, _) in answers.iter().flatten() {
                if !ahead::accepted_whole(answer) {
                    self.count_error(answer);
                }
            }
            let settlement = match delivered {
                Ok(s) => s,
                Err(Unsettled::Stale) => continue,
                Err(Unsettled::Stopped) => break,
                Err(Unsettled::Held(code, message)) => {
                    // The batches before it settle first: the hold moves
                    // what is left of this destination from the head on.
                    if let Err(QueueError::Closed) = self.confirm(&mut settling) {
                        break;
                    }
                    if self.hold(&batch.bucket, code, &message) {
                        due.insert(batch.bucket.clone(), Instant::now() + t.config.max_backoff);
                    } else {
                        self.sleep(Duration::from_secs(1));
                    }
                    continue;
                }
            };
            if fit < limit {
                carried = 0;
            } else {
                carried += 1;
            }
            if carried >= GROW_AFTER {
                fit = fit.saturating_mul(2);
                carried = 0;
            }
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
            // The batches sent ahead, in queue order, up to the first whose
            // attempt was not accepted whole: it and those after it are read
            // and sent again.
            for ((b, _), answer) in ahead.iter().zip(answers) {
                let Some((answer, sent)) = answer else { break };
                if !ahead::accepted_whole(&answer) {
                    break;
                }
                self.record_success(sent);
                match self.confirm(&mut settling) {
                    Ok(()) => {}
                    Err(QueueError::Closed) => break 'work,
                    Err(_) => break,
                }
                let whole = Settlement {
                    bucket: b.bucket.clone(),
                    ..Settlement::default()
                };
                settling = Some(Settling {
                    to: b.to,
                    reply: self.queue.settle_async(&self.repl, b, whole),
                });
            }
        }
        let _ = self.confirm(&mut settling);
        debug!("replication \"{name}\": worker stopped");
    }

    /// Tries one batch of a held destination that is due: every
    /// `max_backoff`, at once after a reload (`reloads` is the wake-up
    /// generation last seen) or an operator's release, and again at once
    /// after a batch of it was delivered. Returns whether a batch was
    /// delivered, or `None` when the worker was told to stop.
    fn retry_held(
        &self,
        due: &mut HeldDue,
        reloads: &mut u64,
        settling: &mut Option<Settling>,
        shipment: &mut Shipment,
        lines: &mut Vec<u8>,
        fit: &mut usize,
    ) -> Option<bool> {
        let held = self.repl.held();
        due.retain(|b, _| held.iter().any(|h| &h.bucket == b));
        if held.is_empty() {
            return Some(false);
        }
        let now = Instant::now();
        let generation = self.control.wake.generation();
        let reloaded = generation != *reloads;
        *reloads = generation;
        let t = self.target();
        let name = &self.repl.name;
        // Held before a restart: tried at once, as a paused remote is.
        let mut pick = None;
        for h in &held {
            let released = self.repl.take_release(&h.bucket);
            let at = *due.entry(h.bucket.clone()).or_insert(now);
            if reloaded || released || at <= now {
                due.insert(h.bucket.clone(), now);
                pick = pick.or(Some(h.clone()));
            }
        }
        let Some(h) = pick else {
            return Some(false);
        };
        if let Err(QueueError::Closed) = self.confirm(settling) {
            return None;
        }
        let max = (*fit).min(t.config.batch_size);
        let batch = match self
            .queue
            .read_lane(&self.repl, h.lane, None, max, shipment)
        {
            Ok(Some(b)) => b,
            Ok(None) => {
                due.remove(&h.bucket);
                return Some(false);
            }
            Err(QueueError::Corrupt { seq, why, .. }) => {
                error!("replication \"{name}\": entry {seq} of held lane {} is corrupt ({why}); setting it aside", h.lane);
                if let Err(e) = self.queue.set_aside_in(&self.repl, h.lane, seq) {
                    error!("replication \"{name}\": cannot set entry {seq} aside: {e}");
                    due.insert(h.bucket.clone(), now + Duration::from_secs(1));
                }
                return Some(false);
            }
            Err(e) => {
                error!(
                    "replication \"{name}\": cannot read held lane {}: {e}",
                    h.lane
                );
                due.insert(h.bucket.clone(), now + Duration::from_secs(1));
                return Some(false);
            }
        };
        match self.deliver(&batch, shipment, lines, fit) {
            Ok(settlement) => {
                if let Err(e) = self.queue.settle(&self.repl, &batch, settlement) {
                    error!("replication \"{name}\": cannot settle a delivered batch: {e}");
                    due.insert(h.bucket.clone(), now + Duration::from_secs(1));
                    return Some(false);
                }
                if !self.repl.held().iter().any(|x| x.lane == h.lane) {
                    info!(
                        "replication \"{name}\": held destination \"{}\" accepts writes again; its lines were delivered",
                        h.bucket
                    );
                }
                Some(true)
            }
            Err(Unsettled::Held(code, message)) => {
                self.hold(&h.bucket, code, &message);
                due.insert(h.bucket.clone(), Instant::now() + t.config.max_backoff);
                Some(false)
            }
            Err(Unsettled::Stale) => Some(false),
            Err(Unsettled::Stopped) => None,
        }
    }

    /// The batches after `first` (read from where it ends) that go ahead
    /// of it, up to `max_in_flight - 1`: none larger than a limit stalls
    /// lowered, and none writing a point that `first` or another of them
    /// writes with another line.
    fn read_ahead(
        &self,
        t: &Target,
        first: &Batch,
        shipment: &Shipment,
        fit: usize,
        split: bool,
    ) -> Vec<(Batch, Shipment)> {
        let mut in_flight = ahead::InFlight::default();
        let mut lines = Vec::new();
        if shipment.lines_into(&mut lines).is_err() || !in_flight.admit(&first.bucket, &lines) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut from = first.to;
        while out.len() + 1 < t.config.max_in_flight {
            let mut sh = Shipment::default();
            let Ok(Some(b)) = self
                .queue
                .read_shipment(&self.repl, Some(from), fit, split, &mut sh)
            else {
                break;
            };
            lines.clear();
            // A batch larger than a limit the link lowered would go in
            // pieces: that is the ordinary path's work.
            let lowered = fit < t.config.batch_size;
            if (lowered && b.bytes as usize > fit)
                || sh.lines_into(&mut lines).is_err()
                || !in_flight.admit(&b.bucket, &lines)
            {
                break;
            }
            from = b.to;
            out.push((b, sh));
        }
        out
    }

    /// Whether eviction and expiry are far from the head: the queue at most
    /// half full (when `drop_oldest` evicts) and its oldest line younger
    /// than half `max_age`. A batch sent ahead settles only after the one
    /// before it: if that one's lines were removed meanwhile, the lines sent
    /// ahead would be at the remote yet counted dropped when removed in turn.
    fn removal_far(&self, t: &Target) -> bool {
        let c = self.repl.counters();
        let room = t
            .config
            .evict_above
            .is_none_or(|max| c.queued_bytes <= max / 2);
        let now = unix_ns();
        let young = match (t.config.max_age, c.oldest_enqueued_ns) {
            (Some(age), Some(oldest)) => now.saturating_sub(oldest) < (age / 2).as_nanos() as u64,
            _ => true,
        };
        room && young
    }

    /// Counts a failed attempt of a batch sent ahead: the batch goes again
    /// the ordinary way, whose attempts say what the remote answers.
    fn count_error(&self, answer: &Answer) {
        let code = match answer {
            Answer::Status { code, .. } => code.to_string(),
            Answer::Transport(_) => "transport".into(),
        };
        *self.status.ship.locked().errors.entry(code).or_default() += 1;
    }

    /// `send_order = "live_first"`: while the remote takes writes and the
    /// main log's head is older than `window`, delivers the lines queued
    /// within `window` (up to `batch_size`, the newest; past entry `after`,
    /// the end of the batch whose settlement is on its way; only lines that
    /// cannot rewrite a point of the backlog, see [`Queue::live_start`]) and
    /// settles them out of order, leaving the head where it is. Returns
    /// whether a batch went; `None` when the worker was told to stop.
    #[allow(clippy::too_many_arguments)]
    fn send_live(
        &self,
        t: &Target,
        window: Duration,
        after: u64,
        due: &mut HeldDue,
        shipment: &mut Shipment,
        lines: &mut Vec<u8>,
        fit: &mut usize,
    ) -> Option<bool> {
        // After a failure the head batch finds the link back first.
        if self.answer_wait.get().is_none() {
            return Some(false);
        }
        let now = unix_ns();
        let since = now.saturating_sub(window.as_nanos() as u64);
        if self
            .repl
            .counters()
            .oldest_enqueued_ns
            .is_none_or(|oldest| oldest >= since)
        {
            return Some(false);
        }
        let max = (*fit).min(t.config.batch_size);
        let name = &self.repl.name;
        let split = t.config.remote_bucket.is_none();
        let read = match self.queue.live_start(&self.repl, since, after, max) {
            Ok(Some(start)) => self.queue.read_live(&self.repl, start, split, shipment),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let batch = match read {
            Ok(Some(b)) => b,
            Ok(None) => return Some(false),
            Err(e) => {
                debug!("replication \"{name}\": cannot read the newest lines: {e}");
                return Some(false);
            }
        };
        match self.deliver(&batch, shipment, lines, fit) {
            Ok(settlement) => {
                if let Err(e) = self.queue.settle(&self.repl, &batch, settlement) {
                    // Delivered, not settled: sent again in its turn.
                    error!("replication \"{name}\": cannot settle a delivered batch: {e}");
                    return Some(false);
                }
                self.status.ship.locked().live_first_lines += batch.lines;
                Some(true)
            }
            // The destination is held as when the head's batch finds it
            // refused: its entries, these and the backlog's, move to a lane.
            // Its first retry waits `max_backoff`, as the head's would.
            Err(Unsettled::Held(code, message)) => {
                if self.hold(&batch.bucket, code, &message) {
                    due.insert(batch.bucket.clone(), Instant::now() + t.config.max_backoff);
                }
                Some(false)
            }
            // Its lines were evicted: the newest are looked for again.
            Err(Unsettled::Stale) => Some(false),
            Err(Unsettled::Stopped) => None,
        }
    }

    /// Holds destination `bucket` after the remote refused it alone
    /// (`code`, `message`): recorded in status, and its entries moved to a
    /// lane. False, and logged, when the queue could not.
    fn hold(&self, bucket: &str, code: u16, message: &str) -> bool {
        self.record_held(code, message);
        match self.queue.hold(&self.repl, bucket, code, message) {
            Ok(_) => true,
            Err(e) => {
                error!(
                    "replication \"{}\": cannot hold destination \"{bucket}\": {e}",
                    self.repl.name
                );
                false
            }
        }
    }

    /// Records an answer that held a destination: counted as an error,
    /// and shown as the latest answer, but the replication keeps running.
    fn record_held(&self, code: u16, message: &str) {
        let mut s = self.status.ship.locked();
        *s.errors.entry(code.to_string()).or_default() += 1;
        s.latest_code = Some(code);
        s.latest_error = answer::shorten(message);
    }

    /// Whether lines of `batch` left its log (eviction, expiry, a lane
    /// moved to the dead-letter store) since it was read.
    fn stale(&self, batch: &Batch) -> bool {
        match batch.lane {
            0 => self.repl.counters().head > batch.from,
            lane => self
                .repl
                .held()
                .iter()
                .find(|h| h.lane == lane)
                .is_none_or(|h| h.head > batch.from),
        }
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
    /// failing part in halves. A 400/422 is read for what it says (see
    /// [`Worker::refused`]): named lines are set aside at once, a count of
    /// refused lines ends the bisection once that many are found, and only
    /// an answer that says nothing usable is bisected down to single lines.
    /// Anything else is retried after a wait.
    fn deliver(
        &self,
        batch: &Batch,
        shipment: &Shipment,
        lines: &mut Vec<u8>,
        fit: &mut usize,
    ) -> Result<Settlement, Unsettled> {
        let mut d = Delivery {
            settlement: Settlement {
                bucket: batch.bucket.clone(),
                ..Settlement::default()
            },
            whole: 0..batch.bytes as usize,
            cut: false,
            pending: Vec::with_capacity(16),
            counted: Vec::new(),
            evidence: Evidence::default(),
            suspect: None,
        };
        // The batch's lines, inflated only when a part must be cut out.
        let mut have_lines = false;
        let level = self.target().config.gzip_level;
        // Entries deflated when queued were compressed at a low level for
        // the writers' sake: they are compressed again at `gzip_level` where
        // the link, not this worker, bounds the drain (see [`reencode`]).
        let again = level > reencode::INGEST_LEVEL
            && shipment.has_segments()
            && (self.link.limited() || self.reencode.get().wanted());
        // On a metered or capped link, bytes cost more than CPU: the batch is
        // also compressed ordered by series at the highest level, and the
        // smaller of the two goes (series order helps some mixes and not
        // others; see `make bench`). `first` keeps the body compressed to
        // choose, so that the first attempt sends it as it is.
        let mut first = None;
        if self.link.limited() {
            self.inflated(shipment, lines, &mut have_lines)?;
            let mut ordered = Vec::with_capacity(lines.len());
            crate::lineproto::order_by_series(lines, &mut ordered);
            let gz = gzip(&ordered, THRIFTY_GZIP_LEVEL);
            let arrival = if again {
                self.compress_again(lines, level)
            } else {
                shipment.gzip(level, Vec::new())
            };
            if gz.len() < arrival.len() {
                *lines = ordered;
                // The lines, not the entries as stored, are what goes.
                d.cut = true;
                first = Some((THRIFTY_GZIP_LEVEL, gz));
            } else {
                first = Some((level, arrival));
            }
        }
        // Whether the series-ordered form won: parts cut out of it later
        // are compressed at its level too. (`d.cut` changes as parts are cut.)
        let thrifty = d.cut;
        if batch.bytes as usize > *fit && *fit < self.target().config.batch_size {
            // Entries compressed when queued are taken whole, however large
            // (and so shipped as stored while the link carries them): after
            // stalls, cut into pieces the link has shown it carries.
            self.inflated(shipment, lines, &mut have_lines)?;
            d.pending = pieces(lines, *fit);
            d.pending.reverse();
        } else {
            d.pending.push(d.whole.clone());
        }
        // Compressed once to choose it: sent as it is, not compressed again.
        let mut body: Option<(Range<usize>, u32, Vec<u8>)> = first
            .filter(|_| d.pending.last() == Some(&d.whole))
            .map(|(level, gz)| (d.whole.clone(), level, gz));
        let mut attempt: u32 = 0;
        loop {
            let Some(part) = d.pending.last().cloned() else {
                let Some((line, answer)) = d.suspect.take() else {
                    break;
                };
                let t = self.target();
                if d.evidence.accepted || d.evidence.varied {
                    let slice = &lines[line];
                    let all = one_line(slice);
                    self.set_aside(
                        &mut d.settlement,
                        slice,
                        &all,
                        Verdict::Refused,
                        &answer,
                        &t.config,
                    );
                    break;
                }
                // Every piece refused alike: about the remote, not the lines.
                attempt = attempt.saturating_add(1);
                let wait = wait_for(&t.config, Verdict::Retry, &answer, attempt);
                self.record_answer(&answer, State::Backoff, Some((wait, batch.lines)));
                self.sleep(wait);
                d.restart();
                continue;
            };
            if self.control.stopped() {
                return Err(Unsettled::Stopped);
            }
            if self.stale(batch) {
                debug!("replication \"{}\": lines of the batch in hand were evicted or expired; reading again", self.repl.name);
                return Err(Unsettled::Stale);
            }
            self.control.beat();
            let t = self.target();
            let level = if thrifty {
                THRIFTY_GZIP_LEVEL
            } else {
                t.config.gzip_level
            };
            // Compress each part once, not once per retry.
            if !matches!(&body, Some((r, l, _)) if *r == part && *l == level) {
                let reuse = body.take().map(|(_, _, b)| b).unwrap_or_default();
                let gz = if part == d.whole && !d.cut && !again {
                    shipment.gzip(level, reuse)
                } else if part == d.whole && !d.cut {
                    self.inflated(shipment, lines, &mut have_lines)?;
                    self.compress_again(lines, level)
                } else {
                    self.inflated(shipment, lines, &mut have_lines)?;
                    gzip(&lines[part.clone()], level)
                };
                body = Some((part.clone(), level, gz));
            }
            let gz = &body.as_ref().expect("set above").2;
            if self.wait_for_budget(&t) {
                // A wait of any length: look at the batch again first.
                continue;
            }
            let bucket = t.config.remote_bucket.as_deref().unwrap_or(&batch.bucket);
            let posted = Instant::now();
            let (answer, waited) = self.post(&t.client, &t.client.write_url(bucket), gz);
            let verdict = classify(&answer);
            self.answer_wait
                .set(waited.filter(|_| verdict == Verdict::Delivered));
            match verdict {
                Verdict::Delivered => {
                    let took = posted.elapsed();
                    self.reencode_note(|r| r.requested(part.len(), took));
                    d.pending.pop();
                    attempt = 0;
                    d.evidence.accepted = true;
                    self.record_success(gz.len());
                    if let Answer::Status {
                        message, detail, ..
                    } = &answer
                    {
                        if !message.is_empty() {
                            self.accepted_with_detail(
                                &mut d,
                                part,
                                message,
                                detail,
                                &answer,
                                &t.config,
                                shipment,
                                lines,
                                &mut have_lines,
                            )?;
                        }
                    }
                }
                Verdict::TooLarge => {
                    self.record_answer(&answer, State::Running, None);
                    self.inflated(shipment, lines, &mut have_lines)?;
                    let slice = &lines[part.clone()];
                    let n = crate::lineproto::count_points(slice);
                    if n > 1 {
                        debug!(
                            "replication \"{}\": {}; splitting {n} lines",
                            self.repl.name,
                            message(&answer)
                        );
                        d.split(&part, slice);
                    } else {
                        d.pending.pop();
                        let all = one_line(slice);
                        self.set_aside(&mut d.settlement, slice, &all, verdict, &answer, &t.config);
                    }
                }
                Verdict::Refused => {
                    self.inflated(shipment, lines, &mut have_lines)?;
                    if d.cut {
                        // Ranges changed meaning: compress afresh.
                        body = None;
                    }
                    let cut_before = d.cut;
                    match self.refused(&mut d, part, lines, &answer, &t.config) {
                        Reading::AboutLines => {
                            self.record_answer(&answer, State::Running, None);
                        }
                        Reading::AboutServer => {
                            // The same refusal for every piece: nothing says
                            // the lines are at fault. Wait, then start over.
                            attempt = attempt.saturating_add(1);
                            let wait = wait_for(&t.config, Verdict::Retry, &answer, attempt);
                            self.record_answer(&answer, State::Backoff, Some((wait, batch.lines)));
                            self.sleep(wait);
                            d.restart();
                        }
                    }
                    if d.cut != cut_before {
                        body = None;
                    }
                }
                Verdict::Unauthorized if holds_destination(&answer, &t.config) => {
                    if let Answer::Status { code, message, .. } = &answer {
                        return Err(Unsettled::Held(*code, message.clone()));
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
                    // Probing only helps while there is no connection:
                    // a remote that takes connections and stalls would
                    // answer every probe, and be retried at that pace.
                    let unreachable =
                        matches!(answer, Answer::Transport(_)) && !client::stalled(&answer);
                    if verdict == Verdict::Retry && unreachable {
                        self.wait_probing(wait, &t);
                    } else {
                        // A Retry-After, a 5xx, a refused token: the remote
                        // answered, and its pace is kept.
                        self.sleep(wait);
                    }
                    // A part the link did not carry goes again in halves,
                    // and later batches are no larger than a half.
                    if client::stalled(&answer) {
                        self.inflated(shipment, lines, &mut have_lines)?;
                        let slice = &lines[part.clone()];
                        if memchr::memchr_iter(b'\n', slice).nth(1).is_some() {
                            d.split(&part, slice);
                            let half = d.pending.last().map_or(0, |p| p.len());
                            if half < *fit {
                                debug!("replication \"{}\": the link did not carry {} bytes of lines; sending at most {half} at a time", self.repl.name, part.len());
                                *fit = half;
                                self.status.ship.locked().batch_limit = half as u64;
                            }
                        }
                    }
                }
            }
        }
        Ok(d.settlement)
    }

    /// A 2xx with a body: logged, and the lines it names (3.x reports a
    /// partial write's refused lines this way) set aside.
    #[allow(clippy::too_many_arguments)]
    fn accepted_with_detail(
        &self,
        d: &mut Delivery,
        part: Range<usize>,
        message: &str,
        detail: &answer::Detail,
        answer: &Answer,
        config: &ShipConfig,
        shipment: &Shipment,
        lines: &mut Vec<u8>,
        have_lines: &mut bool,
    ) -> Result<(), Unsettled> {
        let name = &self.repl.name;
        debug!(
            "replication \"{name}\": remote accepted the write and said: {}",
            answer::shorten(message)
        );
        if detail.lines.is_empty() {
            return Ok(());
        }
        self.inflated(shipment, lines, have_lines)?;
        let slice = &lines[part.clone()];
        match answer::named_lines(slice, detail) {
            Some(named) => {
                self.set_aside(&mut d.settlement, slice, &named, Verdict::Refused, answer, config);
                d.drop_finished();
            }
            None => warn!(
                "replication \"{name}\": remote accepted the write but names lines that are not in the body sent; counting every line delivered: {}",
                answer::shorten(message)
            ),
        }
        Ok(())
    }

    /// Reads a 400/422 to `part` (of `lines`, already inflated) and decides
    /// what happens to its lines.
    ///
    /// The refusal is about lines only when the evidence says so: the remote
    /// names them (line numbers that fit the body sent, or a count), or a
    /// single line alone is refused while something else was said or taken
    /// (another piece accepted, a different message, the line quoted in
    /// it). The same refusal for every piece is about the remote, and is
    /// waited out rather than set aside: two lone lines refused alike with
    /// nothing accepted, or one when the batch holds nothing else.
    fn refused(
        &self,
        d: &mut Delivery,
        part: Range<usize>,
        lines: &mut Vec<u8>,
        answer: &Answer,
        config: &ShipConfig,
    ) -> Reading {
        let name = &self.repl.name;
        let (message, detail) = match answer {
            Answer::Status {
                message, detail, ..
            } => (message.as_str(), detail.clone()),
            Answer::Transport(m) => (m.as_str(), answer::Detail::default()),
        };
        match &d.evidence.first {
            None => d.evidence.first = Some(message.to_string()),
            Some(first) if first != message => d.evidence.varied = true,
            Some(_) => {}
        }
        let slice = &lines[part.clone()];
        let n = crate::lineproto::count_points(slice);
        if let Some(named) = answer::named_lines(slice, &detail) {
            let k = named.len();
            // Written only when the remote says so and names every refused
            // line: IOx bodies read the same whether or not the rest was
            // written, and Core's whole-batch refusal names only the first.
            let written =
                detail.partial && detail.complete && detail.dropped.is_none_or(|c| c == k as u64);
            self.set_aside(
                &mut d.settlement,
                slice,
                &named,
                Verdict::Refused,
                answer,
                config,
            );
            if written {
                debug!(
                    "replication \"{name}\": the remote wrote the other {} of {n} lines",
                    n - k
                );
                if k < n {
                    d.evidence.accepted = true;
                }
                d.pending.pop();
            } else {
                debug!(
                    "replication \"{name}\": sending the other {} of {n} lines again without the {k} refused",
                    n - k
                );
                d.cut_out(lines, &part, &named);
            }
            d.drop_finished();
            return Reading::AboutLines;
        }
        if let (true, Some(count)) = (detail.partial, detail.dropped) {
            if count == n as u64 {
                let all = line_ranges(slice);
                self.set_aside(
                    &mut d.settlement,
                    slice,
                    &all,
                    Verdict::Refused,
                    answer,
                    config,
                );
                d.found(part.start, count);
                d.pending.pop();
                d.drop_finished();
                return Reading::AboutLines;
            }
            if count >= 1 && count < n as u64 {
                debug!(
                    "replication \"{name}\": {}; looking for {count} refused lines among {n}",
                    answer::shorten(message)
                );
                d.counted.push(Counted {
                    part: part.clone(),
                    left: count,
                });
                d.split(&part, slice);
                return Reading::AboutLines;
            }
            // A count that does not fit the body: bisect as if none were given.
        }
        if n > 1 {
            debug!(
                "replication \"{name}\": {}; splitting {n} lines",
                answer::shorten(message)
            );
            d.split(&part, slice);
            return Reading::AboutLines;
        }
        let evidence = answer::quotes(message, slice)
            || d.evidence.accepted
            || d.evidence.varied
            || d.counted.iter().any(|c| c.holds(part.start));
        if !evidence {
            if d.suspect.is_some() {
                return Reading::AboutServer;
            }
            // Perhaps the batch's first line is bad and the remote does not
            // say so in words: the next piece tells.
            d.pending.pop();
            d.suspect = Some((part, answer.clone()));
            return Reading::AboutLines;
        }
        d.pending.pop();
        let all = one_line(slice);
        self.set_aside(
            &mut d.settlement,
            slice,
            &all,
            Verdict::Refused,
            answer,
            config,
        );
        d.drop_finished();
        Reading::AboutLines
    }

    /// Compresses a whole batch's `lines` again at `level`, timing it.
    fn compress_again(&self, lines: &[u8], level: u32) -> Vec<u8> {
        let started = Instant::now();
        let gz = gzip(lines, level);
        let took = started.elapsed();
        self.reencode_note(|r| r.compressed(lines.len(), took));
        gz
    }

    fn reencode_note(&self, note: impl FnOnce(&mut reencode::Reencode)) {
        let mut r = self.reencode.get();
        let was = r.wanted();
        note(&mut r);
        if r.wanted() != was {
            let share = r.share().unwrap_or(0.0) * 100.0;
            if r.wanted() {
                debug!("replication \"{}\": the link bounds the drain (compressing again would take {share:.0} % of a batch's time): entries deflated when queued go compressed again", self.repl.name);
            } else {
                debug!("replication \"{}\": this worker bounds the drain (compressing again would take {share:.0} % of a batch's time): entries deflated when queued go as stored", self.repl.name);
            }
        }
        self.reencode.set(r);
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

    /// Lines the remote refused for good (`ranges` of `part`): dead letter,
    /// or dropped when configured (never for 413).
    fn set_aside(
        &self,
        s: &mut Settlement,
        part: &[u8],
        ranges: &[Range<usize>],
        verdict: Verdict,
        answer: &Answer,
        config: &ShipConfig,
    ) {
        let Some(first) = ranges.first() else {
            return;
        };
        let why = message(answer);
        let line = &part[first.clone()];
        let excerpt = String::from_utf8_lossy(&line[..line.len().min(200)]);
        // A string value's newlines would split the log record.
        let excerpt = excerpt.trim_end().replace('\n', "\\n");
        let what = match ranges.len() {
            1 => "a line".to_string(),
            k => format!("{k} lines"),
        };
        let first_of = if ranges.len() > 1 { " the first" } else { "" };
        if verdict == Verdict::Refused && config.drop_non_retryable_data {
            s.dropped_lines += ranges.len() as u64;
            warn!(
                "replication \"{}\": remote refused {what} ({why}); dropped{first_of}: {excerpt}",
                self.repl.name
            );
        } else {
            s.dead_lines += ranges.len() as u64;
            for r in ranges {
                s.dead_letter.extend_from_slice(&part[r.clone()]);
            }
            if s.reason.is_empty() {
                s.reason = why.clone();
            }
            warn!(
                "replication \"{}\": remote refused {what} ({why}); moved to the dead-letter store{first_of}: {excerpt}",
                self.repl.name
            );
        }
    }

    fn wire(&self) -> Wire<'_> {
        Wire {
            name: &self.repl.name,
            status: &self.status,
            link: &self.link,
            control: &self.control,
        }
    }

    /// POSTs `gz` (see [`Wire::post`]), showing its progress in status.
    fn post(&self, client: &Client, url: &str, gz: &[u8]) -> (Answer, Option<Duration>) {
        let priority = self.target().config.priority;
        self.wire().post(client, url, gz, priority, true)
    }

    fn record_success(&self, sent_bytes: usize) {
        let mut s = self.status.ship.locked();
        if s.state != State::Running {
            info!(
                "replication \"{}\": remote accepts writes again",
                self.repl.name
            );
        }
        s.state = State::Running;
        s.latest_code = Some(204);
        s.latest_error.clear();
        s.logged_cause.clear();
        s.next_retry = None;
        s.bytes_accepted += sent_bytes as u64;
        s.batches_sent += 1;
    }

    /// Records a failed attempt; `retry` is the wait before the next one and
    /// the lines waiting, when the batch is retried as a whole.
    fn record_answer(&self, answer: &Answer, state: State, retry: Option<(Duration, u64)>) {
        let code = match answer {
            Answer::Status { code, .. } => Some(*code),
            Answer::Transport(_) => None,
        };
        let text = message(answer);
        let mut s = self.status.ship.locked();
        let changed = s.logged_cause != text || s.state != state;
        s.logged_cause = text.clone();
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

    /// How long a batch smaller than half `batch_size` may wait for more
    /// lines: `batch_wait`, or by default [`METERED_BATCH_WAIT`] on a link
    /// with a cap or a data budget (where bytes are what is short) and
    /// nothing otherwise.
    fn batch_wait(&self, t: &Target) -> Duration {
        t.config.batch_wait.unwrap_or(if self.link.limited() {
            METERED_BATCH_WAIT
        } else {
            Duration::ZERO
        })
    }

    /// What is left of `batch`'s wait for more lines, if it is to wait: a
    /// batch of the main log, less than half of `fit`, whose oldest line
    /// was queued less than [`Worker::batch_wait`] ago.
    fn lingers(&self, t: &Target, batch: &Batch, fit: usize) -> Option<Duration> {
        let wait = self.batch_wait(t);
        if wait.is_zero() || batch.lane != 0 || batch.live || batch.bytes as usize >= fit / 2 {
            return None;
        }
        let age = Duration::from_nanos(unix_ns().saturating_sub(batch.oldest_enqueued_ns));
        wait.checked_sub(age).filter(|left| !left.is_zero())
    }

    /// Releases the lines the clock guard let go at the head of the queue;
    /// while it still holds them, shows state `clock`. True if any went.
    fn release_clock(&self) -> bool {
        let name = &self.repl.name;
        let released = match self.queue.release_clock(&self.repl) {
            Ok(n) => n > 0,
            Err(e) => {
                error!("replication \"{name}\": cannot release lines held for the clock: {e}");
                false
            }
        };
        let holding = !released && self.queue.clock_held(&self.repl);
        let mut s = self.status.ship.locked();
        if holding && s.state != State::Clock {
            info!(
                "replication \"{name}\": the system clock is {}: the next lines wait in the queue until it is synchronised",
                crate::clock::state().as_str()
            );
            s.state = State::Clock;
            s.next_retry = None;
        } else if !holding && s.state == State::Clock {
            s.state = State::Running;
        }
        released
    }

    /// While a data budget is spent, shows state `budget` and waits until
    /// the period ends (a reload or a stop ends the wait early). True if it
    /// waited.
    fn wait_for_budget(&self, t: &Target) -> bool {
        let Some(spent) = self.link.spent(t.config.priority) else {
            return false;
        };
        let resets = std::time::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(spent.resets_at).unwrap_or(0));
        let wait = resets
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let mut s = self.status.ship.locked();
        if s.state != State::Budget {
            info!(
                "replication \"{}\": the {} data budget is spent; sending again at {}",
                self.repl.name,
                spent.period.name(),
                humantime::format_rfc3339_seconds(resets)
            );
        }
        s.state = State::Budget;
        s.next_retry = Some(resets);
        drop(s);
        self.link.save(true);
        // The clock may be set meanwhile: look again at least every minute.
        self.sleep(wait.clamp(Duration::from_secs(1), Duration::from_secs(60)));
        true
    }

    /// Waits `wait` after the remote could not be reached, probing it every
    /// `probe_interval` (jittered between half and all of it, so that a
    /// fleet behind one link does not probe in step) when the wait is
    /// longer; ends early once a probe connects. A stop or a reload ends
    /// it at once, as any wait.
    fn wait_probing(&self, wait: Duration, t: &Target) {
        let interval = t.config.probe_interval;
        if wait <= interval || !t.client.can_probe() {
            self.sleep(wait);
            return;
        }
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let step = interval.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            if left <= step {
                self.sleep(left);
                return;
            }
            let seen = self.control.wake.generation();
            self.sleep(step);
            if self.control.stopped() || self.control.wake.generation() != seen {
                return;
            }
            if self.link.spent(t.config.priority).is_some() {
                // A probe costs bytes the budget no longer has.
                continue;
            }
            let reached = t.client.probe();
            self.link.charge(link::PROBE_BYTES);
            let mut s = self.status.ship.locked();
            s.probes += 1;
            if reached {
                s.next_retry = None;
                drop(s);
                info!(
                    "replication \"{}\": a probe reached the remote; retrying now",
                    self.repl.name
                );
                return;
            }
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

impl Wire<'_> {
    /// POSTs `gz`, counting what went on the wire and what the answer says
    /// of the link; with `show`, how much of it has gone, in status (a batch
    /// sent ahead does not show: the batch at the head does). Returns the
    /// answer and, when the whole body went, how long the answer took after.
    fn post(
        &self,
        client: &Client,
        url: &str,
        gz: &[u8],
        priority: u8,
        show: bool,
    ) -> (Answer, Option<Duration>) {
        let total = gz.len() as u64;
        if show {
            self.status.ship.locked().sending = Some((0, total));
        }
        let mut sent = 0;
        let mut body_gone = None;
        let answer = client.post(
            url,
            gz,
            &mut |want| self.link.take(want, priority),
            &mut |done| {
                sent = done;
                if done == total {
                    body_gone = Some(Instant::now());
                }
                // A slow link may take long over one body: it is progress.
                self.control.beat();
                if show {
                    self.status.ship.locked().sending = Some((done, total));
                }
            },
        );
        let waited = body_gone.map(|t| t.elapsed());
        self.link
            .charge(link::REQUEST_OVERHEAD + message(&answer).len() as u64);
        self.link.save(false);
        let mut s = self.status.ship.locked();
        if show {
            s.sending = None;
        }
        s.wire_bytes_sent += sent;
        let link = match &answer {
            Answer::Status { .. } => Link::Up,
            a if client::stalled(a) => Link::Stalled,
            Answer::Transport(_) => Link::Down,
        };
        if link != Link::Up {
            // Shown with the link's state, not a moment later: status must
            // not say `stalled` beside the last success's code, nor
            // `running` beside a transport error (the worker backs off after
            // any; `record_answer` then adds when it retries).
            s.latest_code = None;
            s.latest_error = message(&answer);
            if show {
                s.state = State::Backoff;
            }
        }
        if link != s.link {
            let name = &self.name;
            match link {
                Link::Up => info!("replication \"{name}\": the link to the remote is up again"),
                Link::Stalled => warn!("replication \"{name}\": the link to the remote stalls; abandoned a request after {sent} of {total} body bytes"),
                Link::Down => {}
            }
        }
        s.set_link(link);
        (answer, waited)
    }

    /// One attempt at a batch sent ahead ([`ahead`]): compressed as its
    /// first attempt would be (`again`: its deflated entries at
    /// `gzip_level`), POSTed once. Returns the answer and the body's size,
    /// or `None` when it was not sent (a stop, a spent budget, a batch that
    /// cannot be read back).
    fn send_ahead(
        &self,
        t: &Target,
        batch: &Batch,
        shipment: &Shipment,
        again: bool,
    ) -> Option<(Answer, usize)> {
        if self.control.stopped() || self.link.spent(t.config.priority).is_some() {
            return None;
        }
        let level = t.config.gzip_level;
        let gz = if again && shipment.has_segments() {
            let mut lines = Vec::new();
            shipment.lines_into(&mut lines).ok()?;
            gzip(&lines, level)
        } else {
            shipment.gzip(level, Vec::new())
        };
        let bucket = t.config.remote_bucket.as_deref().unwrap_or(&batch.bucket);
        let url = t.client.write_url(bucket);
        let (answer, _) = self.post(&t.client, &url, &gz, t.config.priority, false);
        Some((answer, gz.len()))
    }
}

/// Nanoseconds since the Unix epoch, as the queue stamps entries.
fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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
            .map_or(jittered, |d| {
                backoff::after_retry_after(
                    d.max(c.min_backoff),
                    c.max_backoff,
                    rand::random::<f64>(),
                )
            }),
        // Credentials or bucket wrong: nothing changes until someone fixes
        // the config, so retry at the slowest pace (a reload wakes us).
        (Verdict::Unauthorized, _) => c.max_backoff,
        _ => jittered,
    }
}

/// The answer's message as logged and shown in status (shortened).
fn message(answer: &Answer) -> String {
    match answer {
        Answer::Status { message, .. } => answer::shorten(message),
        Answer::Transport(m) => answer::shorten(m),
    }
}

/// `lines` cut into runs of whole lines of at most `max` bytes (a longer
/// line alone), in order.
fn pieces(lines: &[u8], max: usize) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for r in line_ranges(lines) {
        if r.end - start > max && end > start {
            out.push(start..end);
            start = end;
        }
        end = r.end;
    }
    if end < lines.len() {
        end = lines.len();
    }
    if end > start {
        out.push(start..end);
    }
    out
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
        Answer::with_status(code, "")
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
    fn refusals_about_the_server_are_retried() {
        let answer = |code: u16, body: &[u8]| {
            let text = answer::message_of(body);
            Answer::Status {
                code,
                detail: answer::read_detail(body, &text),
                message: text,
                retry_after: None,
            }
        };
        let wal_full =
            br#"{"code":"invalid","message":"error from wal: wal buffer full, please try again"}"#;
        assert_eq!(classify(&answer(400, wal_full)), Verdict::Retry);
        let bad = br#"{"code":"invalid","message":"unable to parse 'm v=': missing field value"}"#;
        assert_eq!(classify(&answer(422, bad)), Verdict::Refused);
    }

    fn delivery(whole: Range<usize>) -> Delivery {
        Delivery {
            settlement: Settlement::default(),
            whole: whole.clone(),
            cut: false,
            pending: vec![whole],
            counted: Vec::new(),
            evidence: Evidence::default(),
            suspect: None,
        }
    }

    #[test]
    fn cutting_named_lines_moves_every_later_range() {
        let mut lines = b"a\nb\nc\nd\n".to_vec();
        let mut d = delivery(0..8);
        d.split(&(0..8), &lines);
        d.counted.push(Counted {
            part: 0..8,
            left: 2,
        });
        assert_eq!(d.pending, vec![4..8, 0..4]);
        // Line 2 of the part 0..4 ("b") is named refused.
        let named = answer::named_lines(
            &lines[0..4],
            &answer::Detail {
                lines: vec![2],
                ..Default::default()
            },
        )
        .unwrap();
        d.found(0, 1);
        d.cut_out(&mut lines, &(0..4), &named);
        assert_eq!(lines, b"a\nc\nd\n");
        assert_eq!(d.pending, vec![2..6, 0..2]);
        assert_eq!((d.counted[0].part.clone(), d.counted[0].left), (0..6, 1));
        assert_eq!(d.whole, 0..6);
        assert!(d.cut);
        d.drop_finished();
        assert_eq!(d.pending.len(), 2, "one refused line is still to be found");
        // The second is found in "a": the rest of the counted part was written.
        d.pending.pop();
        d.found(0, 1);
        d.drop_finished();
        assert!(d.pending.is_empty(), "{:?}", d.pending);
        assert!(d.counted.is_empty());
    }

    #[test]
    fn a_finished_count_leaves_parts_outside_it_pending() {
        let mut d = delivery(0..100);
        d.pending = vec![50..100, 30..50, 20..30];
        d.counted.push(Counted {
            part: 0..50,
            left: 1,
        });
        d.found(25, 1);
        d.drop_finished();
        assert_eq!(d.pending, vec![50..100]);
        d.counted.push(Counted {
            part: 50..100,
            left: 3,
        });
        d.found(10, 1);
        d.drop_finished();
        assert_eq!(
            d.pending,
            vec![50..100],
            "a line outside a count does not count"
        );
        d.restart();
        assert_eq!(d.pending, vec![0..100]);
        assert!(d.counted.is_empty());
    }

    #[test]
    fn pieces_hold_whole_lines_up_to_the_limit() {
        let lines = b"aa\nbb\ncc\ndddddd\ne\n";
        assert_eq!(pieces(lines, 6), vec![0..6, 6..9, 9..16, 16..18]);
        assert_eq!(pieces(lines, 100), vec![0..18]);
        assert_eq!(pieces(lines, 1), vec![0..3, 3..6, 6..9, 9..16, 16..18]);
        // Bytes after the last newline stay with the piece before them.
        assert_eq!(pieces(b"x\ny", 2), vec![0..3]);
        assert!(pieces(b"", 5).is_empty());
    }

    #[test]
    fn line_ranges_cover_each_line() {
        assert_eq!(line_ranges(b"ab\nc\n\n"), vec![0..3, 3..5, 5..6]);
        assert!(line_ranges(b"").is_empty());
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
            probe_interval: Duration::from_secs(10),
            drop_non_retryable_data: false,
            priority: 5,
            max_in_flight: 1,
            live_window: None,
            batch_wait: None,
            evict_above: None,
            max_age: None,
        };
        let throttled = |v: &str| Answer::Status {
            code: 429,
            message: String::new(),
            retry_after: Some(v.into()),
            detail: answer::Detail::default(),
        };
        // What the remote asked, plus up to a second at random.
        let within =
            |d: Duration, asked: Duration| d >= asked && d < asked + backoff::RETRY_AFTER_SPREAD;
        let d = wait_for(&c, Verdict::Throttled, &throttled("7"), 1);
        assert!(within(d, Duration::from_secs(7)), "{d:?}");
        assert_eq!(
            wait_for(&c, Verdict::Throttled, &throttled("7000"), 1),
            Duration::from_secs(60)
        );
        let d = wait_for(&c, Verdict::Throttled, &throttled("0"), 1);
        assert!(within(d, c.min_backoff), "{d:?}");
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(30));
        let d = wait_for(&c, Verdict::Throttled, &throttled(&past), 1);
        assert!(within(d, c.min_backoff), "{d:?}");
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
