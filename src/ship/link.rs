//! The uplink shared by every replication: a bandwidth cap and a data
//! budget (`[link]`), for gateways on metered or thin links.
//!
//! - **Cap.** A token bucket of `max_bandwidth` bytes a second holding at
//!   most one second's worth, so the link is never hit by a burst larger
//!   than that. Request bodies take tokens as ureq sends them, a buffer at
//!   a time; the rest of a request (headers, the answer) and probes are
//!   charged after the fact and may take the bucket below zero, which the
//!   next body then waits out. When several workers wait, the one of the
//!   highest `priority` goes first.
//! - **Budget.** Bytes on the wire (bodies of every attempt, failed or not,
//!   an estimate of the HTTP around them, probes) counted per day and per
//!   month, in UTC or `budget_timezone`'s fixed offset, the month starting on
//!   `monthly_reset_day`. A spent budget stops every POST and probe until the
//!   period ends; data waits in the queue under its usual bounds. The last
//!   tenth of each budget is kept for the replications of the highest
//!   priority configured. The counts are kept in `data_dir/link-usage.json`
//!   (written at most every few seconds and at shutdown), so a restart does
//!   not hand out a fresh budget.
//!
//! What counts is the HTTP the agent writes and reads; TLS records and
//! TCP/IP headers add a few percent more on the real link.
//!
//! The time arithmetic (period starts, the bucket's refill) is pure and
//! takes the time as an argument, so it is tested across period boundaries
//! without waiting for them.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::sync::Locked;
use log::warn;
use serde::{Deserialize, Serialize};

/// Bytes charged for one probe: a TCP handshake and close, about six
/// packets of headers.
pub const PROBE_BYTES: u64 = 360;

/// Bytes charged for the HTTP around a body: the request line and headers
/// the agent writes (about 250) and the answer's status line and headers
/// (about 150); the answer's body is charged as read.
pub const REQUEST_OVERHEAD: u64 = 400;

/// A body's bytes as a carrier counts them: with the TCP/IP framing of its
/// segments (52 bytes of IPv4 and TCP headers, with timestamps, on each of
/// up to 1,448 bytes) and of the acknowledgements coming back (52 bytes for
/// every two segments): about 5 %, charged to the budgets on top of the
/// body. (Measured in the link lab: without it a delivered body's count fell
/// 3 % short of what crossed the link.)
pub fn framed(body: u64) -> u64 {
    body + body.div_ceil(20)
}

/// How often the usage file is rewritten at most.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// A body moves through the cap in slices of a twentieth of a second's
/// worth, which keeps the rate smooth ...
const SLICES_PER_SECOND: f64 = 20.0;
/// ... but never smaller than a full TCP segment (a 1,500-byte MTU's
/// payload), unless the cap itself is: each slice is written to the socket
/// as it is granted, and a slice of a few bytes would go as a packet of its
/// own, its 52 bytes of headers costing more than its payload.
const MIN_SLICE: f64 = 1_448.0;

/// The `[link]` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkConfig {
    /// Bytes a second for all remotes together; `None`: unlimited.
    pub max_bandwidth: Option<u64>,
    pub daily_budget: Option<u64>,
    pub monthly_budget: Option<u64>,
    /// Seconds east of UTC in which days and months begin.
    pub utc_offset: i32,
    /// Day of the month (1–28) on which the monthly budget starts again.
    pub monthly_reset_day: u8,
    /// The highest replication priority configured: the last tenth of a
    /// budget is kept for it.
    pub top_priority: u8,
}

/// Which budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// Bytes used in the current day and month, and when each began (Unix
/// seconds). Stored as JSON in the usage file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub day_start: i64,
    pub day_bytes: u64,
    pub month_start: i64,
    pub month_bytes: u64,
}

impl Usage {
    /// Starts new periods that began at or before `now`.
    fn roll(&mut self, now: i64, cfg: &LinkConfig) {
        let day = day_start(now, cfg.utc_offset);
        if day != self.day_start {
            self.day_start = day;
            self.day_bytes = 0;
        }
        let month = month_start(now, cfg.utc_offset, cfg.monthly_reset_day);
        if month != self.month_start {
            self.month_start = month;
            self.month_bytes = 0;
        }
    }

    fn add(&mut self, bytes: u64) {
        self.day_bytes = self.day_bytes.saturating_add(bytes);
        self.month_bytes = self.month_bytes.saturating_add(bytes);
    }
}

/// A budget that is spent (for a replication of some priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub period: Period,
    /// When the period ends (Unix seconds).
    pub resets_at: i64,
}

