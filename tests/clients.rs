//! Real InfluxDB clients that nobody here wrote write through the agent to
//! an InfluxDB 1.6 remote (`api = "v1"`), and what arrives is compared point
//! by point with the same data written by the same client (or its own line
//! protocol) straight into another database: every row of `SELECT *` with
//! nanosecond times (series, tags, values), and the field and tag keys with
//! their types. The clients come from scripts/install-test-deps.sh: the npm
//! `@influxdata/influxdb-client` in target/node, the PyPI v1 client `influxdb`
//! in target/pyenv, Debian's `influx` CLI, and InfluxDB 1.6's own
//! subscriptions. Under CI=true a missing client fails its test.

mod util;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use util::*;

/// Every row of `SELECT * FROM {from}` in `db`, times in nanoseconds, as
/// (measurement, columns, row) sorted, so that two databases holding the
/// same points give equal lists whatever order ties come back in.
fn rows(influx: &Influx16, db: &str, from: &str) -> Vec<(String, Value, Value)> {
    let json = influx.query_ns(Some(db), &format!("SELECT * FROM {from}"));
    let mut out = Vec::new();
    for s in json["results"][0]["series"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = s["name"].as_str().unwrap_or_default().to_string();
        for row in s["values"].as_array().into_iter().flatten() {
            out.push((name.clone(), s["columns"].clone(), row.clone()));
        }
    }
    out.sort_by_key(|(n, c, r)| format!("{n}\u{0}{c}\u{0}{r}"));
    out
}

/// The field keys with their types and the tag keys of `from` in `db`.
fn schema(influx: &Influx16, db: &str, from: &str) -> (Value, Value) {
    let fields = influx.query(Some(db), &format!("SHOW FIELD KEYS FROM {from}"));
    let tags = influx.query(Some(db), &format!("SHOW TAG KEYS FROM {from}"));
    (
        fields["results"][0]["series"].clone(),
        tags["results"][0]["series"].clone(),
    )
}

/// Asserts that `from` holds exactly the same points in `via` (the server and
/// database written through the agent) as in `direct` (written without it),
/// with the same field and tag keys and field types, and that there are
/// `expected` of them. Returns the rows that came through the agent.
fn assert_same_points(
    via: (&Influx16, &str),
    direct: (&Influx16, &str),
    from: &str,
    expected: usize,
) -> Vec<(String, Value, Value)> {
    let got = rows(via.0, via.1, from);
    let want = rows(direct.0, direct.1, from);
    assert_eq!(want.len(), expected, "points of {from} written directly");
    assert_eq!(got.len(), want.len(), "points of {from} through the agent");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g, w,
            "point {i} of {from}: through the agent vs written directly"
        );
    }
    let (via_fields, via_tags) = schema(via.0, via.1, from);
    let (direct_fields, direct_tags) = schema(direct.0, direct.1, from);
    assert!(direct_fields.is_array(), "no field keys for {from}");
    assert_eq!(via_fields, direct_fields, "field keys and types of {from}");
    assert_eq!(via_tags, direct_tags, "tag keys of {from}");
    got
}

