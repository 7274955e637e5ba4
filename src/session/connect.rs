//! The connect phase: read the CONNECT within its deadline and size, check identity, credentials
//! and will, take over an older session with the same client ID, dial the broker with the
//! proxy's own credentials, and hand the client the broker's CONNACK adjusted to what the proxy
//! enforces. Every refusal answers the client per the closing-code table and, when the identity
//! names a known org, publishes a FailedConnect monitoring message.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::bridge::{Bridge, Limits};
use super::{ClientStream, ConnectionInfo, FAREWELL_TIMEOUT};
use crate::auth::AuthError;
use crate::close::{CloseCode, CloseReason};
use crate::codec::{
    decode_frame_header, encode_connack, encode_connect, parse_connack, parse_connect, property,
    CodecError, Connack, Connect, PacketType, Property, PropertyValue, ProtocolVersion, Will,
};
use crate::decision::Principal;
use crate::identity::{parse_client_id, ClientClass, Identity, TOKEN_AUTH_USERNAME};
use crate::limits::refusal_log_budget;
use crate::monitor::{Action, ConnectionFacts, Counters, Report};
use crate::policy::{ApiRole, DeviceClass, GatewayRole, Org, SecurityMode};
use crate::proxy::Shared;
use crate::registry::{ClaimError, SessionControl, TAKEOVER_WAIT};
use crate::topics::TopicRewrite;
use crate::transport::{write_flushed, PeerCertificate};
use crate::upstream::{UpstreamStream, READ_BUFFER_BYTES};

/// The longest keep-alive a scalable application may use, in seconds.
pub const MAX_SCALABLE_KEEP_ALIVE_SECS: u16 = 3600;

