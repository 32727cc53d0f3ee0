//! InfluxDB line-protocol validation and normalisation for the ingest path.
//!
//! Every write body passes through [`normalize`] before anything is queued: each line is
//! checked as fully as InfluxDB's own parser (`models/points.go`) checks it (escaping, tag
//! and field syntax, number ranges, integer and unsigned suffixes, string quoting,
//! booleans, timestamps), and each valid line is appended to the output in the one form the
//! queue holds: the line up to the end of its field section, a single space, the timestamp
//! in nanoseconds, `\n`. Lines without a timestamp get the caller's receive time, so every
//! queued line is replay-safe (InfluxDB keeps one point per series, field and timestamp).
//!
//! The module is pure: no I/O, no clock, no global state, and no panics on any input. It sits
//! on the hot path, so valid lines are never allocated for: lines are split with `memchr`
//! (a line that scans as a point ends there; only a rejected line holding a `"` is walked
//! again to find where its point ends, and [`point_end`] needs one `memchr2` for a line
//! without a quote),
//! sections are scanned with byte loops over a class table, numbers are range-checked
//! without being converted unless they could be out of range, and a line that is already
//! canonical (nanosecond timestamp, no surrounding whitespace) is copied with one
//! `extend_from_slice`.
//!
//! Grammar, as InfluxDB 1.x/2.x parse it:
//!
//! ```text
//! measurement[,tag_key=tag_value...] field_key=field_value[,field_key=field_value...] [timestamp]
//! ```
//!
//! * A `\n` ends a point, except inside a quoted string field value: there it is part of the
//!   value, as InfluxDB's own parsers (1.x to 3.x) read it and as its official clients send
//!   it. [`point_end`] is the one place that decides where a point ends; everything that cuts
//!   line protocol (this module, the tail source, the queue, batching, split retries) uses
//!   it, so a string is never cut and the text after its newline is never read as a point.
//!   A string left open takes in the rest of the body (InfluxDB does the same), so one stray
//!   quote makes the rest of a request one invalid point, reported at the line it starts
//!   on. Errors name a point by the physical line it starts on; columns count bytes from the
//!   point's start. A trailing `\r` and leading or trailing spaces and tabs are ignored.
//!   Blank lines and lines whose first non-blank byte is `#` are skipped; a comment ends at
//!   its newline whatever quotes it holds.
//! * Sections are separated by an unescaped space followed by any run of spaces and tabs.
//! * Measurement, tag keys and tag values: a byte that follows a backslash is escaped, so
//!   `\,` `\ ` (and in tags `\=`) do not end the token. As in InfluxDB, this is decided by the
//!   previous byte alone: in `a\\,b` the comma is escaped too, and a key or value cannot end
//!   with a backslash. Escapes are only removed for `\,` and `\ ` (measurement) and `\,`
//!   `\=` `\ ` (tags and field keys); any other backslash is a literal byte.
//! * Field section: a backslash and the byte after it form a pair (`\\` is one escaped
//!   backslash), exactly as InfluxDB's field scanner does. Values are floats (`1`, `-1.5`,
//!   `1.`, `.5`, `1e10`; no `+`, NaN or infinity, and finite), integers (`-12i`, i64 range),
//!   unsigned integers (`12u`, u64 range), strings (`"..."` with `\"` and `\\` escapes) and
//!   booleans (`t T true True TRUE f F false False FALSE`).
//! * Timestamp: an optional decimal integer, possibly negative, in the request's precision.
//!   Converted to nanoseconds it must lie within InfluxDB's range
//!   [`MIN_TIMESTAMP_NS`]`..=`[`MAX_TIMESTAMP_NS`]. Nothing may follow it.
//! * Tag keys must be unique within a line (tags need not be sorted).

use std::borrow::Cow;
use std::fmt;

use memchr::{memchr, memchr2, memchr3};

/// How many [`LineError`]s a [`Summary`] keeps; the rest are only counted.
pub const MAX_REPORTED_ERRORS: usize = 10;

/// Earliest timestamp InfluxDB accepts, in nanoseconds (`i64::MIN` and `i64::MIN + 1` are
/// reserved by its storage engine).
pub const MIN_TIMESTAMP_NS: i64 = i64::MIN + 2;

/// Latest timestamp InfluxDB accepts, in nanoseconds (`i64::MAX` is reserved).
pub const MAX_TIMESTAMP_NS: i64 = i64::MAX - 1;

/// Bytes of a bad line quoted back in a [`LineError`].
const EXCERPT_BYTES: usize = 64;

/// The unit of the timestamps in a write request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

impl Precision {
    /// v2 API `precision=`: "ns" | "us" | "ms" | "s"; empty/absent handled by caller (default ns).
    pub fn from_v2(s: &str) -> Option<Precision> {
        match s {
            "ns" => Some(Precision::Nanoseconds),
            "us" => Some(Precision::Microseconds),
            "ms" => Some(Precision::Milliseconds),
            "s" => Some(Precision::Seconds),
            _ => None,
        }
    }

    /// v1 API `precision=`: "n" | "ns" | "u" | "us" | "ms" | "s" | "m" | "h".
    pub fn from_v1(s: &str) -> Option<Precision> {
        match s {
            "n" | "ns" => Some(Precision::Nanoseconds),
            "u" | "us" => Some(Precision::Microseconds),
            "ms" => Some(Precision::Milliseconds),
            "s" => Some(Precision::Seconds),
            "m" => Some(Precision::Minutes),
            "h" => Some(Precision::Hours),
            _ => None,
        }
    }

    /// Nanoseconds per unit.
    pub fn multiplier(self) -> i64 {
        match self {
            Precision::Nanoseconds => 1,
            Precision::Microseconds => 1_000,
            Precision::Milliseconds => 1_000_000,
            Precision::Seconds => 1_000_000_000,
            Precision::Minutes => 60_000_000_000,
            Precision::Hours => 3_600_000_000_000,
        }
    }

    /// Converts a timestamp written in this precision to nanoseconds; `None` when the result
    /// overflows or falls outside [`MIN_TIMESTAMP_NS`]`..=`[`MAX_TIMESTAMP_NS`].
    pub fn to_nanos(self, ts: i64) -> Option<i64> {
        ts.checked_mul(self.multiplier())
            .filter(|ns| (MIN_TIMESTAMP_NS..=MAX_TIMESTAMP_NS).contains(ns))
    }
}

/// Why a line was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseErrorKind {
    /// The line starts with a comma, or is blank (only from [`parse_line`]).
    MissingMeasurement,
    /// The line is a comment (only from [`parse_line`]; [`normalize`] skips comments).
    Comment,
    /// The line ends before a field section.
    MissingFields,
    /// A tag has an empty key.
    MissingTagKey,
    /// A tag has an empty value.
    MissingTagValue,
    /// A tag has no `=`, or its value holds an unescaped `=`.
    InvalidTagFormat,
    /// Two tags have the same key.
    DuplicateTagKey,
    /// A field has an empty key.
    MissingFieldKey,
    /// A field has an empty value.
    MissingFieldValue,
    /// A field has no `=`.
    InvalidFieldFormat,
    /// A numeric field value is malformed (including NaN and infinity).
    InvalidNumber,
    /// An `i` value outside the i64 range.
    IntegerOutOfRange,
    /// A `u` value outside the u64 range.
    UnsignedOutOfRange,
    /// A float value too large for f64.
    FloatOutOfRange,
    /// A value that is neither a number, a string nor a boolean spelling.
    InvalidBoolean,
    /// A string value without its closing quote before the end of the body (a string may
    /// hold newlines, so an unclosed one takes in the rest).
    UnterminatedString,
    /// A string value's closing quote is followed by something other than `,` or a space,
    /// usually an inner quote that should have been escaped.
    UnescapedQuote,
    /// The timestamp is not a decimal integer.
    InvalidTimestamp,
    /// The timestamp, in nanoseconds, is outside InfluxDB's range.
    TimestampOutOfRange,
    /// Something follows the timestamp.
    TrailingData,
    /// The line is not valid UTF-8 (InfluxDB requires it; `column` is the first bad byte).
    InvalidUtf8,
    /// A newline outside a string field value within a point (only from [`normalize`]).
    NewlineOutsideString,
    /// An unsigned integer (`123u`) in a write that only InfluxDB 1.x remotes take:
    /// InfluxDB 1.x has no unsigned type and would refuse the point later, unseen by the
    /// writer.
    UnsignedForV1,
}

impl ParseErrorKind {
    /// Short lower-case reason, worded like InfluxDB's.
    pub fn as_str(self) -> &'static str {
        use ParseErrorKind::*;
        match self {
            MissingMeasurement => "missing measurement",
            Comment => "line is a comment",
            MissingFields => "missing fields",
            MissingTagKey => "missing tag key",
            MissingTagValue => "missing tag value",
            InvalidTagFormat => "invalid tag format",
            DuplicateTagKey => "duplicate tag key",
            MissingFieldKey => "missing field key",
            MissingFieldValue => "missing field value",
            InvalidFieldFormat => "invalid field format",
            InvalidNumber => "invalid number",
            IntegerOutOfRange => "integer out of range",
            UnsignedOutOfRange => "unsigned integer out of range",
            FloatOutOfRange => "float out of range",
            InvalidBoolean => "invalid boolean",
            UnterminatedString => "unterminated string",
            UnescapedQuote => "unescaped quote in string field value",
            InvalidTimestamp => "invalid timestamp",
            TimestampOutOfRange => "timestamp out of range",
            TrailingData => "unexpected data after timestamp",
            InvalidUtf8 => "invalid UTF-8",
            NewlineOutsideString => "newline outside a string field value",
            UnsignedForV1 => {
                "unsigned integer: this bucket is replicated only to InfluxDB 1.x, which has no \
                 unsigned type (write the value with i)"
            }
        }
    }
}

impl fmt::Display for ParseErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected line: the reason and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub kind: ParseErrorKind,
    /// 1-based byte offset within the point (from the start of the line it starts on)
    /// where it went wrong (one past the end when the point ended too early).
    pub column: usize,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (column {})", self.kind, self.column)
    }
}

impl std::error::Error for ParseError {}

/// A rejected line of a body, as reported back to the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based physical line of the body on which the point starts (blank and comment
    /// lines count, and so do the newlines inside string values before it).
    pub line: usize,
    pub error: ParseError,
    /// The first ~64 bytes of the bad line, lossy UTF-8, control characters replaced.
    pub excerpt: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {}: \"{}\"",
            self.line, self.error, self.excerpt
        )
    }
}

impl std::error::Error for LineError {}

/// One parsed line; slices borrow the input and are still escaped as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// Escaped measurement.
    pub measurement: &'a [u8],
    /// Raw tag section without the leading comma, possibly empty.
    pub tags: &'a [u8],
    /// Raw field section.
    pub fields: &'a [u8],
    /// As written (in the request's precision).
    pub timestamp: Option<i64>,
    /// The line up to and including the field section (everything before the timestamp),
    /// trimmed.
    pub key_and_fields: &'a [u8],
}

impl<'a> Line<'a> {
    /// The tags in line order, as escaped `(key, value)` slices.
    pub fn tags(&self) -> TagIter<'a> {
        TagIter {
            tags: self.tags,
            pos: 0,
        }
    }

    /// The fields in line order, as `(escaped key, value)`. On a `Line` that did not come
    /// from [`parse_line`] iteration stops at the first malformed field.
    pub fn fields(&self) -> FieldIter<'a> {
        FieldIter {
            fields: self.fields,
            pos: 0,
        }
    }
}

/// A typed field value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    Float(f64),
    Int(i64),
    UInt(u64),
    /// Raw, still escaped, without quotes; see [`string_unescaped`].
    Str(&'a [u8]),
    Bool(bool),
}

