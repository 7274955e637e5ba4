//! The connect phase: read the CONNECT within its deadline and size, let the profile identify
//! and authenticate the client, claim its client ID (taking over an older session), dial the
//! broker with the proxy's own credentials, and hand the client the broker's CONNACK adjusted to
//! what the proxy enforces.
//!
//! Every refusal answers the client with the MQTT answer of its cause. Once the profile has
//! identified the client's tenant, a refusal is also counted under that tenant and handed to the
//! profile for its FailedConnect status.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{info, warn};

use super::bridge::{Bridge, Negotiated};
use super::downgrade::{self, upstream_version};
use super::{protocol_label, ClientStream, Context, FAREWELL_TIMEOUT};
use crate::codec::{
    decode_frame_header, encode_connack, encode_connect, parse_connack, parse_connect, property,
    CodecError, Connack, Connect, PacketType, Property, PropertyValue, ProtocolVersion, Will,
};
use crate::coord::{ClaimError, ClaimRequest, Command, Ownership, SessionControl, Slot};
use crate::limits::refusal_log_budget;
use crate::metrics::limit_name;
use crate::profile::{ConnectTerms, Counters, Profile, SessionLimits};
use crate::refusal::{Cause, Refusal};
use crate::transport::{write_flushed, ConnectionInfo};
use crate::upstream::{
    connack_label, connack_meaning, failure_label, handshake, Dial, UpstreamError,
    READ_BUFFER_BYTES,
};

/// An established session, ready for the bridge loop.
pub struct Established<P: Profile, D: Dial, S> {
    /// The bridge.
    pub bridge: Bridge<P, D, S>,
    /// The claimed client ID and tenant place.
    pub ownership: Ownership,
    /// The place under the process cap.
    pub slot: Slot,
    /// The client ID.
    pub client_id: String,
    /// The tenant.
    pub tenant: Arc<str>,
    /// The `protocol` metric label.
    pub protocol: &'static str,
}

