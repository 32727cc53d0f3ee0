//! InfluxDB WAL segments on arbitrary bytes: framing, snappy decoding, the
//! write payload and the rebuilt lines never panic, and a point rebuilt as a
//! line is exactly one line to the agent's own parser (queued or refused,
//! never split or silently skipped).
#![no_main]

use edge_replicator::lineproto::{normalize, point_end, Precision};
use edge_replicator::source::wal_format::{decompress, next_entry, push_line, write_points, Next};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a segment: entries one after another.
    let mut rest = data;
    while let Next::Entry { block, len, .. } = next_entry(rest) {
        if let Ok(payload) = decompress(block) {
            check(&payload);
        }
        rest = &rest[len..];
    }
    // As a decompressed write payload.
    check(data);
});

fn check(payload: &[u8]) {
    let Ok(points) = write_points(payload) else {
        return;
    };
    for p in &points {
        let mut line = Vec::new();
        if push_line(&mut line, p).is_err() {
            assert!(line.is_empty(), "a refused point left bytes behind");
            continue;
        }
        // One point, whatever newlines its string values hold.
        assert_eq!(point_end(&line), Some(line.len() - 1));
        let mut out = Vec::new();
        let summary = normalize(&line, Precision::Nanoseconds, 0, &mut out);
        assert_eq!(summary.lines + summary.error_count, 1, "{line:?}");
    }
}
