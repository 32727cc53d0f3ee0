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
    let closed = closed_port();
    let mut proxied = RemoteConfig::v2("proxied", &closed.url());
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

/// Panics if `log` holds any 8-byte piece of `secrets` (a hex dump splits a
/// header over rows, so a whole-token search is not enough).
fn assert_no_piece(what: &str, log: &str, secrets: &[&str]) {
    for s in secrets {
        for piece in s.as_bytes().windows(8) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !log.contains(piece),
                "{what}: the log holds {piece:?}, a piece of a secret:\n{log}"
            );
        }
    }
}

/// `RUST_LOG` is read by env_logger, which takes levels in any case, module
/// filters with or without a level (a module alone means trace), and longer
/// module paths that outrank shorter ones. None of them may print the
/// remote's token or a writer's, however the spec is spelt.
#[test]
fn no_rust_log_spelling_prints_a_credential() {
    let remote_sink = echoing_401();
    // (spec, a level marker the spec must have produced; the agent itself
    // logs nothing at trace level, and the libraries stay at warn unless
    // named)
    let specs = [
        ("Trace", Some(" DEBUG ")),
        ("TRACE", Some(" DEBUG ")),
        ("ureq_proto=Trace", Some(" DEBUG ")),
        ("ureq_proto=TRACE,ureq=Trace", Some(" TRACE ")),
        ("ureq_proto", Some(" DEBUG ")),
        ("info,ureq_proto::util=trace,ureq_proto::client=trace", None),
        (
            "debug,hyper=trace,hyper_util=Trace,h2=TRACE",
            Some(" DEBUG "),
        ),
        // env_logger takes a bare number as a module name, not a level;
        // whatever a later version makes of it, nothing may leak.
        ("5", None),
        ("ureq_proto=5", None),
    ];
    for (spec, marker) in specs {
        let mut remote = RemoteConfig::v2("echo", &remote_sink.url());
        remote.token = Some(REMOTE.into());
        let mut config = AgentConfig::single(remote, "b", None);
        config.tokens = vec![LISTEN.into()];
        let mut agent = Agent::start_with(config, &Launch::new().env("RUST_LOG", spec));
        let body = lines("rl", 1, 5, ts_ago(Duration::from_secs(60)));
        let r = agent.write_v2_reply("b", body.as_bytes(), &Opts::new().token(LISTEN));
        assert_eq!(r.status, 204, "{spec}");
        let r = agent.write_v2_reply("b", body.as_bytes(), &Opts::new().token("wrong"));
        assert_eq!(r.status, 401, "{spec}");
        wait_until(DEADLINE, "remote refused", || {
            str_field(&agent.replication("r1"), "state") == "paused"
        });
        assert_eq!(agent.sigterm_and_wait().code(), Some(0), "{spec}");
        let log = agent.log();
        if let Some(m) = marker {
            assert!(log.contains(m), "RUST_LOG={spec}: no {m:?} line:\n{log}");
        }
        assert_no_piece(&format!("RUST_LOG={spec}"), &log, &[LISTEN, REMOTE]);
    }
}

