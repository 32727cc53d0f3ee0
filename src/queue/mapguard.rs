//! LMDB reads the queue through a memory map, so a page it cannot read (past
//! the end of a truncated `data.mdb`, or on a medium that fails to read, as
//! worn SD cards do) arrives as SIGBUS instead of an error, and the agent
//! would die without a word. This guard turns such a SIGBUS into one clear
//! line on stderr and exit code 1, like any other fatal storage error. A
//! SIGBUS outside the queue's map is passed on to the handler that was there
//! before (see [`pass_on`]), and the guard stays installed for the next one.
//!
//! The handler only reads atomics and calls `write(2)`, `_exit(2)`,
//! `sigaction(2)` and `raise(3)`, all async-signal-safe, or the previous
//! handler, which was installed as a signal handler; messages are formatted
//! when the queue opens.

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
// SAFETY: plain data (a handler address, flags, a signal mask), written once,
// as the handler is installed, and only read afterwards (a SIGBUS in between
// finds no previous action and returns: a fault's access runs again).
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
        // async-signal-safe, but for the previous handler it may call, which
        // was installed as a signal handler before it.
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

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
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
    if let Some(p) = PREVIOUS.get() {
        pass_on(&p.0, sig, info, ctx);
    }
}

/// Hands a SIGBUS that is not the queue's to `previous`, the action found
/// when the guard was installed, without uninstalling the guard: a handler
/// is called as the kernel would have called it (with its mask and flags
/// other than `SA_SIGINFO` left as ours); the default action, which ends
/// the process, is restored and the signal raised again, as is an ignored
/// SIGBUS that a fault raised (the kernel would not let it be ignored); an
/// ignored SIGBUS that another process sent stays ignored.
fn pass_on(
    previous: &libc::sigaction,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let action = previous.sa_sigaction;
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let sent = unsafe { (*info).si_code } <= 0;
    if action == libc::SIG_IGN && sent {
        return;
    }
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // SAFETY: sigaction with a zeroed action (SIG_DFL) and raise are
        // async-signal-safe. SIGBUS is blocked while this handler runs, so
        // the raised one arrives when it returns, under the default action,
        // and ends the process (a fault's access, run again, would too).
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut dfl.sa_mask);
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            libc::raise(libc::SIGBUS);
        }
        return;
    }
    // SAFETY: `action` is the address of the handler that was installed for
    // SIGBUS before the guard, so it is a signal handler of the signature
    // its `SA_SIGINFO` flag says, and is called here in signal context as
    // it expects to be, with the kernel's arguments.
    unsafe {
        if previous.sa_flags & libc::SA_SIGINFO != 0 {
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(action);
            handler(sig, info, ctx);
        } else {
            let handler: extern "C" fn(libc::c_int) = std::mem::transmute(action);
            handler(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Where the process of its own that [`guarded_process`] needs works.
    const CHILD_DIR: &str = "EDGE_REPLICATOR_MAPGUARD_TEST_DIR";

    static PREVIOUS_CALLS: AtomicU32 = AtomicU32::new(0);

    extern "C" fn previous(_sig: libc::c_int) {
        PREVIOUS_CALLS.fetch_add(1, Ordering::SeqCst);
    }

    /// Signal handlers belong to the whole process, so this runs alone in a
    /// process of its own, started by the test below.
    #[test]
    #[ignore = "started in a process of its own by a_foreign_sigbus_is_passed_on_and_the_guard_stays"]
    fn guarded_process() {
        let Ok(dir) = std::env::var(CHILD_DIR) else {
            return;
        };
        let path = Path::new(&dir).join("data.mdb");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let len = 2 * 4096;
        file.set_len(len as u64).unwrap();
        // SAFETY: installs a handler that only touches an atomic; maps a
        // file this test owns, read-only.
        let map = unsafe {
            let mut a: libc::sigaction = std::mem::zeroed();
            a.sa_sigaction = previous as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut a.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGBUS, &a, std::ptr::null_mut()), 0);
            use std::os::unix::io::AsRawFd;
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let g = guard(&path);
        assert!(g.0.is_some(), "the map is guarded");
        for n in 1..=2 {
            // SAFETY: raise runs the handler on this thread before returning.
            unsafe { libc::raise(libc::SIGBUS) };
            assert_eq!(PREVIOUS_CALLS.load(Ordering::SeqCst), n, "passed on");
        }
        // Still guarded: reading the map past the end of the file ends the
        // process with the queue's message and exit code 1.
        file.set_len(0).unwrap();
        // SAFETY: the map is valid memory; its pages past the end of the
        // file fault with SIGBUS, which is what is tested.
        let byte = unsafe { std::ptr::read_volatile(map as *const u8) };
        panic!("read {byte} past the end of the file");
    }

    #[test]
    fn a_foreign_sigbus_is_passed_on_and_the_guard_stays() {
        let dir = tempfile::tempdir().unwrap();
        // Under `make test-cross` this binary runs under qemu-user, named by
        // EDGE_REPLICATOR_TEST_RUNNER: without binfmt_misc it cannot be
        // exec'd directly, so the child goes through the same emulator.
        let runner = std::env::var("EDGE_REPLICATOR_TEST_RUNNER").unwrap_or_default();
        let mut words = runner.split_whitespace();
        let exe = std::env::current_exe().unwrap();
        let mut child = match words.next() {
            Some(emulator) => {
                let mut c = std::process::Command::new(emulator);
                c.args(words).arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        let out = child
            .args([
                "--exact",
                "queue::mapguard::tests::guarded_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cannot read the queue file") && stderr.contains("(SIGBUS)"),
            "{stderr}"
        );
    }
}
