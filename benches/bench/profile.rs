//! Where the agent's ingest time goes: the agent under `perf record` while
//! `hey` posts each mix (remote down), a flame graph per mix in
//! `target/bench/flame-<mix>.svg` (inferno), and the share of the samples
//! spent in each stage: HTTP, parse and normalise, compress, commit.
//!
//! `make profile` builds the agent with its symbols (the release profile
//! strips them) and runs this phase on it (`BENCH_AGENT`). The stages are
//! read off the stack of each sample, innermost match first, so time in the
//! kernel counts for the stage that called it (an fsync for the commit).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use super::{write_url, Ctx, Who};
use crate::load;
use crate::procs;

/// The stages, and the frames (substrings of symbol names) that mark them.
/// A sample goes to the stage of its innermost marked frame; samples with
/// none go to [`RUNTIME`] if a frame of the runtime or the allocator is on
/// their stack (a memcpy inside the parser counts as parsing), else to
/// "other".
const STAGES: [(&str, &[&str]); 4] = [
    (
        "compress",
        &[
            "flate2::",
            "miniz_oxide::",
            "edge_replicator::deflate",
            "crc32fast::",
        ],
    ),
    (
        "commit (LMDB, fsync)",
        &[
            "heed::",
            "mdb_",
            "edge_replicator::queue::",
            "fdatasync",
            "fsync",
        ],
    ),
    ("parse and normalise", &["edge_replicator::lineproto"]),
    (
        "HTTP (hyper, body, routing)",
        &["hyper::", "edge_replicator::ingest::", "http::"],
    ),
];

/// The runtime and the allocator, for samples no stage claims.
const RUNTIME: (&str, &[&str]) = (
    "runtime and allocator",
    &[
        "tokio::", "malloc", "free", "realloc", "memcpy", "memmove", "std::",
    ],
);

/// Runs the phase; the markdown section for the results.
pub fn profile(ctx: &Ctx, out_dir: &Path) -> String {
    for tool in ["perf", "inferno-collapse-perf", "inferno-flamegraph"] {
        assert!(
            procs::have(tool),
            "{tool} is missing: `make profile` installs it"
        );
    }
    let mut md = String::from(
        "Where ingest time goes (`perf record`, remote down; share of the agent's samples):\n\n\
         | stage | ",
    );
    let mixes: Vec<_> = ctx.body_files.iter().collect();
    md += &mixes
        .iter()
        .map(|(m, _, _)| format!("{} mix", m.name()))
        .collect::<Vec<_>>()
        .join(" | ");
    md += " |\n| --- |";
    md += &" --- |".repeat(mixes.len());
    md += "\n";
    let mut shares: Vec<BTreeMap<&str, f64>> = Vec::new();
    for (mix, file, _) in &mixes {
        eprintln!("bench: profile, {} mix", mix.name());
        let dir = ctx.work.join("profile");
        let _ = fs::remove_dir_all(&dir);
        let (port, dead) = (procs::free_port(), procs::free_port());
        let (mut p, _) =
            Who::Ours.start(ctx, &dir, port, &format!("http://127.0.0.1:{dead}"), "5m");
        let data = dir.join("perf.data");
        let mut perf = Command::new("perf")
            .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
            .arg(&data)
            .args(["-p", &p.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start perf record");
        thread::sleep(Duration::from_millis(500));
        let h = load::hey(&write_url(port), file, ctx.sizes.requests, super::CLIENTS);
        eprintln!(
            "bench: profile, {} mix: {} requests in {:.1} s",
            mix.name(),
            h.ok,
            h.seconds
        );
        // perf writes its file when interrupted.
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
        p.stop(Duration::from_secs(60));
        let folded = dir.join("folded.txt");
        let collapsed = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "perf script -i '{}' 2>/dev/null | inferno-collapse-perf > '{}'",
                data.display(),
                folded.display()
            ))
            .status()
            .expect("perf script | inferno-collapse-perf");
        assert!(collapsed.success(), "collapsing the perf samples failed");
        let svg = out_dir.join(format!("flame-{}.svg", mix.name()));
        let drawn = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "inferno-flamegraph --title 'edge-replicator ingest, {} mix' < '{}' > '{}'",
                mix.name(),
                folded.display(),
                svg.display()
            ))
            .status()
            .expect("inferno-flamegraph");
        assert!(drawn.success(), "drawing the flame graph failed");
        let text = fs::read_to_string(&folded).unwrap_or_default();
        shares.push(stage_shares(&text));
        let _ = fs::remove_dir_all(&dir);
    }
    let names = STAGES.iter().map(|(n, _)| *n).chain([RUNTIME.0, "other"]);
    for name in names {
        md += &format!("| {name} |");
        for s in &shares {
            md += &format!(" {:.0} % |", s.get(name).copied().unwrap_or(0.0) * 100.0);
        }
        md += "\n";
    }
    md += "\nFlame graphs: `target/bench/flame-<mix>.svg`.\n";
    md
}

/// The share of samples per stage in folded stacks (`a;b;c 12` lines,
/// outermost frame first).
pub fn stage_shares(folded: &str) -> BTreeMap<&'static str, f64> {
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut total = 0u64;
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        total += n;
        let marked = |stages: &[(&'static str, &[&str])]| {
            stack.rsplit(';').find_map(|frame| {
                stages
                    .iter()
                    .find(|(_, marks)| marks.iter().any(|m| frame.contains(m)))
                    .map(|(name, _)| *name)
            })
        };
        let stage = marked(&STAGES)
            .or_else(|| marked(&[RUNTIME]))
            .unwrap_or("other");
        *counts.entry(stage).or_default() += n;
    }
    counts
        .into_iter()
        .map(|(k, v)| (k, v as f64 / total.max(1) as f64))
        .collect()
}

/// Checks the stage classification (run by `cargo test`, which starts the
/// bench without `--bench`).
pub fn self_check() {
    let folded = "\
main;edge_replicator::ingest::http::write;edge_replicator::lineproto::normalize_with;memcpy 6
main;edge_replicator::ingest::http::write;hyper::proto::h1::read 2
main;edge_replicator::queue::writer::run;mdb_txn_commit;fdatasync 1
main;tokio::runtime::park;epoll_wait 1
";
    let s = stage_shares(folded);
    // A memcpy inside the parser counts as parsing; the runtime only gets
    // what no stage claims.
    assert_eq!(s["parse and normalise"], 0.6);
    assert_eq!(s["HTTP (hyper, body, routing)"], 0.2);
    assert_eq!(s["commit (LMDB, fsync)"], 0.1);
    assert_eq!(s["runtime and allocator"], 0.1);
    assert!(!s.contains_key("other"));
}
