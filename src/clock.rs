//! Whether the system clock can be trusted, as far as the agent can tell,
//! and the guard that keeps a wrong clock's times off the remote.
//!
//! A Raspberry Pi has no real-time clock. It boots with the time it saved at
//! its last shutdown (fake-hwclock, systemd-timesyncd's clock file) or with
//! 1970, and keeps that until a time service reaches a server: on a cellular
//! link, minutes; with no link, never. Lines written without a timestamp are
//! stamped with this clock when they arrive, so while it is wrong they carry
//! wrong times, and nothing downstream can tell.
//!
//! [`state`] reads, in this order:
//!
//! 1. the time against when this binary was built ([`not_before`]): a clock
//!    earlier than that is certainly wrong ([`ClockState::BeforeBuild`]);
//! 2. the kernel's time status (`adjtimex`, read only): a time service that
//!    disciplines the clock (systemd-timesyncd, chrony, ntpd) clears
//!    `STA_UNSYNC` once it has a good time;
//! 3. where that call is refused (the shipped systemd unit's `ProtectClock=`
//!    filter refuses it), systemd-timesyncd's flag file
//!    `/run/systemd/timesync/synchronized`, created at its first sync after
//!    boot. Without timesyncd the state is [`ClockState::Unknown`].
//!
//! Virtual machines and containers whose host keeps the time, with no time
//! service inside, read as unsynchronised: their time is right but nothing
//! confirmed it.
//!
//! # The guard
//!
//! While the guard [`holds`] (the clock is before the build date, or it is
//! not synchronised and the board booted less than `[clock] wait_for_sync`
//! ago), every write is queued *held*: its entry carries an [`Anchor`], the
//! boot it was received in, the time since that boot ([`boottime_ns`],
//! which counts suspend and never jumps) and the wall time the lines without
//! a timestamp were given. A write that holds a line stamped before the
//! build date (less `[clock] before_build_margin`, a year) is held too,
//! whatever the clock. The queue sends nothing from
//! a held entry on (see `queue::writer::clock`): once the guard no longer
//! holds, each held entry is released, its stamped lines given the wall
//! time of their arrival as the clock now tells it (the anchor's boot time
//! plus the clock's [`offset`]), its lines stamped before the build date
//! (less the margin) set aside with reason `clock`. An entry received in an earlier boot whose
//! offset was never learnt cannot be dated: its stamped lines are set aside
//! too. Nothing is sent with a time the agent knows to be wrong.
//!
//! Tests (debug builds) replace the reading with the contents of the file
//! named by `EDGE_REPLICATOR_CLOCK_FILE`, read anew at every call so a test
//! can change it while the agent runs: a state's name, then optionally
//! `offset=<seconds>` (added to the wall clock the agent reads) and
//! `boot=<name>` (a boot id, to play a reboot).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the agent knows about the system clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockState {
    /// A time service set the clock.
    Synchronised,
    /// No time service set the clock (yet).
    Unsynchronised,
    /// The clock is earlier than the build of this binary: certainly wrong.
    BeforeBuild,
    /// The kernel's status cannot be read and no time service says anything.
    Unknown,
}