/// The value of column `name` in a row from [`rows`].
fn column<'a>(row: &'a (String, Value, Value), name: &str) -> &'a Value {
    let idx = row
        .1
        .as_array()
        .and_then(|c| c.iter().position(|c| c.as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no column {name} in {:?}", row.1));
    &row.2[idx]
}

/// Runs a client program, panicking with its output unless it exits 0, and
/// returns its stdout.
fn run_client(what: &str, cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

/// `node` and the npm client in target/node, or `None` after a SKIP line.
fn require_js_client() -> Option<(PathBuf, PathBuf)> {
    let node = require("node")?;
    require("target/node/node_modules/@influxdata/influxdb-client/package.json")?;
    Some((node, repo_root().join("target/node/node_modules")))
}

/// The npm `@influxdata/influxdb-client` (v2 API, every body gzipped) writes
/// 3,000 points with float, integer, string and boolean fields, strings
/// holding quotes, backslashes and newlines, in batches of 500, through the
/// agent. InfluxDB 1.6 has no v2 write API, so the reference is the client's
/// own line protocol of the same points (`Point.toLineProtocol()`), posted
/// straight to InfluxDB 1.6's `/write`.
#[test]
fn js_client_points_arrive_as_written() {
    let Some((node, node_modules)) = require_js_client() else {
        return;
    };
    let Some(influx) = Influx16::start() else {
        return;
    };
    influx.create_db("via_agent");
    influx.create_db("direct");
    let mut config = AgentConfig::single(
        RemoteConfig::v1("influx", &influx.url()),
        "js",
        Some("via_agent"),
    );
    config.tokens = vec!["js-token".into()];
    let agent = Agent::start(config);

    const N: usize = 3000;
    let lp = agent.dir().join("js-client.lp");
    let start = ts_ago(Duration::from_secs(3600));
    let stdout = run_client(
        "tests/js/write_with_client.js",
        Command::new(node)
            .env("NODE_PATH", &node_modules)
            .arg(repo_root().join("tests/js/write_with_client.js"))
            .args(["--url", &agent.url()])
            .args(["--token", "js-token"])
            .args(["--bucket", "js"])
            .args(["--measurement", "js"])
            .args(["--count", &N.to_string()])
            .args(["--start-ns", &start.to_string()])
            .arg("--lp-out")
            .arg(&lp),
    );
    let outcome: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("client summary is not JSON ({e}): {stdout}"));
    assert_eq!(outcome["errors"], serde_json::json!([]), "{outcome}");

    let body = std::fs::read_to_string(&lp).unwrap();
    let reply = influx.write("direct", &body);
    assert_eq!(reply.status, 204, "direct write: {}", reply.body);
    wait_eq(DEADLINE, "js points in via_agent", N as u64, || {
        influx.count("via_agent", "js", "seq")
    });
    let got = assert_same_points((&influx, "via_agent"), (&influx, "direct"), "\"js\"", N);
    let notes: Vec<&Value> = got
        .iter()
        .map(|r| column(r, "note"))
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(notes.len(), N.div_ceil(97), "points with a note");
    assert!(
        notes.iter().all(|n| n
            .as_str()
            .is_some_and(|s| s.contains("\nline two, \"quoted\"\n\tthree"))),
        "{notes:?}"
    );
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "acceptedLines"), N as u64, "{rep:#}");
    assert_conserved(&rep);
}

/// The PyPI v1 client (`InfluxDBClient`, gzip=True) writes, for every time
/// precision it offers (n, u, ms, s, m, h), points into retention policy
/// `short` and into the database's default one; through a replication of
/// every bucket (`*`) they land where the same script puts them when it
/// writes straight into InfluxDB 1.6.
#[test]
fn python_v1_client_points_arrive_as_written() {
    let Some(python) = require_python_v1_client() else {
        return;
    };
    let Some(influx) = Influx16::start() else {
        return;
    };
    for db in ["pyv1", "direct_pyv1"] {
        influx.create_db(db);
        influx.query(
            None,
            &format!("CREATE RETENTION POLICY \"short\" ON \"{db}\" DURATION 30d REPLICATION 1"),
        );
    }
    let config = AgentConfig::single(RemoteConfig::v1("influx", &influx.url()), "*", None);
    let agent = Agent::start(config);

    // Whole hours two hours back, so that every precision's times are exact.
    let base_s = (now_ns() / 1_000_000_000 / 3600 - 2) * 3600;
    let script = repo_root().join("tests/python/write_with_v1_client.py");
    let per_precision = 40;
    let write = |port: u16, db: &str| {
        run_client(
            "tests/python/write_with_v1_client.py",
            Command::new(&python)
                .arg(&script)
                .args(["--port", &port.to_string()])
                .args(["--db", db])
                .args(["--rp", "short"])
                .args(["--measurement", "pyv1"])
                .args(["--base-s", &base_s.to_string()])
                .args(["--per-precision", &per_precision.to_string()]),
        )
    };
    write(agent_port(&agent), "pyv1");
    write(influx.port, "direct_pyv1");

    let per_rp = 6 * per_precision as u64;
    wait_eq(DEADLINE, "pyv1 points in pyv1.short", per_rp, || {
        count_in(&influx, "pyv1", "short", "pyv1")
    });
    wait_eq(DEADLINE, "pyv1 points in pyv1.autogen", per_rp, || {
        count_in(&influx, "pyv1", "autogen", "pyv1")
    });
    for rp in ["short", "autogen"] {
        let from = format!("\"{rp}\".\"pyv1\"");
        let got = assert_same_points(
            (&influx, "pyv1"),
            (&influx, "direct_pyv1"),
            &from,
            per_rp as usize,
        );
        let want_tag = if rp == "short" { "short" } else { "default" };
        assert!(
            got.iter().all(|r| column(r, "rp") == want_tag),
            "points of another retention policy in {rp}"
        );
    }
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "acceptedLines"), 2 * per_rp, "{rep:#}");
    assert_conserved(&rep);
}

