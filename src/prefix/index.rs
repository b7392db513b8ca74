//! The approximate prefix-cache index: which endpoint probably holds which
//! prompt blocks, learned from the picker's own routing decisions.
//!
//! Layout (chosen for memory: at most ~40 bytes per indexed block):
//! - every (block hash, endpoint) pair is one 24-byte [`Node`] in a single
//!   slab, addressed by `u32`;
//! - a map from block hash to its [`Holders`]: the first node of its *holder
//!   chain*, a singly linked list through the nodes of every endpoint holding
//!   that block, and a bit mask of the holders among slots 0 to 30 (bit 31:
//!   some higher slot holds it). The mask lives in what would otherwise be
//!   the map entry's padding, so it costs no memory;
//! - per endpoint slot, a doubly linked LRU list through its nodes, bounded by
//!   the endpoint's KV-cache size in blocks (what the server itself can keep).
//!
//! Block hashes are chained (each identifies its whole prefix, see
//! `hash.rs`), and recording touches a prompt's blocks from the last to the
//! first. So whenever an endpoint holds block `d + 1` of a query, it
//! recorded a prompt with the same first `d + 1` blocks, touched block `d`
//! later than block `d + 1`, and the LRU evicts block `d` after block
//! `d + 1`: what an endpoint holds along any query is a leading run, and the
//! holders of block `d + 1` are a subset of those of block `d`. Matching
//! relies on this and never walks the whole query:
//! - block 0 gives the endpoints that match at all, the last block those
//!   that match the whole query (the two lookups are issued together);
//! - the others' boundaries are found by bisection. One probe splits the
//!   endpoints still searched into those holding that block (boundary
//!   after it) and the rest (boundary before it), so a query costs two
//!   lookups plus about log2(blocks) per distinct boundary, instead of one
//!   per matched block. In a large index each lookup is a cache miss, so
//!   the number of lookups is what a match costs (benches/picker.rs, the
//!   `*_cold_1M_indexed` benches; figures in bench/results/perf.md).
//!
//! Endpoints in slots 0 to 30 (every pool of up to 31 endpoints) are split
//! with the masks alone: one map lookup and a few bit operations per probe,
//! no node visited. Higher slots are split by walking the probed block's
//! holder chain, once per probe that still has a high slot to place. A query
//! that breaks the chaining rule (or a 64-bit hash collision) gets a wrong
//! length, never a panic.
//!
//! Recording inserts a request's blocks for the chosen endpoint from the last
//! block to the first, so the leading blocks are the most recently used and
//! are evicted last, as the model server's own LRU does: losing block 0 would
//! make every later block useless for matching.
//!
//! Slots are reused by the endpoint store; each slot remembers the `uid` of
//! the endpoint it indexes. A lookup for another uid sees nothing, and the
//! first record for a new uid purges the slot, so a replacement pod never
//! inherits its predecessor's cache.

use std::cell::RefCell;

use parking_lot::RwLock;

use super::BlockKeyMap;
use crate::endpoints::EndpointSet;

const NIL: u32 = u32::MAX;

/// Slots below this also have a bit in [`Holders::mask`].
const MASK_SLOTS: u16 = 31;
/// The mask bit that stands for every slot from [`MASK_SLOTS`] up.
const HIGH_HOLDER: u32 = 1 << 31;

/// The mask bit of `slot`.
fn holder_bit(slot: u16) -> u32 {
    if slot < MASK_SLOTS {
        1 << slot
    } else {
        HIGH_HOLDER
    }
}

/// Who holds one block: the head of its holder chain, and the holders as
/// bits (see the module header).
#[derive(Debug, Clone, Copy)]
struct Holders {
    first: u32,
    mask: u32,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    lru_prev: u32,
    lru_next: u32,
    next_holder: u32,
    slot: u16,
}

#[derive(Debug, Clone, Copy)]
struct SlotLru {
    /// uid of the endpoint this slot indexes; 0 when unused.
    owner: u64,
    /// Most recently used.
    head: u32,
    tail: u32,
    len: u32,
    capacity: u32,
}

impl SlotLru {
    const EMPTY: Self = Self {
        owner: 0,
        head: NIL,
        tail: NIL,
        len: 0,
        capacity: 0,
    };
}

