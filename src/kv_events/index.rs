//! One model server's (one data-parallel rank's) cached blocks, as its KV
//! events report them.
//!
//! Keys are our own, not the engine's: vLLM's block hashes are seeded at
//! random per process unless PYTHONHASHSEED is fixed, so the picker could
//! never recompute them from a prompt. A block's key is the xxh3 of its
//! `block_size` token ids (u32 little-endian), seeded with the previous
//! block's key; the first block is seeded by [`chain_seed`] (LoRA adapter and
//! cache salt, the two extra keys of vLLM's block hash a text request
//! carries). [`block_keys`] computes the same chain from a tokenized prompt.
//! A block whose extra keys text cannot reproduce (multimodal items, prompt
//! embeddings) has those keys' bytes mixed into its key, so it and every
//! block chained after it never match a text prompt.
//!
//! Layout (per endpoint, nothing shared between endpoints), sized for the
//! bytes-per-block target:
//! - `nodes`: a slab of 20-byte nodes, one per (engine hash, medium) stored,
//!   linked in insertion order (a FIFO; the oldest is evicted first);
//! - `keys`: a slab of 20-byte entries, one per distinct key held (or kept
//!   as a ghost), counting the nodes holding it per medium, linked to its
//!   parent key's entry;
//! - `by_engine` and `by_key`: hash tables of slab indices (4 bytes a
//!   bucket), hashed by the engine hash (mixed with a per-index random seed
//!   and the medium, so a publisher cannot choose colliding hashes) and by
//!   our key (already an xxh3 output). A table of indices rather than a map
//!   of (u64, value) pairs is what keeps a bucket at 5 bytes.
//!
//! Both slabs grow by doubling up to `capacity` and no further (ghosts,
//! below, may take the key slab up to twice that).
//!
//! Closed chains, for bisection: a query is the key chain of a prompt, and
//! the answer its longest held leading run. A block's key determines its
//! parent's (it is hashed from it), so if every held block's parent is held
//! ("closed"), "held" is monotone along any query chain and the run ends
//! where a bisection finds the first block not held. Removals can break
//! this: our FIFO eviction takes a chain's oldest (first) blocks first, and
//! an engine may remove any block. So each key entry links to its parent's
//! entry and counts its children (entries linked to it); an entry whose
//! last node goes but which still has children stays as a *ghost* (in the
//! table, held by no node, not a match), and is freed, with any ghost
//! ancestor left childless, when its last child goes. A ghost always has a
//! held descendant, so the index is closed exactly when it has no ghosts;
//! queries bisect then and walk block by block otherwise. A stored block
//! whose parent is not held (evicted while its own chain was being stored)
//! gets a ghost parent, so it cannot make a closed index answer wrongly.
//! Ghosts are bounded by `capacity`; past that the index stops tracking
//! parents (every query walks) until it next empties. The GPU run is the
//! same bisection when no key is held off GPU only; otherwise it is walked
//! within the any-tier run.
//!
//! Invariants (checked by [`BlockIndex::check_invariants`], which the fuzz
//! target and the tests call): `by_engine` indexes exactly the nodes on the
//! list, at most `capacity` of them; every live key entry is in `by_key`
//! and its counts equal the nodes pointing to it per medium; an entry whose
//! counts reach zero is freed at once unless it has children (a ghost);
//! `kids` equals the entries linked to it, a ghost has kids, and `ghosts`
//! and `offloaded_only` equal what they count. A stored block whose parent is
//! unknown (evicted here, or stored before we subscribed) cannot be keyed
//! and is skipped, counted as an orphan.

use hashbrown::HashTable;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::decode::{Batch, Event, Medium};

const NIL: u32 = u32::MAX;
const TIER_BIT: u32 = 1 << 31;
/// Largest capacity: node indices must stay below the tier bit.
const MAX_CAPACITY: usize = (TIER_BIT - 2) as usize;
const CPU_MIX: u64 = 0x9e37_79b9_7f4a_7c15;
const SALT_MIX: u64 = 0xc2b2_ae3d_27d4_eb4f;

/// The start of a key chain.
///
/// `lora` is the xxh3 of the LoRA adapter's name ([`lora_key`]; what
/// [`Event::Stored`] carries), `cache_salt` the request's `cache_salt`
/// (vLLM: only a request's first block hashes it, which a chain seed is
/// equivalent to). An empty salt is no salt, as in vLLM. The picker calls
/// this with the request's adapter and salt; the index with what the event
/// reports, so a salted request only ever matches blocks stored for the
/// same salt.
pub fn chain_seed(lora: Option<u64>, cache_salt: Option<&[u8]>) -> u64 {
    seed_hashed(lora, cache_salt.filter(|s| !s.is_empty()).map(xxh3_64))
}

/// The `lora` argument of [`chain_seed`] for an adapter name.
pub fn lora_key(name: &str) -> u64 {
    xxh3_64(name.as_bytes())
}

