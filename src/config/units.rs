//! Sizes and durations: how `"64MiB"`, `"500kB"`, `"30s"` and `"1h30m"` (or a bare
//! integer) are read. Its own module because every section has such values and must
//! read them alike, with the same error messages.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;

use super::{invalid, ConfigError};

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;

/// A size or duration as written: a string such as `"64MiB"` or a bare integer.
pub(super) enum Scalar {
    Str(String),
    Int(i64),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string such as \"64MiB\" or \"30s\", or an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                i64::try_from(v)
                    .map(Scalar::Int)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses a byte size: `"500kB"` (SI; `"500KB"` and `"500k"` too), `"64MiB"` (binary),
/// `"2MB"`, `"1GiB"`, `"10B"`, `"1.5GiB"` (rounded down to whole bytes) or a plain
/// integer number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {s:?} (use e.g. \"500kB\", \"64MiB\")");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => KIB,
        "mi" | "mib" => MIB,
        "gi" | "gib" => GIB,
        "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 18 {
        return Err(bad());
    }
    if number.ends_with('.') {
        return Err(bad());
    }
    let too_large = || format!("invalid size {s:?} (too large)");
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole
        .checked_mul(u128::from(multiplier))
        .ok_or_else(too_large)?;
    if !fraction.is_empty() {
        let scale = 10u128.pow(fraction.len() as u32);
        let fraction: u128 = fraction.parse().map_err(|_| bad())?;
        bytes += fraction * u128::from(multiplier) / scale;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

/// Parses a duration: `"10ms"`, `"1s"`, `"5m"`, `"2h"`, `"7d"`, `"1h30m"`, `"250us"`,
/// `"0"`, or a plain integer number of seconds. Units: `ns`, `us` (`µs`), `ms`, `s`,
/// `m` (`min`), `h`, `d`, `w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (use e.g. \"10ms\", \"30s\", \"5m\", \"7d\")");
    let too_large = || format!("invalid duration {s:?} (too large)");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map(Duration::from_secs).map_err(|_| too_large());
    }
    let mut nanos: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(bad());
        }
        let count: u128 = rest[..digits_end].parse().map_err(|_| too_large())?;
        rest = rest[digits_end..].trim_start();
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit: u128 = match &rest[..unit_end] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" | "min" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            "w" => 604_800_000_000_000,
            _ => return Err(bad()),
        };
        rest = rest[unit_end..].trim_start();
        nanos = count
            .checked_mul(unit)
            .and_then(|n| n.checked_add(nanos))
            .ok_or_else(too_large)?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

pub(super) fn size_value(
    key: &str,
    value: Option<Scalar>,
    default: u64,
) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(Scalar::Int(n)) => {
            u64::try_from(n).map_err(|_| invalid(key, format!("invalid size {n} (negative)")))
        }
        Some(Scalar::Str(s)) => parse_size(&s).map_err(|m| invalid(key, m)),
    }
}

pub(super) fn duration_value(
    key: &str,
    value: Option<Scalar>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(Scalar::Int(n)) => u64::try_from(n)
            .map(Duration::from_secs)
            .map_err(|_| invalid(key, format!("invalid duration {n} (negative)"))),
        Some(Scalar::Str(s)) => parse_duration(&s).map_err(|m| invalid(key, m)),
    }
}

pub(super) fn positive(key: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(invalid(key, "must be greater than 0"))
    } else {
        Ok(d)
    }
}

/// Parses a rate: `"32kB/s"`, `"1.5MB/s"`, `"256kbit/s"` or `"2Mbit/s"`
/// (bits, as links are sold), or a plain integer number of bytes a second.
/// The size part reads as [`parse_size`]'s.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid rate {s:?} (use e.g. \"32kB/s\" or \"256kbit/s\")");
    let t = s.trim();
    if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() {
        return t.parse().map_err(|_| bad());
    }
    let per_second = t.strip_suffix("/s").ok_or_else(bad)?;
    for (unit, bits) in [
        ("kbit", 1_000u64),
        ("mbit", 1_000_000),
        ("gbit", 1_000_000_000),
    ] {
        let lower = per_second.to_ascii_lowercase();
        if let Some(number) = lower.strip_suffix(unit) {
            let bytes = parse_size(&format!("{}B", number.trim())).map_err(|_| bad())?;
            return bytes.checked_mul(bits).map(|b| b / 8).ok_or_else(bad);
        }
    }
    parse_size(per_second).map_err(|_| bad())
}
