//! The fleet's requests per second at the remote through the outage, as a
//! hand-written SVG (as benches/bench/report.rs draws outage.svg).

use std::fmt::Write as _;

/// One second at the proxy, on the writers' clock.
pub struct Point {
    pub t: f64,
    pub requests: f64,
    pub throttled: f64,
    pub connections: f64,
}

/// From the status polls: agents with unsent lines, and probes per second
/// (all agents' `probes` counters).
pub struct Backlog {
    pub t: f64,
    pub agents: f64,
    pub probes: f64,
}

pub struct Marks {
    pub outage: (f64, f64),
    pub steady: f64,
    pub limit: f64,
    pub agents: f64,
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

pub fn svg(points: &[Point], backlog: &[Backlog], m: &Marks, title: &str) -> String {
    let (w, h) = (1000.0, 480.0);
    let (l, r, top, bottom) = (70.0, 80.0, 50.0, 90.0);
    let (pw, ph) = (w - l - r, h - top - bottom);
    let t_max = points.last().map_or(1.0, |p| p.t).max(1.0);
    let y_max = points
        .iter()
        .map(|p| p.requests.max(p.connections))
        .chain(backlog.iter().map(|b| b.probes))
        .fold(m.limit.max(1.0), f64::max)
        * 1.08;
    let (ys, ts) = (nice_step(y_max, 6.0), nice_step(t_max, 10.0));
    let y_top = (y_max / ys).ceil() * ys;
    let a_top = m.agents.max(1.0);
    let a_step = nice_step(a_top, 5.0);
    let x = |t: f64| l + t.clamp(0.0, t_max) / t_max * pw;
    let y = |v: f64| top + ph - v / y_top * ph;
    let ya = |v: f64| top + ph - v / a_top * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{w}" height="{h}" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{ph}" fill="#f8d7d7"/>"##,
        x(m.outage.0),
        x(m.outage.1) - x(m.outage.0)
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#a33">remote down (connection refused)</text>"##,
        (x(m.outage.0) + x(m.outage.1)) / 2.0,
        top + 16.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="24" text-anchor="middle" font-size="15">{title}</text>"##,
        w / 2.0
    );
    let mut v = 0.0;
    while v <= y_top + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" fill="#1f5fa8">{v}</text>"##,
            l + pw,
            l - 6.0,
            y(v) + 4.0,
            yy = y(v),
        );
        v += ys;
    }
    let mut a = 0.0;
    while a <= a_top + 1e-9 {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{:.1}" fill="#777">{a}</text>"##,
            l + pw + 6.0,
            ya(a) + 4.0
        );
        a += a_step;
    }
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{t}</text>"##,
            x(t),
            top + ph + 18.0
        );
        t += ts;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">seconds since writing started</text>"##,
        l + pw / 2.0,
        top + ph + 36.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle" fill="#1f5fa8">per second at the remote</text>"##,
        top + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate({} {}) rotate(90)" text-anchor="middle" fill="#777">agents with unsent lines</text>"##,
        w - 22.0,
        top + ph / 2.0
    );
    // Reference levels: the rate limit and three times the steady rate.
    // Labels at opposite ends: the default limit is 3 × steady.
    for (level, color, label, lx, anchor) in [
        (m.limit, "#a33", "rate limit", l + pw - 6.0, "end"),
        (3.0 * m.steady, "#2a8a2a", "3 × steady", l + 6.0, "start"),
    ] {
        if level <= y_top {
            let _ = writeln!(
                s,
                r##"<line x1="{l}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="{color}" stroke-dasharray="6 4"/><text x="{lx}" y="{:.1}" text-anchor="{anchor}" fill="{color}">{label}</text>"##,
                l + pw,
                y(level) - 4.0,
                yy = y(level),
            );
        }
    }
    let path = |pts: &mut dyn Iterator<Item = (f64, f64)>| -> String {
        let mut d = String::new();
        for (i, (px, py)) in pts.enumerate() {
            let _ = write!(d, "{}{px:.1},{py:.1}", if i == 0 { "M" } else { " L" });
        }
        d
    };
    let series: [(&str, &str, &str, String); 5] = [
        (
            "#999",
            "3 3",
            "agents backlogged (right)",
            path(&mut backlog.iter().map(|b| (x(b.t), ya(b.agents)))),
        ),
        (
            "#9b59b6",
            "",
            "connections/s",
            path(&mut points.iter().map(|p| (x(p.t), y(p.connections)))),
        ),
        (
            "#2a8a2a",
            "1 2",
            "probes/s",
            path(&mut backlog.iter().map(|b| (x(b.t), y(b.probes)))),
        ),
        (
            "#1f5fa8",
            "",
            "requests/s",
            path(&mut points.iter().map(|p| (x(p.t), y(p.requests)))),
        ),
        (
            "#d62728",
            "",
            "429s/s",
            path(&mut points.iter().map(|p| (x(p.t), y(p.throttled)))),
        ),
    ];
    for (color, dash, _, d) in &series {
        let _ = writeln!(
            s,
            r##"<path d="{d}" fill="none" stroke="{color}" stroke-dasharray="{dash}" stroke-width="1.8"/>"##
        );
    }
    let ly = top + ph + 62.0;
    for (i, (color, dash, label, _)) in series.iter().enumerate() {
        let lx = l + i as f64 * 175.0;
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
