//! The bridge loop: client ⇄ broker for an established session.
//!
//! Each read fills a reusable buffer; every complete frame in it is checked and either copied
//! unchanged into the outgoing buffer of the other side or, for PUBLISH, SUBSCRIBE and
//! UNSUBSCRIBE, re-framed with the rewritten topic in front of the untouched rest. Nothing is
//! allocated per forwarded PUBLISH: the buffers grow to the working-set size once and are
//! reused.
//!
//! The loop waits on everything at once: both reads, both writes, its one timer and its mailbox.
//! No write is awaited on its own, so a peer that stops reading freezes nothing: keep-alive,
//! takeover, shutdown and policy edits still act at once. A side whose outgoing buffer is full
//! is simply not read from (back-pressure), so memory stays bounded, and a write that makes no
//! progress for `limits.write_timeout` closes the session.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::info;

use super::downgrade::upstream_version;
use super::downgrade::{self, Downgrade};
use super::packet_ids::PacketIds;
use super::{ClientStream, Context};
use crate::codec::{
    check_ack, check_disconnect, decode_frame_header, encode_ack, encode_publish,
    encode_publish_parts, encode_publish_with_properties, encode_suback, encode_subscribe,
    encode_unsubscribe, filter_matches, for_each_property, packet_type, parse_properties,
    parse_publish, parse_suback, parse_subscribe, parse_unsubscribe, publish_properties,
    put_varint, varint_len, CodecError, PacketType, Property, PropertyContext, PropertyValue,
    ProtocolVersion, PublishView,
};
use crate::coord::{Command, SessionControl, TenantBucket};
use crate::limits::{refusal_log_budget, TokenBucket};
use crate::names::{escape, unescape};
use crate::profile::{Counters, Profile, RateAction, Request, SessionLimits};
use crate::refusal::{Cause, Refusal};
use crate::rewrite::{slices, Part, RewriteError, TopicMap};
use crate::share::{Member, ShareEvent};
use crate::telemetry::TRACEPARENT;
use crate::upstream::{Dial, READ_BUFFER_BYTES};

/// How often a session logs that it hit a rate limit, at most.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Loop turns between two reports of a session's traffic to the process metrics.
const METRICS_REPORT_EVERY: u32 = 64;
/// The most a single read asks for, in bytes: a busy connection's read size doubles up to this.
const MAX_READ_CHUNK: usize = 64 * 1024;
/// Largest packet accepted from the broker, in bytes (the broker is trusted, but bounded).
const MAX_BROKER_PACKET_BYTES: usize = 16 * 1024 * 1024;
/// Outgoing bytes above which neither side is read until the writes catch up. One read adds at
/// most [`MAX_READ_CHUNK`] (and the topic rewrite's growth) on top.
const OUTPUT_HIGH_WATER_BYTES: usize = 128 * 1024;
/// Outgoing buffers larger than this after a burst are released, in bytes.
const SHRINK_ABOVE_BYTES: usize = 256 * 1024;

thread_local! {
    /// Where a session reads when nothing waits in its own buffer: one per worker thread, so an
    /// idle session holds no read buffer. Only the bytes of an incomplete frame are copied into
    /// the session's buffer.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_READ_CHUNK].into_boxed_slice());
}

/// What the session agreed with the client and the broker at CONNECT.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// Largest packet from the client (the Maximum Packet Size announced to MQTT 5 clients).
    pub max_packet_bytes: usize,
    /// The client's own Maximum Packet Size (MQTT 5).
    pub client_max_packet: Option<usize>,
    /// The broker's Topic Alias Maximum, which the client was told.
    pub topic_alias_maximum: u16,
    /// Unacknowledged QoS 1/2 PUBLISHes from the client (the Receive Maximum it was told).
    pub max_inflight: usize,
    /// The client did not set Request Problem Information to 0: acknowledgements may carry a
    /// reason string [MQTT-3.1.2-29].
    pub problem_information: bool,
    /// The client's own Receive Maximum (MQTT 5; 65,535 when it set none): its QoS 1/2
    /// deliveries not yet completed. An MQTT 5 broker keeps to it; for a 3.1.1 broker the proxy
    /// does ([`Downgrade`]).
    pub client_receive_maximum: u16,
}

/// A client topic alias.
#[derive(Debug)]
struct Alias {
    /// The topic, in client form; its capacity is reused when the alias is set again.
    topic: String,
    /// Whether the broker knows the alias (it does not if the PUBLISH that set it was refused).
    upstream: bool,
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

/// The refusal for a topic or filter that has no broker form.
fn rewrite_refusal(error: RewriteError, filter: bool) -> Refusal {
    match error {
        RewriteError::Outside => Refusal::with_detail(
            Cause::NotAuthorized,
            if filter {
                "filter outside the client's namespace"
            } else {
                "topic outside the client's namespace"
            },
        ),
        RewriteError::TooLong | RewriteError::TooDeep => {
            let refusal = Refusal::with_detail(
                Cause::InvalidTopic,
                if error == RewriteError::TooLong {
                    "longer than 65535 bytes with the broker prefix"
                } else {
                    "too many levels with the broker prefix"
                },
            );
            if filter {
                refusal.v5(0x8F)
            } else {
                refusal
            }
        }
    }
}

/// The refusal for invalid data from the broker.
fn broker_fault(error: CodecError) -> Refusal {
    Refusal::with_detail(
        Cause::ServerClosed,
        format!("invalid data from the broker: {error}"),
    )
}

/// What processing a batch of client packets asks for next.
enum Flow {
    Continue,
    /// The client sent DISCONNECT: forward it and end normally.
    Disconnected,
}

/// What one turn of the loop ends with.
enum Turn {
    /// A command from the mailbox.
    Command(Command),
    /// The timer fired.
    Timer,
    /// The turn made as much progress as it may in one go; go round again.
    Again,
    /// The client sent DISCONNECT.
    Disconnected,
    /// The session ends.
    Failed(Refusal),
}

/// Rounds of reads and writes one turn makes before it lets the loop re-arm its timer.
const ROUNDS_PER_TURN: usize = 16;

/// One side's outgoing bytes.
#[derive(Debug, Default)]
struct Outgoing {
    buf: BytesMut,
    /// Bytes were written and not flushed yet.
    unflushed: bool,
    /// Since when a write has been waiting for the peer without any progress.
    stalled_since: Option<Instant>,
}

impl Outgoing {
    fn pending(&self) -> bool {
        !self.buf.is_empty() || self.unflushed
    }

    /// One step of writing: some bytes, or the flush once every byte is written. `Ready(Ok(n))`
    /// is progress (`n` bytes left the buffer, 0 for a flush). A write that waits starts the
    /// stall clock (the only clock read on this path); `started` says that it just did.
    fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut W,
        cx: &mut TaskContext<'_>,
        started: &mut bool,
    ) -> Poll<io::Result<usize>> {
        let mut written = 0;
        if !self.buf.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, &self.buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.buf.advance(n);
                    self.unflushed = true;
                    self.stalled_since = None;
                    written = n;
                    if !self.buf.is_empty() {
                        return Poll::Ready(Ok(n));
                    }
                    if self.buf.capacity() > SHRINK_ABOVE_BYTES {
                        self.buf = BytesMut::new();
                    }
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return self.waiting(started),
            }
        }
        // Every byte is written: flush them (TLS and WebSocket hold bytes until then; for TCP
        // this is immediate).
        match Pin::new(stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.unflushed = false;
                self.stalled_since = None;
                Poll::Ready(Ok(written))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            // The bytes are out of the buffer: that is progress, the flush goes on next time.
            Poll::Pending if written > 0 => Poll::Ready(Ok(written)),
            Poll::Pending => self.waiting(started),
        }
    }

    /// A write waits for the peer: the stall clock starts, unless it runs already.
    fn waiting(&mut self, started: &mut bool) -> Poll<io::Result<usize>> {
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
            *started = true;
        }
        Poll::Pending
    }
}

