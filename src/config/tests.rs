//! Tests of the whole config layer: text in, `Config` or one-line error out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::remote::check_http_url;
use super::telemetry::hostname;
use super::units::{GIB, MIB};
use super::*;
use crate::lineproto::Precision;

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
        (remote("max_in_flight = 0"), "remote \"cloud\": max_in_flight: 0 is not a number of requests from 1 to 8"),
        (remote("max_in_flight = 9"), "remote \"cloud\": max_in_flight: 9 is not a number of requests from 1 to 8"),
        (remote("max_in_flight = \"2\""), "max_in_flight: invalid type: string"),
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
    assert_eq!(c.listen.max_request_memory, 96 * MIB);
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
    assert_eq!(r.max_in_flight, 2);
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

#[test]
fn link_takes_caps_budgets_and_periods() {
    let c = ok(&repl(""));
    assert_eq!(c.link.max_bandwidth, None);
    assert_eq!(c.link.daily_budget, None);
    assert_eq!(c.link.monthly_reset_day, 1);
    assert_eq!(c.link.top_priority, 5);
    let c = ok(&repl(
        "priority = 8\n[link]\nmax_bandwidth = \"256kbit/s\"\ndaily_budget = \"40MB\"\nmonthly_budget = \"1GiB\"\nbudget_timezone = \"-05:30\"\nmonthly_reset_day = 15",
    ));
    assert_eq!(c.replications[0].priority, 8);
    assert_eq!(c.link.top_priority, 8);
    assert_eq!(c.link.max_bandwidth, Some(32_000));
    assert_eq!(c.link.daily_budget, Some(40_000_000));
    assert_eq!(c.link.monthly_budget, Some(GIB));
    assert_eq!(c.link.utc_offset, -(5 * 3_600 + 30 * 60));
    assert_eq!(c.link.monthly_reset_day, 15);
    for (rate, bytes) in [
        ("32kB/s", Some(32_000)),
        ("2Mbit/s", Some(250_000)),
        ("1.5MB/s", Some(1_500_000)),
        ("4096", Some(4_096)),
        ("0", None),
    ] {
        let c = ok(&repl(&format!("[link]\nmax_bandwidth = \"{rate}\"")));
        assert_eq!(c.link.max_bandwidth, bytes, "{rate}");
    }
    assert_eq!(
        ok(&repl("[link]\nbudget_timezone = \"UTC\""))
            .link
            .utc_offset,
        0
    );
}

#[test]
fn link_errors_name_the_key() {
    for (lines, key) in [
        ("[link]\nmax_bandwidth = \"fast\"", "link.max_bandwidth"),
        ("[link]\nmax_bandwidth = \"32kB\"", "link.max_bandwidth"),
        ("[link]\nmax_bandwidth = \"50B/s\"", "link.max_bandwidth"),
        ("[link]\ndaily_budget = \"lots\"", "link.daily_budget"),
        (
            "[link]\nbudget_timezone = \"Europe/Paris\"",
            "link.budget_timezone",
        ),
        ("[link]\nbudget_timezone = \"+2\"", "link.budget_timezone"),
        ("[link]\nmonthly_reset_day = 31", "link.monthly_reset_day"),
        ("[link]\nmonthly_reset_day = 0", "link.monthly_reset_day"),
        ("[link]\nhourly_budget = \"1MB\"", "hourly_budget"),
        ("priority = 0", "priority"),
        ("priority = 10", "priority"),
    ] {
        let e = err(&repl(lines));
        assert!(e.contains(key), "{lines}: {e}");
    }
}

#[test]
fn clock_takes_a_wait_and_whether_to_send_old_lines() {
    let c = ok(&repl(""));
    assert_eq!(c.clock.wait_for_sync, Duration::from_secs(600));
    assert!(!c.clock.send_before_build);
    assert_eq!(
        c.clock.before_build_margin,
        Duration::from_secs(365 * 86_400)
    );
    let c = ok(&repl(
        "[clock]\nwait_for_sync = \"0\"\nsend_before_build = true\nbefore_build_margin = \"0s\"",
    ));
    assert_eq!(c.clock.wait_for_sync, Duration::ZERO);
    assert!(c.clock.send_before_build);
    assert_eq!(c.clock.before_build_margin, Duration::ZERO);
    assert_eq!(
        ok(&repl("[clock]\nwait_for_sync = \"90s\""))
            .clock
            .wait_for_sync,
        Duration::from_secs(90)
    );
    for (lines, key) in [
        ("[clock]\nwait_for_sync = \"soon\"", "clock.wait_for_sync"),
        ("[clock]\nsend_before_build = \"yes\"", "send_before_build"),
        ("[clock]\nntp = true", "ntp"),
        (
            "[clock]\nbefore_build_margin = -1",
            "clock.before_build_margin",
        ),
    ] {
        let e = err(&repl(lines));
        assert!(e.contains(key), "{lines}: {e}");
    }
}

#[test]
fn batch_wait_is_a_bounded_duration_or_the_links_default() {
    assert_eq!(ok(&repl("")).replications[0].batch_wait, None);
    assert_eq!(
        ok(&repl("batch_wait = \"2s\"")).replications[0].batch_wait,
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        ok(&repl("batch_wait = \"0s\"")).replications[0].batch_wait,
        Some(Duration::ZERO)
    );
    for bad in [
        "batch_wait = \"later\"",
        "batch_wait = \"1h\"",
        "batch_wait = -1",
    ] {
        let e = err(&repl(bad));
        assert!(e.contains("batch_wait"), "{bad}: {e}");
    }
}
