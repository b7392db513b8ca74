//! A fast encoder for byte-level BPE tokenizers of the GPT-2 family
//! (Qwen2/Qwen3, Llama-3), used for the text between added tokens instead
//! of the `tokenizers` library when the model's `tokenizer.json` has exactly
//! the shape it reproduces ([`FastBpe::from_json`] says why not otherwise):
//! normalizer NFC or none; pre-tokenizer `Sequence[Split(pattern, Isolated),
//! ByteLevel(add_prefix_space: false, use_regex: false)]` with one of the
//! split patterns `pretok` implements; a BPE model without dropout, unknown
//! token, byte fallback, subword prefix or suffix, whose vocabulary holds
//! the 256 byte characters.
//!
//! Encoding a text: NFC (skipped when the quick check says the text is NFC
//! already, always so for ASCII; the library's own normalization tables),
//! split into pieces (`pretok`), each piece's bytes encoded by BPE, the
//! library's algorithm: start from one symbol per byte, repeatedly merge the
//! adjacent pair of lowest merge rank, leftmost first, until no pair has a
//! merge. With `ignore_merges` a piece that is a vocabulary entry is that
//! entry. Three shortcuts keep repeated pieces cheap without locks where
//! possible, each exact:
//! - a piece that is a vocabulary entry usually encodes to that entry; per
//!   entry an atomic memo records whether it does (computed the first time
//!   it is seen), so the common word is one hash lookup;
//! - other pieces go through a bounded, sharded word cache (piece bytes ->
//!   ids), a shard cleared whole when over its budget;
//! - pieces longer than [`MAX_MERGE_LEN`] bytes (long runs of one class)
//!   are handed to the library's BPE model, whose heap-based merge loop is
//!   O(n log n) where the loop here is quadratic.
//!
//! Invariant: for every text without added tokens, [`FastBpe::encode`]
//! appends exactly the ids the library's `encode(text, false)` returns;
//! load checks it on probe texts (model.rs) and the tests on generated
//! text.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::atomic::{AtomicU8, Ordering},
};

use hashbrown::HashTable;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::Value;
use tokenizers::{Model, Tokenizer};
use unicode_normalization_alignments::{IsNormalized, UnicodeNormalization, is_nfc_quick};
use xxhash_rust::xxh3::xxh3_64;

use super::{
    TokenizeError,
    pretok::{Classes, Splitter},
};

/// Pieces longer than this go to the library's merge loop.
const MAX_MERGE_LEN: usize = 256;
const WORD_SHARDS: usize = 16;
/// Bytes of piece and ids per word-cache shard before it is cleared.
const WORD_SHARD_BUDGET: usize = 256 << 10;
/// Per cached word beyond its bytes and ids (table slot, two boxes).
const WORD_OVERHEAD: usize = 48;

/// The Qwen2/Qwen3 split pattern (digits one at a time).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Llama-3 split pattern (digits in runs of up to three).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Memo states of a vocabulary entry's "encodes to itself".
const MEMO_UNKNOWN: u8 = 0;
const MEMO_SELF: u8 = 1;
const MEMO_OTHER: u8 = 2;

#[derive(Debug)]
pub(crate) struct FastBpe {
    splitter: Splitter,
    nfc: bool,
    ignore_merges: bool,
    /// The vocabulary id of each byte's byte-level character.
    byte_ids: [u32; 256],
    /// The byte-level character of each byte (for the library fallback).
    byte_chars: [char; 256],
    /// Raw bytes of every vocabulary entry, `spans[id]` into `bytes`.
    bytes: Vec<u8>,
    spans: Vec<(u32, u32)>,
    /// Vocabulary ids by the hash of their raw bytes.
    vocab: HashTable<u32>,
    /// `(left, right, rank, merged)` by the hash of `(left, right)`.
    merges: HashTable<(u32, u32, u32, u32)>,
    memo: Box<[AtomicU8]>,
    words: Box<[Mutex<WordShard>]>,
}

/// A word's bytes and its token ids.
type WordEntry = (Box<[u8]>, Box<[u32]>);

#[derive(Debug, Default)]
struct WordShard {
    table: HashTable<WordEntry>,
    bytes: usize,
}

