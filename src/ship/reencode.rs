//! Whether a batch's stored segments are compressed again before they go.
//!
//! Writes of 32 KiB and more are deflated when they are queued, at
//! [`INGEST_LEVEL`] rather than the replication's `gzip_level`: compression
//! was most of the ingest path's CPU at level 6, and a low level is several
//! times faster for a quarter or so more bytes (`cargo bench --bench
//! lineproto` has the table per mix). Sent as stored, those bytes cross the
//! link; compressed again at `gzip_level`, they cost the one shipping worker
//! CPU. So the worker compresses again where the link bounds the drain and
//! sends as stored where it does itself: it keeps the CPU time one byte of
//! lines takes to compress at `gzip_level` (measured when it does) and the
//! time one byte of lines takes from request to answer (every delivered
//! request of at least [`MIN_SAMPLE`] bytes of lines), and compresses again
//! while doing so is at most [`ON_SHARE`] of a batch's time, stopping above
//! [`OFF_SHARE`] (apart, so that noise does not flip it every batch). Until
//! both are known it compresses again: a byte saved on a link of unknown
//! cost is worth more than a few milliseconds of CPU.
//!
//! A capped or budgeted link does more (series order at level 9: the
//! shipper's `THRIFTY_GZIP_LEVEL`), whatever these figures say.
//!
//! Pure: the caller measures and passes durations in.

use std::time::Duration;

/// The gzip level writes are deflated at when queued (never above the
/// replication's own `gzip_level`).
pub const INGEST_LEVEL: u32 = 2;

/// Requests with fewer bytes of lines than this say more about the round
/// trip than about the link's cost per byte, and are not counted.
pub const MIN_SAMPLE: usize = 32 << 10;

/// Compress again while compressing is at most this share of a batch's time.
pub const ON_SHARE: f64 = 0.10;
/// Stop compressing again once it is more than this share.
pub const OFF_SHARE: f64 = 0.20;

/// Weight of the newest sample in each moving average.
const WEIGHT: f64 = 0.25;

/// What the worker has measured, and its decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reencode {
    /// CPU seconds per byte of lines compressed at `gzip_level`.
    compress: Option<f64>,
    /// Seconds per byte of lines from request to answer.
    request: Option<f64>,
    on: bool,
}

impl Default for Reencode {
    fn default() -> Reencode {
        Reencode {
            compress: None,
            request: None,
            on: true,
        }
    }
}

impl Reencode {
    /// Whether the next batch's stored segments are compressed again.
    pub fn wanted(&self) -> bool {
        self.on
    }

    /// The share of a batch's time compressing again would take, once known.
    pub fn share(&self) -> Option<f64> {
        let (c, r) = (self.compress?, self.request?);
        if c + r <= 0.0 {
            return None;
        }
        Some(c / (c + r))
    }

    /// `bytes` of lines took `took` to compress at `gzip_level`.
    pub fn compressed(&mut self, bytes: usize, took: Duration) {
        if bytes > 0 {
            self.compress = Some(average(self.compress, per_byte(bytes, took)));
            self.decide();
        }
    }

    /// A request with `bytes` of lines was answered 2xx `took` after it
    /// began (its body compressed already).
    pub fn requested(&mut self, bytes: usize, took: Duration) {
        if bytes >= MIN_SAMPLE {
            self.request = Some(average(self.request, per_byte(bytes, took)));
            self.decide();
        }
    }

    fn decide(&mut self) {
        if let Some(share) = self.share() {
            if self.on && share > OFF_SHARE {
                self.on = false;
            } else if !self.on && share <= ON_SHARE {
                self.on = true;
            }
        }
    }
}

fn per_byte(bytes: usize, took: Duration) -> f64 {
    took.as_secs_f64() / bytes as f64
}

fn average(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |old| old + WEIGHT * (new - old))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: usize = 500_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn compresses_again_until_it_knows_better() {
        let mut r = Reencode::default();
        assert!(r.wanted());
        r.compressed(BATCH, ms(4));
        assert!(r.wanted(), "the link's cost is not known yet");
        assert_eq!(r.share(), None);
    }

    #[test]
    fn a_slow_link_keeps_it_on() {
        let mut r = Reencode::default();
        for _ in 0..20 {
            r.compressed(BATCH, ms(4));
            // 100 kB at 1 Mbit/s.
            r.requested(BATCH, ms(800));
            assert!(r.wanted());
        }
        assert!(r.share().unwrap() < 0.01);
    }

    #[test]
    fn a_fast_link_turns_it_off_and_a_slow_one_back_on() {
        let mut r = Reencode::default();
        r.compressed(BATCH, ms(4));
        // The remote answers in about the time compressing took.
        r.requested(BATCH, ms(5));
        assert!(!r.wanted(), "share {:?}", r.share());
        // The link slows down: the averages follow within a few batches.
        let mut batches = 0;
        while !r.wanted() {
            r.requested(BATCH, ms(400));
            batches += 1;
            assert!(batches < 5, "still off: share {:?}", r.share());
        }
    }

    #[test]
    fn between_the_thresholds_it_keeps_its_state() {
        // Compressing is 15 % of a batch's time: on stays on, off stays off.
        let mut on = Reencode::default();
        on.compressed(BATCH, ms(15));
        on.requested(BATCH, ms(85));
        assert!(on.wanted());
        let mut off = Reencode::default();
        off.compressed(BATCH, ms(15));
        off.requested(BATCH, ms(10));
        assert!(!off.wanted());
        for _ in 0..30 {
            off.requested(BATCH, ms(85));
        }
        assert!((off.share().unwrap() - 0.15).abs() < 0.01);
        assert!(!off.wanted());
    }

    #[test]
    fn small_requests_are_not_samples() {
        let mut r = Reencode::default();
        r.compressed(BATCH, ms(4));
        r.requested(MIN_SAMPLE - 1, ms(0));
        assert_eq!(r.share(), None);
        assert!(r.wanted());
        r.requested(MIN_SAMPLE, ms(0));
        assert!(!r.wanted());
    }
}
