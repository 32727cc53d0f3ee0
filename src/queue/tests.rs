use super::*;
use proptest::prelude::*;
use schema::entry_key;
use std::collections::VecDeque;

fn opts() -> QueueOptions {
    QueueOptions {
        map_size: 64 << 20,
        durability: Durability::Fsync,
        commit_interval: Duration::from_millis(1),
    }
}

fn spec(name: &str, max_bytes: u64, when_full: WhenFull) -> ReplSpec {
    ReplSpec {
        name: name.into(),
        max_bytes,
        when_full,
        max_age: None,
        transform: None,
    }
}

/// A queue of one replication "r" of 1 MiB, dropping the oldest when full.
fn one_replication(dir: &std::path::Path) -> (Queue, Arc<ReplHandle>) {
    let q = Queue::open(dir, &opts(), &[spec("r", 1 << 20, WhenFull::DropOldest)]).unwrap();
    let h = q.handles()[0].clone();
    (q, h)
}

fn lines(prefix: &str, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{prefix} f={i}i {i}\n"))
        .collect::<String>()
        .into_bytes()
}

fn append(q: &Queue, h: &Arc<ReplHandle>, payload: Vec<u8>) -> Result<(), QueueError> {
    let n = lineproto::count_points(&payload) as u64;
    q.append_blocking(vec![h.clone()], "b".into(), payload, n)
}

fn drain(q: &Queue, h: &Arc<ReplHandle>, max: usize) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = Vec::new();
    while let Some(b) = q.read_batch(h, max, false, &mut buf).unwrap() {
        assert_eq!(b.bytes as usize, buf.len());
        assert_eq!(b.lines as usize, lineproto::count_points(&buf));
        assert_eq!(
            lineproto::last_point_end(&buf),
            Some(buf.len()),
            "whole points"
        );
        all.extend_from_slice(&buf);
        q.settle(h, &b, Settlement::default()).unwrap();
    }
    all
}

#[test]
fn append_read_settle_and_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    let a = lines("a", 100);
    let b = lines("b", 50);
    append(&q, &h, a.clone()).unwrap();
    append(&q, &h, b.clone()).unwrap();
    let c = h.counters();
    assert_eq!((c.accepted_lines, c.queued_lines), (150, 150));
    assert_eq!(c.queued_bytes, (a.len() + b.len()) as u64);
    assert!(c.oldest_enqueued_ns.is_some());
    // Batches coalesce entries and cut between lines.
    let got = drain(&q, &h, 1000);
    assert_eq!(got, [a, b].concat());
    let c = h.counters();
    assert_eq!(
        (c.delivered_lines, c.queued_lines, c.queued_bytes),
        (150, 0, 0)
    );
    assert_eq!(c.oldest_enqueued_ns, None);
    assert_eq!(c.inflow_lines(), c.accounted_lines());
}

#[test]
fn a_line_longer_than_a_batch_travels_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    let long = format!("m s=\"{}\" 1\n", "x".repeat(300));
    append(
        &q,
        &h,
        [b"a f=1 1\n".as_slice(), long.as_bytes(), b"b f=1 1\n"].concat(),
    )
    .unwrap();
    let mut buf = Vec::new();
    let b1 = q.read_batch(&h, 100, false, &mut buf).unwrap().unwrap();
    assert_eq!(buf, b"a f=1 1\n");
    q.settle(&h, &b1, Settlement::default()).unwrap();
    let b2 = q.read_batch(&h, 100, false, &mut buf).unwrap().unwrap();
    assert_eq!(buf, long.as_bytes());
    assert_eq!(b2.lines, 1);
    q.settle(&h, &b2, Settlement::default()).unwrap();
    q.read_batch(&h, 100, false, &mut buf).unwrap().unwrap();
    assert_eq!(buf, b"b f=1 1\n");
}

/// Points whose strings hold newlines, some longer than a batch.
fn multi_line_points(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let text = "line\nfake f=1 1\n".repeat(i % 7);
            format!("m,k=v s=\"{i}\n{text}end\",n={i}i {i}\n")
        })
        .collect::<String>()
        .into_bytes()
}

#[test]
fn batches_and_segments_never_cut_inside_a_string() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    let data = multi_line_points(40);
    append(&q, &h, data.clone()).unwrap();
    append_deflated(&q, &h, data.clone(), 100).unwrap();
    for s in deflate_lines(&data, 100, 6) {
        let mut part = Vec::new();
        crate::deflate::inflate_segment(&s.data, s.deflated.len as usize, &mut part).unwrap();
        assert_eq!(lineproto::last_point_end(&part), Some(part.len()));
        assert_eq!(s.lines as usize, lineproto::count_points(&part));
    }
    // A small batch size makes every batch cut between points, some mid-entry.
    let got = drain(&q, &h, 90);
    assert_eq!(got, [data.clone(), data].concat());
    let c = h.counters();
    assert_eq!((c.accepted_lines, c.delivered_lines), (80, 80));
    assert_eq!(c.inflow_lines(), c.accounted_lines());
}

#[test]
fn batches_do_not_mix_buckets_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    q.append_blocking(vec![h.clone()], "x".into(), b"a f=1 1\n".to_vec(), 1)
        .unwrap();
    q.append_blocking(vec![h.clone()], "y".into(), b"b f=1 1\n".to_vec(), 1)
        .unwrap();
    let mut buf = Vec::new();
    let b = q.read_batch(&h, 1000, true, &mut buf).unwrap().unwrap();
    assert_eq!((b.bucket.as_str(), b.lines), ("x", 1));
    let b = q.read_batch(&h, 1000, false, &mut buf).unwrap().unwrap();
    assert_eq!(b.lines, 2);
}

#[test]
fn reject_when_full_refuses_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), &opts(), &[spec("r", 700, WhenFull::Reject)]).unwrap();
    let h = q.handles()[0].clone();
    let p = lines("m", 30); // 310 bytes
    append(&q, &h, p.clone()).unwrap();
    append(&q, &h, p.clone()).unwrap();
    let err = append(&q, &h, p.clone()).unwrap_err();
    assert!(matches!(err, QueueError::Full { .. }), "{err}");
    let c = h.counters();
    assert_eq!(
        (c.accepted_lines, c.rejected_lines, c.queued_lines),
        (60, 30, 60)
    );
    let big = lines("m", 200);
    assert!(matches!(
        append(&q, &h, big),
        Err(QueueError::TooLarge { .. })
    ));
}

#[test]
fn drop_oldest_evicts_whole_entries() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), &opts(), &[spec("r", 800, WhenFull::DropOldest)]).unwrap();
    let h = q.handles()[0].clone();
    let a = lines("a", 30);
    let b = lines("b", 30);
    let c = lines("c", 30);
    append(&q, &h, a).unwrap();
    append(&q, &h, b.clone()).unwrap();
    append(&q, &h, c.clone()).unwrap();
    let k = h.counters();
    assert_eq!((k.dropped_full_lines, k.queued_lines), (30, 60));
    assert_eq!(k.inflow_lines(), k.accounted_lines());
    assert_eq!(drain(&q, &h, 10_000), [b, c].concat());
}

#[test]
fn eviction_while_a_batch_is_in_flight_keeps_counts_exact() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), &opts(), &[spec("r", 800, WhenFull::DropOldest)]).unwrap();
    let h = q.handles()[0].clone();
    append(&q, &h, lines("a", 30)).unwrap();
    let mut buf = Vec::new();
    let batch = q.read_batch(&h, 10_000, false, &mut buf).unwrap().unwrap();
    append(&q, &h, lines("b", 30)).unwrap();
    append(&q, &h, lines("c", 30)).unwrap(); // evicts "a", the batch in flight
    let k = h.counters();
    assert_eq!((k.dropped_full_lines, k.delivered_lines), (30, 0));
    // The remote accepted the batch: its lines arrived after all.
    q.settle(&h, &batch, Settlement::default()).unwrap();
    let k = h.counters();
    assert_eq!(
        (k.dropped_full_lines, k.delivered_lines, k.queued_lines),
        (0, 30, 60)
    );
    assert_eq!(k.inflow_lines(), k.accounted_lines());
    // Lines evicted before a batch was read were never sent: still dropped.
    append(&q, &h, lines("d", 30)).unwrap(); // evicts "b"
    let batch = q.read_batch(&h, 10_000, false, &mut buf).unwrap().unwrap();
    assert_eq!(buf, [lines("c", 30), lines("d", 30)].concat());
    q.settle(&h, &batch, Settlement::default()).unwrap();
    let k = h.counters();
    assert_eq!(
        (k.dropped_full_lines, k.delivered_lines, k.queued_lines),
        (30, 90, 0)
    );
    assert_eq!(k.inflow_lines(), k.accounted_lines());
}

