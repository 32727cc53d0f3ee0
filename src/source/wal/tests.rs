use std::fs::OpenOptions;
use std::io::Write as _;
use std::time::Duration;

use tempfile::TempDir;

use super::*;
use crate::source::testing::{status, MemorySink};
use crate::sync::Locked;

/// A value of the WAL's write payload.
enum V<'a> {
    F(f64),
    I(i64),
    B(bool),
    S(&'a str),
    U(u64),
}

/// A write entry: `(series#!~#field key, [(time, value)])` per key; all
/// values of a key have its first value's type.
fn write_entry(keys: &[(&str, Vec<(i64, V<'_>)>)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, values) in keys {
        data.push(match values[0].1 {
            V::F(_) => 1,
            V::I(_) => 2,
            V::B(_) => 3,
            V::S(_) => 4,
            V::U(_) => 5,
        });
        data.extend_from_slice(&(key.len() as u16).to_be_bytes());
        data.extend_from_slice(key.as_bytes());
        data.extend_from_slice(&(values.len() as u32).to_be_bytes());
        for (t, v) in values {
            data.extend_from_slice(&t.to_be_bytes());
            match v {
                V::F(f) => data.extend_from_slice(&f.to_bits().to_be_bytes()),
                V::I(i) => data.extend_from_slice(&i.to_be_bytes()),
                V::B(b) => data.push(*b as u8),
                V::S(s) => {
                    data.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    data.extend_from_slice(s.as_bytes());
                }
                V::U(u) => data.extend_from_slice(&u.to_be_bytes()),
            }
        }
    }
    framed(1, &data)
}

fn framed(kind: u8, data: &[u8]) -> Vec<u8> {
    let block = snap::raw::Encoder::new().compress_vec(data).unwrap();
    let mut out = vec![kind];
    out.extend_from_slice(&(block.len() as u32).to_be_bytes());
    out.extend_from_slice(&block);
    out
}

/// An entry of one float point `m,n=<n> v=<n>` at time `n`.
fn point(n: i64) -> Vec<u8> {
    write_entry(&[(&format!("m,n={n}#!~#v"), vec![(n, V::F(n as f64))])])
}

fn line(n: i64) -> String {
    format!("m,n={n} v={n} {n}")
}

struct World {
    dir: TempDir,
    sink: MemorySink,
    wal: WalFollower,
    status: Arc<SourceStatus>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let status = status();
        let wal = WalFollower::new(cfg(dir.path()), status.clone(), None);
        World {
            dir,
            sink: MemorySink::default(),
            wal,
            status,
        }
    }

    fn seg(&self, shard: &str, id: u64) -> PathBuf {
        let dir = self.dir.path().join("db").join(shard);
        fs::create_dir_all(&dir).unwrap();
        segment_path(&dir, id)
    }

    fn append(&self, shard: &str, id: u64, bytes: &[u8]) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.seg(shard, id))
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    fn poll(&mut self) {
        self.wal.poll(&mut self.sink).unwrap();
    }

    fn restart(&mut self) {
        self.status = status();
        self.wal = WalFollower::new(
            cfg(self.dir.path()),
            self.status.clone(),
            self.sink.checkpoint.clone(),
        );
    }

    fn sorted(&self) -> Vec<String> {
        let mut v = self.sink.lines.clone();
        v.sort();
        v
    }

    fn missed(&self) -> u64 {
        self.status.segments_missed.load(Ordering::Relaxed)
    }
}

fn cfg(wal_dir: &Path) -> InfluxdbWal {
    InfluxdbWal {
        wal_dir: wal_dir.to_path_buf(),
        database: "db".into(),
        bucket: "b".into(),
        poll_interval: Duration::from_millis(10),
    }
}

fn lines(ns: impl IntoIterator<Item = i64>) -> Vec<String> {
    let mut v: Vec<String> = ns.into_iter().map(line).collect();
    v.sort();
    v
}

#[test]
fn all_value_types_are_rebuilt_into_grouped_lines() {
    let mut w = World::new();
    w.append(
        "autogen/1",
        1,
        &write_entry(&[
            ("cpu,host=a#!~#f", vec![(1, V::F(1.5)), (2, V::F(-2.0))]),
            ("cpu,host=a#!~#i", vec![(1, V::I(-3))]),
            ("cpu,host=a#!~#b", vec![(2, V::B(true))]),
            ("cpu,host=a#!~#s", vec![(1, V::S("x \"y\""))]),
            ("cpu,host=a#!~#u", vec![(2, V::U(7))]),
        ]),
    );
    w.poll();
    assert_eq!(
        w.sink.lines,
        vec![
            "cpu,host=a f=1.5,i=-3i,s=\"x \\\"y\\\"\" 1",
            "cpu,host=a b=true,f=-2,u=7u 2",
        ]
    );
    let d = w.status.detail.locked().clone();
    assert_eq!(d.followed.len(), 1);
    assert_eq!(d.followed[0].path, "autogen/1");
    assert_eq!(d.followed[0].segment, Some(1));
    assert_eq!(d.followed[0].lag_bytes, 0);
}

