//! Rate limits: token buckets for publishes, payload bytes and subscriptions per connection, a
//! shared bucket per tenant, CONNECT rates per client ID and per source address, and the budget
//! of refusal log lines.
//!
//! Connection buckets belong to their session and are plain values: a PUBLISH first asks every
//! bucket how long it would have to wait, and only when none has to wait are they all charged,
//! so a request held back by one bucket costs nothing in the others. The tenant bucket is shared
//! by the tenant's sessions and is charged atomically, after the connection's buckets agreed.
//!
//! Publish limits answer with back-pressure by default: the session stops reading the client's
//! socket until the bucket refills, so TCP flow control slows the client down and a QoS 1/2
//! publisher loses nothing while the proxy's memory stays flat.
//!
//! Buckets follow the generic cell rate algorithm: a bucket keeps the theoretical arrival time
//! (TAT) of the next request; `n` tokens fit when `max(TAT, now) + n·T − burst·T ≤ now`, where
//! `T` is the time one token takes to refill. Time is tokio's, so tests can pause it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::DefaultClock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

/// A rate: `count` per `per`, with a burst of one period's worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests (or bytes) per period.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// `count` per second.
    pub const fn per_second(count: u32) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(1),
        }
    }

    /// Nanoseconds one token takes to refill (at least 1).
    fn interval_nanos(self) -> u64 {
        let per = u64::try_from(self.per.as_nanos()).unwrap_or(u64::MAX);
        (per / u64::from(self.count.max(1))).max(1)
    }
}

/// The parameters of a bucket, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell {
    /// Time one token takes to refill.
    interval: u64,
    /// Tokens the bucket holds when full.
    burst: u64,
}

impl Cell {
    fn new(rate: Rate, min_burst: u32) -> Cell {
        Cell {
            interval: rate.interval_nanos(),
            burst: u64::from(rate.count.max(min_burst).max(1)),
        }
    }

    /// The new TAT if `n` tokens are taken at `now` with the bucket at `tat`, or how long until
    /// they fit. A request larger than the bucket can ever hold is let through: buckets are
    /// sized to fit the largest request allowed.
    fn take(&self, tat: u64, now: u64, n: u64) -> Result<u64, Duration> {
        if n == 0 || n > self.burst {
            return Ok(tat);
        }
        let next = tat.max(now).saturating_add(n.saturating_mul(self.interval));
        let allowed_from = next.saturating_sub(self.burst.saturating_mul(self.interval));
        if allowed_from <= now {
            Ok(next)
        } else {
            Err(Duration::from_nanos(allowed_from - now))
        }
    }
}

/// Nanoseconds since `base`.
fn nanos_since(base: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// A bucket owned by one session.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    cell: Cell,
    base: Instant,
    tat: u64,
}

impl TokenBucket {
    /// A full bucket for `rate`, holding at least `min_burst` tokens.
    pub fn new(rate: Rate, min_burst: u32) -> TokenBucket {
        TokenBucket {
            cell: Cell::new(rate, min_burst),
            base: Instant::now(),
            tat: 0,
        }
    }

    /// How long until `n` tokens are there (`None`: now). Takes nothing.
    pub fn wait(&self, n: u32, now: Instant) -> Option<Duration> {
        self.cell
            .take(self.tat, nanos_since(self.base, now), u64::from(n))
            .err()
    }

    /// Charges `n` tokens whether or not they are there: the bucket goes into debt, and
    /// [`TokenBucket::wait`] answers with the time to pay it back. For costs known only once a
    /// request was handled (the filters of a SUBSCRIBE).
    pub fn charge(&mut self, n: u32, now: Instant) {
        let now = nanos_since(self.base, now);
        self.tat = self
            .tat
            .max(now)
            .saturating_add(u64::from(n).saturating_mul(self.cell.interval));
    }

    /// Takes `n` tokens; call after [`TokenBucket::wait`] said they are there.
    pub fn take(&mut self, n: u32, now: Instant) {
        if let Ok(tat) = self
            .cell
            .take(self.tat, nanos_since(self.base, now), u64::from(n))
        {
            self.tat = tat;
        }
    }
}

/// A bucket shared by every session of a tenant; charged with one compare-and-swap.
#[derive(Debug)]
pub struct SharedBucket {
    cell: Cell,
    rate: Rate,
    base: Instant,
    tat: AtomicU64,
}

