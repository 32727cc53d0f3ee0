//! The HTTP client of one replication: builds write URLs for the remote's API
//! (v2 or v1), keeps one keep-alive connection, and turns every answer into
//! an [`Answer`] without ever putting a token into a message.
//!
//! Stalls are found by progress, not by a deadline for the whole request: a
//! link that crawls still carries a batch, however long it takes, while one
//! that black-holes packets is given up on after `stall_timeout` without a
//! byte moving. Every socket write and read gets `stall_timeout` (ureq's
//! per-write and per-read timeouts, i.e. `SO_SNDTIMEO`/`SO_RCVTIMEO`); while
//! the answer is awaited, a send queue that still shrinks counts as progress
//! too (see [`super::transport`]). The body is handed to ureq through a
//! reader that takes the link's cap and reports how much of it has gone,
//! for status and for the count of bytes put on the wire.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use std::io::Read as _;

use crate::config::{Api, Remote};

use super::answer::{self, Detail};
use super::transport::WatchedTcpConnector;

/// What came back from one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The remote answered with this status.
    Status {
        code: u16,
        /// The remote's message (its JSON `message` when there is one),
        /// whole as read: [`answer::shorten`] it before logging.
        message: String,
        retry_after: Option<String>,
        /// What the body says about the lines sent.
        detail: Detail,
    },
    /// No answer: connect, TLS, timeout, reset.
    Transport(String),
}

#[cfg(test)]
impl Answer {
    /// An answer with `code` and `message`, no `Retry-After` nor detail.
    pub fn with_status(code: u16, message: &str) -> Answer {
        Answer::Status {
            code,
            message: message.into(),
            retry_after: None,
            detail: Detail::default(),
        }
    }
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    api: Api,
    org: Option<String>,
    authorization: Option<String>,
    /// The credentials sent (token, password, their Basic encoding): cut
    /// out of whatever the remote says back, since some remotes (proxies,
    /// gateways) quote the request's credentials in their error pages.
    secrets: Vec<String>,
    /// Where a probe connects (the remote's host and port); `None` through a
    /// proxy, where a connect would test the proxy, not the remote.
    probe_addr: Option<(String, u16)>,
    connect_timeout: Duration,
}

