//! Results: medians and spreads, the markdown table, the JSON, and the SVG
//! plot of an outage.

use std::fmt::Write as _;

use serde_json::{json, Value};

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The q-quantile (0..=1) by nearest rank.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .filter(|x| x.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Three significant digits, with k/M for large numbers.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let (v, suffix) = if x.abs() >= 1e6 {
        (x / 1e6, " M")
    } else if x.abs() >= 1e4 {
        (x / 1e3, " k")
    } else {
        (x, "")
    };
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else if v.abs() >= 1.0 {
        2
    } else {
        3
    };
    format!("{v:.digits$}{suffix}")
}

/// Whether the ratio should be above or below the target.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    None,
    AtLeast(f64),
    AtMost(f64),
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    pub ours: Vec<f64>,
    pub theirs: Vec<f64>,
    /// Ratio samples (ours/theirs per run, or ours against another limit).
    pub ratio: Vec<f64>,
    pub ratio_label: &'static str,
    pub target: Target,
}

impl Row {
    /// ours vs vmagent; the ratio is taken run by run (same run, same noise).
    pub fn versus(what: &str, ours: Vec<f64>, theirs: Vec<f64>, target: Target) -> Row {
        let ratio = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| a / b)
            .filter(|r| r.is_finite())
            .collect();
        Row {
            what: what.into(),
            ours,
            theirs,
            ratio,
            ratio_label: "× vmagent",
            target,
        }
    }

    pub fn alone(what: &str, ours: Vec<f64>) -> Row {
        Row {
            what: what.into(),
            ours,
            theirs: Vec::new(),
            ratio: Vec::new(),
            ratio_label: "",
            target: Target::None,
        }
    }

    pub fn with_ratio(mut self, ratio: Vec<f64>, label: &'static str, target: Target) -> Row {
        self.ratio = ratio;
        self.ratio_label = label;
        self.target = target;
        self
    }

    fn met(&self) -> Option<bool> {
        let r = median(&self.ratio);
        match self.target {
            Target::None => None,
            _ if !r.is_finite() => None,
            Target::AtLeast(t) => Some(r >= t),
            Target::AtMost(t) => Some(r <= t),
        }
    }
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "".into();
    }
    let m = median(v);
    if v.len() == 1 {
        return num(m);
    }
    let (lo, hi) = min_max(v);
    format!("{} ({}–{})", num(m), num(lo), num(hi))
}

pub fn table(rows: &[Row], other: &str) -> String {
    let mut t = format!(
        "| measure | edge-replicator | {other} | ratio | target |\n| --- | --- | --- | --- | --- |\n"
    );
    for r in rows {
        let ratio = if r.ratio.is_empty() {
            String::new()
        } else {
            let label = r.ratio_label.replace("vmagent", other);
            format!("{} {}", num(median(&r.ratio)), label)
        };
        let target = match (r.target, r.met()) {
            (Target::None, _) => String::new(),
            (Target::AtLeast(t), m) => format!("≥ {t}{}", mark(m)),
            (Target::AtMost(t), m) => format!("≤ {t}{}", mark(m)),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} |",
            r.what,
            cell(&r.ours),
            cell(&r.theirs),
            ratio,
            target
        );
    }
    t
}

fn mark(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => " ✓",
        Some(false) => " ✗",
        None => "",
    }
}

pub fn rows_json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "measure": r.what,
                    "edgeReplicator": {"runs": r.ours, "median": nan_null(median(&r.ours))},
                    "vmagent": {"runs": r.theirs, "median": nan_null(median(&r.theirs))},
                    "ratio": {"runs": r.ratio, "median": nan_null(median(&r.ratio)), "of": r.ratio_label},
                    "target": match r.target {
                        Target::None => Value::Null,
                        Target::AtLeast(t) => json!({"atLeast": t, "met": r.met()}),
                        Target::AtMost(t) => json!({"atMost": t, "met": r.met()}),
                    },
                })
            })
            .collect(),
    )
}

fn nan_null(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// One sample of the outage scenario.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    pub t: f64,
    pub queue_mb: f64,
    pub delivered_klps: f64,
    pub accepted_klps: f64,
}

