//! Who gets in, and what leaks out. The write API binds to loopback unless
//! told otherwise, and refuses to start on another address without tokens;
//! no token (the writers' or a remote's), password or proxy credential ever
//! appears in a log line (at debug level), a status answer, a CLI output or
//! an error message, whatever happens: refused writes, remotes answering 401
//! (even ones that echo the credential back), reloads, broken configs.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use util::*;

const LISTEN: &str = "ltok-3e9a7f21c4d8b6";
const LISTEN2: &str = "ltok2-88b1f0d3a2c7e5";
const REMOTE: &str = "rtok-5c2e8d71a9f4b0";
const REMOTE_FILE: &str = "rtok2-d4a6c9e1f7b302";
const REMOTE_FILE2: &str = "rtok3-0b7e3f95c1a4d6";
const PASSWORD: &str = "rpass-71f3e9a2c5d8b4";
const PROXY_PASSWORD: &str = "pxpass-9e2b7c41d6a8f3";
const URL_PASSWORD: &str = "urlpass-6d1c8a3f2e9b57";

fn secrets() -> Vec<String> {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{PASSWORD}"));
    [
        LISTEN,
        LISTEN2,
        REMOTE,
        REMOTE_FILE,
        REMOTE_FILE2,
        PASSWORD,
        PROXY_PASSWORD,
        URL_PASSWORD,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([basic])
    .collect()
}

/// Panics naming `what` if `text` holds any secret.
fn assert_no_secret(what: &str, text: &str) {
    for s in secrets() {
        assert!(
            !text.contains(&s),
            "{what} contains the secret {s:?}:\n{text}"
        );
    }
}

/// `edge-replicator ARGS` with `env`, to completion.
fn cli_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = agent_command();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run edge-replicator")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A remote that refuses every request with 401 and, carelessly, quotes
/// the credential it was sent.
fn echoing_401() -> Sink {
    Sink::start(|req| {
        let auth = req.header("authorization").unwrap_or("none");
        (
            401,
            serde_json::json!({
                "code": "unauthorized",
                "message": format!("credential {auth} is not valid"),
            })
            .to_string(),
        )
    })
}

#[test]
fn no_secret_ever_reaches_a_log_a_status_or_an_error() {
    let v2 = echoing_401();
    let v2_file = echoing_401();
    let v1 = echoing_401();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("remote.token");
    fs::write(&token_file, format!("{REMOTE_FILE}\n")).unwrap();
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();

    let mut echo = RemoteConfig::v2("echo", &v2.url());
    echo.token = Some("${ER_TEST_REMOTE_TOKEN}".into());
    let mut from_file = RemoteConfig::v2("fromfile", &v2_file.url());
    from_file.token = None;
    let mut basic = RemoteConfig::v1("basic", &v1.url());
    basic.username = Some("user".into());
    basic.password = Some(PASSWORD.into());
    let mut proxied = RemoteConfig::v2("proxied", &format!("http://127.0.0.1:{}", free_port()));
    proxied.token = Some("${ER_TEST_REMOTE_TOKEN}".into());
    let config = AgentConfig {
        log_level: "debug".into(),
        tokens: vec![LISTEN.into()],
        remotes: vec![echo, from_file, basic, proxied],
        replications: vec![
            ReplicationConfig::new("r-echo", "echo", "b1"),
            ReplicationConfig::new("r-file", "fromfile", "b2"),
            ReplicationConfig::new("r-basic", "basic", "b3").remote_bucket("db"),
            ReplicationConfig::new("r-proxied", "proxied", "b4"),
        ],
        ..AgentConfig::default()
    };
    let token_file_line = format!(
        "token_file = {}\n",
        toml_str(&token_file.display().to_string())
    );
    let launch = Launch::new()
        .env("ER_TEST_REMOTE_TOKEN", REMOTE)
        .insert_after("name = \"fromfile\"", &token_file_line)
        .insert_after(
            "name = \"proxied\"",
            &format!(
                "proxy = \"http://user:{PROXY_PASSWORD}@127.0.0.1:{}\"\n",
                free_port()
            ),
        );
    let mut agent = Agent::start_with(config, &launch);
    let env = [("ER_TEST_REMOTE_TOKEN", REMOTE)];
    let cfg = agent.config_path().display().to_string();
    let mut seen: Vec<(String, String)> = Vec::new();

    // Writers with the right token, with near misses, and with none.
    let ts = ts_ago(Duration::from_secs(60));
    for (i, bucket) in ["b1", "b2", "b3", "b4"].iter().enumerate() {
        let body = lines("sec", 2, 10, ts + i as i64);
        let r = agent.write_v2_reply(bucket, body.as_bytes(), &Opts::new().token(LISTEN));
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let basic_auth = |user: &str, pass: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };
    let near_misses = [
        format!("Token {LISTEN}x"),
        format!("Token {}", &LISTEN[..LISTEN.len() - 1]),
        format!("Bearer {LISTEN}{LISTEN}"),
        format!("Token {REMOTE}"),
        basic_auth(LISTEN, "wrong"),
        "Basic !!!not-base64!!!".to_string(),
        format!("Digest {LISTEN}"),
    ];
    for auth in &near_misses {
        let r = agent.write_v2_reply("b1", b"m f=1 1\n", &Opts::new().authorization(auth));
        assert_eq!(r.status, 401, "{auth}: {}", r.body);
        seen.push((format!("401 answer to {auth}"), format!("{r:?}")));
    }
    let r = agent.write_v1_reply(
        "b1",
        None,
        b"m f=1 1\n",
        &Opts::new()
            .query("u", "x")
            .query("p", &format!("{LISTEN}x")),
    );
    assert_eq!(r.status, 401);
    seen.push(("v1 401".into(), format!("{r:?}")));
    let r = agent.write_v2_reply("b1", b"m f=1 1\n", &Opts::new());
    assert_eq!(r.status, 401);

    // The remotes refuse, quoting what they were sent.
    wait_until(DEADLINE, "remotes refused and streams paused", || {
        ["r-echo", "r-file", "r-basic"]
            .iter()
            .all(|n| str_field(&agent.replication(n), "state") == "paused")
            && !str_field(&agent.replication("r-proxied"), "latestErrorMessage").is_empty()
    });
    assert!(v2
        .requests()
        .iter()
        .any(|r| r.header("authorization") == Some(&format!("Token {REMOTE}"))));
    assert!(v2_file
        .requests()
        .iter()
        .any(|r| r.header("authorization") == Some(&format!("Token {REMOTE_FILE}"))));
    let status = agent.replications();
    for r in status["replications"].as_array().unwrap() {
        eprintln!(
            "{}: {} {:?}",
            r["name"], r["state"], r["latestErrorMessage"]
        );
    }
    seen.push(("status JSON".into(), status.to_string()));
    seen.push(("metrics".into(), agent.metrics()));
    for args in [
        vec!["status", "--config", &cfg],
        vec!["status", "--json", "--config", &cfg],
        vec!["check-config", "--config", &cfg],
        vec![
            "dead-letter",
            "list",
            "--replication",
            "r-echo",
            "--config",
            &cfg,
        ],
    ] {
        let out = cli_env(&args, &env);
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        seen.push((format!("{args:?}"), output_text(&out)));
    }

    // A reload with another writer token and a new remote token in the file.
    fs::write(&token_file, format!("{REMOTE_FILE2}\n")).unwrap();
    agent.config.tokens.push(LISTEN2.into());
    agent.write_config_with(&launch);
    agent.sighup();
    wait_until(DEADLINE, "second writer token accepted", || {
        agent
            .write_v2_reply(
                "b1",
                lines("sec", 1, 1, ts).as_bytes(),
                &Opts::new().token(LISTEN2),
            )
            .status
            == 204
    });
    wait_until(DEADLINE, "new remote token in use", || {
        v2_file
            .requests()
            .iter()
            .any(|r| r.header("authorization") == Some(&format!("Token {REMOTE_FILE2}")))
    });

    // Broken configs, reloaded and checked: the errors name keys, not values.
    let good = fs::read_to_string(agent.config_path()).unwrap();
    let listen_line = format!("tokens = [\"{LISTEN}\", \"{LISTEN2}\"]");
    assert!(good.contains(&listen_line), "{good}");
    let broken = [
        good.replace(&listen_line, &format!("tokens = [\"{LISTEN}\", 5]")),
        good.replace(
            &listen_line,
            &format!("tokens = [\"{LISTEN}\" \"{LISTEN2}\"]"),
        ),
        good.replace(&listen_line, &format!("tokens = \"{LISTEN}\"")),
        good.replace(&listen_line, &format!("tokens = [\"{LISTEN}\n\"]")),
        good.replace(
            &listen_line,
            &format!("tokens = [\"{LISTEN}\"]\nsecret = \"{LISTEN2}\""),
        ),
        good.replace(
            &format!("url = \"{}\"", v2.url()),
            &format!("url = \"http://user:{URL_PASSWORD}@127.0.0.1:1\""),
        ),
        good.replace("${ER_TEST_REMOTE_TOKEN}", &format!("{REMOTE}\\u0007")),
    ];
    for (i, text) in broken.iter().enumerate() {
        assert_ne!(text, &good, "broken config {i} is not broken");
        fs::write(agent.config_path(), text).unwrap();
        let out = cli_env(&["check-config", "--config", &cfg], &env);
        assert_eq!(out.status.code(), Some(78), "{i}: {}", output_text(&out));
        seen.push((
            format!("check-config of broken config {i}"),
            output_text(&out),
        ));
        agent.sighup();
        wait_until(DEADLINE, "the reload error logged", || {
            agent.log().matches("keeping the running config").count() > i
        });
    }
    fs::write(agent.config_path(), &good).unwrap();
    agent.sighup();
    assert_eq!(agent.get("/health").status, 200);

    let log = agent.log();
    for l in log
        .lines()
        .filter(|l| l.contains("keeping the running config"))
    {
        eprintln!("{l}");
    }
    assert!(log.contains(" DEBUG "), "the log is at debug level");
    assert_no_secret("the agent's log", &log);
    for (what, text) in &seen {
        assert_no_secret(what, text);
    }
    assert_eq!(agent.sigterm_and_wait().code(), Some(0));
    assert_no_secret("the agent's log after stopping", &agent.log());
}

#[test]
fn a_non_loopback_address_without_tokens_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for address in ["0.0.0.0", "[::]", "192.0.2.7", "[2001:db8::1]"] {
        let config = AgentConfig::default();
        let port = free_port();
        let text = config.render(&dir.path().join("data"), &format!("{address}:{port}"));
        let path = dir.path().join("config.toml");
        fs::write(&path, text).unwrap();
        for cmd in ["check-config", "run"] {
            let out = run_cli(&[cmd, "--config", path.to_str().unwrap()]);
            let text = output_text(&out);
            assert_eq!(out.status.code(), Some(78), "{address} {cmd}: {text}");
            assert_eq!(text.trim().lines().count(), 1, "{address} {cmd}: {text}");
            assert!(
                text.contains("listen.tokens: required when listen.address"),
                "{address} {cmd}: {text}"
            );
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "{address} {cmd}: something listens on {port}"
            );
        }
    }
    // The default and the shipped config listen on loopback only.
    let shipped: toml::Table = toml::from_str(
        &fs::read_to_string(repo_root().join("config/edge-replicator.toml")).unwrap(),
    )
    .unwrap();
    let address = shipped
        .get("listen")
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .unwrap_or("127.0.0.1:8086");
    let ip: std::net::SocketAddr = address.parse().unwrap();
    assert!(ip.ip().is_loopback(), "shipped config listens on {address}");
    let defaults = edge_replicator::config::parse("", Path::new("/"), &|_| None).unwrap();
    assert!(defaults.listen.address.ip().is_loopback());
}

