//! MQTT framing and the few packet views the proxy needs, for MQTT 3.1, 3.1.1 and 5.
//!
//! The proxy never builds a packet tree for traffic it forwards. It finds a frame in the read
//! buffer ([`decode_frame_header`]), checks it, and either copies its bytes to the other side or
//! splices a rewritten topic in front of the untouched rest ([`encode_publish`]). Every read is
//! bounds-checked against the end of the *packet*, never the buffer, and a declared length is
//! compared with the maximum before a single byte of it is buffered.
//!
//! We use our own parser rather than `mqttbytes` for the data path: `mqttbytes` re-encodes payloads,
//! accepts non-minimal lengths and repeated properties, and knows no MQTT 3.1 (`MQIsdp`).

use std::ops::Range;

use bytes::{BufMut, BytesMut};
use thiserror::Error;

use crate::close::{CloseCode, CloseReason};

/// The largest value a Variable Byte Integer can hold (4 bytes).
pub const MAX_VARIABLE_BYTE_INTEGER: usize = 268_435_455;
/// The deepest topic (in levels) the proxy accepts, as Mosquitto does.
pub const MAX_TOPIC_LEVELS: usize = 200;

/// The protocol level of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1, protocol name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1, protocol name `MQTT`, level 4.
    V311,
    /// MQTT 5, protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// Whether this is MQTT 5.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }

    /// The protocol level byte.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V31 => 3,
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// The protocol name in CONNECT.
    pub fn protocol_name(self) -> &'static str {
        match self {
            ProtocolVersion::V31 => "MQIsdp",
            _ => "MQTT",
        }
    }

    /// The `Protocol` field of a monitoring message (`mqtt3`, `mqtt4`, `mqtt5`, `-ws` forms).
    pub fn monitor_name(self, websocket: bool) -> &'static str {
        match (self, websocket) {
            (ProtocolVersion::V31, false) => "mqtt3",
            (ProtocolVersion::V311, false) => "mqtt4",
            (ProtocolVersion::V5, false) => "mqtt5",
            (ProtocolVersion::V31, true) => "mqtt3-ws",
            (ProtocolVersion::V311, true) => "mqtt4-ws",
            (ProtocolVersion::V5, true) => "mqttv5-ws",
        }
    }
}

/// MQTT control packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum PacketType {
    Connect = 1,
    Connack = 2,
    Publish = 3,
    Puback = 4,
    Pubrec = 5,
    Pubrel = 6,
    Pubcomp = 7,
    Subscribe = 8,
    Suback = 9,
    Unsubscribe = 10,
    Unsuback = 11,
    Pingreq = 12,
    Pingresp = 13,
    Disconnect = 14,
    Auth = 15,
}

/// Why bytes are not a valid MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// Malformed Packet (MQTT 5 0x81): bad encoding, bad flags, bad UTF-8, truncation.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Protocol Error (MQTT 5 0x82): well-formed but not allowed here.
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// A length field disagrees with the packet (WIoTP 271).
    #[error("length mismatch: {0}")]
    BadLength(&'static str),
    /// A topic name or filter that is not valid MQTT (WIoTP 276).
    #[error("invalid topic: {0}")]
    InvalidTopic(&'static str),
    /// The declared packet is larger than the configured maximum.
    #[error("packet of {declared} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Declared total size in bytes.
        declared: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// CONNECT with an unknown protocol name.
    #[error("unknown protocol name")]
    BadProtocolName,
    /// CONNECT with a protocol level the proxy does not speak.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
}

impl CodecError {
    /// The closing reason for this error. `in_connect` is true for the initial packet.
    pub fn close_reason(&self, in_connect: bool) -> CloseReason {
        match self {
            CodecError::Malformed(what) => CloseReason::malformed(*what),
            CodecError::ProtocolError(what) => CloseReason::protocol_error(*what),
            CodecError::BadLength(what) => {
                CloseReason::with_detail(CloseCode::InvalidLength, *what)
            }
            CodecError::InvalidTopic(what) => {
                CloseReason::with_detail(CloseCode::InvalidTopic, *what)
            }
            CodecError::TooLarge { declared, max } => {
                let code = if in_connect {
                    CloseCode::InitialPacketTooLarge
                } else {
                    CloseCode::MessageTooLarge
                };
                CloseReason::with_detail(code, format!("{declared} bytes, limit {max}"))
            }
            CodecError::BadProtocolName => CloseReason::malformed("unknown protocol name"),
            CodecError::UnsupportedProtocolLevel(level) => {
                CloseReason::with_detail(CloseCode::InvalidData, format!("protocol level {level}"))
                    .v5(0x84)
            }
        }
    }
}

/// The fixed header of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Packet type and flags.
    pub first_byte: u8,
    /// Bytes of the fixed header (1 + length of the Remaining Length).
    pub header_len: usize,
    /// The Remaining Length.
    pub remaining_len: usize,
}

