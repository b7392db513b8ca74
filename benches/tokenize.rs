//! Tokenizing chat prompts with the model's tokenizer (Qwen3's, installed by
//! scripts/setup-tools.sh) through the segment cache.
//!
//! `cargo bench --bench tokenize` runs the criterion groups, then prints the
//! latency distribution (p50/p90/p99/max, one sample per request) that
//! criterion's mean does not show. Cases: a 16 KiB chat whose earlier
//! messages were seen (only the last user message is new: the common case
//! of a growing conversation), the same size fully cold (every message new),
//! and a 220 KiB cold chat. Bodies are built and parsed outside the timing:
//! what is timed is [`ModelTokenizer::tokenize`] alone (render + encode).
//!
//! Completions prompts are timed apart (one segment each, so what is
//! cached are its chunks): chunked as the picker encodes them and whole.
//!
//! Each case runs three times: as the picker runs it (`fast`: the native
//! ChatML renderer and the fast BPE encoder), with the chat template
//! interpreted by minijinja (`interpreted`), and with the interpreter and
//! the tokenizers library encoding every segment (`library`), so one
//! invocation compares them. `TOKENIZE_BENCH_ENCODERS=fast` (a comma-separated
//! list of those names) runs some only, e.g. under a profiler.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fmt::Write,
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use std::sync::Arc;

use epp::{
    request::{ApiKind, parse},
    scheduling::{Purpose, RequestFacts},
    tokenize::{ModelTokenizer, qwen3_test_dir},
};
use epp_bench::perf::footprint::{attach_events, events_scheduler, store, store_chain};

const WORDS: &[&str] = &[
    "the",
    "request",
    "model",
    "cache",
    "token",
    "prefix",
    "server",
    "latency",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "with",
    "on",
    "that",
    "by",
    "this",
    "it",
    "routing",
    "endpoint",
    "a",
    "picker",
    "block",
    "events",
    "index",
    "Kubernetes",
    "pod",
    "memory",
    "quickly",
    "under",
    "load,",
    "which",
    "returns",
    "values;",
    "if",
    "else",
    "fn",
    "main()",
    "{",
    "}",
    "12",
    "3.14",
    "über",
    "naïve",
    "東京",
    "数据",
    "🙂",
    "(see",
    "below).",
    "\n",
    "\n\n",
    "  ",
    "don't",
    "we'll",
];

/// Text of about `bytes` bytes, different for each `seed`.
fn text(seed: u64, bytes: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push(' ');
        }
        s.push_str(WORDS[rng.usize(0..WORDS.len())]);
    }
    s
}

/// A chat body of about `bytes` bytes: a system prompt, alternating turns of
/// ~1 KiB, and a last user message of ~512 bytes. `history` seeds every
/// message but the last, `last` seeds the last one.
fn chat(history: u64, last: u64, bytes: usize) -> Vec<u8> {
    let mut messages = vec![serde_json::json!({"role": "system", "content": text(history, 2048)})];
    let mut size = 2048;
    let mut turn = 0;
    while size + 512 < bytes {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        let n = 1024.min(bytes - 512 - size).max(16);
        messages.push(serde_json::json!({"role": role, "content": text(history * 1000 + turn, n)}));
        size += n;
        turn += 1;
    }
    if turn % 2 == 1 {
        messages.push(serde_json::json!({"role": "assistant", "content": "ok"}));
    }
    let mut q = String::new();
    let _ = write!(q, "Question {last}: ");
    q.push_str(&text(last ^ 0x5eed, 512));
    messages.push(serde_json::json!({"role": "user", "content": q}));
    serde_json::to_vec(&serde_json::json!({"model": "qwen3", "messages": messages})).unwrap()
}

fn tokenizer(fast: bool, native_template: bool) -> ModelTokenizer {
    let dir = qwen3_test_dir().unwrap_or_else(|e| panic!("{e}"));
    let mut t = ModelTokenizer::from_dir(&dir, 256 << 20).unwrap();
    assert!(t.uses_fast_encoder());
    assert!(t.renders_chat_natively());
    if !fast {
        t.disable_fast_encoder();
    }
    if !native_template {
        t.disable_native_chat_template();
    }
    t
}

/// The encoders to run: (name, tokenizer). `fast`: what the picker runs
/// (native ChatML rendering, fast BPE); `interpreted`: the same with every
/// chat rendered by the template interpreter; `library`: the interpreter
/// and the tokenizers library.
fn encoders() -> Vec<(&'static str, ModelTokenizer)> {
    let only = std::env::var("TOKENIZE_BENCH_ENCODERS").unwrap_or_default();
    [
        ("fast", true, true),
        ("interpreted", true, false),
        ("library", false, false),
    ]
    .into_iter()
    .filter(|(name, _, _)| only.is_empty() || only.split(',').any(|o| o == *name))
    .map(|(name, fast, native)| (name, tokenizer(fast, native)))
    .collect()
}