impl Client {
    pub fn new(remote: &Remote) -> Result<Client, String> {
        let mut tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .disable_verification(remote.allow_insecure_tls);
        if let Some(path) = &remote.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "remote \"{}\": ca_file {}: {e}",
                    remote.name,
                    path.display()
                )
            })?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    format!(
                        "remote \"{}\": ca_file {}: {e}",
                        remote.name,
                        path.display()
                    )
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "remote \"{}\": ca_file {} holds no PEM certificate",
                    remote.name,
                    path.display()
                ));
            }
            tls = tls.root_certs(RootCerts::Specific(Arc::new(certs)));
        }
        let probe_addr = probe_addr(&remote.url);
        let proxy = match &remote.proxy {
            Some(p) => Some(
                ureq::Proxy::new(p)
                    .map_err(|e| format!("remote \"{}\": proxy: {e}", remote.name))?,
            ),
            None => ureq::Proxy::try_from_env(),
        };
        let probe_addr = probe_addr.filter(|_| proxy.is_none());
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect is never followed: ureq would repeat the write as a
            // GET, and a captive portal's 200 would pass for a delivery.
            .max_redirects(0)
            .timeout_connect(Some(remote.connect_timeout))
            .timeout_per_write(Some(remote.stall_timeout))
            .timeout_per_read(Some(remote.stall_timeout))
            // Once the body is sent, the remote has `timeout` to answer (a
            // remote trickling its answer a byte at a time never stalls).
            .timeout_recv_response(Some(remote.timeout))
            .timeout_recv_body(Some(remote.timeout))
            .user_agent(concat!("edge-replicator/", env!("CARGO_PKG_VERSION")))
            // A connection kept for each request a worker has in flight:
            // one opened anew costs a round trip or two (TCP, TLS) on
            // exactly the links where requests go ahead.
            .max_idle_connections_per_host(remote.max_in_flight.max(2))
            .max_idle_connections(remote.max_in_flight.max(2) + 8)
            .max_idle_age(Duration::from_secs(50))
            .proxy(proxy)
            .tls_config(tls.build())
            .build();
        let authorization = match (&remote.username, &remote.password, &remote.token) {
            (Some(user), Some(pass), _) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{user}:{}", pass.expose()))
            )),
            (_, _, Some(token)) => Some(format!("Token {}", token.expose())),
            _ => None,
        };
        let secrets = [&remote.token, &remote.password]
            .into_iter()
            .flatten()
            .map(|s| s.expose().to_string())
            .chain(
                authorization
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Basic "))
                    .map(str::to_string),
            )
            .filter(|s| !s.is_empty())
            .collect();
        Ok(Client {
            agent: agent(config),
            base: remote.url.clone(),
            api: remote.api,
            org: remote.org.clone(),
            authorization,
            secrets,
            probe_addr,
            connect_timeout: remote.connect_timeout,
        })
    }

    /// The write URL for a remote bucket (`db` or `db/rp` for v1).
    pub fn write_url(&self, bucket: &str) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        match self.api {
            Api::V2 => {
                if let Some(org) = &self.org {
                    q.append_pair("org", org);
                }
                q.append_pair("bucket", bucket);
                q.append_pair("precision", "ns");
                format!("{}/api/v2/write?{}", self.base, q.finish())
            }
            Api::V1 => {
                let (db, rp) = bucket.split_once('/').unwrap_or((bucket, ""));
                q.append_pair("db", db);
                if !rp.is_empty() {
                    q.append_pair("rp", rp);
                }
                q.append_pair("precision", "ns");
                format!("{}/write?{}", self.base, q.finish())
            }
        }
    }

    /// Where lines sent to `bucket` go, for the start-up log and the
    /// agent's write-only answers: the write URL, or with `None` (a `*`
    /// replication without `remote_bucket`) the URL with placeholders for
    /// each write's own bucket (v2) or database and retention policy (v1).
    pub fn destination(&self, bucket: Option<&str>) -> String {
        if let Some(b) = bucket {
            return self.write_url(b);
        }
        let (pattern, shown) = match self.api {
            Api::V2 => ("{bucket}", "each write's own bucket"),
            Api::V1 => (
                "{db}/{rp}",
                "each write's own database and retention policy",
            ),
        };
        let url = self
            .write_url(pattern)
            .replace("%7Bbucket%7D", "{bucket}")
            .replace("%7Bdb%7D", "{db}")
            .replace("%7Brp%7D", "{rp}");
        format!("{url} ({shown})")
    }

    /// POSTs a gzip body. Never fails: every outcome is an [`Answer`].
    /// `progress` is called with the bytes of the body handed to the
    /// connection so far, each time more have gone.
    /// `throttle` is asked how many of the bytes it is offered may go now
    /// (it may wait, and grants at least one).
    pub fn post(
        &self,
        url: &str,
        gzip_body: &[u8],
        throttle: &mut dyn FnMut(usize) -> usize,
        progress: &mut dyn FnMut(u64),
    ) -> Answer {
        let mut req = self
            .agent
            .post(url)
            .header("Content-Encoding", "gzip")
            .header("Content-Type", "text/plain; charset=utf-8")
            // Given, so that the body read from a reader goes with a length
            // rather than chunked, as a byte slice would.
            .header("Content-Length", gzip_body.len().to_string());
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let mut reader = Progress {
            body: gzip_body,
            done: 0,
            throttle,
            report: progress,
        };
        match req.send(ureq::SendBody::from_reader(&mut reader)) {
            Ok(mut resp) => {
                let code = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let mut detail = Detail::default();
                let message = if (300..400).contains(&code) {
                    let to = resp
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?");
                    format!("HTTP {code}: redirect to {to} not followed (check the remote's url)")
                } else {
                    // A bounded prefix: the useful bodies (many lines named)
                    // are the long ones. A body longer than this is not
                    // drained, and ureq then does not reuse the connection.
                    let mut body = Vec::new();
                    let _ = resp
                        .body_mut()
                        .as_reader()
                        .take(answer::MAX_BODY)
                        .read_to_end(&mut body);
                    let text = answer::message_of(&body);
                    detail = answer::read_detail(&body, &text);
                    if (200..300).contains(&code) {
                        // 2xx bodies are usually empty; 3.x puts the lines a
                        // partial write refused there.
                        text
                    } else if text.is_empty() {
                        format!("HTTP {code}")
                    } else {
                        format!("HTTP {code}: {text}")
                    }
                };
                Answer::Status {
                    code,
                    message: self.redact(message),
                    retry_after,
                    detail,
                }
            }
            Err(e) => Answer::Transport(self.redact(describe_transport(&e))),
        }
    }

    /// Whether the remote can be probed (no proxy in between).
    pub fn can_probe(&self) -> bool {
        self.probe_addr.is_some()
    }

    /// Whether a TCP connection to the remote opens within
    /// `connect_timeout`: the cheapest sign that the link is back (a
    /// handshake and a close, no TLS, no request). Resolves the name anew,
    /// so a remote that was unresolvable is probed too.
    pub fn probe(&self) -> bool {
        use std::net::{TcpStream, ToSocketAddrs};
        let Some((host, port)) = &self.probe_addr else {
            return false;
        };
        let Ok(addrs) = (host.as_str(), *port).to_socket_addrs() else {
            return false;
        };
        addrs
            .into_iter()
            .any(|a| TcpStream::connect_timeout(&a, self.connect_timeout).is_ok())
    }

    fn redact(&self, text: String) -> String {
        redact(text, &self.secrets)
    }
}

/// Secrets shorter than this are redacted only where they stand alone.
const SHORT_SECRET: usize = 8;

