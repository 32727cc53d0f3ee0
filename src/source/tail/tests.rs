use std::io::Write as _;

use proptest::prelude::*;
use tempfile::TempDir;

use super::*;
use crate::lineproto::Precision;
use crate::source::testing::{status, MemorySink};
use crate::sync::Locked;

fn cfg(path: PathBuf) -> Tail {
    Tail {
        path,
        bucket: "b".into(),
        precision: Precision::Nanoseconds,
        poll_interval: Duration::from_millis(10),
        from_beginning: true,
        follow_symlinks: false,
    }
}

/// A line that normalisation leaves unchanged, unique by `n`.
fn line(n: u64) -> String {
    format!("m,src=t v={n}i {}\n", 1_700_000_000_000_000_000 + n)
}

fn lines(range: std::ops::Range<u64>) -> String {
    range.map(line).collect()
}

struct World {
    dir: TempDir,
    sink: MemorySink,
    tailer: Tailer,
    status: Arc<SourceStatus>,
    from_beginning: bool,
}

impl World {
    fn new() -> World {
        World::with(true)
    }

    fn with(from_beginning: bool) -> World {
        let dir = tempfile::tempdir().unwrap();
        let status = status();
        let mut c = cfg(dir.path().join("*.lp"));
        c.from_beginning = from_beginning;
        let mut tailer = Tailer::new(c, status.clone(), None);
        tailer.grace = Duration::ZERO;
        World {
            dir,
            sink: MemorySink::default(),
            tailer,
            status,
            from_beginning,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn append(&self, name: &str, text: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// Empties the file in place, as copytruncate does after its copy.
    fn truncate(&self, name: &str) {
        OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .unwrap()
            .set_len(0)
            .unwrap();
    }

    fn poll(&mut self) {
        self.tailer.poll(&mut self.sink).unwrap();
    }

    /// A new process: same files, the last committed checkpoint.
    fn restart(&mut self) {
        let mut c = cfg(self.dir.path().join("*.lp"));
        c.from_beginning = self.from_beginning;
        self.status = status();
        self.tailer = Tailer::new(c, self.status.clone(), self.sink.checkpoint.clone());
        self.tailer.grace = Duration::ZERO;
    }

    fn got(&self) -> String {
        self.sink.lines.iter().map(|l| format!("{l}\n")).collect()
    }

    fn sorted(&self) -> Vec<String> {
        let mut v = self.sink.lines.clone();
        v.sort();
        v
    }
}

use std::fs::OpenOptions;

fn sorted(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.lines().map(String::from).collect();
    v.sort();
    v
}

#[test]
fn a_partial_line_waits_for_its_newline() {
    let mut w = World::new();
    w.append("a.lp", &line(1));
    w.append("a.lp", "m,src=t v=2i 17");
    w.poll();
    assert_eq!(w.got(), line(1));
    let writes = w.sink.writes;
    w.poll();
    assert_eq!(w.sink.writes, writes, "nothing new, nothing written");
    w.append("a.lp", "00000000000000002\n");
    w.poll();
    assert_eq!(w.got(), lines(1..3));
}

/// A point whose string value holds newlines, one of them followed by text
/// that would be a valid point on its own; unique by `n`.
fn multi_line(n: u64) -> String {
    format!(
        "m,src=t s=\"first\ninjected,host=x value={n}i 1\n\\\"end\\\\\",v={n}i {}\n",
        1_700_000_000_000_000_000 + n
    )
}

#[test]
fn a_point_with_newlines_in_a_string_waits_across_polls_and_stays_whole() {
    let mut w = World::new();
    let p = multi_line(2);
    let cut = p.find("value").unwrap();
    w.append("a.lp", &format!("{}{}", line(1), &p[..cut]));
    w.poll();
    assert_eq!(w.got(), line(1), "the open string waits for its end");
    w.append("a.lp", &p[cut..p.len() - 1]);
    w.poll();
    assert_eq!(w.got(), line(1));
    w.append("a.lp", &format!("\n{}", line(3)));
    w.poll();
    assert_eq!(w.got(), format!("{}{p}{}", line(1), line(3)));
    assert_eq!(w.sink.lines.len(), 3);
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 0);
    // The checkpoint's line number, used in error messages, counts the
    // newlines inside the string.
    w.append("a.lp", "bad\n");
    w.poll();
    let cp: State = serde_json::from_slice(w.sink.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(cp.files[0].line, 6);
}

#[test]
fn a_point_with_newlines_in_a_string_straddles_a_rotation() {
    let mut w = World::new();
    let p = multi_line(2);
    let cut = p.find("value").unwrap();
    w.append("a.lp", &format!("{}{}", line(1), &p[..cut]));
    w.poll();
    fs::rename(w.path("a.lp"), w.path("a.lp.1")).unwrap();
    // The writer finishes the point in the file it has open.
    w.append("a.lp.1", &p[cut..]);
    w.append("a.lp", &line(3));
    w.poll();
    let mut want = vec![
        line(1).trim_end().to_string(),
        p.trim_end().to_string(),
        line(3).trim_end().to_string(),
    ];
    want.sort();
    assert_eq!(w.sorted(), want);
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 0);
    // A rotated file finished with its string still open gives one invalid
    // point, never the text after the newline as points.
    w.append("a.lp", &p[..cut]);
    w.poll();
    fs::rename(w.path("a.lp"), w.path("a.lp.2")).unwrap();
    w.poll();
    assert_eq!(w.sink.lines.len(), 3);
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 1);
}

#[test]
fn a_stray_quote_holds_a_file_back_only_up_to_the_line_limit() {
    let mut w = World::new();
    w.append(
        "a.lp",
        &format!("{}m s=\"stray 1\n{}", line(1), lines(2..4)),
    );
    w.poll();
    assert_eq!(w.got(), line(1), "the lines after an open quote wait");
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 0);
    let filler = lines(4..4 + (MAX_LINE / line(4).len()) as u64 + 10);
    w.append("a.lp", &filler);
    w.poll();
    w.poll();
    // Past the limit, only the line with the stray quote is lost.
    assert_eq!(w.got(), format!("{}{}{filler}", line(1), lines(2..4)));
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 1);
}