/// Iterator over a line's tags, from [`Line::tags`].
#[derive(Debug, Clone)]
pub struct TagIter<'a> {
    tags: &'a [u8],
    pos: usize,
}

impl<'a> TagIter<'a> {
    /// Offsets of the next tag's key and value within the tag section.
    fn next_span(&mut self) -> Option<[usize; 4]> {
        let t = self.tags;
        if self.pos >= t.len() {
            return None;
        }
        let key_start = self.pos;
        let key_end = scan_key(t, key_start, C_EQ | C_COMMA);
        let value_start = (key_end + 1).min(t.len());
        let value_end = scan_key(t, value_start, C_COMMA);
        self.pos = value_end + 1;
        Some([key_start, key_end, value_start, value_end])
    }
}

impl<'a> Iterator for TagIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let [ks, ke, vs, ve] = self.next_span()?;
        Some((&self.tags[ks..ke], &self.tags[vs..ve]))
    }
}

/// Iterator over a line's fields, from [`Line::fields`].
#[derive(Debug, Clone)]
pub struct FieldIter<'a> {
    fields: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for FieldIter<'a> {
    type Item = (&'a [u8], FieldValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let f = self.fields;
        if self.pos >= f.len() {
            return None;
        }
        let key_start = self.pos;
        let key_end = scan_pairwise(f, key_start, C_EQ | C_COMMA | C_SPACE);
        let decoded = if f.get(key_end) == Some(&b'=') {
            decode_value(f, key_end + 1)
        } else {
            None
        };
        match decoded {
            Some((value, end)) => {
                self.pos = end + 1;
                Some((&f[key_start..key_end], value))
            }
            None => {
                self.pos = f.len();
                None
            }
        }
    }
}

/// Decodes the field value starting at `start`; returns it and the index just past it.
fn decode_value(f: &[u8], start: usize) -> Option<(FieldValue<'_>, usize)> {
    if f.get(start) == Some(&b'"') {
        let close = closing_quote(f, start + 1)?;
        return Some((FieldValue::Str(&f[start + 1..close]), close + 1));
    }
    let end = f[start..]
        .iter()
        .position(|&c| is_sep(c))
        .map_or(f.len(), |k| start + k);
    let token = &f[start..end];
    let value = match token.split_last()? {
        (b'i', digits) => FieldValue::Int(ascii_str(digits)?.parse().ok()?),
        (b'u', digits) => FieldValue::UInt(ascii_str(digits)?.parse().ok()?),
        _ => match parse_bool(token) {
            Some(b) => FieldValue::Bool(b),
            None => FieldValue::Float(parse_f64(token).filter(|v| v.is_finite())?),
        },
    };
    Some((value, end))
}

/// Index of the quote that closes a string whose content starts at `i` (a backslash and the
/// byte after it are a pair), or `None` when the string is unterminated.
fn closing_quote(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let k = memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i + k] == b'"' {
            return Some(i + k);
        }
        i += k + 2;
    }
}

fn ascii_str(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

fn parse_f64(b: &[u8]) -> Option<f64> {
    ascii_str(b)?.parse().ok()
}

fn parse_bool(b: &[u8]) -> Option<bool> {
    match b {
        b"t" | b"T" | b"true" | b"True" | b"TRUE" => Some(true),
        b"f" | b"F" | b"false" | b"False" | b"FALSE" => Some(false),
        _ => None,
    }
}

/// Unsigned decimal value of `digits` (ASCII digits only), `None` on overflow.
fn parse_u64(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Removes the escapes InfluxDB removes from a measurement name: `\,` and `\ `. Any other
/// backslash (including `\\`) is kept, as InfluxDB keeps it.
pub fn measurement_unescaped(m: &[u8]) -> Cow<'_, [u8]> {
    unescape(m, |c| c == b',' || c == b' ')
}

/// Removes the escapes InfluxDB removes from tag keys, tag values and field keys: `\,`,
/// `\=` and `\ `.
pub fn tag_unescaped(t: &[u8]) -> Cow<'_, [u8]> {
    unescape(t, |c| c == b',' || c == b'=' || c == b' ')
}

/// Removes the escapes of a string field value ([`FieldValue::Str`]): `\"` and `\\`.
pub fn string_unescaped(s: &[u8]) -> Cow<'_, [u8]> {
    unescape(s, |c| c == b'"' || c == b'\\')
}

/// Single left-to-right pass: `\` followed by an escapable byte becomes that byte.
fn unescape(b: &[u8], escapable: impl Fn(u8) -> bool) -> Cow<'_, [u8]> {
    if memchr(b'\\', b).is_none() {
        return Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && escapable(b[i + 1]) {
            out.push(b[i + 1]);
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Cow::Owned(out)
}

// Byte classes for the scanners.
const C_COMMA: u8 = 1;
const C_SPACE: u8 = 2;
const C_EQ: u8 = 4;
const C_BACKSLASH: u8 = 8;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b',' as usize] = C_COMMA;
    t[b' ' as usize] = C_SPACE;
    t[b'=' as usize] = C_EQ;
    t[b'\\' as usize] = C_BACKSLASH;
    t
};

/// Key-section scanner (measurement, tag keys and values): index of the first byte at or
/// after `i` in class `stop` that does not follow a backslash, or `b.len()`.
#[inline]
fn scan_key(b: &[u8], mut i: usize, stop: u8) -> usize {
    let n = b.len();
    while i < n {
        let class = CLASS[b[i] as usize];
        if class & (stop | C_BACKSLASH) == 0 {
            i += 1;
        } else if class & C_BACKSLASH != 0 {
            // InfluxDB decides by the previous byte alone: every byte of a run of
            // backslashes, and the byte after the run, is escaped.
            i += 1;
            while i < n && b[i] == b'\\' {
                i += 1;
            }
            i += 1;
        } else {
            return i;
        }
    }
    n
}

/// Field-section scanner: like [`scan_key`] but a backslash and the byte after it form a
/// pair, as in InfluxDB's field scanner.
#[inline]
fn scan_pairwise(b: &[u8], mut i: usize, stop: u8) -> usize {
    let n = b.len();
    while i < n {
        let class = CLASS[b[i] as usize];
        if class & (stop | C_BACKSLASH) == 0 {
            i += 1;
        } else if class & C_BACKSLASH != 0 {
            i += 2;
        } else {
            return i;
        }
    }
    n
}

#[inline]
fn is_sep(c: u8) -> bool {
    c == b',' || c == b' '
}

#[inline]
fn is_blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

/// An error at 0-based position `pos` of a line whose content ends at `end`.
#[cold]
fn error(kind: ParseErrorKind, pos: usize, end: usize) -> ParseError {
    ParseError {
        kind,
        column: pos.min(end) + 1,
    }
}

/// What one raw line (without its `\n`) holds.
enum Scanned<'a> {
    Blank,
    Comment(usize),
    Point(Parsed<'a>),
}

/// A valid line plus the offsets [`normalize`] needs.
struct Parsed<'a> {
    line: Line<'a>,
    /// Offset of the first non-blank byte.
    start: usize,
    /// Offset of the end of the field section.
    fields_end: usize,
    /// Offset of the timestamp (`end` when there is none).
    ts_start: usize,
    /// Offset just past the last non-blank byte.
    end: usize,
}

fn scan_line(raw: &[u8]) -> Result<Scanned<'_>, ParseError> {
    use ParseErrorKind::*;

    let mut end = raw.len();
    while end > 0 && matches!(raw[end - 1], b' ' | b'\t' | b'\r' | b'\n') {
        end -= 1;
    }
    let b = &raw[..end];
    let mut i = 0;
    while i < end && is_blank(b[i]) {
        i += 1;
    }
    if i == end {
        return Ok(Scanned::Blank);
    }
    let start = i;
    match b[start] {
        b'#' => return Ok(Scanned::Comment(start)),
        b',' => return Err(error(MissingMeasurement, start, end)),
        _ => {}
    }
    // InfluxDB requires UTF-8: 3.x and Cloud parse line protocol as text,
    // 1.x and 2.x drop keys with invalid unicode. Refused here, by line,
    // rather than dead-lettered after a round trip to the remote.
    if let Err(e) = std::str::from_utf8(&b[start..]) {
        return Err(error(InvalidUtf8, start + e.valid_up_to(), end));
    }

    // Measurement: the first byte is neither ',' nor blank, so it is never empty.
    i = scan_key(b, start, C_COMMA | C_SPACE);
    if i >= end {
        return Err(error(MissingFields, end, end));
    }
    let measurement = &b[start..i];

    // Tags.
    let mut tags = &b[i..i];
    if b[i] == b',' {
        let tags_start = i + 1;
        let mut count = 0usize;
        let mut sorted = true;
        let mut prev: &[u8] = &[];
        loop {
            i += 1;
            let key_start = i;
            i = scan_key(b, i, C_COMMA | C_SPACE | C_EQ);
            if i == key_start {
                return Err(error(MissingTagKey, i, end));
            }
            if i >= end || b[i] != b'=' {
                return Err(error(InvalidTagFormat, i, end));
            }
            let key = &b[key_start..i];
            i += 1;
            let value_start = i;
            i = scan_key(b, i, C_COMMA | C_SPACE | C_EQ);
            if i < end && b[i] == b'=' {
                return Err(error(InvalidTagFormat, i, end));
            }
            if i == value_start {
                return Err(error(MissingTagValue, i, end));
            }
            if count > 0 {
                match key.cmp(prev) {
                    std::cmp::Ordering::Equal => {
                        return Err(error(DuplicateTagKey, key_start, end));
                    }
                    std::cmp::Ordering::Less => sorted = false,
                    std::cmp::Ordering::Greater => {}
                }
            }
            prev = key;
            count += 1;
            if i >= end {
                return Err(error(MissingFields, end, end));
            }
            if b[i] == b' ' {
                break;
            }
        }
        tags = &b[tags_start..i];
        if !sorted {
            if let Some(offset) = first_duplicate_tag(tags, count) {
                return Err(error(DuplicateTagKey, tags_start + offset, end));
            }
        }
    }

    // Fields. `b[i]` is a space, and `b` does not end with a blank, so a field key follows.
    while is_blank(b[i]) {
        i += 1;
    }
    let fields_start = i;
    loop {
        let key_start = i;
        i = scan_pairwise(b, i, C_COMMA | C_SPACE | C_EQ);
        if i == key_start {
            return Err(error(MissingFieldKey, i, end));
        }
        if i >= end || b[i] != b'=' {
            return Err(error(InvalidFieldFormat, i, end));
        }
        i = scan_value(b, i + 1)?;
        if i >= end || b[i] == b' ' {
            break;
        }
        i += 1;
    }
    let fields_end = i;

    // Timestamp.
    let mut timestamp = None;
    let mut ts_start = end;
    if i < end {
        while is_blank(b[i]) {
            i += 1;
        }
        ts_start = i;
        let negative = b[i] == b'-';
        if negative {
            i += 1;
        }
        let digits_start = i;
        while i < end && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == digits_start {
            return Err(error(InvalidTimestamp, ts_start, end));
        }
        if i < end && !is_blank(b[i]) {
            return Err(error(InvalidTimestamp, i, end));
        }
        let limit = if negative {
            1u64 << 63
        } else {
            i64::MAX as u64
        };
        match parse_u64(&b[digits_start..i]) {
            Some(v) if v <= limit => {
                timestamp = Some(if negative {
                    0i64.wrapping_sub_unsigned(v)
                } else {
                    v as i64
                });
            }
            _ => return Err(error(TimestampOutOfRange, ts_start, end)),
        }
        while i < end && is_blank(b[i]) {
            i += 1;
        }
        if i < end {
            return Err(error(TrailingData, i, end));
        }
    }

    Ok(Scanned::Point(Parsed {
        line: Line {
            measurement,
            tags,
            fields: &b[fields_start..fields_end],
            timestamp,
            key_and_fields: &b[start..fields_end],
        },
        start,
        fields_end,
        ts_start,
        end,
    }))
}

