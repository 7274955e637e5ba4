//! One client's life: the connect phase ([`connect`]), the bridge loop between the client and
//! its broker connection ([`bridge`]), and the close, which answers the client, hands the
//! profile's Disconnect status to the reporter and gives back what admission granted.
//!
//! The session knows MQTT and nothing of any tenant model: it asks its [`Profile`] at each
//! phase, and reaches shared state only through the narrow types of [`Context`]. A session is
//! one task that owns both of its streams; the only ways in from outside are the commands of its
//! [`SessionControl`] mailbox. It is generic over the client stream and the broker's
//! ([`Dial`]), so it runs over in-memory streams in tests.

pub mod bridge;
pub mod connect;
pub mod downgrade;
pub mod packet_ids;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{info, Instrument};

use crate::broker::Capabilities;
use crate::codec::{encode_disconnect_v5, ProtocolVersion};
use crate::config::ProcessLimits;
use crate::coord::{Admission, ProcessSlots, Reporter, SessionControl, TenantBuckets};
use crate::limits::{refusal_log_budget, ConnectRates};
use crate::metrics::{limit_name, Metrics};
use crate::profile::Profile;
use crate::refusal::{Cause, Refusal};
use crate::retained::RetainedRecord;
use crate::share::Groups;
use crate::transport::{write_flushed, ConnectionInfo};
use crate::upstream::Dial;

/// How long the close may take to hand the client and the broker their last bytes.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// A client byte stream: TCP, TLS, WebSocket or secure WebSocket ([`crate::transport`]), or an
/// in-memory stream in tests.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientStream for T {}

/// What every session of a proxy shares: the profile, the way to the broker, and the narrow
/// handles on shared state.
pub struct Context<P: Profile, D: Dial> {
    /// The tenant model.
    pub profile: Arc<P>,
    /// The way to the broker.
    pub dialer: Arc<D>,
    /// Client-ID ownership, tenant counts and takeover.
    pub admission: Arc<dyn Admission>,
    /// The process connection cap.
    pub slots: ProcessSlots,
    /// Tenant publish buckets.
    pub buckets: Arc<dyn TenantBuckets>,
    /// Where status messages go.
    pub reporter: Arc<dyn Reporter>,
    /// CONNECT rates per client ID and per address.
    pub connect_rates: Arc<ConnectRates>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Process-wide limits and deadlines.
    pub limits: ProcessLimits,
    /// Set once shutdown begins: new sessions are refused.
    pub shutting_down: Arc<AtomicBool>,
    /// What the broker supports (`upstream.broker` and its overrides).
    pub capabilities: Capabilities,
    /// The retained statuses the proxy published, replayed to a new wildcard subscription when
    /// the broker does not deliver retained messages to wildcard filters.
    pub retained: Option<Arc<RetainedRecord>>,
    /// The shared-subscription groups the proxy distributes itself (brokers without shared
    /// subscriptions); `None` where it does not.
    pub shares: Option<Arc<Groups<D>>>,
}

impl<P: Profile, D: Dial> Context<P, D> {
    /// Whether a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// The value of a `protocol` metric label: `mqtt3`, `mqtt4`, `mqtt5`, `-ws` over WebSocket.
pub fn protocol_label(version: ProtocolVersion, websocket: bool) -> &'static str {
    match (version, websocket) {
        (ProtocolVersion::V31, false) => "mqtt3",
        (ProtocolVersion::V311, false) => "mqtt4",
        (ProtocolVersion::V5, false) => "mqtt5",
        (ProtocolVersion::V31, true) => "mqtt3-ws",
        (ProtocolVersion::V311, true) => "mqtt4-ws",
        (ProtocolVersion::V5, true) => "mqtt5-ws",
    }
}