/// Establishes a session, or refuses it. `None` means the connection is over (answered, logged
/// and, where the org is known, reported as FailedConnect).
pub async fn establish<S: ClientStream>(
    mut client: S,
    info: &ConnectionInfo,
    shared: &Arc<Shared>,
    control: &mut SessionControl,
) -> Option<Bridge<S>> {
    let limits = &shared.config.limits;
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
        Err(FirstFrame::Refused(reason)) => {
            if let Some(suppressed) = refusal_log_budget() {
                info!(code = reason.number(), reason = %reason.reason_string(), suppressed, "connection refused before CONNECT");
            }
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.shutdown()).await;
            return None;
        }
    };
    let frame = client_in.split_to(header.frame_len()).freeze();
    let body = &frame[header.header_len..];
    if header.first_byte >> 4 != PacketType::Connect as u8 {
        if let Some(suppressed) = refusal_log_budget() {
            info!(code = 105, suppressed, "first packet is not CONNECT");
        }
        return None;
    }
    let connect = match parse_connect(header.first_byte, body) {
        Ok(connect) => connect,
        Err(error) => {
            let version = requested_version(body, &error);
            let reason = error.close_reason(true);
            if let Some(suppressed) = refusal_log_budget() {
                info!(code = reason.number(), reason = %reason.reason_string(), suppressed, "invalid CONNECT");
            }
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
            refuse(&mut client, version, &reason, &mut counters).await;
            return None;
        }
    };
    let version = connect.version;
    let facts = ConnectionFacts {
        peer: info.peer,
        local: info.local,
        secure: info.secure,
        protocol: version.monitor_name(info.websocket),
        user: connect.username.map(str::to_string),
        certname: info.certname.clone(),
        connected_at: info.connected_at,
    };

    let identity = match parse_client_id(connect.client_id) {
        Ok(identity) => identity,
        Err(error) => {
            let reason = CloseReason::with_detail(CloseCode::InvalidClientId, error.to_string());
            if let Some(suppressed) = refusal_log_budget() {
                info!(code = 166, reason = %reason.reason_string(), suppressed, "client ID refused");
            }
            refuse(&mut client, Some(version), &reason, &mut counters).await;
            return None;
        }
    };
    // Flapping clients and connection storms from one address (104; MQTT 5: 0x9F).
    let rates = &shared.connect_rates;
    if let Err(exceeded) = rates
        .check_address(info.peer.ip())
        .and_then(|()| rates.check_client_id(&identity.client_id))
    {
        let reason = CloseReason::with_detail(
            CloseCode::ServerCapacity,
            format!("connect rate exceeded: {exceeded:?}"),
        )
        .v5(0x9F);
        shared.metrics.limit(&identity.org, "connect_rate");
        refuse(&mut client, Some(version), &reason, &mut counters).await;
        return None;
    }
    let keep_alive_cap = limits.max_keep_alive_secs;
    if !version.is_v5()
        && keep_alive_cap < u16::MAX
        && (connect.keep_alive == 0 || connect.keep_alive > keep_alive_cap)
    {
        let reason = CloseReason::with_detail(
            CloseCode::NotAuthorized,
            format!("keep-alive must be 1 to {keep_alive_cap} seconds"),
        );
        refuse(&mut client, Some(version), &reason, &mut counters).await;
        return None;
    }
    let policy_generation = shared
        .policy_generation
        .load(std::sync::atomic::Ordering::Relaxed);
    let policy = shared.policy.load_full();
    let Some(org) = policy.org(&identity.org).cloned() else {
        // An unknown org gets no monitoring message: its topic space does not exist.
        let reason = CloseReason::with_detail(CloseCode::NotAuthorized, "unknown org");
        if let Some(suppressed) = refusal_log_budget() {
            info!(code = 180, client_id = %identity.client_id, suppressed, "unknown org");
        }
        refuse(&mut client, Some(version), &reason, &mut counters).await;
        return None;
    };
    let rewrite = TopicRewrite::for_identity(&identity, &shared.config.upstream.topic_prefix);

    let failed = |reason: CloseReason, counters: Counters| {
        shared.metrics.close(reason.number(), &identity.org);
        if let Some(limit) = crate::metrics::limit_name(reason.code) {
            shared.metrics.limit(&identity.org, limit);
        }
        shared.monitor.report(Report {
            action: Action::FailedConnect,
            identity: &identity,
            facts: &facts,
            close: Some(&reason),
            counters,
            org_prefix: &rewrite.org_prefix,
            quickstart: org.quickstart,
            last_instance: false,
            session_id: None,
        });
        if let Some(suppressed) = refusal_log_budget() {
            info!(code = reason.number(), reason = %reason.reason_string(), client_id = %identity.client_id, suppressed, "connect refused");
        }
    };

    // A connection slot is taken only once a CONNECT has arrived, so sockets that never send one
    // (slowloris) cannot use up the slots of real clients; they end at the CONNECT deadline.
    let Ok(slot) = shared.connection_slots.clone().try_acquire_owned() else {
        let reason = CloseReason::new(CloseCode::ServerCapacity);
        refuse(&mut client, Some(version), &reason, &mut counters).await;
        failed(reason, counters);
        return None;
    };
    let auth_started = std::time::Instant::now();
    let auth_span = tracing::info_span!(
        "authenticate",
        class = identity.class.name(),
        code = tracing::field::Empty
    );
    let authenticated = authenticate(shared, &identity, &org, &connect, info)
        .instrument(auth_span.clone())
        .await;
    auth_span.record(
        "code",
        authenticated
            .as_ref()
            .map_or_else(|reason| reason.number(), |_| 0),
    );
    shared.metrics.auth_latency(auth_started.elapsed());
    let principal = match authenticated {
        Ok(principal) => principal,
        Err(reason) => {
            refuse(&mut client, Some(version), &reason, &mut counters).await;
            failed(reason, counters);
            return None;
        }
    };
    if let Err(reason) = check_connect_options(&connect, &principal) {
        refuse(&mut client, Some(version), &reason, &mut counters).await;
        failed(reason, counters);
        return None;
    }

    // Takeover: the older session must finish closing (and queue its Disconnect) first.
    let takeover = identity.class != ClientClass::ScalableApplication;
    match shared.registry.claim(
        &identity,
        org.limits.max_connections,
        control.handle(),
        takeover,
    ) {
        Ok(Some(displaced)) => {
            displaced.close(CloseReason::new(CloseCode::ClientIdReused));
            tokio::select! {
                _ = displaced.closed(TAKEOVER_WAIT) => {}
                Some(crate::registry::SessionCommand::Close(reason)) = control.commands.recv() => {
                    shared.registry.release(&identity, control.id());
                    refuse(&mut client, Some(version), &reason, &mut counters).await;
                    failed(reason, counters);
                    return None;
                }
            }
        }
        Ok(None) => {}
        Err(ClaimError::OrgFull) => {
            let reason = CloseReason::new(CloseCode::OrgConnectionQuota);
            refuse(&mut client, Some(version), &reason, &mut counters).await;
            failed(reason, counters);
            return None;
        }
    }

    if shared.is_shutting_down() {
        shared.registry.release(&identity, control.id());
        let reason = CloseReason::with_detail(CloseCode::ServerUnavailable, "shutting down");
        refuse(&mut client, Some(version), &reason, &mut counters).await;
        failed(reason, counters);
        return None;
    }

    let keep_alive =
        effective_keep_alive(&identity, connect.keep_alive, limits.max_keep_alive_secs);
    let upstream = dial_broker(
        shared,
        &connect,
        &principal,
        &rewrite,
        keep_alive,
        control.id(),
    )
    .await;
    let (upstream, upstream_in, broker_connack) = match upstream {
        Ok(dialled) => dialled,
        Err(reason) => {
            shared.registry.release(&identity, control.id());
            refuse(&mut client, Some(version), &reason, &mut counters).await;
            failed(reason, counters);
            return None;
        }
    };

    let limits = session_limits(shared, &connect, &rewrite, &broker_connack);
    let mut out = BytesMut::new();
    let keep_alive = broker_connack.server_keep_alive.unwrap_or(keep_alive);
    let announced_keep_alive = (keep_alive != connect.keep_alive).then_some(keep_alive);
    let connack = client_connack(&broker_connack, &limits, &org, announced_keep_alive);
    encode_connack(&mut out, version, &connack);
    if write_flushed(&mut client, &out).await.is_err() {
        shared.registry.release(&identity, control.id());
        failed(CloseReason::new(CloseCode::ClosedByClient), counters);
        return None;
    }
    counters.write_bytes += out.len() as u64;

    shared.monitor.report(Report {
        action: Action::Connect,
        identity: &identity,
        facts: &facts,
        close: None,
        counters,
        org_prefix: &rewrite.org_prefix,
        quickstart: org.quickstart,
        last_instance: false,
        session_id: Some(control.id()),
    });
    shared.metrics.connection(&identity.org, facts.protocol, 1);
    info!(client_id = %identity.client_id, protocol = facts.protocol, "session connected");

    Some(Bridge::new(
        client,
        client_in,
        upstream,
        upstream_in,
        version,
        principal,
        rewrite,
        facts,
        counters,
        limits,
        keep_alive,
        shared.clone(),
        policy_generation,
        slot,
    ))
}

