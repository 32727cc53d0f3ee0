//! `[clock]`: the clock guard (see [`crate::clock`]): how long writes wait
//! for an unsynchronised clock after boot, and whether lines stamped before
//! the build date are sent.

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
}

impl Default for ClockConfig {
    fn default() -> ClockConfig {
        ClockConfig {
            wait_for_sync: crate::clock::DEFAULT_WAIT,
            send_before_build: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClock {
    wait_for_sync: Option<Scalar>,
    send_before_build: Option<bool>,
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
    })
}
