//! The coordination traits over Redis, for several proxy instances in front of one broker
//! (`coordination:` in the config). One [`Coordinator`] per instance is its [`Admission`] and its
//! [`Reporter`]; the session does not know which implementation it talks to.
//!
//! What lives in Redis (every key of one org shares the hash tag `{o:ORG}`, so each script
//! touches one slot and a Redis Cluster can hold them):
//!
//! - `warden:{o:ORG}:owner`: client ID → `EPOCH` and then `\0 SESSION \0 INSTANCE` for the
//!   session that holds it and each earlier one still closing. The epoch goes up by one at every
//!   claim and is kept after the last release, so it never goes down.
//! - `warden:{o:ORG}:sessions`: session ID → `INSTANCE \0 SUPERSEDED \0 TAKEOVER \0 PRESENCE \0
//!   CLIENT \0 EPOCH`. A record is the fence: a release, or a settlement by another instance, removes it,
//!   and only the one that removed it publishes the session's Disconnect.
//! - `warden:{o:ORG}:count`: the org's live connections, exact across instances; a session that
//!   was taken over hands its place to the new one (`SUPERSEDED`), so a takeover counts once.
//! - `warden:{o:ORG}:presence`: presence key → live connections (an app's status is cleared only
//!   by the last connection of the app on any instance).
//! - `warden:{o:ORG}:entries`: session ID → the profile's settlement entry, from which another
//!   instance publishes the session's Disconnect when its own instance cannot.
//! - `warden:lease:{INSTANCE}`: the instance's lease ([`LEASE`], renewed every [`RENEW_EVERY`]),
//!   holding the ID of the process that holds it; `warden:instances`: every instance that may
//!   hold sessions; `warden:{i:INSTANCE}:held`: `ORG \0 SESSION` of each session it claimed.
//!
//! How Redis is reached, one server or a Redis Cluster, plain or TLS, is
//! [`super::redis_link`]'s; the rest of this module does not tell them apart, except for the
//! CONNECT's round trips (one pipeline on one server, two steps on a cluster).
//!
//! Signalling between instances is Redis pub/sub, one channel per instance
//! (`warden:chan:INSTANCE`): a takeover asks the holder to close its session (`close`), the holder
//! closes it with 288, waits until its Disconnect status is confirmed by the broker, and answers
//! (`released`). Pub/sub loses messages when a subscriber is away; that is safe here because
//! every request has a bounded wait, after which the requester settles the session itself
//! (fenced by the session record). Streams would keep requests for a holder that is away, but a
//! request older than the bounded wait is worthless.
//!
//! Status messages leave through one ordered queue per instance (the worker): a release runs its
//! script before the session's Disconnect is handed to the control connection, so the script's
//! answer decides whether the Disconnect is published at all (not when another instance already
//! settled the session) and whether an application's retained status is cleared (not while the
//! app has a connection on another instance).
//!
//! When Redis cannot be reached the instance fails closed: new CONNECTs are refused (167), and an
//! instance that has not renewed its lease for [`HOLD_LIMIT`] closes its own clients before the
//! lease runs out, so that no other instance settles clients that are still connected.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use redis::{AsyncCommands, Script};
use thiserror::Error;
use tokio::sync::{oneshot, watch, Notify, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::local::count_down;
use super::redis_link::{LinkError, RedisConn, RedisLink};
use super::redis_rate::SharedRateBuckets;
use super::redis_retained::{self, RetainedMirror};
use super::{
    closed_by_administrator, Admission, ClaimError, ClaimRequest, Ownership, Release, Released,
    Reporter, SessionHandle, SessionId, SessionInfo,
};
use crate::config::CoordinationConfig;
use crate::metrics::CoordinationMetrics;
use crate::monitor::Monitor;
use crate::profile::{Publication, Settlement};
use crate::refusal::{Cause, Refusal};
use crate::retained::{Order, RetainedRecord};

/// How long an instance's lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often the lease is renewed (and dead instances are looked for).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// An instance that has not renewed its lease for this long closes its own clients: well before
/// the lease runs out and another instance may settle them.
pub const HOLD_LIMIT: Duration = Duration::from_secs(6);
/// The longest any one Redis command may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a takeover waits for the instance holding the client ID to close its session and
/// publish its Disconnect, before it settles the session itself.
pub const REMOTE_TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// The holder's share of that wait: close, publish, confirm, answer.
const ANSWER_BUDGET: Duration = Duration::from_secs(4);
/// How long a starting instance waits for the lease of its instance ID (a crashed predecessor's
/// runs out within [`LEASE`]).
const LEASE_ACQUIRE_WAIT: Duration = Duration::from_secs(12);
/// How long a settlement of a dead instance is reserved for the instance that started it.
const SETTLE_LOCK: Duration = Duration::from_secs(30);
/// Close requests answered at the same time, at most; further ones are left to the requester's
/// bounded wait.
const MAX_ANSWERS: usize = 1024;
/// Jobs whose Redis work the worker runs at the same time, at most.
const MAX_JOBS_AT_ONCE: usize = 1024;
/// How long the worker remembers a release's outcome for the Disconnect that follows it.
const OUTCOME_MEMORY: Duration = Duration::from_secs(60);
/// The first level of every key and channel.
const ROOT: &str = "warden";

/// Turns a settlement entry into the Disconnect statuses owed for it, closed with a refusal
/// (the profile's [`crate::profile::Profile::settle_as`]).
pub type SettleFn = Arc<dyn Fn(&[u8], &Refusal) -> Option<Settlement> + Send + Sync>;

/// Why coordination could not start or a command failed.
#[derive(Debug, Error)]
pub enum CoordError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The link to Redis could not be set up (its URLs, its CA).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Another live process holds this instance ID's lease.
    #[error("coordination.instance_id {0} is held by another live instance")]
    InstanceTaken(String),
}

/// A Redis command within [`REDIS_TIMEOUT`].
async fn bounded<T>(
    command: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, CoordError> {
    match tokio::time::timeout(REDIS_TIMEOUT, command).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(CoordError::Timeout(REDIS_TIMEOUT)),
    }
}

/// Splits a record on NUL (a byte no MQTT string may hold); shared by every script.
const LUA_SPLIT: &str = r#"
local function split(s)
  local out = {}
  local start = 1
  while true do
    local i = string.find(s, "\0", start, true)
    if not i then
      table.insert(out, string.sub(s, start))
      return out
    end
    table.insert(out, string.sub(s, start, i - 1))
    start = i + 1
  end
end
"#;

