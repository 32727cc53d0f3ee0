//! End to end against a real InfluxDB 1.6 over the v1 write API
//! (`api = "v1"`, `remote_bucket = "db/rp"` or `"db"`), counted back with
//! `SELECT count(*)`. InfluxDB 1.6 answers with real status codes (400
//! partial write, 404 database not found), so the agent's classification of
//! answers is exercised too. String values holding newlines (the reported
//! injection body, and random strings cut at random bytes into chunks and
//! file appends) arrive as the points written, compared value by value.

mod util;

use std::time::Duration;

use serde_json::Value;
use util::*;

/// An InfluxDB 1.6 with database `edge` and an agent replicating local bucket
/// `sensors` to `remote_bucket` on it.
fn setup(remote_bucket: &str) -> Option<(Influx16, Agent)> {
    let influx = Influx16::start()?;
    influx.create_db("edge");
    let config = AgentConfig::single(
        RemoteConfig::v1("influx", &influx.url()),
        "sensors",
        Some(remote_bucket),
    );
    let agent = Agent::start(config);
    Some((influx, agent))
}

/// 10,000 lines from 4 concurrent writers (v2 and v1 local endpoints, every
/// body shape) arrive in `edge/autogen`.
#[test]
fn v1_remote_receives_everything() {
    let Some((influx, agent)) = setup("edge/autogen") else {
        return;
    };
    let base = ts_ago(Duration::from_secs(3600));
    std::thread::scope(|s| {
        for w in 0..4usize {
            let agent = &agent;
            s.spawn(move || {
                for j in 0..5usize {
                    let start = base + ((w * 5 + j) as i64) * 1_000_000_000;
                    let body = lines("iw", 8, 500, start);
                    let opts = Opts::shape(w + j);
                    let (status, text) = if w % 2 == 0 {
                        agent.write_v2("sensors", &body, &opts)
                    } else {
                        agent.write_v1("sensors", None, &body, &opts)
                    };
                    assert_eq!(status, 204, "writer {w} request {j} ({opts:?}): {text}");
                }
            });
        }
    });
    wait_eq(DEADLINE, "count(value) of iw in edge", 10_000, || {
        influx.count("edge", "iw", "value")
    });
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), 10_000, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 10_000, "{rep:#}");
    // Every field type made it, not only floats.
    for f in ["temp", "seq", "ok", "status"] {
        assert_eq!(influx.count("edge", "iw", f), 10_000, "field {f}");
    }
}

/// Remote down → writes acknowledged and queued → remote up → all there.
#[test]
fn v1_remote_down_queues_then_delivers() {
    let Some((mut influx, agent)) = setup("edge") else {
        return;
    };
    let base = ts_ago(Duration::from_secs(3600));
    let body = lines("id", 10, 1_000, base);
    assert_eq!(agent.write_v2("sensors", &body, &Opts::new()).0, 204);
    wait_eq(DEADLINE, "count(value) of id", 1_000, || {
        influx.count("edge", "id", "value")
    });
    wait_eq(DEADLINE, "r1 deliveredLines", 1_000, || {
        field(&agent.replication("r1"), "deliveredLines")
    });

    influx.stop();
    for j in 0..3i64 {
        let body = lines("id", 10, 1_000, base + (j + 1) * 1_000_000_000);
        let (status, text) = agent.write_v1("sensors", None, &body, &Opts::shape(j as usize));
        assert_eq!(status, 204, "write {j} with the remote down: {text}");
    }
    let mut rep = Value::Null;
    wait_until(
        DEADLINE,
        "r1 state \"backoff\" with latestErrorMessage set",
        || {
            rep = agent.replication("r1");
            str_field(&rep, "state") == "backoff"
                && !str_field(&rep, "latestErrorMessage").is_empty()
        },
    );
    assert_eq!(field(&rep, "remainingLines"), 3_000, "{rep:#}");
    assert_eq!(field(&rep, "acceptedLines"), 4_000, "{rep:#}");
    assert!(field(&rep, "currentQueueSizeBytes") > 0, "{rep:#}");
    assert_conserved(&rep);

    influx.restart();
    wait_eq(
        DEADLINE,
        "count(value) of id after the remote came back",
        4_000,
        || influx.count("edge", "id", "value"),
    );
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 4_000, "{rep:#}");
}

