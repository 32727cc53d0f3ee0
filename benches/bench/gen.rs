//! Realistic line protocol for the benchmarks, generated deterministically so
//! that every run, and both agents, see the same bytes.
//!
//! - The metrics mix is shaped like what Telegraf collects on a gateway every
//!   10 s: system inputs (cpu per core, mem, disk, diskio, net, system) with
//!   many fields per line and full float precision, plus many short sensor
//!   lines (Modbus devices on a plant floor, room sensors over MQTT).
//! - The log-like mix is shaped like Telegraf's syslog input: tags for the
//!   app, facility and severity, and a free-text `message` string field.

use std::fmt::Write as _;

/// Which kind of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    Metrics,
    Logs,
    /// Two-field sensor lines of about 58 bytes
    /// (`cpu,host=gw3,site=s1 v=12i,f=12.25 <ns>`), the commonest thing a
    /// sensor gateway writes.
    Small,
    /// 200 field devices with 4 readings each, one point a second per
    /// device, stamped by the device's own clock; the devices report in no
    /// particular order within a second.
    Sensors,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Mix::Metrics => "metrics",
            Mix::Logs => "logs",
            Mix::Small => "small",
            Mix::Sensors => "sensors",
        }
    }
}

/// xorshift64*: small, fast and reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const HOST: &str = "gw-0042";
const START_NS: i64 = 1_760_000_000_000_000_000;
const INTERVAL_NS: i64 = 10_000_000_000;

/// A stream of lines; `body` cuts the next `n` lines from it.
pub struct Generator {
    mix: Mix,
    rng: Rng,
    /// Index of the next line in the current interval (metrics) and the
    /// interval's timestamp.
    slot: usize,
    ts: i64,
    jitter: i64,
    /// Monotonic counters of the metrics mix, one per series and field.
    counters: Vec<u64>,
    /// Random walks of gauge values.
    gauges: Vec<f64>,
    /// The sensors mix: the devices' reporting order in this second.
    order: Vec<usize>,
}

impl Generator {
    pub fn new(mix: Mix, seed: u64) -> Generator {
        Generator {
            mix,
            rng: Rng::new(seed),
            slot: 0,
            ts: START_NS,
            jitter: 0,
            counters: vec![1_000_000; 64],
            gauges: vec![50.0; 1024],
            order: Vec::new(),
        }
    }

    /// The next `n` lines, each ending in '\n'.
    pub fn body(&mut self, n: usize) -> Vec<u8> {
        let mut s = String::with_capacity(n * 160);
        for _ in 0..n {
            match self.mix {
                Mix::Metrics => self.metrics_line(&mut s),
                Mix::Logs => self.log_line(&mut s),
                Mix::Small => self.small_line(&mut s),
                Mix::Sensors => self.sensors_line(&mut s),
            }
        }
        s.into_bytes()
    }

    fn walk(&mut self, i: usize, lo: f64, hi: f64, step: f64) -> f64 {
        let g = &mut self.gauges[i % 1024];
        *g += (self.rng.unit() - 0.5) * step;
        *g = g.clamp(lo, hi);
        *g
    }

    fn count(&mut self, i: usize, max_step: u64) -> u64 {
        let step = self.rng.below(max_step + 1);
        let c = &mut self.counters[i % 64];
        *c += step;
        *c
    }