#[test]
fn a_half_written_last_entry_is_read_once_complete() {
    let mut w = World::new();
    let e = point(2);
    w.append("autogen/1", 1, &point(1));
    w.append("autogen/1", 1, &e[..3]);
    w.poll();
    assert_eq!(w.sorted(), lines([1]));
    w.append("autogen/1", 1, &e[3..e.len() - 1]);
    w.poll();
    assert_eq!(w.sorted(), lines([1]));
    w.append("autogen/1", 1, &e[e.len() - 1..]);
    w.poll();
    assert_eq!(w.sorted(), lines([1, 2]));
}

#[test]
fn segments_are_read_in_numeric_order_and_new_shards_are_found() {
    let mut w = World::new();
    w.append("autogen/1", 99_999, &point(1));
    w.append("autogen/1", 100_000, &point(2));
    w.poll();
    assert_eq!(w.sink.lines, vec![line(1), line(2)]);
    w.append("autogen/2", 1, &point(3));
    w.append("other_rp/7", 1, &point(4));
    w.append("autogen/1", 100_001, &point(5));
    w.poll();
    assert_eq!(w.sorted(), lines(1..=5));
    assert_eq!(w.missed(), 0);
}

#[test]
fn deletes_are_skipped_and_counted() {
    let mut w = World::new();
    w.append("autogen/1", 1, &point(1));
    w.append("autogen/1", 1, &framed(2, b"m,n=1#!~#v\nm,n=2#!~#v"));
    let mut range = Vec::new();
    range.extend_from_slice(&0i64.to_be_bytes());
    range.extend_from_slice(&9i64.to_be_bytes());
    range.extend_from_slice(&3u32.to_be_bytes());
    range.extend_from_slice(b"m,n");
    w.append("autogen/1", 1, &framed(3, &range));
    w.append("autogen/1", 1, &point(2));
    w.poll();
    assert_eq!(w.sorted(), lines([1, 2]));
    assert_eq!(w.status.deletes_skipped.load(Ordering::Relaxed), 2);
}

#[test]
fn a_damaged_entry_is_skipped_and_counted() {
    let mut w = World::new();
    w.append("autogen/1", 1, &point(1));
    w.append("autogen/1", 1, &framed(1, b"\x01\x00\x03abc"));
    w.append("autogen/1", 1, &framed(1, b"\x09\x00\x01k"));
    w.append("autogen/1", 1, &point(2));
    w.poll();
    assert_eq!(w.sorted(), lines([1, 2]));
    assert_eq!(w.status.errors.load(Ordering::Relaxed), 2);
}

#[test]
fn a_segment_deleted_while_open_is_read_to_its_end() {
    let mut w = World::new();
    w.append("autogen/1", 1, &point(1));
    w.poll();
    // A snapshot: the segment gets its last entries, is closed, a new one
    // starts, and the old one is deleted, all between two polls.
    w.append("autogen/1", 1, &point(2));
    w.append("autogen/1", 2, &point(3));
    fs::remove_file(w.seg("autogen/1", 1)).unwrap();
    w.poll();
    assert_eq!(w.sorted(), lines(1..=3));
    assert_eq!(w.missed(), 0);
    // Deleted with no newer segment yet: finished all the same.
    fs::remove_file(w.seg("autogen/1", 2)).unwrap();
    w.poll();
    w.append("autogen/1", 3, &point(4));
    w.poll();
    assert_eq!(w.sorted(), lines(1..=4));
    assert_eq!(w.missed(), 0);
}

#[test]
fn segments_removed_while_stopped_are_a_counted_gap() {
    let mut w = World::new();
    w.append("autogen/1", 1, &point(1));
    w.poll();
    w.append("autogen/1", 1, &point(2));
    w.append("autogen/1", 2, &point(3));
    w.append("autogen/1", 3, &point(4));
    fs::remove_file(w.seg("autogen/1", 1)).unwrap();
    fs::remove_file(w.seg("autogen/1", 2)).unwrap();
    w.restart();
    w.poll();
    assert_eq!(w.sorted(), lines([1, 4]));
    assert_eq!(w.missed(), 2);
    assert!(w
        .status
        .detail
        .lock()
        .unwrap()
        .latest_error
        .contains("removed before it was read to its end"));
}

