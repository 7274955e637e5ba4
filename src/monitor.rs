//! The control connection: one connection to the broker, of the proxy's own, that publishes what
//! the proxy says itself (status messages, notifications, ledger entries) at QoS 0, in order,
//! without loss while the broker comes and goes.
//!
//! Sessions hand [`Publication`]s to [`Monitor::send`]. They wait in an intake queue bounded in
//! count and in bytes: when it is full, the oldest waiting message is dropped, counted and
//! logged, so a wedged broker costs a bounded amount of memory. The control task writes waiting
//! messages in batches and follows each batch with a PINGREQ: the broker handles one
//! connection's packets in order, so its PINGRESP proves the batch was processed, and only then
//! is the batch forgotten. A connection that breaks or stalls before that is redialled and the
//! batch is written again: a duplicate is possible, a loss is not (short of the queue
//! overflowing). Every write has a deadline ([`CONTROL_WRITE_TIMEOUT`]).
//!
//! The task knows nothing of what it publishes. On its first connection it can run a
//! [`Recovery`]: rounds of reading the retained messages of exact topics (subscribe, collect up
//! to a sentinel, unsubscribe), each round's topics chosen by the recovery's closure from what
//! the earlier rounds found, and then queue what the closure makes of them (see `ledger`). Only
//! filters without wildcards are used, since some brokers (RabbitMQ 3.x) deliver retained
//! messages to no other.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use crate::codec::{
    decode_frame_header, encode_connect, encode_publish, encode_subscribe, encode_unsubscribe,
    parse_publish, Connect, ProtocolVersion, Will,
};
use crate::ledger::Step;
use crate::metrics::MonitorMetrics;
use crate::profile::Publication;
use crate::retained::RetainedRecord;
use crate::upstream::{handshake, Dial, UpstreamError};

/// Keep-alive of the control connection, in seconds.
const CONTROL_KEEP_ALIVE_SECS: u16 = 30;
/// The longest a write to the broker may take before the connection counts as broken.
pub const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most messages written before waiting for the broker's PINGRESP.
const MAX_BATCH: usize = 512;
/// Packet id of the recovery SUBSCRIBE and UNSUBSCRIBE.
const RECOVERY_PACKET_ID: u16 = 1;
/// Largest retained message read back by a recovery, in bytes.
const MAX_RECOVERY_PACKET_BYTES: usize = 64 * 1024;
/// Filters in one recovery SUBSCRIBE.
const FILTERS_PER_SUBSCRIBE: usize = 64;
/// Retained messages a recovery reads back, at most.
const MAX_RECOVERED: usize = 1_000_000;
/// How long a recovery (every round) may take before the connection is redialled and it starts again.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// First and longest wait between redials.
const REDIAL_MIN: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(5);

/// A recovery's next step, given the round (from 0) and every retained message (topic,
/// payload) found in the earlier rounds: more exact topics to read, or what to publish.
pub type Settle = Box<dyn FnMut(usize, &[(String, Vec<u8>)]) -> Step + Send>;

/// A one-time read of retained messages when the control connection first comes up.
pub struct Recovery {
    /// A topic of the proxy's own, subscribed with each round's topics and published (not
    /// retained) once they are acknowledged: the broker delivers it after every retained
    /// message of those subscriptions.
    pub sentinel: String,
    /// Chooses each round's topics, and finally what to publish. Called again from round 0 when
    /// a recovery is interrupted and starts over on a new connection.
    pub settle: Settle,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery")
            .field("sentinel", &self.sentinel)
            .finish_non_exhaustive()
    }
}

/// How the control connection presents itself.
#[derive(Debug)]
pub struct ControlConfig {
    /// Its client ID (unique per process, or it would take another process's connection over).
    pub client_id: String,
    /// The will the broker publishes when the connection dies without DISCONNECT.
    pub will: Option<Publication>,
    /// Published first on every new connection (before anything queued).
    pub greeting: Vec<Publication>,
    /// The recovery to run on the first connection.
    pub recovery: Option<Recovery>,
    /// Messages the intake queue holds, at most.
    pub queue_limit: usize,
    /// Bytes (topics and payloads) the intake queue holds, at most.
    pub queue_bytes: usize,
    /// Where the retained messages published are noted, for replay to wildcard subscribers
    /// (only on brokers that do not deliver retained messages to them).
    pub retained: Option<Arc<RetainedRecord>>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Publication>,
    bytes: usize,
    closed: bool,
}

