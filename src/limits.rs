//! Rate limits (governor token buckets): publishes and payload bytes per connection, publishes per
//! org in aggregate, and CONNECTs per client ID and per source address.
//!
//! Publish limits answer with back-pressure by default: the session stops reading the client's
//! socket until the bucket refills, so TCP flow control slows the client down and a QoS 1/2
//! publisher loses nothing while the proxy's memory stays flat.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::policy::Rate;

/// A single token bucket.
pub type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// The quota of a rate, with a burst of one period's worth (at least `min_burst`).
pub fn quota(rate: Rate, min_burst: u32) -> Quota {
    let count = rate.count.max(1);
    let burst = NonZeroU32::new(count.max(min_burst)).unwrap_or(NonZeroU32::MIN);
    let period = (rate.per / count).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

/// A bucket for `rate`.
pub fn bucket(rate: Rate, min_burst: u32) -> Bucket {
    RateLimiter::direct(quota(rate, min_burst))
}

/// Takes `n` tokens, or says how long until they are there. A request larger than the bucket
/// can ever hold is let through: the burst is sized to fit the largest allowed message.
pub fn take(bucket: &Bucket, n: u32) -> Result<(), Duration> {
    let Some(n) = NonZeroU32::new(n) else {
        return Ok(());
    };
    match bucket.check_n(n) {
        Ok(Ok(())) | Err(_) => Ok(()),
        Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
    }
}

/// Log lines per second the proxy writes about refusals and limit hits, at most: an attack must
/// not be able to flood the log.
const REFUSAL_LOG_LINES_PER_SECOND: u32 = 50;

/// Whether a refusal or limit hit may be logged now, and how many were left out since the last
/// one that was. Every refusal is counted in the metrics either way.
pub fn refusal_log_budget() -> Option<u64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static BUCKET: OnceLock<Bucket> = OnceLock::new();
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let bucket = BUCKET.get_or_init(|| {
        bucket(
            Rate {
                count: REFUSAL_LOG_LINES_PER_SECOND,
                per: Duration::from_secs(1),
            },
            1,
        )
    });
    if take(bucket, 1).is_ok() {
        Some(SUPPRESSED.swap(0, Ordering::Relaxed))
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Publish buckets shared by all connections of an org.
#[derive(Debug, Default)]
pub struct OrgBuckets {
    buckets: Mutex<HashMap<String, (Rate, Arc<Bucket>)>>,
}

impl OrgBuckets {
    /// The org's shared bucket for `rate`; a changed rate (policy edit) starts a new bucket.
    pub fn get(&self, org: &str, rate: Rate) -> Arc<Bucket> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match buckets.get(org) {
            Some((known, bucket)) if *known == rate => bucket.clone(),
            _ => {
                let bucket = Arc::new(self::bucket(rate, 1));
                buckets.insert(org.to_string(), (rate, bucket.clone()));
                bucket
            }
        }
    }
}

/// CONNECT rates per client ID and per source address (flapping clients).
pub struct ConnectRates {
    per_client_id:
        RateLimiter<String, governor::state::keyed::DefaultKeyedStateStore<String>, DefaultClock>,
    per_address:
        RateLimiter<IpAddr, governor::state::keyed::DefaultKeyedStateStore<IpAddr>, DefaultClock>,
}

impl std::fmt::Debug for ConnectRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectRates")
    }
}

/// Which CONNECT rate was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRateExceeded {
    /// Too many CONNECTs with this client ID.
    ClientId,
    /// Too many CONNECTs from this address.
    Address,
}

impl ConnectRates {
    /// Limits for the configured rates.
    pub fn new(per_client_id: Rate, per_address: Rate) -> ConnectRates {
        ConnectRates {
            per_client_id: RateLimiter::keyed(quota(per_client_id, 1)),
            per_address: RateLimiter::keyed(quota(per_address, 1)),
        }
    }

    /// Counts a CONNECT from `address` (checked as soon as it is accepted).
    pub fn check_address(&self, address: IpAddr) -> Result<(), ConnectRateExceeded> {
        self.per_address
            .check_key(&address)
            .map_err(|_| ConnectRateExceeded::Address)
    }

    /// Counts a CONNECT with `client_id`.
    pub fn check_client_id(&self, client_id: &str) -> Result<(), ConnectRateExceeded> {
        self.per_client_id
            .check_key(&client_id.to_string())
            .map_err(|_| ConnectRateExceeded::ClientId)
    }

    /// Forgets idle keys so the maps stay bounded under a storm of distinct IDs.
    pub fn shrink(&self) {
        self.per_client_id.retain_recent();
        self.per_client_id.shrink_to_fit();
        self.per_address.retain_recent();
        self.per_address.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_says_how_long_to_wait() {
        let rate = Rate {
            count: 5,
            per: Duration::from_secs(1),
        };
        let bucket = bucket(rate, 1);
        for _ in 0..5 {
            assert_eq!(take(&bucket, 1), Ok(()));
        }
        let wait = take(&bucket, 1).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // A request above the bucket's size is not held forever.
        assert_eq!(take(&bucket, 1000), Ok(()));
    }

    #[test]
    fn connect_rates_are_per_key() {
        let rates = ConnectRates::new(
            Rate {
                count: 2,
                per: Duration::from_secs(60),
            },
            Rate {
                count: 100,
                per: Duration::from_secs(1),
            },
        );
        assert!(rates.check_client_id("d:o:t:1").is_ok());
        assert!(rates.check_client_id("d:o:t:1").is_ok());
        assert_eq!(
            rates.check_client_id("d:o:t:1"),
            Err(ConnectRateExceeded::ClientId)
        );
        assert!(rates.check_client_id("d:o:t:2").is_ok());
    }
}
