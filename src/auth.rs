//! Token verification: `sha256:`, argon2id and Mosquitto password-file (`$6$`, `$7$`) hashes
//! compared in constant time, on a bounded pool, with verified results cached (moka) by identity
//! and a digest of the presented token.
//!
//! The pool is `auth_workers` threads of its own, each with one argon2 memory buffer that it
//! reuses for every verification: argon2id needs its whole memory cost (19 MiB with the default
//! parameters) per hash, and allocating that per verification on short-lived blocking threads
//! left hundreds of MiB with the allocator under a bad-token storm.
//!
//! Secrets never leave this module: no token, hash or digest is logged or put in an error.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, Block, Params, Version};
use moka::sync::Cache;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::sync::oneshot;

/// The prefix of a stored SHA-256 token hash.
pub const SHA256_PREFIX: &str = "sha256:";
/// Most successful verifications remembered, in entries.
pub const CACHE_CAPACITY: u64 = 100_000;
/// How long a successful verification is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(10 * 60);
/// Most argon2id verifications for one identity waiting or running at once; more are
/// [`AuthError::Busy`] (176). A storm of wrong tokens for one identity then holds two places in
/// the queue, not all of them, and other clients' first connects still get verified.
pub const MAX_PENDING_PER_IDENTITY: usize = 2;
/// The longest argon2id salt accepted, in bytes (PHC strings allow up to 48).
const MAX_SALT_BYTES: usize = 64;

/// A stored token hash, as written in a policy file.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenHash {
    /// `sha256:<64 lowercase hex>`: SHA-256 of the token's UTF-8 bytes.
    Sha256([u8; 32]),
    /// An argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
    Argon2id(String),
    /// A hash from a Mosquitto password file (`mosquitto_passwd`).
    Mosquitto(MosquittoHash),
}

/// The most PBKDF2 iterations a `$7$` hash may ask for: more would let one policy line make
/// every verification arbitrarily slow.
pub const MAX_MOSQUITTO_ITERATIONS: u32 = 1_000_000;

/// A Mosquitto password-file hash: `$6$<salt>$<hash>` is SHA-512 over the password then the
/// salt; `$7$<iterations>$<salt>$<hash>` is PBKDF2-HMAC-SHA512. Salt and hash are base64.
#[derive(Clone, PartialEq, Eq)]
pub struct MosquittoHash {
    /// The hash as written (the cache digest covers it).
    text: String,
    /// `None` for `$6$`, the PBKDF2 iteration count for `$7$`.
    iterations: Option<std::num::NonZeroU32>,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl MosquittoHash {
    fn parse(stored: &str) -> Option<MosquittoHash> {
        use base64ct::{Base64, Encoding};
        let (iterations, rest) = if let Some(rest) = stored.strip_prefix("$6$") {
            (None, rest)
        } else {
            let rest = stored.strip_prefix("$7$")?;
            let (count, rest) = rest.split_once('$')?;
            let count: u32 = count.parse().ok()?;
            if count > MAX_MOSQUITTO_ITERATIONS {
                return None;
            }
            (Some(std::num::NonZeroU32::new(count)?), rest)
        };
        let (salt, hash) = rest.split_once('$')?;
        let salt = Base64::decode_vec(salt).ok()?;
        let hash = Base64::decode_vec(hash).ok()?;
        if salt.is_empty() || hash.len() != 64 {
            return None;
        }
        Some(MosquittoHash {
            text: stored.to_owned(),
            iterations,
            salt,
            hash,
        })
    }

    fn verify(&self, presented: &[u8]) -> bool {
        match self.iterations {
            None => {
                let mut hasher = sha2::Sha512::new();
                hasher.update(presented);
                hasher.update(&self.salt);
                let digest = hasher.finalize();
                bool::from(digest.as_slice().ct_eq(&self.hash[..]))
            }
            // ring compares the derived key in constant time.
            Some(iterations) => ring::pbkdf2::verify(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                iterations,
                &self.salt,
                presented,
                &self.hash,
            )
            .is_ok(),
        }
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are not secrets, but keeping them out of debug output keeps them out of logs too.
        match self {
            TokenHash::Sha256(_) => f.write_str("TokenHash::Sha256(..)"),
            TokenHash::Argon2id(_) => f.write_str("TokenHash::Argon2id(..)"),
            TokenHash::Mosquitto(_) => f.write_str("TokenHash::Mosquitto(..)"),
        }
    }
}

/// Why a stored hash is not usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenHashError {
    /// Not `sha256:` followed by 64 lowercase hex digits.
    #[error("a sha256 token hash must be \"sha256:\" followed by 64 lowercase hex digits")]
    BadSha256,
    /// Not a parseable argon2id PHC string.
    #[error("not a valid argon2id PHC string ($argon2id$v=19$m=..,t=..,p=..$salt$hash)")]
    BadArgon2,
    /// Not a usable Mosquitto password-file hash.
    #[error("not a valid Mosquitto password hash ($6$salt$hash, or $7$iterations$salt$hash with 1 to 1000000 iterations, as mosquitto_passwd writes)")]
    BadMosquitto,
    /// Neither form (plain-text tokens are refused).
    #[error("tokens must be stored hashed: \"sha256:<hex>\", an argon2id PHC string (see `mqtt-warden hash-token`) or a Mosquitto password hash")]
    NotHashed,
}

