use std::{sync::Arc, time::Duration};

use super::*;
use crate::{
    config::{EndpointPickerConfig, GIE_DEFAULT_CONFIG},
    endpoints::{EndpointStore, MetricsSample, testing::store_with},
};

pub(super) fn scheduler(cfg: &str, fallback: usize, store: &EndpointStore) -> Scheduler {
    try_scheduler(cfg, fallback, store).unwrap()
}

/// Builds the scheduler of config text `cfg` (which must parse) over `store`.
pub(super) fn try_scheduler(
    cfg: &str,
    fallback: usize,
    store: &EndpointStore,
) -> Result<Scheduler, BuildError> {
    build_scheduler(
        &EndpointPickerConfig::parse(cfg).unwrap(),
        &SchedulerOptions {
            fallback_endpoints: fallback,
            max_scrape_failures: 3,
            staleness: Duration::from_secs(2),
            epoch: store.epoch(),
            kv_events: false,
        },
        Arc::new(PrefixIndex::new()),
    )
}

pub(super) fn idle() -> MetricsSample {
    MetricsSample::default()
}

pub(super) fn prompt(text: &'static str) -> Prompt<'static> {
    let mut p = Prompt::default();
    p.push(text);
    p
}

pub(super) fn facts<'a>(p: &'a Prompt<'a>) -> RequestFacts<'a> {
    RequestFacts {
        model: "m",
        prompt: Some(p),
        ..RequestFacts::default()
    }
}

const LONG: &str = "You are a helpful assistant that answers questions about the weather in a very long system prompt that spans many blocks of sixty-four bytes each, so that prefix matching has something to chew on.";

#[test]
fn gie_default_prefers_short_queue_then_low_kv() {
    let store = store_with(
        &[1, 2],
        &[
            MetricsSample {
                waiting: 5,
                ..idle()
            },
            idle(),
        ],
    );
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    let p = prompt("short");
    for _ in 0..20 {
        let d = s
            .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .unwrap();
        assert_eq!(&*d.endpoints[0].host_port, "127.0.0.1:2");
    }
    let store = store_with(
        &[1, 2],
        &[
            idle(),
            MetricsSample {
                kv_usage: 0.9,
                ..idle()
            },
        ],
    );
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    let d = s
        .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
        .unwrap();
    assert_eq!(&*d.endpoints[0].host_port, "127.0.0.1:1");
}

#[test]
fn prefix_affinity_sends_repeats_to_the_same_endpoint() {
    let store = store_with(&[1, 2, 3, 4], &[idle(), idle(), idle(), idle()]);
    for cfg in [GIE_DEFAULT_CONFIG, crate::config::DEFAULT_CONFIG] {
        let s = scheduler(cfg, 0, &store);
        let p = prompt(LONG);
        let first = s
            .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .unwrap();
        assert_eq!(first.matched_blocks, 0);
        assert!(first.prompt_blocks > 2);
        for _ in 0..10 {
            let again = s
                .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
                .unwrap();
            assert!(Arc::ptr_eq(&again.endpoints[0], &first.endpoints[0]));
            assert_eq!(again.matched_blocks, again.prompt_blocks);
        }
    }
}

#[test]
fn different_models_do_not_share_prefixes() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    let p = prompt(LONG);
    s.schedule(&facts(&p), &store.snapshot(), Purpose::Route)
        .unwrap();
    let other = RequestFacts {
        model: "other",
        ..facts(&p)
    };
    let d = s
        .schedule(&other, &store.snapshot(), Purpose::Route)
        .unwrap();
    assert_eq!(d.matched_blocks, 0);
}

#[test]
fn explain_does_not_record() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    let p = prompt(LONG);
    let d = s
        .schedule(&facts(&p), &store.snapshot(), Purpose::Explain)
        .unwrap();
    let ex = d.explanation.unwrap();
    assert_eq!(ex.candidates.len(), 2);
    assert_eq!(ex.candidates[0].scores.len(), 3);
    assert!(s.index().is_empty());
}

