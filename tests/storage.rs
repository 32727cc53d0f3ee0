//! The queue's storage going wrong under the agent: an entry damaged on disk,
//! a data_dir that is damaged or not ours, and a disk that fills up.
//!
//! The promises: a damaged entry is set aside, counted and logged while the
//! stream goes on; a data_dir the agent cannot use stops it at start with one
//! clear line and exit code 1, never a panic or a signal; a full disk refuses
//! writes with 507 and a clear message, keeps everything already queued, and
//! takes writes again as soon as there is room.

mod util;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use util::*;

fn retry_later() -> (u16, String) {
    (
        503,
        r#"{"code":"unavailable","message":"try later"}"#.to_string(),
    )
}

/// Sets every occurrence of `needle` in `file` to `replacement` (same
/// length); returns how many were changed.
fn patch_bytes(file: &Path, needle: &[u8], replacement: &[u8]) -> usize {
    assert_eq!(needle.len(), replacement.len());
    let mut data = fs::read(file).unwrap();
    let mut n = 0;
    let mut i = 0;
    while let Some(k) = memchr::memmem::find(&data[i..], needle) {
        let at = i + k;
        data[at..at + needle.len()].copy_from_slice(replacement);
        n += 1;
        i = at + needle.len();
    }
    fs::write(file, data).unwrap();
    n
}

