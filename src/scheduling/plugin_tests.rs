//! The llm-d and GIE plugins beyond GIE's default profile: load, saturation,
//! context length and cold-request spreading.

use std::time::Instant;

use super::{
    tests::{
        assert_parameters_refused, build_one, facts, idle, kept_by, labelled_store, prompt,
        scheduler, try_scheduler,
    },
    *,
};
use crate::endpoints::{EndpointStore, InFlightGuard, MetricsSample, testing::store_with};

/// Routes `n` requests to the endpoint on `port` outside the scheduler, each
/// with `tokens` prompt tokens still to prefill; the guards hold them.
fn load(store: &EndpointStore, port: u16, n: usize, tokens: u32) -> Vec<InFlightGuard> {
    let snap = store.snapshot();
    let e = snap.get(&format!("127.0.0.1:{port}")).unwrap();
    (0..n).map(|_| e.begin_request(tokens)).collect()
}

/// The scores one scorer gives each endpoint, by port.
fn scores(cfg: &str, store: &EndpointStore, f: &RequestFacts<'_>) -> Vec<(u16, f64)> {
    let s = scheduler(cfg, 8, store);
    let d = s.schedule(f, &store.snapshot(), Purpose::Explain).unwrap();
    let mut out: Vec<(u16, f64)> = d
        .explanation
        .unwrap()
        .candidates
        .iter()
        .filter(|c| c.filtered_by.is_none())
        .map(|c| {
            let port = c.address.rsplit(':').next().unwrap().parse().unwrap();
            (port, c.scores[0].1)
        })
        .collect();
    out.sort_by_key(|&(p, _)| p);
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn token_load_counts_unprefilled_tokens_and_this_request() {
    let store = store_with(&[1, 2, 3], &[idle(), idle(), idle()]);
    let _a = load(&store, 1, 2, 1_000);
    let _b = load(&store, 2, 1, 4_000_000);
    let cfg = "plugins:\n- type: token-load-scorer\n  parameters: {queueThresholdTokens: 10000}\n";
    let p = prompt("0123456789abcdefghijklmnopqrstuvwxyz0123"); // 40 bytes, 10 tokens
    let got = scores(cfg, &store, &facts(&p));
    assert!(close(got[0].1, 1.0 - 2_010.0 / 10_000.0), "{got:?}");
    assert_eq!(got[1].1, 0.0, "above the threshold");
    assert!(close(got[2].1, 1.0 - 10.0 / 10_000.0), "{got:?}");
    // A first response byte releases the tokens, as llm-d's producer does.
    let mut b = _b;
    b[0].prefill_done();
    assert!(close(scores(cfg, &store, &facts(&p))[1].1, 0.999));
    // Non-positive thresholds fall back to llm-d's default.
    let got = scores(
        "plugins:\n- type: token-load-scorer\n  parameters: {queueThresholdTokens: 0}\n",
        &store,
        &facts(&p),
    );
    assert!(close(got[2].1, 1.0 - 10.0 / 4_194_304.0), "{got:?}");
}

#[test]
fn inflight_load_producer_is_our_accounting_but_not_output_estimates() {
    assert!(build_one("inflight-load-producer", "{outputRatio: 2}").is_ok());
    let err = build_one("inflight-load-producer", "{addEstimatedOutputTokens: true}")
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            BuildError::Unsupported {
                plugin_type: "inflight-load-producer",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn concurrency_detector_filters_at_the_limit_and_sheds_at_capacity() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let cfg = "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 2}\n- type: queue-scorer\n";
    let _a = load(&store, 1, 2, 0);
    assert_eq!(kept_by(cfg, &store).unwrap(), vec![2], "at the limit");
    let with_headroom = "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 2, headroom: 0.5}\n- type: queue-scorer\n";
    assert_eq!(
        kept_by(with_headroom, &store).unwrap(),
        vec![1, 2],
        "limit 3"
    );

    // Shedding: the pool is saturated once the total reaches total capacity.
    let p = prompt("x");
    let sheddable = RequestFacts {
        priority: -1,
        ..facts(&p)
    };
    let shed = |cfg: &str| {
        scheduler(cfg, 0, &store)
            .schedule(&sheddable, &store.snapshot(), Purpose::Explain)
            .err()
            .map(|e| e.http_status())
    };
    let detector_only = "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 2}\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n";
    assert_eq!(shed(detector_only), None, "2 of 4");
    let _b = load(&store, 2, 2, 0);
    assert_eq!(shed(detector_only), Some(429), "4 of 4");
    assert!(
        scheduler(detector_only, 0, &store)
            .schedule(&facts(&p), &store.snapshot(), Purpose::Explain)
            .is_ok(),
        "priority 0 is never shed"
    );

    // Tokens and hybrid modes count prompt tokens not yet prefilled.
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let _t = load(&store, 1, 1, 600);
    let tokens = "plugins:\n- type: concurrency-detector\n  parameters: {concurrencyMode: tokens, maxTokenConcurrency: 500}\n";
    assert_eq!(kept_by(tokens, &store).unwrap(), vec![2]);
    let _r = load(&store, 2, 3, 0);
    let hybrid = "plugins:\n- type: concurrency-detector\n  parameters: {concurrencyMode: hybrid, maxConcurrency: 3, maxTokenConcurrency: 500}\n";
    assert!(matches!(
        kept_by(hybrid, &store),
        Err(ScheduleError::Filtered(_))
    ));
    let d = ConcurrencyDetector {
        concurrency_mode: ConcurrencyMode::Hybrid,
        max_concurrency: 3,
        max_token_concurrency: 500,
        headroom: 0.0,
    };
    let snap = store.snapshot();
    let c: Vec<Candidate<'_>> = snap
        .endpoints()
        .iter()
        .map(|e| Candidate::read(e, true))
        .collect();
    // Endpoint 1: max(1/3, 600/500); endpoint 2: max(3/3, 0).
    assert!(close(d.saturation(&c), (1.2 + 1.0) / 2.0));

    assert_parameters_refused(
        "concurrency-detector",
        &[
            "{maxConcurrency: 0}",
            "{maxTokenConcurrency: 0}",
            "{headroom: -0.1}",
            "{concurrencyMode: bytes}",
        ],
    );
}

#[test]
fn the_saturation_detector_reference_must_name_a_detector() {
    let store = store_with(&[1], &[idle()]);
    let cfg = "plugins:\n- type: queue-scorer\n- type: concurrency-detector\nsaturationDetector: {pluginRef: concurrency-detector}\n";
    let _ = scheduler(cfg, 0, &store);
    let text = "plugins:\n- type: queue-scorer\nsaturationDetector: {pluginRef: queue-scorer}\n";
    let err = try_scheduler(text, 0, &store).err().unwrap();
    assert!(matches!(err, BuildError::Parameters { .. }), "{err}");
}

#[test]
fn utilization_filter_caps_metrics() {
    let store = store_with(
        &[1, 2, 3],
        &[
            MetricsSample {
                waiting: 9,
                ..idle()
            },
            MetricsSample {
                kv_usage: 0.95,
                running: 4,
                ..idle()
            },
            idle(),
        ],
    );
    let _a = load(&store, 3, 3, 0);
    let cfg = |conditions: &str, fallback: bool| {
        format!(
            "plugins:\n- type: utilization-filter\n  parameters: {{conditions: {conditions}, fallbackOnEmpty: {fallback}}}\n"
        )
    };
    assert_eq!(
        kept_by(
            &cfg("[{metric: waiting-queue, maxValue: 5}]", false),
            &store
        )
        .unwrap(),
        vec![2, 3],
        "routed-but-unscraped requests count as waiting: 3 on endpoint 3"
    );
    assert_eq!(
        kept_by(&cfg("[{metric: kv-cache-utilization, maxValue: 0.9}, {metric: active-requests, maxValue: 2}]", false), &store).unwrap(),
        vec![1]
    );
    assert_eq!(
        kept_by(
            &cfg("[{metric: running-requests, maxValue: 3}]", false),
            &store
        )
        .unwrap(),
        vec![1, 3]
    );
    let none = "[{metric: waiting-queue, maxValue: 0}, {metric: running-requests, maxValue: 0}]";
    assert!(matches!(
        kept_by(&cfg(none, false), &store),
        Err(ScheduleError::Filtered(_))
    ));
    assert_eq!(
        kept_by(&cfg(none, true), &store).unwrap(),
        vec![1, 2, 3],
        "fallbackOnEmpty"
    );
    assert_parameters_refused(
        "utilization-filter",
        &[
            "{conditions: []}",
            "{conditions: [{metric: waiting-queue}]}",
            "{conditions: [{metric: kv-cache-utilization, maxValue: 2}]}",
            "{conditions: [{metric: queue, maxValue: 2}]}",
            "null",
        ],
    );
}

#[test]
fn context_length_aware_scores_ranges_as_llm_d() {
    let store = labelled_store(&[
        "llm-d.ai/context-length-range=0-2048",
        "llm-d.ai/context-length-range=0-100000",
        "llm-d.ai/context-length-range=4096-8192",
        "",
        "llm-d.ai/context-length-range=big",
    ]);
    let text: &'static str = "x".repeat(4 * 1000).leak(); // 1,000 tokens
    let p = prompt(text);
    let got = scores(
        "plugins:\n- type: context-length-aware\n",
        &store,
        &facts(&p),
    );
    let in_range = |lo: f64, hi: f64| {
        let width = hi - lo;
        0.3 + (0.7 / (1.0 + width / 10_000.0) + 0.3 * (hi - 1000.0) / width) * 0.7
    };
    assert!(close(got[0].1, in_range(0.0, 2048.0)), "{got:?}");
    assert!(close(got[1].1, in_range(0.0, 100_000.0)), "{got:?}");
    assert!(got[0].1 > got[1].1, "the narrow range wins");
    assert!(close(got[2].1, 0.3 / (1.0 + 3096.0 / 1000.0)), "{got:?}");
    assert!(got[2].1 < 0.3 && got[1].1 > 0.3);
    assert_eq!(got[3].1, 0.5, "no label is neutral");
    assert_eq!(got[4].1, 0.0, "an unparsable label");

    let filtering =
        "plugins:\n- type: context-length-aware\n  parameters: {enableFiltering: true}\n";
    assert_eq!(
        kept_by(filtering, &store).unwrap_or_default(),
        vec![1, 2, 4]
    );
    let s = scheduler(filtering, 8, &store);
    let d = s
        .schedule(&facts(&p), &store.snapshot(), Purpose::Explain)
        .unwrap();
    let mut ports: Vec<u16> = d.endpoints.iter().map(|e| e.spec.port).collect();
    ports.sort_unstable();
    assert_eq!(
        ports,
        vec![1, 2, 4],
        "out of range and unparsable labels are filtered"
    );

    assert_eq!(scores::parse("0-2048"), Some((0, 2048)));
    assert_eq!(scores::parse(" 10 - 20 "), Some((10, 20)));
    for bad in ["", "5", "20-10", "a-b", "1-2-3", "-1-5"] {
        assert_eq!(scores::parse(bad), None, "{bad}");
    }
    assert_parameters_refused("context-length-aware", &["{label: ''}"]);
}

mod scores {
    pub fn parse(s: &str) -> Option<(u64, u64)> {
        crate::scheduling::scorers::parse_context_range(s)
    }
}

#[test]
fn no_hit_lru_spreads_cold_requests_and_leaves_warm_ones_to_the_cache() {
    let store = store_with(&[1, 2, 3], &[idle(), idle(), idle()]);
    let cfg = "plugins:\n- type: no-hit-lru-scorer\n";
    let s = scheduler(cfg, 0, &store);
    let snap = store.snapshot();
    // Cold requests (distinct prompts, nothing cached): each endpoint once
    // before any twice, then in least-recently-used order.
    let texts: Vec<String> = (0..6)
        .map(|i| format!("{i} {}", "cold prompt ".repeat(20)))
        .collect();
    let mut picks = Vec::new();
    for t in &texts {
        let mut p = Prompt::default();
        p.push(t);
        let d = s.schedule(&facts(&p), &snap, Purpose::Route).unwrap();
        picks.push(d.endpoints[0].spec.port);
    }
    let mut first: Vec<u16> = picks[..3].to_vec();
    first.sort_unstable();
    assert_eq!(first, vec![1, 2, 3], "{picks:?}");
    assert_eq!(
        picks[3..],
        picks[..3],
        "least recently used first: {picks:?}"
    );

    // A warm request (its prefix is cached somewhere) gets 0.5 everywhere.
    let mut p = Prompt::default();
    p.push(&texts[0]);
    let d = s.schedule(&facts(&p), &snap, Purpose::Explain).unwrap();
    let ex = d.explanation.unwrap();
    assert!(ex.candidates.iter().all(|c| c.scores[0].1 == 0.5), "{ex}");

    // Explaining records nothing.
    let fresh = scheduler(cfg, 0, &store);
    let mut p = Prompt::default();
    p.push("never routed, only explained, long enough to be hashed into blocks");
    for _ in 0..3 {
        let d = fresh.schedule(&facts(&p), &snap, Purpose::Explain).unwrap();
        let ex = d.explanation.unwrap();
        let mut s: Vec<f64> = ex.candidates.iter().map(|c| c.scores[0].1).collect();
        s.sort_by(f64::total_cmp);
        assert_eq!(
            s,
            vec![0.0, 0.5, 1.0],
            "never-used ranks in candidate order"
        );
    }
}

#[test]
fn no_hit_lru_remembers_at_most_lru_size_endpoints() {
    let ports: Vec<u16> = (1..=6).collect();
    let store = store_with(&ports, &[idle(); 6]);
    let snap = store.snapshot();
    let c: Vec<Candidate<'_>> = snap
        .endpoints()
        .iter()
        .map(|e| Candidate::read(e, true))
        .collect();
    let lru = scorers::NoHitLruScorer::new(&scorers::NoHitLruParams { lru_size: 2 });
    let p = prompt("x");
    let f = facts(&p);
    let cycle = Cycle {
        facts: &f,
        now: Instant::now(),
        prompt_tokens: 0,
        match_tokens: 0,
        block_tokens: 16,
        prompt_blocks: 1,
        adapter_request: false,
    };
    for pick in [0, 1, 2, 3, 4, 5, 0, 3] {
        lru.picked(&cycle, &c, pick);
        assert!(lru.remembered() <= 2);
    }
    // Remembered: 0 (older), 3 (newer); the others rank first, in order.
    let mut out = vec![0.0; 6];
    lru.score(&cycle, &c, &mut out);
    let want = [0.2, 1.0, 0.8, 0.0, 0.6, 0.4];
    assert!(out.iter().zip(want).all(|(a, b)| close(*a, b)), "{out:?}");
    // Default size, and non-positive sizes fall back to it.
    let lru = scorers::NoHitLruScorer::new(&scorers::NoHitLruParams { lru_size: -1 });
    assert_eq!(lru.capacity(), scorers::NoHitLruScorer::DEFAULT_LRU_SIZE);
}

/// Sets an endpoint's LoRA state as a scrape of vLLM's gauge would.
fn set_lora(store: &EndpointStore, port: u16, running: &str, waiting: &str, max: &str) {
    let snap = store.snapshot();
    let e = snap.get(&format!("127.0.0.1:{port}")).unwrap();
    e.lora.observe(Some(&crate::endpoints::LoraSeries {
        running: running.as_bytes(),
        waiting: waiting.as_bytes(),
        max_lora: max.as_bytes(),
    }));
}

fn model_facts<'a>(p: &'a Prompt<'a>, model: &'a str) -> RequestFacts<'a> {
    RequestFacts { model, ..facts(p) }
}

