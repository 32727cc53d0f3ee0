//! The dead-letter store: lines the remote refused for good and corrupt
//! entries set aside, kept per replication within a bound, for listing,
//! replay into the log, or purge.

use heed::RwTxn;
use log::{error, warn};

use super::log::{first_entry, head_enqueued, Stored};
use super::{Pos, Writer};
use crate::queue::entry;
use crate::queue::schema::{dead_key, key_range, key_seq, repl_keys, Log};
use crate::queue::{QueueError, Shared};

/// A dead-letter store holds at most this much (or the replication's
/// max_queue_size, if smaller); the oldest records make room.
const DEAD_LETTER_MAX: u64 = 64 << 20;

impl Writer {
    /// Moves entry `seq` (expected at the head) of log `lane` (0: the main
    /// log) to the dead-letter store.
    pub(super) fn set_aside(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        lane: u32,
        seq: u64,
    ) -> Result<(), QueueError> {
        let shared = self.shared.clone();
        let log = match lane {
            0 => Log::Main(id),
            l => Log::Lane(id, l),
        };
        let Some((head, next_seq)) = self.bounds(id, log) else {
            return Ok(());
        };
        if seq < head.seq || seq >= next_seq {
            return Ok(());
        }
        let st = self.state(id);
        // What the log holds: the lane's own count, or the replication's
        // less its lanes'.
        let (held_lines, held_bytes) = match log {
            Log::Main(_) => st.lanes.values().fold(
                (st.meta.c.queued_lines, st.meta.c.queued_bytes),
                |(l, b), ln| {
                    (
                        l.saturating_sub(ln.rec.lines),
                        b.saturating_sub(ln.rec.bytes),
                    )
                },
            ),
            Log::Lane(_, l) => (st.lanes[&l].rec.lines, st.lanes[&l].rec.bytes),
        };
        let key = log.key(seq);
        let raw = shared.db(log).get(wtxn, &key)?.map(<[u8]>::to_vec);
        let (lines, bytes) = match raw.as_deref().map(entry::decode_unchecked) {
            Some(Ok(e)) if (e.lines as u64) <= held_lines => (e.lines as u64, e.lines_len() as u64),
            // The header itself is damaged: the counts are unknown, so take
            // what is left when this is the last entry, else nothing.
            _ if seq + 1 == next_seq => (held_lines, held_bytes),
            _ => (0, raw.as_ref().map_or(0, |r| r.len() as u64)),
        };
        if let Some(raw) = raw {
            let reason = match entry::decode(&raw) {
                Err(why) => format!("set aside: {why}"),
                Ok(_) => "set aside".to_string(),
            };
            self.add_dead(wtxn, id, &reason, &raw, lines, bytes)?;
            shared.db(log).delete(wtxn, &key)?;
        }
        let st = self.state_mut(id);
        let c = &mut st.meta.c;
        let lines = c.unqueue(lines, bytes);
        c.dead_lettered_lines += lines;
        match log {
            Log::Main(_) => {
                if seq == st.meta.head.seq {
                    st.meta.head = Pos {
                        seq: seq + 1,
                        off: 0,
                    };
                }
                let meta = st.meta;
                let oldest = head_enqueued(&shared, wtxn, id, &meta)?;
                self.state_mut(id).meta.c.oldest_enqueued_ns = oldest;
            }
            Log::Lane(_, l) => {
                let ln = st.lanes.get_mut(&l).expect("bounds found it");
                ln.rec.lines = ln.rec.lines.saturating_sub(lines);
                ln.rec.bytes = ln.rec.bytes.saturating_sub(bytes);
                if seq == ln.rec.head.seq {
                    ln.rec.head = Pos {
                        seq: seq + 1,
                        off: 0,
                    };
                }
                let (h, n) = (ln.rec.head.seq, ln.rec.next_seq);
                let first = first_entry(&shared, wtxn, log, h, n)?;
                let ln = self
                    .state_mut(id)
                    .lanes
                    .get_mut(&l)
                    .expect("bounds found it");
                ln.oldest = first.and_then(|(_, t)| t);
                if first.is_none() {
                    self.drop_lane(wtxn, id, l)?;
                }
            }
        }
        error!(
            "replication \"{}\": entry {seq} failed its checksum; {lines} lines set aside in the dead-letter store",
            self.state(id).spec.name
        );
        Ok(())
    }

