//! The line-protocol parser on arbitrary bytes: no panic, and the rules the
//! rest of the agent relies on hold for whatever it lets through, points
//! (which may span lines inside string values) cut the same way everywhere.
#![no_main]

use edge_replicator::lineproto::{
    count_points, last_point_end, normalize, parse_line, points, FieldValue, Precision,
};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_700_000_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let precision = match first % 7 {
        0 => Precision::Nanoseconds,
        1 => Precision::Microseconds,
        2 => Precision::Milliseconds,
        3 => Precision::Seconds,
        4 => Precision::Minutes,
        5 => Precision::Hours,
        _ => Precision::Nanoseconds,
    };

    // One line, every accessor.
    if let Ok(line) = parse_line(body) {
        assert!(std::str::from_utf8(line.key_and_fields).is_ok());
        for (k, v) in line.tags() {
            assert!(!k.is_empty() && !v.is_empty());
        }
        for (k, v) in line.fields() {
            assert!(!k.is_empty());
            if let FieldValue::Float(f) = v {
                assert!(f.is_finite());
            }
        }
    }

    // A body: only whole, valid, UTF-8 lines with ns timestamps come out,
    // and every line in is either out or counted as an error.
    let mut out = Vec::new();
    let summary = normalize(body, precision, NOW, &mut out);
    assert!(out.is_empty() || out.ends_with(b"\n"));
    assert!(std::str::from_utf8(&out).is_ok());
    let mut n = 0;
    for line in points(&out) {
        let line = line.strip_suffix(b"\n").expect("output points end in a newline");
        n += 1;
        let parsed = parse_line(line).expect("an output line parses");
        assert!(parsed.timestamp.is_some(), "output lines carry a timestamp");
    }
    assert_eq!(n, summary.lines);
    assert_eq!(count_points(&out) as u64, summary.lines);
    assert_eq!(last_point_end(&out), (!out.is_empty()).then_some(out.len()));
    let counted = points(body)
        .filter(|l| {
            let l = l.strip_suffix(b"\n").unwrap_or(l);
            // Blank and comment lines are skipped, not counted; trailing
            // '\r' is trimmed, a leading one is not blank.
            let end = l.len() - l.iter().rev().take_while(|b| b" \t\r".contains(b)).count();
            let first = l[..end].iter().find(|b| !b" \t".contains(b));
            first.is_some_and(|&b| b != b'#')
        })
        .count() as u64;
    assert_eq!(summary.lines + summary.error_count, counted);

    // Normalising again changes nothing.
    let mut again = Vec::new();
    let second = normalize(&out, Precision::Nanoseconds, NOW, &mut again);
    assert_eq!(second.error_count, 0);
    assert_eq!(again, out);
});
