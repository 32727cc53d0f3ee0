//! LMDB reads the queue through a memory map, so a page it cannot read (past
//! the end of a truncated `data.mdb`, or on a medium that fails to read, as
//! worn SD cards do) arrives as SIGBUS instead of an error, and the agent
//! would die without a word. This guard turns such a SIGBUS into one clear
//! line on stderr and exit code 1, like any other fatal storage error. A
//! SIGBUS outside the queue's map goes to the handler that was there before.
//!
//! The handler only reads atomics, calls `write(2)` and `_exit(2)`, all
//! async-signal-safe; messages are formatted when the queue opens.

use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Queues open at once in one process (the agent opens one; tests more).
const SLOTS: usize = 16;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    msg: AtomicPtr<u8>,
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    msg: AtomicPtr::new(std::ptr::null_mut()),
    len: AtomicUsize::new(0),
};
static MAPS: [Slot; SLOTS] = [EMPTY; SLOTS];

struct Previous(libc::sigaction);
// SAFETY: plain data (a handler address, flags, a signal mask), written once
// before the handler is installed and only read afterwards.
unsafe impl Sync for Previous {}
unsafe impl Send for Previous {}
static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// Watches one map while alive.
pub struct Guard(Option<usize>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            MAPS[i].end.store(0, Ordering::Release);
            MAPS[i].start.store(0, Ordering::Release);
        }
    }
}

/// Where `file` is mapped into this process, from /proc/self/maps (LMDB
/// does not say: its `me_mapaddr` is only the fixed-map address).
pub(super) fn mapped_range(file: &Path) -> Option<(usize, usize)> {
    let file = std::fs::canonicalize(file).ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter(|l| l.split_whitespace().nth(5).map(Path::new) == Some(file.as_path()))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .reduce(|(a, b), (c, d)| (a.min(c), b.max(d)))
}

/// Reports a SIGBUS at an address where `file` is mapped as a failure to
/// read `file`, and exits 1.
pub fn guard(file: &Path) -> Guard {
    let Some((start, end)) = mapped_range(file) else {
        return Guard(None);
    };
    if !install() {
        return Guard(None);
    }
    let msg = format!(
        "edge-replicator: fatal: cannot read the queue file {}: it is truncated or the storage \
         failed to read it (SIGBUS); stop the agent, move the data_dir aside or restore it from \
         a copy, and start again\n",
        file.display()
    );
    for (i, slot) in MAPS.iter().enumerate() {
        if slot
            .start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // Leaked on purpose: a handler may still be reading an old one.
            let msg: &'static mut str = msg.leak();
            slot.len.store(msg.len(), Ordering::Release);
            slot.msg.store(msg.as_mut_ptr(), Ordering::Release);
            slot.end.store(end, Ordering::Release);
            return Guard(Some(i));
        }
    }
    Guard(None)
}

fn install() -> bool {
    let previous = PREVIOUS.get_or_init(|| {
        // SAFETY: sigaction with a zeroed struct as the new action's base and
        // a valid out-pointer for the old one; the handler below is
        // async-signal-safe.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
                old.sa_sigaction = usize::MAX;
            }
            Previous(old)
        }
    });
    previous.0.sa_sigaction != usize::MAX
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &MAPS {
        let end = slot.end.load(Ordering::Acquire);
        if end != 0 && slot.start.load(Ordering::Acquire) <= addr && addr < end {
            let msg = slot.msg.load(Ordering::Acquire);
            let len = slot.len.load(Ordering::Acquire);
            // SAFETY: `msg` points at `len` leaked bytes; write and _exit
            // are async-signal-safe.
            unsafe {
                libc::write(2, msg as *const libc::c_void, len);
                libc::_exit(1);
            }
        }
    }
    // Not the queue's map: put the previous handler back and return; the
    // faulting access runs again and reaches it.
    if let Some(p) = PREVIOUS.get() {
        // SAFETY: restores the action saved at install time.
        unsafe { libc::sigaction(libc::SIGBUS, &p.0, std::ptr::null_mut()) };
    }
}