/// Establishes a session, or refuses it. `None` means the connection is over (answered, logged
/// and, where the tenant is known, reported as a failed connect).
pub async fn establish<P: Profile, D: Dial, S: ClientStream>(
    mut client: S,
    info: &ConnectionInfo,
    context: &Arc<Context<P, D>>,
    control: &SessionControl,
) -> Option<Box<Established<P, D, S>>> {
    let limits = &context.limits;
    let profile = &*context.profile;
    let mut client_in = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let mut counters = Counters::default();

    let header = match read_first_frame(
        &mut client,
        &mut client_in,
        &mut counters,
        limits.connect_timeout,
        limits.max_connect_bytes,
    )
    .await
    {
        Ok(header) => header,
        Err(FirstFrame::Closed) => return None,
        Err(FirstFrame::Refused(refusal)) => {
            if let Some(suppressed) = refusal_log_budget() {
                let code = profile.code(refusal.cause);
                info!(code = code.number, reason = %code.reason_string(&refusal), suppressed, "connection refused before CONNECT");
            }
            context
                .metrics
                .close(profile.code(refusal.cause).number, "");
            if let Some(limit) = limit_name(refusal.cause) {
                context.metrics.limit("", limit);
            }
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.shutdown()).await;
            return None;
        }
    };
    let frame = client_in.split_to(header.frame_len()).freeze();
    let body = &frame[header.header_len..];
    if header.first_byte >> 4 != PacketType::Connect as u8 {
        if let Some(suppressed) = refusal_log_budget() {
            let code = profile.code(Cause::InvalidData).number;
            info!(code, suppressed, "first packet is not CONNECT");
        }
        return None;
    }
    let refuse_early = |refusal: &Refusal| {
        let code = profile.code(refusal.cause);
        context.metrics.close(code.number, "");
        if let Some(suppressed) = refusal_log_budget() {
            info!(code = code.number, reason = %code.reason_string(refusal), suppressed, "connect refused");
        }
    };
    let connect = match parse_connect(header.first_byte, body) {
        Ok(connect) => connect,
        Err(error) => {
            let version = requested_version(body, &error);
            let refusal = Refusal::from_codec(&error, true);
            refuse_early(&refusal);
            if let (CodecError::UnsupportedProtocolLevel(_), Some(ProtocolVersion::V311)) =
                (&error, version)
            {
                // MQTT 3 says "unacceptable protocol version" with return code 1 [MQTT-3.1.2-2].
                let mut out = BytesMut::new();
                let connack = Connack {
                    session_present: false,
                    code: 0x01,
                    properties: Vec::new(),
                };
                encode_connack(&mut out, ProtocolVersion::V311, &connack);
                let _ =
                    tokio::time::timeout(FAREWELL_TIMEOUT, write_flushed(&mut client, &out)).await;
            }
            refuse(&mut client, version, profile, &refusal, &mut counters).await;
            return None;
        }
    };
    let version = connect.version;

    // Flapping clients and connection storms from one address (MQTT 5: 0x9F).
    let rates = &context.connect_rates;
    if let Err(exceeded) = rates
        .check_address(info.peer.ip())
        // Zero-length client IDs are all different clients (each gets an assigned ID).
        .and_then(|()| match connect.client_id {
            "" => Ok(()),
            client_id => rates.check_client_id(client_id),
        })
    {
        let refusal = Refusal::with_detail(
            Cause::ServerCapacity,
            format!("connect rate exceeded: {exceeded:?}"),
        )
        .v5(0x9F);
        context.metrics.limit("", "connect_rate");
        refuse_early(&refusal);
        refuse(&mut client, Some(version), profile, &refusal, &mut counters).await;
        return None;
    }
    let keep_alive_cap = limits.max_keep_alive_secs;
    if !version.is_v5()
        && keep_alive_cap < u16::MAX
        && (connect.keep_alive == 0 || connect.keep_alive > keep_alive_cap)
    {
        let refusal = Refusal::with_detail(
            Cause::NotAuthorized,
            format!("keep-alive must be 1 to {keep_alive_cap} seconds"),
        );
        refuse_early(&refusal);
        refuse(&mut client, Some(version), profile, &refusal, &mut counters).await;
        return None;
    }

    let claim = match profile.identify(&connect, info) {
        Ok(claim) => claim,
        Err(refusal) => {
            refuse_early(&refusal);
            refuse(&mut client, Some(version), profile, &refusal, &mut counters).await;
            return None;
        }
    };
    let tenant = profile.tenant(&claim);
    let failed = |refusal: &Refusal, counters: Counters| {
        let code = profile.code(refusal.cause);
        context.metrics.close(code.number, tenant);
        if let Some(limit) = limit_name(refusal.cause) {
            context.metrics.limit(tenant, limit);
        }
        context
            .reporter
            .publish(profile.failed_connect(&claim, refusal, counters));
        if let Some(suppressed) = refusal_log_budget() {
            info!(code = code.number, reason = %code.reason_string(refusal), client_id = %connect.client_id, suppressed, "connect refused");
        }
    };

    // A connection slot is taken only once a CONNECT has arrived, so sockets that never send one
    // (slowloris) cannot use up the slots of real clients; they end at the CONNECT deadline.
    let Some(slot) = context.slots.try_take() else {
        let refusal = Refusal::new(Cause::ServerCapacity);
        refuse(&mut client, Some(version), profile, &refusal, &mut counters).await;
        failed(&refusal, counters);
        return None;
    };
    let auth_started = std::time::Instant::now();
    let authenticated = profile.authenticate(&claim, &connect, info).await;
    context.metrics.auth_latency(auth_started.elapsed());
    let principal = match authenticated.and_then(|principal| {
        check_connect_options(&connect)?;
        Ok(principal)
    }) {
        Ok(principal) => principal,
        Err(refusal) => {
            refuse(&mut client, Some(version), profile, &refusal, &mut counters).await;
            failed(&refusal, counters);
            return None;
        }
    };
    let mut terms = profile.terms(&principal);
    terms.topics = std::mem::take(&mut terms.topics).escaping(context.capabilities.escaped);
    let session_limits = profile.limits(&principal);

    // Ownership: a session this one takes over finishes closing (and queues its Disconnect)
    // before this one goes on, so statuses of one client ID stay in event order.
    let claimed =
        claim_ownership(context, control, broker_client_id(&connect, &terms), &terms).await;
    let ownership = match claimed {
        Ok(ownership) => ownership,
        Err(refusal) => {
            refuse(&mut client, Some(version), profile, &refusal, &mut counters).await;
            failed(&refusal, counters);
            return None;
        }
    };

    if context.is_shutting_down() {
        let refusal = Refusal::with_detail(Cause::ServerUnavailable, "shutting down");
        refuse(&mut client, Some(version), profile, &refusal, &mut counters).await;
        failed(&refusal, counters);
        return None;
    }

    let keep_alive = effective_keep_alive(&terms, connect.keep_alive, limits.max_keep_alive_secs);
    let dialled = dial_broker(
        context,
        &connect,
        &terms,
        &session_limits,
        keep_alive,
        control,
    )
    .await;
    let (upstream, upstream_in, broker_connack) = match dialled {
        Ok(dialled) => dialled,
        Err(refusal) => {
            refuse(&mut client, Some(version), profile, &refusal, &mut counters).await;
            failed(&refusal, counters);
            return None;
        }
    };

    let negotiated = negotiate(context, &connect, &terms, &broker_connack);
    let mut out = BytesMut::new();
    let keep_alive = broker_connack.server_keep_alive.unwrap_or(keep_alive);
    let announced_keep_alive = (keep_alive != connect.keep_alive).then_some(keep_alive);
    let connack = client_connack(
        &broker_connack,
        &negotiated,
        &session_limits,
        ClientConnackTerms {
            server_keep_alive: announced_keep_alive,
            assigned_client_id: terms.assigned_client_id.as_deref(),
            max_qos: session_limits.max_qos.min(context.capabilities.max_qos),
            downgraded: version.is_v5() && !context.capabilities.mqtt5,
        },
    );
    encode_connack(&mut out, version, &connack);
    let written =
        tokio::time::timeout(limits.write_timeout, write_flushed(&mut client, &out)).await;
    if !matches!(written, Ok(Ok(()))) {
        failed(&Refusal::new(Cause::ClientClosed), counters);
        return None;
    }
    counters.write_bytes += out.len() as u64;

    let client_id = broker_client_id(&connect, &terms).to_owned();
    context.reporter.connected(
        control.id(),
        &client_id,
        profile.settlement(&principal, counters),
        profile.connected(&principal, counters),
    );
    let protocol = protocol_label(version, info.websocket);
    context.metrics.connection(&terms.tenant, protocol, 1);
    info!(client_id = %client_id, protocol, "session connected");

    // Boxed: a session's task then holds a pointer, not two copies of a large value.
    Some(Box::new(Established {
        bridge: Bridge::new(
            context.clone(),
            client,
            client_in,
            upstream,
            upstream_in,
            version,
            principal,
            terms.topics,
            terms.tenant.clone(),
            session_limits,
            negotiated,
            counters,
            keep_alive,
        ),
        ownership,
        slot,
        client_id,
        tenant: terms.tenant,
        protocol,
    }))
}

