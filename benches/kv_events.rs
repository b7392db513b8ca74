//! KV-event ingest: decode plus apply of vLLM-shaped batches into one
//! rank's index, and that index's bytes per block.
//!
//! `cargo bench --bench kv_events` runs the criterion group `ingest`
//! (throughput in block events, stored plus removed blocks) and then prints
//! the bytes per indexed block at steady state for 100k and 1M blocks.
//!
//! The stream: a cycle of engine steps, each one batch holding two
//! `BlockStored` events of 16 to 64 blocks (the second continuing the first,
//! as a request's later blocks do) and one `BlockRemoved` of the blocks
//! stored `LAG` steps earlier, so the index sits at a steady size, as it
//! does against a pod whose cache is full. Token ids are random below 150k
//! (five-byte msgpack ints, as for a real vocabulary); hashes are random
//! u64s (vLLM's int hashes). Payloads are encoded once; every iteration
//! decodes and applies a whole cycle.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use epp::kv_events::{Batch, BlockIndex, decode_into};
use rmpv::Value;

fn enc(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

fn s(x: &str) -> Value {
    Value::from(x)
}

struct Stream {
    payloads: Vec<Vec<u8>>,
    /// Stored plus removed blocks in one cycle.
    block_events: u64,
    /// Blocks held at steady state.
    resident: usize,
}

/// Hashes stored at each step: 32..=128 random u64s.
fn steps_hashes(steps: usize, rng: &mut fastrand::Rng) -> Vec<Vec<u64>> {
    (0..steps)
        .map(|_| (0..rng.usize(32..=128)).map(|_| rng.u64(..)).collect())
        .collect()
}

/// Step `i`'s payload: stores `hashes[i]` (two chained events) and removes
/// `hashes[i - lag]` (map-shaped events when `map`, positional otherwise).
/// Returns the payload and its block events.
fn payload(
    hashes: &[Vec<u64>],
    i: usize,
    lag: usize,
    block_size: usize,
    map: bool,
    rng: &mut fastrand::Rng,
) -> (Vec<u8>, u64) {
    let steps = hashes.len();
    let stored = &hashes[i];
    let split = stored.len() / 2;
    let mut events = Vec::new();
    for (part, parent) in [
        (&stored[..split], Value::Nil),
        (&stored[split..], Value::from(stored[split - 1])),
    ] {
        let tokens: Vec<Value> = (0..part.len() * block_size)
            .map(|_| Value::from(rng.u32(..150_000)))
            .collect();
        let hv: Vec<Value> = part.iter().map(|&h| Value::from(h)).collect();
        events.push(if map {
            Value::Map(vec![
                (s("type"), s("BlockStored")),
                (s("block_hashes"), Value::Array(hv)),
                (s("parent_block_hash"), parent),
                (s("token_ids"), Value::Array(tokens)),
                (s("block_size"), Value::from(block_size as u64)),
                (s("lora_id"), Value::Nil),
                (s("medium"), s("GPU")),
                (s("lora_name"), Value::Nil),
                (s("extra_keys"), Value::Array(vec![Value::Nil; part.len()])),
                (s("group_idx"), Value::from(0)),
                (s("kv_cache_spec_kind"), s("full_attention")),
            ])
        } else {
            Value::Array(vec![
                s("BlockStored"),
                Value::Array(hv),
                parent,
                Value::Array(tokens),
                Value::from(block_size as u64),
                Value::Nil,
                s("GPU"),
                Value::Nil,
            ])
        });
    }
    let old = &hashes[(i + steps - lag) % steps];
    let ov: Vec<Value> = old.iter().map(|&h| Value::from(h)).collect();
    events.push(if map {
        Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (s("block_hashes"), Value::Array(ov)),
            (s("medium"), s("GPU")),
            (s("group_idx"), Value::from(0)),
        ])
    } else {
        Value::Array(vec![s("BlockRemoved"), Value::Array(ov), s("GPU")])
    });
    let ts = Value::F64(1.7e9 + i as f64);
    let p = enc(&if map {
        Value::Map(vec![
            (s("ts"), ts),
            (s("events"), Value::Array(events)),
            (s("data_parallel_rank"), Value::from(0)),
        ])
    } else {
        Value::Array(vec![ts, Value::Array(events)])
    });
    (p, (stored.len() + old.len()) as u64)
}

