//! `edge-replicator status --watch`: the view an operator keeps open while a
//! backlog drains after an outage, often over a slow SSH session to a board
//! in a cabinet.
//!
//! The status JSON holds counters, not rates, so the view keeps the last few
//! readings of each replication and derives from them the lines per second
//! in (`acceptedLines`) and out (`deliveredLines`), the compressed bytes per
//! second put on the wire (`wireBytesSent`, compressed, accepted or not), and the net drain rate (the fall of
//! `remainingLines`, which also counts lines dropped or expired): the ETA is
//! the remaining lines over that net rate, and "-" while the queue does not
//! shrink. Rates are taken over a window of [`WINDOW`] readings, since a
//! batch lands as a step and one-second differences jump between zero and
//! twice the truth.
//!
//! Time is measured with the monotonic clock from the start of the watch: a
//! board without a real-time clock may show any wall time, and NTP stepping
//! it mid-drain must not produce a negative rate. A counter that goes back
//! (the agent restarted) starts the window afresh.
//!
//! The block is plain ASCII, a few short lines per replication, each cut to
//! the terminal's width, so it reads in 40 columns and costs a few hundred
//! bytes per refresh. The rendering and every computation here are pure;
//! `cli` fetches, times and prints.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use crate::status::{ReplicationReport, StatusReport};

/// Readings a rate is taken over (the current one included).
pub const WINDOW: usize = 5;

/// The width assumed when neither `COLUMNS` nor the terminal says.
pub const DEFAULT_WIDTH: usize = 80;

/// Below this the lines are cut rather than laid out anew: the bar alone
/// needs room.
const MIN_WIDTH: usize = 30;

/// One replication's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the watch started (monotonic).
    pub at: f64,
    pub accepted: u64,
    pub delivered: u64,
    pub remaining: u64,
    pub queued_bytes: u64,
    /// `wireBytesSent`, when the agent reports it.
    pub sent_bytes: Option<u64>,
}

impl Sample {
    /// Reads a replication of the status.
    pub fn of(r: &ReplicationReport, at: f64) -> Sample {
        Sample {
            at,
            accepted: r.accepted_lines,
            delivered: r.delivered_lines,
            remaining: r.remaining_lines,
            queued_bytes: r.current_queue_size_bytes,
            sent_bytes: r.wire_bytes_sent,
        }
    }