/// One budget's reading, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetReading {
    pub period: Period,
    pub limit: u64,
    pub used: u64,
    pub resets_at: i64,
}

impl BudgetReading {
    pub fn left(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

/// The budgets configured, as read at `now`.
pub fn readings(usage: &Usage, cfg: &LinkConfig, now: i64) -> Vec<BudgetReading> {
    let mut u = *usage;
    u.roll(now, cfg);
    let mut out = Vec::new();
    if let Some(limit) = cfg.daily_budget {
        out.push(BudgetReading {
            period: Period::Day,
            limit,
            used: u.day_bytes,
            resets_at: next_day_start(now, cfg.utc_offset),
        });
    }
    if let Some(limit) = cfg.monthly_budget {
        out.push(BudgetReading {
            period: Period::Month,
            limit,
            used: u.month_bytes,
            resets_at: next_month_start(now, cfg.utc_offset, cfg.monthly_reset_day),
        });
    }
    out
}

/// Whether a replication of `priority` may spend more at `now`: `None`,
/// or the budget that stops it. Below the top priority, a budget counts as
/// spent when a tenth of it is left.
pub fn spent(usage: &Usage, cfg: &LinkConfig, priority: u8, now: i64) -> Option<Spent> {
    readings(usage, cfg, now)
        .into_iter()
        .filter(|r| {
            let reserve = if priority >= cfg.top_priority {
                0
            } else {
                r.limit / 10
            };
            r.left() <= reserve
        })
        .map(|r| Spent {
            period: r.period,
            resets_at: r.resets_at,
        })
        .max_by_key(|s| s.resets_at)
}

/// Unix seconds at which the day holding `now` began, days starting at
/// midnight `offset` seconds east of UTC.
pub fn day_start(now: i64, offset: i32) -> i64 {
    let local = now + i64::from(offset);
    local.div_euclid(86_400) * 86_400 - i64::from(offset)
}

pub fn next_day_start(now: i64, offset: i32) -> i64 {
    day_start(now, offset) + 86_400
}

/// Unix seconds at which the month holding `now` began: midnight of
/// `reset_day` (local time at `offset`) of this month, or of the previous
/// one when that day has not come yet.
pub fn month_start(now: i64, offset: i32, reset_day: u8) -> i64 {
    let local_day = (now + i64::from(offset)).div_euclid(86_400);
    let (y, m, d) = civil_from_days(local_day);
    let (y, m) = if d >= u32::from(reset_day) {
        (y, m)
    } else if m == 1 {
        (y - 1, 12)
    } else {
        (y, m - 1)
    };
    days_from_civil(y, m, u32::from(reset_day)) * 86_400 - i64::from(offset)
}

pub fn next_month_start(now: i64, offset: i32, reset_day: u8) -> i64 {
    let start = month_start(now, offset, reset_day);
    let (y, m, _) = civil_from_days((start + i64::from(offset)).div_euclid(86_400));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, u32::from(reset_day)) * 86_400 - i64::from(offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A token bucket of `rate` bytes a second holding at most one second's
/// worth. Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u64, now: Instant) -> Bucket {
        Bucket {
            rate: rate.max(1) as f64,
            tokens: rate.max(1) as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        self.at = now;
    }

    /// Takes a slice of `want` bytes at `now`: a whole slice (or all of
    /// `want`, if less) once the bucket holds it, else how long to wait
    /// before asking again. Never a few bytes at a time as they trickle in.
    pub fn take(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        self.refill(now);
        let slice = (self.rate / SLICES_PER_SECOND)
            .max(MIN_SLICE)
            .min(self.rate)
            .floor();
        let n = (want as f64).min(slice).max(1.0);
        if self.tokens < n {
            return Err(Duration::from_secs_f64((n - self.tokens) / self.rate));
        }
        self.tokens -= n;
        Ok((n as usize).min(want.max(1)))
    }

    /// Bytes that went without asking (headers, answers, probes).
    pub fn charge(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }

    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1) as f64;
        self.tokens = self.tokens.min(self.rate);
    }
}

struct State {
    cfg: LinkConfig,
    bucket: Option<Bucket>,
    usage: Usage,
    /// Workers waiting for the cap, by priority (0–9).
    waiting: [u32; 10],
    saved: Option<Instant>,
    dirty: bool,
}

