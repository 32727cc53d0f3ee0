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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;

use crate::lineproto::Precision;

/// Where `run` and `check-config` look for the config when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/edge-replicator/config.toml";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const MAX_NAME_LEN: usize = 64;

// ---------------------------------------------------------------------------------------
// Validated layer
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
    /// Non-fatal findings, one line each, for the caller to log.
    pub warnings: Vec<String>,
}

impl Config {
    /// The remote called `name`, if one is defined.
    pub fn remote(&self, name: &str) -> Option<&Remote> {
        self.remotes.iter().find(|r| r.name == name)
    }
}

/// `[telemetry]`: every `interval`, the agent writes its own health as line
/// protocol into local bucket `bucket`, tagged `instance`; queued like any
/// write, it reaches the remote with the history of an outage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// A local bucket some replication takes.
    pub bucket: String,
    pub interval: Duration,
    /// The `instance` tag: `instance_id`, else the host name.
    pub instance_id: String,
}

/// Telemetry more often than this would crowd the queue with the agent's
/// own lines.
pub const MIN_TELEMETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The local write API: `[listen]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub address: SocketAddr,
    /// Tokens a writer may present; empty only when `address` is loopback.
    pub tokens: Vec<Secret>,
    /// Largest request body accepted, after decompression.
    pub max_body_size: u64,
    /// Memory all requests in progress may hold together (raw, inflated and
    /// normalised bytes).
    pub max_request_memory: u64,
    /// How long a client may take to send a request's headers (and how long
    /// an idle keep-alive connection is kept).
    pub header_timeout: Duration,
    /// How long a client may take to send a request's whole body.
    pub body_timeout: Duration,
    /// Browsers: see [`BrowserGuard`].
    pub browsers: BrowserGuard,
}

/// What keeps a web page in a browser on the gateway from using the API:
/// `listen.allowed_hosts`, `listen.allowed_origins`, `listen.metrics_open`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrowserGuard {
    /// Host names (lower case, no port) accepted besides loopback ones when
    /// no token is configured (against DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// `Origin`s (lower case `scheme://host[:port]`) whose requests are
    /// served; a request from any other origin is refused.
    pub allowed_origins: Vec<String>,
    /// `/metrics` without a token even when tokens are set.
    pub metrics_open: bool,
}

/// The queue: `[queue]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Longest a write waits for others to share its commit.
    pub commit_interval: Duration,
    pub durability: Durability,
    /// LMDB map size in bytes, a multiple of 1 MiB.
    pub map_size: u64,
}

/// Whether a commit waits for the disk (`"fsync"`) or only for the page cache (`"os"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Durability {
    Fsync,
    Os,
}

/// Which write API a remote speaks: InfluxDB 2.x/Cloud (`"v2"`) or 1.x (`"v1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    V1,
    V2,
}

/// What a full queue does with a new write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WhenFull {
    /// Evict whole oldest entries (counted) to make room.
    DropOldest,
    /// Refuse the write with 503 and `Retry-After`.
    Reject,
}

impl Durability {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Os => "os",
        }
    }
}

impl Api {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::V1 => "v1",
            Api::V2 => "v2",
        }
    }
}

impl WhenFull {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::DropOldest => "drop_oldest",
            WhenFull::Reject => "reject",
        }
    }
}

/// A remote InfluxDB: one `[[remote]]` table.
#[derive(Clone, PartialEq, Eq)]
pub struct Remote {
    pub name: String,
    /// `http://` or `https://` base URL without a trailing `/`.
    pub url: String,
    pub token: Option<Secret>,
    /// v1 basic auth user; always set together with `password`.
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub org: Option<String>,
    pub api: Api,
    pub allow_insecure_tls: bool,
    pub ca_file: Option<PathBuf>,
    /// `http://` or `https://` proxy URL; may carry credentials, so never log it whole.
    pub proxy: Option<String>,
    /// How long the remote has to answer once a request's body is sent.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// A transfer that makes no progress (no byte written or read) for this
    /// long is abandoned.
    pub stall_timeout: Duration,
    /// While backing off longer than this after the remote could not be
    /// reached, a TCP connect probes it about this often.
    pub probe_interval: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

// Written by hand so a proxy URL's credentials stay out of logs and panics.
impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("token", &self.token)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("org", &self.org)
            .field("api", &self.api)
            .field("allow_insecure_tls", &self.allow_insecure_tls)
            .field("ca_file", &self.ca_file)
            .field("proxy", &self.proxy.as_deref().map(redact_userinfo))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("probe_interval", &self.probe_interval)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

/// A replication stream: one `[[replication]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub name: String,
    /// Name of the [`Remote`] it ships to; always defined.
    pub remote: String,
    /// Local bucket it takes, or `"*"` for every bucket.
    pub local_bucket: String,
    /// Bucket on the remote; `None` means the local bucket's name. For a v1 remote
    /// `"db"` or `"db/rp"`.
    pub remote_bucket: Option<String>,
    /// Bound on unsent bytes.
    pub max_queue_size: u64,
    /// Entries older than this are dropped; `None` keeps them forever.
    pub max_age: Option<Duration>,
    pub when_full: WhenFull,
    pub drop_non_retryable_data: bool,
    /// Largest batch in bytes before compression.
    pub batch_size: u64,
    /// gzip level, 0 to 9.
    pub gzip_level: u32,
    /// Measurement globs (`*`, `?`) a line must match to be sent; empty: all.
    pub include_measurements: Vec<String>,
    /// Measurement globs whose lines are not sent.
    pub exclude_measurements: Vec<String>,
    /// Tags added to every line sent; a line's own tag of the same key is replaced.
    pub add_tags: BTreeMap<String, String>,
    /// Send per-window aggregates instead of raw points.
    pub downsample: Option<Downsample>,
}

/// `[replication.downsample]`: aggregate per series and epoch-aligned window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downsample {
    pub every: Duration,
    /// A window is closed (and its aggregate queued) this long after it ends.
    pub allowed_lateness: Duration,
    /// Per-field aggregate overriding the default (numeric: mean, others: last).
    pub fields: BTreeMap<String, Aggregate>,
}

/// How a field is aggregated over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregate {
    Mean,
    Last,
    Max,
    Min,
    Sum,
    Count,
}

impl Aggregate {
    pub fn parse(s: &str) -> Option<Aggregate> {
        Some(match s {
            "mean" => Aggregate::Mean,
            "last" => Aggregate::Last,
            "max" => Aggregate::Max,
            "min" => Aggregate::Min,
            "sum" => Aggregate::Sum,
            "count" => Aggregate::Count,
            _ => return None,
        })
    }
}

impl Replication {
    /// Whether lines are changed on the way (filters, tags, downsampling).
    pub fn transforms(&self) -> bool {
        !self.include_measurements.is_empty()
            || !self.exclude_measurements.is_empty()
            || !self.add_tags.is_empty()
            || self.downsample.is_some()
    }

    /// Whether writes to the local `bucket` go to this replication.
    pub fn takes_bucket(&self, bucket: &str) -> bool {
        self.local_bucket == bucket || self.local_bucket == "*"
    }
}

/// A followed line-protocol file (or glob of files): one `[[tail]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// An absolute path, or a glob pattern of paths (`*`, `?`, `[...]`).
    pub path: PathBuf,
    /// Local bucket the lines are routed as; always taken by a replication.
    pub bucket: String,
    /// Unit of the files' timestamps.
    pub precision: Precision,
    pub poll_interval: Duration,
    /// Whether files present at the very first start are read from their
    /// start (true) or their end; files appearing later are always read whole.
    pub from_beginning: bool,
    /// Whether a matched path that is (or passes through, below the
    /// pattern's fixed directories) a symbolic link is read. Off by default:
    /// whoever can write in a tailed directory could otherwise point a link
    /// at any file the agent can read and have it logged or shipped.
    pub follow_symlinks: bool,
}

/// A followed InfluxDB TSM WAL: one `[[influxdb_wal]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfluxdbWal {
    /// 1.x `wal-dir`, or 2.x `<engine-path>/wal`.
    pub wal_dir: PathBuf,
    /// 1.x database name, or 2.x bucket ID: the folder under `wal_dir`.
    pub database: String,
    /// Local bucket the points are routed as; always taken by a replication.
    pub bucket: String,
    pub poll_interval: Duration,
}

