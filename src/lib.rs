//! edge-replicator: a store-and-forward agent for edge gateways.
//!
//! Line protocol comes in through an InfluxDB-compatible write API
//! ([`ingest`]) or from tailed files and a local InfluxDB's WAL ([`source`]),
//! is validated and normalised by [`lineproto`], persisted in a bounded,
//! crash-safe LMDB [`queue`], and replicated in gzip batches to a remote
//! InfluxDB by [`ship`]. [`agent`] wires them together for the
//! `run` command of [`cli`]; [`status`] is what operators see, and
//! [`systemd`] what the service manager sees.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod config;
pub mod deflate;
pub mod fault;
pub mod ingest;
pub mod lineproto;
pub mod logging;
pub mod probe;
pub mod queue;
pub mod ship;
pub mod source;
pub mod status;
pub mod sync;
pub mod systemd;
pub mod telemetry;
pub mod transform;
pub mod trust;
pub mod watch;
