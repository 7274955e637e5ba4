//! The proxy as a whole: the state every session shares, the listeners, the accept loop with its
//! process-wide connection cap, and the process's life: start, policy reloads and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::Verifier;
use crate::close::{CloseCode, CloseReason};
use crate::config::WardenConfig;
use crate::metrics::Metrics;
use crate::monitor::Monitor;
use crate::policy::{load_policies, Policy, PolicyErrors};
use crate::registry::Registry;
use crate::session::{self, ConnectionInfo};
use crate::transport::{self, tls, ListenerTransport, PeerCertificate, ServerTls, TlsError};
use crate::upstream::Dialer;

/// What every session shares.
pub struct Shared {
    /// The process config.
    pub config: WardenConfig,
    /// The policy in force; a reload swaps it whole.
    pub policy: ArcSwap<Policy>,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// Monitoring messages.
    pub monitor: Monitor,
    /// How to reach the broker.
    pub dialer: Dialer,
    /// Free connection slots (104 when none).
    pub connection_slots: Arc<Semaphore>,
    /// Metrics.
    pub metrics: Metrics,
    /// Publish buckets shared by the connections of each org.
    pub org_buckets: crate::limits::OrgBuckets,
    /// CONNECT rates per client ID and per source address.
    pub connect_rates: crate::limits::ConnectRates,
    /// Bumped on every applied policy reload, so that a session that was still connecting
    /// during a reload notices it (registered sessions are told through the registry).
    pub policy_generation: AtomicU64,
    /// Every session task, so that shutdown can wait for them.
    pub sessions: TaskTracker,
    shutting_down: AtomicBool,
}

