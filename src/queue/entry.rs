//! The on-disk entry format: one entry is the lines one write routed to one
//! replication, stored under a big-endian `(replication id, sequence)` key.
//!
//! ```text
//! offset size field
//!      0    1 format version (1)
//!      1    4 CRC32 (IEEE) of every byte from offset 5 to the end
//!      5    8 enqueue time, ns since the Unix epoch, little endian
//!     13    4 line count, little endian
//!     17    2 bucket name length N, little endian
//!     19    N bucket name (UTF-8): the local bucket the lines were written to
//!   19+N    * payload: whole lines, each ending in '\n', ns timestamps
//! ```
//!
//! The CRC covers the header fields as well as the payload, so a damaged line
//! count or bucket name is caught, not just damaged lines.

use std::fmt;

const VERSION: u8 = 1;
const FIXED_HEADER: usize = 19;

/// A decoded entry borrowing the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub enqueued_ns: u64,
    pub lines: u32,
    pub bucket: &'a str,
    pub payload: &'a [u8],
}

/// Why stored bytes are not a valid entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    TooShort,
    UnknownVersion(u8),
    CrcMismatch { stored: u32, computed: u32 },
    BadBucket,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::TooShort => write!(f, "entry shorter than its header"),
            Corruption::UnknownVersion(v) => write!(f, "unknown entry format version {v}"),
            Corruption::CrcMismatch { stored, computed } => {
                write!(
                    f,
                    "crc mismatch (stored {stored:08x}, computed {computed:08x})"
                )
            }
            Corruption::BadBucket => write!(f, "bucket name is not valid UTF-8"),
        }
    }
}

/// Size of the encoded entry for a bucket name and payload.
pub fn encoded_len(bucket: &str, payload: &[u8]) -> usize {
    FIXED_HEADER + bucket.len() + payload.len()
}

/// Writes the entry into `out`, which must be exactly `encoded_len` bytes
/// (LMDB hands out reserved space, so the payload is copied only once).
pub fn encode_into(out: &mut [u8], enqueued_ns: u64, lines: u32, bucket: &str, payload: &[u8]) {
    debug_assert_eq!(out.len(), encoded_len(bucket, payload));
    let blen = u16::try_from(bucket.len()).expect("bucket names are validated to be short");
    out[0] = VERSION;
    out[5..13].copy_from_slice(&enqueued_ns.to_le_bytes());
    out[13..17].copy_from_slice(&lines.to_le_bytes());
    out[17..19].copy_from_slice(&blen.to_le_bytes());
    out[FIXED_HEADER..FIXED_HEADER + bucket.len()].copy_from_slice(bucket.as_bytes());
    out[FIXED_HEADER + bucket.len()..].copy_from_slice(payload);
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes into a fresh vector (tests and the dead-letter store).
pub fn encode(enqueued_ns: u64, lines: u32, bucket: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0; encoded_len(bucket, payload)];
    encode_into(&mut out, enqueued_ns, lines, bucket, payload);
    out
}

/// Decodes and verifies an entry.
pub fn decode(bytes: &[u8]) -> Result<Entry<'_>, Corruption> {
    if bytes.len() < FIXED_HEADER {
        return Err(Corruption::TooShort);
    }
    if bytes[0] != VERSION {
        return Err(Corruption::UnknownVersion(bytes[0]));
    }
    let stored = u32::from_le_bytes(bytes[1..5].try_into().unwrap());
    let computed = crc32fast::hash(&bytes[5..]);
    if stored != computed {
        return Err(Corruption::CrcMismatch { stored, computed });
    }
    decode_unchecked(bytes)
}

/// Reads the header fields without verifying the CRC: the writer uses it for
/// accounting on entries whose CRC the reader already checked.
pub fn decode_unchecked(bytes: &[u8]) -> Result<Entry<'_>, Corruption> {
    if bytes.len() < FIXED_HEADER {
        return Err(Corruption::TooShort);
    }
    let enqueued_ns = u64::from_le_bytes(bytes[5..13].try_into().unwrap());
    let lines = u32::from_le_bytes(bytes[13..17].try_into().unwrap());
    let blen = u16::from_le_bytes(bytes[17..19].try_into().unwrap()) as usize;
    if bytes.len() < FIXED_HEADER + blen {
        return Err(Corruption::TooShort);
    }
    let bucket = std::str::from_utf8(&bytes[FIXED_HEADER..FIXED_HEADER + blen])
        .map_err(|_| Corruption::BadBucket)?;
    Ok(Entry {
        enqueued_ns,
        lines,
        bucket,
        payload: &bytes[FIXED_HEADER + blen..],
    })
}

/// A dead-letter record: the remote's reason, then an entry (or, for an
/// entry set aside as corrupt, the damaged bytes as they were found).
pub fn encode_dead(reason: &str, entry: &[u8]) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(2 + reason.len() + entry.len());
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(entry);
    out
}

/// Splits a dead-letter record into its reason and entry bytes.
pub fn decode_dead(bytes: &[u8]) -> (String, &[u8]) {
    if bytes.len() < 2 {
        return (String::new(), bytes);
    }
    let n = (u16::from_le_bytes([bytes[0], bytes[1]]) as usize).min(bytes.len() - 2);
    (
        String::from_utf8_lossy(&bytes[2..2 + n]).into_owned(),
        &bytes[2 + n..],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = encode(42, 2, "sensors", b"a f=1 1\nb f=2 2\n");
        let e = decode(&bytes).unwrap();
        assert_eq!(e.enqueued_ns, 42);
        assert_eq!(e.lines, 2);
        assert_eq!(e.bucket, "sensors");
        assert_eq!(e.payload, b"a f=1 1\nb f=2 2\n");
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = encode(7, 1, "b", b"m f=1 1\n");
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[i] ^= 1 << bit;
                assert!(
                    decode(&damaged).is_err(),
                    "flip of bit {bit} in byte {i} not caught"
                );
            }
        }
    }

    #[test]
    fn truncation_is_caught() {
        let bytes = encode(7, 1, "bucket", b"m f=1 1\n");
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "truncation to {len} not caught"
            );
        }
    }
}
