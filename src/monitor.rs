//! Monitoring messages (PRODUCT.md §6): building the JSON, the retain rules, and the one control
//! connection that publishes them onto the broker's `mon` topics.
//!
//! Sessions hand finished [`Publication`]s to [`Monitor::send`] in event order. The control task
//! moves them into a bounded queue at once, writes them to the broker at QoS 0 in batches, and
//! follows each batch with a PINGREQ: the broker handles packets of one connection in order, so
//! its PINGRESP proves that the batch was processed. Only then is the batch dropped from the queue.
//! A connection that breaks before that is redialled and the batch is sent again, so nothing is
//! lost while the broker comes and goes; a duplicate monitoring message is possible, a lost one is
//! not, unless the queue overflows (then the oldest are dropped and counted).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::close::CloseReason;
use crate::codec::{
    decode_frame_header, encode_connect, encode_publish, encode_subscribe, encode_unsubscribe,
    parse_publish, Connect, ProtocolVersion,
};
use crate::identity::{ClientClass, Identity};
use crate::ledger::Ledger;
use crate::transport::write_flushed;
use crate::upstream::{Dialer, UpstreamStream, READ_BUFFER_BYTES};

/// Keep-alive of the control connection, in seconds.
const CONTROL_KEEP_ALIVE_SECS: u16 = 30;
/// Most monitoring messages written before waiting for the broker's PINGRESP.
const MAX_BATCH: usize = 512;
/// Packet id of the control connection's ledger SUBSCRIBE and UNSUBSCRIBE.
const RECOVERY_PACKET_ID: u16 = 1;
/// Largest ledger entry read back, in bytes.
const MAX_RECOVERY_PACKET_BYTES: usize = 64 * 1024;
/// First and longest wait between redials of the control connection.
const REDIAL_MIN: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(5);

/// The kind of monitoring message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// A client connected.
    Connect,
    /// A client failed to connect.
    FailedConnect,
    /// A client disconnected.
    Disconnect,
}

/// The JSON object of a monitoring message, with the source document's 16 field names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorMessage {
    /// `Connect`, `FailedConnect` or `Disconnect`.
    #[serde(rename = "Action")]
    pub action: Action,
    /// When the message was made (ISO 8601, UTC).
    #[serde(rename = "Time")]
    pub time: String,
    /// The client's IP address.
    #[serde(rename = "ClientAddr")]
    pub client_addr: String,
    /// The client ID.
    #[serde(rename = "ClientID")]
    pub client_id: String,
    /// The proxy port the client connected to.
    #[serde(rename = "Port")]
    pub port: u16,
    /// Whether the connection uses TLS.
    #[serde(rename = "Secure")]
    pub secure: bool,
    /// `mqtt3`, `mqtt4`, `mqtt5` (and `-ws` forms).
    #[serde(rename = "Protocol")]
    pub protocol: String,
    /// The user name, or empty.
    #[serde(rename = "User")]
    pub user: String,
    /// The client certificate's common name, or empty.
    #[serde(rename = "Certname")]
    pub certname: String,
    /// When the connection began (ISO 8601, UTC).
    #[serde(rename = "ConnectTime")]
    pub connect_time: String,
    /// The WIoTP closing code (0 for Connect).
    #[serde(rename = "CloseCode")]
    pub close_code: u16,
    /// The closing reason (empty for Connect and for code 0).
    #[serde(rename = "Reason")]
    pub reason: String,
    /// Bytes from the client.
    #[serde(rename = "ReadBytes")]
    pub read_bytes: u64,
    /// PUBLISH packets from the client.
    #[serde(rename = "ReadMsg")]
    pub read_msg: u64,
    /// Bytes to the client.
    #[serde(rename = "WriteBytes")]
    pub write_bytes: u64,
    /// PUBLISH packets to the client.
    #[serde(rename = "WriteMsg")]
    pub write_msg: u64,
}

