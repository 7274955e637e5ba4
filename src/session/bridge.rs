//! The bridge loop: client ⇄ upstream for an established session.
//!
//! Each read fills a reusable buffer; every complete frame in it is checked and either copied
//! unchanged into the outgoing buffer of the other side or, for PUBLISH, SUBSCRIBE and
//! UNSUBSCRIBE, re-framed with the rewritten topic in front of the untouched rest. One write per
//! read sends the whole batch. Nothing is allocated per forwarded PUBLISH: the buffers grow to
//! the working-set size once and are reused.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::info;

use super::ClientStream;
use crate::close::{CloseCode, CloseReason};
use crate::codec::{
    check_ack, check_disconnect, decode_frame_header, encode_ack, encode_publish,
    encode_publish_with_properties, encode_suback, encode_subscribe, encode_unsubscribe,
    for_each_property, packet_type, parse_properties, parse_publish, parse_suback, parse_subscribe,
    parse_unsubscribe, publish_properties, varint_len, CodecError, PacketType, Property,
    PropertyContext, PropertyValue, ProtocolVersion, PublishView,
};
use crate::decision::Principal;
use crate::identity::{ClientClass, Identity};
use crate::limits::{bucket, take, Bucket};
use crate::monitor::Publication;
use crate::monitor::{ConnectionFacts, Counters};
use crate::policy::{OnRateExceeded, OnViolation};
use crate::proxy::Shared;
use crate::registry::SessionCommand;
use crate::telemetry::TRACEPARENT;
use crate::topics::parse_iot2;
use crate::topics::TopicRewrite;
use crate::transport::write_flushed;
use crate::upstream::{UpstreamStream, READ_BUFFER_BYTES};

/// How often a session logs that it hit a rate limit, at most.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Loop turns between two reports of a session's traffic to the process metrics.
const METRICS_REPORT_EVERY: u32 = 64;
/// The most a single read asks for, in bytes: a busy connection's read size doubles up to this.
const MAX_READ_CHUNK: usize = 64 * 1024;
/// Largest packet accepted from the broker, in bytes (the broker is trusted, but bounded).
const MAX_BROKER_PACKET_BYTES: usize = 16 * 1024 * 1024;
/// Outgoing buffers larger than this after a burst are released, in bytes.
const SHRINK_ABOVE_BYTES: usize = 256 * 1024;

/// Per-session limits fixed at CONNECT. The org's own limits (payload, subscriptions, retained
/// flag, quickstart) are read from the principal's org, so a policy edit changes them at once.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest packet from the client (the Maximum Packet Size announced to MQTT 5 clients).
    pub max_packet_bytes: usize,
    /// The client's own Maximum Packet Size (MQTT 5).
    pub client_max_packet: Option<usize>,
    /// The broker's Topic Alias Maximum, which the client was told.
    pub topic_alias_maximum: u16,
    /// How long part of a packet may wait for the rest.
    pub partial_packet_timeout: Duration,
    /// Unacknowledged QoS 1/2 PUBLISHes from the client (the Receive Maximum it was told).
    pub max_inflight: usize,
    /// Filters in one SUBSCRIBE.
    pub max_filters_per_subscribe: usize,
}

