//! Identifiers unique across processes and restarts, with no configuration: each process draws
//! 64 random bits once ([`process_id`]), and a session ID is that and a counter.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// This process's random 64 bits, drawn once.
pub fn process_id() -> u64 {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    *PROCESS.get_or_init(rand::random)
}

/// This process's ID as 16 hex digits (the ledger's boot ID, the control client ID's suffix).
pub fn process_hex() -> String {
    format!("{:016x}", process_id())
}

/// A session's ID: unique across sessions, processes and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    process: u64,
    sequence: u64,
}

impl SessionId {
    /// The next ID of this process.
    pub fn next() -> SessionId {
        static SEQUENCE: AtomicU64 = AtomicU64::new(1);
        SessionId {
            process: process_id(),
            sequence: SEQUENCE.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl fmt::Display for SessionId {
    /// Hex: the process's 16 digits, then the sequence number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:x}", self.process, self.sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_within_a_process_and_carry_the_process() {
        let (a, b) = (SessionId::next(), SessionId::next());
        assert_ne!(a, b);
        assert!(a.to_string().starts_with(&process_hex()));
        assert_ne!(a.to_string(), b.to_string());
    }
}
