//! Decoding vLLM's KV-event batches (`vllm/distributed/kv_events.py`).
//!
//! A payload is a msgspec-encoded `KVEventBatch { ts, events,
//! data_parallel_rank? }`. Two shapes exist in the wild, at both levels:
//! - positional arrays (vLLM before its 2026 change, SGLang, and any struct
//!   declared `array_like`): the batch is `[ts, events, rank?]`, an event is
//!   `[tag, field...]` with trailing defaults left out;
//! - maps (current vLLM): the batch is `{"ts":…, "events":…}`, an event is
//!   `{"type": tag, field: value…}`; keys may come in any order.
//!
//! Fields decoded: `BlockStored {block_hashes, parent_block_hash, token_ids,
//! block_size, lora_id, medium, lora_name, extra_keys, group_idx, …}`,
//! `BlockRemoved {block_hashes, medium, group_idx}`, `AllBlocksCleared {}`.
//! Unknown fields are skipped; unknown event types are skipped and counted
//! in [`Batch::unknown_events`]. A block hash is an int (xxhash builds) or
//! bytes (sha256 builds); bytes are folded to 64 bits with xxh3, which only
//! ever identifies the block inside one endpoint's stream.
//!
//! Why a hand decoder rather than rmp-serde or rmpv: both shapes at both
//! levels mean serde's untagged enums, which buffer every value into an
//! owned tree first, and rmpv builds such a tree anyway; here a batch
//! decodes straight into reused flat vectors (hashes and tokens of every
//! event concatenated, events holding ranges into them), so steady-state
//! decoding allocates nothing (not yet measured against rmpv: that bench is
//! still to be written). Bounds: see `msgpack.rs`; beyond those a
//! batch holds at most [`MAX_EVENTS`] events, and every token id and block
//! size must fit `u32`.

use std::ops::Range;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{
    error::{Error, Result},
    msgpack::Reader,
};

/// Events accepted in one batch (vLLM publishes one batch per engine step).
pub const MAX_EVENTS: usize = 1 << 16;
/// Largest `block_size` accepted, in tokens.
pub const MAX_BLOCK_SIZE: u32 = 1 << 16;

/// Where a block lives on the model server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Medium {
    /// `"GPU"`, or no medium (vLLM's default).
    Gpu,
    /// Any other medium (`"CPU"`, a disk or a remote tier): held, but
    /// slower to use than GPU memory.
    Cpu,
}

impl Medium {
    fn parse(s: Option<&[u8]>) -> Self {
        match s {
            None => Self::Gpu,
            Some(s) if s.eq_ignore_ascii_case(b"gpu") => Self::Gpu,
            Some(_) => Self::Cpu,
        }
    }
}

/// One decoded event; ranges index [`Batch::hashes`] and [`Batch::tokens`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Stored {
        hashes: Range<usize>,
        parent: Option<u64>,
        tokens: Range<usize>,
        block_size: u32,
        medium: Medium,
        /// xxh3 of the LoRA adapter's name, when the blocks belong to one.
        lora: Option<u64>,
        /// xxh3 of the request's cache salt, read from the first block's
        /// extra keys (vLLM puts the salt there only for a chain's first
        /// block, so it only matters when `parent` is `None`).
        salt: Option<u64>,
        /// Per block, a hash of the extra keys the picker cannot reproduce
        /// from text (multimodal items, prompt embeddings), 0 for none;
        /// indexes [`Batch::extra`]. `None` when no block has any.
        extra: Option<Range<usize>>,
        /// KV-cache group (hybrid models); `None` for single-group models.
        group: Option<u32>,
    },
    Removed {
        hashes: Range<usize>,
        medium: Medium,
        group: Option<u32>,
    },
    Cleared,
}

