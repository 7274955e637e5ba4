//! MQTT 5 clients over an MQTT 3.1.1 broker (`upstream.capabilities.mqtt5: false`): the proxy
//! speaks MQTT 5 to the client and 3.1.1 to the broker, and what 3.1.1 cannot carry ends here.
//!
//! Each MQTT 5 feature is dropped, emulated or refused, as the table of `docs/brokers.md`
//! ("MQTT 5 clients over an MQTT 3.1.1 broker") says; this module holds those decisions and the
//! re-framing they need. The bridge asks for it only when the session is downgraded (an
//! [`Option`] that stays `None` in front of an MQTT 5 broker), so that path costs nothing.
//!
//! - Reason codes, Receive Maximum, Server Keep Alive, Maximum Packet Size and topic aliases
//!   from the client end at the proxy, which enforces or resolves them itself. The client's
//!   Receive Maximum is kept by holding back the broker's deliveries: once that many QoS 1/2
//!   deliveries wait for the client's acknowledgement, the bridge stops taking packets from the
//!   broker (they wait in the socket, then at the broker) until one completes.
//! - PUBLISH loses its properties on the way up (Response Topic and Correlation Data refuse the
//!   message instead: a request whose answer could never find its way back must not look
//!   delivered) and gains an empty property list on the way down.
//! - SUBSCRIBE keeps only the QoS of each filter's options; No Local and Subscription
//!   Identifiers are refused per filter, Retain As Published and Retain Handling are dropped.
//! - The broker's SUBACK and UNSUBACK get the MQTT 5 form (one reason code per filter), and the
//!   client's acknowledgements and DISCONNECT lose their reason codes; DISCONNECT 0x04 (with
//!   will) becomes a close without DISCONNECT, so that the broker publishes the will.

use std::collections::HashMap;

use bytes::BytesMut;

use super::packet_ids::PacketIds;
use crate::codec::{
    encode_unsuback_v5, for_each_property, property, publish_properties, Connect, Property,
    PropertyContext, PropertyValue, ProtocolVersion, PublishView,
};
use crate::refusal::{Cause, Refusal};

/// MQTT 3.1 limits client IDs to 23 bytes at many brokers; 3.1.1 has the same wire format for
/// everything a 3.1 client sends, so the proxy speaks 3.1.1 upstream for it. An MQTT 5 client is
/// downgraded to 3.1.1 when the broker does not speak MQTT 5.
pub fn upstream_version(client: ProtocolVersion, broker_mqtt5: bool) -> ProtocolVersion {
    match client {
        ProtocolVersion::V5 if broker_mqtt5 => ProtocolVersion::V5,
        _ => ProtocolVersion::V311,
    }
}

/// The Topic Alias Maximum the proxy offers an MQTT 5 client of a downgraded session: aliases
/// are resolved at the proxy (the broker never sees one), and each costs one topic string.
pub const TOPIC_ALIAS_MAXIMUM: u16 = 64;

/// The SUBACK reason code for a filter with No Local: "Implementation specific error".
pub const NO_LOCAL_REFUSED: u8 = 0x83;
/// The SUBACK reason code for a SUBSCRIBE with a Subscription Identifier.
pub const SUBSCRIPTION_IDENTIFIERS_REFUSED: u8 = 0xA1;
/// The PUBACK / PUBREC reason code for a PUBLISH with a property the broker cannot carry.
pub const PROPERTY_REFUSED: u8 = 0x83;

/// The state of one downgraded session: what the MQTT 5 answers need that the 3.1.1 broker's
/// do not say.
#[derive(Debug, Default)]
pub struct Downgrade {
    /// The client's UNSUBSCRIBEs the broker has not answered, by packet id: how many filters
    /// each had, for the one reason code per filter of the MQTT 5 UNSUBACK. Bounded by the
    /// packet id space, and emptied as the broker answers.
    unsubscribes: HashMap<u16, usize>,
    /// The client's Receive Maximum.
    receive_maximum: u16,
    /// QoS 1/2 deliveries the client has not completed (PUBACK; PUBCOMP, or a PUBREC that
    /// refuses), by packet id: at most `receive_maximum`.
    unacknowledged: PacketIds,
}