/// A secret string (token or password). `Debug` and `Display` print `<redacted>`, so a
/// secret cannot reach a log line by accident; [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret's value, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    bucket: Option<String>,
    interval: Option<Scalar>,
    instance_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: Option<String>,
    tokens: Option<RawTokens>,
    max_body_size: Option<Scalar>,
    header_timeout: Option<Scalar>,
    body_timeout: Option<Scalar>,
    allowed_hosts: Option<Vec<String>>,
    allowed_origins: Option<Vec<String>>,
    metrics_open: Option<bool>,
    max_request_memory: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    commit_interval: Option<Scalar>,
    durability: Option<String>,
    map_size: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    name: String,
    url: String,
    token: Option<String>,
    token_file: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    org: Option<String>,
    api: Option<String>,
    allow_insecure_tls: Option<bool>,
    ca_file: Option<String>,
    proxy: Option<String>,
    timeout: Option<Scalar>,
    connect_timeout: Option<Scalar>,
    stall_timeout: Option<Scalar>,
    probe_interval: Option<Scalar>,
    min_backoff: Option<Scalar>,
    max_backoff: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    name: String,
    remote: String,
    local_bucket: String,
    remote_bucket: Option<String>,
    max_queue_size: Option<Scalar>,
    max_age: Option<Scalar>,
    when_full: Option<String>,
    drop_non_retryable_data: Option<bool>,
    batch_size: Option<Scalar>,
    gzip_level: Option<i64>,
    include_measurements: Option<Vec<String>>,
    exclude_measurements: Option<Vec<String>>,
    add_tags: Option<BTreeMap<String, String>>,
    downsample: Option<RawDownsample>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDownsample {
    every: Scalar,
    allowed_lateness: Option<Scalar>,
    fields: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTail {
    path: String,
    bucket: String,
    precision: Option<String>,
    poll_interval: Option<Scalar>,
    from_beginning: Option<bool>,
    follow_symlinks: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfluxdbWal {
    wal_dir: String,
    database: String,
    bucket: Option<String>,
    poll_interval: Option<Scalar>,
}

/// A size or duration as written: a string such as `"64MiB"` or a bare integer.
enum Scalar {
    Str(String),
    Int(i64),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string such as \"64MiB\" or \"30s\", or an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                i64::try_from(v)
                    .map(Scalar::Int)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `listen.tokens`: a `Vec<String>` whose type errors never echo a token's value (serde's
/// default "invalid type: string \"...\"" would, for `tokens = "secret"`).
struct RawTokens(Vec<String>);

impl<'de> Deserialize<'de> for RawTokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawTokens, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTokens;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of token strings")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawTokens, E> {
                Err(E::invalid_type(Unexpected::Other("string"), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawTokens, A::Error> {
                let mut tokens = Vec::new();
                while let Some(token) = seq.next_element::<TokenString>()? {
                    tokens.push(token.0);
                }
                Ok(RawTokens(tokens))
            }
        }
        d.deserialize_any(V)
    }
}

struct TokenString(String);

impl<'de> Deserialize<'de> for TokenString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TokenString, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TokenString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TokenString, E> {
                Ok(TokenString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
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
    if let Some(w) = inline_secret_warning(path, &text, &config) {
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

/// A config file that holds a secret as written (not through `${VAR}` or a
/// `*_file`) and that any local user can read deserves a warning.
#[cfg(unix)]
fn inline_secret_warning(path: &Path, text: &str, config: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    if mode & 0o004 == 0 {
        return None;
    }
    let remotes = config
        .remotes
        .iter()
        .flat_map(|r| [&r.token, &r.password])
        .flatten();
    let inline = config
        .listen
        .tokens
        .iter()
        .chain(remotes)
        .any(|s| text.contains(s.expose()));
    inline.then(|| {
        format!(
            "{path:?} holds a token or password and is readable by others (mode {mode:04o}); \
             chmod 640 it, or use token_file or ${{VAR}}"
        )
    })
}

#[cfg(not(unix))]
fn inline_secret_warning(_path: &Path, _text: &str, _config: &Config) -> Option<String> {
    None
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
    substitute_root(&mut table, env)?;
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
// ${VAR} substitution
// ---------------------------------------------------------------------------------------

/// How errors name an element of `[[remote]]` or `[[replication]]`: by its name when it
/// has a usable one, else by index.
fn element_label(kind: &str, index: usize, name: Option<&str>) -> String {
    match name {
        Some(name) if valid_name(name) => format!("{kind} \"{name}\""),
        _ => format!("{kind}[{index}]"),
    }
}

fn substitute_root(
    table: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (key, value) in table.iter_mut() {
        match value {
            toml::Value::Array(items) if key == "remote" || key == "replication" => {
                for (i, item) in items.iter_mut().enumerate() {
                    let toml::Value::Table(element) = item else {
                        substitute_value(item, &format!("{key}[{i}]"), env)?;
                        continue;
                    };
                    let name = element.get("name").and_then(|n| n.as_str());
                    let label = element_label(key, i, name);
                    for (field, value) in element.iter_mut() {
                        substitute_value(value, &format!("{label}: {field}"), env)?;
                    }
                }
            }
            _ => substitute_value(value, key, env)?,
        }
    }
    Ok(())
}

fn substitute_value(
    value: &mut toml::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = substitute(s, key, env)?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &format!("{key}[{i}]"), env)?;
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                substitute_value(item, &format!("{key}.{k}"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Replaces `${VAR}` with the variable's value and `$$` with `$`; any other `$` is kept.
/// Errors never quote the string, which may be a secret.
fn substitute(
    s: &str,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let Some(end) = tail.find('}') else {
                return Err(invalid(
                    key,
                    "unterminated \"${\" (write \"$${\" for a literal \"${\")",
                ));
            };
            let var = &tail[..end];
            let well_formed = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !well_formed {
                return Err(invalid(
                    key,
                    "\"${...}\" must hold an environment variable name (letters, digits, _)",
                ));
            }
            match env(var) {
                Some(value) => out.push_str(&value),
                None => {
                    return Err(ConfigError::EnvNotSet {
                        key: key.to_string(),
                        var: var.to_string(),
                    })
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Sizes and durations
// ---------------------------------------------------------------------------------------

/// Parses a byte size: `"500kB"` (SI; `"500KB"` and `"500k"` too), `"64MiB"` (binary),
/// `"2MB"`, `"1GiB"`, `"10B"`, `"1.5GiB"` (rounded down to whole bytes) or a plain
/// integer number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {s:?} (use e.g. \"500kB\", \"64MiB\")");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => KIB,
        "mi" | "mib" => MIB,
        "gi" | "gib" => GIB,
        "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 18 {
        return Err(bad());
    }
    if number.ends_with('.') {
        return Err(bad());
    }
    let too_large = || format!("invalid size {s:?} (too large)");
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole
        .checked_mul(u128::from(multiplier))
        .ok_or_else(too_large)?;
    if !fraction.is_empty() {
        let scale = 10u128.pow(fraction.len() as u32);
        let fraction: u128 = fraction.parse().map_err(|_| bad())?;
        bytes += fraction * u128::from(multiplier) / scale;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

/// Parses a duration: `"10ms"`, `"1s"`, `"5m"`, `"2h"`, `"7d"`, `"1h30m"`, `"250us"`,
/// `"0"`, or a plain integer number of seconds. Units: `ns`, `us` (`µs`), `ms`, `s`,
/// `m` (`min`), `h`, `d`, `w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (use e.g. \"10ms\", \"30s\", \"5m\", \"7d\")");
    let too_large = || format!("invalid duration {s:?} (too large)");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map(Duration::from_secs).map_err(|_| too_large());
    }
    let mut nanos: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(bad());
        }
        let count: u128 = rest[..digits_end].parse().map_err(|_| too_large())?;
        rest = rest[digits_end..].trim_start();
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit: u128 = match &rest[..unit_end] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" | "min" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            "w" => 604_800_000_000_000,
            _ => return Err(bad()),
        };
        rest = rest[unit_end..].trim_start();
        nanos = count
            .checked_mul(unit)
            .and_then(|n| n.checked_add(nanos))
            .ok_or_else(too_large)?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

fn size_value(key: &str, value: Option<Scalar>, default: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(Scalar::Int(n)) => {
            u64::try_from(n).map_err(|_| invalid(key, format!("invalid size {n} (negative)")))
        }
        Some(Scalar::Str(s)) => parse_size(&s).map_err(|m| invalid(key, m)),
    }
}

fn duration_value(
    key: &str,
    value: Option<Scalar>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(Scalar::Int(n)) => u64::try_from(n)
            .map(Duration::from_secs)
            .map_err(|_| invalid(key, format!("invalid duration {n} (negative)"))),
        Some(Scalar::Str(s)) => parse_duration(&s).map_err(|m| invalid(key, m)),
    }
}

/// Validates `[telemetry]`: a bucket some replication takes (else the
/// lines would have nowhere to go), an interval of at least
/// [`MIN_TELEMETRY_INTERVAL`], and an instance id fit for a tag value.
fn telemetry(raw: RawTelemetry, replications: &[Replication]) -> Result<Telemetry, ConfigError> {
    let bucket = match raw.bucket {
        None => return Err(invalid("telemetry.bucket", "required")),
        Some(b) if b.is_empty() => return Err(invalid("telemetry.bucket", "must not be empty")),
        Some(b) if b.contains('*') => {
            return Err(invalid(
                "telemetry.bucket",
                format!("{b:?}: one bucket, not a pattern"),
            ))
        }
        Some(b) => b,
    };
    if !replications.iter().any(|r| r.takes_bucket(&bucket)) {
        return Err(invalid(
            "telemetry.bucket",
            format!(
                "{bucket:?} is not taken by any replication (add one with local_bucket = {bucket:?} or \"*\")"
            ),
        ));
    }
    let interval = duration_value("telemetry.interval", raw.interval, Duration::from_secs(60))?;
    if interval < MIN_TELEMETRY_INTERVAL {
        return Err(invalid("telemetry.interval", "must be at least 1s"));
    }
    let instance_id = match raw.instance_id {
        Some(id) => id,
        None => hostname().ok_or_else(|| {
            invalid(
                "telemetry.instance_id",
                "required: this system's host name cannot be read",
            )
        })?,
    };
    if instance_id.is_empty() || instance_id.chars().any(char::is_control) {
        return Err(invalid(
            "telemetry.instance_id",
            "must be non-empty, without control characters",
        ));
    }
    if instance_id.len() > 256 {
        return Err(invalid(
            "telemetry.instance_id",
            "must be at most 256 bytes",
        ));
    }
    Ok(Telemetry {
        bucket,
        interval,
        instance_id,
    })
}

/// This system's host name, when it has a usable one.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`,
    // which lives across the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end])
        .ok()
        .map(str::to_string)
        .filter(|h| !h.is_empty())
}

fn round_up_mib(bytes: u64) -> Option<u64> {
    bytes.div_ceil(MIB).checked_mul(MIB)
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_name(kind: &str, index: usize, name: &str) -> Result<(), ConfigError> {
    if valid_name(name) {
        return Ok(());
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

/// Checks an `http://`/`https://` URL and returns it with a lower-case scheme and no
/// trailing `/`. Messages quote the URL only when it cannot hold credentials.
fn check_http_url(url: &str, allow_userinfo: bool) -> Result<String, String> {
    let shown = if url.contains('@') {
        String::new()
    } else {
        format!(" {url:?}")
    };
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let (scheme, rest) = if lower.starts_with("https://") {
        ("https://", &url[8..])
    } else if lower.starts_with("http://") {
        ("http://", &url[7..])
    } else {
        return Err(format!("{shown} must start with http:// or https://"));
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{shown} must not contain spaces or control characters"
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(format!("{shown} must not have a query or fragment"));
    }
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = match authority.rsplit_once('@') {
        Some(_) if !allow_userinfo => {
            return Err(
                " must not contain credentials (use token, or username and password)".into(),
            )
        }
        Some((_, host_port)) => host_port,
        None => authority,
    };
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => return Err(format!("{shown} has an unclosed '['")),
        }
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{shown} has no host"));
    }
    if let Some(port) = port {
        if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
            return Err(format!("{shown} has an invalid port"));
        }
    }
    Ok(format!("{scheme}{}", rest.trim_end_matches('/')))
}

/// `http://user:pass@host` → `http://<redacted>@host`, for `Debug`.
fn redact_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>{}", &rest[at..]),
        None => url.to_string(),
    }
}

fn check_secret(key: &str, value: String) -> Result<Secret, ConfigError> {
    if value.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            key,
            "contains a control character (a stray newline?)",
        ));
    }
    Ok(Secret(value))
}

fn non_empty(key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    match value {
        Some(v) if v.is_empty() => Err(invalid(key, "must not be empty (leave the key out)")),
        v => Ok(v),
    }
}

