//! The process config, `warden.yaml`: listeners, upstream, policies, admin,
//! telemetry and process-wide limits. YAML → structs with serde defaults → `validate()`.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::broker::{BrokerKind, Capabilities, CapabilityOverrides, EscapeSet};
use crate::limits::Rate;

use crate::policy::yaml::{self, LineMap};

/// The default org prefix on the broker.
pub const DEFAULT_TOPIC_PREFIX: &str = "{org}/";
/// The placeholder in `topic_prefix` that is replaced by the org ID.
pub const ORG_PLACEHOLDER: &str = "{org}";
/// The smallest `limits.http_max_header_bytes` (what the HTTP library needs to work).
const MIN_HTTP_HEADER_BYTES: u64 = 8192;
/// The largest `limits.http_max_header_bytes`.
const MAX_HTTP_HEADER_BYTES: u64 = 1024 * 1024;
/// How long a write may make no progress, by default (`limits.write_timeout_secs`).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest packet MQTT can frame, in bytes (remaining length plus a 5-byte fixed header).
pub const MAX_MQTT_PACKET_BYTES: u64 = 268_435_455 + 5;

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
    /// The async runtime.
    pub runtime: RuntimeConfig,
    /// Shared state with other instances, when configured (`coordination:`).
    pub coordination: Option<CoordinationConfig>,
}

/// Several instances acting as one proxy, with their shared state in Redis (`coordination:`).
/// Its `Debug` output hides the password.
#[derive(Clone)]
pub struct CoordinationConfig {
    /// Where Redis (or Valkey) is, with the password from `redis_password_env` applied.
    pub redis: RedisEndpoint,
    /// CA certificates (PEM) that sign the certificate of a `rediss://` server; without it, the
    /// system's trust store.
    pub redis_ca: Option<PathBuf>,
    /// This instance's name among the others: unique and stable across restarts.
    pub instance_id: String,
}

/// One Redis server, or a Redis Cluster (`coordination.redis` / `coordination.redis_cluster`).
#[derive(Clone)]
pub enum RedisEndpoint {
    /// One server (boxed: the cluster's list is far smaller).
    Node(Box<redis::ConnectionInfo>),
    /// Seed nodes of a Redis Cluster: the rest of the cluster is found from any of them.
    Cluster(Vec<redis::ConnectionInfo>),
}

impl RedisEndpoint {
    /// The node, or the seed nodes.
    pub fn nodes(&self) -> &[redis::ConnectionInfo] {
        match self {
            RedisEndpoint::Node(node) => std::slice::from_ref(&**node),
            RedisEndpoint::Cluster(seeds) => seeds,
        }
    }
}

impl std::fmt::Debug for CoordinationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes = self.redis.nodes();
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let first = nodes.first().map(|n| n.redis_settings());
        f.debug_struct("CoordinationConfig")
            .field("redis", &addrs)
            .field("cluster", &matches!(self.redis, RedisEndpoint::Cluster(_)))
            .field("db", &first.map(|s| s.db()))
            .field(
                "password",
                &first.and_then(|s| s.password()).map(|_| "<hidden>"),
            )
            .field("redis_ca", &self.redis_ca)
            .field("instance_id", &self.instance_id)
            .finish()
    }
}

/// The shortest bearer token the admin endpoint accepts, in bytes.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// The longest `coordination.instance_id`, in bytes.
pub const MAX_INSTANCE_ID_BYTES: usize = 64;

/// The async runtime (`runtime:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Worker threads; `None`: one per CPU the process may run on.
    pub worker_threads: Option<usize>,
    /// How the kernel schedules the proxy's threads.
    pub scheduling: Scheduling,
}

/// How the kernel schedules the proxy's threads (`runtime.scheduling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    /// Linux `SCHED_BATCH`: the same share of CPU as any other thread, but a thread woken by
    /// new bytes does not preempt the one running. Beside a broker on the same core the proxy
    /// then handles bytes in larger batches, with fewer system calls and context switches per
    /// message (BENCHMARKS.md, "CPU scheduling").
    #[default]
    Batch,
    /// The policy the process was started with (for most, `SCHED_OTHER`; a proxy started under
    /// `chrt` keeps what `chrt` set).
    Inherit,
}

/// One listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind (port 0 picks a free port).
    pub bind: SocketAddr,
    /// TLS on this listener, if any.
    pub tls: Option<TlsConfig>,
    /// The generic tenant every client of this listener belongs to, if any.
    pub tenant: Option<String>,
}

/// A listener's TLS files, with paths resolved against the config file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The server certificate chain (PEM).
    pub cert: PathBuf,
    /// The server private key (PEM).
    pub key: PathBuf,
    /// CA certificates that sign client certificates (PEM); without it no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// How to reach the broker. Its `Debug` output hides the password.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// The broker address: the first node of [`UpstreamConfig::addresses`].
    pub address: String,
    /// Every broker node, `HOST:PORT`, in the configured order (`upstream.addresses`); one
    /// node with `upstream.address`. Never empty.
    pub addresses: Vec<String>,
    /// The proxy's own user name on the broker.
    pub username: Option<String>,
    /// Its password (from `password` or the variable named by `password_env`).
    pub password: Option<String>,
    /// The org prefix template; `{org}` is replaced by the org ID. Default `{org}/`.
    pub topic_prefix: String,
    /// Client ID of the monitoring control connection, which also names the instance's ledger.
    /// Default `mqtt-warden-<first listener address>` (`:`, `[`, `]` as `_`).
    pub control_client_id: Option<String>,
    /// TLS towards the broker, if any.
    pub tls: Option<UpstreamTlsConfig>,
    /// Local addresses the proxy's connections to the broker come from, in turn; empty: the
    /// kernel's choice. Each one gives its own range of ephemeral ports, so together they lift
    /// the ~28,000-connection ceiling of one source address towards one broker address.
    pub source_addresses: Vec<IpAddr>,
    /// The broker's kind (`upstream.broker`, default `mosquitto`).
    pub broker: BrokerKind,
    /// What the proxy relies on the broker for: the kind's declaration with the overrides of
    /// `upstream.capabilities`.
    pub capabilities: Capabilities,
    /// The overrides themselves, so that a probe's mismatch can say whether the operator
    /// declared the capability.
    pub capability_overrides: CapabilityOverrides,
}

/// TLS towards the broker, with paths resolved against the config file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// CA certificates that sign the broker's certificate (PEM).
    pub ca: PathBuf,
    /// The proxy's client certificate chain (PEM), if the broker asks for one.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM); set with `cert`.
    pub key: Option<PathBuf>,
    /// The name to verify the broker's certificate against. Default: the host of `address`.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("addresses", &self.addresses)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("topic_prefix", &self.topic_prefix)
            .field("control_client_id", &self.control_client_id)
            .field("tls", &self.tls)
            .field("source_addresses", &self.source_addresses)
            .field("broker", &self.broker)
            .field("capabilities", &self.capabilities)
            .finish()
    }
}