#[test]
fn invalid_lines_are_skipped_counted_and_the_rest_queued() {
    let mut w = World::new();
    w.append(
        "a.lp",
        &format!("{}not a line\n\n# comment\n{}m v=\n", line(1), line(2)),
    );
    w.poll();
    assert_eq!(w.got(), lines(1..3));
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 2);
    assert_eq!(
        w.status.lines.load(Ordering::Relaxed),
        0,
        "the test sink counts nothing"
    );
}

#[test]
fn rename_rotation_finishes_the_old_file_and_reads_the_new_one() {
    let mut w = World::new();
    w.append("a.lp", &lines(0..10));
    w.poll();
    w.append("a.lp", &lines(10..15));
    fs::rename(w.path("a.lp"), w.path("a.lp.1")).unwrap();
    // The writer has not reopened yet: it still appends to the old inode.
    w.append("a.lp.1", &lines(15..20));
    w.append("a.lp", &lines(20..30));
    w.poll();
    assert_eq!(w.sorted(), sorted(&lines(0..30)));
    assert_eq!(w.tailer.files.len(), 1, "the rotated file is finished");
    let cp: State = serde_json::from_slice(w.sink.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(cp.files.len(), 1);
    assert!(cp.files[0].path.ends_with("a.lp"));
}

#[test]
fn a_rotated_file_is_kept_open_until_the_grace_period_passed() {
    let mut w = World::new();
    w.tailer.grace = Duration::from_secs(3600);
    w.append("a.lp", &lines(0..3));
    w.poll();
    fs::rename(w.path("a.lp"), w.path("a.lp.1")).unwrap();
    w.poll();
    w.append("a.lp.1", &lines(3..5));
    w.poll();
    assert_eq!(w.tailer.files.len(), 1);
    assert_eq!(w.got(), lines(0..5));
}

#[test]
fn copytruncate_starts_again_at_zero() {
    let mut w = World::new();
    w.append("a.lp", &lines(0..10));
    w.poll();
    fs::copy(w.path("a.lp"), w.path("a.lp.1")).unwrap();
    w.truncate("a.lp");
    w.append("a.lp", &lines(10..12));
    w.poll();
    assert_eq!(w.got(), lines(0..12));
}

#[test]
fn copytruncate_is_noticed_even_when_the_file_regrew_past_the_offset() {
    let mut w = World::new();
    w.append("a.lp", &lines(0..3));
    w.poll();
    w.truncate("a.lp");
    w.append("a.lp", &lines(100..110));
    w.poll();
    assert_eq!(w.got(), lines(0..3) + &lines(100..110));
}

#[test]
fn copytruncate_is_noticed_when_the_file_regrew_to_the_same_size() {
    let mut w = World::new();
    w.append("a.lp", &lines(10..16));
    w.poll();
    w.truncate("a.lp");
    // Same line lengths, same count: the size alone shows no change.
    w.append("a.lp", &lines(20..26));
    assert_eq!(lines(10..16).len(), lines(20..26).len());
    w.poll();
    assert_eq!(w.got(), lines(10..16) + &lines(20..26));
}

#[test]
fn the_glob_picks_up_new_files_from_their_start() {
    let mut w = World::new();
    w.poll();
    assert!(w.sink.lines.is_empty());
    w.append("a.lp", &lines(0..2));
    w.append("ignored.txt", &lines(50..52));
    w.poll();
    w.append("b.lp", &lines(2..5));
    w.poll();
    assert_eq!(w.sorted(), sorted(&lines(0..5)));
}

#[test]
fn a_crash_before_a_commit_neither_loses_nor_repeats() {
    let mut w = World::new();
    w.append("a.lp", &lines(0..5));
    w.poll();
    w.append("a.lp", &lines(5..9));
    w.sink.crash_next = true;
    assert_eq!(w.tailer.poll(&mut w.sink), Err(SinkError::Stopped));
    w.restart();
    w.poll();
    assert_eq!(w.got(), lines(0..9));
}

#[test]
fn a_file_rotated_while_stopped_is_found_by_inode_and_finished() {
    let mut w = World::new();
    w.append("a.lp", &lines(0..5));
    w.poll();
    // Stopped; meanwhile the file grows, is rotated, and a new one starts.
    w.append("a.lp", &lines(5..8));
    fs::rename(w.path("a.lp"), w.path("a.lp-2026")).unwrap();
    w.append("a.lp", &lines(8..10));
    w.restart();
    w.poll();
    assert_eq!(w.sorted(), sorted(&lines(0..10)));
}

#[test]
fn a_file_truncated_while_stopped_is_read_again_from_zero() {
    let mut w = World::new();
    w.append("a.lp", &lines(0..5));
    w.poll();
    fs::write(w.path("a.lp"), lines(5..7)).unwrap();
    w.restart();
    w.poll();
    assert_eq!(w.got(), lines(0..7));
}

#[test]
fn from_beginning_false_skips_what_was_there_at_the_first_start_only() {
    let mut w = World::with(false);
    w.append("a.lp", &format!("{}m,src=t v=9", lines(0..5)));
    w.poll();
    assert!(w.sink.lines.is_empty());
    assert!(
        w.sink.checkpoint.is_some(),
        "the start position is committed"
    );
    w.append("a.lp", &format!("i 9\n{}", lines(5..7)));
    w.restart();
    w.poll();
    // Reading starts after the last whole line: the unfinished one is read
    // once finished.
    let v9 = "m,src=t v=9i 9\n".to_string();
    assert_eq!(w.got(), v9.clone() + &lines(5..7));
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 0);
    w.append("b.lp", &lines(7..9));
    w.poll();
    assert_eq!(w.got(), v9 + &lines(5..9));
}

