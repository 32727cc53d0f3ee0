//! `[[tail]]`: follows line-protocol files, by path or glob, into a local
//! bucket.
//!
//! Every poll lists the files the pattern matches and reads whatever whole
//! lines were appended since the last committed offset. Files are known by
//! device and inode, not by name, which is what makes rotation work:
//!
//! - **Rename** (`logrotate` default): the old inode no longer matches (or
//!   matches under its new name); its descriptor stays open and is read to
//!   the end, and dropped once nothing was added for a grace period (the
//!   writer may need a moment to reopen). The new file at the old name is a
//!   new inode and is read from its start.
//! - **Copytruncate**: the same inode shrinks below the offset, or its first
//!   bytes change (a fingerprint of up to 1 KiB of consumed data is kept and
//!   checked at every poll, since a file can be truncated and rewritten to
//!   the very size it had between two polls): reading starts again at 0.
//!   A rewrite that keeps both the size and the first KiB is not noticed.
//!   Lines written between the last poll and the truncation are only in the
//!   copy; a glob that also matches the copy reads it as a new file (the
//!   lines carry timestamps, so the remote overwrites).
//! - **New files** matching the glob are read from their start.
//!
//! Files are cut into points as request bodies are (`lineproto::point_end`):
//! a newline inside a quoted string field value is part of the value, so a
//! point may span lines. A last point without its newline, or with a string
//! not closed yet, is left until the rest arrives, whether it straddles a
//! poll or a rotation; only when a rotated file is finished is it taken as
//! it is. The wait is bounded: a point that does not end within [`MAX_LINE`]
//! bytes (a stray quote, or a string longer than that) is cut after the
//! first newline, its first line is counted invalid, and reading goes on
//! with the next line (the rest of a string that long is then read as
//! lines; InfluxDB documents 64 KB as the limit of a string value). A
//! stray quote holds the lines after it back until then. Invalid points are
//! skipped, counted and logged with file, the line they start on, column
//! and reason, never with their text: whatever a tailed file holds may be a
//! secret that should not reach a log.
//!
//! Symbolic links are not followed unless `follow_symlinks = true`: a path
//! the pattern matches is skipped (logged once, counted as an error) when it
//! or a directory it passes through below the pattern's fixed part is a
//! link, and files are opened with `O_NOFOLLOW` so a link swapped in
//! between the check and the open is refused too. Whoever can write in a
//! tailed directory can still write lines, but cannot make the agent read,
//! log or ship another file it can read.
//!
//! The checkpoint (JSON, one record per followed file: path, device, inode,
//! offset, line number, fingerprint) is committed with the lines read up to
//! it. On start, records are matched to files by inode; a record whose file
//! was rotated away while the agent was stopped is looked up by inode in the
//! same directory and finished.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{validate, write_whole, Sink, SinkError, Written, DEFAULT_RP};
use crate::config::Tail;
use crate::lineproto;
use crate::status::{Followed as FollowedStatus, SourceStatus};

/// Bytes at the start of a file whose checksum tells a rewritten file from
/// an appended one.
const FINGERPRINT_LEN: u64 = 1024;
/// Why a line no queue can take is skipped.
const TOO_LARGE: &str = "line larger than a replication's max_queue_size";

/// Most directories one source watches for changes; a pattern matching more
/// is polled every `poll_interval` instead.
pub const MAX_WATCHED: usize = 256;

/// A line longer than this is skipped (and counted invalid).
pub const MAX_LINE: usize = 4 << 20;
/// Smallest read window, whatever the queue budget.
const MIN_WINDOW: usize = 1024;
/// A rotated file is finished after this long without growing (at least;
/// ten poll intervals when that is longer).
const ROTATED_GRACE: Duration = Duration::from_secs(5);

