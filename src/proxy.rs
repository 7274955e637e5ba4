//! Assembly: builds the profile, the shared state and the session context from the config,
//! binds the listeners (before anything dials the broker), runs the accept loops, and shuts
//! down. Nothing imports this module; it is the one place that knows every piece.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admin::{AdminSessions, AdminState};
use crate::auth::Verifier;
use crate::config::WardenConfig;
use crate::coord::ids::process_hex;
use crate::coord::local::{LocalAdmission, LocalReporter, LocalTenantBuckets};
use crate::coord::redis::{CoordError, Coordinator};
use crate::coord::{Admission, ProcessSlots, Reporter, TenantBuckets};
use crate::dispatch::Dispatch;
use crate::http::HttpFront;
use crate::ledger::{Ledger, Step, LEDGER_ROOT};
use crate::limits::{refusal_log_budget, ConnectRates};
use crate::metrics::Metrics;
use crate::monitor::{ControlConfig, Monitor, Recovery};
use crate::policy::{check_isolation, load_policies, PolicyErrors, PolicyStore};
use crate::profile::Profile;
use crate::refusal::{Cause, Refusal};
use crate::reload::Reloader;
use crate::retained::RetainedRecord;
use crate::session::{self, Context};
use crate::share::Groups;
use crate::transport::{
    self, ConnectionInfo, ListenerTransport, PeerCertificate, ServerTls, TlsError,
};
use crate::upstream::Dialer;

/// The session context of this proxy: WIoTP orgs and generic tenants, dialling the configured
/// broker.
type ProxyContext = Context<Dispatch, Dialer>;

/// How often the CONNECT-rate maps drop keys that have been idle.
const CONNECT_RATE_SWEEP: Duration = Duration::from_secs(60);
/// How long the accept loop backs off after an accept error (EMFILE and friends).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
    /// The coordination store could not be reached, or this instance's ID is in use.
    #[error("coordination: {0}")]
    Coordination(#[from] CoordError),
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
    /// The admin endpoint's address, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// Each TLS listener's certificates, in config order (reloadable).
    pub tls: Vec<Arc<ServerTls>>,
    /// The process metrics.
    pub metrics: Arc<Metrics>,
    /// The control connection.
    pub monitor: Monitor,
    /// Live sessions.
    pub admission: Arc<dyn Admission>,
    /// The shared state of several instances, when `coordination:` is configured.
    pub coordinator: Option<Arc<Coordinator>>,
    reloader: Arc<Reloader>,
    ledger: Ledger,
    sessions: TaskTracker,
    shutting_down: Arc<AtomicBool>,
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
    /// their Disconnect statuses reach the broker, all within `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.shutting_down.store(true, Ordering::Relaxed);
        self.stop_accepting().await;
        let sessions = self.admission.sessions();
        info!(sessions = sessions.len(), "closing sessions for shutdown");
        for session in &sessions {
            session.close(Refusal::new(Cause::Shutdown));
        }
        self.sessions.close();
        if tokio::time::timeout_at(deadline, self.sessions.wait())
            .await
            .is_err()
        {
            warn!("grace time over before every session closed");
        }
        if let Some(coordinator) = &self.coordinator {
            // The closed sessions' statuses pass the coordinator's queue on their way out.
            let _ = tokio::time::timeout_at(deadline, coordinator.drained()).await;
            let _ = tokio::time::timeout_at(deadline, coordinator.leave()).await;
        }
        // This process is going: its ledger marker goes too, unless sessions are left (then the
        // will clears it when the connection drops, and the next process settles them).
        if self.admission.sessions().is_empty() {
            self.monitor.send(vec![self.ledger.marker_clear()]);
        }
        self.monitor.close();
        if tokio::time::timeout_at(deadline, self.monitor.flushed())
            .await
            .is_err()
        {
            warn!("grace time over before every status message was published");
        }
    }

    /// Reloads the policy now (what SIGHUP and a file change do).
    pub fn reload_policy(&self) -> Result<(), PolicyErrors> {
        self.reloader.reload_policy()
    }

    /// TLS handshakes that failed so far (closing code 163).
    pub fn tls_handshake_failures(&self) -> u64 {
        self.metrics.tls_handshake_failures.get()
    }
}

