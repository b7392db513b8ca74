//! The token-exact path: endpoints whose KV-cache events are known answer
//! from real event indexes (`RankState`s fed decoded batches), the others
//! from the approximate index.

use std::sync::Arc;

use super::{
    tests::{idle, prompt},
    *,
};
use crate::{
    config::{DEFAULT_CONFIG, EndpointPickerConfig},
    endpoints::{EndpointStore, KvView, MetricsSample, testing::store_with},
    kv_events::{Batch, Event, Medium, subscriber::RankState},
};

const TEXT: &str = "A system prompt long enough to span several approximate blocks of sixty-four bytes, so the approximate index has something to guess from; then a question.";

fn build(cfg: &str, store: &EndpointStore, kv_events: bool) -> Result<Scheduler, BuildError> {
    build_scheduler(
        &EndpointPickerConfig::parse(cfg).unwrap(),
        &SchedulerOptions {
            fallback_endpoints: 0,
            max_scrape_failures: 3,
            staleness: Duration::from_secs(2),
            epoch: store.epoch(),
            kv_events,
        },
        Arc::new(PrefixIndex::new()),
    )
}

fn tokens(n: u32) -> Vec<u32> {
    (1000..1000 + n).collect()
}

/// Gives the endpoint on `port` one rank, known when `batch` is some (the
/// rank applied it), unknown (subscribed, nothing received) otherwise.
fn events(store: &EndpointStore, port: u16, batch: Option<&Batch>) -> Arc<RankState> {
    let snap = store.snapshot();
    let e = snap.get(&format!("127.0.0.1:{port}")).unwrap();
    let rank = Arc::new(RankState::new(10_000));
    if let Some(b) = batch {
        rank.apply_batch(b);
    }
    e.kv_events.set(Some(Arc::new(KvView {
        ranks: vec![Arc::clone(&rank)].into_boxed_slice(),
    })));
    rank
}

/// A batch storing the first `blocks` blocks of `tokens` in one chain, as
/// vLLM reports a prefill (engine hashes are opaque: `base + i`).
fn stored(tokens: &[u32], bs: u32, blocks: usize, medium: Medium, lora: Option<&str>) -> Batch {
    let mut b = Batch::default();
    let n = blocks * bs as usize;
    b.hashes.extend((0..blocks as u64).map(|i| 7_000 + i));
    b.tokens.extend_from_slice(&tokens[..n]);
    b.events.push(Event::Stored {
        hashes: 0..blocks,
        parent: None,
        tokens: 0..n,
        block_size: bs,
        medium,
        lora: lora.map(crate::kv_events::lora_key),
        salt: None,
        extra: None,
        group: None,
    });
    b
}

fn facts_with<'a>(p: &'a Prompt<'a>, t: Option<&'a [u32]>) -> RequestFacts<'a> {
    RequestFacts {
        model: "m",
        prompt: Some(p),
        tokens: t,
        ..RequestFacts::default()
    }
}

fn explain(s: &Scheduler, store: &EndpointStore, f: &RequestFacts<'_>) -> Vec<ExplainedCandidate> {
    let d = s.schedule(f, &store.snapshot(), Purpose::Explain).unwrap();
    let mut c = d.explanation.unwrap().candidates;
    c.sort_by(|a, b| a.address.cmp(&b.address));
    c
}

fn port(d: &Decision) -> &str {
    d.endpoints[0].host_port.rsplit(':').next().unwrap()
}

/// Routes `p` without tokens to the endpoint on `port` only: the
/// approximate index then guesses that endpoint holds it.
fn approximate_guess(s: &Scheduler, store: &EndpointStore, p: &Prompt<'_>, port: u16) {
    let subset = [format!("127.0.0.1:{port}")];
    let f = RequestFacts {
        subset: Some(&subset),
        ..facts_with(p, None)
    };
    s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap();
}