#[test]
fn refused_lines_evicted_in_flight_stay_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), &opts(), &[spec("r", 800, WhenFull::DropOldest)]).unwrap();
    let h = q.handles()[0].clone();
    append(&q, &h, lines("a", 30)).unwrap();
    let mut buf = Vec::new();
    let batch = q.read_batch(&h, 10_000, false, &mut buf).unwrap().unwrap();
    append(&q, &h, lines("b", 30)).unwrap();
    append(&q, &h, lines("c", 30)).unwrap(); // evicts "a", the batch in flight
                                             // The remote refused two of its lines; they cannot be set aside any more.
    let refused = Settlement {
        bucket: "b".into(),
        reason: "HTTP 400".into(),
        dead_letter: lines("a", 2),
        dead_lines: 2,
        dropped_lines: 0,
    };
    q.settle(&h, &batch, refused).unwrap();
    let k = h.counters();
    assert_eq!(
        (
            k.dropped_full_lines,
            k.delivered_lines,
            k.dead_lettered_lines,
            k.queued_lines
        ),
        (2, 28, 0, 60)
    );
    assert_eq!(k.inflow_lines(), k.accounted_lines());
}

#[test]
fn lines_expired_in_flight_and_delivered_count_as_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("r", 1 << 20, WhenFull::DropOldest);
    s.max_age = Some(Duration::from_millis(1));
    let q = Queue::open(dir.path(), &opts(), &[s]).unwrap();
    let h = q.handles()[0].clone();
    append(&q, &h, lines("a", 10)).unwrap();
    let mut buf = Vec::new();
    let batch = q.read_batch(&h, 10_000, false, &mut buf).unwrap().unwrap();
    // Expiry runs with the writer's housekeeping; wait for it to take "a".
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while h.counters().expired_lines < 10 {
        assert!(std::time::Instant::now() < deadline, "nothing expired");
        std::thread::sleep(Duration::from_millis(20));
    }
    q.settle(&h, &batch, Settlement::default()).unwrap();
    let k = h.counters();
    assert_eq!((k.expired_lines, k.delivered_lines), (0, 10));
    assert_eq!(k.inflow_lines(), k.accounted_lines());
}

#[test]
fn reopen_resumes_mid_entry() {
    let dir = tempfile::tempdir().unwrap();
    let all = lines("m", 100);
    {
        let (q, h) = one_replication(dir.path());
        append(&q, &h, all.clone()).unwrap();
        let mut buf = Vec::new();
        let b = q.read_batch(&h, 300, false, &mut buf).unwrap().unwrap();
        assert!(b.to.off > 0 && b.lines < 100);
        q.settle(&h, &b, Settlement::default()).unwrap();
        q.close();
    }
    let (q, h) = one_replication(dir.path());
    let k = h.counters();
    assert_eq!(k.accepted_lines, 100);
    assert_eq!(k.delivered_lines + k.queued_lines, 100);
    let rest = drain(&q, &h, 1 << 20);
    assert!(all.ends_with(&rest) && rest.len() < all.len());
    assert_eq!(h.counters().delivered_lines, 100);
}

#[test]
fn settlement_splits_refused_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    append(&q, &h, lines("m", 10)).unwrap();
    let mut buf = Vec::new();
    let b = q.read_batch(&h, 1 << 20, false, &mut buf).unwrap().unwrap();
    let s = Settlement {
        bucket: "b".into(),
        reason: "HTTP 400: bad".into(),
        dead_letter: b"m f=3i 3\n".to_vec(),
        dead_lines: 1,
        dropped_lines: 2,
    };
    q.settle(&h, &b, s).unwrap();
    let k = h.counters();
    assert_eq!(
        (
            k.delivered_lines,
            k.dead_lettered_lines,
            k.dropped_non_retryable_lines
        ),
        (7, 1, 2)
    );
    assert_eq!(k.inflow_lines(), k.accounted_lines());
    let dead = q.dead_letters(&h, true).unwrap();
    assert_eq!(dead[0].data.as_deref(), Some("m f=3i 3\n"));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].lines,
            dead[0].bucket.as_str(),
            dead[0].reason.as_str()
        ),
        (1, "b", "HTTP 400: bad")
    );
    assert!(dead[0].replayable);

    // Replay puts the line back in the log; conservation still holds.
    assert_eq!(q.replay_dead_letters(&h).unwrap(), 1);
    let k = h.counters();
    assert_eq!(
        (k.dead_lettered_lines, k.queued_lines, k.dead_letter_lines),
        (0, 1, 0)
    );
    assert_eq!(k.inflow_lines(), k.accounted_lines());
    assert!(q.dead_letters(&h, false).unwrap().is_empty());
    let mut buf = Vec::new();
    let b = q.read_batch(&h, 1 << 20, false, &mut buf).unwrap().unwrap();
    assert_eq!(buf, b"m f=3i 3\n");
    // Refused again, then purged: counted as dead-lettered and purged.
    let s = Settlement {
        bucket: "b".into(),
        reason: "HTTP 400: bad".into(),
        dead_letter: buf.clone(),
        dead_lines: 1,
        dropped_lines: 0,
    };
    q.settle(&h, &b, s).unwrap();
    assert_eq!(q.purge_dead_letters(&h).unwrap(), 1);
    let k = h.counters();
    assert_eq!(
        (
            k.dead_lettered_lines,
            k.dead_letter_lines,
            k.dead_letter_purged_lines
        ),
        (1, 0, 1)
    );
    assert_eq!(k.inflow_lines(), k.accounted_lines());
}

#[test]
fn a_corrupt_entry_is_reported_and_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    append(&q, &h, lines("a", 5)).unwrap();
    append(&q, &h, lines("b", 5)).unwrap();
    {
        // Flip one payload byte of the first entry behind the queue's back.
        let s = &q.shared;
        let mut wtxn = s.env.write_txn().unwrap();
        let key = entry_key(h.id, 0);
        let mut raw = s.entries.get(&wtxn, &key).unwrap().unwrap().to_vec();
        let last = raw.len() - 3;
        raw[last] ^= 0x20;
        s.entries.put(&mut wtxn, &key, &raw).unwrap();
        wtxn.commit().unwrap();
    }
    let mut buf = Vec::new();
    let err = q.read_batch(&h, 1 << 20, false, &mut buf).unwrap_err();
    let QueueError::Corrupt { seq, .. } = err else {
        panic!("{err}")
    };
    q.set_aside(&h, seq).unwrap();
    assert_eq!(drain(&q, &h, 1 << 20), lines("b", 5));
    let k = h.counters();
    assert_eq!((k.dead_lettered_lines, k.delivered_lines), (5, 5));
    assert_eq!(k.inflow_lines(), k.accounted_lines());
}

#[test]
fn expired_entries_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("r", 1 << 20, WhenFull::DropOldest);
    s.max_age = Some(Duration::from_millis(1));
    let q = Queue::open(dir.path(), &opts(), &[s]).unwrap();
    let h = q.handles()[0].clone();
    append(&q, &h, lines("a", 5)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while h.counters().expired_lines < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "housekeeping never expired the entry"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let k = h.counters();
    assert_eq!((k.queued_lines, k.queued_bytes), (0, 0));
}

#[test]
fn a_second_process_cannot_open_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _q = Queue::open(dir.path(), &opts(), &[]).unwrap();
    let err = Queue::open(dir.path(), &opts(), &[]).err().unwrap();
    assert!(matches!(err, QueueError::Locked(_)), "{err}");
}

#[test]
fn one_write_routes_to_several_replications_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(
        dir.path(),
        &opts(),
        &[
            spec("a", 1 << 20, WhenFull::DropOldest),
            spec("b", 300, WhenFull::Reject),
        ],
    )
    .unwrap();
    let (a, b) = (q.handles()[0].clone(), q.handles()[1].clone());
    q.append_blocking(vec![a.clone(), b.clone()], "x".into(), lines("m", 10), 10)
        .unwrap();
    // Too much for "b" (reject): refused for both.
    let err = q.append_blocking(vec![a.clone(), b.clone()], "x".into(), lines("m", 30), 30);
    assert!(err.is_err());
    assert_eq!(a.counters().accepted_lines, 10);
    assert_eq!(b.counters().accepted_lines, 10);
}

// ---- model-based property test ----

#[derive(Debug, Clone)]
enum Op {
    Push(Vec<u16>),  // line lengths
    Read(u16),       // read without settling
    ReadSettle(u16), // read a batch and settle it
    // Read a batch, push lines while it is in flight (they may evict it),
    // then settle it: the remote accepted it.
    ReadPushSettle(u16, Vec<u16>),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0u16..120, 1..12).prop_map(Op::Push),
        1 => (20u16..600).prop_map(Op::Read),
        3 => (20u16..600).prop_map(Op::ReadSettle),
        2 => ((20u16..600), prop::collection::vec(0u16..120, 1..12))
            .prop_map(|(max, lens)| Op::ReadPushSettle(max, lens)),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    entries: VecDeque<VecDeque<Vec<u8>>>,
    accepted: u64,
    delivered: u64,
    dropped: u64,
}

impl Model {
    fn queued_bytes(&self) -> u64 {
        self.entries.iter().flatten().map(|l| l.len() as u64).sum()
    }

    fn queued_lines(&self) -> u64 {
        self.entries.iter().map(|e| e.len() as u64).sum()
    }

    /// Greedy whole lines up to `max` bytes; one longer line alone.
    fn peek(&self, max: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut used = 0;
        for line in self.entries.iter().flatten() {
            if used + line.len() > max {
                if out.is_empty() {
                    out.push(line.clone());
                }
                break;
            }
            used += line.len();
            out.push(line.clone());
        }
        out
    }

