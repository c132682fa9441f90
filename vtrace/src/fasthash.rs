//! A fast hasher for the maps on the per-event path (the joiner, the aggregates, the device
//! namer). std's default SipHash guards against hash flooding, which costs a few times more
//! per lookup; these keys are skb addresses, fingerprints and device names made by the
//! kernel, not by a party that could choose them to collide.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

/// Multiply-rotate over 64-bit words (the scheme of rustc's FxHasher), with a final fold of
/// the high half into the low one: skb addresses vary in their middle bits and a table takes
/// its bucket from the low bits.
#[derive(Clone, Copy, Default)]
pub struct FastHasher(u64);

const K: u64 = 0xf135_7aea_2e62_a9c5;

impl FastHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(26) ^ w).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(n as u64);
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(n as u64);
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(v: T) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(v)
    }

    /// skb addresses 256 bytes apart (one slab object each) must not share low bits.
    #[test]
    fn slab_aligned_addresses_spread_over_the_low_bits() {
        let buckets: std::collections::HashSet<u64> = (0..1024u64)
            .map(|i| hash(0xffff_8880_1234_0000u64 + i * 256) & 1023)
            .collect();
        assert!(
            buckets.len() > 600,
            "{} of 1024 buckets used",
            buckets.len()
        );
        assert_ne!(hash("eth0"), hash("eth1"));
        assert_ne!(hash(("ab", "c")), hash(("a", "bc")));
    }
}
