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
//! The broker's refusals and every failure of the connection are logged in the broker's own
//! words (the CONNACK code and its meaning, the I/O error), counted in
//! `warden_upstream_refusals_total`, and kept for `/readyz` ([`Monitor::report`]). Redials back
//! off from [`REDIAL_MIN`] to [`REDIAL_MAX`], and the wait starts again from the minimum only
//! after a connection stayed up for [`STABLE_CONNECTION`], so a broker that accepts and then
//! drops the connection at once is not dialled ten times a second.
//!
//! Each time the connection comes up, the broker is probed on connections of its own
//! (`probe`), and what the probe contradicts in the declared capabilities is logged and
//! counted.
//!
//! Topics go to the broker with the characters it cannot take escaped (`names`), and the
//! topics a recovery reads back are unescaped, so the rest of the proxy never sees the escape.
//!
//! The task knows nothing of what it publishes. On its first connection it can run a
//! [`Recovery`]: rounds of reading the retained messages of exact topics (subscribe, collect up
//! to a sentinel, unsubscribe), each round's topics chosen by the recovery's closure from what
//! the earlier rounds found, and then queue what the closure makes of them (see `ledger`). Only
//! filters without wildcards are used, since some brokers (RabbitMQ 3.x) deliver retained
//! messages to no other.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::broker::CAPABILITIES;
use crate::broker::{Capabilities, EscapeSet};
use crate::codec::{
    decode_frame_header, encode_publish, encode_subscribe, encode_unsubscribe, parse_publish,
    ProtocolVersion, Will,
};
use crate::ledger::Step;
use crate::metrics::{CapabilityLabels, MonitorMetrics};
use crate::names::{escape, unescape};
use crate::probe::{probe, Probed};
use crate::profile::Publication;
use crate::retained::RetainedRecord;
use crate::upstream::{
    connack_label, connack_meaning, connect_own, failure_label, Dial, UpstreamError,
};

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
pub const REDIAL_MIN: Duration = Duration::from_millis(100);
/// Longest wait between redials.
pub const REDIAL_MAX: Duration = Duration::from_secs(5);
/// How long a connection must stay up before the redial wait starts again from [`REDIAL_MIN`].
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// The same failure is logged as a warning at most this often (every time at debug level).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

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
    /// What the broker is declared to support: its escape set applies to every topic and to
    /// the client ID, and the probe is checked against it.
    pub capabilities: Capabilities,
    /// Whether to probe the broker each time the connection comes up.
    pub probe: bool,
    /// Where the retained messages published are noted, for replay to wildcard subscribers
    /// (only on brokers that do not deliver retained messages to them).
    pub retained: Option<Arc<RetainedRecord>>,
}

/// What the control connection knows of the broker, for `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct BrokerReport {
    /// Whether the control connection is up.
    pub up: bool,
    /// The last failure, in the broker's words (kept after a reconnect, for the record).
    pub last_failure: Option<String>,
    /// Failed attempts since the connection was last up for [`STABLE_CONNECTION`].
    pub failures_in_a_row: u64,
    /// What the last probe saw.
    pub probed: Option<Probed>,
    /// Where the last probe contradicted the declaration.
    pub mismatches: Vec<String>,
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
    report: Mutex<BrokerReport>,
}

impl Intake {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Each update is a push or a pop with its byte count; a poisoned queue is consistent.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn report(&self) -> MutexGuard<'_, BrokerReport> {
        // Each update replaces fields whole; a poisoned report is consistent.
        self.report
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
            report: Mutex::new(BrokerReport::default()),
        });
        let escaped = config.capabilities.escaped;
        // The probe's own name: the client ID with anything but letters, digits, `-` and `_`
        // replaced, as it is a topic level too.
        let probe_name = config.probe.then(|| {
            config
                .client_id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        });
        let control = Control {
            dialer,
            client_id: escape(escaped, &config.client_id).into_owned(),
            escaped,
            capabilities: config.capabilities,
            probe_name,
            probing: Arc::new(AtomicBool::new(false)),
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

    /// What the control connection knows of the broker: whether it is up, its last failure and
    /// the last probe.
    pub fn report(&self) -> BrokerReport {
        self.intake.report().clone()
    }
}

/// A failed attempt to bring the control connection up or keep it up.
struct Failure {
    /// The `code` label of `warden_upstream_refusals_total`, when the broker refused or failed
    /// the CONNECT (not for a connection that broke later).
    label: Option<String>,
    /// What happened, in the broker's words.
    words: String,
}

