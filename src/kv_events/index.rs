//! One model server's (one data-parallel rank's) cached blocks, as its KV
//! events report them.
//!
//! Keys are our own, not the engine's: vLLM's block hashes are seeded at
//! random per process unless PYTHONHASHSEED is fixed, so the picker could
//! never recompute them from a prompt. A block's key is the xxh3 of its
//! `block_size` token ids (u32 little-endian), seeded with the previous
//! block's key; the first block is seeded by [`chain_seed`] (the LoRA
//! adapter). [`block_keys`] computes the same chain from a tokenized prompt.
//!
//! Layout (per endpoint, nothing shared between endpoints):
//! - `nodes`: a slab of 24-byte nodes, one per (engine hash, medium) stored,
//!   linked in insertion order (a FIFO; the oldest is evicted first);
//! - `by_engine`: engine hash mixed with the medium -> node, so
//!   `BlockRemoved` (engine hashes only) finds its node;
//! - `by_key`: our key -> how many nodes hold it per medium, which is what
//!   a prefix query reads.
//!
//! Invariants: `by_engine` and the node list hold the same nodes; every
//! count in `by_key` equals the nodes with that key and medium, and a key
//! with no node left is removed; at most `capacity` nodes exist. A stored
//! block whose parent is unknown (evicted here, or stored before we
//! subscribed) cannot be keyed and is skipped, counted as an orphan.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::decode::{Batch, Event, Medium};

const NIL: u32 = u32::MAX;
/// Mixed into an engine hash for the non-GPU medium, so a block held on both
/// tiers has two distinct entries.
const CPU_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// The start of a key chain: the base model's blocks, or a LoRA adapter's
/// (`lora` = xxh3 of its name, as [`Event::Stored`] carries it).
pub fn chain_seed(lora: Option<u64>) -> u64 {
    let base = xxh3_64(b"epp-kv-events");
    match lora {
        Some(l) => xxh3_64_with_seed(&l.to_le_bytes(), base),
        None => base,
    }
}

/// Appends the chained keys of the full blocks of `tokens` to `out`,
/// starting from `prev` (a [`chain_seed`] or the key of the block before).
pub fn block_keys(mut prev: u64, tokens: &[u32], block_size: usize, out: &mut Vec<u64>) {
    if block_size == 0 {
        return;
    }
    let mut buf = [0u8; 256];
    for block in tokens.chunks_exact(block_size) {
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(prev);
        for part in block.chunks(64) {
            for (i, t) in part.iter().enumerate() {
                buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
            }
            h.update(&buf[..part.len() * 4]);
        }
        prev = h.digest();
        out.push(prev);
    }
}

type Map<V> = crate::prefix::BlockKeyMap<V>;

#[derive(Debug, Clone, Copy)]
struct Node {
    engine: u64,
    key: u64,
    prev: u32,
    /// Next node in insertion order; the top bit is set for the CPU medium.
    next_and_tier: u32,
}

impl Node {
    fn next(&self) -> u32 {
        if self.next_and_tier & !TIER_BIT == NIL & !TIER_BIT {
            NIL
        } else {
            self.next_and_tier & !TIER_BIT
        }
    }
    fn medium(&self) -> Medium {
        if self.next_and_tier & TIER_BIT != 0 {
            Medium::Cpu
        } else {
            Medium::Gpu
        }
    }
}

const TIER_BIT: u32 = 1 << 31;

/// Per medium: nodes holding a key.
#[derive(Debug, Clone, Copy, Default)]
struct Holds {
    gpu: u16,
    cpu: u16,
}

/// The longest cached prefix of a query, in blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Leading blocks held in GPU memory.
    pub gpu: usize,
    /// Leading blocks held in any medium (GPU or offloaded); `>= gpu`.
    pub any: usize,
}

/// What applying a batch did, for the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub stored: u64,
    pub removed: u64,
    pub orphans: u64,
    pub evicted: u64,
    pub cleared: u64,
    /// Events of KV-cache groups other than the first (hybrid models).
    pub other_groups: u64,
}

/// One endpoint's (rank's) blocks. Not synchronised: its owner wraps it.
#[derive(Debug)]
pub struct BlockIndex {
    nodes: Vec<Node>,
    free: u32,
    head: u32,
    tail: u32,
    by_engine: Map<u32>,
    by_key: Map<Holds>,
    capacity: usize,
    scratch: Vec<u64>,
}

