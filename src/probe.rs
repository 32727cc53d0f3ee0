//! `check-config --probe`: proves, before a device is shipped or a config
//! rolled out, that each remote can be reached and will take our writes.
//!
//! A valid config can still fail on the first day: a host name the board
//! cannot resolve, a firewall, a CA the device does not trust (or a clock so
//! wrong that every certificate looks expired), a token without write
//! permission, a bucket nobody created. Each of those shows today only as a
//! growing queue. The probe walks the steps a write takes, in order, and
//! stops at the first that fails, so the line it prints names one cause and
//! its fix:
//!
//! 1. resolve the url's host (bounded by `connect_timeout`);
//! 2. open a TCP connection (bounded by `connect_timeout`);
//! 3. for each destination the replications write to, POST an empty gzip
//!    body to the write endpoint the shipper uses, with its credentials and
//!    TLS settings (bounded by `timeout`): TLS (chain, host name), auth and
//!    the bucket or database are judged from that one answer.
//!
//! An empty write is what InfluxDB itself sends to validate a remote before
//! `replication create`. InfluxDB 1.x and VictoriaMetrics answer 204 when
//! the credentials and the database are right; InfluxDB 2.x answers 400
//! `writing requires points` once it has found the bucket and checked the
//! token's write permission, so that answer counts as accepted too. Nothing
//! is written to the remote either way.
//!
//! Through a proxy (`proxy`, or the `*_PROXY` environment) steps 1 and 2 are
//! the proxy's to do, and the probe starts at step 3. No message holds a
//! token or password: the write's answers pass through the client's
//! redaction, and the probe's own messages never quote a credential.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config::{Api, Config, Remote};
use crate::ship::client::{Answer, Client};

/// The step of a probe that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The client could not be built (e.g. an unreadable `ca_file`).
    Setup,
    Resolve,
    Connect,
    Tls,
    Auth,
    /// The write endpoint or the bucket/database.
    Destination,
    /// Any other answer (overload, rate limit, timeout after connect).
    Write,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Setup => "setup",
            Step::Resolve => "name resolution",
            Step::Connect => "connect",
            Step::Tls => "TLS",
            Step::Auth => "auth",
            Step::Destination => "destination",
            Step::Write => "write",
        }
    }
}

/// One failure: what failed, where, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub step: Step,
    /// The bucket (v2) or `db[/rp]` (v1) when the failure is its own.
    pub destination: Option<String>,
    pub what: String,
    pub fix: String,
}

/// What the probe of one remote found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteProbe {
    pub remote: String,
    pub url: String,
    /// What passed, in order (shown on the ok line).
    pub passed: Vec<String>,
    pub failures: Vec<Failure>,
}

impl RemoteProbe {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The lines `check-config --probe` prints: one for the remote, and one
    /// per destination that failed on its own.
    pub fn lines(&self) -> Vec<String> {
        let head = format!("remote \"{}\" ({})", self.remote, self.url);
        if self.failures.is_empty() {
            return vec![format!("{head}: ok: {}", self.passed.join(", "))];
        }
        self.failures
            .iter()
            .map(|f| match &f.destination {
                Some(d) => format!(
                    "{head}: {} failed for \"{d}\": {}; fix: {}",
                    f.step.as_str(),
                    f.what,
                    f.fix
                ),
                None => format!(
                    "{head}: {} failed: {}; fix: {}",
                    f.step.as_str(),
                    f.what,
                    f.fix
                ),
            })
            .collect()
    }
}

/// The destinations each remote receives, with the replications that write
/// there; `None` stands for "each local bucket under its own name"
/// (`local_bucket = "*"` without `remote_bucket`), which cannot be listed
/// in advance.
fn destinations(config: &Config, remote: &str) -> Vec<(Option<String>, Vec<String>)> {
    let mut out: Vec<(Option<String>, Vec<String>)> = Vec::new();
    for r in config.replications.iter().filter(|r| r.remote == remote) {
        let dest = match (&r.remote_bucket, r.local_bucket.as_str()) {
            (Some(b), _) => Some(b.clone()),
            (None, "*") => None,
            (None, local) => Some(local.to_string()),
        };
        match out.iter_mut().find(|(d, _)| *d == dest) {
            Some((_, names)) => names.push(r.name.clone()),
            None => out.push((dest, vec![r.name.clone()])),
        }
    }
    out
}

/// Probes every remote of `config`, concurrently (each bounded by its own
/// timeouts), in the config's order.
pub fn probe_all(config: &Config) -> Vec<RemoteProbe> {
    std::thread::scope(|s| {
        let handles: Vec<_> = config
            .remotes
            .iter()
            .map(|r| {
                let dests = destinations(config, &r.name);
                s.spawn(move || probe_remote(r, &dests))
            })
            .collect();
        handles
            .into_iter()
            .zip(&config.remotes)
            .map(|(h, r)| {
                h.join().unwrap_or_else(|_| RemoteProbe {
                    remote: r.name.clone(),
                    url: r.url.clone(),
                    passed: Vec::new(),
                    failures: vec![Failure {
                        step: Step::Setup,
                        destination: None,
                        what: "the probe stopped unexpectedly".into(),
                        fix: "report this as a bug".into(),
                    }],
                })
            })
            .collect()
    })
}