/// Offset within `tags` of the first key (in line order) that repeats an earlier one.
/// Sorting the key spans is O(n log n), so a line with thousands of tags cannot make this
/// quadratic; up to 32 tags need no allocation.
#[cold]
fn first_duplicate_tag(tags: &[u8], count: usize) -> Option<usize> {
    let mut small = [(0usize, 0usize); 32];
    let mut large: Vec<(usize, usize)>;
    let spans: &mut [(usize, usize)] = if count <= small.len() {
        &mut small[..count]
    } else {
        large = vec![(0, 0); count];
        &mut large
    };
    let mut iter = TagIter { tags, pos: 0 };
    for slot in spans.iter_mut() {
        let [ks, ke, _, _] = iter.next_span()?;
        *slot = (ks, ke);
    }
    spans.sort_unstable_by(|a, b| tags[a.0..a.1].cmp(&tags[b.0..b.1]).then(a.0.cmp(&b.0)));
    spans
        .windows(2)
        .filter(|w| tags[w[0].0..w[0].1] == tags[w[1].0..w[1].1])
        .map(|w| w[1].0)
        .min()
}

/// Validates the field value starting at `i` (just after the `=`) of the trimmed line `b`;
/// returns the index just past it, which is the end of `b`, a comma or a space.
#[inline]
fn scan_value(b: &[u8], i: usize) -> Result<usize, ParseError> {
    let end = b.len();
    if i >= end || is_sep(b[i]) {
        return Err(error(ParseErrorKind::MissingFieldValue, i, end));
    }
    match b[i] {
        b'0'..=b'9' | b'-' | b'.' | b'+' | b'n' | b'N' | b'i' | b'I' => scan_number(b, i),
        b'"' => scan_string(b, i),
        _ => scan_bool(b, i),
    }
}

fn scan_string(b: &[u8], quote: usize) -> Result<usize, ParseError> {
    let end = b.len();
    let Some(close) = closing_quote(b, quote + 1) else {
        return Err(error(ParseErrorKind::UnterminatedString, quote, end));
    };
    let after = close + 1;
    if after < end && !is_sep(b[after]) {
        return Err(error(ParseErrorKind::UnescapedQuote, close, end));
    }
    Ok(after)
}

fn scan_bool(b: &[u8], start: usize) -> Result<usize, ParseError> {
    let end = b[start..]
        .iter()
        .position(|&c| is_sep(c))
        .map_or(b.len(), |k| start + k);
    match parse_bool(&b[start..end]) {
        Some(_) => Ok(end),
        None => Err(error(ParseErrorKind::InvalidBoolean, start, b.len())),
    }
}

fn scan_number(b: &[u8], start: usize) -> Result<usize, ParseError> {
    use ParseErrorKind::*;
    let end = b.len();
    let fail = |kind, at| Err(error(kind, at, end));

    let mut j = start;
    let negative = b[j] == b'-';
    if negative {
        j += 1;
    }
    let int_start = j;
    while j < end && b[j].is_ascii_digit() {
        j += 1;
    }
    let int_digits = j - int_start;

    if j < end && (b[j] == b'i' || b[j] == b'u') {
        let unsigned = b[j] == b'u';
        if int_digits == 0 || (unsigned && negative) {
            return fail(InvalidNumber, start);
        }
        if j + 1 < end && !is_sep(b[j + 1]) {
            return fail(InvalidNumber, j + 1);
        }
        // Fewer digits than the type's maximum cannot overflow; only longer ones are parsed.
        let digits = &b[int_start..j];
        if unsigned {
            if int_digits >= 20 && parse_u64(digits).is_none() {
                return fail(UnsignedOutOfRange, start);
            }
        } else if int_digits >= 19 {
            let limit = if negative {
                1u64 << 63
            } else {
                i64::MAX as u64
            };
            if parse_u64(digits).is_none_or(|v| v > limit) {
                return fail(IntegerOutOfRange, start);
            }
        }
        return Ok(j + 1);
    }

    let mut mantissa_digits = int_digits;
    if j < end && b[j] == b'.' {
        j += 1;
        let frac_start = j;
        while j < end && b[j].is_ascii_digit() {
            j += 1;
        }
        mantissa_digits += j - frac_start;
    }
    if mantissa_digits == 0 {
        return fail(InvalidNumber, start);
    }
    let mut exponent = false;
    if j < end && (b[j] == b'e' || b[j] == b'E') {
        j += 1;
        if j < end && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        let exp_start = j;
        while j < end && b[j].is_ascii_digit() {
            j += 1;
        }
        if j == exp_start {
            return fail(InvalidNumber, j);
        }
        exponent = true;
    }
    if j < end && !is_sep(b[j]) {
        return fail(InvalidNumber, j);
    }
    // Without an exponent, fewer than 309 integer digits cannot exceed f64::MAX.
    if (exponent || int_digits > 300) && !parse_f64(&b[start..j]).is_some_and(f64::is_finite) {
        return fail(FloatOutOfRange, start);
    }
    Ok(j)
}

/// Parses one line (a trailing `\n` or `\r\n` and surrounding blanks are ignored).
/// Blank lines give [`ParseErrorKind::MissingMeasurement`], comment lines
/// [`ParseErrorKind::Comment`].
pub fn parse_line(line: &[u8]) -> Result<Line<'_>, ParseError> {
    match scan_line(line)? {
        Scanned::Point(p) => Ok(p.line),
        Scanned::Blank => Err(error(ParseErrorKind::MissingMeasurement, 0, 0)),
        Scanned::Comment(at) => Err(error(ParseErrorKind::Comment, at, line.len())),
    }
}

/// The outcome of [`normalize`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Valid lines appended to `out`.
    pub lines: u64,
    /// The first [`MAX_REPORTED_ERRORS`] invalid lines.
    pub errors: Vec<LineError>,
    /// All invalid lines.
    pub error_count: u64,
}

impl Summary {
    fn record(&mut self, line: usize, error: ParseError, raw: &[u8]) {
        self.error_count += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(LineError {
                line,
                error,
                excerpt: excerpt(raw),
            });
        }
    }
}

/// The start of a bad line for an error message: at most [`EXCERPT_BYTES`] bytes, cut on a
/// character boundary, tabs shown as spaces and other control characters as U+FFFD.
fn excerpt(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let mut cut = raw.len().min(EXCERPT_BYTES);
    let floor = cut.saturating_sub(3);
    while cut > floor && cut < raw.len() && raw[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    let mut s: String = String::from_utf8_lossy(&raw[..cut])
        .chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => '\u{FFFD}',
            c => c,
        })
        .collect();
    if cut < raw.len() {
        s.push_str("...");
    }
    s
}

/// Validates every point of `body` (a line, or several when a string value holds newlines;
/// see [`point_end`]) and appends each valid one to `out` in canonical form:
/// the line's bytes up to the end of its field section (leading/trailing spaces and tabs and
/// a trailing '\r' trimmed), then ' ' and the timestamp in nanoseconds (the written timestamp
/// times `precision.multiplier()`, checked; or `now_ns` when the line has none), then '\n'.
/// Blank lines and comment lines (first non-blank byte '#') are skipped and not counted.
///
/// A line that already has a canonical nanosecond timestamp (no leading zeros, no `-0`),
/// a single space before it and no surrounding whitespace is copied with one extend.
/// Invalid lines are left out of `out` and reported in the [`Summary`].
pub fn normalize(body: &[u8], precision: Precision, now_ns: i64, out: &mut Vec<u8>) -> Summary {
    normalize_with(body, precision, now_ns, false, out)
}

/// As [`normalize`]; with `refuse_unsigned`, a point holding an unsigned integer field is
/// invalid ([`ParseErrorKind::UnsignedForV1`]), for writes that only InfluxDB 1.x remotes
/// take.
pub fn normalize_with(
    body: &[u8],
    precision: Precision,
    now_ns: i64,
    refuse_unsigned: bool,
    out: &mut Vec<u8>,
) -> Summary {
    let mut summary = Summary::default();
    out.reserve(body.len() + 1);
    let mut pos = 0;
    let mut line_no = 0;
    let mut newlines_before = 0;
    while pos < body.len() {
        let rest = &body[pos..];
        let first_newline = memchr(b'\n', rest);
        let mut raw = &rest[..first_newline.unwrap_or(rest.len())];
        let mut scanned = scan_line(raw);
        let mut multi = false;
        // A line that scans as a point (or is blank or a comment) ends at its first newline:
        // `scan_line` and `point_end` read strings at the same places, and every string of
        // a valid line closed before it. So the hot path is one `memchr` and one scan, as for
        // a body without strings. Only a rejected line holding a quote may be the start of a
        // point that goes on inside a string: it is cut again where that point ends.
        if scanned.is_err() && first_newline.is_some() && memchr(b'"', raw).is_some() {
            let end = quoted_point_end(rest).unwrap_or(rest.len());
            if end != raw.len() {
                raw = &rest[..end];
                multi = true;
                scanned = match scan_line(raw) {
                    Ok(Scanned::Point(p)) => match newline_outside_strings(raw, &p.line) {
                        Some(at) => Err(error(ParseErrorKind::NewlineOutsideString, at, end)),
                        None => Ok(Scanned::Point(p)),
                    },
                    other => other,
                };
            }
        }
        let len = raw.len();
        let next = if len < rest.len() {
            pos + len + 1
        } else {
            body.len()
        };
        // Points are named by the physical line they start on.
        line_no += 1 + newlines_before;
        newlines_before = if multi {
            memchr::memchr_iter(b'\n', raw).count()
        } else {
            0
        };
        let scanned = match scanned {
            Ok(Scanned::Point(p)) if refuse_unsigned => match unsigned_field(raw, &p.line) {
                Some(at) => Err(error(ParseErrorKind::UnsignedForV1, at, raw.len())),
                None => Ok(Scanned::Point(p)),
            },
            other => other,
        };
        match scanned {
            Ok(Scanned::Point(p)) => {
                let ns = match p.line.timestamp {
                    None => Some(now_ns),
                    Some(ts) => precision.to_nanos(ts),
                };
                match ns {
                    Some(ns) => {
                        summary.lines += 1;
                        let fast = precision == Precision::Nanoseconds
                            && p.line.timestamp.is_some()
                            && p.start == 0
                            && p.end == raw.len()
                            && p.ts_start == p.fields_end + 1
                            && canonical_integer(&raw[p.ts_start..]);
                        if fast {
                            out.extend_from_slice(&body[pos..next]);
                            if next == pos + len {
                                out.push(b'\n');
                            }
                        } else {
                            out.extend_from_slice(p.line.key_and_fields);
                            out.push(b' ');
                            push_i64(out, ns);
                            out.push(b'\n');
                        }
                    }
                    None => summary.record(
                        line_no,
                        error(ParseErrorKind::TimestampOutOfRange, p.ts_start, p.end),
                        raw,
                    ),
                }
            }
            Ok(Scanned::Blank) | Ok(Scanned::Comment(_)) => {}
            Err(e) => summary.record(line_no, e, raw),
        }
        pos = next;
    }
    summary
}

