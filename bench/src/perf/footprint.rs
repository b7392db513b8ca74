//! In-process measurements of the picker's library: what a decision costs
//! as pools and prompts grow, and what the prefix index costs in memory,
//! each with the markdown its `perf` subcommand prints. Also the fixtures
//! the criterion micro-benchmarks (benches/picker.rs) use, so both measure
//! the same thing.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    hint::black_box,
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use epp::{
    config::EndpointPickerConfig,
    endpoints::{EndpointSpec, EndpointStore, KvView, MetricsSample},
    kv_events::{Batch, Event, Medium, subscriber::RankState},
    prefix::PrefixIndex,
    request::Prompt,
    scheduling::{Purpose, RequestFacts, Scheduler, SchedulerOptions, build_scheduler},
};

use super::{PerfError, proc_stats::ProcStats};
use crate::report::charts::line_chart;

/// Deterministic prompt text of `bytes` bytes. Prompts of one `group` share
/// everything but their last 64 bytes, like requests sharing a system prompt.
pub fn prompt_text(group: usize, question: usize, bytes: usize) -> String {
    let bytes = bytes.max(128);
    let mut s = format!("System prompt of group {group}. ");
    let mut i = 0u64;
    while s.len() < bytes - 64 {
        let _ = write!(s, "rule {group}-{i} applies to every answer; ");
        i += 1;
    }
    s.truncate(bytes - 64);
    let _ = write!(s, " Question {question}: what is the answer?");
    while s.len() < bytes {
        s.push(' ');
    }
    s.truncate(bytes);
    s
}

/// A store of `endpoints` endpoints with fresh, varied metrics.
pub fn store(endpoints: usize) -> Arc<EndpointStore> {
    let store = Arc::new(EndpointStore::new(Duration::from_secs(3600)));
    let specs = (0..endpoints)
        .map(|i| EndpointSpec {
            name: format!("pod-{i}"),
            address: IpAddr::from([
                10,
                (i / 62500) as u8,
                ((i / 250) % 250) as u8,
                (i % 250) as u8 + 1,
            ]),
            port: 8000,
            labels: BTreeMap::new(),
            metrics_port: None,
            kv_events: None,
        })
        .collect();
    // Pools beyond u16::MAX endpoints are rejected by the store; none here.
    let _ = store.replace(specs);
    let now = Instant::now();
    for (i, e) in store.snapshot().endpoints().iter().enumerate() {
        e.record_scrape(
            &MetricsSample {
                waiting: (i % 5) as u32,
                running: (i % 7) as u32,
                kv_usage: (i % 10) as f64 / 20.0,
                block_size: 16,
                num_blocks: 20_000,
            },
            now,
            store.epoch(),
        );
    }
    store
}

/// A scheduler built from config text.
pub fn scheduler(config: &str, store: &EndpointStore) -> Result<Scheduler, String> {
    build(config, store, false)
}

fn build(config: &str, store: &EndpointStore, kv_events: bool) -> Result<Scheduler, String> {
    let cfg = EndpointPickerConfig::parse(config).map_err(|e| e.to_string())?;
    build_scheduler(
        &cfg,
        &SchedulerOptions {
            fallback_endpoints: 2,
            max_scrape_failures: 3,
            staleness: Duration::from_secs(3600),
            epoch: store.epoch(),
            kv_events,
        },
        Arc::new(PrefixIndex::new()),
    )
    .map_err(|e| e.to_string())
}

/// Routes `n` prompts of `groups` groups so the index holds realistic state.
pub fn warm(s: &Scheduler, store: &EndpointStore, groups: usize, n: usize, bytes: usize) {
    let snap = store.snapshot();
    for i in 0..n {
        let text = prompt_text(i % groups, i, bytes);
        let mut p = Prompt::default();
        p.push(text.as_str());
        let facts = RequestFacts {
            model: "m",
            prompt: Some(&p),
            ..RequestFacts::default()
        };
        let _ = s.schedule(&facts, &snap, Purpose::Route);
    }
}

