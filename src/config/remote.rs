//! `[[remote]]`: an InfluxDB the agent ships to, how it authenticates, and how long it
//! is given. Its own module because a remote's checks are the most numerous: its URLs
//! (parsed with the `url` crate), which credentials go with which API, and a `Debug`
//! that keeps a proxy's credentials out of logs.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{duration_value, positive, Scalar};
use super::{check_name, invalid, non_empty, ConfigError, Secret, Validator};

/// `timeout` when the key is left out.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// `connect_timeout` when the key is left out.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `stall_timeout` when the key is left out.
const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// `probe_interval` when the key is left out.
const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// `min_backoff` when the key is left out.
const DEFAULT_MIN_BACKOFF: Duration = Duration::from_secs(1);
/// `max_backoff` when the key is left out.
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// `max_in_flight` when the key is left out.
const DEFAULT_MAX_IN_FLIGHT: usize = 2;
/// The most requests a worker keeps in flight: past a few, a long round trip
/// is covered and more only multiplies what a failure sends again.
pub const MAX_IN_FLIGHT: usize = 8;

/// Which write API a remote speaks: InfluxDB 2.x/Cloud (`"v2"`) or 1.x (`"v1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    V1,
    V2,
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
    /// Requests a replication's worker may have in flight to this remote at
    /// once, when the answers are slow to come back (`ship`, "sent ahead").
    pub max_in_flight: usize,
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
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemote {
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
    max_in_flight: Option<i64>,
}

impl Validator<'_> {
    /// Every `[[remote]]`, each under a valid name no other remote has.
    pub(super) fn remotes(&mut self, raw: Vec<RawRemote>) -> Result<Vec<Remote>, ConfigError> {
        let mut remotes = Vec::with_capacity(raw.len());
        let mut names = HashMap::new();
        for (i, r) in raw.into_iter().enumerate() {
            check_name("remote", i, &r.name, &mut names)?;
            remotes.push(self.remote(r)?);
        }
        Ok(remotes)
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
            duration_value(&key("timeout"), r.timeout, DEFAULT_TIMEOUT)?,
        )?;
        let connect_timeout = positive(
            &key("connect_timeout"),
            duration_value(
                &key("connect_timeout"),
                r.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
        )?;
        let stall_timeout = positive(
            &key("stall_timeout"),
            duration_value(
                &key("stall_timeout"),
                r.stall_timeout,
                DEFAULT_STALL_TIMEOUT,
            )?,
        )?;
        let probe_interval = positive(
            &key("probe_interval"),
            duration_value(
                &key("probe_interval"),
                r.probe_interval,
                DEFAULT_PROBE_INTERVAL,
            )?,
        )?;
        let min_backoff = positive(
            &key("min_backoff"),
            duration_value(&key("min_backoff"), r.min_backoff, DEFAULT_MIN_BACKOFF)?,
        )?;
        let max_backoff = duration_value(&key("max_backoff"), r.max_backoff, DEFAULT_MAX_BACKOFF)?;
        if max_backoff < min_backoff {
            return Err(invalid(
                key("max_backoff"),
                format!("must not be less than min_backoff ({min_backoff:?})"),
            ));
        }
        let max_in_flight = match r.max_in_flight {
            None => DEFAULT_MAX_IN_FLIGHT,
            Some(n) if (1..=MAX_IN_FLIGHT as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    key("max_in_flight"),
                    format!("{n} is not a number of requests from 1 to {MAX_IN_FLIGHT}"),
                ))
            }
        };
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
            max_in_flight,
        })
    }
}

/// Checks an `http://`/`https://` URL and returns it with a lower-case scheme and no
/// trailing `/`. Messages quote the URL only when it cannot hold credentials.
pub(super) fn check_http_url(url: &str, allow_userinfo: bool) -> Result<String, String> {
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
