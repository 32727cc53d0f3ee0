//! Log output on stderr. Under systemd (`JOURNAL_STREAM` set) each line
//! starts with a syslog priority prefix (`<3>`) that journald turns into the
//! entry's priority, and carries no timestamp, since journald adds its own;
//! elsewhere lines carry an RFC 3339 timestamp and the level.
//!
//! Two guarantees hold whatever a log call formats and whatever `RUST_LOG`
//! asks for, because they are enforced here, at the one place every record
//! passes, rather than at each call site:
//!
//! - One record is one line. Much of what is logged comes from outside (a
//!   remote's error message, a file name in a tailed directory, a request's
//!   bucket name), and a newline in it would start a line of the sender's
//!   choosing: under journald a line starting with `<3>` becomes an entry of
//!   error priority. Control characters (C0, DEL, C1) and the Unicode line
//!   and paragraph separators are therefore written escaped ([`escape`]),
//!   which also keeps ANSI sequences from reaching an operator's terminal.
//! - No credential is printed. At trace level the HTTP crates dump the bytes
//!   they send and receive, the `Authorization` header included. `RUST_LOG`
//!   accepts levels in any case (`Trace`, `TRACE`), module filters
//!   (`ureq_proto=Trace`, or `ureq_proto` alone, which means trace) and
//!   longer paths (`ureq_proto::util=trace`) that outrank a shorter filter,
//!   so no rewriting of the spec is sure to catch them all; instead trace
//!   records of those crates are dropped ([`WIRE_CRATES`]).

use std::borrow::Cow;
use std::fmt;
use std::io::Write as _;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Crates whose trace output holds raw request or response bytes (headers
/// and all): ureq's protocol layer on the shipping side, hyper and h2 on
/// the serving side. Their records above debug level are never written.
pub const WIRE_CRATES: &[&str] = &["ureq_proto", "hyper", "hyper_util", "h2"];

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Whether a record of `level` from `target` may be written at all.
pub fn allowed(target: &str, level: Level) -> bool {
    if level <= Level::Debug {
        return true;
    }
    let krate = target.split("::").next().unwrap_or(target);
    !WIRE_CRATES.contains(&krate)
}

/// Text from outside made safe for one log line: control characters are
/// written as escapes (`\n`, `\r`, `\t`, `\x1b`, `\u{85}`), everything else
/// as it is. Borrowed when there is nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

fn push_escaped(out: &mut String, c: char) {
    use fmt::Write as _;
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x80 && needs_escape(c) => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// A `Display` wrapper that prints its text through [`escape`], for
/// messages written outside the logger (the CLI's tables and errors).
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

/// env_logger behind the two guarantees of the module comment.
struct Guard {
    inner: env_logger::Logger,
}

impl Log for Guard {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        allowed(metadata.target(), metadata.level()) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if allowed(record.target(), record.level()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the logger; `RUST_LOG`, when set, overrides `level`.
pub fn init(level: LevelFilter) {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut b = env_logger::Builder::new();
    b.filter_level(level)
        // Libraries' chatter stays below our own info level.
        .filter_module("ureq", LevelFilter::Warn)
        .filter_module("ureq_proto", LevelFilter::Warn)
        .filter_module("rustls", LevelFilter::Warn)
        .filter_module("hyper", LevelFilter::Warn)
        .filter_module("hyper_util", LevelFilter::Warn);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.format(move |buf, record| {
        let message = record.args().to_string();
        let message = escape(&message);
        if journald {
            writeln!(buf, "<{}>{message}", priority(record.level()))
        } else {
            writeln!(
                buf,
                "{} {:<5} {message}",
                buf.timestamp_millis(),
                record.level(),
            )
        }
    });
    let inner = b.build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Guard { inner })).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_plain_text_borrowed() {
        for s in ["", "replication \"r1\": 204", "ünïcödé ✓", "back\\slash"] {
            assert!(matches!(escape(s), Cow::Borrowed(t) if t == s), "{s:?}");
        }
    }

    #[test]
    fn escape_writes_control_characters_as_escapes() {
        let cases = [
            ("a\nb", "a\\nb"),
            ("a\r\nb", "a\\r\\nb"),
            ("\n<3>forged", "\\n<3>forged"),
            ("red\x1b[31m", "red\\x1b[31m"),
            ("tab\there", "tab\\there"),
            ("nul\0del\x7f", "nul\\x00del\\x7f"),
            ("c1 \u{85} \u{9b}31m", "c1 \\u{85} \\u{9b}31m"),
            ("ls \u{2028} ps \u{2029}", "ls \\u{2028} ps \\u{2029}"),
        ];
        for (input, want) in cases {
            assert_eq!(escape(input), want, "{input:?}");
            assert_eq!(Escaped(input).to_string(), want, "{input:?}");
            assert!(!escape(input).chars().any(needs_escape), "{input:?}");
        }
    }

    #[test]
    fn wire_crates_never_log_above_debug() {
        for krate in WIRE_CRATES {
            let module = format!("{krate}::client::sub");
            for target in [*krate, module.as_str()] {
                assert!(!allowed(target, Level::Trace), "{target}");
                assert!(allowed(target, Level::Debug), "{target}");
                assert!(allowed(target, Level::Error), "{target}");
            }
        }
        // Other crates, and crates whose name only starts the same way,
        // keep their trace output.
        for target in ["edge_replicator::ship", "ureq::run", "rustls", "hyperx"] {
            assert!(allowed(target, Level::Trace), "{target}");
        }
    }
}
