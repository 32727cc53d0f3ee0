//! The tables of `edge-replicator status`: one of replications, then one of
//! held destinations and one of sources (when there are any). Cells come from the typed status report;
//! an empty text or an absent value shows as "-".

use std::fmt::{Display, Write as _};

use crate::status::{HeldReport, ReplicationReport, SourceReport, StatusReport};

/// A cell of text: "-" when empty, escaped otherwise (a remote's message may
/// hold control characters; a table on a terminal must not run them).
fn text(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        crate::logging::escape(s).into_owned()
    }
}

/// A cell of a value that may be absent.
fn maybe<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// A column: its header and how a row fills it.
type Column<T> = (&'static str, fn(&T) -> String);

const REPLICATION_COLUMNS: [Column<ReplicationReport>; 16] = [
    ("NAME", |r| text(&r.name)),
    ("REMOTE", |r| text(&r.remote)),
    ("LOCAL BUCKET", |r| text(&r.local_bucket)),
    ("REMOTE BUCKET", |r| text(&r.remote_bucket)),
    ("STATE", |r| r.state.as_str().to_string()),
    ("LINK", |r| r.link.as_str().to_string()),
    ("QUEUED BYTES", |r| r.current_queue_size_bytes.to_string()),
    ("MAX BYTES", |r| r.max_queue_size_bytes.to_string()),
    ("REMAINING LINES", |r| r.remaining_lines.to_string()),
    ("OLDEST AGE S", |r| maybe(r.oldest_entry_age_seconds)),
    ("LATEST CODE", |r| maybe(r.latest_response_code)),
    ("DELIVERED", |r| r.delivered_lines.to_string()),
    ("DROPPED", |r| r.dropped_full_lines.to_string()),
    ("EXPIRED", |r| r.expired_lines.to_string()),
    ("DEAD LETTERED", |r| r.dead_lettered_lines.to_string()),
    ("LATEST ERROR", |r| text(&r.latest_error_message)),
];

const SOURCE_COLUMNS: [Column<SourceReport>; 9] = [
    ("KIND", |s| text(&s.kind)),
    ("NAME", |s| text(&s.name)),
    ("BUCKET", |s| text(&s.bucket)),
    ("STATE", |s| s.state.as_str().to_string()),
    ("LINES", |s| s.lines_queued.to_string()),
    ("INVALID", |s| s.invalid_lines.to_string()),
    ("LAG BYTES", |s| s.lag_bytes.to_string()),
    // Tail sources have no segments.
    ("MISSED SEGMENTS", |s| maybe(s.wal_segments_missed)),
    ("LATEST ERROR", |s| text(&s.latest_error_message)),
];

/// A held destination and its replication.
pub type HeldRow = (String, HeldReport);

const HELD_COLUMNS: [Column<HeldRow>; 7] = [
    ("REPLICATION", |(r, _)| text(r)),
    ("DESTINATION", |(_, h)| text(&h.destination)),
    ("CODE", |(_, h)| h.code.to_string()),
    ("SINCE", |(_, h)| h.since.to_string()),
    ("LINES", |(_, h)| h.lines.to_string()),
    ("BYTES", |(_, h)| h.bytes.to_string()),
    ("MESSAGE", |(_, h)| text(&h.message)),
];

/// Columns as wide as their widest cell, two spaces apart; the last one
/// (an error message) is not padded.
fn layout<T>(columns: &[Column<T>], items: &[T]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|(_, cell)| cell(item)).collect())
        .collect();
    let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            std::iter::once(&header)
                .chain(&rows)
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let last = r.len() - 1;
        for (i, c) in r.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push('\n');
    }
    out
}

/// The replications table.
pub fn replications(status: &StatusReport) -> String {
    layout(&REPLICATION_COLUMNS, &status.replications)
}

/// The held destinations of `status` (of replication `only`, if given).
pub fn held_rows(status: &StatusReport, only: Option<&str>) -> Vec<HeldRow> {
    status
        .replications
        .iter()
        .filter(|r| only.is_none_or(|n| n == r.name))
        .flat_map(|r| {
            r.held_destinations
                .iter()
                .map(|h| (r.name.clone(), h.clone()))
        })
        .collect()
}

/// A table of held destinations.
pub fn held_table(rows: &[HeldRow]) -> String {
    layout(&HELD_COLUMNS, rows)
}

/// The held destinations table, after a blank line; empty without any.
pub fn held(status: &StatusReport) -> String {
    let rows = held_rows(status, None);
    if rows.is_empty() {
        return String::new();
    }
    format!("\n{}", held_table(&rows))
}

/// The sources table, after a blank line; empty without sources.
pub fn sources(status: &StatusReport) -> String {
    if status.sources.is_empty() {
        return String::new();
    }
    format!("\n{}", layout(&SOURCE_COLUMNS, &status.sources))
}

