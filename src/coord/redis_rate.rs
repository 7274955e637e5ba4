//! An org's publish rate (`limits.org_publish_rate`) shared by every instance: one GCRA cell
//! per org in Redis (`warden:{o:ORG}:rate`, its theoretical arrival time in microseconds of the
//! Redis server's clock), handed out to each instance in small batches, so that no PUBLISH waits
//! for a Redis round trip.
//!
//! Each instance's bucket holds an allowance of tokens. A PUBLISH takes one with an atomic
//! subtraction; when the allowance falls below half a batch, the bucket's refill task asks Redis
//! for the next batch (a script that grants as many tokens as the cell allows, up to a batch).
//! A new bucket starts with one batch on credit, charged to the cell by its first request, so a
//! client's first PUBLISH does not wait either. Together the instances can run over the org's
//! rate by at most what they hold unspent: **instances × batch** tokens, a batch being 50 ms of
//! the org's rate (at least 1, at most 1,000,000), on top of the burst of one period that a single
//! instance allows too.
//!
//! When Redis does not answer, no batch comes and the org's PUBLISHes wait (back-pressure): the
//! coordination fails closed (see `coord::redis`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use redis::Script;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::redis_link::RedisConn;
use super::{TenantBucket, TenantBuckets};
use crate::limits::Rate;

/// The share of a period one batch holds.
const BATCH_SPAN: Duration = Duration::from_millis(50);
/// The largest batch, in tokens. A cap of 1,000 made an org at 100,000 msg/s ask Redis every
/// 10 ms and wait for the answer (QoS 1 saturation fell to 0.80 of an uncoordinated instance in
/// benches/coordination.sh); 50 ms of the rate is the bound that matters.
const MAX_BATCH: u32 = 1_000_000;
/// The pause a PUBLISH gets while a batch is on its way.
const REFILL_PAUSE: Duration = Duration::from_millis(2);
/// The longest any one Redis command may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle refill task checks whether its bucket is still in use.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// KEYS: the org's cell. ARGV: microseconds per token, the burst in microseconds, tokens
/// wanted. Returns {tokens granted, microseconds until one more fits (when none was)}.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
local room = math.floor((now + burst - tat) / interval)
if room <= 0 then
  return {0, math.ceil(tat + interval - burst - now)}
end
local granted = math.min(tonumber(ARGV[3]), room)
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {granted, 0}
"#,
    )
});

/// One instance's share of an org's rate.
#[derive(Debug)]
pub struct SharedRateBucket {
    /// The rate this bucket was made for.
    rate: Rate,
    /// Tokens this instance may spend; negative while it owes Redis its first batch.
    allowance: AtomicI64,
    /// Below this, the next batch is asked for.
    low_water: i64,
    /// Wakes the refill task.
    wanted: Notify,
    base: Instant,
    /// Nanoseconds after `base` before which Redis will grant nothing.
    retry_at: AtomicU64,
}

impl SharedRateBucket {
    fn pause(&self, now: Instant) -> Duration {
        let now = u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(0);
        let retry = self.retry_at.load(Ordering::Relaxed);
        Duration::from_nanos(retry.saturating_sub(now)).max(REFILL_PAUSE)
    }
}

impl TenantBucket for SharedRateBucket {
    fn try_take(&self, n: u32, now: Instant) -> Result<(), Duration> {
        let n = i64::from(n);
        let mut allowance = self.allowance.load(Ordering::Relaxed);
        loop {
            if allowance < n {
                self.wanted.notify_one();
                return Err(self.pause(now));
            }
            match self.allowance.compare_exchange_weak(
                allowance,
                allowance - n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if allowance - n < self.low_water {
                        self.wanted.notify_one();
                    }
                    return Ok(());
                }
                Err(current) => allowance = current,
            }
        }
    }
}

/// The org rate buckets of one instance.
pub struct SharedRateBuckets {
    conn: RedisConn,
    buckets: Mutex<HashMap<Box<str>, Arc<SharedRateBucket>>>,
}

impl std::fmt::Debug for SharedRateBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRateBuckets").finish_non_exhaustive()
    }
}