/// KEYS: owner, sessions, count, presence. ARGV: client, takeover (1/0), limit, presence,
/// session, instance. Returns {'full'} or {'ok', epoch, then the session and instance of each
/// earlier session of the client ID that still holds its record}: the one that held it, and
/// any it displaced that have not finished closing yet, so that every one of their Disconnects
/// comes before the new Connect.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_SPLIT}{}",
        r#"
local epoch = 0
local kept = {}
local transfer = false
if ARGV[2] == '1' then
  local owner = redis.call('HGET', KEYS[1], ARGV[1])
  if owner then
    local f = split(owner)
    epoch = tonumber(f[1]) or 0
    local i = 2
    while f[i + 1] do
      local session, instance = f[i], f[i + 1]
      local record = session ~= '' and redis.call('HGET', KEYS[2], session)
      if record then
        table.insert(kept, session)
        table.insert(kept, instance)
        local r = split(record)
        if r[2] == '0' then
          transfer = true
          r[2] = '1'
          redis.call('HSET', KEYS[2], session, table.concat(r, '\0'))
        end
      end
      i = i + 2
    end
  end
end
if not transfer then
  local count = tonumber(redis.call('GET', KEYS[3]) or '0')
  if count >= tonumber(ARGV[3]) then
    return {'full'}
  end
  redis.call('INCR', KEYS[3])
end
if ARGV[2] == '1' then
  epoch = epoch + 1
  local value = tostring(epoch) .. '\0' .. ARGV[5] .. '\0' .. ARGV[6]
  for _, v in ipairs(kept) do
    value = value .. '\0' .. v
  end
  redis.call('HSET', KEYS[1], ARGV[1], value)
end
redis.call('HSET', KEYS[2], ARGV[5], ARGV[6] .. '\0' .. '0' .. '\0' .. ARGV[2] .. '\0' .. ARGV[4] .. '\0' .. ARGV[1] .. '\0' .. tostring(epoch))
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
local out = {'ok', tostring(epoch)}
for _, v in ipairs(kept) do
  table.insert(out, v)
end
return out
"#
    ))
});

/// KEYS: owner, sessions, count, presence, entries. ARGV: session, the instance that must hold
/// it. Removes the session's record and gives back what it held. Returns {'gone'} when the record
/// is not there (another instance settled it), else {'ok', connections left with its presence
/// key, its settlement entry or '', its epoch (0 for a shared client ID)}.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_SPLIT}{}",
        r#"
local record = redis.call('HGET', KEYS[2], ARGV[1])
if not record then
  return {'gone'}
end
local r = split(record)
if r[1] ~= ARGV[2] then
  return {'gone'}
end
local entry = redis.call('HGET', KEYS[5], ARGV[1]) or ''
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if r[2] == '0' then
  if redis.call('DECR', KEYS[3]) <= 0 then
    redis.call('DEL', KEYS[3])
  end
end
if r[3] == '1' then
  local owner = redis.call('HGET', KEYS[1], r[5])
  if owner then
    local f = split(owner)
    local value = f[1]
    local i = 2
    while f[i + 1] do
      if f[i] ~= ARGV[1] and f[i] ~= '' then
        value = value .. '\0' .. f[i] .. '\0' .. f[i + 1]
      end
      i = i + 2
    end
    redis.call('HSET', KEYS[1], r[5], value)
  end
end
local left = redis.call('HINCRBY', KEYS[4], r[4], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[4], r[4])
  left = 0
end
return {'ok', tostring(left), entry, r[6] or '0'}
"#
    ))
});

/// KEYS: sessions, entries. ARGV: session, entry. Keeps the entry only while the session holds
/// its record (not after another instance settled it).
static ENTRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return 1
"#,
    )
});

/// KEYS: lease, mark. ARGV: this process's ID, lease in ms. 1: renewed; 2: the lease ran out and
/// is taken again; 3: Redis lost its data (lease and mark gone) and the lease is taken again;
/// 0: another process holds it.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not holder then
  local lost = redis.call('EXISTS', KEYS[2]) == 0
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[1])
  if lost then
    return 3
  end
  return 2
end
return 0
"#,
    )
});

/// KEYS: lease. ARGV: this process's ID. Gives the lease back if this process holds it.
static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
"#,
    )
});

/// One round trip to one server for a CONNECT: the session recorded in the instance's held set
/// and the claim script, pipelined; the server runs them in that order, so a claim is never
/// without its record, as when they are sent one after the other.
async fn record_and_claim(
    conn: &mut RedisConn,
    held: &str,
    member: &str,
    claim: &redis::ScriptInvocation<'_>,
) -> redis::RedisResult<Vec<String>> {
    let mut pipe = redis::pipe();
    pipe.sadd(held, member).ignore().invoke_script(claim);
    match pipe.query_async::<(Vec<String>,)>(conn).await {
        // The script is not loaded yet (a new or restarted server): load it and run both again
        // (the record is a set member, so recording it twice is harmless).
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            claim.load_async(conn).await?;
            pipe.query_async::<(Vec<String>,)>(conn).await
        }
        answer => answer,
    }
    .map(|(answer,)| answer)
}

/// The keys of one org.
struct OrgKeys {
    owner: String,
    sessions: String,
    count: String,
    presence: String,
    entries: String,
}

impl OrgKeys {
    fn new(tenant: &str) -> OrgKeys {
        let key = |name: &str| format!("{ROOT}:{{o:{tenant}}}:{name}");
        OrgKeys {
            owner: key("owner"),
            sessions: key("sessions"),
            count: key("count"),
            presence: key("presence"),
            entries: key("entries"),
        }
    }
}

fn lease_key(instance: &str) -> String {
    format!("{ROOT}:lease:{{{instance}}}")
}

/// A key that lives as long as Redis keeps its data (no expiry), in the lease's hash slot: a
/// lease that is gone while this key is still there ran out; both gone, Redis lost its data.
fn mark_key(instance: &str) -> String {
    format!("{ROOT}:mark:{{{instance}}}")
}

fn held_key(instance: &str) -> String {
    format!("{ROOT}:{{i:{instance}}}:held")
}

fn settle_lock_key(instance: &str) -> String {
    format!("{ROOT}:{{i:{instance}}}:settling")
}

const INSTANCES_KEY: &str = "warden:instances";

fn channel(instance: &str) -> String {
    format!("{ROOT}:chan:{instance}")
}

/// A member of an instance's `held` set.
fn held_member(tenant: &str, session: &str) -> String {
    format!("{tenant}\0{session}")
}

/// Which status of a session's epoch a publication is.
#[derive(Debug, Clone, Copy)]
enum Stamp {
    Connect,
    Disconnect,
}