#[test]
fn from_beginning_false_never_starts_inside_a_string() {
    let mut w = World::with(false);
    let p = multi_line(7);
    let cut = p.find("\\\"end").unwrap();
    w.append("a.lp", &format!("{}{}", lines(0..2), &p[..cut]));
    w.poll();
    assert!(w.sink.lines.is_empty());
    w.append("a.lp", &p[cut..]);
    w.poll();
    assert_eq!(w.got(), p);
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 0);

    // Past an over-long line, whole points and an open string, the start is
    // just before the open string.
    let mut w = World::with(false);
    let open = "m,src=t s=\"open\nm,src=t v=1i 1\n";
    w.append(
        "a.lp",
        &format!(
            "{}{}\n{}{}{open}",
            lines(0..2),
            "x".repeat(MAX_LINE + 10),
            multi_line(5),
            lines(6..8)
        ),
    );
    w.poll();
    assert!(w.sink.lines.is_empty());
    w.append("a.lp", "end\",v=9i 9\n");
    w.poll();
    assert_eq!(w.got(), format!("{open}end\",v=9i 9\n"));
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 0);
}

#[test]
fn a_line_longer_than_the_limit_is_skipped_with_its_end() {
    let mut w = World::new();
    w.append("a.lp", &line(1));
    let long = "x".repeat(MAX_LINE + 10);
    w.append("a.lp", &long);
    w.poll();
    w.append("a.lp", &format!("tail of the long line\n{}", line(2)));
    w.poll();
    assert_eq!(w.got(), lines(1..3));
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 1);
}