/// SIGKILL of the agent while the remote is down and a backlog is queued:
/// after both restart, every acknowledged line is in InfluxDB.
#[test]
fn v1_agent_sigkill_with_backlog_loses_nothing() {
    let Some((mut influx, mut agent)) = setup("edge/autogen") else {
        return;
    };
    influx.stop();
    let base = ts_ago(Duration::from_secs(3600));
    for j in 0..8i64 {
        let body = lines("ik", 6, 600, base + j * 1_000_000_000);
        let (status, text) = agent.write_v2("sensors", &body, &Opts::shape(j as usize));
        assert_eq!(status, 204, "{text}");
    }
    agent.kill9();
    agent.restart();
    let rep = agent.replication("r1");
    assert_eq!(
        field(&rep, "remainingLines"),
        4_800,
        "backlog after SIGKILL: {rep:#}"
    );
    assert_conserved(&rep);
    influx.restart();
    wait_eq(DEADLINE, "count(value) of ik", 4_800, || {
        influx.count("edge", "ik", "value")
    });
    agent.wait_drained("r1");
}

/// A 400 partial write (field type conflict) on 5 of 100 lines: only those
/// 5 are set aside (dead-lettered, the default) and the stream goes on.
#[test]
fn v1_type_conflict_sets_aside_only_the_refused_lines() {
    let Some((influx, agent)) = setup("edge") else {
        return;
    };
    let ts = ts_ago(Duration::from_secs(600));
    // `value` becomes a float field in InfluxDB.
    let r = influx.write("edge", &format!("tc,sensor=pre value=0.5 {ts}\n"));
    assert_eq!(r.status, 204, "{}", r.body);

    let mut body = String::new();
    for i in 0..100i64 {
        let t = ts + (i + 1) * 1_000_000;
        if i % 20 == 7 {
            body.push_str(&format!("tc,sensor=bad{i} value={i}i {t}\n"));
        } else {
            body.push_str(&format!("tc,sensor=s{i} value={i}.25 {t}\n"));
        }
    }
    let (status, text) = agent.write_v2("sensors", &body, &Opts::new());
    assert_eq!(
        status, 204,
        "the agent itself has nothing against these lines: {text}"
    );

    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 95, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 5, "{rep:#}");
    assert_eq!(influx.count("edge", "tc", "value"), 96);
    // The stream is not stuck: later data flows.
    let more = lines("tc2", 2, 10, ts + 1_000_000_000);
    assert_eq!(agent.write_v2("sensors", &more, &Opts::new()).0, 204);
    wait_eq(DEADLINE, "count(value) of tc2", 10, || {
        influx.count("edge", "tc2", "value")
    });
}

/// Database missing at the remote (404): the stream pauses and keeps the
/// data; once the database exists, a reload (SIGHUP) retries at once.
#[test]
fn v1_missing_database_pauses_then_resumes_on_reload() {
    let Some(influx) = Influx16::start() else {
        return;
    };
    let config = AgentConfig::single(
        RemoteConfig::v1("influx", &influx.url()),
        "sensors",
        Some("later"),
    );
    let agent = Agent::start(config);
    let body = lines("mp", 5, 500, ts_ago(Duration::from_secs(600)));
    assert_eq!(agent.write_v2("sensors", &body, &Opts::new()).0, 204);

    let mut rep = Value::Null;
    wait_until(DEADLINE, "r1 state \"paused\" after a 404", || {
        rep = agent.replication("r1");
        str_field(&rep, "state") == "paused"
    });
    assert_eq!(rep["latestResponseCode"], 404, "{rep:#}");
    assert_eq!(field(&rep, "remainingLines"), 500, "{rep:#}");
    assert_conserved(&rep);

    influx.create_db("later");
    agent.sighup();
    wait_eq(
        DEADLINE,
        "count(value) of mp after CREATE DATABASE + SIGHUP",
        500,
        || influx.count("later", "mp", "value"),
    );
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 500, "{rep:#}");
}

