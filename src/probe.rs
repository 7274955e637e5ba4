//! Probing the broker: what it does, checked against what `upstream.broker` and
//! `upstream.capabilities` declared (see `broker`).
//!
//! The monitor runs [`probe`] when the control connection comes up, at start and after every
//! redial, on connections of its own (the control connection is never put at risk: NATS 2.9
//! closes a connection that publishes at QoS 2 or to a topic with a `.`). Each probe uses only
//! topics under [`PROBE_ROOT`], which no tenant can reach, and cleans up what it retained:
//!
//! | capability | probe |
//! |---|---|
//! | `mqtt5` | an MQTT 5 CONNECT: accepted, or refused / closed |
//! | `max_qos` | a QoS 2 PUBLISH: PUBREC (2), PUBACK or a closed connection (1) |
//! | `escape` | a PUBLISH to `ROOT/d/a.b` under a subscription to `ROOT/d/#`: back intact, or rewritten, or the connection closed |
//! | `retained_to_wildcards` | a retained message, then a subscription to `ROOT/r/+`: the retained message comes before a later plain one (asked again for up to a second, since NATS may send it after), or not |
//! | `shared_subscriptions` | `$share/GROUP/ROOT/s`: its SUBACK, then whether a message to `ROOT/s` arrives before one to a plain subscription |
//!
//! A probe that gets no answer within [`PROBE_ANSWER_TIMEOUT`] says nothing ("unknown"), and
//! nothing is compared for it.

use std::fmt;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::broker::Capabilities;
use crate::codec::{
    decode_frame_header, encode_publish, encode_subscribe, parse_publish, ProtocolVersion,
};
use crate::upstream::{connack_meaning, connect_own, Dial, UpstreamError};

/// The first topic level of every probe topic (`:` cannot start an org or a tenant's mount).
pub const PROBE_ROOT: &str = "warden:probe";
/// How long one answer of the broker may take before the probe gives up on its question.
pub const PROBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive of the probe connections, in seconds.
const PROBE_KEEP_ALIVE_SECS: u16 = 30;
/// How long a retained message may lag behind a later plain one before the probe says the
/// broker does not deliver retained messages to wildcard subscriptions.
const RETAINED_GRACE: Duration = Duration::from_secs(1);
/// The pause between two askings within [`RETAINED_GRACE`].
const RETAINED_RETRY: Duration = Duration::from_millis(50);
/// Largest packet a probe reads, in bytes.
const MAX_PROBE_PACKET_BYTES: usize = 16 * 1024;

/// What the probes saw; `None`: the probe could not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Probed {
    /// The broker accepted an MQTT 5 CONNECT.
    pub mqtt5: Option<bool>,
    /// The highest QoS the broker completed as such.
    pub max_qos: Option<u8>,
    /// A `$share` subscription received a message.
    pub shared_subscriptions: Option<bool>,
    /// A wildcard subscription received a retained message.
    pub retained_to_wildcards: Option<bool>,
    /// The broker rejected or rewrote a `.` in a topic level (so `.` must be escaped).
    pub dot_rejected: Option<bool>,
}

/// A capability whose declaration the probe contradicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The capability's name (the metric label).
    pub capability: &'static str,
    /// What the configuration declares.
    pub declared: String,
    /// What the probe saw.
    pub probed: String,
    /// The configuration key that sets it.
    pub key: &'static str,
    /// The declaration promises more than the broker does (something will fail); otherwise
    /// the broker does more than declared, and the proxy only works around what it need not.
    pub overstated: bool,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: declared {}, the broker showed {} (set {})",
            self.capability, self.declared, self.probed, self.key
        )
    }
}

