//! The running agent: opens the queue, starts one shipping worker per
//! replication and the HTTP API, and stops them in order on SIGTERM/SIGINT.
//!
//! Shutdown order keeps the promise "acknowledged means durable": first the
//! API stops accepting and lets requests in progress commit and answer, then
//! the workers stop, and last the queue writer commits what it holds and
//! exits. A POST in flight is not waited for beyond [`WORKER_GRACE`]: its
//! lines are in the queue and are sent again after the restart, while every
//! second spent waiting on a black-holed link is a second of refused writes.
//!
//! The agent serves a socket it is given ([`run`] takes a bound listener, as
//! a server that tests drive should): [`listener`] takes the one a service
//! manager hands over (systemd socket activation), else binds
//! `listen.address`. A socket held outside the agent keeps its port across
//! restarts, and connections that arrive meanwhile wait in its backlog
//! instead of being refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use tokio::net::TcpListener;

use crate::config::{self, Config, Remote, Replication};
use crate::ingest::{http, Ingest, Route, Routing};
use crate::queue::{Queue, QueueError, QueueOptions, ReplSpec};
use crate::ship::link::Link;
use crate::ship::{Client, Control, SharedTarget, ShipConfig, Target, Worker};
use crate::status::ReplStatus;
use crate::sync::{Locked, RwLocked};
use crate::transform::Transform;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The socket handed over by the service manager cannot be served.
    #[error("listening socket from the service manager (LISTEN_FDS): {0}")]
    Inherited(String),
    /// The socket is reachable from other hosts and no token guards it.
    #[error("listen.tokens: required when the write API listens on {0}, which is not loopback")]
    OpenSocket(SocketAddr),
    #[error("{0}")]
    Setup(String),
}

/// What the agent is told from outside while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Stop,
    Reload,
}

/// What the queue needs to know about a configured replication.
pub fn spec(r: &Replication) -> ReplSpec {
    ReplSpec {
        name: r.name.clone(),
        max_bytes: r.max_queue_size,
        when_full: r.when_full,
        max_age: r.max_age,
        transform: Transform::new(r).map(Arc::new),
    }
}

fn ship_config(r: &Replication, remote: &Remote) -> ShipConfig {
    ShipConfig {
        batch_size: r.batch_size as usize,
        gzip_level: r.gzip_level,
        remote_bucket: r.remote_bucket.clone().or_else(|| {
            // A replication of one bucket sends to the bucket of the same name.
            (r.local_bucket != "*").then(|| r.local_bucket.clone())
        }),
        min_backoff: remote.min_backoff,
        max_backoff: remote.max_backoff,
        probe_interval: remote.probe_interval,
        drop_non_retryable_data: r.drop_non_retryable_data,
        priority: r.priority,
        max_in_flight: remote.max_in_flight,
        live_window: r.live_window,
        batch_wait: r.batch_wait,
        evict_above: (r.when_full == config::WhenFull::DropOldest).then_some(r.max_queue_size),
        max_age: r.max_age,
    }
}

/// One replication at work: its worker thread and what steers it.
struct Stream {
    config: Replication,
    status: Arc<ReplStatus>,
    target: SharedTarget,
    control: Arc<Control>,
    worker: thread::JoinHandle<()>,
}

impl Stream {
    /// Wakes the worker wherever it waits: on its control signal (backoff)
    /// or on its queue (idle, between looks at an empty queue).
    fn wake(&self) {
        self.control.wake.notify();
        self.status.queue.data.notify();
    }

    fn stop(&self) {
        self.control.stop();
        self.status.queue.data.notify();
    }
}

/// The agent's moving parts, as far as a reload can change them.
struct Streams {
    queue: Arc<Queue>,
    ingest: Arc<Ingest>,
    config: Config,
    /// The address the API socket was bound to at start. A reload cannot
    /// move the socket, so rules about the address are checked against
    /// this one, not against the reloaded `listen.address`.
    bound: SocketAddr,
    streams: BTreeMap<String, Stream>,
    /// `[[tail]]` and `[[influxdb_wal]]` threads.
    sources: crate::source::Sources,
}

impl Streams {
    fn target(config: &Config, r: &Replication) -> Result<Target, String> {
        let remote = config.remote(&r.remote).ok_or_else(|| {
            format!(
                "replication \"{}\": remote \"{}\" is not defined",
                r.name, r.remote
            )
        })?;
        Ok(Target {
            client: Client::new(remote)?,
            config: ship_config(r, remote),
        })
    }