fn positive(key: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(invalid(key, "must be greater than 0"))
    } else {
        Ok(d)
    }
}

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
            None => PathBuf::from("/var/lib/edge-replicator"),
            Some(d) if d.is_empty() => return Err(invalid("data_dir", "must not be empty")),
            Some(d) => self.resolve(&d),
        };
        let shutdown_timeout = duration_value(
            "shutdown_timeout",
            raw.shutdown_timeout,
            Duration::from_secs(10),
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

        let mut remotes = Vec::with_capacity(raw.remote.len());
        let mut remote_index = HashMap::new();
        for (i, r) in raw.remote.into_iter().enumerate() {
            check_name("remote", i, &r.name)?;
            if let Some(first) = remote_index.insert(r.name.clone(), i) {
                return Err(invalid(
                    format!("remote[{i}].name"),
                    format!("{:?} is already the name of remote[{first}]", r.name),
                ));
            }
            remotes.push(self.remote(r)?);
        }

        let mut replications: Vec<Replication> = Vec::with_capacity(raw.replication.len());
        let mut replication_names = HashMap::new();
        for (i, r) in raw.replication.into_iter().enumerate() {
            check_name("replication", i, &r.name)?;
            if let Some(first) = replication_names.insert(r.name.clone(), i) {
                return Err(invalid(
                    format!("replication[{i}].name"),
                    format!("{:?} is already the name of replication[{first}]", r.name),
                ));
            }
            let label = format!("replication \"{}\"", r.name);
            let Some(&ri) = remote_index.get(&r.remote) else {
                return Err(invalid(
                    label,
                    format!("remote {:?} is not defined", r.remote),
                ));
            };
            let replication = self.replication(&label, r, remotes[ri].api)?;
            for other in &replications {
                if other.remote == replication.remote
                    && other.local_bucket == replication.local_bucket
                    && target(other, &other.local_bucket)
                        == target(&replication, &other.local_bucket)
                {
                    return Err(invalid(
                        label,
                        format!(
                            "same local_bucket {:?}, remote {:?} and remote_bucket as replication {:?}",
                            replication.local_bucket, replication.remote, other.name
                        ),
                    ));
                }
            }
            replications.push(replication);
        }
        self.overlap_warnings(&replications);
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
            .map(|t| telemetry(t, &replications))
            .transpose()?;
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
            warnings: self.warnings,
        })
    }

    fn resolve(&self, path: &str) -> PathBuf {
        self.base_dir.join(path)
    }

    fn listen(&mut self, raw: Option<RawListen>) -> Result<Listen, ConfigError> {
        let raw = raw.unwrap_or(RawListen {
            address: None,
            tokens: None,
            max_body_size: None,
            header_timeout: None,
            body_timeout: None,
            allowed_hosts: None,
            allowed_origins: None,
            metrics_open: None,
            max_request_memory: None,
        });
        let address = match raw.address {
            None => SocketAddr::from(([127, 0, 0, 1], 8086)),
            Some(a) => a.parse().map_err(|_| {
                invalid(
                    "listen.address",
                    format!("invalid address {a:?} (use an IP and a port, e.g. \"127.0.0.1:8086\", \"0.0.0.0:8086\", \"[::1]:8086\")"),
                )
            })?,
        };
        let mut tokens = Vec::new();
        for (i, t) in raw
            .tokens
            .map(|t| t.0)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            tokens.push(check_secret(&format!("listen.tokens[{i}]"), t)?);
        }
        if tokens.is_empty() && !is_loopback(address.ip()) {
            return Err(invalid(
                "listen.tokens",
                format!("required when listen.address ({address}) is not loopback"),
            ));
        }
        let max_body_size = size_value("listen.max_body_size", raw.max_body_size, 32 * MIB)?;
        if max_body_size == 0 {
            return Err(invalid("listen.max_body_size", "must be greater than 0"));
        }
        let header_timeout = positive(
            "listen.header_timeout",
            duration_value(
                "listen.header_timeout",
                raw.header_timeout,
                Duration::from_secs(10),
            )?,
        )?;
        let body_timeout = positive(
            "listen.body_timeout",
            duration_value(
                "listen.body_timeout",
                raw.body_timeout,
                Duration::from_secs(60),
            )?,
        )?;
        let browsers = browser_guard(raw.allowed_hosts, raw.allowed_origins, raw.metrics_open)?;
        // 128 MiB: about two largest (32 MiB) bodies with their normalised
        // lines at once, and a peak well under 256 MiB on a 1 GB board.
        let max_request_memory = size_value(
            "listen.max_request_memory",
            raw.max_request_memory,
            128 * MIB,
        )?;
        if max_request_memory == 0 {
            return Err(invalid(
                "listen.max_request_memory",
                "must be greater than 0",
            ));
        }
        Ok(Listen {
            address,
            tokens,
            max_body_size,
            max_request_memory,
            header_timeout,
            body_timeout,
            browsers,
        })
    }

    fn queue(
        &mut self,
        raw: Option<RawQueue>,
        replications: &[Replication],
    ) -> Result<QueueConfig, ConfigError> {
        let raw = raw.unwrap_or(RawQueue {
            commit_interval: None,
            durability: None,
            map_size: None,
        });
        let commit_interval = duration_value(
            "queue.commit_interval",
            raw.commit_interval,
            Duration::from_millis(10),
        )?;
        let durability = match raw.durability.as_deref() {
            None | Some("fsync") => Durability::Fsync,
            Some("os") => Durability::Os,
            Some(other) => {
                return Err(invalid(
                    "queue.durability",
                    format!("invalid value {other:?} (use \"fsync\" or \"os\")"),
                ))
            }
        };
        let too_large = || invalid("queue.map_size", "the queues' total size is too large");
        let queued = replications
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.max_queue_size))
            .ok_or_else(too_large)?;
        let map_size = match raw.map_size {
            None => queued
                .checked_mul(2)
                .and_then(|b| b.checked_add(64 * MIB))
                .and_then(round_up_mib)
                .ok_or_else(too_large)?,
            Some(v) => {
                let given = size_value("queue.map_size", Some(v), 0)?;
                let needed = queued.checked_add(16 * MIB).ok_or_else(too_large)?;
                if given < needed {
                    return Err(invalid(
                        "queue.map_size",
                        format!(
                            "{given} bytes is less than the sum of max_queue_size ({queued} bytes) + 16 MiB"
                        ),
                    ));
                }
                // LMDB wants a multiple of the page size, which is 4 to 64 KiB.
                round_up_mib(given).ok_or_else(too_large)?
            }
        };
        if usize::try_from(map_size).is_err() {
            return Err(invalid(
                "queue.map_size",
                format!("{map_size} bytes does not fit this system's address space; lower max_queue_size"),
            ));
        }
        if cfg!(target_pointer_width = "32") && map_size > GIB {
            self.warnings.push(format!(
                "queue.map_size: {} MiB may not fit a 32-bit address space; lower max_queue_size if the queue fails to open",
                map_size / MIB
            ));
        }
        Ok(QueueConfig {
            commit_interval,
            durability,
            map_size,
        })
    }

    fn remote(&mut self, r: RawRemote) -> Result<Remote, ConfigError> {
        let label = format!("remote \"{}\"", r.name);
        let key = |field: &str| format!("{label}: {field}");

        let url = check_http_url(&r.url, false).map_err(|m| invalid(key("url"), m.trim()))?;
        let api = match r.api.as_deref() {
            None | Some("v2") => Api::V2,
            Some("v1") => Api::V1,
            Some(other) => {
                return Err(invalid(
                    key("api"),
                    format!("invalid value {other:?} (use \"v2\" or \"v1\")"),
                ))
            }
        };
        let token = self.secret(&label, "token", r.token, r.token_file)?;
        let password = self.secret(&label, "password", r.password, r.password_file)?;
        let username = non_empty(&key("username"), r.username)?;
        match (&username, &password) {
            (Some(_), None) => {
                return Err(invalid(
                    key("username"),
                    "requires password or password_file",
                ))
            }
            (None, Some(_)) => return Err(invalid(key("password"), "requires username")),
            (Some(_), Some(_)) if api == Api::V2 => {
                return Err(invalid(
                    key("username"),
                    "basic auth is only for api = \"v1\" (use token)",
                ))
            }
            (Some(_), Some(_)) if token.is_some() => {
                return Err(invalid(
                    key("token"),
                    "use either token or username and password, not both",
                ))
            }
            _ => {}
        }
        let org = non_empty(&key("org"), r.org)?;
        if org.is_some() && api == Api::V1 {
            return Err(invalid(key("org"), "is only for api = \"v2\""));
        }
        let allow_insecure_tls = r.allow_insecure_tls.unwrap_or(false);
        if allow_insecure_tls {
            self.warnings.push(format!(
                "{label}: allow_insecure_tls = true: the server's certificate is not verified"
            ));
        }
        let ca_file = match r.ca_file {
            None => None,
            Some(f) if f.is_empty() => return Err(invalid(key("ca_file"), "must not be empty")),
            Some(f) => {
                let path = self.resolve(&f);
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => Some(path),
                    Ok(_) => {
                        return Err(invalid(
                            format!("{} {path:?}", key("ca_file")),
                            "not a regular file",
                        ))
                    }
                    Err(source) => {
                        return Err(ConfigError::File {
                            key: key("ca_file"),
                            path,
                            source,
                        })
                    }
                }
            }
        };
        let proxy = match r.proxy {
            None => None,
            Some(p) => Some(check_http_url(&p, true).map_err(|m| invalid(key("proxy"), m.trim()))?),
        };
        let timeout = positive(
            &key("timeout"),
            duration_value(&key("timeout"), r.timeout, Duration::from_secs(30))?,
        )?;
        let connect_timeout = positive(
            &key("connect_timeout"),
            duration_value(
                &key("connect_timeout"),
                r.connect_timeout,
                Duration::from_secs(10),
            )?,
        )?;
        let stall_timeout = positive(
            &key("stall_timeout"),
            duration_value(
                &key("stall_timeout"),
                r.stall_timeout,
                Duration::from_secs(10),
            )?,
        )?;
        let probe_interval = positive(
            &key("probe_interval"),
            duration_value(
                &key("probe_interval"),
                r.probe_interval,
                Duration::from_secs(10),
            )?,
        )?;
        let min_backoff = positive(
            &key("min_backoff"),
            duration_value(&key("min_backoff"), r.min_backoff, Duration::from_secs(1))?,
        )?;
        let max_backoff =
            duration_value(&key("max_backoff"), r.max_backoff, Duration::from_secs(300))?;
        if max_backoff < min_backoff {
            return Err(invalid(
                key("max_backoff"),
                format!("must not be less than min_backoff ({min_backoff:?})"),
            ));
        }
        Ok(Remote {
            name: r.name,
            url,
            token,
            username,
            password,
            org,
            api,
            allow_insecure_tls,
            ca_file,
            proxy,
            timeout,
            connect_timeout,
            stall_timeout,
            probe_interval,
            min_backoff,
            max_backoff,
        })
    }

    /// A secret given inline (`field`) or read from `{field}_file`.
    fn secret(
        &mut self,
        label: &str,
        field: &str,
        inline: Option<String>,
        file: Option<String>,
    ) -> Result<Option<Secret>, ConfigError> {
        match (inline, file) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(invalid(
                format!("{label}: {field}"),
                format!("{field} and {field}_file are mutually exclusive"),
            )),
            (Some(value), None) => check_secret(&format!("{label}: {field}"), value).map(Some),
            (None, Some(f)) => {
                let key = format!("{label}: {field}_file");
                if f.is_empty() {
                    return Err(invalid(key, "must not be empty"));
                }
                let path = self.resolve(&f);
                let text = read_secret_file(&key, &path)?;
                // Who may write it; who may read it is a warning below.
                if self.check_owners {
                    crate::trust::check(&path, crate::trust::euid())
                        .map_err(|why| invalid(format!("{key} {path:?}"), why))?;
                }
                self.check_permissions(&key, &path);
                let value = text.trim_end();
                if value.is_empty() {
                    return Err(invalid(format!("{key} {path:?}"), "file is empty"));
                }
                check_secret(&key, value.to_string()).map(Some)
            }
        }
    }

    #[cfg(unix)]
    fn check_permissions(&mut self, key: &str, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            let who = if mode & 0o007 != 0 {
                "readable by others"
            } else {
                "accessible by its group"
            };
            self.warnings.push(format!(
                "{key} {path:?} is {who} (mode {mode:04o}); chmod 600 it"
            ));
        }
    }

    #[cfg(not(unix))]
    fn check_permissions(&mut self, _key: &str, _path: &Path) {}

    fn replication(
        &mut self,
        label: &str,
        r: RawReplication,
        api: Api,
    ) -> Result<Replication, ConfigError> {
        let key = |field: &str| format!("{label}: {field}");
        let local_bucket = r.local_bucket;
        if local_bucket.is_empty() {
            return Err(invalid(
                key("local_bucket"),
                "must not be empty (use \"*\" for every bucket)",
            ));
        }
        if local_bucket != "*" && local_bucket.contains('*') {
            return Err(invalid(
                key("local_bucket"),
                format!("{local_bucket:?}: patterns are not supported (use a bucket name, or \"*\" for every bucket)"),
            ));
        }
        let remote_bucket = non_empty(&key("remote_bucket"), r.remote_bucket)?;
        if let (Some(rb), Api::V1) = (&remote_bucket, api) {
            let parts: Vec<&str> = rb.split('/').collect();
            if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(invalid(
                    key("remote_bucket"),
                    format!(
                        "{rb:?} is not \"db\" or \"db/rp\" (remote {:?} has api = \"v1\")",
                        r.remote
                    ),
                ));
            }
        }
        let max_queue_size = size_value(&key("max_queue_size"), r.max_queue_size, 256 * MIB)?;
        if max_queue_size == 0 {
            return Err(invalid(key("max_queue_size"), "must be greater than 0"));
        }
        let max_age =
            match duration_value(&key("max_age"), r.max_age, Duration::from_secs(7 * 86_400))? {
                d if d.is_zero() => None,
                d => Some(d),
            };
        let when_full = match r.when_full.as_deref() {
            None | Some("drop_oldest") => WhenFull::DropOldest,
            Some("reject") => WhenFull::Reject,
            Some(other) => {
                return Err(invalid(
                    key("when_full"),
                    format!("invalid value {other:?} (use \"drop_oldest\" or \"reject\")"),
                ))
            }
        };
        let batch_size = size_value(&key("batch_size"), r.batch_size, 500_000)?;
        if batch_size < 1_000 {
            return Err(invalid(
                key("batch_size"),
                format!("{batch_size} bytes is less than the minimum, 1kB"),
            ));
        }
        if batch_size > max_queue_size {
            return Err(invalid(
                key("batch_size"),
                format!("{batch_size} bytes is more than max_queue_size ({max_queue_size} bytes)"),
            ));
        }
        let gzip_level = match r.gzip_level {
            None => 6,
            Some(level @ 0..=9) => level as u32,
            Some(level) => {
                return Err(invalid(
                    key("gzip_level"),
                    format!("{level} is not a level from 0 to 9"),
                ))
            }
        };
        let globs = |field: &str, list: Option<Vec<String>>| -> Result<Vec<String>, ConfigError> {
            let list = list.unwrap_or_default();
            if let Some(bad) = list.iter().find(|g| g.is_empty()) {
                return Err(invalid(
                    key(field),
                    format!("{bad:?}: a pattern must not be empty"),
                ));
            }
            Ok(list)
        };
        let include_measurements = globs("include_measurements", r.include_measurements)?;
        let exclude_measurements = globs("exclude_measurements", r.exclude_measurements)?;
        let add_tags = r.add_tags.unwrap_or_default();
        for (k, v) in &add_tags {
            if k.is_empty() || v.is_empty() {
                return Err(invalid(
                    key("add_tags"),
                    format!("{k:?} = {v:?}: tag keys and values must not be empty"),
                ));
            }
            if k.chars().chain(v.chars()).any(|c| c.is_control()) {
                return Err(invalid(
                    key("add_tags"),
                    format!("{k:?}: control characters are not allowed in tags"),
                ));
            }
            if k == "_measurement" || k == "_field" || k == "time" {
                return Err(invalid(
                    key("add_tags"),
                    format!("{k:?} is a reserved key in InfluxDB"),
                ));
            }
        }
        let downsample = match r.downsample {
            None => None,
            Some(d) => {
                let every =
                    duration_value(&key("downsample.every"), Some(d.every), Duration::ZERO)?;
                if every < Duration::from_secs(1) || every.subsec_nanos() != 0 {
                    return Err(invalid(
                        key("downsample.every"),
                        "must be a whole number of seconds, at least 1s",
                    ));
                }
                let allowed_lateness = duration_value(
                    &key("downsample.allowed_lateness"),
                    d.allowed_lateness,
                    Duration::from_secs(30),
                )?;
                let mut fields = BTreeMap::new();
                for (field, agg) in d.fields.unwrap_or_default() {
                    let Some(a) = Aggregate::parse(&agg) else {
                        return Err(invalid(
                            key(&format!("downsample.fields.{field}")),
                            format!("{agg:?} is not an aggregate (use mean, last, max, min, sum or count)"),
                        ));
                    };
                    fields.insert(field, a);
                }
                Some(Downsample {
                    every,
                    allowed_lateness,
                    fields,
                })
            }
        };
        Ok(Replication {
            name: r.name,
            remote: r.remote,
            local_bucket,
            remote_bucket,
            max_queue_size,
            max_age,
            when_full,
            drop_non_retryable_data: r.drop_non_retryable_data.unwrap_or(false),
            batch_size,
            gzip_level,
            include_measurements,
            exclude_measurements,
            add_tags,
            downsample,
        })
    }

    /// A `"*"` replication and a named one that send the same bucket to the same place
    /// double the traffic; allowed (replays overwrite), but worth a line in the log.
    fn overlap_warnings(&mut self, replications: &[Replication]) {
        for all in replications.iter().filter(|r| r.local_bucket == "*") {
            for one in replications.iter().filter(|r| r.local_bucket != "*") {
                if one.remote == all.remote
                    && target(one, &one.local_bucket) == target(all, &one.local_bucket)
                {
                    self.warnings.push(format!(
                        "replication \"{}\" and replication \"{}\" both send bucket {:?} to remote \"{}\"",
                        all.name, one.name, one.local_bucket, one.remote
                    ));
                }
            }
        }
    }
}