/// Per-thread buffers, reused across calls.
#[derive(Debug, Default)]
struct Scratch {
    normalized: String,
    merge: MergeScratch,
}

/// The buffers one piece's merges work in.
#[derive(Debug, Default)]
struct MergeScratch {
    symbols: Vec<u32>,
    /// `(rank, merged id)` of each adjacent symbol pair; `u32::MAX` rank:
    /// no merge.
    pairs: Vec<(u32, u32)>,
    /// A piece too long to merge here, in the library's byte-level
    /// characters.
    mapped: String,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    normalizer: Value,
    #[serde(default)]
    pre_tokenizer: Value,
    model: ModelJson,
}

#[derive(Deserialize)]
struct ModelJson {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    unk_token: Option<String>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    ignore_merges: bool,
    vocab: HashMap<String, u32>,
    merges: Vec<MergeJson>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Pair(String, String),
    Line(String),
}

fn hash_pair(left: u32, right: u32) -> u64 {
    let x = (u64::from(left) << 32) | u64::from(right);
    // A multiply-xorshift mix: hashbrown uses the top bits for its control
    // bytes and the low bits for the bucket, both must vary.
    let h = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
}

/// GPT-2's byte-to-character table: printable Latin-1 bytes map to
/// themselves, the others to U+0100 onwards in byte order.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[usize::from(b)] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    out
}