impl Probed {
    /// Each capability's probed value as a gauge: 1 / 0, the QoS, -1 when unknown.
    pub fn gauges(&self) -> [(&'static str, i64); 5] {
        let flag = |v: Option<bool>| v.map_or(-1, i64::from);
        [
            ("mqtt5", flag(self.mqtt5)),
            ("max_qos", self.max_qos.map_or(-1, i64::from)),
            ("shared_subscriptions", flag(self.shared_subscriptions)),
            ("retained_to_wildcards", flag(self.retained_to_wildcards)),
            ("escape", flag(self.dot_rejected)),
        ]
    }

    /// Where the probe contradicts `declared`.
    pub fn mismatches(&self, declared: &Capabilities) -> Vec<Mismatch> {
        let mut out = Vec::new();
        let mut flag = |capability, declared: bool, probed: Option<bool>| {
            if let Some(probed) = probed.filter(|probed| *probed != declared) {
                out.push(Mismatch {
                    overstated: declared,
                    capability,
                    declared: declared.to_string(),
                    probed: probed.to_string(),
                    key: match capability {
                        "mqtt5" => "upstream.capabilities.mqtt5",
                        "shared_subscriptions" => "upstream.capabilities.shared_subscriptions",
                        _ => "upstream.capabilities.retained_to_wildcards",
                    },
                });
            }
        };
        flag("mqtt5", declared.mqtt5, self.mqtt5);
        flag(
            "shared_subscriptions",
            declared.shared_subscriptions,
            self.shared_subscriptions,
        );
        flag(
            "retained_to_wildcards",
            declared.retained_to_wildcards,
            self.retained_to_wildcards,
        );
        if let Some(probed) = self.max_qos.filter(|q| *q != declared.max_qos) {
            out.push(Mismatch {
                overstated: declared.max_qos > probed,
                capability: "max_qos",
                declared: declared.max_qos.to_string(),
                probed: probed.to_string(),
                key: "upstream.capabilities.max_qos",
            });
        }
        let dot_declared = declared.escaped.contains(b'.');
        if let Some(probed) = self.dot_rejected.filter(|r| *r != dot_declared) {
            let words = |escaped: bool| {
                if escaped {
                    "`.` escaped".to_owned()
                } else {
                    "`.` kept as it is".to_owned()
                }
            };
            out.push(Mismatch {
                overstated: probed,
                capability: "escape",
                declared: words(dot_declared),
                probed: if probed {
                    "`.` rejected or rewritten".to_owned()
                } else {
                    "`.` kept as it is".to_owned()
                },
                key: "upstream.capabilities.escape",
            });
        }
        out
    }
}

impl fmt::Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn show<T: fmt::Display>(value: Option<T>) -> String {
            value.map_or_else(|| "unknown".to_owned(), |v| v.to_string())
        }
        write!(
            f,
            "mqtt5={} max_qos={} shared_subscriptions={} retained_to_wildcards={} dot_rejected={}",
            show(self.mqtt5),
            show(self.max_qos),
            show(self.shared_subscriptions),
            show(self.retained_to_wildcards),
            show(self.dot_rejected)
        )
    }
}

/// Why a probe connection ended before its questions were answered.
#[derive(Debug, PartialEq, Eq)]
enum Gone {
    /// The broker closed the connection (its answer to some questions).
    Closed,
    /// No answer in time, or an I/O error: the probe cannot tell.
    Silent,
}

/// One probe connection.
struct Line<S> {
    stream: S,
    inbound: BytesMut,
}