#[test]
fn a_pod_known_by_events_beats_an_approximate_guess() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let t = tokens(256);
    let p = prompt(TEXT);
    let s = build(DEFAULT_CONFIG, &store, true).unwrap();
    approximate_guess(&s, &store, &p, 1);
    // Pod 1's events say it holds nothing (evicted, say); pod 2's say it
    // holds the whole prompt.
    events(&store, 1, Some(&Batch::default()));
    events(&store, 2, Some(&stored(&t, 16, 16, Medium::Gpu, None)));
    let f = facts_with(&p, Some(&t));
    let ex = explain(&s, &store, &f);
    assert_eq!(ex[0].cached.source, PrefixSource::Events);
    assert_eq!(
        ex[0].cached.gpu_tokens, 0,
        "the approximate guess is not used"
    );
    assert_eq!(
        (
            ex[1].cached.source,
            ex[1].cached.gpu_tokens,
            ex[1].cached.any_tokens
        ),
        (PrefixSource::Events, 256, 256)
    );
    let d = s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap();
    assert_eq!(port(&d), "2");
    assert_eq!(d.prompt_tokens, 256, "exact with token ids");
    assert_eq!(d.prefill_tokens, 0);
    assert_eq!(d.cached.source, PrefixSource::Events);
}

#[test]
fn an_unknown_pod_falls_back_to_the_approximate_index() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let t = tokens(256);
    let p = prompt(TEXT);
    let s = build(DEFAULT_CONFIG, &store, true).unwrap();
    approximate_guess(&s, &store, &p, 1);
    // Pod 1 is subscribed but has no events yet (or lost them); pod 2 is
    // known and holds nothing.
    let rank = events(&store, 1, None);
    events(&store, 2, Some(&Batch::default()));
    let f = facts_with(&p, Some(&t));
    let ex = explain(&s, &store, &f);
    assert_eq!(ex[0].cached.source, PrefixSource::Approximate);
    assert!(ex[0].cached.gpu_tokens > 0, "{:?}", ex[0].cached);
    assert_eq!(ex[1].cached.source, PrefixSource::Events);
    let d = s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap();
    assert_eq!(port(&d), "1");
    // Once pod 1's events arrive (without the prompt), they answer.
    rank.apply_batch(&Batch::default());
    let ex = explain(&s, &store, &f);
    assert_eq!(
        (ex[0].cached.source, ex[0].cached.gpu_tokens),
        (PrefixSource::Events, 0)
    );
}

#[test]
fn gpu_blocks_beat_offloaded_ones_and_tier_weights_apply() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let t = tokens(256);
    let p = prompt(TEXT);
    events(&store, 1, Some(&stored(&t, 16, 16, Medium::Cpu, None)));
    events(&store, 2, Some(&stored(&t, 16, 16, Medium::Gpu, None)));
    let f = facts_with(&p, Some(&t));
    let s = build(
        "plugins:\n- type: precise-prefix-cache-scorer\n",
        &store,
        true,
    )
    .unwrap();
    let ex = explain(&s, &store, &f);
    assert_eq!((ex[0].cached.gpu_tokens, ex[0].cached.any_tokens), (0, 256));
    assert_eq!(ex[0].scores[0].1, 0.8, "llm-d's cpu weight");
    assert_eq!(ex[1].scores[0].1, 1.0);
    assert_eq!(
        port(&s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap()),
        "2"
    );
    let weighted = "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n    indexerConfig:\n      kvCacheBackendConfigs: [{name: gpu, weight: 1.0}, {name: cpu, weight: 0.5}]\n";
    let s = build(weighted, &store, true).unwrap();
    assert_eq!(explain(&s, &store, &f)[0].scores[0].1, 0.5);
    // The prefill cost counts an offloaded token as mostly cached.
    let s = build(DEFAULT_CONFIG, &store, true).unwrap();
    let subset = ["127.0.0.1:1".to_owned()];
    let only_cpu = RequestFacts {
        subset: Some(&subset),
        ..f
    };
    let d = s
        .schedule(&only_cpu, &store.snapshot(), Purpose::Explain)
        .unwrap();
    let credit = (256.0 * precise::OFFLOADED_TOKEN_CREDIT) as u32;
    assert_eq!(d.prefill_tokens, 256 - credit);
}

