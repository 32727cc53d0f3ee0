//! Replicating processed data: downsampling, measurement filters and added
//! tags, end to end against real VictoriaMetrics.

mod util;

use std::collections::BTreeMap;
use std::time::Duration;

use util::*;

const S: i64 = 1_000_000_000;

/// The first window start, `lead` seconds ahead, aligned to `every` seconds.
fn future_window(every_s: i64, lead_s: i64) -> i64 {
    let t = now_ns() + lead_s * S;
    (t / (every_s * S) + 1) * every_s * S
}

#[derive(Debug, Clone)]
struct Point {
    host: &'static str,
    ts: i64,
    temp: f64,
    count: i64,
    ok: bool,
}

impl Point {
    fn line(&self) -> String {
        format!(
            "env,host={} temp={},count={}i,ok={},note=\"n {}\" {}\n",
            self.host, self.temp, self.count, self.ok, self.count, self.ts
        )
    }
}

/// Reference aggregates: (host, window stop ms) -> (mean temp, mean count, last ok).
fn reference(points: &[Point], every: i64) -> BTreeMap<(String, i64), (f64, f64, f64)> {
    let mut groups: BTreeMap<(String, i64), Vec<&Point>> = BTreeMap::new();
    for p in points {
        let stop = p.ts.div_euclid(every) * every + every;
        groups
            .entry((p.host.to_string(), stop / 1_000_000))
            .or_default()
            .push(p);
    }
    groups
        .into_iter()
        .map(|(k, ps)| {
            let n = ps.len() as f64;
            let temp = ps.iter().map(|p| p.temp).sum::<f64>() / n;
            let count = ps.iter().map(|p| p.count as f64).sum::<f64>() / n;
            let last = ps.iter().max_by_key(|p| p.ts).unwrap();
            (k, (temp, count, if last.ok { 1.0 } else { 0.0 }))
        })
        .collect()
}

/// (host, ts ms) -> value of `metric` at the remote.
fn at_remote(vm: &VictoriaMetrics, metric: &str) -> BTreeMap<(String, i64), f64> {
    vm.samples(metric)
        .into_iter()
        .map(|(labels, ts, v)| ((labels["host"].as_str().unwrap_or("").to_string(), ts), v))
        .collect()
}

fn points(base: i64, hosts: &[&'static str], per_host: i64, step: i64) -> Vec<Point> {
    let mut out = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        for k in 0..per_host {
            out.push(Point {
                host,
                ts: base + k * step + h as i64,
                temp: 20.0 + (k * 7 % 13) as f64 * 0.25 + h as f64,
                count: k * 3 - 5,
                ok: (k + h as i64) % 3 == 0,
            });
        }
    }
    out
}

fn downsample(every: &str) -> String {
    format!("\n[replication.downsample]\nevery = \"{every}\"\nallowed_lateness = \"500ms\"\n")
}

#[test]
fn raw_and_downsampled_replications_of_one_bucket() {
    let (Some(raw_vm), Some(ds_vm)) = (VictoriaMetrics::start(), VictoriaMetrics::start()) else {
        return;
    };
    let mut ds = ReplicationConfig::new("ds", "ds_vm", "sensors");
    ds.extra = downsample("1s");
    let config = AgentConfig {
        remotes: vec![
            RemoteConfig::v2("raw_vm", &raw_vm.url()),
            RemoteConfig::v2("ds_vm", &ds_vm.url()),
        ],
        replications: vec![ReplicationConfig::new("raw", "raw_vm", "sensors"), ds],
        ..AgentConfig::default()
    };
    let agent = Agent::start(config);
    // Three one-second windows starting at least two seconds ahead, so all
    // are open when written; points out of order across several writes.
    let base = future_window(1, 2);
    let pts = points(base, &["a", "b", "c"], 30, S / 10);
    let mut shuffled = pts.clone();
    shuffled.reverse();
    shuffled.rotate_left(17);
    for chunk in shuffled.chunks(13) {
        let body: String = chunk.iter().map(Point::line).collect();
        let (code, text) = agent.write_v2("sensors", body, &Opts::new());
        assert_eq!(code, 204, "{text}");
    }
    let windows = 3 * 3;
    wait_eq(
        Duration::from_secs(60),
        "aggregates delivered",
        windows,
        || field(&agent.replication("ds"), "deliveredLines"),
    );
    wait_eq(
        Duration::from_secs(60),
        "raw lines delivered",
        pts.len() as u64,
        || field(&agent.replication("raw"), "deliveredLines"),
    );

    let want = reference(&pts, S);
    assert_eq!(want.len() as u64, windows);
    let temp = at_remote(&ds_vm, "env_temp");
    let count = at_remote(&ds_vm, "env_count");
    let ok = at_remote(&ds_vm, "env_ok");
    assert_eq!(
        temp.len(),
        want.len(),
        "one aggregate per series and window: {temp:?}"
    );
    for (k, (t, c, o)) in &want {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            temp.get(k).is_some_and(|v| close(*v, *t)),
            "temp {k:?}: want {t}, got {:?}",
            temp.get(k)
        );
        assert!(
            count.get(k).is_some_and(|v| close(*v, *c)),
            "count {k:?}: want {c}, got {:?}",
            count.get(k)
        );
        assert_eq!(ok.get(k), Some(o), "last ok of {k:?}");
    }
    assert_eq!(raw_vm.count("env_temp"), pts.len() as u64);

    let rep = agent.replication("ds");
    assert_eq!(field(&rep, "acceptedLines"), pts.len() as u64);
    assert_eq!(field(&rep, "downsampledLines"), pts.len() as u64);
    assert_eq!(field(&rep, "aggregateLines"), windows);
    assert_eq!(field(&rep, "lateLines"), 0);
    assert_conserved(&rep);
    assert_conserved(&agent.replication("raw"));

    // A point for a window that has closed is late: counted, not sent.
    let late = format!("env,host=a temp=99 {}\n", base);
    assert_eq!(agent.write_v2("sensors", late, &Opts::new()).0, 204);
    let rep = agent.replication("ds");
    assert_eq!(field(&rep, "lateLines"), 1);
    assert_conserved(&rep);
}

