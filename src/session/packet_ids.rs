//! Sets of MQTT packet identifiers, for the state a session keeps per message in flight: a
//! hash set with a cheap hash, since the default one showed on the per-message path.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

/// A set of packet identifiers. Hashed with [`PacketIdHasher`]: with the default SipHash, the
/// insert of a client's QoS 1 PUBLISH and the remove at the broker's PUBACK cost about 240
/// instructions per message (callgrind).
pub type PacketIds = HashSet<u16, BuildHasherDefault<PacketIdHasher>>;

/// Hashes a packet identifier by a multiplication that spreads its bits over the whole word.
/// Keys come from the client, but a set holds at most `max_inflight` of them out of 65,536, so
/// the most that can be made to share a bucket is small: no need for a keyed hash.
#[derive(Debug, Default, Clone, Copy)]
pub struct PacketIdHasher(u64);

impl Hasher for PacketIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    /// Only `u16` keys are hashed; any other input is mixed in byte by byte all the same.
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = fibonacci(self.0.rotate_left(8) ^ u64::from(byte));
        }
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = fibonacci(u64::from(id));
    }
}

/// Fibonacci hashing, with the high half folded down so that the bucket (the low bits) depends
/// on every bit of the key.
fn fibonacci(key: u64) -> u64 {
    let mixed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    mixed ^ (mixed >> 32)
}
