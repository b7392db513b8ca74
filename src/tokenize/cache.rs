//! The segment cache: text between added tokens -> its token ids.
//!
//! Keyed by the 128-bit xxh3 of the segment's bytes (a collision between two
//! different segments is as unlikely as a random 128-bit match, so the text
//! itself is not kept). Sharded by key, each shard a parking_lot mutex held
//! only to look up and copy ids, never while tokenizing: readers of
//! different segments rarely meet, and a miss tokenizes outside any lock.
//!
//! Eviction is CLOCK per shard: a hit sets the entry's reference bit; when a
//! shard is over its byte budget, the hand walks the insertion ring, clearing
//! set bits and evicting the first entry found clear. Invariants: every key
//! in `ring` is in `map` and the other way round; `bytes` is the sum of the
//! entries' costs and stays within `budget` after every insert; a segment
//! costing more than a shard's whole budget is not cached.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_128;

const SHARDS: usize = 16;
/// Bookkeeping per entry beyond its ids (map slot, ring slot, box header),
/// rounded up so the byte budget bounds real memory.
const ENTRY_OVERHEAD: usize = 64;

/// Hits, misses and what is held, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub bytes: usize,
}

#[derive(Debug)]
pub(crate) struct SegmentCache {
    shards: Box<[Mutex<Shard>]>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<u128, Entry, KeyHasher>,
    ring: VecDeque<u128>,
    bytes: usize,
    budget: usize,
}

#[derive(Debug)]
struct Entry {
    ids: Box<[u32]>,
    referenced: bool,
}

fn cost(ids: usize) -> usize {
    ids * 4 + ENTRY_OVERHEAD
}

/// The segment's cache key.
pub(crate) fn key(segment: &str) -> u128 {
    xxh3_128(segment.as_bytes())
}

impl SegmentCache {
    /// A cache holding at most about `budget` bytes of token ids and
    /// bookkeeping in total.
    pub(crate) fn new(budget: usize) -> Self {
        let per_shard = budget / SHARDS;
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        budget: per_shard,
                        ..Shard::default()
                    })
                })
                .collect(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: u128) -> &Mutex<Shard> {
        // The key is a hash already: its low bits pick the shard, its high
        // bits feed the map.
        &self.shards[(key as usize) % SHARDS]
    }

    /// Appends the cached ids of `key` to `out`; false on a miss.
    pub(crate) fn get_into(&self, key: u128, out: &mut Vec<u32>) -> bool {
        let mut shard = self.shard(key).lock();
        match shard.map.get_mut(&key) {
            Some(e) => {
                e.referenced = true;
                out.extend_from_slice(&e.ids);
                drop(shard);
                self.hits.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => {
                drop(shard);
                self.misses.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub(crate) fn insert(&self, key: u128, ids: &[u32]) {
        let c = cost(ids.len());
        let mut shard = self.shard(key).lock();
        if c > shard.budget || shard.map.contains_key(&key) {
            return;
        }
        while shard.bytes + c > shard.budget {
            if !shard.evict_one() {
                return;
            }
        }
        shard.map.insert(
            key,
            Entry {
                ids: ids.into(),
                referenced: false,
            },
        );
        shard.ring.push_back(key);
        shard.bytes += c;
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let mut s = CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            ..CacheStats::default()
        };
        for shard in self.shards.iter() {
            let shard = shard.lock();
            s.entries += shard.map.len();
            s.bytes += shard.bytes;
        }
        s
    }
}

impl Shard {
    /// Evicts one entry by CLOCK; false if the shard is empty.
    fn evict_one(&mut self) -> bool {
        // Each pass clears at most every bit once, so two laps suffice.
        for _ in 0..2 * self.ring.len() + 1 {
            let Some(key) = self.ring.pop_front() else {
                return false;
            };
            match self.map.get_mut(&key) {
                Some(e) if e.referenced => {
                    e.referenced = false;
                    self.ring.push_back(key);
                }
                Some(_) => {
                    if let Some(e) = self.map.remove(&key) {
                        self.bytes -= cost(e.ids.len());
                    }
                    return true;
                }
                None => {}
            }
        }
        false
    }
}

/// Keys are xxh3 output already: the map uses their high half as is.
#[derive(Debug, Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u128 keys are hashed (through write_u128); this path exists
        // for the trait and mixes whatever it is given.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = (n >> 64) as u64;
    }
}

impl std::hash::BuildHasher for KeyHasher {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_returns_what_was_inserted_and_miss_nothing() {
        let c = SegmentCache::new(1 << 20);
        let mut out = vec![7];
        assert!(!c.get_into(key("a"), &mut out));
        c.insert(key("a"), &[1, 2, 3]);
        assert!(c.get_into(key("a"), &mut out));
        assert_eq!(out, [7, 1, 2, 3]);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
        assert_eq!(s.bytes, cost(3));
    }

    #[test]
    fn bytes_stay_within_budget_and_referenced_entries_survive() {
        let budget = SHARDS * 10 * cost(10);
        let c = SegmentCache::new(budget);
        let ids = [0u32; 10];
        c.insert(key("hot"), &ids);
        for i in 0..10_000 {
            c.insert(key(&format!("cold {i}")), &ids);
            // Touch the hot entry now and then, as a repeated system prompt.
            if i % 5 == 0 {
                assert!(c.get_into(key("hot"), &mut Vec::new()), "evicted at {i}");
            }
            assert!(c.stats().bytes <= budget);
        }
        // Too large for a shard: not cached, nothing else evicted.
        let before = c.stats();
        c.insert(key("huge"), &vec![0u32; budget]);
        assert_eq!(c.stats().entries, before.entries);
    }

    #[test]
    fn zero_budget_caches_nothing() {
        let c = SegmentCache::new(0);
        c.insert(key("a"), &[1]);
        assert!(!c.get_into(key("a"), &mut Vec::new()));
    }
}