/// Loads the policy, binds every listener, then starts the control connection and the accept
/// loops. Binding comes first, so a second start of the same config fails before it touches
/// the broker.
pub async fn start(config: WardenConfig) -> Result<RunningProxy, StartError> {
    let policy = load_policies(&config.policies)?;
    let isolation = check_isolation(&policy, &config.upstream.topic_prefix);
    if !isolation.is_empty() {
        return Err(StartError::Policy(PolicyErrors(isolation)));
    }
    info!(orgs = policy.orgs.len(), tenants = policy.tenants.len(), path = %config.policies.display(), "policy loaded");
    let metrics = Arc::new(Metrics::default());
    let dialer = Arc::new(Dialer::with_metrics(&config.upstream, &metrics.nodes)?);
    let transports = config
        .listeners
        .iter()
        .map(|listener| {
            Ok(ListenerTransport {
                tls: listener.tls.as_ref().map(ServerTls::load).transpose()?,
                websocket: transport::websocket::config(config.limits.max_packet_bytes),
                connect_timeout: config.limits.connect_timeout,
                tenant: listener.tenant.as_deref().map(Arc::from),
            })
        })
        .collect::<Result<Vec<_>, TlsError>>()?;
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for listener_config in &config.listeners {
        let bind_error = |source| StartError::Bind {
            address: listener_config.bind,
            source,
        };
        let listener = TcpListener::bind(listener_config.bind)
            .await
            .map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        listeners.push((listener, local));
    }
    let admin_listener = match config.admin.as_ref().map(|admin| admin.bind) {
        Some(bind) => Some(
            TcpListener::bind(bind)
                .await
                .map_err(|source| StartError::Bind {
                    address: bind,
                    source,
                })?,
        ),
        None => None,
    };

    let store = Arc::new(PolicyStore::new(policy));
    let verifier = Verifier::new(config.limits.auth_workers, config.limits.auth_queue);
    let profile = Arc::new(Dispatch::new(
        store.clone(),
        verifier.clone(),
        &config.upstream.topic_prefix,
    ));
    let local_admission = LocalAdmission::new();
    let coordination = config.coordination.as_ref();

    // The ledger namespace names this instance on the broker and stays the same across
    // restarts, so that a restarted process finds and settles its predecessor's clients. The
    // control connection's client ID adds this process's own ID, so that two processes never
    // take each other's control connection over.
    let namespace = config
        .upstream
        .control_client_id
        .clone()
        .or_else(|| coordination.map(|c| format!("mqtt-warden-{}", c.instance_id)))
        .unwrap_or_else(|| {
            let first_bind = config
                .listeners
                .first()
                .map(|l| l.bind.to_string())
                .unwrap_or_default();
            format!("mqtt-warden-{}", first_bind.replace([':', '[', ']'], "_"))
        });
    let boot = process_hex();
    let ledger = Ledger::new(&namespace, &boot);
    // With coordination, Redis keeps what crash recovery needs, and the survivors settle.
    let recovery = coordination.is_none().then(|| {
        let (ledger, profile, admission) =
            (ledger.clone(), profile.clone(), local_admission.clone());
        Recovery {
            sentinel: ledger.sentinel_topic(),
            settle: Box::new(move |round, found| {
                let step = ledger.recover(
                    round,
                    found,
                    |entry| profile.settle(entry),
                    |presence| admission.is_present(presence),
                );
                if let Step::Done(settled) = &step {
                    let statuses = settled
                        .iter()
                        .filter(|p| !p.payload.is_empty() && !p.topic.starts_with(LEDGER_ROOT))
                        .count();
                    if statuses > 0 {
                        warn!(
                            statuses,
                            "settled clients of an earlier process that stopped without closing them"
                        );
                    }
                }
                step
            }),
        }
    });
    // Statuses are replayed by the proxy where the broker would not deliver them to a new
    // wildcard subscription.
    let capabilities = config.upstream.capabilities;
    let retained =
        (!capabilities.retained_to_wildcards).then(|| Arc::new(RetainedRecord::default()));
    let monitor = Monitor::spawn(
        dialer.clone(),
        ControlConfig {
            client_id: format!("{namespace}-{boot}"),
            will: Some(ledger.marker_clear()),
            greeting: vec![ledger.marker()],
            recovery,
            queue_limit: config.limits.monitor_queue,
            queue_bytes: config.limits.monitor_queue_bytes,
            capabilities: config.upstream.capabilities,
            probe: true,
            // With coordination, the coordinator records them, in the order every instance
            // agrees on, and shares the record with the others.
            retained: retained.clone().filter(|_| coordination.is_none()),
        },
        metrics.monitor.clone(),
    );
    let (shutdown, shutdown_rx) = watch::channel(false);
    let coordinator = match coordination {
        Some(coordination) => {
            let settle = {
                let profile = profile.clone();
                Arc::new(move |entry: &[u8], refusal: &Refusal| profile.settle_as(entry, refusal))
            };
            Some(
                Coordinator::start(
                    coordination,
                    monitor.clone(),
                    settle,
                    config.limits.monitor_queue,
                    metrics.coordination.clone(),
                    retained.clone(),
                )
                .await?,
            )
        }
        None => None,
    };
    #[allow(clippy::type_complexity)]
    let (admission, reporter, buckets): (
        Arc<dyn Admission>,
        Arc<dyn Reporter>,
        Arc<dyn TenantBuckets>,
    ) = match &coordinator {
        Some(coordinator) => (
            coordinator.clone(),
            coordinator.clone(),
            Arc::new(coordinator.rate_buckets()),
        ),
        None => (
            local_admission.clone(),
            Arc::new(LocalReporter::new(monitor.clone(), ledger.clone())),
            Arc::new(LocalTenantBuckets::default()),
        ),
    };
    let shutting_down = Arc::new(AtomicBool::new(false));
    // Scalable applications' groups are distributed here when the broker cannot.
    let shares = (!capabilities.shared_subscriptions).then(|| {
        Arc::new(Groups::new(
            dialer.clone(),
            &format!("{namespace}-share-{boot}"),
            &format!("{namespace}-{boot}"),
        ))
    });
    let connect_rates = Arc::new(ConnectRates::new(
        config.limits.connect_rate_per_client_id,
        config.limits.connect_rate_per_address,
    ));
    let context: Arc<ProxyContext> = Arc::new(Context {
        profile,
        dialer,
        admission: admission.clone(),
        slots: ProcessSlots::new(config.limits.max_connections),
        buckets,
        reporter,
        connect_rates: connect_rates.clone(),
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        shutting_down: shutting_down.clone(),
        capabilities,
        retained: retained.clone(),
        shares,
    });

    // HTTP messaging requests publish through pooled broker connections of their own, named
    // after the process so that two processes never take each other's over.
    let http = Arc::new(HttpFront::new(
        context.clone(),
        format!("{namespace}-http-{boot}"),
    ));

    let tls: Vec<Arc<ServerTls>> = transports.iter().filter_map(|t| t.tls.clone()).collect();
    let reloader = Arc::new(Reloader {
        policy_path: config.policies.clone(),
        org_prefix: config.upstream.topic_prefix.clone(),
        store,
        verifier,
        admission: admission.clone(),
        metrics: metrics.clone(),
        tls: tls.clone(),
    });
    reloader.clone().spawn(shutdown_rx.clone());

    let sessions = TaskTracker::new();
    let mut listen_addrs = Vec::new();
    let mut accept_tasks = JoinSet::new();
    for ((listener, local), transport) in listeners.into_iter().zip(transports) {
        info!(address = %local, tls = transport.tls.is_some(), tenant = transport.tenant.as_deref(), "listening");
        listen_addrs.push(local);
        accept_tasks.spawn(accept_loop(
            listener,
            local,
            Arc::new(transport),
            context.clone(),
            http.clone(),
            sessions.clone(),
            shutdown_rx.clone(),
        ));
    }
    let admin_addr = match admin_listener {
        Some(listener) => {
            let ready = {
                let (monitor, shutting_down) = (monitor.clone(), shutting_down.clone());
                let coordinator = coordinator.clone();
                let (kind, declared) = (config.upstream.broker, config.upstream.capabilities);
                let dialer = context.dialer.clone();
                Arc::new(move || {
                    if shutting_down.load(Ordering::Relaxed) {
                        return Err("shutting down".to_owned());
                    }
                    if coordinator.as_ref().is_some_and(|c| !c.is_healthy()) {
                        return Err("this instance does not hold its coordination lease".to_owned());
                    }
                    let report = monitor.report();
                    let details = crate::admin::broker_details(kind, &declared, &report);
                    if !monitor.is_connected() {
                        return Err(format!(
                            "the control connection to the broker is down ({} failed attempts in a row): {}\n{details}",
                            report.failures_in_a_row,
                            report.last_failure.as_deref().unwrap_or("not connected yet"),
                        ));
                    }
                    if !dialer.nodes().any_up() {
                        return Err(format!("every broker node is down\n{details}"));
                    }
                    Ok(details)
                })
            };
            let upstream_report = {
                let dialer = context.dialer.clone();
                Arc::new(move || dialer.nodes().report())
            };
            let sessions = config
                .admin
                .as_ref()
                .and_then(|admin| admin.token.as_deref())
                .map(|token| AdminSessions::new(admission.clone(), token));
            let state = AdminState {
                metrics: metrics.clone(),
                ready,
                upstream_report,
                sessions,
            };
            let address = listener.local_addr().map_err(|source| StartError::Bind {
                address: ([0, 0, 0, 0], 0).into(),
                source,
            })?;
            crate::admin::serve(listener, state, shutdown_rx.clone())
                .map_err(|source| StartError::Bind { address, source })?;
            Some(address)
        }
        None => None,
    };
    tokio::spawn(forget_idle_connect_rates(connect_rates, shutdown_rx));
    Ok(RunningProxy {
        listen_addrs,
        admin_addr,
        tls,
        metrics,
        monitor,
        admission,
        coordinator,
        reloader,
        ledger,
        sessions,
        shutting_down,
        shutdown,
        accept_tasks,
    })
}

