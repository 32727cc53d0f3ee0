//! The real remotes the end-to-end tests write to: VictoriaMetrics and
//! InfluxDB 1.6, each a [`ServerProcess`] with its storage in a temp dir.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tempfile::TempDir;

use super::*;

// ---------------------------------------------------------------------------
// VictoriaMetrics
// ---------------------------------------------------------------------------

/// A VictoriaMetrics single-node server on a free loopback port, with its
/// storage in a temp dir. Killed on drop.
pub struct VictoriaMetrics {
    process: ServerProcess,
    pub port: u16,
    /// The address it listens on (loopback, or a lab namespace's end).
    ip: String,
    /// Words run before the binary, e.g. `ip netns exec NS`.
    prefix: Vec<String>,
    dir: TempDir,
    bin: PathBuf,
    http: ureq::Agent,
}

impl VictoriaMetrics {
    /// Starts a server; `None` (after a SKIP line) when the binary is missing.
    pub fn start() -> Option<VictoriaMetrics> {
        VictoriaMetrics::start_at("127.0.0.1", Vec::new())
    }

    /// Starts a server inside `lab`'s namespace, on its end of the veth.
    pub fn start_in(lab: &NetLab) -> Option<VictoriaMetrics> {
        VictoriaMetrics::start_at(&lab.ns_ip.to_string(), lab.prefix())
    }

    /// A server listening on `ip`, run as `prefix... victoria-metrics ...`.
    pub fn start_at(ip: &str, prefix: Vec<String>) -> Option<VictoriaMetrics> {
        let mut vm = VictoriaMetrics::stopped_at(ip, prefix)?;
        // Someone else may take the port between the pick and the bind.
        for _ in 0..10 {
            vm.port = free_port();
            let mut cmd = vm.command();
            if vm.process.try_start(&mut cmd, vm.port, vm.ready()) {
                return Some(vm);
            }
        }
        panic!("victoria-metrics: every port tried was taken");
    }

    /// A server inside `lab`'s namespace that does not run yet: connections
    /// to `url()` are refused until [`VictoriaMetrics::restart`]. Nothing
    /// else listens in a lab's namespace, so its port is free for it.
    pub fn stopped_in(lab: &NetLab) -> Option<VictoriaMetrics> {
        let mut vm = VictoriaMetrics::stopped_at(&lab.ns_ip.to_string(), lab.prefix())?;
        vm.port = free_port();
        Some(vm)
    }

    fn stopped_at(ip: &str, prefix: Vec<String>) -> Option<VictoriaMetrics> {
        let bin = require("victoria-metrics")?;
        let dir = tempfile::Builder::new().prefix("vm-").tempdir().unwrap();
        Some(VictoriaMetrics {
            process: ServerProcess::new(
                "victoria-metrics",
                dir.path().join("victoria-metrics.log"),
            ),
            port: 0,
            ip: ip.to_string(),
            prefix,
            dir,
            bin,
            http: http(),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    /// Process id of the server, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The command that serves `self.port` with the storage in `self.dir`.
    fn command(&self) -> Command {
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.bin);
                cmd
            }
            None => Command::new(&self.bin),
        };
        cmd.arg(format!("-httpListenAddr={}:{}", self.ip, self.port))
            .arg(format!(
                "-storageDataPath={}",
                self.dir.path().join("data").display()
            ))
            .args([
                "-retentionPeriod=100y",
                "-search.latencyOffset=0s",
                "-search.disableCache",
                "-dedup.minScrapeInterval=1ms",
                // Its info lines would drown the agent's log in a failure report.
                "-loggerLevel=WARN",
            ]);
        cmd
    }

    fn ready(&self) -> impl FnMut() -> bool {
        let url = format!("{}/health", self.url());
        let http = self.http.clone();
        move || matches!(get(&http, &url, None), Ok(r) if r.status == 200)
    }

    /// Takes the server down so that the agent sees connection refused.
    ///
    /// The data it acknowledged is flushed first and the process then gets
    /// SIGTERM (SIGKILL after 15 s): a remote that loses its own last second
    /// of acknowledged data would make the agent look guilty of a loss.
    pub fn stop(&mut self) {
        if self.process.pid().is_some() {
            let _ = get(
                &self.http,
                &format!("{}/internal/force_flush", self.url()),
                None,
            );
        }
        self.process.stop();
    }

