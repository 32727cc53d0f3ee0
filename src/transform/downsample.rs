//! Downsampling: per series (measurement and tag set) and epoch-aligned
//! window of `every`, numeric fields become their mean (as a float) and
//! string and boolean fields their last value by time, stamped with the
//! window's stop, as Flux's `aggregateWindow` does. `fields` overrides the
//! aggregate per field (`mean`, `last`, `max`, `min`, `sum`, `count`).
//!
//! The state of a series in a window is a [`Window`]: running sums, counts,
//! extremes and the last value, which merge associatively, so a write's
//! points are folded into small deltas first and the queue writer merges
//! each delta into the state it keeps in LMDB. A window closes when the
//! agent's clock passes its stop plus `allowed_lateness`; a point arriving
//! for a closed window is late: it is counted and dropped (the closed
//! window's aggregate has been queued and its state deleted, so folding the
//! point into a reopened window would send a wrong aggregate over the right
//! one).

use std::collections::BTreeMap;

use crate::config::{Aggregate, Downsample};
use crate::lineproto::{self, tag_unescaped, FieldValue};

/// The downsampling part of a replication's transform.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub every_ns: i64,
    pub lateness_ns: i64,
    /// Aggregate overrides by unescaped field key.
    fields: BTreeMap<Vec<u8>, Aggregate>,
}

/// Kind of the values a field carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Float = 0,
    Int = 1,
    UInt = 2,
    Str = 3,
    Bool = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0 => Kind::Float,
            1 => Kind::Int,
            2 => Kind::UInt,
            3 => Kind::Str,
            4 => Kind::Bool,
            _ => return None,
        })
    }

    fn numeric(self) -> bool {
        matches!(self, Kind::Float | Kind::Int | Kind::UInt)
    }
}

/// Running aggregate of one field in one series and window.
#[derive(Debug, Clone, PartialEq)]
struct Field {
    kind: Kind,
    count: u64,
    /// Float sum and extremes of every numeric value.
    sum: f64,
    min: f64,
    max: f64,
    /// Exact sum and extremes while every value was an integer.
    isum: i128,
    imin: i128,
    imax: i128,
    last_ts: i64,
    /// The last value as line protocol writes it (`1.5`, `3i`, `"s"`, `true`).
    last: Vec<u8>,
}

/// The state of one series in one window: fields sorted by escaped key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Window {
    fields: Vec<(Vec<u8>, Field)>,
}

/// What folding a payload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Folded {
    /// Lines folded into windows.
    pub folded: u64,
    /// Lines for windows already closed: counted and dropped.
    pub late: u64,
    /// Lines the replication's filters excluded.
    pub filtered: u64,
}

/// Folded state of one write: `(window start, series key)` → window.
pub type Deltas = BTreeMap<(i64, Vec<u8>), Window>;

impl Spec {
    pub fn new(d: &Downsample) -> Spec {
        Spec {
            every_ns: d.every.as_nanos() as i64,
            lateness_ns: d.allowed_lateness.as_nanos().min(i64::MAX as u128) as i64,
            fields: d
                .fields
                .iter()
                .map(|(k, a)| (k.as_bytes().to_vec(), *a))
                .collect(),
        }
    }

    /// Start of the window holding `ts`.
    pub fn window_start(&self, ts: i64) -> i64 {
        ts.div_euclid(self.every_ns) * self.every_ns
    }

    /// Whether the window starting at `start` is closed at `now`.
    pub fn closed(&self, start: i64, now: i64) -> bool {
        start
            .saturating_add(self.every_ns)
            .saturating_add(self.lateness_ns)
            <= now
    }

    /// The latest window start that is closed at `now`.
    pub fn last_closed_start(&self, now: i64) -> i64 {
        self.window_start(now.saturating_sub(self.lateness_ns)) - self.every_ns
    }

