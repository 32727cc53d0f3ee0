//! Command line: `run`, `check-config`, `status`. Errors are printed once,
//! as one line, with the exit codes the README documents: 0 clean, 78 (EX_CONFIG)
//! bad config, 69 (EX_UNAVAILABLE) a remote that `check-config --probe`
//! could not use, 1 anything else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, DEFAULT_PATH};
use crate::logging::Escaped;
use crate::status::StatusReport;
use crate::{agent, logging, probe, watch};

mod table;

const EX_CONFIG: u8 = 78;
/// sysexits' "a service is unavailable": the config is valid, a remote is
/// not usable. Distinct from 78 so that `ExecStartPre=` and provisioning
/// scripts can tell a file to fix from a network or remote to fix.
const EX_UNAVAILABLE: u8 = 69;

#[derive(Parser, Debug)]
#[command(
    name = "edge-replicator",
    version,
    about = "Store-and-forward replication of InfluxDB line protocol for edge gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent in the foreground.
    Run {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Use this data directory instead of the config's `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate the config file and exit (0 valid, 78 invalid).
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Also reach each remote: resolve, connect, TLS, auth, and an empty
        /// write to each destination (exit 69 if any failed).
        #[arg(long)]
        probe: bool,
    },
    /// Show the replications of the running agent.
    Status {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Print the JSON of GET /api/v2/replications.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Refresh until interrupted: rates in and out, bytes sent, queue
        /// fill and the time left to drain, per replication.
        #[arg(long)]
        watch: bool,
        /// With --watch: time between refreshes.
        #[arg(long, requires = "watch", default_value = "1s", value_parser = parse_interval)]
        interval: Duration,
        /// With --watch: stop after this many refreshes.
        #[arg(long, requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Inspect, replay or purge the lines a remote refused for good.
    DeadLetter {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// List, release (retry now) or dead-letter the destinations held
    /// apart after the remote refused them alone (404, 403).
    Held {
        #[command(subcommand)]
        action: HeldAction,
    },
}

#[derive(Subcommand, Debug)]
enum HeldAction {
    /// List the destinations held apart (all replications', or one's).
    List(HeldListArgs),
    /// Retry a held destination now (after creating its bucket or database).
    Release(HeldArgs),
    /// Move a held destination's lines to the dead-letter store.
    DeadLetter(HeldArgs),
}

#[derive(clap::Args, Debug)]
struct HeldListArgs {
    #[arg(long, short, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[arg(long, short)]
    replication: Option<String>,
    /// Print the agent's JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct HeldArgs {
    #[arg(long, short, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[arg(long, short)]
    replication: String,
    /// The held destination: the local bucket its lines were written to
    /// (`db`, or `db/rp` for a v1 write naming a retention policy).
    destination: String,
    /// Print the agent's JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum DeadLetterAction {
    /// List a replication's dead letters.
    List(DeadLetterArgs),
    /// Queue a replication's dead letters again (after fixing the cause).
    Replay(DeadLetterArgs),
    /// Drop a replication's dead letters (counted as purged).
    Purge(DeadLetterArgs),
}

#[derive(clap::Args, Debug)]
struct DeadLetterArgs {
    #[arg(long, short, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[arg(long, short)]
    replication: String,
    /// Print the agent's JSON answer.
    #[arg(long)]
    json: bool,
    /// With `list`: print the refused lines under each record.
    #[arg(long)]
    lines: bool,
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    report(path, config::load(path))
}

/// [`config::load_as_client`], for the commands that talk to a running agent.
fn load_as_client(path: &Path) -> Result<Config, ExitCode> {
    report(path, config::load_as_client(path))
}

fn report(path: &Path, loaded: Result<Config, config::ConfigError>) -> Result<Config, ExitCode> {
    loaded.map_err(|e| {
        // One line, whatever the file's name or the TOML parser quotes.
        let msg = format!("{}: {e}", path.display());
        eprintln!("edge-replicator: {}", Escaped(&msg));
        ExitCode::from(EX_CONFIG)
    })
}

/// `config` once its data directory passed [`config::check_data_dir`], with
/// the check's warnings added; else the error, printed.
fn with_data_dir(mut config: Config) -> Result<Config, ExitCode> {
    match config::check_data_dir(&config.data_dir) {
        Ok(warnings) => {
            config.warnings.extend(warnings);
            Ok(config)
        }
        Err(e) => {
            eprintln!("edge-replicator: {}", Escaped(&e.to_string()));
            Err(ExitCode::from(EX_CONFIG))
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, data_dir } => run(&config, data_dir),
        Command::CheckConfig { config, probe } => match load(&config).and_then(with_data_dir) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {}", Escaped(w));
                }
                let mut sources = String::new();
                if !c.tails.is_empty() {
                    sources += &format!(", {} tail sources", c.tails.len());
                }
                if !c.influxdb_wals.is_empty() {
                    sources += &format!(", {} influxdb_wal sources", c.influxdb_wals.len());
                }
                if let Some(t) = &c.telemetry {
                    sources += &format!(
                        ", telemetry to bucket \"{}\" every {} as instance \"{}\"",
                        t.bucket,
                        humantime::format_duration(t.interval),
                        t.instance_id
                    );
                }
                println!(
                    "{}: ok ({} remotes, {} replications{sources}, data_dir {})",
                    config.display(),
                    c.remotes.len(),
                    c.replications.len(),
                    c.data_dir.display()
                );
                if probe {
                    probe_remotes(&c)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(code) => code,
        },
        Command::Status {
            config,
            json,
            watch,
            interval,
            count,
        } => match load_as_client(&config) {
            Ok(c) if watch => watch_status(&c, interval, count),
            Ok(c) => show_status(&c, json),
            Err(code) => code,
        },
        Command::DeadLetter { action } => dead_letter(action),
        Command::Held { action } => held(action),
    }
}

