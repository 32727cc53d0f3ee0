//! The logs of a replication (its main log and its held lanes, see
//! `writer::lanes`): appending an entry, and the ways lines leave a log's
//! head: settlement after the remote answered, eviction when the queue is
//! full (`drop_oldest`, oldest head first across the logs), expiry
//! (`max_age`, in every log). Each removal is counted under its cause, in
//! the same transaction as the entries it deletes.

use std::collections::{BTreeSet, VecDeque};
use std::io::Write as _;

use heed::RwTxn;
use log::{debug, warn};

use super::{now_ns, Pos, Settle, Writer};
use crate::queue::entry;
use crate::queue::schema::{key_range, Log, Meta};
use crate::queue::{QueueError, Segment, Shared};

impl Writer {
    /// Appends an entry to `id`'s log, evicting whole oldest entries first
    /// as far as `drop_oldest` needs ([`Writer::evict_oldest`]), and counts
    /// it as queued.
    pub(super) fn push_entry(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        bucket: &str,
        stored: Stored,
        lines: u64,
        now: u64,
    ) -> Result<(), QueueError> {
        let (payload, deflated, anchor) = match stored {
            Stored::Lines(l) => (l, None, None),
            Stored::Segment(seg) => (&seg.data[..], Some(seg.deflated), None),
            Stored::Held(l, a) => (l, None, Some(a)),
        };
        let len = deflated.map_or(payload.len() as u64, |d| d.len as u64);
        self.evict_oldest(wtxn, id, len)?;
        let shared = self.shared.clone();
        // A held destination's lines join its lane, behind those held; lines
        // the clock guard holds stay in the main log until released.
        let lane = match anchor {
            None => self.lane_of(id, bucket),
            Some(_) => None,
        };
        let st = self.state_mut(id);
        let header = match anchor {
            None => entry::header(now, lines as u32, bucket, deflated),
            Some(a) => entry::header_held(now, lines as u32, bucket, a),
        };
        if anchor.is_some() {
            st.meta.clock_held += 1;
        }
        let (log, seq) = match lane {
            Some(l) => (Log::Lane(id, l), st.lanes[&l].rec.next_seq),
            None => (Log::Main(id), st.meta.next_seq),
        };
        shared.db(log).put_reserved(
            wtxn,
            &log.key(seq),
            header.len() + payload.len(),
            |space| {
                space.write_all(&header)?;
                space.write_all(payload)?;
                entry::seal(space.written_mut());
                Ok(())
            },
        )?;
        match lane {
            Some(l) => {
                let ln = st.lanes.get_mut(&l).expect("found above");
                if ln.rec.head.seq >= ln.rec.next_seq {
                    ln.oldest = Some(now);
                }
                ln.rec.next_seq += 1;
                ln.rec.lines += lines;
                ln.rec.bytes += len;
            }
            None => {
                // No entry before it (the log may have gaps where a hold
                // took entries away): it is the oldest.
                if st.meta.c.oldest_enqueued_ns.is_none() {
                    st.meta.c.oldest_enqueued_ns = Some(now);
                }
                st.meta.next_seq += 1;
            }
        }
        st.meta.c.queued_bytes += len;
        st.meta.c.queued_lines += lines;
        Ok(())
    }

    /// Eviction: removes whole entries from the head of `id`'s logs, the
    /// oldest head first (the main log's or a held lane's), counted as
    /// dropped_full, until `len` more bytes fit its bound or the logs are
    /// empty. This is what `when_full = "drop_oldest"` means; with
    /// `reject`, callers refuse an entry that does not fit before it gets
    /// here.
    fn evict_oldest(&mut self, wtxn: &mut RwTxn, id: u32, len: u64) -> Result<(), QueueError> {
        loop {
            let st = self.state(id);
            if st.meta.c.queued_bytes + len <= st.spec.max_bytes {
                return Ok(());
            }
            let mut pick = (st.meta.head.seq < st.meta.next_seq)
                .then(|| (st.meta.c.oldest_enqueued_ns.unwrap_or(0), Log::Main(id)));
            for (l, ln) in &st.lanes {
                let o = ln.oldest.unwrap_or(0);
                if pick.is_none_or(|(p, _)| o < p) {
                    pick = Some((o, Log::Lane(id, *l)));
                }
            }
            let Some((_, log)) = pick else {
                return Ok(());
            };
            self.remove_first(wtxn, id, log, Removal::DroppedFull)?;
        }
    }

