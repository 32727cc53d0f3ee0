//! What a replication does to lines on their way in: measurement filters,
//! added tags, and downsampling ([`downsample`]). Pure functions over
//! normalised line protocol; the queue writer applies them per replication,
//! so every source (HTTP, tailed files, WAL) gets the same treatment and the
//! result commits in the same transaction as the write.

pub mod downsample;

use std::borrow::Cow;

use crate::config::Replication;
use crate::lineproto::{self, measurement_unescaped, tag_unescaped};

/// A replication's line transformation; `None` from [`Transform::new`]
/// when the replication sends lines unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    include: Vec<String>,
    exclude: Vec<String>,
    /// Escaped `(key, value)` pairs, sorted by unescaped key.
    add_tags: Vec<(Vec<u8>, Vec<u8>)>,
    pub downsample: Option<downsample::Spec>,
}

/// What [`Transform::apply`] did to a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub lines: u64,
    pub filtered: u64,
}

/// Escapes a tag key or value for line protocol.
pub fn escape_tag(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        if matches!(b, b',' | b'=' | b' ') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// Glob match with `*` (any run) and `?` (one byte).
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl Transform {
    pub fn new(r: &Replication) -> Option<Transform> {
        if !r.transforms() {
            return None;
        }
        let mut add_tags: Vec<(Vec<u8>, Vec<u8>)> = r
            .add_tags
            .iter()
            .map(|(k, v)| (escape_tag(k), escape_tag(v)))
            .collect();
        add_tags.sort_by(|a, b| tag_unescaped(&a.0).cmp(&tag_unescaped(&b.0)));
        Some(Transform {
            include: r.include_measurements.clone(),
            exclude: r.exclude_measurements.clone(),
            add_tags,
            downsample: r.downsample.as_ref().map(downsample::Spec::new),
        })
    }

    fn keeps(&self, measurement: &[u8]) -> bool {
        let m = measurement_unescaped(measurement);
        (self.include.is_empty() || self.include.iter().any(|g| glob(g.as_bytes(), &m)))
            && !self.exclude.iter().any(|g| glob(g.as_bytes(), &m))
    }

    /// Filters and tags normalised lines into `out` (whole points, each
    /// ending in '\n', cut where a string value's newlines do not end them).
    /// Lines that do not parse (none should: they were validated at ingest)
    /// are passed through untouched.
    pub fn apply(&self, payload: &[u8], out: &mut Vec<u8>) -> Applied {
        let mut done = Applied::default();
        for raw in lineproto::points(payload) {
            let line = raw.strip_suffix(b"\n").unwrap_or(raw);
            if line.is_empty() {
                continue;
            }
            let Ok(parsed) = lineproto::parse_line(line) else {
                out.extend_from_slice(line);
                out.push(b'\n');
                done.lines += 1;
                continue;
            };
            if !self.keeps(parsed.measurement) {
                done.filtered += 1;
                continue;
            }
            if self.add_tags.is_empty() {
                out.extend_from_slice(line);
            } else {
                out.extend_from_slice(&self.series_key(&parsed));
                out.push(b' ');
                out.extend_from_slice(parsed.fields);
                if let Some(ts) = parsed.timestamp {
                    out.push(b' ');
                    out.extend_from_slice(ts.to_string().as_bytes());
                }
            }
            out.push(b'\n');
            done.lines += 1;
        }
        done
    }

    /// The series key of a line this replication keeps (for downsampling),
    /// or `None` when its filters exclude the line.
    pub fn select(&self, line: &lineproto::Line<'_>) -> Option<Vec<u8>> {
        self.keeps(line.measurement).then(|| self.series_key(line))
    }

    /// Measurement and tags with the added tags merged in, sorted by key;
    /// an added tag replaces the line's own tag of the same key.
    pub fn series_key(&self, line: &lineproto::Line<'_>) -> Vec<u8> {
        // (unescaped key for sorting, escaped key, escaped value)
        type Tag<'a> = (Cow<'a, [u8]>, &'a [u8], &'a [u8]);
        let mut tags: Vec<Tag> = line
            .tags()
            .filter(|(k, _)| {
                !self
                    .add_tags
                    .iter()
                    .any(|(a, _)| tag_unescaped(a) == tag_unescaped(k))
            })
            .map(|(k, v)| (tag_unescaped(k), k, v))
            .collect();
        for (k, v) in &self.add_tags {
            tags.push((tag_unescaped(k), k, v));
        }
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        let mut key = line.measurement.to_vec();
        for (_, k, v) in tags {
            key.push(b',');
            key.extend_from_slice(k);
            key.push(b'=');
            key.extend_from_slice(v);
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn replication(include: &[&str], exclude: &[&str], tags: &[(&str, &str)]) -> Replication {
        Replication {
            name: "r".into(),
            remote: "x".into(),
            local_bucket: "b".into(),
            remote_bucket: None,
            max_queue_size: 1 << 20,
            max_age: None,
            when_full: crate::config::WhenFull::DropOldest,
            drop_non_retryable_data: false,
            batch_size: 1000,
            gzip_level: 6,
            priority: 5,
            live_window: None,
            batch_wait: None,
            include_measurements: include.iter().map(|s| s.to_string()).collect(),
            exclude_measurements: exclude.iter().map(|s| s.to_string()).collect(),
            add_tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            downsample: None,
        }
    }

    fn run(t: &Transform, input: &str) -> (String, Applied) {
        let mut out = Vec::new();
        let a = t.apply(input.as_bytes(), &mut out);
        (String::from_utf8(out).unwrap(), a)
    }

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("cpu", "cpu", true),
            ("cpu", "cpu2", false),
            ("cpu*", "cpu_total", true),
            ("*_total", "cpu_total", true),
            ("c?u", "cpu", true),
            ("c?u", "cu", false),
            ("*", "", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
        ] {
            assert_eq!(glob(p.as_bytes(), t.as_bytes()), want, "{p} vs {t}");
        }
    }

    #[test]
    fn points_with_newlines_in_strings_are_filtered_and_tagged_whole() {
        let t = Transform::new(&replication(&["app*"], &[], &[("site", "s1")])).unwrap();
        let (out, a) = run(
            &t,
            "applog msg=\"failed:\ncpu f=1 1\nend\" 1\ncpu f=\"a\napplog x=1 2\" 2\n",
        );
        assert_eq!(out, "applog,site=s1 msg=\"failed:\ncpu f=1 1\nend\" 1\n");
        assert_eq!(
            a,
            Applied {
                lines: 1,
                filtered: 1
            }
        );
    }

    #[test]
    fn no_transform_when_nothing_is_configured() {
        assert!(Transform::new(&replication(&[], &[], &[])).is_none());
    }

    #[test]
    fn include_and_exclude_filter_and_count() {
        let t = Transform::new(&replication(&["cpu*", "mem"], &["cpu_guest"], &[])).unwrap();
        let (out, a) = run(
            &t,
            "cpu f=1 1\ncpu_guest f=1 1\nmem f=1 1\ndisk f=1 1\nmy\\ cpu f=1 1\n",
        );
        assert_eq!(out, "cpu f=1 1\nmem f=1 1\n");
        assert_eq!(
            a,
            Applied {
                lines: 2,
                filtered: 3
            }
        );
        // Globs match the unescaped measurement.
        let t = Transform::new(&replication(&["my cpu"], &[], &[])).unwrap();
        assert_eq!(run(&t, "my\\ cpu f=1 1\n").0, "my\\ cpu f=1 1\n");
    }

    #[test]
    fn added_tags_are_merged_sorted_escaped_and_override() {
        let t = Transform::new(&replication(
            &[],
            &[],
            &[("_instance_id", "gw 1"), ("site", "a,b")],
        ))
        .unwrap();
        let (out, _) = run(
            &t,
            "cpu,zone=z,host=h usage=1 5\ncpu,site=old v=1i 6\nm f=\"x y\" 7\n",
        );
        assert_eq!(
            out,
            "cpu,_instance_id=gw\\ 1,host=h,site=a\\,b,zone=z usage=1 5\n\
             cpu,_instance_id=gw\\ 1,site=a\\,b v=1i 6\n\
             m,_instance_id=gw\\ 1,site=a\\,b f=\"x y\" 7\n"
        );
        // Every output line is valid line protocol.
        for l in out.lines() {
            lineproto::parse_line(l.as_bytes()).unwrap();
        }
    }
}