    /// One interval: 4 cpu lines + cpu-total, mem, 2 disk, diskio, 3 net,
    /// system, 160 Modbus sensor lines, 24 room sensors: 198 lines.
    fn metrics_line(&mut self, s: &mut String) {
        const PER_INTERVAL: usize = 198;
        let slot = self.slot;
        // Each input stamps its lines with its own collection time: the
        // interval plus a few milliseconds of jitter.
        if matches!(slot, 0 | 5 | 6 | 8 | 9 | 12 | 13 | 173) {
            self.jitter = self.rng.below(40_000_000) as i64;
        }
        let ts = self.ts + self.jitter;
        match slot {
            0..=4 => {
                let cpu = if slot == 4 {
                    "cpu-total".to_string()
                } else {
                    format!("cpu{slot}")
                };
                let user = self.walk(slot, 0.0, 100.0, 8.0) / 3.0;
                let system = self.walk(slot + 8, 0.0, 40.0, 3.0) / 7.0;
                let iowait = self.rng.unit() * 2.5;
                let idle = (100.0 - user - system - iowait).max(0.0);
                let _ = writeln!(
                    s,
                    "cpu,cpu={cpu},host={HOST} usage_guest=0,usage_idle={idle},usage_iowait={iowait},usage_irq=0,usage_nice=0,usage_softirq={},usage_steal=0,usage_system={system},usage_user={user} {ts}",
                    self.rng.unit() * 0.3
                );
            }
            5 => {
                let total: u64 = 3_978_678_272;
                let used = (self.walk(20, 0.1, 0.9, 0.02) * total as f64) as u64;
                let _ = writeln!(
                    s,
                    "mem,host={HOST} active={}i,available={}i,available_percent={},buffered={}i,cached={}i,free={}i,total={total}i,used={used}i,used_percent={} {ts}",
                    used / 2,
                    total - used,
                    (total - used) as f64 * 100.0 / total as f64,
                    self.count(1, 4096) % 100_000_000,
                    self.count(2, 65_536) % 1_500_000_000,
                    (total - used) / 3,
                    used as f64 * 100.0 / total as f64
                );
            }
            6 | 7 => {
                let (device, path) = if slot == 6 {
                    ("mmcblk0p2", "/")
                } else {
                    ("sda1", "/var/lib/edge")
                };
                let total: u64 = 62_277_025_792;
                let used = 21_000_000_000 + self.count(slot, 8192);
                let _ = writeln!(
                    s,
                    "disk,device={device},fstype=ext4,host={HOST},mode=rw,path={path} free={}i,inodes_free={}i,inodes_total=3883008i,inodes_used={}i,total={total}i,used={used}i,used_percent={} {ts}",
                    total - used,
                    3_883_008 - 212_000 - (used % 1000),
                    212_000 + (used % 1000),
                    used as f64 * 100.0 / total as f64
                );
            }
            8 => {
                let _ = writeln!(
                    s,
                    "diskio,host={HOST},name=mmcblk0 io_time={}i,iops_in_progress=0i,read_bytes={}i,read_time={}i,reads={}i,weighted_io_time={}i,write_bytes={}i,write_time={}i,writes={}i {ts}",
                    self.count(10, 40),
                    self.count(11, 1 << 20),
                    self.count(12, 30),
                    self.count(13, 60),
                    self.count(14, 90),
                    self.count(15, 4 << 20),
                    self.count(16, 200),
                    self.count(17, 700)
                );
            }
            9..=11 => {
                let iface = ["eth0", "wlan0", "wwan0"][slot - 9];
                let k = 20 + (slot - 9) * 8;
                let _ = writeln!(
                    s,
                    "net,host={HOST},interface={iface} bytes_recv={}i,bytes_sent={}i,drop_in={}i,drop_out=0i,err_in=0i,err_out=0i,packets_recv={}i,packets_sent={}i {ts}",
                    self.count(k, 300_000),
                    self.count(k + 1, 900_000),
                    self.count(k + 2, 1),
                    self.count(k + 3, 400),
                    self.count(k + 4, 900)
                );
            }
            12 => {
                let load1 = self.walk(40, 0.0, 4.0, 0.3);
                let _ = writeln!(
                    s,
                    "system,host={HOST} load1={load1:.2},load15={:.2},load5={:.2},n_cpus=4i,n_unique_users=1i,n_users=1i {ts}",
                    load1 * 0.8,
                    load1 * 0.9
                );
            }
            13..=172 => {
                let i = slot - 13;
                let kind = ["temperature", "pressure", "vibration", "flow"][i % 4];
                let device = i / 4;
                let line = device % 4 + 1;
                let (lo, hi, step) = match i % 4 {
                    0 => (20.0, 95.0, 0.4),
                    1 => (0.8, 6.5, 0.05),
                    2 => (0.0, 12.0, 0.6),
                    _ => (0.0, 340.0, 4.0),
                };
                // Scaled register values, printed at full precision.
                let v = self.walk(50 + i, lo, hi, step);
                let _ = writeln!(
                    s,
                    "modbus,device=pump-{device:02},host={HOST},line=L{line},site=plant-7,type={kind} value={v},quality=192i {ts}"
                );
            }
            _ => {
                let i = slot - 173;
                let t = self.walk(220 + i % 24, 15.0, 30.0, 0.1);
                let h = self.walk(200 + i % 16, 20.0, 80.0, 0.5);
                let _ = writeln!(
                    s,
                    "environment,host={HOST},room=r{:02},sensor=bme280,topic=site/plant-7/env/r{:02} humidity={h:.1},pressure={:.2},temperature={t:.2} {ts}",
                    i,
                    i,
                    1013.25 + (t - 22.0)
                );
            }
        }
        self.slot += 1;
        if self.slot == PER_INTERVAL {
            self.slot = 0;
            self.ts += INTERVAL_NS;
        }
    }