impl Downgrade {
    /// The state of a session whose client set Receive Maximum `receive_maximum`.
    pub fn new(receive_maximum: u16) -> Downgrade {
        Downgrade {
            receive_maximum,
            ..Downgrade::default()
        }
    }

    /// Whether the client takes no more QoS 1/2 deliveries until one completes.
    pub fn window_full(&self) -> bool {
        self.unacknowledged.len() >= usize::from(self.receive_maximum)
    }

    /// A QoS 1/2 delivery went to the client.
    pub fn delivered(&mut self, packet_id: u16) {
        self.unacknowledged.insert(packet_id);
    }

    /// The client completed (or refused) the delivery `packet_id`.
    pub fn completed(&mut self, packet_id: u16) {
        self.unacknowledged.remove(&packet_id);
    }

    /// A client UNSUBSCRIBE with `filters` filters was forwarded.
    pub fn unsubscribed(&mut self, packet_id: u16, filters: usize) {
        self.unsubscribes.insert(packet_id, filters);
    }

    /// Writes the MQTT 5 UNSUBACK for the broker's 3.1.1 one: success for every filter (3.1.1
    /// brokers answer nothing else; a filter with no subscription is 0x11 in MQTT 5, which a
    /// 3.1.1 broker cannot tell, so the proxy cannot either).
    pub fn unsuback(&mut self, out: &mut BytesMut, packet_id: u16) {
        let filters = self.unsubscribes.remove(&packet_id).unwrap_or(1);
        encode_unsuback_v5(out, packet_id, &vec![0; filters]);
    }
}

/// The 3.1.1 Clean Session flag for an MQTT 5 CONNECT. MQTT 5 splits it in two: Clean Start
/// (discard an old session) and Session Expiry Interval (keep this one after the close, 0 by
/// default). A 3.1.1 broker keeps a session only with Clean Session 0, and then for as long as
/// it likes; so a session is kept at the broker only when the client asks both to resume and to
/// keep it (Clean Start 0 and an expiry above 0); anything else starts clean.
pub fn clean_session(connect: &Connect<'_>) -> bool {
    let expiry = connect
        .properties
        .iter()
        .find_map(|p| match (p.id, p.value) {
            (property::SESSION_EXPIRY_INTERVAL, PropertyValue::U32(seconds)) => Some(seconds),
            _ => None,
        });
    connect.clean_start || expiry.unwrap_or(0) == 0
}

/// The properties of the CONNACK an MQTT 5 client of a downgraded session gets on top of the
/// ones the proxy always sets: the topic aliases it resolves, and no subscription identifiers.
pub fn connack_properties() -> [Property<'static>; 2] {
    [
        Property {
            id: property::TOPIC_ALIAS_MAXIMUM,
            value: PropertyValue::U16(TOPIC_ALIAS_MAXIMUM),
        },
        Property {
            id: property::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            value: PropertyValue::Byte(0),
        },
    ]
}

/// Whether an MQTT 5 PUBLISH may go to a 3.1.1 broker, which carries no property: Response
/// Topic and Correlation Data refuse it (the connection stays; the acknowledgement says 0x83),
/// every other property is dropped.
pub fn check_publish(body: &[u8], publish: &PublishView<'_>) -> Result<(), Refusal> {
    let mut refused = None;
    // The properties were validated when the PUBLISH was parsed.
    let _ = for_each_property(
        publish_properties(body, publish),
        PropertyContext::PublishFromClient,
        |property| match property.id {
            property::RESPONSE_TOPIC => {
                refused = Some("the broker speaks MQTT 3.1.1: no response topic")
            }
            property::CORRELATION_DATA if refused.is_none() => {
                refused = Some("the broker speaks MQTT 3.1.1: no correlation data")
            }
            _ => {}
        },
    );
    match refused {
        None => Ok(()),
        Some(detail) => Err(Refusal::with_detail(Cause::NotAuthorized, detail)
            .keeping_connection(Some(PROPERTY_REFUSED))
            .with_reason_on_ack()),
    }
}