    /// Folds normalised lines into `deltas`. `select` gives a line's series
    /// key, or `None` for a line the replication filters out; lines whose
    /// window is closed at `now` are late.
    pub fn fold(
        &self,
        payload: &[u8],
        now: i64,
        select: impl Fn(&lineproto::Line<'_>) -> Option<Vec<u8>>,
        deltas: &mut Deltas,
    ) -> Folded {
        let mut done = Folded::default();
        for line in lineproto::points(payload) {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let Ok(parsed) = lineproto::parse_line(line) else {
                continue;
            };
            // Normalised lines always carry a timestamp.
            let ts = parsed.timestamp.unwrap_or(now);
            let Some(series) = select(&parsed) else {
                done.filtered += 1;
                continue;
            };
            let start = self.window_start(ts);
            if self.closed(start, now) {
                done.late += 1;
                continue;
            }
            let window = deltas.entry((start, series)).or_default();
            for (key, value) in parsed.fields() {
                window.add(key, &value, ts);
            }
            done.folded += 1;
        }
        done
    }

    /// The aggregate line of a closed window (whole, ending in '\n').
    pub fn emit(&self, series_key: &[u8], start: i64, w: &Window, out: &mut Vec<u8>) {
        out.extend_from_slice(series_key);
        let mut sep = b' ';
        for (key, f) in &w.fields {
            let agg = self.fields.get(tag_unescaped(key).as_ref()).copied();
            out.push(sep);
            sep = b',';
            out.extend_from_slice(key);
            out.push(b'=');
            f.write(agg, out);
        }
        out.push(b' ');
        out.extend_from_slice(start.saturating_add(self.every_ns).to_string().as_bytes());
        out.push(b'\n');
    }
}

fn float_text(v: f64) -> String {
    let s = v.to_string();
    // Keep the value a float at the remote even when it is whole.
    if s.contains(['.', 'e', 'E', 'N', 'i']) {
        s
    } else {
        format!("{s}.0")
    }
}

impl Field {
    fn new(kind: Kind) -> Field {
        Field {
            kind,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            isum: 0,
            imin: i128::MAX,
            imax: i128::MIN,
            last_ts: i64::MIN,
            last: Vec::new(),
        }
    }

    fn merge(&mut self, o: &Field) {
        if o.count == 0 {
            return;
        }
        if self.kind != o.kind {
            // Ints and floats of one field mix as floats; other mixes keep
            // the newest kind (the remote would refuse one of them anyway).
            self.kind = if self.kind.numeric() && o.kind.numeric() {
                Kind::Float
            } else if o.last_ts >= self.last_ts {
                o.kind
            } else {
                self.kind
            };
        }
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.isum += o.isum;
        self.imin = self.imin.min(o.imin);
        self.imax = self.imax.max(o.imax);
        if o.last_ts >= self.last_ts {
            self.last_ts = o.last_ts;
            self.last.clone_from(&o.last);
        }
    }

    fn write(&self, agg: Option<Aggregate>, out: &mut Vec<u8>) {
        let numeric = self.kind.numeric();
        let agg = match agg {
            Some(Aggregate::Count) => Aggregate::Count,
            Some(a) if numeric => a,
            None if numeric => Aggregate::Mean,
            _ => Aggregate::Last,
        };
        let int = |v: i128, kind: Kind| match kind {
            Kind::UInt => format!("{v}u"),
            _ => format!("{v}i"),
        };
        let text = match agg {
            Aggregate::Count => format!("{}i", self.count),
            Aggregate::Last => return out.extend_from_slice(&self.last),
            Aggregate::Mean => float_text(if self.kind == Kind::Float {
                self.sum / self.count as f64
            } else {
                self.isum as f64 / self.count as f64
            }),
            Aggregate::Sum if self.kind == Kind::Float => float_text(self.sum),
            Aggregate::Sum => int(self.isum, self.kind),
            Aggregate::Max if self.kind == Kind::Float => float_text(self.max),
            Aggregate::Max => int(self.imax, self.kind),
            Aggregate::Min if self.kind == Kind::Float => float_text(self.min),
            Aggregate::Min => int(self.imin, self.kind),
        };
        out.extend_from_slice(text.as_bytes());
    }
}

impl Window {
    fn field(&mut self, key: &[u8], kind: Kind) -> &mut Field {
        let i = match self.fields.binary_search_by(|(k, _)| k.as_slice().cmp(key)) {
            Ok(i) => i,
            Err(i) => {
                self.fields.insert(i, (key.to_vec(), Field::new(kind)));
                i
            }
        };
        &mut self.fields[i].1
    }