impl Validator<'_> {
    /// `[[tail]]` and `[[influxdb_wal]]`. A source's bucket must be taken by a
    /// replication: its lines would have nowhere to go.
    fn sources(
        &mut self,
        tails: Vec<RawTail>,
        wals: Vec<RawInfluxdbWal>,
        replications: &[Replication],
    ) -> Result<(Vec<Tail>, Vec<InfluxdbWal>), ConfigError> {
        let bucket = |label: &str, b: String| -> Result<String, ConfigError> {
            let key = format!("{label}: bucket");
            if b.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
            if b.contains('*') {
                let why = format!("{b:?}: a source writes to one bucket, not a pattern");
                return Err(invalid(key, why));
            }
            if !replications.iter().any(|r| r.takes_bucket(&b)) {
                let why = format!(
                    "{b:?} is not taken by any replication (no local_bucket = {b:?} or \"*\")"
                );
                return Err(invalid(key, why));
            }
            Ok(b)
        };
        let poll = |key: String, v: Option<Scalar>, default: Duration| {
            positive(&key, duration_value(&key, v, default)?)
        };
        let mut out_tails: Vec<Tail> = Vec::with_capacity(tails.len());
        for (i, t) in tails.into_iter().enumerate() {
            let label = format!("tail[{i}]");
            let key = |field: &str| format!("{label}: {field}");
            if t.path.is_empty() {
                return Err(invalid(key("path"), "must not be empty"));
            }
            let path = self.resolve(&t.path);
            let Some(text) = path.to_str() else {
                return Err(invalid(key("path"), "must be valid UTF-8"));
            };
            if let Err(e) = glob::Pattern::new(text) {
                let why = format!("{text:?} is not a valid glob pattern: {}", e.msg);
                return Err(invalid(key("path"), why));
            }
            if text.ends_with('/') {
                let why = format!("{text:?} names a directory; use e.g. \"{text}*.lp\"");
                return Err(invalid(key("path"), why));
            }
            if let Some(j) = out_tails.iter().position(|o| o.path == path) {
                let why = format!("{text:?} is already followed by tail[{j}]");
                return Err(invalid(key("path"), why));
            }
            let precision = match t.precision.as_deref() {
                None | Some("ns") => Precision::Nanoseconds,
                Some("us") => Precision::Microseconds,
                Some("ms") => Precision::Milliseconds,
                Some("s") => Precision::Seconds,
                Some(other) => {
                    let why =
                        format!("invalid value {other:?} (use \"ns\", \"us\", \"ms\" or \"s\")");
                    return Err(invalid(key("precision"), why));
                }
            };
            let default_poll = Duration::from_millis(250);
            out_tails.push(Tail {
                path,
                bucket: bucket(&label, t.bucket)?,
                precision,
                poll_interval: poll(key("poll_interval"), t.poll_interval, default_poll)?,
                from_beginning: t.from_beginning.unwrap_or(true),
                follow_symlinks: t.follow_symlinks.unwrap_or(false),
            });
        }
        let mut out_wals: Vec<InfluxdbWal> = Vec::with_capacity(wals.len());
        for (i, w) in wals.into_iter().enumerate() {
            let label = format!("influxdb_wal[{i}]");
            let key = |field: &str| format!("{label}: {field}");
            if w.wal_dir.is_empty() {
                return Err(invalid(key("wal_dir"), "must not be empty"));
            }
            let wal_dir = self.resolve(&w.wal_dir);
            let db = w.database;
            if db.is_empty() || db == "." || db == ".." || db.contains(['/', '\0']) {
                let why = format!(
                    "{db:?} is not a folder name under wal_dir (a 1.x database, or a 2.x bucket ID)"
                );
                return Err(invalid(key("database"), why));
            }
            let same = |o: &InfluxdbWal| o.wal_dir == wal_dir && o.database == db;
            if let Some(j) = out_wals.iter().position(same) {
                let why = format!("{db:?} in {wal_dir:?} is already followed by influxdb_wal[{j}]");
                return Err(invalid(key("database"), why));
            }
            let b = w.bucket.unwrap_or_else(|| db.clone());
            let default_poll = Duration::from_millis(100);
            out_wals.push(InfluxdbWal {
                bucket: bucket(&label, b)?,
                poll_interval: poll(key("poll_interval"), w.poll_interval, default_poll)?,
                wal_dir,
                database: db,
            });
        }
        Ok((out_tails, out_wals))
    }
}

/// Largest `token_file`/`password_file`: a secret is one line, and a file
/// that is more than a few lines is not the file the operator meant.
pub const MAX_SECRET_FILE: u64 = 64 * KIB;

/// Reads a secret file. Only a regular file of at most [`MAX_SECRET_FILE`]
/// bytes is read: `/dev/zero` or `/dev/urandom` would otherwise be read
/// until memory runs out, and a FIFO would block `check-config` forever
/// (the open does not wait for a writer, and a FIFO is then refused).
fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let file_error = |source| ConfigError::File {
        key: key.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(file_error)?;
    let meta = file.metadata().map_err(file_error)?;
    if !meta.is_file() {
        let why = format!("not a regular file ({})", file_kind(&meta.file_type()));
        return Err(invalid(format!("{key} {path:?}"), why));
    }
    let too_large = || {
        invalid(
            format!("{key} {path:?}"),
            format!(
                "larger than {} KiB; a token or password file holds one line",
                MAX_SECRET_FILE / KIB
            ),
        )
    };
    if meta.len() > MAX_SECRET_FILE {
        return Err(too_large());
    }
    // The file may grow between the stat and the read.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(file_error)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|_| invalid(format!("{key} {path:?}"), "not valid UTF-8"))
}

/// What a file that is not a regular one is, for an error message.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    }
}

/// The remote bucket `r` writes a line of local `bucket` to.
fn target<'a>(r: &'a Replication, bucket: &'a str) -> &'a str {
    r.remote_bucket.as_deref().unwrap_or(bucket)
}

/// `listen.allowed_hosts`, `listen.allowed_origins` and `listen.metrics_open`,
/// checked and lower-cased (host names and origins compare case-insensitively).
fn browser_guard(
    hosts: Option<Vec<String>>,
    origins: Option<Vec<String>>,
    metrics_open: Option<bool>,
) -> Result<BrowserGuard, ConfigError> {
    let mut allowed_hosts = Vec::new();
    for (i, h) in hosts.unwrap_or_default().into_iter().enumerate() {
        let key = format!("listen.allowed_hosts[{i}]");
        let bracketed = h.starts_with('[') && h.ends_with(']');
        if h.is_empty()
            || h.chars()
                .any(|c| c.is_control() || c.is_whitespace() || "/@?#".contains(c))
            || (h.contains(':') && !bracketed)
        {
            return Err(invalid(
                &key,
                format!("{h:?} is not a host name or address (give it without a port or scheme, e.g. \"gw-17.local\", \"192.168.1.20\", \"[fd00::1]\")"),
            ));
        }
        allowed_hosts.push(h.trim_end_matches('.').to_ascii_lowercase());
    }
    let mut allowed_origins = Vec::new();
    for (i, o) in origins.unwrap_or_default().into_iter().enumerate() {
        let key = format!("listen.allowed_origins[{i}]");
        let lower = o.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("https://"));
        let ok = rest.is_some_and(|r| {
            !r.is_empty()
                && !r
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || "/@?#".contains(c))
        });
        if !ok {
            return Err(invalid(
                &key,
                format!("{o:?} is not an origin (use scheme://host[:port] as the browser sends it, e.g. \"http://grafana.local:3000\", without a path)"),
            ));
        }
        allowed_origins.push(lower);
    }
    Ok(BrowserGuard {
        allowed_hosts,
        allowed_origins,
        metrics_open: metrics_open.unwrap_or(false),
    })
}