/// `check-config --probe`: one line per remote (and per failed
/// destination); 69 when anything failed.
fn probe_remotes(config: &Config) -> ExitCode {
    let results = probe::probe_all(config);
    for r in &results {
        for line in r.lines() {
            println!("{}", Escaped(&line));
        }
    }
    let failed = results.iter().filter(|r| !r.ok()).count();
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "edge-replicator: {failed} of {} remotes failed the probe",
            results.len()
        );
        ExitCode::from(EX_UNAVAILABLE)
    }
}

fn run(path: &Path, data_dir: Option<PathBuf>) -> ExitCode {
    let mut config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    let config = match with_data_dir(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(config.log_level);
    // Among them, one per remote with allow_insecure_tls.
    for w in &config.warnings {
        log::warn!("{w}");
    }
    let events = match agent::signal_events() {
        Ok(e) => e,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match agent::listener(&config) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{e}");
            return match e {
                agent::AgentError::OpenSocket(_) => ExitCode::from(EX_CONFIG),
                _ => ExitCode::FAILURE,
            };
        }
    };
    match agent::run(config, listener, Some(path.to_path_buf()), events) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Where to reach the agent the config describes.
fn local_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Sends one request to the running agent; prints why on failure.
fn call_agent(config: &Config, method: &str, path: &str) -> Result<serde_json::Value, ExitCode> {
    ask_agent(config, method, path).map_err(|e| {
        eprintln!("edge-replicator: {}", Escaped(&e));
        ExitCode::FAILURE
    })
}

/// Sends one request to the running agent; the error says why, in one line.
fn ask_agent(config: &Config, method: &str, path: &str) -> Result<serde_json::Value, String> {
    let url = format!("{}{path}", local_url(config.listen.address));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = ureq::http::Request::builder().method(method).uri(&url);
    if let Some(t) = config.listen.tokens.first() {
        req = req.header("Authorization", format!("Token {}", t.expose()));
    }
    let req = req.body(()).map_err(|e| format!("{url}: {e}"))?;
    let mut resp = agent
        .run(req)
        .map_err(|e| format!("cannot reach the agent at {url}: {e} (is it running?)"))?;
    let code = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    if code != 200 {
        return Err(format!("{url} answered {code}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{url} answered JSON that does not parse: {e}"))
}

/// Asks the running agent for its status; the error says why, in one line.
fn ask_status(config: &Config) -> Result<StatusReport, String> {
    let v = ask_agent(config, "GET", "/api/v2/replications")?;
    serde_json::from_value(v).map_err(|e| {
        format!("cannot read the agent's status ({e}); is the agent of another version?")
    })
}

/// `--interval`: a duration of at least 100 ms (the agent's status is not
/// worth asking for more often, and a typo like `1ms` would load it).
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?}: must be at least 100ms"));
    }
    Ok(d)
}

/// `status --watch`: one block per refresh (see [`watch`]); the agent being
/// unreachable for a while (a restart) is shown and waited out. Exits 0
/// after `count` refreshes if the last one reached the agent, else 1.
fn watch_status(config: &Config, interval: Duration, count: Option<u64>) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let terminal = std::io::stdout().is_terminal();
    let started = std::time::Instant::now();
    let mut history = watch::History::default();
    let mut refreshes = 0u64;
    loop {
        let tick = std::time::Instant::now();
        let elapsed = tick.duration_since(started);
        let width = watch::width(
            std::env::var("COLUMNS").ok().as_deref(),
            watch::terminal_width(),
        );
        let (block, ok) = match ask_status(config) {
            Ok(v) => {
                history.add(&v, elapsed.as_secs_f64());
                (watch::render(&v, &history, width, elapsed, interval), true)
            }
            Err(e) => {
                let text: String = format!("edge-replicator: {}", Escaped(&e))
                    .chars()
                    .take(width)
                    .collect();
                (format!("{text}\n"), false)
            }
        };
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the watch quietly.
        if out
            .write_all(watch::frame(&block, terminal).as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return ExitCode::SUCCESS;
        }
        drop(out);
        refreshes += 1;
        if count.is_some_and(|n| refreshes >= n) {
            return if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        std::thread::sleep(interval.saturating_sub(tick.elapsed()));
    }
}