/// A followed file's position, as committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Pos {
    /// Bytes consumed: the start of the next line.
    off: u64,
    /// Lines consumed (blank ones too), for error messages.
    line: u64,
    /// Length and CRC32 of the fingerprinted prefix.
    fpl: u64,
    fpc: u32,
    /// Inside a line longer than [`MAX_LINE`]: drop up to the next newline.
    skip: bool,
}

/// One checkpoint record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    path: String,
    dev: u64,
    ino: u64,
    off: u64,
    line: u64,
    fpl: u64,
    fpc: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    skip: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    files: Vec<Saved>,
}

struct Followed {
    path: PathBuf,
    dev: u64,
    ino: u64,
    file: File,
    pos: Pos,
    /// Matched by the pattern at the last poll.
    matched: bool,
    /// Size at the last look.
    size: u64,
    /// Unmatched files: since when the size has not changed.
    idle_since: Option<Instant>,
}

/// What the bytes after a file's offset hold.
enum Chunk {
    /// Whole points (the text ends in the '\n' that ends a point), or the
    /// line of a point cut short by [`over_long_cut`].
    Lines(Vec<u8>),
    /// Only the start of a line so far.
    Partial,
    /// This many bytes of a line longer than [`MAX_LINE`], no newline yet.
    TooLong(u64),
}

/// The state of one `[[tail]]` source between polls.
pub struct Tailer {
    cfg: Tail,
    pattern: String,
    literal: bool,
    status: Arc<SourceStatus>,
    files: Vec<Followed>,
    /// Checkpoint records not matched to a file yet (first poll only).
    saved: Vec<Saved>,
    /// No checkpoint existed when the source started.
    fresh: bool,
    first: bool,
    grace: Duration,
    /// Paths whose open failed, logged once.
    failed: HashSet<PathBuf>,
    /// Symbolic links skipped, logged once.
    links: HashSet<PathBuf>,
    /// Leading components of the pattern an operator wrote out (no glob
    /// characters); links there are the operator's own and are followed.
    fixed: usize,
}

