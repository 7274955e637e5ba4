//! The `mqtt-warden` binary: `run`, `check` and `hash-token`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use mqtt_warden::{auth, config::WardenConfig, policy, proxy, telemetry, transport, upstream};

#[derive(Parser)]
#[command(
    name = "mqtt-warden",
    version,
    about = "A transparent MQTT proxy with the Watson IoT Platform contract"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The process config (warden.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the config, its TLS files and every policy file; print file, line and reason for
    /// each error.
    Check {
        /// The process config (warden.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Hash a token read from stdin, for a policy file.
    HashToken {
        /// Print the fast `sha256:` form instead of argon2id (for long random machine tokens).
        #[arg(long)]
        sha256: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
        Command::HashToken { sha256 } => hash_token(sha256),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = WardenConfig::load(&config_path)?;
    telemetry::init(config.telemetry.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let running = proxy::start(config).await?;
        tokio::signal::ctrl_c()
            .await
            .context("waiting for a signal")?;
        tracing::info!("shutting down");
        running.stop_accepting().await;
        Ok(ExitCode::SUCCESS)
    })
}

fn check(config_path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = match WardenConfig::load(&config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // TLS files are checked as the proxy would load them at start.
    let mut tls_ok = true;
    for listener in &config.listeners {
        if let Some(tls) = &listener.tls {
            if let Err(error) = transport::ServerTls::load(tls) {
                eprintln!(
                    "{}: listener {}: {error}",
                    config_path.display(),
                    listener.bind
                );
                tls_ok = false;
            }
        }
    }
    if let Err(error) = upstream::Dialer::new(&config.upstream) {
        eprintln!("{}: upstream.tls: {error}", config_path.display());
        tls_ok = false;
    }
    match policy::load_policies(&config.policies) {
        Ok(_) if !tls_ok => Ok(ExitCode::FAILURE),
        Ok(policy) => {
            println!("{}: ok ({} orgs)", config_path.display(), policy.orgs.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn hash_token(sha256: bool) -> anyhow::Result<ExitCode> {
    let mut token = String::new();
    std::io::stdin()
        .read_to_string(&mut token)
        .context("reading the token from stdin")?;
    let token = token.strip_suffix('\n').unwrap_or(&token);
    let token = token.strip_suffix('\r').unwrap_or(token);
    anyhow::ensure!(!token.is_empty(), "no token on stdin");
    let hash = if sha256 {
        auth::hash_token_sha256(token.as_bytes())
    } else {
        auth::hash_token_argon2id(token.as_bytes())?
    };
    println!("{hash}");
    Ok(ExitCode::SUCCESS)
}