/// Adds the client ID's `Epoch`, and a `Sequence` that orders its statuses (the Connect of epoch
/// E is 2E-1, its Disconnect 2E), to every status that is a JSON object, so that consumers of a
/// broker cluster can order them. Shared client IDs (epoch 0) have no order and get neither.
/// Answers the `Sequence` (0 for none), which also orders the record of retained statuses.
fn stamp(publications: &mut [Publication], epoch: u64, which: Stamp) -> Order {
    if epoch == 0 {
        return 0;
    }
    let sequence = match which {
        Stamp::Connect => 2 * epoch - 1,
        Stamp::Disconnect => 2 * epoch,
    };
    for publication in publications.iter_mut() {
        // Appended before the closing brace, so the profile's own fields keep their order.
        let payload = &publication.payload;
        let is_object = payload.first() == Some(&b'{')
            && payload.last() == Some(&b'}')
            && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload)
                .is_ok();
        if !is_object {
            continue;
        }
        let mut stamped = Vec::with_capacity(payload.len() + 40);
        stamped.extend_from_slice(&payload[..payload.len() - 1]);
        if payload.len() > 2 {
            stamped.push(b',');
        }
        stamped
            .extend_from_slice(format!("\"Epoch\":{epoch},\"Sequence\":{sequence}}}").as_bytes());
        publication.payload = stamped.into();
    }
    sequence
}

/// Drops the publications that clear a retained message (retained, empty payload): the
/// presence they clear is still live on another instance.
fn keep_retained_status(publications: &mut Vec<Publication>) {
    publications.retain(|p| !(p.retain && p.payload.is_empty()));
}

/// One session of this instance, as admission knows it.
struct LocalSession {
    handle: SessionHandle,
    tenant: Box<str>,
    /// The client ID's epoch this session claimed (0: a shared client ID has none).
    epoch: u64,
}

#[derive(Default)]
struct Local {
    sessions: HashMap<String, LocalSession>,
    tenants: HashMap<Box<str>, u32>,
    presence: HashMap<Box<str>, u32>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a few inserts and removes that cannot panic half-way.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The ordered work of the instance's reporter.
enum Job {
    /// A session gave its claim back.
    Release { tenant: Box<str>, session: String },
    /// An established session's entry and Connect statuses.
    Connected {
        session: String,
        entry: Vec<u8>,
        statuses: Vec<Publication>,
        epoch: u64,
    },
    /// A closed session's Disconnect statuses (after its `Release`).
    Disconnected {
        session: String,
        statuses: Vec<Publication>,
    },
    /// Publications of no session (refused connects, notifications, settlements), with their
    /// order (a settlement's `Sequence`; 0 for the others).
    Publish(Vec<Publication>, Order),
    /// Resolves once every earlier job was handed to the control connection.
    Barrier(oneshot::Sender<()>),
}

/// The worker's queue. Jobs of sessions are bounded by the sessions (each has at most one
/// connect, one release and one disconnect in it); `Publish` jobs are bounded by `limit`, the
/// oldest dropped first, as the control connection's own queue does.
struct Jobs {
    queue: Mutex<(VecDeque<Job>, usize)>,
    wake: Notify,
    limit: usize,
}

impl Jobs {
    fn push(&self, job: Job) {
        {
            let mut guard = lock(&self.queue);
            let (queue, publishes) = &mut *guard;
            if matches!(job, Job::Publish(..)) {
                if *publishes >= self.limit {
                    if let Some(oldest) = queue.iter().position(|j| matches!(j, Job::Publish(..))) {
                        queue.remove(oldest);
                        *publishes -= 1;
                        warn!("status queue full while Redis is slow: oldest messages dropped");
                    }
                }
                *publishes += 1;
            }
            queue.push_back(job);
        }
        self.wake.notify_one();
    }

    async fn take(&self) -> Vec<Job> {
        loop {
            let notified = self.wake.notified();
            {
                let mut guard = lock(&self.queue);
                let (queue, publishes) = &mut *guard;
                if !queue.is_empty() {
                    *publishes = 0;
                    return queue.drain(..).collect();
                }
            }
            notified.await;
        }
    }
}

/// What a release's script said, for the Disconnect that follows.
enum Outcome {
    /// The record was there: this many connections with the presence key are left; the
    /// session's epoch.
    Released { presence_left: u64, epoch: u64 },
    /// The record is gone: another instance settled the session and published its Disconnect,
    /// or Redis lost its data (the session is then in `Shared::orphaned`).
    Gone,
    /// Redis did not answer: publish as this instance sees it.
    Unknown,
}

/// The part of the coordinator that background tasks and releases share.
struct Shared {
    conn: RedisConn,
    link: RedisLink,
    instance: String,
    /// This start of the instance: the lease's value.
    boot: String,
    local: Mutex<Local>,
    jobs: Jobs,
    monitor: Monitor,
    settle: SettleFn,
    /// Whether the lease is held and was renewed recently.
    healthy: AtomicBool,
    /// When the lease was last renewed.
    renewed: Mutex<Instant>,
    /// Takeovers waiting for a holder's answer, by the displaced session.
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    answers: Arc<Semaphore>,
    metrics: CoordinationMetrics,
    /// Sessions whose records Redis lost: their Disconnects are this instance's to publish.
    orphaned: Mutex<HashSet<String>>,
    /// The record of retained statuses shared with the other instances, when the broker does
    /// not replay retained messages to wildcard subscribers.
    retained: Option<Arc<RetainedMirror>>,
}

/// The Redis-backed admission and reporter of one instance.
pub struct Coordinator {
    shared: Arc<Shared>,
    /// Stops the lease tasks and the channel listener.
    stop: watch::Sender<bool>,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("instance", &self.shared.instance)
            .finish_non_exhaustive()
    }
}

struct RedisRelease {
    shared: Arc<Shared>,
    tenant: Box<str>,
    session: String,
    presence: Box<str>,
}

impl Release for RedisRelease {
    fn release(&self) -> Released {
        let left = {
            let mut local = lock(&self.shared.local);
            local.sessions.remove(&self.session);
            count_down(&mut local.tenants, &self.tenant);
            count_down(&mut local.presence, &self.presence)
        };
        self.shared.jobs.push(Job::Release {
            tenant: self.tenant.clone(),
            session: self.session.clone(),
        });
        // Whether the app is gone on the other instances too is the release script's answer;
        // the worker drops the clearing of the retained status when it is not.
        Released {
            last_of_presence: left == 0,
        }
    }
}

