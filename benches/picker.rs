//! Micro-benchmarks of the request path and the scrape path.
//!
//! `cargo bench --bench picker` runs the criterion groups, then measures the
//! latency distribution (p50/p90/p99/max) of the full scheduling decision,
//! which criterion's mean does not show. `cargo bench --bench picker --
//! decision` runs only what matches "decision".

// Test code: a failed unwrap is a failed test (clippy.toml allows it in
// #[test] functions; this extends it to the helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use std::sync::Arc;

use epp::{
    config::{DEFAULT_CONFIG, GIE_DEFAULT_CONFIG},
    endpoints::EndpointStore,
    prefix::{BlockHasher, PrefixIndex, chain_seed},
    request::{ApiKind, Prompt, parse, parse_cutting},
    scheduling::{Purpose, RequestFacts, Scheduler},
    scrape::{EngineMapping, extract},
};
use epp_bench::perf::footprint::{
    self, attach_events, events_scheduler, prompt_text, store, store_chain, warm,
};

/// The store, scheduler, warm-up and prompts are the in-process perf
/// fixtures of `epp-bench perf decisions`, so both measure the same thing.
fn scheduler(cfg: &str, store: &EndpointStore) -> Scheduler {
    footprint::scheduler(cfg, store).expect("scheduler")
}