type HeadMap = BlockKeyMap<Holders>;

#[derive(Debug, Default)]
struct Inner {
    nodes: Vec<Node>,
    free_head: u32,
    free_len: usize,
    heads: HeadMap,
    slots: Vec<SlotLru>,
}

/// Thread-safe prefix index. Reads (matching) share a lock; recording takes
/// it exclusively for the few microseconds an insert needs. The lock is never
/// held across an await.
#[derive(Debug)]
pub struct PrefixIndex {
    inner: RwLock<Inner>,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    /// Per-thread scratch for matching, so a match allocates nothing once
    /// warmed up.
    static MATCH_SCRATCH: RefCell<MatchScratch> = const { RefCell::new(MatchScratch::new()) };
}

/// Reusable buffers of [`PrefixIndex::longest_matches`].
struct MatchScratch {
    /// Match length by slot for slots from [`MASK_SLOTS`] up; all zero
    /// between calls.
    high_len: Vec<u32>,
    /// Slots whose `high_len` was written, so resetting costs only what was
    /// used.
    touched: Vec<u16>,
    /// High slots still being searched, partitioned in place by the search.
    high: Vec<u16>,
    /// Per slot, the number of the last probe whose block it held.
    seen: Vec<u32>,
    probe: u32,
}

impl MatchScratch {
    const fn new() -> Self {
        Self {
            high_len: Vec::new(),
            touched: Vec::new(),
            high: Vec::new(),
            seen: Vec::new(),
            probe: 0,
        }
    }
}

/// One match in progress: the boundary search of the module header.
struct Search<'a> {
    inner: &'a Inner,
    hashes: &'a [u64],
    low_len: [u32; MASK_SLOTS as usize],
    high_len: &'a mut [u32],
    touched: &'a mut Vec<u16>,
    seen: &'a mut [u32],
    probe: &'a mut u32,
}

impl Search<'_> {
    fn holders(&self, block: usize) -> Option<Holders> {
        self.inner.heads.get(&self.hashes[block]).copied()
    }

    /// Which of the endpoints `low` (mask) and `high` (slots) hold the block
    /// whose holders are `held`: returns the low ones as a mask and moves the
    /// high ones to the front of `high`, returning how many there are.
    fn split(&mut self, held: Option<Holders>, low: u32, high: &mut [u16]) -> (u32, usize) {
        let Some(held) = held else {
            return (0, 0);
        };
        let low_held = low & held.mask;
        if high.is_empty() || held.mask & HIGH_HOLDER == 0 {
            return (low_held, 0);
        }
        *self.probe = self.probe.wrapping_add(1);
        if *self.probe == 0 {
            self.seen.fill(0);
            *self.probe = 1;
        }
        for (_, node) in self.inner.holder_chain(held.first) {
            if node.slot >= MASK_SLOTS
                && let Some(seen) = self.seen.get_mut(usize::from(node.slot))
            {
                *seen = *self.probe;
            }
        }
        let mut front = 0;
        for i in 0..high.len() {
            if self.seen.get(usize::from(high[i])) == Some(&*self.probe) {
                high.swap(front, i);
                front += 1;
            }
        }
        (low_held, front)
    }

    /// Gives every endpoint of `low` and `high` a match of `len` blocks.
    fn settle(&mut self, len: u32, mut low: u32, high: &[u16]) {
        while low != 0 {
            self.low_len[low.trailing_zeros() as usize] = len;
            low &= low - 1;
        }
        for &slot in high {
            if let Some(l) = self.high_len.get_mut(usize::from(slot)) {
                *l = len;
                self.touched.push(slot);
            }
        }
    }

    /// Finds the match length of every endpoint in `low` and `high`, given
    /// that each of them holds block `lo` and none holds block `hi` (`hi`
    /// may be one past the last block): bisection, one probe per step,
    /// shared by every endpoint whose boundary lies on the same side.
    fn bisect(&mut self, lo: usize, hi: usize, low: u32, high: &mut [u16]) {
        if low == 0 && high.is_empty() {
            return;
        }
        if hi - lo <= 1 {
            self.settle(u32::try_from(hi).unwrap_or(u32::MAX), low, high);
            return;
        }
        let mid = lo + (hi - lo) / 2;
        let held = self.holders(mid);
        let (low_held, n) = self.split(held, low, high);
        let (high_held, high_not) = high.split_at_mut(n);
        self.bisect(mid, hi, low_held, high_held);
        self.bisect(lo, mid, low & !low_held, high_not);
    }
}