/// Points of `measurement` in `db`.`rp` (0 before the first arrives).
fn count_in(influx: &Influx16, db: &str, rp: &str, measurement: &str) -> u64 {
    let q = format!("SELECT count(seq) FROM \"{db}\".\"{rp}\".\"{measurement}\"");
    influx.query(Some(db), &q)["results"][0]["series"][0]["values"][0][1]
        .as_u64()
        .unwrap_or(0)
}

/// The agent's listening port, from its URL.
fn agent_port(agent: &Agent) -> u16 {
    agent
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {}", agent.url()))
}

/// The venv Python with the PyPI v1 client `influxdb` importable, or `None`
/// after a SKIP line.
fn require_python_v1_client() -> Option<PathBuf> {
    let python = require("target/pyenv/bin/python")?;
    let ok = Command::new(&python)
        .args(["-c", "import influxdb"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Some(python)
    } else {
        missing("PyPI influxdb (the v1 client) in target/pyenv")
    }
}

/// An `influx -import` file for database `db`: a DDL section that creates
/// the database and retention policy `short`, then a DML section with
/// `n` points per retention policy (`short`, then `autogen`) in
/// millisecond precision with every field type.
fn import_file(db: &str, n: usize, base_ms: i64) -> String {
    let mut f = format!(
        "# DDL\nCREATE DATABASE {db}\nCREATE RETENTION POLICY short ON {db} DURATION 30d REPLICATION 1\n\n# DML\n"
    );
    for rp in ["short", "autogen"] {
        f += &format!("# CONTEXT-DATABASE: {db}\n# CONTEXT-RETENTION-POLICY: {rp}\n");
        for i in 0..n {
            f += &format!(
                "imp,host=gw\\ {h},rp={rp} value={v},seq={i}i,ok={ok},msg=\"said \\\"{i}\\\" \\\\ here\" {t}\n",
                h = i % 4,
                v = i as f64 / 3.0,
                ok = i % 2 == 0,
                t = base_ms - 13 * i as i64,
            );
        }
    }
    f
}

/// Debian's `influx -import` (InfluxDB 1.6's CLI) with a DDL section:
/// the agent is write-only and answers its statements on `/query` with
/// 501, which the CLI logs and goes on from, so the DDL is applied to the
/// remote directly (as the README says) and the DML section's points,
/// written through the agent, land in their retention policies exactly as
/// the same file imported straight into InfluxDB 1.6.
#[test]
fn influx_import_points_arrive_as_written() {
    let Some(cli) = require("influx") else {
        return;
    };
    let Some(influx) = Influx16::start() else {
        return;
    };
    let config = AgentConfig::single(RemoteConfig::v1("influx", &influx.url()), "*", None);
    let agent = Agent::start(config);

    const N: usize = 400;
    let base_ms = now_ns() / 1_000_000 - 3_600_000;
    let import = |port: u16, db: &str| {
        let path = agent.dir().join(format!("{db}.import"));
        std::fs::write(&path, import_file(db, N, base_ms)).unwrap();
        run_client(
            "influx -import",
            Command::new(&cli)
                .args(["-host", "127.0.0.1", "-port", &port.to_string()])
                .arg("-import")
                .arg(format!("-path={}", path.display()))
                .arg("-precision=ms"),
        );
    };
    // The DDL, applied to the remote directly; the import repeats it
    // through the agent, which cannot run it.
    influx.create_db("imp");
    influx.query(
        None,
        "CREATE RETENTION POLICY short ON imp DURATION 30d REPLICATION 1",
    );
    import(agent_port(&agent), "imp");
    import(influx.port, "imp_direct");

    wait_eq(DEADLINE, "imp points in imp.short", N as u64, || {
        count_in(&influx, "imp", "short", "imp")
    });
    wait_eq(DEADLINE, "imp points in imp.autogen", N as u64, || {
        count_in(&influx, "imp", "autogen", "imp")
    });
    for rp in ["short", "autogen"] {
        let from = format!("\"{rp}\".\"imp\"");
        let got = assert_same_points((&influx, "imp"), (&influx, "imp_direct"), &from, N);
        assert!(
            got.iter().all(|r| column(r, "rp") == rp),
            "points of another retention policy in {rp}"
        );
    }
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "acceptedLines"), 2 * N as u64, "{rep:#}");
    assert_conserved(&rep);
}

