//! The TSM write-ahead log of InfluxDB 1.x and OSS 2.x, decoded back into line
//! protocol.
//!
//! A segment file (`_00001.wal`) is a sequence of entries
//! `[u8 type][u32 BE length][snappy block]`. Type 1 is a write, 2 a delete of
//! series keys, 3 a delete of a time range. A write's decompressed payload is
//! a sequence of `[u8 value type][u16 BE key length][key][u32 BE count]` and
//! `count` times `[i64 BE ns time][value]`, where the key is the escaped series
//! key, `#!~#`, and the field key (unescaped), and the value is a float64 (1),
//! int64 (2), bool (3, one byte), string (4, u32 length + bytes) or uint64 (5).
//!
//! A point with k fields is stored as k keys, so [`write_points`] regroups the
//! values of an entry by series and time, and [`push_line`] writes each point
//! as one line with its fields sorted by key. The order of points is a pure
//! function of the entry's bytes, so a reader may remember "the first n points
//! of this entry are queued" and resume exactly there.
//!
//! Pure: no I/O, no clock, no panics on any input, and no allocation sized by
//! a count read from the input (corrupt counts end in a bounds error).

use std::collections::BTreeMap;

/// Bytes of an entry header: type and length.
pub const HEADER_LEN: usize = 5;

/// Longest compressed entry accepted. InfluxDB's own entries are bounded by
/// its write body limit (25 MB by default) and compress well below it; a
/// larger length is a damaged header.
pub const MAX_ENTRY_LEN: u32 = 256 << 20;

/// Largest decompressed payload accepted: far above what InfluxDB writes,
/// low enough that a damaged length cannot exhaust a 32-bit device.
const MAX_DECODED_LEN: usize = 256 << 20;

/// A snappy copy element of at most 5 bytes yields at most 64 bytes, so a
/// real block never decodes to more than this many times its size.
const MAX_EXPANSION: usize = 32;

/// Separator between the series key and the field key.
const FIELD_SEPARATOR: &[u8] = b"#!~#";

pub const WRITE_ENTRY: u8 = 1;
pub const DELETE_ENTRY: u8 = 2;
pub const DELETE_RANGE_ENTRY: u8 = 3;

/// What starts at some offset of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next<'a> {
    /// Fewer bytes than a whole entry: not written yet (or cut short).
    Incomplete,
    /// A whole entry of `len` bytes (header included).
    Entry {
        kind: u8,
        block: &'a [u8],
        len: usize,
    },
    /// A header whose type or length cannot be an entry's: the segment is
    /// damaged from here on.
    Damaged { kind: u8, length: u32 },
}

/// Looks at the entry at the start of `buf`.
pub fn next_entry(buf: &[u8]) -> Next<'_> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Next::Incomplete;
    };
    let kind = header[0];
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if !(WRITE_ENTRY..=DELETE_RANGE_ENTRY).contains(&kind) || length > MAX_ENTRY_LEN {
        return Next::Damaged { kind, length };
    }
    let len = HEADER_LEN + length as usize;
    match buf.get(HEADER_LEN..len) {
        Some(block) => Next::Entry { kind, block, len },
        None => Next::Incomplete,
    }
}

/// The length an entry header announces, header included, when it is
/// plausible.
pub fn entry_len(header: &[u8; HEADER_LEN]) -> Option<usize> {
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    ((WRITE_ENTRY..=DELETE_RANGE_ENTRY).contains(&header[0]) && length <= MAX_ENTRY_LEN)
        .then_some(HEADER_LEN + length as usize)
}

/// Why an entry could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("snappy block is damaged: {0}")]
    Snappy(String),
    #[error("decompressed size {0} is implausible")]
    TooLarge(usize),
    #[error("write payload ends inside a value at byte {0}")]
    Truncated(usize),
    #[error("unknown value type {kind} at byte {at}")]
    ValueType { kind: u8, at: usize },
    #[error("key at byte {0} has no \"#!~#\" field separator")]
    NoField(usize),
}

