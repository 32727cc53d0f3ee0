//! Held destinations. When the remote refuses one destination as a whole
//! (404 bucket or database not found, 403 on one bucket), the worker holds
//! it: [`Writer::hold`] moves that destination's entries, in one
//! transaction, from the main log into a lane of their own (keys in
//! `lanes`, a record in `meta`), and later writes to it join the lane
//! ([`Writer::push_entry`]). A lane is settled from its own head, in
//! order, independently of the main log; it ends, with its record, once
//! empty (delivered, evicted, expired), or when an operator moves its lines
//! to the dead-letter store ([`Writer::dead_letter_lane`]). Nothing ever
//! moves back into the main log.

use std::collections::BTreeMap;

use heed::RwTxn;
use log::warn;

use super::{ReplState, Writer};
use crate::queue::entry;
use crate::queue::schema::{key_range, lane_meta_key, lane_meta_keys, LaneRecord, Log};
use crate::queue::{Counters, Held, Pos, QueueError, Shared};
use crate::sync::Locked;

/// A lane as the writer keeps it.
#[derive(Debug, Clone)]
pub(super) struct Lane {
    pub rec: LaneRecord,
    /// Enqueue time of its first entry.
    pub oldest: Option<u64>,
}

/// Loads the lanes of replication `id`.
pub(super) fn load(
    s: &Shared,
    txn: &heed::RoTxn<heed::WithoutTls>,
    id: u32,
) -> Result<BTreeMap<u32, Lane>, QueueError> {
    let (lo, hi) = lane_meta_keys(id);
    let mut out = BTreeMap::new();
    for item in s.meta.range(txn, &key_range(&lo, &hi))? {
        let (k, v) = item?;
        let lane = u32::from_be_bytes(k[5..9].try_into().expect("lane records have 9-byte keys"));
        let rec = LaneRecord::decode(v)
            .ok_or_else(|| QueueError::storage(format!("the record of lane {lane} is damaged")))?;
        out.insert(lane, Lane { rec, oldest: None });
    }
    for (l, ln) in out.iter_mut() {
        ln.oldest =
            super::log::first_entry(s, txn, Log::Lane(id, *l), ln.rec.head.seq, ln.rec.next_seq)?
                .and_then(|(_, t)| t);
    }
    Ok(out)
}

