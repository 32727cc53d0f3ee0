//! Waking a `[[tail]]` source when its files change, instead of every
//! `poll_interval`.
//!
//! A gateway on a battery or a solar panel pays for every wakeup. A tail
//! source that looked at its files four times a second whether or not
//! anything was written cost most of the agent's idle CPU. So the source
//! watches the directories its files are in (and the pattern's fixed part,
//! where new files appear) with inotify: any change there (a write, a
//! create, a rename, a delete, a truncation) wakes it at once, and without
//! one it looks again only every [`RESCAN`] (10 s). Polls stay at least
//! `poll_interval` apart, so a file written a thousand times a second is
//! still read in pieces of `poll_interval`, not a thousand times.
//!
//! What inotify does not report is caught by the rescan: a file written by
//! another machine on a network file system, a file in a directory below the
//! pattern's fixed part that holds no followed file yet, or a write through a
//! shared mapping. Where no directory can be watched (inotify unavailable, or
//! its watch limit reached), the source polls every `poll_interval`, as it
//! would without this module.
//!
//! The stop signal reaches a waiting source through an eventfd registered
//! with its [`super::Stopper`].

use std::cell::Cell;
use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

/// How often a watched source looks at its files when nothing woke it.
pub const RESCAN: Duration = Duration::from_secs(10);

/// [`RESCAN`]; tests (debug builds) set it with
/// `EDGE_REPLICATOR_TAIL_RESCAN_MS`, e.g. to an hour, to show that a change
/// and not the rescan woke the source.
pub fn rescan() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("EDGE_REPLICATOR_TAIL_RESCAN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    RESCAN
}

const EVENTS: u32 = libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CLOSE_WRITE
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// Why a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// Something changed in a watched directory.
    Changed,
    /// The time was up.
    Timeout,
    /// The source was told to stop.
    Stopped,
}

/// What [`Watcher::watch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// Nothing could be watched: poll.
    No,
    /// The same directories as before: changes since are pending.
    Same,
    /// Watches new since the last look: a change just before them was not
    /// seen, so look once more before waiting.
    New,
}

/// An inotify instance watching a set of directories, and the eventfd that
/// stops a wait on it.
pub struct Watcher {
    inotify: Option<OwnedFd>,
    stop: OwnedFd,
    /// The directories watched by `inotify`.
    dirs: BTreeSet<PathBuf>,
    /// The kernel dropped a watch (its directory was deleted or moved, or
    /// events overflowed): the same set must be watched anew.
    stale: Cell<bool>,
}

impl Watcher {
    /// A watcher with nothing watched yet; `stop` is written when the
    /// source is told to stop.
    pub fn new() -> io::Result<Watcher> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watcher {
            inotify: None,
            // SAFETY: `fd` is a new descriptor owned by nobody else.
            stop: unsafe { OwnedFd::from_raw_fd(fd) },
            dirs: BTreeSet::new(),
            stale: Cell::new(false),
        })
    }

    /// A descriptor that, written to, ends any wait.
    pub fn stop_fd(&self) -> io::Result<OwnedFd> {
        self.stop.try_clone()
    }

    /// Watches exactly `dirs` (a new set replaces the old one); `None`
    /// (too many to watch) or an empty set: nothing.
    pub fn watch(&mut self, dirs: Option<BTreeSet<PathBuf>>) -> Watched {
        let dirs = dirs.unwrap_or_default();
        if dirs == self.dirs && self.inotify.is_some() && !self.stale.get() {
            return Watched::Same;
        }
        self.stale.set(false);
        // A new instance rather than removing stale watches one by one:
        // the set changes only when files or directories come and go.
        self.inotify = None;
        self.dirs.clear();
        if dirs.is_empty() {
            return Watched::No;
        }
        // SAFETY: inotify_init1 takes no pointers; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Watched::No;
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut any = false;
        for dir in &dirs {
            let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: `path` is a valid NUL-terminated string for the call.
            let wd = unsafe {
                libc::inotify_add_watch(
                    inotify.as_raw_fd(),
                    path.as_ptr(),
                    EVENTS | libc::IN_ONLYDIR,
                )
            };
            any |= wd >= 0;
        }
        if !any {
            return Watched::No;
        }
        self.inotify = Some(inotify);
        self.dirs = dirs;
        Watched::New
    }

    /// Waits up to `timeout` for a change in a watched directory or the
    /// stop signal, and takes every pending event (one wake for many).
    pub fn wait(&self, timeout: Duration) -> Woke {
        let mut fds = [
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.inotify.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a valid array of two pollfd for the call; a
        // negative fd is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n <= 0 {
            // A timeout, or a signal: either way, look at the files.
            return Woke::Timeout;
        }
        if fds[0].revents != 0 {
            return Woke::Stopped;
        }
        if let Some(fd) = &self.inotify {
            if drain(fd.as_raw_fd()) {
                self.stale.set(true);
            }
        }
        Woke::Changed
    }
}

