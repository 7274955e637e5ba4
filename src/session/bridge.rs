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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ClientStream;
use crate::close::{CloseCode, CloseReason};
use crate::codec::{
    check_ack, check_disconnect, decode_frame_header, encode_ack, encode_publish, encode_subscribe,
    encode_unsubscribe, packet_type, parse_publish, parse_subscribe, parse_unsubscribe, varint_len,
    CodecError, PacketType, ProtocolVersion, PublishView,
};
use crate::decision::Principal;
use crate::monitor::{ConnectionFacts, Counters};
use crate::topics::TopicRewrite;
use crate::upstream::READ_BUFFER_BYTES;

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

/// What processing a batch of client packets asks for next.
enum Flow {
    Continue,
    /// The client sent DISCONNECT: forward it and end normally.
    Disconnected,
}

/// One established session's two connections and its state.
pub struct Bridge<S> {
    pub(super) client: S,
    pub(super) upstream: TcpStream,
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
    /// Client topic aliases (MQTT 5), by alias number, in client form.
    aliases: HashMap<u16, Box<str>>,
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
        upstream: TcpStream,
        upstream_in: BytesMut,
        version: ProtocolVersion,
        principal: Principal,
        rewrite: TopicRewrite,
        facts: ConnectionFacts,
        counters: Counters,
        limits: Limits,
        keep_alive_secs: u16,
    ) -> Bridge<S> {
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
            self.upstream
                .write_all(&self.to_upstream)
                .await
                .map_err(|e| CloseReason::with_detail(CloseCode::ClosedByServer, e.to_string()))?;
            clear_and_shrink(&mut self.to_upstream);
        }
        if !self.to_client.is_empty() {
            self.client
                .write_all(&self.to_client)
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
        let topic: &str = match (publish.topic_alias, publish.topic.is_empty()) {
            (Some(alias), _) if alias > self.limits.topic_alias_maximum => {
                return Err(CloseReason::with_detail(
                    CloseCode::InvalidData,
                    "topic alias above the maximum",
                )
                .v5(0x94));
            }
            (Some(alias), true) => self
                .aliases
                .get(&alias)
                .ok_or_else(|| CloseReason::protocol_error("unknown topic alias"))?,
            (Some(alias), false) => {
                if self
                    .aliases
                    .get(&alias)
                    .is_none_or(|known| **known != *publish.topic)
                {
                    self.aliases.insert(alias, publish.topic.into());
                }
                publish.topic
            }
            (None, _) => publish.topic,
        };
        self.principal.check_publish(topic)?;
        let mut first_byte = first_byte;
        if self.limits.strip_retained {
            first_byte &= !0x01;
        }
        let after_topic = &body[publish.after_topic.clone()];
        if self.limits.quickstart && publish.qos > 0 {
            // Quickstart: forward at QoS 0 and complete the client's QoS 1/2 flow here. The
            // packet id sits in front of the properties and payload; QoS 0 has none.
            let packet_id = publish.packet_id.unwrap_or_default();
            let without_id = &body[publish.after_topic.start + 2..publish.after_topic.end];
            let parts = self.rewrite.to_broker(topic).ok_or_else(|| {
                CloseReason::with_detail(
                    CloseCode::NotAuthorized,
                    "topic outside the client's namespace",
                )
            })?;
            encode_publish(
                &mut self.to_upstream,
                first_byte & 0b1111_0001,
                &parts,
                without_id,
            );
            if publish.qos == 1 {
                encode_ack(
                    &mut self.to_client,
                    PacketType::Puback,
                    self.version,
                    packet_id,
                    0,
                    None,
                );
            } else {
                encode_ack(
                    &mut self.to_client,
                    PacketType::Pubrec,
                    self.version,
                    packet_id,
                    0,
                    None,
                );
                self.client_local_qos2.insert(packet_id);
            }
            return Ok(());
        }
        if publish.topic.is_empty() {
            // The broker knows the alias under its rewritten topic.
            encode_publish(&mut self.to_upstream, first_byte, &[], after_topic);
        } else {
            let parts = self.rewrite.to_broker(topic).ok_or_else(|| {
                CloseReason::with_detail(
                    CloseCode::NotAuthorized,
                    "topic outside the client's namespace",
                )
            })?;
            encode_publish(&mut self.to_upstream, first_byte, &parts, after_topic);
        }
        Ok(())
    }

    fn client_subscribe(&mut self, first_byte: u8, body: &[u8]) -> Result<(), CloseReason> {
        let subscribe = parse_subscribe(first_byte, body, self.version).map_err(|e| {
            let mut reason = e.close_reason(false);
            if reason.code == CloseCode::InvalidTopic {
                reason.v5_reason = Some(0x8F);
            }
            reason
        })?;
        for filter in &subscribe.filters {
            self.principal.check_subscribe(filter.filter)?;
        }
        let mut added = 0;
        for filter in &subscribe.filters {
            if !self.subscriptions.contains(filter.filter) {
                added += 1;
            }
        }
        if self.subscriptions.len() + added > self.limits.max_subscriptions {
            return Err(CloseReason::with_detail(
                CloseCode::TooManySubscriptions,
                format!("limit {}", self.limits.max_subscriptions),
            ));
        }
        let mut rewritten: Vec<([&[u8]; 2], u8)> = Vec::with_capacity(subscribe.filters.len());
        for filter in &subscribe.filters {
            let parts = self.rewrite.to_broker(filter.filter).ok_or_else(|| {
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
            rewritten.push((parts, options));
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
        for filter in &subscribe.filters {
            self.subscriptions.insert(filter.filter.into());
        }
        Ok(())
    }

    fn client_unsubscribe(&mut self, first_byte: u8, body: &[u8]) -> Result<(), CloseReason> {
        let unsubscribe = parse_unsubscribe(first_byte, body, self.version).map_err(|e| {
            let mut reason = e.close_reason(false);
            if reason.code == CloseCode::InvalidTopic {
                reason.v5_reason = Some(0x8F);
            }
            reason
        })?;
        let rewritten: Vec<[&[u8]; 2]> = unsubscribe
            .filters
            .iter()
            .map(|filter| {
                // A filter outside the client's form can only name nothing of its own; it is
                // still kept inside the client's space so it can never touch another's.
                self.rewrite
                    .to_broker(filter)
                    .unwrap_or([self.rewrite.broker_add.as_bytes(), filter.as_bytes()])
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
            PacketType::Puback
            | PacketType::Pubrec
            | PacketType::Pubcomp
            | PacketType::Suback
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
