//! `[clock]`: the clock guard (see [`crate::clock`]): how long writes wait
//! for an unsynchronised clock after boot, and what happens to lines
//! stamped before the build date.

use std::time::Duration;

use serde::Deserialize;

use super::units::{duration_value, Scalar};
use super::ConfigError;

/// `[clock]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockConfig {
    /// While the clock is not synchronised, writes are held at most this
    /// long after boot (zero: until it is, however long). A clock before
    /// the build date holds them regardless.
    pub wait_for_sync: Duration,
    /// Send lines stamped before the build date as they are (a backfill of
    /// old data), instead of setting them aside with reason `clock`.
    pub send_before_build: bool,
    /// How long before the build date a line's own timestamp must be for
    /// it to count as stamped before it.
    pub before_build_margin: Duration,
}

impl Default for ClockConfig {
    fn default() -> ClockConfig {
        ClockConfig {
            wait_for_sync: crate::clock::DEFAULT_WAIT,
            send_before_build: false,
            before_build_margin: crate::clock::DEFAULT_MARGIN,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClock {
    wait_for_sync: Option<Scalar>,
    send_before_build: Option<bool>,
    before_build_margin: Option<Scalar>,
}

pub(super) fn clock(raw: Option<RawClock>) -> Result<ClockConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(ClockConfig::default());
    };
    Ok(ClockConfig {
        wait_for_sync: duration_value(
            "clock.wait_for_sync",
            raw.wait_for_sync,
            crate::clock::DEFAULT_WAIT,
        )?,
        send_before_build: raw.send_before_build.unwrap_or(false),
        before_build_margin: duration_value(
            "clock.before_build_margin",
            raw.before_build_margin,
            crate::clock::DEFAULT_MARGIN,
        )?,
    })
}