/// [`chain_seed`] with the salt already hashed (as decoded events hold it).
fn seed_hashed(lora: Option<u64>, salt: Option<u64>) -> u64 {
    let mut seed = xxh3_64(b"epp-kv-events");
    if let Some(l) = lora {
        seed = xxh3_64_with_seed(&l.to_le_bytes(), seed);
    }
    if let Some(s) = salt {
        seed = xxh3_64_with_seed(&s.to_le_bytes(), seed ^ SALT_MIX);
    }
    seed
}

/// Appends the chained keys of the full blocks of `tokens` to `out`,
/// starting from `prev` (a [`chain_seed`] or the key of the block before).
pub fn block_keys(mut prev: u64, tokens: &[u32], block_size: usize, out: &mut Vec<u64>) {
    if block_size == 0 {
        return;
    }
    for block in tokens.chunks_exact(block_size) {
        prev = block_key(prev, block);
        out.push(prev);
    }
}

fn block_key(prev: u64, block: &[u32]) -> u64 {
    let mut buf = [0u8; 256];
    if block.len() <= 64 {
        for (i, t) in block.iter().enumerate() {
            buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
        }
        return xxh3_64_with_seed(&buf[..block.len() * 4], prev);
    }
    let mut h = xxhash_rust::xxh3::Xxh3::with_seed(prev);
    for part in block.chunks(64) {
        for (i, t) in part.iter().enumerate() {
            buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
        }
        h.update(&buf[..part.len() * 4]);
    }
    h.digest()
}

/// A stored (engine hash, medium); 20 bytes (no u64 field, so 4-aligned).
#[derive(Debug, Clone, Copy)]
struct Node {
    engine: [u32; 2],
    /// Index into `keys`.
    key: u32,
    prev: u32,
    /// Next node in insertion order (or the next free node); the top bit is
    /// set for the CPU medium.
    next_and_tier: u32,
}

impl Node {
    fn engine(&self) -> u64 {
        u64::from(self.engine[0]) | (u64::from(self.engine[1]) << 32)
    }
    fn next(&self) -> u32 {
        match self.next_and_tier & !TIER_BIT {
            n if n == NIL & !TIER_BIT => NIL,
            n => n,
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

/// One distinct key, the nodes holding it per medium, and its place in the
/// chain forest; 20 bytes (no u64 field, so 4-aligned).
#[derive(Debug, Clone, Copy)]
struct KeyEntry {
    key: [u32; 2],
    gpu: u16,
    cpu: u16,
    /// The entry of the block before this one in its chain (NIL for a
    /// chain's first block, or while unknown); the next free entry while
    /// this one is free.
    parent: u32,
    /// Entries whose `parent` is this one.
    kids: u32,
}

impl KeyEntry {
    fn new(key: u64, parent: u32) -> Self {
        Self {
            key: [key as u32, (key >> 32) as u32],
            gpu: 0,
            cpu: 0,
            parent,
            kids: 0,
        }
    }
    fn key(&self) -> u64 {
        u64::from(self.key[0]) | (u64::from(self.key[1]) << 32)
    }
    fn present(&self) -> bool {
        self.gpu > 0 || self.cpu > 0
    }
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
    live: usize,
    keys: Vec<KeyEntry>,
    free_key: u32,
    by_engine: HashTable<u32>,
    by_key: HashTable<u32>,
    capacity: usize,
    seed: u64,
    scratch: Vec<u64>,
    /// Entries held by no node but kept because a present block chains
    /// after them (see "Closed chains" in the module header).
    ghosts: usize,
    /// Present entries held only off GPU (counts 0 on GPU).
    offloaded_only: usize,
    /// Ghosts hit their bound: parents are no longer tracked until the
    /// index empties, and queries walk.
    untracked: bool,
}

/// A 64-bit finaliser (murmur3's): engine hashes may be small integers or
/// chosen by the publisher, and the table uses both ends of the hash.
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Grows a slab towards `cap` by doubling, never past it, so a full index
/// holds no slack. Only the key slab goes past `cap` (ghosts, bounded by
/// `cap` again): it does so in steps of a 32nd, not one entry at a time,
/// which would copy the whole slab for each ghost.
fn grow<T>(v: &mut Vec<T>, cap: usize) {
    if v.len() == v.capacity() {
        let want = if v.len() < cap {
            (v.len() * 2).clamp(16, cap.max(16))
        } else {
            v.len() + (cap / 32).max(16)
        };
        v.reserve_exact(want.saturating_sub(v.len()).max(1));
    }
}

/// The engine-hash table's hash of `engine` on `medium`.
fn engine_hash(seed: u64, engine: u64, medium: Medium) -> u64 {
    let tier = if medium == Medium::Cpu { CPU_MIX } else { 0 };
    fmix(engine ^ seed ^ tier)
}

/// Rebuilds `table` at the size a fresh table of its entries would have,
/// when it is at least twice that.
///
/// hashbrown leaves a tombstone where a removal's probe group is full, and a
/// table more than half full whose free slots have all become tombstones
/// doubles instead of rehashing in place: an index at capacity, inserting
/// and removing as fast, ends up with twice the buckets it needs, past the
/// bytes-per-block budget. Rebuilding only when the fresh table would keep
/// a sixteenth of its buckets free makes a rebuild cost at most one per
/// that many inserts.
fn shrink_oversized(table: &mut HashTable<u32>, hasher: impl Fn(&u32) -> u64) {
    let len = table.len();
    if len < 1024 {
        return;
    }
    let fresh = (len * 8 / 7).next_power_of_two();
    let bucket_bytes = std::mem::size_of::<u32>() + 1;
    if table.allocation_size() >= 2 * fresh * bucket_bytes && len + fresh / 16 <= fresh / 8 * 7 {
        table.shrink_to(0, hasher);
    }
}

impl BlockIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            nodes: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            live: 0,
            keys: Vec::new(),
            free_key: NIL,
            by_engine: HashTable::new(),
            by_key: HashTable::new(),
            capacity: capacity.clamp(1, MAX_CAPACITY),
            seed: fastrand::u64(..),
            scratch: Vec::new(),
            ghosts: 0,
            offloaded_only: 0,
            untracked: false,
        }
    }

