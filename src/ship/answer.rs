//! What a refusal says: the InfluxDB family does not answer a bad write
//! alike, and reading the answer right decides between losing data, wasting
//! the link, and doing neither.
//!
//! The answers this module reads (what the agent then does with each is in
//! the README's "What happens on each remote answer"):
//! - 3.x Serverless and Dedicated (IOx): 400 with `"line": N` and a message
//!   listing up to 100 `error parsing line N (1-based): ...`;
//! - 3.x Core and Enterprise: `{"error": .., "data": {"line_number": N,
//!   "original_line": ..}}`, or `data` as a list of such objects after a
//!   partial write (`partial write of line protocol occurred`);
//! - OSS 1.x and 2.x: `partial write: ... dropped=N` (the rest was written);
//! - messages about the server rather than the lines: Core's `wal buffer
//!   full, please try again`, a soft-deleted database, limits exceeded.
//!
//! Everything here is a pure function of the body's bytes, so it is tested
//! without a server; line numbers are only *claims* here, checked against the
//! body actually sent by [`named_lines`].

use std::ops::Range;

/// How much of a remote's answer is read: enough for a list of 100 named
/// lines with long messages, bounded so that a misbehaving remote cannot make
/// the agent hold megabytes per answer.
pub const MAX_BODY: u64 = 64 * 1024;

/// How much of the remote's message goes into a log line or the status: the
/// whole body is parsed, only this much is repeated to the operator.
pub const MAX_LOGGED: usize = 2048;

/// IOx names at most this many refused lines; a list that long may have
/// been cut, so the lines after it cannot be assumed written.
const IOX_NAMED_CAP: usize = 100;

/// Phrases that put the cause on the server's side: retrying later succeeds
/// (a full write buffer) or needs an operator there (a deleted database,
/// limits), and the lines themselves are fine either way.
const SERVER_SIDE: &[&str] = &[
    "buffer full",
    "please try again",
    "try again later",
    "soft delete",
    "soft-delete",
    "limit exceeded",
    "limits exceeded",
    "exceeded limit",
    "limits were hit",
    "max series",
];

/// What an answer's body says about the lines of the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detail {
    /// Refused lines, as 1-based physical line numbers of the body sent,
    /// sorted and without repeats.
    pub lines: Vec<usize>,
    /// Lines whose text the remote quoted with their number (Core's
    /// `original_line`): the text must match the body sent.
    pub quoted: Vec<(usize, String)>,
    /// `dropped=N`: how many lines were refused, when the remote gives only
    /// a count.
    pub dropped: Option<u64>,
    /// The remote says it wrote the lines it did not refuse.
    pub partial: bool,
    /// `lines` is the whole list of refused lines, not only the first or a
    /// list cut at the remote's cap.
    pub complete: bool,
    /// The message names a cause on the server's side, not in the lines.
    pub server_side: bool,
}

/// Reads the body of an answer (any status) for what it says about lines.
/// `message` is the remote's message as [`message_of`] extracted it.
pub fn read_detail(body: &[u8], message: &str) -> Detail {
    let lower = message.to_ascii_lowercase();
    let mut d = Detail {
        partial: lower.contains("partial write") && !lower.contains("no data written"),
        server_side: SERVER_SIDE.iter().any(|p| lower.contains(p)),
        dropped: dropped_count(&lower),
        ..Detail::default()
    };
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    // IOx: "error parsing line N (1-based)" in the message (the whole list).
    let listed = iox_lines(message);
    let listed_len = listed.len();
    d.lines.extend(listed);
    let mut first_only = false;
    if let Some(v) = &json {
        // IOx: "line" is the first refused line.
        if let Some(n) = v.get("line").and_then(as_line_number) {
            if !d.lines.contains(&n) {
                first_only = true;
            }
            d.lines.push(n);
        }
        // Core/Enterprise: "data" is one object or a list of them.
        match v.get("data") {
            Some(serde_json::Value::Array(items)) => {
                for item in items {
                    add_core_line(&mut d, item);
                }
            }
            Some(item @ serde_json::Value::Object(_)) => {
                add_core_line(&mut d, item);
                // A lone object is the first error of a refused batch.
                first_only = true;
            }
            _ => {}
        }
    }
    d.lines.sort_unstable();
    d.lines.dedup();
    d.complete = !d.lines.is_empty() && !first_only && listed_len < IOX_NAMED_CAP;
    d
}

