//! `[listen]`: the local write API, its tokens, its limits on requests, and what keeps a
//! web page in a browser on the gateway from using it. Its own module because it is the
//! agent's one open door: the rules on who may write, and how much, live together here.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;

use super::secret::check_secret;
use super::units::{duration_value, positive, size_value, Scalar, MIB};
use super::{invalid, ConfigError, Secret, Validator};

/// `listen.address` when the key is left out: loopback, where no token is needed.
const DEFAULT_ADDRESS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8086));
/// `listen.max_body_size` when the key is left out.
const DEFAULT_MAX_BODY_SIZE: u64 = 32 * MIB;
/// `listen.header_timeout` when the key is left out.
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `listen.body_timeout` when the key is left out.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// `listen.max_request_memory` when the key is left out: one largest (32 MiB) body with
/// its normalised lines and a good part of a second, and a peak under 256 MB on a 1 GB
/// board (64 concurrent 31 MiB bodies: 224 MB, against 257 MB with 128 MiB).
const DEFAULT_MAX_REQUEST_MEMORY: u64 = 96 * MIB;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
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

impl Validator<'_> {
    pub(super) fn listen(&mut self, raw: Option<RawListen>) -> Result<Listen, ConfigError> {
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
            None => DEFAULT_ADDRESS,
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
        let max_body_size = size_value(
            "listen.max_body_size",
            raw.max_body_size,
            DEFAULT_MAX_BODY_SIZE,
        )?;
        if max_body_size == 0 {
            return Err(invalid("listen.max_body_size", "must be greater than 0"));
        }
        let header_timeout = positive(
            "listen.header_timeout",
            duration_value(
                "listen.header_timeout",
                raw.header_timeout,
                DEFAULT_HEADER_TIMEOUT,
            )?,
        )?;
        let body_timeout = positive(
            "listen.body_timeout",
            duration_value(
                "listen.body_timeout",
                raw.body_timeout,
                DEFAULT_BODY_TIMEOUT,
            )?,
        )?;
        let browsers = browser_guard(raw.allowed_hosts, raw.allowed_origins, raw.metrics_open)?;
        let max_request_memory = size_value(
            "listen.max_request_memory",
            raw.max_request_memory,
            DEFAULT_MAX_REQUEST_MEMORY,
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