impl SharedBucket {
    /// A full bucket for `rate`.
    pub fn new(rate: Rate) -> SharedBucket {
        SharedBucket {
            cell: Cell::new(rate, 1),
            rate,
            base: Instant::now(),
            tat: AtomicU64::new(0),
        }
    }

    /// The rate this bucket was made for.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes `n` tokens, or says how long until they are there (taking nothing).
    pub fn try_take(&self, n: u32, now: Instant) -> Result<(), Duration> {
        let now = nanos_since(self.base, now);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = self.cell.take(tat, now, u64::from(n))?;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// A governor quota for `rate`, with a burst of one period's worth (at least `min_burst`).
fn quota(rate: Rate, min_burst: u32) -> Quota {
    let count = rate.count.max(1);
    let burst = NonZeroU32::new(count.max(min_burst)).unwrap_or(NonZeroU32::MIN);
    let period = (rate.per / count).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

/// Log lines per second the proxy writes about refusals and limit hits, at most: an attack must
/// not be able to flood the log.
const REFUSAL_LOG_LINES_PER_SECOND: u32 = 50;

/// Whether a refusal or limit hit may be logged now, and how many were left out since the last
/// one that was. Every refusal is counted in the metrics either way.
pub fn refusal_log_budget() -> Option<u64> {
    use std::sync::OnceLock;
    static BUCKET: OnceLock<RateLimiter<NotKeyed, InMemoryState, DefaultClock>> = OnceLock::new();
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let bucket = BUCKET.get_or_init(|| {
        RateLimiter::direct(quota(Rate::per_second(REFUSAL_LOG_LINES_PER_SECOND), 1))
    });
    if bucket.check().is_ok() {
        Some(SUPPRESSED.swap(0, Ordering::Relaxed))
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// CONNECT rates per client ID and per source address (flapping clients).
pub struct ConnectRates {
    per_client_id: RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>,
    per_address: RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>,
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

    /// Counts a CONNECT from `address`.
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

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_says_how_long_to_wait() {
        let mut bucket = TokenBucket::new(Rate::per_second(5), 1);
        for _ in 0..5 {
            let now = Instant::now();
            assert_eq!(bucket.wait(1, now), None);
            bucket.take(1, now);
        }
        let wait = bucket.wait(1, Instant::now()).unwrap();
        assert_eq!(wait, Duration::from_millis(200));
        tokio::time::advance(wait).await;
        assert_eq!(bucket.wait(1, Instant::now()), None);
        // A request above the bucket's size is not held forever.
        assert_eq!(bucket.wait(1000, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_charge_beyond_the_bucket_is_paid_back_over_time() {
        let mut bucket = TokenBucket::new(Rate::per_second(10), 1);
        bucket.charge(20, Instant::now());
        // 20 tokens from a full bucket of 10: 10 in debt, 1.1 s until one is there again.
        assert_eq!(
            bucket.wait(1, Instant::now()),
            Some(Duration::from_millis(1100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn asking_takes_nothing() {
        let bucket = TokenBucket::new(Rate::per_second(1), 1);
        for _ in 0..10 {
            assert_eq!(bucket.wait(1, Instant::now()), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_bucket_refuses_without_charging() {
        let bucket = SharedBucket::new(Rate::per_second(2));
        let now = Instant::now();
        assert_eq!(bucket.try_take(1, now), Ok(()));
        assert_eq!(bucket.try_take(1, now), Ok(()));
        let wait = bucket.try_take(1, now).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // The refusal took nothing: after the wait, exactly one token is there.
        tokio::time::advance(wait).await;
        assert_eq!(bucket.try_take(1, Instant::now()), Ok(()));
        assert!(bucket.try_take(1, Instant::now()).is_err());
    }

    #[test]
    fn connect_rates_are_per_key() {
        let rates = ConnectRates::new(
            Rate {
                count: 2,
                per: Duration::from_secs(60),
            },
            Rate::per_second(100),
        );
        assert!(rates.check_client_id("c1").is_ok());
        assert!(rates.check_client_id("c1").is_ok());
        assert_eq!(
            rates.check_client_id("c1"),
            Err(ConnectRateExceeded::ClientId)
        );
        assert!(rates.check_client_id("c2").is_ok());
    }
}
