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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use flate2::write::GzEncoder;
use flate2::Compression;
use log::{debug, error, info, warn};

use crate::queue::{Batch, Queue, QueueError, ReplHandle, Settlement, Signal};
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

/// Stop flag and wake-up signal shared by the agent and a worker.
#[derive(Debug, Default)]
pub struct Control {
    stop: AtomicBool,
    pub wake: Signal,
}

impl Control {
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
}

pub struct Worker {
    pub queue: Arc<Queue>,
    pub repl: Arc<ReplHandle>,
    pub status: Arc<ReplStatus>,
    pub client: Client,
    pub config: ShipConfig,
    pub control: Arc<Control>,
}

impl Worker {
    pub fn spawn(self) -> std::io::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name(format!("ship-{}", self.repl.name))
            .spawn(move || self.run())
    }

    fn run(self) {
        let name = &self.repl.name;
        let mut lines = Vec::new();
        let mut attempt: u32 = 0;
        debug!("replication \"{name}\": worker started");
        while !self.control.stopped() {
            let seen = self.repl.data.generation();
            let split = self.config.remote_bucket.is_none();
            let batch = match self.queue.read_batch(&self.repl, self.config.batch_size, split, &mut lines) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.set_state(State::Running, None);
                    self.repl.data.wait_past(seen, Duration::from_secs(1));
                    continue;
                }
                Err(QueueError::Corrupt { seq, why, .. }) => {
                    error!("replication \"{name}\": entry {seq} is corrupt ({why}); setting it aside");
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
            let body = gzip(&lines, self.config.gzip_level);
            let bucket = self.config.remote_bucket.as_deref().unwrap_or(&batch.bucket);
            let url = self.client.write_url(bucket);
            // Retry this batch until it is settled or we are told to stop.
            loop {
                if self.control.stopped() {
                    break;
                }
                let answer = self.client.post(&url, &body);
                let verdict = classify(&answer);
                if verdict == Verdict::Delivered {
                    if self.settle(&batch, body.len()).is_err() {
                        return;
                    }
                    attempt = 0;
                    break;
                }
                attempt = attempt.saturating_add(1);
                let wait = self.wait_for(verdict, &answer, attempt);
                self.record_failure(&answer, verdict, wait, &batch);
                self.sleep(wait);
            }
        }
        debug!("replication \"{name}\": worker stopped");
    }

    fn wait_for(&self, verdict: Verdict, answer: &Answer, attempt: u32) -> Duration {
        let c = &self.config;
        let jittered = backoff::delay(attempt, c.min_backoff, c.max_backoff, rand::random::<f64>());
        match (verdict, answer) {
            (
                Verdict::Throttled,
                Answer::Status {
                    retry_after: Some(v), ..
                },
            ) => backoff::retry_after(v, SystemTime::now(), c.max_backoff).unwrap_or(jittered),
            // Credentials or bucket wrong: nothing changes until someone fixes
            // the config, so retry at the slowest pace (a reload wakes us).
            (Verdict::Unauthorized, _) => c.max_backoff,
            _ => jittered,
        }
    }

    fn settle(&self, batch: &Batch, sent_bytes: usize) -> Result<(), QueueError> {
        match self.queue.settle(&self.repl, batch, Settlement::default()) {
            Ok(()) => {
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
                Ok(())
            }
            Err(e) => {
                // Delivered but not settled: the batch is sent again later,
                // which the remote treats as an overwrite.
                error!("replication \"{}\": cannot settle a delivered batch: {e}", self.repl.name);
                Err(e)
            }
        }
    }

    fn record_failure(&self, answer: &Answer, verdict: Verdict, wait: Duration, batch: &Batch) {
        let (code, message) = match answer {
            Answer::Status { code, message, .. } => (Some(*code), message.clone()),
            Answer::Transport(m) => (None, m.clone()),
        };
        let state = if verdict == Verdict::Unauthorized {
            State::Paused
        } else {
            State::Backoff
        };
        let mut s = self.status.ship.lock().unwrap();
        let changed = s.latest_error != message || s.state != state;
        *s.errors.entry(code.map_or("transport".into(), |c| c.to_string())).or_default() += 1;
        s.latest_code = code;
        s.latest_error = message.clone();
        s.state = state;
        s.next_retry = Some(SystemTime::now() + wait);
        drop(s);
        // Log once per change of cause, not once per attempt.
        if changed {
            warn!(
                "replication \"{}\": {} ({} lines waiting in this batch); {} in {:.1}s",
                self.repl.name,
                message,
                batch.lines,
                if state == State::Paused { "paused, retrying" } else { "retrying" },
                wait.as_secs_f64()
            );
        }
    }

    fn set_state(&self, state: State, next_retry: Option<SystemTime>) {
        let mut s = self.status.ship.lock().unwrap();
        s.state = state;
        s.next_retry = next_retry;
    }

    /// Sleeps up to `d`; a stop or a reload wakes it early.
    fn sleep(&self, d: Duration) {
        let seen = self.control.wake.generation();
        if !self.control.stopped() {
            self.control.wake.wait_past(seen, d);
        }
    }
}

/// Compresses a batch into one gzip member.
pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::with_capacity(data.len() / 4 + 64), Compression::new(level));
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
            (302, Verdict::Retry),
        ] {
            assert_eq!(classify(&status(code)), v, "status {code}");
        }
        assert_eq!(classify(&Answer::Transport("reset".into())), Verdict::Retry);
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let data = b"m f=1 1\n".repeat(1000);
        let gz = gzip(&data, 6);
        assert!(gz.len() < data.len() / 10);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }
}