#[test]
fn each_pod_is_keyed_with_its_own_block_size() {
    let store = store_with(
        &[1, 2, 3],
        &[
            idle(),
            idle(),
            MetricsSample {
                block_size: 32,
                ..idle()
            },
        ],
    );
    let t = tokens(300);
    let p = prompt(TEXT);
    events(&store, 1, Some(&stored(&t, 16, 8, Medium::Gpu, None)));
    events(&store, 2, Some(&stored(&t, 64, 3, Medium::Gpu, None)));
    // Pod 3's events have stored nothing yet: its scraped block size keys it.
    events(&store, 3, Some(&Batch::default()));
    let s = build(DEFAULT_CONFIG, &store, true).unwrap();
    let ex = explain(&s, &store, &facts_with(&p, Some(&t)));
    let got: Vec<u32> = ex.iter().map(|c| c.cached.gpu_tokens).collect();
    assert_eq!(got, vec![128, 192, 0]);
    let d = s
        .schedule(&facts_with(&p, Some(&t)), &store.snapshot(), Purpose::Route)
        .unwrap();
    assert_eq!(port(&d), "2");
    assert_eq!(d.prefill_tokens, 300 - 192);
}

#[test]
fn lora_blocks_match_only_requests_for_that_adapter() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let t = tokens(128);
    let p = prompt(TEXT);
    events(
        &store,
        1,
        Some(&stored(&t, 16, 8, Medium::Gpu, Some("sql"))),
    );
    events(&store, 2, Some(&stored(&t, 16, 8, Medium::Gpu, None)));
    let snap = store.snapshot();
    snap.get("127.0.0.1:1")
        .unwrap()
        .lora
        .observe(Some(&crate::endpoints::LoraSeries {
            running: b"sql",
            waiting: b"",
            max_lora: b"2",
        }));
    let s = build(
        "plugins:\n- type: precise-prefix-cache-scorer\n",
        &store,
        true,
    )
    .unwrap();
    let base = RequestFacts {
        model: "base",
        ..facts_with(&p, Some(&t))
    };
    let ex = explain(&s, &store, &base);
    assert_eq!((ex[0].cached.gpu_tokens, ex[1].cached.gpu_tokens), (0, 128));
    let adapter = RequestFacts {
        model: "sql",
        ..base
    };
    let ex = explain(&s, &store, &adapter);
    assert_eq!((ex[0].cached.gpu_tokens, ex[1].cached.gpu_tokens), (128, 0));
}

#[test]
fn explain_and_the_log_line_say_which_index_answered() {
    let store = store_with(&[1, 2, 3], &[idle(), idle(), idle()]);
    let t = tokens(64);
    let p = prompt(TEXT);
    events(&store, 1, Some(&stored(&t, 16, 2, Medium::Gpu, None)));
    let s = build(DEFAULT_CONFIG, &store, true).unwrap();
    let d = s
        .schedule(
            &facts_with(&p, Some(&t)),
            &store.snapshot(),
            Purpose::Explain,
        )
        .unwrap();
    let ex = d.explanation.unwrap();
    let by_port = |p: &str| {
        ex.candidates
            .iter()
            .find(|c| c.address.ends_with(p))
            .unwrap()
            .cached
    };
    assert_eq!(
        by_port(":1"),
        CachedPrefix {
            source: PrefixSource::Events,
            gpu_tokens: 32,
            any_tokens: 32
        }
    );
    assert_eq!(by_port(":2").source, PrefixSource::Approximate);
    let line = ex.to_string();
    assert!(
        line.contains("127.0.0.1:1 total=") && line.contains("prefix=events:32/32"),
        "{line}"
    );
    assert!(line.contains("prefix=approximate:0/0"), "{line}");
    // No prefix-aware plugin: no index answers.
    let s = build("plugins:\n- type: queue-scorer\n", &store, true).unwrap();
    let ex = explain(&s, &store, &facts_with(&p, Some(&t)));
    assert!(ex.iter().all(|c| c.cached.source == PrefixSource::None));
}

#[test]
fn a_request_without_tokens_behaves_as_before() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let t = tokens(256);
    let p = prompt(TEXT);
    events(&store, 1, Some(&stored(&t, 16, 16, Medium::Gpu, None)));
    events(&store, 2, Some(&Batch::default()));
    let with = build(DEFAULT_CONFIG, &store, true).unwrap();
    let without = build(DEFAULT_CONFIG, &store, false).unwrap();
    assert!(with.event_settings().is_some() && without.event_settings().is_none());
    approximate_guess(&with, &store, &p, 2);
    approximate_guess(&without, &store, &p, 2);
    let f = facts_with(&p, None);
    for s in [&with, &without] {
        let ex = explain(s, &store, &f);
        assert!(
            ex.iter()
                .all(|c| c.cached.source == PrefixSource::Approximate)
        );
        let d = s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap();
        assert_eq!(port(&d), "2", "the approximate index's guess");
        assert_eq!(d.prompt_tokens, TEXT.len() as u32 / BYTES_PER_TOKEN);
        assert_eq!(d.matched_blocks, d.prompt_blocks);
        assert_eq!(
            d.prefill_tokens,
            d.prompt_tokens - d.matched_blocks * d.block_tokens
        );
    }
    // With tokens but events off, the approximate index answers too.
    let ex = explain(&without, &store, &facts_with(&p, Some(&t)));
    assert!(
        ex.iter()
            .all(|c| c.cached.source == PrefixSource::Approximate)
    );
}