/// Runs one client connection to its end.
pub async fn run<P: Profile, D: Dial, S: ClientStream>(
    client: S,
    info: ConnectionInfo,
    context: Arc<Context<P, D>>,
) {
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
        // Dropped at the end of this block, whatever path it takes: the session's done signal.
        let control = SessionControl::new();
        let connect_span = tracing::info_span!("connect", code = tracing::field::Empty);
        // Boxed: the connect phase's state is large and ends once the session is established,
        // so it must not stay in the task's own memory for the whole session.
        let outcome = Box::pin(connect::establish(client, &info, &context, &control))
            .instrument(connect_span)
            .await;
        let Some(mut session) = outcome else {
            return;
        };
        let session_span = tracing::Span::current();
        session_span.record("client_id", session.client_id.as_str());
        session_span.record("org", &*session.tenant);
        session_span.record("protocol", session.protocol);
        let refusal = session.bridge.run(&control).await;
        let code = context.profile.code(refusal.cause);
        session_span.record("close_code", code.number);
        session_span.record("close_reason", code.reason_string(&refusal).as_str());
        // Boxed like the connect phase: the close's state exists only while it runs.
        Box::pin(close(session, refusal, &context, &control)).await;
    }
    .instrument(span)
    .await
}

/// Closes an established session: the client and the broker get what was accepted and the
/// client its last word, within [`FAREWELL_TIMEOUT`] in all; then the Disconnect status is
/// queued and everything admission granted is given back.
async fn close<P: Profile, D: Dial, S: ClientStream>(
    session: Box<connect::Established<P, D, S>>,
    refusal: Refusal,
    context: &Context<P, D>,
    control: &SessionControl,
) {
    let connect::Established {
        mut bridge,
        ownership,
        slot,
        client_id,
        tenant,
        protocol,
    } = *session;
    let deadline = Instant::now() + FAREWELL_TIMEOUT;
    // Nothing the client sent and the proxy accepted is left behind: its publishes and its
    // acknowledgements reach the broker, and what was already on its way reaches the client.
    bridge.flush_until(deadline).await;
    let answers_client = !refusal.cause.is_ordinary();
    if answers_client && bridge.version.is_v5() {
        if let Some(reason_code) = refusal.v5_disconnect() {
            let reason = context.profile.code(refusal.cause).reason_string(&refusal);
            let mut out = BytesMut::new();
            encode_disconnect_v5(&mut out, reason_code, Some(&reason));
            if bridge.client_fits(out.len())
                && tokio::time::timeout_at(deadline, write_flushed(&mut bridge.client, &out))
                    .await
                    .is_ok_and(|written| written.is_ok())
            {
                bridge.counters.write_bytes += out.len() as u64;
            }
        }
    }
    let _ = tokio::time::timeout_at(deadline, bridge.client.shutdown()).await;
    if refusal.cause == Cause::Normal {
        // The client's DISCONNECT was forwarded; let the broker read it before the FIN.
        let _ = tokio::time::timeout_at(deadline, bridge.upstream.shutdown()).await;
    }
    // Any other close drops the broker connection without DISCONNECT, so the broker publishes
    // the client's will, as it would for a client that vanished.

    bridge.report_metrics();
    let released = ownership.release();
    drop(slot);
    let metrics = &context.metrics;
    metrics.connection(&tenant, protocol, -1);
    let code = context.profile.code(refusal.cause);
    metrics.close(code.number, &tenant);
    if let Some(limit) = limit_name(refusal.cause) {
        metrics.limit(&tenant, limit);
    }
    let counters = bridge.counters;
    let statuses = context.profile.disconnected(
        &bridge.principal,
        &refusal,
        counters,
        released.last_of_presence,
    );
    context
        .reporter
        .disconnected(control.id(), &client_id, statuses);
    // Ordinary closes are always logged; abnormal ones within the refusal log budget, so that
    // a storm of them cannot flood the log (they are all counted in the metrics).
    let budget = if refusal.cause.is_ordinary() {
        Some(0)
    } else {
        refusal_log_budget()
    };
    if let Some(suppressed) = budget {
        info!(
            code = code.number,
            reason = %code.reason_string(&refusal),
            org = %tenant,
            read_msg = counters.read_msg,
            write_msg = counters.write_msg,
            suppressed,
            "session closed"
        );
    }
}

#[cfg(test)]
mod tests;