/// Claims the client ID and the tenant place, while still answering the session's own commands:
/// a close that arrives meanwhile (a third connection, shutdown) refuses this one.
async fn claim_ownership<P: Profile, D: Dial>(
    context: &Context<P, D>,
    control: &SessionControl,
    client_id: &str,
    terms: &ConnectTerms,
) -> Result<Ownership, Refusal> {
    let claim = context.admission.claim(ClaimRequest {
        client_id,
        takeover: terms.takeover,
        tenant: &terms.tenant,
        tenant_limit: terms.max_tenant_connections,
        presence: &terms.presence,
        session: control.handle(),
    });
    tokio::pin!(claim);
    loop {
        tokio::select! {
            claimed = &mut claim => {
                return claimed.map_err(|error| match error {
                    ClaimError::TenantFull => Refusal::new(Cause::TenantQuota),
                    ClaimError::Unavailable => Refusal::with_detail(
                        Cause::ServerUnavailable,
                        "the coordination store is unavailable",
                    ),
                });
            }
            command = control.next() => match command {
                Command::Close(refusal) => return Err(refusal),
                // Not admitted yet: the bridge checks whether its principal is stale anyway.
                Command::Reevaluate => {}
            },
        }
    }
}

/// The client ID at the broker and in admission: the profile's, else the client's own.
fn broker_client_id<'a>(connect: &Connect<'a>, terms: &'a ConnectTerms) -> &'a str {
    terms
        .broker_client_id
        .as_deref()
        .unwrap_or(connect.client_id)
}

