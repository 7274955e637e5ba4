//! CONNECT: `parse_connect` over arbitrary bytes, and the round trip through `encode_connect`.
//!
//! Input: the first byte of the fixed header, then the body (no Remaining Length; it is implied by
//! the input's length). When the body parses, encoding the result must give back exactly the
//! body (the parser accepts only canonical encodings: minimal lengths, nothing after the last
//! field), and parsing that again must agree field by field, MQTT 5 properties and will included.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqtt_warden::codec::{
    check_topic_name, decode_frame_header, encode_connect, parse_connect, parse_properties,
    PropertyContext, ProtocolVersion, MAX_VARIABLE_BYTE_INTEGER,
};

fuzz_target!(|data: &[u8]| {
    let Some((&first_byte, body)) = data.split_first() else {
        return;
    };
    let Ok(connect) = parse_connect(first_byte, body) else {
        return;
    };
    assert_eq!(first_byte, 0x10);
    if !connect.version.is_v5() {
        assert!(connect.properties.is_empty());
        assert!(connect.password.is_none() || connect.username.is_some());
    }
    if let Some(will) = &connect.will {
        assert!(will.qos <= 2);
        check_topic_name(will.topic).expect("will topic was checked");
        if !connect.version.is_v5() {
            assert!(will.properties.is_empty());
        }
    }

    let mut out = BytesMut::new();
    encode_connect(&mut out, &connect);
    let header = decode_frame_header(&out, MAX_VARIABLE_BYTE_INTEGER + 5)
        .expect("encoded CONNECT has a valid header")
        .expect("encoded CONNECT is complete");
    assert_eq!(header.frame_len(), out.len());
    assert_eq!(header.first_byte, 0x10);
    let encoded_body = &out[header.header_len..];
    assert_eq!(encoded_body, body, "re-encoding changes the CONNECT");

    let again = parse_connect(header.first_byte, encoded_body).expect("re-encoded CONNECT parses");
    assert_eq!(again.version, connect.version);
    assert_eq!(again.clean_start, connect.clean_start);
    assert_eq!(again.keep_alive, connect.keep_alive);
    assert_eq!(again.properties, connect.properties);
    assert_eq!(again.client_id, connect.client_id);
    assert_eq!(again.will, connect.will);
    assert_eq!(again.username, connect.username);
    assert_eq!(again.password, connect.password);
    assert_eq!(again, connect);

    // The MQTT 5 property lists, checked on their own, give what the CONNECT held.
    if connect.version == ProtocolVersion::V5 {
        let mut props = BytesMut::new();
        mqtt_warden::codec::encode_properties(&mut props, &connect.properties);
        let (len_bytes, list) = split_property_length(&props);
        assert!(len_bytes >= 1);
        assert_eq!(
            parse_properties(list, PropertyContext::Connect).expect("CONNECT properties"),
            connect.properties
        );
        if let Some(will) = &connect.will {
            let mut props = BytesMut::new();
            mqtt_warden::codec::encode_properties(&mut props, &will.properties);
            let (_, list) = split_property_length(&props);
            assert_eq!(
                parse_properties(list, PropertyContext::Will).expect("will properties"),
                will.properties
            );
        }
    }
});

/// Splits an encoded property list into its Property Length bytes and the list.
fn split_property_length(encoded: &[u8]) -> (usize, &[u8]) {
    let len_bytes = encoded
        .iter()
        .position(|b| b & 0x80 == 0)
        .expect("varint end")
        + 1;
    (len_bytes, &encoded[len_bytes..])
}