/// A replication of every bucket (`*`) keeps the retention policy of each
/// v1 write: at a v1 remote, points written with `rp=short` land in
/// `misc.short`, points written without one in the database's default, and
/// none in the other.
#[test]
fn retention_policies_travel_through_a_star_replication() {
    let Some(influx) = Influx16::start() else {
        return;
    };
    influx.create_db("misc");
    influx.query(
        None,
        "CREATE RETENTION POLICY \"short\" ON \"misc\" DURATION 30d REPLICATION 1",
    );
    let config = AgentConfig::single(RemoteConfig::v1("influx", &influx.url()), "*", None);
    let agent = Agent::start(config);
    let base = ts_ago(Duration::from_secs(3600));
    let cases = [
        ("rp_short", Some("short"), 300),
        ("rp_default", None, 200),
        ("rp_autogen", Some("autogen"), 100),
    ];
    for (i, (m, rp, n)) in cases.iter().enumerate() {
        let body = lines(m, 3, *n, base);
        let (status, text) = agent.write_v1("misc", *rp, &body, &Opts::shape(i));
        assert_eq!(status, 204, "{m}: {text}");
    }
    wait_eq(DEADLINE, "rp_short in misc.short", 300, || {
        influx.count_in("misc", "short", "rp_short", "value")
    });
    wait_eq(DEADLINE, "rp_default in misc.autogen", 200, || {
        influx.count_in("misc", "autogen", "rp_default", "value")
    });
    wait_eq(DEADLINE, "rp_autogen in misc.autogen", 100, || {
        influx.count_in("misc", "autogen", "rp_autogen", "value")
    });
    assert_eq!(influx.count_in("misc", "autogen", "rp_short", "value"), 0);
    assert_eq!(influx.count_in("misc", "short", "rp_default", "value"), 0);
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 600, "{rep:#}");
}

/// The same at a v2 remote: a v1 write with a retention policy goes to
/// bucket `db/rp` (the name InfluxDB 2.x and Cloud give a database and
/// retention policy), one without to bucket `db`; and a replication of the
/// database alone still takes writes that name a retention policy.
#[test]
fn a_v1_write_with_a_retention_policy_goes_to_bucket_db_slash_rp_at_a_v2_remote() {
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("cloud", &sink.url()), "*", None);
    config
        .replications
        .push(ReplicationConfig::new("r2", "cloud", "plain").remote_bucket("plain-at-remote"));
    let agent = Agent::start(config);
    let base = ts_ago(Duration::from_secs(600));
    let (status, text) =
        agent.write_v1("misc", Some("short"), lines("a", 1, 5, base), &Opts::new());
    assert_eq!(status, 204, "{text}");
    let (status, text) = agent.write_v1("misc", None, lines("b", 1, 7, base), &Opts::new());
    assert_eq!(status, 204, "{text}");
    let (status, text) = agent.write_v1(
        "plain",
        Some("weekly"),
        lines("c", 1, 3, base),
        &Opts::new(),
    );
    assert_eq!(status, 204, "{text}");
    wait_eq(DEADLINE, "lines at the remote", 5 + 7 + 3 * 2, || {
        sink.lines_accepted().len()
    });
    let mut by_bucket: std::collections::BTreeMap<String, usize> = Default::default();
    for r in sink.requests() {
        let bucket = r
            .target
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("bucket="))
            .unwrap_or("")
            .to_string();
        *by_bucket.entry(bucket).or_default() += r.lines().len();
    }
    let expected: std::collections::BTreeMap<String, usize> = [
        ("misc%2Fshort", 5),
        ("misc", 7),
        ("plain%2Fweekly", 3),
        ("plain-at-remote", 3),
    ]
    .into_iter()
    .map(|(b, n)| (b.to_string(), n))
    .collect();
    assert_eq!(by_bucket, expected);
}