#[test]
fn prefill_cost_spills_a_hot_prefix_when_its_endpoint_is_busy() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let s = scheduler(crate::config::DEFAULT_CONFIG, 0, &store);
    let p = prompt(LONG);
    let first = s
        .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
        .unwrap();
    let hot = Arc::clone(&first.endpoints[0]);
    // Cheap while idle: stays on the cached endpoint.
    let d = s
        .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
        .unwrap();
    assert!(Arc::ptr_eq(&d.endpoints[0], &hot));
    // Pile prefill work onto it: re-prefilling elsewhere becomes cheaper.
    let _busy: Vec<_> = (0..4).map(|_| hot.begin_request(10_000)).collect();
    let d = s
        .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
        .unwrap();
    assert!(!Arc::ptr_eq(&d.endpoints[0], &hot));
}

fn kv(usage: f64) -> MetricsSample {
    MetricsSample {
        kv_usage: usage,
        ..idle()
    }
}

/// Short prompts have nothing uncached worth counting, yet an endpoint about
/// to run out of KV cache must still be avoided: the request needs blocks
/// for its completion, and a full cache preempts running requests.
#[test]
fn prefill_cost_steers_even_short_prompts_away_from_a_full_kv_cache() {
    let store = store_with(&[1, 2, 3], &[kv(0.95), kv(0.95), kv(0.05)]);
    let s = scheduler(crate::config::DEFAULT_CONFIG, 0, &store);
    let free = Arc::clone(&store.snapshot().endpoints()[2]);
    // Concurrent, so the free endpoint's own in-flight count grows.
    let mut held = Vec::new();
    for i in 0..20 {
        let mut p = Prompt::default();
        p.push(format!("k{i}"));
        let d = s
            .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .unwrap();
        assert!(Arc::ptr_eq(&d.endpoints[0], &free), "request {i}");
        held.push(d.endpoints[0].begin_request(d.prefill_tokens));
    }
}

/// Moderate cache usage is no reason to leave a cached prefix.
#[test]
fn prefill_cost_keeps_prefix_affinity_under_moderate_kv_usage() {
    let store = store_with(&[1, 2, 3], &[idle(), idle(), idle()]);
    let s = scheduler(crate::config::DEFAULT_CONFIG, 0, &store);
    let p = prompt(LONG);
    let hot = Arc::clone(
        &s.schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .unwrap()
            .endpoints[0],
    );
    let now = std::time::Instant::now();
    for e in store.snapshot().endpoints() {
        let usage = if Arc::ptr_eq(e, &hot) { 0.7 } else { 0.05 };
        e.record_scrape(&kv(usage), now, store.epoch());
    }
    for _ in 0..10 {
        let d = s
            .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .unwrap();
        assert!(Arc::ptr_eq(&d.endpoints[0], &hot));
    }
}

/// A conversation's next turn, sent right after the previous one finished,
/// must not count that finished request (which the last scrape still shows
/// running) as someone else's load and leave its cache for it; a request the
/// picker did not route still counts.
#[test]
fn prefill_cost_does_not_mistake_our_finished_request_for_foreign_load() {
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let s = scheduler(crate::config::DEFAULT_CONFIG, 0, &store);
    let p = prompt(LONG);
    let route = || {
        s.schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .unwrap()
            .endpoints[0]
            .clone()
    };
    let hot = route();
    let running = MetricsSample {
        running: 1,
        ..idle()
    };
    let turn = hot.begin_request(0);
    hot.record_scrape(&running, std::time::Instant::now(), store.epoch());
    drop(turn);
    assert!(
        Arc::ptr_eq(&route(), &hot),
        "ours, finished since the scrape"
    );
    // The next scrape still shows one running request, now not ours.
    hot.record_scrape(&running, std::time::Instant::now(), store.epoch());
    assert!(!Arc::ptr_eq(&route(), &hot), "foreign load still spills");
}