    /// Whether `self` can follow `prev` in one window: no counter went back.
    fn follows(&self, prev: &Sample) -> bool {
        self.at > prev.at
            && self.accepted >= prev.accepted
            && self.delivered >= prev.delivered
            && match (self.sent_bytes, prev.sent_bytes) {
                (Some(a), Some(b)) => a >= b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// A counter's rate per second between two readings; `None` when it went
/// back or no time passed.
pub fn per_second(old: u64, new: u64, secs: f64) -> Option<f64> {
    (new >= old && secs > 0.0).then(|| (new - old) as f64 / secs)
}

/// Net drain rate of a gauge (lines or bytes per second, positive while it
/// falls).
pub fn drain_rate(old: u64, new: u64, secs: f64) -> Option<f64> {
    (secs > 0.0).then(|| (old as f64 - new as f64) / secs)
}

/// Time to empty `remaining` at `rate` per second; `None` when empty or not
/// draining.
pub fn eta(remaining: u64, rate: f64) -> Option<Duration> {
    if remaining == 0 || !rate.is_finite() || rate <= 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(remaining as f64 / rate).ok()
}

/// `[####......]` with `width` cells for `used` of `max`, rounded down so a
/// full bar means full; `?` cells when `max` is unknown.
pub fn bar(used: u64, max: u64, width: usize) -> String {
    if max == 0 {
        return format!("[{}]", "?".repeat(width));
    }
    let filled = ((used.min(max) as u128 * width as u128) / max as u128) as usize;
    // Anything queued shows as at least one cell.
    let filled = if used > 0 { filled.max(1) } else { 0 };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// Whole percent of `used` over `max`, rounded down (99% until it is full).
pub fn percent(used: u64, max: u64) -> Option<u64> {
    (max > 0).then(|| (used as u128 * 100 / max as u128) as u64)
}

/// `42s`, `3m05s`, `2h03m`, `3d04h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// A count per second in three significant characters: `0`, `950`, `5.3k`,
/// `12M`.
pub fn si(n: f64) -> String {
    if !n.is_finite() || n < 0.0 {
        return "-".into();
    }
    let (v, unit) = match n {
        n if n < 1e3 => return format!("{}", n.round() as u64),
        n if n < 1e6 => (n / 1e3, "k"),
        n if n < 1e9 => (n / 1e6, "M"),
        n => (n / 1e9, "G"),
    };
    if v < 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{}{unit}", v.round() as u64)
    }
}

/// Bytes in binary units: `512 B`, `12.0 KiB`, `3.4 MiB`.
pub fn bytes(n: f64) -> String {
    if !n.is_finite() || n < 0.0 {
        return "-".into();
    }
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{} B", v.round() as u64)
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// `s` cut to `width` characters.
fn fit(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

/// The readings of every replication seen, newest last, at most [`WINDOW`]
/// each.
#[derive(Debug, Default)]
pub struct History {
    samples: BTreeMap<String, VecDeque<Sample>>,
}

impl History {
    /// Adds the readings of one status answer taken at `at`; replications
    /// gone from the answer are forgotten.
    pub fn add(&mut self, status: &StatusReport, at: f64) {
        let list = &status.replications;
        self.samples
            .retain(|name, _| list.iter().any(|r| &r.name == name));
        for r in list {
            let s = Sample::of(r, at);
            let q = self.samples.entry(r.name.clone()).or_default();
            if q.back().is_some_and(|prev| !s.follows(prev)) {
                q.clear();
            }
            q.push_back(s);
            while q.len() > WINDOW {
                q.pop_front();
            }
        }
    }

    /// The oldest and newest readings of `name`'s window, when it has two.
    fn span(&self, name: &str) -> Option<(&Sample, &Sample)> {
        let q = self.samples.get(name)?;
        (q.len() >= 2).then(|| (q.front().unwrap(), q.back().unwrap()))
    }
}

/// Rates of one replication over its window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub lines_in: f64,
    pub lines_out: f64,
    /// `wireBytesSent` per second, or `None` when the agent does not report it.
    pub sent_bytes: Option<f64>,
    /// Fall of the queued bytes per second (negative while it grows).
    pub queue_bytes_drain: f64,
    /// Fall of the remaining lines per second: the net rate the ETA uses.
    pub lines_drain: f64,
}

/// The rates between two readings; `None` if they cannot share a window.
pub fn rates(old: &Sample, new: &Sample) -> Option<Rates> {
    if !new.follows(old) {
        return None;
    }
    let dt = new.at - old.at;
    Some(Rates {
        lines_in: per_second(old.accepted, new.accepted, dt)?,
        lines_out: per_second(old.delivered, new.delivered, dt)?,
        sent_bytes: match (old.sent_bytes, new.sent_bytes) {
            (Some(a), Some(b)) => per_second(a, b, dt),
            _ => None,
        },
        queue_bytes_drain: drain_rate(old.queued_bytes, new.queued_bytes, dt)?,
        lines_drain: drain_rate(old.remaining, new.remaining, dt)?,
    })
}

/// One refresh: a header and a few lines per replication, each at most
/// `width` characters. `status` is the newest answer, already added to
/// `history`; `elapsed` is the time since the watch started.
pub fn render(
    status: &StatusReport,
    history: &History,
    width: usize,
    elapsed: Duration,
    interval: Duration,
) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&fit(&s, width));
        out.push('\n');
    };
    // Time since the watch started, not the wall clock: see the module
    // comment.
    line(format!(
        "edge-replicator status +{} every {}",
        short_duration(elapsed),
        humantime::format_duration(interval)
    ));
    if status.replications.is_empty() {
        line("no replications".into());
    }
    for r in &status.replications {
        let text = |s: &str| crate::logging::escape(s).into_owned();
        let now = Sample::of(r, 0.0);
        let max = r.max_queue_size_bytes;
        let rates = history.span(&r.name).and_then(|(a, b)| rates(a, b));
        line(String::new());
        line(format!(
            "{} -> {}  {}",
            text(&r.name),
            text(&r.remote),
            r.state.as_str()
        ));
        let fmt_rate = |v: Option<f64>| v.map_or("-".to_string(), si);
        line(format!(
            "  lines/s  in {}  out {}",
            fmt_rate(rates.map(|r| r.lines_in)),
            fmt_rate(rates.map(|r| r.lines_out))
        ));
        line(match rates {
            Some(Rates {
                sent_bytes: Some(b),
                ..
            }) => format!("  wire     {}/s gzip", bytes(b)),
            Some(r) if r.queue_bytes_drain >= 0.0 => {
                format!("  queued   -{}/s", bytes(r.queue_bytes_drain))
            }
            Some(r) => format!("  queued   +{}/s", bytes(-r.queue_bytes_drain)),
            None => "  wire     -".into(),
        });
        let pct = percent(now.queued_bytes, max).map_or("?".to_string(), |p| format!("{p}%"));
        line(format!(
            "  fill     {pct}  {} / {}",
            bytes(now.queued_bytes as f64),
            bytes(max as f64)
        ));
        // The bar gets a line of its own, as wide as the terminal allows.
        let cells = width.max(MIN_WIDTH).saturating_sub(4).clamp(10, 60);
        line(format!("  {}", bar(now.queued_bytes, max, cells)));
        let eta_text = rates
            .and_then(|r| eta(now.remaining, r.lines_drain))
            .map_or("-".to_string(), short_duration);
        line(format!(
            "  left     {} lines, eta {eta_text}",
            now.remaining
        ));
        let err = text(&r.latest_error_message);
        if !err.is_empty() {
            line(format!("  error    {err}"));
        }
        // Held destinations wait apart: their lines are in `left` too.
        for h in &r.held_destinations {
            line(format!(
                "  held     {} {} lines ({})",
                text(&h.destination),
                h.lines,
                h.code
            ));
        }
    }
    out
}

/// The terminal's width: `COLUMNS` when set, else the terminal's own,
/// else [`DEFAULT_WIDTH`].
pub fn width(columns: Option<&str>, terminal: Option<usize>) -> usize {
    columns
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&w| w > 0)
        .or(terminal.filter(|&w| w > 0))
        .unwrap_or(DEFAULT_WIDTH)
}

