//! The policy in force and its generation: a reload swaps the whole [`Policy`] and bumps the
//! generation, so that a session that was admitted under an older one notices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Policy;

/// The policy in force.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<Policy>,
    generation: AtomicU64,
}

impl PolicyStore {
    /// A store holding `policy`, at generation 0.
    pub fn new(policy: Policy) -> PolicyStore {
        PolicyStore {
            current: ArcSwap::from_pointee(policy),
            generation: AtomicU64::new(0),
        }
    }

    /// The policy in force and its generation, read together.
    pub fn load(&self) -> (Arc<Policy>, u64) {
        // The generation is bumped after the swap: reading it first means a policy newer than
        // the generation says, never older, so a session re-evaluates at worst once too often.
        let generation = self.generation.load(Ordering::Acquire);
        (self.current.load_full(), generation)
    }

    /// The generation of the policy in force.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `policy` in force.
    pub fn replace(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
        self.generation.fetch_add(1, Ordering::Release);
    }
}
