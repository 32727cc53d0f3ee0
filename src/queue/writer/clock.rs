//! Entries the clock guard holds (entry version 3, see [`crate::clock`]):
//! releasing them once the guard lets them go.
//!
//! A held entry stays in the main log where it was queued, and the worker
//! reads nothing from it on (`Queue::read_log` stops before it), so the
//! lines keep the order they came in. Releasing one rewrites it, in place,
//! as an ordinary entry:
//! - a line the agent stamped (its time is the anchor's `stamp_ns`) gets
//!   the wall time of its arrival as the clock tells it now: the anchor's
//!   time since boot plus the clock's offset in that boot. An entry of an
//!   earlier boot uses the offset that boot recorded (`schema::boot_key`),
//!   if the guard let go in it; otherwise its stamped lines cannot be dated
//!   and are set aside with reason `clock`;
//! - a line stamped before the build date (unless `send_before_build`) is
//!   set aside with reason `clock`;
//! - the replication's transform, which a held write skipped, applies now;
//! - the enqueue time becomes the arrival's too (else the release's).
//!
//! Lines and bytes queued, set aside and filtered are counted in the same
//! transaction; `Meta::clock_held` counts the held entries left.
//!
//! While any entry is held, housekeeping records the offset of this boot
//! once the guard lets go ([`Writer::keep_boot_offsets`]), before a worker
//! reaches the entries: a reboot then still finds it. Once nothing is
//! held, every boot's offset is forgotten.

use heed::RwTxn;
use log::{info, warn};

use super::append::prepare;
use super::log::head_enqueued;
use super::Writer;
use crate::clock::{self, Anchor};
use crate::queue::entry;
use crate::queue::schema::{boot_key, key_range, Log, BOOT_KEYS};
use crate::queue::QueueError;

/// A release rewrites at most this many bytes of lines in one transaction;
/// the worker asks again for the rest.
const RELEASE_BYTES: usize = 4 << 20;

/// Why lines held for the clock are set aside.
const STAMPED_REASON: &str =
    "clock: stamped on arrival while the clock was not synchronised, and the board restarted before it was; their time is unknown";
const BEFORE_BUILD_REASON: &str =
    "clock: timestamp before this agent's build date (set [clock] send_before_build = true to send such lines)";

/// What a release did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Released {
    /// Held entries rewritten (or emptied).
    pub entries: u64,
    /// Lines given the time of their arrival.
    pub restamped: u64,
    /// Lines set aside with reason `clock`.
    pub set_aside: u64,
}