    /// Pushes an entry of lines of `lens` bytes of text to the queue and the
    /// model, evicting whole entries in the model as the queue must; returns
    /// how many of the first `in_flight` lines were evicted.
    fn push(
        &mut self,
        q: &Queue,
        h: &Arc<ReplHandle>,
        lens: &[u16],
        counter: &mut u64,
        in_flight: usize,
    ) -> Result<usize, TestCaseError> {
        let entry: VecDeque<Vec<u8>> = lens
            .iter()
            .map(|&n| {
                *counter += 1;
                // Every other point's string holds newlines: the queue must
                // cut between points, as the model does, never at those.
                let s: String = (0..n)
                    .map(|i| {
                        if counter.is_multiple_of(2) && i % 9 == 4 {
                            '\n'
                        } else {
                            'x'
                        }
                    })
                    .collect();
                format!("m{counter} f=\"{s}\" {counter}\n").into_bytes()
            })
            .collect();
        let payload: Vec<u8> = entry.iter().flatten().copied().collect();
        let n = entry.len() as u64;
        let r = q.append_blocking(vec![h.clone()], "b".into(), payload.clone(), n);
        let mut evicted = 0;
        if payload.len() as u64 > MAX_BYTES {
            prop_assert!(
                matches!(r, Err(QueueError::TooLarge { .. })),
                "expected TooLarge"
            );
        } else {
            r.unwrap();
            while self.queued_bytes() + payload.len() as u64 > MAX_BYTES {
                let e = self.entries.pop_front().unwrap();
                evicted += e.len().min(in_flight - evicted);
                self.dropped += e.len() as u64;
            }
            self.accepted += n;
            self.entries.push_back(entry);
        }
        Ok(evicted)
    }

    fn pop(&mut self, n: usize) {
        for _ in 0..n {
            let front = self.entries.front_mut().unwrap();
            front.pop_front();
            if front.is_empty() {
                self.entries.pop_front();
            }
        }
    }
}

const MAX_BYTES: u64 = 2000;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn queue_matches_a_vecdeque_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let specs = [spec("r", MAX_BYTES, WhenFull::DropOldest)];
        let mut q = Queue::open(dir.path(), &opts(), &specs).unwrap();
        let mut model = Model::default();
        let mut counter = 0u64;
        let mut buf = Vec::new();
        for op in ops {
            let h = q.handles()[0].clone();
            match op {
                Op::Push(lens) => {
                    model.push(&q, &h, &lens, &mut counter, 0)?;
                }
                Op::Read(max) | Op::ReadSettle(max) => {
                    let expect = model.peek(max as usize);
                    let got = q.read_batch(&h, max as usize, false, &mut buf).unwrap();
                    prop_assert_eq!(got.is_none(), expect.is_empty());
                    prop_assert_eq!(&buf, &expect.concat());
                    if let (Some(b), Op::ReadSettle(_)) = (got, &op) {
                        q.settle(&h, &b, Settlement::default()).unwrap();
                        model.pop(expect.len());
                        model.delivered += expect.len() as u64;
                    }
                }
                Op::ReadPushSettle(max, lens) => {
                    let expect = model.peek(max as usize);
                    let got = q.read_batch(&h, max as usize, false, &mut buf).unwrap();
                    prop_assert_eq!(got.is_none(), expect.is_empty());
                    prop_assert_eq!(&buf, &expect.concat());
                    let evicted = model.push(&q, &h, &lens, &mut counter, expect.len())?;
                    if let Some(b) = got {
                        q.settle(&h, &b, Settlement::default()).unwrap();
                        // What eviction took of the batch arrived: delivered.
                        model.pop(expect.len() - evicted);
                        model.dropped -= evicted as u64;
                        model.delivered += expect.len() as u64;
                    }
                }
                Op::Reopen => {
                    drop(q);
                    q = Queue::open(dir.path(), &opts(), &specs).unwrap();
                }
            }
            let c = q.handles()[0].counters();
            prop_assert_eq!(c.queued_bytes, model.queued_bytes());
            prop_assert_eq!(c.queued_lines, model.queued_lines());
            prop_assert_eq!(c.accepted_lines, model.accepted);
            prop_assert_eq!(c.delivered_lines, model.delivered);
            prop_assert_eq!(c.dropped_full_lines, model.dropped);
            prop_assert_eq!(c.inflow_lines(), c.accounted_lines());
        }
    }
}

#[test]
fn a_checkpoint_commits_with_its_lines_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [spec("r", 700, WhenFull::Reject)];
    let w = |h: &Arc<ReplHandle>, n: usize, offset: &[u8]| Write {
        targets: vec![h.clone()],
        bucket: "b".into(),
        payload: lines("m", n),
        lines: n as u64,
        checkpoint: Some(Checkpoint {
            key: "tail:/var/log/x.lp".into(),
            value: offset.to_vec(),
        }),
        clock: None,
    };
    {
        let q = Queue::open(dir.path(), &opts(), &specs).unwrap();
        let h = q.handles()[0].clone();
        assert_eq!(q.checkpoint("tail:/var/log/x.lp").unwrap(), None);
        q.write_blocking(w(&h, 30, b"310")).unwrap();
        assert_eq!(
            q.checkpoint("tail:/var/log/x.lp").unwrap().as_deref(),
            Some(&b"310"[..])
        );
        // Refused (queue full): the position must not move either.
        q.write_blocking(w(&h, 30, b"620")).unwrap();
        assert!(q.write_blocking(w(&h, 30, b"930")).is_err());
        assert_eq!(
            q.checkpoint("tail:/var/log/x.lp").unwrap().as_deref(),
            Some(&b"620"[..])
        );
    }
    let q = Queue::open(dir.path(), &opts(), &specs).unwrap();
    assert_eq!(
        q.checkpoint("tail:/var/log/x.lp").unwrap().as_deref(),
        Some(&b"620"[..])
    );
    assert_eq!(q.handles()[0].counters().queued_lines, 60);
}

#[test]
fn a_full_map_refuses_appends_keeps_the_queue_and_recovers_after_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = QueueOptions {
        map_size: 1 << 20,
        ..opts()
    };
    let q = Queue::open(dir.path(), &tiny, &[spec("r", 1 << 30, WhenFull::Reject)]).unwrap();
    let h = q.handles()[0].clone();
    let mut accepted = Vec::new();
    let err = loop {
        let payload = lines(&format!("m{}", accepted.len()), 200);
        match append(&q, &h, payload.clone()) {
            Ok(()) => accepted.push(payload),
            Err(e) => break e,
        }
        assert!(accepted.len() < 1000, "a 1 MiB map never filled");
    };
    assert!(matches!(err, QueueError::StorageFull(_)), "{err}");
    assert!(err.to_string().contains("queue.map_size"), "{err}");
    let c = h.counters();
    assert_eq!(c.accepted_lines, 200 * accepted.len() as u64);
    assert_eq!(c.inflow_lines(), c.accounted_lines());
    // Delivery still works on a full map, and makes room.
    let all = drain(&q, &h, 64 << 10);
    assert_eq!(all, accepted.concat());
    append(&q, &h, lines("again", 200)).unwrap();
    assert_eq!(drain(&q, &h, 64 << 10), lines("again", 200));
}

