//! Parser and normaliser throughput on a ~100 MB body of metrics lines
//! (~150 bytes each): `normalize` with nanosecond timestamps (the fast path)
//! and with seconds (timestamps rewritten), `parse_line` alone, and
//! `parse_line` with every tag and field visited. Prints figures (best of
//! three); asserts only that every line was read. Then, per mix of `make
//! bench` (and a mix of field devices reporting in no set order), what
//! ordering a 500 kB batch by series and compressing it at
//! level 9 (as the agent does on a capped or budgeted link) saves on the
//! wire against arrival order at level 6, and what it costs in CPU.
//!
//! `cargo bench --bench lineproto` (part of `make bench`).

use edge_replicator::lineproto::{count_points, normalize, order_by_series, parse_line, Precision};

#[path = "bench/gen.rs"]
#[allow(dead_code)]
mod gen;

const NOW: i64 = 1_700_000_000_123_456_789;

fn main() {
    // `cargo test --benches` runs bench targets once as tests: nothing to do.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
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
    series_ordering();
    levels();
}

/// One 500 kB batch of `mix`, in arrival order.
fn batch_of(mix: gen::Mix) -> Vec<u8> {
    let mut g = gen::Generator::new(mix, 11);
    let mut batch = Vec::new();
    while batch.len() < 500_000 {
        batch.extend_from_slice(&g.body(100));
    }
    batch
}

/// What `f` returns (a size) and the best of five timings of it, in seconds.
fn best_of_5(f: &dyn Fn() -> usize) -> (usize, f64) {
    let mut best = f64::MAX;
    let mut bytes = 0;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        bytes = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (bytes, best)
}

/// What each gzip level costs and saves on a 500 kB batch: the agent
/// compresses at a low level when it queues (ingest CPU) and at the
/// replication's `gzip_level` when it ships over a slow link.
fn levels() {
    println!("\ngzip levels, one 500 kB batch in arrival order (best of 5):");
    println!("| mix | level | B/line | ratio to level 6 | CPU µs/line | MB/s in |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for mix in [gen::Mix::Metrics, gen::Mix::Logs, gen::Mix::Small] {
        let batch = batch_of(mix);
        let n = count_points(&batch) as f64;
        let six = edge_replicator::ship::gzip(&batch, 6).len() as f64;
        for level in [1, 2, 3, 4, 6, 9] {
            let (bytes, best) = best_of_5(&|| edge_replicator::ship::gzip(&batch, level).len());
            println!(
                "| {} | {level} | {:.1} | {:.2} | {:.2} | {:.0} |",
                mix.name(),
                bytes as f64 / n,
                bytes as f64 / six,
                best / n * 1e6,
                batch.len() as f64 / best / 1e6,
            );
        }
    }
}

/// Wire bytes per line and ship-side CPU per line of one 500 kB batch:
/// arrival order at gzip 6 (what goes by default) against series order at
/// gzip 6 and 9.
fn series_ordering() {
    println!("\nseries ordering of a 500 kB batch (best of 5):");
    println!("| mix | lines | arrival, gzip 6 (B/line) | series, gzip 6 | series, gzip 9 | ratio 9/arrival | CPU µs/line arrival 6 | CPU µs/line series 9 |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for mix in [
        gen::Mix::Metrics,
        gen::Mix::Logs,
        gen::Mix::Small,
        gen::Mix::Sensors,
    ] {
        let batch = batch_of(mix);
        let n = count_points(&batch) as f64;
        let (arrival6, cpu_a) = best_of_5(&|| edge_replicator::ship::gzip(&batch, 6).len());
        let (series6, _) = best_of_5(&|| {
            let mut out = Vec::new();
            order_by_series(&batch, &mut out);
            edge_replicator::ship::gzip(&out, 6).len()
        });
        let (series9, cpu_s) = best_of_5(&|| {
            let mut out = Vec::new();
            order_by_series(&batch, &mut out);
            edge_replicator::ship::gzip(&out, 9).len()
        });
        println!(
            "| {} | {n:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |",
            mix.name(),
            arrival6 as f64 / n,
            series6 as f64 / n,
            series9 as f64 / n,
            series9 as f64 / arrival6 as f64,
            cpu_a / n * 1e6,
            cpu_s / n * 1e6,
        );
    }
}
