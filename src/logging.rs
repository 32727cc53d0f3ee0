//! Log output on stderr. Under systemd (`JOURNAL_STREAM` set) each line
//! starts with a syslog priority prefix (`<3>`) that journald turns into the
//! entry's priority, and carries no timestamp, since journald adds its own;
//! elsewhere lines carry an RFC 3339 timestamp and the level.

use std::io::Write as _;

use log::{Level, LevelFilter};

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
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
        // At trace level ureq's protocol layer hex-dumps every byte it
        // sends, the Authorization header included; a credential must not
        // reach a log even when asked for everything.
        if spec.contains("trace") {
            b.filter_module("ureq_proto", LevelFilter::Debug);
        }
    }
    b.format(move |buf, record| {
        if journald {
            writeln!(buf, "<{}>{}", priority(record.level()), record.args())
        } else {
            writeln!(
                buf,
                "{} {:<5} {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        }
    });
    let _ = b.try_init();
}