/// The link all workers share.
pub struct Link {
    state: Mutex<State>,
    cv: Condvar,
    file: Option<PathBuf>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Link {
    /// The link of an agent whose usage file lives in `data_dir` (`None`:
    /// not kept, as in tests).
    pub fn new(cfg: LinkConfig, data_dir: Option<&Path>) -> Link {
        let file = data_dir.map(|d| d.join("link-usage.json"));
        let usage = file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let bucket = cfg.max_bandwidth.map(|r| Bucket::new(r, Instant::now()));
        Link {
            state: Mutex::new(State {
                cfg,
                bucket,
                usage,
                waiting: [0; 10],
                saved: None,
                dirty: false,
            }),
            cv: Condvar::new(),
            file,
        }
    }

    /// A link with neither cap nor budget.
    pub fn unlimited() -> Link {
        Link::new(LinkConfig::default(), None)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    /// Takes new settings (a config reload); the usage counted so far stays.
    pub fn configure(&self, cfg: LinkConfig) {
        let mut s = self.lock();
        let now = Instant::now();
        s.bucket = match (cfg.max_bandwidth, s.bucket.take()) {
            (None, _) => None,
            (Some(r), Some(mut b)) => {
                b.set_rate(r, now);
                Some(b)
            }
            (Some(r), None) => Some(Bucket::new(r, now)),
        };
        s.cfg = cfg;
        drop(s);
        self.cv.notify_all();
    }

    /// Whether any cap or budget is configured (if not, nothing is counted
    /// or waited for).
    pub fn limited(&self) -> bool {
        let s = self.lock();
        s.bucket.is_some() || s.cfg.daily_budget.is_some() || s.cfg.monthly_budget.is_some()
    }

    /// Takes up to `want` body bytes for a replication of `priority`,
    /// waiting for the cap (and for workers of a higher priority) as long
    /// as needed; counts them in the budget, [`framed`].
    pub fn take(&self, want: usize, priority: u8) -> usize {
        let p = usize::from(priority.min(9));
        let mut s = self.lock();
        if s.bucket.is_none() {
            Self::add(&mut s, framed(want as u64));
            return want;
        }
        s.waiting[p] += 1;
        loop {
            let higher = s.waiting[p + 1..].iter().any(|&w| w > 0);
            let wait = match s.bucket.as_mut() {
                None => Ok(want),
                Some(_) if higher => Err(Duration::from_millis(20)),
                Some(b) => b.take(want, Instant::now()),
            };
            match wait {
                Ok(n) => {
                    s.waiting[p] -= 1;
                    Self::add(&mut s, framed(n as u64));
                    drop(s);
                    self.cv.notify_all();
                    return n;
                }
                Err(d) => {
                    s = self
                        .cv
                        .wait_timeout(s, d.min(Duration::from_millis(200)))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Counts bytes that went without asking: the HTTP around a body, an
    /// answer, a probe.
    pub fn charge(&self, bytes: u64) {
        let mut s = self.lock();
        if let Some(b) = s.bucket.as_mut() {
            b.charge(bytes, Instant::now());
        }
        Self::add(&mut s, bytes);
    }

    fn add(s: &mut State, bytes: u64) {
        if s.cfg.daily_budget.is_none() && s.cfg.monthly_budget.is_none() {
            return;
        }
        let cfg = s.cfg.clone();
        s.usage.roll(unix_now(), &cfg);
        s.usage.add(bytes);
        s.dirty = true;
    }

    /// The budget that stops a replication of `priority` now, if any.
    pub fn spent(&self, priority: u8) -> Option<Spent> {
        let s = self.lock();
        spent(&s.usage, &s.cfg, priority, unix_now())
    }

    /// The budgets configured, read now.
    pub fn readings(&self) -> Vec<BudgetReading> {
        let s = self.lock();
        readings(&s.usage, &s.cfg, unix_now())
    }

    /// Writes the usage file if it changed, at most every few seconds
    /// unless `force`d (at shutdown). A lost write costs the count of those
    /// seconds; a torn one is not possible (written aside, then renamed).
    pub fn save(&self, force: bool) {
        let Some(file) = &self.file else { return };
        let mut s = self.lock();
        if !s.dirty || (!force && s.saved.is_some_and(|t| t.elapsed() < SAVE_EVERY)) {
            return;
        }
        let text = serde_json::to_vec(&s.usage).expect("usage serializes");
        s.dirty = false;
        s.saved = Some(Instant::now());
        drop(s);
        let tmp = file.with_extension("json.tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = written {
            warn!("cannot keep the link's usage in {}: {e}", file.display());
        }
    }
}

#[cfg(test)]
mod tests;