impl Coordinator {
    /// Connects to Redis, takes this instance's lease (waiting for a crashed predecessor's to
    /// run out), listens on its channel, settles what an earlier process of the same instance
    /// left, and starts the lease and worker tasks (the lease tasks stop at [`Coordinator::leave`]
    /// or when the coordinator is dropped).
    pub async fn start(
        config: &CoordinationConfig,
        monitor: Monitor,
        settle: SettleFn,
        queue_limit: usize,
        metrics: CoordinationMetrics,
        retained: Option<Arc<RetainedRecord>>,
    ) -> Result<Arc<Coordinator>, CoordError> {
        let (stop, shutdown) = watch::channel(false);
        let link = RedisLink::new(config, REDIS_TIMEOUT)?;
        let mut conn = tokio::time::timeout(LEASE_ACQUIRE_WAIT, link.connect())
            .await
            .map_err(|_| CoordError::Timeout(LEASE_ACQUIRE_WAIT))??;
        let instance = config.instance_id.clone();
        // Per start, not per process: two instances in one test process are two holders.
        let boot = format!("{:016x}", rand::random::<u64>());
        let lease = lease_key(&instance);
        let deadline = Instant::now() + LEASE_ACQUIRE_WAIT;
        loop {
            let taken: Option<String> = bounded(
                redis::cmd("SET")
                    .arg(&lease)
                    .arg(&boot)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE.as_millis() as u64)
                    .query_async(&mut conn),
            )
            .await?;
            if taken.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(CoordError::InstanceTaken(instance));
            }
            info!(%instance, "waiting for the lease of an earlier process of this instance to run out");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _: () = bounded(conn.set(mark_key(&instance), &boot)).await?;
        let _: () = bounded(conn.sadd(INSTANCES_KEY, &instance)).await?;
        let shared = Arc::new(Shared {
            conn,
            link,
            instance,
            boot,
            local: Mutex::new(Local::default()),
            jobs: Jobs {
                queue: Mutex::new((VecDeque::new(), 0)),
                wake: Notify::new(),
                limit: queue_limit.max(1),
            },
            monitor,
            settle,
            healthy: AtomicBool::new(true),
            renewed: Mutex::new(Instant::now()),
            waiters: Mutex::new(HashMap::new()),
            answers: Arc::new(Semaphore::new(MAX_ANSWERS)),
            metrics,
            orphaned: Mutex::new(HashSet::new()),
            retained: retained.map(|record| Arc::new(RetainedMirror::new(record))),
        });
        shared.set_healthy(true);
        let (pubsub, node) = shared.link.subscribe(&shared.channels(), 0).await?;
        if let Some(mirror) = &shared.retained {
            // After the subscription, so that no update falls between the load and the channel.
            let mut conn = shared.conn.clone();
            let loaded = mirror.load(&mut conn).await?;
            debug!(loaded, "retained statuses loaded from Redis");
            tokio::spawn(mirror.clone().write(shared.conn.clone(), shutdown.clone()));
        }
        tokio::spawn(shared.clone().listen(pubsub, node, shutdown.clone()));
        tokio::spawn(shared.clone().work());
        let own = shared.instance.clone();
        let settled = shared
            .settle_instance(&own, crate::profile::settled_after_restart())
            .await?;
        if settled > 0 {
            warn!(
                sessions = settled,
                "settled clients of an earlier process of this instance"
            );
        }
        tokio::spawn(shared.clone().watch_lease(shutdown.clone()));
        tokio::spawn(shared.clone().keep_lease(shutdown));
        info!(instance = %shared.instance, "coordination through Redis");
        Ok(Arc::new(Coordinator { shared, stop }))
    }

    /// Whether this instance holds its lease and reaches Redis (`/readyz`).
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// The org publish rate buckets of this instance, shared with the others through Redis.
    pub fn rate_buckets(&self) -> SharedRateBuckets {
        SharedRateBuckets::new(self.shared.conn.clone())
    }

    /// This instance's ID.
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// Resolves once every status handed to the reporter so far is with the control connection.
    pub async fn drained(&self) {
        let (done, wait) = oneshot::channel();
        self.shared.jobs.push(Job::Barrier(done));
        let _ = wait.await;
    }

    /// Leaves the cluster at shutdown: stops renewing the lease, and gives it back when no
    /// session is left (else the others settle what is, once it runs out).
    pub async fn leave(&self) {
        let _ = self.stop.send(true);
        let shared = &self.shared;
        if !lock(&shared.local).sessions.is_empty() {
            return;
        }
        let mut conn = shared.conn.clone();
        let _ = bounded(conn.srem::<_, _, ()>(INSTANCES_KEY, &shared.instance)).await;
        let _ = bounded(
            LEAVE
                .key(lease_key(&shared.instance))
                .arg(&shared.boot)
                .invoke_async::<()>(&mut conn),
        )
        .await;
    }
}

impl Shared {
    /// Records whether the lease is held; returns whether it was before.
    fn set_healthy(&self, healthy: bool) -> bool {
        self.metrics.up.set(i64::from(healthy));
        self.healthy.swap(healthy, Ordering::Relaxed)
    }

    /// Closes every session of this instance (the lease is lost or about to be).
    fn close_all(&self, detail: &'static str) {
        let handles: Vec<SessionHandle> = lock(&self.local)
            .sessions
            .values()
            .map(|s| s.handle.clone())
            .collect();
        if !handles.is_empty() {
            warn!(sessions = handles.len(), detail, "closing every client");
        }
        for handle in handles {
            handle.close(Refusal::with_detail(Cause::ServerClosed, detail));
        }
    }