/// The admin HTTP endpoint. Its `Debug` output hides the token.
#[derive(Clone)]
pub struct AdminConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// The bearer token of the session endpoints (from `token_env`); without it they are off.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// Process-wide limits, the `limits:` section of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Longest keep-alive a client may ask for, in seconds (MQTT 5 is told with Server Keep
    /// Alive; an MQTT 3 client above it, or with 0, is refused). 65535 means no cap.
    pub max_keep_alive_secs: u16,
    /// Filters in one SUBSCRIBE (154 above).
    pub max_filters_per_subscribe: usize,
    /// Unacknowledged QoS 1/2 PUBLISHes from one client (MQTT 5 Receive Maximum; 0x93 above).
    pub max_inflight: u16,
    /// How long part of a packet may wait for the rest (slowloris), after CONNACK.
    pub partial_packet_timeout: Duration,
    /// How long a write to a client or to the broker may make no progress before the session
    /// closes (92): a peer that stops reading cannot hold a session forever.
    pub write_timeout: Duration,
    /// Bytes (topics and payloads) of status messages held while the broker is away.
    pub monitor_queue_bytes: usize,
    /// CONNECTs per client ID (flapping clients; 104 above).
    pub connect_rate_per_client_id: Rate,
    /// CONNECTs per source address (104 above).
    pub connect_rate_per_address: Rate,
    /// HTTP messaging requests on one kept-alive connection; the last is answered with
    /// `Connection: close`.
    pub http_max_requests_per_connection: u32,
    /// Largest HTTP request head (request line and headers), in bytes (431 above).
    pub http_max_header_bytes: usize,
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
            max_keep_alive_secs: u16::MAX,
            max_filters_per_subscribe: 100,
            max_inflight: 1000,
            partial_packet_timeout: Duration::from_secs(30),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            monitor_queue_bytes: 64 * 1024 * 1024,
            // Generous: the point is to stop a client that flaps without pause, never to refuse
            // a test suite or a fleet reconnecting after an outage.
            connect_rate_per_client_id: Rate {
                count: 100,
                per: Duration::from_secs(1),
            },
            connect_rate_per_address: Rate {
                count: 10_000,
                per: Duration::from_secs(1),
            },
            auth_queue: 256,
            http_max_requests_per_connection: 1000,
            http_max_header_bytes: 16 * 1024,
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

/// Every problem of a config file, in file order. `policies` is the policy path when the file
/// named one that is valid, so `check` can check the policies of a config that has other errors.
#[derive(Debug, Error)]
#[error("{}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors {
    /// The problems.
    pub errors: Vec<ConfigError>,
    /// The policy file or folder the config names, if it could be read.
    pub policies: Option<PathBuf>,
}

/// What an environment variable named by `password_env` that is not set means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingSecrets {
    /// An error: `run`, and `check --strict`.
    Error,
    /// A warning: `check` in pipelines that hold no secrets. The password is left out.
    Warn,
}

/// A config that loaded, with the warnings found on the way.
#[derive(Debug)]
pub struct CheckedConfig {
    /// The config.
    pub config: WardenConfig,
    /// Problems that do not stop it (a missing secret under [`MissingSecrets::Warn`]).
    pub warnings: Vec<ConfigError>,
}

impl ConfigError {
    fn invalid(
        path: &Path,
        lines: &LineMap,
        field: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_owned(),
            line: lines.line(field),
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// The line, for sorting (a read error first).
    fn line(&self) -> usize {
        match self {
            ConfigError::Read { .. } => 0,
            ConfigError::Invalid { line, .. } => line.unwrap_or(usize::MAX),
        }
    }
}

impl WardenConfig {
    /// Reads and validates a config file; an unset `password_env` variable is an error.
    pub fn load(path: &Path) -> Result<WardenConfig, ConfigErrors> {
        Self::load_checked(path, MissingSecrets::Error).map(|checked| checked.config)
    }

    /// Reads and validates a config file, reporting every problem.
    pub fn load_checked(
        path: &Path,
        secrets: MissingSecrets,
    ) -> Result<CheckedConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigErrors {
            errors: vec![ConfigError::Read {
                path: path.to_owned(),
                source,
            }],
            policies: None,
        })?;
        WardenConfig::from_yaml_checked(&text, path, secrets)
    }

    /// Parses config text; `path` names the file in errors and anchors relative paths.
    pub fn from_yaml(text: &str, path: &Path) -> Result<WardenConfig, ConfigErrors> {
        Self::from_yaml_checked(text, path, MissingSecrets::Error).map(|checked| checked.config)
    }

    /// As [`WardenConfig::from_yaml`], with the choice of what a missing secret is.
    pub fn from_yaml_checked(
        text: &str,
        path: &Path,
        secrets: MissingSecrets,
    ) -> Result<CheckedConfig, ConfigErrors> {
        let (lines, problems, parsed) = yaml::deserialize_all::<ConfigFile>(text);
        let check = Check {
            path,
            lines: &lines,
            base: path.parent().unwrap_or(Path::new("")),
            secrets,
            errors: RefCell::new(Vec::new()),
            warnings: RefCell::new(Vec::new()),
        };
        for (field, _) in lines.duplicates() {
            if !problems.iter().any(|problem| problem.field == *field) {
                check.error(field, "this key is written twice in the same mapping");
            }
        }
        for problem in problems {
            check.errors.borrow_mut().push(ConfigError::Invalid {
                path: path.to_owned(),
                line: problem.line,
                field: problem.field,
                message: problem.message,
            });
        }
        // What is left once the bad parts are out is still checked, so every error shows at once.
        let config = parsed.map(|file| check.config(file));
        let mut errors = check.errors.into_inner();
        match config {
            Some(config) if errors.is_empty() => Ok(CheckedConfig {
                config,
                warnings: check.warnings.into_inner(),
            }),
            config => {
                errors.sort_by_key(ConfigError::line);
                Err(ConfigErrors {
                    errors,
                    policies: config
                        .map(|c| c.policies)
                        .filter(|p| !p.as_os_str().is_empty()),
                })
            }
        }
    }
}

/// The instance ID when `coordination.instance_id` is left out: the host name and the first
/// listener's port, which no two instances share (two on one host cannot bind one port).
fn default_instance_id(listeners: &[ListenerConfig]) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_INSTANCE_ID_BYTES - 6)
        .collect();
    let host = if host.is_empty() {
        "warden".into()
    } else {
        host
    };
    let port = listeners.first().map(|l| l.bind.port()).unwrap_or(0);
    format!("{host}-{port}")
}

/// Validation of one parsed file: every error points at the line of the offending key, and each
/// check goes on with a stand-in value so that the next one still runs.
struct Check<'a> {
    path: &'a Path,
    lines: &'a LineMap,
    /// The config file's folder, for relative paths.
    base: &'a Path,
    secrets: MissingSecrets,
    errors: RefCell<Vec<ConfigError>>,
    warnings: RefCell<Vec<ConfigError>>,
}

