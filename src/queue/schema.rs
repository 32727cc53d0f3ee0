//! The on-disk format of the queue: every key, the meta record and the
//! format versions. Data directories written by older versions must keep
//! opening, so nothing here changes without a new version and a reader for
//! the old one; everything else in the queue reads and writes through these
//! functions.
//!
//! # Layout
//!
//! One LMDB environment under `<data_dir>/queue/` (beside it, `<data_dir>/LOCK`
//! keeps a second process out), with five named databases. Integers in keys
//! are big-endian, so that LMDB's byte order is numeric order.
//!
//! - `entries` ([`ENTRIES`]): the logs. Key [`entry_key`]
//!   `[replication id: u32][sequence: u64]`, 12 bytes; value an entry
//!   ([`super::entry`]: version byte 1 or 2, CRC32, enqueue time, line count,
//!   bucket, then the lines, or their deflate segment).
//!   Sequences a hold moved to a lane are gaps: absent keys between the
//!   head and the next sequence, skipped when reading and removing.
//! - `lanes` ([`LANES`]): held lanes. Key [`lane_key`] `[replication id:
//!   u32][lane: u32][sequence: u64]`, 16 bytes; value an entry as in
//!   `entries`. Each lane starts at sequence 0 and is read and settled from
//!   its own head, as a main log is. Absent from data dirs of releases
//!   before held lanes (created empty on opening).
//! - `meta` ([`META`]): one database for five kinds of record, told apart by
//!   their first byte:
//!   - [`name_key`] `N<replication name>` → its id, `u32`;
//!   - [`NEXT_ID_KEY`] `I` → the next free replication id, `u32` (ids start
//!     at 1);
//!   - [`meta_key`] `R<id: u32>` → the replication's [`Meta`] (see its
//!     encoding there): head position, next sequence, the exact unsent bytes
//!     and lines, and the line counters;
//!   - [`lane_meta_key`] `L<id: u32><lane: u32>` → a held lane's
//!     [`LaneRecord`]: the destination (local bucket), head, next
//!     sequence, lines, bytes, since when, the remote's code and message;
//!     present exactly while the lane holds an entry;
//!   - [`checkpoint_key`] `S<source key>` → a source's position (a tailed
//!     file's offset, a WAL segment's), opaque bytes that the source reads
//!     back; written in the same transaction as the lines read up to it;
//!   - [`boot_key`] `B<boot id: 16 bytes>` → the clock's offset learnt in
//!     that boot (wall time less time since boot, ns, `i64` little endian),
//!     kept while an entry held by the clock guard (entry version 3) may
//!     still need it; deleted once no replication holds one.
//! - `dead` ([`DEAD`]): the dead-letter store, lines set aside (refused by
//!   the remote, or failing their CRC). Key [`dead_key`], shaped like an entry
//!   key, with a record number counting up per replication; value
//!   [`super::entry::encode_dead`]: the reason, then the entry as it was
//!   stored (or as the refused lines make one).
//! - `windows` ([`WINDOWS`]): open downsampling windows. Key [`window_key`]
//!   `[id: u32][window start: i64, sign bit flipped][bucket length: u16]
//!   [bucket][series key]`, so that one replication's windows sort by start;
//!   value a [`crate::transform::downsample::Window`].
//!
//! # Versions
//!
//! - An entry's first byte: 1 (lines as they are) or 2 (a deflate segment).
//! - A meta record's first field, [`META_VERSION`]: 2 says the log may hold
//!   version 2 entries; older agents refuse it instead of setting those
//!   entries aside as damaged. Version 1 records are read as well.
//!   [`META_VERSION_LANES`], 3, is written while the replication has a held
//!   lane: releases before lanes read versions 1 and 2 only, so they refuse
//!   to open it ("unknown format (written by a newer version?)") rather
//!   than lose sight of the lane's lines. Without lanes the record is
//!   version 2 again, with two more fields (next lane, lanes) that those
//!   releases ignore.
//!   [`META_VERSION_CLOCK`], 4, is written while the main log holds entries
//!   the clock guard holds (entry version 3, counted in the field after
//!   lanes): releases before the guard would set them aside as damaged, so
//!   they refuse the record instead. Once released, the record is version 2
//!   or 3 again.

use std::ops::Bound;

use super::{Counters, Pos};