impl<S: tokio::io::AsyncRead + AsyncWrite + Unpin> Line<S> {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), Gone> {
        match tokio::time::timeout(PROBE_ANSWER_TIMEOUT, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Gone::Closed),
            Err(_) => Err(Gone::Silent),
        }
    }

    /// The next packet: its first byte and body.
    async fn next(&mut self) -> Result<(u8, BytesMut), Gone> {
        loop {
            match decode_frame_header(&self.inbound, MAX_PROBE_PACKET_BYTES) {
                Ok(Some(header)) if self.inbound.len() >= header.frame_len() => {
                    let mut frame = self.inbound.split_to(header.frame_len());
                    let body = frame.split_off(header.header_len);
                    return Ok((header.first_byte, body));
                }
                Ok(_) => {}
                Err(_) => return Err(Gone::Silent),
            }
            match tokio::time::timeout(
                PROBE_ANSWER_TIMEOUT,
                self.stream.read_buf(&mut self.inbound),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Gone::Closed),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Gone::Silent),
            }
        }
    }

    /// Reads until a packet of `kind` (the high nibble) arrives.
    async fn until(&mut self, kind: u8) -> Result<BytesMut, Gone> {
        loop {
            let (first, body) = self.next().await?;
            if first >> 4 == kind {
                return Ok(body);
            }
        }
    }

    /// Reads PUBLISH topics until `last` arrives; returns the topics before it.
    async fn topics_until(&mut self, last: &str) -> Result<Vec<String>, Gone> {
        let mut seen = Vec::new();
        loop {
            let (first, body) = self.next().await?;
            if first >> 4 != 3 {
                continue;
            }
            let Ok(publish) = parse_publish(first, &body, ProtocolVersion::V311, false) else {
                continue;
            };
            if publish.topic == last {
                return Ok(seen);
            }
            if publish.qos > 0 {
                if let Some(id) = publish.packet_id {
                    let ack = if publish.qos == 1 { 0x40 } else { 0x50 };
                    let [high, low] = id.to_be_bytes();
                    self.send(&[ack, 2, high, low]).await?;
                }
            }
            seen.push(publish.topic.to_owned());
        }
    }

    async fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        id: u16,
        payload: &[u8],
    ) -> Result<(), Gone> {
        let mut out = BytesMut::new();
        let first = 0x30 | (qos << 1) | u8::from(retain);
        // Everything after the topic: the packet id (QoS 1 and 2), then the payload.
        let mut rest = Vec::with_capacity(2 + payload.len());
        if qos > 0 {
            rest.extend_from_slice(&id.to_be_bytes());
        }
        rest.extend_from_slice(payload);
        encode_publish(&mut out, first, &[topic.as_bytes()], &rest);
        self.send(&out).await
    }

    async fn subscribe(&mut self, id: u16, filters: &[&str]) -> Result<Vec<u8>, Gone> {
        let mut out = BytesMut::new();
        let filters: Vec<[&[u8]; 1]> = filters.iter().map(|f| [f.as_bytes()]).collect();
        let filters: Vec<(&[&[u8]], u8)> = filters.iter().map(|f| (&f[..], 0u8)).collect();
        encode_subscribe(&mut out, ProtocolVersion::V311, id, &[], &filters);
        self.send(&out).await?;
        let body = self.until(9).await?;
        Ok(body.get(2..).map(<[u8]>::to_vec).unwrap_or_default())
    }
}

/// Dials and connects with `version`: the line, or the CONNACK code that refused it, or the
/// failure.
async fn open<D: Dial>(
    dialer: &D,
    client_id: &str,
    version: ProtocolVersion,
) -> Result<Result<Line<D::Stream>, u8>, UpstreamError> {
    let (stream, code, inbound) =
        connect_own(dialer, client_id, version, PROBE_KEEP_ALIVE_SECS, None).await?;
    if code != 0 {
        return Ok(Err(code));
    }
    Ok(Ok(Line { stream, inbound }))
}

/// What one question on a probe line came to.
/// A closed connection may be an answer (`on_close`); either way the line is gone.
fn verdict<T>(answer: Result<T, Gone>, on_close: Option<T>, alive: &mut bool) -> Option<T> {
    match answer {
        Ok(value) => Some(value),
        Err(Gone::Closed) => {
            *alive = false;
            on_close
        }
        Err(Gone::Silent) => {
            *alive = false;
            None
        }
    }
}

async fn ask_qos<S: tokio::io::AsyncRead + AsyncWrite + Unpin>(
    line: &mut Line<S>,
    root: &str,
) -> Result<Option<u8>, Gone> {
    line.publish(&format!("{root}/q"), 2, false, 1, b"probe")
        .await?;
    let (first, _) = line.next().await?;
    match first >> 4 {
        5 => {
            line.send(&[0x62, 2, 0, 1]).await?;
            line.until(7).await?;
            Ok(Some(2))
        }
        4 => Ok(Some(1)),
        _ => Ok(None),
    }
}

/// `Some(true)`: the dotted topic came back as something else (RabbitMQ: `a/b`); `None`: it did
/// not come back at all, which says nothing (a broker ACL may have refused it).
async fn ask_dot<S: tokio::io::AsyncRead + AsyncWrite + Unpin>(
    line: &mut Line<S>,
    root: &str,
) -> Result<Option<bool>, Gone> {
    let (dot_topic, end) = (format!("{root}/d/a.b"), format!("{root}/d/end"));
    line.subscribe(2, &[&format!("{root}/d/#")]).await?;
    line.publish(&dot_topic, 0, false, 0, b"probe").await?;
    line.publish(&end, 0, false, 0, b"end").await?;
    let seen = line.topics_until(&end).await?;
    Ok(seen.first().map(|topic| *topic != dot_topic))
}

