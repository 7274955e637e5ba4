//! Unit tests of the codec, organised by the rows of `malformed-inputs.md`. Compiled only as the
//! `#[cfg(test)]` module of `codec.rs`.

use super::*;
use crate::refusal::{Cause, Refusal};
use crate::wiotp::codes::code;

use CodecError::*;
use ProtocolVersion::{V31, V311, V5};

const MAX: usize = 65_536;

/// Bytes from hex with optional spaces.
fn h(text: &str) -> Vec<u8> {
    hex::decode(text.replace(' ', "")).expect("test hex")
}

/// A length-prefixed field.
fn s(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Splits one complete frame into its first byte and body.
fn split(frame: &[u8]) -> (u8, &[u8]) {
    let header = decode_frame_header(frame, usize::MAX)
        .expect("valid header")
        .expect("complete header");
    assert_eq!(header.frame_len(), frame.len(), "frame length");
    (header.first_byte, &frame[header.header_len..])
}

/// Asserts the WIoTP number and the MQTT 5 DISCONNECT reason code of an error after CONNACK.
fn assert_close(err: &CodecError, number: u16, v5_disconnect: u8) {
    let reason = Refusal::from_codec(err, false);
    assert_eq!(code(reason.cause).number, number, "{err:?}");
    assert_eq!(reason.v5_disconnect(), Some(v5_disconnect), "{err:?}");
}

/// Asserts the WIoTP number and the MQTT 5 CONNACK reason code of an error in CONNECT.
fn assert_connect_close(err: &CodecError, number: u16, v5_connack: Option<u8>) {
    let reason = Refusal::from_codec(err, true);
    assert_eq!(code(reason.cause).number, number, "{err:?}");
    assert_eq!(reason.v5_connack(), v5_connack, "{err:?}");
}

/// A CONNECT body: protocol name, level, flags, keep alive 60, then `rest`.
fn connect_body(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    cat(&[&s(name), &[level, flags, 0x00, 0x3C], rest])
}

/// A v5 CONNECT body with these CONNECT properties and client id "c".
fn connect_v5_with_props(props: &[u8]) -> Vec<u8> {
    connect_body(
        b"MQTT",
        5,
        0x02,
        &cat(&[&[props.len() as u8], props, &s(b"c")]),
    )
}

/// A PUBLISH body (v5 when `props` is Some).
fn publish_body(
    topic: &[u8],
    packet_id: Option<u16>,
    props: Option<&[u8]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = s(topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if let Some(props) = props {
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    body
}

/// A SUBSCRIBE body with packet id 1 (v5 when `props` is Some).
fn subscribe_body(props: Option<&[u8]>, filters: &[(&[u8], u8)]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    if let Some(props) = props {
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    for (filter, options) in filters {
        body.extend_from_slice(&s(filter));
        body.push(*options);
    }
    body
}

fn unsubscribe_body(props: Option<&[u8]>, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    if let Some(props) = props {
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    for filter in filters {
        body.extend_from_slice(&s(filter));
    }
    body
}

// ---------------------------------------------------------------------------------------------
// Framing.
// ---------------------------------------------------------------------------------------------

#[test]
fn frame_header_needs_enough_bytes() {
    assert_eq!(decode_frame_header(&[], MAX), Ok(None));
    assert_eq!(decode_frame_header(&h("30"), MAX), Ok(None));
    assert_eq!(decode_frame_header(&h("30 80"), MAX), Ok(None));
    assert_eq!(decode_frame_header(&h("30 FF FF"), MAX), Ok(None));
    assert_eq!(decode_frame_header(&h("30 FF FF FF"), MAX), Ok(None));
    assert_eq!(
        decode_frame_header(&h("C0 00"), MAX),
        Ok(Some(FrameHeader {
            first_byte: 0xC0,
            header_len: 2,
            remaining_len: 0
        }))
    );
    // The body need not be there yet.
    assert_eq!(
        decode_frame_header(&h("30 80 01"), MAX),
        Ok(Some(FrameHeader {
            first_byte: 0x30,
            header_len: 3,
            remaining_len: 128
        }))
    );
    assert_eq!(
        decode_frame_header(&h("30 FF FF FF 7F"), usize::MAX),
        Ok(Some(FrameHeader {
            first_byte: 0x30,
            header_len: 5,
            remaining_len: MAX_VARIABLE_BYTE_INTEGER
        }))
    );
}

#[test]
fn frame_header_limit_is_inclusive() {
    let header = decode_frame_header(&h("30 FE 7F"), 3 + 16_382)
        .unwrap()
        .unwrap();
    assert_eq!(header.frame_len(), 3 + 16_382);
    assert_eq!(
        decode_frame_header(&h("30 FE 7F"), 3 + 16_381),
        Err(TooLarge {
            declared: 3 + 16_382,
            max: 3 + 16_381
        })
    );
}

/// Row 1: a Remaining Length of 5 bytes.
#[test]
fn row01_five_byte_remaining_length() {
    let err = decode_frame_header(&h("30 FF FF FF FF 7F 00 00"), usize::MAX).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_close(&err, 105, 0x81);
    // Known as soon as the fourth length byte has its continuation bit.
    assert!(matches!(
        decode_frame_header(&h("30 FF FF FF FF"), usize::MAX),
        Err(Malformed(_))
    ));
}

/// Row 2: non-minimal Variable Byte Integers, in the fixed header and in a Property Length.
#[test]
fn row02_non_minimal_varint() {
    let err = decode_frame_header(&h("C0 80 00"), MAX).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_close(&err, 105, 0x81);
    assert!(matches!(
        decode_frame_header(&h("30 80 80 00"), MAX),
        Err(Malformed(_))
    ));
    assert!(matches!(
        decode_frame_header(&h("30 FF 80 00"), MAX),
        Err(Malformed(_))
    ));

    // PUBLISH "a" with Property Length `80 00`.
    let (first, body) = (0x30, h("00 01 61 80 00"));
    let err = parse_publish(first, &body, V5, true).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_close(&err, 105, 0x81);
    // A non-minimal Subscription Identifier value inside the properties.
    let body = subscribe_body(Some(&h("0B 81 00")), &[(b"a", 0)]);
    assert!(matches!(
        parse_subscribe(0x82, &body, V5),
        Err(Malformed(_))
    ));
}

/// Row 3: a huge declared length is refused before its body is buffered.
#[test]
fn row03_huge_declared_length() {
    let mut buf = h("10 FF FF FF 7F");
    buf.extend_from_slice(&[0u8; 10]);
    let err = decode_frame_header(&buf, MAX).unwrap_err();
    assert_eq!(
        err,
        TooLarge {
            declared: 5 + MAX_VARIABLE_BYTE_INTEGER,
            max: MAX
        }
    );
    let reason = Refusal::from_codec(&err, true);
    assert_eq!(reason.cause, Cause::InitialPacketTooLarge);
    assert_eq!(code(reason.cause).number, 165);
    assert_close(&err, 287, 0x95);

    let err = decode_frame_header(&h("20 80 80 80 74"), MAX).unwrap_err();
    assert!(matches!(err, TooLarge { declared, .. } if declared == 5 + 0x74 * 128 * 128 * 128));
}

/// Row 5: reserved type 0; AUTH before MQTT 5.
#[test]
fn row05_reserved_types() {
    for version in [V31, V311, V5] {
        let err = packet_type(0x00, version).unwrap_err();
        assert!(matches!(err, Malformed(_)), "{err:?}");
        assert_close(&err, 105, 0x81);
    }
    for version in [V31, V311] {
        assert!(matches!(packet_type(0xF0, version), Err(Malformed(_))));
    }
    assert_eq!(packet_type(0xF0, V5), Ok(PacketType::Auth));
    assert!(matches!(packet_type(0xF1, V5), Err(Malformed(_))));
}

/// Row 6: server-to-client types are valid types; the session rejects them from a client.
#[test]
fn row06_server_to_client_types_are_decoded() {
    for version in [V31, V311, V5] {
        assert_eq!(packet_type(0x20, version), Ok(PacketType::Connack));
        assert_eq!(packet_type(0x90, version), Ok(PacketType::Suback));
        assert_eq!(packet_type(0xB0, version), Ok(PacketType::Unsuback));
        assert_eq!(packet_type(0xD0, version), Ok(PacketType::Pingresp));
    }
}

/// Row 7: flags on flag-less types.
#[test]
fn row07_bad_flags_on_flagless_types() {
    for first in [0x41, 0x51, 0x71, 0xC1, 0x11, 0xE1, 0x24, 0x98, 0xB8, 0xD2] {
        for version in [V31, V311, V5] {
            let err = packet_type(first, version).unwrap_err();
            assert!(matches!(err, Malformed(_)), "{first:#x} {err:?}");
            assert_close(&err, 105, 0x81);
        }
    }
    let body = connect_body(b"MQTT", 4, 0x02, &s(b"c"));
    assert!(parse_connect(0x10, &body).is_ok());
    assert!(matches!(parse_connect(0x11, &body), Err(Malformed(_))));
    // Every type accepts its valid flags.
    let valid = [
        0x10, 0x20, 0x3F, 0x40, 0x50, 0x62, 0x70, 0x82, 0x90, 0xA2, 0xB0, 0xC0, 0xD0, 0xE0,
    ];
    for first in valid {
        assert!(packet_type(first, V311).is_ok(), "{first:#x}");
    }
}

/// Row 8: SUBSCRIBE, UNSUBSCRIBE and PUBREL need flags 0010.
#[test]
fn row08_bad_flags_on_0010_types() {
    for first in [0x80, 0xA0, 0x60, 0x83, 0xA3, 0x61, 0x8A] {
        let err = packet_type(first, V311).unwrap_err();
        assert!(matches!(err, Malformed(_)), "{first:#x} {err:?}");
        assert_close(&err, 105, 0x81);
    }
    let body = subscribe_body(None, &[(b"a", 0)]);
    assert!(matches!(
        parse_subscribe(0x80, &body, V311),
        Err(Malformed(_))
    ));
    let body = unsubscribe_body(None, &[b"a"]);
    assert!(matches!(
        parse_unsubscribe(0xA0, &body, V311),
        Err(Malformed(_))
    ));
}

/// Row 9: PUBLISH with QoS 3.
#[test]
fn row09_publish_qos3() {
    let frame = h("36 05 00 01 61 00 01");
    let (first, body) = split(&frame);
    for version in [V311, V5] {
        let err = parse_publish(first, body, version, true).unwrap_err();
        assert!(matches!(err, Malformed(_)), "{err:?}");
        assert_close(&err, 105, 0x81);
    }
}

/// Row 10: PUBLISH QoS 0 with DUP.
#[test]
fn row10_publish_dup_qos0() {
    let frame = h("38 03 00 01 61");
    let (first, body) = split(&frame);
    let err = parse_publish(first, body, V311, true).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_close(&err, 105, 0x81);
    // DUP with QoS 1 is fine.
    assert!(parse_publish(0x3A, &h("00 01 61 00 01"), V311, true).is_ok());
}

/// Row 11: truncations, bounded by the packet and never by the buffer.
#[test]
fn row11_truncations() {
    let frame = h("30 00");
    let (first, body) = split(&frame);
    let err = parse_publish(first, body, V311, true).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");
    assert_close(&err, 271, 0x81);

    // `30 02 00 00`: an empty topic (v3: protocol error); in v5 the Property Length is missing.
    let frame = h("30 02 00 00");
    let (first, body) = split(&frame);
    let err = parse_publish(first, body, V311, true).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_close(&err, 105, 0x82);
    let err = parse_publish(first, body, V5, true).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");

    // QoS 1 without a packet id.
    let frame = h("32 03 00 01 61");
    let (first, body) = split(&frame);
    let err = parse_publish(first, body, V311, true).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");
    assert_close(&err, 271, 0x81);

    // A string length prefix larger than the bytes left, even when the buffer holds more.
    let buf = h("30 04 00 05 61 62 63 64 65");
    let header = decode_frame_header(&buf, MAX).unwrap().unwrap();
    let body = &buf[header.header_len..header.frame_len()];
    let err = parse_publish(header.first_byte, body, V311, true).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");

    // A Property Length running past the end of the packet.
    let err = parse_publish(0x30, &h("00 01 61 05 01"), V5, true).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");
    assert_close(&err, 271, 0x81);
    // A property value running past the end of the property list.
    let err = parse_publish(0x30, &h("00 01 61 02 23 00 41"), V5, true).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");

    // SUBSCRIBE: a filter without its options byte; UNSUBSCRIBE: a short filter.
    assert!(matches!(
        parse_subscribe(0x82, &h("00 01 00 01 61"), V311),
        Err(BadLength(_))
    ));
    assert!(matches!(
        parse_unsubscribe(0xA2, &h("00 01 00 02 61"), V311),
        Err(BadLength(_))
    ));
    assert!(matches!(
        parse_subscribe(0x82, &h("00"), V311),
        Err(BadLength(_))
    ));
    // Acks and DISCONNECT.
    assert!(matches!(
        check_ack(PacketType::Puback, &h("00"), V5),
        Err(BadLength(_))
    ));
    assert!(matches!(
        check_ack(PacketType::Puback, &h("00 01 00 05 1F"), V5),
        Err(BadLength(_))
    ));
    assert!(matches!(
        check_disconnect(&h("00 03 1F 00"), V5),
        Err(BadLength(_))
    ));
}

/// Row 12: unknown protocol names.
#[test]
fn row12_bad_protocol_name() {
    for name in [&b"MQTX"[..], b"mqtt", b"hj", b"", b"MQIsdpX"] {
        let body = connect_body(name, 4, 0x02, &s(b"c"));
        let err = parse_connect(0x10, &body).unwrap_err();
        assert_eq!(err, BadProtocolName);
        assert_connect_close(&err, 105, Some(0x81));
    }
}

/// Row 13: protocol levels the proxy does not speak.
#[test]
fn row13_unsupported_level() {
    for (name, level) in [
        (&b"MQTT"[..], 6u8),
        (b"MQTT", 3),
        (b"MQTT", 0),
        (b"MQIsdp", 4),
    ] {
        let body = connect_body(name, level, 0x02, &s(b"c"));
        let err = parse_connect(0x10, &body).unwrap_err();
        assert_eq!(err, UnsupportedProtocolLevel(level));
        assert_connect_close(&err, 105, Some(0x84));
    }
}

/// Row 14: the reserved CONNECT flag.
#[test]
fn row14_reserved_connect_flag() {
    for (name, level) in [(&b"MQTT"[..], 4u8), (b"MQIsdp", 3)] {
        let body = connect_body(name, level, 0x03, &s(b"c"));
        let err = parse_connect(0x10, &body).unwrap_err();
        assert!(matches!(err, Malformed(_)), "{err:?}");
        assert_connect_close(&err, 105, Some(0x81));
    }
    let body = connect_body(b"MQTT", 5, 0x03, &cat(&[&[0], &s(b"c")]));
    assert!(matches!(parse_connect(0x10, &body), Err(Malformed(_))));
}

/// Row 15: will QoS 3; will QoS or retain without the will flag.
#[test]
fn row15_will_flags() {
    let will = cat(&[&s(b"c"), &s(b"w/t"), &s(b"bye")]);
    // Will flag + QoS 3.
    let body = connect_body(b"MQTT", 4, 0x04 | 0x18, &will);
    let err = parse_connect(0x10, &body).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_connect_close(&err, 105, Some(0x81));
    // No will flag, QoS 1 / retain.
    for flags in [0x08, 0x10, 0x20] {
        let body = connect_body(b"MQTT", 4, flags, &s(b"c"));
        assert!(
            matches!(parse_connect(0x10, &body), Err(Malformed(_))),
            "{flags:#x}"
        );
    }
    // A valid will QoS 2 with retain.
    let body = connect_body(b"MQTT", 4, 0x04 | 0x10 | 0x20, &will);
    let connect = parse_connect(0x10, &body).unwrap();
    let will = connect.will.unwrap();
    assert_eq!(
        (will.topic, will.payload, will.qos, will.retain),
        ("w/t", &b"bye"[..], 2, true)
    );
}

/// Row 16: password without user name: malformed before MQTT 5, legal in MQTT 5.
#[test]
fn row16_password_without_username() {
    for (name, level) in [(&b"MQTT"[..], 4u8), (b"MQIsdp", 3)] {
        let body = connect_body(name, level, 0x40, &cat(&[&s(b"c"), &s(b"pw")]));
        let err = parse_connect(0x10, &body).unwrap_err();
        assert!(matches!(err, Malformed(_)), "{err:?}");
        assert_connect_close(&err, 105, Some(0x81));
    }
    let body = connect_body(b"MQTT", 5, 0x40, &cat(&[&[0], &s(b"c"), &s(b"pw")]));
    let connect = parse_connect(0x10, &body).unwrap();
    assert_eq!(connect.username, None);
    assert_eq!(connect.password, Some(&b"pw"[..]));
}

/// Row 17: fields the flags announce but the packet lacks; bytes after the last field.
#[test]
fn row17_missing_fields() {
    // User name flag, no user name.
    let body = connect_body(b"MQTT", 4, 0x80, &s(b"c"));
    let err = parse_connect(0x10, &body).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");
    assert_connect_close(&err, 271, Some(0x81));
    // Password flag, no password.
    let body = connect_body(b"MQTT", 4, 0xC0, &cat(&[&s(b"c"), &s(b"u")]));
    assert!(matches!(parse_connect(0x10, &body), Err(BadLength(_))));
    // Will flag, will payload missing.
    let body = connect_body(b"MQTT", 4, 0x04, &cat(&[&s(b"c"), &s(b"w")]));
    assert!(matches!(parse_connect(0x10, &body), Err(BadLength(_))));
    // No client id at all.
    let body = connect_body(b"MQTT", 4, 0x02, &[]);
    assert!(matches!(parse_connect(0x10, &body), Err(BadLength(_))));
    // Fields out of order / extra: a password with no flag.
    let body = connect_body(b"MQTT", 4, 0x80, &cat(&[&s(b"c"), &s(b"u"), &s(b"pw")]));
    let err = parse_connect(0x10, &body).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");
    // Truncated header fields.
    assert!(matches!(
        parse_connect(0x10, &h("00 04 4D 51 54 54 04")),
        Err(BadLength(_))
    ));
    assert!(matches!(
        parse_connect(0x10, &h("00 04 4D 51")),
        Err(BadLength(_))
    ));
    assert!(matches!(parse_connect(0x10, &[]), Err(BadLength(_))));
}

/// Row 21: single-valued properties repeated.
#[test]
fn row21_repeated_properties() {
    // Session Expiry twice, Receive Maximum twice in CONNECT.
    for props in ["11 00 00 00 0A 11 00 00 00 0A", "21 00 0A 21 00 0A"] {
        let err = parse_connect(0x10, &connect_v5_with_props(&h(props))).unwrap_err();
        assert!(matches!(err, ProtocolError(_)), "{err:?}");
        assert_connect_close(&err, 105, Some(0x82));
    }
    // Topic Alias twice in PUBLISH.
    let body = publish_body(b"a", None, Some(&h("23 00 01 23 00 02")), b"x");
    let err = parse_publish(0x30, &body, V5, true).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_close(&err, 105, 0x82);
    // Subscription Identifier twice in SUBSCRIBE.
    let body = subscribe_body(Some(&h("0B 01 0B 02")), &[(b"a", 0)]);
    assert!(matches!(
        parse_subscribe(0x82, &body, V5),
        Err(ProtocolError(_))
    ));
    // User Property may repeat anywhere; Subscription Identifier in a PUBLISH from the broker.
    let body = subscribe_body(
        Some(&h("26 00 01 6B 00 01 76 26 00 01 6B 00 01 76")),
        &[(b"a", 0)],
    );
    assert_eq!(
        parse_subscribe(0x82, &body, V5).unwrap().properties.len(),
        2
    );
    let body = publish_body(b"a", None, Some(&h("0B 01 0B 02")), b"x");
    assert!(parse_publish(0x30, &body, V5, false).is_ok());
}

/// Row 22: properties not allowed in the packet, and unknown identifiers.
#[test]
fn row22_misplaced_and_unknown_properties() {
    // Session Expiry in PUBLISH.
    let body = publish_body(b"a", None, Some(&h("11 00 00 00 0A")), b"x");
    let err = parse_publish(0x30, &body, V5, true).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_close(&err, 105, 0x81);
    // Topic Alias in CONNECT.
    let err = parse_connect(0x10, &connect_v5_with_props(&h("23 00 01"))).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_connect_close(&err, 105, Some(0x81));
    // Unknown identifier 0x7F and an identifier with the continuation bit.
    for props in ["7F 00", "00 00", "FF 01"] {
        let err = parse_connect(0x10, &connect_v5_with_props(&h(props))).unwrap_err();
        assert!(matches!(err, Malformed(_)), "{props} {err:?}");
    }
    // Will Delay Interval belongs to the will, not CONNECT.
    let err = parse_connect(0x10, &connect_v5_with_props(&h("18 00 00 00 01"))).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    // Reason String is not allowed in SUBSCRIBE or UNSUBSCRIBE.
    let body = subscribe_body(Some(&h("1F 00 01 78")), &[(b"a", 0)]);
    assert!(matches!(
        parse_subscribe(0x82, &body, V5),
        Err(Malformed(_))
    ));
    let body = unsubscribe_body(Some(&h("0B 01")), &[b"a"]);
    assert!(matches!(
        parse_unsubscribe(0xA2, &body, V5),
        Err(Malformed(_))
    ));
}

/// Row 23: property values out of range.
#[test]
fn row23_property_values_out_of_range() {
    for props in ["21 00 00", "27 00 00 00 00", "19 02", "17 02"] {
        let err = parse_connect(0x10, &connect_v5_with_props(&h(props))).unwrap_err();
        assert!(matches!(err, ProtocolError(_)), "{props} {err:?}");
        assert_connect_close(&err, 105, Some(0x82));
    }
    // The edge values are fine.
    for props in ["21 00 01", "27 00 00 00 01", "19 01", "17 00"] {
        assert!(
            parse_connect(0x10, &connect_v5_with_props(&h(props))).is_ok(),
            "{props}"
        );
    }
    // Payload Format Indicator 2 in PUBLISH; Topic Alias 0.
    for props in ["01 02", "23 00 00"] {
        let body = publish_body(b"a", None, Some(&h(props)), b"x");
        let err = parse_publish(0x30, &body, V5, true).unwrap_err();
        assert!(matches!(err, ProtocolError(_)), "{props} {err:?}");
        assert_close(&err, 105, 0x82);
    }
    // CONNACK indicators.
    for props in ["24 02", "25 02", "28 02", "29 02", "2A 02", "21 00 00"] {
        let body = cat(&[&[0, 0, props.len() as u8 / 3 + 1], &h(props)]);
        let err = parse_connack(&body, V5).unwrap_err();
        assert!(matches!(err, ProtocolError(_)), "{props} {err:?}");
    }
}

/// Row 24: Authentication Data without Authentication Method.
#[test]
fn row24_auth_data_without_method() {
    let err = parse_connect(0x10, &connect_v5_with_props(&h("16 00 02 01 02"))).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_connect_close(&err, 105, Some(0x82));
    // With a method, in either order.
    let props = h("16 00 02 01 02 15 00 04 58 2D 31 32");
    let body = connect_v5_with_props(&props);
    let connect = parse_connect(0x10, &body).unwrap();
    assert_eq!(connect.properties.len(), 2);
}

const BAD_UTF8: [&str; 3] = ["C0 AF", "ED A0 80", "FF"];

/// Row 26: ill-formed UTF-8. Topics and filters are invalid topics (276); other
/// strings are malformed.
#[test]
fn row26_ill_formed_utf8() {
    for bad in BAD_UTF8 {
        let bad = cat(&[b"a", &h(bad)]);
        // Topic name.
        let body = publish_body(&bad, None, None, b"x");
        let err = parse_publish(0x30, &body, V311, true).unwrap_err();
        assert!(matches!(err, InvalidTopic(_)), "{err:?}");
        assert_close(&err, 276, 0x90);
        // Topic filters.
        let body = subscribe_body(None, &[(&bad, 0)]);
        assert!(matches!(
            parse_subscribe(0x82, &body, V311),
            Err(InvalidTopic(_))
        ));
        let body = unsubscribe_body(None, &[&bad]);
        assert!(matches!(
            parse_unsubscribe(0xA2, &body, V311),
            Err(InvalidTopic(_))
        ));
        // Client identifier.
        let body = connect_body(b"MQTT", 4, 0x02, &s(&bad));
        let err = parse_connect(0x10, &body).unwrap_err();
        assert!(matches!(err, Malformed(_)), "{err:?}");
        assert_connect_close(&err, 105, Some(0x81));
        // User name.
        let body = connect_body(b"MQTT", 4, 0x82, &cat(&[&s(b"c"), &s(&bad)]));
        assert!(matches!(parse_connect(0x10, &body), Err(Malformed(_))));
        // Will topic.
        let body = connect_body(b"MQTT", 4, 0x06, &cat(&[&s(b"c"), &s(&bad), &s(b"")]));
        assert!(matches!(parse_connect(0x10, &body), Err(InvalidTopic(_))));
        // A property string (Content Type) and a user property.
        let props = cat(&[&[property::CONTENT_TYPE], &s(&bad)]);
        let body = publish_body(b"a", None, Some(&props), b"x");
        assert!(matches!(
            parse_publish(0x30, &body, V5, true),
            Err(Malformed(_))
        ));
        let props = cat(&[&[property::USER_PROPERTY], &s(b"k"), &s(&bad)]);
        let body = publish_body(b"a", None, Some(&props), b"x");
        assert!(matches!(
            parse_publish(0x30, &body, V5, true),
            Err(Malformed(_))
        ));
    }
}

/// Row 27: U+0000 inside strings.
#[test]
fn row27_nul_in_strings() {
    let body = publish_body(b"a\0b", None, None, b"x");
    let err = parse_publish(0x30, &body, V311, true).unwrap_err();
    assert!(matches!(err, InvalidTopic(_)), "{err:?}");
    assert_close(&err, 276, 0x90);
    assert!(matches!(
        check_topic_name("allowed\0/secret"),
        Err(InvalidTopic(_))
    ));
    assert!(matches!(check_topic_filter("a/\0"), Err(InvalidTopic(_))));

    let body = connect_body(b"MQTT", 4, 0x02, &s(b"c\0d"));
    let err = parse_connect(0x10, &body).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_connect_close(&err, 105, Some(0x81));
    let body = connect_body(b"MQTT", 4, 0x82, &cat(&[&s(b"c"), &s(b"u\0")]));
    assert!(matches!(parse_connect(0x10, &body), Err(Malformed(_))));
    let body = connect_body(b"MQTT", 4, 0x06, &cat(&[&s(b"c"), &s(b"w\0"), &s(b"")]));
    assert!(matches!(parse_connect(0x10, &body), Err(InvalidTopic(_))));
    // U+0000 is fine in binary data (password, payload).
    let body = connect_body(b"MQTT", 4, 0xC2, &cat(&[&s(b"c"), &s(b"u"), &s(b"p\0")]));
    assert_eq!(
        parse_connect(0x10, &body).unwrap().password,
        Some(&b"p\0"[..])
    );
}

/// Row 28: a BOM is legal and kept.
#[test]
fn row28_bom_is_kept() {
    let topic = "\u{FEFF}a/b";
    assert_eq!(&topic.as_bytes()[..3], &h("EF BB BF")[..]);
    let body = publish_body(topic.as_bytes(), None, None, b"x");
    assert_eq!(parse_publish(0x30, &body, V311, true).unwrap().topic, topic);
    let body = connect_body(b"MQTT", 4, 0x02, &s(topic.as_bytes()));
    assert_eq!(parse_connect(0x10, &body).unwrap().client_id, topic);
    let body = subscribe_body(None, &[(topic.as_bytes(), 1)]);
    assert_eq!(
        parse_subscribe(0x82, &body, V311).unwrap().filters[0].filter,
        topic
    );
}

/// Row 29: wildcards in a topic name or a Response Topic.
#[test]
fn row29_wildcards_in_topic_names() {
    for topic in ["a/+/b", "#", "#/test/topic", "a+", "+"] {
        let body = publish_body(topic.as_bytes(), None, None, b"x");
        let err = parse_publish(0x30, &body, V311, true).unwrap_err();
        assert!(matches!(err, InvalidTopic(_)), "{topic} {err:?}");
        assert_close(&err, 276, 0x90);
        let will = cat(&[&s(b"c"), &s(topic.as_bytes()), &s(b"")]);
        let body = connect_body(b"MQTT", 4, 0x06, &will);
        assert!(matches!(parse_connect(0x10, &body), Err(InvalidTopic(_))));
    }
    let props = cat(&[&[property::RESPONSE_TOPIC], &s(b"reply/+")]);
    let body = publish_body(b"a", None, Some(&props), b"x");
    let err = parse_publish(0x30, &body, V5, true).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_close(&err, 105, 0x81);
    let props = cat(&[&[property::RESPONSE_TOPIC], &s(b"reply/me")]);
    let body = publish_body(b"a", None, Some(&props), b"x");
    assert!(parse_publish(0x30, &body, V5, true).is_ok());
}

/// Row 30: malformed filters.
#[test]
fn row30_malformed_filters() {
    for filter in ["a/#/b", "a#", "a+/b", "sport+", "#/", "+a", "a/b#"] {
        let body = subscribe_body(None, &[(filter.as_bytes(), 0)]);
        let err = parse_subscribe(0x82, &body, V311).unwrap_err();
        assert!(matches!(err, InvalidTopic(_)), "{filter} {err:?}");
        assert_close(&err, 276, 0x90);
        let body = unsubscribe_body(None, &[filter.as_bytes()]);
        assert!(
            matches!(parse_unsubscribe(0xA2, &body, V311), Err(InvalidTopic(_))),
            "{filter}"
        );
    }
    for filter in [
        "#",
        "+",
        "a/#",
        "a/+/b",
        "+/+",
        "/",
        "//#",
        "$SYS/#",
        "a b/c",
        "sport/+/player1",
    ] {
        assert_eq!(check_topic_filter(filter), Ok(()), "{filter}");
    }
}

/// Row 31: empty topic names and filters.
#[test]
fn row31_empty_topics() {
    let body = publish_body(b"", None, None, b"x");
    let err = parse_publish(0x30, &body, V311, true).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_close(&err, 105, 0x82);
    let body = publish_body(b"", None, Some(&[]), b"x");
    assert!(matches!(
        parse_publish(0x30, &body, V5, true),
        Err(ProtocolError(_))
    ));
    // Legal in MQTT 5 with a Topic Alias.
    let body = publish_body(b"", None, Some(&h("23 00 07")), b"x");
    let view = parse_publish(0x30, &body, V5, true).unwrap();
    assert_eq!((view.topic, view.topic_alias), ("", Some(7)));

    let body = subscribe_body(None, &[(b"", 0)]);
    let err = parse_subscribe(0x82, &body, V311).unwrap_err();
    assert!(matches!(err, InvalidTopic(_)), "{err:?}");
    assert_close(&err, 276, 0x90);
    let body = unsubscribe_body(Some(&[]), &[b""]);
    assert!(matches!(
        parse_unsubscribe(0xA2, &body, V5),
        Err(InvalidTopic(_))
    ));
    // An empty will topic.
    let body = connect_body(b"MQTT", 4, 0x06, &cat(&[&s(b"c"), &s(b""), &s(b"")]));
    assert!(matches!(parse_connect(0x10, &body), Err(InvalidTopic(_))));
}

/// Row 32: SUBSCRIBE / UNSUBSCRIBE without filters.
#[test]
fn row32_no_filters() {
    let frame = h("82 02 00 01");
    let (first, body) = split(&frame);
    let err = parse_subscribe(first, body, V311).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_close(&err, 105, 0x82);
    assert!(matches!(
        parse_subscribe(0x82, &h("00 01 00"), V5),
        Err(ProtocolError(_))
    ));
    assert!(matches!(
        parse_unsubscribe(0xA2, &h("00 01"), V311),
        Err(ProtocolError(_))
    ));
    assert!(matches!(
        parse_unsubscribe(0xA2, &h("00 01 00"), V5),
        Err(ProtocolError(_))
    ));
}

/// Row 33: bad SUBSCRIBE options.
#[test]
fn row33_subscribe_options() {
    for options in [0x03, 0xC0, 0x30, 0x40, 0x80] {
        let body = subscribe_body(Some(&[]), &[(b"a", options)]);
        let err = parse_subscribe(0x82, &body, V5).unwrap_err();
        assert!(matches!(err, Malformed(_)), "{options:#x} {err:?}");
        assert_close(&err, 105, 0x81);
    }
    for options in [0x03, 0x04, 0x08, 0x10, 0xC0] {
        let body = subscribe_body(None, &[(b"a", options)]);
        assert!(
            matches!(parse_subscribe(0x82, &body, V311), Err(Malformed(_))),
            "{options:#x}"
        );
    }
    // All valid v5 options.
    let body = subscribe_body(Some(&[]), &[(b"a", 0x2E), (b"b", 0x1D)]);
    let subscribe = parse_subscribe(0x82, &body, V5).unwrap();
    assert_eq!(subscribe.filters[0].options, 0x2E);
    assert_eq!(subscribe.filters[1].options, 0x1D);
}

/// Row 34: shared subscription misuse.
#[test]
fn row34_shared_subscriptions() {
    let body = subscribe_body(Some(&[]), &[(b"$share/g/t", 0x04)]);
    let err = parse_subscribe(0x82, &body, V5).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_close(&err, 105, 0x82);
    for filter in [
        "$share//t",
        "$share/a+b/t",
        "$share/g",
        "$share/g/",
        "$share/#/t",
        "$share/g/a#",
    ] {
        let body = subscribe_body(Some(&[]), &[(filter.as_bytes(), 0)]);
        let err = parse_subscribe(0x82, &body, V5).unwrap_err();
        assert!(matches!(err, InvalidTopic(_)), "{filter} {err:?}");
        assert_close(&err, 276, 0x90);
        let body = unsubscribe_body(Some(&[]), &[filter.as_bytes()]);
        assert!(
            matches!(parse_unsubscribe(0xA2, &body, V5), Err(InvalidTopic(_))),
            "{filter}"
        );
    }
    for filter in ["$share/g/t", "$share/g/#", "$share/g/+/x", "$share/g//"] {
        let body = subscribe_body(Some(&[]), &[(filter.as_bytes(), 1)]);
        assert!(parse_subscribe(0x82, &body, V5).is_ok(), "{filter}");
    }
}

/// Row 34 with row 27: a U+0000 in the share name is refused like one anywhere else. It was
/// accepted, because the check looked for U+0000 only in the filter after `$share/NAME/`.
#[test]
fn row34_nul_in_share_name() {
    for filter in ["$share/\0/#", "$share/g\0/t", "$share/\0g/a/b"] {
        assert!(
            matches!(check_topic_filter(filter), Err(InvalidTopic(_))),
            "{filter:?}"
        );
    }
}

/// Row 35: very deep topics are refused at 200 levels, iteratively.
#[test]
fn row35_deep_topics() {
    let slashes = "/".repeat(65_535);
    let mut frame = BytesMut::new();
    encode_publish(&mut frame, 0x30, &[slashes.as_bytes()], b"x");
    let (first, body) = split(&frame);
    let err = parse_publish(first, body, V311, true).unwrap_err();
    assert!(matches!(err, InvalidTopic(_)), "{err:?}");
    assert_close(&err, 276, 0x90);

    let plus = "+/".repeat(10_000);
    assert!(matches!(check_topic_filter(&plus), Err(InvalidTopic(_))));
    let mut frame = BytesMut::new();
    encode_subscribe(&mut frame, V311, 1, &[], &[(&[plus.as_bytes(), b"a"], 0)]);
    let (first, body) = split(&frame);
    assert!(matches!(
        parse_subscribe(first, body, V311),
        Err(InvalidTopic(_))
    ));

    let levels = |n: usize| vec!["a"; n].join("/");
    assert_eq!(check_topic_name(&levels(MAX_TOPIC_LEVELS)), Ok(()));
    assert!(matches!(
        check_topic_name(&levels(MAX_TOPIC_LEVELS + 1)),
        Err(InvalidTopic(_))
    ));
    assert_eq!(check_topic_filter(&levels(MAX_TOPIC_LEVELS)), Ok(()));
    assert!(matches!(
        check_topic_filter(&levels(MAX_TOPIC_LEVELS + 1)),
        Err(InvalidTopic(_))
    ));
    let shared = format!("$share/g/{}", levels(MAX_TOPIC_LEVELS));
    assert_eq!(check_topic_filter(&shared), Ok(()));

    // Around the length from which a topic name could have too many levels (the quick check
    // passes shorter ones): only slashes, MAX_TOPIC_LEVELS of them is one level too many.
    let slashes = |n: usize| "/".repeat(n);
    assert_eq!(check_topic_name(&slashes(MAX_TOPIC_LEVELS - 1)), Ok(()));
    assert!(matches!(
        check_topic_name(&slashes(MAX_TOPIC_LEVELS)),
        Err(InvalidTopic(_))
    ));
    for n in [MAX_TOPIC_LEVELS - 1, MAX_TOPIC_LEVELS] {
        let mut frame = BytesMut::new();
        encode_publish(&mut frame, 0x30, &[slashes(n).as_bytes()], b"x");
        let (first, body) = split(&frame);
        assert_eq!(
            parse_publish(first, body, V311, true).is_ok(),
            n < MAX_TOPIC_LEVELS,
            "{n} slashes"
        );
    }
}

/// Row 37: packet identifier 0.
#[test]
fn row37_packet_id_zero() {
    let body = publish_body(b"a", Some(0), None, b"x");
    let err = parse_publish(0x32, &body, V311, true).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_close(&err, 105, 0x82);
    let body = publish_body(b"a", Some(0), Some(&[]), b"x");
    assert!(matches!(
        parse_publish(0x34, &body, V5, true),
        Err(ProtocolError(_))
    ));

    let err = parse_subscribe(0x82, &h("00 00 00 01 61 00"), V311).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    assert_close(&err, 105, 0x81);
    assert!(matches!(
        parse_subscribe(0x82, &h("00 00 00 00 01 61 00"), V5),
        Err(Malformed(_))
    ));
    assert!(matches!(
        parse_unsubscribe(0xA2, &h("00 00 00 01 61"), V311),
        Err(Malformed(_))
    ));
    assert!(matches!(
        parse_unsubscribe(0xA2, &h("00 00 00 00 01 61"), V5),
        Err(Malformed(_))
    ));

    for kind in [
        PacketType::Puback,
        PacketType::Pubrec,
        PacketType::Pubrel,
        PacketType::Pubcomp,
    ] {
        for version in [V311, V5] {
            assert!(matches!(
                check_ack(kind, &h("00 00"), version),
                Err(ProtocolError(_))
            ));
        }
    }
}

/// Row 38: Subscription Identifier 0 in SUBSCRIBE, or any in a PUBLISH from a client.
#[test]
fn row38_subscription_identifier() {
    let body = subscribe_body(Some(&h("0B 00")), &[(b"a", 0)]);
    let err = parse_subscribe(0x82, &body, V5).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_close(&err, 105, 0x82);

    let body = publish_body(b"a", None, Some(&h("0B 05")), b"x");
    let err = parse_publish(0x30, &body, V5, true).unwrap_err();
    assert!(matches!(err, ProtocolError(_)), "{err:?}");
    assert_close(&err, 105, 0x82);
    assert!(parse_publish(0x30, &body, V5, false).is_ok());

    let body = subscribe_body(Some(&h("0B FF FF FF 7F")), &[(b"a", 0)]);
    let subscribe = parse_subscribe(0x82, &body, V5).unwrap();
    assert_eq!(
        subscribe.properties,
        vec![Property {
            id: property::SUBSCRIPTION_IDENTIFIER,
            value: PropertyValue::Varint(268_435_455)
        }]
    );
}

// ---------------------------------------------------------------------------------------------
// Packet views and round trips.
// ---------------------------------------------------------------------------------------------

#[test]
fn publish_view_ranges() {
    // v5 QoS 1 with a Topic Alias and a user property.
    let props = h("23 00 03 26 00 01 6B 00 01 76");
    let body = publish_body(b"a/b", Some(9), Some(&props), b"hello");
    let view = parse_publish(0x3B, &body, V5, true).unwrap();
    assert_eq!(view.qos, 1);
    assert!(view.dup && view.retain);
    assert_eq!(view.topic, "a/b");
    assert_eq!(view.packet_id, Some(9));
    assert_eq!(view.topic_alias, Some(3));
    assert_eq!(view.after_topic, 5..body.len());
    assert_eq!(&body[view.payload.clone()], b"hello");

    // v3 QoS 0: after_topic is the payload.
    let body = publish_body(b"t", None, None, b"");
    let view = parse_publish(0x30, &body, V311, true).unwrap();
    assert_eq!(
        (view.qos, view.dup, view.retain, view.packet_id),
        (0, false, false, None)
    );
    assert_eq!(view.after_topic, 3..3);
    assert_eq!(view.payload, 3..3);

    // Not a PUBLISH at all.
    assert!(matches!(
        parse_publish(0x40, &body, V311, true),
        Err(Malformed(_))
    ));
}

#[test]
fn publish_round_trip_with_rewritten_topic() {
    let props = h("01 01 08 00 05 72 2F 6D 2F 31 09 00 02 AB CD");
    let body = publish_body(
        b"things/evt/e/fmt/json",
        Some(0x1234),
        Some(&props),
        b"{\"x\":1}",
    );
    let view = parse_publish(0x34, &body, V5, true).unwrap();
    let rest = &body[view.after_topic.clone()];

    let mut out = BytesMut::new();
    let parts: [&[u8]; 3] = [b"org/", b"things/type/T/id/I", b"/evt/e/fmt/json"];
    encode_publish(&mut out, 0x34, &parts, rest);
    let (first, new_body) = split(&out);
    assert_eq!(first, 0x34);
    let new_view = parse_publish(first, new_body, V5, true).unwrap();
    assert_eq!(new_view.topic, "org/things/type/T/id/I/evt/e/fmt/json");
    assert_eq!(new_view.packet_id, Some(0x1234));
    assert_eq!(&new_body[new_view.after_topic.clone()], rest);
    assert_eq!(&new_body[new_view.payload], b"{\"x\":1}");

    // A large payload needs a multi-byte Remaining Length.
    let payload = vec![7u8; 300_000];
    let mut out = BytesMut::new();
    encode_publish(&mut out, 0x30, &[b"a"], &payload);
    let header = decode_frame_header(&out, usize::MAX).unwrap().unwrap();
    assert_eq!(header.header_len, 4);
    assert_eq!(header.frame_len(), out.len());
    let view = parse_publish(0x30, &out[header.header_len..], V311, true).unwrap();
    assert_eq!(view.payload.len(), 300_000);
}

fn sample_connects() -> Vec<Connect<'static>> {
    let base = Connect {
        version: V311,
        clean_start: true,
        keep_alive: 60,
        properties: Vec::new(),
        client_id: "d:org:type:id",
        will: None,
        username: None,
        password: None,
    };
    vec![
        base.clone(),
        Connect {
            client_id: "",
            clean_start: false,
            keep_alive: 0,
            ..base.clone()
        },
        Connect {
            version: V31,
            will: Some(Will {
                properties: Vec::new(),
                topic: "will/\u{FEFF}topic",
                payload: b"gone\0",
                qos: 1,
                retain: true,
            }),
            username: Some("use-token-auth"),
            password: Some(b"secret"),
            ..base.clone()
        },
        Connect {
            username: Some("u"),
            ..base.clone()
        },
        Connect {
            version: V5,
            properties: vec![
                Property {
                    id: property::SESSION_EXPIRY_INTERVAL,
                    value: PropertyValue::U32(3600),
                },
                Property {
                    id: property::RECEIVE_MAXIMUM,
                    value: PropertyValue::U16(20),
                },
                Property {
                    id: property::MAXIMUM_PACKET_SIZE,
                    value: PropertyValue::U32(1 << 20),
                },
                Property {
                    id: property::TOPIC_ALIAS_MAXIMUM,
                    value: PropertyValue::U16(10),
                },
                Property {
                    id: property::REQUEST_PROBLEM_INFORMATION,
                    value: PropertyValue::Byte(1),
                },
                Property {
                    id: property::USER_PROPERTY,
                    value: PropertyValue::Pair("k", "v"),
                },
                Property {
                    id: property::USER_PROPERTY,
                    value: PropertyValue::Pair("k", "w"),
                },
                Property {
                    id: property::AUTHENTICATION_METHOD,
                    value: PropertyValue::Str("m"),
                },
                Property {
                    id: property::AUTHENTICATION_DATA,
                    value: PropertyValue::Binary(b"\x00\x01"),
                },
            ],
            will: Some(Will {
                properties: vec![
                    Property {
                        id: property::WILL_DELAY_INTERVAL,
                        value: PropertyValue::U32(5),
                    },
                    Property {
                        id: property::PAYLOAD_FORMAT_INDICATOR,
                        value: PropertyValue::Byte(1),
                    },
                    Property {
                        id: property::MESSAGE_EXPIRY_INTERVAL,
                        value: PropertyValue::U32(9),
                    },
                    Property {
                        id: property::CONTENT_TYPE,
                        value: PropertyValue::Str("text/plain"),
                    },
                    Property {
                        id: property::RESPONSE_TOPIC,
                        value: PropertyValue::Str("r/t"),
                    },
                    Property {
                        id: property::CORRELATION_DATA,
                        value: PropertyValue::Binary(b"cd"),
                    },
                ],
                topic: "w",
                payload: b"",
                qos: 2,
                retain: false,
            }),
            username: Some("a:org:app"),
            password: Some(b"token"),
            ..base.clone()
        },
        Connect {
            version: V5,
            password: Some(b"only"),
            ..base.clone()
        },
        Connect {
            version: V5,
            client_id: "x",
            ..base
        },
    ]
}

#[test]
fn connect_round_trips() {
    for connect in sample_connects() {
        let mut out = BytesMut::new();
        encode_connect(&mut out, &connect);
        let (first, body) = split(&out);
        assert_eq!(packet_type(first, connect.version), Ok(PacketType::Connect));
        assert_eq!(parse_connect(first, body).as_ref(), Ok(&connect));
    }
    // The exact v3.1.1 bytes.
    let connect = Connect {
        version: V311,
        clean_start: true,
        keep_alive: 60,
        properties: Vec::new(),
        client_id: "c",
        will: None,
        username: None,
        password: None,
    };
    let mut out = BytesMut::new();
    encode_connect(&mut out, &connect);
    assert_eq!(
        &out[..],
        &h("10 0D 00 04 4D 51 54 54 04 02 00 3C 00 01 63")[..]
    );
}

#[test]
fn connack_round_trips() {
    let samples = [
        (
            V311,
            Connack {
                session_present: true,
                code: 0,
                properties: Vec::new(),
            },
        ),
        (
            V31,
            Connack {
                session_present: false,
                code: 5,
                properties: Vec::new(),
            },
        ),
        (
            V5,
            Connack {
                session_present: false,
                code: 0x87,
                properties: Vec::new(),
            },
        ),
        (
            V5,
            Connack {
                session_present: true,
                code: 0,
                properties: vec![
                    Property {
                        id: property::ASSIGNED_CLIENT_IDENTIFIER,
                        value: PropertyValue::Str("auto-1"),
                    },
                    Property {
                        id: property::SERVER_KEEP_ALIVE,
                        value: PropertyValue::U16(30),
                    },
                    Property {
                        id: property::MAXIMUM_QOS,
                        value: PropertyValue::Byte(1),
                    },
                    Property {
                        id: property::RETAIN_AVAILABLE,
                        value: PropertyValue::Byte(0),
                    },
                    Property {
                        id: property::TOPIC_ALIAS_MAXIMUM,
                        value: PropertyValue::U16(0),
                    },
                    Property {
                        id: property::REASON_STRING,
                        value: PropertyValue::Str("ok"),
                    },
                    Property {
                        id: property::SHARED_SUBSCRIPTION_AVAILABLE,
                        value: PropertyValue::Byte(1),
                    },
                ],
            },
        ),
    ];
    for (version, connack) in samples {
        let mut out = BytesMut::new();
        encode_connack(&mut out, version, &connack);
        let (first, body) = split(&out);
        assert_eq!(packet_type(first, version), Ok(PacketType::Connack));
        assert_eq!(parse_connack(body, version).as_ref(), Ok(&connack));
    }
    let mut out = BytesMut::new();
    encode_connack(
        &mut out,
        V311,
        &Connack {
            session_present: true,
            code: 0,
            properties: vec![],
        },
    );
    assert_eq!(&out[..], &h("20 02 01 00")[..]);
    let mut out = BytesMut::new();
    encode_connack(
        &mut out,
        V5,
        &Connack {
            session_present: false,
            code: 0x84,
            properties: vec![],
        },
    );
    assert_eq!(&out[..], &h("20 03 00 84 00")[..]);
    // Bad CONNACKs.
    assert!(matches!(
        parse_connack(&h("02 00"), V311),
        Err(Malformed(_))
    ));
    assert!(matches!(parse_connack(&h("00"), V311), Err(BadLength(_))));
    assert!(matches!(
        parse_connack(&h("00 00 00"), V311),
        Err(BadLength(_))
    ));
    assert!(matches!(
        parse_connack(&h("00 00 02 21 00"), V5),
        Err(BadLength(_))
    ));
    assert!(matches!(
        parse_connack(&h("00 00 03 23 00 01"), V5),
        Err(Malformed(_))
    ));
}

#[test]
fn subscribe_round_trips() {
    let props = [
        Property {
            id: property::SUBSCRIPTION_IDENTIFIER,
            value: PropertyValue::Varint(200),
        },
        Property {
            id: property::USER_PROPERTY,
            value: PropertyValue::Pair("a", "b"),
        },
    ];
    let filters: [(&[&[u8]], u8); 3] = [
        (&[b"org/", b"things/type/+/id/+/evt/+/fmt/+"], 1),
        (&[b"$share/g/", b"a/#"], 0x22),
        (&[b"#"], 0x19),
    ];
    let mut out = BytesMut::new();
    encode_subscribe(&mut out, V5, 77, &props, &filters);
    let (first, body) = split(&out);
    assert_eq!(packet_type(first, V5), Ok(PacketType::Subscribe));
    let subscribe = parse_subscribe(first, body, V5).unwrap();
    assert_eq!(subscribe.packet_id, 77);
    assert_eq!(subscribe.properties, props);
    let got: Vec<_> = subscribe
        .filters
        .iter()
        .map(|f| (f.filter, f.options))
        .collect();
    assert_eq!(
        got,
        [
            ("org/things/type/+/id/+/evt/+/fmt/+", 1),
            ("$share/g/a/#", 0x22),
            ("#", 0x19)
        ]
    );

    // v3: properties are not written.
    let mut out = BytesMut::new();
    encode_subscribe(&mut out, V311, 1, &props, &[(&[b"a"], 2)]);
    assert_eq!(&out[..], &h("82 06 00 01 00 01 61 02")[..]);
    let (first, body) = split(&out);
    let subscribe = parse_subscribe(first, body, V311).unwrap();
    assert_eq!(subscribe.properties, []);
    assert_eq!(
        subscribe.filters,
        [SubscribeFilter {
            filter: "a",
            options: 2
        }]
    );
}

#[test]
fn unsubscribe_round_trips() {
    let props = [Property {
        id: property::USER_PROPERTY,
        value: PropertyValue::Pair("a", "b"),
    }];
    let filters: [&[&[u8]]; 2] = [&[b"org/", b"a/+"], &[b"$share/g/#"]];
    for version in [V31, V311, V5] {
        let mut out = BytesMut::new();
        encode_unsubscribe(&mut out, version, 9, &props, &filters);
        let (first, body) = split(&out);
        assert_eq!(packet_type(first, version), Ok(PacketType::Unsubscribe));
        let unsubscribe = parse_unsubscribe(first, body, version).unwrap();
        assert_eq!(unsubscribe.packet_id, 9);
        assert_eq!(unsubscribe.filters, ["org/a/+", "$share/g/#"]);
        let expected: &[Property<'_>] = if version.is_v5() { &props } else { &[] };
        assert_eq!(unsubscribe.properties, expected);
    }
}

#[test]
fn ack_round_trips() {
    let kinds = [
        PacketType::Puback,
        PacketType::Pubrec,
        PacketType::Pubrel,
        PacketType::Pubcomp,
    ];
    for kind in kinds {
        let code = if kind == PacketType::Pubrel || kind == PacketType::Pubcomp {
            0x92
        } else {
            0x87
        };
        for version in [V31, V311, V5] {
            for (reason, string) in [
                (0, None),
                (code, None),
                (code, Some("denied")),
                (0, Some("ok")),
            ] {
                let mut out = BytesMut::new();
                encode_ack(&mut out, kind, version, 513, reason, string);
                let (first, body) = split(&out);
                assert_eq!(packet_type(first, version), Ok(kind));
                assert_eq!(
                    check_ack(kind, body, version),
                    Ok(513),
                    "{kind:?} {version:?}"
                );
                if !version.is_v5() || (reason == 0 && string.is_none()) {
                    assert_eq!(body.len(), 2);
                } else if string.is_none() {
                    assert_eq!(body, [0x02, 0x01, reason]);
                }
            }
        }
    }
    let mut out = BytesMut::new();
    encode_ack(&mut out, PacketType::Pubrel, V311, 1, 0, None);
    assert_eq!(&out[..], &h("62 02 00 01")[..]);

    // v3 acks are exactly 2 bytes.
    assert!(matches!(
        check_ack(PacketType::Puback, &h("00 01 00"), V311),
        Err(BadLength(_))
    ));
    let err = check_ack(PacketType::Puback, &h("00"), V311).unwrap_err();
    assert!(matches!(err, BadLength(_)));
    assert_close(&err, 271, 0x81);
    // v5: reason code, properties.
    assert_eq!(check_ack(PacketType::Puback, &h("00 01 10 00"), V5), Ok(1));
    assert!(matches!(
        check_ack(PacketType::Puback, &h("00 01 92"), V5),
        Err(ProtocolError(_))
    ));
    assert!(matches!(
        check_ack(PacketType::Pubrel, &h("00 01 87"), V5),
        Err(ProtocolError(_))
    ));
    let err = check_ack(PacketType::Puback, &h("00 01 00 02 1F 00"), V5).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");
    let err = check_ack(PacketType::Puback, &h("00 01 00 03 23 00 01"), V5).unwrap_err();
    assert!(matches!(err, Malformed(_)), "{err:?}");
    let err = check_ack(PacketType::Puback, &h("00 01 00 07 1F 00 01 61"), V5).unwrap_err();
    assert!(matches!(err, BadLength(_)), "{err:?}");
    assert!(matches!(
        check_ack(PacketType::Puback, &h("00 01 00 00 00"), V5),
        Err(BadLength(_))
    ));
    assert!(matches!(
        check_ack(PacketType::Publish, &h("00 01"), V5),
        Err(ProtocolError(_))
    ));
}

#[test]
fn disconnect_round_trips() {
    for (code, string) in [
        (0, None),
        (0x04, None),
        (0x81, Some("bad")),
        (0, Some("bye")),
    ] {
        let mut out = BytesMut::new();
        encode_disconnect_v5(&mut out, code, string);
        let (first, body) = split(&out);
        assert_eq!(packet_type(first, V5), Ok(PacketType::Disconnect));
        assert_eq!(check_disconnect(body, V5), Ok(code));
    }
    let mut out = BytesMut::new();
    encode_disconnect_v5(&mut out, 0, None);
    assert_eq!(&out[..], &h("E0 00")[..]);
    let mut out = BytesMut::new();
    encode_disconnect_v5(&mut out, 0x8E, None);
    assert_eq!(&out[..], &h("E0 01 8E")[..]);
    let mut out = BytesMut::new();
    encode_disconnect_v5(&mut out, 0x82, Some("x"));
    assert_eq!(&out[..], &h("E0 06 82 04 1F 00 01 78")[..]);

    assert_eq!(check_disconnect(&[], V311), Ok(0));
    assert!(matches!(
        check_disconnect(&h("00"), V311),
        Err(BadLength(_))
    ));
    assert_eq!(check_disconnect(&h("00 00"), V5), Ok(0));
    assert_eq!(check_disconnect(&h("04 05 11 00 00 00 00"), V5), Ok(4));
    assert!(matches!(
        check_disconnect(&h("05"), V5),
        Err(ProtocolError(_))
    ));
    assert!(matches!(
        check_disconnect(&h("00 02 1F 00"), V5),
        Err(BadLength(_))
    ));
    assert!(matches!(
        check_disconnect(&h("00 03 23 00 01"), V5),
        Err(Malformed(_))
    ));
}

#[test]
fn suback_bytes() {
    let mut out = BytesMut::new();
    encode_suback(&mut out, V311, 10, &[0, 1, 0x80], None);
    assert_eq!(&out[..], &h("90 05 00 0A 00 01 80")[..]);
    let mut out = BytesMut::new();
    encode_suback(&mut out, V311, 10, &[0x80], Some("ignored in v3"));
    assert_eq!(&out[..], &h("90 03 00 0A 80")[..]);
    let mut out = BytesMut::new();
    encode_suback(&mut out, V5, 10, &[2, 0x87], None);
    assert_eq!(&out[..], &h("90 05 00 0A 00 02 87")[..]);
    let mut out = BytesMut::new();
    encode_suback(&mut out, V5, 10, &[0x87], Some("no"));
    assert_eq!(&out[..], &h("90 09 00 0A 05 1F 00 02 6E 6F 87")[..]);
    // The properties parse in the SUBACK context.
    let (first, body) = split(&out);
    assert_eq!(packet_type(first, V5), Ok(PacketType::Suback));
    let props = parse_properties(&body[3..8], PropertyContext::Suback).unwrap();
    assert_eq!(
        props,
        [Property {
            id: property::REASON_STRING,
            value: PropertyValue::Str("no")
        }]
    );
}

#[test]
fn properties_round_trip_every_kind() {
    let props = [
        Property {
            id: property::PAYLOAD_FORMAT_INDICATOR,
            value: PropertyValue::Byte(1),
        },
        Property {
            id: property::TOPIC_ALIAS,
            value: PropertyValue::U16(65_535),
        },
        Property {
            id: property::MESSAGE_EXPIRY_INTERVAL,
            value: PropertyValue::U32(u32::MAX),
        },
        Property {
            id: property::SUBSCRIPTION_IDENTIFIER,
            value: PropertyValue::Varint(16_384),
        },
        Property {
            id: property::SUBSCRIPTION_IDENTIFIER,
            value: PropertyValue::Varint(1),
        },
        Property {
            id: property::CONTENT_TYPE,
            value: PropertyValue::Str("\u{FEFF}é"),
        },
        Property {
            id: property::CORRELATION_DATA,
            value: PropertyValue::Binary(&[0, 255]),
        },
        Property {
            id: property::USER_PROPERTY,
            value: PropertyValue::Pair("", "v"),
        },
    ];
    let mut out = BytesMut::new();
    encode_properties(&mut out, &props);
    let (len, n) = decode_varint(&out).unwrap().unwrap();
    assert_eq!(n + len, out.len());
    let parsed = parse_properties(&out[n..], PropertyContext::PublishFromServer).unwrap();
    assert_eq!(parsed, props);
    let mut seen = 0;
    for_each_property(&out[n..], PropertyContext::PublishFromServer, |_| seen += 1).unwrap();
    assert_eq!(seen, props.len());

    let mut out = BytesMut::new();
    encode_properties(&mut out, &[]);
    assert_eq!(&out[..], &[0]);
    assert_eq!(parse_properties(&[], PropertyContext::Ack), Ok(vec![]));
}

#[test]
fn property_contexts() {
    use PropertyContext as P;
    // Reason String: acks, SUBACK, UNSUBACK, DISCONNECT, AUTH, CONNACK; not CONNECT or PUBLISH.
    let reason = h("1F 00 01 78");
    for context in [
        P::Ack,
        P::Suback,
        P::Unsuback,
        P::Disconnect,
        P::Auth,
        P::Connack,
    ] {
        assert!(parse_properties(&reason, context).is_ok(), "{context:?}");
    }
    for context in [
        P::Connect,
        P::Will,
        P::PublishFromClient,
        P::Subscribe,
        P::Unsubscribe,
    ] {
        assert!(
            matches!(parse_properties(&reason, context), Err(Malformed(_))),
            "{context:?}"
        );
    }
    // Session Expiry in DISCONNECT; Server Reference in DISCONNECT.
    assert!(parse_properties(&h("11 00 00 00 01 1C 00 01 73"), P::Disconnect).is_ok());
    // Authentication in AUTH.
    assert!(parse_properties(&h("15 00 01 6D 16 00 00"), P::Auth).is_ok());
    assert!(matches!(
        parse_properties(&h("16 00 00"), P::Auth),
        Err(ProtocolError(_))
    ));
    // Will Delay only in the will.
    assert!(parse_properties(&h("18 00 00 00 01"), P::Will).is_ok());
    // Truncated values.
    assert!(matches!(
        parse_properties(&h("11 00 00"), P::Connect),
        Err(BadLength(_))
    ));
    assert!(matches!(
        parse_properties(&h("0B 80"), P::Subscribe),
        Err(BadLength(_))
    ));
    assert!(matches!(
        parse_properties(&h("0B 80 80 80 80 01"), P::Subscribe),
        Err(Malformed(_))
    ));
}

#[test]
fn topic_name_checks() {
    for topic in ["a", "/", "a/b", "$SYS/x", "a b", "\u{FEFF}"] {
        assert_eq!(check_topic_name(topic), Ok(()), "{topic}");
    }
    for topic in ["", "a/+", "#", "a\0"] {
        assert!(
            matches!(check_topic_name(topic), Err(InvalidTopic(_))),
            "{topic}"
        );
    }
    // Parsed from a PUBLISH, each fails with the same error as on its own, wherever the
    // offending byte is (the quick check is vectorised: start, middle and tail of a block).
    for at in [0, 7, 15, 16, 31, 40] {
        for bad in [b'+', b'#', 0] {
            let mut topic = vec![b'a'; 41];
            topic[at] = bad;
            let mut frame = BytesMut::new();
            encode_publish(&mut frame, 0x30, &[&topic], b"x");
            let (first, body) = split(&frame);
            assert!(
                matches!(parse_publish(first, body, V311, true), Err(InvalidTopic(_))),
                "{bad} at {at}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Robustness: every truncation and single-byte mutation of valid packets is an answer, not a panic.
// ---------------------------------------------------------------------------------------------

fn valid_frames() -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for connect in sample_connects() {
        let mut out = BytesMut::new();
        encode_connect(&mut out, &connect);
        frames.push(out.to_vec());
    }
    let mut out = BytesMut::new();
    let props = h("23 00 03 0B 05 26 00 01 6B 00 01 76 08 00 01 72");
    let body = publish_body(b"a/b", Some(9), Some(&props), b"hello");
    encode_publish(&mut out, 0x3B, &[b"a/b"], &body[5..]);
    frames.push(out.to_vec());
    let mut out = BytesMut::new();
    encode_publish(&mut out, 0x30, &[b"t/", b"x"], b"payload");
    frames.push(out.to_vec());
    let mut out = BytesMut::new();
    let props = [Property {
        id: property::SUBSCRIPTION_IDENTIFIER,
        value: PropertyValue::Varint(300),
    }];
    encode_subscribe(
        &mut out,
        V5,
        3,
        &props,
        &[(&[b"$share/g/a/#"], 0x21), (&[b"+/b"], 1)],
    );
    frames.push(out.to_vec());
    let mut out = BytesMut::new();
    encode_unsubscribe(&mut out, V5, 3, &[], &[&[b"a/+"], &[b"#"]]);
    frames.push(out.to_vec());
    let mut out = BytesMut::new();
    encode_ack(&mut out, PacketType::Pubrec, V5, 3, 0x10, Some("r"));
    frames.push(out.to_vec());
    let mut out = BytesMut::new();
    encode_disconnect_v5(&mut out, 0x04, Some("bye"));
    frames.push(out.to_vec());
    let mut out = BytesMut::new();
    encode_connack(&mut out, V5, &sample_connack());
    frames.push(out.to_vec());
    frames
}

fn sample_connack() -> Connack<'static> {
    Connack {
        session_present: false,
        code: 0,
        properties: vec![
            Property {
                id: property::RECEIVE_MAXIMUM,
                value: PropertyValue::U16(5),
            },
            Property {
                id: property::AUTHENTICATION_METHOD,
                value: PropertyValue::Str("m"),
            },
        ],
    }
}

/// Runs every decoder on a frame (complete or not); only a panic fails.
fn decode_everything(frame: &[u8]) {
    let header = match decode_frame_header(frame, MAX) {
        Ok(Some(header)) => Some(header),
        _ => None,
    };
    let (first, body) = match header {
        Some(header) => {
            let end = header.frame_len().min(frame.len());
            (
                header.first_byte,
                frame.get(header.header_len..end).unwrap_or_default(),
            )
        }
        None => (
            frame.first().copied().unwrap_or(0),
            frame.get(1..).unwrap_or_default(),
        ),
    };
    for version in [V31, V311, V5] {
        let _ = packet_type(first, version);
        let _ = parse_connack(body, version);
        let _ = parse_publish(first, body, version, true);
        let _ = parse_publish(first | 0x30, body, version, false);
        let _ = parse_subscribe(first, body, version);
        let _ = parse_subscribe(0x82, body, version);
        let _ = parse_unsubscribe(0xA2, body, version);
        let kinds = [
            PacketType::Puback,
            PacketType::Pubrec,
            PacketType::Pubrel,
            PacketType::Pubcomp,
        ];
        for kind in kinds {
            let _ = check_ack(kind, body, version);
        }
        let _ = check_disconnect(body, version);
    }
    let _ = parse_connect(first, body);
    let _ = parse_connect(0x10, body);
    for context in [
        PropertyContext::Connect,
        PropertyContext::Will,
        PropertyContext::Connack,
        PropertyContext::PublishFromClient,
        PropertyContext::PublishFromServer,
        PropertyContext::Ack,
        PropertyContext::Subscribe,
        PropertyContext::Suback,
        PropertyContext::Unsubscribe,
        PropertyContext::Unsuback,
        PropertyContext::Disconnect,
        PropertyContext::Auth,
    ] {
        let _ = parse_properties(body, context);
    }
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = check_topic_name(text);
        let _ = check_topic_filter(text);
    }
}

#[test]
fn valid_frames_decode() {
    let frames = valid_frames();
    // The publish, subscribe, unsubscribe, ack, disconnect and connack samples are all valid.
    let (first, body) = split(&frames[7]);
    assert!(parse_publish(first, body, V5, false).is_ok());
    let (first, body) = split(&frames[8]);
    assert!(parse_publish(first, body, V311, true).is_ok());
    let (first, body) = split(&frames[9]);
    assert!(parse_subscribe(first, body, V5).is_ok());
    let (first, body) = split(&frames[10]);
    assert!(parse_unsubscribe(first, body, V5).is_ok());
    let (_, body) = split(&frames[11]);
    assert_eq!(check_ack(PacketType::Pubrec, body, V5), Ok(3));
    let (_, body) = split(&frames[12]);
    assert_eq!(check_disconnect(body, V5), Ok(4));
    let (_, body) = split(&frames[13]);
    assert_eq!(parse_connack(body, V5), Ok(sample_connack()));
}

#[test]
fn truncations_and_mutations_never_panic() {
    for frame in valid_frames() {
        for end in 0..=frame.len() {
            decode_everything(&frame[..end]);
        }
        let mut mutated = frame.clone();
        for i in 0..frame.len() {
            let original = frame[i];
            for value in [
                0x00,
                0x01,
                0x7F,
                0x80,
                0xFF,
                original ^ 0x01,
                original ^ 0x40,
                original.wrapping_add(1),
            ] {
                mutated[i] = value;
                decode_everything(&mutated);
            }
            mutated[i] = original;
        }
    }
}

#[test]
fn filters_match_topics_as_a_broker_does() {
    assert!(filter_matches("a/+/c", "a/b/c"));
    assert!(filter_matches("a/#", "a/b/c"));
    assert!(filter_matches("a/#", "a"));
    assert!(filter_matches("#", "a/b"));
    assert!(filter_matches("+/+", "/a"));
    assert!(!filter_matches("a/+", "a/b/c"));
    assert!(!filter_matches("a/b", "a/b/c"));
    assert!(!filter_matches("a/b/c", "a/b"));
    assert!(filter_matches(
        "org1/iot-2/type/sensor/id/dev1/cmd/+/fmt/+",
        "org1/iot-2/type/sensor/id/dev1/cmd/reboot/fmt/json"
    ));
    // [MQTT-4.7.2-1]: a wildcard first level does not match a $ topic; a literal one does.
    assert!(!filter_matches("#", "$events/c1"));
    assert!(!filter_matches("+/c1", "$events/c1"));
    assert!(filter_matches("$events/+", "$events/c1"));
    assert!(filter_matches("$events/#", "$events/c1"));
    // A shared subscription matches by its filter.
    assert!(filter_matches("$share/g/a/+", "a/b"));
    assert!(!filter_matches("$share/g/#", "$events/c1"));
    assert!(!filter_matches("$share/g", "g"));
}

/// The word-at-a-time topic check agrees with the obvious byte-at-a-time one on every topic
/// built from a small alphabet, at every length up to three words and then some.
#[test]
fn the_word_at_a_time_topic_check_agrees_with_a_byte_at_a_time_reading() {
    let alphabet: [&str; 7] = ["a", "/", "+", "#", "\0", "é", "bc"];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..20_000 {
        let mut topic = String::new();
        // A small xorshift: the same topics every run.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let length = (state % 30) as usize;
        let mut pick = state;
        for _ in 0..length {
            pick = pick.rotate_left(5).wrapping_mul(0x2545_F491_4F6C_DD1D);
            topic.push_str(alphabet[(pick >> 60) as usize % alphabet.len()]);
        }
        let naive_levels = topic.split('/').count();
        // The first offending byte decides, as a reading from the start finds it.
        let first_bad = topic.bytes().find(|b| matches!(b, b'+' | b'#' | 0));
        let naive = if topic.is_empty() {
            Err("empty")
        } else if first_bad == Some(0) {
            Err("nul")
        } else if first_bad.is_some() {
            Err("wildcard")
        } else if naive_levels > MAX_TOPIC_LEVELS {
            Err("levels")
        } else {
            Ok(())
        };
        let fast = check_topic_name(&topic).map_err(|e| match e {
            CodecError::InvalidTopic("empty topic name") => "empty",
            CodecError::InvalidTopic("U+0000 in a topic name") => "nul",
            CodecError::InvalidTopic("wildcard in a topic name") => "wildcard",
            CodecError::InvalidTopic("too many topic levels") => "levels",
            _ => "other",
        });
        assert_eq!(fast, naive, "{topic:?}");
    }
}
