//! Downsampling windows: writes fold their lines into a replication's open
//! windows; housekeeping queues the aggregates of the closed ones and
//! deletes their state in the same transaction.

use std::collections::{BTreeMap, BTreeSet};

use heed::RwTxn;
use log::error;

use super::log::Stored;
use super::Writer;
use crate::config::WhenFull;
use crate::queue::schema::{key_range, split_window_key, window_key};
use crate::queue::QueueError;
use crate::transform::downsample::{Deltas, Folded, Window};

impl Writer {
    /// Merges a write's window deltas into `id`'s open windows and counts
    /// its late and folded lines.
    pub(super) fn fold_into_windows(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        bucket: &str,
        deltas: Deltas,
        folded: Folded,
    ) -> Result<(), QueueError> {
        let shared = self.shared.clone();
        for ((start, series), delta) in deltas {
            let key = window_key(id, start, bucket, &series);
            let mut w = match shared.windows.get(wtxn, &key)? {
                Some(raw) => Window::decode(raw).unwrap_or_default(),
                None => Window::default(),
            };
            w.merge(&delta);
            shared.windows.put(wtxn, &key, &w.encode())?;
        }
        let c = &mut self.state_mut(id).meta.c;
        c.late_lines += folded.late;
        c.downsampled_lines += folded.folded;
        Ok(())
    }

    /// Queues the aggregates of every closed window of the downsampling
    /// replications and deletes their state, in the caller's transaction.
    pub(super) fn close_windows(
        &mut self,
        wtxn: &mut RwTxn,
        now: u64,
        touched: &mut BTreeSet<u32>,
        appended: &mut BTreeSet<u32>,
    ) -> Result<(), QueueError> {
        let shared = self.shared.clone();
        let ids: Vec<u32> = self.states.keys().copied().collect();
        for id in ids {
            let st = self.state(id);
            let Some(spec) = st
                .spec
                .transform
                .as_ref()
                .and_then(|t| t.downsample.clone())
            else {
                continue;
            };
            let cutoff = spec.last_closed_start(now as i64);
            let lo = window_key(id, i64::MIN, "", b"");
            let hi = window_key(id, cutoff.saturating_add(1), "", b"");
            let closed: Vec<(Vec<u8>, Vec<u8>)> = shared
                .windows
                .range(wtxn, &key_range(&lo, &hi))?
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<_, _>>()?;
            if closed.is_empty() {
                continue;
            }
            // One entry per bucket, lines in window and series order.
            let mut by_bucket: BTreeMap<String, (Vec<u8>, u64)> = BTreeMap::new();
            for (key, raw) in &closed {
                let Some((start, bucket, series)) = split_window_key(key) else {
                    continue;
                };
                let Some(w) = Window::decode(raw) else {
                    error!(
                        "replication \"{}\": damaged window state dropped",
                        self.state(id).spec.name
                    );
                    continue;
                };
                let (payload, lines) = by_bucket.entry(bucket.to_string()).or_default();
                spec.emit(series, start, &w, payload);
                *lines += 1;
            }
            let st = self.state(id);
            let total: u64 = by_bucket.values().map(|(p, _)| p.len() as u64).sum();
            if st.spec.when_full == WhenFull::Reject
                && st.meta.c.queued_bytes + total > st.spec.max_bytes
            {
                // Keep the windows until the queue has room (backpressure).
                continue;
            }
            for (bucket, (payload, lines)) in by_bucket {
                self.push_entry(wtxn, id, &bucket, Stored::Lines(&payload), lines, now)?;
                self.state_mut(id).meta.c.aggregate_lines += lines;
            }
            for (key, _) in &closed {
                shared.windows.delete(wtxn, key)?;
            }
            touched.insert(id);
            appended.insert(id);
        }
        Ok(())
    }
}
