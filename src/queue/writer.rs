//! The writer thread: the only place that opens LMDB write transactions.
//!
//! It gathers every command waiting in its channel into one group, applies the
//! group in one write transaction, commits (fsync), and only then answers the
//! callers and publishes the new counters. A request that cannot be applied
//! (queue full with `reject`, too large) fails alone; a transaction that
//! cannot commit (map or disk full) fails its appends, and the group is
//! retried without them so that settlements and expiry still make room.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use heed::RwTxn;
use log::{debug, error, warn};
use tokio::sync::oneshot;

use super::entry;
use super::schema::{
    self, checkpoint_key, dead_key, entry_key, key_range, key_seq, meta_key, repl_keys,
    split_window_key, window_key, Meta,
};
use super::{
    Counters, Pos, QueueError, ReplHandle, ReplSpec, Segment, Settlement, Shared, Signal, Write,
};
use crate::config::WhenFull;
use crate::transform::downsample::{Deltas, Folded, Window};
use crate::transform::Transform;

/// A group stops gathering past this many payload bytes.
const MAX_GROUP_BYTES: usize = 16 << 20;
/// A group holding this many bytes of lines commits without waiting for
/// writes still being prepared: one fsync is then cheap per line already,
/// and waiting would only delay the writes in hand.
const LINGER_MAX_BYTES: usize = 256 << 10;
/// Expiry and age checks run this often.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// A dead-letter store holds at most this much (or the replication's
/// max_queue_size, if smaller); the oldest records make room.
const DEAD_LETTER_MAX: u64 = 64 << 20;

pub(super) type Reply = oneshot::Sender<Result<(), QueueError>>;

pub(super) struct Append {
    pub write: Write,
    /// The payload compressed once, for replications without a transform.
    pub segments: Option<Vec<Segment>>,
    pub reply: Reply,
}

pub(super) struct Settle {
    pub repl: Arc<ReplHandle>,
    /// Where the batch started and ended, and what it held when read: the
    /// part of it that eviction or expiry removed while it was in flight is
    /// what it held less what this settlement finds still queued.
    pub from: Pos,
    pub to: Pos,
    pub lines: u64,
    pub bytes: u64,
    pub settlement: Settlement,
    pub reply: Reply,
}

pub(super) enum DeadLetterOp {
    Replay,
    Purge,
}

pub(super) enum Command {
    Append(Append),
    Settle(Settle),
    SetAside {
        repl: Arc<ReplHandle>,
        seq: u64,
        reply: Reply,
    },
    DeadLetter {
        repl: Arc<ReplHandle>,
        op: DeadLetterOp,
        reply: oneshot::Sender<Result<u64, QueueError>>,
    },
    /// Starts (or updates the bounds of) a replication at run time.
    Attach {
        spec: ReplSpec,
        reply: oneshot::Sender<Result<Arc<ReplHandle>, QueueError>>,
    },
    /// Stops housekeeping a replication; its data stays on disk.
    Detach {
        name: String,
    },
    Shutdown,
}