/// The host (without IPv6 brackets) and port of a validated remote url.
fn host_port(url: &str) -> Option<(String, u16)> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Some((host.to_string(), port))
}

/// Resolves `host:port` within `limit`: the system resolver has no timeout
/// of its own, so it runs on a thread that is left behind if it hangs.
fn resolve(host: &str, port: u16, limit: Duration) -> Result<Vec<SocketAddr>, String> {
    let (tx, rx) = mpsc::channel();
    let target = (host.to_string(), port);
    std::thread::spawn(move || {
        let _ = tx.send(
            target
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>())
                .map_err(|e| e.to_string()),
        );
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(format!("{host} has no address")),
        Ok(Err(e)) => Err(format!("{host}: {e}")),
        Err(_) => Err(format!(
            "{host}: no answer from the resolver within {}",
            humantime::format_duration(limit)
        )),
    }
}

/// Whether ureq will send this remote's requests through a proxy.
fn proxied(remote: &Remote) -> bool {
    remote.proxy.is_some() || ureq::Proxy::try_from_env().is_some()
}

/// An empty gzip member: the body the shipper would send for no lines.
fn empty_gzip() -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(b"");
    enc.finish().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Probes one remote: see the module comment for the steps.
pub fn probe_remote(remote: &Remote, dests: &[(Option<String>, Vec<String>)]) -> RemoteProbe {
    let mut p = RemoteProbe {
        remote: remote.name.clone(),
        url: remote.url.clone(),
        passed: Vec::new(),
        failures: Vec::new(),
    };
    let fail = |p: &mut RemoteProbe, step, what: String, fix: &str| {
        p.failures.push(Failure {
            step,
            destination: None,
            what,
            fix: fix.to_string(),
        });
    };
    if proxied(remote) {
        p.passed.push("through a proxy".into());
    } else {
        let Some((host, port)) = host_port(&remote.url) else {
            fail(
                &mut p,
                Step::Setup,
                "the url has no host".into(),
                "set url to http://HOST:PORT or https://HOST:PORT",
            );
            return p;
        };
        let addrs = match resolve(&host, port, remote.connect_timeout) {
            Ok(a) => a,
            Err(e) => {
                fail(
                    &mut p,
                    Step::Resolve,
                    e,
                    "check the url's host name and the board's DNS (/etc/resolv.conf)",
                );
                return p;
            }
        };
        let started = Instant::now();
        let mut errors = Vec::new();
        let mut connected = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, remote.connect_timeout) {
                Ok(_) => {
                    connected = Some(*a);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => errors.push(format!(
                    "{a}: no answer within connect_timeout {}",
                    humantime::format_duration(remote.connect_timeout)
                )),
                Err(e) => errors.push(format!("{a}: {e}")),
            }
        }
        match connected {
            Some(a) => p
                .passed
                .push(format!("connected to {a} in {}", ms(started.elapsed()))),
            None => {
                fail(
                    &mut p,
                    Step::Connect,
                    errors.join(", "),
                    "check that the remote is up, the url's port, and firewalls on the way",
                );
                return p;
            }
        }
    }
    let client = match Client::new(remote) {
        Ok(c) => c,
        Err(e) => {
            fail(&mut p, Step::Setup, e, "fix the remote's ca_file or proxy");
            return p;
        }
    };
    let body = empty_gzip();
    let mut tls_noted = false;
    for (dest, repls) in dests {
        let Some(bucket) = dest else {
            p.passed.push(format!(
                "destinations of {} not probed (each local bucket under its own name)",
                names(repls)
            ));
            continue;
        };
        let url = client.write_url(bucket);
        let started = Instant::now();
        let answer = client.post(&url, &body, &mut |n| n, &mut |_| {});
        match judge(remote, bucket, repls, answer) {
            Verdict::Accepted(how) => {
                if remote.url.starts_with("https") && !tls_noted {
                    tls_noted = true;
                    p.passed.push(if remote.allow_insecure_tls {
                        "TLS not verified (allow_insecure_tls)".into()
                    } else {
                        "TLS verified".into()
                    });
                }
                p.passed
                    .push(format!("\"{bucket}\" {how} in {}", ms(started.elapsed())));
            }
            Verdict::Failed(f) => {
                let whole_remote = f.destination.is_none();
                p.failures.push(f);
                // TLS, transport and credential failures are the remote's:
                // every other destination would print the same line.
                if whole_remote {
                    return p;
                }
            }
        }
    }
    if dests.is_empty() {
        p.passed.push("no replication writes to it".into());
    }
    p
}