struct Control<D: Dial> {
    dialer: Arc<D>,
    client_id: String,
    escaped: EscapeSet,
    capabilities: Capabilities,
    /// The probe's name, when probing.
    probe_name: Option<String>,
    /// A probe is under way (redials do not start a second one).
    probing: Arc<AtomicBool>,
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
        // The first probe does not wait for the control connection: when a wrong declaration
        // keeps it from coming up, the probe is what says why.
        self.start_probe();
        let mut first = true;
        let mut wait = REDIAL_MIN;
        // The last failure logged as a warning, and when.
        let mut logged: Option<(String, Instant)> = None;
        loop {
            let failure = match self.connect().await {
                Ok(stream) => {
                    let up_since = Instant::now();
                    self.intake.metrics.upstream_up.set(1);
                    self.intake.report().up = true;
                    if logged.take().is_some() {
                        info!(client_id = %self.client_id, "control connection to the broker is up again");
                    }
                    if !std::mem::take(&mut first) {
                        self.start_probe();
                    }
                    let stop = self.serve(stream).await;
                    self.intake.metrics.upstream_up.set(0);
                    self.intake.report().up = false;
                    if up_since.elapsed() >= STABLE_CONNECTION {
                        wait = REDIAL_MIN;
                        self.intake.report().failures_in_a_row = 0;
                    }
                    match stop {
                        Stop::Finished => return,
                        Stop::ClosedByBroker => Failure {
                            label: None,
                            words: format!(
                                "the broker closed the control connection (client ID {}); if this \
                                 repeats, the broker may refuse one of its topics, or another \
                                 process may use the same control client ID",
                                self.client_id
                            ),
                        },
                        Stop::Broken(reason) => Failure {
                            label: None,
                            words: format!("control connection broken: {reason}"),
                        },
                    }
                }
                Err(failure) => failure,
            };
            if let Some(label) = failure.label {
                self.intake.metrics.refusal("control", label);
            }
            {
                let mut report = self.intake.report();
                report.last_failure = Some(failure.words.clone());
                report.failures_in_a_row += 1;
            }
            let repeat = logged.as_ref().is_some_and(|(words, at)| {
                *words == failure.words && at.elapsed() < FAILURE_LOG_EVERY
            });
            if repeat {
                debug!(reason = %failure.words, retry_in = ?wait, "control connection to the broker failed");
            } else {
                warn!(reason = %failure.words, retry_in = ?wait, "control connection to the broker failed; status messages wait in the queue");
                logged = Some((failure.words, Instant::now()));
            }
            if self.finished() {
                return;
            }
            // Messages keep arriving in the intake queue while the broker is away.
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(REDIAL_MAX);
        }
    }

    /// Probes the broker on connections of its own, unless a probe is under way.
    fn start_probe(&self) {
        let Some(name) = self.probe_name.clone() else {
            return;
        };
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (dialer, intake, probing, declared) = (
            self.dialer.clone(),
            self.intake.clone(),
            self.probing.clone(),
            self.capabilities,
        );
        tokio::spawn(async move {
            let probed = probe(&*dialer, &name).await;
            let mismatches = probed.mismatches(&declared);
            let metrics = &intake.metrics;
            for (capability, value) in probed.gauges() {
                metrics
                    .capability_probed
                    .get_or_create(&CapabilityLabels { capability })
                    .set(value);
            }
            for capability in CAPABILITIES {
                let mismatch = mismatches.iter().any(|m| m.capability == capability);
                metrics
                    .capability_mismatch
                    .get_or_create(&CapabilityLabels { capability })
                    .set(i64::from(mismatch));
            }
            for mismatch in &mismatches {
                let (capability, declared, probed, key) = (
                    mismatch.capability,
                    &mismatch.declared,
                    &mismatch.probed,
                    mismatch.key,
                );
                if mismatch.overstated {
                    warn!(capability, %declared, %probed, key, "the broker does less than declared, and what relies on it will fail; correct upstream.broker or set {key}");
                } else {
                    info!(capability, %declared, %probed, key, "the broker does more than declared; {key} could say so");
                }
            }
            info!(%probed, mismatches = mismatches.len(), "broker probed");
            {
                let mut report = intake.report();
                report.probed = Some(probed);
                report.mismatches = mismatches.iter().map(ToString::to_string).collect();
            }
            probing.store(false, Ordering::Release);
        });
    }

    /// The intake is closed and nothing is left to send.
    fn finished(&self) -> bool {
        let queue = self.intake.lock();
        queue.closed && queue.items.is_empty() && self.in_flight.is_empty()
    }

    async fn connect(&mut self) -> Result<D::Stream, Failure> {
        let failed = |error| {
            let hint = match error {
                UpstreamError::Closed => format!(
                    " (a broker may do this over the client ID {}, the credentials or the will \
                     topic)",
                    self.client_id
                ),
                _ => String::new(),
            };
            Failure {
                label: Some(failure_label(&error).to_owned()),
                words: format!("control connection: {error}{hint}"),
            }
        };
        let will_topic = self
            .will
            .as_ref()
            .map(|will| escape(self.escaped, &will.topic));
        let will = self
            .will
            .as_ref()
            .zip(will_topic.as_deref())
            .map(|(will, topic)| Will {
                properties: Vec::new(),
                topic,
                payload: &will.payload,
                qos: 0,
                retain: will.retain,
            });
        let (stream, code, _) = connect_own(
            &*self.dialer,
            &self.client_id,
            ProtocolVersion::V311,
            CONTROL_KEEP_ALIVE_SECS,
            will,
        )
        .await
        .map_err(failed)?;
        if code != 0 {
            return Err(Failure {
                label: Some(connack_label(code)),
                words: format!(
                    "the broker refused the control connection: CONNACK {code} ({})",
                    connack_meaning(false, code)
                ),
            });
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
                &[escape(self.escaped, &publication.topic).as_bytes()],
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
                recover(&mut stream, &mut inbound, &mut recovery, self.escaped),
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
                        &[escape(self.escaped, &publication.topic).as_bytes()],
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
    escaped: EscapeSet,
) -> Result<Vec<Publication>, Stop> {
    // The broker sees escaped topics; the ledger only ever sees its own form.
    let sentinel = escape(escaped, &recovery.sentinel).into_owned();
    let mut found = Vec::new();
    for round in 0.. {
        match (recovery.settle)(round, &found) {
            Step::Done(publications) => return Ok(publications),
            Step::Read(topics) => {
                let topics: Vec<String> = topics
                    .iter()
                    .map(|topic| escape(escaped, topic).into_owned())
                    .collect();
                read_retained(stream, inbound, &topics, &sentinel, escaped, &mut found).await?;
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
    escaped: EscapeSet,
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
                            found.push((
                                unescape(escaped, publish.topic).into_owned(),
                                body[publish.payload].to_vec(),
                            ));
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
            capabilities: Capabilities::default(),
            probe: false,
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

    #[tokio::test(start_paused = true)]
    async fn topics_and_the_client_id_go_out_escaped() {
        let (brokers, mut dialled) = mpsc::unbounded_channel();
        let mut config = config(100, 100_000);
        config.client_id = "warden-127.0.0.1".into();
        config.capabilities.escaped = EscapeSet::DOT;
        let monitor = Monitor::spawn(
            Arc::new(DuplexDialer {
                brokers,
                pipe_bytes: 64 * 1024,
            }),
            config,
            MonitorMetrics::default(),
        );
        monitor.send(vec![Publication {
            topic: "org1/iot-2/type/t.1/id/d.1/mon".into(),
            payload: b"x".to_vec().into(),
            retain: false,
        }]);
        let mut broker = dialled.recv().await.unwrap();
        let mut seen = BytesMut::new();
        broker.read_buf(&mut seen).await.unwrap();
        assert!(
            seen.windows(18).any(|w| w == b"warden-127%2E0%2E0"),
            "{seen:?}"
        );
        broker.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        let escaped = b"org1/iot-2/type/t%2E1/id/d%2E1/mon";
        while !seen.windows(escaped.len()).any(|w| w == escaped) {
            broker.read_buf(&mut seen).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_drops_every_connection_at_once_is_redialled_ever_more_slowly() {
        let (brokers, mut dialled) = mpsc::unbounded_channel();
        let metrics = MonitorMetrics::default();
        let monitor = Monitor::spawn(
            Arc::new(DuplexDialer {
                brokers,
                pipe_bytes: 64 * 1024,
            }),
            config(100, 100_000),
            metrics.clone(),
        );
        let mut dials = Vec::new();
        for _ in 0..8 {
            let mut broker = tokio::time::timeout(Duration::from_secs(60), dialled.recv())
                .await
                .expect("redialled")
                .unwrap();
            dials.push(Instant::now());
            let mut buf = BytesMut::new();
            broker.read_buf(&mut buf).await.unwrap();
            // Accepted, then dropped at once, as NATS 2.9 did with a topic it refused.
            broker.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
            drop(broker);
        }
        let gaps: Vec<Duration> = dials.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
        assert!(gaps[gaps.len() - 1] >= REDIAL_MAX, "{gaps:?}");
        let report = monitor.report();
        assert!(!report.up);
        assert!(report.failures_in_a_row >= 6, "{report:?}");
        assert!(
            report
                .last_failure
                .as_deref()
                .is_some_and(|why| why.contains("the broker closed the control connection")),
            "{report:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_reported_in_the_brokers_words_and_counted() {
        let (brokers, mut dialled) = mpsc::unbounded_channel();
        let metrics = MonitorMetrics::default();
        let monitor = Monitor::spawn(
            Arc::new(DuplexDialer {
                brokers,
                pipe_bytes: 64 * 1024,
            }),
            config(100, 100_000),
            metrics.clone(),
        );
        for _ in 0..2 {
            let mut broker = dialled.recv().await.unwrap();
            let mut buf = BytesMut::new();
            broker.read_buf(&mut buf).await.unwrap();
            broker.write_all(&[0x20, 0x02, 0x00, 0x05]).await.unwrap();
        }
        let _third = dialled.recv().await.unwrap();
        let report = monitor.report();
        assert_eq!(
            report.last_failure.as_deref(),
            Some("the broker refused the control connection: CONNACK 5 (not authorized)")
        );
        let refusals = metrics
            .refusals
            .get_or_create(&crate::metrics::RefusalLabels {
                connection: "control",
                code: "0x05".into(),
            })
            .get();
        assert_eq!(refusals, 2);
    }
}