#[test]
fn a_small_budget_splits_reads_and_too_large_writes_are_halved() {
    let mut w = World::new();
    w.sink.budget = Some(100);
    w.append("a.lp", &lines(0..200));
    w.poll();
    assert_eq!(w.got(), lines(0..200));
    assert!(w.sink.writes >= 7, "{} writes", w.sink.writes);
    let mut w = World::new();
    w.sink.max_payload = Some(2_000);
    w.append("a.lp", &lines(0..200));
    w.poll();
    assert_eq!(w.got(), lines(0..200));
}

#[test]
fn a_finished_rotated_file_gives_its_last_unterminated_line() {
    let mut w = World::new();
    w.append("a.lp", &format!("{}m,src=t v=7i 7", line(1)));
    w.poll();
    fs::rename(w.path("a.lp"), w.path("a.lp.1")).unwrap();
    w.poll();
    assert_eq!(w.got(), format!("{}m,src=t v=7i 7\n", line(1)));
}

#[test]
fn precision_applies_to_file_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path().join("m.lp"));
    c.precision = Precision::Seconds;
    let mut t = Tailer::new(c, status(), None);
    let mut sink = MemorySink::default();
    fs::write(dir.path().join("m.lp"), "m v=1 1700000000\n").unwrap();
    t.poll(&mut sink).unwrap();
    assert_eq!(sink.lines, vec!["m v=1 1700000000000000000".to_string()]);
}