/// Offset in `raw` of the value of the first unsigned integer field of `line` (parsed
/// from `raw`), if any.
fn unsigned_field(raw: &[u8], line: &Line<'_>) -> Option<usize> {
    // Most lines have no `u` after a digit: one memchr decides.
    memchr(b'u', line.fields)?;
    line.fields()
        .find(|(_, v)| matches!(v, FieldValue::UInt(_)))
        .map(|(key, _)| key.as_ptr() as usize - raw.as_ptr() as usize + key.len() + 1)
}

// ---- point boundaries ----
//
// A point ends at the first `\n` that is not inside a quoted string field value. Every
// place that cuts line protocol into points (request bodies, tailed files, queued entries,
// batches, split retries) finds the cut here, so a string holding a newline is never split
// and the text after its newline can never be read as a point of its own.

/// Index of the `\n` that ends the point starting at `buf[0]`, or `None` when `buf` ends
/// first (a last point without its newline, or a string field value not closed yet).
///
/// A newline ends the point everywhere except inside a quoted string field value. A `"`
/// opens one only where InfluxDB reads a string: as a field value, right after the `=` of a
/// field in the field section. Inside it a backslash and the byte after it are a pair (so
/// `\"` and `\\` do not close it). Measurement and tags have no quoting (a `"` there is a
/// literal byte), and a line whose first non-blank byte is `#` is a comment that ends at
/// its newline. Outside strings a newline ends the point even after a backslash.
///
/// When `buf` holds no `"` before its first newline this is one `memchr2`; otherwise the
/// point's sections are walked from its start.
#[inline]
pub fn point_end(buf: &[u8]) -> Option<usize> {
    match memchr2(b'\n', b'"', buf) {
        None => None,
        Some(k) if buf[k] == b'\n' => Some(k),
        Some(_) => quoted_point_end(buf),
    }
}

/// [`point_end`] for a point that holds a `"` before its first newline.
fn quoted_point_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < b.len() && is_blank(b[i]) {
        i += 1;
    }
    if b.get(i) == Some(&b'#') {
        return memchr(b'\n', &b[i..]).map(|k| i + k);
    }
    // Measurement and tags, up to the first space that does not follow a backslash (the
    // same previous-byte rule as `scan_key`).
    loop {
        let k = i + memchr3(b' ', b'\n', b'\\', &b[i..])?;
        match b[k] {
            b'\n' => return Some(k),
            b' ' => {
                i = k + 1;
                break;
            }
            _ => {
                i = k + 1;
                while b.get(i) == Some(&b'\\') {
                    i += 1;
                }
                match b.get(i)? {
                    b'\n' => return Some(i),
                    _ => i += 1,
                }
            }
        }
    }
    while i < b.len() && is_blank(b[i]) {
        i += 1;
    }
    // Fields: key `=` value, separated by commas, as `scan_line` walks them.
    loop {
        // The key, with backslash pairs.
        loop {
            match *b.get(i)? {
                b'\n' => return Some(i),
                b'\\' => match *b.get(i + 1)? {
                    b'\n' => return Some(i + 1),
                    _ => i += 2,
                },
                b'=' => {
                    i += 1;
                    break;
                }
                b',' | b' ' => return rest_end(b, i),
                _ => i += 1,
            }
        }
        // The value: a string, or anything up to a comma, space or newline.
        if *b.get(i)? == b'"' {
            i = closing_quote(b, i + 1)? + 1;
        } else {
            i += memchr3(b',', b' ', b'\n', &b[i..])?;
        }
        match *b.get(i)? {
            b',' => i += 1,
            b'\n' => return Some(i),
            // The timestamp, or text that makes the line invalid: no quoting there.
            _ => return rest_end(b, i),
        }
    }
}

/// The first newline at or after `i`.
#[inline]
fn rest_end(b: &[u8], i: usize) -> Option<usize> {
    memchr(b'\n', &b[i..]).map(|k| i + k)
}

/// The points of `buf` in order, each with its `\n` (only the last may lack one), as
/// [`point_end`] cuts them.
pub fn points(buf: &[u8]) -> Points<'_> {
    Points { rest: buf }
}

/// Iterator from [`points`].
#[derive(Debug, Clone)]
pub struct Points<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Points<'a> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let cut = point_end(self.rest).map_or(self.rest.len(), |k| k + 1);
        let (point, rest) = self.rest.split_at(cut);
        self.rest = rest;
        Some(point)
    }
}

/// How many points of `buf` end in their `\n`; for whole points, as queued, how many
/// points it holds.
pub fn count_points(buf: &[u8]) -> usize {
    if memchr(b'"', buf).is_none() {
        return memchr::memchr_iter(b'\n', buf).count();
    }
    let mut at = 0;
    let mut n = 0;
    while let Some(k) = point_end(&buf[at..]) {
        at += k + 1;
        n += 1;
    }
    n
}

/// The offset just past the last point of `buf` that ends within it (its `\n` included), or
/// `None` when not even the first point ends in `buf`. `buf` must start at a point.
pub fn last_point_end(buf: &[u8]) -> Option<usize> {
    if memchr(b'"', buf).is_none() {
        return memchr::memrchr(b'\n', buf).map(|k| k + 1);
    }
    let mut at = 0;
    let mut last = None;
    while let Some(k) = point_end(&buf[at..]) {
        at += k + 1;
        last = Some(at);
    }
    last
}

/// The offset of the first newline of `raw` that is not inside one of `line`'s string
/// values. [`point_end`] and [`scan_line`] read strings at the same places, so this finds
/// none; it is checked anyway (for points that hold a newline only), so that a newline can
/// never reach the queue inside a measurement, tag or field key.
#[cold]
fn newline_outside_strings(raw: &[u8], line: &Line<'_>) -> Option<usize> {
    let base = raw.as_ptr() as usize;
    let spans: Vec<(usize, usize)> = line
        .fields()
        .filter_map(|(_, v)| match v {
            FieldValue::Str(s) => {
                let start = s.as_ptr() as usize - base;
                Some((start, start + s.len()))
            }
            _ => None,
        })
        .collect();
    let end = line.key_and_fields.as_ptr() as usize - base + line.key_and_fields.len();
    memchr::memchr_iter(b'\n', &raw[..end])
        .find(|&k| !spans.iter().any(|&(s, e)| (s..e).contains(&k)))
}

/// Whether a valid decimal integer is written as `i64`'s `Display` would write it.
fn canonical_integer(s: &[u8]) -> bool {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    match digits {
        [b'0'] => digits.len() == s.len(),
        [b'0', ..] => false,
        _ => true,
    }
}

/// Appends the decimal form of `v`.
fn push_i64(out: &mut Vec<u8>, v: i64) {
    let mut buf = [0u8; 20];
    let mut pos = buf.len();
    let mut u = v.unsigned_abs();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[pos..]);
}