async fn ask_retained<S: tokio::io::AsyncRead + AsyncWrite + Unpin>(
    line: &mut Line<S>,
    root: &str,
) -> Result<bool, Gone> {
    let (retained, end) = (format!("{root}/r/x"), format!("{root}/r/end"));
    line.publish(&retained, 1, true, 3, b"probe").await?;
    line.until(4).await?;
    line.subscribe(4, &[&format!("{root}/r/+")]).await?;
    // NATS looks retained messages up after it has answered the SUBSCRIBE, so one may come
    // after a later plain message: the question is asked again for a while before the answer
    // is no.
    let deadline = tokio::time::Instant::now() + RETAINED_GRACE;
    let mut seen = Vec::new();
    loop {
        line.publish(&end, 0, false, 0, b"end").await?;
        seen.extend(line.topics_until(&end).await?);
        if seen.contains(&retained) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(RETAINED_RETRY).await;
    }
    // The probe's retained message is cleared again.
    line.publish(&retained, 1, true, 5, b"").await?;
    line.until(4).await?;
    Ok(seen.contains(&retained))
}

async fn ask_shared<S: tokio::io::AsyncRead + AsyncWrite + Unpin>(
    line: &mut Line<S>,
    root: &str,
) -> Result<bool, Gone> {
    let (topic, end) = (format!("{root}/s"), format!("{root}/e"));
    let codes = line
        .subscribe(6, &[&format!("$share/warden-probe/{topic}"), &end])
        .await?;
    if codes.first().is_none_or(|code| *code >= 0x80) {
        return Ok(false);
    }
    line.publish(&topic, 0, false, 0, b"probe").await?;
    line.publish(&end, 0, false, 0, b"end").await?;
    let seen = line.topics_until(&end).await?;
    Ok(seen.contains(&topic))
}