#[test]
fn fallbacks_are_distinct_and_bounded() {
    let store = store_with(&[1, 2, 3], &[idle(), idle(), idle()]);
    let s = scheduler(GIE_DEFAULT_CONFIG, 2, &store);
    let p = prompt("x");
    let d = s
        .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
        .unwrap();
    assert_eq!(d.endpoints.len(), 3);
    let mut addrs: Vec<_> = d.endpoints.iter().map(|e| e.host_port.clone()).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 3);
    assert_eq!(d.destination().split(',').count(), 3);
    let s = scheduler(GIE_DEFAULT_CONFIG, 5, &store);
    assert_eq!(
        s.schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .unwrap()
            .endpoints
            .len(),
        3
    );
}

#[test]
fn subset_hint_restricts_candidates() {
    let store = store_with(&[1, 2, 3], &[idle(), idle(), idle()]);
    let s = scheduler(GIE_DEFAULT_CONFIG, 2, &store);
    let p = prompt("x");
    let subset = vec!["127.0.0.1:3".to_owned(), "10.0.0.1:80".to_owned()];
    let f = RequestFacts {
        subset: Some(&subset),
        ..facts(&p)
    };
    let d = s.schedule(&f, &store.snapshot(), Purpose::Route).unwrap();
    assert_eq!(d.destination(), "127.0.0.1:3");
    let none = vec!["10.0.0.1:80".to_owned()];
    let f = RequestFacts {
        subset: Some(&none),
        ..facts(&p)
    };
    assert_eq!(
        s.schedule(&f, &store.snapshot(), Purpose::Route)
            .unwrap_err(),
        ScheduleError::SubsetMismatch
    );
    let empty: Vec<String> = vec![];
    let f = RequestFacts {
        subset: Some(&empty),
        ..facts(&p)
    };
    assert_eq!(
        s.schedule(&f, &store.snapshot(), Purpose::Route)
            .unwrap_err()
            .http_status(),
        503
    );
}

#[test]
fn empty_pool_and_failing_scrapes_are_503() {
    let store = EndpointStore::new(Duration::from_secs(2));
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    let p = prompt("x");
    assert_eq!(
        s.schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .unwrap_err(),
        ScheduleError::EmptyPool
    );
    let store = store_with(&[1, 2], &[idle(), idle()]);
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    let snap = store.snapshot();
    for _ in 0..3 {
        snap.endpoints()[0].metrics.record_failure();
    }
    for _ in 0..10 {
        assert_eq!(
            &*s.schedule(&facts(&p), &snap, Purpose::Route)
                .unwrap()
                .endpoints[0]
                .host_port,
            "127.0.0.1:2"
        );
    }
    for _ in 0..3 {
        snap.endpoints()[1].metrics.record_failure();
    }
    let err = s.schedule(&facts(&p), &snap, Purpose::Route).unwrap_err();
    assert_eq!(err, ScheduleError::NoReadyEndpoint);
    assert_eq!(err.http_status(), 503);
}

#[test]
fn sheddable_requests_get_429_only_when_the_pool_is_saturated() {
    let busy = MetricsSample {
        waiting: 10,
        ..idle()
    };
    let store = store_with(&[1, 2], &[busy, busy]);
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    let p = prompt("x");
    let sheddable = RequestFacts {
        priority: -1,
        ..facts(&p)
    };
    assert_eq!(
        s.schedule(&sheddable, &store.snapshot(), Purpose::Route)
            .unwrap_err()
            .http_status(),
        429
    );
    assert!(
        s.schedule(&facts(&p), &store.snapshot(), Purpose::Route)
            .is_ok(),
        "priority 0 is never shed"
    );
    let store = store_with(&[1, 2], &[busy, idle()]);
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    assert!(
        s.schedule(&sheddable, &store.snapshot(), Purpose::Route)
            .is_ok()
    );
}