impl TokenHash {
    /// Parses a stored hash.
    pub fn parse(stored: &str) -> Result<TokenHash, TokenHashError> {
        if let Some(hex_digits) = stored.strip_prefix(SHA256_PREFIX) {
            let lowercase_hex = hex_digits.len() == 64
                && hex_digits
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !lowercase_hex {
                return Err(TokenHashError::BadSha256);
            }
            let mut digest = [0u8; 32];
            hex::decode_to_slice(hex_digits, &mut digest).map_err(|_| TokenHashError::BadSha256)?;
            return Ok(TokenHash::Sha256(digest));
        }
        if stored.starts_with("$argon2") {
            let hash = PasswordHash::new(stored).map_err(|_| TokenHashError::BadArgon2)?;
            if hash.algorithm != argon2::Algorithm::Argon2id.ident() || hash.hash.is_none() {
                return Err(TokenHashError::BadArgon2);
            }
            Params::try_from(&hash).map_err(|_| TokenHashError::BadArgon2)?;
            return Ok(TokenHash::Argon2id(stored.to_owned()));
        }
        if stored.starts_with("$6$") || stored.starts_with("$7$") {
            return MosquittoHash::parse(stored)
                .map(TokenHash::Mosquitto)
                .ok_or(TokenHashError::BadMosquitto);
        }
        Err(TokenHashError::NotHashed)
    }

    /// Whether `presented` matches, in constant time with respect to the stored value.
    pub fn verify(&self, presented: &[u8]) -> bool {
        match self {
            TokenHash::Sha256(stored) => bool::from(sha256(presented).ct_eq(stored)),
            TokenHash::Argon2id(phc) => verify_argon2id(phc, presented, &mut Vec::new()),
            TokenHash::Mosquitto(hash) => hash.verify(presented),
        }
    }

    /// As [`TokenHash::verify`], with `memory` as argon2's work area (kept for the next call).
    fn verify_with(&self, presented: &[u8], memory: &mut Vec<Block>) -> bool {
        match self {
            TokenHash::Argon2id(phc) => verify_argon2id(phc, presented, memory),
            other => other.verify(presented),
        }
    }

    /// Whether verification is slow (argon2id, Mosquitto's hashes) and belongs on the verifier
    /// pool.
    pub fn is_slow(&self) -> bool {
        !matches!(self, TokenHash::Sha256(_))
    }