impl BlockIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            nodes: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            by_engine: Map::default(),
            by_key: Map::default(),
            capacity: capacity.clamp(1, (NIL & !TIER_BIT) as usize - 1),
            scratch: Vec::new(),
        }
    }

    /// Blocks indexed (per medium entries).
    pub fn len(&self) -> usize {
        self.by_engine.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_engine.is_empty()
    }

    /// Lowers or raises the bound; shrinking evicts the oldest at once.
    pub fn set_capacity(&mut self, capacity: usize) -> u64 {
        self.capacity = capacity.clamp(1, (NIL & !TIER_BIT) as usize - 1);
        let mut evicted = 0;
        while self.len() > self.capacity {
            self.evict_oldest();
            evicted += 1;
        }
        evicted
    }

    /// Heap bytes held (from capacities: what the allocator gave, not what
    /// is in use), for the bytes-per-block figure.
    pub fn heap_bytes(&self) -> usize {
        // hashbrown: one entry plus one control byte per bucket; buckets are
        // the capacity rounded up so that it is at most 7/8 of them.
        fn map_bytes<V>(m: &Map<V>) -> usize {
            let cap = m.capacity();
            if cap == 0 {
                return 0;
            }
            let buckets = (cap * 8 / 7).next_power_of_two();
            buckets * (std::mem::size_of::<(u64, V)>() + 1)
        }
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + map_bytes(&self.by_engine)
            + map_bytes(&self.by_key)
            + self.scratch.capacity() * 8
    }

    pub fn clear(&mut self) {
        self.nodes.clear();
        self.free = NIL;
        self.head = NIL;
        self.tail = NIL;
        self.by_engine.clear();
        self.by_key.clear();
    }

    fn engine_key(engine: u64, medium: Medium) -> u64 {
        match medium {
            Medium::Gpu => engine,
            Medium::Cpu => engine.rotate_left(17) ^ CPU_MIX,
        }
    }

    /// The key of the block with engine hash `engine`, on any medium.
    fn key_of(&self, engine: u64) -> Option<u64> {
        [Medium::Gpu, Medium::Cpu].into_iter().find_map(|m| {
            self.by_engine
                .get(&Self::engine_key(engine, m))
                .map(|&n| self.nodes[n as usize].key)
        })
    }

    /// Applies every event of a decoded batch, in order.
    pub fn apply(&mut self, batch: &Batch) -> Applied {
        let mut a = Applied::default();
        for ev in &batch.events {
            match ev {
                Event::Stored { group: Some(g), .. } | Event::Removed { group: Some(g), .. }
                    if *g != 0 =>
                {
                    a.other_groups += 1;
                }
                Event::Stored {
                    hashes,
                    parent,
                    tokens,
                    block_size,
                    medium,
                    lora,
                    ..
                } => {
                    let prev = match parent {
                        None => chain_seed(*lora),
                        Some(p) => match self.key_of(*p) {
                            Some(k) => k,
                            None => {
                                a.orphans += hashes.len() as u64;
                                continue;
                            }
                        },
                    };
                    let mut keys = std::mem::take(&mut self.scratch);
                    keys.clear();
                    block_keys(
                        prev,
                        &batch.tokens[tokens.clone()],
                        *block_size as usize,
                        &mut keys,
                    );
                    for (&engine, &key) in batch.hashes[hashes.clone()].iter().zip(&keys) {
                        if self.insert(engine, key, *medium, &mut a.evicted) {
                            a.stored += 1;
                        }
                    }
                    // Keep the scratch small between batches: a huge event
                    // must not pin its size for the endpoint's lifetime.
                    keys.truncate(0);
                    keys.shrink_to(1024);
                    self.scratch = keys;
                }
                Event::Removed { hashes, medium, .. } => {
                    for &engine in &batch.hashes[hashes.clone()] {
                        if let Some(n) = self.by_engine.remove(&Self::engine_key(engine, *medium)) {
                            self.unlink(n);
                            a.removed += 1;
                        }
                    }
                }
                Event::Cleared => {
                    self.clear();
                    a.cleared += 1;
                }
            }
        }
        a
    }

    fn insert(&mut self, engine: u64, key: u64, medium: Medium, evicted: &mut u64) -> bool {
        let ek = Self::engine_key(engine, medium);
        if self.by_engine.contains_key(&ek) {
            return false;
        }
        while self.len() >= self.capacity {
            self.evict_oldest();
            *evicted += 1;
        }
        let tier = if medium == Medium::Cpu { TIER_BIT } else { 0 };
        let node = Node {
            engine: ek,
            key,
            prev: self.tail,
            next_and_tier: NIL & !TIER_BIT | tier,
        };
        let idx = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].next();
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        if self.tail != NIL {
            let t = &mut self.nodes[self.tail as usize];
            t.next_and_tier = (t.next_and_tier & TIER_BIT) | idx;
        } else {
            self.head = idx;
        }
        self.tail = idx;
        self.by_engine.insert(ek, idx);
        let h = self.by_key.entry(key).or_default();
        match medium {
            Medium::Gpu => h.gpu = h.gpu.saturating_add(1),
            Medium::Cpu => h.cpu = h.cpu.saturating_add(1),
        }
        true
    }

    fn evict_oldest(&mut self) {
        let n = self.head;
        if n == NIL {
            return;
        }
        let ek = self.nodes[n as usize].engine;
        self.by_engine.remove(&ek);
        self.unlink(n);
    }

    /// Takes node `n` (already out of `by_engine`) off the list and the key
    /// counts, and frees it.
    fn unlink(&mut self, n: u32) {
        let node = self.nodes[n as usize];
        let next = node.next();
        if node.prev != NIL {
            let p = &mut self.nodes[node.prev as usize];
            p.next_and_tier = (p.next_and_tier & TIER_BIT) | (next & !TIER_BIT);
        } else {
            self.head = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = node.prev;
        } else {
            self.tail = node.prev;
        }
        if let Some(h) = self.by_key.get_mut(&node.key) {
            match node.medium() {
                Medium::Gpu => h.gpu = h.gpu.saturating_sub(1),
                Medium::Cpu => h.cpu = h.cpu.saturating_sub(1),
            }
            if h.gpu == 0 && h.cpu == 0 {
                self.by_key.remove(&node.key);
            }
        }
        self.nodes[n as usize].next_and_tier = self.free & !TIER_BIT;
        self.free = n;
    }

    /// The longest leading run of `keys` held, per tier.
    pub fn longest_prefix(&self, keys: &[u64]) -> PrefixMatch {
        let mut m = PrefixMatch::default();
        let mut gpu_run = true;
        for k in keys {
            match self.by_key.get(k) {
                Some(h) => {
                    if gpu_run && h.gpu > 0 {
                        m.gpu += 1;
                    } else {
                        gpu_run = false;
                    }
                    m.any += 1;
                }
                None => break,
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap as StdMap, VecDeque};

    use super::*;
    use crate::kv_events::decode::Batch;

    fn stored(
        b: &mut Batch,
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u32],
        bs: u32,
        medium: Medium,
    ) {
        let h = b.hashes.len();
        b.hashes.extend_from_slice(hashes);
        let t = b.tokens.len();
        b.tokens.extend_from_slice(tokens);
        b.events.push(Event::Stored {
            hashes: h..b.hashes.len(),
            parent,
            tokens: t..b.tokens.len(),
            block_size: bs,
            medium,
            lora: None,
            group: None,
        });
    }

    fn removed(b: &mut Batch, hashes: &[u64], medium: Medium) {
        let h = b.hashes.len();
        b.hashes.extend_from_slice(hashes);
        b.events.push(Event::Removed {
            hashes: h..b.hashes.len(),
            medium,
            group: None,
        });
    }

    #[test]
    fn stored_chain_matches_the_prompt_chain_and_removal_and_tiers() {
        let tokens: Vec<u32> = (0..12).collect();
        let mut idx = BlockIndex::new(100);
        let mut b = Batch::default();
        stored(&mut b, &[100, 101], None, &tokens[..8], 4, Medium::Gpu);
        stored(&mut b, &[102], Some(101), &tokens[8..], 4, Medium::Gpu);
        stored(&mut b, &[100], None, &tokens[..4], 4, Medium::Cpu);
        stored(&mut b, &[999], Some(555), &tokens[..4], 4, Medium::Gpu);
        let a = idx.apply(&b);
        assert_eq!((a.stored, a.orphans), (4, 1));
        let mut keys = Vec::new();
        block_keys(chain_seed(None), &tokens, 4, &mut keys);
        assert_eq!(idx.longest_prefix(&keys), PrefixMatch { gpu: 3, any: 3 });
        let mut b = Batch::default();
        removed(&mut b, &[100], Medium::Gpu);
        idx.apply(&b);
        assert_eq!(idx.longest_prefix(&keys), PrefixMatch { gpu: 0, any: 3 });
        let mut other = Vec::new();
        block_keys(chain_seed(Some(7)), &tokens, 4, &mut other);
        assert_eq!(
            idx.longest_prefix(&other),
            PrefixMatch::default(),
            "a LoRA chain is distinct"
        );
    }

    /// The reference: a plain FIFO of (engine hash, medium, key).
    #[derive(Default)]
    struct Model {
        fifo: VecDeque<(u64, Medium, u64)>,
    }

    impl Model {
        fn key_of(&self, engine: u64) -> Option<u64> {
            [Medium::Gpu, Medium::Cpu].into_iter().find_map(|m| {
                self.fifo
                    .iter()
                    .find(|e| e.0 == engine && e.1 == m)
                    .map(|e| e.2)
            })
        }
        fn holds(&self, key: u64) -> (bool, bool) {
            let g = self.fifo.iter().any(|e| e.2 == key && e.1 == Medium::Gpu);
            let c = self.fifo.iter().any(|e| e.2 == key && e.1 == Medium::Cpu);
            (g, c)
        }
    }

    #[test]
    fn random_event_streams_agree_with_a_reference_model() {
        for seed in 0..200u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let cap = rng.usize(1..12);
            let mut idx = BlockIndex::new(cap);
            let mut model = Model::default();
            // Prompts drawn from a small alphabet of blocks so chains share prefixes.
            for _ in 0..60 {
                let mut b = Batch::default();
                let medium = if rng.bool() { Medium::Gpu } else { Medium::Cpu };
                match rng.u8(0..10) {
                    0..=5 => {
                        let n = rng.usize(1..4);
                        let tokens: Vec<u32> = (0..n * 2).map(|_| rng.u32(0..3)).collect();
                        let parent = if rng.u8(0..3) == 0 {
                            None
                        } else {
                            Some(rng.u64(0..40))
                        };
                        let hashes: Vec<u64> = (0..n).map(|_| rng.u64(0..40)).collect();
                        stored(&mut b, &hashes, parent, &tokens, 2, medium);
                        let prev = match parent {
                            None => Some(chain_seed(None)),
                            Some(p) => model.key_of(p),
                        };
                        if let Some(prev) = prev {
                            let mut keys = Vec::new();
                            block_keys(prev, &tokens, 2, &mut keys);
                            for (h, k) in hashes.iter().zip(keys) {
                                if !model.fifo.iter().any(|e| e.0 == *h && e.1 == medium) {
                                    if model.fifo.len() >= cap {
                                        model.fifo.pop_front();
                                    }
                                    model.fifo.push_back((*h, medium, k));
                                }
                            }
                        }
                    }
                    6..=8 => {
                        let hashes: Vec<u64> =
                            (0..rng.usize(1..4)).map(|_| rng.u64(0..40)).collect();
                        removed(&mut b, &hashes, medium);
                        model
                            .fifo
                            .retain(|e| !(hashes.contains(&e.0) && e.1 == medium));
                    }
                    _ => {
                        b.events.push(Event::Cleared);
                        model.fifo.clear();
                    }
                }
                idx.apply(&b);
                assert_eq!(idx.len(), model.fifo.len(), "seed {seed}");
                // Every key the model holds, and queries along random chains.
                let mut counts: StdMap<u64, (bool, bool)> = StdMap::new();
                for e in &model.fifo {
                    counts.insert(e.2, model.holds(e.2));
                }
                for (k, (g, c)) in counts {
                    let m = idx.longest_prefix(&[k]);
                    assert_eq!((m.gpu == 1, m.any == 1), (g, g || c), "seed {seed}");
                }
                let tokens: Vec<u32> = (0..8).map(|_| rng.u32(0..3)).collect();
                let mut keys = Vec::new();
                block_keys(chain_seed(None), &tokens, 2, &mut keys);
                let mut want = PrefixMatch::default();
                let mut gpu_run = true;
                for k in &keys {
                    let (g, c) = model.holds(*k);
                    if !(g || c) {
                        break;
                    }
                    gpu_run &= g;
                    want.gpu += usize::from(gpu_run);
                    want.any += 1;
                }
                assert_eq!(idx.longest_prefix(&keys), want, "seed {seed}");
            }
        }
    }

    #[test]
    fn a_pod_claiming_huge_numbers_of_blocks_stays_within_capacity() {
        let mut idx = BlockIndex::new(1000);
        let mut b = Batch::default();
        let tokens: Vec<u32> = (0..100_000).collect();
        let hashes: Vec<u64> = (0..100_000).collect();
        stored(&mut b, &hashes, None, &tokens, 1, Medium::Gpu);
        let a = idx.apply(&b);
        assert_eq!(idx.len(), 1000);
        assert_eq!(a.evicted, 99_000);
        assert!(idx.heap_bytes() < 1000 * 200, "{}", idx.heap_bytes());
        assert_eq!(idx.set_capacity(10), 990);
        assert_eq!(idx.len(), 10);
    }
}