    fn log_line(&mut self, s: &mut String) {
        self.ts += 1_000_000 + self.rng.below(400_000_000) as i64;
        let ts = self.ts;
        let r = self.rng.below(100);
        let ip = format!("10.1.{}.{}", self.rng.below(8), 2 + self.rng.below(250));
        let (app, facility, fcode, severity, scode, message) = match r {
            0..=29 => {
                let n = self.rng.below(4000);
                let ms = 5 + self.rng.below(300);
                let samples = 12 + self.rng.below(60);
                (
                    "collector",
                    "daemon",
                    3,
                    "info",
                    6,
                    format!(
                        "level=info ts={}.{:03} caller=scrape.go:{} msg=\\\"scrape finished\\\" target=modbus://{ip}:502 duration_ms={ms} samples={samples}",
                        ts / 1_000_000_000,
                        (ts / 1_000_000) % 1000,
                        100 + n % 900
                    ),
                )
            }
            30..=44 => {
                let port = 30_000 + self.rng.below(30_000);
                let fp: String = (0..43)
                    .map(|_| {
                        let c = self.rng.below(64) as u8;
                        (match c {
                            0..=25 => b'A' + c,
                            26..=51 => b'a' + c - 26,
                            52..=61 => b'0' + c - 52,
                            62 => b'+',
                            _ => b'/',
                        }) as char
                    })
                    .collect();
                (
                    "sshd",
                    "auth",
                    4,
                    "info",
                    6,
                    format!(
                        "Accepted publickey for pi from {ip} port {port} ssh2: ED25519 SHA256:{fp}"
                    ),
                )
            }
            45..=64 => {
                let sess = 1000 + self.rng.below(9000);
                (
                    "systemd",
                    "daemon",
                    3,
                    "info",
                    6,
                    format!("Started Session {sess} of User pi."),
                )
            }
            65..=79 => {
                let up = (ts - START_NS) as f64 / 1e9 + 1234.5;
                let n = self.rng.below(120);
                (
                    "kernel",
                    "kern",
                    0,
                    "notice",
                    5,
                    format!(
                        "[{up:.6}] usb 1-1.3: new high-speed USB device number {n} using dwc_otg"
                    ),
                )
            }
            80..=94 => {
                let states = [
                    ("activated", "disconnected", "none"),
                    ("disconnected", "prepare", "none"),
                    ("prepare", "config", "none"),
                    ("config", "ip-config", "none"),
                    ("ip-config", "activated", "none"),
                    ("activated", "failed", "carrier-changed"),
                ];
                let (a, b, why) = states[self.rng.below(states.len() as u64) as usize];
                (
                    "NetworkManager",
                    "daemon",
                    3,
                    "info",
                    6,
                    format!(
                        "<info>  [{}.{:04}] device (wlan0): state change: {a} -> {b} (reason '{why}', sys-iface-state: 'managed')",
                        ts / 1_000_000_000,
                        (ts / 100_000) % 10_000
                    ),
                )
            }
            _ => {
                let code = [500, 502, 503, 504][self.rng.below(4) as usize];
                (
                    "edge-uploader",
                    "local0",
                    16,
                    "err",
                    3,
                    format!(
                        "upload of batch {} to https://ingest.example.com/api/v2/write failed: HTTP {code}; retrying in {}s",
                        self.rng.below(1 << 30),
                        1 + self.rng.below(60)
                    ),
                )
            }
        };
        let _ = writeln!(
            s,
            "syslog,appname={app},facility={facility},host={HOST},hostname={HOST},severity={severity} facility_code={fcode}i,message=\"{message}\",procid=\"{}\",severity_code={scode}i,timestamp={ts}i,version=1i {ts}",
            300 + self.rng.below(30_000)
        );
    }
}