    /// Stores a dead-letter record, evicting the oldest ones past the bound.
    pub(super) fn add_dead(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        reason: &str,
        entry_bytes: &[u8],
        lines: u64,
        bytes: u64,
    ) -> Result<(), QueueError> {
        let shared = self.shared.clone();
        let st = self.state(id);
        let cap = DEAD_LETTER_MAX.min(st.spec.max_bytes);
        if st.meta.c.dead_letter_bytes + bytes > cap {
            let purged = self.purge(wtxn, id, cap.saturating_sub(bytes).max(1))?;
            warn!(
                "replication \"{}\": dead-letter store full; {purged} oldest dead-lettered lines purged",
                self.state(id).spec.name
            );
        }
        let key = next_dead_key(&shared, wtxn, id)?;
        shared
            .dead
            .put(wtxn, &key, &entry::encode_dead(reason, entry_bytes))?;
        let c = &mut self.state_mut(id).meta.c;
        c.dead_letter_lines += lines;
        c.dead_letter_bytes += bytes;
        Ok(())
    }

    /// Deletes the oldest dead letters of `id` until at most `keep_bytes`
    /// remain (0: all of them). Returns the lines purged.
    pub(super) fn purge(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        keep_bytes: u64,
    ) -> Result<u64, QueueError> {
        let shared = self.shared.clone();
        let c = &mut self.state_mut(id).meta.c;
        let (lo, hi) = repl_keys(id);
        let mut doomed = Vec::new();
        let (mut bytes_left, mut lines) = (c.dead_letter_bytes, 0u64);
        for item in shared.dead.range(wtxn, &key_range(&lo, &hi))? {
            if keep_bytes > 0 && bytes_left <= keep_bytes {
                break;
            }
            let (key, raw) = item?;
            let (_, e) = entry::decode_dead(raw);
            let (l, b) = entry::decode_unchecked(e).map_or((0, e.len() as u64), |e| {
                (e.lines as u64, e.lines_len() as u64)
            });
            bytes_left = bytes_left.saturating_sub(b);
            lines += l;
            doomed.push(key.to_vec());
        }
        for key in &doomed {
            shared.dead.delete(wtxn, key)?;
        }
        if keep_bytes == 0 {
            // Everything went: the counters are exact whatever the records said.
            lines = c.dead_letter_lines;
            bytes_left = 0;
        }
        c.dead_letter_lines = c.dead_letter_lines.saturating_sub(lines);
        c.dead_letter_bytes = bytes_left;
        c.dead_letter_purged_lines += lines;
        Ok(lines)
    }

    /// Moves replayable dead letters back into the log while they fit.
    pub(super) fn replay(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        now: u64,
    ) -> Result<u64, QueueError> {
        let shared = self.shared.clone();
        let (lo, hi) = repl_keys(id);
        let records: Vec<(Vec<u8>, Vec<u8>)> = shared
            .dead
            .range(wtxn, &key_range(&lo, &hi))?
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_, _>>()?;
        let mut replayed = 0;
        for (key, raw) in records {
            let (_, bytes) = entry::decode_dead(&raw);
            let Ok(e) = entry::decode(bytes) else {
                continue;
            };
            let Ok(payload) = e.lines_bytes() else {
                continue;
            };
            let st = self.state(id);
            let len = payload.len() as u64;
            if st.meta.c.queued_bytes + len > st.spec.max_bytes {
                break;
            }
            let lines = e.lines as u64;
            self.push_entry(wtxn, id, e.bucket, Stored::Lines(&payload), lines, now)?;
            shared.dead.delete(wtxn, &key)?;
            let c = &mut self.state_mut(id).meta.c;
            c.dead_lettered_lines = c.dead_lettered_lines.saturating_sub(lines);
            c.dead_letter_lines = c.dead_letter_lines.saturating_sub(lines);
            c.dead_letter_bytes = c.dead_letter_bytes.saturating_sub(len);
            replayed += lines;
        }
        Ok(replayed)
    }
}

fn next_dead_key(s: &Shared, txn: &RwTxn, id: u32) -> Result<[u8; 12], QueueError> {
    let (lo, hi) = repl_keys(id);
    let last = s
        .dead
        .rev_range(txn, &key_range(&lo, &hi))?
        .next()
        .transpose()?;
    Ok(dead_key(id, last.map_or(0, |(k, _)| key_seq(k) + 1)))
}