/// Runs every probe (see the module documentation). `name` is a topic level and client ID of
/// this process's own, free of characters any broker rejects.
pub async fn probe<D: Dial>(dialer: &D, name: &str) -> Probed {
    let mut probed = Probed::default();
    let client_id = format!("{name}-probe");
    probed.mqtt5 = match open(dialer, &client_id, ProtocolVersion::V5).await {
        Ok(Ok(mut line)) => {
            let _ = line.send(&[0xE0, 0x00]).await;
            Some(true)
        }
        Ok(Err(code)) => {
            tracing::debug!(
                code,
                meaning = connack_meaning(true, code),
                "the broker refused an MQTT 5 CONNECT"
            );
            Some(false)
        }
        // A broker that does not speak MQTT 5 may just close the connection.
        Err(UpstreamError::Closed | UpstreamError::NotConnack | UpstreamError::BadConnack(_)) => {
            Some(false)
        }
        Err(_) => None,
    };
    let root = format!("{PROBE_ROOT}/{name}");
    let mut line = None;
    for question in 0..4 {
        if line.is_none() {
            line = match open(dialer, &client_id, ProtocolVersion::V311).await {
                Ok(Ok(opened)) => Some(opened),
                _ => return probed,
            };
        }
        let Some(open_line) = line.as_mut() else {
            return probed;
        };
        let mut alive = true;
        match question {
            // A broker that closes the connection over QoS 2 completes QoS 1 at most.
            0 => {
                probed.max_qos =
                    verdict(ask_qos(open_line, &root).await, Some(Some(1)), &mut alive).flatten()
            }
            // A broker that closes the connection over a `.` rejects it.
            1 => {
                probed.dot_rejected = verdict(
                    ask_dot(open_line, &root).await,
                    Some(Some(true)),
                    &mut alive,
                )
                .flatten()
            }
            2 => {
                probed.retained_to_wildcards =
                    verdict(ask_retained(open_line, &root).await, None, &mut alive)
            }
            // A broker that closes the connection over a `$share` filter has none.
            _ => {
                probed.shared_subscriptions =
                    verdict(ask_shared(open_line, &root).await, Some(false), &mut alive)
            }
        }
        if !alive {
            line = None;
        }
    }
    if let Some(line) = line.as_mut() {
        let _ = line.send(&[0xE0, 0x00]).await;
    }
    probed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerKind;

    /// A broker that answers the retained question as NATS may: the retained message only after
    /// the `lag`-th end marker (never, for `None`). Returns the probe's answer and how many end
    /// markers it sent.
    async fn ask_retained_of(lag: Option<usize>) -> (Result<bool, Gone>, usize) {
        let (probe_side, mut broker) = tokio::io::duplex(4096);
        let mut line = Line {
            stream: probe_side,
            inbound: BytesMut::new(),
        };
        let root = "warden:probe/t";
        let broker_task = async move {
            let mut inbound = BytesMut::new();
            let mut ends = 0;
            loop {
                let header = match decode_frame_header(&inbound, MAX_PROBE_PACKET_BYTES) {
                    Ok(Some(header)) if inbound.len() >= header.frame_len() => header,
                    _ => match broker.read_buf(&mut inbound).await {
                        Ok(0) | Err(_) => return ends,
                        Ok(_) => continue,
                    },
                };
                let frame = inbound.split_to(header.frame_len());
                let body = &frame[header.header_len..];
                let mut out = BytesMut::new();
                match header.first_byte >> 4 {
                    // PUBLISH: QoS 1 (the retained one and its clearing) gets its PUBACK; a plain
                    // one is the end marker, echoed back behind the retained message once due.
                    3 if header.first_byte & 0x06 != 0 => {
                        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                        let id = &body[2 + topic_len..4 + topic_len];
                        out.extend_from_slice(&[0x40, 2, id[0], id[1]]);
                    }
                    3 => {
                        ends += 1;
                        if lag.is_some_and(|lag| ends >= lag) {
                            let topic = format!("{root}/r/x");
                            encode_publish(&mut out, 0x31, &[topic.as_bytes()], b"probe");
                        }
                        out.extend_from_slice(&frame);
                    }
                    // SUBSCRIBE: granted at QoS 0.
                    8 => out.extend_from_slice(&[0x90, 3, body[0], body[1], 0]),
                    _ => {}
                }
                if broker.write_all(&out).await.is_err() {
                    return ends;
                }
            }
        };
        let probe_task = async move {
            let answer = ask_retained(&mut line, root).await;
            drop(line);
            answer
        };
        tokio::join!(probe_task, broker_task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_retained_message_that_lags_behind_a_plain_one_still_counts() {
        assert_eq!(ask_retained_of(Some(1)).await, (Ok(true), 1));
        let (answer, ends) = ask_retained_of(Some(3)).await;
        assert_eq!((answer, ends), (Ok(true), 3));
        // Never: asked again until the grace ends, then no.
        let started = tokio::time::Instant::now();
        let (answer, ends) = ask_retained_of(None).await;
        assert_eq!(answer, Ok(false));
        assert!(
            started.elapsed() >= RETAINED_GRACE,
            "{:?}",
            started.elapsed()
        );
        assert!(ends > 3, "{ends} end markers");
    }

    #[test]
    fn a_probe_that_agrees_has_no_mismatch_and_unknowns_are_not_compared() {
        let agrees = Probed {
            mqtt5: Some(false),
            max_qos: Some(1),
            shared_subscriptions: Some(false),
            retained_to_wildcards: None,
            dot_rejected: Some(true),
        };
        assert!(agrees
            .mismatches(&BrokerKind::Rabbitmq.declared())
            .is_empty());
        assert!(Probed::default()
            .mismatches(&BrokerKind::Mosquitto.declared())
            .is_empty());
    }

    #[test]
    fn a_mismatch_names_the_key_and_whether_the_declaration_overstates() {
        // Mosquitto declared, RabbitMQ behind: every difference is a promise not kept.
        let rabbit = Probed {
            mqtt5: Some(false),
            max_qos: Some(1),
            shared_subscriptions: Some(false),
            retained_to_wildcards: Some(false),
            dot_rejected: Some(true),
        };
        let mismatches = rabbit.mismatches(&BrokerKind::Mosquitto.declared());
        assert_eq!(mismatches.len(), 5);
        assert!(mismatches.iter().all(|m| m.overstated));
        let escape = mismatches
            .iter()
            .find(|m| m.capability == "escape")
            .expect("escape differs");
        assert_eq!(escape.key, "upstream.capabilities.escape");
        assert_eq!(
            escape.to_string(),
            "escape: declared `.` kept as it is, the broker showed `.` rejected or rewritten \
             (set upstream.capabilities.escape)"
        );
        // NATS declared, a broker that does more: noted, not a promise broken.
        let more = Probed {
            max_qos: Some(2),
            dot_rejected: Some(false),
            ..Probed::default()
        };
        let mismatches = more.mismatches(&BrokerKind::Nats.declared());
        assert_eq!(mismatches.len(), 2);
        assert!(mismatches.iter().all(|m| !m.overstated));
    }
}