/// The body from the report of a point injected through a string value:
/// InfluxDB reads it as one `applog` point with a three-line string.
const MULTI_LINE: &str = "applog,app=web msg=\"request failed:\n\
                          injected,host=x value=42 1764000000000000000\n\
                          end\" 1764000000000000000\n";
const MULTI_LINE_MSG: &str = "request failed:\ninjected,host=x value=42 1764000000000000000\nend";

/// `(measurement names, rows of SELECT * FROM applog)` in `db`.
fn applog_rows(influx: &Influx16, db: &str) -> (Vec<String>, Vec<Value>) {
    let m = influx.query(Some(db), "SHOW MEASUREMENTS");
    let names = m["results"][0]["series"][0]["values"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v[0].as_str().unwrap().to_string())
        .collect();
    let rows = influx.query(Some(db), "SELECT app, msg FROM applog");
    let rows = rows["results"][0]["series"][0]["values"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    (names, rows)
}

/// Sends `body` as a chunked request whose chunks are cut at `cuts`, with
/// `headers` (each ending in `\r\n`); returns the raw answer.
fn write_chunked_raw(port: u16, path: &str, headers: &str, body: &[u8], cuts: &[usize]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\
         Content-Type: text/plain\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut from = 0;
    for &to in cuts.iter().chain([&body.len()]) {
        write!(s, "{:x}\r\n", to - from).unwrap();
        s.write_all(&body[from..to]).unwrap();
        s.write_all(b"\r\n").unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        from = to;
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

/// A newline inside a string value is part of the value through every body
/// shape (plain, gzip, chunked, chunks and gzip members cut inside the
/// string): one `applog` point with the three-line string arrives, and no
/// `injected` point.
#[test]
fn v1_a_string_holding_newlines_arrives_as_one_point() {
    let Some((influx, agent)) = setup("edge") else {
        return;
    };
    for i in 0..4 {
        let opts = Opts::shape(i);
        let (status, text) = agent.write_v2("sensors", MULTI_LINE, &opts);
        assert_eq!(status, 204, "{opts:?}: {text}");
    }
    let body = MULTI_LINE.as_bytes();
    let inside = MULTI_LINE.find("injected").unwrap();
    let answer = write_chunked_raw(
        agent.port,
        "/write?db=sensors",
        "",
        body,
        &[inside - 3, inside + 1, inside + 50],
    );
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    // Two gzip members, the first ending inside the string, sent in chunks
    // cut inside each member.
    let first = gzip(&body[..inside + 4]);
    let members = [first.clone(), gzip(&body[inside + 4..])].concat();
    let answer = write_chunked_raw(
        agent.port,
        "/write?db=sensors",
        "Content-Encoding: gzip\r\n",
        &members,
        &[first.len() / 2, first.len() + 5],
    );
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");

    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), 6, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 6, "{rep:#}");
    let (names, rows) = applog_rows(&influx, "edge");
    assert_eq!(names, ["applog"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][1], "web");
    assert_eq!(rows[0][2], MULTI_LINE_MSG);

    // A stray quote takes in the rest of the body: one invalid point, named
    // by the line it starts on; the point before it is queued.
    let (status, text) = agent.write_v2(
        "sensors",
        "ok,app=web v=1 1764000000000000000\nbad s=\"open 1\nlater v=2 1764000000000000000\n",
        &Opts::new(),
    );
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("1 of 2 lines invalid: line 2: unterminated string (column 7)"),
        "{text}"
    );
    wait_eq(DEADLINE, "count(v) of ok", 1, || {
        influx.count("edge", "ok", "v")
    });
    assert_eq!(influx.count("edge", "later", "v"), 0);
}

/// Random points whose strings hold quotes, backslashes, newlines and
/// multi-byte UTF-8, as `(n, string)` and as line protocol.
fn random_points(
    rng: &mut impl rand::Rng,
    measurement: &str,
    count: usize,
) -> (Vec<(i64, String)>, String) {
    const CHARS: &[char] = &[
        'a', 'z', ' ', ',', '=', '"', '\\', '\n', '#', 'é', '東', '😀',
    ];
    let base = ts_ago(Duration::from_secs(600));
    let mut want = Vec::new();
    let mut text = String::new();
    for n in 0..count as i64 {
        let len = rng.random_range(0..24);
        let s: String = (0..len)
            .map(|_| CHARS[rng.random_range(0..CHARS.len())])
            .collect();
        let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
        text += &format!("{measurement},i={n} s=\"{escaped}\",n={n}i {}\n", base + n);
        want.push((n, s));
    }
    (want, text)
}