/// Database names.
pub(super) const ENTRIES: &str = "entries";
pub(super) const META: &str = "meta";
pub(super) const DEAD: &str = "dead";
pub(super) const WINDOWS: &str = "windows";
pub(super) const LANES: &str = "lanes";

/// Version of the meta record written while a replication has no lane;
/// see [the module doc](self).
pub(super) const META_VERSION: u64 = 2;
/// Version of the meta record written while a replication has held lanes:
/// an agent that knows no lanes refuses it.
pub(super) const META_VERSION_LANES: u64 = 3;
/// Version of the meta record written while the main log holds entries the
/// clock guard holds: an agent that knows no guard refuses it.
pub(super) const META_VERSION_CLOCK: u64 = 4;

/// Key of entry `seq` of replication `id` in `entries`.
pub(super) fn entry_key(id: u32, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence (or dead-letter record number) of an entry or dead key.
pub(super) fn key_seq(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[4..12].try_into().expect("entry keys are 12 bytes"))
}

/// Key of dead-letter record `n` of replication `id` in `dead`.
pub(super) fn dead_key(id: u32, n: u64) -> [u8; 12] {
    entry_key(id, n)
}

/// Key of entry `seq` of lane `lane` of replication `id` in `lanes`.
pub(super) fn lane_key(id: u32, lane: u32, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..8].copy_from_slice(&lane.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence of a key of `lanes`.
pub(super) fn lane_key_seq(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[8..16].try_into().expect("lane keys are 16 bytes"))
}

/// A log of a replication: its main log in `entries`, or one of its held
/// lanes in `lanes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Log {
    Main(u32),
    Lane(u32, u32),
}

/// A key of `entries` (12 bytes) or `lanes` (16 bytes).
#[derive(Debug, Clone, Copy)]
pub(super) struct Key {
    buf: [u8; 16],
    len: usize,
}

impl std::ops::Deref for Key {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Log {
    /// The key of entry `seq` of this log.
    pub(super) fn key(self, seq: u64) -> Key {
        match self {
            Log::Main(id) => {
                let mut buf = [0u8; 16];
                buf[..12].copy_from_slice(&entry_key(id, seq));
                Key { buf, len: 12 }
            }
            Log::Lane(id, lane) => Key {
                buf: lane_key(id, lane, seq),
                len: 16,
            },
        }
    }

    /// The sequence of a key of this log.
    pub(super) fn seq(self, key: &[u8]) -> u64 {
        match self {
            Log::Main(_) => key_seq(key),
            Log::Lane(..) => lane_key_seq(key),
        }
    }

    /// The lane number: 0 for the main log.
    pub(crate) fn lane(self) -> u32 {
        match self {
            Log::Main(_) => 0,
            Log::Lane(_, lane) => lane,
        }
    }
}

/// Bounds `[lo, hi)` of every key of replication `id` in `entries` or `dead`.
pub(super) fn repl_keys(id: u32) -> ([u8; 12], [u8; 12]) {
    (entry_key(id, 0), entry_key(id + 1, 0))
}

/// Key range `[lo, hi)` in the form heed's unsized key type accepts.
pub(super) fn key_range<'a>(lo: &'a [u8], hi: &'a [u8]) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (Bound::Included(lo), Bound::Excluded(hi))
}

/// Key of a replication's id in `meta`.
pub(super) fn name_key(name: &str) -> Vec<u8> {
    [b"N".as_slice(), name.as_bytes()].concat()
}

/// Key of the next free replication id in `meta`.
pub(super) const NEXT_ID_KEY: &[u8] = b"I";

/// A replication id as `meta` stores it (under a name, and as the next id).
pub(super) fn encode_id(id: u32) -> [u8; 4] {
    id.to_be_bytes()
}

