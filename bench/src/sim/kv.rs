//! The prefix cache of one pod: ref-counted hashed blocks, LRU eviction of the
//! unreferenced ones, and private (unhashed) blocks for partial prompt blocks
//! and output tokens.
//!
//! Blocks are identified only by their chained hash (no physical block ids are
//! needed: the simulator never reads block contents). Occupancy is
//! `entries.len() + private <= capacity`; `evictable` holds exactly the entries
//! whose `refs == 0`, keyed by a strictly increasing release tick, so its first
//! key is always the least recently used block.

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::Xxh3;

/// Chained hashes of the full blocks of `tokens`, `block_size` ids each,
/// the chain started from `seed` (appended to `out`, cleared first). The
/// trailing partial block is not hashed: vLLM only caches full blocks.
/// The seed carries what else vLLM puts in a block's hash: the pod's hash
/// seed (random per process) and the request's LoRA adapter, so the same
/// tokens under another adapter share no block.
pub fn block_hashes(tokens: &[u32], block_size: usize, seed: u64, out: &mut Vec<u64>) {
    out.clear();
    if block_size == 0 {
        return;
    }
    let mut parent = seed;
    let mut buf = [0u8; 256];
    for block in tokens.chunks_exact(block_size) {
        let mut h = Xxh3::with_seed(parent);
        for part in block.chunks(64) {
            for (dst, t) in buf.chunks_exact_mut(4).zip(part) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            h.update(&buf[..part.len() * 4]);
        }
        parent = h.digest();
        out.push(parent);
    }
}

/// What the cache did since the log was last drained: the source of the
/// KV events. Kept only when enabled, so a pod without events pays nothing.
#[derive(Debug, Default)]
pub struct ChangeLog {
    /// Blocks evicted, in eviction order.
    pub evicted: Vec<u64>,
    /// Indices (into the hashes passed to the last successful
    /// [`KvCache::try_allocate`]) of the blocks it stored anew.
    pub stored: Vec<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    refs: u32,
    /// Key in `evictable` while `refs == 0`.
    tick: u64,
}

/// What one admitted request holds; handed back to [`KvCache::release`].
#[derive(Debug, Default)]
pub struct Allocation {
    /// Hashed blocks referenced, in prompt order.
    hashes: Vec<u64>,
    private: usize,
    /// Leading blocks that were already cached (prefix-cache hits).
    pub hit_blocks: usize,
}

impl Allocation {
    pub fn blocks(&self) -> usize {
        self.hashes.len() + self.private
    }
}

#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    entries: HashMap<u64, Entry>,
    evictable: BTreeMap<u64, u64>,
    private: usize,
    tick: u64,
    log: Option<ChangeLog>,
}

