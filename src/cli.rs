//! Command line: `run`, `check-config`, `status`. Errors are printed once,
//! as one line, with the exit codes of the design: 0 clean, 78 (EX_CONFIG)
//! bad config, 1 anything else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, DEFAULT_PATH};
use crate::{agent, logging, status};

const EX_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(name = "edge-replicator", version, about = "Store-and-forward replication of InfluxDB line protocol for edge gateways")]
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
    },
    /// Validate the config file and exit (0 valid, 78 invalid).
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Show the replications of the running agent.
    Status {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Print the JSON of GET /api/v2/replications.
        #[arg(long)]
        json: bool,
    },
}

fn load(path: &PathBuf) -> Result<Config, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("edge-replicator: {}: {e}", path.display());
        ExitCode::from(EX_CONFIG)
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => match load(&config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: ok ({} remotes, {} replications, data_dir {})",
                    config.display(),
                    c.remotes.len(),
                    c.replications.len(),
                    c.data_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Status { config, json } => match load(&config) {
            Ok(c) => show_status(&c, json),
            Err(code) => code,
        },
    }
}

fn run(path: &PathBuf) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(config.log_level);
    for w in &config.warnings {
        log::warn!("{w}");
    }
    if config.remotes.iter().any(|r| r.allow_insecure_tls) {
        log::warn!("allow_insecure_tls is set: remote TLS certificates are not verified");
    }
    let events = match agent::signal_events() {
        Ok(e) => e,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    match agent::run(config, events) {
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

fn show_status(config: &Config, json: bool) -> ExitCode {
    let url = format!("{}/api/v2/replications", local_url(config.listen.address));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(&url);
    if let Some(t) = config.listen.tokens.first() {
        req = req.header("Authorization", &format!("Token {}", t.expose()));
    }
    let mut resp = match req.call() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edge-replicator: cannot reach the agent at {url}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    if code != 200 {
        eprintln!("edge-replicator: {url} answered {code}: {body}");
        return ExitCode::FAILURE;
    }
    if json {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => {
            print!("{}", status::table(&v));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-replicator: {url} answered JSON that does not parse: {e}");
            ExitCode::FAILURE
        }
    }
}
