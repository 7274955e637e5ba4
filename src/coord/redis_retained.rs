//! The record of retained statuses (`crate::retained`), shared by every instance through Redis,
//! for brokers that deliver retained messages only to filters without wildcards (RabbitMQ 3.x):
//! a late wildcard subscriber on any instance gets the statuses every instance published.
//!
//! - `warden:retained`: broker topic → `ORDER \0 PAYLOAD`, the last retained status of each
//!   topic. One key (one slot of a cluster), written by [`WRITE`], which keeps an update only
//!   if no newer one of the topic is there ([`crate::retained::replaces`]), and then announces
//!   it on the channel `warden:retained-updates` as `TOPIC \0 ORDER \0 PAYLOAD`.
//! - Each instance loads the hash when it starts ([`RetainedMirror::load`], again after its
//!   pub/sub connection was lost) and applies every announcement ([`RetainedMirror::receive`])
//!   with the same rule, so late or repeated announcements change nothing.
//! - Its own statuses are recorded at once ([`RetainedMirror::note`]) and written by one task
//!   ([`RetainedMirror::write`]). Writes that wait for Redis are kept per topic (the newest only,
//!   at most [`MAX_PENDING`] topics) and written when Redis is back.
//!
//! Statuses carry their client ID's order (`Sequence`), so a Disconnect that one instance writes
//! late never replaces the Connect that another instance published after it. What Redis loses
//! (a restart without persistence) comes back only as clients connect and disconnect again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::Script;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use super::redis_link::RedisConn;
use crate::profile::Publication;
use crate::retained::{is_recorded, Order, RetainedRecord};

/// The hash of every topic's last retained status.
pub const HASH: &str = "warden:retained";
/// Where updates of the hash are announced (not under `warden:chan:`, the instances' channels).
pub const CHANNEL: &str = "warden:retained-updates";
/// Topics whose writes may wait for Redis at once; beyond, new topics are not written.
pub const MAX_PENDING: usize = 100_000;
/// Writes in flight to Redis at once (pipelined on the multiplexed connection).
const WRITES_AT_ONCE: usize = 256;
/// Entries asked for per step when the hash is loaded.
const LOAD_STEP: usize = 1_000;
/// The longest one Redis command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the writer waits before it tries again after Redis failed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Writes one topic's status unless the hash holds a newer one, and announces it.
/// KEYS: the hash. ARGV: topic, order, payload (empty: clear), channel.
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local new = tonumber(ARGV[2])
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local old = tonumber(string.match(held, '^(%d+)'))
  if old and old ~= 0 and new ~= 0 and new < old then return 0 end
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\0' .. ARGV[3])
end
redis.call('PUBLISH', ARGV[4], ARGV[1] .. '\0' .. ARGV[2] .. '\0' .. ARGV[3])
return 1
"#,
    )
});

/// One instance's side of the shared record.
pub struct RetainedMirror {
    record: Arc<RetainedRecord>,
    /// Writes waiting for the writer: topic → the newest (order, payload).
    pending: Mutex<HashMap<String, (Order, Bytes)>>,
    wake: Notify,
    /// Topics not written because [`MAX_PENDING`] writes were waiting.
    pub dropped: AtomicU64,
}

