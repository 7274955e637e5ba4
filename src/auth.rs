//! Token verification: `sha256:` and argon2id hashes compared in constant time, on a bounded
//! pool, with verified results cached (moka) by identity and a digest of the presented token.
//!
//! Secrets never leave this module: no token, hash or digest is logged or put in an error.

use std::sync::Arc;

use thiserror::Error;

/// A stored token hash, as written in a policy file.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenHash {
    /// `sha256:<64 lowercase hex>`: SHA-256 of the token's UTF-8 bytes.
    Sha256([u8; 32]),
    /// An argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
    Argon2id(String),
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are not secrets, but keeping them out of debug output keeps them out of logs too.
        match self {
            TokenHash::Sha256(_) => f.write_str("TokenHash::Sha256(..)"),
            TokenHash::Argon2id(_) => f.write_str("TokenHash::Argon2id(..)"),
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
    /// Neither form (plain-text tokens are refused).
    #[error("tokens must be stored hashed: \"sha256:<hex>\" or an argon2id PHC string (see `mqtt-warden hash-token`)")]
    NotHashed,
}

impl TokenHash {
    /// Parses a stored hash.
    pub fn parse(stored: &str) -> Result<TokenHash, TokenHashError> {
        todo!()
    }

    /// Whether `presented` matches, in constant time with respect to the stored value.
    pub fn verify(&self, presented: &[u8]) -> bool {
        todo!()
    }

    /// Whether verification is slow (argon2id) and belongs on the verifier pool.
    pub fn is_slow(&self) -> bool {
        matches!(self, TokenHash::Argon2id(_))
    }
}

/// Hashes a token with argon2id and a random salt (the `hash-token` command).
pub fn hash_token_argon2id(token: &[u8]) -> Result<String, AuthError> {
    todo!()
}

/// Hashes a token as `sha256:<hex>` (the `hash-token --sha256` command).
pub fn hash_token_sha256(token: &[u8]) -> String {
    todo!()
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
/// The cache key is (identity key, SHA-256 of the presented token); a hit skips argon2id. The
/// cache is cleared on every policy change ([`Verifier::clear_cache`]).
pub struct Verifier {
    // implementation detail
    _private: (),
}

impl Verifier {
    /// A verifier that runs at most `workers` slow verifications at once and queues at most
    /// `queue` more; beyond that [`AuthError::Busy`].
    pub fn new(workers: usize, queue: usize) -> Arc<Verifier> {
        todo!()
    }

    /// Verifies `presented` against `stored` for the identity `key` (for example the client ID or
    /// API key). Fast hashes verify inline; argon2id runs on the pool.
    pub async fn verify(
        &self,
        key: &str,
        stored: &TokenHash,
        presented: &[u8],
    ) -> Result<bool, AuthError> {
        todo!()
    }

    /// Drops every cached result.
    pub fn clear_cache(&self) {
        todo!()
    }
}
