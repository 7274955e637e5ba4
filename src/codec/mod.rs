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
//! `mqttbytes` serves instead as an independent oracle: `codec/interop.rs` decodes what we encode
//! with it, and parses what it encodes with us, comparing every field.

use std::ops::Range;

use bytes::{BufMut, BytesMut};
use thiserror::Error;

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
    /// A length field disagrees with the packet.
    #[error("length mismatch: {0}")]
    BadLength(&'static str),
    /// A topic name or filter that is not valid MQTT.
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
    let Some(&first_byte) = buf.first() else {
        return Ok(None);
    };
    let Some((remaining_len, len_bytes)) = decode_varint(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    let header_len = 1 + len_bytes;
    let declared = header_len + remaining_len;
    if declared > max_frame_bytes {
        return Err(CodecError::TooLarge {
            declared,
            max: max_frame_bytes,
        });
    }
    Ok(Some(FrameHeader {
        first_byte,
        header_len,
        remaining_len,
    }))
}

/// The packet type of a first byte, checking the fixed-header flags each type requires.
///
/// Type 0 is malformed; type 15 (AUTH) is malformed before MQTT 5. PUBLISH flags are checked by
/// [`parse_publish`], not here. PUBREL, SUBSCRIBE and UNSUBSCRIBE need flags `0010`, every other
/// type `0000` (malformed otherwise).
///
/// Server-to-client types (CONNACK, SUBACK, UNSUBACK, PINGRESP) are valid types and are returned
/// as such: it is the session, which knows the direction, that answers them with a protocol error
/// when a client sends them. Before CONNECT the version is unknown; any version but MQTT 5 only
/// differs for type 15.
pub fn packet_type(first_byte: u8, version: ProtocolVersion) -> Result<PacketType, CodecError> {
    let flags = first_byte & 0x0F;
    let kind = match first_byte >> 4 {
        1 => PacketType::Connect,
        2 => PacketType::Connack,
        3 => return Ok(PacketType::Publish),
        4 => PacketType::Puback,
        5 => PacketType::Pubrec,
        6 => PacketType::Pubrel,
        7 => PacketType::Pubcomp,
        8 => PacketType::Subscribe,
        9 => PacketType::Suback,
        10 => PacketType::Unsubscribe,
        11 => PacketType::Unsuback,
        12 => PacketType::Pingreq,
        13 => PacketType::Pingresp,
        14 => PacketType::Disconnect,
        15 if version.is_v5() => PacketType::Auth,
        15 => return Err(CodecError::Malformed("AUTH packet before MQTT 5")),
        _ => return Err(CodecError::Malformed("reserved packet type 0")),
    };
    let required = match kind {
        PacketType::Pubrel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
        _ => 0,
    };
    if flags != required {
        return Err(CodecError::Malformed("invalid fixed header flags"));
    }
    Ok(kind)
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
    let mut properties = Vec::new();
    for_each_property(bytes, context, |property| properties.push(property))?;
    Ok(properties)
}

/// Validates a property list body like [`parse_properties`] and hands each property to `visit`,
/// without allocating. This is what the hot path ([`parse_publish`]) uses.
pub fn for_each_property<'a>(
    bytes: &'a [u8],
    context: PropertyContext,
    mut visit: impl FnMut(Property<'a>),
) -> Result<(), CodecError> {
    let context_bit = context_bit(context);
    let mut seen: u64 = 0;
    let mut r = Reader::new(bytes);
    while !r.is_empty() {
        let id = r.u8("property identifier")?;
        if id == property::SUBSCRIPTION_IDENTIFIER && context == PropertyContext::PublishFromClient
        {
            return Err(CodecError::ProtocolError(
                "subscription identifier in a PUBLISH from a client",
            ));
        }
        let Some((kind, allowed)) = property_spec(id) else {
            return Err(CodecError::Malformed("unknown property identifier"));
        };
        if allowed & context_bit == 0 {
            return Err(CodecError::Malformed("property not allowed in this packet"));
        }
        // Every known identifier is below 64 (checked by property_spec).
        let bit = 1u64 << (id & 0x3F);
        let repeatable = id == property::USER_PROPERTY
            || (id == property::SUBSCRIPTION_IDENTIFIER
                && context == PropertyContext::PublishFromServer);
        if seen & bit != 0 && !repeatable {
            return Err(CodecError::ProtocolError(
                "property included more than once",
            ));
        }
        seen |= bit;
        let value = match kind {
            Kind::Byte => PropertyValue::Byte(r.u8("property value")?),
            Kind::U16 => PropertyValue::U16(r.u16("property value")?),
            Kind::U32 => PropertyValue::U32(r.u32("property value")?),
            Kind::Varint => {
                // A four-byte Variable Byte Integer always fits in a u32.
                PropertyValue::Varint(r.varint("property value")? as u32)
            }
            Kind::Str => PropertyValue::Str(r.string("property value")?),
            Kind::Binary => PropertyValue::Binary(r.binary("property value")?),
            Kind::Pair => {
                let name = r.string("user property name")?;
                let value = r.string("user property value")?;
                PropertyValue::Pair(name, value)
            }
        };
        check_property_value(id, value)?;
        visit(Property { id, value });
    }
    let data = 1u64 << property::AUTHENTICATION_DATA;
    let method = 1u64 << property::AUTHENTICATION_METHOD;
    if seen & data != 0 && seen & method == 0 {
        return Err(CodecError::ProtocolError(
            "authentication data without a method",
        ));
    }
    Ok(())
}

/// Writes a property list, with its Property Length prefix.
pub fn encode_properties(out: &mut BytesMut, properties: &[Property<'_>]) {
    put_varint(out, properties_len(properties));
    for property in properties {
        put_property(out, property);
    }
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
    if first_byte != 0x10 {
        return Err(CodecError::Malformed(
            "CONNECT fixed header flags must be zero",
        ));
    }
    let mut r = Reader::new(body);
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    let version = match (name, level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        (b"MQTT" | b"MQIsdp", level) => return Err(CodecError::UnsupportedProtocolLevel(level)),
        _ => return Err(CodecError::BadProtocolName),
    };
    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(CodecError::Malformed("reserved CONNECT flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if will_flag {
        if will_qos == 3 {
            return Err(CodecError::Malformed("will QoS 3"));
        }
    } else if will_qos != 0 || will_retain {
        return Err(CodecError::Malformed(
            "will QoS or retain without will flag",
        ));
    }
    if password_flag && !username_flag && !version.is_v5() {
        return Err(CodecError::Malformed(
            "password flag without user name flag",
        ));
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if version.is_v5() {
        parse_properties(
            r.properties("CONNECT properties")?,
            PropertyContext::Connect,
        )?
    } else {
        Vec::new()
    };
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties = if version.is_v5() {
            parse_properties(r.properties("will properties")?, PropertyContext::Will)?
        } else {
            Vec::new()
        };
        let topic = topic_str(r.binary("will topic")?)?;
        check_topic_name(topic)?;
        let payload = r.binary("will payload")?;
        Some(Will {
            properties,
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string("user name")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary("password")?)
    } else {
        None
    };
    if !r.is_empty() {
        return Err(CodecError::BadLength("bytes after the last CONNECT field"));
    }
    Ok(Connect {
        version,
        clean_start,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

/// Writes a CONNECT.
pub fn encode_connect(out: &mut BytesMut, connect: &Connect<'_>) {
    let v5 = connect.version.is_v5();
    let name = connect.version.protocol_name();
    let props_len = properties_len(&connect.properties);
    let mut len = 2 + name.len() + 1 + 1 + 2 + str_field_len(connect.client_id);
    if v5 {
        len += varint_len(props_len) + props_len;
    }
    let mut flags = 0u8;
    if connect.clean_start {
        flags |= 0x02;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | ((will.qos & 0x03) << 3);
        if will.retain {
            flags |= 0x20;
        }
        if v5 {
            let will_props_len = properties_len(&will.properties);
            len += varint_len(will_props_len) + will_props_len;
        }
        len += str_field_len(will.topic) + bin_field_len(will.payload);
    }
    if let Some(username) = connect.username {
        flags |= 0x80;
        len += str_field_len(username);
    }
    if let Some(password) = connect.password {
        flags |= 0x40;
        len += bin_field_len(password);
    }
    out.reserve(1 + varint_len(len) + len);
    out.put_u8(0x10);
    put_varint(out, len);
    put_str(out, name);
    out.put_u8(connect.version.level());
    out.put_u8(flags);
    out.put_u16(connect.keep_alive);
    if v5 {
        encode_properties(out, &connect.properties);
    }
    put_str(out, connect.client_id);
    if let Some(will) = &connect.will {
        if v5 {
            encode_properties(out, &will.properties);
        }
        put_str(out, will.topic);
        put_binary(out, will.payload);
    }
    if let Some(username) = connect.username {
        put_str(out, username);
    }
    if let Some(password) = connect.password {
        put_binary(out, password);
    }
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

/// Parses a CONNACK body. Reserved flag bits are malformed; before MQTT 5 the body is exactly 2
/// bytes. An MQTT 5 CONNACK without a Property Length is accepted as having no properties.
pub fn parse_connack(body: &[u8], version: ProtocolVersion) -> Result<Connack<'_>, CodecError> {
    let mut r = Reader::new(body);
    let flags = r.u8("CONNACK flags")?;
    if flags & 0xFE != 0 {
        return Err(CodecError::Malformed("reserved CONNACK flags set"));
    }
    let code = r.u8("CONNACK code")?;
    let properties = if version.is_v5() && !r.is_empty() {
        parse_properties(
            r.properties("CONNACK properties")?,
            PropertyContext::Connack,
        )?
    } else {
        Vec::new()
    };
    if !r.is_empty() {
        return Err(CodecError::BadLength("bytes after the last CONNACK field"));
    }
    Ok(Connack {
        session_present: flags & 0x01 != 0,
        code,
        properties,
    })
}

/// Writes a CONNACK. Properties are written only for MQTT 5.
pub fn encode_connack(out: &mut BytesMut, version: ProtocolVersion, connack: &Connack<'_>) {
    let flags = u8::from(connack.session_present);
    if version.is_v5() {
        let props_len = properties_len(&connack.properties);
        let len = 2 + varint_len(props_len) + props_len;
        out.reserve(1 + varint_len(len) + len);
        out.put_u8(0x20);
        put_varint(out, len);
        out.put_u8(flags);
        out.put_u8(connack.code);
        encode_properties(out, &connack.properties);
    } else {
        out.reserve(4);
        out.put_slice(&[0x20, 0x02, flags, connack.code]);
    }
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
/// Allocates nothing: properties are validated with [`for_each_property`]. A topic that is not
/// valid UTF-8 or holds U+0000 is an invalid topic, as is a wildcard.
/// Truncations are [`CodecError::BadLength`].
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
    if first_byte >> 4 != 3 {
        return Err(CodecError::Malformed("not a PUBLISH"));
    }
    let qos = (first_byte >> 1) & 0x03;
    if qos == 3 {
        return Err(CodecError::Malformed("PUBLISH with QoS 3"));
    }
    let dup = first_byte & 0x08 != 0;
    if dup && qos == 0 {
        return Err(CodecError::Malformed("PUBLISH with DUP and QoS 0"));
    }
    let retain = first_byte & 0x01 != 0;
    let mut r = Reader::new(body);
    let topic_bytes = r.binary("topic name")?;
    // The common topic passes every check in one vectorised pass; the others take the exact
    // checks below, in their usual order, for the same error.
    let plain = is_plain_topic_name(topic_bytes);
    let topic = if plain {
        std::str::from_utf8(topic_bytes)
            .map_err(|_| CodecError::InvalidTopic("invalid UTF-8 in a topic"))?
    } else {
        topic_str(topic_bytes)?
    };
    let topic_end = r.pos;
    let packet_id = if qos > 0 {
        let id = r.u16("packet identifier")?;
        if id == 0 {
            return Err(CodecError::ProtocolError("packet identifier 0"));
        }
        Some(id)
    } else {
        None
    };
    let mut topic_alias = None;
    if version.is_v5() {
        let context = if from_client {
            PropertyContext::PublishFromClient
        } else {
            PropertyContext::PublishFromServer
        };
        let properties = r.properties("PUBLISH properties")?;
        for_each_property(properties, context, |property| {
            if let PropertyValue::U16(alias) = property.value {
                if property.id == property::TOPIC_ALIAS {
                    topic_alias = Some(alias);
                }
            }
        })?;
    }
    if topic.is_empty() {
        if !(version.is_v5() && topic_alias.is_some()) {
            return Err(CodecError::ProtocolError(
                "empty topic name without a topic alias",
            ));
        }
    } else if !plain {
        check_topic_name(topic)?;
    }
    Ok(PublishView {
        qos,
        dup,
        retain,
        topic,
        packet_id,
        topic_alias,
        after_topic: topic_end..body.len(),
        payload: r.pos..body.len(),
    })
}

/// Writes a PUBLISH with `topic` (the concatenation of its parts) and the untouched rest of a
/// parsed PUBLISH body. Computes the Remaining Length; allocates nothing beyond growing `out`.
pub fn encode_publish(out: &mut BytesMut, first_byte: u8, topic: &[&[u8]], after_topic: &[u8]) {
    let topic_len = parts_len(topic);
    let len = 2 + topic_len + after_topic.len();
    out.reserve(1 + varint_len(len) + len);
    out.put_u8(first_byte);
    put_varint(out, len);
    put_parts(out, topic);
    out.put_slice(after_topic);
}

/// The property bytes (without their length prefix) of a parsed MQTT 5 PUBLISH body.
pub fn publish_properties<'a>(body: &'a [u8], view: &PublishView<'_>) -> &'a [u8] {
    let start = view.after_topic.start + if view.packet_id.is_some() { 2 } else { 0 };
    let mut r = Reader::new(body.get(start..view.payload.start).unwrap_or_default());
    match r.varint("property length") {
        Ok(_) => r.rest(),
        Err(_) => &[],
    }
}

/// Writes an MQTT 5 PUBLISH with new properties: topic parts, the packet id of `view`, the given
/// properties and the payload of `body`. For the rare PUBLISH whose properties the proxy changes.
pub fn encode_publish_with_properties(
    out: &mut BytesMut,
    first_byte: u8,
    topic: &[&[u8]],
    view: &PublishView<'_>,
    properties: &[Property<'_>],
    body: &[u8],
) {
    let mut after_topic = BytesMut::new();
    if let Some(packet_id) = view.packet_id {
        after_topic.put_u16(packet_id);
    }
    encode_properties(&mut after_topic, properties);
    after_topic.put_slice(body.get(view.payload.clone()).unwrap_or_default());
    encode_publish(out, first_byte, topic, &after_topic);
}

/// Writes a PUBLISH from its pieces: topic parts, the packet id, and the payload, with an
/// MQTT 5 property list (`Some`, empty for none) or none at all (`None`: MQTT 3). This is how a
/// PUBLISH changes protocol version between the client and the broker; allocates nothing beyond
/// growing `out`.
pub fn encode_publish_parts(
    out: &mut BytesMut,
    first_byte: u8,
    topic: &[&[u8]],
    packet_id: Option<u16>,
    properties: Option<&[Property<'_>]>,
    payload: &[u8],
) {
    let props_len = properties.map(properties_len);
    let len = 2
        + parts_len(topic)
        + packet_id.map_or(0, |_| 2)
        + props_len.map_or(0, |len| varint_len(len) + len)
        + payload.len();
    out.reserve(1 + varint_len(len) + len);
    out.put_u8(first_byte);
    put_varint(out, len);
    put_parts(out, topic);
    if let Some(packet_id) = packet_id {
        out.put_u16(packet_id);
    }
    if let Some(properties) = properties {
        encode_properties(out, properties);
    }
    out.put_slice(payload);
}

/// Writes an MQTT 5 UNSUBACK with one reason code per filter.
pub fn encode_unsuback_v5(out: &mut BytesMut, packet_id: u16, codes: &[u8]) {
    let len = 2 + 1 + codes.len();
    out.reserve(1 + varint_len(len) + len);
    out.put_u8(0xB0);
    put_varint(out, len);
    out.put_u16(packet_id);
    out.put_u8(0);
    out.put_slice(codes);
}

/// The part SUBSCRIBE and UNSUBSCRIBE share: fixed-header flags 0010, a non-zero packet id and,
/// for MQTT 5, properties. Returns the reader positioned at the first filter.
fn subscription_header(
    first_byte: u8,
    expected_first_byte: u8,
    body: &[u8],
    version: ProtocolVersion,
    context: PropertyContext,
) -> Result<(Reader<'_>, u16, Vec<Property<'_>>), CodecError> {
    if first_byte != expected_first_byte {
        return Err(CodecError::Malformed(
            "SUBSCRIBE and UNSUBSCRIBE fixed header flags must be 0010",
        ));
    }
    let mut r = Reader::new(body);
    let packet_id = r.u16("packet identifier")?;
    if packet_id == 0 {
        return Err(CodecError::Malformed("packet identifier 0"));
    }
    let properties = if version.is_v5() {
        parse_properties(r.properties("properties")?, context)?
    } else {
        Vec::new()
    };
    Ok((r, packet_id, properties))
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
    let (mut r, packet_id, properties) =
        subscription_header(first_byte, 0x82, body, version, PropertyContext::Subscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = filter_str(r.binary("topic filter")?)?;
        let options = r.u8("subscription options")?;
        if options & 0x03 == 3 {
            return Err(CodecError::Malformed("subscription QoS 3"));
        }
        if version.is_v5() {
            if options & 0xC0 != 0 {
                return Err(CodecError::Malformed(
                    "reserved subscription option bits set",
                ));
            }
            if (options >> 4) & 0x03 == 3 {
                return Err(CodecError::Malformed("retain handling 3"));
            }
        } else if options & 0xFC != 0 {
            return Err(CodecError::Malformed(
                "reserved subscription option bits set",
            ));
        }
        check_topic_filter(filter)?;
        if version.is_v5() && options & 0x04 != 0 && is_shared(filter) {
            return Err(CodecError::ProtocolError(
                "No Local on a shared subscription",
            ));
        }
        filters.push(SubscribeFilter { filter, options });
    }
    if filters.is_empty() {
        return Err(CodecError::ProtocolError("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

/// Writes a SUBSCRIBE. Each filter is the concatenation of its parts.
pub fn encode_subscribe(
    out: &mut BytesMut,
    version: ProtocolVersion,
    packet_id: u16,
    properties: &[Property<'_>],
    filters: &[(&[&[u8]], u8)],
) {
    let v5 = version.is_v5();
    let props_len = properties_len(properties);
    let mut len = 2;
    if v5 {
        len += varint_len(props_len) + props_len;
    }
    for (parts, _) in filters {
        len += 2 + parts_len(parts) + 1;
    }
    out.reserve(1 + varint_len(len) + len);
    out.put_u8(0x82);
    put_varint(out, len);
    out.put_u16(packet_id);
    if v5 {
        encode_properties(out, properties);
    }
    for (parts, options) in filters {
        put_parts(out, parts);
        out.put_u8(*options);
    }
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
    let (mut r, packet_id, properties) = subscription_header(
        first_byte,
        0xA2,
        body,
        version,
        PropertyContext::Unsubscribe,
    )?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = filter_str(r.binary("topic filter")?)?;
        check_topic_filter(filter)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(CodecError::ProtocolError(
            "UNSUBSCRIBE without topic filters",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        properties,
        filters,
    })
}

/// Writes an UNSUBSCRIBE. Each filter is the concatenation of its parts.
pub fn encode_unsubscribe(
    out: &mut BytesMut,
    version: ProtocolVersion,
    packet_id: u16,
    properties: &[Property<'_>],
    filters: &[&[&[u8]]],
) {
    let v5 = version.is_v5();
    let props_len = properties_len(properties);
    let mut len = 2;
    if v5 {
        len += varint_len(props_len) + props_len;
    }
    for parts in filters {
        len += 2 + parts_len(parts);
    }
    out.reserve(1 + varint_len(len) + len);
    out.put_u8(0xA2);
    put_varint(out, len);
    out.put_u16(packet_id);
    if v5 {
        encode_properties(out, properties);
    }
    for parts in filters {
        put_parts(out, parts);
    }
}

/// Validates PUBACK, PUBREC, PUBREL or PUBCOMP (flags, non-zero packet id, MQTT 5 reason code and
/// properties) and returns the packet id. The packet is then forwarded byte for byte.
pub fn check_ack(
    packet_type: PacketType,
    body: &[u8],
    version: ProtocolVersion,
) -> Result<u16, CodecError> {
    let release = match packet_type {
        PacketType::Puback | PacketType::Pubrec => false,
        PacketType::Pubrel | PacketType::Pubcomp => true,
        _ => return Err(CodecError::ProtocolError("not a publish acknowledgement")),
    };
    if !version.is_v5() && body.len() != 2 {
        return Err(CodecError::BadLength("acknowledgement must be 2 bytes"));
    }
    let mut r = Reader::new(body);
    let packet_id = r.u16("packet identifier")?;
    if packet_id == 0 {
        return Err(CodecError::ProtocolError("packet identifier 0"));
    }
    if r.is_empty() {
        return Ok(packet_id);
    }
    let code = r.u8("reason code")?;
    let valid = if release {
        matches!(code, 0x00 | 0x92)
    } else {
        matches!(
            code,
            0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
        )
    };
    if !valid {
        return Err(CodecError::ProtocolError(
            "invalid acknowledgement reason code",
        ));
    }
    if r.is_empty() {
        return Ok(packet_id);
    }
    for_each_property(
        r.properties("acknowledgement properties")?,
        PropertyContext::Ack,
        |_| {},
    )?;
    if !r.is_empty() {
        return Err(CodecError::BadLength(
            "bytes after acknowledgement properties",
        ));
    }
    Ok(packet_id)
}

/// Validates a DISCONNECT and returns its MQTT 5 reason code (0 before MQTT 5).
pub fn check_disconnect(body: &[u8], version: ProtocolVersion) -> Result<u8, CodecError> {
    if !version.is_v5() {
        if !body.is_empty() {
            return Err(CodecError::BadLength(
                "DISCONNECT must be empty before MQTT 5",
            ));
        }
        return Ok(0);
    }
    let mut r = Reader::new(body);
    if r.is_empty() {
        return Ok(0);
    }
    let code = r.u8("reason code")?;
    if !matches!(
        code,
        0x00 | 0x04
            | 0x80..=0x83
            | 0x87
            | 0x89
            | 0x8B
            | 0x8D..=0x90
            | 0x93..=0xA2
    ) {
        return Err(CodecError::ProtocolError("invalid DISCONNECT reason code"));
    }
    if r.is_empty() {
        return Ok(code);
    }
    for_each_property(
        r.properties("DISCONNECT properties")?,
        PropertyContext::Disconnect,
        |_| {},
    )?;
    if !r.is_empty() {
        return Err(CodecError::BadLength("bytes after DISCONNECT properties"));
    }
    Ok(code)
}

/// Writes an MQTT 5 DISCONNECT with a reason code and an optional Reason String property.
pub fn encode_disconnect_v5(out: &mut BytesMut, reason_code: u8, reason_string: Option<&str>) {
    match reason_string {
        None if reason_code == 0 => out.put_slice(&[0xE0, 0x00]),
        None => out.put_slice(&[0xE0, 0x01, reason_code]),
        Some(reason) => {
            let props = [reason_property(reason)];
            let props_len = properties_len(&props);
            let len = 1 + varint_len(props_len) + props_len;
            out.reserve(1 + varint_len(len) + len);
            out.put_u8(0xE0);
            put_varint(out, len);
            out.put_u8(reason_code);
            encode_properties(out, &props);
        }
    }
}

/// Writes a SUBACK with one return/reason code per filter (MQTT 5: with an optional Reason String).
pub fn encode_suback(
    out: &mut BytesMut,
    version: ProtocolVersion,
    packet_id: u16,
    codes: &[u8],
    reason_string: Option<&str>,
) {
    let props = reason_string.map(reason_property);
    let props: &[Property<'_>] = props.as_slice();
    let mut len = 2 + codes.len();
    let props_len = properties_len(props);
    if version.is_v5() {
        len += varint_len(props_len) + props_len;
    }
    out.reserve(1 + varint_len(len) + len);
    out.put_u8(0x90);
    put_varint(out, len);
    out.put_u16(packet_id);
    if version.is_v5() {
        encode_properties(out, props);
    }
    out.put_slice(codes);
}

/// A SUBACK from the broker: the packet id and one code per filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suback<'a> {
    /// Packet identifier.
    pub packet_id: u16,
    /// MQTT 5 properties (empty before MQTT 5).
    pub properties: Vec<Property<'a>>,
    /// One return/reason code per filter, in order.
    pub codes: &'a [u8],
}

/// Parses a SUBACK body.
pub fn parse_suback(body: &[u8], version: ProtocolVersion) -> Result<Suback<'_>, CodecError> {
    let mut r = Reader::new(body);
    let packet_id = r.u16("packet identifier")?;
    let properties = if version.is_v5() {
        parse_properties(r.properties("SUBACK properties")?, PropertyContext::Suback)?
    } else {
        Vec::new()
    };
    let codes = r.rest();
    if codes.is_empty() {
        return Err(CodecError::ProtocolError("SUBACK without codes"));
    }
    Ok(Suback {
        packet_id,
        properties,
        codes,
    })
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
    let first_byte = match packet_type {
        PacketType::Pubrel => 0x62,
        other => (other as u8) << 4,
    };
    if !version.is_v5() || (reason_code == 0 && reason_string.is_none()) {
        out.reserve(4);
        out.put_u8(first_byte);
        out.put_u8(2);
        out.put_u16(packet_id);
        return;
    }
    let Some(reason) = reason_string else {
        out.reserve(5);
        out.put_u8(first_byte);
        out.put_u8(3);
        out.put_u16(packet_id);
        out.put_u8(reason_code);
        return;
    };
    let props = [reason_property(reason)];
    let props_len = properties_len(&props);
    let len = 3 + varint_len(props_len) + props_len;
    out.reserve(1 + varint_len(len) + len);
    out.put_u8(first_byte);
    put_varint(out, len);
    out.put_u16(packet_id);
    out.put_u8(reason_code);
    encode_properties(out, &props);
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
    if is_plain_topic_name(topic.as_bytes()) {
        return Ok(());
    }
    if topic.is_empty() {
        return Err(CodecError::InvalidTopic("empty topic name"));
    }
    let mut levels = 1usize;
    for &byte in topic.as_bytes() {
        match byte {
            b'/' => levels += 1,
            b'+' | b'#' => return Err(CodecError::InvalidTopic("wildcard in a topic name")),
            0 => return Err(CodecError::InvalidTopic("U+0000 in a topic name")),
            _ => {}
        }
    }
    if levels > MAX_TOPIC_LEVELS {
        return Err(CodecError::InvalidTopic("too many topic levels"));
    }
    Ok(())
}

/// Whether a topic name is certainly valid but for its UTF-8: not empty, no `+`, `#` or U+0000,
/// and too short to have more than [`MAX_TOPIC_LEVELS`] levels. On every PUBLISH this replaces a
/// byte-by-byte match and a search for U+0000 (three times the instructions, callgrind): eight
/// bytes are checked at once. `false` says nothing: check in full.
fn is_plain_topic_name(topic: &[u8]) -> bool {
    /// A byte of 1 in every lane.
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    /// The top bit of every lane.
    const TOPS: u64 = u64::from_le_bytes([0x80; 8]);
    /// Top bits set in the lanes of `word` that are 0 (and only if there is one).
    fn zero_lanes(word: u64) -> u64 {
        word.wrapping_sub(ONES) & !word & TOPS
    }
    if topic.is_empty() || topic.len() >= MAX_TOPIC_LEVELS {
        return false;
    }
    let (words, tail) = topic.as_chunks::<8>();
    let mut found = 0;
    for word in words {
        let word = u64::from_le_bytes(*word);
        found |= zero_lanes(word)
            | zero_lanes(word ^ (ONES * u64::from(b'+')))
            | zero_lanes(word ^ (ONES * u64::from(b'#')));
    }
    found == 0 && !tail.iter().any(|byte| matches!(byte, 0 | b'+' | b'#'))
}

/// Whether a topic name matches a filter, as a broker decides it: `+` is one level, `#` the rest
/// (the parent level too), a shared subscription `$share/NAME/FILTER` matches as FILTER, and a
/// filter whose first level is a wildcard never matches a topic that starts with `$`
/// [MQTT-4.7.2-1]. Allocates nothing.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(shared) => match shared.split_once('/') {
            Some((_, filter)) => filter,
            None => return false,
        },
        None => filter,
    };
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match (level, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (level, Some(other)) if level == other => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Checks a topic filter: not empty, no U+0000 anywhere (share name included), `+` and `#` alone
/// in their level, `#` last, at most [`MAX_TOPIC_LEVELS`] levels. `$share/NAME/filter` needs a
/// non-empty NAME without `+`, `#` or `/`, and a non-empty filter.
pub fn check_topic_filter(filter: &str) -> Result<(), CodecError> {
    if filter.as_bytes().contains(&0) {
        return Err(CodecError::InvalidTopic("U+0000 in a topic filter"));
    }
    let filter = match filter.strip_prefix(SHARE_PREFIX) {
        Some(shared) => {
            let Some((name, rest)) = shared.split_once('/') else {
                return Err(CodecError::InvalidTopic(
                    "shared subscription without a filter",
                ));
            };
            if name.is_empty() {
                return Err(CodecError::InvalidTopic("empty share name"));
            }
            if name.bytes().any(|b| b == b'+' || b == b'#') {
                return Err(CodecError::InvalidTopic("wildcard in a share name"));
            }
            rest
        }
        None => filter,
    };
    if filter.is_empty() {
        return Err(CodecError::InvalidTopic("empty topic filter"));
    }
    let mut levels = 0usize;
    let mut after_hash = false;
    for level in filter.split('/') {
        if after_hash {
            return Err(CodecError::InvalidTopic("'#' not last in a topic filter"));
        }
        levels += 1;
        if levels > MAX_TOPIC_LEVELS {
            return Err(CodecError::InvalidTopic("too many topic levels"));
        }
        match level {
            "#" => after_hash = true,
            "+" => {}
            _ if level.bytes().any(|b| b == b'+' || b == b'#') => {
                return Err(CodecError::InvalidTopic(
                    "wildcard not alone in its topic level",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Private helpers.
// ---------------------------------------------------------------------------------------------

/// The prefix of an MQTT 5 shared subscription.
const SHARE_PREFIX: &str = "$share/";

/// Whether a filter is a shared subscription (`$share/NAME/filter`).
fn is_shared(filter: &str) -> bool {
    filter.starts_with(SHARE_PREFIX)
}

/// Decodes a Variable Byte Integer at the start of `buf`: `Ok(None)` when `buf` ends inside it,
/// otherwise the value and the number of bytes. A fifth byte or a non-minimal encoding is malformed.
fn decode_varint(buf: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let mut value = 0usize;
    for (i, &byte) in buf.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(CodecError::Malformed("non-minimal variable byte integer"));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        return Err(CodecError::Malformed(
            "variable byte integer longer than 4 bytes",
        ));
    }
    Ok(None)
}

/// Bytes of the Variable Byte Integer encoding of `value`.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A cursor over one packet body; every read is checked against the end of the body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError::BadLength(what))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(CodecError::BadLength(what))?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        let bytes = self.take(1, what)?;
        bytes.first().copied().ok_or(CodecError::BadLength(what))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        match *self.take(2, what)? {
            [a, b] => Ok(u16::from_be_bytes([a, b])),
            _ => Err(CodecError::BadLength(what)),
        }
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        match *self.take(4, what)? {
            [a, b, c, d] => Ok(u32::from_be_bytes([a, b, c, d])),
            _ => Err(CodecError::BadLength(what)),
        }
    }

    fn varint(&mut self, what: &'static str) -> Result<usize, CodecError> {
        match decode_varint(self.rest())? {
            Some((value, len)) => {
                self.pos += len;
                Ok(value)
            }
            None => Err(CodecError::BadLength(what)),
        }
    }

    /// Two-byte length, then that many bytes.
    fn binary(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// A UTF-8 Encoded String: valid UTF-8 and no U+0000 (malformed otherwise).
    fn string(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let bytes = self.binary(what)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| CodecError::Malformed("invalid UTF-8 string"))?;
        if bytes.contains(&0) {
            return Err(CodecError::Malformed("U+0000 in a UTF-8 string"));
        }
        Ok(text)
    }

    /// A Property Length, then the property list it covers.
    fn properties(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let len = self.varint(what)?;
        self.take(len, what)
    }
}

/// A topic name as text. Invalid UTF-8 and U+0000 make it an invalid topic.
fn topic_str(bytes: &[u8]) -> Result<&str, CodecError> {
    let topic = std::str::from_utf8(bytes)
        .map_err(|_| CodecError::InvalidTopic("invalid UTF-8 in a topic"))?;
    if bytes.contains(&0) {
        return Err(CodecError::InvalidTopic("U+0000 in a topic"));
    }
    Ok(topic)
}

/// A topic filter as text, with the same rules as [`topic_str`].
fn filter_str(bytes: &[u8]) -> Result<&str, CodecError> {
    topic_str(bytes)
}

/// The encoding of a property value.
#[derive(Clone, Copy)]
enum Kind {
    Byte,
    U16,
    U32,
    Varint,
    Str,
    Binary,
    Pair,
}

const fn context_bit(context: PropertyContext) -> u16 {
    1 << (context as u16)
}

const C_CONNECT: u16 = context_bit(PropertyContext::Connect);
const C_WILL: u16 = context_bit(PropertyContext::Will);
const C_CONNACK: u16 = context_bit(PropertyContext::Connack);
const C_PUBLISH: u16 = context_bit(PropertyContext::PublishFromClient)
    | context_bit(PropertyContext::PublishFromServer);
const C_PUBLISH_SERVER: u16 = context_bit(PropertyContext::PublishFromServer);
const C_ACK: u16 = context_bit(PropertyContext::Ack);
const C_SUBSCRIBE: u16 = context_bit(PropertyContext::Subscribe);
const C_SUBACK: u16 = context_bit(PropertyContext::Suback);
const C_UNSUBSCRIBE: u16 = context_bit(PropertyContext::Unsubscribe);
const C_UNSUBACK: u16 = context_bit(PropertyContext::Unsuback);
const C_DISCONNECT: u16 = context_bit(PropertyContext::Disconnect);
const C_AUTH: u16 = context_bit(PropertyContext::Auth);
const C_ALL: u16 = C_CONNECT
    | C_WILL
    | C_CONNACK
    | C_PUBLISH
    | C_ACK
    | C_SUBSCRIBE
    | C_SUBACK
    | C_UNSUBSCRIBE
    | C_UNSUBACK
    | C_DISCONNECT
    | C_AUTH;

/// The MQTT 5 property table (§2.2.2.2): the value encoding and the contexts allowing it.
fn property_spec(id: u8) -> Option<(Kind, u16)> {
    use property::*;
    Some(match id {
        PAYLOAD_FORMAT_INDICATOR => (Kind::Byte, C_WILL | C_PUBLISH),
        MESSAGE_EXPIRY_INTERVAL => (Kind::U32, C_WILL | C_PUBLISH),
        CONTENT_TYPE => (Kind::Str, C_WILL | C_PUBLISH),
        RESPONSE_TOPIC => (Kind::Str, C_WILL | C_PUBLISH),
        CORRELATION_DATA => (Kind::Binary, C_WILL | C_PUBLISH),
        SUBSCRIPTION_IDENTIFIER => (Kind::Varint, C_PUBLISH_SERVER | C_SUBSCRIBE),
        SESSION_EXPIRY_INTERVAL => (Kind::U32, C_CONNECT | C_CONNACK | C_DISCONNECT),
        ASSIGNED_CLIENT_IDENTIFIER => (Kind::Str, C_CONNACK),
        SERVER_KEEP_ALIVE => (Kind::U16, C_CONNACK),
        AUTHENTICATION_METHOD => (Kind::Str, C_CONNECT | C_CONNACK | C_AUTH),
        AUTHENTICATION_DATA => (Kind::Binary, C_CONNECT | C_CONNACK | C_AUTH),
        REQUEST_PROBLEM_INFORMATION => (Kind::Byte, C_CONNECT),
        WILL_DELAY_INTERVAL => (Kind::U32, C_WILL),
        REQUEST_RESPONSE_INFORMATION => (Kind::Byte, C_CONNECT),
        RESPONSE_INFORMATION => (Kind::Str, C_CONNACK),
        SERVER_REFERENCE => (Kind::Str, C_CONNACK | C_DISCONNECT),
        REASON_STRING => (
            Kind::Str,
            C_CONNACK | C_ACK | C_SUBACK | C_UNSUBACK | C_DISCONNECT | C_AUTH,
        ),
        RECEIVE_MAXIMUM => (Kind::U16, C_CONNECT | C_CONNACK),
        TOPIC_ALIAS_MAXIMUM => (Kind::U16, C_CONNECT | C_CONNACK),
        TOPIC_ALIAS => (Kind::U16, C_PUBLISH),
        MAXIMUM_QOS => (Kind::Byte, C_CONNACK),
        RETAIN_AVAILABLE => (Kind::Byte, C_CONNACK),
        USER_PROPERTY => (Kind::Pair, C_ALL),
        MAXIMUM_PACKET_SIZE => (Kind::U32, C_CONNECT | C_CONNACK),
        WILDCARD_SUBSCRIPTION_AVAILABLE => (Kind::Byte, C_CONNACK),
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => (Kind::Byte, C_CONNACK),
        SHARED_SUBSCRIPTION_AVAILABLE => (Kind::Byte, C_CONNACK),
        _ => return None,
    })
}

/// Value ranges of the MQTT 5 properties.
fn check_property_value(id: u8, value: PropertyValue<'_>) -> Result<(), CodecError> {
    use property::*;
    match (id, value) {
        (
            PAYLOAD_FORMAT_INDICATOR
            | REQUEST_PROBLEM_INFORMATION
            | REQUEST_RESPONSE_INFORMATION
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE,
            PropertyValue::Byte(byte),
        ) if byte > 1 => Err(CodecError::ProtocolError("property value must be 0 or 1")),
        (RECEIVE_MAXIMUM, PropertyValue::U16(0)) => {
            Err(CodecError::ProtocolError("receive maximum 0"))
        }
        (TOPIC_ALIAS, PropertyValue::U16(0)) => Err(CodecError::ProtocolError("topic alias 0")),
        (MAXIMUM_PACKET_SIZE, PropertyValue::U32(0)) => {
            Err(CodecError::ProtocolError("maximum packet size 0"))
        }
        (SUBSCRIPTION_IDENTIFIER, PropertyValue::Varint(0)) => {
            Err(CodecError::ProtocolError("subscription identifier 0"))
        }
        (RESPONSE_TOPIC, PropertyValue::Str(topic)) => check_topic_name(topic)
            .map_err(|_| CodecError::Malformed("response topic is not a valid topic name")),
        _ => Ok(()),
    }
}

/// The longest prefix of `text` that fits a two-byte length, cut on a character boundary.
fn clamp_str(text: &str) -> &str {
    if text.len() <= usize::from(u16::MAX) {
        return text;
    }
    let mut end = usize::from(u16::MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

/// The longest prefix of `bytes` that fits a two-byte length.
fn clamp_bin(bytes: &[u8]) -> &[u8] {
    bytes.get(..usize::from(u16::MAX)).unwrap_or(bytes)
}

/// Encoded size of a UTF-8 Encoded String field.
fn str_field_len(text: &str) -> usize {
    2 + clamp_str(text).len()
}

/// Encoded size of a Binary Data field.
fn bin_field_len(bytes: &[u8]) -> usize {
    2 + clamp_bin(bytes).len()
}

/// Writes a UTF-8 Encoded String (longer strings are cut to 65535 bytes on a character boundary).
fn put_str(out: &mut BytesMut, text: &str) {
    put_binary(out, clamp_str(text).as_bytes());
}

/// Writes Binary Data (longer data is cut to 65535 bytes).
fn put_binary(out: &mut BytesMut, bytes: &[u8]) {
    let bytes = clamp_bin(bytes);
    out.put_u16(bytes.len() as u16); // clamp_bin keeps it within u16
    out.put_slice(bytes);
}

/// Total length of a string given in parts, as written by [`put_parts`] (at most 65535).
fn parts_len(parts: &[&[u8]]) -> usize {
    let total: usize = parts.iter().map(|part| part.len()).sum();
    debug_assert!(
        total <= usize::from(u16::MAX),
        "string longer than 65535 bytes"
    );
    total.min(usize::from(u16::MAX))
}

/// Writes a length-prefixed string given in parts, cut to 65535 bytes in total.
fn put_parts(out: &mut BytesMut, parts: &[&[u8]]) {
    let mut left = parts_len(parts);
    out.put_u16(left as u16); // parts_len keeps it within u16
    for part in parts {
        let part = part.get(..left).unwrap_or(part);
        out.put_slice(part);
        left -= part.len();
    }
}

/// Encoded size of one property.
fn property_len(property: &Property<'_>) -> usize {
    1 + match property.value {
        PropertyValue::Byte(_) => 1,
        PropertyValue::U16(_) => 2,
        PropertyValue::U32(_) => 4,
        PropertyValue::Varint(value) => varint_len(value as usize),
        PropertyValue::Str(text) => str_field_len(text),
        PropertyValue::Binary(bytes) => bin_field_len(bytes),
        PropertyValue::Pair(name, value) => str_field_len(name) + str_field_len(value),
    }
}

/// Encoded size of a property list, without its Property Length.
fn properties_len(properties: &[Property<'_>]) -> usize {
    properties.iter().map(property_len).sum()
}

/// Writes one property.
fn put_property(out: &mut BytesMut, property: &Property<'_>) {
    out.put_u8(property.id);
    match property.value {
        PropertyValue::Byte(value) => out.put_u8(value),
        PropertyValue::U16(value) => out.put_u16(value),
        PropertyValue::U32(value) => out.put_u32(value),
        PropertyValue::Varint(value) => {
            put_varint(out, (value as usize).min(MAX_VARIABLE_BYTE_INTEGER))
        }
        PropertyValue::Str(text) => put_str(out, text),
        PropertyValue::Binary(bytes) => put_binary(out, bytes),
        PropertyValue::Pair(name, value) => {
            put_str(out, name);
            put_str(out, value);
        }
    }
}

/// A Reason String property.
fn reason_property(reason: &str) -> Property<'_> {
    Property {
        id: property::REASON_STRING,
        value: PropertyValue::Str(reason),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod interop;