/// `(n, s)` of every point of `measurement` in `edge`, by `n`.
fn strings_at(influx: &Influx16, measurement: &str) -> Vec<(i64, String)> {
    let rows = influx.query(Some("edge"), &format!("SELECT n, s FROM {measurement}"));
    let mut got: Vec<(i64, String)> = rows["results"][0]["series"][0]["values"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r[1].as_i64().unwrap(), r[2].as_str().unwrap().to_string()))
        .collect();
    got.sort();
    got
}

/// Random points with random strings, sent as chunked bodies cut at random
/// bytes and as file appends cut at random bytes, arrive at InfluxDB 1.6
/// with exactly the strings written (seed from `MULTILINE_SEED` to replay).
#[test]
fn v1_random_strings_survive_random_cuts() {
    use rand::{Rng, SeedableRng};
    let seed = std::env::var("MULTILINE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ns() as u64);
    eprintln!("random strings: MULTILINE_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Some(influx) = Influx16::start() else {
        return;
    };
    influx.create_db("edge");
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("random.lp");
    let config = AgentConfig::single(
        RemoteConfig::v1("influx", &influx.url()),
        "sensors",
        Some("edge"),
    );
    let launch = Launch::new().append(&format!(
        "[[tail]]\npath = {}\nbucket = \"sensors\"\npoll_interval = \"10ms\"\n",
        toml_str(&file.display().to_string())
    ));
    let agent = Agent::start_with(config, &launch);

    let (want_http, body) = random_points(&mut rng, "rh", 60);
    let mut cuts: Vec<usize> = (0..8)
        .map(|_| rng.random_range(1..body.len()))
        .filter(|&k| body.is_char_boundary(k))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let answer = write_chunked_raw(agent.port, "/write?db=sensors", "", body.as_bytes(), &cuts);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");

    let (want_tail, text) = random_points(&mut rng, "rt", 60);
    let bytes = text.as_bytes();
    let mut from = 0;
    while from < bytes.len() {
        let to = (from + rng.random_range(1..200)).min(bytes.len());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .unwrap();
        std::io::Write::write_all(&mut f, &bytes[from..to]).unwrap();
        drop(f);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
        from = to;
    }

    wait_eq(DEADLINE, "points of rh and rt", 120, || {
        influx.count("edge", "rh", "n") + influx.count("edge", "rt", "n")
    });
    agent.wait_drained("r1");
    assert_eq!(strings_at(&influx, "rh"), want_http);
    assert_eq!(strings_at(&influx, "rt"), want_tail);
    let names = influx.query(Some("edge"), "SHOW MEASUREMENTS");
    assert_eq!(
        names["results"][0]["series"][0]["values"],
        serde_json::json!([["rh"], ["rt"]])
    );
    assert_eq!(agent.source("tail")["invalidLines"], 0);
}

/// InfluxDB 1.x has no unsigned integers. When every replication of a
/// bucket writes to a v1 remote, a point with a `u` field is refused at
/// once (400 naming it), as InfluxDB 1.x itself would refuse it, and its
/// neighbours are queued; when a v2 remote takes the bucket too, the point
/// is accepted, delivered there, and set aside, counted, by the v1 one.
#[test]
fn unsigned_integers_toward_a_v1_remote() {
    let Some(influx) = Influx16::start() else {
        return;
    };
    influx.create_db("edge");
    let ts = ts_ago(Duration::from_secs(600));
    let body = format!(
        "u_ok,k=a value=1i {ts}\nu_bad,k=b value=7u {}\nu_ok,k=c value=3i {}\n",
        ts + 1,
        ts + 2
    );

    let config = AgentConfig::single(
        RemoteConfig::v1("influx", &influx.url()),
        "sensors",
        Some("edge"),
    );
    let agent = Agent::start(config);
    let (status, text) = agent.write_v2("sensors", &body, &Opts::new());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("line 2"), "{text}");
    assert!(text.contains("unsigned integer"), "{text}");
    assert!(text.contains("InfluxDB 1.x"), "{text}");
    wait_eq(DEADLINE, "the two good points at the remote", 2, || {
        influx.count("edge", "u_ok", "value")
    });
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "acceptedLines"), 2, "{rep:#}");
    drop(agent);

    // A v2 remote takes the bucket as well: the write is accepted whole.
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(
        RemoteConfig::v1("influx", &influx.url()),
        "mixed",
        Some("edge"),
    );
    config.remotes.push(RemoteConfig::v2("cloud", &sink.url()));
    config
        .replications
        .push(ReplicationConfig::new("r2", "cloud", "mixed"));
    let agent = Agent::start(config);
    let (status, text) = agent.write_v2("mixed", &body, &Opts::new());
    assert_eq!(status, 204, "{text}");
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 2, "{rep:#}");
    assert_eq!(field(&rep, "deadLetteredLines"), 1, "{rep:#}");
    wait_eq(DEADLINE, "three points at the v2 remote", 3, || {
        sink.lines_accepted().len()
    });
}