/// Why a SUBSCRIBE filter cannot go to a 3.1.1 broker, as its SUBACK reason code and the words
/// for the reason string: a Subscription Identifier (the broker cannot say which subscription
/// a delivery matched), or No Local (the broker cannot say who published a delivery).
pub fn check_subscription(
    subscription_identifier: bool,
    options: u8,
) -> Option<(u8, &'static str)> {
    if subscription_identifier {
        return Some((
            SUBSCRIPTION_IDENTIFIERS_REFUSED,
            "the broker speaks MQTT 3.1.1: no subscription identifiers",
        ));
    }
    if options & 0x04 != 0 {
        return Some((
            NO_LOCAL_REFUSED,
            "the broker speaks MQTT 3.1.1: no No Local subscriptions",
        ));
    }
    None
}

/// Whether a SUBSCRIBE carries a Subscription Identifier.
pub fn has_subscription_identifier(properties: &[Property<'_>]) -> bool {
    properties
        .iter()
        .any(|p| p.id == property::SUBSCRIPTION_IDENTIFIER)
}

/// The subscription options a 3.1.1 broker understands: the QoS alone (Retain As Published and
/// Retain Handling are dropped).
pub fn options_for_broker(options: u8) -> u8 {
    options & 0x03
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{parse_publish, ProtocolVersion};

    fn publish_with(properties: &[u8]) -> Vec<u8> {
        // Topic "a/b", packet id 1, properties, payload "x".
        let mut body = vec![0, 3, b'a', b'/', b'b', 0, 1, properties.len() as u8];
        body.extend_from_slice(properties);
        body.push(b'x');
        body
    }

    #[test]
    fn a_publish_with_a_response_topic_or_correlation_data_is_refused_with_0x83() {
        let cases: [(&[u8], bool); 4] = [
            (&[], true),
            (&[0x03, 0, 1, b'j', 0x26, 0, 1, b'k', 0, 1, b'v'], true),
            (&[0x08, 0, 1, b'r'], false),
            (&[0x09, 0, 2, 1, 2], false),
        ];
        for (properties, accepted) in cases {
            let body = publish_with(properties);
            let view = parse_publish(0x32, &body, ProtocolVersion::V5, true).expect("valid");
            match check_publish(&body, &view) {
                Ok(()) => assert!(accepted, "{properties:?}"),
                Err(refusal) => {
                    assert!(!accepted, "{properties:?}");
                    assert!(refusal.keeps_connection);
                    assert_eq!(refusal.v5_ack(), 0x83);
                }
            }
        }
    }

    #[test]
    fn a_session_is_kept_at_the_broker_only_when_resumed_and_kept() {
        let expiry = |seconds| Property {
            id: property::SESSION_EXPIRY_INTERVAL,
            value: PropertyValue::U32(seconds),
        };
        let connect = |clean_start, properties| Connect {
            version: ProtocolVersion::V5,
            clean_start,
            keep_alive: 30,
            properties,
            client_id: "c",
            will: None,
            username: None,
            password: None,
        };
        assert!(clean_session(&connect(true, vec![])));
        assert!(clean_session(&connect(false, vec![])));
        assert!(clean_session(&connect(true, vec![expiry(60)])));
        assert!(clean_session(&connect(false, vec![expiry(0)])));
        assert!(!clean_session(&connect(false, vec![expiry(60)])));
    }

    #[test]
    fn subscription_options_keep_only_the_qos_and_refuse_what_cannot_be_kept() {
        assert_eq!(options_for_broker(0b0010_1001), 1);
        assert_eq!(check_subscription(false, 0b0010_1001), None);
        assert_eq!(check_subscription(false, 0x05).map(|(c, _)| c), Some(0x83));
        assert_eq!(check_subscription(true, 0x01).map(|(c, _)| c), Some(0xA1));
    }

    #[test]
    fn the_unsuback_has_one_reason_code_per_filter() {
        let mut downgrade = Downgrade::default();
        downgrade.unsubscribed(7, 3);
        let mut out = BytesMut::new();
        downgrade.unsuback(&mut out, 7);
        assert_eq!(&out[..], &[0xB0, 6, 0, 7, 0, 0, 0, 0]);
        out.clear();
        downgrade.unsuback(&mut out, 8);
        assert_eq!(&out[..], &[0xB0, 4, 0, 8, 0, 0]);
    }
}