#[test]
fn a_damaged_entry_is_set_aside_counted_and_logged_and_the_stream_goes_on() {
    let sink = Sink::start(|_| retry_later());
    let config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    let mut agent = Agent::start(config);
    let base = ts_ago(Duration::from_secs(600));
    let before = lines("good", 4, 100, base);
    let damaged: String = (0..50)
        .map(|i| format!("bad,k=v marker=\"rot-here-{i:03}\" {}\n", base + i))
        .collect();
    let after = lines("good", 4, 100, base + 1_000_000_000);
    for body in [&before, &damaged, &after] {
        let (status, text) = agent.write_v2("b", body, &Opts::new());
        assert_eq!(status, 204, "{text}");
    }
    assert_eq!(agent.sigterm_and_wait().code(), Some(0));

    // Bit rot in the middle entry's payload: LMDB cannot notice, the CRC must.
    let mdb = agent.data_dir().join("queue/data.mdb");
    let hits = patch_bytes(&mdb, b"rot-here-017", b"rot-HERE-017");
    assert!(hits >= 1, "marker not found in {}", mdb.display());

    sink.set_handler(|_| (204, String::new()));
    agent.restart();
    wait_until(DEADLINE, "queue drained past the damaged entry", || {
        let rep = agent.replication("r1");
        assert_conserved(&rep);
        field(&rep, "remainingLines") == 0
    });
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "deadLetteredLines"), 50, "{rep:#}");
    assert_eq!(field(&rep, "deliveredLines"), 200, "{rep:#}");
    let log = agent.log();
    assert!(
        log.contains("failed its checksum; 50 lines set aside"),
        "the set-aside is logged:\n{log}"
    );
    let sent: Vec<Vec<u8>> = sink.lines_accepted();
    assert_eq!(sent.len(), 200);
    assert!(sent.iter().all(|l| l.starts_with(b"good,")));

    // Listed for inspection, not replayable.
    let out = agent.cli(&["dead-letter", "list", "--json", "--replication", "r1"]);
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = list["deadLetters"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{list:#}");
    assert_eq!(records[0]["replayable"], false, "{list:#}");
    assert!(
        records[0]["reason"]
            .as_str()
            .unwrap()
            .contains("crc mismatch"),
        "{list:#}"
    );

    // The stream goes on.
    let more = lines("later", 2, 10, base + 2_000_000_000);
    assert_eq!(agent.write_v2("b", &more, &Opts::new()).0, 204);
    wait_eq(DEADLINE, "later lines delivered", 210, || {
        field(&agent.replication("r1"), "deliveredLines")
    });
}

// ---------------------------------------------------------------------------
// A data_dir the agent cannot use
// ---------------------------------------------------------------------------

/// Writes a config for `data_dir` and runs the agent; it must stop at once
/// with exit code 1 and one clear line naming `expect`, without a panic.
fn refuses_data_dir(case: &str, dir: &Path, data_dir: &Path, expect: &[&str]) {
    let port = free_port();
    let config = AgentConfig::single(
        RemoteConfig::v2("r", &format!("http://127.0.0.1:{}", free_port())),
        "b",
        None,
    );
    let path = dir.join(format!("{case}.toml"));
    fs::write(&path, config.render(data_dir, &format!("127.0.0.1:{port}"))).unwrap();
    let out = run_cli(&["run", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        None,
        "{case}: killed by a signal ({}):\n{stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(1), "{case}: exit code:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{case}: panicked:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("fatal"))
        .collect();
    assert_eq!(errors.len(), 1, "{case}: one error line:\n{stderr}");
    eprintln!("{case}: {}", errors[0]);
    for e in expect {
        assert!(
            errors[0].contains(e),
            "{case}: the error names {e:?}:\n{stderr}"
        );
    }
}

/// A data_dir with a real queue in it (a few entries, cleanly stopped).
fn used_data_dir() -> (TempDirGuard, PathBuf) {
    let closed = closed_port();
    let config = AgentConfig::single(RemoteConfig::v2("down", &closed.url()), "b", None);
    let mut agent = Agent::start(config);
    for i in 0..20 {
        let body = lines("used", 3, 200, ts_ago(Duration::from_secs(60)) + i);
        assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 204);
    }
    agent.sigterm_and_wait();
    let copy = tempfile::tempdir().unwrap();
    let data = copy.path().join("data");
    let status = Command::new("cp")
        .arg("-a")
        .arg(agent.data_dir())
        .arg(&data)
        .status()
        .unwrap();
    assert!(status.success());
    (TempDirGuard(copy), data)
}

struct TempDirGuard(#[allow(dead_code)] tempfile::TempDir);

#[test]
fn a_damaged_or_foreign_data_dir_stops_the_agent_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // Not a directory at all.
    let file = t.join("a-file");
    fs::write(&file, "not a directory\n").unwrap();
    refuses_data_dir("data_dir is a file", t, &file, &["a-file"]);

    // queue/ is a file.
    let d = t.join("queue-is-file");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("queue"), "x").unwrap();
    refuses_data_dir("queue is a file", t, &d, &["queue-is-file"]);

    // A small foreign file where the queue should be.
    let d = t.join("small-foreign");
    fs::create_dir_all(d.join("queue")).unwrap();
    fs::write(d.join("queue/data.mdb"), "hello, world\n").unwrap();
    refuses_data_dir("small foreign data.mdb", t, &d, &["data.mdb"]);

    // A large foreign file.
    let d = t.join("large-foreign");
    fs::create_dir_all(d.join("queue")).unwrap();
    let noise: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(d.join("queue/data.mdb"), &noise).unwrap();
    refuses_data_dir("large foreign data.mdb", t, &d, &["queue"]);

    // data.mdb is a directory.
    let d = t.join("mdb-dir");
    fs::create_dir_all(d.join("queue/data.mdb")).unwrap();
    refuses_data_dir("data.mdb is a directory", t, &d, &["queue"]);

    // A real queue whose two meta pages were wiped.
    let (_g1, d) = used_data_dir();
    let mdb = d.join("queue/data.mdb");
    let mut data = fs::read(&mdb).unwrap();
    data[..8192].fill(0);
    fs::write(&mdb, &data).unwrap();
    refuses_data_dir("meta pages wiped", t, &d, &["queue"]);

    // A real queue whose tree pages are noise (a bad storage medium).
    let (_g3, d) = used_data_dir();
    let mdb = d.join("queue/data.mdb");
    let mut data = fs::read(&mdb).unwrap();
    for (i, b) in data.iter_mut().enumerate().skip(8192) {
        *b = ((i as u32).wrapping_mul(2654435761) >> 11) as u8;
    }
    fs::write(&mdb, &data).unwrap();
    refuses_data_dir("tree pages are noise", t, &d, &["queue"]);

    // A real queue cut short (a copy that did not finish).
    let (_g2, d) = used_data_dir();
    let mdb = d.join("queue/data.mdb");
    let len = fs::metadata(&mdb).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&mdb)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    refuses_data_dir("truncated data.mdb", t, &d, &["data.mdb", "truncated"]);

    // Another program's LMDB environment, with its own use of the names.
    let d = t.join("other-lmdb");
    fs::create_dir_all(d.join("queue")).unwrap();
    {
        let env = unsafe {
            heed::EnvOpenOptions::new()
                .map_size(16 << 20)
                .max_dbs(4)
                .open(d.join("queue"))
        }
        .unwrap();
        let mut wtxn = env.write_txn().unwrap();
        let main: heed::Database<heed::types::Bytes, heed::types::Bytes> =
            env.create_database(&mut wtxn, None).unwrap();
        main.put(&mut wtxn, b"entries", b"not a database").unwrap();
        wtxn.commit().unwrap();
    }
    refuses_data_dir("another program's LMDB", t, &d, &["queue"]);
}

