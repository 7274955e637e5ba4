//! WIoTP monitoring messages: the JSON object with the source document's 16 fields, its `mon`
//! topics and retain rules, a gateway's `notify` message, and the ledger entry that lets a later
//! process send the Disconnect a crashed one could not.
//!
//! Retain rules: Connect is retained (not for quickstart). Disconnect is retained for devices and
//! gateways. For applications and quickstart clients the retained Connect is cleared (a
//! zero-length retained publish) and the Disconnect is sent non-retained; for applications only
//! when the last connection of the app ID closes, since they share one status topic.
//! FailedConnect is never retained.

use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::codes::code;
use super::identity::{parse_client_id, ClientClass, Identity};
use crate::profile::{settled_after_restart, Counters, Publication, Request, Settlement};
use crate::refusal::{Cause, Refusal};

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

/// The `Protocol` field: `mqtt3`, `mqtt4`, `mqtt5`, and over WebSocket `mqtt3-ws`, `mqtt4-ws`,
/// `mqttv5-ws` (the source document's spellings).
pub fn protocol_name(version: crate::codec::ProtocolVersion, websocket: bool) -> &'static str {
    use crate::codec::ProtocolVersion::{V31, V311, V5};
    match (version, websocket) {
        (V31, false) => "mqtt3",
        (V311, false) => "mqtt4",
        (V5, false) => "mqtt5",
        (V31, true) => "mqtt3-ws",
        (V311, true) => "mqtt4-ws",
        (V5, true) => "mqttv5-ws",
    }
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
        close: Option<&Refusal>,
        counters: Counters,
    ) -> MonitorMessage {
        let (close_code, reason) = match close {
            Some(close) if close.cause != Cause::Normal => {
                let code = code(close.cause);
                (code.number, code.reason_string(close))
            }
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

/// The publications for a monitoring message under the retain rules (see the module
/// documentation). `clear_retained`: a Disconnect of an application or quickstart client clears
/// the retained Connect (for applications only the last connection of the app does).
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

/// A gateway's refused request, reported on its own `notify` topic.
pub fn notification(
    identity: &Identity,
    org_prefix: &str,
    request: Request,
    topic: &str,
    refusal: &Refusal,
) -> Publication {
    let (device_type, device_id) = super::topics::parse_iot2(topic)
        .and_then(|parsed| parsed.device())
        .unwrap_or(("", ""));
    let code = code(refusal.cause);
    let notification = serde_json::json!({
        "Request": request.name(),
        "Time": iso_time(SystemTime::now()),
        "Topic": topic,
        "Type": device_type,
        "Id": device_id,
        "Client": identity.client_id,
        "RC": code.number,
        "Message": code.reason_string(refusal),
    });
    Publication {
        topic: format!(
            "{org_prefix}iot-2/type/{}/id/{}/notify",
            identity.first,
            identity.second.as_deref().unwrap_or_default()
        ),
        payload: notification.to_string().into(),
        retain: false,
    }
}

/// What the ledger keeps for an established session.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// The org prefix the client's monitoring messages go under.
    org_prefix: String,
    /// Whether the client was in the quickstart org.
    quickstart: bool,
    /// The client's Connect monitoring message.
    connect: MonitorMessage,
}

/// The ledger entry of an established session: its Connect message, from which
/// [`settle`] makes the Disconnect.
pub fn entry(connect: MonitorMessage, org_prefix: &str, quickstart: bool) -> Vec<u8> {
    let entry = Entry {
        org_prefix: org_prefix.to_owned(),
        quickstart,
        connect,
    };
    serde_json::to_vec(&entry).unwrap_or_default()
}

/// The presence key of an identity: applications share one status per app ID, so their key is
/// the app; every other client's is its client ID.
pub fn presence(identity: &Identity) -> String {
    match identity.app_id() {
        Some(app) => format!("app:{}/{app}", identity.org),
        None => identity.client_id.clone(),
    }
}

/// The Disconnect (92, "settled after a proxy restart") owed for a ledger entry.
pub fn settle(entry: &[u8]) -> Option<Settlement> {
    settle_as(entry, &settled_after_restart())
}

/// The Disconnect owed for a ledger entry, closed with `refusal`.
pub fn settle_as(entry: &[u8], refusal: &Refusal) -> Option<Settlement> {
    let entry: Entry = serde_json::from_slice(entry).ok()?;
    let identity = parse_client_id(&entry.connect.client_id).ok()?;
    let code = code(refusal.cause);
    let mut message = entry.connect;
    message.action = Action::Disconnect;
    message.time = iso_time(SystemTime::now());
    message.close_code = code.number;
    message.reason = code.reason_string(refusal);
    let clear = clears_on_disconnect(identity.class, entry.quickstart);
    Some(Settlement {
        presence: presence(&identity),
        publications: publications(
            &message,
            &identity,
            &entry.org_prefix,
            entry.quickstart,
            clear,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let close = Refusal::new(Cause::ClientClosed);
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

    #[test]
    fn a_ledger_entry_settles_as_a_disconnect_92() {
        let device = parse_client_id("d:org1:sensor:d1").unwrap();
        let connect = MonitorMessage::new(
            Action::Connect,
            &device,
            &facts(),
            None,
            Counters::default(),
        );
        let settlement = settle(&entry(connect, "org1/", false)).unwrap();
        assert_eq!(settlement.presence, "d:org1:sensor:d1");
        let published = settlement.publications;
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].topic, "org1/iot-2/type/sensor/id/d1/mon");
        assert!(
            published[0].retain,
            "devices keep their retained Disconnect"
        );
        let status: serde_json::Value = serde_json::from_slice(&published[0].payload).unwrap();
        assert_eq!(status["Action"], "Disconnect");
        assert_eq!(status["CloseCode"], 92);
        assert!(settle(b"not json").is_none());
    }
}