struct ReplState {
    spec: ReplSpec,
    meta: Meta,
    handle: Arc<ReplHandle>,
    /// Lines removed from the head unsent (evicted or expired) since the
    /// last settlement, oldest first; see [`Gone`].
    gone: VecDeque<Gone>,
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
struct Gone {
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
enum Removal {
    Delivered,
    DroppedFull,
    Expired,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    commit_interval: Duration,
    states: HashMap<u32, ReplState>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Writer {
    pub fn new(shared: Arc<Shared>, rx: Receiver<Command>, commit_interval: Duration) -> Self {
        Writer {
            shared,
            rx,
            commit_interval,
            states: HashMap::new(),
        }
    }

    /// The state of replication `id`, which must be attached. Every command
    /// naming a replication holds a handle [`Writer::attach`] gave out:
    /// appends check their targets before touching them, and settlements,
    /// set-asides and dead-letter operations come from the replication's own
    /// worker and endpoints, which stop before a reload detaches it.
    fn state(&self, id: u32) -> &ReplState {
        self.states.get(&id).expect("the replication is attached")
    }

    /// [`Writer::state`], to change.
    fn state_mut(&mut self, id: u32) -> &mut ReplState {
        self.states
            .get_mut(&id)
            .expect("the replication is attached")
    }

    /// Finds or creates the replication's log and loads its meta; for one
    /// already attached, takes the new bounds.
    pub fn attach(&mut self, spec: &ReplSpec) -> Result<Arc<ReplHandle>, QueueError> {
        if let Some(st) = self
            .states
            .values_mut()
            .find(|st| st.spec.name == spec.name)
        {
            st.spec = spec.clone();
            return Ok(st.handle.clone());
        }
        let s = self.shared.clone();
        let mut wtxn = s.env.write_txn()?;
        let name_key = schema::name_key(&spec.name);
        let id = match s.meta.get(&wtxn, &name_key)?.map(schema::decode_id) {
            Some(Some(id)) => id,
            Some(None) => {
                return Err(QueueError::Storage(format!(
                    "meta record of replication \"{}\" is damaged",
                    spec.name
                )))
            }
            None => {
                let id = s
                    .meta
                    .get(&wtxn, schema::NEXT_ID_KEY)?
                    .and_then(schema::decode_id)
                    .unwrap_or(1);
                s.meta.put(&mut wtxn, &name_key, &schema::encode_id(id))?;
                s.meta
                    .put(&mut wtxn, schema::NEXT_ID_KEY, &schema::encode_id(id + 1))?;
                s.meta
                    .put(&mut wtxn, &meta_key(id), &Meta::default().encode())?;
                id
            }
        };
        let raw = s.meta.get(&wtxn, &meta_key(id))?;
        let mut meta = match raw {
            None => Meta::default(),
            Some(raw) => Meta::decode(raw).ok_or_else(|| {
                QueueError::Storage(format!(
                    "meta record of replication \"{}\" has an unknown format (written by a newer version?)",
                    spec.name
                ))
            })?,
        };
        meta.c.oldest_enqueued_ns = head_enqueued(&s, &wtxn, id, &meta)?;
        wtxn.commit()?;
        let handle = Arc::new(ReplHandle {
            id,
            name: spec.name.clone(),
            counters: Mutex::new(Counters {
                head: meta.head,
                ..meta.c
            }),
            data: Signal::default(),
        });
        self.states.insert(
            id,
            ReplState {
                spec: spec.clone(),
                meta,
                handle: handle.clone(),
                gone: VecDeque::new(),
            },
        );
        Ok(handle)
    }

    pub fn run(mut self) {
        let mut group: Vec<Command> = Vec::new();
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
        loop {
            let wait = next_housekeeping.saturating_duration_since(Instant::now());
            let mut closed = false;
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => group.push(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
            if !closed {
                closed = self.gather(&mut group);
            }
            // Attach and detach change the set of replications: outside groups.
            group.retain_mut(|c| match c {
                Command::Attach { .. } | Command::Detach { .. } => {
                    match std::mem::replace(c, Command::Shutdown) {
                        Command::Attach { spec, reply } => {
                            let _ = reply.send(self.attach(&spec));
                        }
                        Command::Detach { name } => {
                            self.states.retain(|_, st| st.spec.name != name)
                        }
                        _ => unreachable!(),
                    }
                    false
                }
                _ => true,
            });
            let shutdown = closed || group.iter().any(|c| matches!(c, Command::Shutdown));
            let housekeeping = Instant::now() >= next_housekeeping;
            if housekeeping {
                next_housekeeping = Instant::now() + HOUSEKEEPING;
            }
            if !group.is_empty() || housekeeping {
                self.process(std::mem::take(&mut group), housekeeping);
            }
            if shutdown {
                return;
            }
        }
    }

    /// Takes what is waiting; lingers (up to `commit_interval`) while other
    /// writes are still being prepared, so they share this commit.
    fn gather(&mut self, group: &mut Vec<Command>) -> bool {
        let start = Instant::now();
        let mut bytes: usize = group.iter().map(command_bytes).sum();
        loop {
            if bytes >= MAX_GROUP_BYTES || group.iter().any(|c| matches!(c, Command::Shutdown)) {
                return false;
            }
            match self.rx.try_recv() {
                Ok(cmd) => {
                    bytes += command_bytes(&cmd);
                    group.push(cmd);
                    continue;
                }
                Err(TryRecvError::Disconnected) => return true,
                Err(TryRecvError::Empty) => {}
            }
            let elapsed = start.elapsed();
            if group.is_empty()
                || bytes >= LINGER_MAX_BYTES
                || self.shared.preparing.load(Ordering::Acquire) == 0
                || elapsed >= self.commit_interval
            {
                return false;
            }
            match self.rx.recv_timeout(self.commit_interval - elapsed) {
                Ok(cmd) => {
                    bytes += command_bytes(&cmd);
                    group.push(cmd);
                }
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => return true,
            }
        }
    }

    fn process(&mut self, group: Vec<Command>, housekeeping: bool) {
        let saved: HashMap<u32, (Meta, VecDeque<Gone>)> = self
            .states
            .iter()
            .map(|(k, v)| (*k, (v.meta, v.gone.clone())))
            .collect();
        let mut results: Vec<Result<u64, QueueError>> = Vec::with_capacity(group.len());
        let mut touched = BTreeSet::new();
        let mut appended = BTreeSet::new();
        let outcome = self.apply(
            &group,
            housekeeping,
            true,
            &mut results,
            &mut touched,
            &mut appended,
        );
        let outcome = match outcome {
            Ok(()) => Ok(()),
            Err(e) => {
                self.restore(&saved);
                let has_appends = group.iter().any(|c| matches!(c, Command::Append(_)));
                if has_appends && matches!(e, QueueError::StorageFull(_)) {
                    // Make room first: settlements and expiry do not need space.
                    warn!("{e}; refusing this group's writes");
                    results.clear();
                    touched.clear();
                    appended.clear();
                    let retry = self.apply(
                        &group,
                        housekeeping,
                        false,
                        &mut results,
                        &mut touched,
                        &mut appended,
                    );
                    if retry.is_err() {
                        self.restore(&saved);
                    }
                    retry.map(|()| Some(e))
                } else {
                    Err(e)
                }
                .map(|refused| {
                    // Appends answered with the storage error, others with theirs.
                    for (r, c) in results.iter_mut().zip(&group) {
                        if matches!(c, Command::Append(_)) {
                            if let Some(e) = &refused {
                                *r = Err(e.clone());
                            }
                        }
                    }
                })
            }
        };
        if let Err(e) = &outcome {
            error!("queue commit failed: {e}");
        }
        // Publish counters of what is now durable, then answer.
        for id in &touched {
            if let Some(st) = self.states.get(id) {
                *st.handle.counters.lock().unwrap() = Counters {
                    head: st.meta.head,
                    ..st.meta.c
                };
            }
        }
        let mut results = results.into_iter();
        for cmd in group {
            let r = match &outcome {
                Ok(()) => results.next().unwrap_or(Ok(0)),
                Err(e) => Err(e.clone()),
            };
            match cmd {
                Command::Append(a) => {
                    let _ = a.reply.send(r.map(drop));
                }
                Command::Settle(s) => {
                    let _ = s.reply.send(r.map(drop));
                }
                Command::SetAside { reply, .. } => {
                    let _ = reply.send(r.map(drop));
                }
                Command::DeadLetter { reply, .. } => {
                    let _ = reply.send(r);
                }
                Command::Attach { .. } | Command::Detach { .. } | Command::Shutdown => {}
            }
        }
        if outcome.is_ok() {
            for id in &appended {
                if let Some(st) = self.states.get(id) {
                    st.handle.data.notify();
                }
            }
        }
    }

    fn restore(&mut self, saved: &HashMap<u32, (Meta, VecDeque<Gone>)>) {
        for (id, (meta, gone)) in saved {
            if let Some(st) = self.states.get_mut(id) {
                st.meta = *meta;
                st.gone = gone.clone();
            }
        }
    }

    /// Applies a group in one transaction. `results` gets one entry per
    /// command (Shutdown included) in order.
    fn apply(
        &mut self,
        group: &[Command],
        housekeeping: bool,
        with_appends: bool,
        results: &mut Vec<Result<u64, QueueError>>,
        touched: &mut BTreeSet<u32>,
        appended: &mut BTreeSet<u32>,
    ) -> Result<(), QueueError> {
        let shared = self.shared.clone();
        let mut wtxn = shared.env.write_txn()?;
        let now = now_ns();
        if housekeeping {
            self.expire(&mut wtxn, now, touched)?;
            self.close_windows(&mut wtxn, now, touched, appended)?;
        }
        for cmd in group {
            let r = match cmd {
                Command::Append(a) if with_appends => self
                    .append(&mut wtxn, a, now, touched, appended)?
                    .map(|()| 0),
                Command::Append(_) => Ok(0),
                Command::Settle(s) => {
                    self.settle(&mut wtxn, s)?;
                    touched.insert(s.repl.id);
                    Ok(0)
                }
                Command::SetAside { repl, seq, .. } => {
                    self.set_aside(&mut wtxn, repl.id, *seq)?;
                    touched.insert(repl.id);
                    Ok(0)
                }
                Command::DeadLetter { repl, op, .. }
                    if with_appends || matches!(op, DeadLetterOp::Purge) =>
                {
                    touched.insert(repl.id);
                    match op {
                        DeadLetterOp::Replay => {
                            appended.insert(repl.id);
                            Ok(self.replay(&mut wtxn, repl.id, now)?)
                        }
                        DeadLetterOp::Purge => Ok(self.purge(&mut wtxn, repl.id, 0)?),
                    }
                }
                Command::DeadLetter { .. } => Ok(0),
                Command::Attach { .. } | Command::Detach { .. } | Command::Shutdown => Ok(0),
            };
            results.push(r);
        }
        for id in touched.iter() {
            let st = self.state(*id);
            shared
                .meta
                .put(&mut wtxn, &meta_key(*id), &st.meta.encode())?;
        }
        if group.iter().any(|c| matches!(c, Command::Settle(_))) {
            crate::fault::point("settle");
        }
        if group
            .iter()
            .any(|c| matches!(c, Command::Settle(s) if s.settlement.dead_lines > 0))
        {
            crate::fault::point("dead-letter");
        }
        if group
            .iter()
            .any(|c| matches!(c, Command::Append(a) if a.write.checkpoint.is_some()))
        {
            crate::fault::point("checkpoint");
        }
        let writes = group.iter().any(|c| matches!(c, Command::Append(_)));
        crate::fault::point("commit");
        if writes {
            crate::fault::point("commit-write");
        }
        wtxn.commit()?;
        shared.commits.fetch_add(1, Ordering::Relaxed);
        crate::fault::point("committed");
        if writes {
            crate::fault::point("committed-write");
        }
        Ok(())
    }

    /// The outer error aborts the transaction; the inner one refuses this write only.
    fn append(
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
                if transforms {
                    inflated = Some(inflate(segments)?);
                }
            }
        }
        let lines: &[u8] = inflated.as_deref().unwrap_or(&a.payload);
        // Each replication's transform first: bounds apply to what it queues.
        let mut prepared = Vec::with_capacity(a.targets.len());
        for t in &a.targets {
            let Some(st) = self.states.get(&t.id) else {
                return Ok(Err(QueueError::Closed));
            };
            prepared.push(prepare(
                st.spec.transform.as_deref(),
                lines,
                a.lines,
                now as i64,
            ));
        }
        for (t, p) in a.targets.iter().zip(&prepared) {
            let st = self.state_mut(t.id);
            let len = match (&p.payload, &cmd.segments) {
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

    /// Appends an entry to `id`'s log, evicting whole oldest entries first
    /// as far as `drop_oldest` needs ([`Writer::evict_oldest`]), and counts
    /// it as queued.
    fn push_entry(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        bucket: &str,
        stored: Stored,
        lines: u64,
        now: u64,
    ) -> Result<(), QueueError> {
        let (payload, deflated) = match stored {
            Stored::Lines(l) => (l, None),
            Stored::Segment(seg) => (&seg.data[..], Some(seg.deflated)),
        };
        let len = deflated.map_or(payload.len() as u64, |d| d.len as u64);
        self.evict_oldest(wtxn, id, len)?;
        let shared = self.shared.clone();
        let st = self.state_mut(id);
        let header = entry::header(now, lines as u32, bucket, deflated);
        shared.entries.put_reserved(
            wtxn,
            &entry_key(id, st.meta.next_seq),
            header.len() + payload.len(),
            |space| {
                space.write_all(&header)?;
                space.write_all(payload)?;
                entry::seal(space.written_mut());
                Ok(())
            },
        )?;
        if st.meta.head.seq >= st.meta.next_seq {
            st.meta.c.oldest_enqueued_ns = Some(now);
        }
        st.meta.next_seq += 1;
        st.meta.c.queued_bytes += len;
        st.meta.c.queued_lines += lines;
        Ok(())
    }

    /// Eviction: removes whole entries from the head of `id`'s log, counted
    /// as dropped_full, until `len` more bytes fit its bound or the log is
    /// empty. This is what `when_full = "drop_oldest"` means; with `reject`,
    /// callers refuse an entry that does not fit before it gets here.
    fn evict_oldest(&mut self, wtxn: &mut RwTxn, id: u32, len: u64) -> Result<(), QueueError> {
        loop {
            let st = self.state(id);
            if st.meta.c.queued_bytes + len <= st.spec.max_bytes
                || st.meta.head.seq >= st.meta.next_seq
            {
                return Ok(());
            }
            let head = st.meta.head.seq;
            self.remove_head(
                wtxn,
                id,
                Pos {
                    seq: head,
                    off: u32::MAX,
                },
                Removal::DroppedFull,
            )?;
        }
    }

    /// Merges a write's window deltas into `id`'s open windows and counts
    /// its late and folded lines.
    fn fold_into_windows(
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
    fn close_windows(
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

    fn settle(&mut self, wtxn: &mut RwTxn, s: &Settle) -> Result<(), QueueError> {
        let id = s.repl.id;
        let (lines, bytes) = self.remove_head(wtxn, id, s.to, Removal::Delivered)?;
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
        let arrived = reclaim(&mut st.gone, s.from, s.to, removed, refused_gone);
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

    /// Moves entry `seq` (expected at the head) to the dead-letter store.
    fn set_aside(&mut self, wtxn: &mut RwTxn, id: u32, seq: u64) -> Result<(), QueueError> {
        let shared = self.shared.clone();
        let st = self.state_mut(id);
        if seq < st.meta.head.seq || seq >= st.meta.next_seq {
            return Ok(());
        }
        let key = entry_key(id, seq);
        let raw = shared.entries.get(wtxn, &key)?.map(<[u8]>::to_vec);
        let (lines, bytes) = match raw.as_deref().map(entry::decode_unchecked) {
            Some(Ok(e)) if (e.lines as u64) <= st.meta.c.queued_lines => {
                (e.lines as u64, e.lines_len() as u64)
            }
            // The header itself is damaged: the counts are unknown, so take
            // what is left when this is the last entry, else nothing.
            _ if seq + 1 == st.meta.next_seq => (st.meta.c.queued_lines, st.meta.c.queued_bytes),
            _ => (0, raw.as_ref().map_or(0, |r| r.len() as u64)),
        };
        if let Some(raw) = raw {
            let reason = match entry::decode(&raw) {
                Err(why) => format!("set aside: {why}"),
                Ok(_) => "set aside".to_string(),
            };
            self.add_dead(wtxn, id, &reason, &raw, lines, bytes)?;
            shared.entries.delete(wtxn, &key)?;
        }
        let st = self.state_mut(id);
        if seq == st.meta.head.seq {
            st.meta.head = Pos {
                seq: seq + 1,
                off: 0,
            };
        }
        let c = &mut st.meta.c;
        let lines = lines.min(c.queued_lines);
        c.queued_lines -= lines;
        c.queued_bytes = c.queued_bytes.saturating_sub(bytes);
        c.dead_lettered_lines += lines;
        let meta = st.meta;
        let oldest = head_enqueued(&shared, wtxn, id, &meta)?;
        self.state_mut(id).meta.c.oldest_enqueued_ns = oldest;
        error!(
            "replication \"{}\": entry {seq} failed its checksum; {lines} lines set aside in the dead-letter store",
            self.state(id).spec.name
        );
        Ok(())
    }

    /// Stores a dead-letter record, evicting the oldest ones past the bound.
    fn add_dead(
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
    fn purge(&mut self, wtxn: &mut RwTxn, id: u32, keep_bytes: u64) -> Result<u64, QueueError> {
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
    fn replay(&mut self, wtxn: &mut RwTxn, id: u32, now: u64) -> Result<u64, QueueError> {
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

    fn expire(
        &mut self,
        wtxn: &mut RwTxn,
        now: u64,
        touched: &mut BTreeSet<u32>,
    ) -> Result<(), QueueError> {
        let ids: Vec<u32> = self.states.keys().copied().collect();
        for id in ids {
            loop {
                let st = self.state(id);
                let (Some(max_age), Some(oldest)) = (st.spec.max_age, st.meta.c.oldest_enqueued_ns)
                else {
                    break;
                };
                if now.saturating_sub(oldest) <= max_age.as_nanos() as u64 {
                    break;
                }
                let head = st.meta.head.seq;
                let (lines, _) = self.remove_head(
                    wtxn,
                    id,
                    Pos {
                        seq: head,
                        off: u32::MAX,
                    },
                    Removal::Expired,
                )?;
                touched.insert(id);
                warn!(
                    "replication \"{}\": {lines} lines older than max_age expired unsent",
                    self.state(id).spec.name
                );
            }
        }
        Ok(())
    }

    /// Advances the head of `id` up to `to`, deleting entries passed whole;
    /// counts the removed lines under `why`. Returns (lines, bytes) removed.
    fn remove_head(
        &mut self,
        wtxn: &mut RwTxn,
        id: u32,
        to: Pos,
        why: Removal,
    ) -> Result<(u64, u64), QueueError> {
        let shared = self.shared.clone();
        let st = self.state_mut(id);
        let m = &mut st.meta;
        let (mut lines, mut bytes) = (0u64, 0u64);
        while m.head < to && m.head.seq < m.next_seq {
            let key = entry_key(id, m.head.seq);
            let found = match shared.entries.get(wtxn, &key)? {
                None => None,
                Some(raw) => {
                    // Lines of a deflated entry cannot be counted in part:
                    // such entries leave whole (batches take them whole).
                    let (enq_lines, plen, lines) = match entry::decode_unchecked(raw) {
                        Ok(e) => (
                            e.lines as u64,
                            e.lines_len(),
                            e.deflated.is_none().then_some(e.payload),
                        ),
                        Err(_) => (0, 0, Some(&raw[..0])),
                    };
                    let start = (m.head.off as usize).min(plen);
                    let end = if to.seq == m.head.seq {
                        (to.off as usize).min(plen)
                    } else {
                        plen
                    };
                    let l = match lines {
                        _ if start == 0 && end == plen => enq_lines,
                        Some(lines) => crate::lineproto::count_points(&lines[start..end]) as u64,
                        None => break,
                    };
                    Some((l, (end - start) as u64, end == plen, end))
                }
            };
            match found {
                None => {
                    m.head = Pos {
                        seq: m.head.seq + 1,
                        off: 0,
                    }
                }
                Some((l, b, whole, end)) => {
                    lines += l;
                    bytes += b;
                    if whole {
                        shared.entries.delete(wtxn, &key)?;
                        m.head = Pos {
                            seq: m.head.seq + 1,
                            off: 0,
                        };
                    } else {
                        m.head.off = end as u32;
                    }
                }
            }
        }
        let c = &mut m.c;
        let lines = lines.min(c.queued_lines);
        c.queued_lines -= lines;
        c.queued_bytes = c.queued_bytes.saturating_sub(bytes);
        if why != Removal::Delivered && lines > 0 {
            let end = m.head;
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
        let m = &mut st.meta;
        let c = &mut m.c;
        match why {
            Removal::Delivered => {
                c.delivered_lines += lines;
                c.delivered_bytes += bytes;
            }
            Removal::DroppedFull => c.dropped_full_lines += lines,
            Removal::Expired => c.expired_lines += lines,
        }
        let meta = *m;
        st.meta.c.oldest_enqueued_ns = head_enqueued(&shared, wtxn, id, &meta)?;
        Ok((lines, bytes))
    }
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

fn command_bytes(c: &Command) -> usize {
    match c {
        Command::Append(a) => a.lines_len(),
        _ => 0,
    }
}

/// Enqueue time of the head entry, if any.
fn head_enqueued(
    s: &Shared,
    txn: &heed::RoTxn<heed::WithoutTls>,
    id: u32,
    m: &Meta,
) -> Result<Option<u64>, QueueError> {
    if m.head.seq >= m.next_seq {
        return Ok(None);
    }
    let lo = entry_key(id, m.head.seq);
    let hi = entry_key(id, m.next_seq);
    let first = s
        .entries
        .range(txn, &key_range(&lo, &hi))?
        .next()
        .transpose()?;
    Ok(first.and_then(|(_, raw)| entry::decode_unchecked(raw).ok().map(|e| e.enqueued_ns)))
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

/// The lines of a write's segments.
fn inflate(segments: &[Segment]) -> Result<Vec<u8>, QueueError> {
    let mut out = Vec::new();
    for s in segments {
        crate::deflate::inflate_segment(&s.data, s.deflated.len as usize, &mut out)
            .map_err(|e| QueueError::Storage(format!("a write's compressed lines: {e}")))?;
    }
    Ok(out)
}

impl Append {
    /// Bytes of lines in the write (its segments', when ingest kept only those).
    fn lines_len(&self) -> usize {
        self.segments
            .as_ref()
            .map_or(self.write.payload.len(), |s| {
                s.iter().map(|s| s.deflated.len as usize).sum()
            })
    }
}

/// What an entry stores.
enum Stored<'a> {
    Lines(&'a [u8]),
    Segment(&'a Segment),
}

/// A write as one replication will queue it.
struct Prepared<'a> {
    payload: Cow<'a, [u8]>,
    lines: u64,
    filtered: u64,
    /// Downsampling: window deltas instead of lines.
    windows: Option<(Deltas, Folded)>,
}

fn prepare<'a>(
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