    /// Adds one value at `ts`.
    pub fn add(&mut self, key: &[u8], value: &FieldValue<'_>, ts: i64) {
        let (kind, f, i, last): (Kind, f64, Option<i128>, Vec<u8>) = match *value {
            FieldValue::Float(v) => (Kind::Float, v, None, float_text(v).into_bytes()),
            FieldValue::Int(v) => (
                Kind::Int,
                v as f64,
                Some(v as i128),
                format!("{v}i").into_bytes(),
            ),
            FieldValue::UInt(v) => (
                Kind::UInt,
                v as f64,
                Some(v as i128),
                format!("{v}u").into_bytes(),
            ),
            FieldValue::Str(s) => (Kind::Str, 0.0, None, [b"\"".as_slice(), s, b"\""].concat()),
            FieldValue::Bool(b) => (
                Kind::Bool,
                0.0,
                None,
                if b {
                    b"true".to_vec()
                } else {
                    b"false".to_vec()
                },
            ),
        };
        let mut one = Field::new(kind);
        one.count = 1;
        if kind.numeric() {
            one.sum = f;
            one.min = f;
            one.max = f;
            if let Some(i) = i {
                one.isum = i;
                one.imin = i;
                one.imax = i;
            }
        }
        one.last_ts = ts;
        one.last = last;
        let field = self.field(key, kind);
        if field.count == 0 {
            *field = one;
        } else {
            field.merge(&one);
        }
    }

    /// Merges another state of the same series and window.
    pub fn merge(&mut self, other: &Window) {
        for (key, f) in &other.fields {
            let mine = self.field(key, f.kind);
            if mine.count == 0 {
                *mine = f.clone();
            } else {
                mine.merge(f);
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.fields.len() * 96);
        out.push(1); // format version
        for (key, f) in &self.fields {
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.push(f.kind as u8);
            out.extend_from_slice(&f.count.to_le_bytes());
            for v in [f.sum, f.min, f.max] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            for v in [f.isum, f.imin, f.imax] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&f.last_ts.to_le_bytes());
            out.extend_from_slice(&(f.last.len() as u32).to_le_bytes());
            out.extend_from_slice(&f.last);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Window> {
        let (&version, mut rest) = bytes.split_first()?;
        if version != 1 {
            return None;
        }
        let mut take = |n: usize| -> Option<&[u8]> {
            if rest.len() < n {
                return None;
            }
            let (a, b) = rest.split_at(n);
            rest = b;
            Some(a)
        };
        let mut fields = Vec::new();
        while let Some(len) = take(4) {
            let key = take(u32::from_le_bytes(len.try_into().ok()?) as usize)?.to_vec();
            let kind = Kind::from_u8(take(1)?[0])?;
            let count = u64::from_le_bytes(take(8)?.try_into().ok()?);
            let mut f = || -> Option<f64> { Some(f64::from_le_bytes(take(8)?.try_into().ok()?)) };
            let (sum, min, max) = (f()?, f()?, f()?);
            let mut i =
                || -> Option<i128> { Some(i128::from_le_bytes(take(16)?.try_into().ok()?)) };
            let (isum, imin, imax) = (i()?, i()?, i()?);
            let last_ts = i64::from_le_bytes(take(8)?.try_into().ok()?);
            let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            let last = take(n)?.to_vec();
            fields.push((
                key,
                Field {
                    kind,
                    count,
                    sum,
                    min,
                    max,
                    isum,
                    imin,
                    imax,
                    last_ts,
                    last,
                },
            ));
        }
        Some(Window { fields })
    }
}

#[cfg(test)]
mod tests;