    /// The text the cache digest covers, for slow hashes.
    fn stored_text(&self) -> &str {
        match self {
            TokenHash::Sha256(_) => "",
            TokenHash::Argon2id(phc) => phc,
            TokenHash::Mosquitto(hash) => &hash.text,
        }
    }
}

/// Hashes a token with argon2id and a random salt (the `hash-token` command).
pub fn hash_token_argon2id(token: &[u8]) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(token, &salt)
        .map(|hash| hash.to_string())
        .map_err(|_| AuthError::Hashing)
}

/// Hashes a token as `sha256:<hex>` (the `hash-token --sha256` command).
pub fn hash_token_sha256(token: &[u8]) -> String {
    format!("{SHA256_PREFIX}{}", hex::encode(sha256(token)))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Verifies `presented` against an argon2id PHC string, with `memory` as the argon2 work area
/// (grown to the hash's memory cost and kept for the next call). The comparison is constant time.
fn verify_argon2id(phc: &str, presented: &[u8], memory: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(params), Some(expected), Some(salt)) = (Params::try_from(&hash), hash.hash, hash.salt)
    else {
        return false;
    };
    let version = match hash.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let mut salt_bytes = [0u8; MAX_SALT_BYTES];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut output = [0u8; argon2::password_hash::Output::MAX_LENGTH];
    let Some(output) = output.get_mut(..expected.len()) else {
        return false;
    };
    let argon = Argon2::new(argon2::Algorithm::Argon2id, version, params);
    argon
        .hash_password_into_with_memory(presented, salt, output, &mut memory[..blocks])
        .is_ok()
        && bool::from(expected.as_bytes().ct_eq(output))
}

/// Why verification could not run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// The verifier queue is full (closing code 176).
    #[error("authentication queue is full")]
    Busy,
    /// Hashing failed.
    #[error("hashing failed")]
    Hashing,
}

/// Verifies tokens on a bounded pool and caches successes.
///
/// The cache key is (identity key, a SHA-256 digest of the presented token); a hit skips argon2id.
/// The digest also covers the stored hash, so a result cached for an old token hash can never
/// answer for a new one, even if a verification races a policy reload. The cache is cleared on
/// every policy change ([`Verifier::clear_cache`]).
pub struct Verifier {
    /// The workers' queue: argon2id verifications waiting for a worker thread.
    jobs: std::sync::mpsc::Sender<Job>,
    /// Slow verifications waiting or running.
    pending: Arc<AtomicUsize>,
    /// Slow verifications waiting or running, by identity key (at most `max_pending` entries).
    pending_by_identity: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// Most slow verifications waiting or running (`workers + queue`); beyond it [`AuthError::Busy`].
    max_pending: usize,
    /// Successful slow verifications.
    cache: Cache<(String, [u8; 32]), ()>,
    /// Slow verifications actually run (cache misses).
    slow_runs: AtomicU64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The cache holds digests of tokens; keep it out of debug output.
        f.debug_struct("Verifier")
            .field("pending", &self.pending())
            .field("max_pending", &self.max_pending)
            .field("slow_verifications", &self.slow_verifications())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier that runs at most `workers` slow verifications at once and queues at most
    /// `queue` more; beyond that [`AuthError::Busy`]. `workers` is at least 1.
    pub fn new(workers: usize, queue: usize) -> Arc<Verifier> {
        let workers = workers.max(1);
        let (jobs, queue_rx) = std::sync::mpsc::channel::<Job>();
        let queue_rx = Arc::new(std::sync::Mutex::new(queue_rx));
        for n in 0..workers {
            let queue_rx = Arc::clone(&queue_rx);
            // The threads end when the Verifier (the queue's only sender) is dropped.
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-worker-{n}"))
                .spawn(move || run_worker(&queue_rx));
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start an argon2 worker thread");
            }
        }
        Arc::new(Verifier {
            jobs,
            pending: Arc::new(AtomicUsize::new(0)),
            pending_by_identity: Arc::default(),
            max_pending: workers.saturating_add(queue),
            cache: Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(CACHE_TTL)
                .build(),
            slow_runs: AtomicU64::new(0),
        })
    }

    /// Verifies `presented` against `stored` for the identity `key` (for example the client ID or
    /// API key). Fast hashes verify inline; argon2id runs on the pool.
    pub async fn verify(
        &self,
        key: &str,
        stored: &TokenHash,
        presented: &[u8],
    ) -> Result<bool, AuthError> {
        if !stored.is_slow() {
            return Ok(stored.verify(presented));
        }
        let cache_key = (
            key.to_owned(),
            cache_digest(stored.stored_text(), presented),
        );
        if self.cache.contains_key(&cache_key) {
            return Ok(true);
        }

        // Count this verification before waiting, so the queue bound covers waiters too.
        let identity =
            IdentityGuard::enter(&self.pending_by_identity, key).ok_or(AuthError::Busy)?;
        let guard = PendingGuard::enter(&self.pending, self.max_pending).ok_or(AuthError::Busy)?;
        self.slow_runs.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            stored: stored.clone(),
            presented: presented.to_vec(),
            guard,
            identity,
            reply,
        };
        self.jobs.send(job).map_err(|_| AuthError::Hashing)?;
        // The job holds the pending count until its hash is done, even if this caller has gone
        // away: a cancelled CONNECT must not free a worker that is still busy.
        let ok = answer.await.map_err(|_| AuthError::Hashing)?;
        if ok {
            self.cache.insert(cache_key, ());
        }
        Ok(ok)
    }

    /// Drops every cached result.
    pub fn clear_cache(&self) {
        self.cache.invalidate_all();
    }

    /// Slow verifications waiting for or running on the pool now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Slow (argon2id) verifications run so far, that is cache misses that reached the pool.
    pub fn slow_verifications(&self) -> u64 {
        self.slow_runs.load(Ordering::Relaxed)
    }
}