impl SharedRateBuckets {
    /// Buckets whose batches come from Redis over `conn`.
    pub fn new(conn: RedisConn) -> SharedRateBuckets {
        SharedRateBuckets {
            conn,
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

/// The batch for `rate`: 50 ms of it, 1 to 1,000,000 tokens.
pub fn batch(rate: Rate) -> u32 {
    let per = rate.per.as_nanos().max(1);
    let tokens = u128::from(rate.count) * BATCH_SPAN.as_nanos() / per;
    u32::try_from(tokens)
        .unwrap_or(MAX_BATCH)
        .clamp(1, MAX_BATCH)
}

impl TenantBuckets for SharedRateBuckets {
    fn bucket(&self, tenant: &str, rate: Rate) -> Arc<dyn TenantBucket> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(bucket) = buckets.get(tenant).filter(|held| held.rate == rate) {
            return bucket.clone();
        }
        let batch = batch(rate);
        let bucket = Arc::new(SharedRateBucket {
            rate,
            allowance: AtomicI64::new(i64::from(batch)),
            low_water: i64::from(batch.div_ceil(2)),
            wanted: Notify::new(),
            base: Instant::now(),
            retry_at: AtomicU64::new(0),
        });
        let refill = Refill {
            bucket: Arc::downgrade(&bucket),
            conn: self.conn.clone(),
            key: format!("warden:{{o:{tenant}}}:rate"),
            interval_us: (rate.per.as_micros() / u128::from(rate.count.max(1))).max(1) as u64,
            burst_us: rate.per.as_micros().max(1) as u64,
            batch,
        };
        tokio::spawn(refill.run());
        buckets.insert(tenant.into(), bucket.clone());
        bucket
    }
}

struct Refill {
    bucket: Weak<SharedRateBucket>,
    conn: RedisConn,
    key: String,
    interval_us: u64,
    burst_us: u64,
    batch: u32,
}

impl Refill {
    async fn run(mut self) {
        // The batch the bucket started with is charged first.
        let mut credit = i64::from(self.batch);
        loop {
            let Some(bucket) = self.bucket.upgrade() else {
                return;
            };
            if credit == 0 && bucket.allowance.load(Ordering::Relaxed) >= bucket.low_water {
                // Nothing to do until a PUBLISH asks (or a while passes, to notice a bucket
                // that is no longer used).
                let _ = tokio::time::timeout(IDLE_CHECK, bucket.wanted.notified()).await;
                continue;
            }
            let asked = if credit > 0 {
                credit
            } else {
                i64::from(self.batch)
            };
            let granted = tokio::time::timeout(
                REDIS_TIMEOUT,
                TAKE.key(&self.key)
                    .arg(self.interval_us)
                    .arg(self.burst_us)
                    .arg(asked)
                    .invoke_async::<(i64, u64)>(&mut self.conn),
            )
            .await;
            let wait = match granted {
                Ok(Ok((granted, wait_us))) => {
                    if credit > 0 {
                        // Tokens already spent on credit: only a shortfall is taken back.
                        bucket
                            .allowance
                            .fetch_sub(credit - granted, Ordering::Relaxed);
                        credit = 0;
                    } else {
                        bucket.allowance.fetch_add(granted, Ordering::Relaxed);
                    }
                    if granted > 0 {
                        continue;
                    }
                    Duration::from_micros(wait_us).max(REFILL_PAUSE)
                }
                Ok(Err(error)) => {
                    debug!(%error, "org rate batch failed");
                    Duration::from_millis(100)
                }
                Err(_) => Duration::from_millis(100),
            };
            let retry = Instant::now() + wait;
            let nanos = retry.saturating_duration_since(bucket.base).as_nanos();
            bucket
                .retry_at
                .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
            drop(bucket);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_fifty_milliseconds_of_the_rate() {
        assert_eq!(batch(Rate::per_second(1000)), 50);
        assert_eq!(batch(Rate::per_second(10)), 1);
        assert_eq!(batch(Rate::per_second(1_000_000)), 50_000);
        assert_eq!(batch(Rate::per_second(u32::MAX)), 1_000_000);
        let per_minute = Rate {
            count: 600,
            per: Duration::from_secs(60),
        };
        assert_eq!(batch(per_minute), 1);
    }

    #[tokio::test]
    async fn taking_tokens_allocates_nothing_and_asks_for_a_batch_below_half() {
        let bucket = SharedRateBucket {
            rate: Rate::per_second(20),
            allowance: AtomicI64::new(10),
            low_water: 5,
            wanted: Notify::new(),
            base: Instant::now(),
            retry_at: AtomicU64::new(0),
        };
        let now = Instant::now();
        let counted = allocation_counter::measure(|| {
            for _ in 0..5 {
                assert!(bucket.try_take(1, now).is_ok());
            }
            // Below half a batch, and then empty: the refill task is woken, nothing waits.
            for _ in 0..5 {
                assert!(bucket.try_take(1, now).is_ok());
            }
            assert!(bucket.try_take(1, now).unwrap_err() >= REFILL_PAUSE);
        });
        assert_eq!(counted.count_total, 0);
        let woken = tokio::time::timeout(Duration::from_millis(100), bucket.wanted.notified());
        assert!(woken.await.is_ok(), "the refill task is asked for a batch");
    }
}
