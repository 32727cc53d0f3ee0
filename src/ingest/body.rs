//! Reading request bodies within bounds: the wire size and the decompressed
//! size are both capped at `max_body_size`, and decompression stops one byte
//! past the cap, so a gzip bomb costs at most that much memory. Inflating
//! runs off the async runtime, a few bodies at a time, so bombs arriving
//! together neither stall other connections nor add up in memory.
//!
//! Every byte held is charged to the shared request memory budget
//! ([`super::budget`]) before it is allocated: the body's buffer by its
//! capacity as it grows, the inflated body as it is inflated.
//!
//! Memory follows the bytes actually received: an announced Content-Length
//! decides only whether the body is refused at once, never how much is
//! reserved for it.
//!
//! A body refused as too large is still read to its end (and thrown away)
//! when that end is near, so a client that is still sending sees the 413
//! rather than a connection reset.

use std::io::Read as _;
use std::time::Duration;

use bytes::Bytes;
use flate2::read::MultiGzDecoder;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio::sync::Semaphore;

use super::budget::{Charge, Exhausted};

/// Past `max_body_size`, at most this much more is read and discarded
/// before the 413 (beyond it the connection is closed instead).
const DRAIN_LIMIT: u64 = 64 << 20;
/// Bodies inflated at once; each holds up to `max_body_size` bytes.
const INFLATING: usize = 2;
static INFLATE_SLOTS: Semaphore = Semaphore::const_new(INFLATING);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("request body is larger than max_body_size ({0} bytes)")]
    TooLarge(u64),
    #[error("request body is not valid gzip: {0}")]
    BadGzip(String),
    #[error("unsupported Content-Encoding \"{0}\" (use gzip or none)")]
    UnsupportedEncoding(String),
    #[error("reading the request body failed: {0}")]
    Read(String),
    #[error("the client sent the request body too slowly (no complete body within {0:?})")]
    Timeout(Duration),
    #[error("the agent is busy: requests in progress hold listen.max_request_memory ({0} bytes); retry shortly")]
    Busy(u64),
}

/// Where a body's bytes are charged: the request's charge and the budget's
/// limit (`listen.max_request_memory`).
pub struct Charged<'a> {
    pub charge: &'a mut Charge,
    pub limit: u64,
}

/// How a body is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    pub fn from_header(value: Option<&str>) -> Result<Encoding, BodyError> {
        match value.map(str::trim) {
            None | Some("") => Ok(Encoding::Identity),
            Some(v) if v.eq_ignore_ascii_case("identity") => Ok(Encoding::Identity),
            Some(v) if v.eq_ignore_ascii_case("gzip") => Ok(Encoding::Gzip),
            Some(v) => Err(BodyError::UnsupportedEncoding(v.to_string())),
        }
    }
}

/// Collects the body (Content-Length or chunked) and decompresses it,
/// charging what it holds to `charged` (the wire bytes are released once
/// inflated).
pub async fn read(
    body: Incoming,
    encoding: Encoding,
    max: u64,
    timeout: Duration,
    charged: Charged<'_>,
) -> Result<Bytes, BodyError> {
    let Charged { charge, limit } = charged;
    let collected = match tokio::time::timeout(timeout, collect(body, max, charge, limit)).await {
        Err(_) => return Err(BodyError::Timeout(timeout)),
        Ok(r) => r?,
    };
    match encoding {
        Encoding::Identity => Ok(collected),
        Encoding::Gzip => {
            let _slot = INFLATE_SLOTS
                .acquire()
                .await
                .map_err(|e| BodyError::Read(e.to_string()))?;
            let wire = collected.len() as u64;
            // The charge moves to the blocking thread and back.
            let fresh = charge.detached();
            let mut moved = std::mem::replace(charge, fresh);
            let (inflated, moved) = tokio::task::spawn_blocking(move || {
                let r = inflate(&collected, max, &mut |n| {
                    moved
                        .grow_blocking(n, limit)
                        .map_err(|Exhausted| BodyError::Busy(limit))
                });
                drop(collected);
                (r, moved)
            })
            .await
            .map_err(|e| BodyError::Read(e.to_string()))?;
            *charge = moved;
            charge.shrink(wire);
            inflated.map(Bytes::from)
        }
    }
}

