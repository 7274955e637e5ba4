//! Differential interop tests: cross-checks this codec against `mqttbytes` 0.6, an independent
//! MQTT 3.1.1 and 5 implementation. Frames our encoders write are decoded by mqttbytes, frames
//! mqttbytes writes are parsed by us, and every field is compared, not just "it parses". Where
//! mqttbytes differs (a gap or bug of its own, or a check we make on purpose), a test keeps to the
//! common ground and says why in one line. Compiled only as the `#[cfg(test)]` module of
//! `codec.rs`.

use std::fmt::Debug;

use bytes::{Bytes, BytesMut};
use mqttbytes::{v4, v5, QoS};

use super::property::*;
use super::*;
use PacketType::{Puback, Pubcomp, Pubrec, Pubrel};
use PropertyValue::{Binary, Byte, Pair, Str, Varint, U16, U32};
use ProtocolVersion::{V31, V311, V5};
use QoS::{AtLeastOnce, AtMostOnce, ExactlyOnce};

const MAX: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers: frames and values.
// ---------------------------------------------------------------------------------------------

/// Splits one complete frame into first byte and body with our framing, checking that mqttbytes
/// frames it identically.
fn split(frame: &[u8]) -> (u8, &[u8]) {
    let ours = decode_frame_header(frame, MAX)
        .expect("our frame header")
        .expect("complete frame header");
    let theirs = mqttbytes::check(frame.iter(), MAX).expect("mqttbytes frame header");
    assert_eq!(ours.frame_len(), frame.len(), "our frame length");
    assert_eq!(theirs.frame_length(), frame.len(), "mqttbytes frame length");
    (ours.first_byte, &frame[ours.header_len..])
}

/// The frame one of our encoders writes, checked to frame alike in both codecs.
fn encoded(encode: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut out = BytesMut::new();
    encode(&mut out);
    split(&out);
    out
}

/// The frame an mqttbytes `write` produces.
fn written(write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>) -> Vec<u8> {
    let mut out = BytesMut::new();
    write(&mut out).expect("mqttbytes writes the packet");
    out.to_vec()
}

/// Decodes one whole frame with mqttbytes' `v4::read` (MQTT 3.1.1) or `v5::read`.
fn read_with<P>(frame: &[u8], read: fn(&mut BytesMut, usize) -> Result<P, mqttbytes::Error>) -> P {
    let mut stream = BytesMut::from(frame);
    let packet = read(&mut stream, MAX);
    let packet = packet.unwrap_or_else(|e| panic!("mqttbytes rejects {frame:02x?}: {e:?}"));
    assert!(stream.is_empty(), "mqttbytes left bytes of the frame");
    packet
}

/// `read!(v5::Connect, frame)`: decodes one whole frame with mqttbytes as that packet.
macro_rules! read {
    ($v:ident::$kind:ident, $frame:expr) => {
        match read_with($frame, $v::read) {
            $v::Packet::$kind(packet) => packet,
            other => panic!("not a {}: {other:?}", stringify!($kind)),
        }
    };
}

/// Checks a frame: it frames alike in both codecs, we read its packet type as `kind`, and
/// `parse` (given first byte and body) reads `expected` from it.
fn assert_parses<'f, T: PartialEq + Debug>(
    frame: &'f [u8],
    version: ProtocolVersion,
    kind: PacketType,
    parse: impl FnOnce(u8, &'f [u8]) -> Result<T, CodecError>,
    expected: T,
) {
    let (first_byte, body) = split(frame);
    assert_eq!(packet_type(first_byte, version), Ok(kind), "{frame:02x?}");
    assert_eq!(parse(first_byte, body), Ok(expected), "{frame:02x?}");
}

fn qos(level: u8) -> QoS {
    mqttbytes::qos(level).expect("QoS 0..=2")
}

fn prop(id: u8, value: PropertyValue<'_>) -> Property<'_> {
    Property { id, value }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let pair = |(k, v): &(&str, &str)| ((*k).to_owned(), (*v).to_owned());
    list.iter().map(pair).collect()
}

fn text(text: &str) -> Option<String> {
    Some(text.to_owned())
}

/// Payloads that take one, two and three bytes of Remaining Length, with every byte value.
fn payloads() -> Vec<Vec<u8>> {
    let all_bytes: Vec<u8> = (0..=255).collect();
    let long = all_bytes.iter().cycle().take(20_000).copied().collect();
    vec![Vec::new(), b"{\"t\":21.5}".to_vec(), all_bytes, long]
}

/// Every (payload, case) of [`payloads`] and `cases`.
fn with_payloads<T: Clone>(cases: &[T]) -> Vec<(Vec<u8>, T)> {
    let with = |payload: Vec<u8>| cases.iter().map(move |c| (payload.clone(), c.clone()));
    payloads().into_iter().flat_map(with).collect()
}

/// Every valid (QoS, DUP, RETAIN) of a PUBLISH. DUP with QoS 0 is malformed ([MQTT-3.3.1-2]),
/// though mqttbytes writes it anyway.
fn flags() -> Vec<(u8, bool, bool)> {
    let all = (0..=2).flat_map(|q| [false, true].map(|dup| [(q, dup, false), (q, dup, true)]));
    all.flatten().filter(|&(q, dup, _)| q > 0 || !dup).collect()
}

/// A topic or filter in parts, one a level, the way the proxy splices them.
fn levels(path: &str) -> Vec<&[u8]> {
    path.split_inclusive('/').map(str::as_bytes).collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers: mqttbytes' properties as ours.
// ---------------------------------------------------------------------------------------------

/// One field of an mqttbytes property struct, as our properties with identifier `id`.
trait Field {
    fn props(&self, id: u8) -> Vec<Property<'_>>;
}

/// Implements [`Field`] for each field type mqttbytes uses, mapped to its property value.
macro_rules! field {
    ($($t:ty => |$v:ident| $value:expr;)+) => {$(
        impl Field for $t {
            fn props(&self, id: u8) -> Vec<Property<'_>> {
                self.iter().map(|$v| Property { id, value: $value }).collect()
            }
        }
    )+};
}

field! {
    Option<u8> => |v| Byte(*v);
    Option<u16> => |v| U16(*v);
    Option<u32> => |v| U32(*v);
    Option<String> => |v| Str(v);
    Option<Bytes> => |v| Binary(v);
    Option<usize> => |v| Varint(u32::try_from(*v).expect("subscription identifier fits a varint"));
    Vec<usize> => |v| Varint(u32::try_from(*v).expect("subscription identifier fits a varint"));
    Vec<(String, String)> => |v| Pair(&v.0, &v.1);
}

/// `props_fns! { name(Type) { ID: field, … } … }`: for each mqttbytes property struct, a function
/// that lists its properties as ours, in the order mqttbytes writes them.
macro_rules! props_fns {
    ($($name:ident($t:ty) { $($id:ident: $field:ident),+ $(,)? })+) => {$(
        fn $name(p: &$t) -> Vec<Property<'_>> {
            let fields: &[(u8, &dyn Field)] = &[$(($id, &p.$field)),+];
            fields.iter().flat_map(|&(id, field)| field.props(id)).collect()
        }
    )+};
}