    /// SIGKILL, for tests about the remote crashing (may lose its last second).
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = self.command();
        self.process.start_again(&mut cmd, self.port, self.ready());
    }

    /// Raw export lines (one JSON object per series) matching `selector`.
    pub fn export(&self, selector: &str) -> Vec<Value> {
        let _ = get(
            &self.http,
            &format!("{}/internal/force_flush", self.url()),
            None,
        );
        let end = (now_ns() / 1_000_000_000 + 2 * 86_400).to_string();
        let reply = self
            .http
            .get(format!("{}/api/v1/export", self.url()))
            .query("match[]", selector)
            .query("start", "0")
            .query("end", &end)
            .call()
            .map(Reply::from)
            .expect("export from victoria-metrics");
        assert_eq!(reply.status, 200, "export failed: {}", reply.body);
        reply
            .body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("export line is JSON"))
            .collect()
    }

    /// Number of samples (not series) of `metric`, e.g. `m_value`.
    pub fn count(&self, metric: &str) -> u64 {
        self.export(metric)
            .iter()
            .map(|s| s["timestamps"].as_array().map_or(0, |a| a.len() as u64))
            .sum()
    }

    /// The (sensor tag, ms timestamp) keys of every sample of `metric`.
    pub fn keys(&self, metric: &str) -> HashSet<Key> {
        let mut out = HashSet::new();
        for series in self.export(metric) {
            let sensor = series["metric"]["sensor"]
                .as_str()
                .unwrap_or("")
                .to_string();
            for ts in series["timestamps"].as_array().into_iter().flatten() {
                out.insert((sensor.clone(), ts.as_i64().expect("ms timestamp")));
            }
        }
        out
    }

    /// Samples of `metric` as (labels, ms timestamp, value).
    pub fn samples(&self, metric: &str) -> Vec<(Value, i64, f64)> {
        let mut out = Vec::new();
        for series in self.export(metric) {
            let ts = series["timestamps"].as_array().cloned().unwrap_or_default();
            let vs = series["values"].as_array().cloned().unwrap_or_default();
            for (t, v) in ts.iter().zip(vs.iter()) {
                out.push((
                    series["metric"].clone(),
                    t.as_i64().unwrap(),
                    v.as_f64().unwrap_or(f64::NAN),
                ));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// InfluxDB 1.6
// ---------------------------------------------------------------------------

/// An InfluxDB 1.6 server bound to loopback, with meta, data and WAL in a temp
/// dir, monitoring and reporting off. Killed on drop.
pub struct Influx16 {
    process: ServerProcess,
    pub port: u16,
    dir: TempDir,
    bin: PathBuf,
    http: ureq::Agent,
    /// `[http] auth-enabled`: the admin's `Authorization` header, which
    /// every query of the helpers then sends.
    admin: Option<String>,
}

impl Influx16 {
    /// Starts a server; `None` (after a SKIP line) when `influxd` is missing.
    pub fn start() -> Option<Influx16> {
        Influx16::start_inner(None)
    }

    /// As [`Influx16::start`], with `[http] auth-enabled = true` and an
    /// admin user `user` (created through `/query`, as InfluxDB allows for
    /// the first user): writes then need a user's credentials.
    pub fn start_with_auth(user: &str, password: &str) -> Option<Influx16> {
        let mut influx = Influx16::start_inner(Some(String::new()))?;
        influx.admin = None;
        influx.query(
            None,
            &format!("CREATE USER \"{user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES"),
        );
        influx.admin = Some(basic_auth(user, password));
        Some(influx)
    }

    fn start_inner(admin: Option<String>) -> Option<Influx16> {
        let bin = require("influxd")?;
        let dir = tempfile::Builder::new()
            .prefix("influx16-")
            .tempdir()
            .unwrap();
        let mut influx = Influx16 {
            process: ServerProcess::new("influxd", dir.path().join("influxd.log")),
            port: 0,
            dir,
            bin,
            http: http(),
            admin,
        };
        // Someone else may take a port between the pick and the bind.
        for _ in 0..10 {
            influx.port = free_port();
            influx.write_config(free_port());
            let mut cmd = influx.command();
            if influx
                .process
                .try_start(&mut cmd, influx.port, influx.ready())
            {
                return Some(influx);
            }
        }
        panic!("influxd: every port tried was taken");
    }

    /// Writes its config: HTTP on `self.port`, the RPC service on `rpc_port`.
    fn write_config(&self, rpc_port: u16) {
        let d = self.dir.path();
        let config = format!(
            r#"reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{meta}"

[data]
  dir = "{data}"
  wal-dir = "{wal}"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
  auth-enabled = {auth}

[logging]
  level = "warn"
"#,
            port = self.port,
            auth = self.admin.is_some(),
            meta = d.join("meta").display(),
            data = d.join("data").display(),
            wal = d.join("wal").display(),
        );
        fs::write(d.join("influxdb.conf"), config).unwrap();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The WAL directory (a real TSM WAL).
    pub fn wal_dir(&self) -> PathBuf {
        self.dir.path().join("wal")
    }

    /// The command that serves with the config `write_config` wrote.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("-config")
            .arg(self.dir.path().join("influxdb.conf"));
        cmd
    }

    fn ready(&self) -> impl FnMut() -> bool {
        let url = format!("{}/ping", self.url());
        let http = self.http.clone();
        move || matches!(get(&http, &url, None), Ok(r) if r.status == 204)
    }

    /// SIGTERM (SIGKILL after 15 s): the agent then sees connection refused.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts again on the same ports and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.restart_stopped();
    }

    fn restart_stopped(&mut self) {
        let mut cmd = self.command();
        self.process.start_again(&mut cmd, self.port, self.ready());
    }

    /// Runs an InfluxQL statement; panics unless it succeeded.
    pub fn query(&self, db: Option<&str>, q: &str) -> Value {
        self.query_with(db, q, None)
    }

    /// As [`Influx16::query`], with times as integer nanoseconds
    /// (`epoch=ns`) rather than RFC 3339 strings.
    pub fn query_ns(&self, db: Option<&str>, q: &str) -> Value {
        self.query_with(db, q, Some("ns"))
    }

    fn query_with(&self, db: Option<&str>, q: &str, epoch: Option<&str>) -> Value {
        let mut req = self.http.post(format!("{}/query", self.url()));
        if let Some(epoch) = epoch {
            req = req.query("epoch", epoch);
        }
        if let Some(a) = &self.admin {
            req = req.header("Authorization", a);
        }
        if let Some(db) = db {
            req = req.query("db", db);
        }
        let reply = req
            .query("q", q)
            .send_empty()
            .map(Reply::from)
            .expect("query influxd");
        assert_eq!(reply.status, 200, "query {q:?} failed: {}", reply.body);
        let json = reply.json();
        if let Some(err) = json["results"][0].get("error") {
            panic!("query {q:?} failed: {err}");
        }
        json
    }

    pub fn create_db(&self, name: &str) {
        self.query(None, &format!("CREATE DATABASE \"{name}\""));
    }

    /// Number of points of `measurement` with `field` set, from
    /// `SELECT count(*)` (0 when the measurement does not exist yet).
    pub fn count(&self, db: &str, measurement: &str, field: &str) -> u64 {
        let json = self.query(Some(db), &format!("SELECT count(*) FROM \"{measurement}\""));
        let Some(series) = json["results"][0]["series"].as_array() else {
            return 0;
        };
        let column = format!("count_{field}");
        let mut total = 0;
        for s in series {
            let cols = s["columns"].as_array().expect("columns");
            let idx = cols
                .iter()
                .position(|c| c.as_str() == Some(&column))
                .unwrap_or_else(|| panic!("no column {column} in {s}"));
            for row in s["values"].as_array().into_iter().flatten() {
                total += row[idx].as_u64().unwrap_or(0);
            }
        }
        total
    }

    /// Points with `field` of `measurement` in `db`.`rp` (0 when none).
    pub fn count_in(&self, db: &str, rp: &str, measurement: &str, field: &str) -> u64 {
        let q = format!("SELECT count(\"{field}\") FROM \"{db}\".\"{rp}\".\"{measurement}\"");
        let json = self.query(Some(db), &q);
        json["results"][0]["series"][0]["values"][0][1]
            .as_u64()
            .unwrap_or(0)
    }

    /// Writes directly into retention policy `rp` of `db`.
    pub fn write_rp(&self, db: &str, rp: &str, body: &str) -> Reply {
        post_write(
            &self.http,
            &format!("{}/write", self.url()),
            &[("db", db), ("rp", rp)],
            body.as_bytes(),
            &Opts::new().precision("ns"),
        )
    }

    /// Writes directly (not through the agent), e.g. to set a field's type.
    pub fn write(&self, db: &str, body: &str) -> Reply {
        post_write(
            &self.http,
            &format!("{}/write", self.url()),
            &[("db", db)],
            body.as_bytes(),
            &Opts::new().precision("ns"),
        )
    }
}

impl Influx16 {
    /// As `start`, with `lines` added to the `[data]` section of its config
    /// (e.g. `cache-snapshot-write-cold-duration = "2s"`).
    pub fn start_with_data(lines: &str) -> Option<Influx16> {
        let mut influx = Influx16::start()?;
        influx.stop();
        let path = influx.dir.path().join("influxdb.conf");
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, insert_after(&text, "[data]", lines)).unwrap();
        influx.restart_stopped();
        Some(influx)
    }

    /// The WAL segment files of database `db`, relative to the WAL dir.
    pub fn wal_segments(&self, db: &str) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "wal") {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.wal_dir().join(db), &mut out);
        out.sort();
        out
    }
}