enum FirstFrame {
    /// The client went away before sending anything worth an answer.
    Closed,
    /// Refused with a close (164, 165, 105).
    Refused(CloseReason),
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
            Err(error @ CodecError::TooLarge { .. }) => {
                return Err(FirstFrame::Refused(error.close_reason(true)))
            }
            Err(error) => return Err(FirstFrame::Refused(error.close_reason(true))),
        }
        if buf.capacity() == buf.len() {
            buf.reserve(READ_BUFFER_BYTES);
        }
        match tokio::time::timeout_at(until, client.read_buf(buf)).await {
            Err(_) => return Err(FirstFrame::Refused(CloseReason::new(CloseCode::NoData))),
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

/// Answers a refused CONNECT (CONNACK per the table, then close).
async fn refuse<S: ClientStream>(
    client: &mut S,
    version: Option<ProtocolVersion>,
    reason: &CloseReason,
    counters: &mut Counters,
) {
    tracing::Span::current().record("code", reason.number());
    let reason_string = reason.reason_string();
    let connack = match version {
        Some(ProtocolVersion::V5) => reason.v5_connack().map(|code| Connack {
            session_present: false,
            code,
            properties: vec![Property {
                id: property::REASON_STRING,
                value: PropertyValue::Str(&reason_string),
            }],
        }),
        Some(_) => reason.v3_connack().map(|code| Connack {
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

/// Checks the identity against the policy and verifies its token.
async fn authenticate(
    shared: &Shared,
    identity: &Identity,
    org: &Arc<Org>,
    connect: &Connect<'_>,
    info: &ConnectionInfo,
) -> Result<Principal, CloseReason> {
    let not_authorized =
        |what: &'static str| CloseReason::with_detail(CloseCode::NotAuthorized, what);
    if !org.enabled {
        return Err(not_authorized("the org is disabled"));
    }
    let mut principal = Principal {
        identity: identity.clone(),
        org: org.clone(),
        api_role: ApiRole::Standard,
        groups: Vec::new(),
        gateway_role: GatewayRole::Privileged,
        scope: None,
        api_key: None,
        token: None,
    };
    if org.quickstart {
        if identity.class == ClientClass::ScalableApplication {
            return Err(not_authorized("quickstart has no scalable applications"));
        }
        if info.secure {
            return Err(not_authorized("quickstart does not accept TLS"));
        }
        return Ok(principal);
    }
    if org.security != SecurityMode::TlsOptional && !info.secure {
        return Err(not_authorized("the org requires TLS"));
    }
    let by_certificate = check_certificate(org.security, identity, connect.username, info)?;
    let token_needed = match org.security {
        SecurityMode::TlsCert => false,
        SecurityMode::TlsCertOrToken => !by_certificate,
        SecurityMode::TlsOptional | SecurityMode::TlsToken | SecurityMode::TlsTokenAndCert => true,
    };
    let password = if token_needed {
        Some(
            connect
                .password
                .ok_or_else(|| CloseReason::bad_credentials("no token"))?,
        )
    } else {
        None
    };
    let (cache_key, token) = match identity.class {
        ClientClass::Application | ClientClass::ScalableApplication => {
            let key_name = connect
                .username
                .ok_or_else(|| CloseReason::bad_credentials("no API key"))?;
            let key_org = key_name
                .strip_prefix("a-")
                .and_then(|rest| rest.split_once('-'))
                .map(|(org, _)| org);
            if key_org != Some(identity.org.as_str()) {
                return Err(not_authorized(
                    "the API key does not belong to the client ID's org",
                ));
            }
            let key = org
                .api_keys
                .get(key_name)
                .ok_or_else(|| not_authorized("unknown API key"))?;
            if !key.enabled {
                return Err(not_authorized("the API key is disabled"));
            }
            principal.api_role = key.role;
            principal.groups = key.groups.clone();
            (key_name.to_string(), &key.token)
        }
        ClientClass::Device | ClientClass::Gateway => {
            // Certificate-only devices may leave the user name out.
            if connect.username != Some(TOKEN_AUTH_USERNAME)
                && (token_needed || connect.username.is_some())
            {
                return Err(CloseReason::bad_credentials(
                    "devices and gateways use use-token-auth",
                ));
            }
            let device_type = identity.device_type().unwrap_or_default();
            let device_id = identity.device_id().unwrap_or_default();
            let wanted = if identity.class == ClientClass::Gateway {
                DeviceClass::Gateway
            } else {
                DeviceClass::Device
            };
            match org.device_types.get(device_type) {
                Some(declared) if declared.class == wanted => {}
                Some(_) => return Err(not_authorized("the device type is of another class")),
                None => return Err(not_authorized("unknown device type")),
            }
            let device = org
                .device(device_type, device_id)
                .ok_or_else(|| not_authorized("unknown device"))?;
            if !device.enabled {
                return Err(not_authorized("the device is disabled"));
            }
            if identity.class == ClientClass::Gateway {
                principal.gateway_role = device.role;
                principal.groups = device.groups.clone();
            }
            (format!("{device_type}/{device_id}"), &device.token)
        }
    };
    if let Some(password) = password {
        match shared.verifier.verify(&cache_key, token, password).await {
            Ok(true) => {}
            Ok(false) => return Err(CloseReason::bad_credentials("the token does not match")),
            Err(AuthError::Busy) => return Err(CloseReason::new(CloseCode::AuthenticationBusy)),
            Err(AuthError::Hashing) => return Err(not_authorized("token verification failed")),
        }
    }
    if identity.class.is_application() {
        principal.api_key = Some(cache_key);
    }
    principal.token = Some(token.clone());
    principal.refresh_scope();
    Ok(principal)
}

/// Judges the client certificate for the org's security mode: `Ok(true)` when a certificate
/// authenticates the client, `Ok(false)` when the mode does not use one or it may be left out,
/// 169 when a required one is missing and 170 when one is invalid or names someone else.
/// Modes without certificates (`tls-optional`, `tls-token`) ignore any that was presented.
fn check_certificate(
    mode: SecurityMode,
    identity: &Identity,
    username: Option<&str>,
    info: &ConnectionInfo,
) -> Result<bool, CloseReason> {
    let required = match mode {
        SecurityMode::TlsOptional | SecurityMode::TlsToken => return Ok(false),
        SecurityMode::TlsCert | SecurityMode::TlsTokenAndCert => true,
        SecurityMode::TlsCertOrToken => false,
    };
    match &info.certificate {
        PeerCertificate::Absent if required => Err(CloseReason::with_detail(
            CloseCode::CertificateMissing,
            "the org requires a client certificate",
        )),
        PeerCertificate::Absent => Ok(false),
        PeerCertificate::Invalid { reason } => Err(CloseReason::with_detail(
            CloseCode::CertificateInvalid,
            format!("the client certificate did not verify: {reason}"),
        )),
        PeerCertificate::Verified { common_name } => {
            if identity.matches_certificate(common_name.as_deref(), username) {
                Ok(true)
            } else {
                Err(CloseReason::with_detail(
                    CloseCode::CertificateInvalid,
                    "the client certificate's common name does not match the client ID",
                ))
            }
        }
    }
}

/// Checks what the CONNECT asks for besides identity: enhanced authentication and the will.
fn check_connect_options(connect: &Connect<'_>, principal: &Principal) -> Result<(), CloseReason> {
    if connect
        .properties
        .iter()
        .any(|p| p.id == property::AUTHENTICATION_METHOD)
    {
        return Err(CloseReason::with_detail(
            CloseCode::NotAuthorized,
            "enhanced authentication is not supported",
        )
        .v5(0x8C));
    }
    let identity = &principal.identity;
    if identity.class == ClientClass::ScalableApplication
        && identity.instance().is_none()
        && connect.clean_start
    {
        return Err(CloseReason::with_detail(
            CloseCode::NotAuthorized,
            "A:ORG:APP needs clean session false",
        ));
    }
    if let Some(will) = &connect.will {
        principal.check_publish(will.topic).map_err(|reason| {
            CloseReason::with_detail(
                CloseCode::NotAuthorized,
                format!("will topic: {}", reason.reason_string()),
            )
        })?;
        if will.payload.len() > principal.org.limits.max_payload_bytes {
            return Err(CloseReason::with_detail(
                CloseCode::MessageTooLarge,
                "will payload",
            ));
        }
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
async fn dial_broker(
    shared: &Shared,
    connect: &Connect<'_>,
    principal: &Principal,
    rewrite: &TopicRewrite,
    keep_alive: u16,
    session_id: u64,
) -> Result<(UpstreamStream, BytesMut, BrokerConnack), CloseReason> {
    let unavailable =
        |detail: String| CloseReason::with_detail(CloseCode::ServerUnavailable, detail);
    let org = &principal.org;
    let will_topic = match &connect.will {
        Some(will) => Some(
            rewrite
                .to_broker_string(will.topic)
                .ok_or_else(|| CloseReason::with_detail(CloseCode::NotAuthorized, "will topic"))?,
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
            retain: will.retain && !org.strip_retained,
        });
    let scalable = principal.identity.class == ClientClass::ScalableApplication;
    let mut properties: Vec<Property<'_>> = Vec::with_capacity(connect.properties.len());
    for prop in &connect.properties {
        match prop.id {
            // The broker never gets to alias topics towards the proxy: rewriting needs full topics.
            property::TOPIC_ALIAS_MAXIMUM => {}
            property::MAXIMUM_PACKET_SIZE => {
                if let PropertyValue::U32(size) = prop.value {
                    let widened = u64::from(size) + rewrite.expansion() as u64;
                    properties.push(Property {
                        id: property::MAXIMUM_PACKET_SIZE,
                        value: PropertyValue::U32(u32::try_from(widened).unwrap_or(u32::MAX)),
                    });
                }
            }
            // Scalable applications get a fresh upstream session per connection (below).
            property::SESSION_EXPIRY_INTERVAL if scalable => {}
            _ => properties.push(*prop),
        }
    }
    // Connections of one scalable application share a client ID but must not take each other
    // over at the broker, so each gets its own upstream ID, in a clean session: what they share
    // is the broker's shared subscription, not a session.
    let upstream_client_id = if scalable {
        format!("{}:{session_id:x}", connect.client_id)
    } else {
        connect.client_id.to_string()
    };
    let dialer = &shared.dialer;
    let upstream_connect = Connect {
        // MQTT 3.1 limits client IDs to 23 bytes at many brokers; 3.1.1 has the same wire format
        // for everything a 3.1 client sends, so the proxy speaks 3.1.1 upstream for it.
        version: if connect.version == ProtocolVersion::V31 {
            ProtocolVersion::V311
        } else {
            connect.version
        },
        clean_start: connect.clean_start || org.quickstart || scalable,
        keep_alive: upstream_keep_alive(keep_alive),
        properties,
        client_id: &upstream_client_id,
        will,
        username: dialer.username.as_deref(),
        password: dialer.password.as_deref().map(str::as_bytes),
    };
    let mut encoded = BytesMut::new();
    encode_connect(&mut encoded, &upstream_connect);
    let mut stream = dialer.dial().await.map_err(|error| {
        warn!(%error, "broker unreachable");
        unavailable("broker unreachable".into())
    })?;
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let header = dialer
        .handshake(&mut stream, &encoded, &mut buf)
        .await
        .map_err(|error| {
            warn!(%error, "broker handshake failed");
            unavailable("broker handshake failed".into())
        })?;
    let frame = buf.split_to(header.frame_len());
    let parsed = parse_connack(&frame[header.header_len..], upstream_connect.version)
        .map_err(|_| unavailable("invalid CONNACK from broker".into()))?;
    if parsed.code != 0 {
        warn!(code = parsed.code, "broker refused the upstream connection");
        return Err(unavailable(format!(
            "broker refused with code {}",
            parsed.code
        )));
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

/// The keep-alive the proxy enforces: the client's, except that scalable applications are held
/// to 1..=3600 s (0, which would disable it, and anything longer become 3600).
///
/// The proxy-wide maximum (`limits.max_keep_alive_secs`) caps everyone; MQTT 5 clients are told
/// with Server Keep Alive, and MQTT 3 clients above it were refused before.
fn effective_keep_alive(identity: &Identity, requested: u16, maximum: u16) -> u16 {
    let requested = if identity.class == ClientClass::ScalableApplication
        && !(1..=MAX_SCALABLE_KEEP_ALIVE_SECS).contains(&requested)
    {
        MAX_SCALABLE_KEEP_ALIVE_SECS
    } else {
        requested
    };
    if maximum < u16::MAX && (requested == 0 || requested > maximum) {
        maximum
    } else {
        requested
    }
}

/// The keep-alive the proxy asks the broker for: longer than the client's, so that the proxy's
/// own 1.5× timer (closing code 160) always fires first.
fn upstream_keep_alive(client: u16) -> u16 {
    if client == 0 {
        0
    } else {
        client.saturating_mul(2)
    }
}

fn session_limits(
    shared: &Shared,
    connect: &Connect<'_>,
    rewrite: &TopicRewrite,
    broker: &BrokerConnack,
) -> Limits {
    let client_max_packet = connect
        .properties
        .iter()
        .find_map(|p| match (p.id, p.value) {
            (property::MAXIMUM_PACKET_SIZE, PropertyValue::U32(v)) => Some(v as usize),
            _ => None,
        });
    let process = &shared.config.limits;
    let mut max_packet_bytes = process.max_packet_bytes;
    if let Some(broker_max) = broker.maximum_packet_size {
        max_packet_bytes =
            max_packet_bytes.min((broker_max as usize).saturating_sub(rewrite.expansion()));
    }
    Limits {
        max_packet_bytes,
        client_max_packet,
        topic_alias_maximum: broker.topic_alias_maximum,
        partial_packet_timeout: process.partial_packet_timeout,
        max_inflight: usize::from(
            broker
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(process.max_inflight),
        ),
        max_filters_per_subscribe: process.max_filters_per_subscribe,
    }
}

/// The CONNACK the client sees: the broker's, with the limits the proxy enforces.
fn client_connack<'a>(
    broker: &'a BrokerConnack,
    limits: &Limits,
    org: &Org,
    server_keep_alive: Option<u16>,
) -> Connack<'a> {
    let mut properties = Vec::with_capacity(broker.properties.len() + 2);
    for (id, value) in &broker.properties {
        match *id {
            property::MAXIMUM_PACKET_SIZE
            | property::RECEIVE_MAXIMUM
            | property::ASSIGNED_CLIENT_IDENTIFIER
            | property::SERVER_KEEP_ALIVE => {}
            property::RETAIN_AVAILABLE if org.strip_retained => {}
            _ => properties.push(Property {
                id: *id,
                value: value.as_value(),
            }),
        }
    }
    properties.push(Property {
        id: property::MAXIMUM_PACKET_SIZE,
        value: PropertyValue::U32(u32::try_from(limits.max_packet_bytes).unwrap_or(u32::MAX)),
    });
    properties.push(Property {
        id: property::RECEIVE_MAXIMUM,
        value: PropertyValue::U16(u16::try_from(limits.max_inflight).unwrap_or(u16::MAX)),
    });
    if let Some(seconds) = server_keep_alive {
        properties.push(Property {
            id: property::SERVER_KEEP_ALIVE,
            value: PropertyValue::U16(seconds),
        });
    }
    if org.quickstart {
        properties.retain(|p| p.id != property::MAXIMUM_QOS);
        properties.push(Property {
            id: property::MAXIMUM_QOS,
            value: PropertyValue::Byte(0),
        });
    }
    Connack {
        session_present: broker.session_present,
        code: broker.code,
        properties,
    }
}