/// Latency distribution of full decisions, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecisionTimes {
    pub endpoints: usize,
    pub prompt_bytes: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Times `samples` decisions on a warm index.
pub fn decision_times(
    config: &str,
    endpoints: usize,
    prompt_bytes: usize,
    samples: usize,
) -> Result<DecisionTimes, String> {
    let store = store(endpoints);
    let s = scheduler(config, &store)?;
    warm(&s, &store, 50, 2000.min(samples), prompt_bytes);
    let snap = store.snapshot();
    let texts: Vec<String> = (0..256)
        .map(|i| prompt_text(i % 50, 1_000_000 + i, prompt_bytes))
        .collect();
    let mut t = Vec::with_capacity(samples);
    for i in 0..samples {
        let mut p = Prompt::default();
        p.push(texts[i % texts.len()].as_str());
        let facts = RequestFacts {
            model: "m",
            prompt: Some(&p),
            ..RequestFacts::default()
        };
        let start = Instant::now();
        let d = s.schedule(&facts, &snap, Purpose::Route);
        t.push(start.elapsed().as_secs_f64() * 1e6);
        black_box(d.is_ok());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| crate::load::stats::percentile(&t, p).unwrap_or(f64::NAN);
    Ok(DecisionTimes {
        endpoints,
        prompt_bytes,
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        max_us: t.last().copied().unwrap_or(f64::NAN),
    })
}

/// Decision times (default config) for every pool size x prompt size, as a
/// markdown table and two charts written into `out`, which the table links
/// as `perf/<chart>` (perf.md sits beside that directory).
pub fn decisions_report(
    endpoints: &[usize],
    prompts: &[usize],
    samples: usize,
    out: &Path,
) -> Result<String, PerfError> {
    let config = epp::config::DEFAULT_CONFIG;
    let mut grid = Vec::new();
    for &e in endpoints {
        for &p in prompts {
            let t = decision_times(config, e, p, samples).map_err(PerfError::Decisions)?;
            eprintln!(
                "decision: {e} endpoints, {p} B prompt: p50 {:.1} us p99 {:.1} us",
                t.p50_us, t.p99_us
            );
            grid.push(t);
        }
    }
    std::fs::create_dir_all(out).map_err(|source| PerfError::Io {
        action: "creating",
        path: out.to_path_buf(),
        source,
    })?;
    let kib = |b: usize| format!("{} KiB", b / 1024);
    let p99 = |e: usize, p: usize| {
        grid.iter()
            .find(|t| t.endpoints == e && t.prompt_bytes == p)
            .map_or(f64::NAN, |t| t.p99_us)
    };
    let ends: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
    let by_prompt: Vec<(String, Vec<f64>)> = prompts
        .iter()
        .map(|&p| {
            (
                format!("{} prompt", kib(p)),
                endpoints.iter().map(|&e| p99(e, p)).collect(),
            )
        })
        .collect();
    let c1 = out.join("decision-vs-endpoints.png");
    line_chart(
        &c1,
        "Decision time p99 (us) vs endpoints",
        "p99 (us)",
        &ends,
        &by_prompt,
    )?;
    let sizes: Vec<String> = prompts.iter().map(|&p| kib(p)).collect();
    let by_pool: Vec<(String, Vec<f64>)> = endpoints
        .iter()
        .map(|&e| {
            (
                format!("{e} endpoints"),
                prompts.iter().map(|&p| p99(e, p)).collect(),
            )
        })
        .collect();
    let c2 = out.join("decision-vs-prompt.png");
    line_chart(
        &c2,
        "Decision time p99 (us) vs prompt length",
        "p99 (us)",
        &sizes,
        &by_pool,
    )?;
    let mut md = String::new();
    let _ = writeln!(md, "| endpoints | prompt | p50 | p90 | p99 | max |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for t in &grid {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
            t.endpoints,
            kib(t.prompt_bytes),
            t.p50_us,
            t.p90_us,
            t.p99_us,
            t.max_us
        );
    }
    let file = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let _ = writeln!(
        md,
        "\n![decision time vs endpoints](perf/{})\n![decision time vs prompt length](perf/{})",
        file(&c1),
        file(&c2)
    );
    Ok(md)
}