/// A file holding a secret that others can read is worth a warning that
/// names the file and its mode, from `check-config` and at start.
#[test]
fn secrets_in_files_others_can_read_are_warned_about() {
    let sink = Sink::accept_all();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    fs::write(&token_file, format!("{REMOTE_FILE}\n")).unwrap();
    let mut remote = RemoteConfig::v2("cloud", &sink.url());
    remote.token = None;
    let config = AgentConfig::single(remote, "b", None);
    let launch = Launch::new().insert_after(
        "name = \"cloud\"",
        &format!(
            "token_file = {}\n",
            toml_str(&token_file.display().to_string())
        ),
    );
    let mut agent = Agent::stopped(config);
    agent.write_config_with(&launch);
    let cfg = agent.config_path().display().to_string();
    let file = token_file.display().to_string();
    for (mode, expected) in [
        (0o644, Some("readable by others (mode 0644)")),
        (0o604, Some("readable by others (mode 0604)")),
        (0o640, Some("accessible by its group (mode 0640)")),
        (0o600, None),
        (0o400, None),
    ] {
        fs::set_permissions(&token_file, fs::Permissions::from_mode(mode)).unwrap();
        let out = run_cli(&["check-config", "--config", &cfg]);
        let text = output_text(&out);
        assert!(out.status.success(), "{mode:o}: {text}");
        match expected {
            Some(e) => {
                let warning = text
                    .lines()
                    .find(|l| l.starts_with("warning:") && l.contains("token_file"))
                    .unwrap_or_else(|| panic!("{mode:o}: no warning: {text}"));
                assert!(
                    warning.contains(&file),
                    "{mode:o}: names the file: {warning}"
                );
                assert!(warning.contains(e), "{mode:o}: {warning}");
            }
            None => assert!(!text.contains("warning"), "{mode:o}: {text}"),
        }
        assert_no_secret("check-config", &text);
    }
    // A config file that holds a token as written is the same case.
    let inline_cfg = dir.path().join("inline.toml");
    let inline_text = |token: &str| {
        let mut remote = RemoteConfig::v2("cloud", &sink.url());
        remote.token = Some(token.into());
        AgentConfig::single(remote, "b", None).render(&dir.path().join("data"), "127.0.0.1:1")
    };
    let path = inline_cfg.display().to_string();
    for (token, mode, warned) in [
        (REMOTE, 0o644, true),
        (REMOTE, 0o640, false),
        ("${ER_TEST_REMOTE_TOKEN}", 0o644, false),
    ] {
        fs::write(&inline_cfg, inline_text(token)).unwrap();
        fs::set_permissions(&inline_cfg, fs::Permissions::from_mode(mode)).unwrap();
        let out = cli_env(
            &["check-config", "--config", &path],
            &[("ER_TEST_REMOTE_TOKEN", REMOTE)],
        );
        let text = output_text(&out);
        assert!(out.status.success(), "{text}");
        let warning = text.lines().find(|l| l.starts_with("warning:"));
        if warned {
            let w = warning.unwrap_or_else(|| panic!("{token} {mode:o}: no warning: {text}"));
            assert!(
                w.contains(&path) && w.contains(&format!("mode {mode:04o}")),
                "{w}"
            );
        } else {
            assert!(warning.is_none(), "{token} {mode:o}: {text}");
        }
        assert_no_secret("check-config", &text);
    }

    // And at start, in the log.
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o644)).unwrap();
    agent.spawn_with(&launch);
    let log = agent.log();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("token_file"))
        .unwrap_or_else(|| panic!("no warning at start:\n{log}"));
    assert!(
        warning.contains(&file) && warning.contains("mode 0644"),
        "{warning}"
    );
    assert_no_secret("log", &log);
}