impl KvCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: HashMap::with_capacity(capacity),
            evictable: BTreeMap::new(),
            private: 0,
            tick: 0,
            log: None,
        }
    }

    /// A cache that records its changes in a [`ChangeLog`].
    pub fn with_log(capacity: usize) -> Self {
        Self {
            log: Some(ChangeLog::default()),
            ..Self::new(capacity)
        }
    }

    /// The change log (when recording); the caller drains it.
    pub fn log_mut(&mut self) -> Option<&mut ChangeLog> {
        self.log.as_mut()
    }

    /// Drops every cached block (vLLM's `reset_prefix_cache`). Refused
    /// (false, nothing changed) while a running request references one.
    pub fn reset(&mut self) -> bool {
        if self.entries.len() != self.evictable.len() {
            return false;
        }
        self.entries.clear();
        self.evictable.clear();
        if let Some(log) = &mut self.log {
            log.evicted.clear();
            log.stored.clear();
        }
        true
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks referenced by running requests (vLLM's "used" blocks).
    pub fn used_blocks(&self) -> usize {
        self.entries.len() - self.evictable.len() + self.private
    }

    /// Unreferenced blocks still cached (hit-able, evictable).
    pub fn cached_unreferenced(&self) -> usize {
        self.evictable.len()
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.entries.contains_key(&hash)
    }

    /// Leading blocks of `hashes` present in the cache.
    pub fn leading_hits(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.entries.contains_key(h))
            .count()
    }

    /// References `hashes` (reusing cached ones) plus `private` fresh blocks,
    /// evicting LRU unreferenced blocks as needed. At most `max_hit_blocks`
    /// leading blocks count as hits; a present block past that is still shared
    /// rather than duplicated. `None` (and no change) when the blocks cannot be
    /// found without evicting a referenced one.
    pub fn try_allocate(
        &mut self,
        hashes: &[u64],
        max_hit_blocks: usize,
        private: usize,
    ) -> Option<Allocation> {
        let mut need_new = 0usize;
        let mut reused_unreferenced = 0usize;
        for h in hashes {
            match self.entries.get(h) {
                Some(e) if e.refs == 0 => reused_unreferenced += 1,
                Some(_) => {}
                None => need_new += 1,
            }
        }
        let free = self.capacity - self.entries.len() - self.private;
        let available = free + self.evictable.len() - reused_unreferenced;
        if need_new + private > available {
            return None;
        }
        let hit_blocks = self.leading_hits(hashes).min(max_hit_blocks);
        // Pin the reused blocks first so eviction below cannot take them.
        for h in hashes {
            if let Some(e) = self.entries.get_mut(h) {
                if e.refs == 0 {
                    self.evictable.remove(&e.tick);
                }
                e.refs += 1;
            }
        }
        while self.capacity - self.entries.len() - self.private < need_new + private {
            let Some((_, victim)) = self.evictable.pop_first() else {
                // Unreachable: `available` above counted enough evictable blocks.
                break;
            };
            self.entries.remove(&victim);
            if let Some(log) = &mut self.log {
                log.evicted.push(victim);
            }
        }
        // Pinned blocks have refs >= 1 and survived eviction, so an absent
        // hash here is exactly one that was absent before: a new block.
        for (i, &h) in hashes.iter().enumerate() {
            if let Slot::Vacant(v) = self.entries.entry(h) {
                v.insert(Entry { refs: 1, tick: 0 });
                if let Some(log) = &mut self.log {
                    log.stored.push(i);
                }
            }
        }
        self.private += private;
        Some(Allocation {
            hashes: hashes.to_vec(),
            private,
            hit_blocks,
        })
    }

    /// Drops a request's references. Tail blocks get older ticks than head
    /// blocks so a prompt is evicted from its end, keeping its prefix hit-able
    /// longest.
    pub fn release(&mut self, alloc: Allocation) {
        self.private -= alloc.private;
        for h in alloc.hashes.iter().rev() {
            // A duplicate hash within one prompt (a collision) was referenced
            // once but is released twice; the `refs > 0` guard absorbs it.
            if let Some(e) = self.entries.get_mut(h)
                && e.refs > 0
            {
                e.refs -= 1;
                if e.refs == 0 {
                    self.tick += 1;
                    e.tick = self.tick;
                    self.evictable.insert(self.tick, *h);
                }
            }
        }
    }

    /// Forgets every cached block no running request references, as a
    /// restarted engine would (see [`super::engine::Pod::restart`]). Blocks
    /// of running requests stay until they are released.
    pub fn clear_unreferenced(&mut self) {
        for (_, h) in std::mem::take(&mut self.evictable) {
            self.entries.remove(&h);
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        assert!(self.entries.len() + self.private <= self.capacity);
        let unref = self.entries.values().filter(|e| e.refs == 0).count();
        assert_eq!(unref, self.evictable.len());
        for (tick, h) in &self.evictable {
            assert_eq!(self.entries[h].tick, *tick);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(text: &str, seed: u64) -> Vec<u64> {
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        let mut v = Vec::new();
        block_hashes(&tokens, 4, seed, &mut v);
        v
    }

    fn hashes(text: &str) -> Vec<u64> {
        seeded(text, 0)
    }

    #[test]
    fn chained_hashes_share_prefixes_only() {
        let a = hashes("aaaabbbbccccdd");
        let b = hashes("aaaabbbbxxxx");
        let c = hashes("zzzzbbbbcccc");
        assert_eq!(a.len(), 3, "partial tail block is not hashed");
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // Same block text after a different parent is a different block.
        assert_ne!(a[1], c[1]);
        assert_ne!(a[2], c[2]);
        // Another seed (another LoRA adapter) shares no block, not even the
        // first; seed 0 is the plain chain.
        let other = seeded("aaaabbbbccccdd", 7);
        assert_eq!(other.len(), 3);
        assert!(other.iter().all(|h| !a.contains(h)), "{other:?} {a:?}");
        assert_eq!(seeded("aaaabbbbccccdd", 0), a);
    }

    #[test]
    fn second_request_hits_released_prefix() {
        let mut kv = KvCache::new(10);
        let h = hashes("aaaabbbbcccc");
        let a = kv.try_allocate(&h, usize::MAX, 1).unwrap();
        assert_eq!(a.hit_blocks, 0);
        assert_eq!(kv.used_blocks(), 4);
        kv.release(a);
        assert_eq!(kv.used_blocks(), 0);
        assert_eq!(kv.cached_unreferenced(), 3);
        let b = kv.try_allocate(&h, usize::MAX, 1).unwrap();
        assert_eq!(b.hit_blocks, 3);
        assert_eq!(kv.used_blocks(), 4);
        kv.check_invariants();
    }

    #[test]
    fn concurrent_requests_share_blocks() {
        let mut kv = KvCache::new(10);
        let h = hashes("aaaabbbb");
        let a = kv.try_allocate(&h, usize::MAX, 1).unwrap();
        let b = kv.try_allocate(&h, usize::MAX, 1).unwrap();
        assert_eq!(b.hit_blocks, 2);
        assert_eq!(kv.used_blocks(), 4, "2 shared + 2 private");
        kv.release(a);
        assert_eq!(kv.used_blocks(), 3, "b still holds the shared blocks");
        assert_eq!(kv.cached_unreferenced(), 0);
        kv.release(b);
        assert_eq!(kv.cached_unreferenced(), 2);
        kv.check_invariants();
    }

    #[test]
    fn hit_cap_keeps_last_block_computed() {
        let mut kv = KvCache::new(10);
        let h = hashes("aaaabbbb");
        let a = kv.try_allocate(&h, usize::MAX, 0).unwrap();
        kv.release(a);
        let b = kv.try_allocate(&h, 1, 0).unwrap();
        assert_eq!(b.hit_blocks, 1);
        assert_eq!(
            kv.used_blocks(),
            2,
            "the capped block is shared, not duplicated"
        );
        kv.check_invariants();
    }

    #[test]
    fn lru_eviction_spares_referenced_blocks() {
        let mut kv = KvCache::new(6);
        let old = hashes("oooopppp");
        let held = hashes("hhhhiiii");
        let a = kv.try_allocate(&old, usize::MAX, 0).unwrap();
        kv.release(a); // old: 2 unreferenced blocks
        let h = kv.try_allocate(&held, usize::MAX, 0).unwrap(); // held: referenced
        let mid = hashes("mmmmnnnn");
        let m = kv.try_allocate(&mid, usize::MAX, 0).unwrap();
        kv.release(m); // mid: 2 unreferenced, more recent than old
        assert_eq!(kv.used_blocks(), 2);
        // Needs 3 new blocks: 0 free, so evicts 2 of old (LRU) then 1 of mid (its tail).
        let new = hashes("nnnnwwwwxxxx");
        let n = kv.try_allocate(&new, usize::MAX, 0).unwrap();
        assert!(
            !kv.contains(old[0]) && !kv.contains(old[1]),
            "LRU evicted first"
        );
        assert!(kv.contains(mid[0]), "head of a prompt outlives its tail");
        assert!(!kv.contains(mid[1]));
        assert!(
            kv.contains(held[0]) && kv.contains(held[1]),
            "referenced blocks stay"
        );
        kv.check_invariants();
        // Nothing left to evict: everything else is referenced.
        assert!(
            kv.try_allocate(&hashes("qqqqrrrr"), usize::MAX, 0)
                .is_none()
        );
        kv.check_invariants();
        kv.release(n);
        kv.release(h);
        assert_eq!(kv.used_blocks(), 0);
        kv.check_invariants();
    }

    #[test]
    fn log_records_new_blocks_and_every_eviction() {
        let mut kv = KvCache::with_log(4);
        let a = kv.try_allocate(&hashes("aaaabbbb"), usize::MAX, 0).unwrap();
        let log = kv.log_mut().unwrap();
        assert_eq!((log.stored.clone(), log.evicted.len()), (vec![0, 1], 0));
        log.stored.clear();
        kv.release(a);
        // Shares "aaaa", stores 2 new blocks, evicts the tail "bbbb" only.
        let shared = hashes("aaaaccccdddd");
        let b = kv.try_allocate(&shared, usize::MAX, 1).unwrap();
        let log = kv.log_mut().unwrap();
        assert_eq!(log.stored, [1, 2]);
        assert_eq!(log.evicted, [hashes("aaaabbbb")[1]]);
        assert!(!kv.reset(), "referenced blocks refuse a reset");
        kv.release(b);
        assert!(kv.reset());
        assert_eq!(kv.cached_unreferenced(), 0);
        kv.check_invariants();
    }

    #[test]
    fn refuses_without_partial_changes() {
        let mut kv = KvCache::new(3);
        let a = kv.try_allocate(&hashes("aaaabbbb"), usize::MAX, 0).unwrap();
        assert!(
            kv.try_allocate(&hashes("ccccdddd"), usize::MAX, 0)
                .is_none()
        );
        assert_eq!(kv.used_blocks(), 2);
        kv.release(a);
        kv.check_invariants();
    }

    #[test]
    fn clearing_forgets_cached_blocks_but_not_running_ones() {
        let mut kv = KvCache::new(10);
        let cached = kv.try_allocate(&hashes("aaaabbbb"), usize::MAX, 0).unwrap();
        kv.release(cached);
        let running = kv.try_allocate(&hashes("ccccdddd"), usize::MAX, 1).unwrap();
        kv.clear_unreferenced();
        kv.check_invariants();
        assert_eq!(kv.cached_unreferenced(), 0);
        assert_eq!(kv.leading_hits(&hashes("aaaabbbb")), 0);
        assert_eq!(kv.used_blocks(), 3, "the running request keeps its blocks");
        kv.release(running);
        kv.check_invariants();
    }
}