/// Byte and message counts of one connection, as the monitoring message reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read from the client.
    pub read_bytes: u64,
    /// PUBLISH packets read from the client.
    pub read_msg: u64,
    /// Bytes written to the client.
    pub write_bytes: u64,
    /// PUBLISH packets written to the client.
    pub write_msg: u64,
}

/// What a monitoring message says about the connection, besides action and close.
#[derive(Debug, Clone)]
pub struct ConnectionFacts {
    /// The client's address.
    pub peer: SocketAddr,
    /// The proxy's address the client connected to.
    pub local: SocketAddr,
    /// TLS.
    pub secure: bool,
    /// `Protocol` field value.
    pub protocol: &'static str,
    /// User name, if given.
    pub user: Option<String>,
    /// Certificate common name, if any.
    pub certname: Option<String>,
    /// When the TCP connection was accepted.
    pub connected_at: SystemTime,
}

/// ISO 8601 with milliseconds, UTC (`2026-11-25T07:32:34.123Z`).
pub fn iso_time(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

impl MonitorMessage {
    /// Builds the message for an event on a connection.
    pub fn new(
        action: Action,
        identity: &Identity,
        facts: &ConnectionFacts,
        close: Option<&CloseReason>,
        counters: Counters,
    ) -> MonitorMessage {
        let (close_code, reason) = match close {
            Some(close) if close.number() != 0 => (close.number(), close.reason_string()),
            _ => (0, String::new()),
        };
        MonitorMessage {
            action,
            time: iso_time(SystemTime::now()),
            client_addr: facts.peer.ip().to_string(),
            client_id: identity.client_id.clone(),
            port: facts.local.port(),
            secure: facts.secure,
            protocol: facts.protocol.to_string(),
            user: facts.user.clone().unwrap_or_default(),
            certname: facts.certname.clone().unwrap_or_default(),
            connect_time: iso_time(facts.connected_at),
            close_code,
            reason,
            read_bytes: counters.read_bytes,
            read_msg: counters.read_msg,
            write_bytes: counters.write_bytes,
            write_msg: counters.write_msg,
        }
    }
}

/// One PUBLISH the control connection sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Broker topic (with org prefix).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Retain flag.
    pub retain: bool,
}

/// The publications for a monitoring message under the retain rules of PRODUCT.md §6.
///
/// `org_prefix` is the identity's org prefix on the broker; `quickstart` marks the quickstart org;
/// `clear_retained` says whether a Disconnect of an application clears the retained Connect (for
/// `A:` applications only the last instance does).
pub fn publications(
    message: &MonitorMessage,
    identity: &Identity,
    org_prefix: &str,
    quickstart: bool,
    clear_retained: bool,
) -> Vec<Publication> {
    let topic = format!("{org_prefix}{}", identity.mon_topic());
    // Serialising a struct of strings and integers cannot fail.
    let payload = Bytes::from(serde_json::to_vec(message).unwrap_or_default());
    let is_app = identity.class.is_application();
    match message.action {
        Action::Connect => vec![Publication {
            topic,
            payload,
            retain: !quickstart,
        }],
        Action::FailedConnect => vec![Publication {
            topic,
            payload,
            retain: false,
        }],
        Action::Disconnect if !is_app && !quickstart => vec![Publication {
            topic,
            payload,
            retain: true,
        }],
        Action::Disconnect => {
            let mut out = Vec::with_capacity(2);
            if clear_retained {
                out.push(Publication {
                    topic: topic.clone(),
                    payload: Bytes::new(),
                    retain: true,
                });
            }
            out.push(Publication {
                topic,
                payload,
                retain: false,
            });
            out
        }
    }
}

/// Whether a class's retained Connect is cleared on Disconnect (applications and quickstart).
pub fn clears_on_disconnect(class: ClientClass, quickstart: bool) -> bool {
    class.is_application() || quickstart
}