/// A line about the system clock, after a blank line, when it is not known
/// to be right: lines the agent stamps then may carry a wrong time.
pub fn clock(status: &StatusReport) -> String {
    let Some(c) = &status.clock else {
        return String::new();
    };
    let why = match c.state.as_str() {
        "synchronised" => return String::new(),
        "before-build" => format!("earlier than this agent's build ({})", c.not_before),
        "unsynchronised" => "no time service has set it".to_string(),
        _ => "its synchronisation cannot be read".to_string(),
    };
    let held = if c.holding {
        "; the queue holds what is written until it is synchronised"
    } else {
        ""
    };
    format!(
        "\nclock: {} ({why}); {} lines without a timestamp were stamped with it{held}\n",
        text(&c.state),
        c.lines_stamped_unsynchronised
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ClockReport, SourceState, State, Timestamp};

    fn cells(line: &str) -> Vec<&str> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    #[test]
    fn replications_show_absent_values_as_dashes() {
        let status = StatusReport {
            budgets: Vec::new(),
            clock: None,
            replications: vec![ReplicationReport {
                name: "r1".into(),
                remote: "cloud".into(),
                local_bucket: "b".into(),
                remote_bucket: "rb".into(),
                state: State::Backoff,
                current_queue_size_bytes: 120,
                max_queue_size_bytes: 1000,
                remaining_lines: 3,
                latest_response_code: Some(503),
                delivered_lines: 7,
                latest_error_message: "HTTP 503: \u{1b}[2J".into(),
                ..ReplicationReport::default()
            }],
            sources: vec![],
        };
        let t = replications(&status);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME  REMOTE  LOCAL BUCKET  "), "{t}");
        assert!(lines[0].ends_with("  LATEST ERROR"), "{t}");
        assert_eq!(
            cells(lines[1]),
            [
                "r1",
                "cloud",
                "b",
                "rb",
                "backoff",
                "up",
                "120",
                "1000",
                "3",
                "-",
                "503",
                "7",
                "0",
                "0",
                "0",
                "HTTP 503: \\x1b[2J"
            ]
        );
        assert_eq!(sources(&status), "");
        assert_eq!(held(&status), "");
    }

    #[test]
    fn held_destinations_get_their_own_table() {
        let status = StatusReport {
            budgets: Vec::new(),
            clock: None,
            replications: vec![ReplicationReport {
                name: "all".into(),
                held_destinations: vec![HeldReport {
                    destination: "typo_db/autogen".into(),
                    bucket: "typo_db".into(),
                    rp: Some("autogen".into()),
                    code: 404,
                    message: "database not found: \"typo_db\"".into(),
                    since: crate::status::Timestamp(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
                    ),
                    lines: 3,
                    bytes: 60,
                }],
                ..ReplicationReport::default()
            }],
            sources: vec![],
        };
        let t = held(&status);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "");
        assert!(lines[1].starts_with("REPLICATION  DESTINATION"), "{t}");
        assert_eq!(
            cells(lines[2]),
            [
                "all",
                "typo_db/autogen",
                "404",
                "2023-11-14T22:13:20.000Z",
                "3",
                "60",
                "database not found: \"typo_db\""
            ]
        );
        assert!(held_rows(&status, Some("other")).is_empty());
    }

    #[test]
    fn sources_get_their_own_table() {
        let status = StatusReport {
            budgets: Vec::new(),
            clock: None,
            replications: vec![],
            sources: vec![
                SourceReport {
                    kind: "influxdb_wal".into(),
                    name: "influxdb_wal /w/db".into(),
                    bucket: "db".into(),
                    state: SourceState::Waiting,
                    lines_queued: 12,
                    wal_segments_missed: Some(1),
                    ..SourceReport::default()
                },
                SourceReport {
                    kind: "tail".into(),
                    name: "tail /a".into(),
                    bucket: "b".into(),
                    state: SourceState::Blocked,
                    latest_error_message: "queue full".into(),
                    ..SourceReport::default()
                },
            ],
        };
        let t = sources(&status);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "");
        assert!(lines[1].starts_with("KIND          NAME"), "{t}");
        assert_eq!(
            cells(lines[2]),
            [
                "influxdb_wal",
                "influxdb_wal /w/db",
                "db",
                "waiting",
                "12",
                "0",
                "0",
                "1",
                "-"
            ]
        );
        assert_eq!(
            cells(lines[3]),
            [
                "tail",
                "tail /a",
                "b",
                "blocked",
                "0",
                "0",
                "0",
                "-",
                "queue full"
            ]
        );
    }

    #[test]
    fn the_clock_line_shows_only_a_clock_not_known_right() {
        let mut status = StatusReport::default();
        assert_eq!(
            clock(&status),
            "",
            "an agent that predates the clock report"
        );
        let report = |state: &str| ClockReport {
            state: state.into(),
            not_before: Timestamp(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_780_000_000),
            ),
            lines_stamped_unsynchronised: 42,
            holding: false,
            lines_restamped: 0,
        };
        status.clock = Some(report("synchronised"));
        assert_eq!(clock(&status), "");
        status.clock = Some(report("unsynchronised"));
        assert_eq!(
            clock(&status),
            "\nclock: unsynchronised (no time service has set it); 42 lines without a timestamp were stamped with it\n"
        );
        status.clock = Some(report("before-build"));
        assert!(
            clock(&status).contains("before-build (earlier than this agent's build (2026-05-28T"),
            "{}",
            clock(&status)
        );
        status.clock = Some(report("unknown"));
        assert!(clock(&status).contains("cannot be read"));
        status.clock = Some(ClockReport {
            holding: true,
            ..report("before-build")
        });
        assert!(
            clock(&status)
                .ends_with("; the queue holds what is written until it is synchronised\n"),
            "{}",
            clock(&status)
        );
    }
}