impl ClockState {
    pub const ALL: [ClockState; 4] = [
        ClockState::Synchronised,
        ClockState::Unsynchronised,
        ClockState::BeforeBuild,
        ClockState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClockState::Synchronised => "synchronised",
            ClockState::Unsynchronised => "unsynchronised",
            ClockState::BeforeBuild => "before-build",
            ClockState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<ClockState> {
        ClockState::ALL.into_iter().find(|c| c.as_str() == s.trim())
    }

    /// Whether a time the agent stamps now is known to be right.
    pub fn trusted(self) -> bool {
        self == ClockState::Synchronised
    }
}

/// When this binary was built (`SOURCE_DATE_EPOCH` when the build set it):
/// no correct clock reads earlier.
pub fn not_before() -> SystemTime {
    let secs: u64 = env!("EDGE_REPLICATOR_BUILD_EPOCH").parse().unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// The kernel's answer to a read-only `adjtimex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelStatus {
    Synchronised,
    Unsynchronised,
    /// The call was refused (a seccomp filter) or failed.
    Unreadable,
}

/// The clock's state now.
pub fn state() -> ClockState {
    if let Some(s) = injected().map(|i| i.state) {
        return s;
    }
    classify(
        SystemTime::now(),
        not_before(),
        kernel_status(),
        timesyncd_flag(),
    )
}

/// The decision of [`state`], from its readings. `timesyncd` is `None`
/// without systemd-timesyncd, else whether its synchronised flag is set.
pub fn classify(
    now: SystemTime,
    not_before: SystemTime,
    kernel: KernelStatus,
    timesyncd: Option<bool>,
) -> ClockState {
    if now < not_before {
        return ClockState::BeforeBuild;
    }
    match (kernel, timesyncd) {
        (KernelStatus::Synchronised, _) | (_, Some(true)) => ClockState::Synchronised,
        (KernelStatus::Unsynchronised, _) | (_, Some(false)) => ClockState::Unsynchronised,
        (KernelStatus::Unreadable, None) => ClockState::Unknown,
    }
}

fn kernel_status() -> KernelStatus {
    // SAFETY: an all-zero `timex` is a valid value (plain integers); with
    // `modes` 0 the kernel only fills it in. The pointer is to a local that
    // outlives the call.
    let (rc, status) = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        let rc = libc::adjtimex(&mut tx);
        (rc, tx.status)
    };
    if rc < 0 {
        KernelStatus::Unreadable
    } else if rc == libc::TIME_ERROR || status & libc::STA_UNSYNC != 0 {
        KernelStatus::Unsynchronised
    } else {
        KernelStatus::Synchronised
    }
}

/// systemd-timesyncd's view: `None` when it does not run here.
fn timesyncd_flag() -> Option<bool> {
    let dir = Path::new("/run/systemd/timesync");
    dir.is_dir().then(|| dir.join("synchronized").exists())
}

/// Lines stamped by the agent while the clock was not synchronised.
static STAMPED_UNTRUSTED: AtomicU64 = AtomicU64::new(0);
/// Whether the warning about such lines stands (cleared when the clock is
/// found synchronised again, so that a later loss of sync warns anew).
static WARNED: AtomicBool = AtomicBool::new(false);

/// What a write needs of the clock, read once: its `stamped` lines, given
/// `stamp_ns` as their timestamp, are noted ([`note_stamped`]), and its
/// [`Anchor`] is returned when the guard holds it ([`anchor`]); `earliest`
/// is its earliest own timestamp.
pub fn on_write(stamp_ns: i64, stamped: u64, earliest: i64) -> Option<Anchor> {
    let state = state();
    note_stamped(state, stamped);
    anchor(state, stamp_ns, earliest)
}

/// Notes that `lines` lines were just given the current time as their
/// timestamp, the clock reading `state`. While the clock is not
/// synchronised they are counted ([`stamped_untrusted`]), and the first of
/// them is logged as a warning; the first stamped with a synchronised clock
/// afterwards is logged as the end of it.
fn note_stamped(state: ClockState, lines: u64) {
    if lines == 0 {
        return;
    }
    if state.trusted() {
        if WARNED.swap(false, Ordering::Relaxed) {
            log::info!("the system clock is synchronised: lines without a timestamp are stamped with a confirmed time again");
        }
        return;
    }
    STAMPED_UNTRUSTED.fetch_add(lines, Ordering::Relaxed);
    if WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    if holds_in(state) {
        log::warn!(
            "the system clock is {}: writes wait in the queue until it is synchronised, and lines without a timestamp then get the time they arrived (counted in edge_replicator_lines_stamped_unsynchronised_total)",
            state.as_str()
        );
    } else {
        log::warn!(
            "the system clock is {}: lines without a timestamp are stamped with it and may carry a wrong time (counted in edge_replicator_lines_stamped_unsynchronised_total); writers that send their own timestamps are not affected",
            state.as_str()
        );
    }
}

/// Lines stamped while the clock was not synchronised, since the start.
pub fn stamped_untrusted() -> u64 {
    STAMPED_UNTRUSTED.load(Ordering::Relaxed)
}

/// The wall clock, ns since the epoch, as lines are stamped with it.
pub fn wall_ns() -> i64 {
    let offset = injected().map_or(0, |i| i.offset_ns);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    now.saturating_add(offset)
}