#[test]
fn header_based_testing_filter() {
    let cfg = "plugins:\n- type: header-based-testing-filter\n- type: queue-scorer\ntrustedHeaders: [test-epp-endpoint-selection]\n";
    let store = store_with(&[1, 2, 3], &[idle(), idle(), idle()]);
    let s = scheduler(cfg, 0, &store);
    let p = prompt("x");
    let f = RequestFacts {
        test_selection: Some("127.0.0.1:2"),
        ..facts(&p)
    };
    assert_eq!(
        s.schedule(&f, &store.snapshot(), Purpose::Route)
            .unwrap()
            .destination(),
        "127.0.0.1:2"
    );
    let f = RequestFacts {
        test_selection: Some(" 127.0.0.1 "),
        ..facts(&p)
    };
    assert!(
        s.schedule(&f, &store.snapshot(), Purpose::Route).is_ok(),
        "bare IP matches every port"
    );
    assert!(matches!(
        s.schedule(&facts(&p), &store.snapshot(), Purpose::Route),
        Err(ScheduleError::Filtered(_))
    ));
    assert!(s.has_filter_type("header-based-testing-filter"));
}

#[test]
fn bodiless_requests_go_to_the_least_loaded() {
    let store = store_with(
        &[1, 2],
        &[
            MetricsSample {
                running: 3,
                ..idle()
            },
            idle(),
        ],
    );
    let s = scheduler(GIE_DEFAULT_CONFIG, 1, &store);
    let d = s.schedule_bodiless(&store.snapshot(), None).unwrap();
    assert_eq!(d.destination(), "127.0.0.1:2,127.0.0.1:1");
}

#[test]
fn config_errors_are_clear() {
    let store = EndpointStore::new(Duration::from_secs(1));
    let build = |text: &str| try_scheduler(text, 0, &store).map(|_| ());
    let err = build("plugins:\n- type: magic-scorer\n").unwrap_err();
    assert!(err.to_string().contains("magic-scorer") && err.to_string().contains("queue-scorer"));
    let err =
        build("plugins: []\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: nope\n")
            .unwrap_err();
    assert!(matches!(err, BuildError::UnknownRef { .. }));
    let err = build("plugins:\n- type: random-picker\n- type: max-score-picker\n").unwrap_err();
    assert!(matches!(err, BuildError::SeveralPickers(_)));
    let err = build("plugins:\n- type: metrics-data-source\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: metrics-data-source\n").unwrap_err();
    assert!(matches!(err, BuildError::NotSchedulable { .. }));
    let err = build("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: -1\n").unwrap_err();
    assert!(matches!(err, BuildError::Weight { .. }));
    let err = build("schedulingProfiles:\n- name: a\n- name: b\n").unwrap_err();
    assert_eq!(err, BuildError::ProfileCount(2));
    let err = build(
        "plugins:\n- type: prefix-cache-scorer\n  parameters:\n    maxPrefixBlocksToMatch: many\n",
    )
    .unwrap_err();
    assert!(matches!(err, BuildError::Parameters { .. }));
    assert!(
        build("plugins:\n- type: prefix-cache-scorer\n  parameters:\n    futureKnob: 1\n").is_ok()
    );
}

#[test]
fn prefix_parameters_are_read() {
    let store = EndpointStore::new(Duration::from_secs(1));
    let s = scheduler(
        "plugins:\n- type: prefix-cache-scorer\n  parameters:\n    blockSizeTokens: 32\n    maxPrefixTokensToMatch: 320\n    autoTune: false\n",
        0,
        &store,
    );
    let p = s.prefix_settings().unwrap();
    assert_eq!(
        (p.block_size_tokens, p.max_blocks, p.auto_tune),
        (32, 10, false)
    );
    let s = scheduler("plugins:\n- type: queue-scorer\n", 0, &store);
    assert!(
        s.prefix_settings().is_none(),
        "no prefix plugin, no hashing"
    );
}

#[test]
fn block_size_auto_tunes_from_endpoints() {
    let store = store_with(
        &[1],
        &[MetricsSample {
            block_size: 32,
            num_blocks: 2,
            ..idle()
        }],
    );
    let s = scheduler(GIE_DEFAULT_CONFIG, 0, &store);
    let p = prompt(LONG);
    let d = s
        .schedule(&facts(&p), &store.snapshot(), Purpose::Route)
        .unwrap();
    assert_eq!(d.block_tokens, 32);
    assert_eq!(d.prompt_blocks as usize, LONG.len() / 128);
    let snap = store.snapshot();
    let e = &snap.endpoints()[0];
    assert_eq!(
        s.index().blocks_for(e.slot, e.uid),
        u64::from(d.prompt_blocks.min(2))
    );
}

