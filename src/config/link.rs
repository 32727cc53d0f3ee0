//! `[link]`: the uplink every remote shares: a bandwidth cap and data
//! budgets for metered links (see `ship::link`). Its own module because it
//! belongs to no remote: the cap and the budgets count all of them together.

use serde::Deserialize;

use super::units::{parse_rate, size_value, Scalar};
use super::{invalid, ConfigError, Replication};
use crate::ship::link::LinkConfig;

/// `link.monthly_reset_day` when the key is left out.
const DEFAULT_MONTHLY_RESET_DAY: u8 = 1;
/// The latest day a monthly budget may start on: every month has it.
const MAX_MONTHLY_RESET_DAY: u8 = 28;
/// The smallest cap: below this an HTTP request's own headers take seconds.
const MIN_BANDWIDTH: u64 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLink {
    max_bandwidth: Option<Scalar>,
    daily_budget: Option<Scalar>,
    monthly_budget: Option<Scalar>,
    budget_timezone: Option<String>,
    monthly_reset_day: Option<i64>,
}

/// Validates `[link]`; `top_priority` comes from the replications.
pub(super) fn link(
    raw: Option<RawLink>,
    replications: &[Replication],
) -> Result<LinkConfig, ConfigError> {
    let top_priority = replications.iter().map(|r| r.priority).max().unwrap_or(0);
    let Some(raw) = raw else {
        return Ok(LinkConfig {
            monthly_reset_day: DEFAULT_MONTHLY_RESET_DAY,
            top_priority,
            ..LinkConfig::default()
        });
    };
    let max_bandwidth = match raw.max_bandwidth {
        None => None,
        Some(Scalar::Int(0)) => None,
        Some(Scalar::Int(n)) => Some(
            u64::try_from(n)
                .map_err(|_| invalid("link.max_bandwidth", format!("invalid rate {n}")))?,
        ),
        Some(Scalar::Str(s)) => {
            match parse_rate(&s).map_err(|m| invalid("link.max_bandwidth", m))? {
                0 => None,
                r => Some(r),
            }
        }
    };
    if let Some(r) = max_bandwidth.filter(|&r| r < MIN_BANDWIDTH) {
        return Err(invalid(
            "link.max_bandwidth",
            format!("{r} bytes a second is below the minimum, 100B/s (0 for no cap)"),
        ));
    }
    let budget = |key: &str, v: Option<Scalar>| -> Result<Option<u64>, ConfigError> {
        match size_value(key, v, 0)? {
            0 => Ok(None),
            b => Ok(Some(b)),
        }
    };
    let daily_budget = budget("link.daily_budget", raw.daily_budget)?;
    let monthly_budget = budget("link.monthly_budget", raw.monthly_budget)?;
    let utc_offset = match raw.budget_timezone.as_deref() {
        None => 0,
        Some(tz) => utc_offset(tz).ok_or_else(|| {
            invalid(
                "link.budget_timezone",
                format!("{tz:?}: use \"UTC\" or an offset such as \"+02:00\" or \"-05:00\""),
            )
        })?,
    };
    let monthly_reset_day = match raw.monthly_reset_day {
        None => DEFAULT_MONTHLY_RESET_DAY,
        Some(d) if (1..=i64::from(MAX_MONTHLY_RESET_DAY)).contains(&d) => d as u8,
        Some(d) => {
            return Err(invalid(
                "link.monthly_reset_day",
                format!("{d}: use a day from 1 to 28"),
            ))
        }
    };
    Ok(LinkConfig {
        max_bandwidth,
        daily_budget,
        monthly_budget,
        utc_offset,
        monthly_reset_day,
        top_priority,
    })
}

/// Seconds east of UTC of `"UTC"`, `"Z"` or `"+HH:MM"` / `"-HH:MM"`.
fn utc_offset(tz: &str) -> Option<i32> {
    if tz.eq_ignore_ascii_case("utc") || tz == "Z" {
        return Some(0);
    }
    let (sign, rest) = match tz.as_bytes().first()? {
        b'+' => (1, &tz[1..]),
        b'-' => (-1, &tz[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 14 && m < 60).then_some(sign * (h * 3_600 + m * 60))
}
