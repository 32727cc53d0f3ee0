//! `[[influxdb_wal]]`: follows the TSM write-ahead log of a local InfluxDB
//! 1.x or OSS 2.x and queues the points written to it as line protocol.
//!
//! Both layouts are `<wal_dir>/<database>/<retention policy>/<shard id>/_NNNNN.wal`
//! (2.x: `<engine>/wal/<bucket id>/autogen/<shard id>/`), so one follower
//! serves both: `database` is the 1.x database or the 2.x bucket ID. Every
//! poll lists the retention policies and shards (new shards appear at each
//! shard-group boundary and for back-filled times) and, per shard, its
//! segments in numeric order.
//!
//! # Reading
//!
//! A shard's position is `(segment, offset, points)`: the next entry to read,
//! and how many points of it are queued already (an entry larger than one
//! write is split between writes; its points come out in a fixed order, see
//! [`wal_format`](super::wal_format)). Entries are read with positioned reads
//! from descriptors the follower keeps open for every segment at or after the
//! position, so a segment InfluxDB deletes after a cache snapshot stays
//! readable to its end. A short last entry is "not yet": InfluxDB may be
//! writing it. A segment is finished when a newer one exists (InfluxDB only
//! rolls after the old one is flushed) or when it was deleted; an incomplete
//! tail in a finished segment is logged, counted and passed over. Delete
//! entries are passed over: like InfluxDB's own replication, only writes are
//! replicated. A damaged entry is logged, counted and skipped.
//!
//! # Gaps
//!
//! InfluxDB deletes closed segments once their data is in a TSM file; it does
//! not wait for this agent. A segment the follower needs that is gone while a
//! newer one exists is a gap: logged, counted in `wal_segments_missed`, and
//! reading goes on with the oldest segment still there. While the agent runs
//! it holds the segments open, so gaps come from downtime (or long
//! backpressure across an agent restart) longer than InfluxDB keeps them. A
//! gap is counted even when the lost segment may have been empty (InfluxDB
//! removes an empty last segment when it starts): the count is an upper bound,
//! never an understatement.
//!
//! The checkpoint is JSON: `{"shards":{"<rp>/<id>":[segment, offset, points]}}`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::wal_format::{self, HEADER_LEN};
use super::{validate, write_whole, Sink, SinkError, Written};
use crate::config::InfluxdbWal;
use crate::lineproto::Precision;
use crate::status::{Followed, SourceStatus};
use crate::sync::Locked;

/// A shard's read position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Pos {
    /// Segment id; 0 before the shard's first segment was seen.
    seg: u64,
    /// Byte offset of the next entry.
    off: u64,
    /// Points of that entry already queued.
    skip: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    shards: BTreeMap<String, (u64, u64, u64)>,
}

struct Shard {
    dir: PathBuf,
    /// Committed position.
    pos: Pos,
    /// Segments at or after `pos.seg`, held open.
    open: BTreeMap<u64, File>,
}

/// What one read of a shard produced.
#[derive(Default)]
struct Piece {
    /// Rebuilt lines, not yet validated.
    raw: Vec<u8>,
    next: Pos,
    bad_points: u64,
    deletes: u64,
    damaged: u64,
    /// Bytes after `next.off` that are not a whole entry (yet).
    tail: u64,
    /// The header at `next.off` cannot start an entry.
    bad_header: bool,
    /// What was skipped, for the log.
    notes: Vec<String>,
}

/// The state of one `[[influxdb_wal]]` source between polls.
pub struct WalFollower {
    cfg: InfluxdbWal,
    root: PathBuf,
    status: Arc<SourceStatus>,
    shards: BTreeMap<String, Shard>,
    /// Checkpoint positions of shards not seen yet.
    saved: BTreeMap<String, Pos>,
    first: bool,
    root_missing: bool,
}