#[test]
fn lora_affinity_scores_gie_tiers() {
    let store = store_with(&[1, 2, 3, 4, 5], &[idle(); 5]);
    set_lora(&store, 1, "sql,chat", "", "2"); // loaded
    set_lora(&store, 2, "chat", "", "2"); // a free slot
    set_lora(&store, 3, "chat", "sql", "2"); // waiting, full
    set_lora(&store, 4, "chat,tts", "", "2"); // full without it
    let p = prompt("x");
    let cfg = "plugins:\n- type: lora-affinity-scorer\n";
    let got: Vec<f64> = scores(cfg, &store, &model_facts(&p, "sql"))
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert_eq!(
        got,
        vec![1.0, 0.8, 0.6, 0.0, 0.0],
        "port 5 reports no gauge"
    );
    // A free slot ranks above a queued load, as in GIE.
    set_lora(&store, 3, "", "sql", "2");
    assert_eq!(scores(cfg, &store, &model_facts(&p, "sql"))[2].1, 0.8);
}

#[test]
fn the_default_never_prefers_an_endpoint_that_must_evict() {
    let store = store_with(&[1, 2, 3], &[idle(); 3]);
    set_lora(&store, 1, "chat,tts", "", "2"); // must evict, idle
    set_lora(&store, 2, "chat", "", "2"); // free slot, very busy
    set_lora(&store, 3, "sql,chat", "", "2"); // loaded, busy
    let _busy2 = load(&store, 2, 40, 5_000);
    let _busy3 = load(&store, 3, 40, 5_000);
    let s = scheduler(crate::config::DEFAULT_CONFIG, 2, &store);
    let snap = store.snapshot();
    let p = prompt("a short question");
    let order = |model: &str| -> Vec<u16> {
        let d = s
            .schedule(&model_facts(&p, model), &snap, Purpose::Explain)
            .unwrap();
        d.endpoints.iter().map(|e| e.spec.port).collect()
    };
    assert_eq!(
        order("sql"),
        vec![3, 2, 1],
        "loaded, then a free slot, evicting last"
    );
    // Once no endpoint lists "sql" (its requests finished: vLLM keeps it
    // loaded but reports it nowhere), it is still an adapter to a scheduler
    // that routed a request for it while an endpoint reported it.
    let first = s
        .schedule(&model_facts(&p, "sql"), &snap, Purpose::Route)
        .unwrap();
    assert_eq!(first.endpoints[0].spec.port, 3);
    set_lora(&store, 3, "chat,tts", "", "2");
    assert_eq!(
        order("sql"),
        vec![2, 1, 3],
        "the free slot first, whatever its queue; then the cheaper of the two that must evict"
    );
    let unaware = scheduler(crate::config::DEFAULT_CONFIG, 2, &store);
    let d = unaware
        .schedule(&model_facts(&p, "sql"), &snap, Purpose::Explain)
        .unwrap();
    assert_eq!(
        d.endpoints[0].spec.port, 1,
        "an adapter never reported is taken for a base model"
    );
    // Not an adapter (the base model, or an adapter nobody reports): the
    // LoRA term is off and the idle endpoint wins.
    assert_eq!(order("base-model")[0], 1);

    // Without load, loading into a free slot costs loraLoadTokens more than
    // having the adapter.
    let store = store_with(&[1, 2], &[idle(); 2]);
    set_lora(&store, 1, "", "", "1");
    set_lora(&store, 2, "sql", "", "1");
    let snap = store.snapshot();
    let s = scheduler(crate::config::DEFAULT_CONFIG, 1, &store);
    for _ in 0..20 {
        let d = s
            .schedule(&model_facts(&p, "sql"), &snap, Purpose::Explain)
            .unwrap();
        assert_eq!(d.endpoints[0].spec.port, 2);
    }
    let cfg = "plugins:\n- type: prefill-cost-scorer\n  parameters: {loraLoadTokens: 0}\n";
    let got = scores(cfg, &store, &model_facts(&p, "sql"));
    assert_eq!((got[0].1, got[1].1), (1.0, 1.0), "no load cost: a tie");
}