/// Times one tokenize of `body` (parsed outside the timing).
fn time_one(t: &ModelTokenizer, body: &[u8], out: &mut Vec<u32>) -> Duration {
    let req = parse(body, ApiKind::ChatCompletions).unwrap();
    out.clear();
    let start = Instant::now();
    t.tokenize(&req, out).unwrap();
    let d = start.elapsed();
    black_box(out.len());
    d
}

/// The cases: (name, body size, whether the history is shared). Warm
/// bodies share one history and differ in the last message; cold bodies
/// share nothing.
const CASES: &[(&str, usize, bool)] = &[
    ("warm_16KiB", 16 << 10, true),
    ("cold_16KiB", 16 << 10, false),
    ("cold_220KiB", 220 << 10, false),
];

fn body_for(case: usize, i: u64) -> Vec<u8> {
    let (_, bytes, warm) = CASES[case];
    let history = if warm { 1 } else { 1_000_000 + i };
    chat(history, i, bytes)
}

fn bench_tokenize(c: &mut Criterion, encoder: &str, t: &ModelTokenizer) {
    let mut g = c.benchmark_group(format!("tokenize_chat/{encoder}"));
    let mut seq = 0u64;
    for (case, (name, bytes, _)) in CASES.iter().enumerate() {
        g.throughput(Throughput::Bytes(*bytes as u64));
        if *bytes > 100_000 {
            g.sample_size(20);
        }
        // Warm the shared history once.
        time_one(t, &body_for(case, 0), &mut Vec::new());
        let mut out = Vec::new();
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    seq += 1;
                    total += time_one(t, &body_for(case, seq), &mut out);
                }
                total
            })
        });
    }
    g.finish();
}

/// Latency percentiles, one sample per request.
/// The `q` quantile of sorted `samples`, in microseconds.
fn at_us(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e6
}

/// Sorts `samples` and gives their p50, p90, p99 and max as table cells.
fn quantile_cells(samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    let [p50, p90, p99, max] = [0.5, 0.9, 0.99, 1.0].map(|q| at_us(samples, q));
    format!("{p50:.1} µs | {p90:.1} µs | {p99:.1} µs | {max:.1} µs")
}