/// Time since boot, ns, suspend included (`CLOCK_BOOTTIME`): never set,
/// never jumps.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a local timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What identifies this boot of the system (the kernel's
/// `/proc/sys/kernel/random/boot_id`): time since boot means something
/// only within one.
pub type BootId = [u8; 16];

/// This boot's id. Where the kernel does not say (no `/proc`), an id of
/// this process's own: lines held then are dated only by this process, and
/// set aside after a restart, never dated with another boot's clock.
pub fn boot_id() -> BootId {
    if let Some(b) = injected().and_then(|i| i.boot) {
        return b;
    }
    static BOOT: OnceLock<BootId> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| parse_boot_id(&s))
            .unwrap_or_default();
        if id != [0; 16] {
            return id;
        }
        let mut own = [0u8; 16];
        let seed = format!("{}:{}", std::process::id(), wall_ns());
        own[..4].copy_from_slice(&crc32fast::hash(seed.as_bytes()).to_le_bytes());
        own[4..12].copy_from_slice(&wall_ns().to_le_bytes());
        own[12..].copy_from_slice(&std::process::id().to_le_bytes());
        own
    })
}

/// A boot id's 32 hex digits (dashes and blanks ignored); zero if malformed.
fn parse_boot_id(text: &str) -> BootId {
    let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    let mut id = [0u8; 16];
    if hex.len() != 32 {
        return id;
    }
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).expect("hex digits");
        id[i] = u8::from_str_radix(s, 16).expect("hex digits");
    }
    id
}

/// Where a held write stands in time: see [the module doc](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub boot: BootId,
    /// [`boottime_ns`] when the write arrived.
    pub boot_ns: u64,
    /// The wall time its lines without a timestamp were given.
    pub stamp_ns: i64,
}

/// `[clock] wait_for_sync`, ns (0: hold until synchronised however long).
static WAIT_NS: AtomicU64 = AtomicU64::new(DEFAULT_WAIT.as_nanos() as u64);
/// `[clock] send_before_build`.
static SEND_BEFORE_BUILD: AtomicBool = AtomicBool::new(false);
/// `[clock] before_build_margin`, ns.
static MARGIN_NS: AtomicU64 = AtomicU64::new(DEFAULT_MARGIN.as_nanos() as u64);

/// `[clock] wait_for_sync`'s default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(600);
/// `[clock] before_build_margin`'s default: a year. A release is built days
/// or weeks before it runs, and devices that buffered while offline send
/// points older than that; the stamps of a clock that was never set (1970,
/// 2000, an OS image's build date) are older still.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(365 * 86_400);

/// Applies `[clock]` (at start and on reload).
pub fn configure(wait_for_sync: Duration, send_before_build: bool, margin: Duration) {
    WAIT_NS.store(wait_for_sync.as_nanos() as u64, Ordering::Relaxed);
    SEND_BEFORE_BUILD.store(send_before_build, Ordering::Relaxed);
    MARGIN_NS.store(margin.as_nanos() as u64, Ordering::Relaxed);
}

/// Whether the guard holds writes now.
pub fn holds() -> bool {
    holds_in(state())
}

/// [`holds`], the clock reading `state`.
fn holds_in(state: ClockState) -> bool {
    holds_for(
        state,
        boottime_ns(),
        Duration::from_nanos(WAIT_NS.load(Ordering::Relaxed)),
    )
}

/// The decision of [`holds`]: a clock before the build date holds writes
/// however long; one that is only unconfirmed, for `wait` after boot
/// (`wait` zero: however long).
pub fn holds_for(state: ClockState, since_boot_ns: u64, wait: Duration) -> bool {
    match state {
        ClockState::Synchronised => false,
        ClockState::BeforeBuild => true,
        ClockState::Unsynchronised | ClockState::Unknown => {
            wait.is_zero() || u128::from(since_boot_ns) < wait.as_nanos()
        }
    }
}

/// Wall time less time since boot, now: what added to an anchor's boot
/// time gives the wall time of its arrival. `None` while the guard holds.
pub fn offset() -> Option<i64> {
    if holds() {
        return None;
    }
    Some(wall_ns().saturating_sub(boottime_ns() as i64))
}

/// The earliest timestamp that is not set aside as stamped before the build
/// date: the build date less `before_build_margin` (`i64::MIN` with
/// `send_before_build`).
pub fn earliest_sent() -> i64 {
    if SEND_BEFORE_BUILD.load(Ordering::Relaxed) {
        return i64::MIN;
    }
    let built = not_before()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    built.saturating_sub(MARGIN_NS.load(Ordering::Relaxed) as i64)
}