impl FastBpe {
    /// The encoder for `json` (a tokenizer.json's bytes), or why this
    /// tokenizer's shape is not one it reproduces exactly.
    pub(crate) fn from_json(json: &[u8]) -> Result<Self, String> {
        let file: File = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let nfc = match &file.normalizer {
            Value::Null => false,
            v if v.get("type").and_then(Value::as_str) == Some("NFC") => true,
            v => return Err(format!("normalizer {}", brief(v))),
        };
        let max_digits = split_pattern(&file.pre_tokenizer)?;
        let m = &file.model;
        if m.kind.as_deref().is_some_and(|k| k != "BPE") {
            return Err(format!("model type {:?}", m.kind));
        }
        if m.dropout.is_some_and(|d| d != 0.0) {
            return Err("BPE dropout".into());
        }
        if m.unk_token.is_some() || m.byte_fallback {
            return Err("BPE with an unknown token or byte fallback".into());
        }
        if m.continuing_subword_prefix
            .as_deref()
            .is_some_and(|p| !p.is_empty())
            || m.end_of_word_suffix
                .as_deref()
                .is_some_and(|s| !s.is_empty())
        {
            return Err("BPE with a subword prefix or suffix".into());
        }
        let classes = Classes::get().ok_or("no Unicode class tables")?;
        let chars = byte_chars();
        let mut char_to_byte: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, c) in (0..=255u8).zip(chars) {
            char_to_byte.insert(c, b);
        }
        let mut byte_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = *m
                .vocab
                .get(c.encode_utf8(&mut [0; 4]) as &str)
                .ok_or_else(|| format!("byte {b:#04x} has no vocabulary entry"))?;
        }
        let max_id = m.vocab.values().copied().max().unwrap_or(0);
        let len = usize::try_from(max_id).map_err(|e| e.to_string())? + 1;
        let mut spans = vec![(0u32, u32::MAX); len];
        let mut bytes = Vec::new();
        let mut ids = Vec::with_capacity(m.vocab.len());
        'entries: for (token, &id) in &m.vocab {
            let start = bytes.len();
            for c in token.chars() {
                match char_to_byte.get(&c) {
                    Some(&b) => bytes.push(b),
                    None => {
                        // Not a byte-level string: no piece can reach it.
                        bytes.truncate(start);
                        continue 'entries;
                    }
                }
            }
            let span = &mut spans[id as usize];
            if span.1 != u32::MAX {
                return Err(format!("vocabulary id {id} appears twice"));
            }
            let to_u32 = |n: usize| u32::try_from(n).map_err(|e| e.to_string());
            *span = (to_u32(start)?, to_u32(bytes.len() - start)?);
            ids.push(id);
        }
        let entry = |id: u32| {
            let (s, l) = spans[id as usize];
            &bytes[s as usize..(s + l) as usize]
        };
        let mut vocab = HashTable::with_capacity(ids.len());
        for id in ids {
            vocab.insert_unique(xxh3_64(entry(id)), id, |&i: &u32| xxh3_64(entry(i)));
        }
        let mut merges: HashTable<(u32, u32, u32, u32)> = HashTable::with_capacity(m.merges.len());
        for (rank, merge) in m.merges.iter().enumerate() {
            let (a, b) = match merge {
                MergeJson::Pair(a, b) => (a.as_str(), b.as_str()),
                MergeJson::Line(line) => {
                    let mut parts = line.split(' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(a), Some(b), None) => (a, b),
                        _ => return Err(format!("merge {} is not two tokens", rank + 1)),
                    }
                }
            };
            let id = |t: &str| {
                m.vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| format!("merge token {t:?} is not in the vocabulary"))
            };
            let (left, right, merged) = (id(a)?, id(b)?, id(&format!("{a}{b}"))?);
            let rank = u32::try_from(rank).map_err(|e| e.to_string())?;
            let h = hash_pair(left, right);
            // A repeated pair: the later rank wins, as in the library.
            match merges.find_mut(h, |e| e.0 == left && e.1 == right) {
                Some(e) => *e = (left, right, rank, merged),
                None => {
                    merges.insert_unique(h, (left, right, rank, merged), |e| hash_pair(e.0, e.1));
                }
            }
        }
        Ok(Self {
            splitter: Splitter::new(classes, max_digits),
            nfc,
            ignore_merges: m.ignore_merges,
            byte_ids,
            byte_chars: chars,
            bytes,
            spans,
            vocab,
            merges,
            memo: (0..len).map(|_| AtomicU8::new(MEMO_UNKNOWN)).collect(),
            words: (0..WORD_SHARDS)
                .map(|_| Mutex::new(WordShard::default()))
                .collect(),
        })
    }

    /// Appends the ids of `text` (which holds no added token). `library`
    /// encodes pieces too long for the merge loop here.
    pub(crate) fn encode(
        &self,
        text: &str,
        library: &Tokenizer,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => self.encode_with(text, library, &mut scratch, out),
            // Re-entered on this thread (it is not): fresh buffers.
            Err(_) => self.encode_with(text, library, &mut Scratch::default(), out),
        })
    }

    fn encode_with(
        &self,
        text: &str,
        library: &Tokenizer,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        let Scratch { normalized, merge } = scratch;
        let text =
            if self.nfc && !text.is_ascii() && is_nfc_quick(text.chars()) != IsNormalized::Yes {
                normalized.clear();
                normalized.extend(text.nfc().map(|(c, _)| c));
                normalized.as_str()
            } else {
                text
            };
        let mut result = Ok(());
        self.splitter.for_each_piece(text, |piece| {
            if result.is_ok() {
                result = self.encode_piece(piece.as_bytes(), library, merge, out);
            }
        });
        result
    }

    fn encode_piece(
        &self,
        piece: &[u8],
        library: &Tokenizer,
        scratch: &mut MergeScratch,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        let hash = xxh3_64(piece);
        if let Some(id) = self.vocab_id(hash, piece) {
            if self.ignore_merges {
                out.push(id);
                return Ok(());
            }
            let memo = self.memo.get(id as usize);
            match memo.map(|m| m.load(Ordering::Relaxed)) {
                Some(MEMO_SELF) => {
                    out.push(id);
                    return Ok(());
                }
                Some(MEMO_UNKNOWN) => {
                    let start = out.len();
                    self.merge(piece, library, scratch, out)?;
                    let state = if out[start..] == [id] {
                        MEMO_SELF
                    } else {
                        MEMO_OTHER
                    };
                    if let Some(m) = memo {
                        m.store(state, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                _ => {}
            }
        }
        let shard = &self.words[(hash as usize) % WORD_SHARDS];
        if let Some((_, ids)) = shard.lock().table.find(hash, |(k, _)| **k == *piece) {
            out.extend_from_slice(ids);
            return Ok(());
        }
        let start = out.len();
        self.merge(piece, library, scratch, out)?;
        let ids = &out[start..];
        let cost = piece.len() + ids.len() * 4 + WORD_OVERHEAD;
        let mut shard = shard.lock();
        if shard.bytes + cost > WORD_SHARD_BUDGET {
            shard.table.clear();
            shard.bytes = 0;
        }
        if cost <= WORD_SHARD_BUDGET && shard.table.find(hash, |(k, _)| **k == *piece).is_none() {
            shard
                .table
                .insert_unique(hash, (piece.into(), ids.into()), |(k, _)| xxh3_64(k));
            shard.bytes += cost;
        }
        Ok(())
    }

    fn vocab_id(&self, hash: u64, piece: &[u8]) -> Option<u32> {
        self.vocab
            .find(hash, |&id| {
                let (s, l) = self.spans[id as usize];
                self.bytes.get(s as usize..(s + l) as usize) == Some(piece)
            })
            .copied()
    }

    fn pair(&self, left: u32, right: u32) -> (u32, u32) {
        self.merges
            .find(hash_pair(left, right), |e| e.0 == left && e.1 == right)
            .map_or((u32::MAX, 0), |e| (e.2, e.3))
    }

    /// BPE merges of `piece`'s bytes, appended to `out`.
    fn merge(
        &self,
        piece: &[u8],
        library: &Tokenizer,
        scratch: &mut MergeScratch,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        let MergeScratch {
            symbols,
            pairs,
            mapped,
        } = scratch;
        if piece.len() > MAX_MERGE_LEN {
            mapped.clear();
            mapped.extend(piece.iter().map(|&b| self.byte_chars[usize::from(b)]));
            let tokens = library
                .get_model()
                .tokenize(mapped)
                .map_err(|e| TokenizeError::Encode(e.to_string()))?;
            out.extend(tokens.iter().map(|t| t.id));
            return Ok(());
        }
        symbols.clear();
        symbols.extend(piece.iter().map(|&b| self.byte_ids[usize::from(b)]));
        pairs.clear();
        pairs.extend(symbols.windows(2).map(|w| self.pair(w[0], w[1])));
        loop {
            // The leftmost pair of lowest rank.
            let mut best = None;
            let mut best_rank = u32::MAX;
            for (k, &(rank, _)) in pairs.iter().enumerate() {
                if rank < best_rank {
                    best_rank = rank;
                    best = Some(k);
                }
            }
            let Some(k) = best else { break };
            symbols[k] = pairs[k].1;
            symbols.remove(k + 1);
            pairs.remove(k);
            if k > 0 {
                pairs[k - 1] = self.pair(symbols[k - 1], symbols[k]);
            }
            if k + 1 < symbols.len() {
                pairs[k] = self.pair(symbols[k], symbols[k + 1]);
            }
        }
        out.extend_from_slice(symbols);
        Ok(())
    }
}

/// The longest digit run of the split pattern `pre` has, if `pre` is the
/// supported `Sequence[Split, ByteLevel]`.
fn split_pattern(pre: &Value) -> Result<usize, String> {
    let bad = || format!("pre-tokenizer {}", brief(pre));
    if pre.get("type").and_then(Value::as_str) != Some("Sequence") {
        return Err(bad());
    }
    let Some([split, byte_level]) = pre
        .get("pretokenizers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    else {
        return Err(bad());
    };
    let field = |v: &Value, k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let split_ok = field(split, "type") == "Split"
        && field(split, "behavior") == "Isolated"
        && field(split, "invert") == false;
    let byte_level_ok = field(byte_level, "type") == "ByteLevel"
        && field(byte_level, "add_prefix_space") == false
        && field(byte_level, "use_regex") == false;
    if !split_ok || !byte_level_ok {
        return Err(bad());
    }
    match split
        .get("pattern")
        .and_then(|p| p.get("Regex"))
        .and_then(Value::as_str)
    {
        Some(QWEN2_PATTERN) => Ok(1),
        Some(LLAMA3_PATTERN) => Ok(3),
        _ => Err(format!("split pattern {}", brief(&field(split, "pattern")))),
    }
}

/// A JSON value cut short for a log line.
fn brief(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s,
    }
}