/// Parameters a type needs before it builds (the rest build without any).
fn required_parameters(plugin_type: &str) -> &'static str {
    match plugin_type {
        "by-label" => "{label: tier, validValues: [gold]}",
        "utilization-filter" => "{conditions: [{metric: waiting-queue, maxValue: 5}]}",
        _ => "null",
    }
}

pub(super) fn build_one(plugin_type: &str, parameters: &str) -> Result<Scheduler, BuildError> {
    let store = EndpointStore::new(Duration::from_secs(1));
    let text = format!(
        "plugins:\n- type: {plugin_type}\n  parameters: {parameters}\ntrustedHeaders: [test-epp-endpoint-selection]\n"
    );
    try_scheduler(&text, 0, &store)
}

/// Each of `bad` is refused as `plugin_type`'s parameters, with the
/// parameters error (not a build that goes on with defaults).
#[track_caller]
pub(super) fn assert_parameters_refused(plugin_type: &str, bad: &[&str]) {
    for b in bad {
        assert!(
            matches!(
                build_one(plugin_type, b),
                Err(BuildError::Parameters { .. })
            ),
            "{plugin_type}: {b}"
        );
    }
}

#[test]
fn every_inventoried_type_builds_or_is_refused_with_its_nearest() {
    use inventory::{INVENTORY, Status};
    for t in INVENTORY {
        let result = build_one(t.name, required_parameters(t.name));
        match t.status {
            Status::Works | Status::Mapped(_) => {
                if let Err(e) = result {
                    panic!("{} should build: {e}", t.name);
                }
            }
            Status::Refused { nearest, .. } => {
                let err = result
                    .err()
                    .unwrap_or_else(|| panic!("{} should be refused", t.name));
                let text = err.to_string();
                assert!(
                    matches!(&err, BuildError::Unsupported { plugin_type, .. } if *plugin_type == t.name),
                    "{}: {err:?}",
                    t.name
                );
                assert!(
                    text.starts_with(&format!("plugin type \"{}\" (", t.name))
                        && text.ends_with(&format!("is not supported; nearest: {nearest}")),
                    "{text}"
                );
                assert!(
                    inventory::lookup(nearest.split(' ').next().unwrap_or(""))
                        .is_none_or(|n| !matches!(n.status, Status::Refused { .. })),
                    "{}: the nearest type {nearest} must itself be supported",
                    t.name
                );
            }
        }
    }
    let names: std::collections::HashSet<&str> = INVENTORY.iter().map(|t| t.name).collect();
    assert_eq!(names.len(), INVENTORY.len(), "each type is listed once");
}

#[test]
fn unknown_types_list_the_supported_ones_and_refusals_name_the_nearest() {
    let err = build_one("magic-scorer", "null").err().unwrap().to_string();
    assert!(
        err.contains("\"magic-scorer\"") && err.contains("known types: "),
        "{err}"
    );
    assert!(
        err.contains("queue-scorer") && !err.contains("pd-profile-handler"),
        "{err}"
    );
    let err = build_one("pd-profile-handler", "null")
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        "plugin type \"pd-profile-handler\" (llm-d prefill/decode disaggregation) is not supported; nearest: single-profile-handler"
    );
    assert!(build_one("token-producer", "{estimate: {}}").is_ok());
    let err = build_one("token-producer", "{modelName: m}")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("nearest: token-producer with the estimate backend"),
        "{err}"
    );
}

#[test]
fn the_readme_plugin_table_is_the_inventory() {
    let readme = include_str!("../../README.md");
    let table = inventory::markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's plugin table differs from the inventory; replace it with:\n{table}"
    );
}

/// A store whose endpoints carry the given labels (`key=value,...`), all idle
/// and fresh.
pub(super) fn labelled_store(labels: &[&str]) -> EndpointStore {
    let store = EndpointStore::new(Duration::from_secs(2));
    let specs = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut spec = crate::endpoints::testing::spec(u16::try_from(i + 1).unwrap());
            for pair in l.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap();
                spec.labels.insert(k.into(), v.into());
            }
            spec
        })
        .collect();
    store.replace(specs).unwrap();
    for e in store.snapshot().endpoints() {
        e.record_scrape(&idle(), std::time::Instant::now(), store.epoch());
    }
    store
}

