//! End to end for `[[influxdb_wal]]`.
//!
//! - A real InfluxDB 1.6, written to over its HTTP API (floats, integers,
//!   booleans, strings with escapes, tags and names needing escapes, several
//!   measurements, points spread over several weekly shards), followed by the
//!   agent through a graceful restart and a SIGKILL, replicated to a second
//!   InfluxDB 1.6 and to VictoriaMetrics. The copy answers `SELECT *` exactly
//!   as the original does, and every point was queued exactly once.
//! - A string value holding newlines (the reported injection body) is
//!   rebuilt from the WAL as the same one point.
//! - The same InfluxDB with a 1 s cache snapshot: segments deleted while the
//!   agent follows lose nothing; segments deleted while it is stopped are a
//!   counted, logged gap (`walSegmentsMissed`).
//! - The 2.x layout (`<engine>/wal/<bucket id>/autogen/<shard>/`), with
//!   segments written by the test's encoder: all five value types (uint64
//!   included, which 1.6 cannot store), `#!~#` inside a tag value, a delete
//!   entry, a half-written last entry, a second segment and a second shard.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::time::{Duration, Instant};

use serde_json::Value;
use util::tsm_wal::{self, Field, Value as V};
use util::*;

const WEEK_NS: i64 = 7 * 86_400 * 1_000_000_000;

/// Points of batch `b`: 40 `cpu` points and 10 of a measurement whose name,
/// tags and field keys need escaping, at ms-distinct times in week `b % 5`
/// of the last five (so InfluxDB spreads them over several shards).
fn batch(b: usize, base: i64) -> String {
    let mut out = String::new();
    let t0 = base + (b % 5) as i64 * WEEK_NS + b as i64 * 1_000_000_000;
    for k in 0..40i64 {
        let t = t0 + k * 1_000_000;
        out += &format!(
            "cpu,host=gw-{h},region=eu\\ west usage={u},count={c}i,up={up},note=\"batch {b} said \\\"hi\\\" \\\\ k={k}\" {t}\n",
            h = k % 4,
            u = (b as f64) * 0.25 + (k as f64) / 3.0,
            c = (b as i64) * 1000 - k,
            up = k % 3 == 0,
        );
    }
    for k in 0..10i64 {
        let t = t0 + 500_000_000 + k * 1_000_000;
        out += &format!(
            "my\\ meas\\,x,t\\,k=v\\=1\\ 2,plain=p{k} f\\ k={f},s=\"a,b=c d\",n={n}i {t}\n",
            f = -1.5e-7 * (k as f64 + 1.0) * (b as f64 + 1.0),
            n = -(k * 7),
        );
    }
    out
}

const POINTS_PER_BATCH: u64 = 50;

/// `SELECT * FROM m GROUP BY *` on `db`, series by series.
fn select_all(influx: &Influx16, db: &str, measurement: &str) -> Value {
    let q = format!(
        "SELECT * FROM \"{}\" GROUP BY *",
        measurement.replace('"', "\\\"")
    );
    influx.query(Some(db), &q)["results"][0]["series"].clone()
}

fn wal_config(influx: &Influx16, db: &str, poll: &str) -> String {
    format!(
        "[[influxdb_wal]]\nwal_dir = {}\ndatabase = {}\npoll_interval = \"{poll}\"\n",
        toml_str(&influx.wal_dir().display().to_string()),
        toml_str(db)
    )
}