#[test]
fn concurrent_writes_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.commit_interval = Duration::from_millis(200);
    let q = Arc::new(
        Queue::open(dir.path(), &o, &[spec("r", 64 << 20, WhenFull::DropOldest)]).unwrap(),
    );
    let h = q.handles()[0].clone();
    let writers = 32;
    let barrier = Arc::new(std::sync::Barrier::new(writers));
    let before = q.commits();
    let threads: Vec<_> = (0..writers)
        .map(|i| {
            let (q, h, barrier) = (q.clone(), h.clone(), barrier.clone());
            std::thread::spawn(move || {
                // As the HTTP path does: prepared while the body arrives,
                // released once the lines are handed over.
                let preparing = q.preparing();
                barrier.wait();
                let committed = q.append(vec![h], "b".into(), lines(&format!("w{i}"), 10), 10);
                drop(preparing);
                committed.blocking_recv().unwrap().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let commits = q.commits() - before;
    assert_eq!(h.counters().accepted_lines, 320);
    // One group takes every writer that was still preparing; housekeeping
    // may add a commit of its own. Far from one commit per write.
    assert!(
        commits <= 4,
        "{writers} concurrent writes took {commits} commits"
    );
}

// ---- deflated entries (lines compressed when queued) ----

fn append_deflated(
    q: &Queue,
    h: &Arc<ReplHandle>,
    payload: Vec<u8>,
    chunk: usize,
) -> Result<Vec<Segment>, QueueError> {
    let n = lineproto::count_points(&payload) as u64;
    let segments = deflate_lines(&payload, chunk, 6);
    let w = Write {
        targets: vec![h.clone()],
        bucket: "b".into(),
        payload,
        lines: n,
        checkpoint: None,
        clock: None,
    };
    q.write_deflated(w, Some(segments.clone()))
        .blocking_recv()
        .unwrap_or(Err(QueueError::Closed))?;
    Ok(segments)
}

#[test]
fn deflated_entries_ship_as_stored_and_read_back_as_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    let a = lines("a", 40);
    let b = lines("b", 300);
    let c = lines("c", 7);
    append(&q, &h, a.clone()).unwrap();
    let segs = append_deflated(&q, &h, b.clone(), 1000).unwrap();
    assert!(segs.len() > 3, "cut into several segments");
    append(&q, &h, c.clone()).unwrap();
    let k = h.counters();
    assert_eq!(k.queued_bytes, (a.len() + b.len() + c.len()) as u64);
    assert_eq!(k.queued_lines, 347);
    // Each batch is one gzip member holding exactly its lines.
    let mut all = Vec::new();
    let mut sh = Shipment::default();
    while let Some(batch) = q.read_shipment(&h, None, 2500, false, &mut sh).unwrap() {
        let lines = crate::deflate::gunzip_first_member(&sh.gzip(6, Vec::new()));
        assert_eq!(lines.len() as u64, batch.bytes);
        assert_eq!(
            memchr::memchr_iter(b'\n', &lines).count() as u64,
            batch.lines
        );
        let mut plain = Vec::new();
        sh.lines_into(&mut plain).unwrap();
        assert_eq!(plain, lines);
        all.extend_from_slice(&lines);
        q.settle(&h, &batch, Settlement::default()).unwrap();
    }
    assert_eq!(all, [a, b, c].concat());
    let k = h.counters();
    assert_eq!(
        (k.queued_lines, k.queued_bytes, k.delivered_lines),
        (0, 0, 347)
    );
    assert_eq!(k.inflow_lines(), k.accounted_lines());
}

#[test]
fn the_next_batch_is_read_while_the_last_one_settles() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    let a = lines("a", 100);
    let b = lines("b", 100);
    append(&q, &h, a.clone()).unwrap();
    append_deflated(&q, &h, b.clone(), 700).unwrap();
    let mut all = Vec::new();
    let mut sh = Shipment::default();
    let mut pending: Option<(
        Batch,
        tokio::sync::oneshot::Receiver<Result<(), QueueError>>,
    )> = None;
    loop {
        let from = pending.as_ref().map(|(b, _)| b.to);
        let Some(batch) = q.read_shipment(&h, from, 900, false, &mut sh).unwrap() else {
            match pending.take() {
                Some((_, rx)) => {
                    rx.blocking_recv().unwrap().unwrap();
                    continue;
                }
                None => break,
            }
        };
        if let Some((prev, _)) = &pending {
            assert_eq!(
                batch.from.max(prev.to),
                batch.from,
                "reads on from the last batch"
            );
        }
        let mut plain = Vec::new();
        sh.lines_into(&mut plain).unwrap();
        all.extend_from_slice(&plain);
        if let Some((_, rx)) = pending.take() {
            rx.blocking_recv().unwrap().unwrap();
        }
        // Settled in order, the next one read before this one is durable.
        let rx = q.settle_async(&h, &batch, Settlement::default());
        pending = Some((batch, rx));
    }
    assert_eq!(all, [a, b].concat(), "every line once, in order");
    let k = h.counters();
    assert_eq!((k.queued_lines, k.delivered_lines), (0, 200));
    assert_eq!(k.inflow_lines(), k.accounted_lines());
}

#[test]
fn deflated_entries_are_evicted_whole_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [spec("r", 3000, WhenFull::DropOldest)];
    let a = lines("a", 180);
    assert!(a.len() > 1500 && a.len() < 3000, "{}", a.len());
    {
        let q = Queue::open(dir.path(), &opts(), &specs).unwrap();
        let h = q.handles()[0].clone();
        let segs = append_deflated(&q, &h, a.clone(), 400).unwrap();
        // A second write evicts the oldest segments, whole.
        append_deflated(&q, &h, a.clone(), 400).unwrap();
        let k = h.counters();
        let first = segs[0].lines as u64;
        assert!(k.dropped_full_lines >= first);
        assert!(k.queued_bytes <= 3000);
        assert_eq!(k.inflow_lines(), k.accounted_lines());
    }
    let q = Queue::open(dir.path(), &opts(), &specs).unwrap();
    let h = q.handles()[0].clone();
    let queued = h.counters().queued_lines;
    let got = drain(&q, &h, 500);
    assert_eq!(memchr::memchr_iter(b'\n', &got).count() as u64, queued);
    assert!(
        a.ends_with(&got[got.len() - 200..]),
        "the newest lines stay"
    );
}

/// Replication "tagged": adds the tag `gw=1` and leaves out the lines of
/// the measurements `exclude`.
fn tagged_spec(exclude: Vec<String>) -> ReplSpec {
    let r = crate::config::Replication {
        name: "tagged".into(),
        remote: "x".into(),
        local_bucket: "b".into(),
        remote_bucket: None,
        max_queue_size: 1 << 20,
        max_age: None,
        when_full: WhenFull::DropOldest,
        drop_non_retryable_data: false,
        batch_size: 1000,
        gzip_level: 6,
        priority: 5,
        live_window: None,
        batch_wait: None,
        include_measurements: Vec::new(),
        exclude_measurements: exclude,
        add_tags: [("gw".to_string(), "1".to_string())].into_iter().collect(),
        downsample: None,
    };
    let mut tagged = spec("tagged", 1 << 20, WhenFull::DropOldest);
    tagged.transform = crate::transform::Transform::new(&r).map(Arc::new);
    assert!(tagged.transform.is_some());
    tagged
}