impl ReplState {
    /// Publishes the counters and held lanes as committed.
    pub(super) fn publish(&self) {
        let mut c = Counters {
            head: self.meta.head,
            ..self.meta.c
        };
        for ln in self.lanes.values() {
            c.oldest_enqueued_ns = match (c.oldest_enqueued_ns, ln.oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        *self.handle.counters.locked() = c;
        *self.handle.held.locked() = self
            .lanes
            .iter()
            .map(|(l, ln)| Held {
                lane: *l,
                bucket: ln.rec.bucket.clone(),
                code: ln.rec.code,
                message: ln.rec.message.clone(),
                since_ns: ln.rec.since_ns,
                lines: ln.rec.lines,
                bytes: ln.rec.bytes,
                head: ln.rec.head,
                oldest_enqueued_ns: ln.oldest,
            })
            .collect();
    }
}

impl Writer {
    /// The lane holding `bucket` of `id`, if it is held.
    pub(super) fn lane_of(&self, id: u32, bucket: &str) -> Option<u32> {
        self.state(id)
            .lanes
            .iter()
            .find(|(_, ln)| ln.rec.bucket == bucket)
            .map(|(l, _)| *l)
    }

    /// The head and next sequence of `log` of `id`; `None` for a lane
    /// that is gone.
    pub(super) fn bounds(&self, id: u32, log: Log) -> Option<(Pos, u64)> {
        let st = self.state(id);
        match log {
            Log::Main(_) => Some((st.meta.head, st.meta.next_seq)),
            Log::Lane(_, l) => st.lanes.get(&l).map(|ln| (ln.rec.head, ln.rec.next_seq)),
        }
    }

    /// Writes the records of `id`'s lanes.
    pub(super) fn put_lanes(&self, wtxn: &mut RwTxn, id: u32) -> Result<(), QueueError> {
        for (l, ln) in &self.state(id).lanes {
            self.shared
                .meta
                .put(wtxn, &lane_meta_key(id, *l), &ln.rec.encode())?;
        }
        Ok(())
    }

    /// Ends lane `lane` of `id`: deletes its record and whatever entries it
    /// still has (callers have counted them).
    pub(super) fn drop_lane(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        lane: u32,
    ) -> Result<(), QueueError> {
        let shared = self.shared.clone();
        let (lo, hi) = (
            Log::Lane(id, lane).key(0),
            Log::Lane(id, lane).key(u64::MAX),
        );
        shared.lanes.delete_range(wtxn, &key_range(&lo, &hi))?;
        shared.meta.delete(wtxn, &lane_meta_key(id, lane))?;
        let st = self.state_mut(id);
        if st.lanes.remove(&lane).is_some() {
            st.meta.lanes = st.meta.lanes.saturating_sub(1);
        }
        Ok(())
    }

    /// Holds destination `bucket` of `id`: moves its entries from the head
    /// of the main log on into a new lane (the rest of the main log keeps
    /// its order), or, if it is held already, records the answer. Returns
    /// the lines moved.
    pub(super) fn hold(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        bucket: &str,
        code: u16,
        message: &str,
        now: u64,
    ) -> Result<u64, QueueError> {
        if let Some(l) = self.lane_of(id, bucket) {
            let ln = self.state_mut(id).lanes.get_mut(&l).expect("found above");
            ln.rec.code = code;
            ln.rec.message = message.to_string();
            return Ok(0);
        }
        let shared = self.shared.clone();
        let main = Log::Main(id);
        let (head, next_seq) = (self.state(id).meta.head, self.state(id).meta.next_seq);
        if head.seq >= next_seq {
            return Ok(0);
        }
        let mut seqs = Vec::new();
        let (lo, hi) = (main.key(head.seq), main.key(next_seq));
        for item in shared.entries.range(wtxn, &key_range(&lo, &hi))? {
            let (k, raw) = item?;
            // Entries the clock guard holds stay where they are until
            // released (a lane would send them as they are).
            if entry::decode_unchecked(raw).is_ok_and(|e| e.bucket == bucket && e.clock.is_none()) {
                seqs.push(main.seq(k));
            }
        }
        if seqs.is_empty() {
            return Ok(0);
        }
        let st = self.state_mut(id);
        let lane = st.meta.next_lane.max(1) as u32;
        let log = Log::Lane(id, lane);
        let mut rec = LaneRecord {
            bucket: bucket.to_string(),
            since_ns: now,
            code,
            message: message.to_string(),
            ..LaneRecord::default()
        };
        let mut oldest = None;
        let mut moved_head = false;
        for seq in seqs {
            let key = main.key(seq);
            let Some(raw) = shared.entries.get(wtxn, &key)?.map(<[u8]>::to_vec) else {
                continue;
            };
            let e = entry::decode_unchecked(&raw).expect("decoded above");
            let plen = e.lines_len();
            let (lines, bytes) = if seq == head.seq && head.off > 0 {
                // Partly delivered: the lane starts where the main log was.
                let start = (head.off as usize).min(plen);
                if e.deflated.is_some() || start >= plen {
                    // Wholly delivered: its settlement removes it.
                    continue;
                }
                rec.head = Pos {
                    seq: rec.next_seq,
                    off: head.off,
                };
                (
                    crate::lineproto::count_points(&e.payload[start..]) as u64,
                    (plen - start) as u64,
                )
            } else {
                (e.lines as u64, plen as u64)
            };
            oldest = oldest.or(Some(e.enqueued_ns));
            moved_head |= seq == head.seq;
            shared.lanes.put(wtxn, &log.key(rec.next_seq), &raw)?;
            shared.entries.delete(wtxn, &key)?;
            rec.next_seq += 1;
            rec.lines += lines;
            rec.bytes += bytes;
        }
        if rec.next_seq == 0 {
            return Ok(0);
        }
        let first = super::log::first_entry(&shared, wtxn, main, head.seq, next_seq)?;
        let st = self.state_mut(id);
        if moved_head {
            // Its first entry moved: the main log goes on at the next one.
            st.meta.head = Pos {
                seq: first.map_or(next_seq, |(seq, _)| seq),
                off: 0,
            };
        }
        st.meta.next_lane = lane as u64 + 1;
        st.meta.lanes += 1;
        let moved = rec.lines;
        warn!(
            "replication \"{}\": destination \"{bucket}\" held (the remote answered {code}: {message}); {moved} lines wait in lane {lane}, the other destinations go on",
            st.spec.name
        );
        st.lanes.insert(lane, Lane { rec, oldest });
        st.meta.c.oldest_enqueued_ns = first.and_then(|(_, t)| t);
        Ok(moved)
    }

    /// Moves held `bucket`'s lines of `id` to the dead-letter store and
    /// ends its lane. Returns the lines moved.
    pub(super) fn dead_letter_lane(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        bucket: &str,
    ) -> Result<u64, QueueError> {
        let Some(lane) = self.lane_of(id, bucket) else {
            return Ok(0);
        };
        let shared = self.shared.clone();
        let log = Log::Lane(id, lane);
        let rec = self.state(id).lanes[&lane].rec.clone();
        let reason = format!("held: {} {}", rec.code, rec.message);
        let (lo, hi) = (log.key(rec.head.seq), log.key(rec.next_seq));
        let records: Vec<(u64, Vec<u8>)> = shared
            .lanes
            .range(wtxn, &key_range(&lo, &hi))?
            .map(|r| r.map(|(k, v)| (log.seq(k), v.to_vec())))
            .collect::<Result<_, _>>()?;
        for (seq, raw) in records {
            let (bytes, lines, len) = match entry::decode_unchecked(&raw) {
                Ok(e) if seq == rec.head.seq && rec.head.off > 0 && e.deflated.is_none() => {
                    let rest = &e.payload[(rec.head.off as usize).min(e.payload.len())..];
                    let n = crate::lineproto::count_points(rest) as u64;
                    (
                        entry::encode(e.enqueued_ns, n as u32, e.bucket, rest),
                        n,
                        rest.len() as u64,
                    )
                }
                Ok(e) => (raw.clone(), e.lines as u64, e.lines_len() as u64),
                Err(_) => (raw.clone(), 0, raw.len() as u64),
            };
            self.add_dead(wtxn, id, &reason, &bytes, lines, len)?;
        }
        let c = &mut self.state_mut(id).meta.c;
        let lines = c.unqueue(rec.lines, rec.bytes);
        c.dead_lettered_lines += lines;
        self.drop_lane(wtxn, id, lane)?;
        warn!(
            "replication \"{}\": held destination \"{bucket}\": {lines} lines moved to the dead-letter store",
            self.state(id).spec.name
        );
        Ok(lines)
    }
}