props_fns! {
    connect_props(v5::ConnectProperties) {
        SESSION_EXPIRY_INTERVAL: session_expiry_interval, RECEIVE_MAXIMUM: receive_maximum,
        MAXIMUM_PACKET_SIZE: max_packet_size, TOPIC_ALIAS_MAXIMUM: topic_alias_max,
        REQUEST_RESPONSE_INFORMATION: request_response_info,
        REQUEST_PROBLEM_INFORMATION: request_problem_info, USER_PROPERTY: user_properties,
        AUTHENTICATION_METHOD: authentication_method, AUTHENTICATION_DATA: authentication_data,
    }
    will_props(v5::WillProperties) {
        WILL_DELAY_INTERVAL: delay_interval, PAYLOAD_FORMAT_INDICATOR: payload_format_indicator,
        MESSAGE_EXPIRY_INTERVAL: message_expiry_interval, CONTENT_TYPE: content_type,
        RESPONSE_TOPIC: response_topic, CORRELATION_DATA: correlation_data,
        USER_PROPERTY: user_properties,
    }
    publish_props(v5::PublishProperties) {
        PAYLOAD_FORMAT_INDICATOR: payload_format_indicator,
        MESSAGE_EXPIRY_INTERVAL: message_expiry_interval, TOPIC_ALIAS: topic_alias,
        RESPONSE_TOPIC: response_topic, CORRELATION_DATA: correlation_data,
        USER_PROPERTY: user_properties, SUBSCRIPTION_IDENTIFIER: subscription_identifiers,
        CONTENT_TYPE: content_type,
    }
    connack_props(v5::ConnAckProperties) {
        SESSION_EXPIRY_INTERVAL: session_expiry_interval, RECEIVE_MAXIMUM: receive_max,
        MAXIMUM_QOS: max_qos, RETAIN_AVAILABLE: retain_available,
        MAXIMUM_PACKET_SIZE: max_packet_size,
        ASSIGNED_CLIENT_IDENTIFIER: assigned_client_identifier,
        TOPIC_ALIAS_MAXIMUM: topic_alias_max, REASON_STRING: reason_string,
        USER_PROPERTY: user_properties,
        WILDCARD_SUBSCRIPTION_AVAILABLE: wildcard_subscription_available,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE: subscription_identifiers_available,
        SHARED_SUBSCRIPTION_AVAILABLE: shared_subscription_available,
        SERVER_KEEP_ALIVE: server_keep_alive, RESPONSE_INFORMATION: response_information,
        SERVER_REFERENCE: server_reference, AUTHENTICATION_METHOD: authentication_method,
        AUTHENTICATION_DATA: authentication_data,
    }
    subscribe_props(v5::SubscribeProperties) {
        SUBSCRIPTION_IDENTIFIER: id, USER_PROPERTY: user_properties,
    }
    suback_props(v5::SubAckProperties) {
        REASON_STRING: reason_string, USER_PROPERTY: user_properties,
    }
    unsubscribe_props(v5::UnsubscribeProperties) {
        USER_PROPERTY: user_properties,
    }
}

/// The properties mqttbytes holds in `properties` (none when absent), as ours.
fn props_of<'a, T>(
    properties: &'a Option<T>,
    list: fn(&'a T) -> Vec<Property<'a>>,
) -> Vec<Property<'a>> {
    properties.as_ref().map(list).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Helpers: mqttbytes' packets. Each is held in its MQTT 5 type; its MQTT 3.1.1 form is the `v4`
// type with the same fields (and nothing MQTT 5 adds).
// ---------------------------------------------------------------------------------------------

/// An mqttbytes packet as both directions use it.
trait Theirs: PartialEq + Debug {
    /// The frame mqttbytes writes for it.
    fn frame(&self, version: ProtocolVersion) -> Vec<u8>;
    /// Checks that mqttbytes reads it from `frame`, its own struct compared whole, so every field
    /// by name.
    fn assert_read(&self, version: ProtocolVersion, frame: &[u8]);
}

/// `theirs! { Packet => its_v4_form, … }`: implements [`Theirs`].
macro_rules! theirs {
    ($($kind:ident => $v4:ident),+) => {$(
        impl Theirs for v5::$kind {
            fn frame(&self, version: ProtocolVersion) -> Vec<u8> {
                assert!(version == V5 || self.properties.is_none(), "MQTT 3.1.1 has none");
                match version {
                    V5 => written(|out| self.write(out)),
                    _ => written(|out| $v4(self).write(out)),
                }
            }
            fn assert_read(&self, version: ProtocolVersion, frame: &[u8]) {
                assert!(version == V5 || self.properties.is_none(), "MQTT 3.1.1 has none");
                match version {
                    V5 => assert_eq!(read!(v5::$kind, frame), *self),
                    _ => assert_eq!(read!(v4::$kind, frame), $v4(self)),
                }
            }
        }
    )+};
}

theirs! {
    Connect => v4_connect, Publish => v4_publish, Subscribe => v4_subscribe,
    Unsubscribe => v4_unsubscribe, SubAck => v4_suback
}

fn v4_connect(c: &v5::Connect) -> v4::Connect {
    let mut v4 = v4::Connect::new(c.client_id.as_str());
    (v4.keep_alive, v4.clean_session) = (c.keep_alive, c.clean_session);
    let will = |w: &v5::LastWill| v4::LastWill::new(&w.topic, w.message.to_vec(), w.qos, w.retain);
    v4.last_will = c.last_will.as_ref().map(will);
    let login = |l: &v5::Login| v4::Login::new(l.username.as_str(), l.password.as_str());
    v4.login = c.login.as_ref().map(login);
    v4
}

fn v4_publish(p: &v5::Publish) -> v4::Publish {
    let mut v4 = v4::Publish::new(p.topic.as_str(), p.qos, p.payload.to_vec());
    (v4.dup, v4.retain, v4.pkid) = (p.dup, p.retain, p.pkid);
    v4
}

fn v4_subscribe(subscribe: &v5::Subscribe) -> v4::Subscribe {
    let filter = |f: &v5::SubscribeFilter| v4::SubscribeFilter::new(f.path.clone(), f.qos);
    let mut v4 = v4::Subscribe::new_many(subscribe.filters.iter().map(filter));
    v4.pkid = subscribe.pkid;
    v4
}