/// The sessions' handle on the control connection.
#[derive(Debug, Clone)]
pub struct Monitor {
    tx: mpsc::UnboundedSender<Publication>,
    status: Arc<MonitorStatus>,
    ledger: Ledger,
}

/// Whether a client is connected through this process right now (crash recovery skips it).
pub type IsLive = Arc<dyn Fn(&Identity) -> bool + Send + Sync>;

/// One event to report: a connect, a refused connect, or a close.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    /// What happened.
    pub action: Action,
    /// Who.
    pub identity: &'a Identity,
    /// The connection.
    pub facts: &'a ConnectionFacts,
    /// Why it closed (Disconnect, FailedConnect).
    pub close: Option<&'a CloseReason>,
    /// Byte and message counts so far.
    pub counters: Counters,
    /// The org's prefix on the broker.
    pub org_prefix: &'a str,
    /// The quickstart org.
    pub quickstart: bool,
    /// False while another connection of the same application is live.
    pub last_instance: bool,
    /// The session, once established (Connect and Disconnect): keys its ledger entry.
    pub session_id: Option<u64>,
}

/// What the control connection reports about itself.
#[derive(Debug, Default)]
pub struct MonitorStatus {
    /// Whether the control connection is up.
    pub connected: AtomicBool,
    /// Messages dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Messages the broker has confirmed.
    pub published: AtomicU64,
    /// Messages handed to the monitor.
    pub sent: AtomicU64,
}

impl Monitor {
    /// Starts the control connection task.
    pub fn spawn(
        dialer: Dialer,
        client_id: String,
        queue_limit: usize,
        ledger: Ledger,
        is_live: IsLive,
    ) -> Monitor {
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(MonitorStatus::default());
        let control = Control {
            dialer,
            client_id,
            queue: VecDeque::new(),
            queue_limit: queue_limit.max(1),
            rx,
            status: status.clone(),
            ledger: ledger.clone(),
            is_live,
            recovered: false,
            in_flight: 0,
        };
        tokio::spawn(control.run());
        Monitor { tx, status, ledger }
    }