#[test]
fn influx16_wal_replicates_identical_values_across_agent_restarts() {
    let Some(local) = Influx16::start() else {
        return;
    };
    let Some(copy) = Influx16::start() else {
        return;
    };
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    local.create_db("edge");
    copy.create_db("copy");
    let config = AgentConfig {
        remotes: vec![
            RemoteConfig::v1("copy", &copy.url()),
            RemoteConfig::v2("vm", &vm.url()),
        ],
        replications: vec![
            ReplicationConfig::new("to_copy", "copy", "edge").remote_bucket("copy"),
            ReplicationConfig::new("to_vm", "vm", "edge"),
        ],
        ..AgentConfig::default()
    };
    let launch = Launch::new().append(&wal_config(&local, "edge", "100ms"));
    let mut agent = Agent::start_with(config, &launch);

    let base = ts_ago(Duration::from_secs(5 * 7 * 86_400));
    let batches = 60usize;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for b in 0..batches {
                let r = local.write("edge", &batch(b, base));
                assert_eq!(r.status, 204, "batch {b}: {}", r.body);
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(agent.sigterm_and_wait().success());
        std::thread::sleep(Duration::from_millis(200));
        agent.restart();
        std::thread::sleep(Duration::from_millis(500));
        agent.kill9();
        agent.restart();
        writer.join().unwrap();
    });
    let total = batches as u64 * POINTS_PER_BATCH;
    wait_eq(
        DEADLINE,
        "count(usage) in the copy",
        40 * batches as u64,
        || copy.count("copy", "cpu", "usage"),
    );
    wait_eq(DEADLINE, "to_copy remainingLines", 0, || {
        field(&agent.replication("to_copy"), "remainingLines")
    });
    // Exactly once: one line per point, none queued twice across restarts.
    for name in ["to_copy", "to_vm"] {
        let rep = agent.replication(name);
        assert_eq!(field(&rep, "acceptedLines"), total, "{rep:#}");
        assert_conserved(&rep);
    }
    // The copy says what the original says, value for value.
    for m in ["cpu", "my meas,x"] {
        let want = select_all(&local, "edge", m);
        let got = select_all(&copy, "copy", m);
        assert!(
            want.as_array().is_some_and(|a| !a.is_empty()),
            "{m}: {want}"
        );
        assert_eq!(got, want, "SELECT * FROM {m:?} differs");
    }
    // Several shards were followed.
    let status = agent.source("influxdb_wal");
    let shards = status["shards"].as_array().unwrap();
    assert!(shards.len() >= 5, "{status:#}");
    assert_eq!(status["walSegmentsMissed"], 0, "{status:#}");
    assert_eq!(status["invalidLines"], 0, "{status:#}");
    // VictoriaMetrics holds the same numbers (floats, ints, booleans as 0/1).
    wait_eq(
        DEADLINE,
        "samples of cpu_usage",
        40 * batches as u64,
        || vm.count("cpu_usage"),
    );
    let from_influx: BTreeMap<(String, i64), f64> = {
        let series = select_all(&local, "edge", "cpu");
        let mut out = BTreeMap::new();
        for s in series.as_array().unwrap() {
            let host = s["tags"]["host"].as_str().unwrap().to_string();
            let cols = s["columns"].as_array().unwrap();
            let ti = cols.iter().position(|c| c == "time").unwrap();
            let ui = cols.iter().position(|c| c == "usage").unwrap();
            for row in s["values"].as_array().unwrap() {
                let t = rfc3339_ms(row[ti].as_str().unwrap());
                out.insert((host.clone(), t), row[ui].as_f64().unwrap());
            }
        }
        out
    };
    let from_vm: BTreeMap<(String, i64), f64> = vm
        .samples("cpu_usage")
        .into_iter()
        .map(|(labels, t, v)| ((labels["host"].as_str().unwrap().to_string(), t), v))
        .collect();
    assert_eq!(
        from_vm.keys().collect::<Vec<_>>(),
        from_influx.keys().collect::<Vec<_>>()
    );
    for (k, want) in &from_influx {
        // VictoriaMetrics keeps about 15 significant digits.
        let got = from_vm[k];
        assert!(
            (got - want).abs() <= want.abs() * 1e-12,
            "{k:?}: {got} != {want}"
        );
    }
    assert_eq!(vm.count("cpu_up"), 40 * batches as u64);

    // Lag: a point written into InfluxDB until it is queryable at the copy.
    let mut lags = Vec::new();
    for i in 0..20u64 {
        let t = ts_ago(Duration::ZERO) + i as i64;
        let r = local.write("edge", &format!("lag,probe=p v={i}i {t}"));
        assert_eq!(r.status, 204);
        let written = Instant::now();
        wait_until(DEADLINE, "the probe at the copy", || {
            copy.count("copy", "lag", "v") == i + 1
        });
        lags.push(written.elapsed());
    }
    lags.sort();
    eprintln!(
        "influxdb_wal lag, write into InfluxDB 1.6 to queryable at the remote (poll_interval 100ms, 20 probes): min {:?}, median {:?}, max {:?}",
        lags[0], lags[10], lags[19]
    );
    assert!(
        lags[10] < Duration::from_secs(2),
        "median lag {:?}",
        lags[10]
    );
}