    /// Closes this instance's clients once the lease was not renewed for [`HOLD_LIMIT`]. A task
    /// of its own, so that a renewal stuck on its deadline cannot delay it.
    async fn watch_lease(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let renewed = *lock(&self.renewed);
            if renewed.elapsed() >= HOLD_LIMIT
                && self.healthy.load(Ordering::Relaxed)
                && self.set_healthy(false)
            {
                self.close_all("lost contact with the coordination store");
            }
        }
    }

    /// Renews the lease, and settles instances whose lease ran out.
    async fn keep_lease(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let mut conn = self.conn.clone();
            let answer = bounded(
                RENEW
                    .key(lease_key(&self.instance))
                    .key(mark_key(&self.instance))
                    .arg(&self.boot)
                    .arg(LEASE.as_millis() as u64)
                    .invoke_async::<i64>(&mut conn),
            )
            .await;
            match answer {
                Ok(1) => {
                    *lock(&self.renewed) = Instant::now();
                    if !self.set_healthy(true) {
                        info!("coordination store reachable again");
                    }
                }
                Ok(3) => {
                    // Redis restarted without its data: nobody can settle the sessions whose
                    // records went with it, so they are closed and their Disconnects go out
                    // from here. Sessions claimed since then (in the time until this renewal)
                    // have their records in the new data, and go on.
                    let lost = self.sessions_without_records().await;
                    warn!(
                        sessions = lost.len(),
                        "the coordination store lost its data; closing the clients it held"
                    );
                    lock(&self.orphaned).extend(lost.iter().map(|(id, _)| id.clone()));
                    for (_, handle) in lost {
                        handle.close(Refusal::with_detail(
                            Cause::ServerClosed,
                            "the coordination store lost its data",
                        ));
                    }
                    *lock(&self.renewed) = Instant::now();
                    let _ = bounded(conn.sadd::<_, _, ()>(INSTANCES_KEY, &self.instance)).await;
                    self.set_healthy(true);
                }
                Ok(2) => {
                    // The lease was gone: another instance may have settled this one's clients.
                    warn!("the coordination lease had run out; taken again");
                    self.close_all("the coordination lease ran out");
                    *lock(&self.renewed) = Instant::now();
                    let _ = bounded(conn.sadd::<_, _, ()>(INSTANCES_KEY, &self.instance)).await;
                    self.set_healthy(true);
                }
                Ok(_) => {
                    warn!(instance = %self.instance, "another process holds this instance's lease");
                    self.set_healthy(false);
                    self.close_all("another process holds this instance's lease");
                }
                Err(error) => debug!(%error, "lease renewal failed"),
            }
            if self.healthy.load(Ordering::Relaxed) {
                if let Err(error) = self.settle_dead_instances().await {
                    debug!(%error, "looking for stopped instances failed");
                }
            }
        }
    }

    /// This instance's sessions whose records are not in Redis (or could not be checked).
    async fn sessions_without_records(&self) -> Vec<(String, SessionHandle)> {
        let sessions: Vec<(String, Box<str>, SessionHandle)> = lock(&self.local)
            .sessions
            .iter()
            .map(|(id, s)| (id.clone(), s.tenant.clone(), s.handle.clone()))
            .collect();
        let checks =
            futures_util::future::join_all(sessions.iter().map(|(id, tenant, _)| async move {
                let mut conn = self.conn.clone();
                bounded(conn.hexists::<_, _, bool>(OrgKeys::new(tenant).sessions, id)).await
            }))
            .await;
        sessions
            .into_iter()
            .zip(checks)
            .filter(|(_, kept)| !matches!(kept, Ok(true)))
            .map(|((id, _, handle), _)| (id, handle))
            .collect()
    }

    async fn settle_dead_instances(&self) -> Result<(), CoordError> {
        let mut conn = self.conn.clone();
        let instances: Vec<String> = bounded(conn.smembers(INSTANCES_KEY)).await?;
        for instance in instances.iter().filter(|i| **i != self.instance) {
            let alive: bool = bounded(conn.exists(lease_key(instance))).await?;
            if alive {
                continue;
            }
            let settled = self
                .settle_instance(
                    instance,
                    Refusal::with_detail(Cause::ServerClosed, "its proxy instance stopped"),
                )
                .await?;
            if settled > 0 {
                warn!(%instance, sessions = settled, "settled the clients of a stopped instance");
            }
        }
        Ok(())
    }

    /// Settles every session `instance` holds (a stopped instance, or this instance's earlier
    /// process): its Disconnect is published with `why`, its quota place given back.
    async fn settle_instance(&self, instance: &str, why: Refusal) -> Result<usize, CoordError> {
        let mut conn = self.conn.clone();
        if instance != self.instance {
            let reserved: Option<String> = bounded(
                redis::cmd("SET")
                    .arg(settle_lock_key(instance))
                    .arg(&self.instance)
                    .arg("NX")
                    .arg("PX")
                    .arg(SETTLE_LOCK.as_millis() as u64)
                    .query_async(&mut conn),
            )
            .await?;
            if reserved.is_none() {
                return Ok(0);
            }
        }
        let held = held_key(instance);
        let members: Vec<Vec<u8>> = bounded(conn.smembers(&held)).await?;
        let mut settled = 0;
        for member in members {
            let text = String::from_utf8_lossy(&member);
            if let Some((tenant, session)) = text.split_once('\0') {
                if self.settle_session(tenant, session, instance, &why).await? {
                    settled += 1;
                }
            }
            let _: () = bounded(conn.srem(&held, &member)).await?;
        }
        if instance != self.instance {
            let _: () = bounded(conn.srem(INSTANCES_KEY, instance)).await?;
        }
        Ok(settled)
    }

    /// Removes `session`'s record (if `instance` still holds it) and queues its Disconnect,
    /// closed with `why`. True if a Disconnect was owed.
    async fn settle_session(
        &self,
        tenant: &str,
        session: &str,
        instance: &str,
        why: &Refusal,
    ) -> Result<bool, CoordError> {
        let (outcome, entry) = self.run_release(tenant, session, instance).await?;
        let Outcome::Released {
            presence_left,
            epoch,
        } = outcome
        else {
            return Ok(false);
        };
        let Some(Settlement {
            mut publications, ..
        }) = (self.settle)(&entry, why)
        else {
            return Ok(false);
        };
        if presence_left > 0 {
            keep_retained_status(&mut publications);
        }
        let order = stamp(&mut publications, epoch, Stamp::Disconnect);
        self.jobs.push(Job::Publish(publications, order));
        if instance != self.instance {
            self.metrics.settled.inc();
        }
        Ok(true)
    }

    async fn run_release(
        &self,
        tenant: &str,
        session: &str,
        instance: &str,
    ) -> Result<(Outcome, Vec<u8>), CoordError> {
        let keys = OrgKeys::new(tenant);
        let mut conn = self.conn.clone();
        let answer: Vec<Vec<u8>> = bounded(
            RELEASE
                .key(&keys.owner)
                .key(&keys.sessions)
                .key(&keys.count)
                .key(&keys.presence)
                .key(&keys.entries)
                .arg(session)
                .arg(instance)
                .invoke_async(&mut conn),
        )
        .await?;
        let mut answer = answer.into_iter();
        if answer.next().as_deref() != Some(b"ok".as_slice()) {
            return Ok((Outcome::Gone, Vec::new()));
        }
        let number = |field: Option<Vec<u8>>| {
            field
                .and_then(|n| std::str::from_utf8(&n).ok()?.parse().ok())
                .unwrap_or(0)
        };
        let presence_left = number(answer.next());
        let entry = answer.next().unwrap_or_default();
        let epoch = number(answer.next());
        Ok((
            Outcome::Released {
                presence_left,
                epoch,
            },
            entry,
        ))
    }

    /// The worker: runs the jobs in order, so statuses leave in the order the sessions gave them.
    async fn work(self: Arc<Self>) {
        let mut outcomes: HashMap<String, (Outcome, Instant)> = HashMap::new();
        // Releases Redis did not take: retried while it is reachable again.
        let mut unreleased: Vec<(Box<str>, String)> = Vec::new();
        loop {
            // Wakes without jobs too while releases wait for Redis, so they are retried even
            // when no session comes or goes.
            let jobs = if unreleased.is_empty() {
                self.jobs.take().await
            } else {
                tokio::time::timeout(RENEW_EVERY, self.jobs.take())
                    .await
                    .unwrap_or_default()
            };
            let mut jobs = jobs;
            while !jobs.is_empty() {
                let rest = jobs.split_off(jobs.len().min(MAX_JOBS_AT_ONCE));
                self.run_jobs(jobs, &mut outcomes, &mut unreleased).await;
                jobs = rest;
            }
            outcomes.retain(|_, (_, at)| at.elapsed() < OUTCOME_MEMORY);
            if !unreleased.is_empty() && self.healthy.load(Ordering::Relaxed) {
                let mut left = Vec::new();
                for (tenant, session) in unreleased.drain(..) {
                    if self.release(&tenant, &session).await.is_err() {
                        left.push((tenant, session));
                    }
                }
                unreleased = left;
            }
        }
    }

    /// Runs jobs: first the Redis work of all of them at once (pipelined on the multiplexed
    /// connection), then, in the jobs' order, what goes to the control connection.
    async fn run_jobs(
        &self,
        jobs: Vec<Job>,
        outcomes: &mut HashMap<String, (Outcome, Instant)>,
        unreleased: &mut Vec<(Box<str>, String)>,
    ) {
        // While Redis is known to be away, statuses go out as this instance sees them, and the
        // releases are retried later.
        let redis_work: Vec<Option<Result<Outcome, CoordError>>> = if self
            .healthy
            .load(Ordering::Relaxed)
        {
            futures_util::future::join_all(jobs.iter().map(|job| async move {
                match job {
                    Job::Release { tenant, session } => Some(self.release(tenant, session).await),
                    Job::Connected { session, entry, .. } => {
                        let _ = self.keep_entry(session, entry).await;
                        None
                    }
                    _ => None,
                }
            }))
            .await
        } else {
            jobs.iter().map(|_| None).collect()
        };
        for (job, released) in jobs.into_iter().zip(redis_work) {
            match job {
                Job::Release { tenant, session } => {
                    let outcome = match released {
                        Some(Ok(outcome)) => outcome,
                        failed => {
                            if let Some(Err(error)) = failed {
                                debug!(%error, "release failed; retried later");
                            }
                            unreleased.push((tenant, session.clone()));
                            Outcome::Unknown
                        }
                    };
                    outcomes.insert(session, (outcome, Instant::now()));
                }
                Job::Connected {
                    mut statuses,
                    epoch,
                    ..
                } => {
                    let order = stamp(&mut statuses, epoch, Stamp::Connect);
                    self.hand_over(statuses, order);
                }
                Job::Disconnected {
                    session,
                    mut statuses,
                } => {
                    let mut order = 0;
                    let orphaned = lock(&self.orphaned).remove(&session);
                    match outcomes.remove(&session).map(|(outcome, _)| outcome) {
                        Some(Outcome::Gone) if orphaned => {
                            debug!(%session, "its record was lost with Redis's data");
                        }
                        Some(Outcome::Gone) => {
                            debug!(%session, "settled by another instance already");
                            continue;
                        }
                        Some(Outcome::Released {
                            presence_left,
                            epoch,
                        }) => {
                            if presence_left > 0 {
                                keep_retained_status(&mut statuses);
                            }
                            order = stamp(&mut statuses, epoch, Stamp::Disconnect);
                        }
                        _ => {}
                    }
                    self.hand_over(statuses, order);
                }
                Job::Publish(publications, order) => self.hand_over(publications, order),
                Job::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Hands statuses of order `order` to the control connection, and their retained ones to
    /// the record that every instance shares, if there is one.
    fn hand_over(&self, statuses: Vec<Publication>, order: Order) {
        if let Some(mirror) = &self.retained {
            mirror.note(&statuses, order);
        }
        self.monitor.send(statuses);
    }

    async fn release(&self, tenant: &str, session: &str) -> Result<Outcome, CoordError> {
        let (outcome, _) = self.run_release(tenant, session, &self.instance).await?;
        let mut conn = self.conn.clone();
        let _: () =
            bounded(conn.srem(held_key(&self.instance), held_member(tenant, session))).await?;
        Ok(outcome)
    }

    async fn keep_entry(&self, session: &str, entry: &[u8]) -> Result<(), CoordError> {
        let Some(tenant) = lock(&self.local)
            .sessions
            .get(session)
            .map(|s| s.tenant.clone())
        else {
            return Ok(());
        };
        let keys = OrgKeys::new(&tenant);
        let mut conn = self.conn.clone();
        let kept = bounded(
            ENTRY
                .key(&keys.sessions)
                .key(&keys.entries)
                .arg(session)
                .arg(entry)
                .invoke_async::<()>(&mut conn),
        )
        .await;
        if let Err(error) = &kept {
            debug!(%error, "keeping the settlement entry failed");
        }
        kept
    }

    /// The channels this instance listens to: its own, and the retained statuses' if shared.
    fn channels(&self) -> Vec<String> {
        let mut channels = vec![channel(&self.instance)];
        if self.retained.is_some() {
            channels.push(redis_retained::CHANNEL.to_owned());
        }
        channels
    }

    /// Listens on this instance's channel, resubscribing after a broken connection.
    async fn listen(
        self: Arc<Self>,
        mut pubsub: redis::aio::PubSub,
        mut node: usize,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut wait = Duration::from_millis(100);
        loop {
            {
                let mut messages = pubsub.on_message();
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message,
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    };
                    let Some(message) = message else { break };
                    match &self.retained {
                        Some(mirror) if message.get_channel_name() == redis_retained::CHANNEL => {
                            mirror.receive(message.get_payload_bytes());
                        }
                        _ => self.clone().handle(message.get_payload_bytes()),
                    }
                    wait = Duration::from_millis(100);
                }
            }
            debug!("coordination channel lost; subscribing again");
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                wait = (wait * 2).min(Duration::from_secs(2));
                // From the next node on: in a cluster, the one it had may be the one that is gone.
                let again = self.link.subscribe(&self.channels(), node + 1).await;
                if let Ok((again, on)) = again {
                    pubsub = again;
                    node = on;
                    // Updates announced while the channel was lost are in the hash.
                    if let Some(mirror) = self.retained.clone() {
                        let mut conn = self.conn.clone();
                        tokio::spawn(async move {
                            if let Err(error) = mirror.load(&mut conn).await {
                                debug!(%error, "reloading the retained statuses failed");
                            }
                        });
                    }
                    break;
                }
            }
        }
    }

    /// One message on this instance's channel.
    fn handle(self: Arc<Self>, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let mut fields = text.split('\0');
        match (fields.next(), fields.next(), fields.next()) {
            (Some("close"), Some(session), Some(requester)) => {
                let Ok(permit) = self.answers.clone().try_acquire_owned() else {
                    warn!("too many takeover requests at once; the requesters settle them");
                    return;
                };
                let (session, requester) = (session.to_owned(), requester.to_owned());
                tokio::spawn(async move {
                    self.answer_close(session, requester).await;
                    drop(permit);
                });
            }
            (Some("admin"), Some(session), _) => {
                if let Some(local) = lock(&self.local).sessions.get(session) {
                    local.handle.close(closed_by_administrator());
                }
            }
            (Some("released"), Some(session), _) => {
                if let Some(waiters) = lock(&self.waiters).remove(session) {
                    for waiter in waiters {
                        let _ = waiter.send(());
                    }
                }
            }
            _ => debug!("unknown message on the coordination channel"),
        }
    }

    /// Another instance took `session`'s client ID over: close it with 288, and answer once its
    /// Disconnect status is confirmed by the broker, so that the new Connect comes after it.
    async fn answer_close(&self, session: String, requester: String) {
        let deadline = Instant::now() + ANSWER_BUDGET;
        let handle = lock(&self.local)
            .sessions
            .get(&session)
            .map(|s| s.handle.clone());
        if let Some(handle) = handle {
            handle.close(Refusal::new(Cause::TakenOver));
            if !handle.closed(ANSWER_BUDGET).await {
                return;
            }
        }
        let (done, wait) = oneshot::channel();
        self.jobs.push(Job::Barrier(done));
        if tokio::time::timeout_at(deadline, wait).await.is_err() {
            return;
        }
        if tokio::time::timeout_at(deadline, self.monitor.confirmed())
            .await
            .is_err()
        {
            return;
        }
        let mut conn = self.conn.clone();
        let answer = format!("released\0{session}");
        if let Err(error) = bounded(conn.publish::<_, _, ()>(channel(&requester), answer)).await {
            debug!(%error, "answering a takeover failed");
        }
    }

    /// Waits for the instance holding `displaced` to close it, or settles it on its behalf
    /// (288) when it does not answer within [`REMOTE_TAKEOVER_WAIT`].
    async fn displace(&self, tenant: &str, displaced: &str, holder: &str) {
        if holder == self.instance {
            let handle = lock(&self.local)
                .sessions
                .get(displaced)
                .map(|s| s.handle.clone());
            if let Some(handle) = handle {
                // Same instance: its Disconnect is queued before this session's Connect.
                handle.close(Refusal::new(Cause::TakenOver));
                handle.closed(super::local::TAKEOVER_WAIT).await;
                return;
            }
        } else {
            let (answered, wait) = oneshot::channel();
            lock(&self.waiters)
                .entry(displaced.to_owned())
                .or_default()
                .push(answered);
            let mut conn = self.conn.clone();
            let request = format!("close\0{displaced}\0{}", self.instance);
            let listeners = bounded(self.link.publish(&mut conn, &channel(holder), &request))
                .await
                .unwrap_or(0);
            let mut wait = std::pin::pin!(wait);
            let answered = listeners > 0
                && tokio::time::timeout(REMOTE_TAKEOVER_WAIT, &mut wait)
                    .await
                    .is_ok();
            if answered {
                self.metrics.remote_takeovers.inc();
            } else {
                let why = Refusal::new(Cause::TakenOver);
                match self.settle_session(tenant, displaced, holder, &why).await {
                    Ok(true) => {
                        warn!(%holder, "settled a taken-over session for an instance that did not answer")
                    }
                    // The holder released it meanwhile: its answer is on the way.
                    Ok(false) if listeners > 0 => {
                        let _ = tokio::time::timeout(REMOTE_TAKEOVER_WAIT, &mut wait).await;
                    }
                    Ok(false) => {}
                    Err(error) => debug!(%error, "settling a taken-over session failed"),
                }
            }
            lock(&self.waiters).retain(|_, waiters| {
                waiters.retain(|w| !w.is_closed());
                !waiters.is_empty()
            });
            return;
        }
        // A record of this instance with no session here: an earlier process's.
        let _ = self
            .settle_session(tenant, displaced, holder, &Refusal::new(Cause::TakenOver))
            .await;
    }

    /// The Redis part of a claim; see [`Admission::claim`].
    async fn claim(
        self: Arc<Self>,
        client_id: String,
        takeover: bool,
        tenant: String,
        limit: u32,
        presence: String,
        session: SessionHandle,
    ) -> Result<Ownership, ClaimError> {
        let id = session.id().to_string();
        let keys = OrgKeys::new(&tenant);
        let mut conn = self.conn.clone();
        let member = held_member(&tenant, &id);
        let mut claim = CLAIM.key(&keys.owner);
        claim
            .key(&keys.sessions)
            .key(&keys.count)
            .key(&keys.presence)
            .arg(&client_id)
            .arg(if takeover { "1" } else { "0" })
            .arg(limit)
            .arg(&presence)
            .arg(&id)
            .arg(&self.instance);
        let held = held_key(&self.instance);
        let answer: Result<Vec<String>, _> = if self.link.is_cluster() {
            // The held set and the org's keys are in different slots, on nodes that nothing
            // orders: the session is recorded first, so that a crash between the two leaves
            // nothing unsettled.
            bounded(conn.sadd::<_, _, ()>(&held, &member))
                .await
                .map_err(|_| ClaimError::Unavailable)?;
            bounded(claim.invoke_async(&mut conn)).await
        } else {
            bounded(record_and_claim(&mut conn, &held, &member, &claim)).await
        };
        let answer = match answer {
            Ok(answer) if answer.first().map(String::as_str) == Some("ok") => answer,
            other => {
                let _ = bounded(conn.srem::<_, _, ()>(&held, &member)).await;
                return Err(match other {
                    Ok(_) => ClaimError::TenantFull,
                    Err(error) => {
                        debug!(%error, "claim failed");
                        ClaimError::Unavailable
                    }
                });
            }
        };
        {
            let mut local = lock(&self.local);
            local.sessions.insert(
                id.clone(),
                LocalSession {
                    handle: session.clone(),
                    tenant: tenant.as_str().into(),
                    epoch: answer.get(1).and_then(|e| e.parse().ok()).unwrap_or(0),
                },
            );
            *local.tenants.entry(tenant.as_str().into()).or_insert(0) += 1;
            *local.presence.entry(presence.as_str().into()).or_insert(0) += 1;
        }
        let ownership = Ownership::new(Box::new(RedisRelease {
            shared: self.clone(),
            tenant: tenant.as_str().into(),
            session: id,
            presence: presence.into(),
        }));
        // Every earlier session of the client ID closes (or is settled) before this one goes
        // on: the one that held it, and any it displaced that are still closing.
        let displaced = answer.get(2..).unwrap_or_default().chunks_exact(2);
        futures_util::future::join_all(
            displaced.map(|pair| self.displace(&tenant, &pair[0], &pair[1])),
        )
        .await;
        Ok(ownership)
    }
}

