//! SUBSCRIBE and UNSUBSCRIBE: `parse_subscribe` / `parse_unsubscribe` for every protocol version,
//! the round trip through `encode_subscribe` / `encode_unsubscribe`, and `check_topic_filter` /
//! `check_topic_name` against a plain reading of the MQTT rules.
//!
//! Input: the first byte of the fixed header, then the body (no Remaining Length). The input
//! as a whole, when it is UTF-8, is also checked as one topic filter and one topic name.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqtt_warden::codec::{
    check_topic_filter, check_topic_name, decode_frame_header, encode_subscribe,
    encode_unsubscribe, parse_subscribe, parse_unsubscribe, ProtocolVersion, MAX_TOPIC_LEVELS,
    MAX_VARIABLE_BYTE_INTEGER,
};

const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V31,
    ProtocolVersion::V311,
    ProtocolVersion::V5,
];

/// A topic name per MQTT (§4.7): not empty, no wildcard, no U+0000; and the proxy's level limit.
fn spec_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && !topic.contains(['+', '#', '\0'])
        && topic.split('/').count() <= MAX_TOPIC_LEVELS
}

/// A topic filter per MQTT (§4.7, §4.8.2): not empty, no U+0000 anywhere, `+` and `#` alone in
/// their level, `#` only last; `$share/NAME/FILTER` with a NAME of at least one character and
/// none of `/ + #`, and a non-empty FILTER. The level limit applies to FILTER.
fn spec_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let filter = match filter.strip_prefix("$share/") {
        Some(shared) => match shared.split_once('/') {
            Some((name, rest)) if !name.is_empty() && !name.contains(['+', '#']) => rest,
            _ => return false,
        },
        None => filter,
    };
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && levels.len() <= MAX_TOPIC_LEVELS
        && levels.iter().enumerate().all(|(i, level)| {
            (*level == "#" && i + 1 == levels.len()) || *level == "+" || !level.contains(['+', '#'])
        })
}

/// `check_topic_filter` and `check_topic_name` agree with the rules, and a topic name that is not
/// a shared subscription is a filter too.
fn check_strings(text: &str) {
    assert_eq!(
        check_topic_filter(text).is_ok(),
        spec_topic_filter(text),
        "check_topic_filter({text:?})"
    );
    assert_eq!(
        check_topic_name(text).is_ok(),
        spec_topic_name(text),
        "check_topic_name({text:?})"
    );
    if check_topic_name(text).is_ok() && !text.starts_with("$share/") {
        assert!(
            check_topic_filter(text).is_ok(),
            "a topic name is a filter: {text:?}"
        );
    }
}

fn unframe(out: &[u8]) -> (u8, &[u8]) {
    let header = decode_frame_header(out, MAX_VARIABLE_BYTE_INTEGER + 5)
        .expect("valid header")
        .expect("complete frame");
    assert_eq!(header.frame_len(), out.len());
    (header.first_byte, &out[header.header_len..])
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_strings(text);
    }
    let Some((&first_byte, body)) = data.split_first() else {
        return;
    };
    for version in VERSIONS {
        if let Ok(subscribe) = parse_subscribe(first_byte, body, version) {
            assert_eq!(first_byte, 0x82);
            assert_ne!(subscribe.packet_id, 0);
            assert!(!subscribe.filters.is_empty());
            assert!(version.is_v5() || subscribe.properties.is_empty());
            for filter in &subscribe.filters {
                check_strings(filter.filter);
                assert!(check_topic_filter(filter.filter).is_ok());
                assert_ne!(filter.options & 0x03, 3);
                if version.is_v5() {
                    assert_eq!(filter.options & 0xC0, 0);
                    assert_ne!((filter.options >> 4) & 0x03, 3);
                    if filter.filter.starts_with("$share/") {
                        assert_eq!(filter.options & 0x04, 0, "No Local on a shared filter");
                    }
                } else {
                    assert_eq!(filter.options & 0xFC, 0);
                }
            }
            let parts: Vec<[&[u8]; 1]> = subscribe
                .filters
                .iter()
                .map(|f| [f.filter.as_bytes()])
                .collect();
            let filters: Vec<(&[&[u8]], u8)> = parts
                .iter()
                .zip(&subscribe.filters)
                .map(|(p, f)| (&p[..], f.options))
                .collect();
            let mut out = BytesMut::new();
            encode_subscribe(
                &mut out,
                version,
                subscribe.packet_id,
                &subscribe.properties,
                &filters,
            );
            let (first, encoded_body) = unframe(&out);
            assert_eq!(encoded_body, body, "encode_subscribe changes the SUBSCRIBE");
            assert_eq!(parse_subscribe(first, encoded_body, version), Ok(subscribe));
        }
        if let Ok(unsubscribe) = parse_unsubscribe(first_byte, body, version) {
            assert_eq!(first_byte, 0xA2);
            assert_ne!(unsubscribe.packet_id, 0);
            assert!(!unsubscribe.filters.is_empty());
            for filter in &unsubscribe.filters {
                check_strings(filter);
                assert!(check_topic_filter(filter).is_ok());
            }
            let parts: Vec<[&[u8]; 1]> =
                unsubscribe.filters.iter().map(|f| [f.as_bytes()]).collect();
            let filters: Vec<&[&[u8]]> = parts.iter().map(|p| &p[..]).collect();
            let mut out = BytesMut::new();
            encode_unsubscribe(
                &mut out,
                version,
                unsubscribe.packet_id,
                &unsubscribe.properties,
                &filters,
            );
            let (first, encoded_body) = unframe(&out);
            assert_eq!(
                encoded_body, body,
                "encode_unsubscribe changes the UNSUBSCRIBE"
            );
            assert_eq!(
                parse_unsubscribe(first, encoded_body, version),
                Ok(unsubscribe)
            );
        }
    }
});