fn v4_unsubscribe(unsubscribe: &v5::Unsubscribe) -> v4::Unsubscribe {
    let (pkid, topics) = (unsubscribe.pkid, unsubscribe.filters.clone());
    v4::Unsubscribe { pkid, topics }
}

fn v4_suback(suback: &v5::SubAck) -> v4::SubAck {
    let code = |c: &v5::SubscribeReasonCode| v4::SubscribeReasonCode::try_from(*c as u8);
    let codes: Result<_, _> = suback.return_codes.iter().map(code).collect();
    v4::SubAck::new(suback.pkid, codes.expect("an MQTT 3.1.1 return code"))
}

/// mqttbytes' CONNECT as ours. mqttbytes leaves an empty user name or password out, flag and
/// field, and reads an absent one as "".
fn connect_as_ours(version: ProtocolVersion, theirs: &v5::Connect) -> Connect<'_> {
    fn will(w: &v5::LastWill) -> Will<'_> {
        Will {
            properties: props_of(&w.properties, will_props),
            topic: &w.topic,
            payload: &w.message,
            qos: w.qos as u8,
            retain: w.retain,
        }
    }
    let login = theirs.login.as_ref();
    Connect {
        version,
        clean_start: theirs.clean_session,
        keep_alive: theirs.keep_alive,
        properties: props_of(&theirs.properties, connect_props),
        client_id: &theirs.client_id,
        will: theirs.last_will.as_ref().map(will),
        username: login.map(|l| l.username.as_str()).filter(|u| !u.is_empty()),
        password: login
            .map(|l| l.password.as_bytes())
            .filter(|p| !p.is_empty()),
    }
}

/// An mqttbytes CONNECT.
fn their_connect(
    client_id: &str,
    (keep_alive, clean_session): (u16, bool),
    last_will: Option<v5::LastWill>,
    login: Option<(&str, &str)>,
    properties: Option<v5::ConnectProperties>,
) -> v5::Connect {
    let mut connect = v5::Connect::new(client_id);
    (connect.keep_alive, connect.clean_session) = (keep_alive, clean_session);
    (connect.last_will, connect.properties) = (last_will, properties);
    connect.login = login.map(|(username, password)| v5::Login::new(username, password));
    connect
}

