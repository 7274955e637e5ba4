//! The retained messages the proxy published itself (status messages), kept in memory so that
//! a new wildcard subscription gets them on a broker that delivers retained messages only to
//! filters without wildcards (RabbitMQ 3.x; `Capabilities::retained_to_wildcards` false).
//!
//! The control connection records what it publishes ([`RetainedRecord::record`]): a retained
//! publication replaces the topic's last one, an empty one clears it, the ledger's own topics
//! are left out. The session asks for the messages matching a filter once the broker granted
//! the subscription ([`RetainedRecord::matching`]) and sends them to the client as retained
//! QoS 0 PUBLISHes, as a broker would have. The record holds at most [`MAX_RECORD_BYTES`];
//! beyond that, new topics are not recorded (counted and logged once), updates still are.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tracing::warn;

use crate::codec::filter_matches;
use crate::ledger::LEDGER_ROOT;
use crate::profile::Publication;

/// Bytes (topics and payloads) the record holds, at most: about 400,000 WIoTP statuses.
pub const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

/// The last retained message of each topic the proxy published, by broker topic.
#[derive(Debug)]
pub struct RetainedRecord {
    inner: Mutex<Inner>,
    limit: usize,
    /// New topics left out because the record was full.
    pub refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    by_topic: BTreeMap<String, Bytes>,
    bytes: usize,
}

impl Default for RetainedRecord {
    fn default() -> Self {
        RetainedRecord::with_limit(MAX_RECORD_BYTES)
    }
}

impl RetainedRecord {
    /// A record of at most `limit` bytes.
    pub fn with_limit(limit: usize) -> RetainedRecord {
        RetainedRecord {
            inner: Mutex::default(),
            limit,
            refused: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each update is one insert or removal with its byte count; a poisoned map is consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes note of publications on their way to the broker, in order.
    pub fn record(&self, publications: &[Publication]) {
        let mut inner = self.lock();
        for publication in publications {
            if !publication.retain || publication.topic.starts_with(LEDGER_ROOT) {
                continue;
            }
            let topic = &publication.topic;
            if let Some(old) = inner.by_topic.remove(topic) {
                inner.bytes -= topic.len() + old.len();
            }
            if publication.payload.is_empty() {
                continue;
            }
            let size = topic.len() + publication.payload.len();
            if inner.bytes + size > self.limit {
                if self.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(
                        limit = self.limit,
                        "the record of retained statuses is full: wildcard subscribers will not \
                         get the retained status of newer clients replayed"
                    );
                }
                continue;
            }
            inner.bytes += size;
            inner
                .by_topic
                .insert(topic.clone(), publication.payload.clone());
        }
    }

    /// The recorded messages (broker topic, payload) that `filter` (a broker filter) matches.
    pub fn matching(&self, filter: &str) -> Vec<(String, Bytes)> {
        // Only topics that start with the filter's levels before its first wildcard can match.
        let literal = match filter.find(['+', '#']) {
            Some(at) => &filter[..at],
            None => filter,
        };
        let inner = self.lock();
        inner
            .by_topic
            .range::<str, _>((
                std::ops::Bound::Included(literal),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(topic, _)| topic.starts_with(literal))
            .filter(|(topic, _)| filter_matches(filter, topic))
            .map(|(topic, payload)| (topic.clone(), payload.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retained(topic: &str, payload: &str) -> Publication {
        Publication {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            retain: true,
        }
    }

    #[test]
    fn the_last_retained_message_of_each_topic_is_replayed_to_matching_filters() {
        let record = RetainedRecord::default();
        record.record(&[
            retained("org1/iot-2/type/t/id/a/mon", "Connect"),
            retained("org1/iot-2/type/t/id/b/mon", "Connect"),
            retained("org1/iot-2/type/t/id/a/mon", "Disconnect"),
            retained("org2/iot-2/type/t/id/c/mon", "Connect"),
            retained("warden:ledger/ns/boots", "b1"),
            Publication {
                retain: false,
                ..retained("org1/iot-2/type/t/id/d/mon", "not retained")
            },
        ]);
        let found = record.matching("org1/iot-2/type/+/id/+/mon");
        let found: Vec<(&str, &[u8])> = found
            .iter()
            .map(|(topic, payload)| (topic.as_str(), &payload[..]))
            .collect();
        assert_eq!(
            found,
            [
                ("org1/iot-2/type/t/id/a/mon", &b"Disconnect"[..]),
                ("org1/iot-2/type/t/id/b/mon", &b"Connect"[..])
            ]
        );
        assert_eq!(
            record.matching("#").len(),
            3,
            "the ledger is never recorded"
        );
        // An empty retained message clears the topic.
        record.record(&[retained("org1/iot-2/type/t/id/b/mon", "")]);
        assert_eq!(record.matching("org1/#").len(), 1);
    }

    #[test]
    fn a_full_record_takes_updates_but_no_new_topics() {
        let record = RetainedRecord::with_limit(30);
        record.record(&[retained("a/1", "0123456789"), retained("a/2", "0123456789")]);
        record.record(&[retained("a/3", "0123456789"), retained("a/1", "x")]);
        let topics: Vec<String> = record.matching("a/+").into_iter().map(|(t, _)| t).collect();
        assert_eq!(topics, ["a/1", "a/2"]);
        assert_eq!(record.refused.load(Ordering::Relaxed), 1);
        assert_eq!(&record.matching("a/1")[0].1[..], b"x");
    }
}