/// The anchor a write gets, the clock reading `state`: `Some` while the
/// guard holds, or when one of its lines is stamped before
/// [`earliest_sent`] (`earliest`, its earliest own timestamp). `stamp_ns`
/// is the time given to its lines without one.
fn anchor(state: ClockState, stamp_ns: i64, earliest: i64) -> Option<Anchor> {
    (holds_in(state) || earliest < earliest_sent()).then(|| Anchor {
        boot: boot_id(),
        boot_ns: boottime_ns(),
        stamp_ns,
    })
}

/// Lines given a time after their arrival once the clock was confirmed.
static RESTAMPED: AtomicU64 = AtomicU64::new(0);

/// Counts lines the queue restamped on release.
pub fn note_restamped(lines: u64) {
    RESTAMPED.fetch_add(lines, Ordering::Relaxed);
}

/// Lines restamped since the start.
pub fn restamped() -> u64 {
    RESTAMPED.load(Ordering::Relaxed)
}

/// What a test put in `EDGE_REPLICATOR_CLOCK_FILE`.
#[derive(Debug, Clone, Copy)]
struct Injected {
    state: ClockState,
    offset_ns: i64,
    boot: Option<BootId>,
}

#[cfg(debug_assertions)]
fn injected() -> Option<Injected> {
    #[cfg(test)]
    if let Some(i) = *testing::OVERRIDE.lock().unwrap() {
        return Some(i);
    }
    let path = std::env::var_os("EDGE_REPLICATOR_CLOCK_FILE")?;
    let text = std::fs::read_to_string(path).ok()?;
    parse_injected(&text)
}

#[cfg(not(debug_assertions))]
#[inline(always)]
fn injected() -> Option<Injected> {
    None
}

/// `<state> [offset=<seconds>] [boot=<name>]`.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
fn parse_injected(text: &str) -> Option<Injected> {
    let mut words = text.split_whitespace();
    let state = ClockState::parse(words.next()?)?;
    let mut out = Injected {
        state,
        offset_ns: 0,
        boot: None,
    };
    for w in words {
        if let Some(v) = w.strip_prefix("offset=") {
            out.offset_ns = v.parse::<i64>().ok()?.saturating_mul(1_000_000_000);
        } else if let Some(v) = w.strip_prefix("boot=") {
            let mut id = [0u8; 16];
            let h = crc32fast::hash(v.as_bytes()).to_le_bytes();
            id[..4].copy_from_slice(&h);
            id[4..4 + v.len().min(12)].copy_from_slice(&v.as_bytes()[..v.len().min(12)]);
            out.boot = Some(id);
        }
    }
    Some(out)
}

/// Unit tests of the queue set the clock's state and boot in-process
/// (never its offset, which other tests' enqueue times would see).
#[cfg(test)]
pub(crate) mod testing {
    use super::{BootId, ClockState, Injected};
    use std::sync::{Mutex, MutexGuard};

    pub(super) static OVERRIDE: Mutex<Option<Injected>> = Mutex::new(None);
    static HELD: Mutex<()> = Mutex::new(());