    /// Removes the first entry of `log` whole (skipping the sequence
    /// numbers of entries a hold moved away); returns the lines removed.
    fn remove_first(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        log: Log,
        why: Removal,
    ) -> Result<u64, QueueError> {
        let Some((head, next_seq)) = self.bounds(id, log) else {
            return Ok(0);
        };
        let first = first_entry(&self.shared, wtxn, log, head.seq, next_seq)?;
        let to = Pos {
            seq: first.map_or(next_seq, |(seq, _)| seq),
            off: u32::MAX,
        };
        Ok(self.remove_head(wtxn, id, log, to, why)?.0)
    }

    pub(super) fn expire(
        &mut self,
        wtxn: &mut RwTxn,
        now: u64,
        touched: &mut BTreeSet<u32>,
    ) -> Result<(), QueueError> {
        let ids: Vec<u32> = self.states.keys().copied().collect();
        for id in ids {
            let mut logs = vec![Log::Main(id)];
            logs.extend(self.state(id).lanes.keys().map(|l| Log::Lane(id, *l)));
            for log in logs {
                loop {
                    let st = self.state(id);
                    let oldest = match log {
                        Log::Main(_) => st.meta.c.oldest_enqueued_ns,
                        Log::Lane(_, l) => st.lanes.get(&l).and_then(|ln| ln.oldest),
                    };
                    let (Some(max_age), Some(oldest)) = (st.spec.max_age, oldest) else {
                        break;
                    };
                    if now.saturating_sub(oldest) <= max_age.as_nanos() as u64 {
                        break;
                    }
                    let lines = self.remove_first(wtxn, id, log, Removal::Expired)?;
                    touched.insert(id);
                    warn!(
                        "replication \"{}\": {lines} lines older than max_age expired unsent",
                        self.state(id).spec.name
                    );
                }
            }
        }
        Ok(())
    }

    pub(super) fn settle(&mut self, wtxn: &mut RwTxn, s: &Settle) -> Result<(), QueueError> {
        let id = s.repl.id;
        let log = match s.lane {
            0 => Log::Main(id),
            l => Log::Lane(id, l),
        };
        let (lines, bytes) = if s.live {
            self.remove_live(wtxn, id, s.from.seq, s.to.seq)?
        } else {
            self.remove_head(wtxn, id, log, s.to, Removal::Delivered)?
        };
        let set = &s.settlement;
        // Lines evicted while the batch was in flight were counted then; split
        // only what this settlement removed.
        let dead = set.dead_lines.min(lines);
        let dropped = set.dropped_lines.min(lines - dead);
        if dead > 0 {
            let bytes = entry::encode(now_ns(), dead as u32, &set.bucket, &set.dead_letter);
            self.add_dead(
                wtxn,
                id,
                &set.reason,
                &bytes,
                dead,
                set.dead_letter.len() as u64,
            )?;
        }
        let st = self.state_mut(id);
        // The batch's lines that left the queue while it was in flight: the
        // remote has them, except those it refused that could not be set
        // aside above (they are gone, and stay counted as dropped).
        let removed = s.lines.saturating_sub(lines);
        let refused_gone = (set.dead_lines + set.dropped_lines).saturating_sub(dead + dropped);
        // Lanes keep no runs: lines evicted or expired from a lane while in
        // flight stay counted as dropped (an overstatement of loss).
        // Nor do live batches: eviction reaches them only after the whole
        // backlog before them.
        let arrived = match log {
            Log::Main(_) if !s.live => reclaim(&mut st.gone, s.from, s.to, removed, refused_gone),
            _ => Arrived::default(),
        };
        let c = &mut st.meta.c;
        c.delivered_lines -= dead + dropped;
        c.dead_lettered_lines += dead;
        c.dropped_non_retryable_lines += dropped;
        c.delivered_bytes = c
            .delivered_bytes
            .saturating_sub(set.dead_letter.len() as u64);
        if arrived.dropped_full + arrived.expired > 0 {
            c.dropped_full_lines -= arrived.dropped_full;
            c.expired_lines -= arrived.expired;
            c.delivered_lines += arrived.dropped_full + arrived.expired;
            c.delivered_bytes += s.bytes.saturating_sub(bytes);
            debug!(
                "replication \"{}\": {} lines removed while in flight were delivered; counted as such",
                st.spec.name,
                arrived.dropped_full + arrived.expired
            );
        }
        Ok(())
    }

