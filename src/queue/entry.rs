//! The on-disk entry format: one entry is the lines one write routed to one
//! replication, stored under a big-endian `(replication id, sequence)` key.
//!
//! ```text
//! offset size field
//!      0    1 format version: 1 (lines as they are) or 2 (lines deflated)
//!      1    4 CRC32 (IEEE) of every byte from offset 5 to the end
//!      5    8 enqueue time, ns since the Unix epoch, little endian
//!     13    4 line count, little endian
//!     17    2 bucket name length N, little endian
//!     19    N bucket name (UTF-8): the local bucket the lines were written to
//! version 1:
//!   19+N    * payload: whole lines, each ending in '\n', ns timestamps
//! version 2:
//!   19+N    4 length of the lines, little endian
//!   23+N    4 CRC32 of the lines (for the gzip trailer of a batch)
//!   27+N    * payload: the lines as a deflate segment ([`crate::deflate`])
//! version 3 (held by the clock guard, see [`crate::clock`]):
//!   19+N   16 boot id the write arrived in
//!   35+N    8 time since that boot when it arrived, ns, little endian
//!   43+N    8 the wall time given to its lines without a timestamp, ns, i64 LE
//!   51+N    * payload: whole lines, each ending in '\n', ns timestamps
//! ```
//!
//! A version 3 entry is never sent as it is: the queue rewrites it as a
//! version 1 entry when the guard lets it go (`queue::writer::clock`). Its
//! enqueue time is the wall clock's at arrival, which the guard distrusts.
//!
//! The CRC covers the header fields as well as the payload, so a damaged line
//! count or bucket name is caught, not just damaged lines. Version 2 entries
//! are taken or removed whole; positions inside one are never used.

use std::fmt;

const VERSION: u8 = 1;
const VERSION_DEFLATED: u8 = 2;
const VERSION_HELD: u8 = 3;
const FIXED_HEADER: usize = 19;
const ANCHOR_LEN: usize = 32;

/// A decoded entry borrowing the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub enqueued_ns: u64,
    pub lines: u32,
    pub bucket: &'a str,
    /// The lines, or their deflate segment when `deflated` is set.
    pub payload: &'a [u8],
    pub deflated: Option<Deflated>,
    /// Set for an entry the clock guard holds.
    pub clock: Option<crate::clock::Anchor>,
}

/// What a deflated payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflated {
    /// Bytes of lines.
    pub len: u32,
    /// CRC32 of the lines.
    pub crc: u32,
}

impl Entry<'_> {
    /// Bytes of lines the entry holds (what queue bounds count).
    pub fn lines_len(&self) -> usize {
        self.deflated.map_or(self.payload.len(), |d| d.len as usize)
    }

    /// The lines themselves, inflated when stored deflated.
    pub fn lines_bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>, Corruption> {
        match self.deflated {
            None => Ok(std::borrow::Cow::Borrowed(self.payload)),
            Some(d) => {
                let mut out = Vec::new();
                crate::deflate::inflate_segment(self.payload, d.len as usize, &mut out)
                    .map_err(|_| Corruption::BadSegment)?;
                Ok(std::borrow::Cow::Owned(out))
            }
        }
    }
}

/// Why stored bytes are not a valid entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    TooShort,
    UnknownVersion(u8),
    CrcMismatch { stored: u32, computed: u32 },
    BadBucket,
    BadSegment,
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
            Corruption::BadSegment => write!(f, "compressed lines do not inflate"),
        }
    }
}

/// The bytes before the payload: header fields, the CRC left at zero
/// (see [`seal`]). Raw lines when `deflated` is `None`, else a segment.
pub fn header(enqueued_ns: u64, lines: u32, bucket: &str, deflated: Option<Deflated>) -> Vec<u8> {
    let blen = u16::try_from(bucket.len()).expect("bucket names are validated to be short");
    let mut h = Vec::with_capacity(FIXED_HEADER + bucket.len() + 8);
    h.push(if deflated.is_some() {
        VERSION_DEFLATED
    } else {
        VERSION
    });
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&enqueued_ns.to_le_bytes());
    h.extend_from_slice(&lines.to_le_bytes());
    h.extend_from_slice(&blen.to_le_bytes());
    h.extend_from_slice(bucket.as_bytes());
    if let Some(d) = deflated {
        h.extend_from_slice(&d.len.to_le_bytes());
        h.extend_from_slice(&d.crc.to_le_bytes());
    }
    h
}

/// Sets the CRC of a complete entry (header then payload). The writer
/// builds entries in space LMDB reserves, so the payload is copied once.
pub fn seal(entry: &mut [u8]) {
    let crc = crc32fast::hash(&entry[5..]);
    entry[1..5].copy_from_slice(&crc.to_le_bytes());
}

