//! systemd integration for `Type=notify` units: READY=1 once the API
//! listens, STOPPING=1 when shutdown begins, and watchdog pings while the
//! agent is healthy. Outside systemd (no `NOTIFY_SOCKET`) every call is a
//! no-op, and without `WatchdogSec=` (no `WATCHDOG_USEC`) no thread starts.
//!
//! The watchdog is a liveness check, not a timer: a ping is sent only while
//! every shipping worker and the queue writer make progress, so a hung thread
//! stops the pings and systemd restarts the service. What counts as progress:
//!
//! - a worker beats ([`Control::beat`]) at least once per loop and before each
//!   wait, and again each time a POST's body makes progress; a wait lasts
//!   at most its remote's `max_backoff`, and a POST goes at most
//!   `connect_timeout` + 2 × `stall_timeout` + `timeout` without progress
//!   (a socket write's timer restarts with each write call, so a stall is
//!   noticed within one to two `stall_timeout`s). A worker whose beat has
//!   not changed for longer than that plus [`MARGIN`] is stuck.
//! - the queue writer answers a probe (an append to no replication, which
//!   writes nothing) within [`WRITER_LIMIT`]. Every write waits on the
//!   writer, so a writer that stops answering stops the whole agent.
//!
//! Beats are wall-clock seconds, but they are only compared with the value
//! seen last time; how long a value has stayed the same is measured on the
//! monotonic clock. A Raspberry Pi without a real-time clock jumps years
//! forward when NTP first syncs, and that must not look like a stuck worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use sd_notify::NotifyState;
use tokio::sync::oneshot::error::TryRecvError;

use crate::config::Remote;
use crate::queue::{Queue, QueueError};
use crate::ship::Control;

/// Slack on top of a worker's longest legitimate silence (scheduling, gzip
/// of a large batch on a slow CPU, a settle waiting for a group commit).
pub const MARGIN: Duration = Duration::from_secs(60);

/// How long the queue writer may take to answer a probe. A commit waits for
/// fsync; on a healthy SD card that is milliseconds to seconds.
pub const WRITER_LIMIT: Duration = Duration::from_secs(60);

/// Tells systemd the agent is ready, with a one-line status for
/// `systemctl status`.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd that shutdown has begun (the watchdog no longer applies).
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn notify(states: &[NotifyState]) {
    // Said once: a watchdog ping that fails fails again every few seconds.
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!("cannot notify systemd: {e}");
        }
    }
}

/// The longest a worker shipping to `remote` may go without a beat.
pub fn stuck_limit(remote: &Remote) -> Duration {
    remote.max_backoff + remote.connect_timeout + 2 * remote.stall_timeout + remote.timeout + MARGIN
}

/// A shipping worker as the watchdog sees it.
pub struct Watch {
    pub name: String,
    pub control: Arc<Control>,
    /// How long it may go without a beat ([`stuck_limit`] of its remote).
    pub limit: Duration,
}

impl Watch {
    pub fn new(name: &str, control: &Arc<Control>, remote: Option<&Remote>) -> Watch {
        Watch {
            name: name.to_owned(),
            control: control.clone(),
            limit: remote.map_or(MARGIN, stuck_limit),
        }
    }
}

/// The last beat seen from a worker and since when it has not changed.
struct Seen {
    control: Arc<Control>,
    beat: u64,
    since: Instant,
}

type Probe = tokio::sync::oneshot::Receiver<Result<(), QueueError>>;

/// The health check behind the pings, separate from the pinging thread so
/// that tests can drive it with their own clock.
pub struct Checker {
    queue: Arc<Queue>,
    seen: HashMap<String, Seen>,
    probe: Option<(Probe, Instant)>,
    writer_limit: Duration,
}

impl Checker {
    pub fn new(queue: Arc<Queue>) -> Checker {
        Checker {
            queue,
            seen: HashMap::new(),
            probe: None,
            writer_limit: WRITER_LIMIT,
        }
    }

    /// What is wrong at `now` with the queue writer and `workers` (the ones
    /// running now: a reload adds and removes some), one phrase per stuck
    /// thread; empty when healthy. Sends a new writer probe once the last
    /// one was answered.
    pub fn check(&mut self, workers: Vec<Watch>, now: Instant) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = HashMap::with_capacity(workers.len());
        for w in workers {
            let beat = w.control.last_beat();
            let since = match self.seen.remove(&w.name) {
                // The same worker (a restarted one has a new control) and
                // the same beat: no progress since then.
                Some(s) if Arc::ptr_eq(&s.control, &w.control) && s.beat == beat => s.since,
                _ => now,
            };
            let silent = now.duration_since(since);
            if silent > w.limit {
                problems.push(format!(
                    "shipping worker of replication \"{}\" has made no progress for {}s",
                    w.name,
                    silent.as_secs()
                ));
            }
            seen.insert(
                w.name,
                Seen {
                    control: w.control,
                    beat,
                    since,
                },
            );
        }
        self.seen = seen;
        if let Some((rx, sent)) = &mut self.probe {
            match rx.try_recv() {
                Ok(Err(QueueError::Closed)) | Err(TryRecvError::Closed) => {
                    problems.push("queue writer has stopped".into());
                    self.probe = None;
                }
                // Any other answer, even an error, shows the writer is looping.
                Ok(_) => self.probe = None,
                Err(TryRecvError::Empty) => {
                    let waited = now.duration_since(*sent);
                    if waited > self.writer_limit {
                        problems.push(format!(
                            "queue writer has not answered for {}s",
                            waited.as_secs()
                        ));
                    }
                }
            }
        }
        if self.probe.is_none() {
            self.probe = Some((
                self.queue.append(Vec::new(), String::new(), Vec::new(), 0),
                now,
            ));
        }
        problems
    }
}