impl Check<'_> {
    fn invalid(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.path, self.lines, field, message)
    }

    /// Records an error.
    fn error(&self, field: &str, message: impl Into<String>) {
        self.errors.borrow_mut().push(self.invalid(field, message));
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base.join(path)
        }
    }

    /// The path resolved against the config's folder; an empty one is an error.
    fn non_empty_path(&self, field: &str, path: PathBuf) -> PathBuf {
        if path.as_os_str().is_empty() {
            self.error(field, "must not be empty");
            return path;
        }
        self.resolve(&path)
    }

    fn config(&self, file: ConfigFile) -> WardenConfig {
        if file.listeners.is_empty() {
            self.error("listeners", "at least one listener is needed");
        }
        let listeners: Vec<ListenerConfig> = file
            .listeners
            .into_iter()
            .enumerate()
            .map(|(index, listener)| self.listener(index, listener))
            .collect();
        let upstream = self.upstream(file.upstream);
        let policies = self.non_empty_path("policies", file.policies);
        let admin = file.admin.map(|admin| AdminConfig {
            bind: admin.bind,
            token: admin.token_env.and_then(|var| {
                let token = self.secret_from_env("admin.token_env", &var)?;
                if token.len() < MIN_ADMIN_TOKEN_BYTES {
                    self.error(
                        "admin.token_env",
                        format!("the token in {var} is shorter than {MIN_ADMIN_TOKEN_BYTES} bytes"),
                    );
                    return None;
                }
                Some(token)
            }),
        });
        let telemetry = self.telemetry(file.telemetry.unwrap_or_default());
        let limits = self.limits(file.limits.unwrap_or_default());
        let runtime_file = file.runtime.unwrap_or_default();
        let runtime = RuntimeConfig {
            worker_threads: match runtime_file.worker_threads {
                Some(0) => {
                    self.error("runtime.worker_threads", "must be at least 1");
                    None
                }
                threads => threads,
            },
            scheduling: runtime_file.scheduling,
        };
        let coordination = file
            .coordination
            .and_then(|coordination| self.coordination(coordination, &listeners));
        WardenConfig {
            listeners,
            upstream,
            policies,
            admin,
            telemetry,
            limits,
            runtime,
            coordination,
        }
    }

    /// The value of the environment variable a `*_env` field names; a missing one is an error
    /// or, under [`MissingSecrets::Warn`], a warning.
    fn secret_from_env(&self, field: &str, var: &str) -> Option<String> {
        match std::env::var(var) {
            Ok(value) => Some(value),
            Err(std::env::VarError::NotPresent) => {
                let problem = self.invalid(field, format!("environment variable {var} is not set"));
                match self.secrets {
                    MissingSecrets::Error => self.errors.borrow_mut().push(problem),
                    MissingSecrets::Warn => self.warnings.borrow_mut().push(problem),
                }
                None
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                self.error(
                    field,
                    format!("environment variable {var} is not valid UTF-8"),
                );
                None
            }
        }
    }

    fn coordination(
        &self,
        coordination: CoordinationFileConfig,
        listeners: &[ListenerConfig],
    ) -> Option<CoordinationConfig> {
        use redis::IntoConnectionInfo;
        // A URL is never repeated in a message: it may hold a password.
        let parse = |field: &str, url: &str| {
            let scheme_ok = ["redis://", "rediss://"]
                .iter()
                .any(|scheme| url.starts_with(scheme));
            let parsed = scheme_ok.then(|| url.into_connection_info().ok()).flatten();
            if parsed.is_none() {
                self.error(
                    field,
                    "must be a redis:// or rediss:// URL, for example redis://127.0.0.1:6379/0",
                );
            }
            parsed
        };
        let endpoint = match (coordination.redis, coordination.redis_cluster) {
            (Some(url), None) => {
                parse("coordination.redis", &url).map(|node| RedisEndpoint::Node(Box::new(node)))
            }
            (None, Some(urls)) => self.cluster_seeds(&urls, parse),
            (Some(_), Some(_)) => {
                self.error(
                    "coordination.redis_cluster",
                    "set redis (one server) or redis_cluster (the seed nodes of a Redis Cluster), not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    "coordination",
                    "needs redis (one server) or redis_cluster (the seed nodes of a Redis Cluster)",
                );
                None
            }
        };
        let password = coordination.redis_password_env.as_deref().and_then(|var| {
            if endpoint.as_ref().is_some_and(|endpoint| {
                endpoint
                    .nodes()
                    .iter()
                    .any(|info| info.redis_settings().password().is_some())
            }) {
                self.error(
                    "coordination.redis_password_env",
                    "the redis URL holds a password already: set one or the other",
                );
                return None;
            }
            self.secret_from_env("coordination.redis_password_env", var)
        });
        let redis_ca = coordination.redis_ca.map(|ca| {
            let is_tls = |info: &redis::ConnectionInfo| {
                matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
            };
            if endpoint
                .as_ref()
                .is_some_and(|endpoint| !endpoint.nodes().iter().all(is_tls))
            {
                self.error("coordination.redis_ca", "is for rediss:// (TLS) URLs only");
            }
            self.non_empty_path("coordination.redis_ca", ca)
        });
        let instance_id = match coordination.instance_id {
            Some(id) => {
                let valid = !id.is_empty()
                    && id.len() <= MAX_INSTANCE_ID_BYTES
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !valid {
                    self.error(
                        "coordination.instance_id",
                        format!(
                            "must be 1 to {MAX_INSTANCE_ID_BYTES} letters, digits, '-', '_' or '.'; leave it out for one made of the host name and the first listener's port"
                        ),
                    );
                }
                id
            }
            None => default_instance_id(listeners),
        };
        let with_password = |info: redis::ConnectionInfo| match &password {
            Some(password) => {
                let settings = info.redis_settings().clone().set_password(password.clone());
                info.set_redis_settings(settings)
            }
            None => info,
        };
        let redis = match endpoint? {
            RedisEndpoint::Node(node) => RedisEndpoint::Node(Box::new(with_password(*node))),
            RedisEndpoint::Cluster(seeds) => {
                RedisEndpoint::Cluster(seeds.into_iter().map(with_password).collect())
            }
        };
        Some(CoordinationConfig {
            redis,
            redis_ca,
            instance_id,
        })
    }

    /// The seed nodes of `coordination.redis_cluster`: one scheme, one password, database 0
    /// (the only one a Redis Cluster has).
    fn cluster_seeds(
        &self,
        urls: &[String],
        parse: impl Fn(&str, &str) -> Option<redis::ConnectionInfo>,
    ) -> Option<RedisEndpoint> {
        let field = "coordination.redis_cluster";
        if urls.is_empty() {
            self.error(field, "needs at least one seed node");
            return None;
        }
        let seeds: Vec<redis::ConnectionInfo> = urls
            .iter()
            .map(|url| parse(field, url))
            .collect::<Option<_>>()?;
        let tls = |info: &redis::ConnectionInfo| {
            matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
        };
        let first = seeds.first()?;
        let mut valid = true;
        if seeds.iter().any(|seed| tls(seed) != tls(first)) {
            self.error(field, "every seed node is redis:// or every one rediss://");
            valid = false;
        }
        if seeds.iter().any(|seed| {
            seed.redis_settings().password() != first.redis_settings().password()
                || seed.redis_settings().username() != first.redis_settings().username()
        }) {
            self.error(field, "every seed node has the same user name and password");
            valid = false;
        }
        if seeds.iter().any(|seed| seed.redis_settings().db() != 0) {
            self.error(field, "a Redis Cluster has only database 0: leave /DB out");
            valid = false;
        }
        valid.then_some(RedisEndpoint::Cluster(seeds))
    }

    fn listener(&self, index: usize, listener: ListenerFileConfig) -> ListenerConfig {
        let index = self.lines.item_index("listeners", index);
        let field = format!("listeners[{index}].tls");
        let tls = listener.tls.map(|tls| TlsConfig {
            cert: self.non_empty_path(&format!("{field}.cert"), tls.cert),
            key: self.non_empty_path(&format!("{field}.key"), tls.key),
            client_ca: tls
                .client_ca
                .map(|ca| self.non_empty_path(&format!("{field}.client_ca"), ca)),
        });
        if let Some(tenant) = &listener.tenant {
            if !crate::policy::is_valid_id_part(tenant) {
                self.error(
                    &format!("listeners[{index}].tenant"),
                    "a tenant name must be 1 to 36 characters of A-Z a-z 0-9 . _ -",
                );
            }
        }
        ListenerConfig {
            bind: listener.bind,
            tls,
            tenant: listener.tenant,
        }
    }

    fn upstream(&self, upstream: UpstreamFileConfig) -> UpstreamConfig {
        let addresses = self.upstream_addresses(upstream.address, upstream.addresses);
        let password = match (upstream.password, upstream.password_env) {
            (Some(_), Some(_)) => {
                self.error(
                    "upstream.password_env",
                    "set password or password_env, not both",
                );
                None
            }
            (Some(password), None) => Some(password),
            (None, Some(var)) => self.secret_from_env("upstream.password_env", &var),
            (None, None) => None,
        };
        let topic_prefix = upstream
            .topic_prefix
            .unwrap_or_else(|| DEFAULT_TOPIC_PREFIX.to_owned());
        // A `$` first would put every org under `$share/...` or `$SYS/...`, where topics are
        // not what they seem to the broker (a `$share/{org}/` prefix turns every filter into a
        // shared subscription of another org's topics).
        let prefix_ok = topic_prefix.contains(ORG_PLACEHOLDER)
            && topic_prefix.ends_with('/')
            && !topic_prefix.starts_with('$')
            && !topic_prefix.contains(['+', '#', '\0']);
        if !prefix_ok {
            self.error(
                "upstream.topic_prefix",
                "must contain {org}, end with /, not start with $ and hold no + # or NUL, for example \"{org}/\"",
            );
        }
        if upstream.control_client_id.as_deref() == Some("") {
            self.error(
                "upstream.control_client_id",
                "must not be empty; leave it out for a generated one",
            );
        }
        let tls = upstream.tls.map(|tls| {
            let optional = |name: &str, path: Option<PathBuf>| {
                path.map(|path| self.non_empty_path(&format!("upstream.tls.{name}"), path))
            };
            let cert = optional("cert", tls.cert);
            let key = optional("key", tls.key);
            if cert.is_some() != key.is_some() {
                self.error(
                    if cert.is_some() {
                        "upstream.tls.cert"
                    } else {
                        "upstream.tls.key"
                    },
                    "set cert and key together, or neither",
                );
            }
            if tls.server_name.as_deref() == Some("") {
                self.error(
                    "upstream.tls.server_name",
                    "must not be empty; leave it out to use the host of each broker address",
                );
            }
            UpstreamTlsConfig {
                ca: self.non_empty_path("upstream.tls.ca", tls.ca),
                cert,
                key,
                server_name: tls.server_name,
            }
        });
        let source_addresses = upstream
            .source_addresses
            .iter()
            .enumerate()
            .filter_map(|(index, text)| {
                let index = self.lines.item_index("upstream.source_addresses", index);
                let parsed = text.parse::<IpAddr>();
                if parsed.is_err() {
                    self.error(
                        &format!("upstream.source_addresses[{index}]"),
                        "must be an IP address of this host, for example 127.0.0.2",
                    );
                }
                parsed.ok()
            })
            .collect();
        let broker = match upstream.broker.as_deref() {
            None => BrokerKind::default(),
            Some(name) => BrokerKind::from_name(name).unwrap_or_else(|| {
                self.error(
                    "upstream.broker",
                    format!("must be one of {}", BrokerKind::NAMES.join(", ")),
                );
                BrokerKind::default()
            }),
        };
        let capability_overrides =
            self.capability_overrides(upstream.capabilities.unwrap_or_default());
        UpstreamConfig {
            capabilities: Capabilities::of(broker, &capability_overrides),
            broker,
            capability_overrides,
            address: addresses.first().cloned().unwrap_or_default(),
            addresses,
            username: upstream.username,
            password,
            topic_prefix,
            control_client_id: upstream.control_client_id,
            tls,
            source_addresses,
        }
    }

    /// The broker nodes: `upstream.address` (one) or `upstream.addresses` (a cluster), each
    /// `HOST:PORT` and listed once.
    fn upstream_addresses(
        &self,
        address: Option<String>,
        addresses: Option<Vec<String>>,
    ) -> Vec<String> {
        let has_port = |address: &str| {
            address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        match (address, addresses) {
            (Some(_), Some(_)) => {
                self.error(
                    "upstream.addresses",
                    "set address (one broker) or addresses (the nodes of a cluster), not both",
                );
                Vec::new()
            }
            (None, None) => {
                self.error(
                    "upstream.address",
                    "missing: the broker, HOST:PORT (or upstream.addresses, the nodes of a cluster)",
                );
                Vec::new()
            }
            (Some(address), None) => {
                if !has_port(&address) {
                    self.error(
                        "upstream.address",
                        "must be HOST:PORT, for example 127.0.0.1:1884",
                    );
                }
                vec![address]
            }
            (None, Some(addresses)) => {
                if addresses.is_empty() {
                    self.error(
                        "upstream.addresses",
                        "list at least one node, HOST:PORT (for one broker, address is enough)",
                    );
                }
                for (index, address) in addresses.iter().enumerate() {
                    let field = format!(
                        "upstream.addresses[{}]",
                        self.lines.item_index("upstream.addresses", index)
                    );
                    if !has_port(address) {
                        self.error(&field, "must be HOST:PORT, for example 10.0.0.2:1883");
                    } else if addresses[..index].contains(address) {
                        self.error(&field, format!("{address} is listed twice"));
                    }
                }
                addresses
            }
        }
    }

    fn capability_overrides(&self, file: CapabilitiesFileConfig) -> CapabilityOverrides {
        if file.max_qos.is_some_and(|qos| qos > 2) {
            self.error("upstream.capabilities.max_qos", "must be 0, 1 or 2");
        }
        let escaped = file.escape.and_then(|chars| match EscapeSet::parse(&chars) {
            Ok(set) => Some(set),
            Err(c) => {
                self.error(
                    "upstream.capabilities.escape",
                    format!(
                        "cannot escape {c:?}: list printable ASCII characters other than % / + # $, for example \".\""
                    ),
                );
                None
            }
        });
        CapabilityOverrides {
            mqtt5: file.mqtt5,
            max_qos: file.max_qos.filter(|qos| *qos <= 2),
            shared_subscriptions: file.shared_subscriptions,
            retained_to_wildcards: file.retained_to_wildcards,
            escaped,
        }
    }

    fn telemetry(&self, telemetry: TelemetryFileConfig) -> TelemetryConfig {
        if let Some(endpoint) = &telemetry.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                self.error(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL, for example http://127.0.0.1:4317",
                );
            }
        }
        TelemetryConfig {
            log_format: telemetry.log_format.unwrap_or_default(),
            otlp_endpoint: telemetry.otlp_endpoint,
        }
    }

    fn limits(&self, limits: LimitsFileConfig) -> ProcessLimits {
        let defaults = ProcessLimits::default();
        // Each reads one key: its value, or the default after recording why the value is wrong.
        let positive = |name: &str, value: Option<u64>, default: usize| -> usize {
            match value {
                None => default,
                Some(0) => {
                    self.error(&format!("limits.{name}"), "must be at least 1");
                    default
                }
                Some(n) => usize::try_from(n).unwrap_or_else(|_| {
                    self.error(&format!("limits.{name}"), "too large");
                    default
                }),
            }
        };
        let packet_bytes = |name: &str, value: Option<u64>, default: usize| -> usize {
            if value.is_some_and(|n| n > MAX_MQTT_PACKET_BYTES) {
                self.error(
                    &format!("limits.{name}"),
                    format!("must be at most {MAX_MQTT_PACKET_BYTES} (the largest MQTT packet)"),
                );
                return default;
            }
            positive(name, value, default)
        };
        let seconds = |name: &str, value: Option<u64>, default: Duration| -> Duration {
            match value {
                None => default,
                Some(0) => {
                    self.error(&format!("limits.{name}"), "must be at least 1");
                    default
                }
                Some(secs) => Duration::from_secs(secs),
            }
        };
        let nonzero_u16 = |name: &str, value: Option<u64>, default: u16| -> u16 {
            match value {
                None => default,
                Some(n) => u16::try_from(n).ok().filter(|n| *n > 0).unwrap_or_else(|| {
                    self.error(&format!("limits.{name}"), "must be 1 to 65535");
                    default
                }),
            }
        };
        ProcessLimits {
            max_connections: positive(
                "max_connections",
                limits.max_connections,
                defaults.max_connections,
            ),
            connect_timeout: seconds(
                "connect_timeout_secs",
                limits.connect_timeout_secs,
                defaults.connect_timeout,
            ),
            max_connect_bytes: packet_bytes(
                "max_connect_bytes",
                limits.max_connect_bytes,
                defaults.max_connect_bytes,
            ),
            max_packet_bytes: packet_bytes(
                "max_packet_bytes",
                limits.max_packet_bytes,
                defaults.max_packet_bytes,
            ),
            monitor_queue: positive(
                "monitor_queue",
                limits.monitor_queue,
                defaults.monitor_queue,
            ),
            auth_workers: positive("auth_workers", limits.auth_workers, defaults.auth_workers),
            // Zero is allowed: no waiting, only the workers.
            auth_queue: match limits.auth_queue {
                None => defaults.auth_queue,
                Some(n) => usize::try_from(n).unwrap_or_else(|_| {
                    self.error("limits.auth_queue", "too large");
                    defaults.auth_queue
                }),
            },
            max_keep_alive_secs: nonzero_u16(
                "max_keep_alive_secs",
                limits.max_keep_alive_secs,
                defaults.max_keep_alive_secs,
            ),
            max_filters_per_subscribe: positive(
                "max_filters_per_subscribe",
                limits.max_filters_per_subscribe,
                defaults.max_filters_per_subscribe,
            ),
            max_inflight: nonzero_u16("max_inflight", limits.max_inflight, defaults.max_inflight),
            partial_packet_timeout: seconds(
                "partial_packet_timeout_secs",
                limits.partial_packet_timeout_secs,
                defaults.partial_packet_timeout,
            ),
            write_timeout: seconds(
                "write_timeout_secs",
                limits.write_timeout_secs,
                defaults.write_timeout,
            ),
            monitor_queue_bytes: positive(
                "monitor_queue_bytes",
                limits.monitor_queue_bytes,
                defaults.monitor_queue_bytes,
            ),
            connect_rate_per_client_id: self.rate(
                "limits.connect_rate_per_client_id",
                limits.connect_rate_per_client_id,
                defaults.connect_rate_per_client_id,
            ),
            connect_rate_per_address: self.rate(
                "limits.connect_rate_per_address",
                limits.connect_rate_per_address,
                defaults.connect_rate_per_address,
            ),
            http_max_requests_per_connection: match limits.http_max_requests_per_connection {
                None => defaults.http_max_requests_per_connection,
                Some(n) => u32::try_from(n).ok().filter(|n| *n > 0).unwrap_or_else(|| {
                    self.error(
                        "limits.http_max_requests_per_connection",
                        "must be 1 to 4294967295",
                    );
                    defaults.http_max_requests_per_connection
                }),
            },
            http_max_header_bytes: match limits.http_max_header_bytes {
                None => defaults.http_max_header_bytes,
                Some(n) if (MIN_HTTP_HEADER_BYTES..=MAX_HTTP_HEADER_BYTES).contains(&n) => {
                    n as usize
                }
                Some(_) => {
                    self.error(
                        "limits.http_max_header_bytes",
                        format!("must be {MIN_HTTP_HEADER_BYTES} to {MAX_HTTP_HEADER_BYTES}"),
                    );
                    defaults.http_max_header_bytes
                }
            },
        }
    }

    fn rate(&self, field: &str, text: Option<String>, default: Rate) -> Rate {
        match text {
            None => default,
            Some(text) => crate::policy::load::parse_rate(&text).unwrap_or_else(|message| {
                self.error(field, message);
                default
            }),
        }
    }
}