impl Writer {
    /// Releases the held entries of `id`'s main log from its head on, as
    /// far as the guard lets them go and [`RELEASE_BYTES`] allows. `now` is
    /// the wall time (ns) of the transaction.
    pub(super) fn release_clock(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        now: u64,
    ) -> Result<Released, QueueError> {
        let mut done = Released::default();
        if self.state(id).meta.clock_held == 0 {
            return Ok(done);
        }
        let shared = self.shared.clone();
        let this_boot = clock::boot_id();
        let offset_now = self.record_offset(wtxn)?;
        let earliest = clock::earliest_sent();
        let log = Log::Main(id);
        let (head, next_seq) = {
            let m = &self.state(id).meta;
            (m.head.seq, m.next_seq)
        };
        // The held entries to release, in order, read first: the loop below
        // rewrites the database it would be reading.
        let mut held: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut bytes = 0usize;
        let mut seen_all = true;
        let (lo, hi) = (log.key(head), log.key(next_seq));
        for item in shared.entries.range(wtxn, &key_range(&lo, &hi))? {
            let (key, raw) = item?;
            if bytes >= RELEASE_BYTES {
                seen_all = false;
                break;
            }
            // A damaged entry is the worker's to set aside when it reaches it.
            let Ok(e) = entry::decode(raw) else {
                seen_all = false;
                break;
            };
            if let Some(a) = e.clock {
                if a.boot == this_boot && offset_now.is_none() {
                    // Still held, and so is everything after it.
                    seen_all = false;
                    break;
                }
                bytes += e.payload.len();
                held.push((log.seq(key), raw.to_vec()));
            }
        }
        if held.is_empty() && seen_all {
            // No held entry is left (one may have been set aside as
            // damaged, or evicted): the count says so again.
            self.state_mut(id).meta.clock_held = 0;
        }
        for (seq, raw) in held {
            let e = entry::decode_unchecked(&raw).expect("decoded above");
            let a = e.clock.expect("held");
            let offset = if a.boot == this_boot {
                offset_now
            } else {
                shared
                    .meta
                    .get(wtxn, &boot_key(&a.boot))?
                    .and_then(|v| Some(i64::from_le_bytes(v.try_into().ok()?)))
            };
            let r = restamp(e.payload, &a, offset, earliest);
            let arrived = offset.map(|o| o.saturating_add(a.boot_ns as i64));
            let enqueued = arrived.map_or(now, |t| t.max(0) as u64);
            let bucket = e.bucket.to_string();
            let key = log.key(seq);
            shared.entries.delete(wtxn, &key)?;
            let st = self.state_mut(id);
            st.meta.c.unqueue(e.lines as u64, e.payload.len() as u64);
            st.meta.clock_held = st.meta.clock_held.saturating_sub(1);
            let transform = st.spec.transform.clone();
            let p = prepare(transform.as_deref(), &r.kept, r.kept_lines, now as i64);
            if let Some((deltas, folded)) = p.windows {
                self.fold_into_windows(wtxn, id, &bucket, deltas, folded)?;
            } else if p.lines > 0 {
                self.put_entry(wtxn, id, seq, &bucket, &p.payload, p.lines, enqueued)?;
            }
            self.state_mut(id).meta.c.filtered_lines += p.filtered;
            for (lines, text, reason) in [
                (r.stamped_aside, &r.stamped_text, STAMPED_REASON),
                (r.early_aside, &r.early_text, BEFORE_BUILD_REASON),
            ] {
                if lines == 0 {
                    continue;
                }
                let rec = entry::encode(now, lines as u32, &bucket, text);
                self.add_dead(wtxn, id, reason, &rec, lines, text.len() as u64)?;
                self.state_mut(id).meta.c.dead_lettered_lines += lines;
                warn!(
                    "replication \"{}\": {lines} lines set aside in the dead-letter store: {reason}",
                    self.state(id).spec.name
                );
            }
            done.entries += 1;
            done.restamped += r.restamped;
            done.set_aside += r.stamped_aside + r.early_aside;
        }
        let st = self.state(id);
        let meta = st.meta;
        let oldest = head_enqueued(&shared, wtxn, id, &meta)?;
        self.state_mut(id).meta.c.oldest_enqueued_ns = oldest;
        if done.restamped > 0 {
            clock::note_restamped(done.restamped);
            info!(
                "replication \"{}\": {} lines stamped while the clock was not synchronised now carry the time they arrived",
                self.state(id).spec.name,
                done.restamped
            );
        }
        Ok(done)
    }

    /// Housekeeping: while any replication holds entries for the clock,
    /// records this boot's offset as soon as the guard lets go, so that
    /// entries a worker has not reached yet can still be dated after a
    /// reboot; once none does, forgets every boot's.
    pub(super) fn keep_boot_offsets(&mut self, wtxn: &mut RwTxn) -> Result<(), QueueError> {
        if self.states.values().any(|s| s.meta.clock_held > 0) {
            self.record_offset(wtxn)?;
        } else if self.boot_offsets {
            let (lo, hi) = BOOT_KEYS;
            self.shared.meta.delete_range(wtxn, &key_range(lo, hi))?;
            self.boot_offsets = false;
        }
        Ok(())
    }

    /// The clock's offset now (`None` while the guard holds), recorded as
    /// this boot's.
    fn record_offset(&mut self, wtxn: &mut RwTxn) -> Result<Option<i64>, QueueError> {
        let offset = clock::offset();
        if let Some(o) = offset {
            self.shared
                .meta
                .put(wtxn, &boot_key(&clock::boot_id()), &o.to_le_bytes())?;
            if !self.offset_recorded {
                info!("the clock guard lets go: lines held for the clock get the time they arrived as each replication reaches them");
            }
            self.offset_recorded = true;
            self.boot_offsets = true;
        }
        Ok(offset)
    }

    /// Writes a released entry at `seq` of `id`'s main log (where the held
    /// one was), counting it queued.
    #[allow(clippy::too_many_arguments)]
    fn put_entry(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        seq: u64,
        bucket: &str,
        lines: &[u8],
        count: u64,
        enqueued: u64,
    ) -> Result<(), QueueError> {
        let bytes = entry::encode(enqueued, count as u32, bucket, lines);
        self.shared
            .entries
            .put(wtxn, &Log::Main(id).key(seq), &bytes)?;
        let c = &mut self.state_mut(id).meta.c;
        c.queued_lines += count;
        c.queued_bytes += lines.len() as u64;
        Ok(())
    }
}