/// A stored id; `None` when the record is damaged.
pub(super) fn decode_id(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

/// Key of a replication's [`Meta`] in `meta`.
pub(super) fn meta_key(id: u32) -> [u8; 5] {
    let mut k = [b'R', 0, 0, 0, 0];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Key of a held lane's record in `meta`: `L[id: u32][lane: u32]`.
pub(super) fn lane_meta_key(id: u32, lane: u32) -> [u8; 9] {
    let mut k = [b'L', 0, 0, 0, 0, 0, 0, 0, 0];
    k[1..5].copy_from_slice(&id.to_be_bytes());
    k[5..].copy_from_slice(&lane.to_be_bytes());
    k
}

/// Bounds `[lo, hi)` of the lane records of replication `id` in `meta`.
pub(super) fn lane_meta_keys(id: u32) -> ([u8; 9], [u8; 9]) {
    (lane_meta_key(id, 0), lane_meta_key(id, u32::MAX))
}

/// Key of a boot's clock offset in `meta`: `B[boot id]`.
pub(super) fn boot_key(boot: &crate::clock::BootId) -> [u8; 17] {
    let mut k = [b'B'; 17];
    k[1..].copy_from_slice(boot);
    k
}

/// Bounds `[lo, hi)` of every boot record in `meta`.
pub(super) const BOOT_KEYS: (&[u8], &[u8]) = (b"B", b"C");

/// Key of a source checkpoint in `meta`.
pub(super) fn checkpoint_key(key: &str) -> Vec<u8> {
    [b"S".as_slice(), key.as_bytes()].concat()
}

/// Key of a downsampling window in `windows`:
/// `[id][window start, order-preserving][bucket length u16][bucket][series key]`.
pub(super) fn window_key(id: u32, start: i64, bucket: &str, series: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(14 + bucket.len() + series.len());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(&((start as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(&(bucket.len() as u16).to_be_bytes());
    k.extend_from_slice(bucket.as_bytes());
    k.extend_from_slice(series);
    k
}

/// A window key's start, bucket and series key.
pub(super) fn split_window_key(k: &[u8]) -> Option<(i64, &str, &[u8])> {
    let start = (u64::from_be_bytes(k.get(4..12)?.try_into().ok()?) ^ (1 << 63)) as i64;
    let blen = u16::from_be_bytes(k.get(12..14)?.try_into().ok()?) as usize;
    let bucket = std::str::from_utf8(k.get(14..14 + blen)?).ok()?;
    Some((start, bucket, &k[14 + blen..]))
}

/// Per-replication state stored in `meta`.
///
/// Encoded as little-endian `u64` fields in this order: version, head
/// sequence, head offset, next sequence, queued bytes, queued lines,
/// accepted lines, accepted bytes, delivered lines, delivered bytes,
/// dropped_full, expired, dropped_non_retryable, dead_lettered, rejected
/// lines, rejected bytes, dead-letter lines, dead-letter bytes, dead-letter
/// purged, filtered, late, downsampled, aggregate, next lane, lanes, held
/// by the clock. Fields are only ever added at the end; those missing from
/// an older record read as zero. The version is [`META_VERSION_CLOCK`]
/// while `clock_held > 0`, else [`META_VERSION_LANES`] while `lanes > 0`,
/// else [`META_VERSION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Meta {
    pub head: Pos,
    pub next_seq: u64,
    pub c: Counters,
    /// The number the next held lane gets (lanes start at 1; numbers are
    /// not reused while the agent runs, so a settlement for a lane that
    /// is gone cannot touch a newer one).
    pub next_lane: u64,
    /// Held lanes that exist now (each has a [`LaneRecord`]).
    pub lanes: u64,
    /// Entries of the main log the clock guard holds (entry version 3).
    pub clock_held: u64,
}

/// A held lane: the entries of one destination that the remote refused as
/// a whole (404 bucket or database not found, 403 on one bucket), moved out
/// of the main log in the transaction that recorded the hold. Stored in
/// `meta` under [`lane_meta_key`]; its entries are in `lanes` under
/// [`lane_key`]. Encoded as little-endian `u64` fields: head sequence, head
/// offset, next sequence, lines, bytes, since (ns), code; then the bucket
/// and the remote's message, each as a `u32` length and its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct LaneRecord {
    /// The local bucket (`db` or `db/rp`) whose lines the lane holds.
    pub bucket: String,
    pub head: Pos,
    pub next_seq: u64,
    /// Unsent lines and bytes in the lane (also counted in the
    /// replication's queued lines and bytes).
    pub lines: u64,
    pub bytes: u64,
    /// When the destination was first held (ns since the epoch).
    pub since_ns: u64,
    /// The remote's answer, as last heard.
    pub code: u16,
    pub message: String,
}

impl LaneRecord {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.bucket.len() + self.message.len());
        for f in [
            self.head.seq,
            self.head.off as u64,
            self.next_seq,
            self.lines,
            self.bytes,
            self.since_ns,
            self.code as u64,
        ] {
            out.extend_from_slice(&f.to_le_bytes());
        }
        for s in [&self.bucket, &self.message] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    /// `None` for a damaged record.
    pub(super) fn decode(bytes: &[u8]) -> Option<LaneRecord> {
        let f = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        let mut at = 56;
        let mut text = || -> Option<String> {
            let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
            let s = std::str::from_utf8(bytes.get(at + 4..at + 4 + len)?).ok()?;
            at += 4 + len;
            Some(s.to_string())
        };
        let bucket = text()?;
        let message = text()?;
        Some(LaneRecord {
            bucket,
            head: Pos {
                seq: f(0)?,
                off: f(1)? as u32,
            },
            next_seq: f(2)?,
            lines: f(3)?,
            bytes: f(4)?,
            since_ns: f(5)?,
            code: f(6)? as u16,
            message,
        })
    }
}

impl Meta {
    pub(super) fn encode(&self) -> Vec<u8> {
        let c = &self.c;
        let version = if self.clock_held > 0 {
            META_VERSION_CLOCK
        } else if self.lanes > 0 {
            META_VERSION_LANES
        } else {
            META_VERSION
        };
        let fields = [
            version,
            self.head.seq,
            self.head.off as u64,
            self.next_seq,
            c.queued_bytes,
            c.queued_lines,
            c.accepted_lines,
            c.accepted_bytes,
            c.delivered_lines,
            c.delivered_bytes,
            c.dropped_full_lines,
            c.expired_lines,
            c.dropped_non_retryable_lines,
            c.dead_lettered_lines,
            c.rejected_lines,
            c.rejected_bytes,
            c.dead_letter_lines,
            c.dead_letter_bytes,
            c.dead_letter_purged_lines,
            c.filtered_lines,
            c.late_lines,
            c.downsampled_lines,
            c.aggregate_lines,
            self.next_lane,
            self.lanes,
            self.clock_held,
        ];
        fields.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    /// `None` for a record of an unknown (newer) version, or a damaged one.
    pub(super) fn decode(bytes: &[u8]) -> Option<Meta> {
        if !bytes.chunks_exact(8).remainder().is_empty() || bytes.len() < 8 * 6 {
            return None;
        }
        let mut f = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()));
        if !(1..=META_VERSION_CLOCK).contains(&f.next()?) {
            return None;
        }
        // Fields added later read as zero from older metas.
        let mut next = || f.next().unwrap_or(0);
        let head = Pos {
            seq: next(),
            off: next() as u32,
        };
        let next_seq = next();
        let mut c = Counters {
            queued_bytes: next(),
            queued_lines: next(),
            ..Counters::default()
        };
        c.accepted_lines = next();
        c.accepted_bytes = next();
        c.delivered_lines = next();
        c.delivered_bytes = next();
        c.dropped_full_lines = next();
        c.expired_lines = next();
        c.dropped_non_retryable_lines = next();
        c.dead_lettered_lines = next();
        c.rejected_lines = next();
        c.rejected_bytes = next();
        c.dead_letter_lines = next();
        c.dead_letter_bytes = next();
        c.dead_letter_purged_lines = next();
        c.filtered_lines = next();
        c.late_lines = next();
        c.downsampled_lines = next();
        c.aggregate_lines = next();
        let next_lane = next();
        let lanes = next();
        let clock_held = next();
        Some(Meta {
            head,
            next_seq,
            c,
            next_lane,
            lanes,
            clock_held,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes themselves: a change here breaks every existing data dir.
    #[test]
    fn keys_are_the_bytes_on_disk() {
        assert_eq!(
            entry_key(0x0102_0304, 0x0506_0708_090a_0b0c),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
        assert_eq!(key_seq(&entry_key(7, 42)), 42);
        assert_eq!(dead_key(7, 3), entry_key(7, 3));
        assert_eq!(repl_keys(7), (entry_key(7, 0), entry_key(8, 0)));
        assert_eq!(name_key("cloud"), b"Ncloud");
        assert_eq!(NEXT_ID_KEY, b"I");
        assert_eq!(encode_id(0x0102_0304), [1, 2, 3, 4]);
        assert_eq!(decode_id(&[1, 2, 3, 4]), Some(0x0102_0304));
        assert_eq!(decode_id(&[1, 2, 3]), None);
        assert_eq!(meta_key(0x0102_0304), *b"R\x01\x02\x03\x04");
        assert_eq!(checkpoint_key("tail:/var/log/a"), b"Stail:/var/log/a");
        assert_eq!(
            boot_key(&[9; 16]),
            *b"B\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09"
        );
        assert!(BOOT_KEYS.0 <= &boot_key(&[0; 16])[..] && &boot_key(&[255; 16])[..] < BOOT_KEYS.1);
        assert_eq!(
            lane_key(0x0102_0304, 5, 6),
            [1, 2, 3, 4, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 6]
        );
        assert_eq!(lane_key_seq(&lane_key(1, 2, 42)), 42);
        assert_eq!(
            lane_meta_key(0x0102_0304, 5),
            *b"L\x01\x02\x03\x04\x00\x00\x00\x05"
        );
        assert_eq!(&*Log::Main(7).key(3), &entry_key(7, 3));
        assert_eq!(&*Log::Lane(7, 2).key(3), &lane_key(7, 2, 3));
        assert_eq!(LANES, "lanes");
        assert_eq!(
            window_key(1, -1, "db", b"cpu,host=a"),
            b"\x00\x00\x00\x01\x7f\xff\xff\xff\xff\xff\xff\xff\x00\x02dbcpu,host=a"
        );
        assert_eq!(
            split_window_key(&window_key(1, -5, "db", b"cpu")),
            Some((-5, "db", b"cpu".as_slice()))
        );
        assert!(window_key(1, -1, "", b"") < window_key(1, 0, "", b""));
        assert_eq!(
            (ENTRIES, META, DEAD, WINDOWS),
            ("entries", "meta", "dead", "windows")
        );
    }

    #[test]
    fn meta_fields_keep_their_places() {
        let m = Meta {
            head: Pos { seq: 3, off: 7 },
            next_seq: 9,
            c: Counters {
                queued_bytes: 11,
                queued_lines: 5,
                aggregate_lines: 13,
                ..Counters::default()
            },
            ..Meta::default()
        };
        let mut bytes = m.encode();
        let fields: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(fields.len(), 26);
        assert_eq!(&fields[..6], &[2, 3, 7, 9, 11, 5]);
        assert_eq!(fields[22], 13);
        assert_eq!(Meta::decode(&bytes), Some(m));
        // A record of the previous release (23 fields) reads with no lanes.
        assert_eq!(Meta::decode(&bytes[..23 * 8]), Some(m));
        bytes[..8].copy_from_slice(&1u64.to_le_bytes());
        assert_eq!(Meta::decode(&bytes), Some(m), "a version 1 meta is read");
        bytes[..8].copy_from_slice(&5u64.to_le_bytes());
        assert_eq!(Meta::decode(&bytes), None, "a newer meta is refused");
        // With a lane, the version says so: the previous release, which
        // reads versions 1 and 2 only, refuses the record.
        let held = Meta {
            next_lane: 2,
            lanes: 1,
            ..m
        };
        let bytes = held.encode();
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()), 3);
        assert_eq!(
            &bytes[23 * 8..],
            &[2u64.to_le_bytes(), 1u64.to_le_bytes(), 0u64.to_le_bytes()].concat()[..]
        );
        assert_eq!(Meta::decode(&bytes), Some(held));
        // A record of the release before the clock guard (25 fields).
        assert_eq!(Meta::decode(&bytes[..25 * 8]), Some(held));
        // With entries held by the clock, version 4, which releases before
        // the guard (reading up to 3) refuse.
        let clocked = Meta {
            clock_held: 2,
            ..held
        };
        let bytes = clocked.encode();
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()), 4);
        assert_eq!(&bytes[25 * 8..], &2u64.to_le_bytes());
        assert_eq!(Meta::decode(&bytes), Some(clocked));
    }

    #[test]
    fn lane_records_round_trip() {
        let r = LaneRecord {
            bucket: "db/rp".into(),
            head: Pos { seq: 4, off: 9 },
            next_seq: 7,
            lines: 12,
            bytes: 300,
            since_ns: 1_700_000_000_000_000_000,
            code: 404,
            message: "database not found: \"db\"".into(),
        };
        let bytes = r.encode();
        assert_eq!(&bytes[..8], &4u64.to_le_bytes());
        assert_eq!(&bytes[56..60], &5u32.to_le_bytes());
        assert_eq!(&bytes[60..65], b"db/rp");
        assert_eq!(LaneRecord::decode(&bytes), Some(r));
        assert_eq!(LaneRecord::decode(&bytes[..bytes.len() - 1]), None);
    }
}
