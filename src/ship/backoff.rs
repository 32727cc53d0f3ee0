//! Retry delays: exponential backoff with full jitter, and `Retry-After`.
//!
//! Pure functions of the attempt number and a random number, so they are
//! tested without sleeping.

use std::time::{Duration, SystemTime};

/// Delay before retry number `attempt` (1 for the first retry): uniform in
/// `[min, min(max, min * 2^(attempt-1))]`. Full jitter spreads a fleet of
/// gateways that lost the same link instead of having them retry in step;
/// the floor keeps a flapping remote from being hammered.
pub fn delay(attempt: u32, min: Duration, max: Duration, unit_random: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let cap = min.saturating_mul(1u32 << exp.min(31)).min(max).max(min);
    let span = cap.saturating_sub(min);
    min + span.mul_f64(unit_random.clamp(0.0, 1.0))
}

/// Parses a `Retry-After` header (delta seconds or an HTTP date) into a
/// delay from `now`, capped at `max`. Unparseable values give `None`.
pub fn retry_after(value: &str, now: SystemTime, max: Duration) -> Option<Duration> {
    let value = value.trim();
    let d = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(max))
}

/// Most that is added to a `Retry-After`, at random: a fleet the remote
/// told to come back in the same second then comes back spread over the
/// next one, not all in it.
pub const RETRY_AFTER_SPREAD: Duration = Duration::from_secs(1);

/// The wait after a `Retry-After` of `d` (already at least `min_backoff`):
/// `d` plus up to [`RETRY_AFTER_SPREAD`] (`r` in `[0, 1)`), at most `max`.
/// Never sooner than the remote asked.
pub fn after_retry_after(d: Duration, max: Duration, r: f64) -> Duration {
    d.max((d + RETRY_AFTER_SPREAD.mul_f64(r.clamp(0.0, 1.0))).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let max = Duration::from_secs(300);
        let top: Vec<u64> = (1..=12).map(|a| delay(a, S, max, 1.0).as_secs()).collect();
        assert_eq!(top, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        for a in 1..=12 {
            assert_eq!(delay(a, S, max, 0.0), S, "the floor is min_backoff");
        }
        assert_eq!(
            delay(u32::MAX, S, max, 1.0),
            max,
            "no overflow at huge attempts"
        );
    }

    #[test]
    fn jitter_spreads_uniformly_between_floor_and_cap() {
        let max = Duration::from_secs(300);
        assert_eq!(delay(4, S, max, 0.5), Duration::from_millis(4500));
        let mut prev = Duration::ZERO;
        for i in 0..=10 {
            let d = delay(6, S, max, i as f64 / 10.0);
            assert!(d >= prev && d >= S && d <= Duration::from_secs(32));
            prev = d;
        }
        // Out-of-range randomness is clamped rather than trusted.
        assert_eq!(delay(3, S, max, 7.0), Duration::from_secs(4));
    }

    #[test]
    fn retry_after_seconds_and_dates_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let max = Duration::from_secs(300);
        assert_eq!(retry_after("17", now, max), Some(Duration::from_secs(17)));
        assert_eq!(retry_after(" 5 ", now, max), Some(Duration::from_secs(5)));
        assert_eq!(retry_after("100000", now, max), Some(max));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(retry_after(&later, now, max), Some(Duration::from_secs(42)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(42));
        assert_eq!(retry_after(&past, now, max), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now, max), None);
        assert_eq!(retry_after("-3", now, max), None);
    }

    #[test]
    fn a_retry_after_is_spread_but_never_shortened() {
        let max = Duration::from_secs(60);
        assert_eq!(after_retry_after(2 * S, max, 0.0), 2 * S);
        assert_eq!(after_retry_after(2 * S, max, 0.5), 2 * S + S / 2);
        assert!(after_retry_after(2 * S, max, 0.999) < 3 * S);
        // At max_backoff already: no more than max, and never less than asked.
        assert_eq!(after_retry_after(max, max, 0.9), max);
        assert_eq!(after_retry_after(59 * S + S / 2, max, 0.9), max);
    }
}
