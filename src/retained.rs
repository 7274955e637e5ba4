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
//!
//! With several instances (`coordination:`), each instance's record also takes the others'
//! statuses (through Redis, `coord::redis_retained`), which can arrive late. Those carry an
//! order ([`Order`]): an update never replaces a newer one of the same topic.

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
    by_topic: BTreeMap<String, (Order, Bytes)>,
    bytes: usize,
}

/// Where a retained status stands among its topic's statuses: the `Sequence` of the client ID
/// that published it (its epoch's Connect or Disconnect), or 0 when it has none (a shared
/// client ID, or a single instance), which neither replaces in order nor is kept from replacing.
pub type Order = u64;

/// Whether an update of order `new` may replace one of order `old`: unless both are ordered
/// and the old one is newer. (The same rule runs in Redis's script.)
pub fn replaces(old: Order, new: Order) -> bool {
    old == 0 || new == 0 || new >= old
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
        self.record_in_order(publications, 0);
    }

    /// Takes note of publications of order `order` (see [`Order`]).
    pub fn record_in_order(&self, publications: &[Publication], order: Order) {
        let mut inner = self.lock();
        for publication in publications {
            if is_recorded(publication) {
                self.apply_locked(&mut inner, &publication.topic, order, &publication.payload);
            }
        }
    }

    /// Applies one update (an empty payload clears the topic) unless the topic holds a newer
    /// one; answers whether it did.
    pub fn apply(&self, topic: &str, order: Order, payload: &Bytes) -> bool {
        let mut inner = self.lock();
        self.apply_locked(&mut inner, topic, order, payload)
    }

    fn apply_locked(&self, inner: &mut Inner, topic: &str, order: Order, payload: &Bytes) -> bool {
        if let Some((old_order, old)) = inner.by_topic.get(topic) {
            if !replaces(*old_order, order) {
                return false;
            }
            inner.bytes -= topic.len() + old.len();
            inner.by_topic.remove(topic);
        }
        if payload.is_empty() {
            return true;
        }
        let size = topic.len() + payload.len();
        if inner.bytes + size > self.limit {
            if self.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                warn!(
                    limit = self.limit,
                    "the record of retained statuses is full: wildcard subscribers will not \
                     get the retained status of newer clients replayed"
                );
            }
            return false;
        }
        inner.bytes += size;
        inner
            .by_topic
            .insert(topic.to_owned(), (order, payload.clone()));
        true
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
            .map(|(topic, (_, payload))| (topic.clone(), payload.clone()))
            .collect()
    }
}

/// Whether the record keeps `publication`: a retained one that is not the ledger's.
pub fn is_recorded(publication: &Publication) -> bool {
    publication.retain && !publication.topic.starts_with(LEDGER_ROOT)
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
    fn an_ordered_update_never_replaces_a_newer_one() {
        let record = RetainedRecord::default();
        let topic = "org1/iot-2/type/t/id/a/mon";
        let bytes = |text: &str| Bytes::copy_from_slice(text.as_bytes());
        assert!(record.apply(topic, 3, &bytes("Connect 3")));
        // The Disconnect of the epoch before comes late, from another instance.
        assert!(!record.apply(topic, 2, &bytes("Disconnect 2")));
        assert_eq!(&record.matching(topic)[0].1[..], b"Connect 3");
        assert!(record.apply(topic, 4, &bytes("Disconnect 4")));
        // A status without an order replaces any, and any replaces it.
        assert!(record.apply(topic, 0, &bytes("unordered")));
        assert!(record.apply(topic, 1, &bytes("Connect 1")));
        assert_eq!(&record.matching(topic)[0].1[..], b"Connect 1");
        // Clearing follows the same rule.
        assert!(record.apply(topic, 2, &Bytes::new()));
        assert!(record.matching(topic).is_empty());
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