/// One established session's two connections and its state.
pub struct Bridge<P: Profile, D: Dial, C> {
    context: Arc<Context<P, D>>,
    pub(super) client: C,
    pub(super) upstream: D::Stream,
    client_in: BytesMut,
    upstream_in: BytesMut,
    to_upstream: Outgoing,
    to_client: Outgoing,
    /// The client's protocol version.
    pub version: ProtocolVersion,
    upstream_version: ProtocolVersion,
    /// Who the client is, as the profile sees it.
    pub principal: P::Principal,
    topics: TopicMap,
    tenant: Arc<str>,
    limits: SessionLimits,
    negotiated: Negotiated,
    /// Byte and message counts.
    pub counters: Counters,
    keep_alive: Option<Duration>,
    /// When the last complete packet arrived (keep-alive counts packets, not bytes).
    last_packet_at: Instant,
    /// Since when an incomplete packet waits in the read buffer (slowloris).
    partial_since: Option<Instant>,
    /// Reading the client is paused by a rate limit until then.
    resume_at: Option<Instant>,
    /// Whether the client is left unread because output is full.
    client_held: bool,
    /// This turn's writes already waited once for the runtime's next look at the sockets.
    writes_deferred: bool,
    /// Deliveries from the broker wait, unread, for the client's Receive Maximum to have room
    /// (downgraded sessions only).
    upstream_held: bool,
    /// A deadline may have moved earlier than the armed timer.
    deadlines_moved: bool,
    /// The waker the armed timer was last polled with (`None` since it was re-armed).
    timer_waker: Option<Waker>,
    /// Publishes per second of this connection.
    publish_bucket: TokenBucket,
    /// Payload bytes per second of this connection, when limited.
    byte_bucket: Option<TokenBucket>,
    /// Publishes per second of the whole tenant, when limited.
    tenant_bucket: Option<Arc<dyn TenantBucket>>,
    /// Subscription filters per second of this connection.
    subscribe_bucket: TokenBucket,
    /// Packet ids of the client's QoS 1/2 PUBLISHes the broker has not completed yet.
    inflight: PacketIds,
    /// When a rate limit was last logged (limit hits are logged at most once a second).
    last_limit_log: Option<Instant>,
    /// The counters already added to the process metrics.
    reported: Counters,
    /// Loop turns since the last metrics report.
    events_since_report: u32,
    /// Client topic aliases (MQTT 5), by alias number.
    aliases: HashMap<u16, Alias>,
    /// SUBSCRIBEs with filters the proxy refused itself, by packet id: the codes to merge into
    /// the broker's SUBACK (`None`: the broker's code).
    pending_subacks: HashMap<u16, Vec<Option<u8>>>,
    /// Granted wildcard subscriptions owed a replay of the proxy's retained statuses once the
    /// broker's SUBACK arrives (the broker does not deliver retained messages to wildcards), by
    /// packet id: each filter's position among the forwarded ones, and its broker form.
    pending_replays: HashMap<u16, Vec<(usize, String)>>,
    /// This session's membership of its shared-subscription group, when the proxy distributes
    /// the group's deliveries itself (see [`crate::share`]); joined at the first SUBSCRIBE.
    share: Option<Member>,
    /// UNSUBSCRIBEs the proxy sent itself (a policy edit revoked a subscription), by packet id:
    /// their UNSUBACKs are not the client's.
    proxy_unsubscribes: PacketIds,
    /// The client's UNSUBSCRIBEs the broker has not answered yet, by packet id: the proxy never
    /// picks one of these for its own, so the broker's in-order answers can be told apart.
    client_unsubscribes: PacketIds,
    /// Active subscription filters, in client form.
    subscriptions: HashSet<Box<str>>,
    /// QoS 2 deliveries the proxy dropped and acknowledged itself; the broker's PUBREL is answered here.
    upstream_local_qos2: PacketIds,
    /// QoS 2 publishes the proxy acknowledged itself (a QoS downgrade); the client's PUBREL is
    /// answered here.
    client_local_qos2: PacketIds,
    /// The client's QoS 2 publishes forwarded at QoS 1 to a broker without QoS 2, until the
    /// broker's PUBACK: then the client gets its PUBREC.
    qos2_at_broker: PacketIds,
    /// An MQTT 5 client over a 3.1.1 broker: the translation's state (`None` otherwise).
    downgrade: Option<Box<Downgrade>>,
}

/// The buckets of a connection's limits: publishes, payload bytes, the tenant's, subscriptions.
fn buckets<P: Profile, D: Dial>(
    context: &Context<P, D>,
    tenant: &str,
    limits: &SessionLimits,
) -> (
    TokenBucket,
    Option<TokenBucket>,
    Option<Arc<dyn TenantBucket>>,
    TokenBucket,
) {
    // A byte bucket must hold the largest message at once, or that message could never pass.
    let min_bytes = u32::try_from(limits.max_payload_bytes).unwrap_or(u32::MAX);
    (
        TokenBucket::new(limits.publish_rate, 1),
        limits
            .byte_rate
            .map(|rate| TokenBucket::new(rate, min_bytes)),
        limits
            .tenant_publish_rate
            .map(|rate| context.buckets.bucket(tenant, rate)),
        TokenBucket::new(limits.subscribe_rate, 1),
    )
}

