//! The bridge loop: client ⇄ upstream for an established session.
//!
//! Each read fills a reusable buffer; every complete frame in it is checked and either copied
//! unchanged into the outgoing buffer of the other side or, for PUBLISH, SUBSCRIBE and
//! UNSUBSCRIBE, re-framed with the rewritten topic in front of the untouched rest. One write per
//! read sends the whole batch. Nothing is allocated per forwarded PUBLISH: the buffers grow to
//! the working-set size once and are reused.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;

use super::ClientStream;
use crate::close::{CloseCode, CloseReason};
use crate::codec::{
    check_ack, check_disconnect, decode_frame_header, encode_ack, encode_publish, encode_suback,
    encode_subscribe, encode_unsubscribe, packet_type, parse_publish, parse_suback,
    parse_subscribe, parse_unsubscribe, varint_len, CodecError, PacketType, ProtocolVersion,
    PublishView,
};
use crate::decision::Principal;
use crate::identity::{ClientClass, Identity};
use crate::monitor::{ConnectionFacts, Counters};
use crate::monitor::{Monitor, Publication};
use crate::policy::OnViolation;
use crate::topics::TopicRewrite;
use crate::topics::{parse_iot2, Iot2Topic};
use crate::transport::write_flushed;
use crate::upstream::{UpstreamStream, READ_BUFFER_BYTES};

/// Spare room a read buffer must have before a read, in bytes.
const MIN_READ_ROOM: usize = 1024;
/// Largest packet accepted from the broker, in bytes (the broker is trusted, but bounded).
const MAX_BROKER_PACKET_BYTES: usize = 16 * 1024 * 1024;
/// Outgoing buffers larger than this after a burst are released, in bytes.
const SHRINK_ABOVE_BYTES: usize = 256 * 1024;

/// Per-session limits fixed at CONNECT.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest packet from the client (the Maximum Packet Size announced to MQTT 5 clients).
    pub max_packet_bytes: usize,
    /// Largest PUBLISH payload (287 above).
    pub max_payload_bytes: usize,
    /// Subscriptions per connection (154 above).
    pub max_subscriptions: usize,
    /// Clear the retain flag of client PUBLISHes.
    pub strip_retained: bool,
    /// The client's own Maximum Packet Size (MQTT 5).
    pub client_max_packet: Option<usize>,
    /// The broker's Topic Alias Maximum, which the client was told.
    pub topic_alias_maximum: u16,
    /// Quickstart: QoS is downgraded to 0.
    pub quickstart: bool,
}

/// A client topic alias.
#[derive(Debug)]
struct Alias {
    /// The topic, in client form.
    topic: Box<str>,
    /// Whether the broker knows the alias (it does not if the PUBLISH that set it was refused).
    upstream: bool,
}

/// The kind of client request a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Publish,
    Subscribe,
}

impl Request {
    fn name(self) -> &'static str {
        match self {
            Request::Publish => "Publish",
            Request::Subscribe => "Subscribe",
        }
    }
}

/// The shared-subscription group of a scalable application: `A:ORG:APP` connections share one
/// group, `A:ORG:APP:INSTANCE` connections another (PRODUCT.md §3).
fn share_prefix(identity: &Identity) -> String {
    if identity.class != ClientClass::ScalableApplication {
        return String::new();
    }
    let kind = if identity.instance().is_some() {
        "instances"
    } else {
        "app"
    };
    format!("$share/wiotp.{}.{}.{kind}/", identity.org, identity.first)
}

/// A topic-filter syntax error is 276 with MQTT 5's "Topic Filter invalid".
fn filter_error(error: CodecError) -> CloseReason {
    let mut reason = error.close_reason(false);
    if reason.code == CloseCode::InvalidTopic {
        reason.v5_reason = Some(0x8F);
    }
    reason
}

/// What processing a batch of client packets asks for next.
enum Flow {
    Continue,
    /// The client sent DISCONNECT: forward it and end normally.
    Disconnected,
}