/// A remote's answer is text from outside: a newline in it must not start a
/// log line of the remote's choosing (under journald, `<3>` at a line's
/// start makes an entry of error priority), and an ANSI sequence must not
/// reach the operator's terminal, in the log or in `status`.
#[test]
fn a_remote_answer_cannot_forge_a_log_line() {
    let remote_sink = Sink::start(|_| (500, "boom\n<3>forged\x1b[31m red\r\u{85}end".into()));
    let config = AgentConfig::single(RemoteConfig::v2("cloud", &remote_sink.url()), "b", None);
    let launch = Launch::new().env("JOURNAL_STREAM", "8:12345");
    let mut agent = Agent::start_with(config, &launch);
    let body = lines("fg", 1, 3, ts_ago(Duration::from_secs(60)));
    assert_eq!(agent.write_v2("b", body, &Opts::new()).0, 204);
    wait_until(DEADLINE, "the remote's 500 logged", || {
        agent.log().contains("forged")
    });
    let status = agent.cli(&["status"]);
    assert!(status.status.success(), "{}", output_text(&status));
    assert_eq!(agent.sigterm_and_wait().code(), Some(0));

    // A file name is text from outside too: whoever names a file in a
    // tailed directory chooses it.
    let files = tempfile::tempdir().unwrap();
    fs::write(files.path().join("x\n<3>named\x1b[31m.lp"), "not a line\n").unwrap();
    let tail = launch.clone().append(&format!(
        "[[tail]]\npath = {}\nbucket = \"b\"\npoll_interval = \"20ms\"\n",
        toml_str(&files.path().join("*.lp").display().to_string())
    ));
    agent.write_config_with(&tail);
    agent.spawn_with(&tail);
    wait_until(DEADLINE, "the invalid line logged", || {
        agent.log().contains("invalid field format; skipped")
    });
    assert_eq!(agent.sigterm_and_wait().code(), Some(0));
    let log = agent.log();
    let named: Vec<&str> = log.lines().filter(|l| l.contains("named")).collect();
    assert!(!named.is_empty(), "{log}");
    for line in &named {
        assert!(
            line.starts_with("<4>") || line.starts_with("<6>"),
            "{line:?}"
        );
        assert!(line.contains("x\\n<3>named\\x1b[31m.lp"), "{line:?}");
    }
    assert!(!log.lines().any(|l| l.starts_with("<3>named")), "{log}");
    assert!(!log.contains('\x1b') && !log.contains('\r'), "{log:?}");
    assert!(!log.contains('\u{85}'), "{log:?}");
    let forged: Vec<&str> = log.lines().filter(|l| l.contains("forged")).collect();
    assert!(!forged.is_empty(), "{log}");
    for line in &forged {
        assert!(
            line.starts_with("<4>") || line.starts_with("<3>"),
            "{line:?}"
        );
        assert!(!line.starts_with("<3>forged"), "forged line: {line:?}");
        assert!(
            line.contains("boom\\n<3>forged\\x1b[31m red\\r\\u{85}end"),
            "escaped in place: {line:?}"
        );
    }
    assert!(
        !log.lines().any(|l| l.starts_with("<3>forged")),
        "a forged entry:\n{log}"
    );
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(table.contains("boom\\n<3>forged\\x1b[31m"), "{table}");
    assert!(
        !table.contains('\x1b') && !table.contains('\r'),
        "{table:?}"
    );
}

/// Issue 12, item 1: the address in the file may change to loopback with
/// no tokens (valid on its own), but the socket stays where it was bound
/// until a restart; dropping the tokens then would open the API to the
/// network. Such a reload is refused whole and the running config kept.
#[test]
fn a_reload_cannot_switch_auth_off_on_a_public_socket() {
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("cloud", &sink.url()), "b", None);
    config.tokens = vec![LISTEN.into()];
    let mut agent = Agent::stopped_at(config, "0.0.0.0");
    let port = agent.port;
    let public = Launch::new()
        .remove_line(&format!("address = \"127.0.0.1:{port}\""))
        .insert_after("[listen]", &format!("address = \"0.0.0.0:{port}\"\n"));
    agent.write_config_with(&public);
    assert!(fs::read_to_string(agent.config_path())
        .unwrap()
        .contains("0.0.0.0"));
    agent.spawn_with(&public);
    let body = lines("rl", 1, 3, ts_ago(Duration::from_secs(60)));
    let token = Opts::new().token(LISTEN);
    assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 401);
    assert_eq!(agent.write_v2("b", &body, &token).0, 204);

    // The file now says: loopback, no tokens, and a new replication.
    agent.config.tokens.clear();
    agent
        .config
        .replications
        .push(ReplicationConfig::new("r2", "cloud", "other"));
    agent.write_config();
    agent.sighup();
    wait_until(DEADLINE, "the reload refused", || {
        agent.log_since_last("start").contains("reload refused")
    });
    let log = agent.log_since_last("start");
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("reload")).collect();
    assert_eq!(refusals.len(), 1, "one line: {refusals:?}");
    let line = refusals[0];
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("listen.tokens"), "{line}");
    assert!(line.contains(&format!("0.0.0.0:{port}")), "{line}");
    assert!(line.contains("keeping the running config"), "{line}");

    // Nothing of the new file applies: not the empty token list, not the
    // new replication.
    assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 401);
    assert_eq!(agent.write_v2("other", &body, &token).0, 404);
    assert_eq!(agent.get("/api/v2/replications").status, 401);
    assert_eq!(agent.write_v2("b", &body, &token).0, 204);
    assert_no_secret("log", &agent.log());
}