impl Shared {
    /// The live sessions of `tenant` on every instance: (session, instance, client ID).
    async fn listed(&self, tenant: &str) -> Result<Vec<SessionInfo>, ClaimError> {
        let mut conn = self.conn.clone();
        let records: Vec<(String, Vec<u8>)> = bounded(conn.hgetall(OrgKeys::new(tenant).sessions))
            .await
            .map_err(|_| ClaimError::Unavailable)?;
        Ok(records
            .into_iter()
            .filter_map(|(session, record)| {
                let record = String::from_utf8(record).ok()?;
                let fields: Vec<&str> = record.split('\0').collect();
                // A superseded session is on its way out: the client ID is someone else's.
                (fields.len() >= 5 && fields[1] == "0").then(|| SessionInfo {
                    client_id: fields[4].to_owned(),
                    instance: fields[0].to_owned(),
                    session,
                })
            })
            .collect())
    }

    async fn close_listed(
        &self,
        tenant: &str,
        client_id: Option<&str>,
    ) -> Result<usize, ClaimError> {
        let mut closed = 0;
        for info in self.listed(tenant).await? {
            if client_id.is_some_and(|id| id != info.client_id) {
                continue;
            }
            if info.instance == self.instance {
                let local = lock(&self.local)
                    .sessions
                    .get(&info.session)
                    .map(|s| s.handle.clone());
                if let Some(handle) = local {
                    handle.close(closed_by_administrator());
                    closed += 1;
                }
                continue;
            }
            let mut conn = self.conn.clone();
            let request = format!("admin\0{}", info.session);
            let heard = bounded(
                self.link
                    .publish(&mut conn, &channel(&info.instance), &request),
            )
            .await
            .map_err(|_| ClaimError::Unavailable)?;
            closed += usize::from(heard > 0);
        }
        Ok(closed)
    }
}

