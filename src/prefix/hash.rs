//! Prompt block hashing.
//!
//! The prompt byte stream is cut into fixed blocks of `block_bytes` (block
//! size in tokens x 4 bytes per token, the approximation GIE uses instead of
//! tokenising). Block `i` is hashed with the hash of block `i-1` as the xxh3
//! seed, so a block hash identifies the whole prefix up to and including that
//! block, just as the model server's own chained block hashes do. The chain
//! starts from a seed made of the model name and the `cache_salt`, so two
//! models (or two tenants that salt their requests) never share entries.
//! A trailing partial block is not hashed: the server caches full blocks only.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::request::Prompt;

/// The start of a hash chain for a model and optional cache salt.
pub fn chain_seed(model: &str, cache_salt: Option<&str>) -> u64 {
    let model_hash = xxh3_64(model.as_bytes());
    match cache_salt {
        Some(salt) if !salt.is_empty() => xxh3_64_with_seed(salt.as_bytes(), model_hash),
        _ => model_hash,
    }
}

/// Reusable hasher: keeps its carry buffer between calls so hashing a prompt
/// allocates nothing once warmed up.
#[derive(Debug, Default)]
pub struct BlockHasher {
    carry: Vec<u8>,
}

impl BlockHasher {
    /// Appends to `out` the chained hashes of the first `max_blocks` full
    /// blocks of `prompt`. `out` is cleared first.
    pub fn hash_prompt(
        &mut self,
        prompt: &Prompt<'_>,
        seed: u64,
        block_bytes: usize,
        max_blocks: usize,
        out: &mut Vec<u64>,
    ) {
        out.clear();
        self.carry.clear();
        if block_bytes == 0 || max_blocks == 0 {
            return;
        }
        let mut prev = seed;
        for mut piece in prompt.pieces() {
            while !piece.is_empty() {
                if out.len() >= max_blocks {
                    return;
                }
                if self.carry.is_empty() && piece.len() >= block_bytes {
                    // Fast path: hash straight from the body, no copy.
                    let (block, rest) = piece.split_at(block_bytes);
                    prev = xxh3_64_with_seed(block, prev);
                    out.push(prev);
                    piece = rest;
                    continue;
                }
                let take = (block_bytes - self.carry.len()).min(piece.len());
                self.carry.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                if self.carry.len() == block_bytes {
                    prev = xxh3_64_with_seed(&self.carry, prev);
                    out.push(prev);
                    self.carry.clear();
                }
            }
        }
    }
}

/// Block hashes are already uniformly distributed; hashing them again is
/// wasted work.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by block hashes (ours or an engine's), which need no
/// rehashing.
pub type BlockKeyMap<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt_of(pieces: &[&'static str]) -> Prompt<'static> {
        let mut p = Prompt::default();
        for piece in pieces {
            p.push(*piece);
        }
        p
    }

    fn hashes(p: &Prompt<'_>, block: usize, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        BlockHasher::default().hash_prompt(p, chain_seed("m", None), block, max, &mut out);
        out
    }

    #[test]
    fn only_full_blocks_are_hashed() {
        assert!(hashes(&prompt_of(&["abc"]), 4, 10).is_empty());
        assert_eq!(hashes(&prompt_of(&["abcd"]), 4, 10).len(), 1);
        assert_eq!(hashes(&prompt_of(&["abcdefghi"]), 4, 10).len(), 2);
    }

    #[test]
    fn piece_boundaries_do_not_change_hashes() {
        let whole = hashes(&prompt_of(&["abcdefghijkl"]), 4, 10);
        let split = hashes(&prompt_of(&["ab", "cdefg", "h", "ijkl"]), 4, 10);
        assert_eq!(whole, split);
        assert_eq!(whole.len(), 3);
    }

    #[test]
    fn hashes_identify_the_whole_prefix() {
        let a = hashes(&prompt_of(&["aaaabbbbcccc"]), 4, 10);
        let b = hashes(&prompt_of(&["aaaaXbbbcccc"]), 4, 10);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_ne!(a[2], b[2], "a change propagates down the chain");
        let c = hashes(&prompt_of(&["ccccbbbbcccc"]), 4, 10);
        assert_ne!(
            a[2], c[2],
            "same block content after a different prefix differs"
        );
    }

    #[test]
    fn max_blocks_caps_the_work() {
        assert_eq!(hashes(&prompt_of(&["a".repeat(100).leak()]), 4, 7).len(), 7);
    }

    #[test]
    fn model_and_salt_separate_chains() {
        assert_ne!(chain_seed("a", None), chain_seed("b", None));
        assert_ne!(chain_seed("a", None), chain_seed("a", Some("tenant")));
        assert_eq!(chain_seed("a", Some("")), chain_seed("a", None));
    }

    #[test]
    fn hasher_is_reusable() {
        let mut h = BlockHasher::default();
        let mut out = Vec::new();
        let p = prompt_of(&["abcdef"]);
        h.hash_prompt(&p, 1, 4, 10, &mut out);
        let first = out.clone();
        h.hash_prompt(&p, 1, 4, 10, &mut out);
        assert_eq!(
            first, out,
            "a leftover carry must not leak into the next prompt"
        );
    }
}