/// The publish buckets of a connection: its own rate, its byte rate, and its org's aggregate.
fn buckets(
    principal: &Principal,
    shared: &Shared,
) -> (Bucket, Option<Bucket>, Option<Arc<Bucket>>) {
    let limits = &principal.org.limits;
    let class = principal.identity.class;
    // A byte bucket must hold the largest message at once, or that message could never pass.
    let min_bytes = u32::try_from(limits.max_payload_bytes).unwrap_or(u32::MAX);
    (
        bucket(limits.publish_rate.get(class), 1),
        limits
            .byte_rate
            .get(class)
            .map(|rate| bucket(rate, min_bytes)),
        limits
            .org_publish_rate
            .map(|rate| shared.org_buckets.get(&principal.org.id, rate)),
    )
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

/// The value of a `traceparent` user property of an MQTT 5 PUBLISH, without allocating.
fn find_traceparent<'a>(body: &'a [u8], publish: &PublishView<'_>) -> Option<&'a str> {
    let mut found = None;
    let _ = for_each_property(
        publish_properties(body, publish),
        PropertyContext::PublishFromClient,
        |property| {
            if let PropertyValue::Pair(TRACEPARENT, value) = property.value {
                found = Some(value);
            }
        },
    );
    found
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
    /// When the last complete packet arrived (keep-alive counts packets, not bytes).
    last_packet_at: Instant,
    /// Since when an incomplete packet waits in the read buffer (slowloris).
    partial_since: Option<Instant>,
    /// Reading the client is paused by a rate limit until then.
    resume_at: Option<Instant>,
    /// Publishes per second of this connection.
    publish_bucket: Bucket,
    /// Payload bytes per second of this connection, when limited.
    byte_bucket: Option<Bucket>,
    /// Publishes per second of the whole org, when limited.
    org_bucket: Option<Arc<Bucket>>,
    /// Packet ids of the client's QoS 1/2 PUBLISHes the broker has not completed yet.
    inflight: HashSet<u16>,
    /// When a rate limit was last logged (limit hits are logged at most once a second).
    last_limit_log: Option<Instant>,
    /// The counters already added to the process metrics.
    reported: Counters,
    /// Loop turns since the last metrics report.
    events_since_report: u32,
    /// How much the next client read asks for; doubles while reads fill the buffer.
    client_chunk: usize,
    /// How much the next broker read asks for.
    upstream_chunk: usize,
    /// Client topic aliases (MQTT 5), by alias number.
    aliases: HashMap<u16, Alias>,
    /// `$share/GROUP/` for scalable applications, else empty: put in front of every filter.
    share_prefix: String,
    /// SUBSCRIBEs with filters the proxy refused itself, by packet id: the codes to merge into
    /// the broker's SUBACK (`None`: the broker's code).
    pending_subacks: HashMap<u16, Vec<Option<u8>>>,
    /// Monitor, metrics and the policy.
    shared: Arc<Shared>,
    /// The policy generation the session was authorized under.
    policy_generation: u64,
    /// This session's place under the process connection cap, given back when it ends.
    _slot: OwnedSemaphorePermit,
    /// UNSUBSCRIBEs the proxy sent itself (a policy edit revoked a subscription), by packet id:
    /// their UNSUBACKs are not the client's.
    proxy_unsubscribes: HashSet<u16>,
    /// The client's UNSUBSCRIBEs the broker has not answered yet, by packet id: the proxy never
    /// picks one of these for its own, so the broker's in-order answers can be told apart.
    client_unsubscribes: HashSet<u16>,
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
        shared: Arc<Shared>,
        policy_generation: u64,
        slot: OwnedSemaphorePermit,
    ) -> Bridge<S> {
        let share_prefix = share_prefix(&principal.identity);
        let (publish_bucket, byte_bucket, org_bucket) = buckets(&principal, &shared);

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
            last_packet_at: Instant::now(),
            partial_since: None,
            resume_at: None,
            publish_bucket,
            byte_bucket,
            org_bucket,
            inflight: HashSet::new(),
            last_limit_log: None,
            reported: Counters::default(),
            events_since_report: 0,
            client_chunk: READ_BUFFER_BYTES,
            upstream_chunk: READ_BUFFER_BYTES,
            aliases: HashMap::new(),
            share_prefix,
            pending_subacks: HashMap::new(),
            shared,
            policy_generation,
            _slot: slot,
            proxy_unsubscribes: HashSet::new(),
            client_unsubscribes: HashSet::new(),
            subscriptions: HashSet::new(),
            upstream_local_qos2: HashSet::new(),
            client_local_qos2: HashSet::new(),
        }
    }

    /// Subscriptions this connection may hold (154 above).
    fn max_subscriptions(&self) -> usize {
        self.principal
            .org
            .limits
            .max_subscriptions
            .get(self.principal.identity.class) as usize
    }

    /// Whether a packet of `len` bytes may be sent to the client (its Maximum Packet Size).
    pub fn client_fits(&self, len: usize) -> bool {
        self.limits.client_max_packet.is_none_or(|max| len <= max)
    }

    /// Runs until the session ends, and says why.
    pub async fn run(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<SessionCommand>,
    ) -> CloseReason {
        // A policy edit that landed while this session was connecting has not reached it yet.
        if self.shared.policy_generation.load(Ordering::Acquire) != self.policy_generation {
            if let Err(reason) = self.reevaluate() {
                return reason;
            }
        }
        match self.pump_buffered().await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Disconnected) => return CloseReason::new(CloseCode::Normal),
            Err(reason) => return reason,
        }
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
        // One timer for every deadline: keep-alive, a partly received packet, and the end of a
        // rate-limit pause. It is re-armed only when it fires or a pause begins.
        let timer = tokio::time::sleep_until(self.next_deadline().unwrap_or(far_future));
        tokio::pin!(timer);
        loop {
            let client_room = reserve_read_room(&mut self.client_in, self.client_chunk);
            let upstream_room = reserve_read_room(&mut self.upstream_in, self.upstream_chunk);
            enum Event {
                Client(std::io::Result<usize>),
                Upstream(std::io::Result<usize>),
                Timer,
                Command(Option<SessionCommand>),
            }
            let paused = self.resume_at.is_some();
            let partial = self.partial_since.is_some();
            let event = tokio::select! {
                read = self.client.read_buf(&mut self.client_in), if !paused => Event::Client(read),
                read = self.upstream.read_buf(&mut self.upstream_in) => Event::Upstream(read),
                _ = &mut timer => Event::Timer,
                command = commands.recv() => Event::Command(command),
            };
            let step = match event {
                Event::Client(Ok(0)) => Err(CloseReason::new(CloseCode::ClosedByClient)),
                Event::Client(Err(error)) => Err(CloseReason::with_detail(
                    CloseCode::ClosedByClient,
                    error.to_string(),
                )),
                Event::Client(Ok(read)) => {
                    if read >= client_room {
                        self.client_chunk = (self.client_chunk * 2).min(MAX_READ_CHUNK);
                    }
                    self.counters.read_bytes += read as u64;
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
                Event::Upstream(Ok(read)) => {
                    if read >= upstream_room {
                        self.upstream_chunk = (self.upstream_chunk * 2).min(MAX_READ_CHUNK);
                    }
                    self.process_upstream().map(|()| Flow::Continue)
                }
                Event::Command(Some(SessionCommand::Reevaluate)) => {
                    self.reevaluate().map(|()| Flow::Continue)
                }
                Event::Command(Some(SessionCommand::Close(reason))) => Err(reason),
                Event::Timer => self.on_deadline(),
                Event::Command(None) => Err(CloseReason::new(CloseCode::ClosedByServer)),
            };
            // A deadline that moved earlier needs the timer now; one that moved later is found
            // when the timer fires.
            if timer.is_elapsed()
                || self.resume_at.is_some() != paused
                || self.partial_since.is_some() != partial
            {
                timer
                    .as_mut()
                    .reset(self.next_deadline().unwrap_or(far_future));
            }
            self.events_since_report += 1;
            if self.events_since_report >= METRICS_REPORT_EVERY {
                self.report_metrics();
            }
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

    /// Adds this session's traffic since the last report to the process metrics. Done in batches,
    /// because the process counters are shared by every session's core.
    pub fn report_metrics(&mut self) {
        let (now, before) = (self.counters, self.reported);
        let metrics = &self.shared.metrics;
        metrics
            .bytes_in
            .fetch_add(now.read_bytes - before.read_bytes, Ordering::Relaxed);
        metrics
            .messages_in
            .fetch_add(now.read_msg - before.read_msg, Ordering::Relaxed);
        metrics
            .bytes_out
            .fetch_add(now.write_bytes - before.write_bytes, Ordering::Relaxed);
        metrics
            .messages_out
            .fetch_add(now.write_msg - before.write_msg, Ordering::Relaxed);
        self.reported = now;
        self.events_since_report = 0;
    }

    /// The earliest of the keep-alive deadline, the partial-packet deadline and the end of a
    /// rate-limit pause.
    fn next_deadline(&self) -> Option<Instant> {
        let keep_alive = self.keep_alive.map(|ka| self.last_packet_at + ka);
        let partial = self
            .partial_since
            .map(|since| since + self.limits.partial_packet_timeout);
        [keep_alive, partial, self.resume_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// The timer fired: end a pause, or close for silence (160) or a packet that never completes.
    fn on_deadline(&mut self) -> Result<Flow, CloseReason> {
        let now = Instant::now();
        // The timer fires at least once per keep-alive period: a good moment to return the
        // memory of a burst that is over.
        shrink_when_idle(&mut self.client_in, &mut self.client_chunk);
        shrink_when_idle(&mut self.upstream_in, &mut self.upstream_chunk);
        self.report_metrics();
        if self.resume_at.is_some_and(|at| at <= now) {
            self.resume_at = None;
            // Time spent paused by the proxy is not the client's silence.
            self.last_packet_at = now;
            return self.process_client();
        }
        if self
            .keep_alive
            .is_some_and(|ka| self.last_packet_at + ka <= now)
        {
            return Err(CloseReason::new(CloseCode::KeepAliveTimeout));
        }
        if self
            .partial_since
            .is_some_and(|since| since + self.limits.partial_packet_timeout <= now)
        {
            return Err(CloseReason::with_detail(
                CloseCode::KeepAliveTimeout,
                "a packet was not completed in time",
            ));
        }
        Ok(Flow::Continue)
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
            let written = self.to_client.len() as u64;
            self.shared
                .metrics
                .bytes_out
                .fetch_add(written, Ordering::Relaxed);
            clear_and_shrink(&mut self.to_client);
        }
        Ok(())
    }

    /// Handles every complete frame from the client.
    fn process_client(&mut self) -> Result<Flow, CloseReason> {
        if self.resume_at.is_some() {
            return Ok(Flow::Continue);
        }
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
            if header.first_byte >> 4 == PacketType::Publish as u8 {
                match self.rate_pause(frame.len()) {
                    Ok(None) => {}
                    Ok(Some(pause)) => {
                        // Leave this PUBLISH (and what follows) unread until the bucket refills.
                        self.resume_at = Some(Instant::now() + pause);
                        break Ok(Flow::Continue);
                    }
                    Err(reason) => break Err(reason),
                }
            }
            consumed += frame.len();
            match self.client_packet(header.first_byte, frame, header.header_len) {
                Ok(Flow::Continue) => {}
                other => break other,
            }
        };
        if consumed > 0 {
            self.last_packet_at = Instant::now();
        }
        self.client_in = input;
        self.client_in.advance(consumed);
        // Bytes of an incomplete packet must not wait forever (slowloris).
        self.partial_since = match (
            self.client_in.is_empty() || self.resume_at.is_some(),
            self.partial_since,
        ) {
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, since) if consumed > 0 => since.map(|_| Instant::now()),
            (false, since) => since,
        };
        result
    }

    /// Takes a PUBLISH's tokens: `None` to go on, the pause until the buckets refill, or the
    /// close under `on_rate_exceeded: disconnect`.
    fn rate_pause(&mut self, frame_len: usize) -> Result<Option<Duration>, CloseReason> {
        let mut pause = take(&self.publish_bucket, 1).err();
        if let Some(org_bucket) = &self.org_bucket {
            pause = pause.max(take(org_bucket, 1).err());
        }
        if let Some(byte_bucket) = &self.byte_bucket {
            pause =
                pause.max(take(byte_bucket, u32::try_from(frame_len).unwrap_or(u32::MAX)).err());
        }
        let Some(pause) = pause else { return Ok(None) };
        let org = &self.principal.org;
        self.shared.metrics.limit(&org.id, "publish_rate");
        let now = Instant::now();
        if self
            .last_limit_log
            .is_none_or(|at| now.duration_since(at) >= LIMIT_LOG_INTERVAL)
        {
            self.last_limit_log = Some(now);
            info!(org = %org.id, pause_ms = pause.as_millis() as u64, "publish rate limit reached");
        }
        if org.on_rate_exceeded == OnRateExceeded::Disconnect {
            return Err(
                CloseReason::with_detail(CloseCode::ClosedByServer, "rate limit exceeded").v5(0x96),
            );
        }
        Ok(Some(pause))
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
        if publish.payload.len() > self.principal.org.limits.max_payload_bytes {
            return Err(CloseReason::with_detail(
                CloseCode::MessageTooLarge,
                format!(
                    "payload of {} bytes, limit {}",
                    publish.payload.len(),
                    self.principal.org.limits.max_payload_bytes
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
        let span = tracing::debug_span!("publish", topic = %topic, qos = publish.qos, decision = tracing::field::Empty);
        if let Err(reason) = self.principal.check_publish(topic) {
            span.record("decision", reason.number());
            let topic = topic.to_owned();
            return self.refuse_publish(&publish, &topic, reason);
        }
        span.record("decision", "allow");
        let mut first_byte = first_byte;
        if self.principal.org.strip_retained {
            first_byte &= !0x01;
        }
        let mut after_topic = &body[publish.after_topic.clone()];
        let downgrade = self.principal.org.quickstart && publish.qos > 0;
        if downgrade {
            // Quickstart forwards at QoS 0; the packet id in front of the rest goes away.
            first_byte &= 0b1111_0001;
            after_topic = &after_topic[2..];
        }
        if let (Some(packet_id), false) = (publish.packet_id, downgrade) {
            if self.inflight.len() >= self.limits.max_inflight
                && !self.inflight.contains(&packet_id)
            {
                self.shared
                    .metrics
                    .limit(&self.principal.org.id, "inflight");
                return Err(CloseReason::with_detail(
                    CloseCode::InvalidData,
                    format!(
                        "more than {} unacknowledged QoS 1/2 messages",
                        self.limits.max_inflight
                    ),
                )
                .v5(0x93));
            }
            self.inflight.insert(packet_id);
        }
        let parts: [&[u8]; 2] = if alias_known_upstream {
            [&[], &[]]
        } else {
            self.rewrite.to_broker(topic).ok_or_else(|| {
                CloseReason::with_detail(
                    CloseCode::NotAuthorized,
                    "topic outside the client's namespace",
                )
            })?
        };
        // A W3C trace context from an MQTT 5 client continues through the proxy's own span.
        let traceparent =
            (self.version.is_v5() && !downgrade && crate::telemetry::tracing_enabled())
                .then(|| find_traceparent(body, &publish))
                .flatten();
        match traceparent.and_then(|parent| crate::telemetry::continue_trace(&span, parent)) {
            Some(own) => {
                let properties = parse_properties(
                    publish_properties(body, &publish),
                    PropertyContext::PublishFromClient,
                )
                .map_err(|e| e.close_reason(false))?;
                let properties: Vec<Property<'_>> = properties
                    .into_iter()
                    .map(|property| match property.value {
                        PropertyValue::Pair(TRACEPARENT, _) => Property {
                            id: property.id,
                            value: PropertyValue::Pair(TRACEPARENT, &own),
                        },
                        _ => property,
                    })
                    .collect();
                encode_publish_with_properties(
                    &mut self.to_upstream,
                    first_byte,
                    &parts,
                    &publish,
                    &properties,
                    body,
                );
            }
            None => encode_publish(&mut self.to_upstream, first_byte, &parts, after_topic),
        }
        if !alias_known_upstream {
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
        // Quickstart refuses without closing: the WIoTP SDKs' devices subscribe to their commands
        // on every connect, and quickstart has no commands.
        let keeps_connection = gateway || self.principal.org.quickstart;
        if !keeps_connection && self.principal.org.on_violation == OnViolation::Disconnect {
            return Err(reason);
        }
        let org = &self.principal.org.id;
        self.shared
            .metrics
            .denial(org, reason.detail.as_deref().unwrap_or("not authorized"));
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
        let (device_type, device_id) = parse_iot2(topic)
            .and_then(|parsed| parsed.device())
            .unwrap_or(("", ""));
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
        self.shared.monitor.send(vec![Publication {
            topic: notify_topic,
            payload: notification.to_string().into(),
            retain: false,
        }]);
    }

    fn client_subscribe(&mut self, first_byte: u8, body: &[u8]) -> Result<(), CloseReason> {
        let subscribe = parse_subscribe(first_byte, body, self.version).map_err(filter_error)?;
        if subscribe.filters.len() > self.limits.max_filters_per_subscribe {
            return Err(CloseReason::with_detail(
                CloseCode::TooManySubscriptions,
                format!(
                    "more than {} filters in one SUBSCRIBE",
                    self.limits.max_filters_per_subscribe
                ),
            ));
        }
        let span = tracing::debug_span!(
            "subscribe",
            filters = subscribe.filters.len(),
            refused = tracing::field::Empty
        );
        let _entered = span.enter();
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
        if self.subscriptions.len() + added > self.max_subscriptions() {
            return Err(CloseReason::with_detail(
                CloseCode::TooManySubscriptions,
                format!("limit {}", self.max_subscriptions()),
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
            let options = if self.principal.org.quickstart {
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
        let refused = verdicts.iter().filter(|verdict| verdict.is_some()).count();
        span.record("refused", refused);
        if refused > 0 {
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
        self.client_unsubscribes.insert(unsubscribe.packet_id);
        Ok(())
    }

    /// The policy changed: is this session still allowed, and are its subscriptions? Limits and
    /// groups of the new policy apply from here on.
    fn reevaluate(&mut self) -> Result<(), CloseReason> {
        self.policy_generation = self.shared.policy_generation.load(Ordering::Acquire);
        let policy = self.shared.policy.load_full();
        self.principal = self.principal.revalidate(&policy)?;
        (self.publish_bucket, self.byte_bucket, self.org_bucket) =
            buckets(&self.principal, &self.shared);
        let revoked: Vec<Box<str>> = self
            .subscriptions
            .iter()
            .filter(|filter| self.principal.check_subscribe(filter).is_err())
            .cloned()
            .collect();
        if revoked.is_empty() {
            return Ok(());
        }
        let gateway = self.principal.identity.class == ClientClass::Gateway;
        if !gateway && self.principal.org.on_violation == OnViolation::Disconnect {
            return Err(CloseReason::with_detail(
                CloseCode::ClosedByAdministrator,
                "a subscription is no longer allowed",
            ));
        }
        // An id of none of the UNSUBSCRIBEs waiting for an answer, the client's or the proxy's:
        // the broker answers in order, so the first UNSUBACK of a proxy id is the proxy's even if
        // the client picks the same id later. Counting down from the top stays clear of the ids
        // clients usually use.
        let Some(packet_id) = (1..=u16::MAX).rev().find(|id| {
            !self.proxy_unsubscribes.contains(id) && !self.client_unsubscribes.contains(id)
        }) else {
            return Err(CloseReason::with_detail(
                CloseCode::ClosedByAdministrator,
                "a subscription is no longer allowed",
            ));
        };
        let rewritten: Vec<[&[u8]; 3]> = revoked
            .iter()
            .filter_map(|filter| {
                let [head, rest] = self.rewrite.to_broker(filter)?;
                Some([self.share_prefix.as_bytes(), head, rest])
            })
            .collect();
        let filters: Vec<&[&[u8]]> = rewritten.iter().map(|parts| &parts[..]).collect();
        encode_unsubscribe(
            &mut self.to_upstream,
            self.upstream_version,
            packet_id,
            &[],
            &filters,
        );
        self.proxy_unsubscribes.insert(packet_id);
        for filter in &revoked {
            self.subscriptions.remove(filter);
            info!(filter = %filter, "subscription revoked by a policy edit");
            if gateway {
                let reason =
                    CloseReason::with_detail(CloseCode::NotAuthorized, "revoked by a policy edit");
                self.notify(Request::Subscribe, filter, &reason);
            }
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
            PacketType::Unsuback => {
                let packet_id = leading_packet_id(body);
                if !self.proxy_unsubscribes.remove(&packet_id) {
                    self.client_unsubscribes.remove(&packet_id);
                    self.to_client.extend_from_slice(frame);
                }
                Ok(())
            }
            PacketType::Puback | PacketType::Pubrec | PacketType::Pubcomp => {
                // The broker completed (or refused) one of the client's QoS 1/2 PUBLISHes.
                let packet_id =
                    check_ack(kind, body, self.upstream_version).map_err(broker_fault)?;
                let refused = body.get(2).is_some_and(|code| *code >= 0x80);
                if kind != PacketType::Pubrec || refused {
                    self.inflight.remove(&packet_id);
                }
                self.to_client.extend_from_slice(frame);
                Ok(())
            }
            PacketType::Pingresp => {
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

/// The packet identifier at the start of an acknowledgement's body (0 if it is too short).
fn leading_packet_id(body: &[u8]) -> u16 {
    body.get(..2)
        .map_or(0, |id| u16::from_be_bytes([id[0], id[1]]))
}

fn broker_fault(error: CodecError) -> CloseReason {
    CloseReason::with_detail(
        CloseCode::ClosedByServer,
        format!("invalid data from the broker: {error}"),
    )
}

/// Makes room for a read of `chunk` bytes and says how much room there is.
fn reserve_read_room(buf: &mut BytesMut, chunk: usize) -> usize {
    if buf.capacity() - buf.len() < chunk / 2 {
        buf.reserve(chunk.max(buf.len()));
    }
    buf.capacity() - buf.len()
}

/// Gives back a read buffer that grew during a burst, once it is empty.
fn shrink_when_idle(buf: &mut BytesMut, chunk: &mut usize) {
    if buf.is_empty() && buf.capacity() > 2 * READ_BUFFER_BYTES {
        *buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
        *chunk = READ_BUFFER_BYTES;
    }
}

fn clear_and_shrink(buf: &mut BytesMut) {
    if buf.capacity() > SHRINK_ABOVE_BYTES {
        *buf = BytesMut::new();
    } else {
        buf.clear();
    }
}