#[test]
fn lora_state_read_from_captured_pages_and_synthetic_series() {
    use crate::scrape::{EngineMapping, extract_lora, extract_signals};
    let vllm = EngineMapping::vllm();
    let spec = vllm.lora.clone().unwrap();
    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/metrics/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let store = store_with(&[1, 2, 3], &[idle(); 3]);
    let snap = store.snapshot();
    let pages = [
        fixture("vllm-metrics-inferstack.txt"),
        [
            fixture("vllm-metrics-hwrouter-loaded.txt"),
            b"vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"sql\",waiting_lora_adapters=\"\"} 1.7e9\n".to_vec(),
        ]
        .concat(),
        [
            fixture("vllm-metrics-hwrouter-idle.txt"),
            b"vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"sql\",waiting_lora_adapters=\"\"} 1.6e9\nvllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 1.8e9\n".to_vec(),
        ]
        .concat(),
    ];
    for (e, page) in snap.endpoints().iter().zip(&pages) {
        let (sample, _) = extract_signals(page, &vllm).unwrap();
        e.record_scrape(&sample, Instant::now(), store.epoch());
        e.lora.observe(extract_lora(page, &spec).as_ref());
    }
    assert!(
        snap.endpoints()[0].lora.get().is_none(),
        "no gauge on a captured page"
    );
    let p = prompt("x");
    let got: Vec<f64> = scores(
        "plugins:\n- type: lora-affinity-scorer\n",
        &store,
        &model_facts(&p, "sql"),
    )
    .into_iter()
    .map(|(_, s)| s)
    .collect();
    assert_eq!(
        got,
        vec![0.0, 1.0, 0.8],
        "the newest series: sql no longer running on 3"
    );
    let s = scheduler(crate::config::DEFAULT_CONFIG, 2, &store);
    let d = s
        .schedule(&model_facts(&p, "sql"), &snap, Purpose::Explain)
        .unwrap();
    let order: Vec<u16> = d.endpoints.iter().map(|e| e.spec.port).collect();
    assert_eq!(
        order,
        vec![2, 3, 1],
        "loaded, free slot, then the pod without LoRA"
    );
}