/// Every third point holds newlines in a string value.
fn any_line(n: u64) -> String {
    if n.is_multiple_of(3) {
        multi_line(n)
    } else {
        line(n)
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` lines to file `f` (of 3), the last one possibly unfinished.
    Append {
        f: usize,
        n: u64,
        partial: bool,
    },
    RenameRotate {
        f: usize,
    },
    CopyTruncate {
        f: usize,
    },
    Poll,
    /// The next commit fails as a crash would; then a restart.
    Crash,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 1..6u64, any::<bool>()).prop_map(|(f, n, partial)| Op::Append { f, n, partial }),
        1 => (0..3usize).prop_map(|f| Op::RenameRotate { f }),
        1 => (0..3usize).prop_map(|f| Op::CopyTruncate { f }),
        3 => Just(Op::Poll),
        1 => Just(Op::Crash),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the rotations, crashes and restarts, every whole point
    /// written (every third one with newlines in a string value, and a half
    /// written one possibly cut inside it) is queued exactly once.
    #[test]
    fn every_line_is_queued_exactly_once(ops in proptest::collection::vec(op(), 1..40)) {
        let mut w = World::new();
        let mut next = 0u64;
        let mut written: Vec<String> = Vec::new();
        // Per file: the line whose first half is written.
        let mut pending: [Option<String>; 3] = [None, None, None];
        let mut rotated = 0;
        let name = |f: usize| format!("f{f}.lp");
        let half = |l: &str| l.len() / 2;
        // Writes the second half of file f's unfinished line.
        let finish = |w: &World, pending: &mut [Option<String>; 3], written: &mut Vec<String>, f: usize| {
            if let Some(l) = pending[f].take() {
                w.append(&name(f), &l[half(&l)..]);
                written.push(l.trim_end().to_string());
            }
        };
        for op in ops {
            match op {
                Op::Append { f, n, partial } => {
                    finish(&w, &mut pending, &mut written, f);
                    let mut text = String::new();
                    for _ in 0..n {
                        let l = any_line(next);
                        next += 1;
                        written.push(l.trim_end().to_string());
                        text += &l;
                    }
                    if partial {
                        let l = any_line(next);
                        next += 1;
                        text += &l[..half(&l)];
                        pending[f] = Some(l);
                    }
                    w.append(&name(f), &text);
                }
                Op::RenameRotate { f } => {
                    if w.path(&name(f)).exists() {
                        finish(&w, &mut pending, &mut written, f);
                        // A file created and rotated away between two polls
                        // is never seen by a poll-based follower.
                        w.poll();
                        rotated += 1;
                        fs::rename(w.path(&name(f)), w.path(&format!("{}.{rotated}", name(f)))).unwrap();
                    }
                }
                Op::CopyTruncate { f } => {
                    if w.path(&name(f)).exists() {
                        // Lines written after the last read would only be in
                        // the copy, which is not followed: read them first.
                        finish(&w, &mut pending, &mut written, f);
                        w.poll();
                        w.truncate(&name(f));
                    }
                }
                Op::Poll => w.poll(),
                Op::Crash => {
                    w.sink.crash_next = true;
                    let _ = w.tailer.poll(&mut w.sink);
                    w.sink.crash_next = false;
                    w.restart();
                }
                Op::Restart => w.restart(),
            }
        }
        for f in 0..3 {
            finish(&w, &mut pending, &mut written, f);
        }
        w.poll();
        w.poll();
        written.sort();
        prop_assert_eq!(w.sorted(), written);
    }
}

/// A link planted in a tailed directory (to a secret, say) is not read
/// unless links are followed; it is reported once, not at every poll.
#[test]
fn symbolic_links_are_not_followed_by_default() {
    let mut w = World::new();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    fs::write(&secret, format!("TOPSECRET\n{}", line(99))).unwrap();
    std::os::unix::fs::symlink(&secret, w.path("x.lp")).unwrap();
    w.append("a.lp", &line(1));
    for _ in 0..3 {
        w.poll();
    }
    assert_eq!(w.got(), line(1), "only the regular file is read");
    assert_eq!(w.status.errors.load(Ordering::Relaxed), 1, "reported once");
    assert_eq!(w.status.invalid_lines.load(Ordering::Relaxed), 0);
    let latest = w.status.detail.locked().latest_error.clone();
    assert!(
        latest.contains("x.lp") && latest.contains("symbolic link"),
        "{latest}"
    );
    assert!(!latest.contains("TOPSECRET"), "{latest}");

    // With follow_symlinks, the same link is read like a file.
    let mut c = cfg(w.dir.path().join("*.lp"));
    c.follow_symlinks = true;
    let status = status();
    let mut tailer = Tailer::new(c, status.clone(), None);
    let mut sink = crate::source::testing::MemorySink::default();
    tailer.poll(&mut sink).unwrap();
    assert_eq!(sink.lines.len(), 2, "{:?}", sink.lines);
    assert_eq!(status.invalid_lines.load(Ordering::Relaxed), 1);
}

/// A link anywhere below the pattern's fixed directories counts: a
/// directory link matched by `*/` leads elsewhere just as well. Links among
/// the directories the operator wrote out are the operator's and are fine.
#[test]
fn links_are_looked_for_below_the_patterns_fixed_part() {
    let root = tempfile::tempdir().unwrap();
    let real = root.path().join("real");
    fs::create_dir_all(real.join("d")).unwrap();
    fs::write(real.join("d/a.lp"), line(1)).unwrap();
    let outside = root.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("b.lp"), line(2)).unwrap();
    std::os::unix::fs::symlink(&outside, real.join("e")).unwrap();
    // The operator's own link to the tailed tree.
    let named = root.path().join("named");
    std::os::unix::fs::symlink(&real, &named).unwrap();

    let pattern = named.join("*/*.lp");
    let fixed = fixed_components(&pattern);
    assert_eq!(link_below(&named.join("d/a.lp"), fixed), None);
    assert_eq!(
        link_below(&named.join("e/b.lp"), fixed),
        Some(named.join("e"))
    );
    // A literal path: only its last component is checked.
    let literal = named.join("d/a.lp");
    assert_eq!(link_below(&literal, fixed_components(&literal)), None);
    std::os::unix::fs::symlink(outside.join("b.lp"), real.join("d/c.lp")).unwrap();
    let literal = named.join("d/c.lp");
    assert_eq!(
        link_below(&literal, fixed_components(&literal)),
        Some(literal.clone())
    );

    let status = status();
    let mut tailer = Tailer::new(cfg(pattern), status.clone(), None);
    let mut sink = crate::source::testing::MemorySink::default();
    tailer.poll(&mut sink).unwrap();
    assert_eq!(sink.lines, vec![line(1).trim_end().to_string()]);
    assert_eq!(
        status.errors.load(Ordering::Relaxed),
        2,
        "e/b.lp and d/c.lp"
    );
}