/// The cache digest: SHA-256 over the stored hash (length-prefixed) and the presented token.
fn cache_digest(stored: &str, presented: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((stored.len() as u64).to_be_bytes());
    hasher.update(stored.as_bytes());
    hasher.update(presented);
    hasher.finalize().into()
}

/// One slow verification for a worker thread.
struct Job {
    stored: TokenHash,
    presented: Vec<u8>,
    /// The job's slot in the pending count, given back when the hash is done.
    guard: PendingGuard,
    /// Its slot in its identity's pending count, likewise.
    identity: IdentityGuard,
    reply: oneshot::Sender<bool>,
}

/// A worker thread: takes jobs until the queue closes, reusing one argon2 work area.
fn run_worker(queue: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>) {
    let mut memory = Vec::new();
    loop {
        let job = match queue.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return;
        };
        let ok = job.stored.verify_with(&job.presented, &mut memory);
        // The slots are free before the caller hears the answer.
        drop(job.guard);
        drop(job.identity);
        let _ = job.reply.send(ok);
    }
}

/// One slot of an identity's pending count, given back on drop.
struct IdentityGuard {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    key: String,
}

impl IdentityGuard {
    /// Takes a slot for `key`, unless [`MAX_PENDING_PER_IDENTITY`] are already taken.
    fn enter(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
        key: &str,
    ) -> Option<IdentityGuard> {
        let mut map = counts.lock().ok()?;
        let count = map.entry(key.to_owned()).or_insert(0);
        if *count >= MAX_PENDING_PER_IDENTITY {
            return None;
        }
        *count += 1;
        Some(IdentityGuard {
            counts: Arc::clone(counts),
            key: key.to_owned(),
        })
    }
}

impl Drop for IdentityGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counts.lock() {
            if let Some(count) = map.get_mut(&self.key) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&self.key);
                }
            }
        }
    }
}

/// One slot of the verifier's pending count, given back on drop.
struct PendingGuard(Arc<AtomicUsize>);