#[test]
fn a_transforming_replication_gets_lines_back_from_segments() {
    // Ingest keeps only the segments when no replication transforms the
    // lines; a reload may add one before the write reaches the queue.
    let tagged = tagged_spec(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(
        dir.path(),
        &opts(),
        &[spec("plain", 1 << 20, WhenFull::DropOldest), tagged],
    )
    .unwrap();
    let (plain, tagged) = (q.handles()[0].clone(), q.handles()[1].clone());
    let data = b"m f=1i 1\n".repeat(500);
    let w = Write {
        targets: vec![plain.clone(), tagged.clone()],
        bucket: "b".into(),
        payload: Vec::new(),
        lines: 500,
        checkpoint: None,
        clock: None,
    };
    q.write_deflated(w, Some(deflate_lines(&data, 1000, 6)))
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert_eq!(drain(&q, &plain, 1 << 20), data);
    assert_eq!(drain(&q, &tagged, 1 << 20), b"m,gw=1 f=1i 1\n".repeat(500));
    for h in [&plain, &tagged] {
        let k = h.counters();
        assert_eq!(
            (k.accepted_lines, k.accepted_bytes),
            (500, data.len() as u64)
        );
        assert_eq!(k.inflow_lines(), k.accounted_lines());
    }
}

#[test]
fn a_storage_error_keeps_its_cause() {
    use std::error::Error as _;
    let heed = heed::Error::Mdb(heed::MdbError::Corrupted);
    let text = heed.to_string();
    let err = QueueError::from(heed).context("opening the queue in /q");
    assert_eq!(
        err.to_string(),
        format!("queue storage error: opening the queue in /q: {text}")
    );
    let cause = err.source().expect("the heed error is kept");
    assert!(cause.downcast_ref::<heed::Error>().is_some(), "{cause:?}");

    let dir = tempfile::tempdir().unwrap();
    let qdir = dir.path().join("queue");
    fs::create_dir_all(qdir.join("data.mdb")).unwrap();
    let Err(err) = Queue::open(dir.path(), &opts(), &[]) else {
        panic!("a directory for data.mdb was taken")
    };
    assert!(
        matches!(err, QueueError::Storage { source: None, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("is not a regular file"), "{err}");
}

// ---- held lanes: out-of-order settlement, model-based ----

#[derive(Debug, Clone)]
enum LaneOp {
    /// Lines of these lengths to bucket `b{0}`.
    Push(u8, Vec<u16>),
    /// Read a batch of the main log (one bucket at a time) and settle it.
    Settle(u16),
    /// Read a batch of the main log without settling it.
    Read(u16),
    /// The remote refused bucket `b{0}` alone: hold it.
    Hold(u8),
    /// Read a batch of held bucket `b{0}` and settle it (the remote took it).
    SettleHeld(u8, u16),
    /// Move held bucket `b{0}`'s lines to the dead-letter store.
    DeadLetterHeld(u8),
    Reopen,
}

fn lane_op() -> impl Strategy<Value = LaneOp> {
    prop_oneof![
        5 => (0u8..3, prop::collection::vec(0u16..80, 1..6)).prop_map(|(b, l)| LaneOp::Push(b, l)),
        3 => (20u16..400).prop_map(LaneOp::Settle),
        1 => (20u16..400).prop_map(LaneOp::Read),
        2 => (0u8..3).prop_map(LaneOp::Hold),
        3 => ((0u8..3), (20u16..400)).prop_map(|(b, m)| LaneOp::SettleHeld(b, m)),
        1 => (0u8..3).prop_map(LaneOp::DeadLetterHeld),
        1 => Just(LaneOp::Reopen),
    ]
}

/// An entry of the model: its push order (its age), bucket and unsent lines.
#[derive(Debug, Clone)]
struct MEntry {
    order: u64,
    bucket: String,
    lines: VecDeque<Vec<u8>>,
}

#[derive(Default)]
struct LaneModel {
    main: VecDeque<MEntry>,
    /// Held buckets and their lanes, in the order they were held.
    lanes: Vec<(String, VecDeque<MEntry>)>,
    pushes: u64,
    accepted: u64,
    delivered: u64,
    dropped: u64,
    dead_lettered: u64,
}

const LANE_MAX_BYTES: u64 = 1500;

fn entry_bytes(e: &MEntry) -> u64 {
    e.lines.iter().map(|l| l.len() as u64).sum()
}

impl LaneModel {
    fn all(&self) -> impl Iterator<Item = &MEntry> {
        self.main
            .iter()
            .chain(self.lanes.iter().flat_map(|(_, l)| l.iter()))
    }

    fn queued_bytes(&self) -> u64 {
        self.all().map(entry_bytes).sum()
    }

    fn queued_lines(&self) -> u64 {
        self.all().map(|e| e.lines.len() as u64).sum()
    }

    fn lane(&mut self, bucket: &str) -> Option<&mut VecDeque<MEntry>> {
        self.lanes
            .iter_mut()
            .find(|(b, _)| b == bucket)
            .map(|(_, l)| l)
    }

    /// Greedy whole lines of `log`'s first entries of one bucket, up to `max`.
    fn peek(log: &VecDeque<MEntry>, max: usize) -> (Option<String>, Vec<Vec<u8>>) {
        let Some(bucket) = log.front().map(|e| e.bucket.clone()) else {
            return (None, Vec::new());
        };
        let mut out = Vec::new();
        let mut used = 0;
        'entries: for e in log.iter().take_while(|e| e.bucket == bucket) {
            for line in &e.lines {
                if used + line.len() > max {
                    if out.is_empty() {
                        out.push(line.clone());
                    }
                    break 'entries;
                }
                used += line.len();
                out.push(line.clone());
            }
        }
        (Some(bucket), out)
    }

    fn pop(log: &mut VecDeque<MEntry>, n: usize) {
        for _ in 0..n {
            let front = log.front_mut().unwrap();
            front.lines.pop_front();
            if front.lines.is_empty() {
                log.pop_front();
            }
        }
    }

    /// Eviction as the queue does it: whole entries, the oldest head first.
    fn evict_for(&mut self, len: u64) {
        while self.queued_bytes() + len > LANE_MAX_BYTES {
            let main = self.main.front().map(|e| e.order);
            let lane = self
                .lanes
                .iter()
                .enumerate()
                .filter_map(|(i, (_, l))| l.front().map(|e| (e.order, i)))
                .min();
            let e = match (main, lane) {
                (Some(m), Some((o, _))) if m <= o => self.main.pop_front().unwrap(),
                (_, Some((_, i))) => {
                    let e = self.lanes[i].1.pop_front().unwrap();
                    if self.lanes[i].1.is_empty() {
                        self.lanes.remove(i);
                    }
                    e
                }
                (Some(_), None) => self.main.pop_front().unwrap(),
                (None, None) => return,
            };
            self.dropped += e.lines.len() as u64;
        }
    }
}

/// Every batch of `read` from the head on, without settling: (bucket, lines).
fn read_all(
    mut read: impl FnMut(Option<Pos>, &mut Shipment) -> Option<Batch>,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut from = None;
    let mut shipment = Shipment::default();
    while let Some(b) = read(from, &mut shipment) {
        let mut lines = Vec::new();
        shipment.lines_into(&mut lines).unwrap();
        match out.last_mut() {
            Some((bucket, l)) if *bucket == b.bucket => l.extend_from_slice(&lines),
            _ => out.push((b.bucket.clone(), lines)),
        }
        from = Some(b.to);
    }
    out
}

/// A log of the model as [`read_all`] returns it.
fn model_runs<'a>(log: impl Iterator<Item = &'a MEntry>) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for e in log {
        let lines: Vec<u8> = e.lines.iter().flatten().copied().collect();
        match out.last_mut() {
            Some((bucket, l)) if *bucket == e.bucket => l.extend_from_slice(&lines),
            _ => out.push((e.bucket.clone(), lines)),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Holds move a destination's entries to a lane; the main log and the
    /// lanes settle independently, each in order; eviction takes the
    /// oldest head of any of them; a reopen (every step is committed, so
    /// it is what a crash after the step leaves) changes nothing. After
    /// every step the counters, the held lanes and the exact contents of
    /// every log match the model, and lines are conserved.
    #[test]
    fn held_lanes_match_a_model(ops in prop::collection::vec(lane_op(), 1..50)) {
        let dir = tempfile::tempdir().unwrap();
        let specs = [spec("r", LANE_MAX_BYTES, WhenFull::DropOldest)];
        let mut q = Queue::open(dir.path(), &opts(), &specs).unwrap();
        let mut m = LaneModel::default();
        let mut shipment = Shipment::default();
        for op in ops {
            let h = q.handles()[0].clone();
            match op {
                LaneOp::Push(b, lens) => {
                    let bucket = format!("b{b}");
                    let entry: VecDeque<Vec<u8>> = lens
                        .iter()
                        .map(|&n| {
                            m.pushes += 1;
                            let s = "x".repeat(n as usize);
                            format!("m{} f=\"{s}\" {}\n", m.pushes, m.pushes).into_bytes()
                        })
                        .collect();
                    let payload: Vec<u8> = entry.iter().flatten().copied().collect();
                    let n = entry.len() as u64;
                    let r = q.append_blocking(vec![h.clone()], bucket.clone(), payload.clone(), n);
                    if payload.len() as u64 > LANE_MAX_BYTES {
                        prop_assert!(matches!(r, Err(QueueError::TooLarge { .. })), "expected TooLarge");
                    } else {
                        r.unwrap();
                        m.evict_for(payload.len() as u64);
                        m.accepted += n;
                        let e = MEntry { order: m.pushes, bucket: bucket.clone(), lines: entry };
                        match m.lane(&bucket) {
                            Some(l) => l.push_back(e),
                            None => m.main.push_back(e),
                        }
                    }
                }
                LaneOp::Settle(max) | LaneOp::Read(max) => {
                    let (bucket, expect) = LaneModel::peek(&m.main, max as usize);
                    let got = q.read_shipment(&h, None, max as usize, true, &mut shipment).unwrap();
                    prop_assert_eq!(got.is_none(), expect.is_empty());
                    if let Some(b) = got {
                        let mut lines = Vec::new();
                        shipment.lines_into(&mut lines).unwrap();
                        prop_assert_eq!(&lines, &expect.concat());
                        prop_assert_eq!(Some(&b.bucket), bucket.as_ref());
                        prop_assert_eq!(b.lane, 0);
                        if matches!(op, LaneOp::Settle(_)) {
                            q.settle(&h, &b, Settlement::default()).unwrap();
                            LaneModel::pop(&mut m.main, expect.len());
                            m.delivered += expect.len() as u64;
                        }
                    }
                }
                LaneOp::Hold(b) => {
                    let bucket = format!("b{b}");
                    let moved = q.hold(&h, &bucket, 404, "bucket not found").unwrap();
                    if m.lane(&bucket).is_none() {
                        let (take, keep): (VecDeque<MEntry>, VecDeque<MEntry>) =
                            m.main.drain(..).partition(|e| e.bucket == bucket);
                        m.main = keep;
                        prop_assert_eq!(moved, take.iter().map(|e| e.lines.len() as u64).sum::<u64>());
                        if !take.is_empty() {
                            m.lanes.push((bucket, take));
                        }
                    } else {
                        prop_assert_eq!(moved, 0);
                    }
                }
                LaneOp::SettleHeld(b, max) => {
                    let bucket = format!("b{b}");
                    let lane = h.held().iter().find(|x| x.bucket == bucket).map(|x| x.lane);
                    prop_assert_eq!(lane.is_some(), m.lane(&bucket).is_some());
                    if let Some(lane) = lane {
                        let log = m.lane(&bucket).unwrap();
                        let (_, expect) = LaneModel::peek(log, max as usize);
                        let b = q.read_lane(&h, lane, None, max as usize, &mut shipment).unwrap().unwrap();
                        let mut lines = Vec::new();
                        shipment.lines_into(&mut lines).unwrap();
                        prop_assert_eq!(&lines, &expect.concat());
                        prop_assert_eq!(b.lane, lane);
                        q.settle(&h, &b, Settlement::default()).unwrap();
                        LaneModel::pop(log, expect.len());
                        let emptied = log.is_empty();
                        m.delivered += expect.len() as u64;
                        if emptied {
                            m.lanes.retain(|(x, _)| *x != bucket);
                        }
                    }
                }
                LaneOp::DeadLetterHeld(b) => {
                    let bucket = format!("b{b}");
                    let n = q.dead_letter_held(&h, &bucket).unwrap();
                    let expect = m.lane(&bucket).map_or(0, |l| l.iter().map(|e| e.lines.len() as u64).sum());
                    prop_assert_eq!(n, expect);
                    m.dead_lettered += n;
                    m.lanes.retain(|(x, _)| *x != bucket);
                }
                LaneOp::Reopen => {
                    drop(q);
                    q = Queue::open(dir.path(), &opts(), &specs).unwrap();
                }
            }
            let h = q.handles()[0].clone();
            let c = h.counters();
            prop_assert_eq!(c.queued_bytes, m.queued_bytes());
            prop_assert_eq!(c.queued_lines, m.queued_lines());
            prop_assert_eq!(c.accepted_lines, m.accepted);
            prop_assert_eq!(c.delivered_lines, m.delivered);
            prop_assert_eq!(c.dropped_full_lines, m.dropped);
            prop_assert_eq!(c.dead_lettered_lines, m.dead_lettered);
            prop_assert_eq!(c.inflow_lines(), c.accounted_lines());
            // The held lanes, in the order they were held, and their contents.
            let held = h.held();
            let names: Vec<&str> = held.iter().map(|x| x.bucket.as_str()).collect();
            let expect: Vec<&str> = m.lanes.iter().map(|(b, _)| b.as_str()).collect();
            prop_assert_eq!(names, expect);
            for (x, (_, log)) in held.iter().zip(&m.lanes) {
                prop_assert_eq!(x.lines, log.iter().map(|e| e.lines.len() as u64).sum::<u64>());
                prop_assert_eq!(x.bytes, log.iter().map(entry_bytes).sum::<u64>());
                let got = read_all(|from, s| q.read_lane(&h, x.lane, from, 100, s).unwrap());
                prop_assert_eq!(got, model_runs(log.iter()));
            }
            let got = read_all(|from, s| q.read_shipment(&h, from, 100, true, s).unwrap());
            prop_assert_eq!(got, model_runs(m.main.iter()));
        }
    }
}

/// The meta record's version as stored for replication `h`.
fn stored_meta_version(q: &Queue, h: &ReplHandle) -> u64 {
    let s = &q.shared;
    let rtxn = s.env.read_txn().unwrap();
    let raw = s.meta.get(&rtxn, &meta_key(h.id)).unwrap().unwrap();
    u64::from_le_bytes(raw[..8].try_into().unwrap())
}

/// Writes a data dir as the release before held lanes did: four databases
/// (no `lanes`), a version 2 meta record of 23 fields, and three entries
/// of replication "r": buckets `a`, `typo`, `a`.
fn previous_release_data_dir(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let qdir = dir.join("queue");
    fs::create_dir_all(&qdir).unwrap();
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(64 << 20).max_dbs(8);
    // SAFETY: a fresh directory of this test, opened once and closed below.
    let env = unsafe { options.open(&qdir) }.unwrap();
    let mut w = env.write_txn().unwrap();
    let entries: Db = env.create_database(&mut w, Some("entries")).unwrap();
    let meta: Db = env.create_database(&mut w, Some("meta")).unwrap();
    env.create_database::<Bytes, Bytes>(&mut w, Some("dead"))
        .unwrap();
    env.create_database::<Bytes, Bytes>(&mut w, Some("windows"))
        .unwrap();
    meta.put(&mut w, b"Nr", &1u32.to_be_bytes()).unwrap();
    meta.put(&mut w, b"I", &2u32.to_be_bytes()).unwrap();
    let writes = vec![
        ("a".to_string(), lines("a1", 3)),
        ("typo".to_string(), lines("t1", 2)),
        ("a".to_string(), lines("a2", 4)),
    ];
    let mut m = Meta::default();
    for (seq, (bucket, payload)) in writes.iter().enumerate() {
        let n = lineproto::count_points(payload) as u64;
        let e = entry::encode(1_000 + seq as u64, n as u32, bucket, payload);
        entries.put(&mut w, &entry_key(1, seq as u64), &e).unwrap();
        m.c.accepted_lines += n;
        m.c.accepted_bytes += payload.len() as u64;
        m.c.queued_lines += n;
        m.c.queued_bytes += payload.len() as u64;
    }
    m.next_seq = writes.len() as u64;
    let record = m.encode();
    assert_eq!(&record[..8], &2u64.to_le_bytes());
    meta.put(&mut w, &meta_key(1), &record[..23 * 8]).unwrap();
    w.commit().unwrap();
    env.prepare_for_closing().wait();
    writes
}

#[test]
fn a_data_dir_of_the_previous_release_opens_holds_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let writes = previous_release_data_dir(dir.path());
    let specs = [spec("r", 1 << 20, WhenFull::DropOldest)];
    let q = Queue::open(dir.path(), &opts(), &specs).unwrap();
    let h = q.handles()[0].clone();
    let c = h.counters();
    assert_eq!(c.queued_lines, 9);
    assert_eq!(c.oldest_enqueued_ns, Some(1_000));
    // Read as it was written, one bucket per batch.
    let all = read_all(|from, s| q.read_shipment(&h, from, 1 << 20, true, s).unwrap());
    assert_eq!(all, writes);
    assert_eq!(stored_meta_version(&q, &h), 2);

    // The first batch goes; `typo` is refused alone and held.
    let mut s = Shipment::default();
    let b = q
        .read_shipment(&h, None, 1 << 20, true, &mut s)
        .unwrap()
        .unwrap();
    q.settle(&h, &b, Settlement::default()).unwrap();
    assert_eq!(
        q.hold(&h, "typo", 404, "database not found: \"typo\"")
            .unwrap(),
        2
    );
    assert_eq!(
        stored_meta_version(&q, &h),
        3,
        "while a lane exists, the release before lanes refuses the data dir"
    );
    let held = h.held();
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].lines, held[0].code), (2, 404));
    let rest = read_all(|from, s| q.read_shipment(&h, from, 1 << 20, true, s).unwrap());
    assert_eq!(rest, vec![writes[2].clone()]);

    // After a restart, the hold is still there; the lane drains, in order.
    drop(q);
    let q = Queue::open(dir.path(), &opts(), &specs).unwrap();
    let h = q.handles()[0].clone();
    assert_eq!(h.held(), held);
    assert_eq!(h.counters().queued_lines, 6);
    assert_eq!(drain(&q, &h, 1 << 20), writes[2].1);
    let b = q
        .read_lane(&h, held[0].lane, None, 1 << 20, &mut s)
        .unwrap()
        .unwrap();
    let mut got = Vec::new();
    s.lines_into(&mut got).unwrap();
    assert_eq!(got, writes[1].1);
    q.settle(&h, &b, Settlement::default()).unwrap();
    assert!(h.held().is_empty(), "an emptied lane ends its hold");
    let c = h.counters();
    assert_eq!(
        (c.queued_lines, c.queued_bytes, c.delivered_lines),
        (0, 0, 9)
    );
    assert_eq!(c.inflow_lines(), c.accounted_lines());
    assert_eq!(
        stored_meta_version(&q, &h),
        2,
        "without lanes, the release before lanes opens it again"
    );
    // Writes to the destination go to the main log again.
    append(&q, &h, lines("t2", 1)).unwrap();
    assert_eq!(
        q.read_batch(&h, 1 << 20, true, &mut got)
            .unwrap()
            .unwrap()
            .lane,
        0
    );
}