#[derive(Debug)]
struct Intake {
    queue: Mutex<Queue>,
    wake: Notify,
    limit: usize,
    bytes_limit: usize,
    metrics: MonitorMetrics,
    retained: Option<Arc<RetainedRecord>>,
    /// Messages accepted so far, and messages confirmed or dropped so far.
    accepted: watch::Sender<u64>,
    settled: watch::Sender<u64>,
}

impl Intake {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Each update is a push or a pop with its byte count; a poisoned queue is consistent.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn settle(&self, count: u64) {
        if count > 0 {
            self.settled.send_modify(|settled| *settled += count);
        }
    }
}

/// The sessions' handle on the control connection.
#[derive(Debug, Clone)]
pub struct Monitor {
    intake: Arc<Intake>,
}

impl Monitor {
    /// Starts the control connection task.
    pub fn spawn<D: Dial>(
        dialer: Arc<D>,
        config: ControlConfig,
        metrics: MonitorMetrics,
    ) -> Monitor {
        let intake = Arc::new(Intake {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            limit: config.queue_limit.max(1),
            bytes_limit: config.queue_bytes.max(1),
            metrics,
            retained: config.retained,
            accepted: watch::channel(0).0,
            settled: watch::channel(0).0,
        });
        let control = Control {
            dialer,
            client_id: config.client_id,
            will: config.will,
            greeting: config.greeting,
            recovery: config.recovery,
            intake: intake.clone(),
            in_flight: Vec::new(),
        };
        tokio::spawn(control.run());
        Monitor { intake }
    }

    /// Queues publications, in order. Never waits: when the queue is full, the oldest waiting
    /// messages make room.
    pub fn send(&self, publications: Vec<Publication>) {
        let intake = &self.intake;
        let mut dropped = 0u64;
        let accepted;
        {
            let mut queue = intake.lock();
            if queue.closed {
                return;
            }
            if let Some(record) = &intake.retained {
                record.record(&publications);
            }
            accepted = publications.len() as u64;
            for publication in publications {
                queue.bytes += publication.size();
                queue.items.push_back(publication);
                while queue.items.len() > intake.limit
                    || (queue.bytes > intake.bytes_limit && queue.items.len() > 1)
                {
                    if let Some(oldest) = queue.items.pop_front() {
                        queue.bytes -= oldest.size();
                        dropped += 1;
                    }
                }
            }
        }
        intake.accepted.send_modify(|count| *count += accepted);
        if dropped > 0 {
            intake.metrics.dropped.inc_by(dropped);
            intake.settle(dropped);
            let total = intake.metrics.dropped.get();
            // Logged at each power of two, so a long outage logs a few lines, not millions.
            if (total - dropped..total).any(|n| (n + 1).is_power_of_two()) {
                warn!(
                    dropped = total,
                    "status queue full while the broker is away: oldest messages dropped"
                );
            }
        }
        intake.wake.notify_one();
    }

    /// Resolves once every message handed over so far was confirmed by the broker or dropped.
    pub async fn flushed(&self) {
        let target = *self.intake.accepted.borrow();
        let mut settled = self.intake.settled.subscribe();
        let _ = settled.wait_for(|settled| *settled >= target).await;
    }

    /// A future that resolves once every message handed over before this call was confirmed by
    /// the broker or dropped (later messages do not hold it up).
    pub fn confirmed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let target = *self.intake.accepted.borrow();
        let mut settled = self.intake.settled.subscribe();
        async move {
            let _ = settled.wait_for(|settled| *settled >= target).await;
        }
    }

    /// Stops accepting messages; the task ends once it has sent what is queued.
    pub fn close(&self) {
        self.intake.lock().closed = true;
        self.intake.wake.notify_one();
    }

    /// Whether the control connection is up.
    pub fn is_connected(&self) -> bool {
        self.intake.metrics.upstream_up.get() == 1
    }
}

struct Control<D: Dial> {
    dialer: Arc<D>,
    client_id: String,
    will: Option<Publication>,
    greeting: Vec<Publication>,
    recovery: Option<Recovery>,
    intake: Arc<Intake>,
    /// Messages written and not yet confirmed, oldest first: written again after a redial.
    in_flight: Vec<Publication>,
}

/// Why a connection ended.
enum Stop {
    /// The intake is closed and empty: the process is exiting.
    Finished,
    /// The broker closed the connection.
    ClosedByBroker,
    /// Anything else: an I/O error, a stall, a bad packet.
    Broken(String),
}

