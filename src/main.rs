//! The `mqtt-warden` binary: `run`, `check`, `explain`, `import`, `probe` and `hash-token`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use mqtt_warden::config::{MissingSecrets, WardenConfig};
use mqtt_warden::generic::explain::{explain, Question};
use mqtt_warden::generic::import::import_mosquitto;
use mqtt_warden::policy::rules::Action;
use mqtt_warden::{auth, policy, proxy, runtime, telemetry, transport, upstream};

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
        /// Seconds a SIGTERM shutdown may take to close sessions and flush monitoring messages.
        #[arg(long, default_value_t = 10)]
        grace_secs: u64,
    },
    /// Validate the config, its TLS files and every policy file; print `file:line: field: message`
    /// for every error. An unset `password_env` variable is a warning (pipelines hold no secrets).
    Check {
        /// The process config (warden.yaml); its policies are checked too.
        #[arg(long, short, required_unless_present = "policy")]
        config: Option<PathBuf>,
        /// A policy file or folder to check on its own.
        #[arg(long, short)]
        policy: Vec<PathBuf>,
        /// Treat an unset `password_env` variable as an error, as `run` does.
        #[arg(long)]
        strict: bool,
    },
    /// Ask a running proxy's admin endpoint (for container health checks): exit 0 on HTTP 200.
    Probe {
        /// The admin endpoint address.
        #[arg(long, default_value = "127.0.0.1:9100")]
        address: String,
        /// The path to ask for.
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Dry-run a generic tenant's decision on one request and print the rule (file:line) that
    /// decides it. Exits 0 when the request is allowed, 1 when it is denied.
    Explain {
        /// The process config (warden.yaml); its policies are read.
        #[arg(long, short, required_unless_present = "policy")]
        config: Option<PathBuf>,
        /// A policy file or folder (instead of --config).
        #[arg(long, short)]
        policy: Option<PathBuf>,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The user (without it: an anonymous client).
        #[arg(long)]
        user: Option<String>,
        /// The client ID.
        #[arg(long)]
        client_id: String,
        /// The client certificate's common name.
        #[arg(long)]
        cn: Option<String>,
        /// publish, subscribe or receive.
        action: String,
        /// The topic (publish, receive) or filter (subscribe), as the client writes it.
        topic: String,
    },
    /// Convert another broker's access control into a generic tenant's YAML (printed).
    #[command(subcommand)]
    Import(Import),
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
        Command::Run { config, grace_secs } => run(config, Duration::from_secs(grace_secs)),
        Command::Check {
            config,
            policy,
            strict,
        } => check(config, policy, strict),
        Command::Probe { address, path } => probe(&address, &path),
        Command::HashToken { sha256 } => hash_token(sha256),
        Command::Explain {
            config,
            policy,
            tenant,
            user,
            client_id,
            cn,
            action,
            topic,
        } => run_explain(
            config,
            policy,
            &tenant,
            user.as_deref(),
            &client_id,
            cn.as_deref(),
            &action,
            &topic,
        ),
        Command::Import(Import::Mosquitto {
            acl_file,
            password_file,
            tenant,
        }) => import(&tenant, &acl_file, password_file.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: an error whose message already includes its source
/// (`policy: <the errors>`) is not followed by that source again.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// How long a SIGINT shutdown may take: the same steps as SIGTERM, without waiting long.
const FAST_SHUTDOWN: Duration = Duration::from_secs(1);

fn run(config_path: PathBuf, grace: Duration) -> anyhow::Result<ExitCode> {
    let config = WardenConfig::load(&config_path)?;
    // Before any thread starts, so that every thread inherits the policy.
    let scheduling = runtime::apply_scheduling(config.runtime.scheduling);
    let _telemetry = telemetry::init(
        config.telemetry.log_format,
        config.telemetry.otlp_endpoint.as_deref(),
    )?;
    match scheduling {
        Ok(()) => tracing::info!(policy = runtime::current_policy(), "CPU scheduling"),
        Err(error) => tracing::warn!(%error, "CPU scheduling"),
    }
    let runtime = runtime::build(&config.runtime)?;
    runtime.block_on(async move {
        let running = proxy::start(config).await?;
        let grace = wait_for_shutdown_signal(grace).await?;
        tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down");
        running.shutdown(grace).await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Waits for SIGTERM (graceful: `grace`) or SIGINT (fast), and says how long shutdown may take.
async fn wait_for_shutdown_signal(grace: Duration) -> anyhow::Result<Duration> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = terminate.recv() => Ok(grace),
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.context("waiting for SIGINT")?;
            Ok(FAST_SHUTDOWN.min(grace))
        }
    }
}

fn check(
    config_path: Option<PathBuf>,
    policy_paths: Vec<PathBuf>,
    strict: bool,
) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    let mut policies = policy_paths;
    let secrets = if strict {
        MissingSecrets::Error
    } else {
        MissingSecrets::Warn
    };
    if let Some(config_path) = config_path {
        match WardenConfig::load_checked(&config_path, secrets) {
            Ok(checked) => {
                for warning in &checked.warnings {
                    eprintln!("warning: {warning} (an error for `run` and `check --strict`)");
                }
                let config = checked.config;
                // TLS files are checked as the proxy would load them at start.
                for listener in &config.listeners {
                    if let Some(tls) = &listener.tls {
                        if let Err(error) = transport::ServerTls::load(tls) {
                            eprintln!(
                                "{}: listener {}: {error}",
                                config_path.display(),
                                listener.bind
                            );
                            ok = false;
                        }
                    }
                }
                if let Err(error) = upstream::Dialer::new(&config.upstream) {
                    eprintln!("{}: {error}", config_path.display());
                    ok = false;
                }
                if ok {
                    println!("{}: ok", config_path.display());
                }
                // Tenants' mounts against the orgs' prefix, which the config sets.
                if let Ok(policy) = policy::load_policies(&config.policies) {
                    for error in policy::check_isolation(&policy, &config.upstream.topic_prefix) {
                        eprintln!("{error}");
                        ok = false;
                    }
                }
                policies.push(config.policies);
            }
            Err(errors) => {
                for error in &errors.errors {
                    eprintln!("{error}");
                }
                ok = false;
                // The policies of a config with other errors are still checked.
                policies.extend(errors.policies);
            }
        }
    }
    for path in policies {
        match policy::load_policies(&path) {
            Ok(policy) if policy.tenants.is_empty() => {
                println!("{}: ok ({} orgs)", path.display(), policy.orgs.len())
            }
            Ok(policy) => println!(
                "{}: ok ({} orgs, {} tenants)",
                path.display(),
                policy.orgs.len(),
                policy.tenants.len()
            ),
            Err(errors) => {
                for error in &errors.0 {
                    eprintln!("{error}");
                }
                ok = false;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Subcommand)]
enum Import {
    /// A Mosquitto acl_file (and password_file) as one tenant.
    Mosquitto {
        /// The acl_file.
        #[arg(long)]
        acl_file: PathBuf,
        /// The password_file (made with mosquitto_passwd): users keep their passwords.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
    },
}

#[allow(clippy::too_many_arguments)]
fn run_explain(
    config: Option<PathBuf>,
    policy_path: Option<PathBuf>,
    tenant: &str,
    user: Option<&str>,
    client_id: &str,
    common_name: Option<&str>,
    action: &str,
    topic: &str,
) -> anyhow::Result<ExitCode> {
    let action = Action::parse(action)
        .with_context(|| format!("`{action}`: the actions are publish, subscribe and receive"))?;
    let path = match (policy_path, config) {
        (Some(path), _) => path,
        (None, Some(config)) => {
            WardenConfig::load_checked(&config, MissingSecrets::Warn)
                .map_err(|errors| {
                    anyhow::anyhow!(errors
                        .errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n"))
                })?
                .config
                .policies
        }
        (None, None) => anyhow::bail!("give --config or --policy"),
    };
    let policy = policy::load_policies(&path)?;
    let answer = explain(
        &policy,
        &Question {
            tenant,
            user,
            client_id,
            common_name,
            action,
            topic,
        },
    )?;
    print!("{answer}");
    Ok(if answer.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn import(
    tenant: &str,
    acl_file: &std::path::Path,
    password_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    match import_mosquitto(tenant, acl_file, password_file) {
        Ok(yaml) => {
            print!("{yaml}");
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

fn probe(address: &str, path: &str) -> anyhow::Result<ExitCode> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(3);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(address)?
        .next()
        .context("the admin address resolves to nothing")?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let healthy = response.starts_with("HTTP/1.1 200");
    print!("{}", response.split("\r\n\r\n").nth(1).unwrap_or_default());
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