#[test]
fn a_held_lane_moves_whole_to_the_dead_letter_store() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    q.append_blocking(vec![h.clone()], "typo/rp".into(), lines("t", 5), 5)
        .unwrap();
    q.append_blocking(vec![h.clone()], "ok".into(), lines("o", 2), 2)
        .unwrap();
    // Part of the held destination's first entry was delivered already.
    let mut buf = Vec::new();
    let b = q.read_batch(&h, 20, true, &mut buf).unwrap().unwrap();
    assert_eq!(b.lines, 2);
    q.settle(&h, &b, Settlement::default()).unwrap();
    assert_eq!(
        q.hold(&h, "typo/rp", 404, "retention policy not found")
            .unwrap(),
        3
    );
    // Later writes to it join the lane.
    q.append_blocking(vec![h.clone()], "typo/rp".into(), lines("u", 1), 1)
        .unwrap();
    assert_eq!(h.held()[0].lines, 4);
    assert_eq!(q.dead_letter_held(&h, "typo/rp").unwrap(), 4);
    assert!(h.held().is_empty());
    let dead = q.dead_letters(&h, true).unwrap();
    let data: String = dead.iter().filter_map(|d| d.data.clone()).collect();
    let expect = [&lines("t", 5)[b.bytes as usize..], &lines("u", 1)[..]].concat();
    assert_eq!(data.as_bytes(), &expect[..]);
    assert!(dead
        .iter()
        .all(|d| d.reason == "held: 404 retention policy not found"));
    assert!(dead.iter().all(|d| d.bucket == "typo/rp"));
    let c = h.counters();
    assert_eq!(
        (c.queued_lines, c.dead_lettered_lines, c.delivered_lines),
        (2, 4, 2)
    );
    assert_eq!(c.inflow_lines(), c.accounted_lines());
    assert_eq!(drain(&q, &h, 1 << 20), lines("o", 2));
    // Nothing held: nothing moves.
    assert_eq!(q.dead_letter_held(&h, "typo/rp").unwrap(), 0);
}

