//! Configuration: the TOML file an operator writes, turned into a validated [`Config`].
//!
//! Loading happens in two layers, as ripgrep splits its arguments. The raw layer is a set
//! of serde structs that mirror the file exactly, with `deny_unknown_fields` on every
//! table (and no `flatten`, which would defeat it), so a misspelt key is an error that
//! names the key and its line. Sizes and durations are kept as written there. The
//! validated layer checks every rule the rest of the agent relies on (names, URLs,
//! references between sections, bounds) and gives typed values: bytes as `u64`,
//! durations as [`Duration`], secrets as [`Secret`]. Nothing is read from the environment
//! or the disk except `${VAR}` references, `token_file`/`password_file` (small regular
//! files only), the existence of `ca_file`, and who owns and may write the config and
//! secret files ([`crate::trust`]), so a config that passes [`load`] is one the agent
//! can run.
//!
//! Every error is one lower-case line that names the key at fault, and no error message
//! or `Debug` output ever contains a secret's value. Findings that should not stop the
//! agent (a token file readable by others, a remote no replication uses) are collected in
//! [`Config::warnings`] for the caller to log.
//!
//! The code is split by section of the file, so that a key is added in one place: each
//! section's module holds its raw struct, its validation and its validated type.
//!
//! - `listen`: `[listen]`, the local write API, and what keeps browsers out of it.
//! - `queue`: `[queue]`, the LMDB queue's commit policy and map size.
//! - `remote`: `[[remote]]`, where batches go, and its URL checks.
//! - `replication`: `[[replication]]` and `[replication.downsample]`.
//! - `sources`: `[[tail]]` and `[[influxdb_wal]]`, data the agent follows itself.
//! - `telemetry`: `[telemetry]`, the agent's own health as line protocol.
//! - `link`: `[link]`, the bandwidth cap and data budgets all remotes share.
//! - `clock`: `[clock]`, the clock guard for boards without a real-time clock.
//!
//! What several sections share has a module of its own: `units` (sizes, durations),
//! `env` (`${VAR}` substitution, done on the TOML tree before the raw layer is read) and
//! `secret` ([`Secret`], `token_file`/`password_file`). This file holds the entry
//! points, the top-level keys, the errors, and the checks between sections.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod clock;
mod env;
mod link;
mod listen;
mod queue;
mod remote;
mod replication;
mod secret;
mod sources;
mod telemetry;
#[cfg(test)]
mod tests;
mod units;

pub use crate::ship::link::LinkConfig;
pub use clock::ClockConfig;
pub use listen::{is_loopback, BrowserGuard, Listen};
pub use queue::{Durability, QueueConfig};
pub use remote::{Api, Remote};
pub use replication::{Aggregate, Downsample, Replication, WhenFull};
pub use secret::{Secret, MAX_SECRET_FILE};
pub use sources::{InfluxdbWal, Tail};
pub use telemetry::{Telemetry, MIN_TELEMETRY_INTERVAL};
pub use units::{parse_duration, parse_rate, parse_size};

use clock::RawClock;
use link::RawLink;
use listen::RawListen;
use queue::RawQueue;
use remote::RawRemote;
use replication::RawReplication;
use sources::{RawInfluxdbWal, RawTail};
use telemetry::RawTelemetry;
use units::{duration_value, Scalar};

/// Where `run` and `check-config` look for the config when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/edge-replicator/config.toml";

const MAX_NAME_LEN: usize = 64;

/// `data_dir` when the key is left out.
const DEFAULT_DATA_DIR: &str = "/var/lib/edge-replicator";
/// `shutdown_timeout` when the key is left out.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The validated config and its errors
// ---------------------------------------------------------------------------------------

/// The validated configuration the agent runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory of the LMDB environment; relative paths are resolved against the
    /// config file's directory.
    pub data_dir: PathBuf,
    /// How long shutdown may take before in-flight work is abandoned.
    pub shutdown_timeout: Duration,
    pub log_level: log::LevelFilter,
    pub listen: Listen,
    pub queue: QueueConfig,
    pub remotes: Vec<Remote>,
    pub replications: Vec<Replication>,
    /// `[[tail]]`: line-protocol files followed into a local bucket.
    pub tails: Vec<Tail>,
    /// `[[influxdb_wal]]`: local InfluxDB WALs followed into a local bucket.
    pub influxdb_wals: Vec<InfluxdbWal>,
    /// `[telemetry]`: the agent's own health, written into its queue.
    pub telemetry: Option<Telemetry>,
    /// `[link]`: the bandwidth cap and data budgets all remotes share.
    pub link: LinkConfig,
    /// `[clock]`: the clock guard.
    pub clock: ClockConfig,
    /// Non-fatal findings, one line each, for the caller to log.
    pub warnings: Vec<String>,
}

impl Config {
    /// The remote called `name`, if one is defined.
    pub fn remote(&self, name: &str) -> Option<&Remote> {
        self.remotes.iter().find(|r| r.name == name)
    }
}