/// The pinging thread; stops when dropped.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts pinging at half of `WATCHDOG_USEC` when systemd asked for a
    /// watchdog; `None` otherwise. `workers` lists the shipping workers
    /// running at the moment it is called.
    pub fn start<F>(queue: &Arc<Queue>, mut workers: F) -> Option<Watchdog>
    where
        F: FnMut() -> Vec<Watch> + Send + 'static,
    {
        let timeout = sd_notify::watchdog_enabled()?;
        let interval = (timeout / 2).max(Duration::from_millis(100));
        let mut checker = Checker::new(queue.clone());
        let (stop, stopped) = mpsc::channel::<()>();
        let spawned = thread::Builder::new().name("watchdog".into()).spawn(move || {
            let mut healthy = true;
            loop {
                let problems = checker.check(workers(), Instant::now());
                if problems.is_empty() {
                    if !healthy {
                        info!("watchdog: every worker makes progress again; pinging systemd again");
                    }
                    notify(&[NotifyState::Watchdog]);
                } else if healthy {
                    error!(
                        "watchdog: {}; no more pings, so systemd restarts the service within {}s",
                        problems.join("; "),
                        timeout.as_secs()
                    );
                }
                healthy = problems.is_empty();
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        match spawned {
            Ok(thread) => {
                info!(
                    "systemd watchdog: {}s, pinging every {} ms",
                    timeout.as_secs(),
                    interval.as_millis()
                );
                Some(Watchdog {
                    stop: Some(stop),
                    thread: Some(thread),
                })
            }
            Err(e) => {
                // Without pings systemd restarts us; say why.
                error!("cannot start the watchdog thread: {e}");
                None
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::queue::{QueueOptions, ReplSpec};

    const CONFIG: &str = r#"
data_dir = "/nonexistent"
[[remote]]
name = "fast"
url = "http://127.0.0.1:1"
timeout = "5s"
connect_timeout = "2s"
stall_timeout = "3s"
max_backoff = "30s"
[[remote]]
name = "slow"
url = "http://127.0.0.1:2"
[[replication]]
name = "a"
remote = "fast"
local_bucket = "a"
[[replication]]
name = "b"
remote = "slow"
local_bucket = "b"
"#;

    struct Setup {
        _dir: tempfile::TempDir,
        config: Config,
        queue: Arc<Queue>,
        controls: Vec<Arc<Control>>,
    }

    impl Setup {
        fn new() -> Setup {
            let config = parse(CONFIG);
            let dir = tempfile::tempdir().unwrap();
            let specs: Vec<ReplSpec> = config.replications.iter().map(crate::agent::spec).collect();
            let opts = QueueOptions {
                map_size: 16 << 20,
                durability: config.queue.durability,
                commit_interval: Duration::from_millis(1),
            };
            let queue = Arc::new(Queue::open(dir.path(), &opts, &specs).unwrap());
            let controls = config
                .replications
                .iter()
                .map(|_| Arc::new(Control::default()))
                .collect();
            Setup {
                _dir: dir,
                config,
                queue,
                controls,
            }
        }

        fn watches(&self) -> Vec<Watch> {
            self.config
                .replications
                .iter()
                .zip(&self.controls)
                .map(|(r, c)| Watch::new(&r.name, c, self.config.remote(&r.remote)))
                .collect()
        }

        fn limit(&self, remote: &str) -> Duration {
            stuck_limit(self.config.remote(remote).unwrap())
        }
    }

    fn parse(text: &str) -> Config {
        crate::config::parse(text, std::path::Path::new("/"), &|_| None)
            .expect("test config is valid")
    }

    /// As a worker's beat. Wall-clock seconds do not move within a test
    /// second, so the test also moves the value the checker saw last.
    fn progress(c: &mut Checker, name: &str) {
        let s = c.seen.get_mut(name).expect("worker seen before");
        s.control.beat();
        s.beat = s.control.last_beat().wrapping_sub(1);
    }

    /// Checks once the writer has answered the probe sent by the previous check.
    fn settled_check(c: &mut Checker, workers: Vec<Watch>, now: Instant) -> Vec<String> {
        for _ in 0..1000 {
            let waiting = match &mut c.probe {
                Some((rx, _)) => matches!(rx.try_recv(), Err(TryRecvError::Empty)),
                None => false,
            };
            if !waiting {
                c.probe = None;
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        c.check(workers, now)
    }

    #[test]
    fn limit_covers_the_longest_wait_and_post() {
        let s = Setup::new();
        // A write may stall for up to two stall_timeouts before it fails.
        assert_eq!(
            s.limit("fast"),
            Duration::from_secs(30 + 2 + 2 * 3 + 5) + MARGIN
        );
        // Defaults: 5 min backoff, a 30 s answer and 2 x 10 s of a stalling
        // write, plus the connect timeout.
        assert!(s.limit("slow") >= Duration::from_secs(300 + 30 + 20) + MARGIN);
        assert_eq!(Watch::new("x", &s.controls[0], None).limit, MARGIN);
    }

    #[test]
    fn healthy_while_workers_beat_and_the_writer_answers() {
        let s = Setup::new();
        let t0 = Instant::now();
        let mut c = Checker::new(s.queue.clone());
        assert!(c.check(s.watches(), t0).is_empty());
        // Beats that change keep a worker alive however much time passes.
        for minutes in 1..=30u64 {
            progress(&mut c, "a");
            progress(&mut c, "b");
            let problems =
                settled_check(&mut c, s.watches(), t0 + Duration::from_secs(minutes * 60));
            assert!(problems.is_empty(), "{problems:?}");
        }
    }

    #[test]
    fn a_worker_without_progress_past_its_limit_is_stuck() {
        let s = Setup::new();
        let t0 = Instant::now();
        let (fast, slow) = (s.limit("fast"), s.limit("slow"));
        let mut c = Checker::new(s.queue.clone());
        assert!(c.check(s.watches(), t0).is_empty());
        assert!(settled_check(&mut c, s.watches(), t0 + fast).is_empty());
        // Only "a" (the fast remote) is past its limit; "b" keeps the same
        // beat but may still be inside a long backoff.
        let problems = settled_check(&mut c, s.watches(), t0 + fast + Duration::from_secs(1));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("replication \"a\""), "{problems:?}");
        let problems = settled_check(&mut c, s.watches(), t0 + slow + Duration::from_secs(1));
        assert_eq!(problems.len(), 2, "{problems:?}");
        // A beat is progress.
        progress(&mut c, "a");
        progress(&mut c, "b");
        assert!(settled_check(&mut c, s.watches(), t0 + slow + Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn workers_added_or_restarted_by_a_reload_start_afresh() {
        let s = Setup::new();
        let t0 = Instant::now();
        let fast = s.limit("fast");
        let mut c = Checker::new(s.queue.clone());
        // Only "a" runs at first.
        let only_a = || s.watches().into_iter().take(1).collect::<Vec<_>>();
        assert!(c.check(only_a(), t0).is_empty());
        let late = t0 + fast + Duration::from_secs(1);
        assert_eq!(settled_check(&mut c, only_a(), late).len(), 1);
        // "a" restarted with a new control, "b" added: neither is stuck yet,
        // whatever their beats say.
        let mut watches = s.watches();
        watches[0].control = Arc::new(Control::default());
        let restarted = watches[0].control.clone();
        assert!(settled_check(&mut c, watches, late).is_empty());
        // Removed workers are forgotten.
        let watches = vec![Watch::new("a", &restarted, s.config.remote("fast"))];
        assert!(settled_check(&mut c, watches, late + Duration::from_secs(1)).is_empty());
        assert_eq!(c.seen.len(), 1);
    }

    #[test]
    fn a_writer_that_stopped_or_hangs_is_reported() {
        let s = Setup::new();
        let t0 = Instant::now();
        let mut c = Checker::new(s.queue.clone());
        assert!(settled_check(&mut c, Vec::new(), t0).is_empty());
        // An unanswered probe is fine until the limit.
        let (tx, rx) = tokio::sync::oneshot::channel();
        c.probe = Some((rx, t0));
        assert!(c.check(Vec::new(), t0 + WRITER_LIMIT).is_empty());
        let problems = c.check(Vec::new(), t0 + WRITER_LIMIT + Duration::from_secs(1));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("queue writer has not answered")),
            "{problems:?}"
        );
        drop(tx);
        let problems = c.check(Vec::new(), t0 + WRITER_LIMIT + Duration::from_secs(2));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("queue writer has stopped")),
            "{problems:?}"
        );
        // After the queue closed, the next probe finds the writer gone.
        s.queue.close();
        let t = t0 + WRITER_LIMIT + Duration::from_secs(3);
        let problems = [c.check(Vec::new(), t), c.check(Vec::new(), t)].concat();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("queue writer has stopped")),
            "{problems:?}"
        );
    }

    #[test]
    fn outside_systemd_nothing_happens() {
        if std::env::var_os("NOTIFY_SOCKET").is_none()
            && std::env::var_os("WATCHDOG_USEC").is_none()
        {
            let s = Setup::new();
            ready("test");
            stopping();
            assert!(Watchdog::start(&s.queue, Vec::new).is_none());
        }
    }
}