impl FrameHeader {
    /// Total bytes of the frame.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Reads a fixed header at the start of `buf`.
///
/// `Ok(None)` means more bytes are needed to know the length. The Remaining Length must be minimal
/// and at most 4 bytes (malformed otherwise), and the whole frame must be at most
/// `max_frame_bytes` ([`CodecError::TooLarge`]), which is checked before any body is buffered.
pub fn decode_frame_header(
    buf: &[u8],
    max_frame_bytes: usize,
) -> Result<Option<FrameHeader>, CodecError> {
    todo!()
}

/// The packet type of a first byte, checking the fixed-header flags each type requires.
///
/// Type 0 is malformed; type 15 (AUTH) is malformed before MQTT 5. PUBLISH flags are checked by
/// [`parse_publish`], not here.
pub fn packet_type(first_byte: u8, version: ProtocolVersion) -> Result<PacketType, CodecError> {
    todo!()
}

/// MQTT 5 property identifiers the proxy names.
#[allow(missing_docs)]
pub mod property {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// Where a property list may appear; decides which identifiers are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum PropertyContext {
    Connect,
    Will,
    Connack,
    /// A PUBLISH from a client (Subscription Identifier is a protocol error here).
    PublishFromClient,
    /// A PUBLISH from the broker.
    PublishFromServer,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    Subscribe,
    Suback,
    Unsubscribe,
    Unsuback,
    Disconnect,
    Auth,
}

/// The value of one MQTT 5 property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyValue<'a> {
    /// Byte.
    Byte(u8),
    /// Two Byte Integer.
    U16(u16),
    /// Four Byte Integer.
    U32(u32),
    /// Variable Byte Integer.
    Varint(u32),
    /// UTF-8 Encoded String (validated).
    Str(&'a str),
    /// Binary Data.
    Binary(&'a [u8]),
    /// UTF-8 String Pair (user property).
    Pair(&'a str, &'a str),
}

/// One MQTT 5 property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Property<'a> {
    /// The identifier (see [`property`]).
    pub id: u8,
    /// Its value.
    pub value: PropertyValue<'a>,
}

/// Parses and validates a property list body (the bytes after the Property Length).
///
/// Checks: known identifier allowed in `context` (else Malformed), value types and encodings, no
/// repetition of single-valued properties (Protocol Error), value ranges (Receive Maximum 0,
/// Maximum Packet Size 0, Topic Alias 0 in a PUBLISH, Subscription Identifier 0, indicators outside
/// {0,1}: Protocol Error), Authentication Data without Method (Protocol Error).
pub fn parse_properties(
    bytes: &[u8],
    context: PropertyContext,
) -> Result<Vec<Property<'_>>, CodecError> {
    todo!()
}

/// Writes a property list, with its Property Length prefix.
pub fn encode_properties(out: &mut BytesMut, properties: &[Property<'_>]) {
    todo!()
}

/// A will message inside CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will<'a> {
    /// MQTT 5 will properties, validated (empty before MQTT 5).
    pub properties: Vec<Property<'a>>,
    /// Will topic (valid UTF-8, no wildcards, not empty).
    pub topic: &'a str,
    /// Will payload.
    pub payload: &'a [u8],
    /// Will QoS (0..=2).
    pub qos: u8,
    /// Will retain flag as sent.
    pub retain: bool,
}