/// Memory of the prefix index holding `blocks` blocks over `endpoints`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexMemory {
    pub blocks: usize,
    pub endpoints: u16,
    /// What the index's own accounting says (slab, map buckets, slots).
    pub bytes_per_block: f64,
    /// Growth of this process's RSS while filling, per block.
    pub rss_bytes_per_block: f64,
    pub rss_mb_after: f64,
}

pub fn index_memory(blocks: usize, endpoints: u16) -> IndexMemory {
    let before = ProcStats::read(std::process::id()).unwrap_or_default();
    let idx = PrefixIndex::new();
    let per = blocks / usize::from(endpoints.max(1));
    let mut next = 1u64;
    for slot in 0..endpoints {
        let mut left = per;
        while left > 0 {
            let len = left.min(256);
            let hashes: Vec<u64> = (next..next + len as u64)
                .map(|h| h.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            next += len as u64;
            idx.record(slot, u64::from(slot) + 1, u32::MAX, &hashes);
            left -= len;
        }
    }
    let after = ProcStats::read(std::process::id()).unwrap_or_default();
    let n = idx.len().max(1) as f64;
    let out = IndexMemory {
        blocks: idx.len(),
        endpoints,
        bytes_per_block: idx.memory_bytes() as f64 / n,
        rss_bytes_per_block: (after.rss_kb.saturating_sub(before.rss_kb) as f64 * 1024.0) / n,
        rss_mb_after: after.rss_kb as f64 / 1024.0,
    };
    black_box(&idx);
    out
}

/// The index memory as a one-row markdown table.
pub fn index_markdown(m: &IndexMemory) -> String {
    format!(
        "| blocks | endpoints | bytes per block (index accounting) | RSS growth per block | process RSS after |\n|---|---|---|---|---|\n| {} | {} | {:.1} B | {:.1} B | {:.1} MiB |\n",
        m.blocks, m.endpoints, m.bytes_per_block, m.rss_bytes_per_block, m.rss_mb_after
    )
}

/// Stores the leading full blocks of `tokens` (block size 16) on `rank`.
pub fn store_chain(rank: &RankState, tokens: &[u32], engine: &mut u64) {
    let blocks = tokens.len() / 16;
    let mut b = Batch::default();
    b.hashes.extend((0..blocks as u64).map(|i| *engine + i));
    *engine += blocks as u64;
    b.tokens.extend_from_slice(&tokens[..blocks * 16]);
    b.events.push(Event::Stored {
        hashes: 0..blocks,
        parent: None,
        tokens: 0..blocks * 16,
        block_size: 16,
        medium: Medium::Gpu,
        lora: None,
        salt: None,
        extra: None,
        group: None,
    });
    rank.apply_batch(&b);
}

/// Makes every endpoint of `store` known by its KV events: `fill(e, rank,
/// engine)` stores what endpoint `e` holds (with [`store_chain`]), and with
/// `unrelated` each endpoint also holds 40 unrelated 4,096-token prompts of
/// its own, the background a precise decision walks past.
pub fn attach_events(
    store: &EndpointStore,
    unrelated: bool,
    mut fill: impl FnMut(usize, &RankState, &mut u64),
) {
    let mut engine = 1u64;
    for (e, ep) in store.snapshot().endpoints().iter().enumerate() {
        let rank = Arc::new(RankState::new(20_000));
        fill(e, &rank, &mut engine);
        if unrelated {
            for k in 0..40usize {
                let other: Vec<u32> = (0..4096u32)
                    .map(|j| 50_000_000 + (e * 40 + k) as u32 * 5000 + j)
                    .collect();
                store_chain(&rank, &other, &mut engine);
            }
        }
        ep.kv_events.set(Some(Arc::new(KvView {
            ranks: vec![rank].into_boxed_slice(),
        })));
    }
}

/// The default config's scheduler with KV events on (the precise path).
pub fn events_scheduler(store: &EndpointStore) -> Result<Scheduler, String> {
    build(epp::config::DEFAULT_CONFIG, store, true)
}