/// The body's bytes, at most `max` of them; past that, drained (see
/// [`DRAIN_LIMIT`]) and refused.
async fn collect(
    mut body: Incoming,
    max: u64,
    charge: &mut Charge,
    limit: u64,
) -> Result<Bytes, BodyError> {
    let announced = body.size_hint().exact();
    if announced.is_some_and(|n| n > max.saturating_add(DRAIN_LIMIT)) {
        return Err(BodyError::TooLarge(max));
    }
    // Grown as bytes arrive, never sized from the announcement: a
    // Content-Length costs the client nothing to send, and a hundred
    // connections announcing 32 MiB each must not reserve 3.2 GB.
    let mut buf = Vec::new();
    let mut seen: u64 = 0;
    // No memory within `budget::WAIT`: the rest is read and thrown away, as
    // for a body too large, so the client sees the 503 rather than a reset.
    let mut busy = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen += data.len() as u64;
        if seen <= max && !busy {
            let needed = buf.len() + data.len();
            if needed > buf.capacity() {
                // Doubling, as Vec would, but charged before it is allocated.
                let capacity = needed.max(buf.capacity() * 2).min(max as usize);
                if charge
                    .grow((capacity - buf.capacity()) as u64, limit)
                    .await
                    .is_err()
                {
                    busy = true;
                    charge.shrink(buf.capacity() as u64);
                    buf = Vec::new();
                    continue;
                }
                buf.reserve_exact(capacity - buf.len());
            }
            buf.extend_from_slice(&data);
        } else if seen > max.saturating_add(DRAIN_LIMIT) {
            return Err(if busy {
                BodyError::Busy(limit)
            } else {
                BodyError::TooLarge(max)
            });
        } else if !buf.is_empty() {
            charge.shrink(buf.capacity() as u64);
            buf = Vec::new();
        }
    }
    if seen > max {
        return Err(BodyError::TooLarge(max));
    }
    if busy {
        return Err(BodyError::Busy(limit));
    }
    Ok(Bytes::from(buf))
}

/// Inflates concatenated gzip members, refusing more than `max` bytes.
pub fn decompress(wire: &[u8], max: u64) -> Result<Vec<u8>, BodyError> {
    inflate(wire, max, &mut |_| Ok(()))
}

/// Inflates `wire`, calling `charge` with the bytes of each growth of the
/// output buffer before it is allocated.
fn inflate(
    wire: &[u8],
    max: u64,
    charge: &mut dyn FnMut(u64) -> Result<(), BodyError>,
) -> Result<Vec<u8>, BodyError> {
    // The smallest first buffer for the inflated body.
    const STEP: usize = 256 << 10;
    let mut decoder = MultiGzDecoder::new(wire).take(max + 1);
    let first = (wire.len() * 4).max(STEP).min(max as usize + 1);
    charge(first as u64)?;
    let mut out = Vec::with_capacity(first);
    while out.len() as u64 <= max {
        if out.len() == out.capacity() {
            let grown = (out.capacity() * 2)
                .min(max as usize + 1)
                .max(out.len() + 1);
            charge((grown - out.capacity()) as u64)?;
            out.reserve_exact(grown - out.len());
        }
        // Fills the room there is (read_to_end writes into spare capacity
        // without zeroing it first), never more.
        let room = (out.capacity() - out.len()) as u64;
        let n = (&mut decoder)
            .take(room)
            .read_to_end(&mut out)
            .map_err(|e| BodyError::BadGzip(e.to_string()))?;
        if n == 0 {
            break;
        }
    }
    if out.len() as u64 > max {
        return Err(BodyError::TooLarge(max));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bombs_stop_at_the_cap() {
        let bomb = crate::ship::gzip(&vec![0u8; 8 << 20], 9);
        assert!(bomb.len() < 64 << 10);
        assert_eq!(
            decompress(&bomb, 1 << 20),
            Err(BodyError::TooLarge(1 << 20))
        );
        assert_eq!(decompress(&bomb, 8 << 20).unwrap().len(), 8 << 20);
    }

    #[test]
    fn concatenated_members_and_garbage() {
        let mut two = crate::ship::gzip(b"a f=1 1\n", 6);
        two.extend(crate::ship::gzip(b"b f=1 1\n", 6));
        assert_eq!(decompress(&two, 100).unwrap(), b"a f=1 1\nb f=1 1\n");
        assert!(matches!(
            decompress(b"not gzip", 100),
            Err(BodyError::BadGzip(_))
        ));
        assert_eq!(Encoding::from_header(Some("GZIP")), Ok(Encoding::Gzip));
        assert!(Encoding::from_header(Some("br")).is_err());
    }
}
