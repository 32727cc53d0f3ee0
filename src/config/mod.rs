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
mod tests;