    fn start(&mut self, r: &Replication) -> Result<(), AgentError> {
        let target = Self::target(&self.config, r).map_err(AgentError::Setup)?;
        let handle = self.queue.attach(spec(r))?;
        let status = Arc::new(ReplStatus {
            name: r.name.clone(),
            remote: r.remote.clone(),
            local_bucket: r.local_bucket.clone(),
            remote_bucket: target
                .config
                .remote_bucket
                .clone()
                .unwrap_or_else(|| "(same as local)".into()),
            max_queue_bytes: r.max_queue_size,
            queue: handle.clone(),
            ship: Default::default(),
        });
        let c = handle.counters();
        info!(
            "replication \"{}\": {} -> {} ({}), {} lines ({} bytes) queued",
            r.name,
            r.local_bucket,
            r.remote,
            target
                .client
                .destination(target.config.remote_bucket.as_deref()),
            c.queued_lines,
            c.queued_bytes
        );
        let target: SharedTarget = Arc::new(RwLock::new(Arc::new(target)));
        let control = Arc::new(Control::default());
        let worker = Worker {
            queue: self.queue.clone(),
            repl: handle,
            status: status.clone(),
            target: target.clone(),
            control: control.clone(),
            link: self.ingest.link.clone(),
            reencode: Default::default(),
            answer_wait: Default::default(),
        }
        .spawn()
        .map_err(|e| AgentError::Setup(format!("cannot start a worker thread: {e}")))?;
        self.streams.insert(
            r.name.clone(),
            Stream {
                config: r.clone(),
                status,
                target,
                control,
                worker,
            },
        );
        Ok(())
    }

    /// Routes writes to the streams now running.
    fn publish_routing(&self) {
        let routing = Routing {
            routes: self
                .streams
                .values()
                .map(|s| {
                    let target = s.target.read_locked().clone();
                    Route {
                        config: s.config.clone(),
                        handle: s.status.queue.clone(),
                        destination: target
                            .client
                            .destination(target.config.remote_bucket.as_deref()),
                        v1: self
                            .config
                            .remote(&s.config.remote)
                            .is_some_and(|r| r.api == config::Api::V1),
                    }
                })
                .collect(),
            statuses: self.streams.values().map(|s| s.status.clone()).collect(),
            tokens: self.config.listen.tokens.clone(),
            browsers: self.config.listen.browsers.clone(),
            max_body_size: self.config.listen.max_body_size,
            max_request_memory: self.config.listen.max_request_memory,
            header_timeout: self.config.listen.header_timeout,
            body_timeout: self.config.listen.body_timeout,
        };
        self.ingest.set_routing(routing);
    }

    /// Applies a reloaded config: new tokens, remotes and bounds take effect,
    /// streams added start, streams removed stop (their queue stays on disk),
    /// and every stream retries at once. A config that would leave the bound
    /// socket without tokens on a non-loopback address is refused whole.
    fn reload(&mut self, new: Config) {
        if let Err(why) = check_reload(self.bound, &new) {
            error!("reload refused: {why}; keeping the running config");
            return;
        }
        let old = std::mem::replace(&mut self.config, new);
        let new = &self.config;
        if old.listen.address != new.listen.address
            || old.data_dir != new.data_dir
            || old.queue != new.queue
            || old.telemetry != new.telemetry
        {
            warn!("reload: listen.address, data_dir, [queue] and [telemetry] changes take effect at the next restart");
        }
        for w in &new.warnings {
            warn!("{w}");
        }
        self.ingest.link.configure(new.link.clone());
        crate::clock::configure(
            new.clock.wait_for_sync,
            new.clock.send_before_build,
            new.clock.before_build_margin,
        );
        let names: Vec<String> = self.streams.keys().cloned().collect();
        for name in names {
            let keep = new.replications.iter().find(|r| r.name == name).cloned();
            let stream = &self.streams[&name];
            let same_route = keep.as_ref().is_some_and(|r| {
                r.local_bucket == stream.config.local_bucket
                    && r.remote == stream.config.remote
                    && r.remote_bucket == stream.config.remote_bucket
                    && r.max_queue_size == stream.config.max_queue_size
            });
            match keep {
                Some(r) if same_route => {
                    match Self::target(new, &r).and_then(|t| {
                        self.queue.attach(spec(&r)).map_err(|e| e.to_string())?;
                        Ok(t)
                    }) {
                        Ok(t) => {
                            let s = self.streams.get_mut(&name).expect("listed above");
                            *s.target.write_locked() = Arc::new(t);
                            s.config = r;
                            s.wake();
                        }
                        Err(e) => error!(
                            "reload: {e}; replication \"{name}\" keeps its previous settings"
                        ),
                    }
                }
                _ => {
                    // Removed, or routed differently: stop it; a changed one
                    // starts again below with its queue as it was.
                    let s = self.streams.remove(&name).expect("listed above");
                    s.stop();
                    join_until(vec![s.worker], Duration::from_secs(5));
                    self.queue.detach(&name);
                    info!("reload: replication \"{name}\" stopped; its queue stays on disk");
                }
            }
        }
        let added: Vec<Replication> = new
            .replications
            .iter()
            .filter(|r| !self.streams.contains_key(&r.name))
            .cloned()
            .collect();
        for r in added {
            if let Err(e) = self.start(&r) {
                error!("reload: replication \"{}\" not started: {e}", r.name);
            }
        }
        self.publish_routing();
        // A changed source restarts from its checkpoint.
        self.sources.apply(&self.config, &self.queue, &self.ingest);
        info!(
            "configuration reloaded: {} replications",
            self.streams.len()
        );
    }