// The file format. Unknown keys are errors, so a typo never silently means a default.

/// `warden.yaml` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listeners: Vec<ListenerFileConfig>,
    upstream: UpstreamFileConfig,
    policies: PathBuf,
    #[serde(default)]
    admin: Option<AdminFileConfig>,
    #[serde(default)]
    telemetry: Option<TelemetryFileConfig>,
    #[serde(default)]
    limits: Option<LimitsFileConfig>,
    #[serde(default)]
    runtime: Option<RuntimeFileConfig>,
    #[serde(default)]
    coordination: Option<CoordinationFileConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CoordinationFileConfig {
    #[serde(default)]
    redis: Option<String>,
    #[serde(default)]
    redis_cluster: Option<Vec<String>>,
    #[serde(default)]
    redis_ca: Option<PathBuf>,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    redis_password_env: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeFileConfig {
    #[serde(default)]
    worker_threads: Option<usize>,
    #[serde(default)]
    scheduling: Scheduling,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFileConfig {
    bind: SocketAddr,
    #[serde(default)]
    tls: Option<TlsFileConfig>,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFileConfig {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFileConfig {
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    addresses: Option<Vec<String>>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    topic_prefix: Option<String>,
    #[serde(default)]
    control_client_id: Option<String>,
    #[serde(default)]
    tls: Option<UpstreamTlsFileConfig>,
    #[serde(default)]
    source_addresses: Vec<String>,
    #[serde(default)]
    broker: Option<String>,
    #[serde(default)]
    capabilities: Option<CapabilitiesFileConfig>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CapabilitiesFileConfig {
    #[serde(default)]
    mqtt5: Option<bool>,
    #[serde(default)]
    max_qos: Option<u8>,
    #[serde(default)]
    shared_subscriptions: Option<bool>,
    #[serde(default)]
    retained_to_wildcards: Option<bool>,
    #[serde(default)]
    escape: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamTlsFileConfig {
    ca: PathBuf,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default)]
    server_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFileConfig {
    bind: SocketAddr,
    #[serde(default)]
    token_env: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryFileConfig {
    #[serde(default)]
    log_format: Option<LogFormat>,
    #[serde(default)]
    otlp_endpoint: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFileConfig {
    max_connections: Option<u64>,
    connect_timeout_secs: Option<u64>,
    max_connect_bytes: Option<u64>,
    max_packet_bytes: Option<u64>,
    monitor_queue: Option<u64>,
    auth_workers: Option<u64>,
    auth_queue: Option<u64>,
    max_keep_alive_secs: Option<u64>,
    max_filters_per_subscribe: Option<u64>,
    max_inflight: Option<u64>,
    partial_packet_timeout_secs: Option<u64>,
    write_timeout_secs: Option<u64>,
    monitor_queue_bytes: Option<u64>,
    connect_rate_per_client_id: Option<String>,
    connect_rate_per_address: Option<String>,
    http_max_requests_per_connection: Option<u64>,
    http_max_header_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"127.0.0.1:1884\"\npolicies: policies/\n";

    fn parse(text: &str) -> Result<WardenConfig, ConfigErrors> {
        WardenConfig::from_yaml(text, Path::new("/etc/warden/warden.yaml"))
    }

    /// (line, field, message) of every error of an invalid config.
    fn all_invalid(text: &str) -> Vec<(Option<usize>, String, String)> {
        match parse(text) {
            Err(errors) => errors
                .errors
                .into_iter()
                .map(|error| match error {
                    ConfigError::Invalid {
                        path,
                        line,
                        field,
                        message,
                    } => {
                        assert_eq!(path, Path::new("/etc/warden/warden.yaml"));
                        (line, field, message)
                    }
                    other => panic!("expected an invalid config, got {other:?}"),
                })
                .collect(),
            Ok(config) => panic!("expected an invalid config, got {config:?}"),
        }
    }

    /// (line, field, message) of an invalid config with one error.
    fn invalid(text: &str) -> (Option<usize>, String, String) {
        let mut errors = all_invalid(text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.remove(0)
    }

    #[test]
    fn runtime_worker_threads_are_optional_and_at_least_one() {
        assert_eq!(parse(MINIMAL).unwrap().runtime.worker_threads, None);
        let two = format!("{MINIMAL}runtime: {{ worker_threads: 2 }}\n");
        assert_eq!(parse(&two).unwrap().runtime.worker_threads, Some(2));
        let (_, field, _) = invalid(&format!("{MINIMAL}runtime: {{ worker_threads: 0 }}\n"));
        assert_eq!(field, "runtime.worker_threads");
    }

    #[test]
    fn runtime_scheduling_is_batch_unless_told_to_inherit() {
        assert_eq!(
            parse(MINIMAL).unwrap().runtime.scheduling,
            Scheduling::Batch
        );
        let inherit = format!("{MINIMAL}runtime: {{ scheduling: inherit }}\n");
        assert_eq!(
            parse(&inherit).unwrap().runtime.scheduling,
            Scheduling::Inherit
        );
        let (line, _, message) = invalid(&format!("{MINIMAL}runtime:\n  scheduling: fifo\n"));
        assert!(line.is_some(), "{message}");
        assert!(message.contains("fifo"), "{message}");
    }

    /// Found by fuzzing the rewrite: a `$share/{org}/` prefix made every filter a shared
    /// subscription of unprefixed topics.
    #[test]
    fn a_topic_prefix_may_not_start_with_a_dollar() {
        for prefix in ["$share/{org}/", "$SYS/{org}/"] {
            let text = MINIMAL.replace(
                "  address: \"127.0.0.1:1884\"\n",
                &format!("  address: \"127.0.0.1:1884\"\n  topic_prefix: \"{prefix}\"\n"),
            );
            let (_, field, message) = invalid(&text);
            assert_eq!(field, "upstream.topic_prefix");
            assert!(message.contains("not start with $"), "{message}");
        }
        let fine = MINIMAL.replace(
            "  address: \"127.0.0.1:1884\"\n",
            "  address: \"127.0.0.1:1884\"\n  topic_prefix: \"tenants/{org}/\"\n",
        );
        assert!(parse(&fine).is_ok());
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].bind, "127.0.0.1:0".parse().unwrap());
        assert!(config.listeners[0].tls.is_none());
        assert_eq!(config.upstream.address, "127.0.0.1:1884");
        assert_eq!(
            (config.upstream.username, config.upstream.password),
            (None, None)
        );
        assert_eq!(config.upstream.topic_prefix, "{org}/");
        assert_eq!(config.policies, Path::new("/etc/warden/policies/"));
        assert!(config.admin.is_none());
        assert_eq!(config.telemetry.log_format, LogFormat::Text);
        assert_eq!(config.limits, ProcessLimits::default());
    }

    #[test]
    fn full_config() {
        std::env::set_var("WARDEN_TEST_FULL_PASSWORD", "s3cret");
        let text = r#"
listeners:
  - bind: "0.0.0.0:1883"
  - bind: "[::1]:8883"
    tls: { cert: certs/server.pem, key: /abs/server.key, client_ca: certs/ca.pem }
upstream:
  address: "broker.internal:1884"
  username: warden
  password_env: WARDEN_TEST_FULL_PASSWORD
  topic_prefix: "tenants/{org}/"
  control_client_id: warden-control
policies: ../shared/policy.yaml
admin: { bind: "127.0.0.1:9100" }
telemetry: { log_format: json, otlp_endpoint: "http://127.0.0.1:4317" }
limits:
  max_connections: 100
  connect_timeout_secs: 5
  max_connect_bytes: 1024
  max_packet_bytes: 65536
  monitor_queue: 10
  auth_workers: 4
  auth_queue: 0
"#;
        let config = parse(text).unwrap();
        assert_eq!(
            config.listeners[1].tls,
            Some(TlsConfig {
                cert: "/etc/warden/certs/server.pem".into(),
                key: "/abs/server.key".into(),
                client_ca: Some("/etc/warden/certs/ca.pem".into()),
            })
        );
        assert_eq!(config.upstream.username.as_deref(), Some("warden"));
        assert_eq!(config.upstream.password.as_deref(), Some("s3cret"));
        assert!(!format!("{:?}", config.upstream).contains("s3cret"));
        assert_eq!(config.upstream.topic_prefix, "tenants/{org}/");
        assert_eq!(
            config.upstream.control_client_id.as_deref(),
            Some("warden-control")
        );
        assert_eq!(
            config.policies,
            Path::new("/etc/warden/../shared/policy.yaml")
        );
        assert_eq!(
            config.admin.unwrap().bind,
            "127.0.0.1:9100".parse().unwrap()
        );
        assert_eq!(config.telemetry.log_format, LogFormat::Json);
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(
            config.limits,
            ProcessLimits {
                max_connections: 100,
                connect_timeout: Duration::from_secs(5),
                max_connect_bytes: 1024,
                max_packet_bytes: 65536,
                monitor_queue: 10,
                auth_workers: 4,
                auth_queue: 0,
                ..ProcessLimits::default()
            }
        );
    }

    #[test]
    fn reports_yaml_errors_with_line_and_field() {
        let (line, field, message) = invalid(&format!(
            "{MINIMAL}admin: {{ bind: \"127.0.0.1:9100\", port: 1 }}\n"
        ));
        assert_eq!((line, field.as_str()), (Some(6), "admin.port"));
        assert!(message.starts_with("unknown field `port`"), "{message}");

        let (line, field, _) = invalid("listeners:\n  - bind: \"127.0.0.1:0\"\n  - bind: nowhere\nupstream: { address: \"h:1\" }\npolicies: p\n");
        assert_eq!((line, field.as_str()), (Some(3), "listeners[1].bind"));

        let (line, field, _) = invalid(&format!("{MINIMAL}telemetry:\n  log_format: xml\n"));
        assert_eq!((line, field.as_str()), (Some(7), "telemetry.log_format"));

        let (_, field, message) = invalid("listeners: []\nupstream: { address: \"h:1\" }\n");
        assert_eq!(field, ".");
        assert!(message.contains("missing field `policies`"), "{message}");

        let (line, field, _) = invalid(&format!("{MINIMAL}policies: other\n"));
        assert_eq!((line, field.as_str()), (Some(6), "policies"));
    }

    #[test]
    fn reports_invalid_values_at_their_line() {
        let (line, field, _) =
            invalid("listeners: []\nupstream: { address: \"h:1\" }\npolicies: p\n");
        assert_eq!((line, field.as_str()), (Some(1), "listeners"));

        let (line, field, _) = invalid(
            "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: broker\npolicies: p\n",
        );
        assert_eq!((line, field.as_str()), (Some(4), "upstream.address"));

        for prefix in ["\"tenants/\"", "\"{org}\"", "\"+/{org}/\""] {
            let text = format!("listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"h:1\"\n  topic_prefix: {prefix}\npolicies: p\n");
            let (line, field, _) = invalid(&text);
            assert_eq!(
                (line, field.as_str()),
                (Some(5), "upstream.topic_prefix"),
                "{prefix}"
            );
        }

        let (line, field, _) = invalid(&format!("{MINIMAL}limits:\n  auth_workers: 0\n"));
        assert_eq!((line, field.as_str()), (Some(7), "limits.auth_workers"));
        let (line, field, _) = invalid(&format!(
            "{MINIMAL}limits:\n  max_packet_bytes: 999999999\n"
        ));
        assert_eq!((line, field.as_str()), (Some(7), "limits.max_packet_bytes"));
        let (line, field, _) = invalid(&format!(
            "{MINIMAL}telemetry: {{ otlp_endpoint: \"127.0.0.1:4317\" }}\n"
        ));
        assert_eq!((line, field.as_str()), (Some(6), "telemetry.otlp_endpoint"));
    }

    #[test]
    fn upstream_addresses_of_a_cluster() {
        let cluster = |list: &str| {
            MINIMAL.replace(
                "  address: \"127.0.0.1:1884\"\n",
                &format!("  addresses:\n{list}"),
            )
        };
        let config = parse(&cluster(
            "    - \"10.0.0.1:1883\"\n    - \"broker-2:1884\"\n",
        ))
        .unwrap();
        assert_eq!(
            config.upstream.addresses,
            ["10.0.0.1:1883", "broker-2:1884"]
        );
        assert_eq!(config.upstream.address, "10.0.0.1:1883");
        let single = parse(MINIMAL).unwrap();
        assert_eq!(single.upstream.addresses, ["127.0.0.1:1884"]);

        let (line, field, _) = invalid(&cluster("    - \"h:1\"\n    - h\n"));
        assert_eq!((line, field.as_str()), (Some(6), "upstream.addresses[1]"));
        let (line, field, message) =
            invalid(&cluster("    - \"h:1\"\n    - \"h:2\"\n    - \"h:1\"\n"));
        assert_eq!((line, field.as_str()), (Some(7), "upstream.addresses[2]"));
        assert!(message.contains("listed twice"), "{message}");
        let (line, field, _) = invalid(&cluster("    []\n").replace(":\n    []", ": []"));
        assert_eq!((line, field.as_str()), (Some(4), "upstream.addresses"));

        let both = MINIMAL.replace(
            "  address: \"127.0.0.1:1884\"\n",
            "  address: \"127.0.0.1:1884\"\n  addresses: [\"h:1\", \"h:2\"]\n",
        );
        let (line, field, message) = invalid(&both);
        assert_eq!((line, field.as_str()), (Some(5), "upstream.addresses"));
        assert!(message.contains("not both"), "{message}");

        let neither = MINIMAL.replace("  address: \"127.0.0.1:1884\"\n", "  username: u\n");
        let (line, field, _) = invalid(&neither);
        assert_eq!((line, field.as_str()), (Some(3), "upstream.address"));
    }

    #[test]
    fn upstream_source_addresses() {
        let with = |list: &str| {
            MINIMAL.replace(
                "  address: \"127.0.0.1:1884\"\n",
                &format!("  address: \"127.0.0.1:1884\"\n  source_addresses:\n{list}"),
            )
        };
        let config = parse(&with("    - 127.0.0.2\n    - \"::1\"\n")).unwrap();
        assert_eq!(
            config.upstream.source_addresses,
            [
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert!(parse(MINIMAL).unwrap().upstream.source_addresses.is_empty());

        let (line, field, _) = invalid(&with("    - 127.0.0.2\n    - 10.0.0.300\n"));
        assert_eq!(
            (line, field.as_str()),
            (Some(7), "upstream.source_addresses[1]")
        );
    }

    #[test]
    fn upstream_tls() {
        let config = parse(&MINIMAL.replace(
            "  address: \"127.0.0.1:1884\"\n",
            "  address: \"127.0.0.1:1884\"\n  tls: { ca: certs/ca.pem, cert: /abs/w.pem, key: w.key, server_name: broker }\n",
        ))
        .unwrap();
        assert_eq!(
            config.upstream.tls,
            Some(UpstreamTlsConfig {
                ca: "/etc/warden/certs/ca.pem".into(),
                cert: Some("/abs/w.pem".into()),
                key: Some("/etc/warden/w.key".into()),
                server_name: Some("broker".into()),
            })
        );
        let only_ca = parse(&MINIMAL.replace(
            "  address: \"127.0.0.1:1884\"\n",
            "  address: \"127.0.0.1:1884\"\n  tls: { ca: ca.pem }\n",
        ))
        .unwrap();
        assert_eq!(only_ca.upstream.tls.unwrap().cert, None);

        let (line, field, message) = invalid(&MINIMAL.replace(
            "  address: \"127.0.0.1:1884\"\n",
            "  address: \"127.0.0.1:1884\"\n  tls:\n    ca: ca.pem\n    cert: w.pem\n",
        ));
        assert_eq!((line, field.as_str()), (Some(7), "upstream.tls.cert"));
        assert!(message.contains("together"), "{message}");
        let (_, field, _) = invalid(&MINIMAL.replace(
            "  address: \"127.0.0.1:1884\"\n",
            "  address: \"127.0.0.1:1884\"\n  tls: { cert: w.pem }\n",
        ));
        assert_eq!(field, "upstream.tls");
    }

    #[test]
    fn coordination_is_optional_and_checked() {
        assert!(parse(MINIMAL).unwrap().coordination.is_none());
        let config = parse(&format!(
            "{MINIMAL}coordination:\n  redis: \"redis://:secret@127.0.0.1:6390/2\"\n  instance_id: warden-a\n"
        ))
        .unwrap();
        let coordination = config.coordination.unwrap();
        assert_eq!(coordination.instance_id, "warden-a");
        let RedisEndpoint::Node(node) = &coordination.redis else {
            panic!("one server")
        };
        assert_eq!(node.redis_settings().db(), 2);
        assert_eq!(node.redis_settings().password(), Some("secret"));
        let shown = format!("{coordination:?}");
        assert!(!shown.contains("secret"), "{shown}");

        // The default instance ID: the host name and the first listener's port.
        let derived = parse(&format!(
            "{MINIMAL}coordination: {{ redis: \"redis://h:1\" }}\n"
        ))
        .unwrap()
        .coordination
        .unwrap();
        assert!(
            derived.instance_id.ends_with("-0"),
            "{}",
            derived.instance_id
        );

        std::env::set_var("WARDEN_TEST_REDIS_PASSWORD", "from-env");
        let from_env = parse(&format!(
            "{MINIMAL}coordination:\n  redis: \"rediss://h:1\"\n  redis_password_env: WARDEN_TEST_REDIS_PASSWORD\n"
        ))
        .unwrap()
        .coordination
        .unwrap();
        assert_eq!(
            from_env.redis.nodes()[0].redis_settings().password(),
            Some("from-env")
        );
    }

    #[test]
    fn a_redis_cluster_is_a_list_of_seed_nodes_sharing_one_password_and_scheme() {
        std::env::set_var("WARDEN_TEST_CLUSTER_PASSWORD", "cluster-secret");
        let config = parse(&format!(
            "{MINIMAL}coordination:\n  redis_cluster: [\"rediss://10.0.0.1:7000\", \"rediss://10.0.0.2:7000\"]\n  redis_password_env: WARDEN_TEST_CLUSTER_PASSWORD\n  redis_ca: certs/redis-ca.pem\n"
        ))
        .unwrap();
        let coordination = config.coordination.unwrap();
        let RedisEndpoint::Cluster(seeds) = &coordination.redis else {
            panic!("a cluster")
        };
        assert_eq!(seeds.len(), 2);
        assert!(seeds
            .iter()
            .all(|seed| seed.redis_settings().password() == Some("cluster-secret")));
        assert_eq!(
            coordination.redis_ca.as_deref(),
            Some(Path::new("/etc/warden/certs/redis-ca.pem"))
        );
        assert!(!format!("{coordination:?}").contains("cluster-secret"));

        let errors = |section: &str| -> Vec<(Option<usize>, String)> {
            all_invalid(&format!("{MINIMAL}coordination:\n{section}"))
                .into_iter()
                .map(|(line, field, _)| (line, field))
                .collect()
        };
        let field = |line: usize, name: &str| (Some(line), name.to_owned());
        assert_eq!(
            errors("  redis: \"redis://h:1\"\n  redis_cluster: [\"redis://h:1\"]\n"),
            vec![field(8, "coordination.redis_cluster")]
        );
        assert_eq!(
            errors("  redis_cluster: [\"redis://h:1\", \"rediss://h:2\"]\n"),
            vec![field(7, "coordination.redis_cluster")]
        );
        assert_eq!(
            errors("  redis_cluster: [\"redis://:a@h:1\", \"redis://:b@h:2\"]\n"),
            vec![field(7, "coordination.redis_cluster")]
        );
        assert_eq!(
            errors("  redis_cluster: [\"redis://h:1/3\"]\n"),
            vec![field(7, "coordination.redis_cluster")]
        );
        assert_eq!(
            errors("  redis_cluster: []\n"),
            vec![field(7, "coordination.redis_cluster")]
        );
        assert_eq!(
            errors("  redis: \"redis://h:1\"\n  redis_ca: ca.pem\n"),
            vec![field(8, "coordination.redis_ca")]
        );
        assert_eq!(errors("  instance_id: a\n"), vec![field(6, "coordination")]);
    }

    #[test]
    fn the_admin_token_comes_from_the_environment_and_is_long_enough() {
        std::env::set_var("WARDEN_TEST_ADMIN_TOKEN_LONG", "0123456789abcdef");
        std::env::set_var("WARDEN_TEST_ADMIN_TOKEN_SHORT", "short");
        let admin = |var: &str| {
            format!("{MINIMAL}admin:\n  bind: \"127.0.0.1:9100\"\n  token_env: {var}\n")
        };
        let config = parse(&admin("WARDEN_TEST_ADMIN_TOKEN_LONG")).unwrap();
        let admin_config = config.admin.unwrap();
        assert_eq!(admin_config.token.as_deref(), Some("0123456789abcdef"));
        assert!(!format!("{admin_config:?}").contains("0123456789abcdef"));
        let (line, field, message) = invalid(&admin("WARDEN_TEST_ADMIN_TOKEN_SHORT"));
        assert_eq!((line, field.as_str()), (Some(8), "admin.token_env"));
        assert!(message.contains("shorter than 16"), "{message}");
        assert!(!message.contains("short\""), "{message}");
        let (line, field, _) = invalid(&admin("WARDEN_TEST_ADMIN_TOKEN_UNSET"));
        assert_eq!((line, field.as_str()), (Some(8), "admin.token_env"));
    }

    #[test]
    fn coordination_errors_name_their_line_and_field() {
        let text = format!(
            "{MINIMAL}coordination:\n  redis: \"http://user:pw@h:1\"\n  instance_id: \"a b\"\n  redis_password_env: WARDEN_TEST_UNSET_REDIS_PASSWORD\n"
        );
        let errors = all_invalid(&text);
        let fields: Vec<_> = errors
            .iter()
            .map(|(line, field, _)| (*line, field.as_str()))
            .collect();
        assert_eq!(
            fields,
            vec![
                (Some(7), "coordination.redis"),
                (Some(8), "coordination.instance_id"),
                (Some(9), "coordination.redis_password_env"),
            ]
        );
        assert!(
            errors
                .iter()
                .all(|(_, _, message)| !message.contains("pw@")),
            "the URL may hold a password: {errors:?}"
        );
        let (line, field, message) = invalid(&format!(
            "{MINIMAL}coordination:\n  redis: \"redis://:pw@h:1\"\n  redis_password_env: HOME\n"
        ));
        assert_eq!(
            (line, field.as_str()),
            (Some(8), "coordination.redis_password_env")
        );
        assert!(message.contains("one or the other"), "{message}");
        let (line, field, _) = invalid(&format!("{MINIMAL}coordination: {{ instance_id: a }}\n"));
        assert_eq!((line, field.as_str()), (Some(6), "coordination"));
    }

    #[test]
    fn reports_every_error_in_file_order() {
        let text = "listeners:\n  - bind: nowhere\n  - bind: \"127.0.0.1:0\"\n    tls: { cert: \"\", key: k }\nupstream:\n  address: broker\n  topic_prefix: \"x/\"\n  colour: blue\npolicies: p\ntelemetry: { log_format: xml }\nlimits:\n  auth_workers: 0\n  max_inflight: 70000\n  connect_rate_per_address: often\n";
        let errors = all_invalid(text);
        let got: Vec<_> = errors
            .iter()
            .map(|(line, field, _)| (line.unwrap_or(0), field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "listeners[0].bind"),
                (4, "listeners[1].tls.cert"),
                (6, "upstream.address"),
                (7, "upstream.topic_prefix"),
                (8, "upstream.colour"),
                (10, "telemetry.log_format"),
                (12, "limits.auth_workers"),
                (13, "limits.max_inflight"),
                (14, "limits.connect_rate_per_address"),
            ],
            "{errors:?}"
        );
        let shown = parse(text).unwrap_err();
        assert_eq!(shown.policies.as_deref(), Some(Path::new("/etc/warden/p")));
        assert!(
            shown
                .to_string()
                .contains("/etc/warden/warden.yaml:8: upstream.colour: unknown field `colour`"),
            "{shown}"
        );
    }

    #[test]
    fn a_missing_secret_can_be_a_warning() {
        let text = "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"h:1\"\n  password_env: WARDEN_TEST_UNSET_FOR_WARNING\npolicies: p\n";
        let path = Path::new("/etc/warden/warden.yaml");
        let checked = WardenConfig::from_yaml_checked(text, path, MissingSecrets::Warn).unwrap();
        assert_eq!(checked.config.upstream.password, None);
        assert_eq!(checked.warnings.len(), 1);
        assert!(
            checked.warnings[0]
                .to_string()
                .contains(":5: upstream.password_env: environment variable WARDEN_TEST_UNSET_FOR_WARNING is not set"),
            "{}",
            checked.warnings[0]
        );
        let errors =
            WardenConfig::from_yaml_checked(text, path, MissingSecrets::Error).unwrap_err();
        assert_eq!(errors.errors.len(), 1);
    }

    #[test]
    fn password_env_must_be_set() {
        let text = "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"h:1\"\n  password_env: WARDEN_TEST_UNSET_VARIABLE\npolicies: p\n";
        let (line, field, message) = invalid(text);
        assert_eq!((line, field.as_str()), (Some(5), "upstream.password_env"));
        assert!(message.contains("WARDEN_TEST_UNSET_VARIABLE"), "{message}");

        let both = text.replace("  password_env:", "  password: x\n  password_env:");
        let (line, field, _) = invalid(&both);
        assert_eq!((line, field.as_str()), (Some(6), "upstream.password_env"));
    }

    #[test]
    fn load_reports_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("warden.yaml");
        assert!(
            matches!(WardenConfig::load(&missing).unwrap_err().errors.as_slice(), [ConfigError::Read { path, .. }] if *path == missing)
        );
    }

    #[test]
    fn shipped_examples_load() {
        std::env::set_var("WARDEN_UPSTREAM_PASSWORD", "example-password");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = WardenConfig::load(&root.join("examples/warden.yaml")).unwrap();
        assert_eq!(config.listeners[0].bind, "127.0.0.2:1883".parse().unwrap());
        assert_eq!(config.upstream.address, "127.0.0.1:1884");
        assert_eq!(config.upstream.username.as_deref(), Some("warden"));
        assert_eq!(
            config.upstream.password.as_deref(),
            Some("example-password")
        );
        assert!(config.admin.is_none());
        assert_eq!(
            config.policies,
            root.join("examples/../policies/example.yaml")
        );
        let policy = crate::policy::load_policies(&config.policies).unwrap();
        assert_eq!(policy.orgs.len(), 3);
    }

    #[test]
    fn the_broker_kind_sets_capabilities_and_each_override_replaces_one() {
        let config = WardenConfig::from_yaml(MINIMAL, Path::new("warden.yaml")).expect("valid");
        assert_eq!(config.upstream.broker, BrokerKind::Mosquitto);
        assert_eq!(
            config.upstream.capabilities,
            BrokerKind::Mosquitto.declared()
        );
        let text = MINIMAL.replace(
            "upstream:\n",
            "upstream:\n  broker: nats\n  capabilities: { max_qos: 2, escape: \". \" }\n",
        );
        let config = WardenConfig::from_yaml(&text, Path::new("warden.yaml")).expect("valid");
        assert_eq!(config.upstream.broker, BrokerKind::Nats);
        let caps = config.upstream.capabilities;
        assert_eq!(caps.max_qos, 2);
        assert!(!caps.mqtt5 && !caps.shared_subscriptions);
        assert!(caps.escaped.contains(b' ') && caps.escaped.contains(b'.'));
    }

    #[test]
    fn a_bad_broker_section_names_every_wrong_field() {
        let text = MINIMAL.replace(
            "upstream:\n",
            "upstream:\n  broker: kafka\n  capabilities:\n    max_qos: 3\n    escape: \"/\"\n",
        );
        let error = WardenConfig::from_yaml(&text, Path::new("warden.yaml"))
            .expect_err("three errors")
            .to_string();
        for field in [
            "upstream.broker",
            "upstream.capabilities.max_qos",
            "upstream.capabilities.escape",
        ] {
            assert!(error.contains(field), "{field} in {error}");
        }
    }
}