/// A parsed CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    /// Protocol version from name and level.
    pub version: ProtocolVersion,
    /// Clean Session (3.x) / Clean Start (5).
    pub clean_start: bool,
    /// Keep Alive in seconds.
    pub keep_alive: u16,
    /// MQTT 5 CONNECT properties, validated (empty before MQTT 5).
    pub properties: Vec<Property<'a>>,
    /// Client identifier (valid UTF-8, may be empty).
    pub client_id: &'a str,
    /// The will, when the Will Flag is set.
    pub will: Option<Will<'a>>,
    /// User name (valid UTF-8).
    pub username: Option<&'a str>,
    /// Password (binary).
    pub password: Option<&'a [u8]>,
}

/// Parses a CONNECT body (the bytes after the fixed header).
///
/// Enforces: protocol name `MQTT` (levels 4, 5) or `MQIsdp` (level 3), else
/// [`CodecError::BadProtocolName`] / [`CodecError::UnsupportedProtocolLevel`]; fixed-header flags
/// zero; reserved flag bit zero; will QoS/retain rules; password without username only in MQTT 5;
/// fields present as the flags say and nothing after the last one; UTF-8 validity and no U+0000.
pub fn parse_connect(first_byte: u8, body: &[u8]) -> Result<Connect<'_>, CodecError> {
    todo!()
}

/// Writes a CONNECT.
pub fn encode_connect(out: &mut BytesMut, connect: &Connect<'_>) {
    todo!()
}

/// A parsed CONNACK (from the broker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connack<'a> {
    /// Session Present.
    pub session_present: bool,
    /// Return code (3.x) or reason code (5).
    pub code: u8,
    /// MQTT 5 properties (empty before MQTT 5).
    pub properties: Vec<Property<'a>>,
}

/// Parses a CONNACK body.
pub fn parse_connack(body: &[u8], version: ProtocolVersion) -> Result<Connack<'_>, CodecError> {
    todo!()
}

/// Writes a CONNACK. Properties are written only for MQTT 5.
pub fn encode_connack(out: &mut BytesMut, version: ProtocolVersion, connack: &Connack<'_>) {
    todo!()
}

/// A PUBLISH, as ranges into its body so the rest can be copied without parsing it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishView<'a> {
    /// QoS 0..=2.
    pub qos: u8,
    /// DUP flag.
    pub dup: bool,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name: valid UTF-8, no wildcard, no U+0000, at most [`MAX_TOPIC_LEVELS`] levels. Empty
    /// only in MQTT 5 with a Topic Alias.
    pub topic: &'a str,
    /// Packet identifier (non-zero) for QoS > 0.
    pub packet_id: Option<u16>,
    /// The Topic Alias property, if any (MQTT 5).
    pub topic_alias: Option<u16>,
    /// The body bytes after the topic: packet id, properties and payload, to copy unchanged.
    pub after_topic: Range<usize>,
    /// The payload.
    pub payload: Range<usize>,
}

/// Parses a PUBLISH. `from_client` selects which properties are allowed.
///
/// Checks: QoS 3 and DUP with QoS 0 are malformed; packet id 0 is a protocol error; topic rules as
/// in [`PublishView::topic`] (wildcards are [`CodecError::InvalidTopic`]); an empty topic without a
/// Topic Alias is a protocol error; MQTT 5 properties validated for the direction.
pub fn parse_publish(
    first_byte: u8,
    body: &[u8],
    version: ProtocolVersion,
    from_client: bool,
) -> Result<PublishView<'_>, CodecError> {
    todo!()
}

/// Writes a PUBLISH with `topic` (the concatenation of its parts) and the untouched rest of a
/// parsed PUBLISH body. Computes the Remaining Length; allocates nothing beyond growing `out`.
pub fn encode_publish(out: &mut BytesMut, first_byte: u8, topic: &[&[u8]], after_topic: &[u8]) {
    todo!()
}

/// One topic filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter<'a> {
    /// The filter: valid UTF-8, valid wildcards, not empty, no U+0000.
    pub filter: &'a str,
    /// The options byte (QoS, and for MQTT 5 No Local, Retain As Published, Retain Handling).
    pub options: u8,
}

/// A parsed SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe<'a> {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// MQTT 5 properties (empty before MQTT 5).
    pub properties: Vec<Property<'a>>,
    /// At least one filter.
    pub filters: Vec<SubscribeFilter<'a>>,
}