enum FirstFrame {
    /// The client went away before sending anything worth an answer.
    Closed,
    /// Refused with a close (no data, too large, invalid).
    Refused(Refusal),
}

async fn read_first_frame<S: ClientStream>(
    client: &mut S,
    buf: &mut BytesMut,
    counters: &mut Counters,
    deadline: Duration,
    max_connect_bytes: usize,
) -> Result<crate::codec::FrameHeader, FirstFrame> {
    let until = Instant::now() + deadline;
    loop {
        match decode_frame_header(buf, max_connect_bytes) {
            Ok(Some(header)) if buf.len() >= header.frame_len() => return Ok(header),
            Ok(Some(header)) => buf.reserve(header.frame_len() - buf.len()),
            Ok(None) => {}
            Err(error) => return Err(FirstFrame::Refused(Refusal::from_codec(&error, true))),
        }
        if buf.capacity() == buf.len() {
            buf.reserve(READ_BUFFER_BYTES);
        }
        match tokio::time::timeout_at(until, client.read_buf(buf)).await {
            Err(_) => return Err(FirstFrame::Refused(Refusal::new(Cause::NoData))),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(FirstFrame::Closed),
            Ok(Ok(read)) => counters.read_bytes += read as u64,
        }
    }
}

/// The protocol version a CONNECT asked for, read leniently so a refusal can be answered in it.
fn requested_version(body: &[u8], error: &CodecError) -> Option<ProtocolVersion> {
    if let CodecError::UnsupportedProtocolLevel(level) = error {
        return Some(if *level >= 5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        });
    }
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    match (body.get(2..2 + name_len)?, body.get(2 + name_len)?) {
        (b"MQTT", 5) => Some(ProtocolVersion::V5),
        // A v3 client learns nothing from a CONNACK for malformed data: MQTT 3 only closes.
        _ => None,
    }
}

/// Answers a refused CONNECT (CONNACK per the cause's answers, then close).
async fn refuse<P: Profile, S: ClientStream>(
    client: &mut S,
    version: Option<ProtocolVersion>,
    profile: &P,
    refusal: &Refusal,
    counters: &mut Counters,
) {
    let code = profile.code(refusal.cause);
    tracing::Span::current().record("code", code.number);
    let reason_string = code.reason_string(refusal);
    let connack = match version {
        Some(ProtocolVersion::V5) => refusal.v5_connack().map(|code| Connack {
            session_present: false,
            code,
            properties: vec![Property {
                id: property::REASON_STRING,
                value: PropertyValue::Str(&reason_string),
            }],
        }),
        Some(_) => refusal.v3_connack().map(|code| Connack {
            session_present: false,
            code,
            properties: Vec::new(),
        }),
        None => None,
    };
    if let (Some(connack), Some(version)) = (connack, version) {
        let mut out = BytesMut::new();
        encode_connack(&mut out, version, &connack);
        if let Ok(Ok(())) =
            tokio::time::timeout(FAREWELL_TIMEOUT, write_flushed(client, &out)).await
        {
            counters.write_bytes += out.len() as u64;
        }
    }
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.shutdown()).await;
}

/// What the CONNECT asks for that the proxy does not offer: enhanced authentication.
fn check_connect_options(connect: &Connect<'_>) -> Result<(), Refusal> {
    if connect
        .properties
        .iter()
        .any(|p| p.id == property::AUTHENTICATION_METHOD)
    {
        return Err(Refusal::with_detail(
            Cause::NotAuthorized,
            "enhanced authentication is not supported",
        )
        .v5(0x8C));
    }
    Ok(())
}