/// `2026-11-25T17:33:25.123Z` (InfluxQL's RFC 3339 time) in ms since the epoch.
fn rfc3339_ms(s: &str) -> i64 {
    let (date, rest) = s.split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let rest = rest.trim_end_matches('Z');
    let (hms, frac) = rest.split_once('.').unwrap_or((rest, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    let frac_ms: i64 = format!("{frac:0<3}")[..3].parse().unwrap();
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000) + frac_ms
}

#[test]
fn influx16_snapshots_lose_nothing_while_followed_and_are_a_counted_gap_while_stopped() {
    let Some(local) = Influx16::start_with_data("  cache-snapshot-write-cold-duration = \"1s\"")
    else {
        return;
    };
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    local.create_db("snap");
    let config = AgentConfig::single(RemoteConfig::v2("vm", &vm.url()), "snap", None);
    let launch = Launch::new().append(&wal_config(&local, "snap", "100ms"));
    let mut agent = Agent::start_with(config, &launch);
    let now = ts_ago(Duration::from_secs(600));
    let write = |first: usize, n: usize| {
        let body = lines("sn", 5, n, now + first as i64 * 1_000_000);
        // `lines` counts keys from its own start; shift the sensors apart.
        let r = local.write(
            "snap",
            &body.replace("sensor=s", &format!("sensor=b{first}s")),
        );
        assert_eq!(r.status, 204, "{}", r.body);
    };
    let snapshotted = |before: &[std::path::PathBuf]| {
        wait_until(
            DEADLINE,
            "InfluxDB to snapshot and delete the segment",
            || before.iter().all(|p| !p.exists()),
        );
    };

    // Followed: each batch's segment is deleted by a snapshot a second later.
    for b in 0..3 {
        write(b * 1000, 200);
        let segs = local.wal_segments("snap");
        snapshotted(&segs);
    }
    wait_eq(DEADLINE, "samples at the remote", 600, || {
        vm.count("sn_value")
    });
    assert_eq!(agent.source("influxdb_wal")["walSegmentsMissed"], 0);

    // Stopped: the segment is written and deleted before the agent is back.
    assert!(agent.sigterm_and_wait().success());
    write(5000, 100);
    let segs = local.wal_segments("snap");
    snapshotted(&segs);
    agent.restart();
    wait_until(DEADLINE, "a counted gap", || {
        agent.source("influxdb_wal")["walSegmentsMissed"]
            .as_u64()
            .is_some_and(|n| n >= 1)
    });
    let status = agent.source("influxdb_wal");
    assert!(
        status["latestErrorMessage"]
            .as_str()
            .unwrap()
            .contains("removed before"),
        "{status:#}"
    );
    let metrics = agent.metrics();
    assert!(
        metric_value(&metrics, "edge_replicator_wal_segments_missed_total", "")
            .is_some_and(|v| v >= 1.0),
        "{metrics}"
    );
    assert!(agent.log().contains("their lines are lost"));
    // Following goes on after the gap.
    write(9000, 100);
    wait_eq(DEADLINE, "samples after the gap", 700, || {
        vm.count("sn_value")
    });
}

/// A point for the encoder: escaped series key, time, (field key, value)s.
type Point = (String, i64, Vec<(String, V)>);

/// The rendering the agent must produce for `fields` of one point.
fn expected_line(series: &str, time: i64, fields: &[(String, V)]) -> String {
    let mut sorted: Vec<&(String, V)> = fields.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let body: Vec<String> = sorted
        .iter()
        .map(|(k, v)| {
            let key: String = k
                .chars()
                .flat_map(|c| match c {
                    ',' | '=' | ' ' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            let value = match v {
                // Shortest digits that read back exactly; exponent form
                // outside [1e-5, 1e16).
                V::Float(f) if f.abs() != 0.0 && !(1e-5..1e16).contains(&f.abs()) => {
                    format!("{f:e}")
                }
                V::Float(f) => format!("{f}"),
                V::Integer(i) => format!("{i}i"),
                V::Unsigned(u) => format!("{u}u"),
                V::Boolean(b) => b.to_string(),
                V::String(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            };
            format!("{key}={value}")
        })
        .collect();
    format!("{series} {} {time}", body.join(","))
}

#[test]
fn wal_2x_layout_from_encoded_segments() {
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let proxy = Sink::forward_to(&vm.url());
    let engine = tempfile::tempdir().unwrap();
    let bucket_id = "0a1b2c3d4e5f6789";
    let shard = |id: u64| {
        let d = engine
            .path()
            .join("wal")
            .join(bucket_id)
            .join("autogen")
            .join(id.to_string());
        fs::create_dir_all(&d).unwrap();
        d
    };
    let append = |path: std::path::PathBuf, bytes: &[u8]| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    };
    let config = AgentConfig::single(RemoteConfig::v2("proxy", &proxy.url()), "b2", None);
    let launch = Launch::new().append(&format!(
        "[[influxdb_wal]]\nwal_dir = {}\ndatabase = \"{bucket_id}\"\nbucket = \"b2\"\npoll_interval = \"50ms\"\n",
        toml_str(&engine.path().join("wal").display().to_string())
    ));
    let agent = Agent::start_with(config, &launch);

    // Points as (series key, time, fields), escaped series keys as stored.
    let t0 = ts_ago(Duration::from_secs(3600));
    let mut points: Vec<Point> = Vec::new();
    for i in 0..30i64 {
        points.push((
            "wal2,path=a#!~#b,host=h\\ 1".into(),
            t0 + i * 1_000_000,
            vec![
                ("f".into(), V::Float(i as f64 / 8.0 - 1.0)),
                ("i".into(), V::Integer(-i * 1_000_000_007)),
                ("u".into(), V::Unsigned(u64::MAX - i as u64)),
                ("b".into(), V::Boolean(i % 2 == 0)),
                ("s".into(), V::String(format!("say \"{i}\" \\ done"))),
                ("field key,=x".into(), V::Float(1e300)),
            ],
        ));
    }
    for i in 0..10i64 {
        points.push((
            "wal2\\ other\\,m,t\\=k=v\\,1".into(),
            t0 + i * 1_000_000,
            vec![("v".into(), V::Integer(i))],
        ));
    }
    let fields = |ps: &[Point]| -> Vec<Field> {
        ps.iter()
            .flat_map(|(series, time, fs)| {
                fs.iter().map(move |(k, v)| Field {
                    series: series.clone(),
                    field: k.clone(),
                    time: *time,
                    value: v.clone(),
                })
            })
            .collect()
    };
    let expected: Vec<String> = points
        .iter()
        .map(|(s, t, f)| expected_line(s, *t, f))
        .collect();

    // Shard 1, segment 1: a write, a delete, a write, and half of a third.
    let seg1 = tsm_wal::segment_path(&shard(1), 1);
    append(seg1.clone(), &tsm_wal::write_entry(&fields(&points[..20])));
    append(
        seg1.clone(),
        &tsm_wal::delete_entry(&["wal2,path=a#!~#b,host=h\\ 1"]),
    );
    append(
        seg1.clone(),
        &tsm_wal::write_entry(&fields(&points[20..25])),
    );
    let third = tsm_wal::write_entry(&fields(&points[25..30]));
    append(seg1.clone(), &third[..third.len() / 2]);
    let accepted = || field(&agent.replication("r1"), "acceptedLines");
    wait_eq(DEADLINE, "the whole entries", 25, accepted);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(accepted(), 25, "half an entry was read");
    let status = agent.source("influxdb_wal");
    assert!(status["lagBytes"].as_u64().unwrap() > 0, "{status:#}");
    append(seg1.clone(), &third[third.len() / 2..]);
    wait_eq(DEADLINE, "the finished entry", 30, accepted);
    // A second segment, then a second shard.
    append(
        tsm_wal::segment_path(&shard(1), 2),
        &tsm_wal::write_entry(&fields(&points[30..35])),
    );
    append(
        tsm_wal::segment_path(&shard(2), 1),
        &tsm_wal::write_entry(&fields(&points[35..])),
    );
    wait_eq(DEADLINE, "every point", points.len() as u64, accepted);
    wait_eq(DEADLINE, "r1 drained", 0, || {
        field(&agent.replication("r1"), "remainingLines")
    });

    // Exactly the expected lines, each once.
    let sent: Vec<String> = proxy
        .lines_accepted()
        .into_iter()
        .map(|l| String::from_utf8(l).unwrap())
        .collect();
    let sent_set: BTreeSet<&String> = sent.iter().collect();
    assert_eq!(sent.len(), sent_set.len(), "a line was sent twice");
    let want_set: BTreeSet<&String> = expected.iter().collect();
    assert_eq!(sent_set, want_set);
    let status = agent.source("influxdb_wal");
    assert_eq!(status["deletesSkipped"], 1, "{status:#}");
    assert_eq!(status["walSegmentsMissed"], 0, "{status:#}");
    let shards: BTreeMap<String, u64> = status["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_string(),
                s["segment"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shards,
        BTreeMap::from([("autogen/1".to_string(), 2), ("autogen/2".to_string(), 1)])
    );
    // And a real remote stored the values, uint64 and the odd tag included.
    wait_eq(DEADLINE, "samples of wal2_u", 30, || vm.count("wal2_u"));
    for (labels, _, v) in vm.samples("wal2_u") {
        assert_eq!(labels["path"], "a#!~#b");
        assert_eq!(labels["host"], "h 1");
        // u64::MAX - i, to the ~15 digits the remote keeps.
        assert!((v / u64::MAX as f64 - 1.0).abs() < 1e-12, "{v}");
    }
    let is: BTreeSet<i64> = vm
        .samples("wal2_i")
        .into_iter()
        .map(|(_, _, v)| v as i64)
        .collect();
    assert_eq!(is, (0..30).map(|i| -i * 1_000_000_007).collect());
    assert_eq!(vm.count("{__name__=\"wal2 other,m_v\"}"), 10);
}

/// The body from the report of a point injected through a string value.
const MULTI_LINE: &str = "applog,app=web msg=\"request failed:\n\
                          injected,host=x value=42 1764000000000000000\n\
                          end\" 1764000000000000000\n";

/// A string value holding newlines, written into a real InfluxDB 1.6 and
/// read from its WAL, arrives at the remote as the same one point: rebuilt,
/// not skipped, and nothing injected.
#[test]
fn influx16_wal_string_holding_newlines_is_rebuilt_whole() {
    let Some(local) = Influx16::start() else {
        return;
    };
    let Some(copy) = Influx16::start() else {
        return;
    };
    local.create_db("edge");
    copy.create_db("copy");
    let config = AgentConfig {
        remotes: vec![RemoteConfig::v1("copy", &copy.url())],
        replications: vec![ReplicationConfig::new("to_copy", "copy", "edge").remote_bucket("copy")],
        ..AgentConfig::default()
    };
    let launch = Launch::new().append(&wal_config(&local, "edge", "100ms"));
    let agent = Agent::start_with(config, &launch);
    let r = local.write("edge", MULTI_LINE);
    assert_eq!(r.status, 204, "{}", r.body);
    let t = ts_ago(Duration::from_secs(60));
    let r = local.write("edge", &format!("marker v=1 {t}\n"));
    assert_eq!(r.status, 204, "{}", r.body);
    wait_eq(DEADLINE, "count(v) of marker at the copy", 1, || {
        copy.count("copy", "marker", "v")
    });
    let want = select_all(&local, "edge", "applog");
    assert!(
        want[0]["values"][0].as_array().is_some_and(|row| row
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.contains("failed:\ninjected")))),
        "{want}"
    );
    assert_eq!(select_all(&copy, "copy", "applog"), want);
    let names = copy.query(Some("copy"), "SHOW MEASUREMENTS");
    assert_eq!(
        names["results"][0]["series"][0]["values"],
        serde_json::json!([["applog"], ["marker"]])
    );
    let status = agent.source("influxdb_wal");
    assert_eq!(status["invalidLines"], 0, "{status:#}");
    assert_eq!(status["errors"], 0, "{status:#}");
    assert_eq!(field(&agent.replication("to_copy"), "acceptedLines"), 2);
}

/// Points of a retention policy other than `autogen` keep it: followed from
/// a local InfluxDB 1.6's WAL and replicated by a replication of every
/// bucket (`*`) to another InfluxDB 1.6, points written into `edge.short`
/// land in `edge.short` there, and points of `edge.autogen` in `edge`'s
/// default.
#[test]
fn influx16_wal_keeps_each_points_retention_policy() {
    let Some(local) = Influx16::start() else {
        return;
    };
    let Some(copy) = Influx16::start() else {
        return;
    };
    for influx in [&local, &copy] {
        influx.create_db("edge");
        influx.query(
            None,
            "CREATE RETENTION POLICY \"short\" ON \"edge\" DURATION 30d REPLICATION 1",
        );
    }
    let config = AgentConfig::single(RemoteConfig::v1("copy", &copy.url()), "*", None);
    let launch = Launch::new().append(&wal_config(&local, "edge", "100ms"));
    let agent = Agent::start_with(config, &launch);
    let base = ts_ago(Duration::from_secs(3600));
    let short = lines("in_short", 3, 300, base);
    let default = lines("in_default", 3, 200, base);
    assert_eq!(local.write_rp("edge", "short", &short).status, 204);
    assert_eq!(local.write("edge", &default).status, 204);
    wait_eq(DEADLINE, "in_short in edge.short at the copy", 300, || {
        copy.count_in("edge", "short", "in_short", "value")
    });
    wait_eq(
        DEADLINE,
        "in_default in edge.autogen at the copy",
        200,
        || copy.count_in("edge", "autogen", "in_default", "value"),
    );
    assert_eq!(copy.count_in("edge", "autogen", "in_short", "value"), 0);
    assert_eq!(copy.count_in("edge", "short", "in_default", "value"), 0);
    let rep = agent.replication("r1");
    assert_conserved(&rep);
}