/// A damaged entry with a damaged header, last in the main log, is set
/// aside with what the main log holds: never with a held lane's lines. A
/// damaged entry in a lane is set aside from the lane.
#[test]
fn a_corrupt_entry_beside_a_held_lane_is_counted_in_its_own_log() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    q.append_blocking(vec![h.clone()], "held".into(), lines("x", 4), 4)
        .unwrap();
    q.append_blocking(vec![h.clone()], "held".into(), lines("y", 2), 2)
        .unwrap();
    assert_eq!(q.hold(&h, "held", 404, "bucket not found").unwrap(), 6);
    append(&q, &h, lines("a", 3)).unwrap();
    let lane = h.held()[0].lane;
    {
        // Damage the header of the main log's entry and the payload of the
        // lane's first entry, behind the queue's back.
        let s = &q.shared;
        let mut wtxn = s.env.write_txn().unwrap();
        let key = entry_key(h.id, 2);
        let mut raw = s.entries.get(&wtxn, &key).unwrap().unwrap().to_vec();
        raw.truncate(3);
        s.entries.put(&mut wtxn, &key, &raw).unwrap();
        let key = schema::lane_key(h.id, lane, 0);
        let mut raw = s.lanes.get(&wtxn, &key).unwrap().unwrap().to_vec();
        let last = raw.len() - 3;
        raw[last] ^= 0x20;
        s.lanes.put(&mut wtxn, &key, &raw).unwrap();
        wtxn.commit().unwrap();
    }
    let mut buf = Vec::new();
    let QueueError::Corrupt { seq, .. } = q.read_batch(&h, 1 << 20, true, &mut buf).unwrap_err()
    else {
        panic!("the main log's entry is damaged")
    };
    q.set_aside(&h, seq).unwrap();
    let c = h.counters();
    assert_eq!((c.dead_lettered_lines, c.queued_lines), (3, 6), "{c:?}");
    let mut s = Shipment::default();
    let QueueError::Corrupt { seq, .. } = q.read_lane(&h, lane, None, 1 << 20, &mut s).unwrap_err()
    else {
        panic!("the lane's first entry is damaged")
    };
    q.set_aside_in(&h, lane, seq).unwrap();
    assert_eq!(h.held()[0].lines, 2);
    let b = q
        .read_lane(&h, lane, None, 1 << 20, &mut s)
        .unwrap()
        .unwrap();
    let mut got = Vec::new();
    s.lines_into(&mut got).unwrap();
    assert_eq!(got, lines("y", 2));
    q.settle(&h, &b, Settlement::default()).unwrap();
    assert!(h.held().is_empty());
    let c = h.counters();
    assert_eq!(
        (c.dead_lettered_lines, c.delivered_lines, c.queued_lines),
        (7, 2, 0)
    );
    assert_eq!(c.inflow_lines(), c.accounted_lines());
}

/// `max_age` expires a held lane's entries as it does the main log's,
/// counted as expired; the emptied lane ends its hold.
#[test]
fn held_lines_expire_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("r", 1 << 20, WhenFull::DropOldest);
    s.max_age = Some(Duration::from_millis(1500));
    let q = Queue::open(dir.path(), &opts(), &[s]).unwrap();
    let h = q.handles()[0].clone();
    q.append_blocking(vec![h.clone()], "held".into(), lines("x", 4), 4)
        .unwrap();
    assert_eq!(q.hold(&h, "held", 404, "bucket not found").unwrap(), 4);
    std::thread::sleep(Duration::from_millis(1200));
    append(&q, &h, lines("a", 3)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !h.held().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "housekeeping never expired the lane"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = h.counters();
    assert!(c.expired_lines >= 4, "{c:?}");
    // The main log's entry is younger: expired only if the check came late.
    assert_eq!(c.expired_lines + c.queued_lines, 7, "{c:?}");
    assert_eq!(c.inflow_lines(), c.accounted_lines());
    if c.queued_lines == 3 {
        assert_eq!(drain(&q, &h, 1 << 20), lines("a", 3));
    }
}

/// A worker kept past a reload's join (a POST that hung) settles after its
/// replication was detached: the settlement is refused with `Closed`, the
/// writer goes on, and the queue and its counters are as they were when the
/// replication is attached again.
#[test]
fn a_settlement_after_detach_is_refused_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(
        dir.path(),
        &opts(),
        &[spec("r", 1 << 20, WhenFull::DropOldest)],
    )
    .unwrap();
    let h = q.handles()[0].clone();
    append(&q, &h, lines("a", 10)).unwrap();
    let mut buf = Vec::new();
    let batch = q.read_batch(&h, 10_000, false, &mut buf).unwrap().unwrap();
    q.detach("r");
    assert!(matches!(
        q.settle(&h, &batch, Settlement::default()),
        Err(QueueError::Closed)
    ));
    // The writer still serves: the replication comes back with its lines.
    let h = q.attach(spec("r", 1 << 20, WhenFull::DropOldest)).unwrap();
    let k = h.counters();
    assert_eq!((k.queued_lines, k.delivered_lines), (10, 0));
    let batch = q.read_batch(&h, 10_000, false, &mut buf).unwrap().unwrap();
    q.settle(&h, &batch, Settlement::default()).unwrap();
    assert_eq!(h.counters().delivered_lines, 10);
}

#[test]
fn a_live_batch_settles_ahead_of_the_head_and_the_backlog_skips_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (q, h) = one_replication(dir.path());
        for p in ["a", "b", "c", "d"] {
            append(&q, &h, stamped(p, 30)).unwrap();
        }
        // The newest entry alone (at least one, whatever the bound).
        let start = q.live_start(&h, 0, 0, 1).unwrap().expect("an entry");
        let mut sh = Shipment::default();
        let batch = q.read_live(&h, start, false, &mut sh).unwrap().unwrap();
        let mut got = Vec::new();
        sh.lines_into(&mut got).unwrap();
        assert_eq!(got, stamped("d", 30));
        assert!(batch.live);
        // Nothing past the last entry, nor past a batch being settled.
        assert_eq!(q.live_start(&h, 0, start, 1 << 20).unwrap(), None);
        let oldest = h.counters().oldest_enqueued_ns;
        q.settle(&h, &batch, Settlement::default()).unwrap();
        let k = h.counters();
        assert_eq!((k.delivered_lines, k.queued_lines), (30, 90));
        assert_eq!(k.inflow_lines(), k.accounted_lines());
        assert_eq!(k.oldest_enqueued_ns, oldest, "the head did not move");
        // Up to the bound, newest first, never the head entry.
        let two = stamped("b", 30).len() + stamped("c", 30).len();
        let start = q.live_start(&h, 0, 0, two).unwrap().expect("entries");
        let batch = q.read_live(&h, start, false, &mut sh).unwrap().unwrap();
        got.clear();
        sh.lines_into(&mut got).unwrap();
        assert_eq!(got, [stamped("b", 30), stamped("c", 30)].concat());
        // Entries queued before `since` are not live.
        let newest = now_ns_for_tests();
        assert_eq!(q.live_start(&h, newest, 0, 1 << 20).unwrap(), None);
        q.settle(&h, &batch, Settlement::default()).unwrap();
        assert_eq!(q.live_start(&h, 0, 0, 1 << 20).unwrap(), None, "head alone");
    }
    // Durable: after a restart the backlog holds what was not settled.
    let (q, h) = one_replication(dir.path());
    let k = h.counters();
    assert_eq!((k.delivered_lines, k.queued_lines), (90, 30));
    assert_eq!(drain(&q, &h, 10_000), stamped("a", 30));
    let k = h.counters();
    assert_eq!((k.delivered_lines, k.queued_lines), (120, 0));
    assert_eq!(k.inflow_lines(), k.accounted_lines());
}

#[test]
fn eviction_passes_over_entries_settled_live() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(
        dir.path(),
        &opts(),
        &[spec("r", 2_000, WhenFull::DropOldest)],
    )
    .unwrap();
    let h = q.handles()[0].clone();
    for p in ["a", "b", "c"] {
        append(&q, &h, stamped(p, 20)).unwrap();
    }
    let start = q.live_start(&h, 0, 0, 1).unwrap().unwrap();
    let mut sh = Shipment::default();
    let batch = q.read_live(&h, start, false, &mut sh).unwrap().unwrap();
    q.settle(&h, &batch, Settlement::default()).unwrap();
    // Room for the new entry is made from the head, over the gap.
    for p in ["d", "e", "f"] {
        append(&q, &h, stamped(p, 20)).unwrap();
    }
    let k = h.counters();
    assert_eq!(k.inflow_lines(), k.accounted_lines());
    assert_eq!(k.delivered_lines, 20);
    assert!(k.dropped_full_lines > 0);
    let left = drain(&q, &h, 10_000);
    assert!(!String::from_utf8_lossy(&left).contains("c f="), "{left:?}");
    assert!(left.ends_with(&stamped("f", 20)));
}

/// `lines`, stamped a day from now: later than any entry was queued.
fn stamped(prefix: &str, n: usize) -> Vec<u8> {
    let day = 86_400_000_000_000u64;
    (0..n)
        .map(|i| format!("{prefix} f={i}i {}\n", *LATER + day + i as u64))
        .collect::<String>()
        .into_bytes()
}

/// A fixed time after now, so that `stamped` gives the same lines twice.
static LATER: std::sync::LazyLock<u64> = std::sync::LazyLock::new(now_ns_for_tests);