/// Why a config was refused. Each variant prints as one lower-case line naming the key
/// (or the file, or the line of the file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path:?}: {}", io_message(.source))]
    Read { path: PathBuf, source: io::Error },
    /// TOML syntax, an unknown key, a missing key or a value of the wrong type; the
    /// message is the toml crate's, prefixed with the line and column.
    #[error("{0}")]
    Toml(String),
    /// A `${VAR}` reference names a variable that is not set.
    #[error("{key}: environment variable {var} is not set")]
    EnvNotSet { key: String, var: String },
    /// A file the config names (`token_file`, `password_file`, `ca_file`) could not be
    /// read.
    #[error("{key} {path:?}: {}", io_message(.source))]
    File {
        key: String,
        path: PathBuf,
        source: io::Error,
    },
    /// A value breaks a rule.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The OS message without Rust's " (os error N)" suffix, as `ls` would print it.
fn io_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

// ---------------------------------------------------------------------------------------
// Raw layer: the file as written
// ---------------------------------------------------------------------------------------

/// The whole file. Each section's raw struct lives in that section's module; only the
/// top-level keys are read here.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<String>,
    shutdown_timeout: Option<Scalar>,
    log_level: Option<String>,
    listen: Option<RawListen>,
    queue: Option<RawQueue>,
    #[serde(default)]
    remote: Vec<RawRemote>,
    #[serde(default)]
    replication: Vec<RawReplication>,
    #[serde(default)]
    tail: Vec<RawTail>,
    #[serde(default)]
    influxdb_wal: Vec<RawInfluxdbWal>,
    telemetry: Option<RawTelemetry>,
    link: Option<RawLink>,
    clock: Option<RawClock>,
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

/// Reads and validates the config file at `path`; `${VAR}` comes from the process
/// environment and relative paths are resolved against the file's directory. The
/// config file and the secret files it names must not be writable by other users
/// (see [`crate::trust`]): the agent runs with what they say.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, true)
}

/// As [`load`], for the commands that only talk to a running agent (`status`,
/// `dead-letter`): they use the file for its address and token, so who else may
/// write it is the agent's concern, not theirs.
pub fn load_as_client(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, false)
}

fn load_with(path: &Path, check_owners: bool) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let trust_warnings = if check_owners {
        crate::trust::check(path, crate::trust::euid())
            .map_err(|why| invalid(format!("config file {path:?}"), why))?
    } else {
        Vec::new()
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Absolute, so a later change of working directory cannot move the data.
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let env = |name: &str| std::env::var(name).ok();
    let mut config = parse_with(&text, &dir, &env, check_owners)?;
    if let Some(w) = secret::inline_secret_warning(path, &text, &config) {
        config.warnings.push(w);
    }
    for w in trust_warnings {
        config.warnings.push(format!("config file {path:?}: {w}"));
    }
    Ok(config)
}

/// Checks that no other local user can write to `dir` (the queue's
/// directory), its `queue` folder and file, or the directories above them
/// (see [`crate::trust`]); a `dir` that does not exist yet is judged by the
/// directory it would be made in. `Ok` holds warnings.
pub fn check_data_dir(dir: &Path) -> Result<Vec<String>, ConfigError> {
    let uid = crate::trust::euid();
    let key = format!("data_dir {dir:?}");
    let mut paths: Vec<PathBuf> = Vec::new();
    if std::fs::symlink_metadata(dir).is_ok() {
        paths.push(dir.to_path_buf());
        let queue = dir.join("queue");
        for p in [queue.clone(), queue.join("data.mdb")] {
            if std::fs::symlink_metadata(&p).is_ok() {
                paths.push(p);
            }
        }
    } else if let Some(parent) = crate::trust::nearest_existing(dir) {
        paths.push(parent);
    }
    let mut warnings = Vec::new();
    for p in paths {
        let label = if p == dir {
            key.clone()
        } else {
            format!("{key}: {p:?}")
        };
        match crate::trust::check(&p, uid) {
            Ok(w) => warnings.extend(w.into_iter().map(|w| format!("{label}: {w}"))),
            Err(why) => return Err(invalid(label, why)),
        }
    }
    Ok(warnings)
}

/// Validates config `text`. `base_dir` anchors relative paths (the config file's
/// directory); `env` answers `${VAR}` references.
pub fn parse(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    parse_with(text, base_dir, env, true)
}

/// [`parse`], checking the owners and modes of secret files or not.
fn parse_with(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    check_owners: bool,
) -> Result<Config, ConfigError> {
    // Structure first, from the text itself, so unknown keys, missing keys and type
    // errors come with their line even when a `${VAR}` elsewhere is unset.
    toml::from_str::<RawConfig>(text).map_err(|e| toml_error(text, &e))?;
    let mut table: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    env::substitute_root(&mut table, env)?;
    // Substitution only rewrites strings into strings, so this cannot fail in practice.
    let raw: RawConfig = table
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Toml(one_line(e.message())))?;
    Validator {
        base_dir,
        warnings: Vec::new(),
        check_owners,
    }
    .config(raw)
}