/// A decoded batch. Reuse one across payloads: [`decode_into`] clears it
/// and keeps its capacity.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    pub ts: f64,
    pub data_parallel_rank: Option<u32>,
    pub events: Vec<Event>,
    pub hashes: Vec<u64>,
    pub tokens: Vec<u32>,
    /// See [`Event::Stored::extra`].
    pub extra: Vec<u64>,
    pub unknown_events: u32,
}

impl Batch {
    fn clear(&mut self) {
        self.ts = 0.0;
        self.data_parallel_rank = None;
        self.events.clear();
        self.hashes.clear();
        self.tokens.clear();
        self.extra.clear();
        self.unknown_events = 0;
    }

    /// Block events in the batch (stored or removed blocks, one per hash;
    /// a clear counts as one): the unit of the ingest rate.
    pub fn block_events(&self) -> usize {
        self.events
            .iter()
            .map(|e| match e {
                Event::Stored { hashes, .. } | Event::Removed { hashes, .. } => hashes.len(),
                Event::Cleared => 1,
            })
            .sum()
    }
}

/// Decodes one payload into `out`. On error `out` holds a partial batch
/// that must not be applied.
pub fn decode_into(payload: &[u8], out: &mut Batch) -> Result<()> {
    out.clear();
    let mut r = Reader::new(payload);
    match r.peek()? {
        0x90..=0x9f | 0xdc | 0xdd => {
            let n = r.array_len()?;
            if n < 2 {
                return Err(Error::Schema("batch array shorter than [ts, events]"));
            }
            out.ts = r.f64()?;
            events(&mut r, out)?;
            if n >= 3 {
                out.data_parallel_rank = opt_u32(&mut r)?;
            }
            for _ in 3..n {
                r.skip()?;
            }
        }
        _ => {
            let n = r.map_len()?;
            let (mut ts, mut ev) = (false, false);
            for _ in 0..n {
                match r.str()? {
                    b"ts" => {
                        out.ts = r.f64()?;
                        ts = true;
                    }
                    b"events" => {
                        events(&mut r, out)?;
                        ev = true;
                    }
                    b"data_parallel_rank" => out.data_parallel_rank = opt_u32(&mut r)?,
                    _ => r.skip()?,
                }
            }
            if !(ts && ev) {
                return Err(Error::Schema("batch map without ts or events"));
            }
        }
    }
    if !r.is_empty() {
        return Err(Error::Schema("trailing bytes after the batch"));
    }
    Ok(())
}

fn opt_u32(r: &mut Reader<'_>) -> Result<Option<u32>> {
    if r.nil()? {
        Ok(None)
    } else {
        Ok(Some(r.u32()?))
    }
}

fn opt_str<'a>(r: &mut Reader<'a>) -> Result<Option<&'a [u8]>> {
    if r.nil()? {
        Ok(None)
    } else {
        Ok(Some(r.str()?))
    }
}

fn events(r: &mut Reader<'_>, out: &mut Batch) -> Result<()> {
    let n = r.array_len()?;
    if n > MAX_EVENTS {
        return Err(Error::Schema("too many events in one batch"));
    }
    for _ in 0..n {
        event(r, out)?;
    }
    Ok(())
}

/// Fields of any event type, filled from either shape.
#[derive(Default)]
struct Fields<'a> {
    tag: Option<&'a [u8]>,
    hashes: Option<Range<usize>>,
    parent: Option<u64>,
    tokens: Option<Range<usize>>,
    block_size: Option<u32>,
    medium: Option<&'a [u8]>,
    lora_name: Option<&'a [u8]>,
    /// `extra_keys` as encoded, read once `lora_name` and `parent` are known
    /// (a map may list them in any order).
    extra_keys: Option<&'a [u8]>,
    group: Option<u32>,
}

const STORED_ORDER: [&[u8]; 9] = [
    b"block_hashes",
    b"parent_block_hash",
    b"token_ids",
    b"block_size",
    b"lora_id",
    b"medium",
    b"lora_name",
    b"extra_keys",
    b"group_idx",
];
const REMOVED_ORDER: [&[u8]; 3] = [b"block_hashes", b"medium", b"group_idx"];