impl Generator {
    /// One small line: 200 series (hosts gw0–gw7 × sites s0–s24), one
    /// point a second each, an integer and a float field.
    fn small_line(&mut self, s: &mut String) {
        const SERIES: usize = 200;
        let i = self.slot;
        let v = self.rng.below(100);
        let f = self.walk(i, 0.0, 100.0, 0.5);
        let _ = writeln!(
            s,
            "cpu,host=gw{},site=s{} v={v}i,f={f:.2} {}",
            i % 8,
            i / 8,
            self.ts + i as i64 * 1_000
        );
        self.slot += 1;
        if self.slot == SERIES {
            self.slot = 0;
            self.ts += 1_000_000_000;
        }
    }
}

impl Generator {
    fn sensors_line(&mut self, s: &mut String) {
        const DEVICES: usize = 200;
        if self.slot == 0 {
            // This second's reporting order: a shuffle of the devices.
            self.order = (0..DEVICES).collect();
            for k in (1..DEVICES).rev() {
                let j = self.rng.below(k as u64 + 1) as usize;
                self.order.swap(k, j);
            }
        }
        let d = self.order[self.slot];
        let t = self.walk(d, -10.0, 45.0, 0.2);
        let h = self.walk(d + 200, 5.0, 95.0, 0.5);
        let p = 1013.25 + self.walk(d + 400, -30.0, 30.0, 0.3);
        let b = 3.0 + self.walk(d + 600, 0.0, 1.2, 0.002);
        let _ = writeln!(
            s,
            "sensor,device=dev-{d:03},site=plant-{} temperature={t:.2},humidity={h:.1},pressure={p:.2},battery={b:.3} {}",
            d % 7,
            self.ts + (d as i64 * 4_999 % 1_000) * 1_000_000
        );
        self.slot += 1;
        if self.slot == DEVICES {
            self.slot = 0;
            self.ts += 1_000_000_000;
        }
    }
}

/// Checks that every mix is valid, already normalised line protocol (run
/// by `cargo test`, which starts bench binaries without `--bench`).
pub fn self_check() {
    for mix in [Mix::Metrics, Mix::Logs, Mix::Small, Mix::Sensors] {
        let body = Generator::new(mix, 7).body(2000);
        let mut out = Vec::new();
        let s = edge_replicator::lineproto::normalize(
            &body,
            edge_replicator::lineproto::Precision::Nanoseconds,
            0,
            &mut out,
        );
        assert_eq!(
            s.error_count,
            0,
            "{mix:?}: {}",
            edge_replicator::lineproto::describe_errors(&s, 2000)
        );
        assert_eq!(s.lines, 2000);
        assert!(out == body, "{mix:?} lines are already normalised");
        let gz = edge_replicator::ship::gzip(&body, 6);
        println!(
            "bench: {} mix: {:.0} bytes a line, gzip level 6 ratio {:.1}",
            mix.name(),
            body.len() as f64 / 2000.0,
            body.len() as f64 / gz.len() as f64
        );
    }
}