/// Reads every pending event: what changed does not matter, only that
/// something did. True if the kernel dropped a watch (`IN_IGNORED`: a
/// watched directory was deleted, or moved out of the file system) or lost
/// events (`IN_Q_OVERFLOW`). A directory deleted and made again under the
/// same name is then watched anew, instead of only at every rescan.
fn drain(fd: RawFd) -> bool {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    // Aligned for the events' header, as the kernel writes them.
    let mut buf = [0u64; 512];
    let mut dropped = false;
    loop {
        // SAFETY: `buf` is valid for writes of its length in bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), std::mem::size_of_val(&buf)) };
        if n <= 0 {
            break;
        }
        let bytes = &buf_bytes(&buf)[..n as usize];
        let mut at = 0;
        while at + HEADER <= bytes.len() {
            // SAFETY: the kernel wrote a whole event header at `at`; the
            // read is unaligned-safe.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast()) };
            dropped |= ev.mask & (libc::IN_IGNORED | libc::IN_Q_OVERFLOW) != 0;
            at += HEADER + ev.len as usize;
        }
    }
    dropped
}

fn buf_bytes(buf: &[u64]) -> &[u8] {
    // SAFETY: any initialised u64 array is valid as bytes, same lifetime.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), std::mem::size_of_val(buf)) }
}

/// Ends a wait on the watcher `fd` came from.
pub fn signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: `one` is valid for reads of 8 bytes; an eventfd takes 8.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_a_watched_directory_wakes_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watcher::new().unwrap();
        assert_eq!(
            w.watch(Some([dir.path().to_path_buf()].into())),
            Watched::New
        );
        assert_eq!(
            w.watch(Some([dir.path().to_path_buf()].into())),
            Watched::Same
        );
        assert_eq!(w.wait(Duration::from_millis(10)), Woke::Timeout);
        std::fs::write(dir.path().join("a.lp"), "m v=1\n").unwrap();
        assert_eq!(w.wait(Duration::from_secs(10)), Woke::Changed);
        // Every pending event was taken by that one wake.
        assert_eq!(w.wait(Duration::from_millis(10)), Woke::Timeout);
        // An append is a change too.
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("a.lp"))
            .unwrap();
        f.write_all(b"m v=2\n").unwrap();
        assert_eq!(w.wait(Duration::from_secs(10)), Woke::Changed);
    }

    #[test]
    fn a_directory_deleted_and_made_again_is_watched_anew() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("logs");
        std::fs::create_dir(&dir).unwrap();
        let mut w = Watcher::new().unwrap();
        assert_eq!(w.watch(Some([dir.clone()].into())), Watched::New);
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(w.wait(Duration::from_secs(10)), Woke::Changed);
        std::fs::create_dir(&dir).unwrap();
        // The same set, but the kernel dropped its watch with the directory.
        assert_eq!(w.watch(Some([dir.clone()].into())), Watched::New);
        assert_eq!(w.watch(Some([dir.clone()].into())), Watched::Same);
        std::fs::write(dir.join("a.lp"), "m v=1\n").unwrap();
        assert_eq!(w.wait(Duration::from_secs(10)), Woke::Changed);
    }

    #[test]
    fn the_stop_signal_ends_a_wait_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watcher::new().unwrap();
        w.watch(Some([dir.path().to_path_buf()].into()));
        let stop = w.stop_fd().unwrap();
        let t = std::thread::spawn(move || w.wait(Duration::from_secs(600)));
        signal(&stop);
        assert_eq!(t.join().unwrap(), Woke::Stopped);
    }

    #[test]
    fn nothing_watchable_means_polling() {
        let mut w = Watcher::new().unwrap();
        assert_eq!(w.watch(None), Watched::No);
        assert_eq!(w.watch(Some(BTreeSet::new())), Watched::No);
        let gone = ["/nonexistent/edge-replicator".into()].into();
        assert_eq!(w.watch(Some(gone)), Watched::No);
        assert_eq!(w.wait(Duration::from_millis(1)), Woke::Timeout);
    }
}