/// What the bridge needs from the broker's CONNACK.
pub struct BrokerConnack {
    session_present: bool,
    code: u8,
    properties: Vec<(u8, OwnedValue)>,
    server_keep_alive: Option<u16>,
    topic_alias_maximum: u16,
    maximum_packet_size: Option<u32>,
    receive_maximum: Option<u16>,
}

/// A property value that outlives the broker's read buffer.
#[derive(Debug, Clone)]
enum OwnedValue {
    Byte(u8),
    U16(u16),
    U32(u32),
    Varint(u32),
    Str(String),
    Binary(Vec<u8>),
    Pair(String, String),
}

impl OwnedValue {
    fn from_value(value: &PropertyValue<'_>) -> OwnedValue {
        match *value {
            PropertyValue::Byte(v) => OwnedValue::Byte(v),
            PropertyValue::U16(v) => OwnedValue::U16(v),
            PropertyValue::U32(v) => OwnedValue::U32(v),
            PropertyValue::Varint(v) => OwnedValue::Varint(v),
            PropertyValue::Str(v) => OwnedValue::Str(v.to_string()),
            PropertyValue::Binary(v) => OwnedValue::Binary(v.to_vec()),
            PropertyValue::Pair(k, v) => OwnedValue::Pair(k.to_string(), v.to_string()),
        }
    }

    fn as_value(&self) -> PropertyValue<'_> {
        match self {
            OwnedValue::Byte(v) => PropertyValue::Byte(*v),
            OwnedValue::U16(v) => PropertyValue::U16(*v),
            OwnedValue::U32(v) => PropertyValue::U32(*v),
            OwnedValue::Varint(v) => PropertyValue::Varint(*v),
            OwnedValue::Str(v) => PropertyValue::Str(v),
            OwnedValue::Binary(v) => PropertyValue::Binary(v),
            OwnedValue::Pair(k, v) => PropertyValue::Pair(k, v),
        }
    }
}