fn session_facts<'a>(p: &'a Prompt<'a>, token: &'a str) -> RequestFacts<'a> {
    RequestFacts {
        session_token: Some(token),
        ..facts(p)
    }
}

#[test]
fn session_affinity_scores_and_pins_only_discovered_endpoints() {
    let store = store_with(&[1, 2, 3], &[idle(); 3]);
    let snap = store.snapshot();
    let two = session::token(snap.get("127.0.0.1:2").unwrap());
    let p = prompt("x");
    let got = scores(
        "plugins:\n- type: session-affinity-scorer\n",
        &store,
        &session_facts(&p, &two),
    );
    assert_eq!(got, vec![(1, 0.0), (2, 1.0), (3, 0.0)]);
    let filter = "plugins:\n- type: session-affinity-filter\n- type: queue-scorer\n";
    let kept = |token: &str| -> Vec<u16> {
        let s = scheduler(filter, 8, &store);
        let d = s
            .schedule(&session_facts(&p, token), &snap, Purpose::Explain)
            .unwrap();
        let mut ports: Vec<u16> = d.endpoints.iter().map(|e| e.spec.port).collect();
        ports.sort_unstable();
        ports
    };
    assert_eq!(kept(&two), vec![2]);
    // A token naming no candidate, an address, or garbage: no preference.
    let forged = [
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "127.0.0.1:2"),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "ep-9"),
        "!!".to_owned(),
        String::new(),
    ];
    for t in &forged {
        assert_eq!(kept(t), vec![1, 2, 3], "{t:?}");
        let got = scores(
            "plugins:\n- type: session-affinity-scorer\n",
            &store,
            &session_facts(&p, t),
        );
        assert!(got.iter().all(|&(_, s)| s == 0.0), "{t:?}: {got:?}");
    }
    // The named endpoint outside the subset hint is not a candidate.
    let subset = vec!["127.0.0.1:1".to_owned()];
    let s = scheduler(filter, 8, &store);
    let d = s
        .schedule(
            &RequestFacts {
                subset: Some(&subset),
                ..session_facts(&p, &two)
            },
            &snap,
            Purpose::Explain,
        )
        .unwrap();
    assert_eq!(d.destination(), "127.0.0.1:1");
}