#[test]
fn a_burst_of_one_prompt_stays_on_its_first_pick_until_events_arrive() {
    let store = store_with(&[1, 2, 3, 4], &[idle(), idle(), idle(), idle()]);
    let t = tokens(512);
    let p = prompt(TEXT);
    for port in 1..=4 {
        events(&store, port, Some(&Batch::default()));
    }
    let s = build(DEFAULT_CONFIG, &store, true).unwrap();
    let f = facts_with(&p, Some(&t));
    let first = s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap();
    assert_eq!(first.cached.gpu_tokens, 0);
    // Keep each routed request in flight, as the director does, so an
    // endpoint that holds nothing looks cheaper than a busy one.
    let mut guards = vec![first.endpoints[0].begin_request(first.prefill_tokens)];
    for _ in 0..8 {
        let d = s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap();
        assert!(Arc::ptr_eq(&d.endpoints[0], &first.endpoints[0]));
        assert_eq!(
            (d.cached.source, d.cached.gpu_tokens),
            (PrefixSource::Events, 512),
            "speculated"
        );
        guards.push(d.endpoints[0].begin_request(d.prefill_tokens));
    }
    // Without speculation (llm-d's default for its plugin) the burst spreads.
    let s = build("plugins:\n- type: precise-prefix-cache-scorer\n- type: queue-scorer\n- type: active-request-scorer\n", &store, true).unwrap();
    let d = s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap();
    assert!(!Arc::ptr_eq(&d.endpoints[0], &first.endpoints[0]));
    drop(guards);
}

#[test]
fn precise_scorer_parameters_follow_llm_d() {
    let store = store_with(&[1], &[idle()]);
    let full = r#"plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {blockSize: 64, hashSeed: "12345"}
    kvEventsConfig: {topicFilter: "kv@", concurrency: 4, discoverPods: true}
    indexerConfig:
      tokenizersPoolConfig: {modelName: m}
      kvBlockIndexConfig: {enableMetrics: true}
    speculativeIndexing: true
    speculativeTTL: 500ms
"#;
    let s = build(full, &store, true).unwrap();
    assert_eq!(
        s.event_settings(),
        Some(EventSettings {
            block_size_tokens: 64,
            speculative_ttl: Some(Duration::from_millis(500)),
        })
    );
    let plain = build(
        "plugins:\n- type: precise-prefix-cache-scorer\n",
        &store,
        false,
    )
    .unwrap();
    assert_eq!(
        plain.event_settings().map(|e| e.speculative_ttl),
        Some(None),
        "llm-d's default: no speculation; and the plugin alone turns the token path on"
    );
    // The built-in default with events: speculation on.
    let d = build(DEFAULT_CONFIG, &store, true).unwrap();
    assert_eq!(d.event_settings(), Some(EventSettings::default()));
    for (bad, why) in [
        ("tokenProcessorConfig: {blockSize: 16, bogus: 1}", "bogus"),
        ("tokenProcessorConfig: {blockSize: 0}", "blockSize"),
        (
            "indexerConfig: {kvCacheBackendConfigs: [{name: disk, weight: 0.5}]}",
            "disk",
        ),
        (
            "indexerConfig: {kvCacheBackendConfigs: [{name: cpu, weight: -1}]}",
            "weight",
        ),
        ("speculativeTTL: soon", "speculativeTTL"),
    ] {
        let cfg =
            format!("plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n    {bad}\n");
        let e = build(&cfg, &store, true).unwrap_err();
        assert!(
            matches!(&e, BuildError::Parameters { message, .. } if message.contains(why)),
            "{bad}: {e}"
        );
    }
}