    /// Removes the entries `first..=last` of `id`'s main log that are still
    /// there (a live batch, read whole from past the head), counting them
    /// delivered; the head stays where it is. Returns (lines, bytes) removed.
    fn remove_live(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        first: u64,
        last: u64,
    ) -> Result<(u64, u64), QueueError> {
        let shared = self.shared.clone();
        let log = Log::Main(id);
        let db = shared.db(log);
        let (mut lines, mut bytes) = (0u64, 0u64);
        for seq in first..=last {
            let key = log.key(seq);
            let Some(raw) = db.get(wtxn, &key)? else {
                continue;
            };
            if let Ok(e) = entry::decode_unchecked(raw) {
                lines += e.lines as u64;
                bytes += e.lines_len() as u64;
            }
            db.delete(wtxn, &key)?;
        }
        let st = self.state_mut(id);
        let c = &mut st.meta.c;
        let lines = c.unqueue(lines, bytes);
        c.delivered_lines += lines;
        c.delivered_bytes += bytes;
        let meta = st.meta;
        st.meta.c.oldest_enqueued_ns = head_enqueued(&shared, wtxn, id, &meta)?;
        Ok((lines, bytes))
    }

    /// Advances the head of `log` of `id` up to `to`, deleting entries
    /// passed whole, and skipping the sequence numbers of entries a hold
    /// moved away; counts the removed lines under `why`. A lane left empty
    /// is dropped (its hold ends). Returns (lines, bytes) removed.
    pub(super) fn remove_head(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        log: Log,
        to: Pos,
        why: Removal,
    ) -> Result<(u64, u64), QueueError> {
        let shared = self.shared.clone();
        let db = shared.db(log);
        let st = self.state_mut(id);
        let (head, next_seq) = match log {
            Log::Main(_) => (&mut st.meta.head, st.meta.next_seq),
            Log::Lane(_, l) => match st.lanes.get_mut(&l) {
                Some(ln) => (&mut ln.rec.head, ln.rec.next_seq),
                // Gone (dead-lettered, or emptied): nothing of it to remove.
                None => return Ok((0, 0)),
            },
        };
        let (mut lines, mut bytes) = (0u64, 0u64);
        let mut held_removed = 0u64;
        while *head < to && head.seq < next_seq {
            let key = log.key(head.seq);
            let found = match db.get(wtxn, &key)? {
                None => None,
                Some(raw) => {
                    // Lines of a deflated entry cannot be counted in part:
                    // such entries leave whole (batches take them whole).
                    let (enq_lines, plen, lines, held) = match entry::decode_unchecked(raw) {
                        Ok(e) => (
                            e.lines as u64,
                            e.lines_len(),
                            e.deflated.is_none().then_some(e.payload),
                            e.clock.is_some(),
                        ),
                        Err(_) => (0, 0, Some(&raw[..0]), false),
                    };
                    let start = (head.off as usize).min(plen);
                    let end = if to.seq == head.seq {
                        (to.off as usize).min(plen)
                    } else {
                        plen
                    };
                    let l = match lines {
                        _ if start == 0 && end == plen => enq_lines,
                        Some(lines) => crate::lineproto::count_points(&lines[start..end]) as u64,
                        None => break,
                    };
                    Some((l, (end - start) as u64, end == plen, end, held))
                }
            };
            match found {
                None => {
                    // Moved to a lane: go on at the next entry still here,
                    // but not past `to`'s entry.
                    let seq = if head.seq < to.seq {
                        let hi = to.seq.min(next_seq);
                        first_entry(&shared, wtxn, log, head.seq + 1, hi)?
                            .map_or(hi, |(seq, _)| seq)
                    } else {
                        head.seq + 1
                    };
                    *head = Pos { seq, off: 0 }
                }
                Some((l, b, whole, end, held)) => {
                    lines += l;
                    bytes += b;
                    if whole {
                        if held {
                            held_removed += 1;
                        }
                        db.delete(wtxn, &key)?;
                        *head = Pos {
                            seq: head.seq + 1,
                            off: 0,
                        };
                    } else {
                        head.off = end as u32;
                    }
                }
            }
        }
        let end = *head;
        st.meta.clock_held = st.meta.clock_held.saturating_sub(held_removed);
        let c = &mut st.meta.c;
        let lines = c.unqueue(lines, bytes);
        if why != Removal::Delivered && lines > 0 && matches!(log, Log::Main(_)) {
            match st.gone.back_mut() {
                Some(g) if g.why == why => {
                    g.end = end;
                    g.lines += lines;
                }
                _ => {
                    if st.gone.len() == GONE_RUNS {
                        st.gone.pop_front();
                    }
                    st.gone.push_back(Gone { end, why, lines });
                }
            }
        }
        let c = &mut st.meta.c;
        match why {
            Removal::Delivered => {
                c.delivered_lines += lines;
                c.delivered_bytes += bytes;
            }
            Removal::DroppedFull => c.dropped_full_lines += lines,
            Removal::Expired => c.expired_lines += lines,
        }
        match log {
            Log::Main(_) => {
                let meta = st.meta;
                st.meta.c.oldest_enqueued_ns = head_enqueued(&shared, wtxn, id, &meta)?;
            }
            Log::Lane(_, l) => {
                let ln = st.lanes.get_mut(&l).expect("found above");
                ln.rec.lines = ln.rec.lines.saturating_sub(lines);
                ln.rec.bytes = ln.rec.bytes.saturating_sub(bytes);
                let (head, next) = (ln.rec.head, ln.rec.next_seq);
                ln.oldest = first_entry(&shared, wtxn, log, head.seq, next)?.and_then(|(_, t)| t);
                if head.seq >= next {
                    self.drop_lane(wtxn, id, l)?;
                }
            }
        }
        Ok((lines, bytes))
    }
}