/// A held entry's lines, sorted out.
#[derive(Debug, Default, PartialEq, Eq)]
struct Restamped {
    /// What goes on, in order.
    kept: Vec<u8>,
    kept_lines: u64,
    /// Of those, lines given their arrival time.
    restamped: u64,
    /// Stamped lines whose arrival cannot be dated.
    stamped_text: Vec<u8>,
    stamped_aside: u64,
    /// Lines stamped before `earliest`.
    early_text: Vec<u8>,
    early_aside: u64,
}

/// Sorts `lines` (whole, normalised points) of an entry held with `a`: a
/// point stamped `a.stamp_ns` was stamped by the agent and gets its arrival
/// time (`offset` plus `a.boot_ns`), or is set aside without an offset; one
/// stamped before `earliest` is set aside; the others go on unchanged.
fn restamp(lines: &[u8], a: &Anchor, offset: Option<i64>, earliest: i64) -> Restamped {
    let mut r = Restamped::default();
    let arrived = offset.map(|o| o.saturating_add(a.boot_ns as i64));
    for p in crate::lineproto::points(lines) {
        let (_, ts) = crate::lineproto::series_and_time(p);
        if ts == a.stamp_ns {
            match arrived {
                Some(t) => {
                    let body = p.strip_suffix(b"\n").unwrap_or(p);
                    let cut = body.iter().rposition(|&c| c == b' ').map_or(0, |k| k + 1);
                    r.kept.extend_from_slice(&body[..cut]);
                    r.kept.extend_from_slice(t.to_string().as_bytes());
                    r.kept.push(b'\n');
                    r.kept_lines += 1;
                    r.restamped += 1;
                }
                None => {
                    r.stamped_text.extend_from_slice(p);
                    r.stamped_aside += 1;
                }
            }
        } else if ts < earliest {
            r.early_text.extend_from_slice(p);
            r.early_aside += 1;
        } else {
            r.kept.extend_from_slice(p);
            r.kept_lines += 1;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILT: i64 = 1_790_000_000_000_000_000;

    fn anchor(stamp_ns: i64) -> Anchor {
        Anchor {
            boot: [1; 16],
            boot_ns: 5_000_000_000,
            stamp_ns,
        }
    }

    #[test]
    fn stamped_lines_get_their_arrival_and_others_keep_theirs() {
        // Stamped at 1970 + 300 s; the writer's own line is after the build.
        let lines = format!(
            "m,h=a v=1 300000000000\nm,h=b s=\"x y\" 300000000000\nm,h=c v=3 {}\n",
            BUILT + 7
        );
        let offset = BUILT + 1_000_000_000_000;
        let r = restamp(
            lines.as_bytes(),
            &anchor(300_000_000_000),
            Some(offset),
            BUILT,
        );
        let t = offset + 5_000_000_000;
        assert_eq!(
            String::from_utf8(r.kept).unwrap(),
            format!(
                "m,h=a v=1 {t}\nm,h=b s=\"x y\" {t}\nm,h=c v=3 {}\n",
                BUILT + 7
            )
        );
        assert_eq!((r.kept_lines, r.restamped), (3, 2));
        assert_eq!((r.stamped_aside, r.early_aside), (0, 0));
    }

    #[test]
    fn without_an_offset_stamped_lines_are_set_aside() {
        let lines = format!("a v=1 42\nb v=2 {}\n", BUILT + 1);
        let r = restamp(lines.as_bytes(), &anchor(42), None, BUILT);
        assert_eq!(r.stamped_text, b"a v=1 42\n");
        assert_eq!((r.stamped_aside, r.kept_lines, r.restamped), (1, 1, 0));
        assert_eq!(r.kept, format!("b v=2 {}\n", BUILT + 1).into_bytes());
    }

    #[test]
    fn lines_stamped_before_the_build_are_set_aside_unless_sent() {
        let lines = format!("a v=1 1000\nb v=2 {BUILT}\n");
        let stamp = BUILT + 99;
        let r = restamp(lines.as_bytes(), &anchor(stamp), Some(0), BUILT);
        assert_eq!(
            (r.early_text.as_slice(), r.early_aside),
            (&b"a v=1 1000\n"[..], 1)
        );
        assert_eq!(r.kept, format!("b v=2 {BUILT}\n").into_bytes());
        let r = restamp(lines.as_bytes(), &anchor(stamp), Some(0), i64::MIN);
        assert_eq!((r.early_aside, r.kept_lines), (0, 2));
    }
}