/// Segment id of a file name `_00042.wal`.
fn segment_id(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('_')?.strip_suffix(".wal")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn subdirs(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Ok(name) = e.file_name().into_string() {
                out.push((name, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| segment_id(e.file_name().to_str()?))
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("_{id:05}.wal"))
}

impl WalFollower {
    /// A follower resuming from `checkpoint` (a value this module committed).
    pub fn new(
        cfg: InfluxdbWal,
        status: Arc<SourceStatus>,
        checkpoint: Option<Vec<u8>>,
    ) -> WalFollower {
        let saved = match checkpoint.as_deref().map(serde_json::from_slice::<State>) {
            None => BTreeMap::new(),
            Some(Ok(s)) => s
                .shards
                .into_iter()
                .map(|(k, (seg, off, skip))| (k, Pos { seg, off, skip }))
                .collect(),
            Some(Err(e)) => {
                warn!(
                    "{}: its checkpoint is unreadable ({e}); reading every segment from its start",
                    status.name
                );
                BTreeMap::new()
            }
        };
        WalFollower {
            root: cfg.wal_dir.join(&cfg.database),
            cfg,
            status,
            shards: BTreeMap::new(),
            saved,
            first: true,
            root_missing: false,
        }
    }

    /// One round: find shards and segments, queue what was written.
    pub fn poll(&mut self, sink: &mut dyn Sink) -> Result<(), SinkError> {
        let mut dirty = self.discover();
        // Shown while the reads below wait on a full queue, too.
        self.publish();
        let names: Vec<String> = self.shards.keys().cloned().collect();
        for name in names {
            dirty |= self.follow(&name, sink)?;
        }
        if dirty {
            sink.write(&[], 0, &self.state(None))?;
        }
        self.publish();
        Ok(())
    }

    /// Lists retention policies and shards; true when the set changed in a
    /// way the checkpoint must record.
    fn discover(&mut self) -> bool {
        let rps = match subdirs(&self.root) {
            Ok(rps) => {
                if self.root_missing {
                    info!("{}: {} exists now", self.status.name, self.root.display());
                    self.root_missing = false;
                }
                rps
            }
            Err(e) => {
                if !self.root_missing {
                    info!(
                        "{}: waiting for {} ({e}); InfluxDB creates it with the first write to {:?}",
                        self.status.name,
                        self.root.display(),
                        self.cfg.database
                    );
                    self.root_missing = true;
                }
                return false;
            }
        };
        let mut found = Vec::new();
        for (rp, rp_dir) in rps {
            let Ok(shards) = subdirs(&rp_dir) else {
                continue;
            };
            for (id, dir) in shards {
                if id.bytes().all(|b| b.is_ascii_digit()) {
                    found.push((format!("{rp}/{id}"), dir));
                }
            }
        }
        let mut changed = false;
        for (name, dir) in &found {
            if self.shards.contains_key(name) {
                continue;
            }
            let pos = match self.saved.remove(name) {
                Some(p) => {
                    info!(
                        "{}: shard {name}: resuming at segment {} byte {}",
                        self.status.name, p.seg, p.off
                    );
                    p
                }
                None => {
                    info!("{}: shard {name}: following", self.status.name);
                    Pos::default()
                }
            };
            self.shards.insert(
                name.clone(),
                Shard {
                    dir: dir.clone(),
                    pos,
                    open: BTreeMap::new(),
                },
            );
        }
        let gone: Vec<String> = self
            .shards
            .keys()
            .filter(|k| !found.iter().any(|(n, _)| n == *k))
            .cloned()
            .collect();
        for name in gone {
            info!(
                "{}: shard {name}: its WAL directory was removed (shard dropped or expired); no longer followed",
                self.status.name
            );
            self.shards.remove(&name);
            changed = true;
        }
        if std::mem::take(&mut self.first) && !self.saved.is_empty() {
            for name in std::mem::take(&mut self.saved).keys() {
                info!(
                    "{}: shard {name} is gone since the agent stopped (dropped or expired)",
                    self.status.name
                );
            }
            changed = true;
        }
        changed
    }

    /// The checkpoint, with shard `name` at `pos` if given.
    fn state(&self, with: Option<(&str, Pos)>) -> Vec<u8> {
        let shards = self
            .shards
            .iter()
            .map(|(k, s)| {
                let p = match with {
                    Some((n, p)) if n == k => p,
                    _ => s.pos,
                };
                (k.clone(), (p.seg, p.off, p.skip))
            })
            .collect();
        serde_json::to_vec(&State { shards }).expect("a checkpoint serialises")
    }

    /// Opens the shard's new segments and moves past segments that are
    /// gone (a gap). False when there is nothing to read yet.
    fn refresh(&mut self, name: &str) -> bool {
        let shard = self.shards.get_mut(name).expect("listed");
        let ids = match segments(&shard.dir) {
            Ok(ids) => ids,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
            Err(e) => {
                let msg = format!("shard {name}: cannot list {}: {e}", shard.dir.display());
                self.status.error(msg);
                return false;
            }
        };
        if shard.pos.seg == 0 {
            match ids.first() {
                Some(&first) => shard.pos.seg = first,
                None => return false,
            }
        }
        for &id in ids.iter().filter(|&&id| id >= shard.pos.seg) {
            if shard.open.contains_key(&id) {
                continue;
            }
            // A segment deleted between the listing and here is noticed below.
            if let Ok(f) = File::open(segment_path(&shard.dir, id)) {
                shard.open.insert(id, f);
            }
        }
        true
    }

    /// Reads shard `name` as far as it goes; true when its position moved
    /// without a commit (a finished segment, a gap).
    fn follow(&mut self, name: &str, sink: &mut dyn Sink) -> Result<bool, SinkError> {
        if !self.refresh(name) {
            return Ok(false);
        }
        let mut moved = false;
        let mut budget = sink.budget().max(1);
        loop {
            let shard = self.shards.get_mut(name).expect("listed");
            let pos = shard.pos;
            if !shard.open.contains_key(&pos.seg) {
                let Some(&next) = shard.open.keys().find(|&&id| id > pos.seg) else {
                    return Ok(moved);
                };
                let missed = next - pos.seg;
                let what = if pos.off > 0 {
                    format!(
                        "segment {} was removed before it was read to its end (read up to byte {}), and {} later ones before they were read",
                        pos.seg,
                        pos.off,
                        missed - 1
                    )
                } else {
                    format!(
                        "{missed} segments from {} on were removed before they were read (the first may have been empty)",
                        pos.seg
                    )
                };
                self.status
                    .segments_missed
                    .fetch_add(missed, Ordering::Relaxed);
                self.status.error(format!(
                    "shard {name}: {what}; their lines are lost (InfluxDB snapshotted them while the agent was stopped or blocked)"
                ));
                let shard = self.shards.get_mut(name).expect("listed");
                shard.pos = Pos {
                    seg: next,
                    off: 0,
                    skip: 0,
                };
                moved = true;
                continue;
            }
            let file = &shard.open[&pos.seg];
            let piece = match read_piece(file, pos, budget) {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!("shard {name}: segment {}: {e}", pos.seg);
                    self.status.error(msg);
                    return Ok(moved);
                }
            };
            self.report(name, &piece);
            if piece.next != pos {
                let (payload, lines) = self.validate(name, &piece);
                let state = self.state(Some((name, piece.next)));
                // Shards are named "<retention policy>/<id>".
                let rp = name.split_once('/').map_or("autogen", |(rp, _)| rp);
                match write_whole(sink, &self.status, rp, &payload, lines, &state, budget > 1)? {
                    Written::Queued => {}
                    Written::Shrink => {
                        budget /= 2;
                        continue;
                    }
                    Written::Skipped => self.status.error(format!(
                        "shard {name}: segment {} byte {}: a point larger than a replication's max_queue_size; skipped",
                        pos.seg, pos.off
                    )),
                }
                self.shards.get_mut(name).expect("listed").pos = piece.next;
                continue;
            }
            // Nothing more now: is this segment finished?
            let shard = self.shards.get_mut(name).expect("listed");
            let file = &shard.open[&pos.seg];
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            if size < pos.off {
                warn!(
                    "{}: shard {name}: segment {} shrank to {size} bytes below the read position {} (influxd truncated a damaged tail); going on from its end",
                    self.status.name, pos.seg, pos.off
                );
                shard.pos.off = size;
                shard.pos.skip = 0;
                moved = true;
                continue;
            }
            let deleted = file.metadata().map(|m| m.nlink() == 0).unwrap_or(true);
            let newer = shard.open.keys().any(|&id| id > pos.seg);
            if !(deleted || newer) {
                return Ok(moved);
            }
            if piece.tail > 0 || piece.bad_header {
                self.status.error(format!(
                    "shard {name}: segment {} ends with {} bytes that are not a whole entry (influxd stopped mid-write?); skipped",
                    pos.seg,
                    size - pos.off
                ));
            }
            let shard = self.shards.get_mut(name).expect("listed");
            shard.open.remove(&pos.seg);
            shard.pos = Pos {
                seg: pos.seg + 1,
                off: 0,
                skip: 0,
            };
            moved = true;
        }
    }

    /// Counts and logs what a piece met besides points.
    fn report(&self, name: &str, p: &Piece) {
        for note in &p.notes {
            warn!("{}: shard {name}: {note}", self.status.name);
        }
        self.status
            .deletes_skipped
            .fetch_add(p.deletes, Ordering::Relaxed);
        if p.bad_points > 0 {
            self.status
                .invalid_lines
                .fetch_add(p.bad_points, Ordering::Relaxed);
        }
        if p.damaged > 0 {
            self.status.errors.fetch_add(p.damaged, Ordering::Relaxed);
            self.status.detail.locked().latest_error =
                format!("shard {name}: {} damaged entries skipped", p.damaged);
        }
    }

    /// Validates the rebuilt lines as any write is validated.
    fn validate(&self, name: &str, p: &Piece) -> (Vec<u8>, u64) {
        let (out, summary) = validate(&self.status, &p.raw, Precision::Nanoseconds, |e| {
            warn!(
                "{}: shard {name}: segment {}: a point rebuilt as an invalid line: {}: \"{}\"; skipped",
                self.status.name, p.next.seg, e.error, e.excerpt
            )
        });
        (out, summary.lines)
    }

    fn publish(&self) {
        let followed: Vec<Followed> = self
            .shards
            .iter()
            .map(|(name, s)| {
                let size = |f: &File| f.metadata().map(|m| m.len()).unwrap_or(0);
                let lag = s
                    .open
                    .iter()
                    .map(|(&id, f)| {
                        if id == s.pos.seg {
                            size(f).saturating_sub(s.pos.off)
                        } else {
                            size(f)
                        }
                    })
                    .sum();
                Followed {
                    path: name.clone(),
                    segment: Some(s.pos.seg),
                    offset: s.pos.off,
                    lag_bytes: lag,
                }
            })
            .collect();
        self.status.set_followed(followed);
    }
}

/// Reads whole entries of a segment from `pos`, rebuilding points as lines
/// until `budget` bytes of lines or the end of what is written.
fn read_piece(file: &File, pos: Pos, budget: usize) -> io::Result<Piece> {
    let size = file.metadata()?.len();
    let mut p = Piece {
        next: pos,
        ..Piece::default()
    };
    while p.raw.len() < budget && p.next.off <= size {
        let off = p.next.off;
        let left = size - off;
        if left < HEADER_LEN as u64 {
            p.tail = left;
            break;
        }
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, off)?;
        let Some(len) = wal_format::entry_len(&header) else {
            p.bad_header = true;
            break;
        };
        if left < len as u64 {
            p.tail = left;
            break;
        }
        let mut block = vec![0u8; len - HEADER_LEN];
        file.read_exact_at(&mut block, off + HEADER_LEN as u64)?;
        let after = Pos {
            seg: pos.seg,
            off: off + len as u64,
            skip: 0,
        };
        if header[0] != wal_format::WRITE_ENTRY {
            p.deletes += 1;
            p.next = after;
            continue;
        }
        let data = wal_format::decompress(&block);
        let decoded = match &data {
            Ok(d) => wal_format::write_points(d),
            Err(e) => Err(e.clone()),
        };
        let points = match decoded {
            Ok(points) => points,
            Err(e) => {
                p.notes.push(format!(
                    "segment {} byte {off}: damaged entry skipped: {e}",
                    pos.seg
                ));
                p.damaged += 1;
                p.next = after;
                continue;
            }
        };
        let mut k = p.next.skip as usize;
        while k < points.len() && p.raw.len() < budget {
            if let Err(e) = wal_format::push_line(&mut p.raw, &points[k]) {
                p.notes.push(format!(
                    "segment {} byte {off}: point of {} at {} skipped: {e}",
                    pos.seg,
                    String::from_utf8_lossy(points[k].series),
                    points[k].time
                ));
                p.bad_points += 1;
            }
            k += 1;
        }
        if k < points.len() {
            p.next.skip = k as u64;
            break;
        }
        p.next = after;
    }
    Ok(p)
}

#[cfg(test)]
mod tests;