impl Admission for Coordinator {
    fn claim<'a>(
        &'a self,
        request: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<Ownership, ClaimError>> {
        let shared = self.shared.clone();
        let healthy = shared.healthy.load(Ordering::Relaxed);
        let claim = shared.claim(
            request.client_id.to_owned(),
            request.takeover,
            request.tenant.to_owned(),
            request.tenant_limit,
            request.presence.to_owned(),
            request.session.clone(),
        );
        Box::pin(async move {
            if !healthy {
                return Err(ClaimError::Unavailable);
            }
            // Run to the end even if the session stops waiting: the ownership it then drops
            // gives back what the scripts took.
            let (result, wait) = oneshot::channel();
            tokio::spawn(async move {
                let _ = result.send(claim.await);
            });
            wait.await.unwrap_or(Err(ClaimError::Unavailable))
        })
    }

    fn is_present(&self, presence: &str) -> bool {
        lock(&self.shared.local).presence.contains_key(presence)
    }

    fn tenant_connections(&self, tenant: &str) -> u32 {
        lock(&self.shared.local)
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }

    fn sessions(&self) -> Vec<SessionHandle> {
        lock(&self.shared.local)
            .sessions
            .values()
            .map(|s| s.handle.clone())
            .collect()
    }

    fn list<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<Vec<SessionInfo>, ClaimError>> {
        Box::pin(self.shared.listed(tenant))
    }