impl Shared {
    /// Whether a shutdown has begun (new CONNECTs are refused, `/readyz` is red).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Why the proxy could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The policy did not load.
    #[error("policy: {0}")]
    Policy(#[from] PolicyErrors),
    /// A listener's TLS files did not load.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The broker's TLS files or the source addresses cannot be used.
    #[error("{0}")]
    Upstream(#[from] crate::upstream::DialerError),
    /// A listener could not bind.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A started proxy.
pub struct RunningProxy {
    /// The bound listener addresses, in config order (useful with port 0).
    pub listen_addrs: Vec<SocketAddr>,
    /// The shared state.
    pub shared: Arc<Shared>,
    /// The admin endpoint's address, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// Each TLS listener's certificates, in config order (reloadable).
    pub tls: Vec<Arc<ServerTls>>,
    shutdown: watch::Sender<bool>,
    accept_tasks: JoinSet<()>,
}

impl RunningProxy {
    /// Stops accepting connections. Live sessions go on until they end.
    pub async fn stop_accepting(&mut self) {
        let _ = self.shutdown.send(true);
        while self.accept_tasks.join_next().await.is_some() {}
    }

    /// Shuts down: stop accepting, close every session with 93 (MQTT 5: DISCONNECT 0x8B), let
    /// their Disconnect monitoring messages reach the broker, all within `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        self.stop_accepting().await;
        let sessions = self.shared.registry.sessions();
        info!(sessions = sessions.len(), "closing sessions for shutdown");
        for session in &sessions {
            session.close(CloseReason::new(CloseCode::ServerShutdown));
        }
        self.shared.sessions.close();
        if tokio::time::timeout_at(deadline, self.shared.sessions.wait())
            .await
            .is_err()
        {
            warn!("grace time over before every session closed");
        }
        if tokio::time::timeout_at(deadline, self.shared.monitor.flushed())
            .await
            .is_err()
        {
            warn!("grace time over before every monitoring message was published");
        }
    }

    /// Reloads the policy now (what SIGHUP and a file change do).
    pub fn reload_policy(&self) -> Result<(), PolicyErrors> {
        crate::reload::apply(&self.shared)
    }
}

/// Loads the policy, starts the monitor and binds every listener.
pub async fn start(config: WardenConfig) -> Result<RunningProxy, StartError> {
    let policy = load_policies(&config.policies)?;
    info!(orgs = policy.orgs.len(), path = %config.policies.display(), "policy loaded");
    let dialer = Dialer::new(&config.upstream)?;
    let transports = config
        .listeners
        .iter()
        .map(|listener| {
            Ok(ListenerTransport {
                tls: listener.tls.as_ref().map(ServerTls::load).transpose()?,
                websocket: transport::websocket::config(config.limits.max_packet_bytes),
                connect_timeout: config.limits.connect_timeout,
            })
        })
        .collect::<Result<Vec<_>, TlsError>>()?;
    // The control client ID names this instance on the broker: it must stay the same across
    // restarts, so that a restarted process finds and settles its predecessor's clients.
    let control_id = config
        .upstream
        .control_client_id
        .clone()
        .unwrap_or_else(|| {
            let first_bind = config
                .listeners
                .first()
                .map(|l| l.bind.to_string())
                .unwrap_or_default();
            format!("mqtt-warden-{}", first_bind.replace([':', '[', ']'], "_"))
        });
    let registry = Registry::new();
    let is_live: crate::monitor::IsLive = {
        let registry = registry.clone();
        Arc::new(move |identity| registry.is_live(identity))
    };
    let ledger = crate::ledger::Ledger::new(&control_id);
    let monitor = Monitor::spawn(
        dialer.clone(),
        control_id,
        config.limits.monitor_queue,
        ledger,
        is_live,
    );
    let shared = Arc::new(Shared {
        verifier: Verifier::new(config.limits.auth_workers, config.limits.auth_queue),
        connection_slots: Arc::new(Semaphore::new(config.limits.max_connections)),
        policy: ArcSwap::from_pointee(policy),
        registry,
        monitor,
        dialer,
        metrics: Metrics::default(),
        org_buckets: Default::default(),
        connect_rates: crate::limits::ConnectRates::new(
            config.limits.connect_rate_per_client_id,
            config.limits.connect_rate_per_address,
        ),
        policy_generation: AtomicU64::new(0),
        sessions: TaskTracker::new(),
        shutting_down: AtomicBool::new(false),
        config,
    });

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut listen_addrs = Vec::new();
    let mut accept_tasks = JoinSet::new();
    let tls: Vec<Arc<ServerTls>> = transports.iter().filter_map(|t| t.tls.clone()).collect();
    accept_tasks.spawn(tls::watch_reloads(tls.clone(), shutdown_rx.clone()));
    for (listener_config, transport) in shared.config.listeners.iter().zip(transports) {
        let listener = TcpListener::bind(listener_config.bind)
            .await
            .map_err(|source| StartError::Bind {
                address: listener_config.bind,
                source,
            })?;
        let local = listener.local_addr().map_err(|source| StartError::Bind {
            address: listener_config.bind,
            source,
        })?;
        info!(address = %local, tls = transport.tls.is_some(), "listening");
        listen_addrs.push(local);
        accept_tasks.spawn(accept_loop(
            listener,
            local,
            Arc::new(transport),
            shared.clone(),
            shutdown_rx.clone(),
        ));
    }
    let admin_addr = match shared.config.admin.as_ref().map(|admin| admin.bind) {
        Some(bind) => Some(
            crate::admin::serve(bind, shared.clone(), shutdown_rx.clone())
                .await
                .map_err(|source| StartError::Bind {
                    address: bind,
                    source,
                })?,
        ),
        None => None,
    };
    crate::reload::watch(shared.clone(), shutdown_rx.clone());
    tokio::spawn(forget_idle_connect_rates(shared.clone(), shutdown_rx));
    Ok(RunningProxy {
        listen_addrs,
        shared,
        admin_addr,
        tls,
        shutdown,
        accept_tasks,
    })
}

/// How often the CONNECT-rate maps drop keys that have been idle.
const CONNECT_RATE_SWEEP: Duration = Duration::from_secs(60);

async fn forget_idle_connect_rates(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut sweep = tokio::time::interval(CONNECT_RATE_SWEEP);
    loop {
        tokio::select! {
            _ = sweep.tick() => shared.connect_rates.shrink(),
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    local: SocketAddr,
    transport: Arc<ListenerTransport>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => spawn_session(stream, peer, local, &transport, &shared),
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning on the error.
                warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs a connection's transport handshakes and then its session, in a task of its own.
fn spawn_session(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    transport: &Arc<ListenerTransport>,
    shared: &Arc<Shared>,
) {
    let _ = stream.set_nodelay(true);
    let task_shared = shared.clone();
    let transport = transport.clone();
    let connected_at = SystemTime::now();
    shared.sessions.spawn(async move {
        let shared = task_shared;
        let accepted = match transport::accept(stream, &transport).await {
            Ok(accepted) => accepted,
            Err(error) => {
                if error.is_tls_failure() {
                    shared
                        .metrics
                        .tls_handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
                match error.close_code() {
                    Some(code) => {
                        info!(%peer, code = code.number(), %error, "connection closed before MQTT")
                    }
                    None => debug!(%peer, %error, "connection closed before MQTT"),
                }
                return;
            }
        };
        let certname = match &accepted.certificate {
            PeerCertificate::Verified { common_name } => common_name.clone(),
            _ => None,
        };
        let info = ConnectionInfo {
            peer,
            local,
            secure: accepted.secure,
            websocket: accepted.websocket,
            certname,
            certificate: accepted.certificate,
            connected_at,
        };
        session::run(accepted.stream, info, shared).await;
    });
}

impl Shared {
    /// TLS handshakes that failed so far (closing code 163).
    pub fn tls_handshake_failures(&self) -> u64 {
        self.metrics.tls_handshake_failures.load(Ordering::Relaxed)
    }
}
