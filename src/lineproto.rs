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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Valid lines appended to `out`.
    pub lines: u64,
    /// The first [`MAX_REPORTED_ERRORS`] invalid lines.
    pub errors: Vec<LineError>,
    /// All invalid lines.
    pub error_count: u64,
    /// Valid lines that had no timestamp and were given `now_ns`.
    pub stamped: u64,
    /// The earliest timestamp a valid line came with (ns; `i64::MAX` when
    /// none came with one).
    pub earliest: i64,
}

impl Default for Summary {
    fn default() -> Summary {
        Summary {
            lines: 0,
            errors: Vec::new(),
            error_count: 0,
            stamped: 0,
            earliest: i64::MAX,
        }
    }
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
    normalize_chunked(
        body,
        precision,
        now_ns,
        refuse_unsigned,
        out,
        usize::MAX,
        |_| {},
    )
}

/// As [`normalize_with`], handing the lines on as they are made instead of
/// holding them all: whenever `out` would pass `chunk` bytes, the longest
/// run of whole points in it of at most `chunk` bytes (a longer point alone)
/// goes to `emit` and leaves `out`, as [`crate::queue::deflate_lines`] would
/// cut the whole output. What is left in `out` at the end is the last run.
/// A body is thus compressed while it is read, and its normalised copy never
/// exists whole beside it.
pub fn normalize_chunked(
    body: &[u8],
    precision: Precision,
    now_ns: i64,
    refuse_unsigned: bool,
    out: &mut Vec<u8>,
    chunk: usize,
    mut emit: impl FnMut(&[u8]),
) -> Summary {
    let mut summary = Summary::default();
    // A timestamp more per line, for a run of the size of a chunk: the body's
    // ratio is not known, so the vector grows to what the runs need.
    out.reserve(body.len().min(chunk.saturating_add(chunk / 8)) + 1);
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
                    None => {
                        summary.stamped += 1;
                        Some(now_ns)
                    }
                    Some(ts) => precision.to_nanos(ts),
                };
                match ns {
                    Some(ns) => {
                        summary.lines += 1;
                        if p.line.timestamp.is_some() {
                            summary.earliest = summary.earliest.min(ns);
                        }
                        let start = out.len();
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
                        if out.len() > chunk {
                            // The run before this point fits; this point
                            // starts the next run, or is a run of its own.
                            if start > 0 {
                                emit(&out[..start]);
                                out.drain(..start);
                            }
                            if out.len() > chunk {
                                emit(out);
                                out.clear();
                            }
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

/// The series key of a normalised point: its measurement and tags, up to
/// the first space that no backslash escapes.
pub fn series_key(point: &[u8]) -> &[u8] {
    &point[..scan_key(point, 0, C_SPACE)]
}

/// What names a normalised point at the remote: its series key and its
/// timestamp (`i64::MIN` if it has none). Two writes of the same series and
/// time are one point there, whose fields the later write overwrites.
pub fn series_and_time(point: &[u8]) -> (&[u8], i64) {
    let body = point.strip_suffix(b"\n").unwrap_or(point);
    let ts = body
        .iter()
        .rposition(|&c| c == b' ')
        .and_then(|k| std::str::from_utf8(&body[k + 1..]).ok()?.parse().ok())
        .unwrap_or(i64::MIN);
    (series_key(point), ts)
}

/// The points of `lines` (whole, normalised, each ending in `\n`) reordered
/// by series, then by timestamp, into `out`. The sort is stable, so points
/// of one series and time keep their order and the last still wins at the
/// remote. Points of a series side by side compress better: gzip finds the
/// repeated key and the nearly equal timestamps within its window.
pub fn order_by_series(lines: &[u8], out: &mut Vec<u8>) {
    let mut pts: Vec<(&[u8], i64, &[u8])> = points(lines)
        .map(|p| {
            let (series, ts) = series_and_time(p);
            (series, ts, p)
        })
        .collect();
    pts.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    out.clear();
    out.reserve(lines.len());
    for (_, _, p) in pts {
        out.extend_from_slice(p);
        if !p.ends_with(b"\n") {
            out.push(b'\n');
        }
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
mod tests;