    fn close_sessions<'a>(
        &'a self,
        tenant: &'a str,
        client_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, ClaimError>> {
        Box::pin(self.shared.close_listed(tenant, client_id))
    }
}

impl Reporter for Coordinator {
    fn connected(
        &self,
        session: SessionId,
        _client_id: &str,
        entry: Vec<u8>,
        statuses: Vec<Publication>,
    ) {
        let session = session.to_string();
        let epoch = lock(&self.shared.local)
            .sessions
            .get(&session)
            .map_or(0, |s| s.epoch);
        self.shared.jobs.push(Job::Connected {
            session,
            entry,
            statuses,
            epoch,
        });
    }

    fn disconnected(&self, session: SessionId, _client_id: &str, statuses: Vec<Publication>) {
        self.shared.jobs.push(Job::Disconnected {
            session: session.to_string(),
            statuses,
        });
    }

    fn publish(&self, publications: Vec<Publication>) {
        self.shared.jobs.push(Job::Publish(publications, 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(payload: &str, retain: bool) -> Publication {
        Publication {
            topic: "t".into(),
            payload: payload.to_owned().into(),
            retain,
        }
    }

    #[test]
    fn statuses_get_the_epoch_and_a_sequence_after_their_own_fields() {
        let mut statuses = vec![
            status(r#"{"Action":"Connect","Time":"x"}"#, true),
            status("", true),
            status("not json", false),
        ];
        stamp(&mut statuses, 3, Stamp::Connect);
        assert_eq!(
            statuses[0].payload.as_ref(),
            br#"{"Action":"Connect","Time":"x","Epoch":3,"Sequence":5}"#
        );
        assert!(statuses[1].payload.is_empty(), "a clearing stays empty");
        assert_eq!(statuses[2].payload.as_ref(), b"not json");
        let mut disconnect = vec![status("{}", false)];
        stamp(&mut disconnect, 3, Stamp::Disconnect);
        assert_eq!(
            disconnect[0].payload.as_ref(),
            br#"{"Epoch":3,"Sequence":6}"#
        );
        let mut shared = vec![status(r#"{"a":1}"#, false)];
        stamp(&mut shared, 0, Stamp::Connect);
        assert_eq!(shared[0].payload.as_ref(), br#"{"a":1}"#);
    }

    #[test]
    fn only_retained_empty_publications_are_clearings() {
        let mut statuses = vec![status("", true), status("", false), status("{}", true)];
        keep_retained_status(&mut statuses);
        assert_eq!(statuses.len(), 2);
    }
}
