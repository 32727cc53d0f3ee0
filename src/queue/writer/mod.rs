//! The writer thread: the only place that opens LMDB write transactions.
//!
//! This file is the group commit, where the durability promise lives, and
//! can be reviewed alone: [`Writer::run`] gathers every command waiting in
//! its channel into one group, [`Writer::apply`] applies the group in one
//! write transaction and commits it (with LMDB's fsync), and
//! [`Writer::process`] only then answers the callers and publishes the new
//! counters. Nothing is acknowledged before the commit that holds it. A
//! request that cannot be applied (queue full with `reject`, too large)
//! fails alone; a transaction that cannot commit (map or disk full) fails
//! its appends, and the group is retried without them so that settlements
//! and expiry still make room.
//!
//! What a command does to a replication's log is in the file of its feature:
//! - [`append`]: a write: each target's transform, the bounds (`reject`,
//!   too large), its entries and its source checkpoint.
//! - [`log`]: the log itself: [`Writer::push_entry`], eviction
//!   ([`Writer::evict_oldest`], `drop_oldest`), expiry ([`Writer::expire`],
//!   `max_age`), and settlement of a shipped batch ([`Writer::settle`]:
//!   delivered, dead-lettered and dropped lines; a batch the worker split
//!   after a 413 or bisected after a 400 settles once, as a whole), all
//!   through the one removal from the head.
//! - [`dead_letter`]: setting a corrupt entry aside, the dead-letter store
//!   and its bound, replay and purge.
//! - [`windows`]: downsampling windows, folded into by writes and closed by
//!   housekeeping.
//! - [`lanes`]: held destinations: a hold moves a destination's entries
//!   into a lane of their own; a lane settles on its own and ends when
//!   empty, or is moved whole to the dead-letter store.
//! - [`clock`]: entries the clock guard holds, released (restamped, or
//!   set aside with reason `clock`) once it lets them go.

mod append;
mod clock;
mod dead_letter;
mod lanes;
mod log;
mod windows;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::log::{error, warn};
use tokio::sync::oneshot;

use self::log::{head_enqueued, Gone};
use super::schema::{self, meta_key, Meta};
use super::{
    Counters, Pos, QueueError, ReplHandle, ReplSpec, Segment, Settlement, Shared, Signal, Write,
};

/// A group stops gathering past this many payload bytes.
const MAX_GROUP_BYTES: usize = 16 << 20;
/// A group holding this many bytes of lines commits without waiting for
/// writes still being prepared: one fsync is then cheap per line already,
/// and waiting would only delay the writes in hand.
const LINGER_MAX_BYTES: usize = 256 << 10;
/// Expiry and age checks run this often.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

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
    /// The log the batch came from: 0 the main log, else a held lane.
    pub lane: u32,
    /// Whole entries from the middle of the main log (`Batch::live`).
    pub live: bool,
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
        lane: u32,
        seq: u64,
        reply: Reply,
    },
    /// Holds a destination: moves its entries into a lane of their own (or
    /// records the latest answer of one already held).
    Hold {
        repl: Arc<ReplHandle>,
        bucket: String,
        code: u16,
        message: String,
        reply: oneshot::Sender<Result<u64, QueueError>>,
    },
    /// Releases what the clock guard no longer holds at the head of the
    /// main log; answers with the lines released or set aside.
    ReleaseClock {
        repl: Arc<ReplHandle>,
        reply: oneshot::Sender<Result<u64, QueueError>>,
    },
    /// Moves a held destination's lines to the dead-letter store.
    HeldDeadLetter {
        repl: Arc<ReplHandle>,
        bucket: String,
        reply: oneshot::Sender<Result<u64, QueueError>>,
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

/// The replication a command changes, for those that change one.
fn repl_of(cmd: &Command) -> Option<u32> {
    match cmd {
        Command::Settle(s) => Some(s.repl.id),
        Command::SetAside { repl, .. }
        | Command::Hold { repl, .. }
        | Command::HeldDeadLetter { repl, .. }
        | Command::ReleaseClock { repl, .. }
        | Command::DeadLetter { repl, .. } => Some(repl.id),
        Command::Append(_)
        | Command::Attach { .. }
        | Command::Detach { .. }
        | Command::Shutdown => None,
    }
}

struct ReplState {
    spec: ReplSpec,
    meta: Meta,
    handle: Arc<ReplHandle>,
    /// Lines removed from the head unsent (evicted or expired) since the
    /// last settlement, oldest first; see [`Gone`].
    gone: VecDeque<Gone>,
    /// Held lanes, by number.
    lanes: BTreeMap<u32, lanes::Lane>,
}

/// What a failed group restores of a replication's state.
type Saved = (Meta, VecDeque<Gone>, BTreeMap<u32, lanes::Lane>);

pub(super) struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    commit_interval: Duration,
    states: HashMap<u32, ReplState>,
    /// Whether `meta` may hold boot offsets (`writer::clock`): true at
    /// start, so that leftovers are cleared; false again once cleared.
    boot_offsets: bool,
    /// Whether this process recorded this boot's offset (logged once).
    offset_recorded: bool,
}