/// `text` with every occurrence of each secret replaced by `<redacted>`.
///
/// A short secret (a test token like `abc`) would otherwise cut letters out
/// of every word that holds it ("connec<redacted>ion"), hiding the message
/// it was meant to protect: such a secret is replaced only where neither
/// neighbour is a letter, a digit or `_`.
fn redact(mut text: String, secrets: &[String]) -> String {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if !text.contains(s.as_str()) {
            continue;
        }
        if s.len() >= SHORT_SECRET {
            text = text.replace(s.as_str(), "<redacted>");
            continue;
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find(s.as_str()) {
            out.push_str(&rest[..at]);
            let before = out.chars().next_back();
            let after = rest[at + s.len()..].chars().next();
            if before.is_some_and(word) || after.is_some_and(word) {
                out.push_str(s);
            } else {
                out.push_str("<redacted>");
            }
            rest = &rest[at + s.len()..];
        }
        out.push_str(rest);
        text = out;
    }
    text
}

/// An agent on ureq's own connector chain (HTTP CONNECT proxy, TCP, TLS)
/// with the TCP step replaced by [`WatchedTcpConnector`], so that a thin
/// link still carrying a body is not taken for a stall.
fn agent(config: ureq::config::Config) -> ureq::Agent {
    use ureq::unversioned::resolver::DefaultResolver;
    use ureq::unversioned::transport::{ConnectProxyConnector, Connector, RustlsConnector};
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(WatchedTcpConnector)
            .chain(RustlsConnector::default());
    ureq::Agent::with_parts(config, connector, DefaultResolver::default())
}

/// The host and port of an `http(s)://host[:port]` URL.
fn probe_addr(url: &str) -> Option<(String, u16)> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let port = uri.port_u16().or(match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    })?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port))
}

/// A request body that reports how much of it ureq has taken. ureq takes
/// the body a buffer at a time as the connection accepts it, so the count
/// runs at most one buffer ahead of the socket.
struct Progress<'a> {
    body: &'a [u8],
    done: usize,
    throttle: &'a mut dyn FnMut(usize) -> usize,
    report: &'a mut dyn FnMut(u64),
}

impl std::io::Read for Progress<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = buf.len().min(self.body.len() - self.done);
        if n > 0 {
            n = (self.throttle)(n).clamp(1, n);
        }
        buf[..n].copy_from_slice(&self.body[self.done..self.done + n]);
        self.done += n;
        if n > 0 {
            (self.report)(self.done as u64);
        }
        Ok(n)
    }
}

/// How the messages of an abandoned transfer begin: nothing moved within
/// `stall_timeout`, or no answer within `timeout`.
const STALLED: &str = "stalled: ";
const NO_ANSWER: &str = "timeout (";

/// Whether `answer` is a transfer abandoned for lack of progress or of an
/// answer (the link, not the remote, is at fault; the batch may be too
/// large for it).
pub fn stalled(answer: &Answer) -> bool {
    matches!(answer, Answer::Transport(m) if m.starts_with(STALLED) || m.starts_with(NO_ANSWER))
}

fn describe_transport(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(ureq::Timeout::PerWrite) => {
            format!("{STALLED}nothing sent within stall_timeout")
        }
        ureq::Error::Timeout(ureq::Timeout::PerRead) => {
            format!("{STALLED}nothing received within stall_timeout")
        }
        // Connect has its own timeout: the remote is unreachable, not slow.
        ureq::Error::Timeout(ureq::Timeout::Connect) => "connect timeout".to_string(),
        ureq::Error::Timeout(t) => format!("{NO_ANSWER}{t})"),
        // rustls reports every TLS failure (certificate, name, handshake)
        // as InvalidData; a plain socket never does.
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            format!("TLS error: {io}")
        }
        ureq::Error::Io(io) => format!("connection error: {io}"),
        ureq::Error::HostNotFound => "host not found".to_string(),
        ureq::Error::ConnectionFailed => "connection failed".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_go_to_the_host_and_port_of_the_url() {
        assert_eq!(
            probe_addr("https://eu-central-1-1.aws.cloud2.influxdata.com"),
            Some(("eu-central-1-1.aws.cloud2.influxdata.com".into(), 443))
        );
        assert_eq!(
            probe_addr("http://10.0.0.5:8086"),
            Some(("10.0.0.5".into(), 8086))
        );
        assert_eq!(probe_addr("http://[::1]:8181"), Some(("::1".into(), 8181)));
        assert_eq!(probe_addr("http://gw"), Some(("gw".into(), 80)));
        assert_eq!(probe_addr("not a url"), None);
    }

    #[test]
    fn short_secrets_are_redacted_where_they_stand_alone() {
        let secrets = ["t".to_string(), "s3cret-token-1234".to_string()];
        assert_eq!(
            redact("connection reset; token t refused".into(), &secrets),
            "connection reset; token <redacted> refused"
        );
        assert_eq!(redact("t".into(), &secrets), "<redacted>");
        assert_eq!(redact("auth=t,".into(), &secrets), "auth=<redacted>,");
        // A long secret goes wherever it appears, even inside a word.
        assert_eq!(
            redact("xs3cret-token-1234y and s3cret-token-1234".into(), &secrets),
            "x<redacted>y and <redacted>"
        );
        assert_eq!(
            redact("nothing here".into(), &[String::new()]),
            "nothing here"
        );
    }
}