impl PrefixIndex {
    pub fn new() -> Self {
        Self {
            inner: RwLock::new(Inner {
                free_head: NIL,
                ..Inner::default()
            }),
        }
    }

    /// For each candidate `(slot, uid)`, writes to `out` (same order) how many
    /// leading blocks of `hashes` that endpoint holds.
    ///
    /// `hashes` must be chained, as everything recorded must be (see the
    /// module header); otherwise a result is some length up to
    /// `hashes.len()`, never a panic.
    pub fn longest_matches(&self, hashes: &[u64], candidates: &[(u16, u64)], out: &mut Vec<u32>) {
        out.clear();
        out.resize(candidates.len(), 0);
        let Some(last) = hashes.len().checked_sub(1) else {
            return;
        };
        if candidates.is_empty() {
            return;
        }
        let inner = self.inner.read();
        MATCH_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let MatchScratch {
                high_len,
                touched,
                high,
                seen,
                probe,
            } = &mut *scratch;
            if high_len.len() < inner.slots.len() {
                high_len.resize(inner.slots.len(), 0);
                seen.resize(inner.slots.len(), 0);
            }
            touched.clear();
            high.clear();
            let mut search = Search {
                inner: &inner,
                hashes,
                low_len: [0; MASK_SLOTS as usize],
                high_len,
                touched,
                seen,
                probe,
            };
            // The first and last blocks are looked up together so that
            // their cache misses overlap; a prompt held whole by its
            // holders needs no other probe.
            let first = search.holders(0);
            let end = search.holders(last);
            if let Some(first) = first {
                if first.mask & HIGH_HOLDER != 0 {
                    high.extend(
                        inner
                            .holder_chain(first.first)
                            .map(|(_, node)| node.slot)
                            .filter(|&slot| slot >= MASK_SLOTS),
                    );
                }
                let low = first.mask & !HIGH_HOLDER;
                let (low_whole, k) = if last == 0 {
                    (low, high.len())
                } else {
                    search.split(end, low, high)
                };
                let (high_whole, high_part) = high.split_at_mut(k);
                search.settle(
                    u32::try_from(hashes.len()).unwrap_or(u32::MAX),
                    low_whole,
                    high_whole,
                );
                search.bisect(0, last, low & !low_whole, high_part);
            }
            let low_len = search.low_len;
            for (o, &(slot, uid)) in out.iter_mut().zip(candidates) {
                let s = usize::from(slot);
                if inner.slots.get(s).is_some_and(|l| l.owner == uid) {
                    *o = if slot < MASK_SLOTS {
                        low_len[s]
                    } else {
                        high_len.get(s).copied().unwrap_or(0)
                    };
                }
            }
            for &slot in touched.iter() {
                high_len[usize::from(slot)] = 0;
            }
        });
    }

    /// Records that the endpoint `(slot, uid)` now holds `hashes`, keeping at
    /// most `capacity` blocks for it.
    pub fn record(&self, slot: u16, uid: u64, capacity: u32, hashes: &[u64]) {
        if hashes.is_empty() || capacity == 0 {
            return;
        }
        let mut inner = self.inner.write();
        inner.claim(slot, uid);
        let s = usize::from(slot);
        inner.slots[s].capacity = capacity;
        // A held block is found without a map lookup when it sits just
        // before the previous block in the LRU, as the blocks of a prompt
        // recorded before do (they are touched together, last to first).
        // Map lookups are cache misses that each wait for the one before, so
        // going through the map would cost a miss per held block
        // (benches/picker.rs, record_256_held_blocks_cold_1M_indexed;
        // figures in bench/results/perf.md).
        let mut hint = NIL;
        for &hash in hashes.iter().rev() {
            match inner
                .node_at(hint, hash, slot)
                .or_else(|| inner.find(hash, slot))
            {
                Some(n) => {
                    hint = inner.nodes[n as usize].lru_prev;
                    inner.touch(slot, n);
                }
                None => {
                    inner.insert(hash, slot);
                    hint = NIL;
                }
            }
        }
        while inner.slots[s].len > capacity {
            let tail = inner.slots[s].tail;
            inner.remove(tail);
        }
    }

    /// Drops every slot whose endpoint is no longer in `live`.
    pub fn retain_live(&self, live: &EndpointSet) {
        let mut keep = vec![0u64; self.inner.read().slots.len()];
        for e in live.endpoints() {
            if let Some(k) = keep.get_mut(usize::from(e.slot)) {
                *k = e.uid;
            }
        }
        let mut inner = self.inner.write();
        for slot in 0..inner.slots.len() {
            let owner = inner.slots[slot].owner;
            if owner != 0 && keep.get(slot).copied() != Some(owner) {
                inner.purge(slot);
            }
        }
    }

    /// Blocks held for one endpoint (0 if the slot belongs to someone else).
    pub fn blocks_for(&self, slot: u16, uid: u64) -> u64 {
        let inner = self.inner.read();
        inner
            .slots
            .get(usize::from(slot))
            .filter(|l| l.owner == uid)
            .map_or(0, |l| u64::from(l.len))
    }

    /// Total (block, endpoint) pairs indexed.
    pub fn len(&self) -> usize {
        let inner = self.inner.read();
        inner.nodes.len() - inner.free_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory the index holds, for the size metric and the memory
    /// benchmark (slab + hash map buckets + slot table).
    pub fn memory_bytes(&self) -> usize {
        let inner = self.inner.read();
        let map_bucket = std::mem::size_of::<(u64, Holders)>() + 1;
        inner.nodes.capacity() * std::mem::size_of::<Node>()
            + inner.heads.capacity() * map_bucket
            + inner.slots.capacity() * std::mem::size_of::<SlotLru>()
    }
}