fn add_core_line(d: &mut Detail, item: &serde_json::Value) {
    let Some(n) = item.get("line_number").and_then(as_line_number) else {
        return;
    };
    d.lines.push(n);
    if let Some(text) = item.get("original_line").and_then(|t| t.as_str()) {
        d.quoted.push((n, text.to_string()));
    }
}

/// A line number as JSON gives it; 0, negative and fractional numbers are
/// kept out here (0 as an impossible number that [`named_lines`] refuses).
fn as_line_number(v: &serde_json::Value) -> Option<usize> {
    v.as_u64().map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// The numbers in "error parsing line N (1-based)".
fn iox_lines(message: &str) -> Vec<usize> {
    const HEAD: &str = "error parsing line ";
    let mut out = Vec::new();
    let mut rest = message;
    while let Some(i) = rest.find(HEAD) {
        rest = &rest[i + HEAD.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest[digits..].starts_with(" (1-based)") {
            out.push(rest[..digits].parse().unwrap_or(usize::MAX));
        }
    }
    out
}

/// `dropped=N` in a (lower-cased) message.
fn dropped_count(lower: &str) -> Option<u64> {
    let i = lower.find("dropped=")?;
    let digits: String = lower[i + 8..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The remote's own words: InfluxDB answers `{"code":..,"message":..}` (v2),
/// `{"error":..}` (v1, and 3.x with a `data.error_message` beside it);
/// anything else is kept as text.
pub fn message_of(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let Some(v) = parsed else {
        return String::from_utf8_lossy(body).trim().to_string();
    };
    let mut msg = v
        .get("message")
        .or_else(|| v.get("error"))
        .and_then(|m| m.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    let first = match v.get("data") {
        Some(serde_json::Value::Array(items)) => items.first(),
        other => other,
    };
    if let Some(e) = first
        .and_then(|d| d.get("error_message"))
        .and_then(|e| e.as_str())
    {
        let line = first
            .and_then(|d| d.get("line_number"))
            .and_then(|n| n.as_u64());
        msg = match line {
            Some(n) => format!("{msg}: line {n}: {e}"),
            None => format!("{msg}: {e}"),
        };
    }
    msg
}

/// The first `MAX_LOGGED` bytes of a message (cut at a character), saying
/// how much was left out.
pub fn shorten(message: &str) -> String {
    if message.len() <= MAX_LOGGED {
        return message.to_string();
    }
    let mut end = MAX_LOGGED;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{} ... ({} more bytes)",
        &message[..end],
        message.len() - end
    )
}

/// The byte ranges, within `body` (the decompressed lines sent, each ending
/// in '\n'), of the lines `detail` names; `None` when it names none, or when
/// any claim does not fit the body (a number out of range, a quoted line that
/// differs): a remote that is wrong about one line is trusted about none.
///
/// A body holding a point whose string value spans lines is not read by
/// line number at all: whether a remote counts such a point as one line or
/// as several is not something the agent can know, and a guess could set
/// aside part of a point, or the wrong one.
pub fn named_lines(body: &[u8], detail: &Detail) -> Option<Vec<Range<usize>>> {
    if detail.lines.is_empty() {
        return None;
    }
    if crate::lineproto::count_points(body) != memchr::memchr_iter(b'\n', body).count() {
        return None;
    }
    let mut starts = Vec::with_capacity(detail.lines.len());
    let mut want = detail.lines.iter().peekable();
    let mut start = 0;
    for (i, end) in memchr::memchr_iter(b'\n', body).enumerate() {
        let number = i + 1;
        while want.next_if(|&&n| n == number).is_some() {
            starts.push(start..end + 1);
        }
        if want.peek().is_none() {
            break;
        }
        start = end + 1;
    }
    if want.peek().is_some() || detail.lines.contains(&0) {
        return None;
    }
    for (n, text) in &detail.quoted {
        let i = detail.lines.binary_search(n).ok()?;
        let line = &body[starts[i].clone()];
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line != text.trim_end_matches(['\n', '\r']).as_bytes() {
            return None;
        }
    }
    Some(starts)
}

/// The message quotes the line (its first 64 bytes, or all of a shorter
/// line), as InfluxDB 1.x/2.x and Cloud 2 do in `unable to parse '<line>'`.
pub fn quotes(message: &str, line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut end = line.len().min(64);
    let text = loop {
        match std::str::from_utf8(&line[..end]) {
            Ok(t) => break t,
            Err(e) => end = e.valid_up_to(),
        }
    };
    !text.trim().is_empty() && message.contains(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(body: &str) -> Detail {
        read_detail(body.as_bytes(), &message_of(body.as_bytes()))
    }

    #[test]
    fn iox_named_lines_are_read_whole() {
        let body = r#"{"code":"invalid","line":2,"message":"failed to parse line protocol: errors encountered on line(s):\nerror parsing line 2 (1-based): Invalid measurement was provided\nerror parsing line 4 (1-based): Unable to parse timestamp value '123'"}"#;
        let d = detail(body);
        assert_eq!(d.lines, vec![2, 4]);
        assert!(d.complete);
        assert!(!d.partial, "IOx does not say whether the rest was written");
        assert!(!d.server_side);
        assert_eq!(d.dropped, None);
    }

    #[test]
    fn a_list_at_the_iox_cap_is_not_complete() {
        let mut msg = String::from("failed to parse line protocol: errors encountered on line(s):");
        for n in 1..=100 {
            msg.push_str(&format!("\nerror parsing line {n} (1-based): bad"));
        }
        let body = serde_json::json!({"code":"invalid","line":1,"message":msg}).to_string();
        let d = detail(&body);
        assert_eq!(d.lines.len(), 100);
        assert!(!d.complete);
    }

    #[test]
    fn only_the_first_line_is_not_the_whole_list() {
        let d = detail(r#"{"code":"invalid","line":7,"message":"bad lines"}"#);
        assert_eq!(d.lines, vec![7]);
        assert!(!d.complete);
    }

    #[test]
    fn core_v1_names_its_first_refused_line() {
        let body = r#"{"error":"parsing failed for write_lp endpoint","data":{"original_line":"cpu,host=a usage=","line_number":3,"error_message":"No fields were provided"}}"#;
        let d = detail(body);
        assert_eq!(d.lines, vec![3]);
        assert_eq!(d.quoted, vec![(3, "cpu,host=a usage=".to_string())]);
        assert!(!d.partial && !d.complete);
        assert_eq!(
            message_of(body.as_bytes()),
            "parsing failed for write_lp endpoint: line 3: No fields were provided"
        );
    }

    #[test]
    fn core_partial_writes_list_every_refused_line() {
        let body = r#"{"error":"partial write of line protocol occurred","data":[{"original_line":"a x=","line_number":1,"error_message":"e"},{"original_line":"b y=","line_number":5,"error_message":"e"}]}"#;
        let d = detail(body);
        assert_eq!(d.lines, vec![1, 5]);
        assert!(d.partial && d.complete);
    }

    #[test]
    fn oss_partial_writes_give_a_count() {
        let d = detail(
            r#"{"code":"unprocessable entity","message":"failure writing points to database: partial write: points beyond retention policy dropped=17"}"#,
        );
        assert_eq!(d.dropped, Some(17));
        assert!(d.partial);
        assert!(d.lines.is_empty() && !d.complete);
        let d = detail(
            r#"{"error":"partial write: field type conflict: input field \"v\" on measurement \"m\" is type float, already exists as type integer dropped=2"}"#,
        );
        assert_eq!((d.dropped, d.partial), (Some(2), true));
        assert_eq!(detail("dropped=").dropped, None);
    }

    #[test]
    fn server_side_causes_are_recognised() {
        for body in [
            r#"{"code":"invalid","message":"error from wal: wal buffer full, please try again"}"#,
            r#"{"error":"database \"x\" is soft deleted"}"#,
            r#"{"error":"partial write: max-values-per-tag limit exceeded (100000/100000): measurement=\"m\" dropped=1"}"#,
            r#"{"error":"partial write of line protocol occurred, but limits were hit","data":[]}"#,
        ] {
            assert!(detail(body).server_side, "{body}");
        }
        for body in [
            r#"{"code":"invalid","message":"unable to parse 'm v=': missing field value"}"#,
            r#"{"code":"unprocessable entity","message":"partial write: points beyond retention policy dropped=1"}"#,
        ] {
            assert!(!detail(body).server_side, "{body}");
        }
    }

    #[test]
    fn no_data_written_is_not_a_partial_write() {
        let d = detail(
            r#"{"code":"invalid","message":"no data written, partial write would have occurred: errors encountered on line(s): error parsing line 1 (1-based): x"}"#,
        );
        assert!(!d.partial);
        assert_eq!(d.lines, vec![1]);
    }

    #[test]
    fn plain_text_and_empty_bodies_say_nothing_about_lines() {
        for body in [
            "",
            "bad gateway",
            "<html>error parsing line x</html>",
            "{\"line\":-3}",
        ] {
            let d = detail(body);
            assert!(d.lines.is_empty(), "{body:?}: {d:?}");
            assert!(!d.partial && !d.complete && !d.server_side, "{body:?}");
        }
        assert_eq!(message_of(b"  bad gateway \n"), "bad gateway");
        assert_eq!(
            message_of(br#"{"code":"invalid","message":"partial write: field type conflict"}"#),
            "partial write: field type conflict"
        );
    }

    #[test]
    fn named_lines_map_to_the_body_sent() {
        let body = b"a v=1\nb v=2\nc v=3\nd v=4\n";
        let d = Detail {
            lines: vec![2, 4],
            ..Detail::default()
        };
        let r = named_lines(body, &d).unwrap();
        assert_eq!(r, vec![6..12, 18..24]);
        assert_eq!(&body[r[0].clone()], b"b v=2\n");
        assert_eq!(&body[r[1].clone()], b"d v=4\n");
        let first = Detail {
            lines: vec![1],
            ..Detail::default()
        };
        let r = named_lines(body, &first).unwrap();
        assert_eq!((r.len(), r[0].clone()), (1, 0..6));
    }

    #[test]
    fn line_numbers_are_not_trusted_when_a_point_spans_lines() {
        let body = b"a v=1\nb s=\"x\ny\"\nc v=3\n";
        for lines in [vec![1], vec![2], vec![3], vec![4]] {
            let d = Detail {
                lines: lines.clone(),
                ..Detail::default()
            };
            assert_eq!(named_lines(body, &d), None, "{lines:?}");
        }
    }

    #[test]
    fn claims_that_do_not_fit_the_body_are_not_trusted() {
        let body = b"a v=1\nb v=2\n";
        for lines in [vec![], vec![0], vec![3], vec![1, 3], vec![usize::MAX]] {
            let d = Detail {
                lines: lines.clone(),
                ..Detail::default()
            };
            assert_eq!(named_lines(body, &d), None, "{lines:?}");
        }
        let quoted = |text: &str| Detail {
            lines: vec![2],
            quoted: vec![(2, text.to_string())],
            ..Detail::default()
        };
        let r = named_lines(body, &quoted("b v=2")).unwrap();
        assert_eq!((r.len(), r[0].clone()), (1, 6..12));
        assert_eq!(named_lines(body, &quoted("a v=1")), None);
    }

    #[test]
    fn quoting_a_line_is_recognised() {
        let line = b"poison,kind=a value=1 123\n";
        assert!(quotes(
            "unable to parse 'poison,kind=a value=1 123': bad",
            line
        ));
        assert!(!quotes("unable to parse 'other v=1': bad", line));
        assert!(!quotes("anything", b"\n"));
        let long = format!("m,t={} v=1 1\n", "x".repeat(200));
        assert!(quotes(
            &format!("unable to parse '{}...'", &long[..80]),
            long.as_bytes()
        ));
        // A cut inside a multi-byte character is not a panic.
        let utf = format!("{}é v=1\n", "m".repeat(63));
        assert!(quotes(&utf[..63], utf.as_bytes()));
    }

    #[test]
    fn long_messages_are_shortened_for_logs_only() {
        let long = "é".repeat(MAX_LOGGED);
        let s = shorten(&long);
        assert!(s.len() < MAX_LOGGED + 40, "{}", s.len());
        assert!(s.ends_with(&format!("({} more bytes)", long.len() - MAX_LOGGED)));
        assert_eq!(shorten("short"), "short");
    }
}