/// Writes with the control connection's deadline.
async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), Stop> {
    match tokio::time::timeout(
        CONTROL_WRITE_TIMEOUT,
        crate::transport::write_flushed(stream, bytes),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(Stop::Broken(error.to_string())),
        Err(_) => Err(Stop::Broken("a write to the broker stalled".into())),
    }
}

impl<D: Dial> Control<D> {
    async fn run(mut self) {
        let mut wait = REDIAL_MIN;
        loop {
            match self.connect().await {
                Ok(stream) => {
                    wait = REDIAL_MIN;
                    self.intake.metrics.upstream_up.set(1);
                    let stop = self.serve(stream).await;
                    self.intake.metrics.upstream_up.set(0);
                    match stop {
                        Stop::Finished => return,
                        Stop::ClosedByBroker => warn!(
                            client_id = %self.client_id,
                            "the broker closed the control connection; if this repeats, another \
                             process may be using the same control client ID"
                        ),
                        Stop::Broken(reason) => {
                            debug!(%reason, "control connection broken; redialling")
                        }
                    }
                }
                Err(error) => debug!(%error, "control connection failed"),
            }
            if self.finished() {
                return;
            }
            // Messages keep arriving in the intake queue while the broker is away.
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(REDIAL_MAX);
        }
    }

    /// The intake is closed and nothing is left to send.
    fn finished(&self) -> bool {
        let queue = self.intake.lock();
        queue.closed && queue.items.is_empty() && self.in_flight.is_empty()
    }

    async fn connect(&mut self) -> Result<D::Stream, UpstreamError> {
        let mut stream = self.dialer.dial().await?;
        let will = self.will.as_ref().map(|will| Will {
            properties: Vec::new(),
            topic: &will.topic,
            payload: &will.payload,
            qos: 0,
            retain: will.retain,
        });
        let connect = Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: CONTROL_KEEP_ALIVE_SECS,
            properties: Vec::new(),
            client_id: &self.client_id,
            will,
            username: self.dialer.username(),
            password: self.dialer.password(),
        };
        let mut out = BytesMut::new();
        encode_connect(&mut out, &connect);
        let mut buf = BytesMut::with_capacity(64);
        let header = handshake(&mut stream, &out, &mut buf).await?;
        let code = buf.get(header.header_len + 1).copied().unwrap_or(0xFF);
        if code != 0 {
            warn!(code, "broker refused the control connection");
            return Err(UpstreamError::NotConnack);
        }
        Ok(stream)
    }

    /// Takes up to `room` waiting messages from the intake, oldest first.
    fn take_waiting(&self, room: usize) -> Vec<Publication> {
        let mut queue = self.intake.lock();
        let count = room.min(queue.items.len());
        let batch: Vec<Publication> = queue.items.drain(..count).collect();
        queue.bytes -= batch.iter().map(Publication::size).sum::<usize>();
        batch
    }

    async fn serve(&mut self, mut stream: D::Stream) -> Stop {
        let mut out = BytesMut::new();
        let mut inbound = BytesMut::with_capacity(64);
        // The greeting goes before anything else, on every connection.
        for publication in &self.greeting {
            encode_publish(
                &mut out,
                0x30 | u8::from(publication.retain),
                &[publication.topic.as_bytes()],
                &publication.payload,
            );
        }
        if !out.is_empty() {
            if let Err(stop) = write_all(&mut stream, &out).await {
                return stop;
            }
        }
        if let Some(mut recovery) = self.recovery.take() {
            match tokio::time::timeout(
                RECOVERY_TIMEOUT,
                recover(&mut stream, &mut inbound, &mut recovery),
            )
            .await
            {
                Ok(Ok(publications)) => {
                    if let Some(record) = &self.intake.retained {
                        record.record(&publications);
                    }
                    // Recovery output goes before anything queued since: it is older news.
                    let mut queue = self.intake.lock();
                    let count = publications.len() as u64;
                    for publication in publications.into_iter().rev() {
                        queue.bytes += publication.size();
                        queue.items.push_front(publication);
                    }
                    drop(queue);
                    self.intake
                        .accepted
                        .send_modify(|accepted| *accepted += count);
                }
                Ok(Err(stop)) => {
                    self.recovery = Some(recovery);
                    return stop;
                }
                Err(_) => {
                    self.recovery = Some(recovery);
                    return Stop::Broken("recovery did not finish in time".into());
                }
            }
        }
        let mut pings_outstanding = 0usize;
        // Whether `in_flight` went out on this connection (a redial writes it again).
        let mut batch_written = false;
        let mut idle =
            tokio::time::interval(Duration::from_secs(u64::from(CONTROL_KEEP_ALIVE_SECS) / 2));
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        idle.reset();
        loop {
            if self.in_flight.is_empty() {
                self.in_flight = self.take_waiting(MAX_BATCH);
            }
            // A batch goes out only when no PINGREQ is unanswered, so the PINGRESP that brings the
            // count back to zero answers the batch's own PINGREQ.
            if !self.in_flight.is_empty() && !batch_written && pings_outstanding == 0 {
                out.clear();
                for publication in &self.in_flight {
                    encode_publish(
                        &mut out,
                        0x30 | u8::from(publication.retain),
                        &[publication.topic.as_bytes()],
                        &publication.payload,
                    );
                }
                out.extend_from_slice(&[0xC0, 0x00]);
                pings_outstanding += 1;
                batch_written = true;
                if let Err(stop) = write_all(&mut stream, &out).await {
                    return stop;
                }
            }
            if self.in_flight.is_empty() && self.finished() {
                let _ = write_all(&mut stream, &[0xE0, 0x00]).await;
                return Stop::Finished;
            }
            tokio::select! {
                () = self.intake.wake.notified(), if self.in_flight.is_empty() => {}
                read = stream.read_buf(&mut inbound) => {
                    match read {
                        Ok(0) => return Stop::ClosedByBroker,
                        Err(error) => return Stop::Broken(error.to_string()),
                        Ok(_) => {}
                    }
                    loop {
                        let header = match decode_frame_header(&inbound, 1024) {
                            Ok(Some(header)) if inbound.len() >= header.frame_len() => header,
                            Ok(_) => break,
                            Err(error) => return Stop::Broken(error.to_string()),
                        };
                        let _ = inbound.split_to(header.frame_len());
                        if header.first_byte == 0xD0 {
                            pings_outstanding = pings_outstanding.saturating_sub(1);
                            if pings_outstanding == 0 && batch_written {
                                let confirmed = self.in_flight.len() as u64;
                                self.in_flight.clear();
                                batch_written = false;
                                self.intake.metrics.published.inc_by(confirmed);
                                self.intake.settle(confirmed);
                            }
                        }
                    }
                }
                _ = idle.tick() => {
                    if pings_outstanding > 1 {
                        return Stop::Broken("two keep-alive periods without an answer".into());
                    }
                    pings_outstanding += 1;
                    if let Err(stop) = write_all(&mut stream, &[0xC0, 0x00]).await {
                        return stop;
                    }
                }
            }
        }
    }
}