    fn stop(mut self, budget: Duration) {
        // Sources write into the queue: they stop before it closes.
        self.sources.stop();
        for s in self.streams.values() {
            s.stop();
        }
        join_until(
            self.streams.into_values().map(|s| s.worker).collect(),
            budget.min(WORKER_GRACE),
        );
        self.ingest.link.save(true);
        self.queue.close();
    }
}

/// The socket the write API will serve: the one socket a service manager
/// handed over (`LISTEN_FDS`, `LISTEN_PID` naming this process), else
/// `listen.address`, bound here.
///
/// Either way "no tokens only on loopback" is checked against the address
/// the socket is really bound to, not the one the config names.
pub fn listener(config: &Config) -> Result<std::net::TcpListener, AgentError> {
    let fds: Vec<_> = sd_notify::listen_fds()
        .map_err(|e| AgentError::Inherited(e.to_string()))?
        .collect();
    let listener = match fds.len() {
        0 => std::net::TcpListener::bind(config.listen.address).map_err(|source| {
            AgentError::Listen {
                addr: config.listen.address,
                source,
            }
        })?,
        1 => inherited(fds[0])?,
        n => {
            return Err(AgentError::Inherited(format!(
                "{n} sockets handed over, the write API serves one"
            )))
        }
    };
    let local = listener
        .local_addr()
        .map_err(|e| AgentError::Inherited(format!("not an IP socket: {e}")))?;
    if config.listen.tokens.is_empty() && !config::is_loopback(local.ip()) {
        return Err(AgentError::OpenSocket(local));
    }
    if fds.len() == 1 && local != config.listen.address {
        info!(
            "serving the socket handed over by the service manager ({local}); listen.address {} is not bound",
            config.listen.address
        );
    }
    Ok(listener)
}

