//! TLS to the remote, against an HTTPS remote run by the test with a CA and
//! certificates made for it: certificates are verified by default, `ca_file`
//! trusts a private CA, a wrong host name or an unknown or expired
//! certificate fails with a clear error in the status (and the data waits),
//! and `allow_insecure_tls` works and is warned about at start.

mod util;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use util::*;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A server certificate for `names` (an IP address or a DNS name each).
    fn issue(&self, names: &[&str], expired: bool) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = names.iter().map(|n| san(n)).collect();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert, key)
    }

    fn write_pem(&self, dir: &std::path::Path) -> PathBuf {
        let path = dir.join("ca.pem");
        fs::write(&path, self.cert.pem()).unwrap();
        path
    }
}

fn san(name: &str) -> SanType {
    match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into().unwrap()),
    }
}

/// A self-signed server certificate (no CA at all).
fn self_signed(names: &[&str]) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = names.iter().map(|n| san(n)).collect();
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// An HTTPS remote on loopback answering 204, presenting `cert`.
fn https_remote(cert: &rcgen::Certificate, key: &KeyPair) -> Sink {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    Sink::serve(
        listener,
        Arc::new(|_: &SinkRequest| (204, String::new())),
        move |tcp| {
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            rustls::StreamOwned::new(conn, tcp)
        },
    )
}

fn https_url(sink: &Sink) -> String {
    format!("https://127.0.0.1:{}", sink.port)
}

/// An agent shipping bucket `b` to `url` through remote "tls", with `extra`
/// keys in the remote's table; it has 20 lines queued for it.
fn agent_for(url: &str, extra: &str) -> (Agent, Launch) {
    let config = AgentConfig::single(RemoteConfig::v2("tls", url), "b", None);
    let launch = Launch::new().insert_after("name = \"tls\"", extra);
    let agent = Agent::start_with(config, &launch);
    let body = lines("tls", 4, 20, ts_ago(Duration::from_secs(60)));
    assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 204);
    (agent, launch)
}

/// Waits for the remote's first failure and returns the status's message.
fn failure(agent: &Agent) -> String {
    let mut msg = String::new();
    wait_until(DEADLINE, "a TLS failure in the status", || {
        let rep = agent.replication("r1");
        msg = str_field(&rep, "latestErrorMessage").to_string();
        !msg.is_empty()
    });
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "deliveredLines"), 0, "{rep:#}");
    assert_eq!(field(&rep, "remainingLines"), 20, "data waits: {rep:#}");
    assert_ne!(str_field(&rep, "state"), "running", "{rep:#}");
    msg
}

fn delivered(agent: &Agent, sink: &Sink) {
    wait_eq(DEADLINE, "lines delivered over TLS", 20, || {
        field(&agent.replication("r1"), "deliveredLines")
    });
    assert_eq!(sink.lines_accepted().len(), 20);
    assert!(sink
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some("Token test-token")));
}

#[test]
fn certificates_are_verified_by_default_and_ca_file_trusts_a_private_ca() {
    let ca = Ca::new("edge-replicator test CA");
    let (cert, key) = ca.issue(&["127.0.0.1"], false);
    let sink = https_remote(&cert, &key);
    let (mut agent, _) = agent_for(&https_url(&sink), "");
    let msg = failure(&agent);
    eprintln!("unknown CA: {msg}");
    assert!(
        msg.contains("TLS error") && msg.contains("UnknownIssuer"),
        "{msg}"
    );
    assert!(sink.requests().is_empty(), "nothing was sent in clear");

    // Trust the CA (a reload is enough): delivered.
    let dir = tempfile::tempdir().unwrap();
    let pem = ca.write_pem(dir.path());
    let launch = Launch::new().insert_after(
        "name = \"tls\"",
        &format!("ca_file = {}\n", toml_str(&pem.display().to_string())),
    );
    agent.write_config_with(&launch);
    agent.sighup();
    delivered(&agent, &sink);
    assert_eq!(
        str_field(&agent.replication("r1"), "latestErrorMessage"),
        ""
    );
    let _ = agent.sigterm_and_wait();
}

