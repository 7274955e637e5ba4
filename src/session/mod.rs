//! One client's life: the connect phase ([`connect`]), the bridge loop between the client and
//! its upstream connection ([`bridge`]), and the close, which answers the client, publishes the
//! Disconnect monitoring message and releases the client ID.
//!
//! A session is one task. It owns both sockets and all of its state, so nothing on the data path
//! is shared or locked; the only ways in from outside are the registry's close requests.

pub mod bridge;
pub mod connect;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{info, Instrument};

use crate::close::{CloseCode, CloseReason};
use crate::codec::encode_disconnect_v5;
use crate::monitor::{Action, Report};
use crate::proxy::Shared;
use crate::registry::SessionControl;
use crate::transport::{write_flushed, PeerCertificate};

/// How long the proxy waits to hand a client its last packet (a refusal or DISCONNECT).
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// A client byte stream: TCP, TLS, WebSocket or secure WebSocket ([`crate::transport`]).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientStream for T {}

/// Facts about a client connection known before its first byte.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener address the client connected to.
    pub local: SocketAddr,
    /// TLS.
    pub secure: bool,
    /// MQTT over WebSocket.
    pub websocket: bool,
    /// The client certificate's common name (of a certificate that verified against `client_ca`).
    pub certname: Option<String>,
    /// The client certificate, judged against the listener's `client_ca`.
    pub certificate: PeerCertificate,
    /// When the connection was accepted.
    pub connected_at: SystemTime,
}

/// Runs one client connection to its end.
pub async fn run<S: ClientStream>(client: S, info: ConnectionInfo, shared: Arc<Shared>) {
    let span = tracing::info_span!(
        "session",
        peer = %info.peer,
        client_id = tracing::field::Empty,
        org = tracing::field::Empty,
        protocol = tracing::field::Empty,
        close_code = tracing::field::Empty,
        close_reason = tracing::field::Empty,
    );
    async move {
        let mut control = SessionControl::new();
        let connect_span = tracing::info_span!("connect", code = tracing::field::Empty);
        let outcome = connect::establish(client, &info, &shared, &mut control)
            .instrument(connect_span)
            .await;
        let Some(mut bridge) = outcome else {
            control.finish();
            return;
        };
        let session_span = tracing::Span::current();
        session_span.record("client_id", bridge.principal.identity.client_id.as_str());
        session_span.record("org", bridge.principal.identity.org.as_str());
        session_span.record("protocol", bridge.facts.protocol);
        let reason = bridge.run(&mut control.commands).await;
        session_span.record("close_code", reason.number());
        session_span.record("close_reason", reason.reason_string().as_str());
        close(bridge, reason, &shared, &control).await;
        control.finish();
    }
    .instrument(span)
    .await
}

async fn close<S: ClientStream>(
    mut bridge: bridge::Bridge<S>,
    reason: CloseReason,
    shared: &Shared,
    control: &SessionControl,
) {
    let answers_client = !matches!(reason.code, CloseCode::Normal | CloseCode::ClosedByClient);
    if answers_client && bridge.version.is_v5() {
        if let Some(code) = reason.v5_disconnect() {
            let mut out = BytesMut::new();
            encode_disconnect_v5(&mut out, code, Some(&reason.reason_string()));
            if bridge.client_fits(out.len())
                && tokio::time::timeout(FAREWELL_TIMEOUT, write_flushed(&mut bridge.client, &out))
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                bridge.counters.write_bytes += out.len() as u64;
            }
        }
    }
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, bridge.client.shutdown()).await;
    if reason.code == CloseCode::Normal {
        // The client's DISCONNECT was forwarded; let the broker read it before the FIN.
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, bridge.upstream.shutdown()).await;
    }
    // Any other close drops the upstream socket without DISCONNECT, so the broker publishes the
    // client's will, as it would for a client that vanished.

    bridge.report_metrics();
    let identity = &bridge.principal.identity;
    let last_instance = shared.registry.release(identity, control.id());
    let metrics = &shared.metrics;
    metrics.connection(&identity.org, bridge.facts.protocol, -1);
    metrics.close(reason.number(), &identity.org);
    if let Some(limit) = crate::metrics::limit_name(reason.code) {
        metrics.limit(&identity.org, limit);
    }
    shared.monitor.report(Report {
        action: Action::Disconnect,
        identity,
        facts: &bridge.facts,
        close: Some(&reason),
        counters: bridge.counters,
        org_prefix: &bridge.rewrite.org_prefix,
        quickstart: bridge.principal.org.quickstart,
        last_instance,
        session_id: Some(control.id()),
    });
    // Ordinary closes are always logged; abnormal ones within the refusal log budget, so that
    // a storm of them cannot flood the log (they are all counted in the metrics).
    let ordinary = matches!(reason.code, CloseCode::Normal | CloseCode::ClosedByClient);
    let budget = if ordinary {
        Some(0)
    } else {
        crate::limits::refusal_log_budget()
    };
    if let Some(suppressed) = budget {
        info!(
            code = reason.number(),
            reason = %reason.reason_string(),
            org = %identity.org,
            read_msg = bridge.counters.read_msg,
            write_msg = bridge.counters.write_msg,
            suppressed,
            "session closed"
        );
    }
}