/// Takes file descriptor `fd` as a listening TCP socket, after checking that
/// it is one: a socket that is not listening would fail every accept.
fn inherited(fd: std::os::fd::RawFd) -> Result<std::net::TcpListener, AgentError> {
    let option = |name: libc::c_int| -> std::io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, an int
        // that outlives the call; a bad fd is reported as an error.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let stream =
        option(libc::SO_TYPE).map_err(|e| AgentError::Inherited(format!("fd {fd}: {e}")))?;
    let listening =
        option(libc::SO_ACCEPTCONN).map_err(|e| AgentError::Inherited(format!("fd {fd}: {e}")))?;
    if stream != libc::SOCK_STREAM || listening == 0 {
        return Err(AgentError::Inherited(format!(
            "fd {fd} is not a listening stream socket"
        )));
    }
    // SAFETY: the service manager handed this descriptor to this process for
    // exactly this use (sd_listen_fds(3)); nothing else in the process owns
    // it, and it is taken once, here.
    Ok(unsafe { <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Runs the agent on `listener` until `events` yields [`Event::Stop`] (or
/// ends). `config_path` is read again on [`Event::Reload`].
pub fn run(
    config: Config,
    listener: std::net::TcpListener,
    config_path: Option<PathBuf>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<(), AgentError> {
    let started = Instant::now();
    tune_allocator();
    raise_open_files_limit();
    let specs: Vec<ReplSpec> = config.replications.iter().map(spec).collect();
    let queue = Arc::new(Queue::open(
        &config.data_dir,
        &QueueOptions {
            map_size: config.queue.map_size,
            durability: config.queue.durability,
            commit_interval: config.queue.commit_interval,
        },
        &specs,
    )?);
    let link = Arc::new(Link::new(config.link.clone(), Some(&config.data_dir)));
    crate::clock::configure(
        config.clock.wait_for_sync,
        config.clock.send_before_build,
        config.clock.before_build_margin,
    );
    let ingest = Arc::new(Ingest::new(
        queue.clone(),
        Routing {
            routes: Vec::new(),
            statuses: Vec::new(),
            tokens: config.listen.tokens.clone(),
            browsers: config.listen.browsers.clone(),
            max_body_size: config.listen.max_body_size,
            max_request_memory: config.listen.max_request_memory,
            header_timeout: config.listen.header_timeout,
            body_timeout: config.listen.body_timeout,
        },
        link,
    ));
    let addr = config.listen.address;
    // What a reload is checked against: the socket's real address, which
    // differs from listen.address when the socket was handed over.
    let bound = listener.local_addr().unwrap_or(addr);
    let deadline = config.shutdown_timeout;
    let replications = config.replications.clone();
    let mut streams = Streams {
        queue: queue.clone(),
        ingest: ingest.clone(),
        bound,
        config,
        streams: BTreeMap::new(),
        sources: Default::default(),
    };
    for r in &replications {
        streams.start(r)?;
    }
    streams.publish_routing();
    streams.sources.apply(&streams.config, &queue, &ingest);
    let telemetry = match &streams.config.telemetry {
        Some(t) => Some(
            crate::telemetry::start(
                t.clone(),
                ingest.clone(),
                queue.clone(),
                streams.config.data_dir.clone(),
                streams.config.queue.map_size,
                started,
            )
            .map_err(|e| AgentError::Setup(format!("cannot start the telemetry thread: {e}")))?,
        ),
        None => None,
    };
    let streams = Arc::new(Mutex::new(Some(streams)));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api")
        .enable_all()
        .build()
        .map_err(|e| AgentError::Setup(format!("cannot start the runtime: {e}")))?;
    let reloadable = streams.clone();
    let watched = streams.clone();
    let watchdog = crate::systemd::Watchdog::start(&queue, move || {
        let guard = watched.locked();
        let Some(s) = guard.as_ref() else {
            return Vec::new();
        };
        s.streams
            .values()
            .map(|st| {
                crate::systemd::Watch::new(
                    &st.config.name,
                    &st.control,
                    s.config.remote(&st.config.remote),
                )
            })
            .collect()
    });
    let served = runtime.block_on(async {
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
            .map_err(|source| AgentError::Listen { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        info!(
            "listening on http://{local} ({} replications; ready in {} ms)",
            replications.len(),
            started.elapsed().as_millis()
        );
        if ingest.routing().tokens.is_empty() {
            info!("no listen.tokens configured: the write API is open to local processes");
        }
        crate::systemd::ready(&format!(
            "listening on {local}, {} replications",
            replications.len()
        ));
        let stop = async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Stop => break,
                    Event::Reload => {
                        let Some(path) = config_path.clone() else {
                            warn!("reload asked, but the agent was not started from a config file");
                            continue;
                        };
                        let streams = reloadable.clone();
                        let _ = tokio::task::spawn_blocking(move || match config::load(&path) {
                            Ok(new) => {
                                if let Some(s) = streams.locked().as_mut() {
                                    s.reload(new);
                                }
                            }
                            Err(e) => error!(
                                "reload: {}: {e}; keeping the running config",
                                path.display()
                            ),
                        })
                        .await;
                    }
                }
            }
            crate::systemd::stopping();
            info!("stopping: no new writes taken; finishing requests in progress");
        };
        http::serve(listener, ingest.clone(), stop, deadline).await;
        Ok::<(), AgentError>(())
    });
    drop(watchdog);
    // No reading is queued once the streams stop.
    drop(telemetry);
    let shutdown_started = Instant::now();
    if let Some(s) = streams.locked().take() {
        s.stop(deadline.saturating_sub(shutdown_started.elapsed()));
    }
    runtime.shutdown_timeout(Duration::from_millis(100));
    served?;
    info!("stopped");
    Ok(())
}

/// Whether `new` may replace the running config of an agent whose API
/// socket is bound to `bound`. The file may name a loopback address with no
/// tokens, which `config::load` accepts, while the socket still listens on
/// the address it was started with: an empty token list would then open the
/// write API, dead-letter purge and status to the whole network.
fn check_reload(bound: SocketAddr, new: &Config) -> Result<(), String> {
    if new.listen.tokens.is_empty() && !config::is_loopback(bound.ip()) {
        return Err(format!(
            "listen.tokens is empty, but the API socket stays bound to {bound} (not loopback) \
             until a restart"
        ));
    }
    Ok(())
}

/// Keeps resident memory near what is in use. Request bodies and batches
/// are large and come and go with the load; glibc gives each thread that
/// allocates a heap of its own (up to 8 per core), and each keeps the blocks
/// freed in it. Two heaps are plenty for a 2-worker runtime and a few
/// threads (measured with `make bench`: peak RSS while ingesting down by a
/// fifth to a quarter, CPU unchanged).
///
/// Blocks of 1 MiB and more (large bodies, their normalised lines, large
/// queue entries) are mapped on their own and unmapped when freed. glibc
/// would otherwise raise that threshold to the size of each large block
/// freed, up to 32 MiB, and serve the next ones from the heaps, where freed
/// memory stays resident. Fixing it fixes the trim threshold too, which
/// would then stay at 128 KiB and hand back, and fault in again, the top of
/// a heap after every ordinary request: it is set to 16 MiB. Measured
/// (`make bench`, three runs against the build before): 64 concurrent 24 MB
/// bodies peak at 237 MB instead of 278; ingest of 5,000-line bodies 1.13×,
/// 0.94× (1.25 MB bodies, now mapped) and 1.03× the lines per second.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; glibc serialises it
    // with allocations in other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

/// Raises the soft open-file limit to the hard one: the soft default (often
/// 1024) is what a flood of clients would exhaust, and what the connection
/// cap is derived from (`ingest::http::connection_cap`). Under the systemd
/// unit, `LimitNOFILE=` sets both and setrlimit is filtered out; a refusal
/// is harmless and only logged at debug level.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            debug!(
                "cannot raise the open-file limit from {} to {}: {}",
                limit.rlim_cur,
                limit.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// How long shutdown waits for the shipping workers. A worker that is not
/// in a POST stops at once (every wait of its wakes on the stop); one in a
/// POST is left behind after this, with its batch still queued.
const WORKER_GRACE: Duration = Duration::from_secs(1);

/// Joins the workers, giving up after `budget`: a worker stuck in a POST
/// keeps its batch queued, so leaving it behind loses nothing.
fn join_until(workers: Vec<thread::JoinHandle<()>>, budget: Duration) {
    let deadline = Instant::now() + budget;
    for w in workers {
        while !w.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if w.is_finished() {
            if w.join().is_err() {
                error!("a shipping worker panicked");
            }
        } else {
            warn!("a shipping worker is still waiting for its remote; its batch stays queued");
        }
    }
}

/// Turns SIGTERM/SIGINT into [`Event::Stop`] and SIGHUP into [`Event::Reload`].
pub fn signal_events() -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<Event>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let ev = if sig == SIGHUP {
                    Event::Reload
                } else {
                    Event::Stop
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(address: &str, tokens: &str) -> Config {
        let text = format!("[listen]\naddress = \"{address}\"\ntokens = {tokens}\n");
        config::parse(&text, Path::new("/"), &|_| None).unwrap()
    }

    #[test]
    fn a_reload_cannot_drop_the_tokens_of_a_public_socket() {
        let open = config("127.0.0.1:8086", "[]");
        let with_tokens = config("127.0.0.1:8086", "[\"t\"]");
        let cases = [
            ("0.0.0.0:8086", &open, false),
            ("[::]:8086", &open, false),
            ("192.0.2.7:8086", &open, false),
            ("0.0.0.0:8086", &with_tokens, true),
            ("127.0.0.1:8086", &open, true),
            ("[::1]:8086", &open, true),
            ("[::ffff:127.0.0.1]:8086", &open, true),
        ];
        for (bound, new, ok) in cases {
            let bound: SocketAddr = bound.parse().unwrap();
            match check_reload(bound, new) {
                Ok(()) => assert!(ok, "{bound}: accepted"),
                Err(why) => {
                    assert!(!ok, "{bound}: refused: {why}");
                    assert!(why.contains("listen.tokens"), "{why}");
                    assert!(why.contains(&bound.to_string()), "{why}");
                }
            }
        }
    }
}