/// A `token_file` that is a device, a FIFO or a huge file is refused at
/// once by `check-config` and `run`, in one line naming the key and file:
/// `/dev/zero` used to be read until memory ran out.
#[test]
fn a_token_file_that_is_not_a_small_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big-token");
    fs::write(&big, "t".repeat(1 << 20)).unwrap();
    fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).unwrap();
    let big = big.display().to_string();
    for (file, why) in [
        ("/dev/zero", "not a regular file (a character device)"),
        (big.as_str(), "larger than 64 KiB"),
    ] {
        let mut remote = RemoteConfig::v2("cloud", "http://127.0.0.1:9");
        remote.token = None;
        let config = AgentConfig::single(remote, "b", None);
        let text = insert_after(
            &config.render(&dir.path().join("data"), "127.0.0.1:1"),
            "name = \"cloud\"",
            &format!("token_file = {}\n", toml_str(file)),
        );
        let path = dir.path().join("config.toml");
        fs::write(&path, text).unwrap();
        for cmd in ["check-config", "run"] {
            let out = run_cli(&[cmd, "--config", path.to_str().unwrap()]);
            let text = output_text(&out);
            assert_eq!(out.status.code(), Some(78), "{file} {cmd}: {text}");
            assert_eq!(text.trim().lines().count(), 1, "{file} {cmd}: {text}");
            assert!(
                text.contains(&format!("token_file {file:?}: {why}")),
                "{file} {cmd}: {text}"
            );
        }
    }
}

/// Whoever can write in a tailed directory can plant a link to a file the
/// agent can read (its own token file, say). The link is not followed: the
/// file's valid lines are not shipped and its text, valid or not, never
/// reaches the log; the skip is logged once and shown in status. Invalid
/// lines of a regular tailed file are logged by position, not by text.
#[test]
fn a_tailed_symlink_is_not_followed_and_file_text_is_never_logged() {
    let sink = Sink::accept_all();
    let files = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("token");
    let ts = ts_ago(Duration::from_secs(60));
    fs::write(&secret, format!("{REMOTE_FILE}\nleaked,k=v value=1 {ts}\n")).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&secret, files.path().join("x.lp")).unwrap();
    fs::write(
        files.path().join("ok.lp"),
        format!("fine value=1 {ts}\nbad {REMOTE_FILE2}\nfine value=2 {ts}\n"),
    )
    .unwrap();
    let config = AgentConfig::single(RemoteConfig::v2("cloud", &sink.url()), "files", None);
    let tail = |follow: bool| {
        Launch::new().append(&format!(
            "[[tail]]\npath = {}\nbucket = \"files\"\npoll_interval = \"20ms\"\nfollow_symlinks = {follow}\n",
            toml_str(&files.path().join("*.lp").display().to_string())
        ))
    };
    let mut agent = Agent::start_with(config, &tail(false));
    wait_until(DEADLINE, "both fine lines delivered", || {
        sink.lines_accepted().len() == 2
    });
    wait_until(DEADLINE, "the link reported", || {
        agent.source("tail")["errors"] == 1
    });
    // Many polls later: still reported once, still not read.
    std::thread::sleep(Duration::from_millis(300));
    let source = agent.source("tail");
    assert_eq!(source["errors"], 1, "{source:#}");
    assert_eq!(source["invalidLines"], 1, "{source:#}");
    let latest = source["latestErrorMessage"].as_str().unwrap();
    assert!(
        latest.contains("x.lp") && latest.contains("symbolic link"),
        "{latest}"
    );
    let shipped: Vec<String> = sink
        .lines_accepted()
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert!(
        shipped.iter().all(|l| l.starts_with("fine ")),
        "{shipped:?}"
    );
    let log = agent.log();
    assert_eq!(
        log.lines().filter(|l| l.contains("symbolic link")).count(),
        1,
        "logged once:\n{log}"
    );
    let ok = files.path().join("ok.lp").display().to_string();
    assert!(
        log.contains(&format!("{ok}:2:")),
        "names file and line:\n{log}"
    );
    assert!(!log.contains("leaked") && !log.contains("bad "), "{log}");
    assert_no_secret("log", &log);
    assert_eq!(agent.sigterm_and_wait().code(), Some(0));

    // Links are followed when the operator says so.
    agent.write_config_with(&tail(true));
    agent.spawn_with(&tail(true));
    wait_until(DEADLINE, "the linked file's line delivered", || {
        sink.lines_accepted()
            .iter()
            .any(|l| l.starts_with(b"leaked,"))
    });
    let log = agent.log();
    assert_no_secret("log with follow_symlinks", &log);
}

