//! Whether the system clock can be trusted, as far as the agent can tell.
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
//! The agent reports the state (status, metrics, telemetry) and counts and
//! warns about lines it stamps while the clock is not synchronised; it holds
//! nothing back on account of it.
//!
//! Tests (debug builds) replace the reading with the contents of the file
//! named by `EDGE_REPLICATOR_CLOCK_FILE` (a state's name), read anew at
//! every call so a test can change it while the agent runs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    if let Some(s) = injected() {
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

/// Notes that `lines` lines were just given the current time as their
/// timestamp (HTTP writes and `[[tail]]` sources). While the clock is not
/// synchronised they are counted ([`stamped_untrusted`]), and the first of
/// them is logged as a warning; the first stamped with a synchronised clock
/// afterwards is logged as the end of it.
pub fn note_stamped(lines: u64) {
    if lines == 0 {
        return;
    }
    let state = state();
    if state.trusted() {
        if WARNED.swap(false, Ordering::Relaxed) {
            log::info!("the system clock is synchronised: lines without a timestamp are stamped with a confirmed time again");
        }
        return;
    }
    STAMPED_UNTRUSTED.fetch_add(lines, Ordering::Relaxed);
    if !WARNED.swap(true, Ordering::Relaxed) {
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

#[cfg(debug_assertions)]
fn injected() -> Option<ClockState> {
    let path = std::env::var_os("EDGE_REPLICATOR_CLOCK_FILE")?;
    let text = std::fs::read_to_string(path).ok()?;
    ClockState::parse(&text)
}

#[cfg(not(debug_assertions))]
#[inline(always)]
fn injected() -> Option<ClockState> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

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
        assert_ne!(state(), ClockState::BeforeBuild);
    }
}