#[test]
fn session_plugins_configure_one_header() {
    let store = store_with(&[1], &[idle()]);
    let s = scheduler("plugins:\n- type: queue-scorer\n", 0, &store);
    assert!(s.session_header().is_none(), "only when configured");
    let s = scheduler(
        "plugins:\n- type: session-affinity-scorer\n  parameters: {encodedEndpointHeaderConfig: {header: X-Sticky}}\n- type: session-affinity-filter\n  parameters: {encodedEndpointHeaderConfig: {header: x-sticky}}\n",
        0,
        &store,
    );
    assert_eq!(s.session_header().map(|h| &**h), Some("x-sticky"));
    let declared_only = "plugins:\n- type: session-affinity-scorer\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n";
    assert!(
        scheduler(declared_only, 0, &store)
            .session_header()
            .is_none()
    );

    let err = build_one(
        "session-affinity-scorer",
        "{strategy: session_id, sessionIdConfig: {sources: [{header: x-session-id}]}}",
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            err,
            BuildError::Unsupported {
                plugin_type: "session-affinity-scorer",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("nearest: strategy encoded_endpoint_header")
    );
    assert!(matches!(
        build_one("session-affinity-filter", "{profileName: prefill}"),
        Err(BuildError::Unsupported {
            plugin_type: "session-affinity-filter",
            ..
        })
    ));
    let mixed = "plugins:\n- type: session-affinity-scorer\n- type: session-affinity-filter\n  parameters: {encodedEndpointHeaderConfig: {header: other}}\n";
    let err = try_scheduler(mixed, 0, &store).err().unwrap();
    assert!(matches!(err, BuildError::Parameters { .. }), "{err}");
}

#[test]
fn utilization_detector_headroom_relaxes_the_filter_only() {
    let busy = MetricsSample {
        waiting: 6,
        ..idle()
    };
    let store = store_with(&[1, 2], &[busy, idle()]);
    let cfg = |h: &str| {
        format!("plugins:\n- type: utilization-detector\n  parameters: {{headroom: {h}}}\n")
    };
    assert_eq!(kept_by(&cfg("0"), &store).unwrap(), vec![2], "6 > 5");
    assert_eq!(
        kept_by(&cfg("0.2"), &store).unwrap(),
        vec![1, 2],
        "6 <= 5 x 1.2"
    );
    let store = store_with(&[1, 2], &[busy, busy]);
    let p = prompt("x");
    let sheddable = RequestFacts {
        priority: -1,
        ..facts(&p)
    };
    let err = scheduler(&cfg("0.5"), 0, &store)
        .schedule(&sheddable, &store.snapshot(), Purpose::Explain)
        .err();
    assert_eq!(
        err.map(|e| e.http_status()),
        Some(429),
        "shedding ignores headroom"
    );
}

#[test]
fn prefill_cost_charges_pending_prefills_only_when_configured() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    // Port 1: two requests past their first byte; port 2: one request whose
    // 32-token prompt is still being prefilled. By tokens alone they tie
    // (the running request costs what the pending prompt does).
    let mut done = load(&store, 1, 2, 32);
    for g in &mut done {
        g.prefill_done();
    }
    let _pending = load(&store, 2, 1, 32);
    let p = prompt("0123456789abcdefghijklmnopqrstuvwxyz0123");
    let by_tokens =
        "plugins:\n- type: prefill-cost-scorer\n  parameters: {decodeTokensPerRequest: 32}\n";
    let got = scores(by_tokens, &store, &facts(&p));
    assert!(close(got[0].1, got[1].1), "{got:?}");
    let per_request = "plugins:\n- type: prefill-cost-scorer\n  parameters: {decodeTokensPerRequest: 32, prefillRequestTokens: 100}\n";
    let got = scores(per_request, &store, &facts(&p));
    assert!(got[0].1 > got[1].1, "the free prefill lane wins: {got:?}");
    // Once its first byte arrives the pending request no longer counts.
    let mut pending = _pending;
    pending[0].prefill_done();
    let got = scores(per_request, &store, &facts(&p));
    assert!(
        got[1].1 > got[0].1,
        "one request in flight against two: {got:?}"
    );
}