/// Another local user who can write the queue's directory can rename the
/// queue away (acknowledged lines gone after a restart, without a word);
/// one who can write the config or a token file can send the data
/// anywhere. Such paths stop `check-config` and `run` with exit 78 and one
/// line naming the path; group-writable ones are warned about.
#[test]
fn paths_other_users_can_write_are_refused() {
    // The "foreign" owner is uid 12345, a user nobody has here.
    type Setup = fn(&Path);
    /// Words of the refusal, or of the warning if one is expected.
    type Want = Result<Option<&'static [&'static str]>, &'static [&'static str]>;
    let chmod =
        |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    // (case, what to do in the case's directory, what to expect)
    let cases: Vec<(&str, Setup, Want)> = vec![
        ("all fine", |_| {}, Ok(None)),
        (
            "no data_dir yet",
            |t| fs::remove_dir(t.join("d/data")).unwrap(),
            Ok(None),
        ),
        (
            "data_dir o+w",
            |t| fs::set_permissions(t.join("d/data"), fs::Permissions::from_mode(0o777)).unwrap(),
            Err(&["data_dir", "data\"", "writable by other users (mode 0777)"]),
        ),
        (
            "data_dir foreign",
            |t| std::os::unix::fs::chown(t.join("d/data"), Some(12345), None).unwrap(),
            Err(&["data_dir", "owned by uid 12345"]),
        ),
        (
            "queue o+w",
            |t| {
                fs::create_dir(t.join("d/data/queue")).unwrap();
                fs::set_permissions(t.join("d/data/queue"), fs::Permissions::from_mode(0o757))
                    .unwrap();
            },
            Err(&["data_dir", "queue\"", "writable by other users (mode 0757)"]),
        ),
        (
            "data_dir's directory o+w",
            |t| fs::set_permissions(t.join("d"), fs::Permissions::from_mode(0o777)).unwrap(),
            Err(&["data_dir", "without the sticky bit (mode 0777)"]),
        ),
        (
            "config o+w",
            |t| {
                fs::set_permissions(t.join("config.toml"), fs::Permissions::from_mode(0o646))
                    .unwrap()
            },
            Err(&[
                "config file",
                "config.toml",
                "writable by other users (mode 0646)",
            ]),
        ),
        (
            "config foreign",
            |t| std::os::unix::fs::chown(t.join("config.toml"), Some(12345), None).unwrap(),
            Err(&["config file", "owned by uid 12345"]),
        ),
        (
            "token_file o+w",
            |t| fs::set_permissions(t.join("token"), fs::Permissions::from_mode(0o602)).unwrap(),
            Err(&[
                "token_file",
                "token\"",
                "writable by other users (mode 0602)",
            ]),
        ),
        (
            "token_file foreign",
            |t| std::os::unix::fs::chown(t.join("token"), Some(12345), None).unwrap(),
            Err(&["token_file", "owned by uid 12345"]),
        ),
        (
            "data_dir g+w",
            |t| fs::set_permissions(t.join("d/data"), fs::Permissions::from_mode(0o770)).unwrap(),
            Ok(Some(&["data_dir", "writable by its group (mode 0770)"])),
        ),
        (
            "config g+w",
            |t| {
                fs::set_permissions(t.join("config.toml"), fs::Permissions::from_mode(0o664))
                    .unwrap()
            },
            Ok(Some(&["config file", "writable by its group (mode 0664)"])),
        ),
    ];
    for (case, setup, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        fs::create_dir(&t).unwrap();
        chmod(&t, 0o755);
        let data = t.join("d/data");
        fs::create_dir_all(&data).unwrap();
        chmod(&t.join("d"), 0o755);
        chmod(&data, 0o700);
        let token = t.join("token");
        fs::write(&token, format!("{REMOTE_FILE}\n")).unwrap();
        chmod(&token, 0o600);
        let mut remote = RemoteConfig::v2("cloud", "http://127.0.0.1:9");
        remote.token = None;
        let port = free_port();
        let text = insert_after(
            &AgentConfig::single(remote, "b", None).render(&data, &format!("127.0.0.1:{port}")),
            "name = \"cloud\"",
            &format!("token_file = {}\n", toml_str(&token.display().to_string())),
        );
        let config = t.join("config.toml");
        fs::write(&config, text).unwrap();
        chmod(&config, 0o644);
        setup(&t);
        let config = config.to_str().unwrap();
        match want {
            Err(words) => {
                for cmd in ["check-config", "run"] {
                    let out = run_cli(&[cmd, "--config", config]);
                    let text = output_text(&out);
                    assert_eq!(out.status.code(), Some(78), "{case} {cmd}: {text}");
                    assert_eq!(text.trim().lines().count(), 1, "{case} {cmd}: {text}");
                    for w in words {
                        assert!(text.contains(w), "{case} {cmd}: no {w:?} in {text}");
                    }
                    assert!(
                        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                        "{case} {cmd}: something listens on {port}"
                    );
                    assert_no_secret(case, &text);
                }
            }
            Ok(warning) => {
                let out = run_cli(&["check-config", "--config", config]);
                let text = output_text(&out);
                assert!(out.status.success(), "{case}: {text}");
                let warnings: Vec<&str> =
                    text.lines().filter(|l| l.starts_with("warning:")).collect();
                match warning {
                    None => assert!(warnings.is_empty(), "{case}: {text}"),
                    Some(words) => {
                        assert_eq!(warnings.len(), 1, "{case}: {text}");
                        for w in words {
                            assert!(warnings[0].contains(w), "{case}: no {w:?} in {text}");
                        }
                    }
                }
            }
        }
    }
}

