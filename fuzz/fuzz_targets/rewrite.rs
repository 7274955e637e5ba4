//! The topic rewrite in both directions (`rewrite::TopicMap`), for arbitrary prefixes and an
//! arbitrary client topic or filter, and an arbitrary broker topic back.
//!
//! Input: four lines, `CLIENT_STRIP\nBROKER_ADD\nFILTER_PREFIX\nTOPIC` (the topic is the rest,
//! newlines included). The prefixes are used only when a profile could build them: no wildcard
//! or U+0000, a broker prefix that ends with `/` and does not start with `$`, and a filter
//! prefix that is empty or a share group `$share/NAME/`.
//!
//! Asserted:
//! - a topic name `check_topic_name` accepts either maps to a broker form that is valid MQTT
//!   (at most 65,535 bytes, at most `MAX_TOPIC_LEVELS` levels, `check_topic_name` accepts it)
//!   and maps back with `to_client` to the same bytes, or is refused as too long or too deep
//!   exactly when it would be;
//! - a filter `check_topic_filter` accepts maps to a broker filter `check_topic_filter` accepts
//!   (share group included), or is refused as above; an UNSUBSCRIBE filter likewise;
//! - any broker topic maps to the client either not at all or to a non-empty topic of at most
//!   65,535 bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_warden::codec::{check_topic_filter, check_topic_name, MAX_TOPIC_LEVELS};
use mqtt_warden::rewrite::{RewriteError, TopicMap, MAX_TOPIC_BYTES};

/// Whether a profile could build these prefixes.
fn prefixes_accepted(client_strip: &str, broker_add: &str, filter_prefix: &str) -> bool {
    let plain = |text: &str| !text.contains(['+', '#', '\0']);
    let share_ok = filter_prefix.is_empty()
        || filter_prefix
            .strip_prefix("$share/")
            .and_then(|rest| rest.strip_suffix('/'))
            .is_some_and(|name| !name.is_empty() && !name.contains('/'));
    // The config refuses an org prefix that starts with `$` (a finding of this target).
    plain(client_strip)
        && plain(broker_add)
        && plain(filter_prefix)
        && broker_add.ends_with('/')
        && !broker_add.starts_with('$')
        && share_ok
}

fn levels(topic: &str) -> usize {
    topic.split('/').count()
}

/// The error the broker form of `rest` behind `extra` bytes and `broker_add` must get, if any.
fn expected_error(extra: usize, broker_add: &str, rest: &str) -> Option<RewriteError> {
    if extra + broker_add.len() + rest.len() > MAX_TOPIC_BYTES {
        Some(RewriteError::TooLong)
    } else if levels(&format!("{broker_add}{rest}")) > MAX_TOPIC_LEVELS {
        Some(RewriteError::TooDeep)
    } else {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(4, '\n');
    let (Some(client_strip), Some(broker_add), Some(filter_prefix), Some(topic)) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return;
    };
    if !prefixes_accepted(client_strip, broker_add, filter_prefix) {
        return;
    }
    let map = TopicMap::new(client_strip, broker_add, filter_prefix);

    if check_topic_name(topic).is_ok() {
        match map.to_broker(topic) {
            Ok(parts) => {
                let broker = String::from_utf8(parts.concat()).expect("UTF-8");
                assert!(broker.len() <= MAX_TOPIC_BYTES, "{} bytes", broker.len());
                assert!(levels(&broker) <= MAX_TOPIC_LEVELS);
                assert!(check_topic_name(&broker).is_ok(), "invalid broker topic");
                if broker.len() > broker_add.len() {
                    let back = map.to_client(&broker).expect("maps back");
                    assert_eq!(back.concat(), topic.as_bytes(), "round trip");
                }
            }
            Err(RewriteError::Outside) => assert!(!topic.starts_with(client_strip)),
            Err(error) => {
                let rest = &topic[client_strip.len()..];
                assert_eq!(Some(error), expected_error(0, broker_add, rest));
            }
        }
    }

    if check_topic_filter(topic).is_ok() {
        match map.filter_to_broker(topic) {
            Ok(parts) => {
                let broker = String::from_utf8(parts.concat()).expect("UTF-8");
                assert!(broker.len() <= MAX_TOPIC_BYTES, "{} bytes", broker.len());
                assert!(
                    check_topic_filter(&broker).is_ok(),
                    "invalid broker filter {:?}",
                    &broker[..broker.len().min(80)]
                );
            }
            Err(RewriteError::Outside) => assert!(!topic.starts_with(client_strip)),
            Err(error) => {
                let rest = &topic[client_strip.len()..];
                assert_eq!(
                    Some(error),
                    expected_error(filter_prefix.len(), broker_add, rest)
                );
            }
        }
        if let Ok(parts) = map.unsubscribe_to_broker(topic) {
            let broker = String::from_utf8(parts.concat()).expect("UTF-8");
            assert!(broker.len() <= MAX_TOPIC_BYTES);
            assert!(check_topic_filter(&broker).is_ok(), "invalid UNSUBSCRIBE filter");
        }
    }

    if let Some(parts) = map.to_client(topic) {
        let client = parts.concat();
        assert!(!client.is_empty(), "empty client topic");
        assert!(client.len() <= MAX_TOPIC_BYTES);
    }
});
