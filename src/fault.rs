//! Crash points for tests. In debug builds (the ones tests run),
//! `EDGE_REPLICATOR_CRASH_AT=<point>[:<n>]` aborts the process the n-th time
//! (default: the first) it passes `<point>`, as a power cut at exactly that
//! moment would. Release builds compile the points away.
//!
//! Points: `commit` (a queue transaction is about to commit), `committed`
//! (it committed, nobody has been answered yet), `commit-write` and
//! `committed-write` (the same, for a transaction that queues lines, not
//! one of the writer's housekeeping commits), `settle` (about to commit a
//! group that settles a shipped batch), `dead-letter` (about to commit a
//! group that moves lines to the dead-letter store), `checkpoint` (about to
//! commit a source checkpoint).

#[cfg(debug_assertions)]
pub fn point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let target = TARGET.get_or_init(|| {
        let spec = std::env::var("EDGE_REPLICATOR_CRASH_AT").ok()?;
        let (point, n) = match spec.split_once(':') {
            Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Some((point, n.max(1)))
    });
    if let Some((point, n)) = target {
        if point == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("crash point \"{name}\" reached (hit {n}): aborting");
            std::process::abort();
        }
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_name: &str) {}