/// The header of an entry the clock guard holds (raw lines follow).
pub fn header_held(
    enqueued_ns: u64,
    lines: u32,
    bucket: &str,
    anchor: &crate::clock::Anchor,
) -> Vec<u8> {
    let mut h = header(enqueued_ns, lines, bucket, None);
    h[0] = VERSION_HELD;
    h.extend_from_slice(&anchor.boot);
    h.extend_from_slice(&anchor.boot_ns.to_le_bytes());
    h.extend_from_slice(&anchor.stamp_ns.to_le_bytes());
    h
}

/// Encodes into a fresh vector (tests and the dead-letter store).
pub fn encode(enqueued_ns: u64, lines: u32, bucket: &str, payload: &[u8]) -> Vec<u8> {
    encode_with(enqueued_ns, lines, bucket, payload, None)
}

/// Encodes lines (`deflated: None`) or a deflate segment of them.
pub fn encode_with(
    enqueued_ns: u64,
    lines: u32,
    bucket: &str,
    payload: &[u8],
    deflated: Option<Deflated>,
) -> Vec<u8> {
    let mut out = header(enqueued_ns, lines, bucket, deflated);
    out.extend_from_slice(payload);
    seal(&mut out);
    out
}

/// Decodes and verifies an entry.
pub fn decode(bytes: &[u8]) -> Result<Entry<'_>, Corruption> {
    if bytes.len() < FIXED_HEADER {
        return Err(Corruption::TooShort);
    }
    if ![VERSION, VERSION_DEFLATED, VERSION_HELD].contains(&bytes[0]) {
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
    let at = FIXED_HEADER + blen;
    if bytes[0] == VERSION_DEFLATED {
        if bytes.len() < at + 8 {
            return Err(Corruption::TooShort);
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        return Ok(Entry {
            enqueued_ns,
            lines,
            bucket,
            payload: &bytes[at + 8..],
            deflated: Some(Deflated {
                len: u32_at(at),
                crc: u32_at(at + 4),
            }),
            clock: None,
        });
    }
    if bytes[0] == VERSION_HELD {
        if bytes.len() < at + ANCHOR_LEN {
            return Err(Corruption::TooShort);
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        return Ok(Entry {
            enqueued_ns,
            lines,
            bucket,
            payload: &bytes[at + ANCHOR_LEN..],
            deflated: None,
            clock: Some(crate::clock::Anchor {
                boot: bytes[at..at + 16].try_into().unwrap(),
                boot_ns: u64_at(at + 16),
                stamp_ns: u64_at(at + 24) as i64,
            }),
        });
    }
    Ok(Entry {
        enqueued_ns,
        lines,
        bucket,
        payload: &bytes[at..],
        deflated: None,
        clock: None,
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

    fn deflated(lines: &[u8]) -> Vec<u8> {
        let mut seg = Vec::new();
        let crc = crate::deflate::segment(lines, 6, &mut seg);
        let d = Deflated {
            len: lines.len() as u32,
            crc,
        };
        encode_with(9, 2, "b", &seg, Some(d))
    }

    #[test]
    fn deflated_round_trip() {
        let lines = b"a f=1 1\nb f=2 2\n";
        let bytes = deflated(lines);
        let e = decode(&bytes).unwrap();
        assert_eq!((e.enqueued_ns, e.lines, e.bucket), (9, 2, "b"));
        assert_eq!(e.lines_len(), lines.len());
        assert_eq!(&e.lines_bytes().unwrap()[..], &lines[..]);
        // Raw entries hand out their payload as is.
        let raw = encode(1, 1, "b", b"m f=1 1\n");
        let r = decode(&raw).unwrap();
        assert_eq!((r.deflated, r.lines_len()), (None, 8));
        assert_eq!(&r.lines_bytes().unwrap()[..], b"m f=1 1\n");
    }

    #[test]
    fn deflated_damage_is_caught() {
        let bytes = deflated(b"m f=1 1\n");
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x10;
            assert!(decode(&damaged).is_err(), "flip in byte {i} not caught");
        }
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncation to {len}");
        }
    }

    #[test]
    fn held_entries_round_trip_and_damage_is_caught() {
        let anchor = crate::clock::Anchor {
            boot: [7; 16],
            boot_ns: 123_456_789,
            stamp_ns: -5,
        };
        let lines = b"m f=1 -5\n";
        let mut bytes = header_held(11, 1, "b", &anchor);
        bytes.extend_from_slice(lines);
        seal(&mut bytes);
        assert_eq!(bytes[0], 3);
        let e = decode(&bytes).unwrap();
        assert_eq!((e.enqueued_ns, e.lines, e.bucket), (11, 1, "b"));
        assert_eq!(
            (e.payload, e.deflated, e.clock),
            (&lines[..], None, Some(anchor))
        );
        assert_eq!(e.lines_len(), lines.len());
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x04;
            assert!(decode(&damaged).is_err(), "flip in byte {i} not caught");
        }
        // Ordinary entries hold no anchor.
        assert_eq!(
            decode(&encode(1, 1, "b", b"m f=1 1\n")).unwrap().clock,
            None
        );
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