fn their_will(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Option<v5::LastWill> {
    Some(v5::LastWill::new(topic, payload, qos, retain))
}

/// An mqttbytes PUBLISH without properties, with `flags` (QoS, DUP, RETAIN) and, above QoS 0,
/// the packet identifier `pkid`.
fn their_publish(topic: &str, flags: (u8, bool, bool), pkid: u16, payload: &[u8]) -> v5::Publish {
    let (qos_level, dup, retain) = flags;
    let mut publish = v5::Publish::new(topic, qos(qos_level), payload);
    (publish.dup, publish.retain) = (dup, retain);
    publish.pkid = if qos_level == 0 { 0 } else { pkid };
    publish
}

#[rustfmt::skip]
fn publish_props_with(topic_alias: Option<u16>, user_properties: Vec<(String, String)>) -> v5::PublishProperties {
    v5::PublishProperties {
        payload_format_indicator: None, message_expiry_interval: None, topic_alias, response_topic: None,
        correlation_data: None, user_properties, subscription_identifiers: vec![], content_type: None,
    }
}

/// An MQTT 5 subscription with these options bits: QoS, No Local, Retain As Published and Retain
/// Handling.
fn v5_filter(path: &str, options: u8) -> v5::SubscribeFilter {
    use v5::RetainForwardRule::{Never, OnEverySubscribe, OnNewSubscribe};
    let rule = [OnEverySubscribe, OnNewSubscribe, Never][usize::from(options >> 4)].clone();
    let mut filter = v5::SubscribeFilter::new(path.to_owned(), qos(options & 0x03));
    filter
        .set_nolocal(options & 0x04 != 0)
        .set_preserve_retain(options & 0x08 != 0);
    filter.set_retain_forward_rule(rule);
    filter
}

/// The options byte of an MQTT 5 subscription in mqttbytes' terms.
fn options_v5(filter: &v5::SubscribeFilter) -> u8 {
    let rule = match filter.retain_forward_rule {
        v5::RetainForwardRule::OnEverySubscribe => 0,
        v5::RetainForwardRule::OnNewSubscribe => 1,
        v5::RetainForwardRule::Never => 2,
    };
    let flags = u8::from(filter.nolocal) << 2 | u8::from(filter.preserve_retain) << 3;
    filter.qos as u8 | flags | rule << 4
}

/// An mqttbytes packet both directions check through its parse in our terms.
trait Parsed: Theirs {
    /// Checks that we parse `frame` as this packet.
    fn assert_parsed(&self, version: ProtocolVersion, frame: &[u8]);
}

/// `parsed! { Packet(theirs, version) => Kind, parse, ours; … }`: implements [`Parsed`]: we read
/// the frame's type as `Kind`, and `parse` (given first byte and body) reads it as `ours`,
/// mqttbytes' packet `theirs` in our terms.
macro_rules! parsed {
    ($($packet:ident($t:ident, $v:ident) => $kind:ident, $parse:expr, $ours:expr;)+) => {$(
        impl Parsed for v5::$packet {
            fn assert_parsed(&self, $v: ProtocolVersion, frame: &[u8]) {
                let $t = self;
                assert_parses(frame, $v, PacketType::$kind, $parse, $ours);
            }
        }
    )+};
}

parsed! {
    Connect(theirs, version) => Connect, parse_connect, connect_as_ours(version, theirs);
    Subscribe(theirs, version) => Subscribe, |first_byte, body| parse_subscribe(first_byte, body, version), Subscribe {
        packet_id: theirs.pkid,
        properties: props_of(&theirs.properties, subscribe_props),
        filters: theirs.filters.iter().map(|f| SubscribeFilter { filter: &f.path, options: options_v5(f) }).collect(),
    };
    Unsubscribe(theirs, version) => Unsubscribe, |first_byte, body| parse_unsubscribe(first_byte, body, version), Unsubscribe {
        packet_id: theirs.pkid,
        properties: props_of(&theirs.properties, unsubscribe_props),
        filters: theirs.filters.iter().map(String::as_str).collect(),
    };
    SubAck(theirs, version) => Suback, |_, body| parse_suback(body, version), Suback {
        packet_id: theirs.pkid,
        properties: props_of(&theirs.properties, suback_props),
        codes: &theirs.return_codes.iter().map(|&code| code as u8).collect::<Vec<_>>(),
    };
}

/// Encodes each case with ours (`encode`), and checks that we parse our frame back as the case
/// and mqttbytes reads the case from it.
fn check_ours<T: Parsed>(
    cases: &[(ProtocolVersion, T)],
    encode: impl Fn(&mut BytesMut, ProtocolVersion, &T),
) {
    for (version, theirs) in cases {
        let frame = encoded(|out| encode(out, *version, theirs));
        theirs.assert_parsed(*version, &frame);
        theirs.assert_read(*version, &frame);
    }
}

/// Writes each case with mqttbytes and checks that we parse it as the case.
fn check_theirs<T: Parsed>(cases: &[(ProtocolVersion, T)]) {
    for (version, theirs) in cases {
        theirs.assert_parsed(*version, &theirs.frame(*version));
    }
}

/// mqttbytes' reading of a PUBACK, PUBREC, PUBREL or PUBCOMP: (type, packet id, reason code,
/// Reason String), checking it has no user properties. MQTT 3.1.1 acks carry neither.
fn their_ack(version: ProtocolVersion, frame: &[u8]) -> (PacketType, u16, u8, Option<String>) {
    macro_rules! ack {
        ($v:ident, |$a:ident| $rest:expr) => {
            match read_with(frame, $v::read) {
                $v::Packet::PubAck($a) => (Puback, $a.pkid, $rest),
                $v::Packet::PubRec($a) => (Pubrec, $a.pkid, $rest),
                $v::Packet::PubRel($a) => (Pubrel, $a.pkid, $rest),
                $v::Packet::PubComp($a) => (Pubcomp, $a.pkid, $rest),
                other => panic!("not an ack: {other:?}"),
            }
        };
    }
    let (kind, pkid, (code, props)) = match version {
        V5 => ack!(v5, |a| (
            a.reason as u8,
            a.properties.map(|p| (p.reason_string, p.user_properties))
        )),
        _ => ack!(v4, |a| (0, None)),
    };
    let (reason, user_properties) = props.unwrap_or_default();
    assert!(user_properties.is_empty(), "{user_properties:?}");
    (kind, pkid, code, reason)
}

/// mqttbytes' reading of a CONNACK: (Session Present, code, properties). MQTT 3.1.1 has none.
fn their_connack(
    version: ProtocolVersion,
    frame: &[u8],
) -> (bool, u8, Option<v5::ConnAckProperties>) {
    if version == V5 {
        let theirs = read!(v5::ConnAck, frame);
        return (theirs.session_present, theirs.code as u8, theirs.properties);
    }
    let theirs = read!(v4::ConnAck, frame);
    (theirs.session_present, theirs.code as u8, None)
}

/// An mqttbytes MQTT 3.1.1 PUBACK, PUBREC, PUBREL or PUBCOMP.
fn v4_ack(kind: PacketType, pkid: u16) -> Vec<u8> {
    match kind {
        Puback => written(|out| v4::PubAck::new(pkid).write(out)),
        Pubrec => written(|out| v4::PubRec::new(pkid).write(out)),
        Pubrel => written(|out| v4::PubRel::new(pkid).write(out)),
        _ => written(|out| v4::PubComp::new(pkid).write(out)),
    }
}

/// `v5_acks! { props; Kind Ack AckProperties AckReason: Reason => id, …; … }`: mqttbytes MQTT 5
/// acks as (type, packet id, frame), one a reason, each with the properties `props`
/// (`Option<(reason string, user properties)>`). Their types differ, their fields do not.
macro_rules! v5_acks {
    ($props:expr; $($kind:ident $ack:ident $ack_props:ident $reasons:ident: $($reason:ident => $id:expr),+;)+) => {
        [$($({
            let properties = $props.clone().map(|(reason_string, user_properties)| v5::$ack_props { reason_string, user_properties });
            let ack = v5::$ack { pkid: $id, reason: v5::$reasons::$reason, properties };
            ($kind, $id, written(|out| ack.write(out)))
        },)+)+]
    };
}

fn connack(session_present: bool, code: u8, properties: Vec<Property<'_>>) -> Connack<'_> {
    Connack {
        session_present,
        code,
        properties,
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures: the packets both directions go through, in mqttbytes' terms.
// ---------------------------------------------------------------------------------------------

/// MQTT 3.1.1 CONNECTs. mqttbytes reads a password as a string, so these are UTF-8.
#[rustfmt::skip]
fn v311_connects() -> Vec<(ProtocolVersion, v5::Connect)> {
    let status = |qos, retain| their_will("things/type/sensor/id/s-1/evt/status/fmt/json", b"{\"online\":false}", qos, retain);
    let lwt = their_will("things/evt/lwt/fmt/txt", b"gone\x00\xff", ExactlyOnce, true);
    [
        their_connect("d:org1:sensor:s-1", (60, true), status(AtLeastOnce, true), Some(("use-token-auth", "t0ken-\u{e9}")), None),
        their_connect("a:org1:app", (0, false), status(ExactlyOnce, false), Some(("a-org1-key", "")), None),
        their_connect("", (u16::MAX, true), status(AtMostOnce, false), None, None),
        their_connect("g:org1:gw:g-1", (300, false), None, Some(("use-token-auth", "secret")), None),
        their_connect("a:org1:app-1", (45, false), lwt, Some(("a-org1-key", "t0ken")), None),
        v5::Connect::new("d:org1:sensor:s-1"),
        their_connect("", (0, true), their_will("lwt", b"", AtMostOnce, false), Some(("user-only", "")), None),
        their_connect("g:org1:gw:g-1", (u16::MAX, true), their_will("w", b"x", AtLeastOnce, false), Some(("use-token-auth", "p")), None),
    ]
    .map(|connect| (V311, connect)).to_vec()
}

/// MQTT 5 CONNECTs.
#[rustfmt::skip]
fn v5_connects() -> Vec<(ProtocolVersion, v5::Connect)> {
    let sensor = v5::ConnectProperties {
        session_expiry_interval: Some(3600), receive_maximum: Some(20), max_packet_size: Some(262_144),
        topic_alias_max: Some(10), request_response_info: Some(1), request_problem_info: Some(0),
        user_properties: pairs(&[("region", "eu-de"), ("region", "eu-gb")]),
        authentication_method: text("SCRAM-SHA-256"),
        authentication_data: Some(Bytes::from_static(&[0x00, 0x01, 0x02, 0xFF])),
    };
    let sensor_will = v5::WillProperties {
        delay_interval: Some(30), payload_format_indicator: Some(1), message_expiry_interval: Some(600),
        content_type: text("application/json"), response_topic: text("things/cmd/ack/fmt/json"),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")), user_properties: pairs(&[("k", "v")]),
    };
    let app = v5::ConnectProperties {
        session_expiry_interval: Some(7200), receive_maximum: Some(16), max_packet_size: Some(1 << 20),
        topic_alias_max: Some(5), request_response_info: Some(1), request_problem_info: Some(0),
        user_properties: pairs(&[("a", "1"), ("a", "2"), ("", "")]),
        authentication_method: text("SCRAM-SHA-1"),
        authentication_data: Some(Bytes::from_static(b"\x00client-first")),
    };
    let app_will = v5::WillProperties {
        delay_interval: Some(10), payload_format_indicator: Some(1), message_expiry_interval: Some(3600),
        content_type: text("application/json"), response_topic: text("things/cmd/lwt-ack/fmt/json"),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2])), user_properties: pairs(&[("k", "v")]),
    };
    let forever = v5::ConnectProperties {
        session_expiry_interval: Some(u32::MAX), receive_maximum: None, max_packet_size: None,
        topic_alias_max: None, request_response_info: None, request_problem_info: None,
        user_properties: vec![], authentication_method: None, authentication_data: None,
    };
    let with = |will: Option<v5::LastWill>, p| will.map(|w| v5::LastWill { properties: Some(p), ..w });
    let sensor_lwt = with(their_will("things/evt/lwt/fmt/json", b"{\"online\":false}", AtLeastOnce, true), sensor_will);
    let app_lwt = with(their_will("things/evt/lwt/fmt/json", b"{}", AtLeastOnce, true), app_will);
    let lwt = their_will("lwt", b"", ExactlyOnce, false);
    [
        their_connect("d:org1:sensor:s-1", (45, true), sensor_lwt, Some(("use-token-auth", "t0ken")), Some(sensor)),
        // MQTT 5 allows a password without a user name.
        their_connect("", (0, false), lwt.clone(), Some(("", "only-a-password")), Some(forever.clone())),
        their_connect("a:org1:app", (60, true), None, None, None),
        their_connect("d:org1:sensor:s-1", (30, true), app_lwt, Some(("use-token-auth", "t0ken")), Some(app)),
        v5::Connect::new("a:org1:app"),
        their_connect("", (0, false), lwt, Some(("", "password-only")), Some(forever)),
    ]
    .map(|connect| (V5, connect)).to_vec()
}

/// SUBSCRIBEs: QoS 0, 1 and 2; for MQTT 5 also No Local, Retain As Published, Retain Handling
/// 0..=2, a shared subscription and properties. No Local on a shared subscription is a protocol
/// error ([MQTT-3.8.3-4]), so not here.
#[rustfmt::skip]
fn subscribes() -> Vec<(ProtocolVersion, v5::Subscribe)> {
    let subscribe = |pkid, filters: &[(&str, u8)], properties| {
        let filters = filters.iter().map(|&(path, options)| v5_filter(path, options)).collect();
        v5::Subscribe { pkid, filters, properties }
    };
    let with = |id, user_properties| Some(v5::SubscribeProperties { id: Some(id), user_properties });
    let proxy_v311 = [("org1/things/type/+/id/+/evt/+/fmt/+", 0), ("org1/things/cmd/#", 1), ("org1/a/b", 2)];
    let client_v311 = [("things/type/+/id/+/evt/+/fmt/+", 0), ("things/cmd/#", 1), ("#", 2), ("a/+/c", 1)];
    let proxy = [
        ("org1/things/type/+/id/+/evt/+/fmt/+", 0x01), ("$share/g1/org1/things/#", 0x02 | 0x08 | 0x20),
        ("org1/a/b", 0x04 | 0x10), ("org1/c", 0x04 | 0x08 | 0x20 | 0x02),
    ];
    let client = [
        ("things/type/+/id/+/evt/+/fmt/+", 0x01), ("$share/group/things/cmd/#", 0x02 | 0x08 | 0x20),
        ("org1/a/b", 0x04 | 0x10), ("+", 0x02 | 0x04 | 0x08 | 0x20),
    ];
    vec![
        (V311, subscribe(42, &proxy_v311[..], None)),
        (V311, subscribe(42, &client_v311, None)),
        (V5, subscribe(u16::MAX, &proxy, with(300, pairs(&[("k", "v")])))),
        (V5, subscribe(u16::MAX, &proxy, None)),
        (V5, subscribe(0xFFFF, &client, with(300, pairs(&[("k", "v")])))),
        (V5, subscribe(0xFFFF, &client, with(268_435_455, vec![]))),
        (V5, subscribe(0xFFFF, &client, None)),
    ]
}

/// UNSUBSCRIBEs.
#[rustfmt::skip]
fn unsubscribes() -> Vec<(ProtocolVersion, v5::Unsubscribe)> {
    let unsubscribe = |pkid, filters: &[&str], user_properties: Option<&[(&str, &str)]>| {
        let properties = user_properties.map(|p| v5::UnsubscribeProperties { user_properties: pairs(p) });
        v5::Unsubscribe { pkid, filters: filters.iter().map(|f| f.to_string()).collect(), properties }
    };
    let proxy = ["org1/things/type/+/id/+/evt/+/fmt/+", "$share/g1/org1/things/#", "org1/caf\u{e9}"];
    let client = ["things/type/+/id/+/evt/+/fmt/+", "things/cmd/#", "caf\u{e9}/+"];
    vec![
        (V311, unsubscribe(7, &proxy, None)),
        (V311, unsubscribe(5, &client, None)),
        (V5, unsubscribe(0x0102, &proxy, Some(&[("why", "done")]))),
        (V5, unsubscribe(0x0102, &proxy, None)),
        (V5, unsubscribe(0x8001, &client, Some(&[("why", "done"), ("", "x")]))),
        (V5, unsubscribe(0x8001, &client, None)),
    ]
}

/// SUBACKs: success codes and failures, for MQTT 5 with and without properties.
#[rustfmt::skip]
fn subacks() -> Vec<(ProtocolVersion, v5::SubAck)> {
    let suback = |pkid, codes: &[u8], properties| {
        let code = |&c: &u8| v5::SubscribeReasonCode::try_from(c).expect("a SUBACK code");
        v5::SubAck { pkid, return_codes: codes.iter().map(code).collect(), properties }
    };
    let reason = |text: &str, user_properties| Some(v5::SubAckProperties { reason_string: Some(text.to_owned()), user_properties });
    let v311 = [0x00, 0x01, 0x02, 0x80];
    let proxy = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
    let broker = [0x00, 0x02, 0x87, 0x8F, 0x9E];
    vec![
        (V311, suback(9, &v311[..], None)),
        (V311, suback(77, &v311, None)),
        (V5, suback(0xFFFE, &proxy, reason("not authorized: things/cmd/#", vec![]))),
        (V5, suback(0xFFFE, &proxy, None)),
        (V5, suback(78, &broker, reason("partly refused", pairs(&[("k", "v")])))),
        (V5, suback(78, &broker, None)),
    ]
}

/// CONNACK properties: all of them (twice, as the proxy and as a broker sends them), a Reason
/// String alone, and none.
#[rustfmt::skip]
fn connack_properties() -> Vec<Option<v5::ConnAckProperties>> {
    let proxy = v5::ConnAckProperties {
        session_expiry_interval: Some(0), receive_max: Some(100), max_qos: Some(1), retain_available: Some(0),
        max_packet_size: Some(131_072), assigned_client_identifier: text("auto-1234"), topic_alias_max: Some(0),
        reason_string: text("welcome"), user_properties: pairs(&[("org", "org1")]),
        wildcard_subscription_available: Some(1), subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(1), server_keep_alive: Some(120),
        response_information: text("org1/responses"), server_reference: text("other.example.com:8883"),
        authentication_method: text("SCRAM-SHA-256"), authentication_data: Some(Bytes::from_static(&[1, 2, 3])),
    };
    let mut broker = v5::ConnAckProperties::new();
    (broker.session_expiry_interval, broker.receive_max, broker.max_qos) = (Some(60), Some(10), Some(1));
    (broker.retain_available, broker.max_packet_size, broker.topic_alias_max) = (Some(1), Some(65_536), Some(3));
    (broker.assigned_client_identifier, broker.reason_string) = (text("auto-7"), text("ok"));
    broker.user_properties = pairs(&[("broker", "mosquitto")]);
    (broker.wildcard_subscription_available, broker.subscription_identifiers_available) = (Some(1), Some(1));
    (broker.shared_subscription_available, broker.server_keep_alive) = (Some(0), Some(30));
    (broker.response_information, broker.server_reference) = (text("resp/"), text("b2.example.com"));
    broker.authentication_method = text("SCRAM-SHA-256");
    broker.authentication_data = Some(Bytes::from_static(b"server-final"));
    let reason = v5::ConnAckProperties { reason_string: text("no"), ..v5::ConnAckProperties::new() };
    vec![Some(proxy), Some(broker), Some(reason), None]
}

// ---------------------------------------------------------------------------------------------
// Our encoders, decoded by mqttbytes.
// ---------------------------------------------------------------------------------------------

/// Our CONNECT of mqttbytes' `theirs`.
fn encode_connect_of(out: &mut BytesMut, version: ProtocolVersion, theirs: &v5::Connect) {
    encode_connect(out, &connect_as_ours(version, theirs));
}

#[test]
fn our_connect_v311_decodes_in_mqttbytes() {
    let connects = v311_connects();
    check_ours(&connects, encode_connect_of);

    // mqttbytes knows no MQTT 3.1 (`MQIsdp`, level 3), which we accept on purpose.
    let mut frame = encoded(|out| encode_connect_of(out, V31, &connects[3].1));
    let theirs = v4::read(&mut frame, MAX);
    assert_eq!(theirs, Err(mqttbytes::Error::InvalidProtocol));
}

#[test]
fn our_connect_v5_decodes_in_mqttbytes() {
    check_ours(&v5_connects(), encode_connect_of);
}

/// The proxy's rewrite: parse a PUBLISH, splice a new topic (in parts) in front of the untouched
/// rest (packet id, MQTT 5 properties, payload), and drop RETAIN.
#[test]
fn our_publish_rewrite_decodes_in_mqttbytes() {
    let topic = "things/type/sensor/id/s-1/evt/temp/fmt/json";
    #[rustfmt::skip]
    let properties = v5::PublishProperties {
        payload_format_indicator: Some(0), message_expiry_interval: Some(120),
        response_topic: text("things/cmd/reply/fmt/json"), correlation_data: Some(Bytes::from_static(b"\x00corr")),
        content_type: text("application/json"), ..publish_props_with(None, pairs(&[("a", "1"), ("a", "2")]))
    };
    for version in [V311, V5] {
        for (payload, flags) in with_payloads(&flags()) {
            let mut original = their_publish(topic, flags, 0xBEEF, &payload);
            original.properties = (version == V5).then(|| properties.clone());
            let frame = original.frame(version);
            let (first_byte, body) = split(&frame);
            let view = parse_publish(first_byte, body, version, true).expect("our parse");
            let parts: [&[u8]; 3] = [b"org1", b"/", view.topic.as_bytes()];
            let rest = &body[view.after_topic.clone()];
            let frame = encoded(|out| encode_publish(out, first_byte & !0x01, &parts, rest));
            (original.topic, original.retain) = (format!("org1/{topic}"), false);
            original.assert_read(version, &frame);
        }
    }
}

#[test]
fn our_publish_with_properties_decodes_in_mqttbytes() {
    // Rewritten: the alias resolved into a topic, new properties.
    let new_properties = [
        prop(PAYLOAD_FORMAT_INDICATOR, Byte(1)),
        prop(MESSAGE_EXPIRY_INTERVAL, U32(86_400)),
        prop(RESPONSE_TOPIC, Str("org1/reply")),
        prop(CORRELATION_DATA, Binary(&[0xFF, 0x00])),
        prop(USER_PROPERTY, Pair("from", "client")),
        prop(USER_PROPERTY, Pair("via", "warden")),
        prop(CONTENT_TYPE, Str("text/plain; charset=utf-8")),
    ];
    for (payload, (qos_level, pkid)) in with_payloads(&[(0, 0), (1, 1), (2, u16::MAX)]) {
        let flags = (qos_level, false, false);
        // The original carries a topic alias and user properties from the client.
        let mut original = their_publish("", flags, pkid, &payload);
        let from_client = pairs(&[("from", "client")]);
        original.properties = Some(publish_props_with(Some(7), from_client));
        let original = original.frame(V5);
        let (first_byte, body) = split(&original);
        let view = parse_publish(first_byte, body, V5, true).expect("our parse");
        assert_eq!(view.topic_alias, Some(7));

        let expected = their_publish("org1/things/evt/x/fmt/bin", flags, pkid, &payload);
        let parts: [&[u8]; 2] = [b"org1/", b"things/evt/x/fmt/bin"];
        for properties in [&new_properties[..], &[]] {
            let frame = encoded(|out| {
                encode_publish_with_properties(out, first_byte, &parts, &view, properties, body)
            });
            let mut theirs = read!(v5::Publish, &frame);
            assert_eq!(props_of(&theirs.properties, publish_props), properties);
            theirs.properties = None;
            assert_eq!(theirs, expected);
        }
    }
}

#[test]
fn our_subscribe_decodes_in_mqttbytes() {
    check_ours(&subscribes(), |out, version, theirs| {
        let parts: Vec<_> = theirs.filters.iter().map(|f| levels(&f.path)).collect();
        let options = theirs.filters.iter().map(options_v5);
        let filters: Vec<_> = parts.iter().map(Vec::as_slice).zip(options).collect();
        let properties = props_of(&theirs.properties, subscribe_props);
        encode_subscribe(out, version, theirs.pkid, &properties, &filters);
    });
}

#[test]
fn our_unsubscribe_decodes_in_mqttbytes() {
    check_ours(&unsubscribes(), |out, version, theirs| {
        let parts: Vec<_> = theirs.filters.iter().map(|f| levels(f)).collect();
        let filters: Vec<_> = parts.iter().map(Vec::as_slice).collect();
        let properties = props_of(&theirs.properties, unsubscribe_props);
        encode_unsubscribe(out, version, theirs.pkid, &properties, &filters);
    });
}

#[test]
fn our_suback_decodes_in_mqttbytes() {
    // Our SUBACK carries no user properties, at most a Reason String.
    let no_user_properties = |(_, suback): &(_, v5::SubAck)| {
        let properties = suback.properties.as_ref();
        properties.is_none_or(|p| p.user_properties.is_empty())
    };
    let cases: Vec<_> = subacks().into_iter().filter(no_user_properties).collect();
    check_ours(&cases, |out, version, theirs| {
        let codes: Vec<u8> = theirs.return_codes.iter().map(|&code| code as u8).collect();
        let properties = theirs.properties.as_ref();
        let reason = properties.and_then(|p| p.reason_string.as_deref());
        encode_suback(out, version, theirs.pkid, &codes, reason);
    });
}

#[test]
fn our_connack_decodes_in_mqttbytes() {
    // MQTT 3.1.1 return codes 0..=5; for MQTT 5 the codes the proxy answers a CONNECT with, and
    // success.
    let v5_codes = [
        0x00, 0x80, 0x81, 0x82, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x95, 0x97, 0x9F,
    ];
    let cases = [
        (V311, &[0, 1, 2, 3, 4, 5][..], vec![None]),
        (V5, &v5_codes[..], connack_properties()),
    ];
    for (version, codes, property_sets) in cases {
        let cases = property_sets
            .iter()
            .flat_map(|p| codes.iter().map(move |&c| (p, c)));
        for ((properties, code), session_present) in cases.flat_map(|c| [(c, false), (c, true)]) {
            let ours = connack(session_present, code, props_of(properties, connack_props));
            let frame = encoded(|out| encode_connack(out, version, &ours));
            let parse = |_, body| parse_connack(body, version);
            assert_parses(&frame, version, PacketType::Connack, parse, ours);
            let want = (session_present, code, properties.clone());
            assert_eq!(their_connack(version, &frame), want);
        }
    }
}

#[test]
fn our_acks_decode_in_mqttbytes() {
    for kind in [Puback, Pubrec, Pubrel, Pubcomp] {
        let frame = encoded(|out| encode_ack(out, kind, V311, 0x1234, 0, None));
        assert_eq!(their_ack(V311, &frame), (kind, 0x1234, 0, None));

        let codes: &[u8] = match kind {
            Puback | Pubrec => &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
            _ => &[0x00, 0x92],
        };
        let reasons = |&code| [(code, None), (code, Some("quota exceeded"))];
        for (code, reason) in codes.iter().flat_map(reasons) {
            let frame = encoded(|out| encode_ack(out, kind, V5, 0x00FF, code, reason));
            let parse = |_, body| check_ack(kind, body, V5);
            assert_parses(&frame, V5, kind, parse, 0x00FF);
            let want = (kind, 0x00FF, code, reason.map(str::to_owned));
            assert_eq!(their_ack(V5, &frame), want);
        }
    }
}

#[test]
fn our_disconnect_v5_decodes_in_mqttbytes() {
    for (code, reason) in [
        (0x00, "bye"),
        (0x04, "with will"),
        (0x8E, "session taken over"),
        (0x87, "not authorized: policy changed"),
        (0x98, "administrative action"),
    ] {
        let frame = encoded(|out| encode_disconnect_v5(out, code, Some(reason)));
        assert_eq!(check_disconnect(split(&frame).1, V5), Ok(code));
        let theirs = read!(v5::Disconnect, &frame);
        let mut properties = v5::DisconnectProperties::new();
        properties.reason_string = text(reason);
        let want = (code, Some(properties));
        assert_eq!((theirs.reason_code as u8, theirs.properties), want);
    }

    // `v5::read` turns every empty body but PINGREQ/PINGRESP away, so the short form
    // `E0 00` goes to mqttbytes' DISCONNECT decoder directly.
    let frame = encoded(|out| encode_disconnect_v5(out, 0x00, None));
    assert_eq!(&frame[..], [0xE0, 0x00]);
    let header = mqttbytes::check(frame.iter(), MAX).expect("mqttbytes frame header");
    let theirs = v5::Disconnect::read(header, frame.freeze()).expect("mqttbytes");
    assert_eq!((theirs.reason_code as u8, theirs.properties), (0x00, None));

    // mqttbytes requires a Property Length after the reason code, which MQTT 5 §3.14.2.2.1 lets
    // a sender omit, so the form `E0 01 code` is checked on our side only.
    let frame = encoded(|out| encode_disconnect_v5(out, 0x8E, None));
    assert_eq!(&frame[..], [0xE0, 0x01, 0x8E]);
    assert_eq!(check_disconnect(split(&frame).1, V5), Ok(0x8E));
}

// ---------------------------------------------------------------------------------------------
// mqttbytes' encoders, parsed by us.
// ---------------------------------------------------------------------------------------------

#[test]
fn mqttbytes_connect_v311_parses() {
    check_theirs(&v311_connects());
}

#[test]
fn mqttbytes_connect_v5_parses() {
    check_theirs(&v5_connects());
}

/// Writes `theirs` with mqttbytes and checks what we parse, as a client's PUBLISH and as the
/// broker's.
fn check_their_publish(version: ProtocolVersion, theirs: &v5::Publish) {
    let frame = theirs.frame(version);
    let (first_byte, body) = split(&frame);
    assert_eq!(packet_type(first_byte, version), Ok(PacketType::Publish));
    let properties = theirs.properties.as_ref();
    for from_client in [true, false] {
        let parsed = parse_publish(first_byte, body, version, from_client);
        if from_client && properties.is_some_and(|p| !p.subscription_identifiers.is_empty()) {
            // Only a server may send a Subscription Identifier ([MQTT-3.3.4-6]).
            assert!(
                matches!(parsed, Err(CodecError::ProtocolError(_))),
                "{parsed:?}"
            );
            continue;
        }
        let view = parsed.expect("our parse");
        let flags = (view.qos, view.dup, view.retain);
        assert_eq!(flags, (theirs.qos as u8, theirs.dup, theirs.retain));
        assert_eq!(view.topic, theirs.topic);
        let has_packet_id = theirs.qos != AtMostOnce;
        assert_eq!(view.packet_id, has_packet_id.then_some(theirs.pkid));
        assert_eq!(view.topic_alias, properties.and_then(|p| p.topic_alias));
        assert_eq!(&body[view.payload.clone()], &theirs.payload[..]);
        assert_eq!(view.after_topic.end, body.len());
        if version == V5 {
            let ours = publish_properties(body, &view);
            let ours = parse_properties(ours, PropertyContext::PublishFromServer);
            assert_eq!(ours, Ok(props_of(&theirs.properties, publish_props)));
        } else {
            let packet_id = &theirs.pkid.to_be_bytes()[..if has_packet_id { 2 } else { 0 }];
            let rest = [packet_id, &theirs.payload].concat();
            assert_eq!(&body[view.after_topic.clone()], &rest[..]);
        }
    }
}

#[test]
fn mqttbytes_publish_v311_parses() {
    for topic in [
        "things/type/sensor/id/s-1/evt/temp/fmt/json",
        "capteurs/température/été",
        "/",
    ] {
        for (payload, flags) in with_payloads(&flags()) {
            let pkid = 1 + u16::from(flags.0) * 0x7FFF;
            check_their_publish(V311, &their_publish(topic, flags, pkid, &payload));
        }
    }
}

#[test]
fn mqttbytes_publish_v5_parses() {
    #[rustfmt::skip]
    let full = v5::PublishProperties {
        payload_format_indicator: Some(1), message_expiry_interval: Some(3600), topic_alias: Some(7),
        response_topic: text("reply/to"), correlation_data: Some(Bytes::from_static(b"\x00\xffcorr")),
        content_type: text("application/json"), ..publish_props_with(None, pairs(&[("a", "1"), ("b", "2"), ("a", "3")]))
    };
    let ids = vec![1, 300, 268_435_455];
    let from_broker = v5::PublishProperties {
        subscription_identifiers: ids,
        topic_alias: None,
        ..full.clone()
    };
    let cases = [
        ("things/type/sensor/id/s-1/evt/temp/fmt/json", None),
        ("things/evt/temp/fmt/json", Some(full)),
        (
            "org1/things/type/t/id/d/cmd/reboot/fmt/json",
            Some(from_broker),
        ),
        // An empty topic with a Topic Alias (MQTT 5 §3.3.2.3.4).
        ("", Some(publish_props_with(Some(u16::MAX), vec![]))),
    ];
    for (payload, (topic, properties)) in with_payloads(&cases) {
        for flags in flags() {
            let mut theirs = their_publish(topic, flags, 513, &payload);
            theirs.properties = properties.clone();
            check_their_publish(V5, &theirs);
        }
    }
}

#[test]
fn mqttbytes_subscribe_parses() {
    check_theirs(&subscribes());
}

/// What the broker sends the proxy: CONNACK, SUBACK, the acks and (MQTT 5) DISCONNECT.
#[test]
fn mqttbytes_broker_packets_parse() {
    // CONNACK, MQTT 3.1.1.
    use v4::ConnectReturnCode::*;
    #[rustfmt::skip]
    let v4_codes = [Success, RefusedProtocolVersion, BadClientId, ServiceUnavailable, BadUserNamePassword, NotAuthorized];
    for (code, session_present) in v4_codes.iter().flat_map(|&c| [(c, false), (c, true)]) {
        let frame = written(|out| v4::ConnAck::new(code, session_present).write(out));
        let parse = |_, body| parse_connack(body, V311);
        let ours = connack(session_present, code as u8, vec![]);
        assert_parses(&frame, V311, PacketType::Connack, parse, ours);
    }

    // CONNACK, MQTT 5. Without properties mqttbytes omits the Property Length, which we accept.
    use v5::ConnectReturnCode as Code;
    #[rustfmt::skip]
    let v5_codes = [Code::Success, Code::NotAuthorized, Code::BadUserNamePassword, Code::ServerBusy, Code::QuotaExceeded];
    let property_sets = connack_properties();
    for (properties, code) in property_sets.iter().flat_map(|p| v5_codes.map(|c| (p, c))) {
        let theirs = v5::ConnAck {
            session_present: true,
            code,
            properties: properties.clone(),
        };
        let frame = written(|out| theirs.write(out));
        let parse = |_, body| parse_connack(body, V5);
        let ours = connack(true, code as u8, props_of(properties, connack_props));
        assert_parses(&frame, V5, PacketType::Connack, parse, ours);
    }

    // SUBACK.
    check_theirs(&subacks());

    // PUBACK, PUBREC, PUBREL, PUBCOMP.
    for (id, kind) in (1..).zip([Puback, Pubrec, Pubrel, Pubcomp]) {
        let parse = |_, body| check_ack(kind, body, V311);
        assert_parses(&v4_ack(kind, id), V311, kind, parse, id);
    }
    for props in [Some((text("no subscribers"), pairs(&[("k", "v")]))), None] {
        let acks = v5_acks! { props;
            Puback PubAck PubAckProperties PubAckReason: Success => 10, NoMatchingSubscribers => 11;
            Pubrec PubRec PubRecProperties PubRecReason: Success => 12, QuotaExceeded => 13;
            Pubrel PubRel PubRelProperties PubRelReason: Success => 14, PacketIdentifierNotFound => 15;
            Pubcomp PubComp PubCompProperties PubCompReason: Success => 16, PacketIdentifierNotFound => 17;
        };
        for (kind, id, frame) in acks {
            assert_parses(&frame, V5, kind, |_, body| check_ack(kind, body, V5), id);
        }
    }

    // DISCONNECT, MQTT 5.
    use v5::DisconnectReasonCode::{NormalDisconnection, ServerShuttingDown, UseAnotherServer};
    let mut properties = v5::DisconnectProperties::new();
    properties.reason_string = text("shutting down");
    properties.user_properties = pairs(&[("k", "v")]);
    properties.server_reference = text("b2.example.com");
    for (code, properties) in [
        (NormalDisconnection, None),
        (ServerShuttingDown, None),
        (ServerShuttingDown, Some(properties.clone())),
        (UseAnotherServer, Some(properties)),
    ] {
        let theirs = v5::Disconnect {
            reason_code: code,
            properties,
        };
        let frame = written(|out| theirs.write(out));
        let parse = |_, body| check_disconnect(body, V5);
        assert_parses(&frame, V5, PacketType::Disconnect, parse, code as u8);
    }
}

#[test]
fn mqttbytes_unsubscribe_parses() {
    check_theirs(&unsubscribes());
}
