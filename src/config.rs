//! The process config, `warden.yaml` (PRODUCT.md §8): listeners, upstream, policies, admin,
//! telemetry and process-wide limits. YAML → structs with serde defaults → `validate()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// The whole process config, after validation. Relative paths are already resolved against the
/// config file's folder.
#[derive(Debug, Clone)]
pub struct WardenConfig {
    /// Client-facing listeners.
    pub listeners: Vec<ListenerConfig>,
    /// The broker.
    pub upstream: UpstreamConfig,
    /// A policy file or a folder of them.
    pub policies: PathBuf,
    /// The admin endpoint, if any.
    pub admin: Option<AdminConfig>,
    /// Logging and tracing.
    pub telemetry: TelemetryConfig,
    /// Process-wide limits.
    pub limits: ProcessLimits,
}

/// One listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind (port 0 picks a free port).
    pub bind: SocketAddr,
}

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The broker address.
    pub address: String,
    /// The proxy's own user name on the broker.
    pub username: Option<String>,
    /// Its password (from `password` or the variable named by `password_env`).
    pub password: Option<String>,
    /// The org prefix template; `{org}` is replaced by the org ID. Default `{org}/`.
    pub topic_prefix: String,
    /// Client ID of the monitoring control connection. Default `mqtt-warden-control-<random>`.
    pub control_client_id: Option<String>,
}

/// The admin HTTP endpoint.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind.
    pub bind: SocketAddr,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging and tracing.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// Log format.
    pub log_format: LogFormat,
    /// OTLP endpoint for traces, if any.
    pub otlp_endpoint: Option<String>,
}

/// Process-wide limits (PRODUCT.md §4).
#[derive(Debug, Clone)]
pub struct ProcessLimits {
    /// Concurrent client connections (104 above).
    pub max_connections: usize,
    /// Time to receive a complete CONNECT (164 / 165).
    pub connect_timeout: Duration,
    /// Largest CONNECT in bytes (165 above).
    pub max_connect_bytes: usize,
    /// Largest packet after CONNECT, in bytes.
    pub max_packet_bytes: usize,
    /// Monitoring messages held while the broker is away.
    pub monitor_queue: usize,
    /// argon2id verifications at once.
    pub auth_workers: usize,
    /// argon2id verifications waiting (176 above).
    pub auth_queue: usize,
}

impl Default for ProcessLimits {
    fn default() -> Self {
        ProcessLimits {
            max_connections: 9_900,
            connect_timeout: Duration::from_secs(60),
            max_connect_bytes: 64 * 1024,
            max_packet_bytes: 256 * 1024,
            monitor_queue: 100_000,
            auth_workers: 2,
            auth_queue: 256,
        }
    }
}

/// Why the config is not usable.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// YAML or a field is wrong.
    #[error("{}:{}: {field}: {message}", path.display(), line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The field path.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl WardenConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<WardenConfig, ConfigError> {
        todo!()
    }

    /// Parses config text; `path` names the file in errors and anchors relative paths.
    pub fn from_yaml(text: &str, path: &Path) -> Result<WardenConfig, ConfigError> {
        todo!()
    }
}
