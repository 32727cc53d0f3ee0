//! `[queue]`: how writes are committed to the LMDB queue and how large its map may grow.
//! Its own module because the map size is derived from every replication's
//! `max_queue_size`, so it is checked after them, with rules of LMDB's own.

use std::time::Duration;

use serde::Deserialize;

use super::units::{duration_value, size_value, Scalar, GIB, MIB};
use super::{invalid, ConfigError, Replication, Validator};

/// `queue.commit_interval` when the key is left out.
const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(10);
/// When `queue.map_size` is left out, it is twice the sum of the replications'
/// `max_queue_size` plus this, rounded up to a whole MiB.
const DEFAULT_MAP_HEADROOM: u64 = 64 * MIB;
/// The least room a `queue.map_size` that is given must leave above the sum of the
/// replications' `max_queue_size`.
const MIN_MAP_HEADROOM: u64 = 16 * MIB;

/// The queue: `[queue]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Longest a write waits for others to share its commit.
    pub commit_interval: Duration,
    pub durability: Durability,
    /// LMDB map size in bytes, a multiple of 1 MiB.
    pub map_size: u64,
}

/// Whether a commit waits for the disk (`"fsync"`) or only for the page cache (`"os"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Durability {
    Fsync,
    Os,
}

impl Durability {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Os => "os",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    commit_interval: Option<Scalar>,
    durability: Option<String>,
    map_size: Option<Scalar>,
}

impl Validator<'_> {
    pub(super) fn queue(
        &mut self,
        raw: Option<RawQueue>,
        replications: &[Replication],
    ) -> Result<QueueConfig, ConfigError> {
        let raw = raw.unwrap_or(RawQueue {
            commit_interval: None,
            durability: None,
            map_size: None,
        });
        let commit_interval = duration_value(
            "queue.commit_interval",
            raw.commit_interval,
            DEFAULT_COMMIT_INTERVAL,
        )?;
        let durability = match raw.durability.as_deref() {
            None | Some("fsync") => Durability::Fsync,
            Some("os") => Durability::Os,
            Some(other) => {
                return Err(invalid(
                    "queue.durability",
                    format!("invalid value {other:?} (use \"fsync\" or \"os\")"),
                ))
            }
        };
        let too_large = || invalid("queue.map_size", "the queues' total size is too large");
        let queued = replications
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.max_queue_size))
            .ok_or_else(too_large)?;
        let map_size = match raw.map_size {
            None => queued
                .checked_mul(2)
                .and_then(|b| b.checked_add(DEFAULT_MAP_HEADROOM))
                .and_then(round_up_mib)
                .ok_or_else(too_large)?,
            Some(v) => {
                let given = size_value("queue.map_size", Some(v), 0)?;
                let needed = queued.checked_add(MIN_MAP_HEADROOM).ok_or_else(too_large)?;
                if given < needed {
                    return Err(invalid(
                        "queue.map_size",
                        format!(
                            "{given} bytes is less than the sum of max_queue_size ({queued} bytes) + 16 MiB"
                        ),
                    ));
                }
                // LMDB wants a multiple of the page size, which is 4 to 64 KiB.
                round_up_mib(given).ok_or_else(too_large)?
            }
        };
        if usize::try_from(map_size).is_err() {
            return Err(invalid(
                "queue.map_size",
                format!("{map_size} bytes does not fit this system's address space; lower max_queue_size"),
            ));
        }
        if cfg!(target_pointer_width = "32") && map_size > GIB {
            self.warnings.push(format!(
                "queue.map_size: {} MiB may not fit a 32-bit address space; lower max_queue_size if the queue fails to open",
                map_size / MIB
            ));
        }
        Ok(QueueConfig {
            commit_interval,
            durability,
            map_size,
        })
    }
}

fn round_up_mib(bytes: u64) -> Option<u64> {
    bytes.div_ceil(MIB).checked_mul(MIB)
}