/// One established session's two connections and its state.
pub struct Bridge<S> {
    pub(super) client: S,
    pub(super) upstream: UpstreamStream,
    client_in: BytesMut,
    upstream_in: BytesMut,
    to_upstream: BytesMut,
    to_client: BytesMut,
    /// The client's protocol version.
    pub version: ProtocolVersion,
    upstream_version: ProtocolVersion,
    /// Who the client is.
    pub principal: Principal,
    /// Its topic rewrite.
    pub rewrite: TopicRewrite,
    /// Monitoring facts.
    pub facts: ConnectionFacts,
    /// Byte and message counts.
    pub counters: Counters,
    limits: Limits,
    keep_alive: Option<Duration>,
    last_client_read: Instant,
    /// Client topic aliases (MQTT 5), by alias number.
    aliases: HashMap<u16, Alias>,
    /// `$share/GROUP/` for scalable applications, else empty: put in front of every filter.
    share_prefix: String,
    /// SUBSCRIBEs with filters the proxy refused itself, by packet id: the codes to merge into
    /// the broker's SUBACK (`None`: the broker's code).
    pending_subacks: HashMap<u16, Vec<Option<u8>>>,
    /// Where gateway notifications go.
    monitor: Monitor,
    /// Operations refused under `on_violation: reject` or for gateways.
    pub counters_refused: u64,
    /// Active subscription filters, in client form.
    subscriptions: HashSet<Box<str>>,
    /// QoS 2 deliveries the proxy dropped and acknowledged itself; the broker's PUBREL is answered here.
    upstream_local_qos2: HashSet<u16>,
    /// QoS 2 publishes the proxy acknowledged itself (quickstart downgrade); the client's PUBREL is answered here.
    client_local_qos2: HashSet<u16>,
}