/// Parses a SUBSCRIBE (flags must be 0010). Bad option bits, QoS 3 and Retain Handling 3 are
/// malformed; no filters is a protocol error; filter syntax errors are [`CodecError::InvalidTopic`];
/// `$share/` filters are checked for a valid share name and No Local = 0.
pub fn parse_subscribe(
    first_byte: u8,
    body: &[u8],
    version: ProtocolVersion,
) -> Result<Subscribe<'_>, CodecError> {
    todo!()
}

/// Writes a SUBSCRIBE. Each filter is the concatenation of its parts.
pub fn encode_subscribe(
    out: &mut BytesMut,
    version: ProtocolVersion,
    packet_id: u16,
    properties: &[Property<'_>],
    filters: &[(&[&[u8]], u8)],
) {
    todo!()
}

/// A parsed UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// MQTT 5 properties (empty before MQTT 5).
    pub properties: Vec<Property<'a>>,
    /// At least one filter.
    pub filters: Vec<&'a str>,
}

/// Parses an UNSUBSCRIBE (flags must be 0010), with the same filter checks as SUBSCRIBE.
pub fn parse_unsubscribe(
    first_byte: u8,
    body: &[u8],
    version: ProtocolVersion,
) -> Result<Unsubscribe<'_>, CodecError> {
    todo!()
}

/// Writes an UNSUBSCRIBE. Each filter is the concatenation of its parts.
pub fn encode_unsubscribe(
    out: &mut BytesMut,
    version: ProtocolVersion,
    packet_id: u16,
    properties: &[Property<'_>],
    filters: &[&[&[u8]]],
) {
    todo!()
}

/// Validates PUBACK, PUBREC, PUBREL or PUBCOMP (flags, non-zero packet id, MQTT 5 reason code and
/// properties) and returns the packet id. The packet is then forwarded byte for byte.
pub fn check_ack(
    packet_type: PacketType,
    body: &[u8],
    version: ProtocolVersion,
) -> Result<u16, CodecError> {
    todo!()
}

/// Validates a DISCONNECT and returns its MQTT 5 reason code (0 before MQTT 5).
pub fn check_disconnect(body: &[u8], version: ProtocolVersion) -> Result<u8, CodecError> {
    todo!()
}

/// Writes an MQTT 5 DISCONNECT with a reason code and an optional Reason String property.
pub fn encode_disconnect_v5(out: &mut BytesMut, reason_code: u8, reason_string: Option<&str>) {
    todo!()
}

/// Writes a SUBACK with one return/reason code per filter (MQTT 5: with an optional Reason String).
pub fn encode_suback(
    out: &mut BytesMut,
    version: ProtocolVersion,
    packet_id: u16,
    codes: &[u8],
    reason_string: Option<&str>,
) {
    todo!()
}

/// Writes PUBACK, PUBREC, PUBREL or PUBCOMP; MQTT 5 with reason code (omitted when 0 and no string).
pub fn encode_ack(
    out: &mut BytesMut,
    packet_type: PacketType,
    version: ProtocolVersion,
    packet_id: u16,
    reason_code: u8,
    reason_string: Option<&str>,
) {
    todo!()
}

/// Writes a Variable Byte Integer.
pub fn put_varint(out: &mut BytesMut, value: usize) {
    debug_assert!(value <= MAX_VARIABLE_BYTE_INTEGER);
    let mut value = value;
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Checks a topic name (PUBLISH, will): UTF-8 already validated by the caller's `&str`; rejects
/// empty, `+`, `#`, U+0000 and more than [`MAX_TOPIC_LEVELS`] levels.
pub fn check_topic_name(topic: &str) -> Result<(), CodecError> {
    todo!()
}

/// Checks a topic filter: not empty, no U+0000, `+` and `#` alone in their level, `#` last, at
/// most [`MAX_TOPIC_LEVELS`] levels. `$share/NAME/filter` needs a non-empty NAME without `+`, `#`
/// or `/`, and a non-empty filter.
pub fn check_topic_filter(filter: &str) -> Result<(), CodecError> {
    todo!()
}