impl RetainedMirror {
    /// A mirror that keeps `record` in step with the other instances.
    pub fn new(record: Arc<RetainedRecord>) -> RetainedMirror {
        RetainedMirror {
            record,
            pending: Mutex::default(),
            wake: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<String, (Order, Bytes)>> {
        // Each change is one insert or take; a poisoned map is consistent.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records this instance's publications of order `order` at once, and queues the retained
    /// ones for Redis.
    pub fn note(&self, publications: &[Publication], order: Order) {
        self.record.record_in_order(publications, order);
        let mut queued = false;
        {
            let mut pending = self.pending();
            for publication in publications.iter().filter(|p| is_recorded(p)) {
                let topic = &publication.topic;
                if self.has_room(&pending, topic) {
                    pending.insert(topic.clone(), (order, publication.payload.clone()));
                    queued = true;
                }
            }
        }
        if queued {
            self.wake.notify_one();
        }
    }

    /// Whether a write of `topic` may wait: it replaces one that waits, or there is room for
    /// one more topic (else it is counted, and the first one logged).
    fn has_room(&self, pending: &HashMap<String, (Order, Bytes)>, topic: &str) -> bool {
        if pending.len() < MAX_PENDING || pending.contains_key(topic) {
            return true;
        }
        if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(
                limit = MAX_PENDING,
                "too many statuses wait for Redis: the other instances will not replay some of \
                 them to wildcard subscribers"
            );
        }
        false
    }

    /// Applies one announcement from the channel (`TOPIC \0 ORDER \0 PAYLOAD`).
    pub fn receive(&self, message: &[u8]) {
        let mut parts = message.splitn(3, |&b| b == 0);
        let (Some(topic), Some(order), Some(payload)) = (parts.next(), parts.next(), parts.next())
        else {
            debug!("malformed retained-status announcement");
            return;
        };
        let (Ok(topic), Some(order)) = (std::str::from_utf8(topic), parse_order(order)) else {
            debug!("malformed retained-status announcement");
            return;
        };
        self.record
            .apply(topic, order, &Bytes::copy_from_slice(payload));
    }

    /// Loads every status the hash holds into the record.
    pub async fn load(&self, conn: &mut RedisConn) -> redis::RedisResult<usize> {
        let mut cursor: u64 = 0;
        let mut loaded = 0;
        loop {
            let (next, flat): (u64, Vec<Vec<u8>>) = bounded(
                redis::cmd("HSCAN")
                    .arg(HASH)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(LOAD_STEP)
                    .query_async(conn),
            )
            .await?;
            for pair in flat.chunks_exact(2) {
                let (topic, value) = (&pair[0], &pair[1]);
                let Some(at) = value.iter().position(|&b| b == 0) else {
                    continue;
                };
                let (Ok(topic), Some(order)) =
                    (std::str::from_utf8(topic), parse_order(&value[..at]))
                else {
                    continue;
                };
                self.record
                    .apply(topic, order, &Bytes::copy_from_slice(&value[at + 1..]));
                loaded += 1;
            }
            if next == 0 {
                return Ok(loaded);
            }
            cursor = next;
        }
    }

    /// Writes the queued statuses to Redis until `shutdown`; what fails is kept (unless a newer
    /// status of the topic came meanwhile) and tried again.
    pub async fn write(self: Arc<Self>, conn: RedisConn, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            loop {
                let batch = std::mem::take(&mut *self.pending());
                if batch.is_empty() {
                    break;
                }
                let failed: Vec<(String, (Order, Bytes))> = futures_util::stream::iter(batch)
                    .map(|(topic, update)| {
                        let mut conn = conn.clone();
                        async move {
                            let written = bounded(
                                WRITE
                                    .key(HASH)
                                    .arg(&topic)
                                    .arg(update.0)
                                    .arg(&update.1[..])
                                    .arg(CHANNEL)
                                    .invoke_async::<i64>(&mut conn),
                            )
                            .await;
                            match written {
                                Ok(_) => None,
                                Err(error) => {
                                    debug!(%error, "writing a retained status to Redis failed");
                                    Some((topic, update))
                                }
                            }
                        }
                    })
                    .buffer_unordered(WRITES_AT_ONCE)
                    .filter_map(std::future::ready)
                    .collect()
                    .await;
                if failed.is_empty() {
                    continue;
                }
                {
                    // Kept unless a newer status of the topic came meanwhile.
                    let mut pending = self.pending();
                    for (topic, update) in failed {
                        if !pending.contains_key(&topic) && self.has_room(&pending, &topic) {
                            pending.insert(topic, update);
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        }
    }
}

fn parse_order(text: &[u8]) -> Option<Order> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

async fn bounded<T>(
    command: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(COMMAND_TIMEOUT, command)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(topic: &str, payload: &str) -> Publication {
        Publication {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            retain: true,
        }
    }

    #[test]
    fn announcements_apply_in_order_and_malformed_ones_change_nothing() {
        let record = Arc::new(RetainedRecord::default());
        let mirror = RetainedMirror::new(record.clone());
        let topic = "org1/iot-2/type/t/id/a/mon";
        mirror.note(&[status(topic, "Connect")], 5);
        // Another instance's late Disconnect of the epoch before.
        mirror.receive(format!("{topic}\0{}\0Disconnect", 4).as_bytes());
        assert_eq!(&record.matching(topic)[0].1[..], b"Connect");
        mirror.receive(format!("{topic}\0{}\0Disconnect", 6).as_bytes());
        assert_eq!(&record.matching(topic)[0].1[..], b"Disconnect");
        for malformed in [&b"no separators"[..], b"t\0x\0p", b"\xff\x001\0p"] {
            mirror.receive(malformed);
        }
        assert_eq!(record.matching("#").len(), 1);
    }

    #[test]
    fn only_the_newest_write_of_a_topic_waits_and_the_wait_is_bounded() {
        let mirror = RetainedMirror::new(Arc::new(RetainedRecord::default()));
        mirror.note(&[status("a", "1"), status("a", "2")], 0);
        mirror.note(
            &[Publication {
                retain: false,
                ..status("b", "not retained")
            }],
            0,
        );
        let pending = mirror.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(&pending["a"].1[..], b"2");
        drop(pending);
        for n in 0..MAX_PENDING {
            mirror.note(&[status(&format!("t/{n}"), "x")], 0);
        }
        assert_eq!(mirror.pending().len(), MAX_PENDING);
        assert_eq!(mirror.dropped.load(Ordering::Relaxed), 1);
    }
}