    /// While the guard lives, the clock reads `state` in boot `boot`; tests
    /// that set it run one at a time.
    pub struct Set(#[allow(dead_code)] MutexGuard<'static, ()>);

    pub fn set(state: ClockState, boot: BootId) -> Set {
        let g = HELD.lock().unwrap_or_else(|e| e.into_inner());
        change(state, boot);
        Set(g)
    }

    /// Changes the reading of a [`Set`] in force.
    pub fn change(state: ClockState, boot: BootId) {
        *OVERRIDE.lock().unwrap() = Some(Injected {
            state,
            offset_ns: 0,
            boot: Some(boot),
        });
    }

    impl Drop for Set {
        fn drop(&mut self) {
            *OVERRIDE.lock().unwrap() = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_guard_holds_a_wrong_clock_always_and_an_unconfirmed_one_for_a_while() {
        let min = Duration::from_secs(60);
        let s = 1_000_000_000u64;
        assert!(!holds_for(ClockState::Synchronised, 0, min));
        assert!(holds_for(ClockState::BeforeBuild, 1_000_000 * s, min));
        assert!(holds_for(
            ClockState::BeforeBuild,
            0,
            Duration::from_secs(1)
        ));
        for state in [ClockState::Unsynchronised, ClockState::Unknown] {
            assert!(holds_for(state, 59 * s, min));
            assert!(!holds_for(state, 60 * s, min));
            // Zero: however long.
            assert!(holds_for(state, 1_000_000 * s, Duration::ZERO));
        }
    }

    #[test]
    fn boot_ids_and_test_readings_parse() {
        let id = parse_boot_id("ad2ba59b-a87f-44fe-bd74-78c7ebf2b0dd\n");
        assert_eq!(id[..4], [0xad, 0x2b, 0xa5, 0x9b]);
        assert_eq!(id[15], 0xdd);
        assert_eq!(parse_boot_id("not a boot id"), [0; 16]);
        assert_ne!(boot_id(), [0; 16], "this kernel names its boot");
        let i = parse_injected("before-build offset=-100 boot=a\n").unwrap();
        assert_eq!(i.state, ClockState::BeforeBuild);
        assert_eq!(i.offset_ns, -100_000_000_000);
        let other = parse_injected("synchronised boot=b").unwrap();
        assert_ne!(i.boot, other.boot);
        assert!(i.boot.is_some());
        assert_eq!(parse_injected("synchronised").unwrap().boot, None);
        assert!(parse_injected("offset=1").is_none());
    }

    #[test]
    fn time_since_boot_moves_on() {
        let a = boottime_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(boottime_ns() > a && a > 0);
    }

    #[test]
    fn a_clock_before_the_build_is_wrong_whatever_the_kernel_says() {
        let built = UNIX_EPOCH + 20_000 * DAY;
        let cases = [
            (KernelStatus::Synchronised, Some(true)),
            (KernelStatus::Unsynchronised, None),
            (KernelStatus::Unreadable, None),
        ];
        for (kernel, flag) in cases {
            assert_eq!(
                classify(UNIX_EPOCH, built, kernel, flag),
                ClockState::BeforeBuild
            );
            assert_eq!(
                classify(built - DAY, built, kernel, flag),
                ClockState::BeforeBuild
            );
        }
    }

    #[test]
    fn the_kernel_or_timesyncd_decides_after_the_build_date() {
        let built = UNIX_EPOCH + 20_000 * DAY;
        let now = built + DAY;
        let c = |k, f| classify(now, built, k, f);
        assert_eq!(
            c(KernelStatus::Synchronised, None),
            ClockState::Synchronised
        );
        assert_eq!(
            c(KernelStatus::Unsynchronised, None),
            ClockState::Unsynchronised
        );
        // The kernel unreadable (a seccomp filter): timesyncd's flag decides.
        assert_eq!(
            c(KernelStatus::Unreadable, Some(true)),
            ClockState::Synchronised
        );
        assert_eq!(
            c(KernelStatus::Unreadable, Some(false)),
            ClockState::Unsynchronised
        );
        assert_eq!(c(KernelStatus::Unreadable, None), ClockState::Unknown);
        // timesyncd synchronised while the kernel still says not (a time
        // service that does not discipline the kernel clock).
        assert_eq!(
            c(KernelStatus::Unsynchronised, Some(true)),
            ClockState::Synchronised
        );
    }

    #[test]
    fn names_round_trip() {
        for s in ClockState::ALL {
            assert_eq!(ClockState::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            ClockState::parse("synchronised\n"),
            Some(ClockState::Synchronised)
        );
        assert_eq!(ClockState::parse("maybe"), None);
    }

    #[test]
    fn the_build_date_is_set_and_in_the_past() {
        let built = not_before();
        assert!(built > UNIX_EPOCH + 20_000 * DAY, "{built:?}");
        assert!(built <= SystemTime::now() + DAY, "{built:?}");
    }

    #[test]
    fn this_machine_gives_a_reading() {
        // Whatever it is, reading it neither fails nor panics; a machine
        // running these tests is past the build date.
        // (`state` itself may read what a queue test set meanwhile.)
        let read = classify(
            SystemTime::now(),
            not_before(),
            kernel_status(),
            timesyncd_flag(),
        );
        assert_ne!(read, ClockState::BeforeBuild);
    }
}
