use super::*;
use proptest::prelude::*;
use std::time::Duration;

const S: i64 = 1_000_000_000;

fn spec(every_s: u64, fields: &[(&str, Aggregate)]) -> Spec {
    Spec::new(&Downsample {
        every: Duration::from_secs(every_s),
        allowed_lateness: Duration::from_secs(5),
        fields: fields.iter().map(|(k, a)| (k.to_string(), *a)).collect(),
    })
}

fn key(line: &lineproto::Line<'_>) -> Vec<u8> {
    let mut tags: Vec<_> = line.tags().collect();
    tags.sort();
    let mut k = line.measurement.to_vec();
    for (t, v) in tags {
        k.extend_from_slice(b",");
        k.extend_from_slice(t);
        k.extend_from_slice(b"=");
        k.extend_from_slice(v);
    }
    k
}

/// Folds `input` at `now`, closes everything and returns the emitted lines, sorted.
fn run(spec: &Spec, chunks: &[&str], now: i64) -> (Vec<String>, Folded) {
    let mut stored: Deltas = BTreeMap::new();
    let mut total = Folded::default();
    for chunk in chunks {
        let mut d = Deltas::new();
        let f = spec.fold(chunk.as_bytes(), now, |l| Some(key(l)), &mut d);
        total.folded += f.folded;
        total.late += f.late;
        // As the queue writer does: decode what is stored, merge, encode.
        for (k, w) in d {
            let mut cur = stored
                .get(&k)
                .map(|w| Window::decode(&w.encode()).unwrap())
                .unwrap_or_default();
            cur.merge(&w);
            stored.insert(k, cur);
        }
    }
    let mut out = Vec::new();
    for ((start, series), w) in &stored {
        spec.emit(series, *start, w, &mut out);
    }
    let mut lines: Vec<String> = lineproto::points(&out)
        .map(|p| String::from_utf8(p.strip_suffix(b"\n").unwrap().to_vec()).unwrap())
        .collect();
    lines.sort();
    (lines, total)
}

#[test]
fn mean_of_numbers_last_of_the_rest_stamped_at_window_stop() {
    let s = spec(10, &[]);
    let now = 0;
    let (out, f) = run(
        &s,
        &["m,host=a t=1,n=2i,u=4u,s=\"x\",b=true 100000000000\n\
             m,host=a t=2,n=3i,u=6u,s=\"y\",b=false 105000000000\n\
             m,host=a t=10 110000000000\n\
             m,host=b t=7 101000000000\n"],
        now,
    );
    assert_eq!(
        f,
        Folded {
            folded: 4,
            late: 0,
            filtered: 0
        }
    );
    assert_eq!(
        out,
        [
            "m,host=a b=false,n=2.5,s=\"y\",t=1.5,u=5.0 110000000000",
            "m,host=a t=10.0 120000000000",
            "m,host=b t=7.0 110000000000",
        ]
    );
}

#[test]
fn last_is_by_time_not_arrival() {
    let s = spec(60, &[]);
    let (out, _) = run(
        &s,
        &[
            "m s=\"late-arriving-but-newest\" 50000000000\n",
            "m s=\"older\" 10000000000\n",
        ],
        0,
    );
    assert_eq!(out, ["m s=\"late-arriving-but-newest\" 60000000000"]);
}

#[test]
fn last_keeps_a_string_with_newlines_whole() {
    let s = spec(60, &[]);
    let (out, f) = run(
        &s,
        &[
            "m s=\"first\nfake f=1 1\",n=1 10000000000\n",
            "m s=\"line one\ninjected,host=x value=42 1\nend\",n=3 20000000000\n",
        ],
        0,
    );
    assert_eq!(f.folded, 2);
    assert_eq!(
        out,
        ["m n=2.0,s=\"line one\ninjected,host=x value=42 1\nend\" 60000000000"]
    );
}

#[test]
fn overrides() {
    let s = spec(
        10,
        &[
            ("a", Aggregate::Max),
            ("b", Aggregate::Min),
            ("c", Aggregate::Sum),
            ("d", Aggregate::Count),
            ("e", Aggregate::Last),
            ("f", Aggregate::Sum),
        ],
    );
    let (out, _) = run(
        &s,
        &["m a=1,b=5i,c=2i,d=\"x\",e=1.5,f=0.25 1000000000\nm a=3,b=-2i,c=40i,d=\"y\",e=9.5,f=0.5 2000000000\n"],
        0,
    );
    assert_eq!(out, ["m a=3.0,b=-2i,c=42i,d=2i,e=9.5,f=0.75 10000000000"]);
}

#[test]
fn late_points_are_counted_and_dropped() {
    let s = spec(10, &[]);
    // Window [0, 10 s) closes at 15 s (5 s lateness); [10 s, 20 s) is open at 16 s.
    let (out, f) = run(&s, &["m v=1 1000000000\nm v=2 12000000000\n"], 16 * S);
    assert_eq!(
        f,
        Folded {
            folded: 1,
            late: 1,
            filtered: 0
        }
    );
    assert_eq!(out, ["m v=2.0 20000000000"]);
    assert!(s.closed(0, 15 * S) && !s.closed(10 * S, 16 * S));
    assert_eq!(s.last_closed_start(16 * S), 0);
    assert_eq!(
        s.window_start(-1),
        -10 * S,
        "windows align to the epoch below zero too"
    );
}