/// Dials the broker, sends the client's CONNECT under the proxy's credentials, and reads the
/// CONNACK. Anything the broker sent after it stays in the returned buffer.
async fn dial_broker<P: Profile, D: Dial>(
    context: &Context<P, D>,
    connect: &Connect<'_>,
    terms: &ConnectTerms,
    limits: &SessionLimits,
    keep_alive: u16,
    control: &SessionControl,
) -> Result<(D::Stream, BytesMut, BrokerConnack), Refusal> {
    let unavailable = |detail: &'static str| Refusal::with_detail(Cause::ServerUnavailable, detail);
    let will_topic = match &connect.will {
        Some(will) => Some(
            terms
                .topics
                .to_broker_string(will.topic)
                .map_err(|_| Refusal::with_detail(Cause::NotAuthorized, "will topic"))?,
        ),
        None => None,
    };
    let will = connect
        .will
        .as_ref()
        .zip(will_topic.as_deref())
        .map(|(will, topic)| Will {
            properties: will.properties.clone(),
            topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain && !limits.strip_retained,
        });
    let unique = terms.unique_upstream_session;
    let mut properties: Vec<Property<'_>> = Vec::with_capacity(connect.properties.len());
    for prop in &connect.properties {
        match prop.id {
            // The broker never gets to alias topics towards the proxy: rewriting needs full topics.
            property::TOPIC_ALIAS_MAXIMUM => {}
            property::MAXIMUM_PACKET_SIZE => {
                if let PropertyValue::U32(size) = prop.value {
                    let widened = u64::from(size) + terms.topics.expansion() as u64;
                    properties.push(Property {
                        id: property::MAXIMUM_PACKET_SIZE,
                        value: PropertyValue::U32(u32::try_from(widened).unwrap_or(u32::MAX)),
                    });
                }
            }
            // A connection with a broker session of its own starts clean and leaves none behind.
            property::SESSION_EXPIRY_INTERVAL if unique => {}
            _ => properties.push(*prop),
        }
    }
    // Connections that share a client ID on purpose must not take each other over at the
    // broker, so each gets an ID of its own there, unique across processes and restarts.
    let client_id = broker_client_id(connect, terms);
    let upstream_client_id = if unique {
        format!("{client_id}:{}", control.id())
    } else {
        client_id.to_string()
    };
    let upstream_client_id =
        crate::names::escape(context.capabilities.escaped, &upstream_client_id).into_owned();
    let dialer = &*context.dialer;
    let version = upstream_version(connect.version, context.capabilities.mqtt5);
    // Towards a 3.1.1 broker an MQTT 5 CONNECT loses its properties and its will's (the
    // encoder writes none below MQTT 5); Clean Start and Session Expiry become Clean Session.
    let clean_start = if version == connect.version {
        connect.clean_start
    } else {
        downgrade::clean_session(connect)
    };
    let upstream_connect = Connect {
        version,
        clean_start: clean_start || terms.force_clean_start || unique,
        keep_alive: upstream_keep_alive(keep_alive),
        properties,
        client_id: &upstream_client_id,
        will,
        username: dialer.username(),
        password: dialer.password(),
    };
    let mut encoded = BytesMut::new();
    encode_connect(&mut encoded, &upstream_connect);
    let refusals = &context.metrics.monitor;
    let mut stream = dialer.dial().await.map_err(|error| {
        refusals.refusal("session", failure_label(&error).to_owned());
        warn!(%error, "broker unreachable");
        unavailable("broker unreachable")
    })?;
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let header = match handshake(&mut stream, &encoded, &mut buf).await {
        Ok(header) => header,
        // Brokers without MQTT 5 (RabbitMQ 3) close the connection on an MQTT 5 CONNECT
        // without a word. Whether that is what happened, a 3.1.1 CONNECT of the proxy's own
        // tells, so that a broker that is only going away is still "server unavailable".
        Err(error @ (UpstreamError::Closed | UpstreamError::Handshake(_)))
            if upstream_connect.version.is_v5() && speaks_only_v311(dialer, control).await =>
        {
            refusals.refusal("session", failure_label(&error).to_owned());
            warn!(
                "the broker closed an MQTT 5 connection and accepts MQTT 3.1.1: it does not speak MQTT 5; set upstream.capabilities.mqtt5: false"
            );
            return Err(Refusal::unsupported_protocol(
                "the broker does not speak MQTT 5",
            ));
        }
        Err(error) => {
            refusals.refusal("session", failure_label(&error).to_owned());
            warn!(%error, "broker handshake failed");
            return Err(unavailable("broker handshake failed"));
        }
    };
    let frame = buf.split_to(header.frame_len());
    let parsed =
        parse_connack(&frame[header.header_len..], upstream_connect.version).map_err(|error| {
            refusals.refusal("session", "invalid".to_owned());
            warn!(%error, "the broker's CONNACK is invalid");
            unavailable("invalid CONNACK from broker")
        })?;
    // A broker that does not speak the version answers CONNACK 1 (3.1.1 brokers answer an
    // MQTT 5 CONNECT in 3.1.1 form) or 0x84. Clients told "server unavailable" would retry
    // forever; this is the operator's to fix.
    if matches!(parsed.code, 0x01 | 0x84) {
        refusals.refusal("session", connack_label(parsed.code));
        warn!(
            code = parsed.code,
            version = upstream_connect.version.level(),
            "the broker refused the protocol version: if it does not speak MQTT 5, set upstream.capabilities.mqtt5: false"
        );
        return Err(Refusal::unsupported_protocol(format!(
            "the broker refused MQTT protocol level {}",
            upstream_connect.version.level()
        )));
    }
    if parsed.code != 0 {
        refusals.refusal("session", connack_label(parsed.code));
        let reason_string = parsed.properties.iter().find_map(|prop| match prop.value {
            PropertyValue::Str(text) if prop.id == property::REASON_STRING => Some(text),
            _ => None,
        });
        warn!(
            code = parsed.code,
            meaning = connack_meaning(upstream_connect.version.is_v5(), parsed.code),
            reason = reason_string.unwrap_or_default(),
            "broker refused the upstream connection"
        );
        return Err(Refusal::with_detail(
            Cause::ServerUnavailable,
            format!("broker refused with code {}", parsed.code),
        ));
    }
    let mut connack = BrokerConnack {
        session_present: parsed.session_present,
        code: parsed.code,
        properties: Vec::new(),
        server_keep_alive: None,
        topic_alias_maximum: 0,
        maximum_packet_size: None,
        receive_maximum: None,
    };
    for prop in &parsed.properties {
        match (prop.id, prop.value) {
            (property::SERVER_KEEP_ALIVE, PropertyValue::U16(v)) => {
                connack.server_keep_alive = Some(v)
            }
            (property::RECEIVE_MAXIMUM, PropertyValue::U16(v)) => connack.receive_maximum = Some(v),
            (property::TOPIC_ALIAS_MAXIMUM, PropertyValue::U16(v)) => {
                connack.topic_alias_maximum = v
            }
            (property::MAXIMUM_PACKET_SIZE, PropertyValue::U32(v)) => {
                connack.maximum_packet_size = Some(v)
            }
            _ => {}
        }
        connack
            .properties
            .push((prop.id, OwnedValue::from_value(&prop.value)));
    }
    Ok((stream, buf, connack))
}