/// A cycle of `steps` encoded payloads removing `lag` steps back.
fn stream(steps: usize, lag: usize, block_size: usize, map: bool, seed: u64) -> Stream {
    let mut rng = fastrand::Rng::with_seed(seed);
    let hashes = steps_hashes(steps, &mut rng);
    let mut payloads = Vec::with_capacity(steps);
    let mut block_events = 0;
    for i in 0..steps {
        let (p, n) = payload(&hashes, i, lag, block_size, map, &mut rng);
        payloads.push(p);
        block_events += n;
    }
    let resident = (0..lag).map(|k| hashes[steps - 1 - k].len()).sum();
    Stream {
        payloads,
        block_events,
        resident,
    }
}

fn run_cycle(stream: &Stream, batch: &mut Batch, index: &mut BlockIndex) -> u64 {
    let mut stored = 0;
    for p in &stream.payloads {
        decode_into(p, batch).unwrap();
        stored += index.apply(batch).stored;
    }
    stored
}

fn bench_ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest");
    for (block_size, map) in [(16usize, true), (16, false), (64, true)] {
        let st = stream(256, 128, block_size, map, 7);
        // Room for the steady state plus one step: vLLM removes as it stores.
        let mut index = BlockIndex::new(st.resident + 256);
        let mut batch = Batch::default();
        run_cycle(&st, &mut batch, &mut index);
        g.throughput(Throughput::Elements(st.block_events));
        let shape = if map { "map" } else { "array" };
        g.bench_function(BenchmarkId::new(shape, format!("bs{block_size}")), |b| {
            b.iter(|| black_box(run_cycle(&st, &mut batch, &mut index)))
        });
    }
    // Decode alone and apply alone, to see where the time goes.
    let st = stream(256, 128, 16, true, 7);
    let mut batch = Batch::default();
    g.throughput(Throughput::Elements(st.block_events));
    g.bench_function("decode_only/map/bs16", |b| {
        b.iter(|| {
            for p in &st.payloads {
                decode_into(p, &mut batch).unwrap();
                black_box(batch.events.len());
            }
        })
    });
    let batches: Vec<Batch> = st
        .payloads
        .iter()
        .map(|p| {
            let mut b = Batch::default();
            decode_into(p, &mut b).unwrap();
            b
        })
        .collect();
    let mut index = BlockIndex::new(st.resident + 256);
    g.bench_function("apply_only/bs16", |b| {
        b.iter(|| {
            for batch in &batches {
                black_box(index.apply(batch));
            }
        })
    });
    g.finish();
}

/// Bytes per indexed block at steady state: drive an index of `blocks`
/// capacity with the same kind of stream (payloads made one at a time),
/// once with removals keeping it just under capacity and once with no
/// removal in reach, so that it evicts on its own at capacity.
fn bytes_per_block() {
    println!("\nKV-event index memory at steady state (BlockIndex::heap_bytes):");
    println!("| capacity | how it is held | blocks | bytes per block |");
    println!("|---|---|---|---|");
    for blocks in [100_000usize, 1_000_000] {
        for (how, steps, lag) in [
            ("removals (lag = capacity)", blocks / 40, blocks / 80 - 16),
            ("own eviction", blocks / 50, blocks / 50 - 1),
        ] {
            let mut rng = fastrand::Rng::with_seed(11);
            let hashes = steps_hashes(steps, &mut rng);
            let mut index = BlockIndex::new(blocks);
            let mut batch = Batch::default();
            for i in 0..steps {
                let (p, _) = payload(&hashes, i, lag, 16, false, &mut rng);
                decode_into(&p, &mut batch).unwrap();
                index.apply(&batch);
            }
            let n = index.len();
            println!(
                "| {blocks} | {how} | {n} | {:.1} B |",
                index.heap_bytes() as f64 / n as f64
            );
        }
    }
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut c = Criterion::default().configure_from_args();
    bench_ingest(&mut c);
    c.final_summary();
    if filter
        .as_deref()
        .is_none_or(|f| "bytes_per_block".contains(f))
    {
        bytes_per_block();
    }
}