#[test]
fn escaped_keys_survive() {
    let s = spec(10, &[("my field", Aggregate::Max)]);
    let (out, _) = run(
        &s,
        &["m\\ x,t\\=k=v\\,1 my\\ field=1,o=2 1\nm\\ x,t\\=k=v\\,1 my\\ field=3,o=4 2\n"],
        0,
    );
    assert_eq!(out, ["m\\ x,t\\=k=v\\,1 my\\ field=3.0,o=3.0 10000000000"]);
    lineproto::parse_line(out[0].as_bytes()).unwrap();
}

#[test]
fn damaged_state_does_not_decode() {
    let mut w = Window::default();
    w.add(b"f", &FieldValue::Float(1.0), 1);
    let bytes = w.encode();
    assert_eq!(Window::decode(&bytes), Some(w));
    assert_eq!(Window::decode(&bytes[..bytes.len() - 1]), None);
    assert_eq!(Window::decode(&[9]), None);
}

// Reference: group points by (series, window) and compute mean / last by time directly.
#[derive(Debug, Clone)]
struct Point {
    series: u8,
    ts: i64,
    num: f64,
    text: u8,
}

fn reference(points: &[Point], every: i64) -> Vec<String> {
    let mut groups: BTreeMap<(u8, i64), Vec<&Point>> = BTreeMap::new();
    for p in points {
        groups
            .entry((p.series, p.ts.div_euclid(every) * every))
            .or_default()
            .push(p);
    }
    let mut out: Vec<String> = groups
        .iter()
        .map(|((series, start), ps)| {
            let mean = ps.iter().map(|p| p.num).sum::<f64>() / ps.len() as f64;
            // Last by time; on equal times the later arrival wins.
            let last = ps.iter().max_by_key(|p| p.ts).unwrap();
            format!(
                "m,s=s{series} n={},t=\"v{}\" {}",
                float_text(mean),
                last.text,
                start + every
            )
        })
        .collect();
    out.sort();
    out
}

proptest! {
    #[test]
    fn matches_a_reference_over_random_inputs(
        points in prop::collection::vec((0u8..4, 0i64..200, -1000i32..1000, 0u8..10), 1..80),
        cuts in prop::collection::vec(0usize..80, 0..5),
    ) {
        let every = 10 * S;
        let pts: Vec<Point> = points
            .iter()
            .map(|&(series, t, n, text)| Point { series, ts: t * S / 2, num: n as f64 / 4.0, text })
            .collect();
        let lines: Vec<String> = pts
            .iter()
            .map(|p| format!("m,s=s{} n={},t=\"v{}\" {}\n", p.series, float_text(p.num), p.text, p.ts))
            .collect();
        // Deliver the same points in random chunks (separate writes).
        let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(lines.len())).collect();
        bounds.extend([0, lines.len()]);
        bounds.sort();
        let chunks: Vec<String> = bounds.windows(2).map(|w| lines[w[0]..w[1]].concat()).collect();
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let s = spec(10, &[]);
        let (got, f) = run(&s, &refs, 0);
        prop_assert_eq!(f.folded as usize, pts.len());
        let want = reference(&pts, every);
        prop_assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            // Sums in another order may differ in the last bits: compare the
            // mean numerically, everything else exactly.
            let num = |l: &str| -> f64 { l.split("n=").nth(1).unwrap().split(',').next().unwrap().parse().unwrap() };
            let rest = |l: &str| -> String { l.split_once(",t=").unwrap().1.to_string() };
            prop_assert!((num(g) - num(w)).abs() < 1e-9, "{} vs {}", g, w);
            prop_assert_eq!(rest(g), rest(w));
            prop_assert_eq!(g.split(' ').next(), w.split(' ').next());
        }
    }
}

/// The saving the seed's Flux task is for: 50 sensors at 1 Hz for an hour,
/// 10-minute windows. Prints the figures (`--nocapture`); asserts only sizes.
#[test]
fn a_1hz_sensor_load_shrinks_by_orders_of_magnitude() {
    let s = spec(600, &[]);
    let mut raw = String::new();
    for second in 0..3600i64 {
        for sensor in 0..50 {
            raw += &format!(
                "climate,site=plant-7,sensor=s{sensor:02} temperature={:.2},humidity={:.1},battery={}i,status=\"ok\" {}\n",
                20.0 + ((second + sensor) % 97) as f64 / 10.0,
                40.0 + ((second * 3 + sensor) % 50) as f64 / 5.0,
                100 - second / 60,
                second * S
            );
        }
    }
    let mut deltas = Deltas::new();
    let f = s.fold(raw.as_bytes(), 0, |l| Some(key(l)), &mut deltas);
    assert_eq!(f.folded, 180_000);
    let mut out = Vec::new();
    for ((start, series), w) in &deltas {
        s.emit(series, *start, w, &mut out);
    }
    let agg_lines = out.iter().filter(|&&b| b == b'\n').count();
    assert_eq!(agg_lines, 50 * 6);
    let raw_gz = crate::ship::gzip(raw.as_bytes(), 6).len();
    let agg_gz = crate::ship::gzip(&out, 6).len();
    println!(
        "1 Hz x 50 sensors x 1 h: raw {} lines, {} B ({} B gzip); 10m aggregates {} lines, {} B ({} B gzip); {:.0}x fewer bytes sent",
        f.folded,
        raw.len(),
        raw_gz,
        agg_lines,
        out.len(),
        agg_gz,
        raw_gz as f64 / agg_gz as f64
    );
    assert!(
        agg_gz * 50 < raw_gz,
        "aggregates should be far smaller: {agg_gz} vs {raw_gz}"
    );
}