/// The ports the filters of `cfg` keep, over many requests.
pub(super) fn kept_by(cfg: &str, store: &EndpointStore) -> Result<Vec<u16>, ScheduleError> {
    let s = scheduler(cfg, 8, store);
    let p = prompt("x");
    let d = s.schedule(&facts(&p), &store.snapshot(), Purpose::Explain)?;
    let mut ports: Vec<u16> = d.endpoints.iter().map(|e| e.spec.port).collect();
    ports.sort_unstable();
    Ok(ports)
}

#[test]
fn label_selector_filter_follows_kubernetes_selector_rules() {
    let store = labelled_store(&["tier=gold,gpu=h100", "tier=silver,gpu=h100", "gpu=l4", ""]);
    let with = |params: &str| {
        kept_by(
            &format!(
                "plugins:\n- type: label-selector-filter\n  parameters: {params}\n- type: queue-scorer\n"
            ),
            &store,
        )
    };
    assert_eq!(with("{matchLabels: {gpu: h100}}").unwrap(), vec![1, 2]);
    assert_eq!(
        with("{matchLabels: {gpu: h100, tier: gold}}").unwrap(),
        vec![1]
    );
    assert_eq!(
        with("{matchExpressions: [{key: tier, operator: In, values: [gold, silver]}]}").unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        with("{matchExpressions: [{key: tier, operator: NotIn, values: [gold]}]}").unwrap(),
        vec![2, 3, 4],
        "NotIn keeps endpoints without the label"
    );
    assert_eq!(
        with("{matchExpressions: [{key: gpu, operator: Exists}]}").unwrap(),
        vec![1, 2, 3]
    );
    assert_eq!(
        with("{matchExpressions: [{key: gpu, operator: DoesNotExist}]}").unwrap(),
        vec![4]
    );
    assert_eq!(
        with("{}").unwrap(),
        vec![1, 2, 3, 4],
        "empty selector keeps all"
    );
    assert!(matches!(
        with("{matchLabels: {gpu: tpu}}"),
        Err(ScheduleError::Filtered(_))
    ));
    // The deprecated alias behaves the same.
    assert_eq!(
        kept_by(
            "plugins:\n- type: by-label-selector\n  parameters: {matchLabels: {gpu: l4}}\n",
            &store
        )
        .unwrap(),
        vec![3]
    );
    assert_parameters_refused(
        "label-selector-filter",
        &[
            "{matchExpressions: [{key: a, operator: In}]}",
            "{matchExpressions: [{key: a, operator: Exists, values: [x]}]}",
            "{matchExpressions: [{key: a, operator: Gt, values: ['1']}]}",
        ],
    );
}

#[test]
fn by_label_and_role_filters() {
    let store = labelled_store(&[
        "llm-d.ai/role=prefill",
        "llm-d.ai/role=decode",
        "llm-d.ai/role=prefill-decode",
        "llm-d.ai/role=encode",
        "",
    ]);
    let only = |t: &str| kept_by(&format!("plugins:\n- type: {t}\n"), &store).unwrap();
    assert_eq!(
        only("decode-filter"),
        vec![2, 3, 5],
        "unlabelled pods decode"
    );
    assert_eq!(only("prefill-filter"), vec![1, 3]);
    assert_eq!(only("encode-filter"), vec![4]);
    let by = |params: &str| {
        kept_by(
            &format!("plugins:\n- type: by-label\n  parameters: {params}\n"),
            &store,
        )
        .unwrap()
    };
    assert_eq!(
        by("{label: llm-d.ai/role, validValues: [decode, encode]}"),
        vec![2, 4]
    );
    assert_eq!(
        by("{label: llm-d.ai/role, validValues: [decode], allowsNoLabel: true}"),
        vec![2, 5]
    );
    assert_parameters_refused("by-label", &["{validValues: [a]}", "{label: x}"]);
}
