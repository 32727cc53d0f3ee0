//! Sending ahead: more than one request in flight on a link whose answers
//! are slow to come back.
//!
//! On a satellite link a request spends most of its time waiting for the
//! answer (a 600 ms round trip, against some 40 ms to send a 500 kB batch
//! that compresses tenfold at 10 Mbit/s), so one request at a time leaves
//! the link idle most of the time. When the last request's answer took at
//! least [`WAIT`] after its body had gone, the worker reads the batches that
//! follow the one it delivers and sends up to `max_in_flight - 1` of them
//! at the same time, one attempt each, on connections of their own.
//!
//! Settlement stays in queue order, whatever order the answers come back
//! in: the batch at the head is delivered as always (retries, splits,
//! bisection), and a batch sent ahead is settled after it only if its own
//! single attempt was accepted whole (a 2xx with nothing in its body).
//! Anything else, or a batch before it that did not settle, and it is read
//! and sent again in the ordinary way: the remote overwrites what it already
//! has, as after a crash. An answer held in memory is never more than that:
//! a crash before settlement resends, and nothing is counted delivered
//! before its settlement commits.
//!
//! The remote may apply requests in flight together in any order, so two
//! of them never write the same point (bucket, series, timestamp) with
//! different lines, where the later write must win: a batch that does so
//! with a batch in flight is not sent ahead ([`InFlight`]). The same line
//! twice (a writer that resent it) may arrive in either order.
//!
//! Nothing is sent ahead on a capped or budgeted link: its bytes are what
//! is scarce, and a batch sent ahead of one that then fails goes twice. Nor
//! while eviction or expiry is near the head (the worker's `removal_far`):
//! a batch sent ahead of one whose lines were removed meanwhile is
//! forgotten, and its own lines, removed in turn, would count as dropped
//! though the remote has them.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use super::client::Answer;
use crate::lineproto;

/// The least wait for an answer, after a body has gone, that makes the
/// worker send ahead: a link's round trip (and the remote's time to write),
/// not a local remote's few milliseconds.
pub const WAIT: Duration = Duration::from_millis(50);

/// Whether the worker sends batches ahead of the next one: more than one
/// request is allowed, the link is neither capped nor budgeted, and the last
/// batch delivered waited at least [`WAIT`] for its answer.
pub fn wanted(max_in_flight: usize, limited: bool, last_wait: Option<Duration>) -> bool {
    max_in_flight > 1 && !limited && last_wait.is_some_and(|w| w >= WAIT)
}

/// Whether a batch sent ahead can be settled on this answer: a 2xx that
/// says nothing. A 2xx with a body may report a partial write, which the
/// ordinary path reads; the batch is then sent again to be read there.
pub fn accepted_whole(answer: &Answer) -> bool {
    matches!(answer, Answer::Status { code: 200..=299, message, .. } if message.is_empty())
}

/// The points of the batches in flight together: by a hash of (bucket,
/// series, timestamp), a hash of the line that wrote it, or `None` once
/// lines differing for it were seen. The same line sent twice (a writer
/// that resends) may go in any order; a different one may not. Two
/// distinct points that hash alike only keep a batch from going ahead (two
/// different lines of one point hashing alike, one chance in 2^64, would
/// let it go).
pub struct InFlight {
    hasher: RandomState,
    points: HashMap<u64, Option<u64>>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            hasher: RandomState::new(),
            points: HashMap::new(),
        }
    }
}

impl InFlight {
    /// Admits the batch of `bucket` holding `lines` (whole, normalised) to
    /// be in flight beside those admitted before: false, and nothing
    /// recorded, if it writes a point one of them writes, with another line.
    pub fn admit(&mut self, bucket: &str, lines: &[u8]) -> bool {
        let mine: Vec<(u64, u64)> = lineproto::points(lines)
            .map(|p| {
                let point = (bucket, lineproto::series_and_time(p));
                (self.hasher.hash_one(point), self.hasher.hash_one(p))
            })
            .collect();
        let clash = mine
            .iter()
            .any(|(k, line)| self.points.get(k).is_some_and(|had| *had != Some(*line)));
        if clash {
            return false;
        }
        for (k, line) in mine {
            self.points
                .entry(k)
                .and_modify(|had| {
                    if *had != Some(line) {
                        *had = None;
                    }
                })
                .or_insert(Some(line));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str) -> Answer {
        Answer::with_status(code, message)
    }

    #[test]
    fn sends_ahead_only_after_a_slow_answer_on_an_unmetered_link() {
        let slow = Some(Duration::from_millis(600));
        assert!(wanted(2, false, slow));
        assert!(wanted(2, false, Some(WAIT)));
        assert!(!wanted(1, false, slow), "max_in_flight = 1");
        assert!(!wanted(2, true, slow), "capped or budgeted");
        assert!(!wanted(2, false, Some(Duration::from_millis(3))), "a LAN");
        assert!(
            !wanted(2, false, None),
            "the last batch failed or none went"
        );
    }

    #[test]
    fn only_a_plain_2xx_settles_a_batch_sent_ahead() {
        assert!(accepted_whole(&status(204, "")));
        assert!(accepted_whole(&status(200, "")));
        assert!(!accepted_whole(&status(204, "partial write: dropped=1")));
        assert!(!accepted_whole(&status(500, "")));
        assert!(!accepted_whole(&status(413, "")));
        assert!(!accepted_whole(&Answer::Transport("reset".into())));
    }

    #[test]
    fn a_point_in_flight_keeps_a_batch_that_rewrites_it_back() {
        let mut f = InFlight::default();
        assert!(f.admit("a", b"m,t=1 v=1 100\nm,t=1 v=2 200\n"));
        // Other times, series or buckets are other points.
        assert!(f.admit("a", b"m,t=1 v=3 300\nm,t=2 v=1 100\n"));
        assert!(f.admit("b", b"m,t=1 v=9 100\n"));
        // The same series and time with another value: the order matters.
        assert!(!f.admit("a", b"x v=1 5\nm,t=1 v=7 200\n"));
        // Refused whole: its other point was not recorded.
        assert!(f.admit("a", b"x v=1 5\n"));
        // A string value holding a newline is one point.
        assert!(f.admit("a", b"s v=\"a\nb\" 1\n"));
        assert!(!f.admit("a", b"s v=\"c\" 1\n"));
    }

    #[test]
    fn the_same_line_again_may_go_in_any_order() {
        let mut f = InFlight::default();
        assert!(f.admit("a", b"m v=1 100\nm v=1 200\n"));
        assert!(f.admit("a", b"m v=1 100\n"), "a resent line");
        assert!(!f.admit("a", b"m v=2 100\n"));
        // A batch that writes a point twice, differently: its last line
        // wins there, so a batch with either line must wait.
        let mut f = InFlight::default();
        assert!(f.admit("a", b"m v=1 5\nm v=2 5\n"));
        assert!(!f.admit("a", b"m v=1 5\n"));
        assert!(!f.admit("a", b"m v=2 5\n"));
    }
}