    /// Queues publications, in order.
    pub fn send(&self, publications: Vec<Publication>) {
        for publication in publications {
            // The control task lives as long as the process; a closed channel means shutdown.
            if self.tx.send(publication).is_ok() {
                self.status.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Builds the monitoring message for an event and queues its publications under the retain
    /// rules (see [`publications`]), with the session's ledger entry (written on Connect, cleared
    /// on Disconnect) behind it.
    pub fn report(&self, report: Report<'_>) {
        let message = MonitorMessage::new(
            report.action,
            report.identity,
            report.facts,
            report.close,
            report.counters,
        );
        let clear = report.action == Action::Disconnect
            && report.last_instance
            && clears_on_disconnect(report.identity.class, report.quickstart);
        let statuses = publications(
            &message,
            report.identity,
            report.org_prefix,
            report.quickstart,
            clear,
        );
        // The ledger entry goes out before the Connect status and is cleared after the
        // Disconnect status. The broker handles one connection's packets in order, so a crash at
        // any point leaves an entry for every client that anyone saw connected.
        match (report.action, report.session_id) {
            (Action::Connect, Some(session)) => {
                let mut out = Vec::with_capacity(statuses.len() + 1);
                out.push(self.ledger.entry(
                    &message,
                    report.org_prefix,
                    report.quickstart,
                    session,
                ));
                out.extend(statuses);
                self.send(out);
            }
            (Action::Disconnect, Some(session)) => {
                let mut out = statuses;
                out.push(self.ledger.clear(&report.identity.client_id, session));
                self.send(out);
            }
            _ => self.send(statuses),
        }
    }

    /// Resolves once every message handed over so far was confirmed by the broker (or dropped).
    pub async fn flushed(&self) {
        /// How often the counters are compared while waiting.
        const POLL: Duration = Duration::from_millis(10);
        let target = self.status.sent.load(Ordering::Relaxed);
        loop {
            let done = self.status.published.load(Ordering::Relaxed)
                + self.status.dropped.load(Ordering::Relaxed);
            if done >= target {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The control connection's status.
    pub fn status(&self) -> &MonitorStatus {
        &self.status
    }
}

struct Control {
    dialer: Dialer,
    client_id: String,
    queue: VecDeque<Publication>,
    queue_limit: usize,
    rx: mpsc::UnboundedReceiver<Publication>,
    status: Arc<MonitorStatus>,
    ledger: Ledger,
    is_live: IsLive,
    /// Whether the ledger of earlier processes was settled.
    recovered: bool,
    /// How many messages at the front of `queue` were written and await the broker's PINGRESP.
    in_flight: usize,
}

enum Stop {
    /// Every session handle is gone: the process is exiting.
    ChannelClosed,
    /// The connection broke; redial.
    Broken,
}

impl Control {
    async fn run(mut self) {
        let mut wait = REDIAL_MIN;
        loop {
            match self.connect().await {
                Ok(stream) => {
                    wait = REDIAL_MIN;
                    self.status.connected.store(true, Ordering::Relaxed);
                    let stop = self.serve(stream).await;
                    self.status.connected.store(false, Ordering::Relaxed);
                    // Whatever was written and not confirmed is written again on the next
                    // connection, and is no longer protected from overflow meanwhile.
                    self.in_flight = 0;
                    if matches!(stop, Stop::ChannelClosed) {
                        return;
                    }
                }
                Err(error) => {
                    debug!(%error, "monitor control connection failed");
                }
            }
            // Keep accepting messages while the broker is away.
            let deadline = tokio::time::sleep(wait);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    received = self.rx.recv() => match received {
                        Some(publication) => self.enqueue(publication),
                        None if self.queue.is_empty() => return,
                        None => {}
                    },
                }
            }
            wait = (wait * 2).min(REDIAL_MAX);
        }
    }

    fn enqueue(&mut self, publication: Publication) {
        if self.queue.len() >= self.queue_limit {
            let dropped = self.status.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                warn!(dropped, "monitoring queue full, oldest messages dropped");
            }
            // The oldest message not yet written goes. Messages in flight stay, so the PINGRESP
            // that confirms them removes exactly those; when all are in flight, the new one goes.
            if self.queue.len() > self.in_flight {
                self.queue.remove(self.in_flight);
            } else {
                return;
            }
        }
        self.queue.push_back(publication);
    }

    async fn connect(&mut self) -> Result<UpstreamStream, crate::upstream::UpstreamError> {
        let mut stream = self.dialer.dial().await?;
        let connect = Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: CONTROL_KEEP_ALIVE_SECS,
            properties: Vec::new(),
            client_id: &self.client_id,
            will: None,
            username: self.dialer.username.as_deref(),
            password: self.dialer.password.as_deref().map(str::as_bytes),
        };
        let mut out = BytesMut::new();
        encode_connect(&mut out, &connect);
        let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
        let header = self.dialer.handshake(&mut stream, &out, &mut buf).await?;
        let code = buf.get(header.header_len + 1).copied().unwrap_or(0xFF);
        if code != 0 {
            warn!(code, "broker refused the monitor control connection");
            return Err(crate::upstream::UpstreamError::NotConnack);
        }
        Ok(stream)
    }

    /// Settles the ledger entries of earlier processes of this instance: subscribe to them, then
    /// publish a sentinel on the same filter. The broker queues the retained entries at subscribe
    /// time and the sentinel after them, so every entry has arrived when the sentinel does.
    /// Each entry gets a Disconnect and a clearing, queued like any monitoring message.
    async fn recover(
        &mut self,
        stream: &mut UpstreamStream,
        inbound: &mut BytesMut,
    ) -> Result<(), std::io::Error> {
        let filter = self.ledger.filter();
        let sentinel = self.ledger.sentinel_topic();
        let mut out = BytesMut::new();
        encode_subscribe(
            &mut out,
            ProtocolVersion::V311,
            RECOVERY_PACKET_ID,
            &[],
            &[(&[filter.as_bytes()], 0)],
        );
        write_flushed(stream, &out).await?;
        let mut found = Vec::new();
        let mut sentinel_sent = false;
        'read: loop {
            if stream.read_buf(inbound).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            while let Ok(Some(header)) = decode_frame_header(inbound, MAX_RECOVERY_PACKET_BYTES) {
                if inbound.len() < header.frame_len() {
                    inbound.reserve(header.frame_len() - inbound.len());
                    break;
                }
                let frame = inbound.split_to(header.frame_len());
                match header.first_byte >> 4 {
                    // SUBACK: the subscription is in place; the sentinel follows the entries.
                    9 if !sentinel_sent => {
                        out.clear();
                        encode_publish(&mut out, 0x30, &[sentinel.as_bytes()], b"sentinel");
                        write_flushed(stream, &out).await?;
                        sentinel_sent = true;
                    }
                    3 => {
                        let body = &frame[header.header_len..];
                        if let Ok(publish) =
                            parse_publish(header.first_byte, body, ProtocolVersion::V311, false)
                        {
                            if publish.topic == sentinel {
                                break 'read;
                            }
                            found.push((publish.topic.to_string(), body[publish.payload].to_vec()));
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut settled = 0usize;
        for (topic, payload) in found {
            for publication in self
                .ledger
                .recover(&topic, &payload, |identity| (self.is_live)(identity))
            {
                settled += usize::from(!publication.payload.is_empty());
                self.enqueue(publication);
                self.status.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        if settled > 0 {
            warn!(
                settled,
                "settled clients of an earlier process that stopped without closing them"
            );
        }
        out.clear();
        encode_unsubscribe(
            &mut out,
            ProtocolVersion::V311,
            RECOVERY_PACKET_ID,
            &[],
            &[&[filter.as_bytes()]],
        );
        write_flushed(stream, &out).await?;
        self.recovered = true;
        Ok(())
    }

    async fn serve(&mut self, mut stream: UpstreamStream) -> Stop {
        let mut out = BytesMut::new();
        let mut inbound = BytesMut::with_capacity(64);
        if !self.recovered && self.recover(&mut stream, &mut inbound).await.is_err() {
            return Stop::Broken;
        }
        let mut pings_outstanding = 0usize;
        let mut idle =
            tokio::time::interval(Duration::from_secs(u64::from(CONTROL_KEEP_ALIVE_SECS) / 2));
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Whatever is already waiting joins this batch, so one report's publications travel
            // in one write.
            while let Ok(publication) = self.rx.try_recv() {
                self.enqueue(publication);
            }
            if self.in_flight == 0 && !self.queue.is_empty() {
                self.in_flight = self.queue.len().min(MAX_BATCH);
                out.clear();
                for publication in self.queue.iter().take(self.in_flight) {
                    let first_byte = 0x30 | u8::from(publication.retain);
                    encode_publish(
                        &mut out,
                        first_byte,
                        &[publication.topic.as_bytes()],
                        &publication.payload,
                    );
                }
                out.extend_from_slice(&[0xC0, 0x00]);
                pings_outstanding += 1;
                if write_flushed(&mut stream, &out).await.is_err() {
                    return Stop::Broken;
                }
            }
            tokio::select! {
                received = self.rx.recv() => match received {
                    Some(publication) => self.enqueue(publication),
                    None if self.queue.is_empty() => return Stop::ChannelClosed,
                    None => {}
                },
                read = stream.read_buf(&mut inbound) => {
                    match read {
                        Ok(0) | Err(_) => return Stop::Broken,
                        Ok(_) => {}
                    }
                    while let Ok(Some(header)) = decode_frame_header(&inbound, 1024) {
                        if inbound.len() < header.frame_len() {
                            break;
                        }
                        let is_pingresp = header.first_byte == 0xD0;
                        let _ = inbound.split_to(header.frame_len());
                        if is_pingresp {
                            pings_outstanding = pings_outstanding.saturating_sub(1);
                            if pings_outstanding == 0 && self.in_flight > 0 {
                                let confirmed = self.in_flight.min(self.queue.len());
                                self.queue.drain(..confirmed);
                                self.status.published.fetch_add(confirmed as u64, Ordering::Relaxed);
                                self.in_flight = 0;
                            }
                        }
                    }
                }
                _ = idle.tick() => {
                    if pings_outstanding > 1 {
                        // Two keep-alive periods without an answer: the broker is gone.
                        return Stop::Broken;
                    }
                    pings_outstanding += 1;
                    if write_flushed(&mut stream, &[0xC0, 0x00]).await.is_err() {
                        return Stop::Broken;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::parse_client_id;

    fn facts() -> ConnectionFacts {
        ConnectionFacts {
            peer: "127.0.0.1:5000".parse().unwrap(),
            local: "127.0.0.1:1883".parse().unwrap(),
            secure: false,
            protocol: "mqtt4",
            user: Some("use-token-auth".into()),
            certname: None,
            connected_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn message_has_the_sixteen_fields() {
        let identity = parse_client_id("d:org1:sensor:d1").unwrap();
        let message = MonitorMessage::new(
            Action::Connect,
            &identity,
            &facts(),
            None,
            Counters::default(),
        );
        let json: serde_json::Value = serde_json::to_value(&message).unwrap();
        let object = json.as_object().unwrap();
        for field in [
            "Action",
            "Time",
            "ClientAddr",
            "ClientID",
            "Port",
            "Secure",
            "Protocol",
            "User",
            "Certname",
            "ConnectTime",
            "CloseCode",
            "Reason",
            "ReadBytes",
            "ReadMsg",
            "WriteBytes",
            "WriteMsg",
        ] {
            assert!(object.contains_key(field), "{field}");
        }
        assert_eq!(object.len(), 16);
        assert_eq!(json["Action"], "Connect");
        assert_eq!(json["ConnectTime"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["Port"], 1883);
    }

    #[test]
    fn retain_rules() {
        let device = parse_client_id("d:org1:sensor:d1").unwrap();
        let app = parse_client_id("a:org1:app").unwrap();
        let close = CloseReason::new(crate::close::CloseCode::ClosedByClient);
        let connect = MonitorMessage::new(
            Action::Connect,
            &device,
            &facts(),
            None,
            Counters::default(),
        );
        let disconnect = MonitorMessage::new(
            Action::Disconnect,
            &device,
            &facts(),
            Some(&close),
            Counters::default(),
        );
        let failed = MonitorMessage::new(
            Action::FailedConnect,
            &device,
            &facts(),
            Some(&close),
            Counters::default(),
        );

        let published = publications(&connect, &device, "org1/", false, false);
        assert_eq!(published[0].topic, "org1/iot-2/type/sensor/id/d1/mon");
        assert!(published[0].retain);
        assert!(!publications(&connect, &device, "org1/", true, false)[0].retain);
        assert!(publications(&disconnect, &device, "org1/", false, true)[0].retain);
        assert!(!publications(&failed, &device, "org1/", false, true)[0].retain);

        let app_disconnect = MonitorMessage::new(
            Action::Disconnect,
            &app,
            &facts(),
            Some(&close),
            Counters::default(),
        );
        let published = publications(&app_disconnect, &app, "org1/", false, true);
        assert_eq!(published.len(), 2);
        assert!(published[0].retain && published[0].payload.is_empty());
        assert!(!published[1].retain && !published[1].payload.is_empty());
        assert_eq!(
            publications(&app_disconnect, &app, "org1/", false, false).len(),
            1
        );
        assert_eq!(disconnect.close_code, 91);
    }
}