fn names(repls: &[String]) -> String {
    let quoted: Vec<String> = repls.iter().map(|r| format!("\"{r}\"")).collect();
    format!("replication {}", quoted.join(", "))
}

enum Verdict {
    Accepted(&'static str),
    Failed(Failure),
}

/// Whether a 400 is InfluxDB 2.x refusing a body without points, which it
/// does only after finding the bucket and checking the token. Only that
/// wording counts: any other 400 may be about the remote, not the body.
fn is_no_data(message: &str) -> bool {
    message
        .to_ascii_lowercase()
        .contains("writing requires points")
}

/// Reads the answer to the empty write to `bucket`.
fn judge(remote: &Remote, bucket: &str, repls: &[String], answer: Answer) -> Verdict {
    let remote_fail = |step, what: String, fix: String| {
        Verdict::Failed(Failure {
            step,
            destination: None,
            what,
            fix,
        })
    };
    let dest_fail = |step, what: String, fix: String| {
        Verdict::Failed(Failure {
            step,
            destination: Some(bucket.to_string()),
            what,
            fix,
        })
    };
    let (kind, setting) = match remote.api {
        Api::V2 => ("bucket", "token (or token_file)"),
        Api::V1 => ("database", "username and password (or password_file)"),
    };
    match answer {
        Answer::Status { code, .. } if (200..300).contains(&code) => {
            Verdict::Accepted("accepted an empty write")
        }
        Answer::Status {
            code: 400, message, ..
        } if is_no_data(&message) => {
            Verdict::Accepted("found, write permitted (400 for the empty body)")
        }
        Answer::Status {
            code: 401, message, ..
        } => remote_fail(
            Step::Auth,
            format!("{message} (credentials refused)"),
            format!("check the remote's {setting}"),
        ),
        Answer::Status {
            code: 403, message, ..
        } => dest_fail(
            Step::Auth,
            format!("{message} (may not write to this {kind})"),
            format!("grant the remote's {setting} write permission on {kind} \"{bucket}\""),
        ),
        Answer::Status {
            code: 404, message, ..
        } if message.contains(bucket_name(bucket)) => dest_fail(
            Step::Destination,
            format!("{message} ({kind} not found)"),
            format!(
                "create {kind} \"{}\" on the remote, or fix remote_bucket of {}",
                bucket_name(bucket),
                names(repls)
            ),
        ),
        Answer::Status {
            code: 404, message, ..
        } => remote_fail(
            Step::Destination,
            format!("{message} (no write endpoint at this url)"),
            format!(
                "check the remote's url and api (now {}: v2 writes to /api/v2/write, v1 to /write)",
                match remote.api {
                    Api::V2 => "v2",
                    Api::V1 => "v1",
                }
            ),
        ),
        Answer::Status { code, message, .. } if (300..400).contains(&code) => remote_fail(
            Step::Write,
            message,
            "set url to the address the remote redirects to".into(),
        ),
        Answer::Status { code, message, .. } => remote_fail(
            Step::Write,
            if message.is_empty() {
                format!("HTTP {code}")
            } else {
                message
            },
            "the remote is up but refuses writes now: see its logs, or probe again later".into(),
        ),
        Answer::Transport(msg) if msg.starts_with("TLS error") => {
            let fix = if msg.contains("UnknownIssuer") || msg.contains("BadSignature") {
                "the remote's certificate is not signed by a CA this board trusts: \
                 set ca_file to the CA that signed it, or have the remote send its whole chain"
            } else if msg.contains("NotValidForName") {
                "the certificate does not name the url's host: use a host name the \
                 certificate covers in url, or reissue the certificate"
            } else if msg.contains("Expired") || msg.contains("NotValidYet") {
                "the certificate is outside its validity dates: renew it, or set this \
                 board's clock (a board without a real-time clock starts in the past)"
            } else if remote.url.starts_with("http://") {
                "the url says http:// but the server does not speak plain HTTP there"
            } else {
                "check that the remote serves HTTPS on this port, and its certificate"
            };
            remote_fail(Step::Tls, msg, fix.into())
        }
        Answer::Transport(msg) if msg.starts_with("timeout") => remote_fail(
            Step::Write,
            format!(
                "{msg}: no whole answer within timeout {}",
                humantime::format_duration(remote.timeout)
            ),
            "the remote or the link is slow: raise the remote's timeout, or probe again".into(),
        ),
        Answer::Transport(msg) => remote_fail(
            Step::Connect,
            msg,
            "check that the remote is up, the url, and firewalls or proxies on the way".into(),
        ),
    }
}

/// The database of a v1 `db/rp` destination (the name a 404 quotes), or
/// the bucket itself.
fn bucket_name(bucket: &str) -> &str {
    bucket.split_once('/').map_or(bucket, |(db, _)| db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(api: Api) -> Remote {
        Remote {
            name: "cloud".into(),
            url: "https://example.invalid".into(),
            token: None,
            username: None,
            password: None,
            org: None,
            api,
            allow_insecure_tls: false,
            ca_file: None,
            proxy: None,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            probe_interval: Duration::from_secs(10),
            max_in_flight: 2,
        }
    }

    fn status(code: u16, message: &str) -> Answer {
        Answer::with_status(code, message)
    }

    fn failure(v: Verdict) -> Failure {
        match v {
            Verdict::Failed(f) => f,
            Verdict::Accepted(how) => panic!("accepted: {how}"),
        }
    }

    #[test]
    fn answers_are_read_as_influxdb_means_them() {
        let v2 = remote(Api::V2);
        let r = ["r1".to_string()];
        assert!(matches!(
            judge(&v2, "b", &r, status(204, "")),
            Verdict::Accepted(_)
        ));
        assert!(matches!(
            judge(&v2, "b", &r, status(400, "writing requires points")),
            Verdict::Accepted(_)
        ));
        // Any other 400 is not an acceptance.
        assert_eq!(
            failure(judge(&v2, "b", &r, status(400, "unable to parse"))).step,
            Step::Write
        );
        let f = failure(judge(&v2, "b", &r, status(401, "unauthorized access")));
        assert_eq!((f.step, f.destination.as_deref()), (Step::Auth, None));
        assert!(f.fix.contains("token"), "{f:?}");
        let f = failure(judge(&v2, "b", &r, status(403, "insufficient permissions")));
        assert_eq!((f.step, f.destination.as_deref()), (Step::Auth, Some("b")));
        let f = failure(judge(&v2, "b", &r, status(404, "bucket \"b\" not found")));
        assert_eq!(
            (f.step, f.destination.as_deref()),
            (Step::Destination, Some("b"))
        );
        assert!(f.fix.contains("replication \"r1\""), "{f:?}");
        // A 404 that does not name the bucket is a wrong endpoint.
        let f = failure(judge(&v2, "b", &r, status(404, "404 page not found")));
        assert_eq!(
            (f.step, f.destination.as_deref()),
            (Step::Destination, None)
        );
        assert!(f.fix.contains("api"), "{f:?}");
        let v1 = remote(Api::V1);
        let f = failure(judge(
            &v1,
            "db/rp",
            &r,
            status(404, "database not found: \"db\""),
        ));
        assert!(f.fix.contains("create database \"db\""), "{f:?}");
        let f = failure(judge(&v1, "db", &r, status(401, "authorization failed")));
        assert!(f.fix.contains("password"), "{f:?}");
    }

    #[test]
    fn transport_failures_name_the_step_and_the_fix() {
        let v2 = remote(Api::V2);
        let r = ["r1".to_string()];
        let f = failure(judge(
            &v2,
            "b",
            &r,
            Answer::Transport("TLS error: invalid peer certificate: UnknownIssuer".into()),
        ));
        assert_eq!(f.step, Step::Tls);
        assert!(f.fix.contains("ca_file"), "{f:?}");
        let f = failure(judge(
            &v2,
            "b",
            &r,
            Answer::Transport("TLS error: invalid peer certificate: Expired".into()),
        ));
        assert!(f.fix.contains("clock"), "{f:?}");
        let f = failure(judge(
            &v2,
            "b",
            &r,
            Answer::Transport("connection error: connection refused".into()),
        ));
        assert_eq!(f.step, Step::Connect);
    }

    #[test]
    fn lines_say_one_thing_per_failure() {
        let p = RemoteProbe {
            remote: "vm".into(),
            url: "http://h:1".into(),
            passed: vec!["connected".into()],
            failures: vec![Failure {
                step: Step::Destination,
                destination: Some("db".into()),
                what: "HTTP 404".into(),
                fix: "create it".into(),
            }],
        };
        assert_eq!(
            p.lines(),
            ["remote \"vm\" (http://h:1): destination failed for \"db\": HTTP 404; fix: create it"]
        );
        let ok = RemoteProbe {
            failures: Vec::new(),
            ..p
        };
        assert_eq!(ok.lines(), ["remote \"vm\" (http://h:1): ok: connected"]);
    }

    #[test]
    fn host_and_port_come_from_the_url() {
        assert_eq!(
            host_port("https://h.example"),
            Some(("h.example".into(), 443))
        );
        assert_eq!(host_port("http://h:8086/x"), Some(("h".into(), 8086)));
        assert_eq!(host_port("http://[::1]:9"), Some(("::1".into(), 9)));
        assert_eq!(
            host_port("http://127.0.0.1"),
            Some(("127.0.0.1".into(), 80))
        );
    }
}