    /// Blocks indexed (per medium entries).
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Lowers or raises the bound; shrinking evicts the oldest at once.
    pub fn set_capacity(&mut self, capacity: usize) -> u64 {
        self.capacity = capacity.clamp(1, MAX_CAPACITY);
        let mut evicted = 0;
        while self.live > self.capacity {
            self.evict_oldest();
            evicted += 1;
        }
        evicted
    }

    /// Heap bytes held (what the allocator gave, not what is in use), for
    /// the bytes-per-block figure.
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.keys.capacity() * std::mem::size_of::<KeyEntry>()
            + self.by_engine.allocation_size()
            + self.by_key.allocation_size()
            + self.scratch.capacity() * 8
    }

    pub fn clear(&mut self) {
        self.nodes.clear();
        self.keys.clear();
        self.free = NIL;
        self.free_key = NIL;
        self.head = NIL;
        self.tail = NIL;
        self.live = 0;
        self.by_engine.clear();
        self.by_key.clear();
        self.ghosts = 0;
        self.offloaded_only = 0;
        self.untracked = false;
    }

    fn engine_hash(&self, engine: u64, medium: Medium) -> u64 {
        engine_hash(self.seed, engine, medium)
    }

    fn find_node(&self, engine: u64, medium: Medium) -> Option<u32> {
        let nodes = &self.nodes;
        self.by_engine
            .find(self.engine_hash(engine, medium), |&i| {
                let n = &nodes[i as usize];
                n.engine() == engine && n.medium() == medium
            })
            .copied()
    }

    /// The key of the block with engine hash `engine`, on any medium.
    fn key_of(&self, engine: u64) -> Option<u64> {
        [Medium::Gpu, Medium::Cpu].into_iter().find_map(|m| {
            self.find_node(engine, m)
                .map(|n| self.keys[self.nodes[n as usize].key as usize].key())
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
                    salt,
                    extra,
                    ..
                } => {
                    let prev = match parent {
                        None => seed_hashed(*lora, *salt),
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
                    let tokens = &batch.tokens[tokens.clone()];
                    let bs = *block_size as usize;
                    match extra {
                        None => block_keys(prev, tokens, bs, &mut keys),
                        Some(extra) => {
                            let mut prev = prev;
                            for (block, &x) in
                                tokens.chunks_exact(bs).zip(&batch.extra[extra.clone()])
                            {
                                prev = block_key(prev, block);
                                if x != 0 {
                                    prev = xxh3_64_with_seed(&x.to_le_bytes(), prev);
                                }
                                keys.push(prev);
                            }
                        }
                    }
                    let mut parent = parent.map(|_| prev);
                    for (&engine, &key) in batch.hashes[hashes.clone()].iter().zip(&keys) {
                        if self.insert(engine, key, parent, *medium, &mut a.evicted) {
                            a.stored += 1;
                        }
                        parent = Some(key);
                    }
                    // Keep the scratch small between batches: a huge event
                    // must not pin its size for the endpoint's lifetime.
                    keys.truncate(0);
                    keys.shrink_to(1024);
                    self.scratch = keys;
                }
                Event::Removed { hashes, medium, .. } => {
                    for &engine in &batch.hashes[hashes.clone()] {
                        let h = self.engine_hash(engine, *medium);
                        let nodes = &self.nodes;
                        if let Ok(e) = self.by_engine.find_entry(h, |&i| {
                            let n = &nodes[i as usize];
                            n.engine() == engine && n.medium() == *medium
                        }) {
                            let (n, _) = e.remove();
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
        self.compact_tables();
        a
    }

    /// [`shrink_oversized`] on both tables, once per batch.
    fn compact_tables(&mut self) {
        let (nodes, keys, seed) = (&self.nodes, &self.keys, self.seed);
        shrink_oversized(&mut self.by_engine, |&i| {
            let n = &nodes[i as usize];
            engine_hash(seed, n.engine(), n.medium())
        });
        shrink_oversized(&mut self.by_key, |&i| keys[i as usize].key());
    }

    fn find_key(&self, key: u64) -> Option<u32> {
        let keys = &self.keys;
        self.by_key
            .find(key, |&i| keys[i as usize].key() == key)
            .copied()
    }

    /// A new entry for `key` (zero counts), linked under `parent`.
    fn new_key(&mut self, key: u64, parent: u32) -> u32 {
        let entry = KeyEntry::new(key, parent);
        let k = if self.free_key != NIL {
            let k = self.free_key;
            self.free_key = self.keys[k as usize].parent;
            self.keys[k as usize] = entry;
            k
        } else {
            grow(&mut self.keys, self.capacity);
            self.keys.push(entry);
            (self.keys.len() - 1) as u32
        };
        if parent != NIL {
            self.keys[parent as usize].kids += 1;
        }
        let keys = &self.keys;
        self.by_key
            .insert_unique(key, k, |&i| keys[i as usize].key());
        k
    }

    /// The entry of a stored block's parent key, made a ghost if the
    /// parent is not held (evicted while its children were being stored).
    /// NIL for a chain's first block, or when parents are untracked.
    fn parent_slot(&mut self, parent: Option<u64>) -> u32 {
        let Some(p) = parent else { return NIL };
        if self.untracked {
            return NIL;
        }
        if let Some(i) = self.find_key(p) {
            return i;
        }
        if !self.note_ghost() {
            return NIL;
        }
        self.new_key(p, NIL)
    }

    /// Counts a new ghost; past the bound, stops tracking parents instead
    /// (false).
    fn note_ghost(&mut self) -> bool {
        if self.ghosts >= self.capacity {
            self.untracked = true;
            return false;
        }
        self.ghosts += 1;
        true
    }

    /// The key entry for `key` (a block chained after `parent`), created
    /// with zero counts if new.
    fn key_slot(&mut self, key: u64, parent: Option<u64>) -> u32 {
        let p = self.parent_slot(parent);
        match self.find_key(key) {
            Some(k) => {
                let e = self.keys[k as usize];
                // A ghost made for an unknown parent learns its own now.
                if e.parent == NIL && p != NIL && !self.untracked {
                    self.keys[k as usize].parent = p;
                    self.keys[p as usize].kids += 1;
                }
                k
            }
            None => self.new_key(key, p),
        }
    }

    /// Frees entry `k` (held by no node and no child), then any ghost
    /// ancestor left without children.
    fn free_key_entry(&mut self, mut k: u32) {
        loop {
            let e = self.keys[k as usize];
            let key = e.key();
            if let Ok(entry) = self.by_key.find_entry(key, |&i| i == k) {
                entry.remove();
            }
            self.keys[k as usize].parent = self.free_key;
            self.free_key = k;
            let p = e.parent;
            if p == NIL || self.untracked {
                return;
            }
            let pe = &mut self.keys[p as usize];
            pe.kids -= 1;
            if pe.kids > 0 || pe.present() {
                return;
            }
            self.ghosts -= 1;
            k = p;
        }
    }

    fn insert(
        &mut self,
        engine: u64,
        key: u64,
        parent: Option<u64>,
        medium: Medium,
        evicted: &mut u64,
    ) -> bool {
        if self.find_node(engine, medium).is_some() {
            return false;
        }
        while self.live >= self.capacity {
            self.evict_oldest();
            *evicted += 1;
        }
        let k = self.key_slot(key, parent);
        let before = self.keys[k as usize];
        let e = &mut self.keys[k as usize];
        match medium {
            Medium::Gpu => e.gpu = e.gpu.saturating_add(1),
            Medium::Cpu => e.cpu = e.cpu.saturating_add(1),
        }
        let after = *e;
        self.count_change(before, after);
        let tier = if medium == Medium::Cpu { TIER_BIT } else { 0 };
        let node = Node {
            engine: [engine as u32, (engine >> 32) as u32],
            key: k,
            prev: self.tail,
            next_and_tier: (NIL & !TIER_BIT) | tier,
        };
        let idx = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].next();
            self.nodes[i as usize] = node;
            i
        } else {
            grow(&mut self.nodes, self.capacity);
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
        let h = self.engine_hash(engine, medium);
        let (nodes, seed) = (&self.nodes, self.seed);
        self.by_engine.insert_unique(h, idx, |&i| {
            let n = &nodes[i as usize];
            engine_hash(seed, n.engine(), n.medium())
        });
        self.live += 1;
        true
    }

    fn evict_oldest(&mut self) {
        let n = self.head;
        if n == NIL {
            return;
        }
        let node = self.nodes[n as usize];
        let (engine, medium) = (node.engine(), node.medium());
        let h = self.engine_hash(engine, medium);
        if let Ok(e) = self.by_engine.find_entry(h, |&i| i == n) {
            e.remove();
        }
        self.unlink(n);
    }

    /// Takes node `n` (already out of `by_engine`) off the list and its key
    /// entry's counts, and frees it.
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
        let before = self.keys[node.key as usize];
        let e = &mut self.keys[node.key as usize];
        match node.medium() {
            Medium::Gpu => e.gpu = e.gpu.saturating_sub(1),
            Medium::Cpu => e.cpu = e.cpu.saturating_sub(1),
        }
        let after = *e;
        self.count_change(before, after);
        if !after.present() {
            if after.kids == 0 || self.untracked {
                self.free_key_entry(node.key);
            } else if !self.note_ghost() {
                // Untracked from now on: entries go when their nodes do.
                self.free_key_entry(node.key);
            }
        }
        self.nodes[n as usize].next_and_tier = self.free & !TIER_BIT;
        self.free = n;
        self.live -= 1;
        if self.live == 0 && (self.untracked || self.ghosts > 0) {
            // Nothing present: whatever entries remain are ghosts or stale.
            self.clear();
        }
    }

    /// Keeps the ghost and offloaded-only counts as an entry's node counts
    /// change from `before` to `after`.
    fn count_change(&mut self, before: KeyEntry, after: KeyEntry) {
        let off = |e: &KeyEntry| e.gpu == 0 && e.cpu > 0;
        match (off(&before), off(&after)) {
            (false, true) => self.offloaded_only += 1,
            (true, false) => self.offloaded_only -= 1,
            _ => {}
        }
        if !before.present() && after.present() && before.kids > 0 && !self.untracked {
            // A ghost held again.
            self.ghosts -= 1;
        }
    }

    /// The longest leading run of `keys` held, per tier.
    pub fn longest_prefix(&self, keys: &[u64]) -> PrefixMatch {
        self.longest_prefix_near(keys, 0)
    }

    /// [`Self::longest_prefix`], probing first around `hint` blocks (the
    /// answer of another endpoint for the same chain: a hot prompt is held
    /// to the same depth on many). The hint only orders the probes; the
    /// answer is the same whatever it is.
    pub fn longest_prefix_near(&self, keys: &[u64], hint: usize) -> PrefixMatch {
        if !self.closed() {
            return self.walk(keys);
        }
        let any = self.first_absent(keys, hint);
        let gpu = if self.offloaded_only == 0 {
            any
        } else {
            let slab = &self.keys;
            keys[..any]
                .iter()
                .take_while(|&&k| self.find_key(k).is_some_and(|i| slab[i as usize].gpu > 0))
                .count()
        };
        PrefixMatch { gpu, any }
    }

    /// Whether every held block's chain is held back to its first block
    /// (no ghosts), which makes "held" monotone along a query chain.
    fn closed(&self) -> bool {
        self.ghosts == 0 && !self.untracked
    }

    /// Whether `key` is held on any tier (ghosts are not).
    fn held(&self, key: u64) -> bool {
        self.find_key(key)
            .is_some_and(|i| self.keys[i as usize].present())
    }

    /// The first block of `keys` not held, by bisection, for a closed
    /// index only.
    fn first_absent(&self, keys: &[u64], hint: usize) -> usize {
        // Invariant: every block before `lo` is held; block `hi` (if any)
        // is not.
        let (mut lo, mut hi) = (0usize, keys.len());
        let hint = hint.min(keys.len());
        if hint > 0 {
            if self.held(keys[hint - 1]) {
                lo = hint;
            } else {
                hi = hint - 1;
            }
        }
        if lo == hint && lo < hi {
            if self.held(keys[hint]) {
                lo = hint + 1;
            } else {
                hi = hint;
            }
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.held(keys[mid]) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The leading run block by block: the answer whatever the index's
    /// shape, and the reference the bisection is tested against.
    #[doc(hidden)]
    pub fn walk(&self, keys: &[u64]) -> PrefixMatch {
        let mut m = PrefixMatch::default();
        let mut gpu_run = true;
        let slab = &self.keys;
        for &k in keys {
            match self.find_key(k).map(|i| slab[i as usize]) {
                Some(e) if e.present() => {
                    if gpu_run && e.gpu > 0 {
                        m.gpu += 1;
                    } else {
                        gpu_run = false;
                    }
                    m.any += 1;
                }
                _ => break,
            }
        }
        m
    }

    /// Checks every invariant in the module header, walking the whole
    /// index: for tests and the fuzz target, not for the request path.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.live > self.capacity {
            return Err(format!(
                "{} blocks over capacity {}",
                self.live, self.capacity
            ));
        }
        if self.by_engine.len() != self.live {
            return Err(format!(
                "by_engine has {} of {} nodes",
                self.by_engine.len(),
                self.live
            ));
        }
        let mut counts = vec![(0u32, 0u32); self.keys.len()];
        let (mut n, mut prev, mut walked) = (self.head, NIL, 0usize);
        while n != NIL {
            let node = self
                .nodes
                .get(n as usize)
                .ok_or("list points past the slab")?;
            if node.prev != prev {
                return Err(format!("node {n}: prev {} not {prev}", node.prev));
            }
            if self.find_node(node.engine(), node.medium()) != Some(n) {
                return Err(format!("node {n} not found by its engine hash"));
            }
            let c = counts
                .get_mut(node.key as usize)
                .ok_or("node points past the key slab")?;
            match node.medium() {
                Medium::Gpu => c.0 += 1,
                Medium::Cpu => c.1 += 1,
            }
            walked += 1;
            if walked > self.live {
                return Err("list longer than the live count (a cycle?)".into());
            }
            prev = n;
            n = node.next();
        }
        if walked != self.live || prev != self.tail {
            return Err(format!("list has {walked} nodes, live {}", self.live));
        }
        let mut live_keys = 0;
        for (i, (g, c)) in counts.iter().enumerate() {
            if *g == 0 && *c == 0 {
                continue;
            }
            live_keys += 1;
            let e = &self.keys[i];
            if (u32::from(e.gpu), u32::from(e.cpu)) != (*g, *c) {
                return Err(format!(
                    "key {i}: counts {}/{} but {g}/{c} nodes",
                    e.gpu, e.cpu
                ));
            }
            if self.find_key(e.key()) != Some(i as u32) {
                return Err(format!("key {i} not found by its key"));
            }
        }
        // Entries in the table: the present ones and the ghosts.
        let in_table: Vec<bool> = (0..self.keys.len())
            .map(|i| self.find_key(self.keys[i].key()) == Some(i as u32))
            .collect();
        let mut kids = vec![0u32; self.keys.len()];
        let (mut ghosts, mut offloaded_only) = (0usize, 0usize);
        for (i, e) in self.keys.iter().enumerate() {
            if !in_table[i] {
                continue;
            }
            if !e.present() {
                ghosts += 1;
                if e.kids == 0 && !self.untracked {
                    return Err(format!("ghost {i} has no children"));
                }
            } else if e.gpu == 0 {
                offloaded_only += 1;
            }
            if e.parent != NIL && !self.untracked {
                if !in_table.get(e.parent as usize).copied().unwrap_or(false) {
                    return Err(format!("key {i}: parent {} not in the table", e.parent));
                }
                kids[e.parent as usize] += 1;
            }
        }
        if live_keys + ghosts != self.by_key.len() {
            return Err(format!(
                "by_key has {} entries, {live_keys} keys live, {ghosts} ghosts",
                self.by_key.len()
            ));
        }
        if offloaded_only != self.offloaded_only {
            return Err(format!(
                "{offloaded_only} offloaded-only keys, counted {}",
                self.offloaded_only
            ));
        }
        if !self.untracked {
            if ghosts != self.ghosts {
                return Err(format!("{ghosts} ghosts, counted {}", self.ghosts));
            }
            for (i, e) in self.keys.iter().enumerate() {
                if in_table[i] && e.kids != kids[i] {
                    return Err(format!(
                        "key {i}: {} kids counted, {} found",
                        e.kids, kids[i]
                    ));
                }
            }
        }
        Ok(())
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
            salt: None,
            extra: None,
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
        block_keys(chain_seed(None, None), &tokens, 4, &mut keys);
        assert_eq!(idx.longest_prefix(&keys), PrefixMatch { gpu: 3, any: 3 });
        let mut b = Batch::default();
        removed(&mut b, &[100], Medium::Gpu);
        idx.apply(&b);
        assert_eq!(idx.longest_prefix(&keys), PrefixMatch { gpu: 0, any: 3 });
        let mut other = Vec::new();
        block_keys(chain_seed(Some(7), None), &tokens, 4, &mut other);
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
                            None => Some(chain_seed(None, None)),
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
                idx.check_invariants().unwrap();
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
                block_keys(chain_seed(None, None), &tokens, 2, &mut keys);
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

    /// Bisection (with any hint) answers exactly what the block-by-block
    /// walk answers, on random forests of chains under stores, removals of
    /// any block (leaf or not), FIFO evictions, both tiers and clears; and
    /// the index is closed (so the bisection, not the walk, answered) often.
    #[test]
    fn bisection_agrees_with_the_walk_under_random_removals() {
        let mut closed_queries = 0usize;
        let mut queries = 0usize;
        for seed in 0..300u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let cap = rng.usize(4..64);
            let mut idx = BlockIndex::new(cap);
            // Prompts: 3 groups of shared prefixes, each block 1 token from
            // a small alphabet, so chains branch and share.
            let prompts: Vec<Vec<u32>> = (0..8)
                .map(|p| {
                    let g = p % 3;
                    (0..rng.usize(2..24))
                        .map(|i| {
                            if i < 6 {
                                g as u32 * 10 + i as u32
                            } else {
                                rng.u32(0..4)
                            }
                        })
                        .collect()
                })
                .collect();
            // Engine hash of block i of prompt p: fixed per (p, i) content.
            let engine = |p: usize, i: usize| (p as u64) << 32 | i as u64;
            for _ in 0..80 {
                let mut b = Batch::default();
                let medium = if rng.u8(0..4) == 0 {
                    Medium::Cpu
                } else {
                    Medium::Gpu
                };
                let p = rng.usize(0..prompts.len());
                let t = &prompts[p];
                match rng.u8(0..12) {
                    0..=5 => {
                        // Store blocks from..to of prompt p, chained after
                        // block from - 1 (an orphan if that is gone).
                        let from = if rng.bool() { 0 } else { rng.usize(0..t.len()) };
                        let to = rng.usize(from..t.len()) + 1;
                        let hashes: Vec<u64> = (from..to).map(|i| engine(p, i)).collect();
                        let parent = (from > 0).then(|| engine(p, from - 1));
                        stored(&mut b, &hashes, parent, &t[from..to], 1, medium);
                    }
                    6..=7 => {
                        // A leaf-first removal of a tail, as engines evict.
                        let from = rng.usize(0..t.len());
                        let hashes: Vec<u64> =
                            (from..t.len()).rev().map(|i| engine(p, i)).collect();
                        removed(&mut b, &hashes, medium);
                    }
                    8..=10 => {
                        // Any one block, making holes.
                        removed(&mut b, &[engine(p, rng.usize(0..t.len()))], medium);
                    }
                    _ => {
                        if rng.u8(0..4) == 0 {
                            b.events.push(Event::Cleared);
                        }
                    }
                }
                idx.apply(&b);
                idx.check_invariants()
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                for q in &prompts {
                    let mut keys = Vec::new();
                    block_keys(chain_seed(None, None), q, 1, &mut keys);
                    let want = idx.walk(&keys);
                    queries += 1;
                    closed_queries += usize::from(idx.closed());
                    for hint in [0, want.any, rng.usize(0..=keys.len() + 2)] {
                        assert_eq!(
                            idx.longest_prefix_near(&keys, hint),
                            want,
                            "seed {seed} hint {hint}"
                        );
                    }
                }
            }
        }
        assert!(
            closed_queries * 5 > queries,
            "{closed_queries} of {queries} queries bisected"
        );
    }

    #[test]
    fn evicting_a_chains_first_blocks_leaves_ghosts_until_its_last_goes() {
        let tokens: Vec<u32> = (0..6).collect();
        let mut idx = BlockIndex::new(6);
        let mut b = Batch::default();
        stored(&mut b, &[1, 2, 3, 4, 5, 6], None, &tokens, 1, Medium::Gpu);
        idx.apply(&b);
        assert!(idx.closed());
        let mut keys = Vec::new();
        block_keys(chain_seed(None, None), &tokens, 1, &mut keys);
        assert_eq!(idx.longest_prefix(&keys).any, 6);
        // Two more blocks evict the chain's first two: its rest is held but
        // unreachable, and the index is not closed.
        let other: Vec<u32> = vec![100, 101];
        let mut b = Batch::default();
        stored(&mut b, &[7, 8], None, &other, 1, Medium::Gpu);
        idx.apply(&b);
        idx.check_invariants().unwrap();
        assert_eq!(idx.ghosts, 2);
        assert!(!idx.closed());
        assert_eq!(idx.longest_prefix(&keys).any, 0);
        assert_eq!(
            idx.longest_prefix_near(&keys, 6).any,
            0,
            "a bisection trusting the last block would say 6"
        );
        // Removing the rest of the chain frees the ghosts with it.
        let mut b = Batch::default();
        removed(&mut b, &[6, 5, 4, 3], Medium::Gpu);
        idx.apply(&b);
        idx.check_invariants().unwrap();
        assert_eq!((idx.ghosts, idx.len()), (0, 2));
        assert!(idx.closed());
    }

    #[test]
    fn ghosts_past_their_bound_stop_parent_tracking_until_empty() {
        // One chain longer than the capacity: every evicted first block
        // becomes a ghost, past the bound the index walks.
        let mut idx = BlockIndex::new(4);
        let tokens: Vec<u32> = (0..20).collect();
        let hashes: Vec<u64> = (0..20).collect();
        let mut b = Batch::default();
        stored(&mut b, &hashes, None, &tokens, 1, Medium::Gpu);
        idx.apply(&b);
        idx.check_invariants().unwrap();
        assert!(idx.untracked);
        let mut keys = Vec::new();
        block_keys(chain_seed(None, None), &tokens, 1, &mut keys);
        assert_eq!(idx.longest_prefix(&keys).any, 0);
        assert_eq!(idx.longest_prefix_near(&keys, 20).any, 0);
        let mut b = Batch::default();
        removed(&mut b, &hashes[16..], Medium::Gpu);
        idx.apply(&b);
        idx.check_invariants().unwrap();
        assert!(idx.is_empty() && !idx.untracked && idx.closed());
        assert_eq!(idx.by_key.len(), 0);
    }

    #[test]
    fn salt_and_lora_seed_the_chain_on_both_sides() {
        let tokens: Vec<u32> = (0..8).collect();
        let mut idx = BlockIndex::new(100);
        let mut b = Batch::default();
        stored(&mut b, &[1, 2], None, &tokens, 4, Medium::Gpu);
        if let Some(Event::Stored { salt, lora, .. }) = b.events.last_mut() {
            *salt = Some(xxh3_64(b"tenant"));
            *lora = Some(lora_key("ad"));
        }
        idx.apply(&b);
        let q = |lora, salt| {
            let mut k = Vec::new();
            block_keys(chain_seed(lora, salt), &tokens, 4, &mut k);
            idx.longest_prefix(&k).any
        };
        assert_eq!(q(Some(lora_key("ad")), Some(&b"tenant"[..])), 2);
        assert_eq!(q(Some(lora_key("ad")), None), 0, "unsalted misses salted");
        assert_eq!(
            q(None, Some(&b"tenant"[..])),
            0,
            "base model misses the adapter"
        );
        assert_eq!(q(Some(lora_key("ad")), Some(&b"other"[..])), 0);
        assert_eq!(chain_seed(None, Some(b"")), chain_seed(None, None));
        assert_ne!(chain_seed(None, Some(b"x")), chain_seed(None, None));
    }

    #[test]
    fn multimodal_blocks_never_match_text() {
        let tokens: Vec<u32> = (0..12).collect();
        let mut idx = BlockIndex::new(100);
        let mut b = Batch::default();
        stored(&mut b, &[1, 2, 3], None, &tokens, 4, Medium::Gpu);
        b.extra = vec![0, 77, 0];
        if let Some(Event::Stored { extra, .. }) = b.events.last_mut() {
            *extra = Some(0..3);
        }
        idx.apply(&b);
        idx.check_invariants().unwrap();
        assert_eq!(idx.len(), 3);
        let mut k = Vec::new();
        block_keys(chain_seed(None, None), &tokens, 4, &mut k);
        // The text block before the image matches; the image block and what
        // is chained after it do not.
        assert_eq!(idx.longest_prefix(&k), PrefixMatch { gpu: 1, any: 1 });
        assert_eq!(idx.longest_prefix(&k[2..]).any, 0);
    }

    #[test]
    fn chosen_colliding_engine_hashes_stay_correct() {
        // Multiples of 2^40: the same low bits everywhere, which an identity
        // hasher would pile into one bucket.
        let mut idx = BlockIndex::new(5000);
        let mut b = Batch::default();
        let hashes: Vec<u64> = (0..4000u64).map(|i| i << 40).collect();
        let tokens: Vec<u32> = (0..4000).collect();
        stored(&mut b, &hashes, None, &tokens, 1, Medium::Gpu);
        removed(&mut b, &hashes[..2000], Medium::Gpu);
        let a = idx.apply(&b);
        assert_eq!((a.stored, a.removed), (4000, 2000));
        idx.check_invariants().unwrap();
    }

    #[test]
    fn bytes_per_block_at_capacity() {
        for cap in [100_000usize] {
            let mut idx = BlockIndex::new(cap);
            let mut rng = fastrand::Rng::with_seed(1);
            for round in 0..3 * cap / 1000 {
                let mut b = Batch::default();
                let hashes: Vec<u64> = (0..1000).map(|_| rng.u64(..)).collect();
                let tokens: Vec<u32> = (0..1000).map(|i| (round * 1000 + i) as u32).collect();
                stored(&mut b, &hashes, None, &tokens, 1, Medium::Gpu);
                idx.apply(&b);
            }
            assert_eq!(idx.len(), cap);
            let per = idx.heap_bytes() as f64 / cap as f64;
            assert!(per <= 64.0, "{cap}: {per} bytes per block");
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
        idx.check_invariants().unwrap();
        assert_eq!(idx.set_capacity(10), 990);
        assert_eq!(idx.len(), 10);
    }
}