fn crc_prefix(file: &File, len: u64) -> io::Result<Option<u32>> {
    let mut buf = vec![0u8; len as usize];
    match file.read_exact_at(&mut buf, 0) {
        Ok(()) => Ok(Some(crc32fast::hash(&buf))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Offset just past the last whole point in `[0, size)`, and the newlines
/// before it. The file is walked from its start with the reader's rules, so
/// a string value holding newlines is not taken for several lines, and
/// reading never starts inside one.
fn end_of_last_point(file: &File, size: u64) -> io::Result<(u64, u64)> {
    let mut end = 0u64;
    let mut lines = 0u64;
    // Bytes read from offset `pending_at` on that hold no point end yet.
    let mut pending = Vec::new();
    let mut pending_at = 0u64;
    // Inside a line longer than the limit without a newline: the reader
    // skips it to its newline, and so does this.
    let mut skipping = false;
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    while at < size {
        let n = ((size - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        at += n as u64;
        pending.extend_from_slice(&buf[..n]);
        // Cut as often as the bytes allow: the end of a skipped line may be
        // followed by whole points.
        loop {
            let cut = if skipping {
                memchr::memchr(b'\n', &pending).map(|k| k + 1)
            } else {
                lineproto::last_point_end(&pending).or_else(|| {
                    (pending.len() >= MAX_LINE)
                        .then(|| over_long_cut(&pending))
                        .flatten()
                })
            };
            match cut {
                Some(k) => {
                    lines += memchr::memchr_iter(b'\n', &pending[..k]).count() as u64;
                    end = pending_at + k as u64;
                    pending.drain(..k);
                    pending_at = end;
                    skipping = false;
                }
                None if skipping || pending.len() >= MAX_LINE => {
                    pending_at += pending.len() as u64;
                    pending.clear();
                    skipping = true;
                    break;
                }
                None => break,
            }
        }
    }
    Ok((end, lines))
}

/// Where to cut `buf` (at least [`MAX_LINE`] bytes, starting at a point that
/// does not end within them): after its first newline, if it has one. Such a
/// point holds a string value left open (a stray quote) or longer than the
/// limit; the line it starts on is taken as an invalid point, and reading
/// goes on with the next line, so one quote cannot hold a file back forever.
fn over_long_cut(buf: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', buf).map(|k| k + 1)
}

/// How many leading components of `pattern` hold no glob character: the
/// directories an operator named. A literal path's last component counts as
/// matched, not fixed, so a link put in its place is noticed.
fn fixed_components(pattern: &Path) -> usize {
    let all = pattern.components().count();
    let fixed = pattern
        .components()
        .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
        .count();
    fixed.min(all.saturating_sub(1))
}

/// The first component of `path` after its `fixed` leading ones that is a
/// symbolic link, if any.
pub(crate) fn link_below(path: &Path, fixed: usize) -> Option<PathBuf> {
    let mut prefix = PathBuf::new();
    for (i, c) in path.components().enumerate() {
        prefix.push(c);
        if i < fixed {
            continue;
        }
        match fs::symlink_metadata(&prefix) {
            Ok(m) if m.file_type().is_symlink() => return Some(prefix),
            Ok(_) => {}
            // Gone meanwhile: the stat after this finds nothing either.
            Err(_) => return None,
        }
    }
    None
}

/// Looks in `dir` for the file with inode `ino` on device `dev`.
fn find_inode(dir: &Path, dev: u64, ino: u64) -> Option<PathBuf> {
    fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let m = e.metadata().ok()?;
        (m.is_file() && m.dev() == dev && m.ino() == ino).then(|| e.path())
    })
}

impl Tailer {
    /// A tailer resuming from `checkpoint` (a value this module committed).
    pub fn new(cfg: Tail, status: Arc<SourceStatus>, checkpoint: Option<Vec<u8>>) -> Tailer {
        let pattern = cfg.path.to_string_lossy().into_owned();
        let literal = !pattern.contains(['*', '?', '[']);
        let saved = match checkpoint.as_deref().map(serde_json::from_slice::<State>) {
            None => Vec::new(),
            Some(Ok(s)) => s.files,
            Some(Err(e)) => {
                warn!(
                    "{}: its checkpoint is unreadable ({e}); files are read from their start",
                    status.name
                );
                Vec::new()
            }
        };
        let grace = ROTATED_GRACE.max(cfg.poll_interval * 10);
        let fixed = fixed_components(&cfg.path);
        Tailer {
            links: HashSet::new(),
            fixed,
            pattern,
            literal,
            status,
            files: Vec::new(),
            saved,
            fresh: checkpoint.is_none(),
            first: true,
            grace,
            failed: HashSet::new(),
            cfg,
        }
    }

    /// The directories whose changes should wake the source: the pattern's
    /// fixed part, every directory its wildcard directories match (where
    /// new files can appear), and those of the files it follows. `None`
    /// when there are more than [`MAX_WATCHED`]: the source polls.
    pub fn watch_dirs(&self) -> Option<std::collections::BTreeSet<PathBuf>> {
        let parts: Vec<_> = self.cfg.path.components().collect();
        let mut dirs = std::collections::BTreeSet::new();
        for k in self.fixed..parts.len() {
            let prefix: PathBuf = parts[..k].iter().collect();
            if prefix.as_os_str().is_empty() {
                continue;
            }
            if k == self.fixed {
                dirs.insert(prefix);
                continue;
            }
            let Ok(found) = glob::glob(&prefix.to_string_lossy()) else {
                continue;
            };
            for dir in found.flatten().filter(|d| d.is_dir()) {
                dirs.insert(dir);
                if dirs.len() > MAX_WATCHED {
                    return None;
                }
            }
        }
        dirs.extend(
            self.files
                .iter()
                .filter_map(|f| f.path.parent().map(Path::to_path_buf)),
        );
        (dirs.len() <= MAX_WATCHED).then_some(dirs)
    }

    /// One round: find files, read what was appended, finish rotated files.
    pub fn poll(&mut self, sink: &mut dyn Sink) -> Result<(), SinkError> {
        // Starting at the files' ends must be remembered at once, or a
        // restart would start at the (later) ends again.
        let mut dirty = self.first && self.fresh && !self.cfg.from_beginning;
        // A new file is recorded before it is read, so that a restart finds
        // it by inode even if it was rotated away meanwhile.
        dirty |= self.discover();
        if self.first {
            dirty |= self.resume_rotated();
            self.first = false;
        }
        // Shown while the reads below wait on a full queue, too.
        self.publish();
        if dirty {
            sink.write(&[], 0, &self.state(None, None))?;
        }
        for i in 0..self.files.len() {
            self.read(i, sink)?;
        }
        self.finish_rotated(sink)?;
        self.publish();
        Ok(())
    }

    fn scan(&self) -> Vec<PathBuf> {
        if self.literal {
            return vec![self.cfg.path.clone()];
        }
        let mut out: Vec<PathBuf> = match glob::glob(&self.pattern) {
            Ok(paths) => paths.flatten().collect(),
            Err(_) => Vec::new(),
        };
        out.sort();
        out
    }

    /// Matches the pattern's files to the followed ones and opens new ones;
    /// true when some were added.
    fn discover(&mut self) -> bool {
        let mut added = false;
        for f in &mut self.files {
            f.matched = false;
        }
        for path in self.scan() {
            if !self.cfg.follow_symlinks {
                if let Some(link) = link_below(&path, self.fixed) {
                    if self.links.insert(path.clone()) {
                        self.status.error(format!(
                            "{} is a symbolic link (or passes through {}); not followed \
                             (follow_symlinks = false)",
                            path.display(),
                            link.display()
                        ));
                    }
                    continue;
                }
            }
            let meta = match fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                _ => continue,
            };
            let (dev, ino) = (meta.dev(), meta.ino());
            if let Some(f) = self.files.iter_mut().find(|f| f.dev == dev && f.ino == ino) {
                if !f.matched {
                    if f.path != path {
                        info!(
                            "{}: {} is now {}",
                            self.status.name,
                            f.path.display(),
                            path.display()
                        );
                        f.path = path;
                    }
                    f.matched = true;
                }
                continue;
            }
            match self.open(&path) {
                Ok(f) => {
                    self.failed.remove(&path);
                    self.files.push(f);
                    added = true;
                }
                Err(e) => {
                    if self.failed.insert(path.clone()) {
                        self.status
                            .error(format!("cannot follow {}: {e}", path.display()));
                    }
                }
            }
        }
        added
    }

    /// Opens a file newly matched, at the position its checkpoint record
    /// (if any, and still valid) gives.
    fn open(&mut self, path: &Path) -> io::Result<Followed> {
        let mut options = fs::OpenOptions::new();
        options.read(true);
        if !self.cfg.follow_symlinks {
            std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
        }
        let file = options.open(path)?;
        let meta = file.metadata()?;
        let (dev, ino, size) = (meta.dev(), meta.ino(), meta.len());
        let name = &self.status.name;
        let mut pos = Pos::default();
        if let Some(i) = self.saved.iter().position(|s| s.dev == dev && s.ino == ino) {
            let s = self.saved.swap_remove(i);
            if s.off <= size && crc_prefix(&file, s.fpl)? == Some(s.fpc) {
                pos = Pos {
                    off: s.off,
                    line: s.line,
                    fpl: s.fpl,
                    fpc: s.fpc,
                    skip: s.skip,
                };
                info!(
                    "{name}: {}: resuming at byte {} (line {})",
                    path.display(),
                    pos.off,
                    pos.line + 1
                );
            } else {
                info!(
                    "{name}: {}: truncated or rewritten while the agent was stopped; reading it from its start",
                    path.display()
                );
            }
        } else if self.first && self.fresh && !self.cfg.from_beginning {
            let (off, line) = end_of_last_point(&file, size)?;
            pos.off = off;
            pos.line = line;
            pos.fpl = off.min(FINGERPRINT_LEN);
            pos.fpc = crc_prefix(&file, pos.fpl)?.unwrap_or(0);
            info!(
                "{name}: {}: starting at its end, byte {off} (from_beginning = false)",
                path.display()
            );
        } else {
            info!("{name}: {}: following from its start", path.display());
        }
        Ok(Followed {
            path: path.to_path_buf(),
            dev,
            ino,
            file,
            pos,
            matched: true,
            size,
            idle_since: None,
        })
    }

    /// First poll: checkpoint records whose file no longer matches were
    /// rotated while the agent was stopped; finish them if they are still
    /// in their directory. True when a record was given up (the checkpoint
    /// changes).
    fn resume_rotated(&mut self) -> bool {
        let name = self.status.name.clone();
        let mut gave_up = false;
        for s in std::mem::take(&mut self.saved) {
            let old = PathBuf::from(&s.path);
            let found = old
                .parent()
                .and_then(|dir| find_inode(dir, s.dev, s.ino))
                .and_then(|p| File::open(&p).ok().map(|f| (p, f)));
            let resumed = found.and_then(|(p, file)| {
                let size = file.metadata().ok()?.len();
                let same = s.off <= size && crc_prefix(&file, s.fpl).ok()? == Some(s.fpc);
                same.then_some((p, file, size))
            });
            match resumed {
                Some((p, file, size)) => {
                    if p == old {
                        info!(
                            "{name}: {}: rotated away before the restart; finishing it from byte {}",
                            p.display(),
                            s.off
                        );
                    } else {
                        info!(
                            "{name}: {} was rotated to {} while the agent was stopped; finishing it from byte {}",
                            old.display(),
                            p.display(),
                            s.off
                        );
                    }
                    self.files.push(Followed {
                        path: p,
                        dev: s.dev,
                        ino: s.ino,
                        file,
                        pos: Pos {
                            off: s.off,
                            line: s.line,
                            fpl: s.fpl,
                            fpc: s.fpc,
                            skip: s.skip,
                        },
                        matched: false,
                        size,
                        idle_since: None,
                    });
                }
                None => {
                    warn!(
                        "{name}: {} is gone since the agent stopped (rotated away and removed?); lines added to it after byte {}, if any, were not read",
                        old.display(),
                        s.off
                    );
                    gave_up = true;
                }
            }
        }
        gave_up
    }

    /// The checkpoint: every followed file, with file `i` at `pos` if given,
    /// and without file `drop`.
    fn state(&self, with: Option<(usize, Pos)>, drop: Option<usize>) -> Vec<u8> {
        let files = self
            .files
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != drop)
            .map(|(i, f)| {
                let p = match with {
                    Some((j, p)) if j == i => p,
                    _ => f.pos,
                };
                Saved {
                    path: f.path.to_string_lossy().into_owned(),
                    dev: f.dev,
                    ino: f.ino,
                    off: p.off,
                    line: p.line,
                    fpl: p.fpl,
                    fpc: p.fpc,
                    skip: p.skip,
                }
            })
            .collect();
        serde_json::to_vec(&State { files }).expect("a checkpoint serialises")
    }

    /// The whole points (or the over-long line) after `f`'s offset.
    fn next_chunk(f: &Followed, size: u64, window: usize) -> io::Result<Chunk> {
        let avail = size - f.pos.off;
        let want = (avail as usize).min(window);
        let mut buf = vec![0u8; want];
        if let Err(e) = f.file.read_exact_at(&mut buf, f.pos.off) {
            // Shrunk since it was measured: the next poll sees the truncation.
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(Chunk::Partial)
            } else {
                Err(e)
            };
        }
        if let Some(k) = lineproto::last_point_end(&buf) {
            buf.truncate(k);
            return Ok(Chunk::Lines(buf));
        }
        if want as u64 == avail && want < MAX_LINE {
            return Ok(Chunk::Partial);
        }
        // One point longer than the window: read on to its end.
        let want = (avail as usize).min(MAX_LINE);
        let mut buf = vec![0u8; want];
        if f.file.read_exact_at(&mut buf, f.pos.off).is_err() {
            return Ok(Chunk::Partial);
        }
        match lineproto::point_end(&buf) {
            Some(k) => {
                buf.truncate(k + 1);
                Ok(Chunk::Lines(buf))
            }
            None if want < MAX_LINE => Ok(Chunk::Partial),
            None => match over_long_cut(&buf) {
                Some(k) => {
                    buf.truncate(k);
                    Ok(Chunk::Lines(buf))
                }
                None => Ok(Chunk::TooLong(MAX_LINE as u64)),
            },
        }
    }

    /// Whether the fingerprinted prefix of `f` is still what was consumed.
    fn unchanged(f: &Followed) -> io::Result<bool> {
        Ok(f.pos.fpl == 0 || crc_prefix(&f.file, f.pos.fpl)? == Some(f.pos.fpc))
    }

    /// Reads and commits the whole lines appended to file `i`.
    fn read(&mut self, i: usize, sink: &mut dyn Sink) -> Result<(), SinkError> {
        let mut window = sink.budget().max(MIN_WINDOW);
        loop {
            let f = &self.files[i];
            let size = match f.file.metadata() {
                Ok(m) => m.len(),
                Err(e) => {
                    self.status
                        .error(format!("cannot stat {}: {e}", f.path.display()));
                    return Ok(());
                }
            };
            // The prefix is checked even when the size did not change: a
            // file truncated and rewritten between two polls may be back at
            // exactly the size it had (one read of at most 1 KiB per poll).
            let rewritten = match Self::unchanged(f) {
                Ok(same) => !same,
                Err(e) => {
                    self.status
                        .error(format!("cannot read {}: {e}", f.path.display()));
                    return Ok(());
                }
            };
            if size < f.pos.off || rewritten {
                info!(
                    "{}: {} was truncated (copytruncate?) at byte {} of {}; reading it from its start",
                    self.status.name,
                    f.path.display(),
                    size,
                    f.pos.off
                );
                self.files[i].pos = Pos::default();
            }
            let f = &mut self.files[i];
            let changed = f.size != size;
            if changed {
                f.idle_since = None;
            }
            f.size = size;
            let done = size == f.pos.off;
            if changed {
                // The lag shows while the write below waits on a full queue.
                self.publish();
            }
            if done {
                return Ok(());
            }
            let f = &mut self.files[i];
            let chunk = match Self::next_chunk(f, size, window) {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("cannot read {}: {e}", f.path.display());
                    self.status.error(msg);
                    return Ok(());
                }
            };
            let f = &self.files[i];
            let mut next = f.pos;
            let (payload, lines) = match chunk {
                Chunk::Partial => return Ok(()),
                Chunk::TooLong(n) => {
                    if !next.skip {
                        self.invalid(&f.path, next.line + 1, "line longer than 4 MiB");
                    }
                    next.off += n;
                    next.skip = true;
                    (Vec::new(), 0)
                }
                Chunk::Lines(text) => {
                    let mut body = &text[..];
                    let mut first_line = next.line;
                    if next.skip {
                        // The end of an over-long line: drop it.
                        let k = memchr::memchr(b'\n', body).expect("chunk ends in a newline");
                        body = &body[k + 1..];
                        first_line += 1;
                        next.skip = false;
                    }
                    let (payload, lines) = self.validate(&f.path, body, first_line);
                    next.off += text.len() as u64;
                    next.line += memchr::memchr_iter(b'\n', &text).count() as u64;
                    (payload, lines)
                }
            };
            if next.fpl < FINGERPRINT_LEN && next.off > next.fpl {
                next.fpl = next.off.min(FINGERPRINT_LEN);
                next.fpc = match crc_prefix(&f.file, next.fpl) {
                    Ok(Some(c)) => c,
                    _ => return Ok(()),
                };
            }
            let state = self.state(Some((i, next)), None);
            match write_whole(
                sink,
                &self.status,
                DEFAULT_RP,
                &payload,
                lines,
                &state,
                lines > 1,
            )? {
                Written::Queued => self.files[i].pos = next,
                Written::Shrink => {
                    window = (window / 2).max(MIN_WINDOW);
                    continue;
                }
                Written::Skipped => {
                    self.log_skipped(&self.files[i].path, self.files[i].pos.line + 1, TOO_LARGE);
                    self.files[i].pos = next;
                }
            }
        }
    }

    fn invalid(&self, path: &Path, line: u64, why: &str) {
        self.status.invalid_lines.fetch_add(1, Ordering::Relaxed);
        self.log_skipped(path, line, why);
    }

    /// Logs a line skipped (and already counted): where it was and why.
    fn log_skipped(&self, path: &Path, line: u64, why: &str) {
        warn!(
            "{}: {}:{line}: {why}; skipped",
            self.status.name,
            path.display()
        );
    }

    /// Validates and normalises `body` (whole lines; the first is line
    /// `first_line + 1` of its file); logs and counts the invalid ones.
    fn validate(&self, path: &Path, body: &[u8], first_line: u64) -> (Vec<u8>, u64) {
        // File, line, column and reason; the text stays out of the log.
        let (out, summary) = validate(&self.status, body, self.cfg.precision, |e| {
            warn!(
                "{}: {}:{}:{}: {}; skipped",
                self.status.name,
                path.display(),
                first_line + e.line as u64,
                e.error.column,
                e.error.kind
            )
        });
        let more = summary.error_count - summary.errors.len() as u64;
        if more > 0 {
            warn!(
                "{}: {}: {more} more invalid lines after line {} skipped",
                self.status.name,
                path.display(),
                first_line + summary.errors.last().map_or(0, |e| e.line as u64)
            );
        }
        (out, summary.lines)
    }

    /// Finishes files that no longer match and stopped growing: a last line
    /// without a newline is taken as a line, and the file is dropped from
    /// the checkpoint.
    fn finish_rotated(&mut self, sink: &mut dyn Sink) -> Result<(), SinkError> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.files.len() {
            let f = &mut self.files[i];
            if f.matched {
                f.idle_since = None;
                i += 1;
                continue;
            }
            let since = *f.idle_since.get_or_insert(now);
            if now.duration_since(since) < self.grace {
                i += 1;
                continue;
            }
            let f = &self.files[i];
            let rest = f.size.saturating_sub(f.pos.off);
            let mut payload = Vec::new();
            let mut lines = 0;
            if rest > 0 && !f.pos.skip && rest <= MAX_LINE as u64 {
                let mut buf = vec![0u8; rest as usize];
                if f.file.read_exact_at(&mut buf, f.pos.off).is_ok() {
                    buf.push(b'\n');
                    (payload, lines) = self.validate(&f.path, &buf, f.pos.line);
                }
            }
            let state = self.state(None, Some(i));
            if write_whole(
                sink,
                &self.status,
                DEFAULT_RP,
                &payload,
                lines,
                &state,
                false,
            )? == Written::Skipped
            {
                self.log_skipped(&f.path, f.pos.line + 1, TOO_LARGE);
            }
            let f = self.files.remove(i);
            info!(
                "{}: {} (rotated away) finished at byte {}; no longer followed",
                self.status.name,
                f.path.display(),
                f.size
            );
        }
        Ok(())
    }

    fn publish(&self) {
        let followed = self
            .files
            .iter()
            .map(|f| FollowedStatus {
                path: f.path.to_string_lossy().into_owned(),
                segment: None,
                offset: f.pos.off,
                lag_bytes: f.size.saturating_sub(f.pos.off),
            })
            .collect::<Vec<_>>();
        self.status.set_followed(followed);
    }
}

#[cfg(test)]
mod tests;