#[test]
fn a_crash_before_a_commit_neither_loses_nor_repeats() {
    let mut w = World::new();
    w.append("autogen/1", 1, &point(1));
    w.poll();
    w.append("autogen/1", 1, &point(2));
    w.append("autogen/1", 2, &point(3));
    w.sink.crash_next = true;
    assert_eq!(w.wal.poll(&mut w.sink), Err(SinkError::Stopped));
    w.restart();
    w.poll();
    assert_eq!(w.sink.lines, vec![line(1), line(2), line(3)]);
}

#[test]
fn an_entry_larger_than_a_write_is_split_and_resumed_exactly() {
    let mut w = World::new();
    let values: Vec<(i64, V<'_>)> = (0..100).map(|t| (t, V::I(t))).collect();
    w.append("autogen/1", 1, &write_entry(&[("big#!~#x", values)]));
    w.sink.budget = Some(200);
    // Crash at the third write; resume; crash again; resume.
    for _ in 0..2 {
        w.sink.crash_next = false;
        let before = w.sink.writes;
        while w.sink.writes < before + 2 {
            w.wal.poll(&mut w.sink).unwrap_or(());
            if w.sink.writes == before {
                break;
            }
        }
        w.sink.crash_next = true;
        let _ = w.wal.poll(&mut w.sink);
        w.sink.crash_next = false;
        w.restart();
    }
    w.poll();
    let want: Vec<String> = (0..100).map(|t| format!("big x={t}i {t}")).collect();
    assert_eq!(w.sink.lines, want);
    assert!(w.sink.writes > 5, "{} writes", w.sink.writes);
}

#[test]
fn too_large_writes_are_retried_smaller() {
    let mut w = World::new();
    let values: Vec<(i64, V<'_>)> = (0..50).map(|t| (t, V::I(t))).collect();
    w.append("autogen/1", 1, &write_entry(&[("big#!~#x", values)]));
    w.sink.max_payload = Some(300);
    w.poll();
    assert_eq!(w.sink.lines.len(), 50);
}

#[test]
fn an_incomplete_tail_of_a_finished_segment_is_skipped() {
    let mut w = World::new();
    w.append("autogen/1", 1, &point(1));
    w.append("autogen/1", 1, &point(2)[..4]);
    w.poll();
    assert_eq!(w.sorted(), lines([1]));
    w.append("autogen/1", 2, &point(3));
    w.poll();
    assert_eq!(w.sorted(), lines([1, 3]));
    assert_eq!(w.status.errors.load(Ordering::Relaxed), 1);
}

#[test]
fn a_segment_truncated_below_the_position_goes_on_from_its_end() {
    let mut w = World::new();
    w.append("autogen/1", 1, &point(1));
    w.append("autogen/1", 1, &point(2));
    w.poll();
    let len = point(1).len() as u64;
    OpenOptions::new()
        .write(true)
        .open(w.seg("autogen/1", 1))
        .unwrap()
        .set_len(len)
        .unwrap();
    w.poll();
    w.append("autogen/1", 1, &point(3));
    w.poll();
    assert_eq!(w.sorted(), lines(1..=3));
}

#[test]
fn a_tag_value_holding_the_separator_keeps_it() {
    let mut w = World::new();
    w.append(
        "autogen/1",
        1,
        &write_entry(&[("m,t=a#!~#b#!~#v", vec![(5, V::F(1.0))])]),
    );
    w.poll();
    assert_eq!(w.sink.lines, vec!["m,t=a#!~#b v=1 5".to_string()]);
}

#[test]
fn a_missing_database_directory_is_waited_for() {
    let mut w = World::new();
    w.poll();
    assert_eq!(
        w.status.detail.locked().state,
        crate::status::SourceState::Waiting
    );
    w.append("autogen/1", 1, &point(1));
    w.poll();
    assert_eq!(w.sink.lines, vec![line(1)]);
}

#[test]
fn a_dropped_shard_leaves_the_checkpoint() {
    let mut w = World::new();
    w.append("autogen/1", 1, &point(1));
    w.append("autogen/2", 1, &point(2));
    w.poll();
    fs::remove_dir_all(w.dir.path().join("db/autogen/1")).unwrap();
    w.poll();
    let state: State = serde_json::from_slice(w.sink.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(state.shards.keys().collect::<Vec<_>>(), vec!["autogen/2"]);
}

#[test]
fn segment_names_parse_numerically() {
    assert_eq!(segment_id("_00001.wal"), Some(1));
    assert_eq!(segment_id("_123456.wal"), Some(123_456));
    assert_eq!(segment_id("_1.wal.tmp"), None);
    assert_eq!(segment_id("00001.wal"), None);
    assert_eq!(segment_id("_.wal"), None);
}