// ---------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------

/// A tmpfs of `size` mounted for one test; unmounted on drop. `None` (after
/// a loud SKIP line) where mounting is not allowed (not root, a container
/// without the capability).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::Builder::new().prefix("tmpfs-").tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "\n*** SKIP: cannot mount a tmpfs ({}); the disk-full test needs root ***\n",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("\n*** SKIP: cannot run mount ({e}) ***\n");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_disk_refuses_writes_with_507_keeps_the_queue_and_recovers() {
    let Some(fs_) = Tmpfs::mount("40m") else {
        return;
    };
    let sink = Sink::start(|_| retry_later());
    let config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    let mut agent = Agent::stopped(config);
    let data_dir = fs_.path().join("data");
    let launch = Launch::new().insert_after(
        "shutdown_timeout = \"10s\"",
        &format!("data_dir = {}\n", toml_str(&data_dir.display().to_string())),
    );
    // The rendered data_dir comes first in the file; the inserted one would
    // be a duplicate key, so drop the rendered one.
    let rendered = format!(
        "data_dir = {}",
        toml_str(&agent.data_dir().display().to_string())
    );
    let launch = launch.remove_line(&rendered);
    agent.write_config_with(&launch);
    agent.spawn_with(&launch);
    // Another program fills the disk, leaving a little room.
    let ballast = fs_.path().join("ballast");
    let free = || {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(fs_.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let room = 6 << 20;
    fs::write(&ballast, vec![7u8; (free() - room) as usize]).unwrap();

    let base = ts_ago(Duration::from_secs(3600));
    let mut acked: Vec<String> = Vec::new();
    let mut refused = None;
    // Lines are compressed when queued (about 10:1 here), so it takes a
    // few hundred writes to fill the room left.
    for i in 0..2000 {
        let body = lines("full", 10, 1500, base + i * 10_000_000_000);
        let r = agent.write_v2_reply("b", body.as_bytes(), &Opts::shape(i as usize));
        match r.status {
            204 => acked.extend(body.lines().map(String::from)),
            507 => {
                refused = Some(r);
                break;
            }
            other => panic!("write {i}: unexpected {other}: {}", r.body),
        }
    }
    let r = refused.expect("the disk never filled up");
    eprintln!(
        "disk full after {} acknowledged lines: {} {}",
        acked.len(),
        r.status,
        r.body
    );
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("queue storage is full") && message.contains("disk full"),
        "{message}"
    );
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(agent.get("/health").status, 200);
    let rep = agent.replication("r1");
    assert_conserved(&rep);
    assert_eq!(field(&rep, "acceptedLines"), acked.len() as u64, "{rep:#}");
    // Still full: still refused, never half taken.
    let body = lines("full", 10, 1500, base - 1_000_000_000);
    assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 507);
    assert_eq!(
        field(&agent.replication("r1"), "acceptedLines"),
        acked.len() as u64
    );

    // A crash and restart on the full disk: the queue opens, nothing lost.
    agent.kill9();
    agent.spawn_with(&launch);
    let rep = agent.replication("r1");
    assert_conserved(&rep);
    assert_eq!(field(&rep, "acceptedLines"), acked.len() as u64, "{rep:#}");
    assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 507);

    // Space returns: writes are taken again at once.
    fs::remove_file(&ballast).unwrap();
    let more = lines("full", 10, 1500, base - 2_000_000_000);
    let (status, text) = agent.write_v2("b", &more, &Opts::new());
    assert_eq!(status, 204, "{text}");
    acked.extend(more.lines().map(String::from));

    // And everything acknowledged reaches the remote once it is back.
    sink.set_handler(|_| (204, String::new()));
    wait_until(DEADLINE, "queue drained", || {
        field(&agent.replication("r1"), "remainingLines") == 0
    });
    let sent: std::collections::HashSet<Vec<u8>> = sink.lines_accepted().into_iter().collect();
    let missing = acked
        .iter()
        .filter(|l| !sent.contains(l.as_bytes()))
        .count();
    assert_eq!(missing, 0, "{missing} acknowledged lines never delivered");
    let log = agent.log();
    assert!(log.contains("queue storage is full"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(agent.sigterm_and_wait().code(), Some(0));
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused_and_the_first_goes_on() {
    let sink = Sink::accept_all();
    let config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    let first = Agent::start(config.clone());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("second.toml");
    fs::write(
        &path,
        config.render(&first.data_dir(), &format!("127.0.0.1:{}", free_port())),
    )
    .unwrap();
    let out = run_cli(&["run", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is in use by another edge-replicator process"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let body = lines("first", 2, 10, ts_ago(Duration::from_secs(60)));
    assert_eq!(first.write_v2("b", &body, &Opts::new()).0, 204);
    wait_eq(DEADLINE, "delivered by the first agent", 10, || {
        field(&first.replication("r1"), "deliveredLines")
    });
}

/// The lines of `tests/fixtures/previous-release` (see its README).
#[cfg(target_pointer_width = "64")]
fn previous_release_lines() -> Vec<String> {
    let ts = 1_764_000_000_000_000_000i64;
    let small = (0..50).map(|i| format!("upgrade,src=small,n={i} v={i}i {}", ts + i));
    let large = (0..4_000).map(|i| {
        format!(
            "upgrade,src=large,s=s{} v={i}i,msg=\"line {i} of a write large enough to be compressed when queued\" {}",
            i % 40,
            ts + i
        )
    });
    let v1 = (0..30).map(|i| format!("upgrade,src=v1 v={i} {}", ts + i));
    small.chain(large).chain(v1).collect()
}

/// A data_dir written by the previous release's own binary (plain and
/// compressed entries, a retention policy, the remote down) opens with this
/// release and drains: every line delivered once, to its own bucket.
///
/// The fixture was made on x86_64; LMDB's file format follows the word
/// size, so it opens on 64-bit targets only (an upgrade happens on the
/// device that wrote the queue, with the same word size).
#[cfg(target_pointer_width = "64")]
#[test]
fn a_data_dir_of_the_previous_release_drains_exactly() {
    let sink = Sink::accept_all();
    let config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "*", None);
    let mut agent = Agent::stopped(config);
    let queue = agent.data_dir().join("queue");
    fs::create_dir_all(&queue).unwrap();
    let fixture = repo_root().join("tests/fixtures/previous-release/queue/data.mdb");
    fs::copy(&fixture, queue.join("data.mdb")).unwrap();
    agent.write_config();
    agent.restart();
    let rep = agent.wait_drained("r1");
    let expected = previous_release_lines();
    assert_eq!(
        field(&rep, "deliveredLines"),
        expected.len() as u64,
        "{rep:#}"
    );
    let mut got: Vec<String> = sink
        .lines_accepted()
        .into_iter()
        .map(|l| String::from_utf8(l).unwrap())
        .collect();
    got.sort();
    let mut want = expected;
    want.sort();
    assert_eq!(got.len(), want.len(), "a line missing or sent twice");
    assert!(got == want, "the lines delivered are not those written");
    let buckets: std::collections::BTreeSet<String> = sink
        .requests()
        .iter()
        .filter_map(|r| {
            r.target
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("bucket="))
                .map(str::to_string)
        })
        .collect();
    assert!(
        buckets.contains("a") && buckets.contains("b"),
        "{buckets:?}"
    );
}