fn event(r: &mut Reader<'_>, out: &mut Batch) -> Result<()> {
    let mut f = Fields::default();
    let (hashes_start, tokens_start) = (out.hashes.len(), out.tokens.len());
    match r.peek()? {
        0x90..=0x9f | 0xdc | 0xdd => {
            let n = r.array_len()?;
            if n == 0 {
                return Err(Error::Schema("empty event array"));
            }
            let tag = r.str()?;
            f.tag = Some(tag);
            let order: &[&[u8]] = match tag {
                b"BlockStored" => &STORED_ORDER,
                b"BlockRemoved" => &REMOVED_ORDER,
                _ => &[],
            };
            for i in 1..n {
                match order.get(i - 1) {
                    Some(name) => field(r, name, &mut f, out)?,
                    None => r.skip()?,
                }
            }
        }
        _ => {
            let n = r.map_len()?;
            for _ in 0..n {
                let key = r.str()?;
                if key == b"type" {
                    f.tag = Some(r.str()?);
                } else {
                    field(r, key, &mut f, out)?;
                }
            }
        }
    }
    let ev = match f.tag {
        Some(b"BlockStored") => {
            let hashes = f
                .hashes
                .ok_or(Error::Schema("BlockStored without block_hashes"))?;
            let tokens = f
                .tokens
                .ok_or(Error::Schema("BlockStored without token_ids"))?;
            let block_size = f
                .block_size
                .ok_or(Error::Schema("BlockStored without block_size"))?;
            if block_size == 0 || block_size > MAX_BLOCK_SIZE {
                return Err(Error::Schema("block_size out of range"));
            }
            if tokens.len() != hashes.len() * block_size as usize {
                return Err(Error::Schema(
                    "token_ids is not block_hashes x block_size tokens",
                ));
            }
            let (salt, extra) = match f.extra_keys {
                Some(raw) => extra_keys(raw, hashes.len(), f.lora_name, f.parent, out)?,
                None => (None, None),
            };
            Event::Stored {
                hashes,
                parent: f.parent,
                tokens,
                block_size,
                medium: Medium::parse(f.medium),
                lora: f.lora_name.map(xxh3_64),
                salt,
                extra,
                group: f.group,
            }
        }
        Some(b"BlockRemoved") => Event::Removed {
            hashes: f
                .hashes
                .ok_or(Error::Schema("BlockRemoved without block_hashes"))?,
            medium: Medium::parse(f.medium),
            group: f.group,
        },
        Some(b"AllBlocksCleared") => Event::Cleared,
        Some(_) => {
            // A map may have listed known field names before its type.
            out.hashes.truncate(hashes_start);
            out.tokens.truncate(tokens_start);
            out.unknown_events += 1;
            return Ok(());
        }
        None => return Err(Error::Schema("event without a type")),
    };
    out.events.push(ev);
    Ok(())
}

fn field<'a>(r: &mut Reader<'a>, name: &[u8], f: &mut Fields<'a>, out: &mut Batch) -> Result<()> {
    match name {
        b"block_hashes" => f.hashes = Some(array_into(r, &mut out.hashes, block_hash)?),
        b"parent_block_hash" => {
            f.parent = if r.nil()? { None } else { Some(block_hash(r)?) };
        }
        b"token_ids" => f.tokens = Some(array_into(r, &mut out.tokens, token)?),
        b"block_size" => f.block_size = Some(r.u32()?),
        b"medium" => f.medium = opt_str(r)?,
        b"lora_name" => f.lora_name = opt_str(r)?,
        b"extra_keys" => f.extra_keys = Some(r.raw()?),
        b"group_idx" => f.group = opt_u32(r)?,
        _ => r.skip()?,
    }
    Ok(())
}