#[test]
fn a_line_stamped_before_the_backlog_keeps_its_entry_and_older_ones_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    append(&q, &h, stamped("a", 10)).unwrap();
    append(&q, &h, stamped("b", 10)).unwrap();
    // A backfilled line: it may rewrite a point of "a" or "b".
    append(&q, &h, b"c f=1i 5\n".to_vec()).unwrap();
    append(&q, &h, stamped("d", 10)).unwrap();
    append(&q, &h, stamped("e", 10)).unwrap();
    let start = q.live_start(&h, 0, 0, 1 << 20).unwrap().expect("d and e");
    let mut sh = Shipment::default();
    q.read_live(&h, start, false, &mut sh).unwrap().unwrap();
    let mut got = Vec::new();
    sh.lines_into(&mut got).unwrap();
    assert_eq!(got, [stamped("d", 10), stamped("e", 10)].concat());
    // Lines stamped before the entry ahead of them was queued.
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    append(&q, &h, stamped("a", 10)).unwrap();
    append(&q, &h, lines("b", 10)).unwrap();
    assert_eq!(q.live_start(&h, 0, 0, 1 << 20).unwrap(), None);
    // Within the slack (stamped on arrival, queued in the group commit of
    // the entry before), a line goes; beyond it, not.
    let ago = |s: u64| {
        let ts = now_ns_for_tests() - s * 1_000_000_000;
        format!("x f=1i {ts}\n").into_bytes()
    };
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    append(&q, &h, stamped("a", 10)).unwrap();
    append(&q, &h, ago(0)).unwrap();
    append(&q, &h, ago(1)).unwrap();
    let start = q.live_start(&h, 0, 0, 1 << 20).unwrap();
    assert!(start.is_some());
    append(&q, &h, ago(10)).unwrap();
    assert_eq!(q.live_start(&h, 0, 0, 1 << 20).unwrap(), None);
}

fn now_ns_for_tests() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

// ---------------------------------------------------------------------------
// The clock guard: held entries
// ---------------------------------------------------------------------------

/// Queues `payload` held with `anchor`, as a write the guard holds.
fn append_held(
    q: &Queue,
    h: &Arc<ReplHandle>,
    payload: &str,
    anchor: crate::clock::Anchor,
) -> Result<(), QueueError> {
    let n = lineproto::count_points(payload.as_bytes()) as u64;
    q.write_blocking(Write {
        targets: vec![h.clone()],
        bucket: "b".into(),
        payload: payload.as_bytes().to_vec(),
        lines: n,
        checkpoint: None,
        clock: Some(anchor),
    })
}

/// The version field of `h`'s meta record on disk.
fn meta_version(q: &Queue, h: &ReplHandle) -> u64 {
    let rtxn = q.shared.env.read_txn().unwrap();
    let raw = q.shared.meta.get(&rtxn, &meta_key(h.id)).unwrap().unwrap();
    u64::from_le_bytes(raw[..8].try_into().unwrap())
}

/// A held write waits, with what follows it, while the guard holds; the
/// meta record says so to older releases (version 4); once released, its
/// stamped line carries its arrival, its own-timestamped one is unchanged,
/// and it goes in its place, before what followed it. Counts conserve.
#[test]
fn a_held_write_waits_and_is_released_in_place_with_its_arrival_time() {
    use crate::clock::{testing, Anchor, ClockState};
    let boot = [3; 16];
    let _clock = testing::set(ClockState::BeforeBuild, boot);
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    append(&q, &h, b"before v=1 1\n".to_vec()).unwrap();
    let stamp = 42_000_000_000;
    let own = crate::clock::earliest_sent() + 5;
    let arrived_boot_ns = crate::clock::boottime_ns();
    let anchor = Anchor {
        boot,
        boot_ns: arrived_boot_ns,
        stamp_ns: stamp,
    };
    append_held(&q, &h, &format!("s v=2 {stamp}\no v=3 {own}\n"), anchor).unwrap();
    append(&q, &h, format!("after v=4 {own}\n").into_bytes()).unwrap();
    assert_eq!(meta_version(&q, &h), 4);
    let mut buf = Vec::new();
    // What came before goes; nothing from the held write on.
    assert_eq!(drain(&q, &h, 1 << 20), b"before v=1 1\n");
    assert!(q
        .read_batch(&h, 1 << 20, false, &mut buf)
        .unwrap()
        .is_none());
    assert!(q.clock_held(&h));
    assert_eq!(q.release_clock(&h).unwrap(), 0, "the guard holds");
    assert!(q.live_start(&h, 0, 0, 1 << 20).unwrap().is_none());
    assert_eq!(h.counters().queued_lines, 3);

    testing::change(ClockState::Synchronised, boot);
    let t0 = crate::clock::wall_ns();
    assert!(q.release_clock(&h).unwrap() > 0);
    let t1 = crate::clock::wall_ns();
    assert!(!q.clock_held(&h));
    assert_eq!(meta_version(&q, &h), 2, "an older release opens it again");
    let got = String::from_utf8(drain(&q, &h, 1 << 20)).unwrap();
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 3, "{got}");
    let (s, ts) = lines[0].rsplit_once(' ').unwrap();
    assert_eq!(s, "s v=2");
    // Its arrival: the clock now, less the time since.
    let ts: i64 = ts.parse().unwrap();
    let since = (crate::clock::boottime_ns() - arrived_boot_ns) as i64;
    assert!(
        (t0 - since - 1_000_000_000..=t1).contains(&ts),
        "{ts} not within [{}, {t1}]",
        t0 - since
    );
    assert_eq!(lines[1], format!("o v=3 {own}"));
    assert_eq!(lines[2], format!("after v=4 {own}"));
    let c = h.counters();
    assert_eq!(
        (c.delivered_lines, c.queued_lines, c.queued_bytes),
        (4, 0, 0)
    );
    assert_eq!(c.inflow_lines(), c.accounted_lines());
}

/// A held write of a boot that ended before the guard let go: its stamped
/// lines cannot be dated and are set aside with reason `clock`, as are lines
/// stamped before the build date; the rest goes. Eviction takes held
/// entries like any other, and the count of held entries follows.
#[test]
fn lines_of_an_earlier_boot_are_set_aside_and_held_entries_can_be_evicted() {
    use crate::clock::{testing, Anchor, ClockState};
    let _clock = testing::set(ClockState::Synchronised, [4; 16]);
    let dir = tempfile::tempdir().unwrap();
    let (q, h) = one_replication(dir.path());
    let earlier = Anchor {
        boot: [5; 16],
        boot_ns: 1,
        stamp_ns: 7,
    };
    let own = crate::clock::earliest_sent() + 5;
    append_held(
        &q,
        &h,
        &format!("s v=1 7\nearly v=2 1000\no v=3 {own}\n"),
        earlier,
    )
    .unwrap();
    assert!(q.release_clock(&h).unwrap() > 0);
    assert_eq!(
        drain(&q, &h, 1 << 20),
        format!("o v=3 {own}\n").into_bytes()
    );
    let dead = q.dead_letters(&h, true).unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(dead.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("clock: stamped on arrival"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("clock: timestamp before"),
        "{reasons:?}"
    );
    let c = h.counters();
    assert_eq!((c.dead_lettered_lines, c.delivered_lines), (2, 1));
    assert_eq!(c.inflow_lines(), c.accounted_lines());

    // Eviction: a small queue, held writes, then more than it holds.
    drop(q);
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), &opts(), &[spec("r", 300, WhenFull::DropOldest)]).unwrap();
    let h = q.handles()[0].clone();
    testing::change(ClockState::BeforeBuild, [4; 16]);
    let now = Anchor {
        boot: [4; 16],
        boot_ns: 1,
        stamp_ns: 9,
    };
    append_held(&q, &h, "a v=1 9\n", now).unwrap();
    append_held(&q, &h, "b v=1 9\n", now).unwrap();
    assert_eq!(meta_version(&q, &h), 4);
    // 299 bytes: with either held entry (8 bytes each) more than 300.
    append(&q, &h, lines("x", 29)).unwrap();
    let c = h.counters();
    assert_eq!(c.dropped_full_lines, 2, "{c:?}");
    assert!(!q.clock_held(&h));
    assert_eq!(meta_version(&q, &h), 2);
}

/// A held write to a replication that transforms its lines is queued as it
/// came (from the segments ingest compressed) and transformed on release,
/// to its true times; what the filter drops is counted then.
#[test]
fn a_held_write_is_transformed_when_released() {
    use crate::clock::{testing, Anchor, ClockState};
    let boot = [6; 16];
    let _clock = testing::set(ClockState::BeforeBuild, boot);
    let tagged = tagged_spec(vec!["noise".into()]);
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), &opts(), &[tagged]).unwrap();
    let h = q.handles()[0].clone();
    let own = crate::clock::earliest_sent() + 1;
    let data = format!("m v=1 {own}\nnoise v=2 {own}\n").repeat(100);
    let w = Write {
        targets: vec![h.clone()],
        bucket: "b".into(),
        payload: Vec::new(),
        lines: 200,
        checkpoint: None,
        clock: Some(Anchor {
            boot,
            boot_ns: 1,
            stamp_ns: 3,
        }),
    };
    q.write_deflated(w, Some(deflate_lines(data.as_bytes(), 1000, 6)))
        .blocking_recv()
        .unwrap()
        .unwrap();
    let c = h.counters();
    assert_eq!(
        (c.queued_lines, c.filtered_lines),
        (200, 0),
        "held as it came"
    );
    testing::change(ClockState::Synchronised, boot);
    assert!(q.release_clock(&h).unwrap() > 0);
    assert_eq!(
        drain(&q, &h, 1 << 20),
        format!("m,gw=1 v=1 {own}\n").repeat(100).into_bytes()
    );
    let c = h.counters();
    assert_eq!((c.delivered_lines, c.filtered_lines), (100, 100));
    assert_eq!(c.inflow_lines(), c.accounted_lines());
}
