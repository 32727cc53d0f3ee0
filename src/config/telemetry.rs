//! `[telemetry]`: the agent's own health, written as line protocol into one of its local
//! buckets. Its own module because it is optional and checked against the replications
//! (its bucket must be taken by one), like a source, but needs nothing from the disk.

use std::time::Duration;

use serde::Deserialize;

use super::units::{duration_value, Scalar};
use super::{invalid, ConfigError, Replication};

/// `[telemetry]`: every `interval`, the agent writes its own health as line
/// protocol into local bucket `bucket`, tagged `instance`; queued like any
/// write, it reaches the remote with the history of an outage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// A local bucket some replication takes.
    pub bucket: String,
    pub interval: Duration,
    /// The `instance` tag: `instance_id`, else the host name.
    pub instance_id: String,
}

/// Telemetry more often than this would crowd the queue with the agent's
/// own lines.
pub const MIN_TELEMETRY_INTERVAL: Duration = Duration::from_secs(1);

/// `telemetry.interval` when the key is left out.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// The longest `telemetry.instance_id`, in bytes.
const MAX_INSTANCE_ID_LEN: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    bucket: Option<String>,
    interval: Option<Scalar>,
    instance_id: Option<String>,
}

/// Validates `[telemetry]`: a bucket some replication takes (else the
/// lines would have nowhere to go), an interval of at least
/// [`MIN_TELEMETRY_INTERVAL`], and an instance id fit for a tag value.
pub(super) fn telemetry(
    raw: RawTelemetry,
    replications: &[Replication],
) -> Result<Telemetry, ConfigError> {
    let bucket = match raw.bucket {
        None => return Err(invalid("telemetry.bucket", "required")),
        Some(b) if b.is_empty() => return Err(invalid("telemetry.bucket", "must not be empty")),
        Some(b) if b.contains('*') => {
            return Err(invalid(
                "telemetry.bucket",
                format!("{b:?}: one bucket, not a pattern"),
            ))
        }
        Some(b) => b,
    };
    if !replications.iter().any(|r| r.takes_bucket(&bucket)) {
        return Err(invalid(
            "telemetry.bucket",
            format!(
                "{bucket:?} is not taken by any replication (add one with local_bucket = {bucket:?} or \"*\")"
            ),
        ));
    }
    let interval = duration_value("telemetry.interval", raw.interval, DEFAULT_INTERVAL)?;
    if interval < MIN_TELEMETRY_INTERVAL {
        return Err(invalid("telemetry.interval", "must be at least 1s"));
    }
    let instance_id = match raw.instance_id {
        Some(id) => id,
        None => hostname().ok_or_else(|| {
            invalid(
                "telemetry.instance_id",
                "required: this system's host name cannot be read",
            )
        })?,
    };
    if instance_id.is_empty() || instance_id.chars().any(char::is_control) {
        return Err(invalid(
            "telemetry.instance_id",
            "must be non-empty, without control characters",
        ));
    }
    if instance_id.len() > MAX_INSTANCE_ID_LEN {
        return Err(invalid(
            "telemetry.instance_id",
            format!("must be at most {MAX_INSTANCE_ID_LEN} bytes"),
        ));
    }
    Ok(Telemetry {
        bucket,
        interval,
        instance_id,
    })
}

/// This system's host name, when it has a usable one.
pub(super) fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`,
    // which lives across the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end])
        .ok()
        .map(str::to_string)
        .filter(|h| !h.is_empty())
}