/// A group-writable data_dir is worth a warning in the log at start, and
/// the agent runs.
#[test]
fn a_group_writable_data_dir_is_warned_about_at_start() {
    let sink = Sink::accept_all();
    let mut agent = Agent::stopped(AgentConfig::single(
        RemoteConfig::v2("cloud", &sink.url()),
        "b",
        None,
    ));
    fs::create_dir(agent.data_dir()).unwrap();
    fs::set_permissions(agent.data_dir(), fs::Permissions::from_mode(0o770)).unwrap();
    agent.write_config();
    agent.spawn_with(&Launch::new());
    let log = agent.log();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("data_dir"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(
        warning.contains("writable by its group (mode 0770)"),
        "{warning}"
    );
    let body = lines("gw", 1, 3, ts_ago(Duration::from_secs(60)));
    assert_eq!(agent.write_v2("b", body, &Opts::new()).0, 204);
}

/// A reload reads the config again, and refuses it the same way when
/// another user could have written it: the running config stays.
#[test]
fn a_reload_from_a_file_others_can_write_is_refused() {
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("cloud", &sink.url()), "b", None);
    config.tokens = vec![LISTEN.into()];
    let mut agent = Agent::start(config);
    let body = lines("rw", 1, 3, ts_ago(Duration::from_secs(60)));
    agent.config.tokens = vec![LISTEN2.into()];
    agent.write_config();
    let path = agent.config_path();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o646)).unwrap();
    agent.sighup();
    wait_until(DEADLINE, "the reload refused", || {
        agent.log().contains("writable by other users (mode 0646)")
    });
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("writable by other users"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("keeping the running config"),
        "{line}"
    );
    assert!(!log.contains("configuration reloaded"), "{log}");
    assert_eq!(
        agent.write_v2("b", &body, &Opts::new().token(LISTEN)).0,
        204
    );
    assert_eq!(
        agent.write_v2("b", &body, &Opts::new().token(LISTEN2)).0,
        401
    );

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    agent.sighup();
    wait_until(DEADLINE, "the reload applied", || {
        agent.log().contains("configuration reloaded")
    });
    assert_eq!(
        agent.write_v2("b", &body, &Opts::new().token(LISTEN2)).0,
        204
    );
    assert_eq!(
        agent.write_v2("b", &body, &Opts::new().token(LISTEN)).0,
        401
    );
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
    for path in [
        "/api/v2/replications/r1/dead-letter/replay",
        "/api/v2/replications/r1/held/b/release",
        "/api/v2/replications/r1/held/b/dead-letter",
    ] {
        let (status, answer) = raw_post(
            &agent,
            path,
            &format!("Host: rebind.evil.example:{port}\r\n"),
            "",
        );
        assert_eq!(status, 403, "{path}: {answer}");
    }
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
        "/api/v2/replications/r1/held",
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