impl Inner {
    fn claim(&mut self, slot: u16, uid: u64) {
        let s = usize::from(slot);
        if self.slots.len() <= s {
            self.slots.resize(s + 1, SlotLru::EMPTY);
        }
        if self.slots[s].owner != uid {
            self.purge(s);
            self.slots[s].owner = uid;
        }
    }

    fn purge(&mut self, s: usize) {
        let mut n = self.slots[s].head;
        while n != NIL {
            let next = self.nodes[n as usize].lru_next;
            self.unlink_holder(n);
            self.free(n);
            n = next;
        }
        self.slots[s] = SlotLru::EMPTY;
    }

    /// `n` if it is the node of `(hash, slot)`. `n` must be NIL or a live
    /// node: the check is what makes a guessed node safe to use.
    fn node_at(&self, n: u32, hash: u64, slot: u16) -> Option<u32> {
        let node = self.nodes.get(n as usize)?;
        (node.hash == hash && node.slot == slot).then_some(n)
    }

    fn find(&self, hash: u64, slot: u16) -> Option<u32> {
        let h = self.heads.get(&hash)?;
        if h.mask & holder_bit(slot) == 0 {
            return None;
        }
        self.holder_chain(h.first)
            .find(|(_, node)| node.slot == slot)
            .map(|(n, _)| n)
    }