impl PendingGuard {
    /// Takes a slot, unless `max` are already taken.
    fn enter(pending: &Arc<AtomicUsize>, max: usize) -> Option<PendingGuard> {
        pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| PendingGuard(Arc::clone(pending)))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An argon2id hash that takes a noticeable time to verify, to hold the pool.
    fn slow_hash(token: &[u8]) -> TokenHash {
        let params = Params::new(64 * 1024, 4, 1, None).unwrap();
        let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::generate(&mut OsRng);
        TokenHash::parse(&argon.hash_password(token, &salt).unwrap().to_string()).unwrap()
    }

    #[test]
    fn parses_sha256() {
        let stored = hash_token_sha256(b"secret");
        assert_eq!(
            stored,
            "sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert!(matches!(
            TokenHash::parse(&stored),
            Ok(TokenHash::Sha256(_))
        ));
        assert_eq!(
            TokenHash::parse(&stored.to_uppercase().replace("SHA256", "sha256")),
            Err(TokenHashError::BadSha256)
        );
        assert_eq!(
            TokenHash::parse(&stored[..stored.len() - 1]),
            Err(TokenHashError::BadSha256)
        );
        assert_eq!(TokenHash::parse("sha256:"), Err(TokenHashError::BadSha256));
    }

    #[test]
    fn refuses_plain_and_broken_hashes() {
        assert_eq!(TokenHash::parse("secret"), Err(TokenHashError::NotHashed));
        assert_eq!(TokenHash::parse(""), Err(TokenHashError::NotHashed));
        assert_eq!(
            TokenHash::parse("$argon2id$nonsense"),
            Err(TokenHashError::BadArgon2)
        );
        assert_eq!(
            TokenHash::parse("$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$9Hhn3CsMhq8XHqHq4N2vbQ"),
            Err(TokenHashError::BadArgon2)
        );
    }

    #[test]
    fn verifies_sha256() {
        let hash = TokenHash::parse(&hash_token_sha256(b"secret")).unwrap();
        assert!(hash.verify(b"secret"));
        assert!(!hash.verify(b"secreT"));
        assert!(!hash.verify(b""));
        assert!(!hash.is_slow());
    }

    #[test]
    fn verifies_argon2id() {
        let stored = hash_token_argon2id(b"secret").unwrap();
        assert!(stored.starts_with("$argon2id$v=19$"));
        let hash = TokenHash::parse(&stored).unwrap();
        assert!(hash.is_slow());
        assert!(hash.verify(b"secret"));
        assert!(!hash.verify(b"wrong"));
        // Two hashes of one token differ: the salt is random.
        assert_ne!(stored, hash_token_argon2id(b"secret").unwrap());
    }

    #[test]
    fn verifies_other_argon2id_parameters_with_one_reused_work_area() {
        let mut memory = Vec::new();
        for (m_kib, t, p, output_len) in [(64, 1, 1, 32), (256, 2, 2, 16), (32, 3, 1, 64)] {
            let params = Params::new(m_kib, t, p, Some(output_len)).unwrap();
            let argon = Argon2::new(argon2::Algorithm::Argon2id, Version::V0x13, params);
            let salt = SaltString::generate(&mut OsRng);
            let phc = argon.hash_password(b"secret", &salt).unwrap().to_string();
            assert!(verify_argon2id(&phc, b"secret", &mut memory), "{phc}");
            assert!(!verify_argon2id(&phc, b"secreT", &mut memory), "{phc}");
        }
        // The work area grew to the largest memory cost and stayed.
        assert_eq!(memory.len(), 256);
        assert!(!verify_argon2id(
            "$argon2id$v=19$m=64,t=1,p=1$bad",
            b"x",
            &mut memory
        ));
    }

    #[test]
    fn debug_shows_no_secret() {
        let stored = hash_token_sha256(b"secret");
        let hash = TokenHash::parse(&stored).unwrap();
        assert_eq!(format!("{hash:?}"), "TokenHash::Sha256(..)");
        let verifier = Verifier::new(1, 0);
        assert!(!format!("{verifier:?}").contains(&stored[7..]));
    }

    #[tokio::test]
    async fn verifier_checks_both_kinds() {
        let verifier = Verifier::new(1, 0);
        let fast = TokenHash::parse(&hash_token_sha256(b"secret")).unwrap();
        assert_eq!(verifier.verify("d:o:t:i", &fast, b"secret").await, Ok(true));
        assert_eq!(verifier.verify("d:o:t:i", &fast, b"nope").await, Ok(false));
        let slow = TokenHash::parse(&hash_token_argon2id(b"secret").unwrap()).unwrap();
        assert_eq!(verifier.verify("d:o:t:i", &slow, b"secret").await, Ok(true));
        assert_eq!(verifier.verify("d:o:t:i", &slow, b"nope").await, Ok(false));
        assert_eq!(verifier.slow_verifications(), 2);
        assert_eq!(verifier.pending(), 0);
    }

    #[tokio::test]
    async fn caches_successes_only() {
        let verifier = Verifier::new(1, 0);
        let slow = TokenHash::parse(&hash_token_argon2id(b"secret").unwrap()).unwrap();
        assert_eq!(verifier.verify("key", &slow, b"secret").await, Ok(true));
        assert_eq!(verifier.verify("key", &slow, b"secret").await, Ok(true));
        assert_eq!(
            verifier.slow_verifications(),
            1,
            "the second success came from the cache"
        );

        // Another identity, or a wrong token, is not a hit; failures are not remembered.
        assert_eq!(verifier.verify("other", &slow, b"secret").await, Ok(true));
        assert_eq!(verifier.verify("key", &slow, b"wrong").await, Ok(false));
        assert_eq!(verifier.verify("key", &slow, b"wrong").await, Ok(false));
        assert_eq!(verifier.slow_verifications(), 4);

        // A new stored hash for the same identity does not reuse the old result.
        let renewed = TokenHash::parse(&hash_token_argon2id(b"secret").unwrap()).unwrap();
        assert_eq!(verifier.verify("key", &renewed, b"secret").await, Ok(true));
        assert_eq!(verifier.slow_verifications(), 5);

        verifier.clear_cache();
        assert_eq!(verifier.verify("key", &slow, b"secret").await, Ok(true));
        assert_eq!(verifier.slow_verifications(), 6, "the cache was cleared");
    }

    #[tokio::test]
    async fn one_identity_cannot_fill_the_queue() {
        let verifier = Verifier::new(1, 10);
        let slow = slow_hash(b"secret");
        let mut holders = Vec::new();
        for _ in 0..MAX_PENDING_PER_IDENTITY {
            let verifier = Arc::clone(&verifier);
            let slow = slow.clone();
            holders.push(tokio::spawn(async move {
                verifier.verify("victim", &slow, b"wrong").await
            }));
        }
        while verifier.pending() < MAX_PENDING_PER_IDENTITY {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            verifier.verify("victim", &slow, b"wrong").await,
            Err(AuthError::Busy)
        );
        // Another identity still queues and is verified.
        assert_eq!(verifier.verify("other", &slow, b"secret").await, Ok(true));
        for holder in holders {
            assert_eq!(holder.await.unwrap(), Ok(false));
        }
        assert_eq!(verifier.pending(), 0);
        assert!(verifier.pending_by_identity.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn busy_when_queue_full_but_cache_still_answers() {
        let verifier = Verifier::new(1, 0);
        let cached = TokenHash::parse(&hash_token_argon2id(b"cached").unwrap()).unwrap();
        assert_eq!(
            verifier.verify("cached", &cached, b"cached").await,
            Ok(true)
        );

        let slow = slow_hash(b"secret");
        let holder = {
            let verifier = Arc::clone(&verifier);
            let slow = slow.clone();
            tokio::spawn(async move { verifier.verify("holder", &slow, b"secret").await })
        };
        // The test runtime is single-threaded: the holder runs only when this task yields.
        while verifier.pending() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            verifier.verify("second", &slow, b"secret").await,
            Err(AuthError::Busy)
        );
        // A cached success needs no worker.
        assert_eq!(
            verifier.verify("cached", &cached, b"cached").await,
            Ok(true)
        );
        // Fast hashes never queue.
        let fast = TokenHash::parse(&hash_token_sha256(b"x")).unwrap();
        assert_eq!(verifier.verify("fast", &fast, b"x").await, Ok(true));

        assert_eq!(holder.await.unwrap(), Ok(true));
        assert_eq!(verifier.pending(), 0);
        assert_eq!(verifier.verify("second", &slow, b"secret").await, Ok(true));
    }

    #[test]
    fn verifies_mosquitto_password_hashes() {
        // Written by mosquitto_passwd 2.0.11 for "secret1" and "p@ss".
        let alice = TokenHash::parse("$7$101$s2ObCSj8MaklduYr$4nCpATRz2e+12Rg4hXAkVLOd7Aj12MAIgzOmcPC2TLvfLEBshYPDDAX8+AnuewPTN9Q4oqcb1f+7IQwMK+APPg==").unwrap();
        let bob = TokenHash::parse("$7$101$j6YUW1vaMxJHns1E$yKjFjwMT1/hJNRo+k3865SfBoOnIsrOoMJrR/Ufv8q6LfNhMARmsMo77a32zrrQdDtf6gzTJJkuGEmmBhmqF1w==").unwrap();
        assert!(alice.is_slow());
        assert!(alice.verify(b"secret1"));
        assert!(!alice.verify(b"secret2"));
        assert!(bob.verify(b"p@ss"));
        assert!(!bob.verify(b"secret1"));
        // $6$: SHA-512 over the password, then the salt.
        use base64ct::{Base64, Encoding};
        let salt = b"0123456789ab";
        let mut hasher = sha2::Sha512::new();
        hasher.update(b"pw");
        hasher.update(salt);
        let six = format!(
            "$6${}${}",
            Base64::encode_string(salt),
            Base64::encode_string(&hasher.finalize())
        );
        let six = TokenHash::parse(&six).unwrap();
        assert!(six.verify(b"pw") && !six.verify(b"pw2"));
        for bad in [
            "$7$0$s2ObCSj8MaklduYr$4nCpATRz",
            "$7$101$s2ObCSj8MaklduYr$short",
            "$7$99999999$s2ObCSj8MaklduYr$4nCpATRz2e+12Rg4hXAkVLOd7Aj12MAIgzOmcPC2TLvfLEBshYPDDAX8+AnuewPTN9Q4oqcb1f+7IQwMK+APPg==",
            "$6$nodollar",
        ] {
            assert_eq!(TokenHash::parse(bad), Err(TokenHashError::BadMosquitto), "{bad}");
        }
        assert_eq!(format!("{alice:?}"), "TokenHash::Mosquitto(..)");
    }

    #[tokio::test]
    async fn mosquitto_hashes_verify_on_the_pool() {
        let verifier = Verifier::new(1, 4);
        let alice = TokenHash::parse("$7$101$s2ObCSj8MaklduYr$4nCpATRz2e+12Rg4hXAkVLOd7Aj12MAIgzOmcPC2TLvfLEBshYPDDAX8+AnuewPTN9Q4oqcb1f+7IQwMK+APPg==").unwrap();
        assert_eq!(
            verifier.verify("lab/alice", &alice, b"secret1").await,
            Ok(true)
        );
        assert_eq!(
            verifier.verify("lab/alice", &alice, b"nope").await,
            Ok(false)
        );
        assert_eq!(verifier.slow_verifications(), 2);
        // A success is cached.
        assert_eq!(
            verifier.verify("lab/alice", &alice, b"secret1").await,
            Ok(true)
        );
        assert_eq!(verifier.slow_verifications(), 2);
    }
}