/// An axis label: as many decimals as the step needs.
fn tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let m = if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Queue depth (left axis) and delivery rate (right axis) through an outage.
pub fn outage_svg(samples: &[Sample], outage: (f64, f64), title: &str) -> String {
    let (w, h) = (960.0, 460.0);
    let (l, r, top, bottom) = (70.0, 80.0, 50.0, 80.0);
    let (pw, ph) = (w - l - r, h - top - bottom);
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let q_max = samples.iter().map(|s| s.queue_mb).fold(1.0, f64::max) * 1.1;
    let r_max = samples
        .iter()
        .map(|s| s.delivered_klps.max(s.accepted_klps))
        .fold(1.0, f64::max)
        * 1.1;
    let (qs, rs, ts) = (
        nice_step(q_max, 5.0),
        nice_step(r_max, 5.0),
        nice_step(t_max, 10.0),
    );
    let (q_top, r_top) = ((q_max / qs).ceil() * qs, (r_max / rs).ceil() * rs);
    let x = |t: f64| l + t / t_max * pw;
    let yq = |q: f64| top + ph - q / q_top * ph;
    let yr = |v: f64| top + ph - v / r_top * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{w}" height="{h}" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{ph}" fill="#f8d7d7"/>"##,
        x(outage.0),
        x(outage.1) - x(outage.0)
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#a33">remote down (503)</text>"##,
        (x(outage.0) + x(outage.1)) / 2.0,
        top + 16.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="24" text-anchor="middle" font-size="15">{title}</text>"##,
        w / 2.0
    );
    // Grid and axes.
    let mut q = 0.0;
    while q <= q_top + 1e-9 {
        let y = yq(q);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" fill="#1f5fa8">{}</text>"##,
            l + pw,
            l - 6.0,
            y + 4.0,
            tick(q, qs)
        );
        q += qs;
    }
    let mut v = 0.0;
    while v <= r_top + 1e-9 {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{:.1}" fill="#c25b00">{}</text>"##,
            l + pw + 6.0,
            yr(v) + 4.0,
            tick(v, rs)
        );
        v += rs;
    }
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
            x(t),
            top + ph + 18.0,
            tick(t, ts)
        );
        t += ts;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">seconds</text>"##,
        l + pw / 2.0,
        top + ph + 36.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle" fill="#1f5fa8">queue depth (MB unsent)</text>"##,
        top + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate({} {}) rotate(90)" text-anchor="middle" fill="#c25b00">k lines/s</text>"##,
        w - 22.0,
        top + ph / 2.0
    );
    let path = |f: &dyn Fn(&Sample) -> (f64, f64)| -> String {
        samples
            .iter()
            .enumerate()
            .map(|(i, smp)| {
                let (px, py) = f(smp);
                format!("{}{px:.1},{py:.1}", if i == 0 { "M" } else { " L" })
            })
            .collect()
    };
    let _ = writeln!(
        s,
        r##"<path d="{}" fill="none" stroke="#999" stroke-dasharray="4 3" stroke-width="1.5"/>"##,
        path(&|p| (x(p.t), yr(p.accepted_klps)))
    );
    let _ = writeln!(
        s,
        r##"<path d="{}" fill="none" stroke="#c25b00" stroke-width="2"/>"##,
        path(&|p| (x(p.t), yr(p.delivered_klps)))
    );
    let _ = writeln!(
        s,
        r##"<path d="{}" fill="none" stroke="#1f5fa8" stroke-width="2.5"/>"##,
        path(&|p| (x(p.t), yq(p.queue_mb)))
    );
    // Legend.
    let ly = top + ph + 62.0;
    for (i, (color, dash, label)) in [
        ("#1f5fa8", "", "queue depth (left)"),
        ("#c25b00", "", "delivered lines/s (right)"),
        ("#999", "4 3", "accepted lines/s (right)"),
    ]
    .iter()
    .enumerate()
    {
        let lx = l + i as f64 * 260.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{}">{label}</text>"##,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}