/// Appends an array's items to the batch's shared `out` (one allocation for
/// every event's hashes or tokens, not one per event); their range there.
fn array_into<'a, T>(
    r: &mut Reader<'a>,
    out: &mut Vec<T>,
    mut item: impl FnMut(&mut Reader<'a>) -> Result<T>,
) -> Result<Range<usize>> {
    let n = r.array_len()?;
    let start = out.len();
    out.reserve(n);
    for _ in 0..n {
        out.push(item(r)?);
    }
    Ok(start..out.len())
}

/// A token id, or (SGLang under EAGLE speculative decoding, whose radix
/// keys are bigrams) a `[token, next]` pair, of which the first is the
/// token at that position.
fn token(r: &mut Reader<'_>) -> Result<u32> {
    match r.peek()? {
        0x90..=0x9f | 0xdc | 0xdd => {
            let n = r.array_len()?;
            if n == 0 {
                return Err(Error::Schema("empty token pair"));
            }
            let t = r.u32()?;
            for _ in 1..n {
                r.skip()?;
            }
            Ok(t)
        }
        _ => r.u32(),
    }
}

/// Reads `extra_keys` (one entry per block: nil or a tuple) into the cache
/// salt and per-block hashes of what text cannot reproduce.
///
/// vLLM builds each tuple as `lora_name? + (mm_identifier, offset)* +
/// cache_salt? + prompt_embeds_hash?` (`generate_block_hash_extra_keys`),
/// the salt only on a request's first block. So: a leading str equal to
/// `lora_name` is the adapter (already in the chain seed); another str on
/// the first block of a chain start is the salt; everything else (tuples,
/// bytes, a str elsewhere) is mixed into that block's key from its encoded
/// bytes, which a text prompt's chain never contains, so such blocks (and
/// the blocks chained after them) never match a text prompt. Misreading an
/// unusual tuple as a salt has the same harmless outcome.
fn extra_keys(
    raw: &[u8],
    blocks: usize,
    lora_name: Option<&[u8]>,
    parent: Option<u64>,
    out: &mut Batch,
) -> Result<(Option<u64>, Option<Range<usize>>)> {
    let mut r = Reader::new(raw);
    if r.nil()? {
        return Ok((None, None));
    }
    let n = r.array_len()?;
    if n != blocks {
        return Err(Error::Schema("extra_keys is not one entry per block"));
    }
    let start = out.extra.len();
    let mut salt = None;
    let mut any = false;
    for i in 0..n {
        let mut mix = 0u64;
        let mut mixed = false;
        if !r.nil()? {
            let m = r.array_len()?;
            for j in 0..m {
                let is_str = matches!(r.peek()?, 0xa0..=0xbf | 0xd9..=0xdb);
                if is_str {
                    let s = r.str()?;
                    if j == 0 && lora_name == Some(s) {
                        continue;
                    }
                    if i == 0 && parent.is_none() && salt.is_none() {
                        if !s.is_empty() {
                            salt = Some(xxh3_64(s));
                        }
                        continue;
                    }
                    mix = xxh3_64_with_seed(s, mix ^ 1);
                } else {
                    mix = xxh3_64_with_seed(r.raw()?, mix ^ 2);
                }
                mixed = true;
            }
            // 0 means "nothing"; a real mix of 0 is remapped.
            if mixed && mix == 0 {
                mix = 1;
            }
        }
        any |= mix != 0;
        out.extra.push(mix);
    }
    if !any {
        out.extra.truncate(start);
        return Ok((salt, None));
    }
    Ok((salt, Some(start..out.extra.len())))
}

