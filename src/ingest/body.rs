//! Reading request bodies within bounds: the wire size and the decompressed
//! size are both capped at `max_body_size`, and decompression stops one byte
//! past the cap, so a gzip bomb costs at most that much memory. Inflating
//! runs off the async runtime, a few bodies at a time, so bombs arriving
//! together neither stall other connections nor add up in memory.
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

/// Collects the body (Content-Length or chunked) and decompresses it.
pub async fn read(
    body: Incoming,
    encoding: Encoding,
    max: u64,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    let collected = match tokio::time::timeout(timeout, collect(body, max)).await {
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
            tokio::task::spawn_blocking(move || decompress(&collected, max))
                .await
                .map_err(|e| BodyError::Read(e.to_string()))?
                .map(Bytes::from)
        }
    }
}

/// The body's bytes, at most `max` of them; past that, drained (see
/// [`DRAIN_LIMIT`]) and refused.
async fn collect(mut body: Incoming, max: u64) -> Result<Bytes, BodyError> {
    let announced = body.size_hint().exact();
    if announced.is_some_and(|n| n > max.saturating_add(DRAIN_LIMIT)) {
        return Err(BodyError::TooLarge(max));
    }
    // Grown as bytes arrive, never sized from the announcement: a
    // Content-Length costs the client nothing to send, and a hundred
    // connections announcing 32 MiB each must not reserve 3.2 GB.
    let mut buf = Vec::new();
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen += data.len() as u64;
        if seen <= max {
            buf.extend_from_slice(&data);
        } else if seen > max.saturating_add(DRAIN_LIMIT) {
            return Err(BodyError::TooLarge(max));
        } else if !buf.is_empty() {
            buf = Vec::new();
        }
    }
    if seen > max {
        return Err(BodyError::TooLarge(max));
    }
    Ok(Bytes::from(buf))
}

/// Inflates concatenated gzip members, refusing more than `max` bytes.
pub fn decompress(wire: &[u8], max: u64) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::with_capacity((wire.len() * 4).min(max as usize + 1));
    MultiGzDecoder::new(wire)
        .take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| BodyError::BadGzip(e.to_string()))?;
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