/// The wall clock (as the clock guard reads it), ns since the epoch.
fn now_ns() -> u64 {
    crate::clock::wall_ns().max(0) as u64
}

impl Writer {
    pub fn new(shared: Arc<Shared>, rx: Receiver<Command>, commit_interval: Duration) -> Self {
        Writer {
            shared,
            rx,
            commit_interval,
            states: HashMap::new(),
            boot_offsets: true,
            offset_recorded: false,
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
                return Err(QueueError::storage(format!(
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
                QueueError::storage(format!(
                    "meta record of replication \"{}\" has an unknown format (written by a newer version?)",
                    spec.name
                ))
            })?,
        };
        meta.c.oldest_enqueued_ns = head_enqueued(&s, &wtxn, id, &meta)?;
        let lanes = lanes::load(&s, &wtxn, id)
            .map_err(|e| e.context(format_args!("held lanes of replication \"{}\"", spec.name)))?;
        meta.lanes = lanes.len() as u64;
        wtxn.commit()?;
        let handle = Arc::new(ReplHandle {
            id,
            name: spec.name.clone(),
            counters: Mutex::new(Counters::default()),
            held: Mutex::new(Vec::new()),
            release: Mutex::new(BTreeSet::new()),
            data: Signal::default(),
        });
        let st = ReplState {
            spec: spec.clone(),
            meta,
            handle: handle.clone(),
            gone: VecDeque::new(),
            lanes,
        };
        st.publish();
        self.states.insert(id, st);
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
        let saved: HashMap<u32, Saved> = self
            .states
            .iter()
            .map(|(k, v)| (*k, (v.meta, v.gone.clone(), v.lanes.clone())))
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
                st.publish();
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
                Command::DeadLetter { reply, .. }
                | Command::Hold { reply, .. }
                | Command::ReleaseClock { reply, .. }
                | Command::HeldDeadLetter { reply, .. } => {
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

    fn restore(&mut self, saved: &HashMap<u32, Saved>) {
        for (id, (meta, gone, lanes)) in saved {
            if let Some(st) = self.states.get_mut(id) {
                st.meta = *meta;
                st.gone = gone.clone();
                st.lanes = lanes.clone();
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
            self.keep_boot_offsets(&mut wtxn)?;
        }
        for cmd in group {
            // A replication stopped by a reload (detached) may still hear
            // from its worker, which a stuck POST kept past the join: its
            // settlement is refused, never applied to a state that is gone.
            if repl_of(cmd).is_some_and(|id| !self.states.contains_key(&id)) {
                results.push(Err(QueueError::Closed));
                continue;
            }
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
                Command::SetAside {
                    repl, lane, seq, ..
                } => {
                    self.set_aside(&mut wtxn, repl.id, *lane, *seq)?;
                    touched.insert(repl.id);
                    Ok(0)
                }
                Command::Hold {
                    repl,
                    bucket,
                    code,
                    message,
                    ..
                } => {
                    touched.insert(repl.id);
                    Ok(self.hold(&mut wtxn, repl.id, bucket, *code, message, now)?)
                }
                Command::HeldDeadLetter { repl, bucket, .. } => {
                    touched.insert(repl.id);
                    Ok(self.dead_letter_lane(&mut wtxn, repl.id, bucket)?)
                }
                Command::ReleaseClock { repl, .. } => {
                    touched.insert(repl.id);
                    let r = self.release_clock(&mut wtxn, repl.id, now)?;
                    if r.entries > 0 {
                        appended.insert(repl.id);
                    }
                    Ok(r.restamped + r.set_aside + r.entries)
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
            self.put_lanes(&mut wtxn, *id)?;
        }
        if group.iter().any(|c| matches!(c, Command::Hold { .. })) {
            crate::fault::point("hold");
        }
        if group.iter().any(|c| matches!(c, Command::Settle(_))) {
            crate::fault::point("settle");
        }
        if group
            .iter()
            .any(|c| matches!(c, Command::ReleaseClock { .. }))
        {
            crate::fault::point("clock-release");
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
}

fn command_bytes(c: &Command) -> usize {
    match c {
        Command::Append(a) => a.lines_len(),
        _ => 0,
    }
}