impl<P: Profile, D: Dial, C: ClientStream> Bridge<P, D, C> {
    /// A bridge over an established pair of connections. `client_in` and `upstream_in` may hold
    /// bytes that arrived behind the CONNECT and the CONNACK.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        context: Arc<Context<P, D>>,
        client: C,
        client_in: BytesMut,
        upstream: D::Stream,
        upstream_in: BytesMut,
        version: ProtocolVersion,
        principal: P::Principal,
        topics: TopicMap,
        tenant: Arc<str>,
        limits: SessionLimits,
        negotiated: Negotiated,
        counters: Counters,
        keep_alive_secs: u16,
    ) -> Bridge<P, D, C> {
        let (publish_bucket, byte_bucket, tenant_bucket, subscribe_bucket) =
            buckets(&context, &tenant, &limits);
        // The connect phase's buffers are given back unless bytes wait in them.
        let (mut client_in, mut upstream_in) = (client_in, upstream_in);
        release_when_empty(&mut client_in);
        release_when_empty(&mut upstream_in);
        let broker_mqtt5 = context.capabilities.mqtt5;
        Bridge {
            context,
            client,
            upstream,
            client_in,
            upstream_in,
            to_upstream: Outgoing::default(),
            to_client: Outgoing::default(),
            version,
            upstream_version: upstream_version(version, broker_mqtt5),
            downgrade: (version.is_v5() && !broker_mqtt5)
                .then(|| Box::new(Downgrade::new(negotiated.client_receive_maximum))),
            qos2_at_broker: PacketIds::default(),
            principal,
            topics,
            tenant,
            limits,
            negotiated,
            counters,
            keep_alive: (keep_alive_secs > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500)),
            last_packet_at: Instant::now(),
            partial_since: None,
            resume_at: None,
            client_held: false,
            writes_deferred: false,
            upstream_held: false,
            deadlines_moved: false,
            timer_waker: None,
            publish_bucket,
            byte_bucket,
            tenant_bucket,
            subscribe_bucket,
            inflight: PacketIds::default(),
            last_limit_log: None,
            reported: Counters::default(),
            events_since_report: 0,
            aliases: HashMap::new(),
            pending_subacks: HashMap::new(),
            pending_replays: HashMap::new(),
            share: None,
            proxy_unsubscribes: PacketIds::default(),
            client_unsubscribes: PacketIds::default(),
            subscriptions: HashSet::new(),
            upstream_local_qos2: PacketIds::default(),
            client_local_qos2: PacketIds::default(),
        }
    }

    /// Whether a packet of `len` bytes may be sent to the client (its Maximum Packet Size).
    pub fn client_fits(&self, len: usize) -> bool {
        self.negotiated
            .client_max_packet
            .is_none_or(|max| len <= max)
    }

    /// Whether both outgoing buffers have room for what another read may bring.
    fn output_has_room(&self) -> bool {
        self.to_client.buf.len() < OUTPUT_HIGH_WATER_BYTES
            && self.to_upstream.buf.len() < OUTPUT_HIGH_WATER_BYTES
    }

    /// Runs until the session ends, and says why.
    pub async fn run(&mut self, control: &SessionControl) -> Refusal {
        // A policy edit that landed while this session was connecting has not reached it yet.
        if self.context.profile.stale(&self.principal) {
            if let Err(refusal) = self.reevaluate() {
                return refusal;
            }
        }
        // Bytes that arrived together with the CONNECT or the CONNACK.
        match self.process_client() {
            Ok(Flow::Continue) => {}
            Ok(Flow::Disconnected) => return Refusal::new(Cause::Normal),
            Err(refusal) => return refusal,
        }
        if let Err(refusal) = self.process_upstream() {
            return refusal;
        }
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
        // One timer for every deadline: keep-alive, a partly received packet, the end of a
        // rate-limit pause and stalled writes. It is re-armed when it fires or a deadline may
        // have moved earlier; one that moved later is found when the timer fires.
        let timer = tokio::time::sleep_until(self.next_deadline().unwrap_or(far_future));
        tokio::pin!(timer);
        loop {
            if self.deadlines_moved || timer.is_elapsed() {
                self.deadlines_moved = false;
                let next = self.next_deadline().unwrap_or(far_future);
                if timer.is_elapsed() || next < timer.deadline() {
                    timer.as_mut().reset(next);
                    // Re-armed, the timer needs a poll to hold a waker again.
                    self.timer_waker = None;
                }
            }
            let turn = std::future::poll_fn(|cx| self.poll_turn(cx, control, timer.as_mut())).await;
            let step = match turn {
                Turn::Command(Command::Close(refusal)) | Turn::Failed(refusal) => Err(refusal),
                Turn::Command(Command::Reevaluate) => self.reevaluate(),
                Turn::Timer => match self.on_deadline() {
                    Ok(Flow::Continue) => Ok(()),
                    Ok(Flow::Disconnected) => return Refusal::new(Cause::Normal),
                    Err(refusal) => Err(refusal),
                },
                Turn::Again => Ok(()),
                Turn::Disconnected => return Refusal::new(Cause::Normal),
            };
            if let Err(refusal) = step {
                return refusal;
            }
        }
    }

    /// One turn of the loop: the mailbox first, then rounds of reads and writes (each read's
    /// frames handled at once, so that their output goes out in the same round) until nothing
    /// moves, then the timer. Everything that returned `Pending` has registered the task's
    /// waker, so the turn is woken by whatever comes first.
    // Out of line, as are the rare paths below (subscribe, re-evaluation, shared groups,
    // replays): inlined into `run`, the loop cost about 290 more instructions per forwarded
    // PUBLISH under callgrind (BENCHMARKS.md, "Issue 11's merges").
    #[inline(never)]
    fn poll_turn(
        &mut self,
        cx: &mut TaskContext<'_>,
        control: &SessionControl,
        timer: Pin<&mut tokio::time::Sleep>,
    ) -> Poll<Turn> {
        if let Poll::Ready(command) = control.poll_next(cx) {
            return Poll::Ready(Turn::Command(command));
        }
        // A source that returned Pending has registered the waker and stays pending until it
        // fires: polling it again in the same turn would only cost time.
        let (mut upstream_write_waits, mut client_write_waits) = (false, false);
        let (mut client_read_waits, mut upstream_read_waits) = (false, false);
        let mut share_waits = false;
        for _ in 0..ROUNDS_PER_TURN {
            let mut progress = false;
            let room = self.output_has_room();
            if room == self.client_held {
                self.client_held = !room;
                self.deadlines_moved = true;
                if room {
                    // Time the proxy held the client back is not the client's silence.
                    self.last_packet_at = Instant::now();
                }
            }
            if room && self.resume_at.is_none() && !client_read_waits {
                match self.poll_client_read(cx) {
                    Poll::Ready(Ok(Flow::Continue)) => progress = true,
                    Poll::Ready(Ok(Flow::Disconnected)) => return Poll::Ready(Turn::Disconnected),
                    Poll::Ready(Err(refusal)) => return Poll::Ready(Turn::Failed(refusal)),
                    Poll::Pending => client_read_waits = true,
                }
            }
            if room && !share_waits {
                if let Some(member) = &mut self.share {
                    match member.events.poll_recv(cx) {
                        Poll::Ready(Some(event)) => {
                            self.share_event(event);
                            progress = true;
                        }
                        Poll::Ready(None) => {
                            return Poll::Ready(Turn::Failed(Refusal::with_detail(
                                Cause::ServerClosed,
                                "the shared subscription's broker connection ended",
                            )))
                        }
                        Poll::Pending => share_waits = true,
                    }
                }
            }
            if self.upstream_held && !self.downgrade.as_ref().is_some_and(|d| d.window_full()) {
                // The client acknowledged a delivery: what waited behind a full window goes on.
                self.upstream_held = false;
                if let Err(refusal) = self.process_upstream() {
                    return Poll::Ready(Turn::Failed(refusal));
                }
                progress = true;
            }
            if room && !upstream_read_waits && !self.upstream_held {
                match self.poll_upstream_read(cx) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(refusal)) => return Poll::Ready(Turn::Failed(refusal)),
                    Poll::Pending => upstream_read_waits = true,
                }
            }
            // The writes follow the reads, so that what a read produced leaves in the same round
            // (written before the reads, every packet took one round more: about 100
            // instructions, callgrind). A write asks for another round only when bytes are left
            // or the reads above waited for room.
            //
            // The first writes of a turn wait once: `yield_now` wakes the task only after the
            // runtime has looked at the sockets again (tokio defers that wake-up past its I/O
            // driver), so the other sessions' reads of this pass come first and whatever arrived
            // meanwhile goes out in the same writes. A write wakes its reader, and a reader on
            // this core preempts the proxy at the end of that system call: written last, the
            // writes cut the pass short less often. In the split layout the 10 → 10 fan-out
            // delivered 1.13× and 1.08× as much in two runs; QoS 0 and QoS 1 saturation and the
            // shared layout were unchanged (BENCHMARKS.md, "ninth session").
            if !self.writes_deferred && (self.to_upstream.pending() || self.to_client.pending()) {
                self.writes_deferred = true;
                let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                return Poll::Pending;
            }
            let mut stall_started = false;
            if self.to_upstream.pending() && !upstream_write_waits {
                match self
                    .to_upstream
                    .poll_write(&mut self.upstream, cx, &mut stall_started)
                {
                    Poll::Ready(Ok(_)) => progress |= self.to_upstream.pending() || !room,
                    Poll::Ready(Err(error)) => {
                        return Poll::Ready(Turn::Failed(Refusal::with_detail(
                            Cause::ServerClosed,
                            error.to_string(),
                        )))
                    }
                    Poll::Pending => upstream_write_waits = true,
                }
            }
            if self.to_client.pending() && !client_write_waits {
                match self
                    .to_client
                    .poll_write(&mut self.client, cx, &mut stall_started)
                {
                    Poll::Ready(Ok(written)) => {
                        self.counters.write_bytes += written as u64;
                        progress |= self.to_client.pending() || !room;
                    }
                    Poll::Ready(Err(error)) => {
                        return Poll::Ready(Turn::Failed(Refusal::with_detail(
                            Cause::ClientClosed,
                            error.to_string(),
                        )))
                    }
                    Poll::Pending => client_write_waits = true,
                }
            }
            self.deadlines_moved |= stall_started;
            if self.deadlines_moved {
                // A deadline may now come before the armed one: let the loop re-arm the timer.
                return Poll::Ready(Turn::Again);
            }
            if !progress {
                self.writes_deferred = false;
                // The armed timer keeps the waker of its last poll until it fires or is reset
                // (which clears `timer_waker`): polled again with the same waker it changes
                // nothing, for about 120 instructions a turn (callgrind).
                let registered = self
                    .timer_waker
                    .as_ref()
                    .is_some_and(|waker| waker.will_wake(cx.waker()));
                if registered && !timer.is_elapsed() {
                    return Poll::Pending;
                }
                return match timer.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Turn::Timer),
                    Poll::Pending => {
                        if !registered {
                            self.timer_waker = Some(cx.waker().clone());
                        }
                        Poll::Pending
                    }
                };
            }
            self.events_since_report += 1;
            if self.events_since_report >= METRICS_REPORT_EVERY {
                self.report_metrics();
            }
        }
        Poll::Ready(Turn::Again)
    }

    /// Reads client bytes and handles them: into the thread's scratch buffer when nothing waits
    /// in the session's own buffer, so that an idle session holds no read buffer, else behind
    /// what waits there.
    fn poll_client_read(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Flow, Refusal>> {
        let client_closed = |error: Option<io::Error>| match error {
            Some(error) => Refusal::with_detail(Cause::ClientClosed, error.to_string()),
            None => Refusal::new(Cause::ClientClosed),
        };
        if self.client_in.is_empty() {
            return SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut self.client).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(error)) => Poll::Ready(Err(client_closed(Some(error)))),
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                        Poll::Ready(Err(client_closed(None)))
                    }
                    Poll::Ready(Ok(())) => {
                        let input = buf.filled();
                        self.counters.read_bytes += input.len() as u64;
                        let now = Instant::now();
                        let (consumed, result) = self.process_client_frames(input, now);
                        self.client_in.extend_from_slice(&input[consumed..]);
                        self.after_client_frames(consumed, now);
                        Poll::Ready(result)
                    }
                }
            });
        }
        reserve_read_room(&mut self.client_in, self.negotiated.max_packet_bytes);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.client), cx, &mut self.client_in) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(error)) => Poll::Ready(Err(client_closed(Some(error)))),
            Poll::Ready(Ok(0)) => Poll::Ready(Err(client_closed(None))),
            Poll::Ready(Ok(read)) => {
                self.counters.read_bytes += read as u64;
                Poll::Ready(self.process_client())
            }
        }
    }

    /// Reads broker bytes and handles them, as [`Bridge::poll_client_read`] does for the client.
    fn poll_upstream_read(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Refusal>> {
        let broker_closed = |error: Option<io::Error>| match error {
            Some(error) => Refusal::with_detail(Cause::ServerClosed, error.to_string()),
            None => Refusal::with_detail(Cause::ServerClosed, "the broker closed the connection"),
        };
        if self.upstream_in.is_empty() {
            return SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut self.upstream).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(error)) => Poll::Ready(Err(broker_closed(Some(error)))),
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                        Poll::Ready(Err(broker_closed(None)))
                    }
                    Poll::Ready(Ok(())) => {
                        let input = buf.filled();
                        let (consumed, result) = self.process_upstream_frames(input);
                        self.upstream_in.extend_from_slice(&input[consumed..]);
                        Poll::Ready(result)
                    }
                }
            });
        }
        reserve_read_room(&mut self.upstream_in, MAX_BROKER_PACKET_BYTES);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.upstream), cx, &mut self.upstream_in)
        {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(error)) => Poll::Ready(Err(broker_closed(Some(error)))),
            Poll::Ready(Ok(0)) => Poll::Ready(Err(broker_closed(None))),
            Poll::Ready(Ok(_)) => Poll::Ready(self.process_upstream()),
        }
    }

    /// Hands both sides what is waiting for them, until `deadline` (the close). Errors end it
    /// quietly: the session is over either way.
    pub async fn flush_until(&mut self, deadline: Instant) {
        if !self.to_upstream.buf.is_empty() || self.to_upstream.unflushed {
            let written = tokio::time::timeout_at(
                deadline,
                crate::transport::write_flushed(&mut self.upstream, &self.to_upstream.buf),
            )
            .await;
            if matches!(written, Ok(Ok(()))) {
                self.to_upstream.buf.clear();
            }
        }
        if !self.to_client.buf.is_empty() || self.to_client.unflushed {
            let written = tokio::time::timeout_at(
                deadline,
                crate::transport::write_flushed(&mut self.client, &self.to_client.buf),
            )
            .await;
            if matches!(written, Ok(Ok(()))) {
                self.counters.write_bytes += self.to_client.buf.len() as u64;
                self.to_client.buf.clear();
            }
        }
    }

    /// Adds this session's traffic since the last report to the process metrics. Done in batches,
    /// because the process counters are shared by every session's core.
    pub fn report_metrics(&mut self) {
        let (now, before) = (self.counters, self.reported);
        let metrics = &self.context.metrics;
        metrics.bytes_in.inc_by(now.read_bytes - before.read_bytes);
        metrics.messages_in.inc_by(now.read_msg - before.read_msg);
        metrics
            .bytes_out
            .inc_by(now.write_bytes - before.write_bytes);
        metrics
            .messages_out
            .inc_by(now.write_msg - before.write_msg);
        self.reported = now;
        self.events_since_report = 0;
    }

    /// The earliest deadline: keep-alive (while the client is read), a partly received packet,
    /// the end of a rate-limit pause, and a stalled write.
    fn next_deadline(&self) -> Option<Instant> {
        let keep_alive = self
            .keep_alive
            .filter(|_| !self.client_held)
            .map(|ka| self.last_packet_at + ka);
        let partial = self
            .partial_since
            .map(|since| since + self.context.limits.partial_packet_timeout);
        let write_timeout = self.context.limits.write_timeout;
        let client_stall = self
            .to_client
            .stalled_since
            .map(|since| since + write_timeout);
        let upstream_stall = self
            .to_upstream
            .stalled_since
            .map(|since| since + write_timeout);
        [
            keep_alive,
            partial,
            self.resume_at,
            client_stall,
            upstream_stall,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The timer fired: end a pause, or close for silence (160), a packet that never completes,
    /// or a peer that stopped reading.
    fn on_deadline(&mut self) -> Result<Flow, Refusal> {
        let now = Instant::now();
        // The timer fires at least once per keep-alive period: a good moment to return the
        // memory of a burst that is over.
        release_when_empty(&mut self.client_in);
        release_when_empty(&mut self.upstream_in);
        self.report_metrics();
        let write_timeout = self.context.limits.write_timeout;
        if self
            .to_client
            .stalled_since
            .is_some_and(|since| since + write_timeout <= now)
        {
            return Err(Refusal::with_detail(
                Cause::ServerClosed,
                format!(
                    "the client read nothing for {} s",
                    write_timeout.as_secs_f64()
                ),
            ));
        }
        if self
            .to_upstream
            .stalled_since
            .is_some_and(|since| since + write_timeout <= now)
        {
            return Err(Refusal::with_detail(
                Cause::ServerClosed,
                format!(
                    "the broker read nothing for {} s",
                    write_timeout.as_secs_f64()
                ),
            ));
        }
        if self.resume_at.is_some_and(|at| at <= now) {
            self.resume_at = None;
            // Time spent paused by the proxy is not the client's silence.
            self.last_packet_at = now;
            return self.process_client();
        }
        if !self.client_held
            && self
                .keep_alive
                .is_some_and(|ka| self.last_packet_at + ka <= now)
        {
            return Err(Refusal::new(Cause::KeepAliveTimeout));
        }
        if self
            .partial_since
            .is_some_and(|since| since + self.context.limits.partial_packet_timeout <= now)
        {
            return Err(Refusal::with_detail(
                Cause::KeepAliveTimeout,
                "a packet was not completed in time",
            ));
        }
        Ok(Flow::Continue)
    }

    /// Handles every complete frame waiting in the session's client buffer.
    fn process_client(&mut self) -> Result<Flow, Refusal> {
        if self.resume_at.is_some() {
            return Ok(Flow::Continue);
        }
        // One clock read for the whole batch: its packets arrived together.
        let now = Instant::now();
        let input = std::mem::take(&mut self.client_in);
        let (consumed, result) = self.process_client_frames(&input, now);
        self.client_in = input;
        self.client_in.advance(consumed);
        self.after_client_frames(consumed, now);
        result
    }

    /// Handles every complete frame at the start of `input`, up to a rate-limit pause; returns
    /// the bytes consumed.
    fn process_client_frames(
        &mut self,
        input: &[u8],
        now: Instant,
    ) -> (usize, Result<Flow, Refusal>) {
        let mut consumed = 0;
        let result = loop {
            let rest = &input[consumed..];
            let header = match decode_frame_header(rest, self.negotiated.max_packet_bytes) {
                Ok(Some(header)) => header,
                Ok(None) => break Ok(Flow::Continue),
                Err(error) => break Err(Refusal::from_codec(&error, false)),
            };
            let Some(frame) = rest.get(..header.frame_len()) else {
                break Ok(Flow::Continue);
            };
            let pause = match header.first_byte >> 4 {
                kind if kind == PacketType::Publish as u8 => self.publish_pause(frame.len(), now),
                kind if kind == PacketType::Subscribe as u8
                    || kind == PacketType::Unsubscribe as u8 =>
                {
                    Ok(self.subscribe_pause(now))
                }
                _ => Ok(None),
            };
            match pause {
                Ok(None) => {}
                Ok(Some(pause)) => {
                    // Leave this packet (and what follows) unread until the bucket refills.
                    self.resume_at = Some(now + pause);
                    self.deadlines_moved = true;
                    break Ok(Flow::Continue);
                }
                Err(refusal) => break Err(refusal),
            }
            consumed += frame.len();
            match self.client_packet(header.first_byte, frame, header.header_len) {
                Ok(Flow::Continue) => {}
                other => break other,
            }
        };
        (consumed, result)
    }

    /// Keep-alive and slowloris bookkeeping once a batch of client bytes was handled and what
    /// was not consumed waits in the session's buffer.
    fn after_client_frames(&mut self, consumed: usize, now: Instant) {
        if consumed > 0 {
            self.last_packet_at = now;
        }
        // Bytes of an incomplete packet must not wait forever (slowloris).
        self.partial_since = match (
            self.client_in.is_empty() || self.resume_at.is_some(),
            self.partial_since,
        ) {
            (true, _) => None,
            (false, None) => {
                self.deadlines_moved = true;
                Some(now)
            }
            (false, since) if consumed > 0 => since.map(|_| now),
            (false, since) => since,
        };
    }

    /// Takes a PUBLISH's tokens: `None` to go on, the pause until the buckets refill, or the
    /// close when the profile says exceeding the rate disconnects. The connection's buckets are
    /// asked first and the tenant's is charged only when they agree; the connection's are
    /// charged only when the tenant's did: a PUBLISH held back costs nothing anywhere.
    fn publish_pause(
        &mut self,
        frame_len: usize,
        now: Instant,
    ) -> Result<Option<Duration>, Refusal> {
        let bytes = u32::try_from(frame_len).unwrap_or(u32::MAX);
        let mut pause = self.publish_bucket.wait(1, now);
        if let Some(byte_bucket) = &self.byte_bucket {
            pause = pause.max(byte_bucket.wait(bytes, now));
        }
        if pause.is_none() {
            if let Some(tenant_bucket) = &self.tenant_bucket {
                pause = tenant_bucket.try_take(1, now).err();
            }
        }
        let Some(pause) = pause else {
            self.publish_bucket.take(1, now);
            if let Some(byte_bucket) = &mut self.byte_bucket {
                byte_bucket.take(bytes, now);
            }
            return Ok(None);
        };
        self.context.metrics.limit(&self.tenant, "publish_rate");
        if self
            .last_limit_log
            .is_none_or(|at| now.duration_since(at) >= LIMIT_LOG_INTERVAL)
        {
            self.last_limit_log = Some(now);
            info!(org = %self.tenant, pause_ms = pause.as_millis() as u64, "publish rate limit reached");
        }
        if self.limits.on_rate_exceeded == RateAction::Disconnect {
            return Err(Refusal::with_detail(Cause::ServerClosed, "rate limit exceeded").v5(0x96));
        }
        Ok(Some(pause))
    }

    /// Whether a SUBSCRIBE or UNSUBSCRIBE must wait: the subscribe bucket is charged per filter
    /// once the packet is handled, and the next one waits while the bucket is in debt.
    fn subscribe_pause(&mut self, now: Instant) -> Option<Duration> {
        let pause = self.subscribe_bucket.wait(1, now)?;
        self.context.metrics.limit(&self.tenant, "subscribe_rate");
        Some(pause)
    }

    fn client_packet(
        &mut self,
        first_byte: u8,
        frame: &[u8],
        header_len: usize,
    ) -> Result<Flow, Refusal> {
        let body = &frame[header_len..];
        let kind =
            packet_type(first_byte, self.version).map_err(|e| Refusal::from_codec(&e, false))?;
        match kind {
            PacketType::Publish => self.client_publish(first_byte, body)?,
            PacketType::Subscribe => self.client_subscribe(first_byte, body)?,
            PacketType::Unsubscribe => self.client_unsubscribe(first_byte, body)?,
            PacketType::Puback | PacketType::Pubrec | PacketType::Pubcomp => {
                let packet_id = check_ack(kind, body, self.version)
                    .map_err(|e| Refusal::from_codec(&e, false))?;
                if let Some(downgrade) = self.downgrade.as_deref_mut() {
                    // A PUBREC goes on to PUBCOMP, unless its reason code refuses the message.
                    let ends =
                        kind != PacketType::Pubrec || body.get(2).is_some_and(|&c| c >= 0x80);
                    if ends {
                        downgrade.completed(packet_id);
                    }
                }
                match &self.share {
                    // Deliveries come from the group's distributor, and so go their acks.
                    Some(member) if kind == PacketType::Puback => member.ack(packet_id),
                    _ => self.ack_to_upstream(kind, packet_id, frame),
                }
            }
            PacketType::Pubrel => {
                let packet_id = check_ack(kind, body, self.version)
                    .map_err(|e| Refusal::from_codec(&e, false))?;
                if self.client_local_qos2.remove(&packet_id) {
                    // The QoS 2 flow ends here: its packet id is free again.
                    self.inflight.remove(&packet_id);
                    encode_ack(
                        &mut self.to_client.buf,
                        PacketType::Pubcomp,
                        self.version,
                        packet_id,
                        0,
                        None,
                    );
                } else {
                    self.ack_to_upstream(kind, packet_id, frame);
                }
            }
            PacketType::Pingreq => {
                if !body.is_empty() {
                    return Err(Refusal::from_codec(
                        &CodecError::BadLength("PINGREQ with a body"),
                        false,
                    ));
                }
                self.to_upstream.buf.extend_from_slice(frame);
            }
            PacketType::Disconnect => {
                let code = check_disconnect(body, self.version)
                    .map_err(|e| Refusal::from_codec(&e, false))?;
                match (&self.downgrade, code) {
                    (None, _) => self.to_upstream.buf.extend_from_slice(frame),
                    // "Disconnect with Will Message": a 3.1.1 broker publishes the will when
                    // the connection ends without DISCONNECT, so none is sent.
                    (Some(_), 0x04) => {}
                    (Some(_), _) => self.to_upstream.buf.extend_from_slice(&[0xE0, 0x00]),
                }
                return Ok(Flow::Disconnected);
            }
            PacketType::Connect => return Err(Refusal::protocol_error("second CONNECT")),
            PacketType::Auth => {
                return Err(Refusal::protocol_error(
                    "AUTH without an authentication method",
                ))
            }
            PacketType::Connack
            | PacketType::Suback
            | PacketType::Unsuback
            | PacketType::Pingresp => {
                return Err(Refusal::protocol_error(
                    "server-to-client packet from the client",
                ))
            }
        }
        Ok(Flow::Continue)
    }

    /// Writes a plain acknowledgement (no reason code) to the broker: one the proxy answers
    /// itself, or a client's that a 3.1.1 broker takes without its MQTT 5 parts.
    fn ack_upstream(&mut self, kind: PacketType, packet_id: u16) {
        encode_ack(
            &mut self.to_upstream.buf,
            kind,
            self.upstream_version,
            packet_id,
            0,
            None,
        );
    }

    /// Forwards the client's acknowledgement of a delivery: as it is, or without its MQTT 5
    /// reason code and properties to a 3.1.1 broker.
    fn ack_to_upstream(&mut self, kind: PacketType, packet_id: u16, frame: &[u8]) {
        if self.downgrade.is_some() {
            self.ack_upstream(kind, packet_id);
        } else {
            self.to_upstream.buf.extend_from_slice(frame);
        }
    }

    fn client_publish(&mut self, first_byte: u8, body: &[u8]) -> Result<(), Refusal> {
        let publish = parse_publish(first_byte, body, self.version, true)
            .map_err(|e| Refusal::from_codec(&e, false))?;
        self.counters.read_msg += 1;
        if publish.payload.len() > self.limits.max_payload_bytes {
            return Err(Refusal::with_detail(
                Cause::MessageTooLarge,
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
                (Some(alias), _) if alias > self.negotiated.topic_alias_maximum => {
                    return Err(Refusal::with_detail(
                        Cause::InvalidData,
                        "topic alias above the maximum",
                    )
                    .v5(0x94));
                }
                (Some(alias), true) => {
                    let known = self
                        .aliases
                        .get(&alias)
                        .ok_or_else(|| Refusal::protocol_error("unknown topic alias"))?;
                    (&known.topic, known.upstream)
                }
                (Some(alias), false) => {
                    let entry = self.aliases.entry(alias).or_insert_with(|| Alias {
                        topic: String::new(),
                        upstream: false,
                    });
                    // Clients often send the same topic with its alias every time: keep it.
                    if entry.topic != publish.topic {
                        entry.topic.clear();
                        entry.topic.push_str(publish.topic);
                        entry.upstream = false;
                    }
                    (publish.topic, entry.upstream)
                }
                (None, _) => (publish.topic, false),
            };
        let span = tracing::debug_span!("publish", topic = %topic, qos = publish.qos, decision = tracing::field::Empty);
        if let Err(refusal) = self.context.profile.check_publish(&self.principal, topic) {
            span.record("decision", self.context.profile.code(refusal.cause).number);
            let topic = topic.to_owned();
            return self.refuse_publish(&publish, &topic, refusal);
        }
        span.record("decision", "allow");
        if self.downgrade.is_some() {
            if let Err(refusal) = downgrade::check_publish(body, &publish) {
                let topic = topic.to_owned();
                return self.refuse_publish(&publish, &topic, refusal);
            }
        }
        if self.limits.refuse_retained && first_byte & 0x01 != 0 {
            let refusal =
                Refusal::with_detail(Cause::NotAuthorized, "retained messages are refused");
            // MQTT 5 was told Retain Available 0: a retained PUBLISH is then a protocol error
            // answered with DISCONNECT 0x9A [MQTT-3.3.1-8]. MQTT 3 has no such flag: refused alone.
            if self.version.is_v5() {
                return Err(refusal.v5(0x9A));
            }
            let topic = topic.to_owned();
            return self.refuse_publish(&publish, &topic, refusal.keeping_connection(None));
        }
        let mut first_byte = first_byte;
        if self.limits.strip_retained {
            first_byte &= !0x01;
        }
        let mut after_topic = &body[publish.after_topic.clone()];
        let broker_max_qos = self.context.capabilities.max_qos;
        // Forwarded at QoS 0 and acknowledged here: above the profile's maximum of 0, or to a
        // broker without acknowledgements.
        let downgrade =
            publish.qos > self.limits.max_qos || (publish.qos > 0 && broker_max_qos == 0);
        if downgrade {
            if publish.qos > self.limits.max_qos && self.limits.max_qos > 0 {
                return Err(Refusal::protocol_error("QoS above the maximum").v5(0x9B));
            }
            // Forwarded at QoS 0; the packet id in front of the rest goes away.
            first_byte &= 0b1111_0001;
            after_topic = &after_topic[2..];
        }
        // QoS 2 to a broker with QoS 1 only: forwarded at QoS 1, and the client's PUBREC waits
        // for the broker's PUBACK, so nothing the client was told is received can be lost.
        let via_qos1 = !downgrade && publish.qos == 2 && broker_max_qos < 2;
        if let (true, Some(packet_id)) = (via_qos1, publish.packet_id) {
            if self.client_local_qos2.contains(&packet_id) {
                // A copy of a message the broker has: the client did not see its PUBREC yet.
                encode_ack(
                    &mut self.to_client.buf,
                    PacketType::Pubrec,
                    self.version,
                    packet_id,
                    0,
                    None,
                );
                return Ok(());
            }
            if self.qos2_at_broker.contains(&packet_id) {
                // A copy of a message on its way: its PUBREC follows the broker's PUBACK.
                return Ok(());
            }
            first_byte = (first_byte & 0b1111_1001) | 0b0000_0010;
        }
        if let (Some(packet_id), false) = (publish.packet_id, downgrade) {
            if self.inflight.len() >= self.negotiated.max_inflight
                && !self.inflight.contains(&packet_id)
            {
                self.context.metrics.limit(&self.tenant, "inflight");
                return Err(Refusal::with_detail(
                    Cause::InvalidData,
                    format!(
                        "more than {} unacknowledged QoS 1/2 messages",
                        self.negotiated.max_inflight
                    ),
                )
                .v5(0x93));
            }
            self.inflight.insert(packet_id);
            if via_qos1 {
                self.qos2_at_broker.insert(packet_id);
            }
        }
        let broker_topic = if alias_known_upstream {
            [Cow::Borrowed(&[][..]), Cow::Borrowed(&[][..])]
        } else {
            self.topics
                .to_broker(topic)
                .map_err(|error| rewrite_refusal(error, false))?
        };
        let parts = slices(&broker_topic);
        if self.downgrade.is_some() {
            // MQTT 5 to 3.1.1: the same PUBLISH without its properties, the alias resolved.
            let packet_id = publish.packet_id.filter(|_| !downgrade);
            let payload = body.get(publish.payload.clone()).unwrap_or_default();
            encode_publish_parts(
                &mut self.to_upstream.buf,
                first_byte,
                &parts,
                packet_id,
                None,
                payload,
            );
            if downgrade {
                self.acknowledge_here(&publish, 0, None);
            }
            return Ok(());
        }
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
                .map_err(|e| Refusal::from_codec(&e, false))?;
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
                    &mut self.to_upstream.buf,
                    first_byte,
                    &parts,
                    &publish,
                    &properties,
                    body,
                );
            }
            None => encode_publish(&mut self.to_upstream.buf, first_byte, &parts, after_topic),
        }
        if !alias_known_upstream {
            if let Some(alias) = publish.topic_alias.and_then(|a| self.aliases.get_mut(&a)) {
                alias.upstream = true;
            }
        }
        if downgrade {
            self.acknowledge_here(&publish, 0, None);
        }
        Ok(())
    }

    /// Completes a client's QoS 1/2 flow in the proxy: PUBACK, or PUBREC (and later PUBCOMP).
    /// An MQTT 5 reason code of 0x80 or more ends a QoS 2 flow at the PUBREC.
    fn acknowledge_here(
        &mut self,
        publish: &PublishView<'_>,
        reason_code: u8,
        reason_string: Option<&str>,
    ) {
        let Some(packet_id) = publish.packet_id else {
            return;
        };
        let code = if self.version.is_v5() { reason_code } else { 0 };
        let kind = if publish.qos == 1 {
            PacketType::Puback
        } else {
            PacketType::Pubrec
        };
        encode_ack(
            &mut self.to_client.buf,
            kind,
            self.version,
            packet_id,
            code,
            reason_string,
        );
        if kind == PacketType::Pubrec && code < 0x80 {
            self.client_local_qos2.insert(packet_id);
        }
    }

    /// A PUBLISH the client may not make: close, or drop it and complete its QoS flow.
    fn refuse_publish(
        &mut self,
        publish: &PublishView<'_>,
        topic: &str,
        refusal: Refusal,
    ) -> Result<(), Refusal> {
        let code = self.refusal(Request::Publish, topic, &refusal)?;
        let reason = self.ack_reason(&refusal);
        self.acknowledge_here(publish, code, reason.as_deref());
        Ok(())
    }

    /// The reason string of an MQTT 5 acknowledgement of a refused request, when the refusal
    /// asks for one.
    fn ack_reason(&self, refusal: &Refusal) -> Option<String> {
        (self.version.is_v5() && refusal.reason_on_ack && self.negotiated.problem_information).then(
            || {
                self.context
                    .profile
                    .code(refusal.cause)
                    .reason_string(refusal)
            },
        )
    }

    /// What a refused request does: the close, when the refusal does not keep the connection;
    /// otherwise it is counted, logged (within the log budget), reported through the profile,
    /// and the reason code for the client's acknowledgement is returned.
    fn refusal(&mut self, request: Request, topic: &str, refusal: &Refusal) -> Result<u8, Refusal> {
        if !refusal.keeps_connection {
            return Err(refusal.clone());
        }
        let profile = &*self.context.profile;
        self.context.metrics.denial(&self.tenant, refusal.rule());
        if let Some(suppressed) = refusal_log_budget() {
            let code = profile.code(refusal.cause);
            info!(
                request = request.name(),
                topic,
                code = code.number,
                reason = %code.reason_string(refusal),
                suppressed,
                "operation refused"
            );
        }
        let publications = profile.refused(&self.principal, request, topic, refusal);
        if !publications.is_empty() {
            self.context.reporter.publish(publications);
        }
        Ok(if self.version.is_v5() {
            refusal.v5_ack()
        } else {
            0x80
        })
    }

    #[inline(never)]
    fn client_subscribe(&mut self, first_byte: u8, body: &[u8]) -> Result<(), Refusal> {
        let subscribe = parse_subscribe(first_byte, body, self.version)
            .map_err(|e| Refusal::from_filter_error(&e))?;
        let max_filters = self.context.limits.max_filters_per_subscribe;
        if subscribe.filters.len() > max_filters {
            return Err(Refusal::with_detail(
                Cause::TooManySubscriptions,
                format!("more than {max_filters} filters in one SUBSCRIBE"),
            ));
        }
        self.subscribe_bucket.charge(
            u32::try_from(subscribe.filters.len()).unwrap_or(u32::MAX),
            Instant::now(),
        );
        let span = tracing::debug_span!(
            "subscribe",
            filters = subscribe.filters.len(),
            refused = tracing::field::Empty
        );
        let _entered = span.enter();
        // For each filter: None to forward it, or the code the proxy answers itself.
        let mut verdicts: Vec<Option<u8>> = Vec::with_capacity(subscribe.filters.len());
        let mut first_reason: Option<String> = None;
        let subscription_identifier = self.downgrade.is_some()
            && downgrade::has_subscription_identifier(&subscribe.properties);
        for filter in &subscribe.filters {
            if self.downgrade.is_some() {
                if let Some((code, words)) =
                    downgrade::check_subscription(subscription_identifier, filter.options)
                {
                    verdicts.push(Some(code));
                    self.context.metrics.denial(&self.tenant, words);
                    if first_reason.is_none() && self.negotiated.problem_information {
                        first_reason = Some(words.to_owned());
                    }
                    if let Some(suppressed) = refusal_log_budget() {
                        info!(
                            request = "subscribe",
                            topic = filter.filter,
                            reason_code = code,
                            reason = words,
                            suppressed,
                            "operation refused"
                        );
                    }
                    continue;
                }
            }
            let checked = self
                .context
                .profile
                .check_subscribe(&self.principal, filter.filter)
                .and_then(|()| self.check_shared(filter.filter));
            match checked {
                Ok(()) => verdicts.push(None),
                Err(refusal) => {
                    verdicts.push(Some(self.refusal(
                        Request::Subscribe,
                        filter.filter,
                        &refusal,
                    )?));
                    if first_reason.is_none() {
                        first_reason = self.ack_reason(&refusal);
                    }
                }
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
            return Err(Refusal::with_detail(
                Cause::TooManySubscriptions,
                format!("limit {}", self.limits.max_subscriptions),
            ));
        }
        if allowed().next().is_none() {
            let codes: Vec<u8> = verdicts.iter().map(|v| v.unwrap_or(0x80)).collect();
            encode_suback(
                &mut self.to_client.buf,
                self.version,
                subscribe.packet_id,
                &codes,
                first_reason.as_deref(),
            );
            return Ok(());
        }
        let shared = self.topics.is_shared();
        let mut rewritten: Vec<([Part<'_>; 3], u8)> = Vec::with_capacity(verdicts.len());
        for filter in allowed() {
            let parts = self
                .topics
                .filter_to_broker(filter.filter)
                .map_err(|error| rewrite_refusal(error, true))?;
            let mut options = filter.options;
            // The client is granted what the profile and the broker deliver as such.
            let max_qos = self.limits.max_qos.min(self.context.capabilities.max_qos);
            if options & 0x03 > max_qos {
                options = (options & !0x03) | max_qos;
            }
            if self.downgrade.is_some() {
                options = downgrade::options_for_broker(options);
            }
            // No Local on a shared subscription is a protocol error [MQTT-3.8.3-4]; the client
            // did not ask for one, the proxy's mapping made it shared, so the flag goes.
            if shared && self.version.is_v5() {
                options &= !0x04;
            }
            rewritten.push((parts, options));
        }
        let rewritten: Vec<([&[u8]; 3], u8)> = rewritten
            .iter()
            .map(|(parts, options)| (slices(parts), *options))
            .collect();
        if self.distributed() {
            let filters: Vec<(String, u8)> = rewritten
                .iter()
                .map(|(parts, options)| {
                    (
                        String::from_utf8_lossy(&parts[1..].concat()).into_owned(),
                        options & 0x03,
                    )
                })
                .collect();
            let group = String::from_utf8_lossy(rewritten[0].0[0]).into_owned();
            if let (None, Some(shares)) = (&self.share, &self.context.shares) {
                self.share = Some(shares.join(&group));
            }
            if let Some(member) = &self.share {
                member.subscribe(subscribe.packet_id, filters);
            }
            for filter in allowed() {
                self.subscriptions.insert(filter.filter.into());
            }
            if verdicts.iter().any(Option::is_some) {
                self.pending_subacks.insert(subscribe.packet_id, verdicts);
            }
            return Ok(());
        }
        if self.context.retained.is_some() {
            let replays: Vec<(usize, String)> = rewritten
                .iter()
                .enumerate()
                .map(|(at, (parts, _))| {
                    let filter = String::from_utf8_lossy(&parts.concat()).into_owned();
                    // Matched against the record, which holds the proxy's own (unescaped) form.
                    (
                        at,
                        unescape(self.context.capabilities.escaped, &filter).into_owned(),
                    )
                })
                .filter(|(_, filter)| filter.contains(['+', '#']))
                .collect();
            if !replays.is_empty() {
                self.pending_replays.insert(subscribe.packet_id, replays);
            }
        }
        let filters: Vec<(&[&[u8]], u8)> = rewritten
            .iter()
            .map(|(parts, options)| (&parts[..], *options))
            .collect();
        encode_subscribe(
            &mut self.to_upstream.buf,
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

    #[inline(never)]
    fn client_unsubscribe(&mut self, first_byte: u8, body: &[u8]) -> Result<(), Refusal> {
        let unsubscribe = parse_unsubscribe(first_byte, body, self.version)
            .map_err(|e| Refusal::from_filter_error(&e))?;
        self.subscribe_bucket.charge(
            u32::try_from(unsubscribe.filters.len()).unwrap_or(u32::MAX),
            Instant::now(),
        );
        let mut rewritten: Vec<[Part<'_>; 3]> = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            rewritten.push(
                self.topics
                    .unsubscribe_to_broker(filter)
                    .map_err(|error| rewrite_refusal(error, true))?,
            );
        }
        let rewritten: Vec<[&[u8]; 3]> = rewritten.iter().map(slices).collect();
        if self.distributed() {
            if let Some(member) = &self.share {
                member.unsubscribe(
                    rewritten
                        .iter()
                        .map(|parts| String::from_utf8_lossy(&parts[1..].concat()).into_owned())
                        .collect(),
                );
            }
            for filter in &unsubscribe.filters {
                self.subscriptions.remove(*filter);
            }
            // The UNSUBACK is the proxy's: the broker never had these subscriptions.
            let mut packet = BytesMut::from(&unsubscribe.packet_id.to_be_bytes()[..]);
            if self.version.is_v5() {
                // No properties, and Success for every filter.
                packet.extend(std::iter::repeat_n(0u8, 1 + unsubscribe.filters.len()));
            }
            self.to_client.buf.extend_from_slice(&[0xB0]);
            put_varint(&mut self.to_client.buf, packet.len());
            self.to_client.buf.extend_from_slice(&packet);
            return Ok(());
        }
        let filters: Vec<&[&[u8]]> = rewritten.iter().map(|parts| &parts[..]).collect();
        encode_unsubscribe(
            &mut self.to_upstream.buf,
            self.upstream_version,
            unsubscribe.packet_id,
            &unsubscribe.properties,
            &filters,
        );
        for filter in &unsubscribe.filters {
            self.subscriptions.remove(*filter);
        }
        self.client_unsubscribes.insert(unsubscribe.packet_id);
        if let Some(downgrade) = self.downgrade.as_deref_mut() {
            downgrade.unsubscribed(unsubscribe.packet_id, unsubscribe.filters.len());
        }
        Ok(())
    }

    /// The policy changed: is this session still allowed, and are its subscriptions? Limits of
    /// the new policy apply from here on.
    #[inline(never)]
    fn reevaluate(&mut self) -> Result<(), Refusal> {
        let profile = self.context.profile.clone();
        self.principal = profile.reevaluate(&self.principal)?;
        self.limits = profile.limits(&self.principal);
        (
            self.publish_bucket,
            self.byte_bucket,
            self.tenant_bucket,
            self.subscribe_bucket,
        ) = buckets(&self.context, &self.tenant, &self.limits);
        let revoked: Vec<(Box<str>, Refusal)> = self
            .subscriptions
            .iter()
            .filter_map(|filter| {
                profile
                    .check_subscribe(&self.principal, filter)
                    .err()
                    .map(|refusal| (filter.clone(), refusal))
            })
            .collect();
        if revoked.is_empty() {
            return Ok(());
        }
        let no_longer_allowed =
            || Refusal::with_detail(Cause::Revoked, "a subscription is no longer allowed");
        if revoked.iter().any(|(_, refusal)| !refusal.keeps_connection) {
            return Err(no_longer_allowed());
        }
        // An id of none of the UNSUBSCRIBEs waiting for an answer, the client's or the proxy's:
        // the broker answers in order, so the first UNSUBACK of a proxy id is the proxy's even if
        // the client picks the same id later. Counting down from the top stays clear of the ids
        // clients usually use.
        let Some(packet_id) = (1..=u16::MAX).rev().find(|id| {
            !self.proxy_unsubscribes.contains(id) && !self.client_unsubscribes.contains(id)
        }) else {
            return Err(no_longer_allowed());
        };
        let rewritten: Vec<[Part<'_>; 3]> = revoked
            .iter()
            .filter_map(|(filter, _)| self.topics.filter_to_broker(filter).ok())
            .collect();
        let rewritten: Vec<[&[u8]; 3]> = rewritten.iter().map(slices).collect();
        if let Some(member) = &self.share {
            member.unsubscribe(
                rewritten
                    .iter()
                    .map(|parts| String::from_utf8_lossy(&parts[1..].concat()).into_owned())
                    .collect(),
            );
            for (filter, _) in &revoked {
                self.subscriptions.remove(filter);
            }
            return Ok(());
        }
        let filters: Vec<&[&[u8]]> = rewritten.iter().map(|parts| &parts[..]).collect();
        encode_unsubscribe(
            &mut self.to_upstream.buf,
            self.upstream_version,
            packet_id,
            &[],
            &filters,
        );
        self.proxy_unsubscribes.insert(packet_id);
        let revocation = Refusal::with_detail(Cause::NotAuthorized, "revoked by a policy edit");
        for (filter, _) in &revoked {
            self.subscriptions.remove(filter);
            info!(filter = %filter, "subscription revoked by a policy edit");
            let publications =
                profile.refused(&self.principal, Request::Subscribe, filter, &revocation);
            if !publications.is_empty() {
                self.context.reporter.publish(publications);
            }
        }
        Ok(())
    }

    /// Whether the proxy distributes this session's shared subscription itself: a scalable
    /// application on a broker without shared subscriptions.
    fn distributed(&self) -> bool {
        self.topics.is_shared()
            && !self.context.capabilities.shared_subscriptions
            && self.context.shares.is_some()
    }

    /// A filter whose broker form is a shared subscription, on a broker without them and not
    /// distributed by the proxy (a client's own `$share/GROUP/`): refused with a reason, since
    /// the broker would accept it as a plain topic and deliver nothing.
    fn check_shared(&self, filter: &str) -> Result<(), Refusal> {
        if self.context.capabilities.shared_subscriptions
            || self.distributed()
            || !(self.topics.is_shared() || filter.starts_with("$share/"))
        {
            return Ok(());
        }
        Err(Refusal::with_detail(
            Cause::NotAuthorized,
            "shared subscriptions are not available: the broker behind the proxy has none \
             (upstream.capabilities.shared_subscriptions is false)",
        )
        .keeping_connection(Some(0x9E))
        .with_reason_on_ack())
    }

    /// The answer to a SUBSCRIBE: the broker's (or the distributor's) codes for the forwarded
    /// filters, merged with the proxy's own refusals of that SUBSCRIBE.
    fn answer_subscribe(&mut self, packet_id: u16, granted: &[u8], reason: Option<&str>) {
        let reason = reason.filter(|_| self.version.is_v5() && self.negotiated.problem_information);
        match self.pending_subacks.remove(&packet_id) {
            Some(verdicts) => {
                let mut from_broker = granted.iter().copied();
                let codes: Vec<u8> = verdicts
                    .iter()
                    .map(|verdict| verdict.unwrap_or_else(|| from_broker.next().unwrap_or(0x80)))
                    .collect();
                encode_suback(
                    &mut self.to_client.buf,
                    self.version,
                    packet_id,
                    &codes,
                    reason,
                );
            }
            None => {
                encode_suback(
                    &mut self.to_client.buf,
                    self.version,
                    packet_id,
                    granted,
                    reason,
                );
            }
        }
    }

    /// What the group's distributor sent this session.
    #[inline(never)]
    fn share_event(&mut self, event: ShareEvent) {
        match event {
            ShareEvent::Suback {
                packet_id,
                codes,
                reason,
            } => {
                if let Some(reason) = &reason {
                    info!(packet_id, %reason, "shared subscription refused");
                }
                self.answer_subscribe(packet_id, &codes, reason.as_deref());
            }
            ShareEvent::Deliver {
                topic,
                payload,
                packet_id,
                dup,
            } => {
                let delivered = self.inject(&topic, &payload, packet_id, dup);
                if let (false, Some(packet_id), Some(member)) = (delivered, packet_id, &self.share)
                {
                    // Not for this client after all: the flow ends here, as for a drop.
                    member.ack(packet_id);
                }
            }
        }
    }

    /// Writes a delivery of the proxy's own to the client; `false` when the client may not or
    /// cannot receive it.
    #[inline(never)]
    fn inject(&mut self, topic: &str, payload: &[u8], packet_id: Option<u16>, dup: bool) -> bool {
        let (Some(parts), Some(rest)) =
            (self.topics.to_client(topic), self.topics.client_rest(topic))
        else {
            return false;
        };
        if !self
            .context
            .profile
            .may_deliver(&self.principal, &rest, payload)
        {
            return false;
        }
        let mut after_topic = Vec::with_capacity(payload.len() + 3);
        if let Some(packet_id) = packet_id {
            after_topic.extend_from_slice(&packet_id.to_be_bytes());
        }
        if self.version.is_v5() {
            after_topic.push(0);
        }
        after_topic.extend_from_slice(payload);
        let remaining = 2 + parts[0].len() + parts[1].len() + after_topic.len();
        if !self.client_fits(1 + varint_len(remaining) + remaining) {
            return false;
        }
        let first_byte = 0x30 | (u8::from(packet_id.is_some()) << 1) | (u8::from(dup) << 3);
        encode_publish(
            &mut self.to_client.buf,
            first_byte,
            &slices(&parts),
            &after_topic,
        );
        self.counters.write_msg += 1;
        true
    }

    /// The proxy's retained statuses matching the granted wildcard filters of a SUBSCRIBE, as
    /// retained QoS 0 PUBLISHes after its SUBACK. `granted` holds the broker's codes.
    #[inline(never)]
    fn replay_retained(&mut self, packet_id: u16, granted: &[u8]) {
        let (Some(replays), Some(record)) = (
            self.pending_replays.remove(&packet_id),
            self.context.retained.clone(),
        ) else {
            return;
        };
        for (at, filter) in replays {
            if granted.get(at).is_none_or(|code| *code >= 0x80) {
                continue;
            }
            for (topic, payload) in record.matching(&filter) {
                // The record holds the proxy's own form; the topic map expects the broker's.
                let topic = escape(self.context.capabilities.escaped, &topic);
                let (Some(parts), Some(rest)) = (
                    self.topics.to_client(&topic),
                    self.topics.client_rest(&topic),
                ) else {
                    continue;
                };
                if !self
                    .context
                    .profile
                    .may_deliver(&self.principal, &rest, &payload)
                {
                    continue;
                }
                let mut after_topic = Vec::with_capacity(payload.len() + 1);
                if self.version.is_v5() {
                    after_topic.push(0);
                }
                after_topic.extend_from_slice(&payload);
                let remaining = 2 + parts[0].len() + parts[1].len() + after_topic.len();
                if !self.client_fits(1 + varint_len(remaining) + remaining) {
                    continue;
                }
                encode_publish(&mut self.to_client.buf, 0x31, &slices(&parts), &after_topic);
                self.counters.write_msg += 1;
            }
        }
    }

    /// A SUBACK from the broker: merged with the proxy's own refusals when some filters of that
    /// SUBSCRIBE were answered here, and followed by the replay of retained statuses it is owed.
    #[inline(never)]
    fn broker_suback(&mut self, frame: &[u8], body: &[u8]) -> Result<(), Refusal> {
        if !self.pending_subacks.is_empty() || !self.pending_replays.is_empty() {
            let suback = parse_suback(body, self.upstream_version).map_err(broker_fault)?;
            let granted = suback.codes.to_vec();
            let packet_id = suback.packet_id;
            if self.pending_subacks.contains_key(&packet_id) {
                self.answer_subscribe(packet_id, &granted, None);
            } else if self.downgrade.is_some() {
                encode_suback(
                    &mut self.to_client.buf,
                    self.version,
                    packet_id,
                    &granted,
                    None,
                );
            } else {
                self.to_client.buf.extend_from_slice(frame);
            }
            self.replay_retained(packet_id, &granted);
            return Ok(());
        }
        if self.downgrade.is_some() {
            // MQTT 3.1.1's return codes are MQTT 5's reason codes; only the form changes.
            let suback = parse_suback(body, self.upstream_version).map_err(broker_fault)?;
            encode_suback(
                &mut self.to_client.buf,
                self.version,
                suback.packet_id,
                suback.codes,
                None,
            );
            return Ok(());
        }
        self.to_client.buf.extend_from_slice(frame);
        Ok(())
    }

    /// Handles every complete frame waiting in the session's broker buffer.
    fn process_upstream(&mut self) -> Result<(), Refusal> {
        let input = std::mem::take(&mut self.upstream_in);
        let (consumed, result) = self.process_upstream_frames(&input);
        self.upstream_in = input;
        self.upstream_in.advance(consumed);
        result
    }

    /// Handles every complete frame at the start of `input`; returns the bytes consumed.
    fn process_upstream_frames(&mut self, input: &[u8]) -> (usize, Result<(), Refusal>) {
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
            // A QoS 1/2 PUBLISH (type 3, QoS bits set) beyond a downgraded client's Receive
            // Maximum waits, and so does everything behind it, to keep the order.
            if header.first_byte >> 4 == 3
                && header.first_byte & 0x06 != 0
                && self.downgrade.as_ref().is_some_and(|d| d.window_full())
            {
                self.upstream_held = true;
                break Ok(());
            }
            consumed += frame.len();
            if let Err(refusal) = self.upstream_packet(header.first_byte, frame, header.header_len)
            {
                break Err(refusal);
            }
        };
        (consumed, result)
    }

    fn upstream_packet(
        &mut self,
        first_byte: u8,
        frame: &[u8],
        header_len: usize,
    ) -> Result<(), Refusal> {
        let body = &frame[header_len..];
        let kind = packet_type(first_byte, self.upstream_version).map_err(broker_fault)?;
        match kind {
            PacketType::Publish => self.deliver(first_byte, body),
            PacketType::Pubrel => {
                let packet_id =
                    check_ack(kind, body, self.upstream_version).map_err(broker_fault)?;
                if self.upstream_local_qos2.remove(&packet_id) {
                    self.ack_upstream(PacketType::Pubcomp, packet_id);
                } else {
                    self.to_client.buf.extend_from_slice(frame);
                }
                Ok(())
            }
            PacketType::Suback => self.broker_suback(frame, body),
            PacketType::Unsuback => {
                let packet_id = leading_packet_id(body);
                if !self.proxy_unsubscribes.remove(&packet_id) {
                    self.client_unsubscribes.remove(&packet_id);
                    match self.downgrade.as_deref_mut() {
                        Some(downgrade) => downgrade.unsuback(&mut self.to_client.buf, packet_id),
                        None => self.to_client.buf.extend_from_slice(frame),
                    }
                }
                Ok(())
            }
            PacketType::Puback | PacketType::Pubrec | PacketType::Pubcomp => {
                // The broker completed (or refused) one of the client's QoS 1/2 PUBLISHes.
                let packet_id =
                    check_ack(kind, body, self.upstream_version).map_err(broker_fault)?;
                // Checked for emptiness first: hashing the id costs the hot path of every QoS 1 PUBACK.
                if kind == PacketType::Puback
                    && !self.qos2_at_broker.is_empty()
                    && self.qos2_at_broker.remove(&packet_id)
                {
                    // The broker has the client's QoS 2 message: the client gets its PUBREC,
                    // and the flow ends with the client's PUBREL, answered here. An MQTT 5
                    // broker's refusal (0x80 or more) is passed on and ends the flow at once.
                    let code = body.get(2).copied().unwrap_or(0);
                    if code < 0x80 {
                        self.client_local_qos2.insert(packet_id);
                    } else {
                        self.inflight.remove(&packet_id);
                    }
                    encode_ack(
                        &mut self.to_client.buf,
                        PacketType::Pubrec,
                        self.version,
                        packet_id,
                        code,
                        None,
                    );
                    return Ok(());
                }
                let refused = body.get(2).is_some_and(|code| *code >= 0x80);
                if kind != PacketType::Pubrec || refused {
                    self.inflight.remove(&packet_id);
                }
                self.to_client.buf.extend_from_slice(frame);
                Ok(())
            }
            PacketType::Pingresp => {
                self.to_client.buf.extend_from_slice(frame);
                Ok(())
            }
            PacketType::Disconnect => {
                let code = check_disconnect(body, self.upstream_version).map_err(broker_fault)?;
                if code == 0x8E {
                    Err(Refusal::new(Cause::TakenOver))
                } else {
                    Err(Refusal::with_detail(
                        Cause::ServerClosed,
                        format!("the broker disconnected with 0x{code:02X}"),
                    ))
                }
            }
            _ => Err(Refusal::with_detail(
                Cause::ServerClosed,
                "unexpected packet from the broker",
            )),
        }
    }

    /// A PUBLISH from the broker: rewrite its topic to the client's form, or drop it (and complete
    /// the broker's QoS flow) when the client may not or cannot receive it.
    fn deliver(&mut self, first_byte: u8, body: &[u8]) -> Result<(), Refusal> {
        let publish =
            parse_publish(first_byte, body, self.upstream_version, false).map_err(broker_fault)?;
        if publish.topic.is_empty() {
            return Err(Refusal::with_detail(
                Cause::ServerClosed,
                "the broker used a topic alias",
            ));
        }
        let Some(rest) = self.topics.client_rest(publish.topic) else {
            self.drop_delivery(&publish);
            return Ok(());
        };
        let parts = [self.topics.client_strip().as_bytes(), rest.as_bytes()];
        // Under a prefix a client's `$` topic is an ordinary one at the broker, so a wildcard
        // subscription matches it there. [MQTT-4.7.2-1] says it must not: the delivery goes
        // ahead only if a subscription of the client matches it as a broker would.
        if parts[0].is_empty()
            && rest.starts_with('$')
            && !self.subscriptions.iter().any(|f| filter_matches(f, &rest))
        {
            self.drop_delivery(&publish);
            return Ok(());
        }
        let payload = body.get(publish.payload.clone()).unwrap_or_default();
        if !self
            .context
            .profile
            .may_deliver(&self.principal, &rest, payload)
        {
            self.drop_delivery(&publish);
            return Ok(());
        }
        let after_topic = &body[publish.after_topic.clone()];
        // Downgraded, the delivery gains an empty property list (one byte).
        let added = usize::from(self.downgrade.is_some());
        let remaining = 2 + parts[0].len() + parts[1].len() + after_topic.len() + added;
        if !self.client_fits(1 + varint_len(remaining) + remaining) {
            self.drop_delivery(&publish);
            return Ok(());
        }
        if let Some(downgrade) = self.downgrade.as_deref_mut() {
            encode_publish_parts(
                &mut self.to_client.buf,
                first_byte,
                &parts,
                publish.packet_id,
                Some(&[]),
                payload,
            );
            if let Some(packet_id) = publish.packet_id {
                downgrade.delivered(packet_id);
            }
        } else {
            encode_publish(&mut self.to_client.buf, first_byte, &parts, after_topic);
        }
        self.counters.write_msg += 1;
        Ok(())
    }

    fn drop_delivery(&mut self, publish: &PublishView<'_>) {
        let Some(packet_id) = publish.packet_id else {
            return;
        };
        let kind = if publish.qos == 1 {
            PacketType::Puback
        } else {
            self.upstream_local_qos2.insert(packet_id);
            PacketType::Pubrec
        };
        self.ack_upstream(kind, packet_id);
    }
}

/// The packet identifier at the start of an acknowledgement's body (0 if it is too short).
fn leading_packet_id(body: &[u8]) -> u16 {
    body.get(..2)
        .map_or(0, |id| u16::from_be_bytes([id[0], id[1]]))
}

/// Makes room in a buffer that holds part of a frame for the rest of it (as far as its header
/// tells, at most [`MAX_READ_CHUNK`] at once), or for [`READ_BUFFER_BYTES`].
fn reserve_read_room(buf: &mut BytesMut, max_frame: usize) {
    let rest_of_frame = match decode_frame_header(buf, max_frame) {
        Ok(Some(header)) => header.frame_len().saturating_sub(buf.len()),
        _ => 0,
    };
    let want = rest_of_frame.clamp(READ_BUFFER_BYTES, MAX_READ_CHUNK);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
}

/// Gives back a read buffer once it is empty: reads go to the thread's scratch buffer then.
fn release_when_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}
