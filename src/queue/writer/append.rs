//! A write, as each of its target replications queues it: transform first
//! (filters, tags, downsampling), then the bounds, then the entries, and the
//! source checkpoint in the same transaction.

use std::borrow::Cow;
use std::collections::BTreeSet;

use heed::RwTxn;

use super::log::Stored;
use super::{Append, Writer};
use crate::config::WhenFull;
use crate::queue::schema::checkpoint_key;
use crate::queue::{QueueError, Segment};
use crate::transform::downsample::{Deltas, Folded};
use crate::transform::Transform;

impl Writer {
    /// The outer error aborts the transaction; the inner one refuses this write only.
    pub(super) fn append(
        &mut self,
        wtxn: &mut RwTxn,
        cmd: &Append,
        now: u64,
        touched: &mut BTreeSet<u32>,
        appended: &mut BTreeSet<u32>,
    ) -> Result<Result<(), QueueError>, QueueError> {
        let a = &cmd.write;
        let total = cmd.lines_len() as u64;
        // Ingest drops the lines it compressed when no replication taking
        // them transforms them; one changed by a reload since then gets them
        // back from the segments.
        let mut inflated = None;
        if a.payload.is_empty() && a.lines > 0 {
            if let Some(segments) = &cmd.segments {
                let transforms = a.targets.iter().any(|t| {
                    self.states
                        .get(&t.id)
                        .is_some_and(|st| st.spec.transform.is_some())
                });
                if transforms || a.clock.is_some() {
                    inflated = Some(inflate(segments)?);
                }
            }
        }
        let lines: &[u8] = inflated.as_deref().unwrap_or(&a.payload);
        // Each replication's transform first: bounds apply to what it queues.
        // Lines the clock guard holds are queued as they came: the transform
        // applies when they are released, to their true times.
        let mut prepared = Vec::with_capacity(a.targets.len());
        for t in &a.targets {
            let Some(st) = self.states.get(&t.id) else {
                return Ok(Err(QueueError::Closed));
            };
            let transform = st.spec.transform.as_deref().filter(|_| a.clock.is_none());
            prepared.push(prepare(transform, lines, a.lines, now as i64));
        }
        for (t, p) in a.targets.iter().zip(&prepared) {
            let st = self.state_mut(t.id);
            let len = match (&p.payload, &cmd.segments) {
                _ if a.clock.is_some() => p.payload.len() as u64,
                (Cow::Borrowed(_), Some(_)) => total,
                _ => p.payload.len() as u64,
            };
            if len > st.spec.max_bytes {
                return Ok(Err(QueueError::TooLarge {
                    replication: st.spec.name.clone(),
                    bytes: len,
                    max: st.spec.max_bytes,
                }));
            }
            if st.spec.when_full == WhenFull::Reject
                && len > 0
                && st.meta.c.queued_bytes + len > st.spec.max_bytes
            {
                st.meta.c.rejected_lines += a.lines;
                st.meta.c.rejected_bytes += total;
                touched.insert(t.id);
                return Ok(Err(QueueError::Full {
                    replication: st.spec.name.clone(),
                    max: st.spec.max_bytes,
                }));
            }
        }
        let shared = self.shared.clone();
        for (t, p) in a.targets.iter().zip(prepared) {
            touched.insert(t.id);
            if let Some((deltas, folded)) = p.windows {
                self.fold_into_windows(wtxn, t.id, &a.bucket, deltas, folded)?;
            } else if let (Some(anchor), true) = (&a.clock, p.lines > 0) {
                self.push_entry(
                    wtxn,
                    t.id,
                    &a.bucket,
                    Stored::Held(&p.payload, anchor),
                    p.lines,
                    now,
                )?;
                appended.insert(t.id);
            } else if p.lines > 0 {
                match (&p.payload, &cmd.segments) {
                    // Unchanged lines: store them as compressed at ingest.
                    (Cow::Borrowed(_), Some(segments)) => {
                        for seg in segments {
                            self.push_entry(
                                wtxn,
                                t.id,
                                &a.bucket,
                                Stored::Segment(seg),
                                seg.lines as u64,
                                now,
                            )?;
                        }
                    }
                    _ => self.push_entry(
                        wtxn,
                        t.id,
                        &a.bucket,
                        Stored::Lines(&p.payload),
                        p.lines,
                        now,
                    )?,
                }
                appended.insert(t.id);
            }
            let c = &mut self.state_mut(t.id).meta.c;
            c.accepted_lines += a.lines;
            c.accepted_bytes += total;
            c.filtered_lines += p.filtered;
        }
        if let Some(cp) = &a.checkpoint {
            shared.meta.put(wtxn, &checkpoint_key(&cp.key), &cp.value)?;
        }
        Ok(Ok(()))
    }
}

impl Append {
    /// Bytes of lines in the write (its segments', when ingest kept only those).
    pub(super) fn lines_len(&self) -> usize {
        self.segments
            .as_ref()
            .map_or(self.write.payload.len(), |s| {
                s.iter().map(|s| s.deflated.len as usize).sum()
            })
    }
}

/// The lines of a write's segments.
fn inflate(segments: &[Segment]) -> Result<Vec<u8>, QueueError> {
    let mut out = Vec::new();
    for s in segments {
        crate::deflate::inflate_segment(&s.data, s.deflated.len as usize, &mut out)
            .map_err(|e| QueueError::storage(format!("a write's compressed lines: {e}")))?;
    }
    Ok(out)
}

/// A write as one replication will queue it.
pub(super) struct Prepared<'a> {
    pub payload: Cow<'a, [u8]>,
    pub lines: u64,
    pub filtered: u64,
    /// Downsampling: window deltas instead of lines.
    pub windows: Option<(Deltas, Folded)>,
}

/// Applies `transform` (if any) to a write's lines.
pub(super) fn prepare<'a>(
    transform: Option<&Transform>,
    payload: &'a [u8],
    lines: u64,
    now: i64,
) -> Prepared<'a> {
    let Some(t) = transform else {
        return Prepared {
            payload: Cow::Borrowed(payload),
            lines,
            filtered: 0,
            windows: None,
        };
    };
    if let Some(ds) = &t.downsample {
        let mut deltas = Deltas::new();
        let folded = ds.fold(payload, now, |l| t.select(l), &mut deltas);
        return Prepared {
            payload: Cow::Borrowed(&[]),
            lines: 0,
            filtered: folded.filtered,
            windows: Some((deltas, folded)),
        };
    }
    let mut out = Vec::with_capacity(payload.len());
    let applied = t.apply(payload, &mut out);
    Prepared {
        payload: Cow::Owned(out),
        lines: applied.lines,
        filtered: applied.filtered,
        windows: None,
    }
}