/// An InfluxDB 1.6 subscription pointed at the agent: every write into the
/// source InfluxDB is pushed to the agent's v1 endpoint and replicated to a
/// second InfluxDB 1.6, where the points equal the source's, strings
/// holding newlines included.
#[test]
fn influx_subscription_points_arrive_as_written() {
    let Some(source) = Influx16::start() else {
        return;
    };
    let Some(remote) = Influx16::start() else {
        return;
    };
    source.create_db("src");
    remote.create_db("src");
    let config = AgentConfig::single(RemoteConfig::v1("influx", &remote.url()), "*", None);
    let agent = Agent::start(config);
    source.query(
        Some("src"),
        &format!(
            "CREATE SUBSCRIPTION \"s\" ON \"src\".\"autogen\" DESTINATIONS ALL '{}'",
            agent.url()
        ),
    );

    // The subscription starts pushing a moment after it is created: a
    // point written into the source every poll shows when it does.
    let mut probe = 0;
    wait_until(
        DEADLINE,
        "the subscription's first point at the remote",
        || {
            probe += 1;
            let reply = source.write("src", &format!("warmup seq={probe}i"));
            assert_eq!(reply.status, 204, "{}", reply.body);
            count_in(&remote, "src", "autogen", "warmup") > 0
        },
    );

    const N: usize = 2000;
    let base = ts_ago(Duration::from_secs(3600));
    for chunk in 0..4 {
        let mut body = String::new();
        for i in chunk * N / 4..(chunk + 1) * N / 4 {
            body += &format!(
                "sub,sensor=s{s},site=plant\\ 1 value={v},seq={i}i,ok={ok},msg=\"line {i}\nnext \\\"q\\\" \\\\ end\" {t}\n",
                s = i % 6,
                v = i as f64 / 7.0,
                ok = i % 3 == 0,
                t = base + 1_000_003 * i as i64,
            );
        }
        let reply = source.write("src", &body);
        assert_eq!(reply.status, 204, "{}", reply.body);
    }

    wait_eq(DEADLINE, "sub points at the remote", N as u64, || {
        count_in(&remote, "src", "autogen", "sub")
    });
    let got = assert_same_points((&remote, "src"), (&source, "src"), "\"sub\"", N);
    assert!(
        got.iter().all(|r| column(r, "msg")
            .as_str()
            .is_some_and(|m| m.contains("\nnext \"q\" \\ end"))),
        "a string lost its newline"
    );
    assert_conserved(&agent.replication("r1"));
}