/// The width of the terminal on stdout, if it is one.
pub fn terminal_width() -> Option<usize> {
    // SAFETY: TIOCGWINSZ fills the winsize struct passed, which outlives
    // the call; on a descriptor that is not a terminal it fails harmlessly.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0)
            .then_some(ws.ws_col as usize)
    }
}

/// Puts `block` on the screen: over the previous one on a terminal (home,
/// clear), else after it, separated by a blank line, for logs and pipes.
pub fn frame(block: &str, terminal: bool) -> String {
    let mut out = String::new();
    if terminal {
        out.push_str("\x1b[H\x1b[2J");
    }
    let _ = write!(out, "{block}");
    if !terminal {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::State;

    #[test]
    fn rates_come_from_counter_differences() {
        assert_eq!(per_second(100, 400, 2.0), Some(150.0));
        assert_eq!(per_second(400, 100, 2.0), None, "a restart is not a rate");
        assert_eq!(per_second(1, 2, 0.0), None);
        assert_eq!(drain_rate(1000, 400, 2.0), Some(300.0));
        assert_eq!(drain_rate(400, 1000, 2.0), Some(-300.0));
    }

    #[test]
    fn eta_only_while_draining() {
        assert_eq!(eta(600, 10.0), Some(Duration::from_secs(60)));
        assert_eq!(eta(0, 10.0), None, "nothing left");
        assert_eq!(eta(600, 0.0), None);
        assert_eq!(eta(600, -5.0), None, "the queue grows");
        assert_eq!(eta(600, f64::NAN), None);
        assert_eq!(eta(u64::MAX, f64::MIN_POSITIVE), None, "beyond a Duration");
    }

    #[test]
    fn the_bar_is_full_only_when_the_queue_is() {
        assert_eq!(bar(0, 100, 10), "[..........]");
        assert_eq!(bar(1, 100, 10), "[#.........]", "anything queued shows");
        assert_eq!(bar(55, 100, 10), "[#####.....]");
        assert_eq!(bar(99, 100, 10), "[#########.]");
        assert_eq!(bar(100, 100, 10), "[##########]");
        assert_eq!(bar(500, 100, 10), "[##########]", "over the bound clamps");
        assert_eq!(bar(5, 0, 4), "[????]");
        assert_eq!(bar(u64::MAX, u64::MAX, 3), "[###]");
        assert_eq!(percent(99, 100), Some(99));
        assert_eq!(percent(1, 0), None);
    }

    #[test]
    fn numbers_stay_short() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(949.6), "950");
        assert_eq!(si(5300.0), "5.3k");
        assert_eq!(si(12_400_000.0), "12M");
        assert_eq!(si(-1.0), "-");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(256.0 * 1024.0 * 1024.0), "256.0 MiB");
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(short_duration(Duration::from_secs(7380)), "2h03m");
        assert_eq!(short_duration(Duration::from_secs(273_600)), "3d04h");
    }

    #[test]
    fn width_prefers_columns_then_the_terminal() {
        assert_eq!(width(Some("40"), Some(120)), 40);
        assert_eq!(width(Some("x"), Some(120)), 120);
        assert_eq!(width(Some("0"), None), DEFAULT_WIDTH);
        assert_eq!(width(None, None), DEFAULT_WIDTH);
    }

    fn status(accepted: u64, delivered: u64, remaining: u64, sent: u64) -> StatusReport {
        StatusReport {
            budgets: Vec::new(),
            clock: None,
            replications: vec![ReplicationReport {
                name: "r1".into(),
                remote: "cloud".into(),
                state: State::Running,
                accepted_lines: accepted,
                delivered_lines: delivered,
                remaining_lines: remaining,
                current_queue_size_bytes: remaining * 50,
                max_queue_size_bytes: 100_000,
                wire_bytes_sent: Some(sent),
                ..ReplicationReport::default()
            }],
            sources: vec![],
        }
    }

    #[test]
    fn a_draining_backlog_shows_rates_a_bar_and_an_eta() {
        let mut h = History::default();
        let first = status(1000, 0, 1000, 0);
        h.add(&first, 0.0);
        let text = render(&first, &h, 40, Duration::ZERO, Duration::from_secs(1));
        assert!(text.contains("  lines/s  in -  out -"), "{text}");
        assert!(text.contains("eta -"), "{text}");

        let second = status(1100, 400, 700, 20_000);
        h.add(&second, 2.0);
        let text = render(
            &second,
            &h,
            40,
            Duration::from_secs(2),
            Duration::from_secs(1),
        );
        assert!(text.contains("  lines/s  in 50  out 200"), "{text}");
        assert!(text.contains("  wire     9.8 KiB/s gzip"), "{text}");
        // 300 lines fewer in 2 s: 150/s net, 700 left: 4 s.
        assert!(text.contains("  left     700 lines, eta 4s"), "{text}");
        assert!(text.contains("[#"), "{text}");
        assert!(
            text.contains("  fill     35%  34.2 KiB / 97.7 KiB"),
            "{text}"
        );
        for l in text.lines() {
            assert!(l.chars().count() <= 40, "{l:?} is wider than 40");
        }

        // The agent restarted: counters went back, the window starts over.
        let third = status(10, 0, 700, 0);
        h.add(&third, 3.0);
        let text = render(
            &third,
            &h,
            80,
            Duration::from_secs(3),
            Duration::from_secs(1),
        );
        assert!(text.contains("out -"), "{text}");
    }

    #[test]
    fn held_destinations_are_listed_under_their_replication() {
        let mut st = status(1000, 0, 250, 0);
        st.replications[0].held_destinations = vec![crate::status::HeldReport {
            destination: "typo_db".into(),
            code: 404,
            lines: 200,
            ..Default::default()
        }];
        let mut h = History::default();
        h.add(&st, 0.0);
        let text = render(&st, &h, 80, Duration::ZERO, Duration::from_secs(1));
        assert!(
            text.contains("  held     typo_db 200 lines (404)"),
            "{text}"
        );
    }

    #[test]
    fn the_window_smooths_steps() {
        let mut h = History::default();
        // A batch of 100 lands every other second.
        for (t, d) in [(0, 0), (1, 100), (2, 100), (3, 200), (4, 200), (5, 300)] {
            h.add(&status(1000, d, 1000 - d, 0), t as f64);
        }
        let (a, b) = h.span("r1").unwrap();
        assert_eq!((a.at, b.at), (1.0, 5.0), "{WINDOW} readings kept");
        let r = rates(a, b).unwrap();
        assert_eq!(r.lines_out, 50.0);
        assert_eq!(r.lines_drain, 50.0);
    }

    #[test]
    fn without_sent_bytes_the_queue_change_is_shown() {
        let mut h = History::default();
        // An agent older than the key.
        let mut v = serde_json::to_value(status(0, 0, 100, 0)).unwrap();
        v["replications"][0]
            .as_object_mut()
            .unwrap()
            .remove("wireBytesSent");
        let mut s: StatusReport = serde_json::from_value(v).unwrap();
        assert_eq!(s.replications[0].wire_bytes_sent, None);
        h.add(&s, 0.0);
        s.replications[0].current_queue_size_bytes = 7048;
        s.replications[0].accepted_lines = 50;
        h.add(&s, 1.0);
        let text = render(&s, &h, 80, Duration::ZERO, Duration::from_secs(1));
        assert!(text.contains("  queued   +2.0 KiB/s"), "{text}");
    }

    #[test]
    fn hostile_text_is_escaped_and_cut() {
        let v = StatusReport {
            budgets: Vec::new(),
            clock: None,
            replications: vec![ReplicationReport {
                name: "r\u{1b}[2J".into(),
                remote: "x".into(),
                state: State::Backoff,
                latest_error_message: "HTTP 503: \u{7}".repeat(20),
                ..ReplicationReport::default()
            }],
            sources: vec![],
        };
        let mut h = History::default();
        h.add(&v, 0.0);
        let text = render(&v, &h, 30, Duration::ZERO, Duration::from_secs(1));
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        for l in text.lines() {
            assert!(l.chars().count() <= 30, "{l:?}");
        }
        assert_eq!(frame("a\n", false), "a\n\n");
        assert!(frame("a\n", true).starts_with("\x1b[H\x1b[2J"));
    }
}