/// Whether `ip` reaches only this host (IPv4 loopback, `::1`, or IPv4 loopback
/// mapped into IPv6).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const BASE: &str = "/etc/edge-replicator";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn ok(text: &str) -> Config {
        parse(text, Path::new(BASE), &no_env).unwrap_or_else(|e| panic!("{e}\nin:\n{text}"))
    }

    fn err(text: &str) -> String {
        match parse(text, Path::new(BASE), &no_env) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// A remote "cloud" with a URL, plus `lines`.
    fn remote(lines: &str) -> String {
        format!("[[remote]]\nname = \"cloud\"\nurl = \"https://example.com\"\n{lines}\n")
    }

    /// A remote "cloud" without a URL, plus `lines`.
    fn remote_bare(lines: &str) -> String {
        format!("[[remote]]\nname = \"cloud\"\n{lines}\n")
    }

    /// Remote "cloud" (with `remote_lines`) and replication "sensors" using it, plus `lines`.
    fn repl_on(remote_lines: &str, lines: &str) -> String {
        format!(
            "{}[[replication]]\nname = \"sensors\"\nremote = \"cloud\"\nlocal_bucket = \"sensors\"\n{lines}\n",
            remote(remote_lines)
        )
    }

    fn repl(lines: &str) -> String {
        repl_on("", lines)
    }

    fn repl_v1(lines: &str) -> String {
        repl_on("api = \"v1\"", lines)
    }

    #[test]
    fn telemetry_takes_its_defaults_and_its_instance() {
        assert_eq!(ok(&repl("")).telemetry, None);
        let t = ok(&repl("[telemetry]\nbucket = \"sensors\""))
            .telemetry
            .unwrap();
        assert_eq!(t.interval, Duration::from_secs(60));
        assert_eq!(Some(t.instance_id), hostname(), "the host name by default");
        let t = ok(&repl(
            "[telemetry]\nbucket = \"sensors\"\ninterval = \"5s\"\ninstance_id = \"gw 17\"",
        ))
        .telemetry
        .unwrap();
        assert_eq!(
            (t.bucket.as_str(), t.interval, t.instance_id.as_str()),
            ("sensors", Duration::from_secs(5), "gw 17")
        );
    }

    #[test]
    fn error_cases_name_the_key() {
        let long_name = "n".repeat(65);
        let cases: Vec<(String, &str)> = vec![
            // Unknown keys, including those later modules will add.
            ("foo = 1".into(), "unknown field `foo`"),
            ("[listen]\nbar = 1".into(), "line 2, column 1: unknown field `bar`"),
            ("[queue]\nsize = 1".into(), "unknown field `size`"),
            // [telemetry]: where its lines go, how often, under which name.
            (repl("[telemetry]\nbuckets = \"t\""), "unknown field `buckets`"),
            (repl("[telemetry]\ninterval = \"1m\""), "telemetry.bucket: required"),
            (
                repl("[telemetry]\nbucket = \"edge\""),
                "telemetry.bucket: \"edge\" is not taken by any replication",
            ),
            (repl("[telemetry]\nbucket = \"s*\""), "telemetry.bucket: \"s*\": one bucket"),
            (
                repl("[telemetry]\nbucket = \"sensors\"\ninterval = \"500ms\""),
                "telemetry.interval: must be at least 1s",
            ),
            (
                repl("[telemetry]\nbucket = \"sensors\"\ninstance_id = \"a\\nb\""),
                "telemetry.instance_id: must be non-empty",
            ),
            (remote("include_measurements = []"), "unknown field `include_measurements`"),
            (repl("include_measurements = [\"\"]"), "include_measurements"),
            (repl("exclude_measurements = [\"\"]"), "exclude_measurements"),
            (repl("add_tags = { \"\" = \"b\" }"), "add_tags"),
            (repl("add_tags = { time = \"b\" }"), "reserved"),
            (repl("[replication.downsample]\nevery = \"500ms\""), "downsample.every"),
            (
                repl("[replication.downsample]\nevery = \"10m\"\nfields = { t = \"median\" }"),
                "downsample.fields.t",
            ),
            (repl("[replication.downsample]\nevry = \"10m\""), "unknown field `evry`"),
            // Syntax.
            ("[listen\n".into(), "line 1"),
            ("data_dir = \n".into(), "line 1, column 12: data_dir:"),
            ("log_level = \"info\"\nlog_level = \"warn\"".into(), "duplicate key `log_level`"),
            // Top level.
            ("data_dir = \"\"".into(), "data_dir: must not be empty"),
            ("data_dir = 1".into(), "data_dir: invalid type: integer"),
            ("shutdown_timeout = \"10 parsecs\"".into(), "shutdown_timeout: invalid duration \"10 parsecs\""),
            ("shutdown_timeout = -1".into(), "shutdown_timeout: invalid duration -1"),
            ("shutdown_timeout = 1.5".into(), "shutdown_timeout: invalid type: floating point"),
            ("log_level = \"loud\"".into(), "log_level: invalid value \"loud\""),
            ("log_level = \"INFO\"".into(), "log_level: invalid value \"INFO\""),
            // [listen]
            ("[listen]\naddress = \"localhost:8086\"".into(), "listen.address: invalid address \"localhost:8086\""),
            ("[listen]\naddress = \"127.0.0.1\"".into(), "listen.address: invalid address"),
            ("[listen]\naddress = 8086".into(), "address: invalid type: integer"),
            (
                "[listen]\naddress = \"0.0.0.0:8086\"".into(),
                "listen.tokens: required when listen.address (0.0.0.0:8086) is not loopback",
            ),
            ("[listen]\naddress = \"[::]:8086\"".into(), "listen.tokens: required when listen.address ([::]:8086)"),
            ("[listen]\naddress = \"192.168.1.2:8086\"\ntokens = []".into(), "listen.tokens: required"),
            ("[listen]\ntokens = [\"ok\", \"\"]".into(), "listen.tokens[1]: must not be empty"),
            ("[listen]\ntokens = [\"a\\nb\"]".into(), "listen.tokens[0]: contains a control character"),
            ("[listen]\ntokens = \"t\"".into(), "tokens: invalid type: string, expected an array"),
            ("[listen]\ntokens = [1]".into(), "tokens: invalid type: integer"),
            ("[listen]\nheader_timeout = \"0s\"".into(), "listen.header_timeout: must be greater than 0"),
            ("[listen]\nbody_timeout = \"soon\"".into(), "listen.body_timeout: invalid duration"),
            (
                "[listen]\nmax_body_size = \"12XB\"".into(),
                "listen.max_body_size: invalid size \"12XB\" (use e.g. \"500kB\", \"64MiB\")",
            ),
            ("[listen]\nmax_body_size = 0".into(), "listen.max_body_size: must be greater than 0"),
            ("[listen]\nmax_body_size = -5".into(), "listen.max_body_size: invalid size -5 (negative)"),
            ("[listen]\nmax_body_size = true".into(), "max_body_size: invalid type: boolean"),
            ("[listen]\nallowed_hosts = [\"gw.local:8086\"]".into(), "listen.allowed_hosts[0]: \"gw.local:8086\" is not a host name or address (give it without a port"),
            ("[listen]\nallowed_hosts = [\"ok\", \"\"]".into(), "listen.allowed_hosts[1]: \"\" is not a host name"),
            ("[listen]\nallowed_hosts = [\"http://gw\"]".into(), "listen.allowed_hosts[0]:"),
            ("[listen]\nallowed_hosts = \"gw\"".into(), "allowed_hosts: invalid type: string"),
            ("[listen]\nallowed_origins = [\"grafana.local\"]".into(), "listen.allowed_origins[0]: \"grafana.local\" is not an origin (use scheme://host[:port]"),
            ("[listen]\nallowed_origins = [\"http://a/\"]".into(), "listen.allowed_origins[0]: \"http://a/\" is not an origin"),
            ("[listen]\nallowed_origins = [\"https://\"]".into(), "listen.allowed_origins[0]:"),
            ("[listen]\nmetrics_open = \"yes\"".into(), "metrics_open: invalid type: string"),
            ("[listen]\nmax_request_memory = 0".into(), "listen.max_request_memory: must be greater than 0"),
            ("[listen]\nmax_request_memory = \"lots\"".into(), "listen.max_request_memory: invalid size \"lots\""),
            // [queue]
            ("[queue]\ncommit_interval = \"soon\"".into(), "queue.commit_interval: invalid duration \"soon\""),
            ("[queue]\ndurability = \"sometimes\"".into(), "queue.durability: invalid value \"sometimes\""),
            ("[queue]\nmap_size = \"lots\"".into(), "queue.map_size: invalid size \"lots\""),
            (
                format!("[queue]\nmap_size = \"100MiB\"\n{}", repl("")),
                "queue.map_size: 104857600 bytes is less than the sum of max_queue_size (268435456 bytes) + 16 MiB",
            ),
            (
                format!("[queue]\nmap_size = \"20MiB\"\n{}", repl("max_queue_size = \"5MiB\"")),
                "queue.map_size: 20971520 bytes is less than the sum of max_queue_size (5242880 bytes)",
            ),
            // [[remote]] names
            (remote_bare("url = \"https://x\"").replace("\"cloud\"", "\"\""), "remote[0].name: invalid name \"\""),
            (remote_bare("url = \"https://x\"").replace("\"cloud\"", "\"a b\""), "remote[0].name: invalid name \"a b\""),
            (remote_bare("url = \"https://x\"").replace("cloud", &long_name), "remote[0].name: invalid name"),
            (format!("{}{}", remote(""), remote("")), "remote[1].name: \"cloud\" is already the name of remote[0]"),
            ("[[remote]]\nurl = \"https://x\"".into(), "missing field `name`"),
            (remote_bare(""), "missing field `url`"),
            (
                "[[tail]] # see [docs]\npath = \"x\"".into(),
                "line 1, column 1: [[tail]]: missing field `bucket`",
            ),
            ("[remote]\nname = \"x\"".into(), "line 1, column 1: [remote]: invalid type: map, expected a sequence"),
            // url
            (remote_bare("url = \"ftp://x\""), "remote \"cloud\": url: \"ftp://x\" must start with http:// or https://"),
            (remote_bare("url = \"example.com\""), "remote \"cloud\": url: \"example.com\" must start with"),
            (remote_bare("url = \"https://\""), "remote \"cloud\": url: \"https://\" has no host"),
            (remote_bare("url = \"https://:8086/\""), "remote \"cloud\": url: \"https://:8086/\" has no host"),
            (remote_bare("url = \"https://h:99999\""), "remote \"cloud\": url: \"https://h:99999\" has an invalid port"),
            (remote_bare("url = \"https://h:\""), "remote \"cloud\": url: \"https://h:\" has an invalid port"),
            (remote_bare("url = \"https://[::1\""), "remote \"cloud\": url: \"https://[::1\" has an unclosed"),
            (remote_bare("url = \"https://u:pw@h\""), "remote \"cloud\": url: must not contain credentials"),
            (remote_bare("url = \"https://h/?x=1\""), "remote \"cloud\": url: \"https://h/?x=1\" must not have a query"),
            (remote_bare("url = \"http://h x\""), "remote \"cloud\": url: \"http://h x\" must not contain spaces"),
            (remote_bare("url = 5"), "url: invalid type: integer"),
            // token, token_file, username, password
            (remote("token = \"\""), "remote \"cloud\": token: must not be empty"),
            (remote("token = \"t\\n\""), "remote \"cloud\": token: contains a control character"),
            (
                remote("token = \"t\"\ntoken_file = \"/nonexistent/t\""),
                "remote \"cloud\": token: token and token_file are mutually exclusive",
            ),
            (
                remote("token_file = \"/nonexistent/t\""),
                "remote \"cloud\": token_file \"/nonexistent/t\": No such file or directory",
            ),
            (remote("token_file = \"\""), "remote \"cloud\": token_file: must not be empty"),
            (
                remote("api = \"v1\"\nusername = \"u\"\npassword = \"p\"\npassword_file = \"/nonexistent/p\""),
                "remote \"cloud\": password: password and password_file are mutually exclusive",
            ),
            (
                remote("api = \"v1\"\nusername = \"u\"\npassword_file = \"/nonexistent/p\""),
                "remote \"cloud\": password_file \"/nonexistent/p\": No such file or directory",
            ),
            (remote("api = \"v1\"\nusername = \"u\""), "remote \"cloud\": username: requires password"),
            (remote("api = \"v1\"\npassword = \"p\""), "remote \"cloud\": password: requires username"),
            (remote("api = \"v1\"\nusername = \"\"\npassword = \"p\""), "remote \"cloud\": username: must not be empty"),
            (remote("api = \"v1\"\nusername = \"u\"\npassword = \"\""), "remote \"cloud\": password: must not be empty"),
            (
                remote("username = \"u\"\npassword = \"p\""),
                "remote \"cloud\": username: basic auth is only for api = \"v1\"",
            ),
            (
                remote("api = \"v1\"\ntoken = \"t\"\nusername = \"u\"\npassword = \"p\""),
                "remote \"cloud\": token: use either token or username and password",
            ),
            // org, api, tls, proxy
            (remote("org = \"\""), "remote \"cloud\": org: must not be empty"),
            (remote("api = \"v1\"\norg = \"o\""), "remote \"cloud\": org: is only for api = \"v2\""),
            (remote("api = \"v3\""), "remote \"cloud\": api: invalid value \"v3\""),
            (remote("api = 2"), "api: invalid type: integer"),
            (remote("allow_insecure_tls = \"yes\""), "allow_insecure_tls: invalid type: string"),
            (
                remote("ca_file = \"/nonexistent/ca.pem\""),
                "remote \"cloud\": ca_file \"/nonexistent/ca.pem\": No such file or directory",
            ),
            (remote("ca_file = \"/\""), "remote \"cloud\": ca_file \"/\": not a regular file"),
            (remote("ca_file = \"\""), "remote \"cloud\": ca_file: must not be empty"),
            (remote("proxy = \"socks5://p:1080\""), "remote \"cloud\": proxy: \"socks5://p:1080\" must start with"),
            (remote("proxy = \"http://u:pw@\""), "remote \"cloud\": proxy: has no host"),
            // timeouts and backoff
            (remote("timeout = \"0s\""), "remote \"cloud\": timeout: must be greater than 0"),
            (remote("timeout = \"x\""), "remote \"cloud\": timeout: invalid duration \"x\""),
            (remote("connect_timeout = 0"), "remote \"cloud\": connect_timeout: must be greater than 0"),
            (remote("connect_timeout = \"1y\""), "remote \"cloud\": connect_timeout: invalid duration \"1y\""),
            (remote("stall_timeout = \"0s\""), "remote \"cloud\": stall_timeout: must be greater than 0"),
            (remote("probe_interval = 0"), "remote \"cloud\": probe_interval: must be greater than 0"),
            (remote("min_backoff = \"0\""), "remote \"cloud\": min_backoff: must be greater than 0"),
            (remote("min_backoff = -1"), "remote \"cloud\": min_backoff: invalid duration -1"),
            (
                remote("min_backoff = \"2s\"\nmax_backoff = \"1s\""),
                "remote \"cloud\": max_backoff: must not be less than min_backoff (2s)",
            ),
            (remote("max_backoff = \"forever\""), "remote \"cloud\": max_backoff: invalid duration \"forever\""),
            // [[replication]]
            (repl("").replace("\"sensors\"\nremote", "\"s/1\"\nremote"), "replication[0].name: invalid name \"s/1\""),
            (
                format!("{}[[replication]]\nname = \"sensors\"\nremote = \"cloud\"\nlocal_bucket = \"b\"", repl("")),
                "replication[1].name: \"sensors\" is already the name of replication[0]",
            ),
            (
                repl("").replace("remote = \"cloud\"", "remote = \"cloud2\""),
                "replication \"sensors\": remote \"cloud2\" is not defined",
            ),
            ("[[replication]]\nname = \"s\"\nremote = \"cloud\"".into(), "missing field `local_bucket`"),
            ("[[replication]]\nname = \"s\"\nlocal_bucket = \"b\"".into(), "missing field `remote`"),
            (
                repl("").replace("local_bucket = \"sensors\"", "local_bucket = \"\""),
                "replication \"sensors\": local_bucket: must not be empty",
            ),
            (
                repl("").replace("local_bucket = \"sensors\"", "local_bucket = \"sens*\""),
                "replication \"sensors\": local_bucket: \"sens*\": patterns are not supported",
            ),
            (repl("remote_bucket = \"\""), "replication \"sensors\": remote_bucket: must not be empty"),
            (repl_v1("remote_bucket = \"a/b/c\""), "replication \"sensors\": remote_bucket: \"a/b/c\" is not \"db\" or \"db/rp\""),
            (repl_v1("remote_bucket = \"db/\""), "replication \"sensors\": remote_bucket: \"db/\" is not"),
            (repl_v1("remote_bucket = \"/rp\""), "replication \"sensors\": remote_bucket: \"/rp\" is not"),
            (repl("max_queue_size = \"big\""), "replication \"sensors\": max_queue_size: invalid size \"big\""),
            (repl("max_queue_size = 0"), "replication \"sensors\": max_queue_size: must be greater than 0"),
            (repl("max_queue_size = -1"), "replication \"sensors\": max_queue_size: invalid size -1"),
            (
                repl("max_queue_size = \"100kB\""),
                "replication \"sensors\": batch_size: 500000 bytes is more than max_queue_size (100000 bytes)",
            ),
            (repl("max_age = \"a week\""), "replication \"sensors\": max_age: invalid duration \"a week\""),
            (repl("when_full = \"block\""), "replication \"sensors\": when_full: invalid value \"block\""),
            (repl("drop_non_retryable_data = \"yes\""), "drop_non_retryable_data: invalid type: string"),
            (repl("batch_size = \"999B\""), "replication \"sensors\": batch_size: 999 bytes is less than the minimum, 1kB"),
            (repl("batch_size = \"1 XB\""), "replication \"sensors\": batch_size: invalid size \"1 XB\""),
            (repl("gzip_level = 10"), "replication \"sensors\": gzip_level: 10 is not a level from 0 to 9"),
            (repl("gzip_level = -1"), "replication \"sensors\": gzip_level: -1 is not a level from 0 to 9"),
            (repl("gzip_level = \"6\""), "gzip_level: invalid type: string"),
            // Duplicate streams: same local bucket, remote and (effective) remote bucket.
            (
                format!(
                    "{}[[replication]]\nname = \"second\"\nremote = \"cloud\"\nlocal_bucket = \"sensors\"",
                    repl("")
                ),
                "replication \"second\": same local_bucket \"sensors\", remote \"cloud\" and remote_bucket as replication \"sensors\"",
            ),
            (
                format!(
                    "{}[[replication]]\nname = \"second\"\nremote = \"cloud\"\nlocal_bucket = \"sensors\"\nremote_bucket = \"sensors\"",
                    repl("")
                ),
                "replication \"second\": same local_bucket \"sensors\"",
            ),
            (
                format!(
                    "{}[[replication]]\nname = \"second\"\nremote = \"cloud\"\nlocal_bucket = \"sensors\"\nremote_bucket = \"x\"",
                    repl("remote_bucket = \"x\"")
                ),
                "replication \"second\": same local_bucket \"sensors\"",
            ),
            // ${VAR}
            (remote("token = \"${INFLUX_TOKEN}\""), "remote \"cloud\": token: environment variable INFLUX_TOKEN is not set"),
            ("[listen]\ntokens = [\"a\", \"${T2}\"]".into(), "listen.tokens[1]: environment variable T2 is not set"),
            ("data_dir = \"${STATE}/q\"".into(), "data_dir: environment variable STATE is not set"),
            (
                remote("").replace("\"cloud\"", "\"${NAME}\""),
                "remote[0]: name: environment variable NAME is not set",
            ),
            (repl("max_age = \"${AGE}\""), "replication \"sensors\": max_age: environment variable AGE is not set"),
            (remote("token = \"${INFLUX_TOKEN\""), "remote \"cloud\": token: unterminated \"${\""),
            (remote("token = \"${1X}\""), "remote \"cloud\": token: \"${...}\" must hold an environment variable name"),
            (remote("token = \"${}\""), "remote \"cloud\": token: \"${...}\" must hold"),
        ];
        for (text, want) in cases {
            let msg = err(&text);
            assert!(
                msg.contains(want),
                "for:\n{text}\nwant {want:?}\ngot  {msg:?}"
            );
            assert!(!msg.contains('\n'), "not one line: {msg:?}");
            assert!(
                !msg.starts_with(char::is_uppercase),
                "not lower-case: {msg:?}"
            );
        }
    }

    /// Replication "sensors" (taking bucket "sensors") plus `lines`.
    fn with_repl(lines: &str) -> String {
        format!("{}\n{lines}\n", repl(""))
    }

    #[test]
    fn source_error_cases_name_the_key() {
        let cases: Vec<(String, &str)> = vec![
            (with_repl("[[tail]]\npath = \"/x\""), "missing field `bucket`"),
            (with_repl("[[tail]]\nbucket = \"sensors\""), "missing field `path`"),
            (with_repl("[[tail]]\npath = \"/x\"\nbucket = \"sensors\"\nfollow = true"), "unknown field `follow`"),
            (with_repl("[[tail]]\npath = \"\"\nbucket = \"sensors\""), "tail[0]: path: must not be empty"),
            (with_repl("[[tail]]\npath = \"/x/[a\"\nbucket = \"sensors\""), "tail[0]: path: \"/x/[a\" is not a valid glob pattern"),
            (with_repl("[[tail]]\npath = \"/x/\"\nbucket = \"sensors\""), "tail[0]: path: \"/x/\" names a directory"),
            (
                with_repl("[[tail]]\npath = \"/x\"\nbucket = \"sensors\"\n[[tail]]\npath = \"/x\"\nbucket = \"sensors\""),
                "tail[1]: path: \"/x\" is already followed by tail[0]",
            ),
            (with_repl("[[tail]]\npath = \"/x\"\nbucket = \"\""), "tail[0]: bucket: must not be empty"),
            (with_repl("[[tail]]\npath = \"/x\"\nbucket = \"s*\""), "tail[0]: bucket: \"s*\": a source writes to one bucket"),
            (
                with_repl("[[tail]]\npath = \"/x\"\nbucket = \"other\""),
                "tail[0]: bucket: \"other\" is not taken by any replication",
            ),
            (with_repl("[[tail]]\npath = \"/x\"\nbucket = \"sensors\"\nprecision = \"m\""), "tail[0]: precision: invalid value \"m\""),
            (with_repl("[[tail]]\npath = \"/x\"\nbucket = \"sensors\"\npoll_interval = \"0s\""), "tail[0]: poll_interval: must be greater than 0"),
            (with_repl("[[tail]]\npath = \"/x\"\nbucket = \"sensors\"\npoll_interval = \"often\""), "tail[0]: poll_interval: invalid duration \"often\""),
            (with_repl("[[tail]]\npath = \"/x\"\nbucket = \"sensors\"\nfrom_beginning = \"yes\""), "from_beginning: invalid type: string"),
            (with_repl("[[tail]]\npath = \"${LOGS}/x\"\nbucket = \"sensors\""), "tail[0].path: environment variable LOGS is not set"),
            (with_repl("[[influxdb_wal]]\nwal_dir = \"/w\""), "missing field `database`"),
            (with_repl("[[influxdb_wal]]\ndatabase = \"sensors\""), "missing field `wal_dir`"),
            (with_repl("[[influxdb_wal]]\nwal_dir = \"/w\"\ndatabase = \"sensors\"\nrp = \"autogen\""), "unknown field `rp`"),
            (with_repl("[[influxdb_wal]]\nwal_dir = \"\"\ndatabase = \"sensors\""), "influxdb_wal[0]: wal_dir: must not be empty"),
            (with_repl("[[influxdb_wal]]\nwal_dir = \"/w\"\ndatabase = \"a/b\""), "influxdb_wal[0]: database: \"a/b\" is not a folder name"),
            (with_repl("[[influxdb_wal]]\nwal_dir = \"/w\"\ndatabase = \"..\""), "influxdb_wal[0]: database: \"..\" is not a folder name"),
            (
                with_repl("[[influxdb_wal]]\nwal_dir = \"/w\"\ndatabase = \"telegraf\""),
                "influxdb_wal[0]: bucket: \"telegraf\" is not taken by any replication",
            ),
            (
                with_repl("[[influxdb_wal]]\nwal_dir = \"/w\"\ndatabase = \"sensors\"\n[[influxdb_wal]]\nwal_dir = \"/w/\"\ndatabase = \"sensors\""),
                "influxdb_wal[1]: database: \"sensors\" in \"/w/\" is already followed by influxdb_wal[0]",
            ),
            (
                with_repl("[[influxdb_wal]]\nwal_dir = \"/w\"\ndatabase = \"sensors\"\npoll_interval = 0"),
                "influxdb_wal[0]: poll_interval: must be greater than 0",
            ),
        ];
        for (text, want) in cases {
            let msg = err(&text);
            assert!(
                msg.contains(want),
                "for:\n{text}\nwant {want:?}\ngot  {msg:?}"
            );
            assert!(!msg.contains('\n'), "not one line: {msg:?}");
        }
    }

    #[test]
    fn sources_get_defaults_and_resolve_paths() {
        let c = ok(&with_repl(
            "[[tail]]\npath = \"logs/*.lp\"\nbucket = \"sensors\"\n\
             [[tail]]\npath = \"/var/log/m.lp\"\nbucket = \"sensors\"\nprecision = \"s\"\npoll_interval = \"1s\"\nfrom_beginning = false\nfollow_symlinks = true\n\
             [[influxdb_wal]]\nwal_dir = \"/var/lib/influxdb/wal\"\ndatabase = \"sensors\"\n\
             [[influxdb_wal]]\nwal_dir = \"engine/wal\"\ndatabase = \"0123456789abcdef\"\nbucket = \"sensors\"\npoll_interval = \"20ms\"",
        ));
        assert_eq!(
            c.tails,
            vec![
                Tail {
                    path: PathBuf::from(format!("{BASE}/logs/*.lp")),
                    bucket: "sensors".into(),
                    precision: Precision::Nanoseconds,
                    poll_interval: Duration::from_millis(250),
                    from_beginning: true,
                    follow_symlinks: false,
                },
                Tail {
                    path: PathBuf::from("/var/log/m.lp"),
                    bucket: "sensors".into(),
                    precision: Precision::Seconds,
                    poll_interval: Duration::from_secs(1),
                    from_beginning: false,
                    follow_symlinks: true,
                },
            ]
        );
        assert_eq!(
            c.influxdb_wals,
            vec![
                InfluxdbWal {
                    wal_dir: PathBuf::from("/var/lib/influxdb/wal"),
                    database: "sensors".into(),
                    bucket: "sensors".into(),
                    poll_interval: Duration::from_millis(100),
                },
                InfluxdbWal {
                    wal_dir: PathBuf::from(format!("{BASE}/engine/wal")),
                    database: "0123456789abcdef".into(),
                    bucket: "sensors".into(),
                    poll_interval: Duration::from_millis(20),
                },
            ]
        );
        // A "*" replication takes any bucket.
        let all = repl("").replace("local_bucket = \"sensors\"", "local_bucket = \"*\"");
        let c = ok(&format!(
            "{all}\n[[influxdb_wal]]\nwal_dir = \"/w\"\ndatabase = \"telegraf\""
        ));
        assert_eq!(c.influxdb_wals[0].bucket, "telegraf");
        assert!(ok("").tails.is_empty() && ok("").influxdb_wals.is_empty());
    }

    #[test]
    fn empty_config_gives_defaults() {
        let c = ok("");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/edge-replicator"));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.log_level, log::LevelFilter::Info);
        assert_eq!(c.listen.address, "127.0.0.1:8086".parse().unwrap());
        assert!(c.listen.tokens.is_empty());
        assert_eq!(c.listen.max_body_size, 32 * MIB);
        assert_eq!(c.listen.max_request_memory, 128 * MIB);
        assert_eq!(c.listen.header_timeout, Duration::from_secs(10));
        assert_eq!(c.listen.body_timeout, Duration::from_secs(60));
        assert_eq!(c.queue.commit_interval, Duration::from_millis(10));
        assert_eq!(c.queue.durability, Durability::Fsync);
        assert_eq!(c.queue.map_size, 64 * MIB);
        assert!(c.remotes.is_empty());
        assert!(c.replications.is_empty());
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn minimal_remote_and_replication_get_defaults() {
        let c = ok(&repl(""));
        let r = c.remote("cloud").unwrap();
        assert_eq!(r.url, "https://example.com");
        assert_eq!(r.token, None);
        assert_eq!(r.username, None);
        assert_eq!(r.password, None);
        assert_eq!(r.org, None);
        assert_eq!(r.api, Api::V2);
        assert!(!r.allow_insecure_tls);
        assert_eq!(r.ca_file, None);
        assert_eq!(r.proxy, None);
        assert_eq!(r.timeout, Duration::from_secs(30));
        assert_eq!(r.connect_timeout, Duration::from_secs(10));
        assert_eq!(r.stall_timeout, Duration::from_secs(10));
        assert_eq!(r.probe_interval, Duration::from_secs(10));
        assert_eq!(r.min_backoff, Duration::from_secs(1));
        assert_eq!(r.max_backoff, Duration::from_secs(300));
        let s = &c.replications[0];
        assert_eq!(s.name, "sensors");
        assert_eq!(s.remote, "cloud");
        assert_eq!(s.local_bucket, "sensors");
        assert_eq!(s.remote_bucket, None);
        assert_eq!(s.max_queue_size, 256 * MIB);
        assert_eq!(s.max_age, Some(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(s.when_full, WhenFull::DropOldest);
        assert!(!s.drop_non_retryable_data);
        assert_eq!(s.batch_size, 500_000);
        assert_eq!(s.gzip_level, 6);
        assert_eq!(c.queue.map_size, 2 * 256 * MIB + 64 * MIB);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(c.remote("nope").is_none());
    }

    #[test]
    fn design_example_parses() {
        // DESIGN.md's example, without the keys later modules add.
        let text = r#"
data_dir = "/var/lib/edge-replicator"
shutdown_timeout = 20
log_level = "debug"

[listen]
address = "0.0.0.0:8086"
tokens = ["${LOCAL_TOKEN}"]
max_body_size = "32MiB"

[queue]
commit_interval = "10ms"
durability = "os"

[[remote]]
name = "cloud"
url = "https://us-east-1-1.aws.cloud2.influxdata.com/"
token = "${INFLUX_TOKEN}"
org = "my-org"
api = "v2"
allow_insecure_tls = false
proxy = "http://proxy.local:3128"
timeout = "1m"
connect_timeout = "5s"
min_backoff = "500ms"
max_backoff = "10m"

[[remote]]
name = "old.dc-1"
url = "HTTP://[fd00::1]:8086/influx//"
api = "v1"
username = "edge"
password = "pa$$word"

[[replication]]
name = "sensors"
remote = "cloud"
local_bucket = "sensors"
remote_bucket = "edge-sensors"
max_queue_size = "256MiB"
max_age = "7d"
when_full = "reject"
drop_non_retryable_data = true
batch_size = "1MB"
gzip_level = 9

[[replication]]
name = "all-to-dc"
remote = "old.dc-1"
local_bucket = "*"
remote_bucket = "telegraf/autogen"
max_queue_size = 1073741824
max_age = "0"
"#;
        let env: HashMap<&str, &str> = [("LOCAL_TOKEN", "lt"), ("INFLUX_TOKEN", "it")].into();
        let c = parse(text, Path::new(BASE), &|k| {
            env.get(k).map(|v| v.to_string())
        })
        .unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(c.log_level, log::LevelFilter::Debug);
        assert_eq!(c.listen.address, "0.0.0.0:8086".parse().unwrap());
        assert_eq!(c.listen.tokens, vec![Secret::new("lt".into())]);
        assert_eq!(c.queue.durability, Durability::Os);
        let cloud = c.remote("cloud").unwrap();
        assert_eq!(cloud.url, "https://us-east-1-1.aws.cloud2.influxdata.com");
        assert_eq!(cloud.token.as_ref().unwrap().expose(), "it");
        assert_eq!(cloud.org.as_deref(), Some("my-org"));
        assert_eq!(cloud.proxy.as_deref(), Some("http://proxy.local:3128"));
        assert_eq!(cloud.timeout, Duration::from_secs(60));
        assert_eq!(cloud.connect_timeout, Duration::from_secs(5));
        assert_eq!(cloud.min_backoff, Duration::from_millis(500));
        assert_eq!(cloud.max_backoff, Duration::from_secs(600));
        let dc = c.remote("old.dc-1").unwrap();
        assert_eq!(dc.url, "http://[fd00::1]:8086/influx");
        assert_eq!(dc.api, Api::V1);
        assert_eq!(dc.username.as_deref(), Some("edge"));
        assert_eq!(dc.password.as_ref().unwrap().expose(), "pa$word");
        let s = &c.replications[0];
        assert_eq!(s.remote_bucket.as_deref(), Some("edge-sensors"));
        assert_eq!(s.when_full, WhenFull::Reject);
        assert!(s.drop_non_retryable_data);
        assert_eq!(s.batch_size, 1_000_000);
        assert_eq!(s.gzip_level, 9);
        let all = &c.replications[1];
        assert_eq!(all.max_queue_size, GIB);
        assert_eq!(all.max_age, None);
        assert!(all.takes_bucket("anything"));
        assert!(s.takes_bucket("sensors"));
        assert!(!s.takes_bucket("sensors2"));
        assert_eq!(c.queue.map_size, 2 * (256 * MIB + GIB) + 64 * MIB);
    }

    #[test]
    fn sizes() {
        let good: &[(&str, u64)] = &[
            ("0", 0),
            ("10", 10),
            ("10B", 10),
            ("10b", 10),
            ("500kB", 500_000),
            ("500KB", 500_000),
            ("500k", 500_000),
            ("500 kB", 500_000),
            ("2MB", 2_000_000),
            ("3GB", 3_000_000_000),
            ("1TB", 1_000_000_000_000),
            ("1KiB", 1024),
            ("64MiB", 64 << 20),
            ("64mib", 64 << 20),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("1.5GiB", 3 << 29),
            ("0.5kB", 500),
            (" 7MiB ", 7 << 20),
            ("18446744073709551615", u64::MAX),
            ("16EiB", 0), // placeholder replaced below: exbibytes are not a unit
        ];
        for &(s, want) in &good[..good.len() - 1] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "invalid size \"\""),
            ("kB", "invalid size \"kB\""),
            (
                "12XB",
                "invalid size \"12XB\" (use e.g. \"500kB\", \"64MiB\")",
            ),
            ("-5MiB", "invalid size \"-5MiB\""),
            ("+5", "invalid size"),
            ("1.2.3kB", "invalid size"),
            ("1.kB", "invalid size"),
            (".5kB", "invalid size"),
            ("5 M iB", "invalid size"),
            ("16EiB", "invalid size"),
            ("18446744073709551616", "too large"),
            ("20000000TiB", "too large"),
            ("99999999999999999999999999999999999999999B", "too large"),
        ];
        for &(s, want) in bad {
            let e = parse_size(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
        // A TOML integer is bytes; a negative one is refused.
        let c = ok("[listen]\nmax_body_size = 1048576");
        assert_eq!(c.listen.max_body_size, MIB);
    }

    #[test]
    fn durations() {
        let good: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("10", Duration::from_secs(10)),
            ("10ms", Duration::from_millis(10)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            ("1s", Duration::from_secs(1)),
            ("5m", Duration::from_secs(300)),
            ("5min", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("1w", Duration::from_secs(7 * 86_400)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h 30m 15s", Duration::from_secs(5415)),
            ("1s500ms", Duration::from_millis(1500)),
            (" 3s ", Duration::from_secs(3)),
        ];
        for &(s, want) in good {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "invalid duration \"\""),
            ("s", "invalid duration \"s\""),
            (
                "10 parsecs",
                "invalid duration \"10 parsecs\" (use e.g. \"10ms\"",
            ),
            ("-1s", "invalid duration"),
            ("1.5s", "invalid duration"),
            ("1y", "invalid duration"),
            ("1S", "invalid duration"),
            ("1h30", "invalid duration"),
            ("99999999999999999999999d", "too large"),
            ("999999999999999999w", "too large"),
            ("99999999999999999999", "too large"),
        ];
        for &(s, want) in bad {
            let e = parse_duration(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
        // A TOML integer is seconds.
        let c = ok("shutdown_timeout = 3\n[queue]\ncommit_interval = 0");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(3));
        assert_eq!(c.queue.commit_interval, Duration::ZERO);
    }

    #[test]
    fn env_substitution() {
        let env: HashMap<&str, &str> = [
            ("TOKEN", "t0k"),
            ("HOST", "influx.local"),
            ("SIZE", "10MiB"),
            ("EMPTY", ""),
        ]
        .into();
        let get = |k: &str| env.get(k).map(|v| v.to_string());
        let text = repl_on(
            "token = \"a-${TOKEN}-$${TOKEN}-$$-5$-$x\"",
            "max_queue_size = \"${SIZE}\"\nremote_bucket = \"${HOST}\"",
        )
        .replace("https://example.com", "https://${HOST}:8086");
        let c = parse(&text, Path::new(BASE), &get).unwrap();
        let r = &c.remotes[0];
        assert_eq!(r.url, "https://influx.local:8086");
        assert_eq!(r.token.as_ref().unwrap().expose(), "a-t0k-${TOKEN}-$-5$-$x");
        assert_eq!(c.replications[0].max_queue_size, 10 * MIB);
        assert_eq!(
            c.replications[0].remote_bucket.as_deref(),
            Some("influx.local")
        );

        // A set but empty variable substitutes as empty, and then the key's rule applies.
        let e = parse(&remote("token = \"${EMPTY}\""), Path::new(BASE), &get).unwrap_err();
        assert_eq!(e.to_string(), "remote \"cloud\": token: must not be empty");

        // Substituted text is not substituted again.
        let env2 = |k: &str| (k == "A").then(|| "${B}".to_string());
        let c = parse("data_dir = \"/x/${A}\"", Path::new(BASE), &env2).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/x/${B}"));

        // Unknown keys are reported before unset variables.
        let e = err("[listen]\ntokenz = \"${UNSET}\"");
        assert!(e.contains("unknown field `tokenz`"), "{e}");

        // The exact form of an unset-variable error.
        let e = parse(
            &remote("token = \"${INFLUX_TOKEN}\""),
            Path::new(BASE),
            &no_env,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::EnvNotSet { ref var, .. } if var == "INFLUX_TOKEN"));
        assert_eq!(
            e.to_string(),
            "remote \"cloud\": token: environment variable INFLUX_TOKEN is not set"
        );
    }

    fn write(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        #[cfg(not(unix))]
        let _ = mode;
        path
    }

    #[test]
    fn token_and_password_files() {
        let dir = tempfile::tempdir().unwrap();
        let token = write(dir.path(), "token", "s3cr3t-token \n\n", 0o600);
        write(dir.path(), "password", "pw\n", 0o400);
        write(dir.path(), "empty", " \n", 0o600);

        // Absolute path, trailing whitespace trimmed, no warning for 0600.
        let text = remote(&format!("token_file = {:?}", token.to_str().unwrap()));
        let c = parse(&text, Path::new(BASE), &no_env).unwrap();
        assert_eq!(
            c.remotes[0].token.as_ref().unwrap().expose(),
            "s3cr3t-token"
        );
        assert!(
            !c.warnings.iter().any(|w| w.contains("token_file")),
            "{:?}",
            c.warnings
        );

        // Relative paths are relative to the config's directory.
        let text = remote("api = \"v1\"\ntoken_file = \"token\"").replace(
            "api = \"v1\"\ntoken_file = \"token\"",
            "api = \"v1\"\nusername = \"u\"\npassword_file = \"password\"",
        );
        let c = parse(&text, dir.path(), &no_env).unwrap();
        assert_eq!(c.remotes[0].password.as_ref().unwrap().expose(), "pw");
        let c = parse(&remote("token_file = \"token\""), dir.path(), &no_env).unwrap();
        assert_eq!(
            c.remotes[0].token.as_ref().unwrap().expose(),
            "s3cr3t-token"
        );

        // Empty (after trimming) is an error naming the file.
        let e = parse(&remote("token_file = \"empty\""), dir.path(), &no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "remote \"cloud\": token_file {:?}: file is empty",
                dir.path().join("empty")
            )
        );

        // Missing file.
        let e = parse(&remote("token_file = \"missing\""), dir.path(), &no_env).unwrap_err();
        assert!(matches!(e, ConfigError::File { .. }));
        assert_eq!(
            e.to_string(),
            format!(
                "remote \"cloud\": token_file {:?}: No such file or directory",
                dir.path().join("missing")
            )
        );

        // Mutual exclusion.
        let e = parse(
            &remote("token = \"x\"\ntoken_file = \"token\""),
            dir.path(),
            &no_env,
        )
        .unwrap_err();
        assert!(e
            .to_string()
            .contains("token and token_file are mutually exclusive"));
    }

    /// Only a small regular file is read as a secret; anything else is an
    /// error naming the key and the file, returned at once.
    #[cfg(unix)]
    #[test]
    fn secret_files_must_be_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo only reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let max = MAX_SECRET_FILE as usize;
        write(dir.path(), "max", &"t".repeat(max), 0o600);
        write(dir.path(), "big", &"t".repeat(max + 1), 0o600);
        write(dir.path(), "huge", &"t".repeat(1 << 20), 0o600);
        std::fs::write(dir.path().join("latin1"), b"caf\xe9").unwrap();
        std::os::unix::fs::symlink(dir.path().join("max"), dir.path().join("link")).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "token_file",
                "/dev/zero",
                Some("not a regular file (a character device)"),
            ),
            (
                "token_file",
                "/dev/urandom",
                Some("not a regular file (a character device)"),
            ),
            ("token_file", "fifo", Some("not a regular file (a FIFO)")),
            (
                "token_file",
                "sub",
                Some("not a regular file (a directory)"),
            ),
            ("token_file", "big", Some("larger than 64 KiB")),
            ("token_file", "huge", Some("larger than 64 KiB")),
            ("token_file", "latin1", Some("not valid UTF-8")),
            ("token_file", "max", None),
            // A link to a regular file is fine (systemd credentials may be links).
            ("token_file", "link", None),
            (
                "password_file",
                "/dev/zero",
                Some("not a regular file (a character device)"),
            ),
            ("password_file", "big", Some("larger than 64 KiB")),
        ];
        for (key, file, want) in cases {
            let lines = if *key == "password_file" {
                format!("api = \"v1\"\nusername = \"u\"\npassword_file = {file:?}")
            } else {
                format!("token_file = {file:?}")
            };
            let text = remote(&lines);
            match (parse(&text, dir.path(), &no_env), want) {
                (Ok(c), None) => {
                    let r = &c.remotes[0];
                    assert_eq!(r.token.as_ref().unwrap().expose().len(), max, "{file}");
                }
                (Err(e), Some(want)) => {
                    let path = dir.path().join(file);
                    let named = format!("remote \"cloud\": {key} {path:?}: ");
                    let e = e.to_string();
                    assert!(e.starts_with(&format!("{named}{want}")), "{file}: {e}");
                }
                (got, want) => panic!("{key} = {file:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn loose_secret_file_permissions_warn() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "token", "t", 0o644);
        let c = parse(&remote("token_file = \"token\""), dir.path(), &no_env).unwrap();
        assert!(
            c.warnings.contains(&format!(
                "remote \"cloud\": token_file {path:?} is readable by others (mode 0644); chmod 600 it"
            )),
            "{:?}",
            c.warnings
        );
        write(dir.path(), "token", "t", 0o640);
        let c = parse(&remote("token_file = \"token\""), dir.path(), &no_env).unwrap();
        assert!(c
            .warnings
            .iter()
            .any(|w| w.contains("accessible by its group (mode 0640)")));
        write(dir.path(), "pw", "p", 0o604);
        let text = remote("api = \"v1\"\nusername = \"u\"\npassword_file = \"pw\"");
        let c = parse(&text, dir.path(), &no_env).unwrap();
        assert!(c
            .warnings
            .iter()
            .any(|w| w.starts_with("remote \"cloud\": password_file")
                && w.contains("readable by others (mode 0604)")));
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "pw", "SECRET-file\n", 0o600);
        let text = format!(
            "[listen]\naddress = \"0.0.0.0:8086\"\ntokens = [\"SECRET-listen\"]\n{}{}",
            remote("token = \"SECRET-token\"\nproxy = \"http://user:SECRET-proxy@proxy:3128\""),
            "[[remote]]\nname = \"v1\"\nurl = \"http://h\"\napi = \"v1\"\nusername = \"u\"\npassword_file = \"pw\"\n",
        );
        let c = parse(&text, dir.path(), &no_env).unwrap();
        let debug = format!("{c:?} {c:#?}");
        assert!(!debug.contains("SECRET"), "{debug}");
        assert!(debug.contains("<redacted>"));
        assert!(debug.contains("http://<redacted>@proxy:3128"));
        // The values are still there for the code that needs them.
        assert_eq!(c.listen.tokens[0].expose(), "SECRET-listen");
        assert_eq!(
            c.remotes[1].password.as_ref().unwrap().expose(),
            "SECRET-file"
        );
        assert_eq!(
            c.remotes[0].proxy.as_deref(),
            Some("http://user:SECRET-proxy@proxy:3128")
        );
        assert_eq!(format!("{}", c.listen.tokens[0]), "<redacted>");

        let leaky = [
            "[listen]\ntokens = \"SECRET\"".to_string(),
            "[listen]\ntokenz = [\"SECRET\"]".to_string(),
            "[listen]\ntokens = [\"SECRET\\n\"]".to_string(),
            remote("token = \"SECRET\\r\""),
            remote("token = \"SECRET-${UNSET}\""),
            remote("token = \"SECRET-${UNSET\""),
            remote("token = \"SECRET-${not valid}\""),
            remote("token = \"SECRET\"\ntoken_file = \"/x\""),
            remote("api = \"v1\"\npassword = \"SECRET\""),
            remote("token = [\"SECRET\"]"),
            remote("proxy = \"ftp://u:SECRET@h\""),
            remote_bare("url = \"https://u:SECRET@h\""),
            remote_bare("url = \"ftp://u:SECRET@h\""),
        ];
        for text in leaky {
            let e = err(&text);
            assert!(!e.contains("SECRET"), "{e}");
            assert!(!format!("{:?}", parse(&text, Path::new(BASE), &no_env)).contains("SECRET"));
        }
    }

    #[test]
    fn load_reads_file_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "config.toml", "data_dir = \"state\"\n", 0o644);
        let c = load(&path).unwrap();
        assert_eq!(c.data_dir, dir.path().join("state"));
        assert!(c.data_dir.is_absolute());

        let c = ok("data_dir = \"/srv/q\"");
        assert_eq!(c.data_dir, PathBuf::from("/srv/q"));

        let missing = dir.path().join("nope.toml");
        let e = load(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert_eq!(
            e.to_string(),
            format!("config file {missing:?}: No such file or directory")
        );
    }

    #[test]
    fn ca_file_is_resolved_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ca.pem", "-----BEGIN CERTIFICATE-----\n", 0o644);
        let c = parse(&remote("ca_file = \"ca.pem\""), dir.path(), &no_env).unwrap();
        assert_eq!(c.remotes[0].ca_file, Some(dir.path().join("ca.pem")));
    }

    #[test]
    fn browser_guard_keys() {
        let c = ok("");
        assert_eq!(c.listen.browsers, BrowserGuard::default());
        let c = ok(r#"
[listen]
allowed_hosts = ["GW-17.Local.", "192.168.1.20", "[fd00::1]"]
allowed_origins = ["HTTP://Grafana.local:3000", "https://ops.example"]
metrics_open = true
"#);
        assert_eq!(
            c.listen.browsers.allowed_hosts,
            ["gw-17.local", "192.168.1.20", "[fd00::1]"]
        );
        assert_eq!(
            c.listen.browsers.allowed_origins,
            ["http://grafana.local:3000", "https://ops.example"]
        );
        assert!(c.listen.browsers.metrics_open);
    }

    #[test]
    fn listen_addresses_and_tokens() {
        for addr in [
            "127.0.0.1:8086",
            "127.1.2.3:0",
            "[::1]:8086",
            "[::ffff:127.0.0.1]:1",
        ] {
            let c = ok(&format!("[listen]\naddress = \"{addr}\""));
            assert_eq!(c.listen.address, addr.parse().unwrap());
        }
        let c = ok("[listen]\naddress = \"0.0.0.0:9999\"\ntokens = [\"a\", \"b\"]");
        assert_eq!(
            c.listen.tokens,
            vec![Secret::new("a".into()), Secret::new("b".into())]
        );
    }

    #[test]
    fn map_size_rules() {
        let text = repl("max_queue_size = \"1000kB\"");
        // 2 × 1 000 000 + 64 MiB, rounded up to a whole MiB.
        assert_eq!(ok(&text).queue.map_size, 66 * MIB);
        let given = format!("[queue]\nmap_size = \"17MiB\"\n{text}");
        assert_eq!(ok(&given).queue.map_size, 17 * MIB);
        let odd = format!("[queue]\nmap_size = 20000001\n{text}");
        assert_eq!(ok(&odd).queue.map_size, 20 * MIB);
        let huge = format!(
            "{}[[replication]]\nname = \"b\"\nremote = \"cloud\"\nlocal_bucket = \"b\"\nmax_queue_size = \"16000000TiB\"",
            repl("max_queue_size = \"16000000TiB\"")
        );
        assert!(err(&huge).starts_with("queue.map_size: "), "{}", err(&huge));
    }

    #[test]
    fn warnings() {
        let c = ok(&format!(
            "{}{}",
            remote(""),
            remote("allow_insecure_tls = true").replace("cloud", "lab")
        ));
        assert!(c
            .warnings
            .contains(&"remote \"cloud\" is not used by any replication".to_string()));
        assert!(c
            .warnings
            .contains(&"remote \"lab\" is not used by any replication".to_string()));
        assert!(c
            .warnings
            .iter()
            .any(|w| w.starts_with("remote \"lab\": allow_insecure_tls = true")));

        let text = format!(
            "{}[[replication]]\nname = \"all\"\nremote = \"cloud\"\nlocal_bucket = \"*\"\nmax_queue_size = \"10MiB\"",
            // Small queues, so a 32-bit build adds no map_size warning.
            repl("max_queue_size = \"10MiB\"")
        );
        let c = ok(&text);
        assert_eq!(
            c.warnings,
            vec!["replication \"all\" and replication \"sensors\" both send bucket \"sensors\" to remote \"cloud\"".to_string()]
        );
        // Different remote buckets are different streams: no warning.
        let c = ok(&text.replace(
            "local_bucket = \"*\"",
            "local_bucket = \"*\"\nremote_bucket = \"archive\"",
        ));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn urls_are_normalised() {
        for (given, want) in [
            ("https://h", "https://h"),
            ("https://h/", "https://h"),
            ("HTTPS://h:443/a/b//", "https://h:443/a/b"),
            ("http://10.0.0.1:8086", "http://10.0.0.1:8086"),
            ("http://[::1]:8086/", "http://[::1]:8086"),
        ] {
            assert_eq!(check_http_url(given, false).as_deref(), Ok(want), "{given}");
        }
        assert_eq!(
            check_http_url("http://u:p@proxy:3128", true).as_deref(),
            Ok("http://u:p@proxy:3128")
        );
    }

    #[test]
    fn v1_remote_buckets() {
        for rb in ["telegraf", "telegraf/autogen"] {
            let c = ok(&repl_v1(&format!("remote_bucket = \"{rb}\"")));
            assert_eq!(c.replications[0].remote_bucket.as_deref(), Some(rb));
        }
        // For v2, any non-empty name goes.
        let c = ok(&repl("remote_bucket = \"a/b/c\""));
        assert_eq!(c.replications[0].remote_bucket.as_deref(), Some("a/b/c"));
    }

    #[test]
    fn names() {
        assert!(valid_name("a"));
        assert!(valid_name("Cloud_2.eu-west"));
        assert!(valid_name(&"n".repeat(64)));
        assert!(!valid_name(&"n".repeat(65)));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("é"));
        assert!(!valid_name("a/b"));
    }
}