/// A run of lines that eviction or expiry removed from the head of a log.
///
/// Removal takes whole entries from the head, which may hold a batch a
/// worker is sending at that moment. If the remote then accepts the batch,
/// its removed lines did arrive: the settlement finds them here and counts
/// them delivered instead of dropped, so that status says what happened. The
/// runs live in memory only: after a crash between the removal and the
/// settlement they stay counted as dropped (an overstatement of loss, never
/// of delivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gone {
    /// Position just past the run.
    end: Pos,
    why: Removal,
    lines: u64,
}

/// Runs kept at most: consecutive runs of the same kind merge, so this is
/// reached only by alternating eviction and expiry with no settlement;
/// the oldest runs are then forgotten (their lines stay counted as dropped).
const GONE_RUNS: usize = 32;

/// Why lines leave the head of a log.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Removal {
    Delivered,
    DroppedFull,
    Expired,
}

/// Lines of a settled batch that had been removed unsent, by why.
#[derive(Debug, Default, PartialEq, Eq)]
struct Arrived {
    dropped_full: u64,
    expired: u64,
}

/// Takes the batch `from..to`'s `removed` lines out of the runs in `gone`
/// (they are its first lines: removal works from the head) and returns how
/// many of them arrived, by why they were removed: all but `refused` of them.
/// Runs that ended before the batch began held no line of it and are
/// forgotten, as are runs the batch covered.
fn reclaim(gone: &mut VecDeque<Gone>, from: Pos, to: Pos, removed: u64, refused: u64) -> Arrived {
    while gone.front().is_some_and(|g| g.end <= from || g.lines == 0) {
        gone.pop_front();
    }
    let mut arrived = Arrived::default();
    let mut left = removed;
    let mut refused = refused.min(removed);
    for g in gone.iter_mut() {
        if left == 0 {
            break;
        }
        let take = g.lines.min(left);
        g.lines -= take;
        left -= take;
        // The refused lines among them are taken first: which of the
        // removed lines the remote refused is not known, only how many.
        let r = refused.min(take);
        refused -= r;
        match g.why {
            Removal::DroppedFull => arrived.dropped_full += take - r,
            Removal::Expired => arrived.expired += take - r,
            Removal::Delivered => {}
        }
    }
    while gone.front().is_some_and(|g| g.end <= to || g.lines == 0) {
        gone.pop_front();
    }
    arrived
}

/// Enqueue time of the head entry of `id`'s main log, if any.
pub(super) fn head_enqueued(
    s: &Shared,
    txn: &heed::RoTxn<heed::WithoutTls>,
    id: u32,
    m: &Meta,
) -> Result<Option<u64>, QueueError> {
    Ok(first_entry(s, txn, Log::Main(id), m.head.seq, m.next_seq)?.and_then(|(_, t)| t))
}

/// The sequence and enqueue time of the first entry of `log` in
/// `[from, to)`, if any (no time when its header is damaged).
pub(super) fn first_entry(
    s: &Shared,
    txn: &heed::RoTxn<heed::WithoutTls>,
    log: Log,
    from: u64,
    to: u64,
) -> Result<Option<(u64, Option<u64>)>, QueueError> {
    if from >= to {
        return Ok(None);
    }
    let (lo, hi) = (log.key(from), log.key(to));
    let first = s
        .db(log)
        .range(txn, &key_range(&lo, &hi))?
        .next()
        .transpose()?;
    Ok(first.map(|(k, raw)| {
        // A held entry's enqueue time is the distrusted clock's: none, so
        // that expiry waits for its release (which sets a true one).
        let t = entry::decode_unchecked(raw)
            .ok()
            .filter(|e| e.clock.is_none())
            .map(|e| e.enqueued_ns);
        (log.seq(k), t)
    }))
}

/// What an entry stores.
pub(super) enum Stored<'a> {
    Lines(&'a [u8]),
    Segment(&'a Segment),
    /// Lines the clock guard holds (entry version 3), untransformed.
    Held(&'a [u8], &'a crate::clock::Anchor),
}