/// Whether the broker accepts an MQTT 3.1.1 connection of the proxy's own (a clean session
/// under a probe client ID, closed at once), after it closed an MQTT 5 one.
async fn speaks_only_v311<D: Dial>(dialer: &D, control: &SessionControl) -> bool {
    let client_id = format!("mqtt-warden-probe-{}", control.id());
    let probe = Connect {
        version: ProtocolVersion::V311,
        clean_start: true,
        keep_alive: 0,
        properties: Vec::new(),
        client_id: &client_id,
        will: None,
        username: dialer.username(),
        password: dialer.password(),
    };
    let mut encoded = BytesMut::new();
    encode_connect(&mut encoded, &probe);
    let Ok(mut stream) = dialer.dial().await else {
        return false;
    };
    let mut buf = BytesMut::new();
    let Ok(header) = handshake(&mut stream, &encoded, &mut buf).await else {
        return false;
    };
    let accepted = parse_connack(
        &buf[header.header_len..header.frame_len()],
        ProtocolVersion::V311,
    )
    .is_ok_and(|connack| connack.code == 0);
    if accepted {
        let _ =
            tokio::time::timeout(FAREWELL_TIMEOUT, write_flushed(&mut stream, &[0xE0, 0x00])).await;
    }
    accepted
}

/// The protocol version the proxy speaks to the broker for a client of `client` version.
/// The keep-alive the proxy enforces: the client's, held to the profile's range, then to the
/// proxy-wide maximum (`limits.max_keep_alive_secs`). MQTT 5 clients are told with Server Keep
/// Alive; MQTT 3 clients above the maximum were refused before.
fn effective_keep_alive(terms: &ConnectTerms, requested: u16, maximum: u16) -> u16 {
    let requested = match &terms.keep_alive {
        Some(range) if !range.contains(&requested) => *range.end(),
        _ => requested,
    };
    if maximum < u16::MAX && (requested == 0 || requested > maximum) {
        maximum
    } else {
        requested
    }
}

/// The keep-alive the proxy asks the broker for: longer than the client's, so that the proxy's
/// own 1.5× timer always fires first.
fn upstream_keep_alive(client: u16) -> u16 {
    if client == 0 {
        0
    } else {
        client.saturating_mul(2)
    }
}

