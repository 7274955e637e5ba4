//! PUBLISH: `parse_publish` for both directions and every protocol version, the MQTT 5 property
//! checks, and the round trips through `encode_publish` and `encode_publish_with_properties`.
//!
//! Input: the first byte of the fixed header, then the body (no Remaining Length).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqtt_warden::codec::{
    check_topic_name, decode_frame_header, encode_publish, encode_publish_with_properties,
    for_each_property, parse_properties, parse_publish, property, publish_properties,
    PropertyContext, PropertyValue, ProtocolVersion, PublishView, MAX_VARIABLE_BYTE_INTEGER,
};

const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V31,
    ProtocolVersion::V311,
    ProtocolVersion::V5,
];

/// Frames `out` and returns its first byte and body, checking the header covers it exactly.
fn unframe(out: &[u8]) -> (u8, &[u8]) {
    let header = decode_frame_header(out, MAX_VARIABLE_BYTE_INTEGER + 5)
        .expect("encoded PUBLISH has a valid header")
        .expect("encoded PUBLISH is complete");
    assert_eq!(header.frame_len(), out.len());
    (header.first_byte, &out[header.header_len..])
}

fn check(first_byte: u8, body: &[u8], version: ProtocolVersion, from_client: bool) {
    let Ok(view) = parse_publish(first_byte, body, version, from_client) else {
        return;
    };
    // The view describes the body it came from.
    assert_eq!(view.qos, (first_byte >> 1) & 0x03);
    assert!(view.qos <= 2);
    assert!(!(view.dup && view.qos == 0));
    assert_eq!(view.packet_id.is_some(), view.qos > 0);
    assert_ne!(view.packet_id, Some(0));
    assert_eq!(view.after_topic.start, 2 + view.topic.len());
    assert_eq!(&body[2..view.after_topic.start], view.topic.as_bytes());
    assert_eq!(view.after_topic.end, body.len());
    assert_eq!(view.payload.end, body.len());
    assert!(view.after_topic.start <= view.payload.start);
    if view.topic.is_empty() {
        assert!(version.is_v5() && view.topic_alias.is_some());
    } else {
        check_topic_name(view.topic).expect("topic was checked");
    }
    if !version.is_v5() {
        assert_eq!(view.topic_alias, None);
        let id_len = if view.packet_id.is_some() { 2 } else { 0 };
        assert_eq!(view.payload.start, view.after_topic.start + id_len);
    }

    // MQTT 5 properties: the same list through both entry points, allowed in this direction.
    let props = publish_properties(body, &view);
    let context = if from_client {
        PropertyContext::PublishFromClient
    } else {
        PropertyContext::PublishFromServer
    };
    let properties = if version.is_v5() {
        let properties = parse_properties(props, context).expect("PUBLISH properties parse");
        let mut visited = Vec::new();
        for_each_property(props, context, |p| visited.push(p)).expect("same properties");
        assert_eq!(visited, properties);
        let alias = properties.iter().find_map(|p| match p.value {
            PropertyValue::U16(alias) if p.id == property::TOPIC_ALIAS => Some(alias),
            _ => None,
        });
        assert_eq!(alias, view.topic_alias);
        if from_client {
            assert!(properties
                .iter()
                .all(|p| p.id != property::SUBSCRIPTION_IDENTIFIER));
        }
        properties
    } else {
        assert!(props.is_empty());
        Vec::new()
    };

    // Round trip: the topic (in one part or two) and the untouched rest give the same body.
    let topic = view.topic.as_bytes();
    let cut = topic.len() / 2;
    for parts in [&[topic][..], &[&topic[..cut], &topic[cut..]][..]] {
        let mut out = BytesMut::new();
        encode_publish(&mut out, first_byte, parts, &body[view.after_topic.clone()]);
        let (first, encoded_body) = unframe(&out);
        assert_eq!(first, first_byte);
        assert_eq!(encoded_body, body, "encode_publish changes the PUBLISH");
        let again = parse_publish(first, encoded_body, version, from_client)
            .expect("re-encoded PUBLISH parses");
        assert_eq!(again, view);
    }

    // Round trip with the properties written anew: the same bytes again (MQTT 5 only; the
    // function writes a Property Length).
    if version.is_v5() {
        let mut out = BytesMut::new();
        encode_publish_with_properties(&mut out, first_byte, &[topic], &view, &properties, body);
        let (first, encoded_body) = unframe(&out);
        assert_eq!(
            encoded_body, body,
            "encode_publish_with_properties changes it"
        );
        let again: PublishView<'_> = parse_publish(first, encoded_body, version, from_client)
            .expect("re-encoded PUBLISH parses");
        assert_eq!(again, view);
    }

    // A rewritten topic (a prefix in front, as the proxy writes upstream) keeps the rest intact.
    if !view.topic.is_empty() {
        let prefix: &[u8] = b"org1/";
        let mut out = BytesMut::new();
        encode_publish(
            &mut out,
            first_byte,
            &[prefix, topic],
            &body[view.after_topic.clone()],
        );
        let (first, encoded_body) = unframe(&out);
        if let Ok(again) = parse_publish(first, encoded_body, version, from_client) {
            assert_eq!(again.topic.as_bytes(), [prefix, topic].concat());
            assert_eq!(again.packet_id, view.packet_id);
            assert_eq!(again.topic_alias, view.topic_alias);
            assert_eq!(
                &encoded_body[again.payload.clone()],
                &body[view.payload.clone()]
            );
        } else {
            // Only the extra level may push it over the limit.
            assert!(check_topic_name(&format!("org1/{}", view.topic)).is_err());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first_byte, body)) = data.split_first() else {
        return;
    };
    for version in VERSIONS {
        for from_client in [true, false] {
            check(first_byte, body, version, from_client);
        }
    }
    // A client PUBLISH is a broker PUBLISH too (the client side allows fewer properties).
    for version in VERSIONS {
        if let Ok(view) = parse_publish(first_byte, body, version, true) {
            assert_eq!(parse_publish(first_byte, body, version, false), Ok(view));
        }
    }
});
