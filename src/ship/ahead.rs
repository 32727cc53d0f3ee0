//! Sending ahead: more than one request in flight on a link whose answers
//! are slow to come back.
//!
//! On a satellite link a request spends most of its time waiting for the
//! answer (600 ms of round trip against a few ms of sending at 1 Mbit/s for
//! a 500 kB batch that compresses tenfold), so one request at a time leaves
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
//! of them never hold the same point (bucket, series, timestamp), which
//! the later write must win: a batch that shares one with a batch in flight
//! is not sent ahead ([`InFlight`]). Nothing is sent ahead on a capped or
//! budgeted link: its bytes are what is scarce, and a batch sent ahead of
//! one that then fails goes twice.

use std::collections::HashSet;
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

/// The points of the batches in flight together, as hashes of (bucket,
/// series, timestamp). Two distinct points that hash alike only keep a
/// batch from going ahead.
pub struct InFlight {
    hasher: RandomState,
    keys: HashSet<u64>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            hasher: RandomState::new(),
            keys: HashSet::new(),
        }
    }
}

impl InFlight {
    /// Admits the batch of `bucket` holding `lines` (whole, normalised) to
    /// be in flight beside those admitted before: false, and nothing
    /// recorded, if it holds a point one of them holds.
    pub fn admit(&mut self, bucket: &str, lines: &[u8]) -> bool {
        let mine: Vec<u64> = lineproto::points(lines)
            .map(|p| {
                self.hasher
                    .hash_one((bucket, lineproto::series_and_time(p)))
            })
            .collect();
        if mine.iter().any(|k| self.keys.contains(k)) {
            return false;
        }
        self.keys.extend(mine);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::answer::Detail;

    fn status(code: u16, message: &str) -> Answer {
        Answer::Status {
            code,
            message: message.into(),
            retry_after: None,
            detail: Detail::default(),
        }
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
}