/// What the session agreed with the client and the broker at CONNECT.
fn negotiate<P: Profile, D: Dial>(
    context: &Context<P, D>,
    connect: &Connect<'_>,
    terms: &ConnectTerms,
    broker: &BrokerConnack,
) -> Negotiated {
    let client_max_packet = connect
        .properties
        .iter()
        .find_map(|p| match (p.id, p.value) {
            (property::MAXIMUM_PACKET_SIZE, PropertyValue::U32(v)) => Some(v as usize),
            _ => None,
        });
    let process = &context.limits;
    let mut max_packet_bytes = process.max_packet_bytes;
    if let Some(broker_max) = broker.maximum_packet_size {
        max_packet_bytes =
            max_packet_bytes.min((broker_max as usize).saturating_sub(terms.topics.expansion()));
    }
    Negotiated {
        max_packet_bytes,
        client_max_packet,
        // Downgraded, the proxy resolves the client's aliases itself.
        topic_alias_maximum: if connect.version.is_v5() && !context.capabilities.mqtt5 {
            downgrade::TOPIC_ALIAS_MAXIMUM
        } else {
            broker.topic_alias_maximum
        },
        max_inflight: usize::from(
            broker
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(process.max_inflight),
        ),
        problem_information: !connect.properties.iter().any(|p| {
            p.id == property::REQUEST_PROBLEM_INFORMATION
                && matches!(p.value, PropertyValue::Byte(0))
        }),
        client_receive_maximum: connect
            .properties
            .iter()
            .find_map(|p| match (p.id, p.value) {
                (property::RECEIVE_MAXIMUM, PropertyValue::U16(v)) => Some(v),
                _ => None,
            })
            .unwrap_or(u16::MAX),
    }
}

/// What the client's CONNACK says beyond the broker's.
struct ClientConnackTerms<'a> {
    /// The keep-alive the proxy enforces, when it is not the client's.
    server_keep_alive: Option<u16>,
    /// The client ID the profile assigned.
    assigned_client_id: Option<&'a str>,
    /// The highest QoS the session delivers as such: the profile's and the broker's.
    max_qos: u8,
    /// An MQTT 5 client over a 3.1.1 broker ([`downgrade`]).
    downgraded: bool,
}

/// The CONNACK the client sees: the broker's, with the limits the proxy enforces.
fn client_connack<'a>(
    broker: &'a BrokerConnack,
    negotiated: &Negotiated,
    limits: &SessionLimits,
    terms: ClientConnackTerms<'a>,
) -> Connack<'a> {
    let ClientConnackTerms {
        server_keep_alive,
        assigned_client_id,
        max_qos,
        downgraded,
    } = terms;
    let mut properties = Vec::with_capacity(broker.properties.len() + 4);
    for (id, value) in &broker.properties {
        match *id {
            property::MAXIMUM_PACKET_SIZE
            | property::RECEIVE_MAXIMUM
            | property::ASSIGNED_CLIENT_IDENTIFIER
            | property::SERVER_KEEP_ALIVE => {}
            property::RETAIN_AVAILABLE if limits.strip_retained || limits.refuse_retained => {}
            property::MAXIMUM_QOS if max_qos < 2 => {}
            _ => properties.push(Property {
                id: *id,
                value: value.as_value(),
            }),
        }
    }
    properties.push(Property {
        id: property::MAXIMUM_PACKET_SIZE,
        value: PropertyValue::U32(u32::try_from(negotiated.max_packet_bytes).unwrap_or(u32::MAX)),
    });
    properties.push(Property {
        id: property::RECEIVE_MAXIMUM,
        value: PropertyValue::U16(u16::try_from(negotiated.max_inflight).unwrap_or(u16::MAX)),
    });
    if let Some(seconds) = server_keep_alive {
        properties.push(Property {
            id: property::SERVER_KEEP_ALIVE,
            value: PropertyValue::U16(seconds),
        });
    }
    if limits.refuse_retained {
        properties.push(Property {
            id: property::RETAIN_AVAILABLE,
            value: PropertyValue::Byte(0),
        });
    }
    if let Some(client_id) = assigned_client_id {
        properties.push(Property {
            id: property::ASSIGNED_CLIENT_IDENTIFIER,
            value: PropertyValue::Str(client_id),
        });
    }
    if max_qos < 2 {
        properties.push(Property {
            id: property::MAXIMUM_QOS,
            value: PropertyValue::Byte(max_qos),
        });
    }
    if downgraded {
        properties.extend(downgrade::connack_properties());
    }
    Connack {
        session_present: broker.session_present,
        code: broker.code,
        properties,
    }
}