fn bench_hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash_prompt");
    for kib in [16usize, 220] {
        let text = prompt_text(1, 1, kib << 10);
        let mut p = Prompt::default();
        p.push(text.as_str());
        let mut hasher = BlockHasher::default();
        let mut out = Vec::new();
        g.throughput(Throughput::Bytes((kib << 10) as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("{kib}KiB")), |b| {
            b.iter(|| {
                hasher.hash_prompt(&p, chain_seed("m", None), 64, usize::MAX, &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// An index holding `total` blocks spread over `endpoints` endpoints, and a
/// query that matches one endpoint's 256-block prefix. Ids are scrambled as
/// real block hashes are: the map keys on them directly, and sequential
/// keys share their top bits, which makes every insert probe long: the
/// insert benchmark would measure the probing, not the index.
fn filled_index(endpoints: u16, total: usize) -> (PrefixIndex, Vec<u64>, Vec<(u16, u64)>) {
    let idx = PrefixIndex::new();
    let per = total / usize::from(endpoints);
    let mut next = 1u64;
    let mut query = Vec::new();
    for slot in 0..endpoints {
        // Prompts of 256 blocks each; the first one of slot 0 is the query.
        let mut left = per;
        while left > 0 {
            let len = left.min(256);
            let hashes: Vec<u64> = (next..next + len as u64).map(scramble).collect();
            next += len as u64;
            if query.is_empty() {
                query = hashes.clone();
            }
            idx.record(slot, u64::from(slot) + 1, u32::MAX, &hashes);
            left -= len;
        }
    }
    let cands = (0..endpoints).map(|s| (s, u64::from(s) + 1)).collect();
    (idx, query, cands)
}

/// Spreads sequential ids over the 64-bit space as real block hashes are
/// (splitmix64's finaliser): the index's map uses the hash as its own key
/// hash, so sequential ids would sit in neighbouring buckets.
fn scramble(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// 1 M scrambled blocks as 4,096 prompts of 256 blocks over `endpoints`
/// endpoints; returns the prompts so a benchmark can query a different one
/// each time, as the picker does, instead of one that stays in cache.
fn cold_index(endpoints: u16) -> (PrefixIndex, Vec<Vec<u64>>, Vec<(u16, u64)>) {
    let idx = PrefixIndex::new();
    let prompts: Vec<Vec<u64>> = (0..4096u64)
        .map(|p| (0..256u64).map(|b| scramble(p * 256 + b + 1)).collect())
        .collect();
    for (i, hashes) in prompts.iter().enumerate() {
        let slot = (i % usize::from(endpoints)) as u16;
        idx.record(slot, u64::from(slot) + 1, u32::MAX, hashes);
    }
    let cands = (0..endpoints).map(|s| (s, u64::from(s) + 1)).collect();
    (idx, prompts, cands)
}

fn bench_index(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefix_index");
    for endpoints in [8u16, 64] {
        let (idx, prompts, cands) = cold_index(endpoints);
        // Each diverging query shares a leading run of 1 to 255 blocks with
        // one indexed prompt, then differs, as requests sharing a system
        // prompt do: the endpoint's match ends mid-prompt.
        let mut rng = fastrand::Rng::with_seed(11);
        let diverging: Vec<Vec<u64>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let shared = rng.usize(1..256);
                let fresh =
                    (shared..256).map(|b| scramble(((i as u64) << 32) | b as u64 | 1 << 60));
                p[..shared].iter().copied().chain(fresh).collect()
            })
            .collect();
        let mut out = Vec::new();
        for (name, queries) in [
            ("match_256_blocks_cold_1M_indexed", &prompts),
            ("match_diverging_256_blocks_cold_1M_indexed", &diverging),
        ] {
            let mut next = 0usize;
            g.bench_function(BenchmarkId::new(name, endpoints), |b| {
                b.iter(|| {
                    next = (next + 1) % queries.len();
                    idx.longest_matches(&queries[next], &cands, &mut out);
                    black_box(out[next % out.len()])
                })
            });
        }
    }
    // Recording a prompt its endpoint already holds (a cache hit, the
    // common case): every block is looked up and moved to the LRU front.
    {
        let endpoints = 8u16;
        let (idx, prompts, _) = cold_index(endpoints);
        let mut next = 0usize;
        g.bench_function(
            BenchmarkId::new("record_256_held_blocks_cold_1M_indexed", endpoints),
            |b| {
                b.iter(|| {
                    next = (next + 1) % prompts.len();
                    let slot = (next % usize::from(endpoints)) as u16;
                    idx.record(slot, u64::from(slot) + 1, u32::MAX, &prompts[next]);
                })
            },
        );
    }
    for endpoints in [64u16, 256, 1024] {
        let (idx, query, cands) = filled_index(endpoints, 1_000_000);
        let mut out = Vec::new();
        g.bench_function(
            BenchmarkId::new("match_256_blocks_1M_indexed", endpoints),
            |b| {
                b.iter(|| {
                    idx.longest_matches(&query, &cands, &mut out);
                    black_box(out[0])
                })
            },
        );
        let mut seq = 10_000_000_000u64;
        g.bench_function(
            BenchmarkId::new("insert_256_new_blocks_1M_indexed", endpoints),
            |b| {
                b.iter_batched(
                    || {
                        seq += 256;
                        (seq..seq + 256).map(scramble).collect::<Vec<u64>>()
                    },
                    // Capacity equal to what the endpoint holds: every insert evicts.
                    |hashes| idx.record(0, 1, (1_000_000 / usize::from(endpoints)) as u32, &hashes),
                    BatchSize::SmallInput,
                )
            },
        );
    }
    // A hot prefix replicated on every endpoint (what load spreading does to
    // a shared system prompt): each block has as many holders as endpoints.
    for endpoints in [8u16, 16, 64] {
        let idx = PrefixIndex::new();
        let hashes: Vec<u64> = (1..=256).collect();
        for slot in 0..endpoints {
            idx.record(slot, u64::from(slot) + 1, u32::MAX, &hashes);
        }
        let cands: Vec<(u16, u64)> = (0..endpoints).map(|s| (s, u64::from(s) + 1)).collect();
        let mut out = Vec::new();
        g.bench_function(
            BenchmarkId::new("match_256_blocks_held_by_every_endpoint", endpoints),
            |b| {
                b.iter(|| {
                    idx.longest_matches(&hashes, &cands, &mut out);
                    black_box(out[0])
                })
            },
        );
    }
    g.finish();
}

fn bench_decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    for (label, cfg) in [("default", DEFAULT_CONFIG), ("gie", GIE_DEFAULT_CONFIG)] {
        for endpoints in [64usize, 256, 1024] {
            let store = store(endpoints);
            let s = scheduler(cfg, &store);
            warm(&s, &store, 50, 2000, 16 << 10);
            let snap = store.snapshot();
            let mut q = 0usize;
            let texts: Vec<String> = (0..64)
                .map(|i| prompt_text(i % 50, 10_000 + i, 16 << 10))
                .collect();
            g.bench_function(BenchmarkId::new(format!("{label}_16KiB"), endpoints), |b| {
                b.iter(|| {
                    q = (q + 1) % texts.len();
                    let mut p = Prompt::default();
                    p.push(texts[q].as_str());
                    let facts = RequestFacts {
                        model: "m",
                        prompt: Some(&p),
                        ..RequestFacts::default()
                    };
                    black_box(
                        s.schedule(&facts, &snap, Purpose::Route)
                            .map(|d| d.endpoints.len()),
                    )
                })
            });
        }
    }
    g.finish();
}

/// Token ids of query `i`: its group's 3,500-token system prompt, then 596
/// tokens of its own (4,096 tokens, 16 KiB at 4 bytes per token).
fn query_tokens(i: usize) -> Vec<u32> {
    let g = (i % 50) as u32;
    (0..3500u32)
        .map(|j| g * 100_000 + j)
        .chain((0..596u32).map(|j| 10_000_000 + i as u32 * 1000 + j))
        .collect()
}

/// Every endpoint known by its KV events. `hot`: every endpoint holds every
/// group's system prompt (the worst case: each candidate walks ~219
/// blocks); else each group's is on two endpoints, and every endpoint also
/// holds 40 unrelated 4,096-token prompts.
fn events_store(endpoints: usize, hot: bool) -> Arc<EndpointStore> {
    let store = store(endpoints);
    attach_events(&store, !hot, |e, rank, engine| {
        for g in 0..50usize {
            if hot || g % endpoints == e || (g * 7 + 3) % endpoints == e {
                store_chain(rank, &query_tokens(g)[..3500], engine);
            }
        }
    });
    store
}

/// The decision with token ids and every endpoint known by events, next to
/// the same store without tokens (the approximate path).
fn bench_events_decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    let endpoints = 64usize;
    for (label, hot) in [("events", false), ("events_hot_prefix", true)] {
        let store = events_store(endpoints, hot);
        let s = events_scheduler(&store).unwrap();
        warm(&s, &store, 50, 2000, 16 << 10);
        let snap = store.snapshot();
        let texts: Vec<String> = (0..64)
            .map(|i| prompt_text(i % 50, 10_000 + i, 16 << 10))
            .collect();
        let tokens: Vec<Vec<u32>> = (0..64).map(query_tokens).collect();
        for with_tokens in [true, false] {
            let name = if with_tokens {
                format!("default_{label}_4096_tokens")
            } else {
                format!("default_{label}_store_no_tokens_16KiB")
            };
            let mut q = 0usize;
            g.bench_function(BenchmarkId::new(name, endpoints), |b| {
                b.iter(|| {
                    q = (q + 1) % texts.len();
                    let mut p = Prompt::default();
                    p.push(texts[q].as_str());
                    let facts = RequestFacts {
                        model: "m",
                        prompt: Some(&p),
                        tokens: with_tokens.then_some(tokens[q].as_slice()),
                        ..RequestFacts::default()
                    };
                    black_box(
                        s.schedule(&facts, &snap, Purpose::Route)
                            .map(|d| d.endpoints.len()),
                    )
                })
            });
        }
    }
    g.finish();
}

fn bench_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    for kib in [16usize, 220] {
        let body = serde_json::json!({"model": "m", "prompt": prompt_text(1, 1, kib << 10), "max_tokens": 16})
            .to_string()
            .into_bytes();
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(
            BenchmarkId::new("openai_completions", format!("{kib}KiB")),
            |b| b.iter(|| black_box(parse(&body, ApiKind::Completions).map(|r| r.prompt.len()))),
        );
        let chat = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": prompt_text(1, 1, (kib << 10) / 2)},
            {"role": "user", "content": prompt_text(2, 2, (kib << 10) / 2)}]})
        .to_string()
        .into_bytes();
        g.bench_function(BenchmarkId::new("openai_chat", format!("{kib}KiB")), |b| {
            b.iter(|| black_box(parse(&chat, ApiKind::ChatCompletions).map(|r| r.prompt.len())))
        });
        // Real chat text has line breaks and non-ASCII, escaped in JSON.
        let lines: String = prompt_text(1, 1, kib << 10)
            .split("; ")
            .map(|l| format!("{l};\n\u{e9} "))
            .collect();
        let escaped = serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": lines}]})
        .to_string()
        .into_bytes();
        g.bench_function(
            BenchmarkId::new("openai_chat_escaped", format!("{kib}KiB")),
            |b| {
                b.iter(|| {
                    black_box(parse(&escaped, ApiKind::ChatCompletions).map(|r| r.prompt.len()))
                })
            },
        );
        // The same with every string left to serde_json (nothing cut): the
        // skeleton parse's baseline, measured in the same run.
        for (name, body, api) in [
            ("openai_completions_serde_only", &body, ApiKind::Completions),
            (
                "openai_chat_escaped_serde_only",
                &escaped,
                ApiKind::ChatCompletions,
            ),
        ] {
            g.bench_function(BenchmarkId::new(name, format!("{kib}KiB")), |b| {
                b.iter(|| black_box(parse_cutting(body, api, usize::MAX).map(|r| r.prompt.len())))
            });
        }
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics");
    for page in [
        "vllm-metrics-inferstack.txt",
        "vllm-metrics-hwrouter-loaded.txt",
    ] {
        let text = std::fs::read(format!("{dir}/{page}")).expect("fixture");
        let mapping = EngineMapping::vllm();
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(BenchmarkId::new("prometheus_vllm_page", page), |b| {
            b.iter(|| black_box(extract(&text, &mapping).map(|s| s.num_blocks)))
        });
    }
    g.finish();
}

/// Latency percentiles of single decisions (criterion reports means).
fn decision_percentiles() {
    println!("\nFull scheduling decision, 16 KiB prompt, warm index (one sample per decision):");
    println!("| config | endpoints | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for (label, cfg) in [("default", DEFAULT_CONFIG), ("gie", GIE_DEFAULT_CONFIG)] {
        for endpoints in [64usize, 256, 1024] {
            let t = footprint::decision_times(cfg, endpoints, 16 << 10, 20_000).expect("scheduler");
            println!(
                "| {label} | {endpoints} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
                t.p50_us, t.p90_us, t.p99_us, t.max_us
            );
        }
    }
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut c = Criterion::default().configure_from_args();
    bench_hashing(&mut c);
    bench_index(&mut c);
    bench_decision(&mut c);
    bench_events_decision(&mut c);
    bench_parse(&mut c);
    c.final_summary();
    if filter
        .as_deref()
        .is_none_or(|f| "decision_percentiles".contains(f) || f.contains("decision"))
    {
        decision_percentiles();
    }
}