/// Formats the errors for an HTTP 400 message, InfluxDB-like, e.g.
/// `2 of 5 lines invalid: line 2: missing fields (column 4): "cpu"; line 5: ...`
/// (then `; and N more` when truncated).
pub fn describe_errors(summary: &Summary, total_lines: u64) -> String {
    use fmt::Write;
    let noun = if total_lines == 1 { "line" } else { "lines" };
    let mut s = format!("{} of {total_lines} {noun} invalid", summary.error_count);
    for (n, e) in summary.errors.iter().enumerate() {
        s.push_str(if n == 0 { ": " } else { "; " });
        let _ = write!(s, "{e}");
    }
    let more = summary
        .error_count
        .saturating_sub(summary.errors.len() as u64);
    if more > 0 {
        let _ = write!(s, "; and {more} more");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ParseErrorKind::*;

    const NOW: i64 = 1_700_000_000_123_456_789;

    fn norm(body: &[u8], precision: Precision) -> (String, Summary) {
        let mut out = Vec::new();
        let summary = normalize(body, precision, NOW, &mut out);
        (
            String::from_utf8(out).expect("test output is UTF-8"),
            summary,
        )
    }

    #[test]
    fn precision_names_and_multipliers() {
        use Precision::*;
        for (s, p) in [
            ("ns", Nanoseconds),
            ("us", Microseconds),
            ("ms", Milliseconds),
        ] {
            assert_eq!(Precision::from_v2(s), Some(p));
            assert_eq!(Precision::from_v1(s), Some(p));
        }
        assert_eq!(Precision::from_v2("s"), Some(Seconds));
        for bad in ["", "n", "u", "m", "h", "NS", "sec", "µs"] {
            assert_eq!(Precision::from_v2(bad), None, "{bad}");
        }
        for (s, p) in [
            ("n", Nanoseconds),
            ("u", Microseconds),
            ("s", Seconds),
            ("m", Minutes),
            ("h", Hours),
        ] {
            assert_eq!(Precision::from_v1(s), Some(p));
        }
        for bad in ["", "mm", "H", "rfc3339", "d"] {
            assert_eq!(Precision::from_v1(bad), None, "{bad}");
        }
        let mults: Vec<i64> = [
            Nanoseconds,
            Microseconds,
            Milliseconds,
            Seconds,
            Minutes,
            Hours,
        ]
        .iter()
        .map(|p| p.multiplier())
        .collect();
        assert_eq!(
            mults,
            [
                1,
                1_000,
                1_000_000,
                1_000_000_000,
                60_000_000_000,
                3_600_000_000_000
            ]
        );
        assert_eq!(Seconds.to_nanos(-2), Some(-2_000_000_000));
        assert_eq!(Nanoseconds.to_nanos(i64::MAX), None);
        assert_eq!(Nanoseconds.to_nanos(i64::MIN + 1), None);
        assert_eq!(
            Nanoseconds.to_nanos(MIN_TIMESTAMP_NS),
            Some(MIN_TIMESTAMP_NS)
        );
        assert_eq!(Hours.to_nanos(2_562_048), None);
        assert_eq!(
            Hours.to_nanos(2_562_047),
            Some(2_562_047 * 3_600_000_000_000)
        );
    }

    /// (body, precision, expected output); every body here is entirely valid.
    const VALID: &[(&str, Precision, &str)] = {
        use Precision::*;
        &[
            ("cpu value=1 1600000000000000000", Nanoseconds, "cpu value=1 1600000000000000000\n"),
            ("cpu value=1 1600000000000000000\n", Nanoseconds, "cpu value=1 1600000000000000000\n"),
            ("cpu value=1", Nanoseconds, "cpu value=1 1700000000123456789\n"),
            ("cpu value=1\n", Seconds, "cpu value=1 1700000000123456789\n"),
            (
                "cpu,host=a,region=b usage=0.5,count=3i,total=10u,ok=true,msg=\"hi\" 1",
                Nanoseconds,
                "cpu,host=a,region=b usage=0.5,count=3i,total=10u,ok=true,msg=\"hi\" 1\n",
            ),
            // Escapes in every position.
            (
                r#"c\,p\ u,ho\,s\ t\=k=v\,a\ l\=ue f\,i\ e\=ld=1,s="a \"q\" \\ b, c=d e" 5"#,
                Nanoseconds,
                "c\\,p\\ u,ho\\,s\\ t\\=k=v\\,a\\ l\\=ue f\\,i\\ e\\=ld=1,s=\"a \\\"q\\\" \\\\ b, c=d e\" 5\n",
            ),
            // Literal backslashes and odd but legal bytes in names.
            (r"c\pu,t\ag=v\al v\x=1 1", Nanoseconds, "c\\pu,t\\ag=v\\al v\\x=1 1\n"),
            ("\"cpu\"=x,\"k\"=\"v\" \"f\"=1 2", Nanoseconds, "\"cpu\"=x,\"k\"=\"v\" \"f\"=1 2\n"),
            ("cpu\tload v=1 3", Nanoseconds, "cpu\tload v=1 3\n"),
            ("温度,地点=東京 値=1.5 4", Nanoseconds, "温度,地点=東京 値=1.5 4\n"),
            (r"\#cpu v=1 5", Nanoseconds, "\\#cpu v=1 5\n"),
            // Every precision.
            ("cpu v=1 5", Microseconds, "cpu v=1 5000\n"),
            ("cpu v=1 5", Milliseconds, "cpu v=1 5000000\n"),
            ("cpu v=1 5", Seconds, "cpu v=1 5000000000\n"),
            ("cpu v=1 5", Minutes, "cpu v=1 300000000000\n"),
            ("cpu v=1 5", Hours, "cpu v=1 18000000000000\n"),
            // Negative, zero, non-canonical and extreme timestamps.
            ("cpu v=1 -5", Seconds, "cpu v=1 -5000000000\n"),
            ("cpu v=1 -5", Nanoseconds, "cpu v=1 -5\n"),
            ("cpu v=1 0", Nanoseconds, "cpu v=1 0\n"),
            ("cpu v=1 -0", Nanoseconds, "cpu v=1 0\n"),
            ("cpu v=1 007", Nanoseconds, "cpu v=1 7\n"),
            ("cpu v=1 9223372036854775806", Nanoseconds, "cpu v=1 9223372036854775806\n"),
            ("cpu v=1 -9223372036854775806", Nanoseconds, "cpu v=1 -9223372036854775806\n"),
            ("cpu v=1 9223372036", Seconds, "cpu v=1 9223372036000000000\n"),
            // CRLF and whitespace.
            ("cpu v=1 1\r\ncpu v=2\r\n", Nanoseconds, "cpu v=1 1\ncpu v=2 1700000000123456789\n"),
            ("  \tcpu v=1   \t 2 \t \r", Nanoseconds, "cpu v=1 2\n"),
            ("cpu   \t v=1  2", Nanoseconds, "cpu   \t v=1 2\n"),
            ("cpu,t=1  v=1 \t", Milliseconds, "cpu,t=1  v=1 1700000000123456789\n"),
            // Comments and blank lines are skipped.
            (
                "# comment\n\n   \n\t# indented\r\n\r\ncpu v=1 3\n#last",
                Nanoseconds,
                "cpu v=1 3\n",
            ),
            ("", Nanoseconds, ""),
            ("\n\n", Nanoseconds, ""),
            // Every field type and spelling.
            (
                "m a=1.,b=.5,c=-1.5e-3,d=1E+10,e=-0,f=007,g=1e-400,h=-.5e3 1",
                Nanoseconds,
                "m a=1.,b=.5,c=-1.5e-3,d=1E+10,e=-0,f=007,g=1e-400,h=-.5e3 1\n",
            ),
            (
                "m a=-9223372036854775808i,b=9223372036854775807i,c=18446744073709551615u,d=0u,e=-0i 1",
                Nanoseconds,
                "m a=-9223372036854775808i,b=9223372036854775807i,c=18446744073709551615u,d=0u,e=-0i 1\n",
            ),
            (
                "m a=t,b=T,c=true,d=True,e=TRUE,f=f,g=F,h=false,i=False,j=FALSE 1",
                Nanoseconds,
                "m a=t,b=T,c=true,d=True,e=TRUE,f=f,g=F,h=false,i=False,j=FALSE 1\n",
            ),
            ("m s=\"\",t=\"a b\" 1", Nanoseconds, "m s=\"\",t=\"a b\" 1\n"),
            ("m s=\"\\n\\t\\x\" 1", Nanoseconds, "m s=\"\\n\\t\\x\" 1\n"),
            // Unsorted tags are fine.
            ("m,b=1,a=2,c=3 v=1 1", Nanoseconds, "m,b=1,a=2,c=3 v=1 1\n"),
            // Several lines, last without newline.
            ("a v=1 1\nb v=2\nc v=3 3", Seconds, "a v=1 1000000000\nb v=2 1700000000123456789\nc v=3 3000000000\n"),
        ]
    };

    #[test]
    fn valid_bodies_normalize_to_expected_bytes() {
        for (body, precision, expected) in VALID {
            let (out, summary) = norm(body.as_bytes(), *precision);
            assert_eq!(summary.errors, vec![], "{body:?}");
            assert_eq!(summary.error_count, 0, "{body:?}");
            assert_eq!(out, *expected, "{body:?} at {precision:?}");
            assert_eq!(summary.lines as usize, expected.lines().count(), "{body:?}");
        }
    }

    /// (line, expected kind, expected column) for lines that must be rejected.
    const INVALID: &[(&str, ParseErrorKind, usize)] = &[
        (",host=a v=1", MissingMeasurement, 1),
        ("  ,v=1", MissingMeasurement, 3),
        ("cpu", MissingFields, 4),
        ("cpu ", MissingFields, 4),
        ("cpu,host=a", MissingFields, 11),
        (r"cpu\ v=1", MissingFields, 9),
        // InfluxDB decides escaping by the previous byte: this space is escaped too.
        (r"cpu\\ v=1", MissingFields, 10),
        ("cpu,=a v=1", MissingTagKey, 5),
        ("cpu, v=1", MissingTagKey, 5),
        ("cpu,a=1, v=1", MissingTagKey, 9),
        ("cpu,host v=1", InvalidTagFormat, 9),
        ("cpu,host,a=b v=1", InvalidTagFormat, 9),
        ("cpu,host= v=1", MissingTagValue, 10),
        ("cpu,host=,a=b v=1", MissingTagValue, 10),
        ("cpu,host=a=b v=1", InvalidTagFormat, 11),
        ("cpu,host==b v=1", InvalidTagFormat, 10),
        ("cpu,host=a,host=b v=1", DuplicateTagKey, 12),
        ("cpu,b=1,a=2,b=3 v=1", DuplicateTagKey, 13),
        ("cpu =1", MissingFieldKey, 5),
        ("cpu v=1,=2", MissingFieldKey, 9),
        ("cpu v=1,", MissingFieldKey, 9),
        ("cpu v=1, w=2", MissingFieldKey, 9),
        ("cpu v", InvalidFieldFormat, 6),
        ("cpu v=1,w", InvalidFieldFormat, 10),
        ("cpu v=1,w x=1", InvalidFieldFormat, 10),
        (r"cpu v\=1", InvalidFieldFormat, 9),
        ("cpu v=", MissingFieldValue, 7),
        ("cpu v=,w=1", MissingFieldValue, 7),
        ("cpu v= 1", MissingFieldValue, 7),
        ("cpu v=1.2.3", InvalidNumber, 10),
        ("cpu v=1a", InvalidNumber, 8),
        ("cpu v=-", InvalidNumber, 7),
        ("cpu v=.", InvalidNumber, 7),
        ("cpu v=+1", InvalidNumber, 7),
        ("cpu v=NaN", InvalidNumber, 7),
        ("cpu v=nan", InvalidNumber, 7),
        ("cpu v=inf", InvalidNumber, 7),
        ("cpu v=-Inf", InvalidNumber, 7),
        ("cpu v=1e", InvalidNumber, 9),
        ("cpu v=1e+", InvalidNumber, 10),
        ("cpu v=e5", InvalidBoolean, 7),
        ("cpu v=1.5i", InvalidNumber, 10),
        ("cpu v=1e5i", InvalidNumber, 10),
        ("cpu v=1i2", InvalidNumber, 9),
        ("cpu v=i", InvalidNumber, 7),
        ("cpu v=-1u", InvalidNumber, 7),
        ("cpu v=1iu", InvalidNumber, 9),
        ("cpu v=1\t2", InvalidNumber, 8),
        ("cpu v=1_000", InvalidNumber, 8),
        ("cpu v=0x10", InvalidNumber, 8),
        ("cpu v=9223372036854775808i", IntegerOutOfRange, 7),
        ("cpu v=-9223372036854775809i", IntegerOutOfRange, 7),
        ("cpu v=99999999999999999999999i", IntegerOutOfRange, 7),
        ("cpu v=18446744073709551616u", UnsignedOutOfRange, 7),
        ("cpu v=1e309", FloatOutOfRange, 7),
        ("cpu v=-1.8e308", FloatOutOfRange, 7),
        ("cpu v=tru", InvalidBoolean, 7),
        ("cpu v=yes", InvalidBoolean, 7),
        ("cpu v=tRUE", InvalidBoolean, 7),
        ("cpu v=truee", InvalidBoolean, 7),
        ("cpu v=abc", InvalidBoolean, 7),
        ("cpu v=\"abc", UnterminatedString, 7),
        ("cpu v=\"abc\\\"", UnterminatedString, 7),
        ("cpu v=\"abc\\", UnterminatedString, 7),
        ("cpu v=\"a\"b\"", UnescapedQuote, 9),
        ("cpu v=\"a\"1", UnescapedQuote, 9),
        ("cpu v=1 12a", InvalidTimestamp, 11),
        ("cpu v=1 -", InvalidTimestamp, 9),
        ("cpu v=1 1.5", InvalidTimestamp, 10),
        ("cpu v=1 +5", InvalidTimestamp, 9),
        ("cpu v=1 1e9", InvalidTimestamp, 10),
        ("cpu v=1 9223372036854775807", TimestampOutOfRange, 9),
        ("cpu v=1 -9223372036854775807", TimestampOutOfRange, 9),
        ("cpu v=1 -9223372036854775808", TimestampOutOfRange, 9),
        ("cpu v=1 99999999999999999999", TimestampOutOfRange, 9),
        ("cpu v=1 1 2", TrailingData, 11),
        ("cpu v=1 1\t\tx", TrailingData, 12),
    ];

    #[test]
    fn lines_that_are_not_utf8_are_rejected_where_the_bad_byte_is() {
        let cases: &[(&[u8], usize)] = &[
            (b"m\xff v=1 1", 2),
            (b"m,t=\xc3\x28 v=1 1", 5),
            (b"m s=\"caf\xc3\" 1", 9),
            (b"  m v=1 1\xed\xa0\x80", 10),
            (b"m s=\"\xf0\x9f\x98\" 1", 6),
        ];
        for (line, column) in cases {
            let body = [
                b"good v=1 1\n".as_slice(),
                line,
                b"\n# \xff comment\ngood v=2 2\n",
            ]
            .concat();
            let (out, summary) = norm(&body, Precision::Nanoseconds);
            assert_eq!(out, "good v=1 1\ngood v=2 2\n", "{line:?}");
            assert_eq!(summary.error_count, 1, "{line:?}");
            assert_eq!(summary.errors[0].line, 2);
            assert_eq!(
                summary.errors[0].error,
                ParseError {
                    kind: InvalidUtf8,
                    column: *column
                },
                "{line:?}"
            );
            assert_eq!(parse_line(line).unwrap_err().kind, InvalidUtf8);
        }
        let (out, summary) = norm(
            "m,t=caf\u{e9} s=\"\u{1f600} ok\",\u{b5}=1 1\n".as_bytes(),
            Precision::Nanoseconds,
        );
        assert_eq!(summary.error_count, 0);
        assert_eq!(out, "m,t=caf\u{e9} s=\"\u{1f600} ok\",\u{b5}=1 1\n");
    }

    #[test]
    fn unsigned_fields_are_refused_only_when_asked() {
        let body = b"a,u=1u v=1u,w=2i 1\nb s=\"9u\",x=3i 2\nc v=1i,n=18446744073709551615u 3\n";
        let mut out = Vec::new();
        let s = normalize_with(body, Precision::Nanoseconds, NOW, false, &mut out);
        assert_eq!((s.lines, s.error_count), (3, 0));
        let mut out = Vec::new();
        let s = normalize_with(body, Precision::Nanoseconds, NOW, true, &mut out);
        // A `u` in a tag or inside a string is not an unsigned field.
        assert_eq!(out, b"b s=\"9u\",x=3i 2\n");
        assert_eq!((s.lines, s.error_count), (1, 2));
        let at: Vec<(usize, ParseErrorKind, usize)> = s
            .errors
            .iter()
            .map(|e| (e.line, e.error.kind, e.error.column))
            .collect();
        assert_eq!(at, vec![(1, UnsignedForV1, 10), (3, UnsignedForV1, 10)]);
    }

    #[test]
    fn invalid_lines_are_rejected_and_neighbours_kept() {
        for (line, kind, column) in INVALID {
            let body = format!("good,n=1 v=1 1\n{line}\r\n\n good v=2i 2");
            let (out, summary) = norm(body.as_bytes(), Precision::Nanoseconds);
            if *kind == UnterminatedString {
                // An open string takes in the rest of the body, newlines included.
                assert_eq!(out, "good,n=1 v=1 1\n", "{line:?}");
                assert_eq!(summary.lines, 1, "{line:?}");
            } else {
                assert_eq!(out, "good,n=1 v=1 1\ngood v=2i 2\n", "{line:?}");
                assert_eq!(summary.lines, 2, "{line:?}");
            }
            assert_eq!(summary.error_count, 1, "{line:?}");
            let err = &summary.errors[0];
            assert_eq!(err.line, 2, "{line:?}");
            assert_eq!(
                err.error,
                ParseError {
                    kind: *kind,
                    column: *column
                },
                "{line:?}"
            );
            // parse_line reports the timestamp as written; only i64 overflow is its business.
            if *kind != TimestampOutOfRange {
                assert_eq!(
                    parse_line(line.as_bytes()).unwrap_err().kind,
                    *kind,
                    "{line:?}"
                );
            }
        }
        assert_eq!(
            parse_line(b"m v=1 9223372036854775808").unwrap_err(),
            ParseError {
                kind: TimestampOutOfRange,
                column: 7
            }
        );
        assert_eq!(
            parse_line(b"m v=1 -9223372036854775808").unwrap().timestamp,
            Some(i64::MIN)
        );
    }

    #[test]
    fn timestamp_range_depends_on_precision() {
        for (line, precision) in [
            ("m v=1 9223372037", Precision::Seconds),
            ("m v=1 -9223372037", Precision::Seconds),
            ("m v=1 153722867281", Precision::Minutes),
            ("m v=1 9223372036854776", Precision::Milliseconds),
        ] {
            let (out, summary) = norm(line.as_bytes(), precision);
            assert_eq!(out, "", "{line}");
            assert_eq!(summary.errors[0].error.kind, TimestampOutOfRange, "{line}");
            assert_eq!(summary.errors[0].error.column, 7, "{line}");
            // The line itself is well formed; only the conversion fails.
            assert!(parse_line(line.as_bytes()).is_ok());
        }
    }

    #[test]
    fn blank_and_comment_lines_through_parse_line() {
        assert_eq!(parse_line(b"").unwrap_err().kind, MissingMeasurement);
        assert_eq!(parse_line(b" \t\r\n").unwrap_err().kind, MissingMeasurement);
        assert_eq!(
            parse_line(b"  # cpu v=1").unwrap_err(),
            ParseError {
                kind: Comment,
                column: 3
            }
        );
    }

    #[test]
    fn parse_line_exposes_sections() {
        let l = parse_line(b" cpu\\ 1,b=2,a=x\\ y  v=1,s=\"a b\" \t42 \r\n").unwrap();
        assert_eq!(l.measurement, b"cpu\\ 1");
        assert_eq!(l.tags, b"b=2,a=x\\ y");
        assert_eq!(l.fields, b"v=1,s=\"a b\"");
        assert_eq!(l.timestamp, Some(42));
        assert_eq!(l.key_and_fields, b"cpu\\ 1,b=2,a=x\\ y  v=1,s=\"a b\"");
        let tags: Vec<_> = l.tags().collect();
        assert_eq!(tags, [(&b"b"[..], &b"2"[..]), (b"a", b"x\\ y")]);

        let l = parse_line(b"m v=1").unwrap();
        assert_eq!(l.tags, b"");
        assert_eq!(l.tags().count(), 0);
        assert_eq!(l.timestamp, None);
        assert_eq!(l.key_and_fields, b"m v=1");
    }

    fn field_values(line: &str) -> Vec<(String, FieldValue<'_>)> {
        parse_line(line.as_bytes())
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .fields()
            .map(|(k, v)| (String::from_utf8(k.to_vec()).unwrap(), v))
            .collect()
    }

    #[test]
    fn field_values_are_typed() {
        use FieldValue::*;
        let v = field_values(
            "m a=1,b=-1.5,c=1.,d=.5,e=1e10,f=-2.5E-3,g=-12i,h=12u,i=t,j=FALSE,k=\"x\",l=007,m=1e-400",
        );
        let expected = [
            ("a", Float(1.0)),
            ("b", Float(-1.5)),
            ("c", Float(1.0)),
            ("d", Float(0.5)),
            ("e", Float(1e10)),
            ("f", Float(-2.5e-3)),
            ("g", Int(-12)),
            ("h", UInt(12)),
            ("i", Bool(true)),
            ("j", Bool(false)),
            ("k", Str(b"x")),
            ("l", Float(7.0)),
            ("m", Float(0.0)),
        ];
        assert_eq!(v.len(), expected.len());
        for ((k, v), (ek, ev)) in v.iter().zip(expected) {
            assert_eq!((k.as_str(), *v), (ek, ev));
        }

        let v = field_values(
            "m a=-9223372036854775808i,b=9223372036854775807i,c=18446744073709551615u,d=0u,e=1.7976931348623157e308",
        );
        assert_eq!(v[0].1, Int(i64::MIN));
        assert_eq!(v[1].1, Int(i64::MAX));
        assert_eq!(v[2].1, UInt(u64::MAX));
        assert_eq!(v[3].1, UInt(0));
        assert_eq!(v[4].1, Float(f64::MAX));

        for t in ["t", "T", "true", "True", "TRUE"] {
            assert_eq!(field_values(&format!("m b={t}"))[0].1, Bool(true), "{t}");
        }
        for f in ["f", "F", "false", "False", "FALSE"] {
            assert_eq!(field_values(&format!("m b={f}"))[0].1, Bool(false), "{f}");
        }

        let v = field_values(r#"m s="say \"hi\", a=b c\\",k\ e\,y\=s=1 9"#);
        assert_eq!(v[0].0, "s");
        assert_eq!(v[0].1, Str(br#"say \"hi\", a=b c\\"#));
        let Str(raw) = v[0].1 else { unreachable!() };
        assert_eq!(&*string_unescaped(raw), br#"say "hi", a=b c\"#);
        assert_eq!(v[1].0, r"k\ e\,y\=s");
        assert_eq!(&*tag_unescaped(v[1].0.as_bytes()), b"k e,y=s");
    }

    #[test]
    fn field_iter_stops_on_hand_made_garbage() {
        let line = Line {
            measurement: b"m",
            tags: b"a,=\\",
            fields: b"a=1,b=zz,c=2",
            timestamp: None,
            key_and_fields: b"",
        };
        assert_eq!(line.fields().count(), 1);
        assert!(line.tags().count() <= 2);
    }

    #[test]
    fn unescaping_follows_influxdb() {
        assert!(matches!(measurement_unescaped(b"cpu"), Cow::Borrowed(_)));
        assert_eq!(&*measurement_unescaped(br"c\,p\ u"), b"c,p u");
        // `\=` is not a measurement escape and `\\` is no escape at all in InfluxDB's key.
        assert_eq!(&*measurement_unescaped(br"a\=b\\c\x"), br"a\=b\\c\x");
        assert_eq!(&*measurement_unescaped(br"a\\,b"), br"a\,b");
        assert_eq!(&*measurement_unescaped(b"a\\"), b"a\\");
        assert_eq!(&*tag_unescaped(br"k\=\,\ \x"), br"k=, \x");
        assert_eq!(&*string_unescaped(br#"\"\\\n"#), br#""\\n"#);
    }

    #[test]
    fn duplicate_tags_found_among_many() {
        let mut line = String::from("m");
        for n in (0..100).rev() {
            line.push_str(&format!(",k{n}=v"));
        }
        let ok = format!("{line} v=1");
        assert!(parse_line(ok.as_bytes()).is_ok());
        let dup = format!("{line},k42=w,k7=x v=1");
        let err = parse_line(dup.as_bytes()).unwrap_err();
        assert_eq!(err.kind, DuplicateTagKey);
        assert_eq!(&dup[err.column - 1..err.column + 3], "k42=");
        // Small unsorted set: the later of the two is reported.
        let err = parse_line(b"m,z=1,b=2,a=3,b=4 v=1").unwrap_err();
        assert_eq!(
            err,
            ParseError {
                kind: DuplicateTagKey,
                column: 15
            }
        );
    }

    #[test]
    fn errors_are_capped_counted_and_described() {
        let mut body = String::new();
        for n in 0..25 {
            body.push_str(if n % 2 == 0 { "cpu\n" } else { "cpu v=1 1\n" });
        }
        let (out, summary) = norm(body.as_bytes(), Precision::Nanoseconds);
        assert_eq!(summary.lines, 12);
        assert_eq!(out.lines().count(), 12);
        assert_eq!(summary.error_count, 13);
        assert_eq!(summary.errors.len(), MAX_REPORTED_ERRORS);
        assert_eq!(summary.errors[1].line, 3);
        let msg = describe_errors(&summary, 25);
        assert!(
            msg.starts_with(
                "13 of 25 lines invalid: line 1: missing fields (column 4): \"cpu\"; line 3: "
            ),
            "{msg}"
        );
        assert!(
            msg.ends_with("; line 19: missing fields (column 4): \"cpu\"; and 3 more"),
            "{msg}"
        );

        let (_, summary) = norm(b"cpu,host=a", Precision::Nanoseconds);
        assert_eq!(
            describe_errors(&summary, 1),
            "1 of 1 line invalid: line 1: missing fields (column 11): \"cpu,host=a\""
        );
        assert_eq!(
            summary.errors[0].to_string(),
            "line 1: missing fields (column 11): \"cpu,host=a\""
        );
    }

    #[test]
    fn excerpts_are_short_and_printable() {
        let long = format!("{}é{} v=", "a".repeat(63), "b".repeat(100));
        let (_, summary) = norm(long.as_bytes(), Precision::Nanoseconds);
        assert_eq!(summary.errors[0].excerpt, format!("{}...", "a".repeat(63)));
        let (_, summary) = norm(b"c\tp\x01u\xff\r\n", Precision::Nanoseconds);
        assert_eq!(summary.errors[0].excerpt, "c p\u{FFFD}u\u{FFFD}");
    }

    /// Throughput on a ~100 MB body of metrics lines (~150 bytes each). Prints figures only;
    /// run with `cargo test --release -- --ignored --nocapture throughput`.
    #[test]
    #[ignore]
    fn throughput() {
        use std::fmt::Write;
        use std::time::Instant;
        let generate = |timestamp: &dyn Fn(u64) -> u64| {
            let mut body = String::with_capacity(101 << 20);
            let mut n = 0u64;
            while body.len() < 100_000_000 {
                let _ = writeln!(
                    body,
                    "cpu,cpu=cpu{},host=gateway-{:03},region=eu-west-1 usage_idle=97.{},\
                     usage_system=1.{},usage_user=0.{}5,iowait=0i,uptime={}i,status=\"ok\" {}",
                    n % 8,
                    n % 50,
                    n % 1000,
                    n % 97,
                    n % 89,
                    n,
                    timestamp(n)
                );
                n += 1;
            }
            (body, n)
        };
        let (body, n) = generate(&|n| 1_700_000_000_000_000_000 + n * 1_000);
        let (seconds_body, _) = generate(&|n| 1_700_000_000 + n / 1_000);
        let mb = body.len() as f64 / 1e6;
        println!(
            "{n} lines, {mb:.1} MB, {:.0} bytes/line",
            body.len() as f64 / n as f64
        );
        let mut out = Vec::with_capacity(body.len() + (8 << 20));
        for (label, input, precision) in [
            (
                "normalize ns (fast path)",
                body.as_bytes(),
                Precision::Nanoseconds,
            ),
            (
                "normalize s (rewrite ts)",
                seconds_body.as_bytes(),
                Precision::Seconds,
            ),
        ] {
            let mut best = f64::MAX;
            for _ in 0..3 {
                out.clear();
                let t = Instant::now();
                let summary = normalize(input, precision, NOW, &mut out);
                best = best.min(t.elapsed().as_secs_f64());
                assert_eq!(
                    summary.lines,
                    input
                        .split(|&c| c == b'\n')
                        .filter(|l| !l.is_empty())
                        .count() as u64
                );
            }
            println!(
                "{label}: {:.0} MB/s, {:.2} M lines/s",
                input.len() as f64 / 1e6 / best,
                n as f64 / 1e6 / best
            );
        }
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let valid = body
                .as_bytes()
                .split(|&c| c == b'\n')
                .filter(|l| parse_line(l).is_ok())
                .count();
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!(valid as u64, n);
        }
        println!("parse_line only: {:.0} MB/s", mb / best);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let fields: usize = body
                .as_bytes()
                .split(|&c| c == b'\n')
                .filter_map(|l| parse_line(l).ok())
                .map(|l| l.fields().count() + l.tags().count())
                .sum();
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!(fields as u64, n * 9);
        }
        println!(
            "parse_line + tags() + fields() decoding: {:.0} MB/s",
            mb / best
        );
        // Cutting queued points (batches, segments, split retries): every line here holds
        // a string, so each is walked by section.
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let counted = count_points(body.as_bytes());
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!(counted as u64, n);
        }
        println!(
            "count_points, a string in every line: {:.0} MB/s",
            mb / best
        );
        let plain = body.replace("status=\"ok\"", "status=1i");
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let counted = count_points(plain.as_bytes());
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!(counted as u64, n);
        }
        println!(
            "count_points, no strings: {:.0} MB/s",
            plain.len() as f64 / 1e6 / best
        );
        // A tenth of the points with a two-line string.
        let multi = body.replacen("status=\"ok\"", "status=\"o\nk\"", (n / 10) as usize);
        let mut best = f64::MAX;
        for _ in 0..3 {
            out.clear();
            let t = Instant::now();
            let summary = normalize(multi.as_bytes(), Precision::Nanoseconds, NOW, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!((summary.lines, summary.error_count), (n, 0));
        }
        println!(
            "normalize ns, a tenth of the points with a two-line string: {:.0} MB/s",
            multi.len() as f64 / 1e6 / best
        );
    }

    /// The body from the report of a point injected through a string value.
    const INJECTION: &str = "applog,app=web msg=\"request failed:\n\
                             injected,host=x value=42 1764000000000000000\n\
                             end\" 1764000000000000000\n";

    #[test]
    fn a_newline_inside_a_string_is_part_of_the_value() {
        let (out, summary) = norm(INJECTION.as_bytes(), Precision::Nanoseconds);
        assert_eq!(summary.error_count, 0, "{:?}", summary.errors);
        assert_eq!(summary.lines, 1);
        assert_eq!(out, INJECTION);
        let line = parse_line(out.trim_end().as_bytes()).unwrap();
        assert_eq!(line.measurement, b"applog");
        let fields = field_values(out.trim_end());
        assert_eq!(
            fields,
            [(
                "msg".to_string(),
                FieldValue::Str(
                    b"request failed:\ninjected,host=x value=42 1764000000000000000\nend"
                )
            )]
        );
        // Not canonical (seconds): rewritten, newlines kept.
        let (out, summary) = norm(b"m s=\"a\nb\",x=1i 17\n", Precision::Seconds);
        assert_eq!(summary.lines, 1);
        assert_eq!(out, "m s=\"a\nb\",x=1i 17000000000\n");
    }

    #[test]
    fn point_ends_honour_quoted_field_strings_only() {
        for (text, end) in [
            ("m f=1\nn f=2\n", Some(5)),
            ("m f=1", None),
            ("\nm f=1\n", Some(0)),
            ("m f=\"a\nb\" 1\nn f=1\n", Some(11)),
            ("m f=\"a\nb\"\n", Some(9)),
            ("m f=1,g=\"a\nb\",h=2i\n", Some(18)),
            // Escaped quotes and backslashes inside the string.
            ("m f=\"a\\\"\nb\"\n", Some(11)),
            ("m f=\"a\\\\\"\nb\"\n", Some(9)),
            ("m f=\"a\\\n\"\n", Some(9)),
            // Not closed yet: the point goes on past the end of the buffer.
            ("m f=\"a\nb", None),
            ("m f=\"a\\\"\n", None),
            ("m f=\"a\\", None),
            // Quotes in the measurement, tags, field keys, other values and the timestamp
            // are literal bytes.
            ("m\"a f=1\nn f=\"x\"\n", Some(7)),
            ("m,t=\"a f=1\n\"\n", Some(10)),
            ("m,t=a\\ \"b f=1\n", Some(13)),
            ("m f\"=1\nn\"\n", Some(6)),
            ("m f=a\"b\nc\"\n", Some(7)),
            ("m f=1 \"12\n\"\n", Some(9)),
            // A comment ends at its newline whatever it holds.
            ("# m f=\"a\nm f=1\n", Some(8)),
            ("  # f=\"\nm f=1\n", Some(7)),
            // After a closed string, only a comma starts another field.
            ("m f=\"a\"x=\"\nn f=1\n", Some(10)),
            ("m f=\"a\" x=\"\nn f=1\n", Some(11)),
            // Outside strings, a newline ends the point even after a backslash.
            ("m\\\nn f=\"\n\"\n", Some(2)),
            ("m f\\\n=\"\n\"\n", Some(4)),
            ("m,t=\\\\\n f=\"\n\"\n", Some(6)),
        ] {
            assert_eq!(point_end(text.as_bytes()), end, "{text:?}");
        }
    }

    #[test]
    fn points_counts_and_cuts_agree() {
        let body = b"a f=\"x\ny\" 1\nb f=1 2\n\nc f=\"\n\n\" 3\nd f=\"open\n";
        let got: Vec<&[u8]> = points(body).collect();
        assert_eq!(
            got,
            [
                &b"a f=\"x\ny\" 1\n"[..],
                b"b f=1 2\n",
                b"\n",
                b"c f=\"\n\n\" 3\n",
                b"d f=\"open\n",
            ]
        );
        assert_eq!(count_points(body), 4);
        assert_eq!(count_points(b"a f=1\nb f=2\n"), 2);
        assert_eq!(last_point_end(body), Some(body.len() - 10));
        assert_eq!(last_point_end(&body[..8]), None);
        assert_eq!(last_point_end(&body[..12]), Some(12));
        assert_eq!(last_point_end(&body[..19]), Some(12));
        assert_eq!(last_point_end(b"a f=1\nb f=2\nc"), Some(12));
        assert_eq!(last_point_end(b""), None);
    }

    #[test]
    fn errors_name_the_physical_line_a_point_starts_on() {
        let body = b"a s=\"1\n2\n3\" 1\nbad\nb s=\"x\ny\",bad 2\nc f=1 3\nd s=\"never\nclosed 4\ne f=1 5\n";
        let (out, summary) = norm(body, Precision::Nanoseconds);
        assert_eq!(out, "a s=\"1\n2\n3\" 1\nc f=1 3\n");
        let lines: Vec<(usize, ParseErrorKind)> = summary
            .errors
            .iter()
            .map(|e| (e.line, e.error.kind))
            .collect();
        // The unterminated string takes in the rest of the body: one invalid point.
        assert_eq!(
            lines,
            [
                (4, MissingFields),
                (5, InvalidFieldFormat),
                (8, UnterminatedString)
            ]
        );
        assert_eq!(
            describe_errors(&summary, summary.lines + summary.error_count),
            "3 of 5 lines invalid: line 4: missing fields (column 4): \"bad\"; \
             line 5: invalid field format (column 14): \"b s=\"x\u{FFFD}y\",bad 2\"; \
             line 8: unterminated string (column 5): \"d s=\"never\u{FFFD}closed 4\u{FFFD}e f=1 5\u{FFFD}\""
        );
    }

    // ---- property tests ----

    /// Bytes biased toward line-protocol syntax so that random input reaches deep states.
    fn lp_bytes() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            3 => prop::sample::select(
                b" ,=\\\"\n\r\t#-.+0123456789eEiutfTFabc".to_vec()
            ),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..300)
    }

    /// Well-formed lines with bits mangled, to exercise error paths near valid input.
    fn mangled_lines() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(valid_line(), 1..6),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        )
            .prop_map(|(lines, edits)| {
                let mut body: Vec<u8> = lines
                    .iter()
                    .flat_map(|l| l.text.bytes().chain([b'\n']))
                    .collect();
                for (at, byte) in edits {
                    let at = at.index(body.len());
                    body[at] = byte;
                }
                body
            })
    }

    fn any_body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![lp_bytes(), mangled_lines()]
    }

    /// The points of `body` that are neither blank nor comments, as `point_end` cuts them.
    fn counted_points(body: &[u8]) -> u64 {
        points(body)
            .filter(|l| {
                let l = l.strip_suffix(b"\n").unwrap_or(l);
                // Trailing blanks and '\r' are trimmed; a leading '\r' is not blank.
                let end = l.len() - l.iter().rev().take_while(|b| b" \t\r".contains(b)).count();
                let first = l[..end].iter().find(|b| !b" \t".contains(b));
                first.is_some_and(|&b| b != b'#')
            })
            .count() as u64
    }

    fn check_output(out: &[u8], summary: &Summary) {
        assert!(out.is_empty() || out.ends_with(b"\n"));
        let mut count = 0;
        for line in points(out) {
            let line = line
                .strip_suffix(b"\n")
                .expect("output points end in a newline");
            assert!(!line.is_empty());
            count += 1;
            let parsed = parse_line(line).unwrap_or_else(|e| {
                panic!(
                    "output line {:?} does not parse: {e}",
                    String::from_utf8_lossy(line)
                )
            });
            let ts = parsed.timestamp.expect("output lines carry a timestamp");
            let mut rebuilt = parsed.key_and_fields.to_vec();
            rebuilt.extend_from_slice(format!(" {ts}").as_bytes());
            assert_eq!(line, &rebuilt[..]);
        }
        assert_eq!(count, summary.lines);
        assert_eq!(
            summary.errors.len() as u64,
            summary.error_count.min(MAX_REPORTED_ERRORS as u64)
        );
    }

    #[derive(Debug, Clone)]
    enum Value {
        Float(f64, String),
        Int(i64),
        UInt(u64),
        Str(String),
        Bool(bool, &'static str),
    }

    #[derive(Debug, Clone)]
    struct Generated {
        text: String,
        measurement: String,
        tags: Vec<(String, String)>,
        fields: Vec<(String, Value)>,
        timestamp: Option<i64>,
    }

    fn name_char() -> impl Strategy<Value = char> {
        prop_oneof![
            6 => prop::char::range('a', 'z'),
            2 => prop::sample::select(vec![',', ' ', '=', '\\', '"', '#', '\t', '-', '.', '0', '\r']),
            1 => prop::sample::select(vec!['é', '東', '\u{1F600}']),
        ]
    }

    fn raw_name() -> impl Strategy<Value = String> {
        prop::collection::vec(name_char(), 1..8).prop_map(|v| v.into_iter().collect())
    }

    /// Escapes for the key section (measurement, tags). Backslashes stay literal, as in
    /// InfluxDB, so a name must not end with one: it would escape the separator after it.
    fn key_safe(raw: String) -> String {
        match raw.strip_suffix('\\') {
            Some(rest) => format!("{rest}/"),
            None => raw,
        }
    }

    fn escape(raw: &str, specials: &[char]) -> String {
        let mut s = String::new();
        for c in raw.chars() {
            if specials.contains(&c) {
                s.push('\\');
            }
            s.push(c);
        }
        s
    }

    /// Field keys are scanned pairwise, so a literal backslash must not precede a special
    /// byte or end the key.
    fn field_key_safe(raw: String) -> String {
        let chars: Vec<char> = raw.chars().collect();
        chars
            .iter()
            .enumerate()
            .map(|(i, &c)| match (c, chars.get(i + 1)) {
                ('\\', None | Some(',' | '=' | ' ' | '\\')) => '/',
                _ => c,
            })
            .collect()
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (any::<f64>().prop_filter("finite", |f| f.is_finite()), 0..3u8).prop_map(|(f, style)| {
                let text = match style {
                    0 => format!("{f}"),
                    1 => format!("{f:e}"),
                    _ => format!("{f:?}"),
                };
                Value::Float(f, text)
            }),
            any::<i64>().prop_map(Value::Int),
            any::<u64>().prop_map(Value::UInt),
            prop::collection::vec(
                prop_oneof![
                    4 => prop::char::range(' ', '~'),
                    1 => prop::sample::select(vec!['\\', '"', '\t', '\r', '\n', 'é', '東', '\u{1F600}']),
                ],
                0..12
            )
            .prop_map(|v| Value::Str(v.into_iter().collect())),
            prop::sample::select(vec![
                (true, "t"), (true, "T"), (true, "true"), (true, "True"), (true, "TRUE"),
                (false, "f"), (false, "F"), (false, "false"), (false, "False"), (false, "FALSE"),
            ])
            .prop_map(|(b, s)| Value::Bool(b, s)),
        ]
    }

    fn valid_line() -> impl Strategy<Value = Generated> {
        let measurement = raw_name()
            .prop_map(key_safe)
            .prop_filter("not a comment or blank-led", |m| {
                !m.starts_with(['#', '\t'])
            });
        let tags = prop::collection::btree_map(
            raw_name().prop_map(key_safe),
            raw_name().prop_map(key_safe),
            0..5,
        )
        .prop_map(|m| m.into_iter().collect::<Vec<_>>())
        .prop_shuffle();
        let field_key = raw_name()
            .prop_map(field_key_safe)
            .prop_filter("blanks before fields are skipped", |k| !k.starts_with('\t'));
        let fields = prop::collection::vec((field_key, value()), 1..5);
        let timestamp = prop::option::of(MIN_TIMESTAMP_NS..=MAX_TIMESTAMP_NS);
        (measurement, tags, fields, timestamp).prop_map(|(measurement, tags, fields, timestamp)| {
            let mut text = escape(&measurement, &[',', ' ']);
            for (k, v) in &tags {
                text.push(',');
                text.push_str(&escape(k, &[',', '=', ' ']));
                text.push('=');
                text.push_str(&escape(v, &[',', '=', ' ']));
            }
            for (n, (k, v)) in fields.iter().enumerate() {
                text.push(if n == 0 { ' ' } else { ',' });
                text.push_str(&escape(k, &[',', '=', ' ']));
                text.push('=');
                match v {
                    Value::Float(_, s) => text.push_str(s),
                    Value::Int(i) => text.push_str(&format!("{i}i")),
                    Value::UInt(u) => text.push_str(&format!("{u}u")),
                    Value::Str(s) => text.push_str(&format!("\"{}\"", escape(s, &['"', '\\']))),
                    Value::Bool(_, s) => text.push_str(s),
                }
            }
            if let Some(ts) = timestamp {
                text.push_str(&format!(" {ts}"));
            }
            Generated {
                text,
                measurement,
                tags,
                fields,
                timestamp,
            }
        })
    }

    proptest! {
        #[test]
        fn normalize_never_panics_and_emits_whole_valid_lines(
            body in any_body(),
            precision in prop::sample::select(vec![
                Precision::Nanoseconds, Precision::Microseconds, Precision::Seconds, Precision::Hours,
            ]),
        ) {
            let mut out = Vec::new();
            let summary = normalize(&body, precision, NOW, &mut out);
            check_output(&out, &summary);
            // normalize cuts where point_end does.
            prop_assert_eq!(summary.lines + summary.error_count, counted_points(&body));
            for e in &summary.errors {
                prop_assert!(e.excerpt.chars().count() <= EXCERPT_BYTES + 3);
                prop_assert!(e.line >= 1);
                let _ = describe_errors(&summary, summary.lines + summary.error_count);
            }
        }

        /// Arbitrary bytes, not biased toward line protocol: whatever comes in,
        /// only whole, valid UTF-8 lines go out, and every other line is counted.
        #[test]
        fn arbitrary_bytes_give_only_valid_utf8_lines(body in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut out = Vec::new();
            let summary = normalize(&body, Precision::Milliseconds, NOW, &mut out);
            check_output(&out, &summary);
            prop_assert!(std::str::from_utf8(&out).is_ok());
            prop_assert_eq!(summary.lines + summary.error_count, counted_points(&body));
        }

        #[test]
        fn iterators_terminate_on_any_sections(tags in lp_bytes(), fields in lp_bytes()) {
            let line = Line {
                measurement: b"m",
                tags: &tags,
                fields: &fields,
                timestamp: None,
                key_and_fields: b"",
            };
            prop_assert!(line.tags().count() <= tags.len());
            prop_assert!(line.fields().count() <= fields.len());
        }

        #[test]
        fn normalize_is_idempotent(body in any_body()) {
            let mut once = Vec::new();
            let first = normalize(&body, Precision::Microseconds, NOW, &mut once);
            let mut twice = Vec::new();
            let second = normalize(&once, Precision::Nanoseconds, 42, &mut twice);
            prop_assert_eq!(second.error_count, 0);
            prop_assert_eq!(second.lines, first.lines);
            prop_assert_eq!(twice, once);
        }

        /// Random points (strings with quotes, backslashes, newlines, multi-byte UTF-8),
        /// serialised and cut at random places into the pieces a writer, a chunked or
        /// gzip-member body, or a growing file delivers: the same points come out whole,
        /// and every cut the queue and the shipper make falls between them.
        #[test]
        fn points_survive_any_cutting(
            gs in prop::collection::vec(valid_line(), 1..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            crlf in any::<bool>(),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let body: String = gs.iter().map(|g| format!("{}{eol}", g.text)).collect();
            let body = body.as_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
            at.sort_unstable();
            at.dedup();
            let mut pieces = Vec::new();
            let mut from = 0;
            for &k in at.iter().chain([&body.len()]) {
                pieces.push(&body[from..k]);
                from = k;
            }

            // The whole body, as the HTTP path sees it once collected (and inflated: gzip
            // members made of the pieces inflate to the same bytes).
            let mut whole = Vec::new();
            let summary = normalize(body, Precision::Nanoseconds, NOW, &mut whole);
            prop_assert_eq!(summary.error_count, 0, "{:?}", summary.errors);
            prop_assert_eq!(summary.lines as usize, gs.len());
            let mut members = Vec::new();
            for p in &pieces {
                members.extend(crate::ship::gzip(p, 1));
            }
            let inflated = crate::ingest::body::decompress(&members, 1 << 20).unwrap();
            prop_assert_eq!(&inflated[..], body);

            // Each output point holds exactly the generated strings.
            let got: Vec<&[u8]> = points(&whole).collect();
            prop_assert_eq!(got.len(), gs.len());
            for (point, g) in got.iter().zip(&gs) {
                let line = parse_line(point).unwrap();
                let strings: Vec<Vec<u8>> = line.fields().filter_map(|(_, v)| match v {
                    FieldValue::Str(s) => Some(string_unescaped(s).into_owned()),
                    _ => None,
                }).collect();
                let want: Vec<Vec<u8>> = g.fields.iter().filter_map(|(_, v)| match v {
                    Value::Str(s) => Some(s.as_bytes().to_vec()),
                    _ => None,
                }).collect();
                prop_assert_eq!(strings, want);
            }

            // As the tail source reads a file growing by the pieces: whole points only,
            // the rest waits for more bytes.
            let mut pending = Vec::new();
            let mut followed = Vec::new();
            for p in &pieces {
                pending.extend_from_slice(p);
                if let Some(k) = last_point_end(&pending) {
                    let s = normalize(&pending[..k], Precision::Nanoseconds, NOW, &mut followed);
                    prop_assert_eq!(s.error_count, 0);
                    pending.drain(..k);
                }
            }
            prop_assert!(pending.is_empty(), "left over: {:?}", String::from_utf8_lossy(&pending));
            prop_assert_eq!(&followed, &whole);

            // Cuts of the queued form: any prefix is cut at a point boundary, and the
            // counts agree with the points.
            prop_assert_eq!(count_points(&whole), gs.len());
            let ends: Vec<usize> = got.iter().scan(0, |n, p| { *n += p.len(); Some(*n) }).collect();
            for &k in &at {
                let k = k.min(whole.len());
                let cut = last_point_end(&whole[..k]);
                let want = ends.iter().copied().rfind(|&e| e <= k);
                prop_assert_eq!(cut, want);
            }
        }

        #[test]
        fn generated_lines_validate_and_round_trip(g in valid_line()) {
            let line = parse_line(g.text.as_bytes())
                .unwrap_or_else(|e| panic!("{:?} rejected: {e}", g.text));
            prop_assert_eq!(line.timestamp, g.timestamp);
            prop_assert_eq!(&*measurement_unescaped(line.measurement), g.measurement.as_bytes());
            let tags: Vec<_> = line.tags().collect();
            prop_assert_eq!(tags.len(), g.tags.len());
            for ((k, v), (rk, rv)) in tags.iter().zip(&g.tags) {
                prop_assert_eq!(&*tag_unescaped(k), rk.as_bytes());
                prop_assert_eq!(&*tag_unescaped(v), rv.as_bytes());
            }
            let fields: Vec<_> = line.fields().collect();
            prop_assert_eq!(fields.len(), g.fields.len());
            for ((k, v), (rk, rv)) in fields.iter().zip(&g.fields) {
                prop_assert_eq!(&*tag_unescaped(k), rk.as_bytes());
                match (v, rv) {
                    (FieldValue::Float(a), Value::Float(b, _)) => prop_assert_eq!(a, b),
                    (FieldValue::Int(a), Value::Int(b)) => prop_assert_eq!(a, b),
                    (FieldValue::UInt(a), Value::UInt(b)) => prop_assert_eq!(a, b),
                    (FieldValue::Str(a), Value::Str(b)) => {
                        prop_assert_eq!(&*string_unescaped(a), b.as_bytes())
                    }
                    (FieldValue::Bool(a), Value::Bool(b, _)) => prop_assert_eq!(a, b),
                    (a, b) => prop_assert!(false, "{:?} decoded as {:?}", b, a),
                }
            }

            let mut out = Vec::new();
            let summary = normalize(g.text.as_bytes(), Precision::Nanoseconds, NOW, &mut out);
            prop_assert_eq!(summary.error_count, 0);
            prop_assert_eq!(summary.lines, 1);
            let expected = format!("{} {}\n", g.text.split_at(line.key_and_fields.len()).0, g.timestamp.unwrap_or(NOW));
            prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