#[test]
fn a_wrong_host_name_an_unknown_ca_or_an_expired_certificate_fail_clearly() {
    let ca = Ca::new("edge-replicator test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_line = format!(
        "ca_file = {}\n",
        toml_str(&ca.write_pem(dir.path()).display().to_string())
    );
    let other = Ca::new("someone else's CA");
    let cases: Vec<(&str, rcgen::Certificate, KeyPair, &[&str])> = {
        let (c1, k1) = ca.issue(&["gateway.invalid"], false);
        let (c2, k2) = other.issue(&["127.0.0.1"], false);
        let (c3, k3) = ca.issue(&["127.0.0.1"], true);
        vec![
            (
                "wrong host name",
                c1,
                k1,
                &["TLS error", "not valid for name \"127.0.0.1\""],
            ),
            ("another CA", c2, k2, &["TLS error", "UnknownIssuer"]),
            ("expired", c3, k3, &["TLS error", "certificate expired"]),
        ]
    };
    for (what, cert, key, expected) in cases {
        let sink = https_remote(&cert, &key);
        let (agent, _) = agent_for(&https_url(&sink), &ca_line);
        let msg = failure(&agent);
        eprintln!("{what}: {msg}");
        for e in expected {
            assert!(msg.contains(e), "{what}: {msg}");
        }
        assert!(
            agent.log().contains(&msg),
            "{what}: the log says it too:\n{}",
            agent.log()
        );
        assert!(sink.requests().is_empty(), "{what}: nothing was sent");
    }
}

#[test]
fn allow_insecure_tls_skips_verification_and_is_warned_about() {
    let (cert, key) = self_signed(&["gateway.invalid"]);
    let sink = https_remote(&cert, &key);
    let (agent, _) = agent_for(&https_url(&sink), "allow_insecure_tls = true\n");
    delivered(&agent, &sink);
    let log = agent.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("allow_insecure_tls"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning at start:\n{log}");
    assert!(
        warnings[0].contains("remote \"tls\"") && warnings[0].contains("not verified"),
        "{}",
        warnings[0]
    );
}

#[test]
fn a_ca_file_that_holds_no_certificate_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-a-ca.pem");
    fs::write(&bad, "this is not PEM\n").unwrap();
    let config = AgentConfig::single(RemoteConfig::v2("tls", "https://127.0.0.1:1"), "b", None);
    let mut agent = Agent::stopped(config);
    let launch = Launch::new().insert_after(
        "name = \"tls\"",
        &format!("ca_file = {}\n", toml_str(&bad.display().to_string())),
    );
    agent.write_config_with(&launch);
    agent.launch_with(&launch);
    let status = agent
        .wait_ready(Duration::from_secs(30))
        .expect_err("the agent refuses to start");
    let log = agent.log();
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("ca_file") && log.contains("no PEM certificate"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// `check-config --probe` against the HTTPS remote with `ca_file` naming a
/// CA that did not sign its certificate: one line naming the certificate
/// problem and `ca_file`, exit 69, nothing sent, no token printed. With the
/// right CA the same probe passes.
#[test]
fn probe_names_an_untrusted_certificate() {
    let ca = Ca::new("edge-replicator test CA");
    let other = Ca::new("some other CA");
    let (cert, key) = ca.issue(&["127.0.0.1"], false);
    let sink = https_remote(&cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let wrong_dir = dir.path().join("wrong");
    fs::create_dir(&wrong_dir).unwrap();
    let wrong = other.write_pem(&wrong_dir);
    let right = ca.write_pem(dir.path());
    let probe = |pem: &std::path::Path| {
        let config = AgentConfig::single(RemoteConfig::v2("tls", &https_url(&sink)), "b", None);
        let text = insert_after(
            &config.render(
                &dir.path().join("data"),
                &format!("127.0.0.1:{}", free_port()),
            ),
            "name = \"tls\"",
            &format!("ca_file = {}\n", toml_str(&pem.display().to_string())),
        );
        let path = dir.path().join("config.toml");
        fs::write(&path, text).unwrap();
        let out = run_cli(&[
            "check-config",
            "--probe",
            "--config",
            path.to_str().unwrap(),
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{text}");
        assert!(!text.contains("test-token"), "the token leaked: {text}");
        (out.status.code(), text)
    };
    let (code, text) = probe(&wrong);
    assert_eq!(code, Some(69), "{text}");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("remote \"tls\""))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("TLS failed"), "{text}");
    assert!(lines[0].contains("UnknownIssuer"), "{text}");
    assert!(lines[0].contains("set ca_file"), "{text}");
    assert!(sink.requests().is_empty(), "nothing was sent in clear");

    let (code, text) = probe(&right);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("TLS verified"), "{text}");
    assert_eq!(sink.requests().len(), 1, "one empty write");
    assert!(sink.lines_accepted().is_empty());
}