/// Decompresses an entry's snappy block (raw block format, not framed).
pub fn decompress(block: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let len = snap::raw::decompress_len(block).map_err(|e| DecodeError::Snappy(e.to_string()))?;
    if len > MAX_DECODED_LEN || len > block.len().saturating_mul(MAX_EXPANSION) {
        return Err(DecodeError::TooLarge(len));
    }
    snap::raw::Decoder::new()
        .decompress_vec(block)
        .map_err(|e| DecodeError::Snappy(e.to_string()))
}

/// One field value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Float(f64),
    Integer(i64),
    Boolean(bool),
    String(&'a [u8]),
    Unsigned(u64),
}

/// A field key (unescaped) and its value.
pub type FieldValue<'a> = (&'a [u8], Value<'a>);

/// A point rebuilt from a write entry: an escaped series key, a time and its
/// fields (unescaped keys, sorted, unique).
#[derive(Debug, Clone, PartialEq)]
pub struct Point<'a> {
    pub series: &'a [u8],
    pub time: i64,
    pub fields: Vec<FieldValue<'a>>,
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or(DecodeError::Truncated(self.at))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Splits `series#!~#field` at the last separator (a tag value may contain
/// the separator; a field key containing it is ambiguous in InfluxDB too).
pub fn split_key(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = memchr::memmem::rfind(key, FIELD_SEPARATOR)?;
    Some((&key[..at], &key[at + FIELD_SEPARATOR.len()..]))
}

/// Decodes a write entry's decompressed payload into its points, ordered by
/// series key and then time. A field written twice for the same series and
/// time keeps its last value, as InfluxDB does.
pub fn write_points(data: &[u8]) -> Result<Vec<Point<'_>>, DecodeError> {
    let mut r = Reader { data, at: 0 };
    let mut grouped: BTreeMap<(&[u8], i64), Vec<FieldValue<'_>>> = BTreeMap::new();
    while r.at < data.len() {
        let kind_at = r.at;
        let kind = r.u8()?;
        if !(1..=5).contains(&kind) {
            return Err(DecodeError::ValueType { kind, at: kind_at });
        }
        let key_len = r.u16()? as usize;
        let key_at = r.at;
        let key = r.take(key_len)?;
        let (series, field) = split_key(key).ok_or(DecodeError::NoField(key_at))?;
        let count = r.u32()?;
        for _ in 0..count {
            let time = r.u64()? as i64;
            let value = match kind {
                1 => Value::Float(f64::from_bits(r.u64()?)),
                2 => Value::Integer(r.u64()? as i64),
                3 => Value::Boolean(r.u8()? != 0),
                4 => {
                    let n = r.u32()? as usize;
                    Value::String(r.take(n)?)
                }
                _ => Value::Unsigned(r.u64()?),
            };
            grouped
                .entry((series, time))
                .or_default()
                .push((field, value));
        }
    }
    Ok(grouped
        .into_iter()
        .map(|((series, time), mut fields)| {
            // Stable sort keeps the written order among equal keys; the last wins.
            fields.sort_by(|a, b| a.0.cmp(b.0));
            let mut unique: Vec<FieldValue<'_>> = Vec::with_capacity(fields.len());
            for f in fields {
                match unique.last_mut() {
                    Some(last) if last.0 == f.0 => *last = f,
                    _ => unique.push(f),
                }
            }
            Point {
                series,
                time,
                fields: unique,
            }
        })
        .collect())
}

/// Why a point cannot be written as a line this agent accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PointError {
    #[error("the series or a field key contains a newline")]
    NewlineInKey,
    #[error("a float value is NaN or infinite")]
    NotFinite,
    #[error("the series key is empty")]
    EmptySeries,
    #[error("the series key starts with '#' or a blank (a comment, or trimmed, as a line)")]
    SeriesStart,
    #[error("the point has no fields")]
    NoFields,
    #[error("as a line, the point would not read back as one point (an unescaped space in its series key?)")]
    NotOnePoint,
}