async fn forget_idle_connect_rates(rates: Arc<ConnectRates>, mut shutdown: watch::Receiver<bool>) {
    let mut sweep = tokio::time::interval(CONNECT_RATE_SWEEP);
    loop {
        tokio::select! {
            _ = sweep.tick() => rates.shrink(),
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn accept_loop<P: Profile>(
    listener: TcpListener,
    local: SocketAddr,
    transport: Arc<ListenerTransport>,
    context: Arc<Context<P, Dialer>>,
    http: Arc<HttpFront<P, Dialer>>,
    sessions: TaskTracker,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                sessions.spawn(serve_connection(
                    stream,
                    peer,
                    local,
                    transport.clone(),
                    context.clone(),
                    http.clone(),
                    shutdown.clone(),
                ));
            }
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning on the error.
                warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Runs a connection's transport handshakes and then its session, or its HTTP requests.
async fn serve_connection<P: Profile>(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    transport: Arc<ListenerTransport>,
    context: Arc<Context<P, Dialer>>,
    http: Arc<HttpFront<P, Dialer>>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let connected_at = SystemTime::now();
    // Boxed: the handshakes' state is large and lives only until they are done, so it must
    // not stay in the task's own memory for the whole session.
    let accepted = match Box::pin(transport::accept(stream, &transport)).await {
        Ok(accepted) => accepted,
        Err(error) => {
            if error.is_tls_failure() {
                context.metrics.tls_handshake_failures.inc();
            }
            match error.cause() {
                Some(cause) => {
                    let code = context.profile.code(cause).number;
                    context.metrics.close(code, "");
                    if let Some(suppressed) = refusal_log_budget() {
                        info!(%peer, code, %error, suppressed, "connection closed before MQTT");
                    }
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
        tenant: transport.tenant.clone(),
    };
    if accepted.http {
        crate::http::serve(accepted.stream, info, http, shutdown).await;
        return;
    }
    session::run(accepted.stream, info, context).await;
}