fn show_status(config: &Config, json: bool) -> ExitCode {
    if json {
        // As the agent answered, whatever its version.
        return match call_agent(config, "GET", "/api/v2/replications") {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        };
    }
    match ask_status(config) {
        Ok(report) => {
            print!("{}", table::replications(&report));
            print!("{}", table::held(&report));
            print!("{}", table::sources(&report));
            print!("{}", table::clock(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-replicator: {}", Escaped(&e));
            ExitCode::FAILURE
        }
    }
}

fn held(action: HeldAction) -> ExitCode {
    let path = match &action {
        HeldAction::List(a) => {
            let config = match load_as_client(&a.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if a.json {
                let Some(name) = &a.replication else {
                    return match call_agent(&config, "GET", "/api/v2/replications") {
                        Ok(v) => {
                            let all: Vec<serde_json::Value> = v["replications"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .map(|r| {
                                    serde_json::json!({
                                        "replication": r["name"],
                                        "heldDestinations": r["heldDestinations"],
                                    })
                                })
                                .collect();
                            println!("{}", serde_json::Value::Array(all));
                            ExitCode::SUCCESS
                        }
                        Err(code) => code,
                    };
                };
                let name: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
                return match call_agent(
                    &config,
                    "GET",
                    &format!("/api/v2/replications/{name}/held"),
                ) {
                    Ok(v) => {
                        println!("{v}");
                        ExitCode::SUCCESS
                    }
                    Err(code) => code,
                };
            }
            return match ask_status(&config) {
                Ok(report) => {
                    let rows = table::held_rows(&report, a.replication.as_deref());
                    print!("{}", table::held_table(&rows));
                    let lines: u64 = rows.iter().map(|(_, h)| h.lines).sum();
                    println!("{} held destinations, {lines} lines", rows.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edge-replicator: {}", Escaped(&e));
                    ExitCode::FAILURE
                }
            };
        }
        HeldAction::Release(a) | HeldAction::DeadLetter(a) => {
            let name: String = form_urlencoded::byte_serialize(a.replication.as_bytes()).collect();
            let dest: String = form_urlencoded::byte_serialize(a.destination.as_bytes()).collect();
            let op = match action {
                HeldAction::Release(_) => "release",
                _ => "dead-letter",
            };
            format!("/api/v2/replications/{name}/held/{dest}/{op}")
        }
    };
    let (HeldAction::Release(args) | HeldAction::DeadLetter(args)) = &action else {
        unreachable!("listing returned above");
    };
    let config = match load_as_client(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let v = match call_agent(&config, "POST", &path) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if args.json {
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    let dest = Escaped(&args.destination);
    match action {
        HeldAction::Release(_) => println!("{dest}: retrying now"),
        _ => println!(
            "{dest}: {} lines moved to the dead-letter store",
            v["deadLetteredLines"]
        ),
    }
    ExitCode::SUCCESS
}

fn dead_letter(action: DeadLetterAction) -> ExitCode {
    let (args, method, suffix) = match &action {
        DeadLetterAction::List(a) if a.lines => (a, "GET", "?lines=true"),
        DeadLetterAction::List(a) => (a, "GET", ""),
        DeadLetterAction::Replay(a) => (a, "POST", "/replay"),
        DeadLetterAction::Purge(a) => (a, "DELETE", ""),
    };
    let config = match load_as_client(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let name: String = form_urlencoded::byte_serialize(args.replication.as_bytes()).collect();
    let path = format!("/api/v2/replications/{name}/dead-letter{suffix}");
    let v = match call_agent(&config, method, &path) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if args.json {
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    match action {
        DeadLetterAction::List(_) => {
            let empty = Vec::new();
            let list = v["deadLetters"].as_array().unwrap_or(&empty);
            println!(
                "{:<6} {:>8} {:>10} {:<16} REASON",
                "ID", "LINES", "BYTES", "BUCKET"
            );
            for d in list {
                println!(
                    "{:<6} {:>8} {:>10} {:<16} {}",
                    d["id"],
                    d["lines"],
                    d["bytes"],
                    Escaped(d["bucket"].as_str().unwrap_or("")),
                    Escaped(d["reason"].as_str().unwrap_or(""))
                );
                if let Some(data) = d["data"].as_str() {
                    // A string value's newlines continue its point: they are
                    // indented further, so each point reads as one.
                    for point in crate::lineproto::points(data.as_bytes()) {
                        let point = String::from_utf8_lossy(point);
                        for (i, line) in point.trim_end_matches('\n').split('\n').enumerate() {
                            let indent = if i == 0 { "    " } else { "      " };
                            println!("{indent}{}", Escaped(line));
                        }
                    }
                }
            }
            let lines: u64 = list.iter().filter_map(|d| d["lines"].as_u64()).sum();
            println!("{} records, {lines} lines", list.len());
        }
        DeadLetterAction::Replay(_) => println!("{} lines queued again", v["replayedLines"]),
        DeadLetterAction::Purge(_) => println!("{} lines purged", v["purgedLines"]),
    }
    ExitCode::SUCCESS
}