/// Appends `p` as one point of line protocol (ns timestamp, ending in '\n').
/// A string value may hold newlines: they stay raw, inside the quotes, as
/// InfluxDB's parsers and this agent's read them. On error nothing is
/// appended.
pub fn push_line(out: &mut Vec<u8>, p: &Point<'_>) -> Result<(), PointError> {
    if p.series.is_empty() {
        return Err(PointError::EmptySeries);
    }
    // Not written by line protocol, but other write paths can store such a
    // measurement; as a line it would vanish as a comment or change.
    if matches!(p.series[0], b'#' | b' ' | b'\t') {
        return Err(PointError::SeriesStart);
    }
    if p.fields.is_empty() {
        return Err(PointError::NoFields);
    }
    if p.series.contains(&b'\n') || p.fields.iter().any(|(k, _)| k.contains(&b'\n')) {
        return Err(PointError::NewlineInKey);
    }
    for (_, v) in &p.fields {
        match v {
            Value::Float(f) if !f.is_finite() => return Err(PointError::NotFinite),
            _ => {}
        }
    }
    let start = out.len();
    out.extend_from_slice(p.series);
    for (i, (key, value)) in p.fields.iter().enumerate() {
        out.push(if i == 0 { b' ' } else { b',' });
        for &b in *key {
            if matches!(b, b',' | b'=' | b' ') {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'=');
        push_value(out, value);
    }
    out.push(b' ');
    out.extend_from_slice(p.time.to_string().as_bytes());
    out.push(b'\n');
    // A series key as InfluxDB stores it has its spaces escaped; one that
    // does not (a damaged or hand-made WAL) could let a quoted value end the
    // point early, and the text after a newline be read as another point.
    if crate::lineproto::point_end(&out[start..]) != Some(out.len() - start - 1) {
        out.truncate(start);
        return Err(PointError::NotOnePoint);
    }
    Ok(())
}

fn push_value(out: &mut Vec<u8>, v: &Value<'_>) {
    use std::io::Write as _;
    match *v {
        Value::Float(f) => {
            // Both forms print the shortest digits that read back to the same
            // f64; the plain one is easier on the eye, the exponent one keeps
            // very large and very small numbers short.
            let a = f.abs();
            let _ = if a == 0.0 || (1e-5..1e16).contains(&a) {
                write!(out, "{f}")
            } else {
                write!(out, "{f:e}")
            };
        }
        Value::Integer(i) => {
            let _ = write!(out, "{i}i");
        }
        Value::Unsigned(u) => {
            let _ = write!(out, "{u}u");
        }
        Value::Boolean(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        Value::String(s) => {
            out.push(b'"');
            for &b in s {
                if matches!(b, b'"' | b'\\') {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'"');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lineproto::{self, Precision};
    use proptest::prelude::*;

    /// (time, value bytes) of one key.
    type Values = Vec<(i64, Vec<u8>)>;
    /// (value type, key, values).
    type Key<'a> = (u8, &'a [u8], Values);

    /// An encoder of the format, for tests.
    fn payload(keys: &[Key<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, key, values) in keys {
            out.push(*kind);
            out.extend_from_slice(&(key.len() as u16).to_be_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&(values.len() as u32).to_be_bytes());
            for (t, v) in values {
                out.extend_from_slice(&t.to_be_bytes());
                out.extend_from_slice(v);
            }
        }
        out
    }

    fn entry(kind: u8, data: &[u8]) -> Vec<u8> {
        let block = snap::raw::Encoder::new().compress_vec(data).unwrap();
        let mut out = vec![kind];
        out.extend_from_slice(&(block.len() as u32).to_be_bytes());
        out.extend_from_slice(&block);
        out
    }

    fn f(v: f64) -> Vec<u8> {
        v.to_bits().to_be_bytes().to_vec()
    }
    fn i(v: i64) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }
    fn s(v: &str) -> Vec<u8> {
        let mut out = (v.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(v.as_bytes());
        out
    }

    fn lines(data: &[u8]) -> String {
        let mut out = Vec::new();
        for p in write_points(data).unwrap() {
            push_line(&mut out, &p).unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn all_five_types_rebuild_one_line_per_point() {
        let data = payload(&[
            (
                1,
                b"cpu,host=a#!~#usage",
                vec![(10, f(0.5)), (20, f(-1.25))],
            ),
            (2, b"cpu,host=a#!~#n", vec![(10, i(-7))]),
            (3, b"cpu,host=a#!~#up", vec![(10, vec![1]), (20, vec![0])]),
            (4, b"cpu,host=a#!~#msg", vec![(20, s("say \"hi\" \\o/"))]),
            (
                5,
                b"cpu,host=a#!~#big",
                vec![(10, u64::MAX.to_be_bytes().to_vec())],
            ),
        ]);
        assert_eq!(
            lines(&data),
            "cpu,host=a big=18446744073709551615u,n=-7i,up=true,usage=0.5 10\n\
             cpu,host=a msg=\"say \\\"hi\\\" \\\\o/\",up=false,usage=-1.25 20\n"
        );
    }

    #[test]
    fn points_are_grouped_by_series_and_time_and_ordered() {
        let data = payload(&[
            (1, b"m,t=b#!~#x", vec![(2, f(1.0)), (1, f(2.0))]),
            (1, b"m,t=a#!~#x", vec![(5, f(3.0))]),
            (2, b"m,t=b#!~#y", vec![(1, i(4))]),
        ]);
        assert_eq!(lines(&data), "m,t=a x=3 5\nm,t=b x=2,y=4i 1\nm,t=b x=1 2\n");
    }

    #[test]
    fn a_field_written_twice_keeps_the_last_value() {
        let data = payload(&[(1, b"m#!~#x", vec![(1, f(1.0)), (1, f(2.0))])]);
        assert_eq!(lines(&data), "m x=2 1\n");
    }

    #[test]
    fn escapes_survive_the_round_trip() {
        // Series keys are stored escaped; field keys unescaped.
        let data = payload(&[
            (1, br"m\ 1\,a,t\ k=v\ 1\,\=x#!~#a b", vec![(1, f(1.0))]),
            (2, br"m\ 1\,a,t\ k=v\ 1\,\=x#!~#a,b", vec![(1, i(2))]),
            (3, br"m\ 1\,a,t\ k=v\ 1\,\=x#!~#a=b", vec![(1, vec![1])]),
            (
                4,
                br"m\ 1\,a,t\ k=v\ 1\,\=x#!~#a\\b",
                vec![(1, s(r#"s"q\z"#))],
            ),
        ]);
        let got = lines(&data);
        assert_eq!(
            got,
            "m\\ 1\\,a,t\\ k=v\\ 1\\,\\=x a\\ b=1,a\\,b=2i,a\\=b=true,a\\\\b=\"s\\\"q\\\\z\" 1\n"
        );
        // And the agent's own parser accepts it unchanged.
        let mut out = Vec::new();
        let summary = lineproto::normalize(got.as_bytes(), Precision::Nanoseconds, 0, &mut out);
        assert_eq!(summary.error_count, 0, "{summary:?}");
        assert_eq!(out, got.as_bytes());
    }

    #[test]
    fn the_field_is_split_at_the_last_separator() {
        let data = payload(&[(1, b"m,t=a#!~#b#!~#value", vec![(1, f(1.0))])]);
        assert_eq!(lines(&data), "m,t=a#!~#b value=1 1\n");
        assert_eq!(split_key(b"no separator"), None);
    }

    #[test]
    fn floats_print_exactly_and_briefly() {
        for (v, want) in [
            (0.1, "0.1"),
            (3.0, "3"),
            (-0.0, "-0"),
            (1e300, "1e300"),
            (5e-324, "5e-324"),
            (123456.789, "123456.789"),
            (1e16, "1e16"),
            (f64::MAX, "1.7976931348623157e308"),
        ] {
            let mut out = Vec::new();
            push_value(&mut out, &Value::Float(v));
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text, want);
            assert_eq!(text.parse::<f64>().unwrap().to_bits(), v.to_bits());
        }
    }

    #[test]
    fn a_string_holding_newlines_is_rebuilt_as_one_point() {
        let mut out = Vec::new();
        let s = b"failed:\ninjected,host=x value=42 1\n\"end\\";
        let p = Point {
            series: b"applog,app=web",
            time: 7,
            fields: vec![(b"msg", Value::String(s)), (b"x", Value::Float(1.0))],
        };
        push_line(&mut out, &p).unwrap();
        assert_eq!(
            out,
            b"applog,app=web msg=\"failed:\ninjected,host=x value=42 1\n\\\"end\\\\\",x=1 7\n"
        );
        let mut normalized = Vec::new();
        let summary = crate::lineproto::normalize(
            &out,
            crate::lineproto::Precision::Nanoseconds,
            0,
            &mut normalized,
        );
        assert_eq!((summary.lines, summary.error_count), (1, 0));
        assert_eq!(normalized, out);
        let line = crate::lineproto::parse_line(&out).unwrap();
        match line.fields().next() {
            Some((_, crate::lineproto::FieldValue::Str(v))) => {
                assert_eq!(&*crate::lineproto::string_unescaped(v), s)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn points_this_agent_cannot_carry_are_refused_whole() {
        let mut out = Vec::new();
        let p = Point {
            series: b"m",
            time: 1,
            fields: vec![(b"x", Value::Float(f64::NAN))],
        };
        assert_eq!(push_line(&mut out, &p), Err(PointError::NotFinite));
        let p = Point {
            series: b"#m",
            time: 1,
            fields: vec![(b"x", Value::Float(1.0))],
        };
        assert_eq!(push_line(&mut out, &p), Err(PointError::SeriesStart));
        let p = Point {
            series: b"m x=\"",
            time: 1,
            fields: vec![(b"s", Value::String(b"\nn f=1 1\n"))],
        };
        assert_eq!(push_line(&mut out, &p), Err(PointError::NotOnePoint));
        assert!(out.is_empty());
    }

    #[test]
    fn entries_are_framed_and_a_short_tail_is_incomplete() {
        let data = payload(&[(1, b"m#!~#x", vec![(1, f(1.0))])]);
        let e = entry(WRITE_ENTRY, &data);
        match next_entry(&e) {
            Next::Entry { kind, block, len } => {
                assert_eq!(kind, WRITE_ENTRY);
                assert_eq!(len, e.len());
                assert_eq!(decompress(block).unwrap(), data);
            }
            other => panic!("{other:?}"),
        }
        for cut in 0..e.len() {
            assert_eq!(next_entry(&e[..cut]), Next::Incomplete, "cut at {cut}");
        }
        assert!(matches!(
            next_entry(&[9, 0, 0, 0, 1, 0]),
            Next::Damaged { kind: 9, .. }
        ));
        assert!(matches!(
            next_entry(&[1, 0xff, 0xff, 0xff, 0xff]),
            Next::Damaged { .. }
        ));
        assert_eq!(entry_len(&[1, 0, 0, 0, 3]), Some(8));
        assert_eq!(entry_len(&[0, 0, 0, 0, 3]), None);
    }

    #[test]
    fn damaged_payloads_are_errors_not_panics() {
        let data = payload(&[(1, b"m#!~#x", vec![(1, f(1.0)), (2, f(2.0))])]);
        for cut in 1..data.len() {
            assert!(write_points(&data[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            write_points(&payload(&[(7, b"m#!~#x", vec![])])),
            Err(DecodeError::ValueType { kind: 7, at: 0 })
        ));
        assert!(matches!(
            write_points(&payload(&[(1, b"m-x", vec![])])),
            Err(DecodeError::NoField(3))
        ));
        assert!(decompress(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2]).is_err());
        // A length claim no block of this size can honour is refused before
        // anything is allocated.
        assert_eq!(
            decompress(&[0x80, 0x80, 0x80, 0x40, 0, 1, 2]),
            Err(DecodeError::TooLarge(128 << 20))
        );
        // Highly compressible data is within the bound.
        let zeros = vec![0u8; 1 << 20];
        let block = snap::raw::Encoder::new().compress_vec(&zeros).unwrap();
        assert_eq!(decompress(&block).unwrap(), zeros);
        // A count far beyond the data ends in a bounds error, not an allocation.
        let mut huge = payload(&[(1, b"m#!~#x", vec![])]);
        let n = huge.len();
        huge[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            write_points(&huge),
            Err(DecodeError::Truncated(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = next_entry(&bytes);
            let _ = decompress(&bytes);
            if let Ok(points) = write_points(&bytes) {
                let mut out = Vec::new();
                for p in &points {
                    let _ = push_line(&mut out, p);
                }
            }
        }

        #[test]
        fn rebuilt_lines_parse_and_keep_their_values(
            fields in proptest::collection::vec(("[a-z ,=]{1,6}", any::<i64>(), any::<f64>(), "[ -~]{0,12}"), 1..5),
            time in any::<i64>(),
        ) {
            let mut keys: Vec<(u8, Vec<u8>, Values)> = Vec::new();
            let mut want: Vec<(String, lineproto::FieldValue<'_>)> = Vec::new();
            for (n, (name, int, float, text)) in fields.iter().enumerate() {
                let field = format!("{name}{n}");
                let base = format!(r"m\ x,tag\,k=v\=1#!~#{field}");
                keys.push((2, format!("{base}i").into_bytes(), vec![(time, i(*int))]));
                want.push((format!("{field}i"), lineproto::FieldValue::Int(*int)));
                if float.is_finite() {
                    keys.push((1, format!("{base}f").into_bytes(), vec![(time, f(*float))]));
                    want.push((format!("{field}f"), lineproto::FieldValue::Float(*float)));
                }
                keys.push((4, format!("{base}s").into_bytes(), vec![(time, s(text))]));
                want.push((format!("{field}s"), lineproto::FieldValue::Str(text.as_bytes())));
            }
            want.sort_by(|a, b| a.0.cmp(&b.0));
            let borrowed: Vec<Key<'_>> =
                keys.iter().map(|(k, key, v)| (*k, key.as_slice(), v.clone())).collect();
            let data = payload(&borrowed);
            let points = write_points(&data).unwrap();
            prop_assert_eq!(points.len(), 1);
            let mut line = Vec::new();
            push_line(&mut line, &points[0]).unwrap();
            let mut out = Vec::new();
            let summary = lineproto::normalize(&line, Precision::Nanoseconds, 0, &mut out);
            if (lineproto::MIN_TIMESTAMP_NS..=lineproto::MAX_TIMESTAMP_NS).contains(&time) {
                prop_assert_eq!(summary.error_count, 0, "{}", String::from_utf8_lossy(&line));
                let parsed = lineproto::parse_line(&out[..out.len() - 1]).unwrap();
                prop_assert_eq!(parsed.timestamp, Some(time));
                let got: Vec<(String, lineproto::FieldValue<'_>)> = parsed
                    .fields()
                    .map(|(k, v)| (String::from_utf8(lineproto::tag_unescaped(k).into_owned()).unwrap(), v))
                    .collect();
                prop_assert_eq!(got.len(), want.len());
                for ((gk, gv), (wk, wv)) in got.iter().zip(&want) {
                    prop_assert_eq!(gk, wk);
                    match (gv, wv) {
                        (lineproto::FieldValue::Float(a), lineproto::FieldValue::Float(b)) => {
                            prop_assert_eq!(a.to_bits(), b.to_bits())
                        }
                        (lineproto::FieldValue::Str(a), lineproto::FieldValue::Str(b)) => {
                            let unescaped = lineproto::string_unescaped(a);
                            prop_assert_eq!(unescaped.as_ref(), *b)
                        }
                        (a, b) => prop_assert_eq!(a, b),
                    }
                }
            }
        }
    }
}