    /// Every holder's node of one block, from the first node of its chain,
    /// with the node's address.
    fn holder_chain(&self, first: u32) -> impl Iterator<Item = (u32, &Node)> + '_ {
        let mut n = first;
        std::iter::from_fn(move || {
            let node = self.nodes.get(n as usize)?;
            let at = n;
            n = node.next_holder;
            Some((at, node))
        })
    }

    fn alloc(&mut self, node: Node) -> u32 {
        if self.free_head != NIL {
            let n = self.free_head;
            self.free_head = self.nodes[n as usize].lru_next;
            self.free_len -= 1;
            self.nodes[n as usize] = node;
            return n;
        }
        let n = u32::try_from(self.nodes.len()).unwrap_or(NIL);
        self.nodes.push(node);
        n
    }

    fn free(&mut self, n: u32) {
        self.nodes[n as usize].lru_next = self.free_head;
        self.free_head = n;
        self.free_len += 1;
    }

    fn insert(&mut self, hash: u64, slot: u16) {
        if self.nodes.len() - self.free_len >= (NIL - 1) as usize {
            return; // u32 address space exhausted; cannot happen with sane capacities
        }
        let held = self.heads.get(&hash).copied().unwrap_or(Holders {
            first: NIL,
            mask: 0,
        });
        let n = self.alloc(Node {
            hash,
            lru_prev: NIL,
            lru_next: NIL,
            next_holder: held.first,
            slot,
        });
        self.heads.insert(
            hash,
            Holders {
                first: n,
                mask: held.mask | holder_bit(slot),
            },
        );
        self.link_front(slot, n);
    }

    /// Moves a node to the front of its slot's LRU.
    fn touch(&mut self, slot: u16, n: u32) {
        let s = usize::from(slot);
        if self.slots[s].head == n {
            return;
        }
        self.unlink_lru(n);
        self.link_front(slot, n);
    }

    /// Puts an unlinked node at the front (most recent end) of its slot's LRU.
    fn link_front(&mut self, slot: u16, n: u32) {
        let s = usize::from(slot);
        let old_head = self.slots[s].head;
        let node = &mut self.nodes[n as usize];
        node.lru_prev = NIL;
        node.lru_next = old_head;
        if old_head != NIL {
            self.nodes[old_head as usize].lru_prev = n;
        } else {
            self.slots[s].tail = n;
        }
        self.slots[s].head = n;
        self.slots[s].len += 1;
    }

    fn unlink_lru(&mut self, n: u32) {
        let Node {
            lru_prev,
            lru_next,
            slot,
            ..
        } = self.nodes[n as usize];
        let s = usize::from(slot);
        if lru_prev != NIL {
            self.nodes[lru_prev as usize].lru_next = lru_next;
        } else {
            self.slots[s].head = lru_next;
        }
        if lru_next != NIL {
            self.nodes[lru_next as usize].lru_prev = lru_prev;
        } else {
            self.slots[s].tail = lru_prev;
        }
        self.slots[s].len -= 1;
    }

    fn unlink_holder(&mut self, n: u32) {
        let Node {
            hash,
            next_holder,
            slot,
            ..
        } = self.nodes[n as usize];
        let Some(&held) = self.heads.get(&hash) else {
            return;
        };
        let first = if held.first == n {
            next_holder
        } else {
            let mut prev = held.first;
            while prev != NIL {
                let next = self.nodes[prev as usize].next_holder;
                if next == n {
                    self.nodes[prev as usize].next_holder = next_holder;
                    break;
                }
                prev = next;
            }
            held.first
        };
        if first == NIL {
            self.heads.remove(&hash);
            return;
        }
        let mut mask = held.mask & !holder_bit(slot);
        if slot >= MASK_SLOTS {
            // The high bit stands for every high slot: keep it while another
            // one still holds the block.
            if self
                .holder_chain(first)
                .any(|(_, node)| node.slot >= MASK_SLOTS)
            {
                mask |= HIGH_HOLDER;
            }
        }
        self.heads.insert(hash, Holders { first, mask });
    }

    /// Evicts one node entirely.
    fn remove(&mut self, n: u32) {
        if n == NIL {
            return;
        }
        self.unlink_lru(n);
        self.unlink_holder(n);
        self.free(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(idx: &PrefixIndex, hashes: &[u64], cands: &[(u16, u64)]) -> Vec<u32> {
        let mut out = Vec::new();
        idx.longest_matches(hashes, cands, &mut out);
        out
    }

    /// The definition, one endpoint at a time, walking holder chains only:
    /// the leading blocks of `hashes` the endpoint holds.
    fn reference(idx: &PrefixIndex, hashes: &[u64], cands: &[(u16, u64)]) -> Vec<u32> {
        let inner = idx.inner.read();
        let holds = |hash: u64, slot: u16| {
            let first = inner.heads.get(&hash).map_or(NIL, |h| h.first);
            inner.holder_chain(first).any(|(_, node)| node.slot == slot)
        };
        cands
            .iter()
            .map(|&(slot, uid)| {
                if inner
                    .slots
                    .get(usize::from(slot))
                    .is_none_or(|l| l.owner != uid)
                {
                    return 0;
                }
                hashes.iter().take_while(|&&h| holds(h, slot)).count() as u32
            })
            .collect()
    }

    /// Chained hashes of a prompt made of `tokens`, as `hash.rs` makes them:
    /// each hash depends on every token before it.
    fn chained(tokens: &[u64]) -> Vec<u64> {
        let mut h = 0x5eed_u64;
        tokens
            .iter()
            .map(|&t| {
                h = (h ^ t).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29) ^ 0xa5a5;
                h
            })
            .collect()
    }

    /// Masks, chains and the bisection together give exactly the per-endpoint
    /// definition, for low and high slots, through evictions, slot reuse and
    /// prompts that share a leading run of blocks and then diverge.
    #[test]
    fn matching_agrees_with_the_definition_under_random_churn() {
        let mut rng = fastrand::Rng::with_seed(0x9e37_79b9);
        // Prompts of one template share tokens up to a random point, then
        // differ, as requests with a common system prompt do.
        let prompt = |rng: &mut fastrand::Rng, max_len: usize| {
            let template = rng.u64(0..6);
            let len = rng.usize(1..=max_len);
            let shared = rng.usize(0..=len);
            let tokens: Vec<u64> = (0..len)
                .map(|i| if i < shared { template } else { rng.u64(0..3) })
                .collect();
            chained(&tokens)
        };
        let idx = PrefixIndex::new();
        let mut uids = [1u64; 40];
        for round in 0..6000 {
            let slot = rng.u16(0..40);
            if rng.u32(0..100) == 0 {
                uids[usize::from(slot)] += 1; // a new pod in that slot
            }
            let hashes = prompt(&mut rng, 40);
            idx.record(slot, uids[usize::from(slot)], rng.u32(30..90), &hashes);
            if round % 5 == 0 {
                let query = prompt(&mut rng, 50);
                let cands: Vec<(u16, u64)> = (0..40u16)
                    .map(|s| (s, uids[usize::from(s)] + u64::from(rng.u32(0..20) == 0)))
                    .collect();
                assert_eq!(
                    matches(&idx, &query, &cands),
                    reference(&idx, &query, &cands),
                    "round {round}"
                );
            }
        }
        assert!(!idx.is_empty());
    }

    #[test]
    fn longest_leading_run_per_endpoint() {
        let idx = PrefixIndex::new();
        idx.record(0, 10, 100, &[1, 2, 3]);
        idx.record(1, 11, 100, &[1, 2]);
        idx.record(2, 12, 100, &[9, 10]); // another prompt: matches nothing
        let m = matches(&idx, &[1, 2, 3, 4], &[(0, 10), (1, 11), (2, 12), (3, 13)]);
        assert_eq!(m, vec![3, 2, 0, 0]);
        assert_eq!(matches(&idx, &[1], &[(0, 10), (2, 12)]), vec![1, 0]);
        assert_eq!(matches(&idx, &[1, 2, 3], &[(0, 10), (1, 11)]), vec![3, 2]);
    }

    /// Every boundary from 1 to the whole query, for low and high slots at
    /// once: each slot holds a different leading run of one prompt.
    #[test]
    fn every_boundary_is_found() {
        let idx = PrefixIndex::new();
        let hashes = chained(&[7; 64]);
        let slots: Vec<u16> = (0..40).collect();
        for &slot in &slots {
            let held = 1 + usize::from(slot) * 63 / 39;
            idx.record(slot, 100 + u64::from(slot), 1000, &hashes[..held]);
        }
        let cands: Vec<(u16, u64)> = slots.iter().map(|&s| (s, 100 + u64::from(s))).collect();
        let want: Vec<u32> = slots.iter().map(|&s| 1 + u32::from(s) * 63 / 39).collect();
        assert_eq!(matches(&idx, &hashes, &cands), want);
        assert_eq!(reference(&idx, &hashes, &cands), want);
    }

    #[test]
    fn uid_mismatch_sees_nothing_and_record_purges() {
        let idx = PrefixIndex::new();
        idx.record(0, 10, 100, &[1, 2]);
        assert_eq!(matches(&idx, &[1, 2], &[(0, 99)]), vec![0]);
        idx.record(0, 99, 100, &[5]);
        assert_eq!(matches(&idx, &[1, 2], &[(0, 99)]), vec![0]);
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.blocks_for(0, 10), 0);
        assert_eq!(idx.blocks_for(0, 99), 1);
    }

    #[test]
    fn capacity_evicts_deepest_blocks_first() {
        let idx = PrefixIndex::new();
        idx.record(0, 10, 3, &[1, 2, 3, 4, 5]);
        assert_eq!(idx.blocks_for(0, 10), 3);
        assert_eq!(matches(&idx, &[1, 2, 3, 4, 5], &[(0, 10)]), vec![3]);
    }

    #[test]
    fn lru_evicts_least_recently_recorded() {
        let idx = PrefixIndex::new();
        idx.record(0, 10, 4, &[1, 2]); // prompt A
        idx.record(0, 10, 4, &[7, 8]); // prompt B
        idx.record(0, 10, 4, &[1, 2]); // A used again
        idx.record(0, 10, 4, &[5, 6]); // C evicts B, not A
        assert_eq!(matches(&idx, &[1, 2], &[(0, 10)]), vec![2]);
        assert_eq!(matches(&idx, &[7, 8], &[(0, 10)]), vec![0]);
        assert_eq!(matches(&idx, &[5, 6], &[(0, 10)]), vec![2]);
        assert_eq!(idx.len(), 4);
    }

    #[test]
    fn shared_blocks_have_independent_holders() {
        let idx = PrefixIndex::new();
        idx.record(0, 10, 2, &[1, 2]);
        idx.record(1, 11, 2, &[1, 2]);
        idx.record(0, 10, 2, &[3, 4]); // slot 0 forgets 1,2; slot 1 keeps them
        assert_eq!(matches(&idx, &[1, 2], &[(0, 10), (1, 11)]), vec![0, 2]);
        assert_eq!(idx.len(), 4);
    }

    #[test]
    fn freed_nodes_are_reused() {
        let idx = PrefixIndex::new();
        for round in 0..50u64 {
            idx.record(0, 10, 8, &[round * 10 + 1, round * 10 + 2]);
        }
        assert_eq!(idx.len(), 8);
        assert!(idx.inner.read().nodes.len() <= 10);
    }

    #[test]
    fn retain_live_purges_departed_endpoints() {
        use crate::endpoints::{EndpointStore, testing::spec};
        let store = EndpointStore::new(std::time::Duration::from_secs(1));
        store.replace(vec![spec(1), spec(2)]).unwrap();
        let snap = store.snapshot();
        let idx = PrefixIndex::new();
        for e in snap.endpoints() {
            idx.record(e.slot, e.uid, 10, &[1, 2]);
        }
        store.replace(vec![spec(1)]).unwrap();
        idx.retain_live(&store.snapshot());
        assert_eq!(idx.len(), 2);
        let snap = store.snapshot();
        let kept = &snap.endpoints()[0];
        assert_eq!(idx.blocks_for(kept.slot, kept.uid), 2);
    }

    #[test]
    fn randomized_against_a_model() {
        // Compare with a naive model: per slot an ordered list (front = MRU).
        let idx = PrefixIndex::new();
        let mut model: Vec<Vec<u64>> = vec![Vec::new(); 4];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let slot = rng.u16(0..4);
            // Prefixes of three chains (hash 10c + i is block i of chain c),
            // so the hashes are chained as the index requires.
            let chain = rng.u64(0..3);
            let hashes: Vec<u64> = (0..rng.u64(1..6)).map(|i| chain * 10 + i).collect();
            idx.record(slot, 100 + u64::from(slot), 8, &hashes);
            let lru = &mut model[usize::from(slot)];
            for h in hashes.iter().rev() {
                lru.retain(|x| x != h);
                lru.insert(0, *h);
            }
            lru.truncate(8);
            let chain = rng.u64(0..3);
            let q: Vec<u64> = (0..rng.u64(1..9)).map(|i| chain * 10 + i).collect();
            let cands: Vec<(u16, u64)> = (0..4).map(|s| (s, 100 + u64::from(s))).collect();
            let got = matches(&idx, &q, &cands);
            for s in 0..4 {
                let want = q.iter().take_while(|h| model[s].contains(h)).count() as u32;
                assert_eq!(got[s], want, "slot {s} query {q:?} model {:?}", model[s]);
            }
        }
        assert_eq!(idx.len(), model.iter().map(Vec::len).sum::<usize>());
    }
}