#[test]
fn kill_during_open_windows_still_emits_the_right_aggregates() {
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let mut ds = ReplicationConfig::new("ds", "vm", "sensors");
    ds.extra = downsample("2s");
    let config = AgentConfig {
        remotes: vec![RemoteConfig::v2("vm", &vm.url())],
        replications: vec![ds],
        ..AgentConfig::default()
    };
    let mut agent = Agent::start(config);
    let base = future_window(2, 3);
    let pts = points(base, &["a", "b"], 40, S / 10);
    let (first, second) = pts.split_at(pts.len() / 2);
    let body: String = first.iter().map(Point::line).collect();
    assert_eq!(agent.write_v2("sensors", body, &Opts::new()).0, 204);
    // Power cut while both windows are open: their state must survive.
    agent.kill9();
    agent.restart();
    let body: String = second.iter().map(Point::line).collect();
    assert_eq!(agent.write_v2("sensors", body, &Opts::new()).0, 204);
    let want = reference(&pts, 2 * S);
    wait_eq(
        Duration::from_secs(60),
        "aggregates delivered",
        want.len() as u64,
        || field(&agent.replication("ds"), "deliveredLines"),
    );
    let temp = at_remote(&vm, "env_temp");
    assert_eq!(temp.len(), want.len(), "{temp:?}");
    for (k, (t, _, _)) in &want {
        assert!(
            temp.get(k).is_some_and(|v| (v - t).abs() < 1e-9),
            "temp {k:?}: want {t}, got {:?}",
            temp.get(k)
        );
    }
    assert_conserved(&agent.replication("ds"));
}

#[test]
fn filters_and_added_tags() {
    let Some(vm) = VictoriaMetrics::start() else {
        return;
    };
    let mut r = ReplicationConfig::new("r1", "vm", "sensors");
    r.extra = "include_measurements = [\"cpu*\", \"mem\"]\n\
               exclude_measurements = [\"cpu_guest\"]\n\
               add_tags = { _instance_id = \"gw-0042\", site = \"plant 7\" }\n"
        .into();
    let config = AgentConfig {
        remotes: vec![RemoteConfig::v2("vm", &vm.url())],
        replications: vec![r],
        ..AgentConfig::default()
    };
    let agent = Agent::start(config);
    let t = ts_ago(Duration::from_secs(60));
    let mut body = String::new();
    for i in 0..50 {
        let ts = t + i * 1_000_000;
        body += &format!("cpu,host=h{} usage={i} {ts}\n", i % 5);
        body += &format!("cpu_guest,host=h{} usage={i} {ts}\n", i % 5);
        body += &format!("mem,host=h{},site=old used={i}i {ts}\n", i % 5);
        body += &format!("disk,host=h{} free={i} {ts}\n", i % 5);
    }
    assert_eq!(agent.write_v2("sensors", body, &Opts::new()).0, 204);
    wait_eq(Duration::from_secs(60), "kept lines delivered", 100, || {
        field(&agent.replication("r1"), "deliveredLines")
    });
    let rep = agent.replication("r1");
    assert_eq!(
        (field(&rep, "acceptedLines"), field(&rep, "filteredLines")),
        (200, 100)
    );
    assert_conserved(&rep);
    assert_eq!(vm.count("cpu_usage"), 50);
    assert_eq!(vm.count("mem_used"), 50);
    assert_eq!(vm.count("cpu_guest_usage") + vm.count("disk_free"), 0);
    for (labels, _, _) in vm
        .samples("cpu_usage")
        .into_iter()
        .chain(vm.samples("mem_used"))
    {
        assert_eq!(labels["_instance_id"], "gw-0042", "{labels}");
        assert_eq!(
            labels["site"], "plant 7",
            "the configured tag replaces the line's own: {labels}"
        );
    }
}