impl<S: ClientStream> Bridge<S> {
    /// A bridge over an established pair of connections. `client_in` and `upstream_in` may hold
    /// bytes that arrived behind the CONNECT and the CONNACK.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: S,
        client_in: BytesMut,
        upstream: UpstreamStream,
        upstream_in: BytesMut,
        version: ProtocolVersion,
        principal: Principal,
        rewrite: TopicRewrite,
        facts: ConnectionFacts,
        counters: Counters,
        limits: Limits,
        keep_alive_secs: u16,
        monitor: Monitor,
    ) -> Bridge<S> {
        let share_prefix = share_prefix(&principal.identity);
        Bridge {
            client,
            upstream,
            client_in,
            upstream_in,
            to_upstream: BytesMut::new(),
            to_client: BytesMut::new(),
            version,
            upstream_version: if version == ProtocolVersion::V31 {
                ProtocolVersion::V311
            } else {
                version
            },
            principal,
            rewrite,
            facts,
            counters,
            limits,
            keep_alive: (keep_alive_secs > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500)),
            last_client_read: Instant::now(),
            aliases: HashMap::new(),
            share_prefix,
            pending_subacks: HashMap::new(),
            monitor,
            counters_refused: 0,
            subscriptions: HashSet::new(),
            upstream_local_qos2: HashSet::new(),
            client_local_qos2: HashSet::new(),
        }
    }

    /// Whether a packet of `len` bytes may be sent to the client (its Maximum Packet Size).
    pub fn client_fits(&self, len: usize) -> bool {
        self.limits.client_max_packet.is_none_or(|max| len <= max)
    }

    /// Runs until the session ends, and says why.
    pub async fn run(&mut self, kill: &mut mpsc::Receiver<CloseReason>) -> CloseReason {
        match self.pump_buffered().await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Disconnected) => return CloseReason::new(CloseCode::Normal),
            Err(reason) => return reason,
        }
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
        let keep_alive_timer = tokio::time::sleep_until(
            self.keep_alive
                .map_or(far_future, |ka| self.last_client_read + ka),
        );
        tokio::pin!(keep_alive_timer);
        loop {
            reserve_read_room(&mut self.client_in);
            reserve_read_room(&mut self.upstream_in);
            enum Event {
                Client(std::io::Result<usize>),
                Upstream(std::io::Result<usize>),
                KeepAlive,
                Kill(Option<CloseReason>),
            }
            let event = tokio::select! {
                read = self.client.read_buf(&mut self.client_in) => Event::Client(read),
                read = self.upstream.read_buf(&mut self.upstream_in) => Event::Upstream(read),
                _ = &mut keep_alive_timer, if self.keep_alive.is_some() => Event::KeepAlive,
                reason = kill.recv() => Event::Kill(reason),
            };
            let step = match event {
                Event::Client(Ok(0)) => Err(CloseReason::new(CloseCode::ClosedByClient)),
                Event::Client(Err(error)) => Err(CloseReason::with_detail(
                    CloseCode::ClosedByClient,
                    error.to_string(),
                )),
                Event::Client(Ok(read)) => {
                    self.counters.read_bytes += read as u64;
                    self.last_client_read = Instant::now();
                    self.process_client()
                }
                Event::Upstream(Ok(0)) => Err(CloseReason::with_detail(
                    CloseCode::ClosedByServer,
                    "the broker closed the connection",
                )),
                Event::Upstream(Err(error)) => Err(CloseReason::with_detail(
                    CloseCode::ClosedByServer,
                    error.to_string(),
                )),
                Event::Upstream(Ok(_)) => self.process_upstream().map(|()| Flow::Continue),
                Event::KeepAlive => {
                    let deadline = self
                        .keep_alive
                        .map_or(far_future, |ka| self.last_client_read + ka);
                    if Instant::now() >= deadline {
                        Err(CloseReason::new(CloseCode::KeepAliveTimeout))
                    } else {
                        keep_alive_timer.as_mut().reset(deadline);
                        Ok(Flow::Continue)
                    }
                }
                Event::Kill(reason) => {
                    Err(reason.unwrap_or_else(|| CloseReason::new(CloseCode::ClosedByServer)))
                }
            };
            // Whatever was decided, what was already accepted goes out first.
            let flushed = self.flush().await;
            match (step, flushed) {
                (Err(reason), _) => return reason,
                (Ok(_), Err(reason)) => return reason,
                (Ok(Flow::Disconnected), Ok(())) => return CloseReason::new(CloseCode::Normal),
                (Ok(Flow::Continue), Ok(())) => {}
            }
        }
    }

    /// Processes bytes that arrived together with the CONNECT or the CONNACK.
    async fn pump_buffered(&mut self) -> Result<Flow, CloseReason> {
        let flow = self.process_client()?;
        self.process_upstream()?;
        self.flush().await?;
        Ok(flow)
    }

    async fn flush(&mut self) -> Result<(), CloseReason> {
        if !self.to_upstream.is_empty() {
            write_flushed(&mut self.upstream, &self.to_upstream)
                .await
                .map_err(|e| CloseReason::with_detail(CloseCode::ClosedByServer, e.to_string()))?;
            clear_and_shrink(&mut self.to_upstream);
        }
        if !self.to_client.is_empty() {
            write_flushed(&mut self.client, &self.to_client)
                .await
                .map_err(|e| CloseReason::with_detail(CloseCode::ClosedByClient, e.to_string()))?;
            self.counters.write_bytes += self.to_client.len() as u64;
            clear_and_shrink(&mut self.to_client);
        }
        Ok(())
    }

    /// Handles every complete frame from the client.
    fn process_client(&mut self) -> Result<Flow, CloseReason> {
        let input = std::mem::take(&mut self.client_in);
        let mut consumed = 0;
        let result = loop {
            let rest = &input[consumed..];
            let header = match decode_frame_header(rest, self.limits.max_packet_bytes) {
                Ok(Some(header)) => header,
                Ok(None) => break Ok(Flow::Continue),
                Err(error) => break Err(error.close_reason(false)),
            };
            let Some(frame) = rest.get(..header.frame_len()) else {
                break Ok(Flow::Continue);
            };
            consumed += frame.len();
            match self.client_packet(header.first_byte, frame, header.header_len) {
                Ok(Flow::Continue) => {}
                other => break other,
            }
        };
        self.client_in = input;
        self.client_in.advance(consumed);
        result
    }

    fn client_packet(
        &mut self,
        first_byte: u8,
        frame: &[u8],
        header_len: usize,
    ) -> Result<Flow, CloseReason> {
        let body = &frame[header_len..];
        let kind = packet_type(first_byte, self.version).map_err(|e| e.close_reason(false))?;
        match kind {
            PacketType::Publish => self.client_publish(first_byte, body)?,
            PacketType::Subscribe => self.client_subscribe(first_byte, body)?,
            PacketType::Unsubscribe => self.client_unsubscribe(first_byte, body)?,
            PacketType::Puback | PacketType::Pubrec | PacketType::Pubcomp => {
                check_ack(kind, body, self.version).map_err(|e| e.close_reason(false))?;
                self.to_upstream.extend_from_slice(frame);
            }
            PacketType::Pubrel => {
                let packet_id =
                    check_ack(kind, body, self.version).map_err(|e| e.close_reason(false))?;
                if self.client_local_qos2.remove(&packet_id) {
                    encode_ack(
                        &mut self.to_client,
                        PacketType::Pubcomp,
                        self.version,
                        packet_id,
                        0,
                        None,
                    );
                } else {
                    self.to_upstream.extend_from_slice(frame);
                }
            }
            PacketType::Pingreq => {
                if !body.is_empty() {
                    return Err(CodecError::BadLength("PINGREQ with a body").close_reason(false));
                }
                self.to_upstream.extend_from_slice(frame);
            }
            PacketType::Disconnect => {
                check_disconnect(body, self.version).map_err(|e| e.close_reason(false))?;
                self.to_upstream.extend_from_slice(frame);
                return Ok(Flow::Disconnected);
            }
            PacketType::Connect => return Err(CloseReason::protocol_error("second CONNECT")),
            PacketType::Auth => {
                return Err(CloseReason::protocol_error(
                    "AUTH without an authentication method",
                ))
            }
            PacketType::Connack
            | PacketType::Suback
            | PacketType::Unsuback
            | PacketType::Pingresp => {
                return Err(CloseReason::protocol_error(
                    "server-to-client packet from the client",
                ))
            }
        }
        Ok(Flow::Continue)
    }

    fn client_publish(&mut self, first_byte: u8, body: &[u8]) -> Result<(), CloseReason> {
        let publish = parse_publish(first_byte, body, self.version, true)
            .map_err(|e| e.close_reason(false))?;
        self.counters.read_msg += 1;
        if publish.payload.len() > self.limits.max_payload_bytes {
            return Err(CloseReason::with_detail(
                CloseCode::MessageTooLarge,
                format!(
                    "payload of {} bytes, limit {}",
                    publish.payload.len(),
                    self.limits.max_payload_bytes
                ),
            ));
        }
        // The topic this PUBLISH is for, and whether the broker already knows its alias.
        let (topic, alias_known_upstream): (&str, bool) =
            match (publish.topic_alias, publish.topic.is_empty()) {
                (Some(alias), _) if alias > self.limits.topic_alias_maximum => {
                    return Err(CloseReason::with_detail(
                        CloseCode::InvalidData,
                        "topic alias above the maximum",
                    )
                    .v5(0x94));
                }
                (Some(alias), true) => {
                    let known = self
                        .aliases
                        .get(&alias)
                        .ok_or_else(|| CloseReason::protocol_error("unknown topic alias"))?;
                    (&known.topic, known.upstream)
                }
                (Some(alias), false) => {
                    let alias_entry = Alias {
                        topic: publish.topic.into(),
                        upstream: false,
                    };
                    self.aliases.insert(alias, alias_entry);
                    (publish.topic, false)
                }
                (None, _) => (publish.topic, false),
            };
        if let Err(reason) = self.principal.check_publish(topic) {
            let topic = topic.to_owned();
            return self.refuse_publish(&publish, &topic, reason);
        }
        let mut first_byte = first_byte;
        if self.limits.strip_retained {
            first_byte &= !0x01;
        }
        let mut after_topic = &body[publish.after_topic.clone()];
        let downgrade = self.limits.quickstart && publish.qos > 0;
        if downgrade {
            // Quickstart forwards at QoS 0; the packet id in front of the rest goes away.
            first_byte &= 0b1111_0001;
            after_topic = &after_topic[2..];
        }
        if alias_known_upstream {
            encode_publish(&mut self.to_upstream, first_byte, &[], after_topic);
        } else {
            let parts = self.rewrite.to_broker(topic).ok_or_else(|| {
                CloseReason::with_detail(
                    CloseCode::NotAuthorized,
                    "topic outside the client's namespace",
                )
            })?;
            encode_publish(&mut self.to_upstream, first_byte, &parts, after_topic);
            if let Some(alias) = publish.topic_alias.and_then(|a| self.aliases.get_mut(&a)) {
                alias.upstream = true;
            }
        }
        if downgrade {
            self.acknowledge_here(&publish, 0);
        }
        Ok(())
    }

    /// Completes a client's QoS 1/2 flow in the proxy: PUBACK, or PUBREC (and later PUBCOMP).
    /// An MQTT 5 reason code of 0x80 or more ends a QoS 2 flow at the PUBREC.
    fn acknowledge_here(&mut self, publish: &PublishView<'_>, reason_code: u8) {
        let Some(packet_id) = publish.packet_id else {
            return;
        };
        let code = if self.version.is_v5() { reason_code } else { 0 };
        if publish.qos == 1 {
            encode_ack(
                &mut self.to_client,
                PacketType::Puback,
                self.version,
                packet_id,
                code,
                None,
            );
        } else {
            encode_ack(
                &mut self.to_client,
                PacketType::Pubrec,
                self.version,
                packet_id,
                code,
                None,
            );
            if code < 0x80 {
                self.client_local_qos2.insert(packet_id);
            }
        }
    }

    /// A PUBLISH the identity may not make: close, or drop it and complete its QoS flow.
    fn refuse_publish(
        &mut self,
        publish: &PublishView<'_>,
        topic: &str,
        reason: CloseReason,
    ) -> Result<(), CloseReason> {
        let code = self.refusal(Request::Publish, topic, reason)?;
        self.acknowledge_here(publish, code);
        Ok(())
    }

    /// Decides what a refused operation does under the org's violation policy. Gateways always
    /// keep their connection and are told on their `notify` topic. Returns the reason code for
    /// the client's acknowledgement, or the close.
    fn refusal(
        &mut self,
        request: Request,
        topic: &str,
        reason: CloseReason,
    ) -> Result<u8, CloseReason> {
        let gateway = self.principal.identity.class == ClientClass::Gateway;
        if !gateway && self.principal.org.on_violation == OnViolation::Disconnect {
            return Err(reason);
        }
        self.counters_refused += 1;
        info!(
            request = request.name(),
            topic,
            code = reason.number(),
            reason = %reason.reason_string(),
            "operation refused"
        );
        if gateway {
            self.notify(request, topic, &reason);
        }
        let namespace_invalid = parse_iot2(topic).is_none();
        Ok(match (self.version.is_v5(), namespace_invalid, request) {
            (false, _, _) => 0x80,
            (true, true, Request::Publish) => 0x90,
            (true, true, Request::Subscribe) => 0x8F,
            (true, false, _) => 0x87,
        })
    }

    /// Reports a gateway's refused request on its own `notify` topic.
    fn notify(&self, request: Request, topic: &str, reason: &CloseReason) {
        let identity = &self.principal.identity;
        let (device_type, device_id) = match parse_iot2(topic) {
            Some(
                Iot2Topic::DeviceEvent {
                    device_type,
                    device_id,
                    ..
                }
                | Iot2Topic::DeviceCommand {
                    device_type,
                    device_id,
                    ..
                }
                | Iot2Topic::DeviceMon {
                    device_type,
                    device_id,
                }
                | Iot2Topic::DeviceNotify {
                    device_type,
                    device_id,
                },
            ) => (device_type, device_id),
            _ => ("", ""),
        };
        let notification = serde_json::json!({
            "Request": request.name(),
            "Time": crate::monitor::iso_time(std::time::SystemTime::now()),
            "Topic": topic,
            "Type": device_type,
            "Id": device_id,
            "Client": identity.client_id,
            "RC": reason.number(),
            "Message": reason.reason_string(),
        });
        let notify_topic = format!(
            "{}iot-2/type/{}/id/{}/notify",
            self.rewrite.org_prefix,
            identity.first,
            identity.second.as_deref().unwrap_or_default()
        );
        self.monitor.send(vec![Publication {
            topic: notify_topic,
            payload: notification.to_string().into(),
            retain: false,
        }]);
    }

    fn client_subscribe(&mut self, first_byte: u8, body: &[u8]) -> Result<(), CloseReason> {
        let subscribe = parse_subscribe(first_byte, body, self.version).map_err(filter_error)?;
        // For each filter: None to forward it, or the code the proxy answers itself.
        let mut verdicts: Vec<Option<u8>> = Vec::with_capacity(subscribe.filters.len());
        for filter in &subscribe.filters {
            match self.principal.check_subscribe(filter.filter) {
                Ok(()) => verdicts.push(None),
                Err(reason) => verdicts.push(Some(self.refusal(
                    Request::Subscribe,
                    filter.filter,
                    reason,
                )?)),
            }
        }
        let allowed = || {
            subscribe
                .filters
                .iter()
                .zip(&verdicts)
                .filter(|(_, v)| v.is_none())
                .map(|(f, _)| f)
        };
        let added = allowed()
            .filter(|f| !self.subscriptions.contains(f.filter))
            .count();
        if self.subscriptions.len() + added > self.limits.max_subscriptions {
            return Err(CloseReason::with_detail(
                CloseCode::TooManySubscriptions,
                format!("limit {}", self.limits.max_subscriptions),
            ));
        }
        if allowed().next().is_none() {
            let codes: Vec<u8> = verdicts.iter().map(|v| v.unwrap_or(0x80)).collect();
            encode_suback(
                &mut self.to_client,
                self.version,
                subscribe.packet_id,
                &codes,
                None,
            );
            return Ok(());
        }
        let mut rewritten: Vec<([&[u8]; 3], u8)> = Vec::with_capacity(verdicts.len());
        for filter in allowed() {
            let [head, rest] = self.rewrite.to_broker(filter.filter).ok_or_else(|| {
                CloseReason::with_detail(
                    CloseCode::NotAuthorized,
                    "filter outside the client's namespace",
                )
            })?;
            let options = if self.limits.quickstart {
                filter.options & !0x03
            } else {
                filter.options
            };
            rewritten.push(([self.share_prefix.as_bytes(), head, rest], options));
        }
        let filters: Vec<(&[&[u8]], u8)> = rewritten
            .iter()
            .map(|(parts, options)| (&parts[..], *options))
            .collect();
        encode_subscribe(
            &mut self.to_upstream,
            self.upstream_version,
            subscribe.packet_id,
            &subscribe.properties,
            &filters,
        );
        for filter in allowed() {
            self.subscriptions.insert(filter.filter.into());
        }
        if verdicts.iter().any(Option::is_some) {
            self.pending_subacks.insert(subscribe.packet_id, verdicts);
        }
        Ok(())
    }

    fn client_unsubscribe(&mut self, first_byte: u8, body: &[u8]) -> Result<(), CloseReason> {
        let unsubscribe =
            parse_unsubscribe(first_byte, body, self.version).map_err(filter_error)?;
        let rewritten: Vec<[&[u8]; 3]> = unsubscribe
            .filters
            .iter()
            .map(|filter| {
                // A filter outside the client's form can only name nothing of its own; it is
                // still kept inside the client's space so it can never touch another's.
                let [head, rest] = self
                    .rewrite
                    .to_broker(filter)
                    .unwrap_or([self.rewrite.broker_add.as_bytes(), filter.as_bytes()]);
                [self.share_prefix.as_bytes(), head, rest]
            })
            .collect();
        let filters: Vec<&[&[u8]]> = rewritten.iter().map(|parts| &parts[..]).collect();
        encode_unsubscribe(
            &mut self.to_upstream,
            self.upstream_version,
            unsubscribe.packet_id,
            &unsubscribe.properties,
            &filters,
        );
        for filter in &unsubscribe.filters {
            self.subscriptions.remove(*filter);
        }
        Ok(())
    }

    /// A SUBACK from the broker: merged with the proxy's own refusals when some filters of that
    /// SUBSCRIBE were answered here.
    fn broker_suback(&mut self, frame: &[u8], body: &[u8]) -> Result<(), CloseReason> {
        if !self.pending_subacks.is_empty() {
            let suback = parse_suback(body, self.upstream_version).map_err(broker_fault)?;
            if let Some(verdicts) = self.pending_subacks.remove(&suback.packet_id) {
                let mut from_broker = suback.codes.iter().copied();
                let codes: Vec<u8> = verdicts
                    .iter()
                    .map(|verdict| verdict.unwrap_or_else(|| from_broker.next().unwrap_or(0x80)))
                    .collect();
                encode_suback(
                    &mut self.to_client,
                    self.version,
                    suback.packet_id,
                    &codes,
                    None,
                );
                return Ok(());
            }
        }
        self.to_client.extend_from_slice(frame);
        Ok(())
    }

    /// Handles every complete frame from the broker.
    fn process_upstream(&mut self) -> Result<(), CloseReason> {
        let input = std::mem::take(&mut self.upstream_in);
        let mut consumed = 0;
        let result = loop {
            let rest = &input[consumed..];
            let header = match decode_frame_header(rest, MAX_BROKER_PACKET_BYTES) {
                Ok(Some(header)) => header,
                Ok(None) => break Ok(()),
                Err(error) => break Err(broker_fault(error)),
            };
            let Some(frame) = rest.get(..header.frame_len()) else {
                break Ok(());
            };
            consumed += frame.len();
            if let Err(reason) = self.upstream_packet(header.first_byte, frame, header.header_len) {
                break Err(reason);
            }
        };
        self.upstream_in = input;
        self.upstream_in.advance(consumed);
        result
    }

    fn upstream_packet(
        &mut self,
        first_byte: u8,
        frame: &[u8],
        header_len: usize,
    ) -> Result<(), CloseReason> {
        let body = &frame[header_len..];
        let kind = packet_type(first_byte, self.upstream_version).map_err(broker_fault)?;
        match kind {
            PacketType::Publish => self.deliver(first_byte, body),
            PacketType::Pubrel => {
                let packet_id =
                    check_ack(kind, body, self.upstream_version).map_err(broker_fault)?;
                if self.upstream_local_qos2.remove(&packet_id) {
                    encode_ack(
                        &mut self.to_upstream,
                        PacketType::Pubcomp,
                        self.upstream_version,
                        packet_id,
                        0,
                        None,
                    );
                } else {
                    self.to_client.extend_from_slice(frame);
                }
                Ok(())
            }
            PacketType::Suback => self.broker_suback(frame, body),
            PacketType::Puback
            | PacketType::Pubrec
            | PacketType::Pubcomp
            | PacketType::Unsuback
            | PacketType::Pingresp => {
                self.to_client.extend_from_slice(frame);
                Ok(())
            }
            PacketType::Disconnect => {
                let code = check_disconnect(body, self.upstream_version).map_err(broker_fault)?;
                if code == 0x8E {
                    Err(CloseReason::new(CloseCode::ClientIdReused))
                } else {
                    Err(CloseReason::with_detail(
                        CloseCode::ClosedByServer,
                        format!("the broker disconnected with 0x{code:02X}"),
                    ))
                }
            }
            _ => Err(CloseReason::with_detail(
                CloseCode::ClosedByServer,
                "unexpected packet from the broker",
            )),
        }
    }

    /// A PUBLISH from the broker: rewrite its topic to the client's form, or drop it (and complete
    /// the broker's QoS flow) when the client may not or cannot receive it.
    fn deliver(&mut self, first_byte: u8, body: &[u8]) -> Result<(), CloseReason> {
        let publish =
            parse_publish(first_byte, body, self.upstream_version, false).map_err(broker_fault)?;
        if publish.topic.is_empty() {
            return Err(CloseReason::with_detail(
                CloseCode::ClosedByServer,
                "the broker used a topic alias",
            ));
        }
        let Some(parts) = self.rewrite.to_client(publish.topic) else {
            self.drop_delivery(&publish);
            return Ok(());
        };
        if self.principal.scope.is_some() {
            let client_topic = publish
                .topic
                .get(self.rewrite.broker_add.len()..)
                .unwrap_or_default();
            if !self.principal.may_receive(client_topic) {
                self.drop_delivery(&publish);
                return Ok(());
            }
        }
        // Clearing a retained monitoring message is state housekeeping, not a message.
        if publish.payload.is_empty() && publish.topic.ends_with("/mon") {
            self.drop_delivery(&publish);
            return Ok(());
        }
        let after_topic = &body[publish.after_topic.clone()];
        let remaining = 2 + parts[0].len() + parts[1].len() + after_topic.len();
        if !self.client_fits(1 + varint_len(remaining) + remaining) {
            self.drop_delivery(&publish);
            return Ok(());
        }
        encode_publish(&mut self.to_client, first_byte, &parts, after_topic);
        self.counters.write_msg += 1;
        Ok(())
    }

    fn drop_delivery(&mut self, publish: &PublishView<'_>) {
        let Some(packet_id) = publish.packet_id else {
            return;
        };
        if publish.qos == 1 {
            encode_ack(
                &mut self.to_upstream,
                PacketType::Puback,
                self.upstream_version,
                packet_id,
                0,
                None,
            );
        } else {
            encode_ack(
                &mut self.to_upstream,
                PacketType::Pubrec,
                self.upstream_version,
                packet_id,
                0,
                None,
            );
            self.upstream_local_qos2.insert(packet_id);
        }
    }
}

fn broker_fault(error: CodecError) -> CloseReason {
    CloseReason::with_detail(
        CloseCode::ClosedByServer,
        format!("invalid data from the broker: {error}"),
    )
}

fn reserve_read_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_READ_ROOM {
        buf.reserve(READ_BUFFER_BYTES.max(buf.len()));
    }
}

fn clear_and_shrink(buf: &mut BytesMut) {
    if buf.capacity() > SHRINK_ABOVE_BYTES {
        *buf = BytesMut::new();
    } else {
        buf.clear();
    }
}