/// Runs `recovery`'s rounds on `stream` and returns what it finally publishes.
async fn recover<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    inbound: &mut BytesMut,
    recovery: &mut Recovery,
) -> Result<Vec<Publication>, Stop> {
    let mut found = Vec::new();
    for round in 0.. {
        match (recovery.settle)(round, &found) {
            Step::Done(publications) => return Ok(publications),
            Step::Read(topics) => {
                read_retained(stream, inbound, &topics, &recovery.sentinel, &mut found).await?;
            }
        }
    }
    Ok(Vec::new())
}

/// Subscribes to `topics` and `sentinel` (exact topics, in SUBSCRIBEs of at most
/// [`FILTERS_PER_SUBSCRIBE`]), publishes `sentinel` once every SUBACK is in, and adds every
/// message delivered before it to `found`. Unsubscribes again afterwards.
async fn read_retained<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    inbound: &mut BytesMut,
    topics: &[String],
    sentinel: &str,
    found: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), Stop> {
    let mut filters: Vec<&str> = topics.iter().map(String::as_str).collect();
    filters.push(sentinel);
    let chunks: Vec<&[&str]> = filters.chunks(FILTERS_PER_SUBSCRIBE).collect();
    let mut out = BytesMut::new();
    for chunk in &chunks {
        let parts: Vec<[&[u8]; 1]> = chunk.iter().map(|filter| [filter.as_bytes()]).collect();
        let request: Vec<(&[&[u8]], u8)> = parts.iter().map(|p| (&p[..], 0u8)).collect();
        encode_subscribe(
            &mut out,
            ProtocolVersion::V311,
            RECOVERY_PACKET_ID,
            &[],
            &request,
        );
    }
    write_all(stream, &out).await?;
    let mut subacks_missing = chunks.len();
    'read: loop {
        match stream.read_buf(inbound).await {
            Ok(0) => return Err(Stop::ClosedByBroker),
            Err(error) => return Err(Stop::Broken(error.to_string())),
            Ok(_) => {}
        }
        loop {
            let header = match decode_frame_header(inbound, MAX_RECOVERY_PACKET_BYTES) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(error) => return Err(Stop::Broken(error.to_string())),
            };
            if inbound.len() < header.frame_len() {
                inbound.reserve(header.frame_len() - inbound.len());
                break;
            }
            let frame = inbound.split_to(header.frame_len());
            match header.first_byte >> 4 {
                // Every subscription is in place: the sentinel follows the retained messages.
                9 if subacks_missing > 0 => {
                    subacks_missing -= 1;
                    if subacks_missing == 0 {
                        out.clear();
                        encode_publish(&mut out, 0x30, &[sentinel.as_bytes()], b"sentinel");
                        write_all(stream, &out).await?;
                    }
                }
                3 => {
                    let body = &frame[header.header_len..];
                    if let Ok(publish) =
                        parse_publish(header.first_byte, body, ProtocolVersion::V311, false)
                    {
                        if publish.topic == sentinel && subacks_missing == 0 {
                            break 'read;
                        }
                        if found.len() < MAX_RECOVERED && publish.topic != sentinel {
                            found.push((publish.topic.to_owned(), body[publish.payload].to_vec()));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out.clear();
    for chunk in &chunks {
        let parts: Vec<[&[u8]; 1]> = chunk.iter().map(|filter| [filter.as_bytes()]).collect();
        let request: Vec<&[&[u8]]> = parts.iter().map(|p| &p[..]).collect();
        encode_unsubscribe(
            &mut out,
            ProtocolVersion::V311,
            RECOVERY_PACKET_ID,
            &[],
            &request,
        );
    }
    write_all(stream, &out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::memory::DuplexDialer;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    fn publication(n: usize) -> Publication {
        Publication {
            topic: format!("t/{n}"),
            payload: vec![0u8; 10].into(),
            retain: false,
        }
    }

    fn config(queue_limit: usize, queue_bytes: usize) -> ControlConfig {
        ControlConfig {
            client_id: "control".into(),
            will: None,
            greeting: Vec::new(),
            recovery: None,
            queue_limit,
            queue_bytes,
            retained: None,
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_count_and_bytes_while_the_broker_is_away() {
        let (brokers, _held) = mpsc::unbounded_channel();
        // The broker never answers the CONNECT: nothing leaves the queue.
        let metrics = MonitorMetrics::default();
        let monitor = Monitor::spawn(
            Arc::new(DuplexDialer {
                brokers,
                pipe_bytes: 64 * 1024,
            }),
            config(100, 1_000),
            metrics.clone(),
        );
        monitor.send((0..1000).map(publication).collect());
        let queue = monitor.intake.lock();
        assert!(
            queue.items.len() <= 100 && queue.bytes <= 1_000,
            "{}",
            queue.items.len()
        );
        assert_eq!(queue.items.back().map(|p| p.topic.as_str()), Some("t/999"));
        drop(queue);
        assert!(metrics.dropped.get() >= 900);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_broker_is_redialled_and_the_batch_is_sent_again() {
        let (brokers, mut dialled) = mpsc::unbounded_channel();
        let monitor = Monitor::spawn(
            Arc::new(DuplexDialer {
                brokers,
                pipe_bytes: 64 * 1024,
            }),
            config(100, 100_000),
            MonitorMetrics::default(),
        );
        monitor.send(vec![publication(1)]);
        // First broker: accepts the connection, then neither reads nor answers again.
        let mut first = dialled.recv().await.unwrap();
        let mut buf = BytesMut::new();
        first.read_buf(&mut buf).await.unwrap();
        first.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        // Second broker, once the first stayed silent for two keep-alive periods: it gets the
        // unconfirmed batch again.
        let mut second = tokio::time::timeout(Duration::from_secs(60), dialled.recv())
            .await
            .expect("redialled after the write deadline")
            .unwrap();
        let mut seen = BytesMut::new();
        second.read_buf(&mut seen).await.unwrap();
        second.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        loop {
            if seen.windows(3).any(|w| w == b"t/1") {
                break;
            }
            second.read_buf(&mut seen).await.unwrap();
        }
        drop(first);
    }
}