fn percentiles(encoder: &str, t: &ModelTokenizer) {
    println!(
        "\nTokenizing a chat request (render + encode, {encoder} encoder), one sample per request:"
    );
    println!("| case | tokens | requests | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    let mut seq = 10_000_000u64;
    for (case, (name, bytes, _)) in CASES.iter().enumerate() {
        let n = match (*bytes > 100_000, encoder == "library") {
            (true, _) => 100,
            (false, true) => 500,
            (false, false) => 2_000,
        };
        let mut out = Vec::new();
        time_one(t, &body_for(case, 0), &mut out);
        let mut samples: Vec<Duration> = (0..n)
            .map(|_| {
                seq += 1;
                time_one(t, &body_for(case, seq), &mut out)
            })
            .collect();
        println!(
            "| {name} | {} | {n} | {} |",
            out.len(),
            quantile_cells(&mut samples)
        );
    }
    // The chat template alone (what both encoders share).
    for (case, (name, bytes, _)) in CASES.iter().enumerate() {
        let n = if *bytes > 100_000 { 100 } else { 1_000 };
        let mut samples: Vec<Duration> = (0..n)
            .map(|_| {
                seq += 1;
                let body = body_for(case, seq);
                let req = parse(&body, ApiKind::ChatCompletions).unwrap();
                let start = Instant::now();
                let text = t.render_chat(req.prompt.messages()).unwrap();
                let d = start.elapsed();
                black_box(text.len());
                d
            })
            .collect();
        println!(
            "| {name} (render only) | - | {n} | {} |",
            quantile_cells(&mut samples)
        );
    }
    let s = t.cache_stats();
    println!(
        "segment cache: {} hits, {} misses, {} entries, {} bytes",
        s.hits, s.misses, s.entries, s.bytes
    );
}

/// Issue 14's target as one sample per request: the warm 16 KiB chat
/// tokenized, then scheduled by the default config over 64 endpoints known
/// by their KV events, two of which hold the conversation's history (the
/// others 40 unrelated 4,096-token prompts each); tokenize + schedule timed
/// together, the body parsed outside the timing.
fn tokenized_decision_percentiles(name: &str, t: &ModelTokenizer) {
    const ENDPOINTS: usize = 64;
    let store = store(ENDPOINTS);
    let mut history = Vec::new();
    let first = body_for(0, 0);
    t.tokenize(
        &parse(&first, ApiKind::ChatCompletions).unwrap(),
        &mut history,
    )
    .unwrap();
    // The last message (about 130 tokens) differs per request.
    let held = &history[..history.len() - 200];
    attach_events(&store, true, |e, rank, engine| {
        if e < 2 {
            store_chain(rank, held, engine);
        }
    });
    let s = events_scheduler(&store).unwrap();
    let snap = store.snapshot();
    let holders = &snap.endpoints()[..2];
    let mut out = Vec::new();
    // (tokenize + decision, tokenize alone) per request.
    let pairs: Vec<(Duration, Duration)> = (0..2_000u64)
        .map(|i| {
            let body = body_for(0, 20_000_000 + i);
            let req = parse(&body, ApiKind::ChatCompletions).unwrap();
            let start = Instant::now();
            out.clear();
            t.tokenize(&req, &mut out).unwrap();
            let tokenized = start.elapsed();
            let facts = RequestFacts {
                model: "qwen3",
                prompt: Some(&req.prompt),
                tokens: Some(out.as_slice()),
                ..RequestFacts::default()
            };
            let d = s.schedule(&facts, &snap, Purpose::Route).unwrap();
            let took = start.elapsed();
            assert!(
                holders.iter().any(|h| Arc::ptr_eq(h, &d.endpoints[0])),
                "the decision goes to a pod holding the history"
            );
            (took, tokenized)
        })
        .collect();
    let mut samples: Vec<Duration> = pairs.iter().map(|p| p.0).collect();
    let mut tokenizes: Vec<Duration> = pairs.iter().map(|p| p.1).collect();
    let mut decisions: Vec<Duration> = pairs.iter().map(|p| p.0 - p.1).collect();
    tokenizes.sort_unstable();
    decisions.sort_unstable();
    let tokenize_p99 = at_us(&tokenizes, 0.99);
    let decision_p99 = at_us(&decisions, 0.99);
    println!(
        "| {name}: warm 16 KiB, tokenize + decision, {ENDPOINTS} endpoints by events | {} | 2000 | {} | {tokenize_p99:.1} µs / {decision_p99:.1} µs |",
        out.len(),
        quantile_cells(&mut samples)
    );
}

/// Completions prompts (one segment: no added tokens), one sample per
/// request, with long segments encoded in cached chunks (as the picker
/// does) and whole: an 8 KiB shared prefix with a new ~400-byte end
/// (`shared`), and every prompt new (`cold`).
fn completions_percentiles() {
    println!("\nTokenizing a completions prompt (fast encoder), one sample per request:");
    println!("| case | tokens | requests | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for (label, chunk) in [("chunked", None), ("whole", Some(usize::MAX))] {
        let mut t = tokenizer(true, true);
        if let Some(bytes) = chunk {
            t.set_chunk_bytes(bytes);
        }
        for (case, shared) in [("shared 8 KiB prefix", true), ("cold 8 KiB", false)] {
            let body = |i: u64| {
                let prefix = text(if shared { 7 } else { 2_000_000 + i }, 8 << 10);
                let prompt = format!("{prefix} {}", text(i ^ 0xe2d, 400));
                serde_json::to_vec(&serde_json::json!({"model": "qwen3", "prompt": prompt}))
                    .unwrap()
            };
            let mut out = Vec::new();
            let time = |body: &[u8], out: &mut Vec<u32>| {
                let req = parse(body, ApiKind::Completions).unwrap();
                out.clear();
                let start = Instant::now();
                t.tokenize(&req, out).unwrap();
                start.elapsed()
            };
            time(&body(0), &mut out);
            let mut samples: Vec<Duration> =
                (1..=2_000).map(|i| time(&body(i), &mut out)).collect();
            println!(
                "| {label}: {case} | {} | 2000 | {} |",
                out.len(),
                quantile_cells(&mut samples)
            );
        }
    }
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let encoders = encoders();
    let mut c = Criterion::default().configure_from_args();
    for (name, t) in &encoders {
        bench_tokenize(&mut c, name, t);
    }
    c.final_summary();
    if filter.as_deref().is_none_or(|f| "percentiles".contains(f)) {
        for (name, t) in &encoders {
            percentiles(name, t);
        }
        println!("\nDecision including tokenization, one sample per request:");
        println!(
            "| case | tokens | requests | p50 | p90 | p99 | max | p99 of the parts: tokenize / decision |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (name, t) in &encoders {
            tokenized_decision_percentiles(name, t);
        }
        completions_percentiles();
    }
}
