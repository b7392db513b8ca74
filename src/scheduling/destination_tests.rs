//! Property-style check of the scheduler's one security promise: whatever
//! the request says (subset hint naming foreign addresses, conformance
//! selection header, prompt) and whatever the configuration, every endpoint
//! it returns, the pick and each fallback, is one of the snapshot's own
//! endpoints, listed once, and inside the subset hint when there is one.
//!
//! Inputs come from a seeded generator, so a failure names a reproducible
//! case instead of a flaky one.

use std::sync::Arc;

use super::*;
use crate::{
    config::{DEFAULT_CONFIG, GIE_DEFAULT_CONFIG},
    endpoints::{EndpointSet, MetricsSample, testing::store_with},
};

const CONFIGS: &[&str] = &[
    DEFAULT_CONFIG,
    GIE_DEFAULT_CONFIG,
    "plugins:\n- type: queue-scorer\n- type: random-picker\n",
    "plugins:\n- type: kv-cache-utilization-scorer\n- type: weighted-random-picker\n",
    "plugins:\n- type: prefix-cache-scorer\n- type: round-robin-picker\n",
    "plugins:\n- type: header-based-testing-filter\n- type: queue-scorer\ntrustedHeaders: [test-epp-endpoint-selection]\n",
    "plugins:\n- type: prefix-cache-affinity-filter\n- type: prefix-cache-scorer\n- type: utilization-detector\n- type: load-aware-scorer\n",
];

/// Addresses that are never in a generated pool (ports 1..=16 on 127.0.0.1
/// are), written the ways a hint or header might spell them.
const FOREIGN: &[&str] = &[
    "10.0.0.1:1",
    "127.0.0.1:80",
    "127.0.0.2:1",
    "[::1]:1",
    "localhost:1",
    "127.0.0.1:01",
    "127.0.0.1:1,127.0.0.1:2",
    "",
    "127.0.0.1",
];

fn check(decision: &Decision, set: &EndpointSet, subset: Option<&[String]>, case: &str) {
    assert!(!decision.endpoints.is_empty(), "{case}: empty decision");
    for (i, e) in decision.endpoints.iter().enumerate() {
        assert!(
            set.endpoints().iter().any(|s| Arc::ptr_eq(s, e)),
            "{case}: {} is not an endpoint of the snapshot",
            e.host_port
        );
        assert!(
            !decision.endpoints[..i]
                .iter()
                .any(|o| o.host_port == e.host_port),
            "{case}: {} listed twice",
            e.host_port
        );
        if let Some(subset) = subset {
            assert!(
                subset.iter().any(|s| *s == *e.host_port),
                "{case}: {} is outside the subset hint {subset:?}",
                e.host_port
            );
        }
    }
    for part in decision.destination().split(',') {
        assert!(set.get(part).is_some(), "{case}: destination part {part}");
    }
}

#[test]
fn every_returned_destination_belongs_to_the_snapshot() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0e99);
    let mut decided = 0;
    for case_no in 0..600 {
        let cfg = CONFIGS[rng.usize(..CONFIGS.len())];
        let n = rng.usize(1..=16);
        let mut ports: Vec<u16> = (1..=16).collect();
        rng.shuffle(&mut ports);
        ports.truncate(n);
        let samples: Vec<MetricsSample> = (0..n)
            .map(|_| MetricsSample {
                waiting: rng.u32(0..12),
                running: rng.u32(0..12),
                kv_usage: rng.f64(),
                block_size: [0, 16, 32][rng.usize(..3)],
                num_blocks: rng.u32(0..2000),
            })
            .collect();
        let store = store_with(&ports, &samples);
        for e in store.snapshot().endpoints() {
            if rng.u8(..8) == 0 {
                for _ in 0..3 {
                    e.metrics.record_failure();
                }
            }
        }
        let fallback = rng.usize(0..5);
        let s = super::tests::scheduler(cfg, fallback, &store);
        let set = store.snapshot();

        // A hint mixing foreign addresses with some of the pool's, or none.
        let subset: Option<Vec<String>> = (rng.u8(..3) > 0).then(|| {
            let mut hint: Vec<String> = (0..rng.usize(0..4))
                .map(|_| FOREIGN[rng.usize(..FOREIGN.len())].to_owned())
                .collect();
            for p in &ports {
                if rng.bool() {
                    hint.push(format!("127.0.0.1:{p}"));
                }
            }
            rng.shuffle(&mut hint);
            hint
        });
        let selection = match rng.u8(..4) {
            0 => None,
            1 => Some(FOREIGN[rng.usize(..FOREIGN.len())].to_owned()),
            _ => Some(format!(
                "{}, 127.0.0.1:{}",
                FOREIGN[rng.usize(..FOREIGN.len())],
                ports[rng.usize(..n)]
            )),
        };
        let text = "shared system prompt ".repeat(rng.usize(0..40)) + &case_no.to_string();
        let mut prompt = Prompt::default();
        prompt.push(&text);
        let facts = RequestFacts {
            model: "m",
            prompt: Some(&prompt),
            subset: subset.as_deref(),
            test_selection: selection.as_deref(),
            priority: [0, -1][rng.usize(..2)],
            ..RequestFacts::default()
        };
        let case = format!(
            "case {case_no} (config {cfg:?}, ports {ports:?}, subset {subset:?}, selection {selection:?})"
        );
        for purpose in [Purpose::Route, Purpose::RouteExplained, Purpose::Explain] {
            if let Ok(d) = s.schedule(&facts, &set, purpose) {
                check(&d, &set, subset.as_deref(), &case);
                assert!(d.endpoints.len() <= n, "{case}");
                decided += 1;
            }
        }
        if let Ok(d) = s.schedule_bodiless(&set, subset.as_deref()) {
            check(&d, &set, subset.as_deref(), &case);
            assert!(d.endpoints.len() <= 1 + fallback, "{case}");
        }
        // A hint naming only foreign addresses never yields a destination.
        let foreign: Vec<String> = FOREIGN.iter().map(|s| (*s).to_owned()).collect();
        let only_foreign = RequestFacts {
            subset: Some(&foreign),
            ..facts
        };
        assert_eq!(
            s.schedule(&only_foreign, &set, Purpose::Route).err(),
            Some(ScheduleError::SubsetMismatch),
            "{case}"
        );
        assert_eq!(
            s.schedule_bodiless(&set, Some(&foreign)).err(),
            Some(ScheduleError::SubsetMismatch),
            "{case}"
        );
    }
    // The generator must reach the assertions, not only the error paths.
    assert!(decided > 600, "only {decided} decisions were checked");
}
