//! The running agent: opens the queue, starts one shipping worker per
//! replication and the HTTP API, and stops them in order on SIGTERM/SIGINT.
//!
//! Shutdown order keeps the promise "acknowledged means durable": first the
//! API stops accepting and lets requests in progress commit and answer, then
//! the workers stop (a POST in flight is finished or abandoned; either way
//! its batch stays queued until settled), and last the queue writer commits
//! what it holds and exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use tokio::net::TcpListener;

use crate::config::{Config, Remote, Replication};
use crate::ingest::{http, Ingest, Route};
use crate::queue::{Queue, QueueError, QueueOptions, ReplSpec};
use crate::ship::{Client, Control, ShipConfig, Worker};
use crate::status::{IngestStats, ReplStatus};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
}

/// What the agent is told from outside while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Stop,
    Reload,
}

fn spec(r: &Replication) -> ReplSpec {
    ReplSpec {
        name: r.name.clone(),
        max_bytes: r.max_queue_size,
        when_full: r.when_full,
        max_age: r.max_age,
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
    }
}

/// Runs the agent until `events` yields [`Event::Stop`] (or ends).
pub fn run(config: Config, mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Result<(), AgentError> {
    let started = Instant::now();
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

    let mut routes = Vec::new();
    let mut statuses = Vec::new();
    let mut workers = Vec::new();
    let mut controls = Vec::new();
    for (r, handle) in config.replications.iter().zip(queue.handles()) {
        let remote = config
            .remote(&r.remote)
            .ok_or_else(|| AgentError::Setup(format!("replication \"{}\": remote \"{}\" is not defined", r.name, r.remote)))?;
        let ship = ship_config(r, remote);
        let status = Arc::new(ReplStatus {
            name: r.name.clone(),
            remote: r.remote.clone(),
            local_bucket: r.local_bucket.clone(),
            remote_bucket: ship.remote_bucket.clone().unwrap_or_else(|| "(same as local)".into()),
            max_queue_bytes: r.max_queue_size,
            queue: handle.clone(),
            ship: Default::default(),
        });
        let client = Client::new(remote).map_err(AgentError::Setup)?;
        let control = Arc::new(Control::default());
        let c = handle.counters();
        info!(
            "replication \"{}\": {} -> {} ({}), {} lines ({} bytes) queued",
            r.name, r.local_bucket, remote.name, remote.url, c.queued_lines, c.queued_bytes
        );
        let worker = Worker {
            queue: queue.clone(),
            repl: handle.clone(),
            status: status.clone(),
            client,
            config: ship,
            control: control.clone(),
        };
        workers.push(
            worker
                .spawn()
                .map_err(|e| AgentError::Setup(format!("cannot start a worker thread: {e}")))?,
        );
        controls.push(control);
        statuses.push(status);
        routes.push(Route {
            config: r.clone(),
            handle: handle.clone(),
        });
    }

    let ingest = Arc::new(Ingest {
        queue: queue.clone(),
        routes,
        statuses,
        tokens: config.listen.tokens.clone(),
        max_body_size: config.listen.max_body_size,
        stats: IngestStats::default(),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api")
        .enable_all()
        .build()
        .map_err(|e| AgentError::Setup(format!("cannot start the runtime: {e}")))?;
    let addr = config.listen.address;
    let deadline = config.shutdown_timeout;
    let served = runtime.block_on(async {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Listen { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        info!(
            "listening on http://{local} ({} replications; ready in {} ms)",
            config.replications.len(),
            started.elapsed().as_millis()
        );
        if config.listen.tokens.is_empty() {
            info!("no listen.tokens configured: the write API is open to local processes");
        }
        notify_ready();
        let stop = async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Stop => break,
                    Event::Reload => warn!(
                        "SIGHUP: configuration reload is not supported by this version; restart to apply changes"
                    ),
                }
            }
            info!("stopping: no new writes taken; finishing requests in progress");
        };
        http::serve(listener, ingest.clone(), stop, deadline).await;
        Ok::<(), AgentError>(())
    });
    let shutdown_started = Instant::now();
    for c in &controls {
        c.stop();
    }
    join_until(workers, deadline.saturating_sub(shutdown_started.elapsed()));
    queue.close();
    runtime.shutdown_timeout(Duration::from_millis(100));
    served?;
    info!("stopped");
    Ok(())
}

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

/// Tells systemd we are ready when started with `Type=notify`.
fn notify_ready() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        use std::os::unix::net::UnixDatagram;
        let path = std::path::PathBuf::from(path);
        if let Ok(sock) = UnixDatagram::unbound() {
            let _ = sock.send_to(b"READY=1", &path);
        }
    }
}

/// Turns SIGTERM/SIGINT into [`Event::Stop`] and SIGHUP into [`Event::Reload`].
pub fn signal_events() -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<Event>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            let ev = if sig == SIGHUP { Event::Reload } else { Event::Stop };
            if tx.send(ev).is_err() {
                return;
            }
        }
    })?;
    Ok(rx)
}