/// Even with `RUST_LOG` asking every library for trace output (what one
/// does to debug a TLS or proxy problem), no credential shows up, not even
/// split over the rows of a hex dump.
#[test]
fn trace_logging_does_not_dump_credentials() {
    let remote_sink = echoing_401();
    let mut remote = RemoteConfig::v2("echo", &remote_sink.url());
    remote.token = Some(REMOTE.into());
    let mut config = AgentConfig::single(remote, "b", None);
    config.tokens = vec![LISTEN.into()];
    let spec = "trace,ureq=trace,ureq_proto=trace,rustls=trace,hyper=trace,hyper_util=trace";
    let agent = Agent::start_with(config, &Launch::new().env("RUST_LOG", spec));
    let body = lines("tr", 1, 5, ts_ago(Duration::from_secs(60)));
    let r = agent.write_v2_reply("b", body.as_bytes(), &Opts::new().token(LISTEN));
    assert_eq!(r.status, 204);
    let r = agent.write_v2_reply("b", body.as_bytes(), &Opts::new().token("wrong"));
    assert_eq!(r.status, 401);
    wait_until(DEADLINE, "remote refused", || {
        str_field(&agent.replication("r1"), "state") == "paused"
    });
    let log = agent.log();
    assert!(log.contains("TRACE"), "the log is at trace level");
    for s in [LISTEN, REMOTE] {
        for piece in s.as_bytes().windows(8) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !log.contains(piece),
                "the trace log holds {piece:?}, a piece of a secret"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Web pages in a browser on the gateway
// ---------------------------------------------------------------------------

/// A POST of `body` to `target` with `headers` (each ending in CRLF); the
/// status and the whole raw answer.
fn raw_post(agent: &Agent, target: &str, headers: &str, body: &str) -> (u16, String) {
    let answer = raw_http(
        agent.port,
        &format!("POST {target} HTTP/1.1\r\n{headers}"),
        body.as_bytes(),
    );
    (raw_status(&answer), answer)
}

fn browser_agent(tokens: &[&str], listen_extra: &str) -> (Sink, Agent) {
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    config.tokens = tokens.iter().map(|t| t.to_string()).collect();
    let mut launch = Launch::new();
    if !listen_extra.is_empty() {
        launch = launch.insert_after("[listen]", listen_extra);
    }
    (sink, Agent::start_with(config, &launch))
}

#[test]
fn a_web_page_cannot_write_or_read_through_a_tokenless_listener() {
    let (sink, agent) = browser_agent(&[], "allowed_hosts = [\"gw-17.local\"]\n");
    let port = agent.port;
    let line = "web f=1 1764000000000000000";
    // DNS rebinding: the page's own name, resolved to 127.0.0.1.
    for (target, shape) in [
        ("/api/v2/write?bucket=b", "message"),
        ("/write?db=b", "error"),
    ] {
        let host = format!("Host: rebind.evil.example:{port}\r\nContent-Type: text/plain\r\n");
        let (status, answer) = raw_post(&agent, target, &host, line);
        assert_eq!(status, 403, "{target}: {answer}");
        let v = raw_json(&answer);
        let message = v[shape].as_str().unwrap_or_else(|| panic!("{target}: {v}"));
        assert!(message.contains("rebind.evil.example"), "{message}");
        assert!(message.contains("listen.allowed_hosts"), "{message}");
        if shape == "message" {
            assert_eq!(v["code"], "forbidden", "{v}");
        }
    }
    let answer = raw_http(
        port,
        &format!("GET /api/v2/replications HTTP/1.1\r\nHost: rebind.evil.example:{port}\r\n"),
        b"",
    );
    assert_eq!(
        raw_status(&answer),
        403,
        "status read by a rebinding page: {answer}"
    );
    let (status, answer) = raw_post(
        &agent,
        "/api/v2/replications/r1/dead-letter/replay",
        &format!("Host: rebind.evil.example:{port}\r\n"),
        "",
    );
    assert_eq!(status, 403, "{answer}");
    // A cross-origin text/plain POST from any page (no preflight needed).
    for origin in ["http://evil.example", "null", "http://localhost:3000"] {
        let (status, answer) = raw_post(
            &agent,
            "/api/v2/write?bucket=b",
            &format!("Host: 127.0.0.1:{port}\r\nOrigin: {origin}\r\nContent-Type: text/plain\r\n"),
            line,
        );
        assert_eq!(status, 403, "{origin}: {answer}");
        assert!(answer.contains("listen.allowed_origins"), "{answer}");
        let answer = raw_http(
            port,
            &format!("OPTIONS /api/v2/write HTTP/1.1\r\nHost: localhost:{port}\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\n"),
            b"",
        );
        assert_eq!(
            raw_status(&answer),
            403,
            "preflight from {origin}: {answer}"
        );
        assert!(!answer.contains("Access-Control-Allow-Origin"), "{answer}");
    }
    // Loopback names and the listed one work; nothing refused was queued.
    let mut taken = 0;
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "gw-17.local".to_string(),
        "[::1]".to_string(),
    ] {
        let (status, answer) = raw_post(
            &agent,
            "/api/v2/write?bucket=b",
            &format!("Host: {host}\r\n"),
            &format!("ok,host=h{taken} f=1 1764000000000000000"),
        );
        assert_eq!(status, 204, "{host}: {answer}");
        taken += 1;
    }
    wait_eq(DEADLINE, "lines delivered", taken, || {
        sink.lines_accepted().len()
    });
    let rep = agent.replication("r1");
    assert_eq!(field(&rep, "acceptedLines"), taken as u64, "{rep:#}");
    assert!(
        metric_value(
            &agent.metrics(),
            "edge_replicator_requests_refused_browser_total",
            ""
        )
        .is_some_and(|n| n >= 10.0),
        "refusals are counted"
    );
}

#[test]
fn only_listed_origins_may_call_and_read_the_answer() {
    let (_sink, agent) = browser_agent(
        &[LISTEN],
        "allowed_origins = [\"http://grafana.local:3000\"]\n",
    );
    let port = agent.port;
    let auth = format!("Authorization: Token {LISTEN}\r\n");
    // A page at the listed origin, with a token: preflight, then the write.
    let answer = raw_http(
        port,
        &format!("OPTIONS /api/v2/write HTTP/1.1\r\nHost: gw:{port}\r\nOrigin: http://grafana.local:3000\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization\r\n"),
        b"",
    );
    assert_eq!(raw_status(&answer), 204, "{answer}");
    assert!(
        answer.contains("\r\nAccess-Control-Allow-Origin: http://grafana.local:3000\r\n"),
        "{answer}"
    );
    assert!(answer.contains("Authorization"), "{answer}");
    let (status, answer) = raw_post(
        &agent,
        "/api/v2/write?bucket=b",
        &format!("Host: gw:{port}\r\nOrigin: http://grafana.local:3000\r\n{auth}"),
        "ok f=1 1764000000000000000",
    );
    assert_eq!(status, 204, "{answer}");
    assert!(answer.contains("Access-Control-Allow-Origin"), "{answer}");
    // Any other origin is refused even with a valid token: the token may be
    // stored in a page the operator did not mean to give it to.
    let (status, answer) = raw_post(
        &agent,
        "/api/v2/write?bucket=b",
        &format!("Host: gw:{port}\r\nOrigin: http://evil.example\r\n{auth}"),
        "evil f=1 1764000000000000000",
    );
    assert_eq!(status, 403, "{answer}");
    // With tokens set, the Host check is off: operators reach the agent by
    // whatever name they use, and a page cannot present a token.
    let (status, answer) = raw_post(
        &agent,
        "/api/v2/write?bucket=b",
        &format!("Host: gateway-17.plant.example:{port}\r\n{auth}"),
        "ok f=2 1764000000000000000",
    );
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = raw_post(
        &agent,
        "/api/v2/write?bucket=b",
        &format!("Host: gateway-17.plant.example:{port}\r\n"),
        "anon f=1 1764000000000000000",
    );
    assert_eq!(status, 401, "{answer}");
    assert_eq!(field(&agent.replication("r1"), "acceptedLines"), 2);
}

#[test]
fn metrics_need_a_token_when_tokens_are_set_unless_opened() {
    let (_sink, agent) = browser_agent(&[LISTEN], "");
    let url = format!("{}/metrics", agent.url());
    let r = http().get(&url).call().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(agent.get("/metrics").status, 200, "with the token");

    let (_sink, open) = browser_agent(&[LISTEN], "metrics_open = true\n");
    let url = format!("{}/metrics", open.url());
    let mut r = http().get(&url).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.body_mut().read_to_string().unwrap();
    assert!(
        text.contains("edge_replicator_write_requests_total"),
        "{text}"
    );
    // Status stays closed.
    let url = format!("{}/api/v2/replications", open.url());
    assert_eq!(http().get(&url).call().unwrap().status().as_u16(), 401);
}

#[test]
fn the_p_query_credential_counts_on_v1_endpoints_only() {
    let (_sink, agent) = browser_agent(&[LISTEN], "");
    let line = "pq f=1 1764000000000000000";
    let (status, text) = agent.write_v1(
        "b",
        None,
        line,
        &Opts::new().query("u", "x").query("p", LISTEN),
    );
    assert_eq!(status, 204, "v1 /write with p=: {text}");
    let (status, text) = agent.write_v2("b", line, &Opts::new().query("p", LISTEN));
    assert_eq!(status, 401, "v2 write with p=: {text}");
    for path in [
        "/api/v2/replications",
        "/metrics",
        "/api/v2/replications/r1/dead-letter",
    ] {
        let url = format!("{}{path}?p={LISTEN}", agent.url());
        let status = http().get(&url).call().unwrap().status().as_u16();
        assert_eq!(status, 401, "{path} with p=");
    }
    // v1 /query takes it, as the v1 clients send it there too.
    let answer = raw_http(
        agent.port,
        &format!("GET /query?q=SHOW+DATABASES&u=x&p={LISTEN} HTTP/1.1\r\nHost: localhost\r\n"),
        b"",
    );
    assert_eq!(raw_status(&answer), 501, "{answer}");
    assert!(
        answer.contains("/api/v2/write?org=test-org&bucket=b"),
        "{answer}"
    );
    assert_eq!(field(&agent.replication("r1"), "acceptedLines"), 1);
}