/// The toml crate's message as one line, with the line and column it points at, and the
/// key when the error points at a value.
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let msg = one_line(e.message());
    let Some(start) = e.span().map(|s| s.start) else {
        return ConfigError::Toml(msg);
    };
    let Some(before) = text.get(..start) else {
        return ConfigError::Toml(msg);
    };
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    // For `key = <bad value>` the span is the value; name the key as well.
    let key = before[line_start..]
        .rsplit_once('=')
        .and_then(|(lhs, _)| lhs.rsplit(['{', ',']).next())
        .map(str::trim)
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        });
    // For a table header (`[[remote]]` missing a key, `[[tail]]`), name the header.
    let line_text = text[line_start..].lines().next().unwrap_or("").trim();
    let header = line_text
        .starts_with('[')
        .then(|| line_text.find(']'))
        .flatten()
        .map(|end| {
            let close = line_text[end..].bytes().take_while(|&b| b == b']').count();
            &line_text[..end + close]
        });
    ConfigError::Toml(match key.or(header) {
        Some(key) => format!("line {line}, column {col}: {key}: {msg}"),
        None => format!("line {line}, column {col}: {msg}"),
    })
}

fn one_line(msg: &str) -> String {
    msg.trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------------------
// Validation shared by the sections
// ---------------------------------------------------------------------------------------

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks the name of element `index` of `[[kind]]`: valid, and not the name of an
/// element before it (`seen` holds those, and takes this one).
fn check_name(
    kind: &str,
    index: usize,
    name: &str,
    seen: &mut HashMap<String, usize>,
) -> Result<(), ConfigError> {
    if valid_name(name) {
        return match seen.insert(name.to_string(), index) {
            Some(first) => Err(invalid(
                format!("{kind}[{index}].name"),
                format!("{name:?} is already the name of {kind}[{first}]"),
            )),
            None => Ok(()),
        };
    }
    let shown = if name.len() <= 2 * MAX_NAME_LEN {
        format!("{name:?}")
    } else {
        format!("of {} characters", name.len())
    };
    Err(invalid(
        format!("{kind}[{index}].name"),
        format!("invalid name {shown} (use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ . -)"),
    ))
}

fn non_empty(key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    match value {
        Some(v) if v.is_empty() => Err(invalid(key, "must not be empty (leave the key out)")),
        v => Ok(v),
    }
}

/// Turns the raw layer into the validated one. Each section's part is an
/// `impl Validator` block in that section's module; [`Validator::config`] calls them in
/// the order the checks between sections need (replications before what names their
/// buckets, the queue after the replications it holds).
struct Validator<'a> {
    base_dir: &'a Path,
    warnings: Vec<String>,
    /// Refuse secret files other users can write (everything but the
    /// client commands).
    check_owners: bool,
}

impl Validator<'_> {
    fn config(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let data_dir = match raw.data_dir {
            None => PathBuf::from(DEFAULT_DATA_DIR),
            Some(d) if d.is_empty() => return Err(invalid("data_dir", "must not be empty")),
            Some(d) => self.resolve(&d),
        };
        let shutdown_timeout = duration_value(
            "shutdown_timeout",
            raw.shutdown_timeout,
            DEFAULT_SHUTDOWN_TIMEOUT,
        )?;
        let log_level = match raw.log_level.as_deref() {
            None | Some("info") => log::LevelFilter::Info,
            Some("error") => log::LevelFilter::Error,
            Some("warn") => log::LevelFilter::Warn,
            Some("debug") => log::LevelFilter::Debug,
            Some("trace") => log::LevelFilter::Trace,
            Some(other) => {
                return Err(invalid(
                    "log_level",
                    format!(
                        "invalid value {other:?} (use \"error\", \"warn\", \"info\", \"debug\" or \"trace\")"
                    ),
                ))
            }
        };
        let listen = self.listen(raw.listen)?;

        let remotes = self.remotes(raw.remote)?;
        let replications = self.replications(raw.replication, &remotes)?;
        for remote in &remotes {
            if !replications.iter().any(|r| r.remote == remote.name) {
                self.warnings.push(format!(
                    "remote \"{}\" is not used by any replication",
                    remote.name
                ));
            }
        }

        let (tails, influxdb_wals) = self.sources(raw.tail, raw.influxdb_wal, &replications)?;
        let queue = self.queue(raw.queue, &replications)?;
        let telemetry = raw
            .telemetry
            .map(|t| telemetry::telemetry(t, &replications))
            .transpose()?;
        let link = link::link(raw.link, &replications)?;
        let clock = clock::clock(raw.clock)?;
        Ok(Config {
            data_dir,
            shutdown_timeout,
            log_level,
            listen,
            queue,
            remotes,
            replications,
            tails,
            influxdb_wals,
            telemetry,
            link,
            clock,
            warnings: self.warnings,
        })
    }

    fn resolve(&self, path: &str) -> PathBuf {
        self.base_dir.join(path)
    }
}