/// An engine block hash: an int (as its 64-bit two's complement) or bytes
/// (folded with xxh3).
fn block_hash(r: &mut Reader<'_>) -> Result<u64> {
    match r.peek()? {
        0xc4..=0xc6 => Ok(xxh3_64(r.bin()?)),
        0xa0..=0xbf | 0xd9..=0xdb => Ok(xxh3_64(r.str()?)),
        _ => {
            let v = r.int()?;
            if let Ok(u) = u64::try_from(v) {
                Ok(u)
            } else {
                i64::try_from(v).map(|i| i as u64).map_err(|_| Error::Range)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rmpv::Value;

    use super::*;

    pub(crate) fn enc(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    fn ints(xs: &[u64]) -> Value {
        Value::Array(xs.iter().map(|&x| Value::from(x)).collect())
    }

    pub(crate) fn stored_map(
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u64],
        bs: u64,
        medium: &str,
    ) -> Value {
        Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), ints(hashes)),
            (
                s("parent_block_hash"),
                parent.map_or(Value::Nil, Value::from),
            ),
            (s("token_ids"), ints(tokens)),
            (s("block_size"), Value::from(bs)),
            (s("lora_id"), Value::Nil),
            (s("medium"), s(medium)),
            (s("lora_name"), Value::Nil),
            (
                s("extra_keys"),
                Value::Array(vec![Value::Nil; hashes.len()]),
            ),
            (s("group_idx"), Value::from(0)),
            (s("kv_cache_spec_kind"), s("full_attention")),
        ])
    }

    pub(crate) fn stored_array(
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u64],
        bs: u64,
        medium: &str,
    ) -> Value {
        Value::Array(vec![
            s("BlockStored"),
            ints(hashes),
            parent.map_or(Value::Nil, Value::from),
            ints(tokens),
            Value::from(bs),
            Value::Nil,
            s(medium),
            Value::Nil,
        ])
    }

    pub(crate) fn removed_map(hashes: &[u64], medium: &str) -> Value {
        Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (s("block_hashes"), ints(hashes)),
            (s("medium"), s(medium)),
        ])
    }

    pub(crate) fn removed_array(hashes: &[u64], medium: &str) -> Value {
        Value::Array(vec![s("BlockRemoved"), ints(hashes), s(medium)])
    }

    pub(crate) fn cleared_map() -> Value {
        Value::Map(vec![(s("type"), s("AllBlocksCleared"))])
    }

    pub(crate) fn batch_map(ts: f64, events: Vec<Value>, rank: Option<u64>) -> Value {
        let mut m = vec![
            (s("ts"), Value::F64(ts)),
            (s("events"), Value::Array(events)),
        ];
        if let Some(r) = rank {
            m.push((s("data_parallel_rank"), Value::from(r)));
        }
        Value::Map(m)
    }

    pub(crate) fn batch_array(ts: f64, events: Vec<Value>, rank: Option<u64>) -> Value {
        let mut a = vec![Value::F64(ts), Value::Array(events)];
        if let Some(r) = rank {
            a.push(Value::from(r));
        }
        Value::Array(a)
    }

    fn decode(v: &Value) -> Result<Batch> {
        let mut b = Batch::default();
        decode_into(&enc(v), &mut b).map(|()| b)
    }

    #[test]
    fn both_shapes_at_both_levels_decode_alike() {
        let tokens: Vec<u64> = (0..8).collect();
        let mut seen = Vec::new();
        for (batch, event) in [
            (batch_map as fn(f64, Vec<Value>, Option<u64>) -> Value, true),
            (batch_map, false),
            (batch_array, true),
            (batch_array, false),
        ] {
            let events = if event {
                vec![
                    stored_map(&[11, 12], Some(10), &tokens, 4, "GPU"),
                    removed_map(&[11], "CPU"),
                    cleared_map(),
                ]
            } else {
                vec![
                    stored_array(&[11, 12], Some(10), &tokens, 4, "GPU"),
                    removed_array(&[11], "CPU"),
                    Value::Array(vec![s("AllBlocksCleared")]),
                ]
            };
            let b = decode(&batch(1.5, events, Some(2))).unwrap();
            assert_eq!(b.ts, 1.5);
            assert_eq!(b.data_parallel_rank, Some(2));
            assert_eq!(b.hashes, vec![11, 12, 11]);
            assert_eq!(b.tokens, (0..8).collect::<Vec<u32>>());
            assert_eq!(b.events.len(), 3);
            assert!(matches!(
                b.events[0],
                Event::Stored {
                    parent: Some(10),
                    block_size: 4,
                    medium: Medium::Gpu,
                    ..
                }
            ));
            assert!(matches!(
                b.events[1],
                Event::Removed {
                    medium: Medium::Cpu,
                    ..
                }
            ));
            assert_eq!(b.events[2], Event::Cleared);
            assert_eq!(b.block_events(), 4);
            seen.push(b.events.clone());
        }
        // Group differs (map events carry group_idx 0), the rest is equal.
        assert_eq!(seen[0], seen[2]);
        assert_eq!(seen[1], seen[3]);
    }

    #[test]
    fn map_keys_in_any_order_and_unknown_fields_and_types() {
        let ev = Value::Map(vec![
            (
                s("future_field"),
                Value::Map(vec![(s("x"), Value::Array(vec![Value::Nil]))]),
            ),
            (s("token_ids"), ints(&[1, 2])),
            (s("block_size"), Value::from(2)),
            (
                s("block_hashes"),
                Value::Array(vec![Value::Binary(vec![7; 32])]),
            ),
            (s("type"), s("BlockStored")),
        ]);
        let unknown = Value::Map(vec![
            (s("type"), s("BlockPinned")),
            (s("block_hashes"), ints(&[1])),
        ]);
        let unknown_arr = Value::Array(vec![s("BlockPinned"), ints(&[1]), Value::Nil]);
        let b = decode(&batch_map(0.0, vec![unknown, ev, unknown_arr], None)).unwrap();
        assert_eq!(b.unknown_events, 2);
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.hashes, vec![xxh3_64(&[7; 32])]);
        assert!(matches!(
            b.events[0],
            Event::Stored {
                parent: None,
                medium: Medium::Gpu,
                ..
            }
        ));
    }

    #[test]
    fn negative_int_hashes_and_lora_names() {
        let mut ev = stored_array(&[], None, &[5], 1, "GPU");
        if let Value::Array(a) = &mut ev {
            a[1] = Value::Array(vec![Value::from(-5i64)]);
            a[7] = s("adapter-a");
        }
        let b = decode(&batch_array(0.0, vec![ev], None)).unwrap();
        assert_eq!(b.hashes, vec![(-5i64) as u64]);
        assert!(
            matches!(b.events[0], Event::Stored { lora: Some(l), .. } if l == xxh3_64(b"adapter-a"))
        );
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xc1],
            vec![0x92, 0xcb],
            enc(&Value::from(5)),
            enc(&batch_map(0.0, vec![Value::from(3)], None)),
            enc(&Value::Map(vec![(s("ts"), Value::F64(0.0))])),
            enc(&batch_array(
                0.0,
                vec![stored_array(&[1], None, &[1, 2, 3], 2, "GPU")],
                None,
            )),
            enc(&batch_array(
                0.0,
                vec![stored_array(&[1], None, &[1], 0, "GPU")],
                None,
            )),
            enc(&batch_array(
                0.0,
                vec![stored_array(&[1], None, &[1 << 40], 1, "GPU")],
                None,
            )),
            enc(&batch_array(
                0.0,
                vec![Value::Map(vec![(s("block_hashes"), ints(&[1]))])],
                None,
            )),
            enc(&batch_array(
                0.0,
                vec![removed_map(&[1], "GPU")],
                Some(1 << 40),
            )),
            {
                let mut v = enc(&batch_map(0.0, vec![], None));
                v.push(0);
                v
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(
                decode_into(c, &mut Batch::default()).is_err(),
                "case {i} decoded"
            );
        }
    }

    fn with_extra(mut ev: Value, lora: Option<&str>, extra: Value) -> Value {
        if let Value::Map(m) = &mut ev {
            for (k, v) in m.iter_mut() {
                match k.as_str() {
                    Some("extra_keys") => *v = extra.clone(),
                    Some("lora_name") => *v = lora.map_or(Value::Nil, s),
                    _ => {}
                }
            }
        }
        ev
    }

    fn stored_of(b: &Batch) -> (Option<u64>, Option<u64>, Vec<u64>) {
        match &b.events[0] {
            Event::Stored {
                lora, salt, extra, ..
            } => (
                *lora,
                *salt,
                extra.clone().map_or(Vec::new(), |r| b.extra[r].to_vec()),
            ),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn extra_keys_give_the_salt_and_mark_multimodal_blocks() {
        let tokens: Vec<u64> = (0..8).collect();
        let base = stored_map(&[1, 2], None, &tokens, 4, "GPU");
        // vLLM's tuples: lora name first, salt on the first block only.
        let salted = with_extra(
            base.clone(),
            Some("ad"),
            Value::Array(vec![
                Value::Array(vec![s("ad"), s("tenant-1")]),
                Value::Array(vec![s("ad")]),
            ]),
        );
        let b = decode(&batch_map(0.0, vec![salted], None)).unwrap();
        assert_eq!(
            stored_of(&b),
            (Some(xxh3_64(b"ad")), Some(xxh3_64(b"tenant-1")), vec![])
        );
        // A multimodal item on block 2: only that block is marked.
        let mm = with_extra(
            base.clone(),
            None,
            Value::Array(vec![
                Value::Nil,
                Value::Array(vec![Value::Array(vec![s("img-sha"), Value::from(3)])]),
            ]),
        );
        let b = decode(&batch_map(0.0, vec![mm], None)).unwrap();
        let (_, salt, extra) = stored_of(&b);
        assert_eq!(salt, None);
        assert_eq!(extra.len(), 2);
        assert_eq!(extra[0], 0);
        assert_ne!(extra[1], 0);
        // Prompt-embedding bytes are unreproducible too; nil everywhere is nothing.
        let embeds = with_extra(
            base.clone(),
            None,
            Value::Array(vec![
                Value::Array(vec![Value::Binary(vec![9; 32])]),
                Value::Nil,
            ]),
        );
        let b = decode(&batch_map(0.0, vec![embeds], None)).unwrap();
        assert_ne!(stored_of(&b).2[0], 0);
        let b = decode(&batch_map(0.0, vec![base.clone()], None)).unwrap();
        assert_eq!(stored_of(&b), (None, None, vec![]));
        // Not one entry per block, or not a list: rejected.
        for bad in [
            Value::Array(vec![Value::Nil]),
            Value::from(5),
            Value::Array(vec![Value::from(1), Value::Nil]),
        ] {
            let ev = with_extra(base.clone(), None, bad.clone());
            assert!(decode(&batch_map(0.0, vec![ev], None)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sglang_shapes_decode() {
        // SGLang: [ts, events], BlockStored without medium/lora_name/extra
        // keys, Python hash() ints (negative), BlockRemoved without medium.
        let stored = Value::Array(vec![
            s("BlockStored"),
            Value::Array(vec![Value::from(-7i64)]),
            Value::Nil,
            ints(&[5, 6]),
            Value::from(2),
            Value::Nil,
        ]);
        let removed = Value::Array(vec![
            s("BlockRemoved"),
            Value::Array(vec![Value::from(-7i64)]),
        ]);
        // EAGLE bigram keys: token pairs.
        let eagle = Value::Array(vec![
            s("BlockStored"),
            ints(&[8]),
            Value::Nil,
            Value::Array(vec![
                Value::Array(vec![Value::from(5), Value::from(6)]),
                Value::Array(vec![Value::from(6), Value::from(7)]),
            ]),
            Value::from(2),
            Value::Nil,
        ]);
        let b = decode(&batch_array(1.0, vec![stored, removed, eagle], None)).unwrap();
        assert_eq!(b.events.len(), 3);
        assert_eq!(b.tokens, vec![5, 6, 5, 6]);
        assert_eq!(b.hashes, vec![(-7i64) as u64, (-7i64) as u64, 8]);
        assert!(matches!(
            b.events[1],
            Event::Removed {
                medium: Medium::Gpu,
                ..
            }
        ));
    }

    #[test]
    fn wrong_field_types_are_errors_not_panics() {
        let tokens: Vec<u64> = (0..4).collect();
        let fields: [(&str, Value); 7] = [
            ("block_hashes", s("x")),
            ("block_hashes", Value::Array(vec![Value::F64(1.5)])),
            ("token_ids", Value::Array(vec![Value::from(-1)])),
            ("token_ids", Value::Array(vec![Value::Array(vec![])])),
            ("block_size", s("4")),
            ("medium", Value::from(1)),
            ("parent_block_hash", Value::Boolean(true)),
        ];
        for (name, v) in fields {
            let mut ev = stored_map(&[1], None, &tokens, 4, "GPU");
            if let Value::Map(m) = &mut ev {
                for (k, val) in m.iter_mut() {
                    if k.as_str() == Some(name) {
                        *val = v.clone();
                    }
                }
            }
            let r = decode(&batch_map(0.0, vec![ev], None));
            assert!(r.is_err(), "{name} = {v:?} decoded");
            assert_eq!(r.unwrap_err().kind(), crate::kv_events::ErrorKind::Decode);
        }
        // The batch's own fields.
        for bad in [
            Value::Map(vec![
                (s("ts"), s("now")),
                (s("events"), Value::Array(vec![])),
            ]),
            Value::Map(vec![
                (s("ts"), Value::F64(0.0)),
                (s("events"), Value::Map(vec![])),
            ]),
            Value::Array(vec![Value::F64(0.0), Value::Array(vec![]), s("rank")]),
        ] {
            assert!(decode(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn absurd_declared_sizes_fail_fast_without_allocating() {
        let mut b = Batch::default();
        // events: array32 of 2^32-1 entries, then nothing.
        let mut p = vec![0x92, 0xcb];
        p.extend_from_slice(&0f64.to_be_bytes());
        p.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(decode_into(&p, &mut b), Err(Error::Truncated)));
        // One event whose block_hashes and token_ids claim 2^32-1 entries.
        for field in [1usize, 3] {
            let mut ev = vec![0x98, 0xab];
            ev.extend_from_slice(b"BlockStored");
            for i in 1..8 {
                if i == field {
                    ev.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]);
                } else if i == 1 {
                    ev.push(0x90);
                } else {
                    ev.push(0xc0);
                }
            }
            let mut p = vec![0x92, 0xcb];
            p.extend_from_slice(&0f64.to_be_bytes());
            p.push(0x91);
            p.extend_from_slice(&ev);
            assert!(decode_into(&p, &mut b).is_err());
            assert!(b.hashes.capacity() < 1024 && b.tokens.capacity() < 1024);
        }
        // More events than MAX_EVENTS, each one byte: refused by count.
        let mut p = vec![0x92, 0x00, 0xdd];
        p.extend_from_slice(&((MAX_EVENTS + 1) as u32).to_be_bytes());
        p.extend(std::iter::repeat_n(0xc0, MAX_EVENTS + 1));
        assert!(matches!(decode_into(&p, &mut b), Err(Error::Schema(_))));
        assert!(b.events.capacity() < 1024);
    }

    #[test]
    fn reuse_clears_the_previous_batch() {
        let mut b = Batch::default();
        decode_into(
            &enc(&batch_map(1.0, vec![removed_map(&[1, 2], "GPU")], None)),
            &mut b,
        )
        .unwrap();
        decode_into(&enc(&batch_map(2.0, vec![cleared_map()], None)), &mut b).unwrap();
        assert_eq!(b.events, vec![Event::Cleared]);
        assert!(b.hashes.is_empty());
    }
}