/// A replication of every bucket (`*`): a write to a database the remote
/// lacks (404 `database not found`) is held alone, while the lines of a
/// database that exists keep arriving, before and after it. Once the
/// database is created, a reload (SIGHUP) retries it at once (`max_backoff`
/// is 60 s) and its lines arrive.
#[test]
fn a_missing_database_is_held_alone_and_arrives_after_create_and_reload() {
    let Some(influx) = Influx16::start() else {
        return;
    };
    influx.create_db("plant");
    let mut remote = RemoteConfig::v1("influx", &influx.url());
    remote.max_backoff = "60s".into();
    let agent = Agent::start(AgentConfig::single(remote, "*", None));
    let base = ts_ago(Duration::from_secs(600));
    let opts = Opts::new();
    let write = |db: &str, body: String| {
        assert_eq!(agent.write_v1(db, None, body, &opts).0, 204);
    };
    write("plant", lines("ok1", 5, 300, base));
    write("typo_db", lines("typo", 5, 200, base));
    write("plant", lines("ok2", 5, 300, base));
    wait_eq(DEADLINE, "count(value) of ok1 and ok2", 600, || {
        influx.count("plant", "ok1", "value") + influx.count("plant", "ok2", "value")
    });
    let mut rep = Value::Null;
    // The remote has the batches a moment before their settlement commits.
    wait_until(
        DEADLINE,
        "typo_db held with 200 lines, nothing else queued",
        || {
            rep = agent.replication("r1");
            rep["heldDestinations"][0]["lines"] == 200 && rep["remainingLines"] == 200
        },
    );
    assert_conserved(&rep);
    assert_eq!(str_field(&rep, "state"), "running", "{rep:#}");
    let held = &rep["heldDestinations"][0];
    assert_eq!(held["destination"], "typo_db", "{rep:#}");
    assert_eq!(held["code"], 404, "{rep:#}");
    assert!(
        str_field(held, "message").contains("database not found"),
        "{rep:#}"
    );

    // Still flowing while held.
    write("plant", lines("ok3", 5, 100, base));
    wait_eq(DEADLINE, "count(value) of ok3", 100, || {
        influx.count("plant", "ok3", "value")
    });

    influx.create_db("typo_db");
    agent.sighup();
    wait_eq(
        Duration::from_secs(30),
        "count(value) of typo after CREATE DATABASE + SIGHUP (max_backoff is 60 s)",
        200,
        || influx.count("typo_db", "typo", "value"),
    );
    let rep = agent.wait_drained("r1");
    assert_eq!(field(&rep, "deliveredLines"), 900, "{rep:#}");
    assert_eq!(rep["heldDestinations"], serde_json::json!([]), "{rep:#}");
}
