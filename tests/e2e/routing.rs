//! Where requests go: the picked endpoint, load and cache preferences, the
//! subset hint, and endpoints leaving.

use std::{collections::HashMap, time::Duration};

use crate::common::{Stack, eventually, http};

const GIE: &str = "config/gie-default.yaml";

fn gie_config() -> String {
    crate::common::repo_root().join(GIE).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_the_picked_endpoint_with_the_body_intact() {
    let stack = Stack::start(2, &[]).await;
    let body =
        serde_json::json!({"model": "m", "prompt": "Say hello to the pool", "max_tokens": 3});
    let r = http::post_json(stack.envoy.listen, "/v1/completions", &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let served = stack.backend(r.backend());
    assert_eq!(
        *served.state.last_body.lock(),
        body.to_string().into_bytes()
    );
    // The destination the backend saw starts with itself.
    let dest = served
        .last_header("x-gateway-destination-endpoint")
        .expect("destination header forwarded");
    assert!(
        dest.starts_with(&served.host_port()),
        "{dest} vs {}",
        served.host_port()
    );
    assert_eq!(dest.split(',').count(), 2, "pick plus one fallback");
}

async fn spread(
    stack: &Stack,
    n: usize,
    prompt: impl Fn(usize) -> String,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let r = stack.completion(&prompt(i)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *counts.entry(r.backend().to_owned()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefers_the_endpoint_with_the_shorter_queue() {
    for config in [None, Some(gie_config())] {
        let args: Vec<&str> = match &config {
            Some(c) => vec!["--config-file", c.as_str()],
            None => vec![],
        };
        let stack = Stack::start(2, &args).await;
        stack.backend("b0").set_load(8, 0.1);
        stack.backend("b1").set_load(0, 0.1);
        stack.epp.wait_scraped(4).await;
        wait_for_metric(
            &stack,
            "inference_pool_average_queue_size{name=\"default\"} 4",
        )
        .await;
        let counts = spread(&stack, 10, |i| format!("question {i}")).await;
        assert_eq!(counts.get("b1"), Some(&10), "config {config:?}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefers_the_endpoint_with_more_free_kv_cache() {
    let config = gie_config();
    let stack = Stack::start(2, &["--config-file", &config]).await;
    stack.backend("b0").set_load(0, 0.95);
    stack.backend("b1").set_load(0, 0.2);
    wait_for_metric(
        &stack,
        "inference_pool_average_kv_cache_utilization{name=\"default\"} 0.575",
    )
    .await;
    let counts = spread(&stack, 10, |i| format!("question {i}")).await;
    assert_eq!(counts.get("b1"), Some(&10), "{counts:?}");
}

/// The default config, as a new user runs it: two endpoints about to run
/// out of KV cache and one nearly empty, idle queues, a burst of short
/// completions. Nearly all must go to the free endpoint, although the
/// prompts are too short to have anything to cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_cache_pressure_steers_short_requests_with_the_default_config() {
    let stack = Stack::start(3, &[]).await;
    stack.backend("b0").set_load(0, 0.95);
    stack.backend("b1").set_load(0, 0.95);
    stack.backend("b2").set_load(0, 0.05);
    wait_for_mean_kv(&stack, 0.65).await;
    let replies = futures_util::future::join_all((0..20).map(|i| {
        let stack = &stack;
        async move { stack.completion(&format!("k{i}")).await }
    }))
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
        *counts.entry(r.backend().to_owned()).or_default() += 1;
    }
    let free = counts.get("b2").copied().unwrap_or(0);
    assert!(free >= 18, "at least 90% to the free endpoint: {counts:?}");
}

/// The counterpart: moderate KV usage on the endpoint that holds a prompt's
/// prefix does not push the prompt's next requests elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_affinity_holds_under_moderate_kv_usage_with_the_default_config() {
    let stack = Stack::start(3, &[]).await;
    let system = "You are a meticulous assistant who cites sources. ".repeat(40);
    let first = stack.completion(&format!("{system} question 0")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let owner = first.backend().to_owned();
    for b in &stack.backends {
        b.set_load(0, if b.name == owner { 0.7 } else { 0.05 });
    }
    wait_for_mean_kv(&stack, 0.8 / 3.0).await;
    let counts = spread(&stack, 10, |i| format!("{system} question {}", i + 1)).await;
    assert_eq!(counts.get(&owner), Some(&10), "{counts:?}");
}

/// Waits until the picker's scrapes show the pool's mean KV usage at `mean`.
async fn wait_for_mean_kv(stack: &Stack, mean: f64) {
    let addr = stack.epp.metrics;
    let prefix = "inference_pool_average_kv_cache_utilization{name=\"default\"} ";
    eventually(
        &format!("mean KV usage {mean}"),
        Duration::from_secs(10),
        || async move {
            http::get(addr, "/metrics").await.is_ok_and(|r| {
                r.text()
                    .lines()
                    .filter_map(|l| l.strip_prefix(prefix))
                    .any(|v| v.parse::<f64>().is_ok_and(|v| (v - mean).abs() < 1e-9))
            })
        },
    )
    .await;
}

async fn wait_for_metric(stack: &Stack, line: &str) {
    let addr = stack.epp.metrics;
    eventually(line, Duration::from_secs(10), || async move {
        http::get(addr, "/metrics")
            .await
            .is_ok_and(|r| r.text().lines().any(|l| l == line))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_prefixes_stick_to_one_endpoint() {
    let stack = Stack::start(4, &[]).await;
    let system = "You are a meticulous assistant. ".repeat(40);
    let mut owner: HashMap<usize, String> = HashMap::new();
    for round in 0..4 {
        for group in 0..3 {
            let prompt = format!("{group} {system} question {round}");
            let r = stack.completion(&prompt).await;
            assert_eq!(r.status, 200);
            let prev = owner.entry(group).or_insert_with(|| r.backend().to_owned());
            assert_eq!(prev, r.backend(), "group {group} moved in round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_hint_restricts_the_choice() {
    // Envoy's set_metadata filter plays the gateway that passes a subset hint.
    let hint_filter = |target: String| {
        format!(
            "          - name: envoy.filters.http.set_metadata\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config\n              metadata:\n              - metadata_namespace: envoy.lb.subset_hint\n                value:\n                  x-gateway-destination-endpoint-subset: [\"{target}\"]\n"
        )
    };
    // The stack's backends are only known after start, so reserve a backend
    // address first by starting it, then build the hint.
    let b1 = crate::common::backend::Backend::start("hinted").await;
    let target = b1.host_port();
    let stack = Stack::start_with(2, &[], |o| {
        o.pool.push(b1.addr);
        o.extra_filters = hint_filter(target.clone());
    })
    .await;
    // The epp does not know the hinted endpoint (it is not in its pool): 503.
    let r = stack.completion("hello").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "no_subset_match");
    drop(stack);

    let stack = Stack::start_with(2, &[], |o| {
        let target = o.pool[1].to_string();
        o.extra_filters = hint_filter(target);
    })
    .await;
    let counts = spread(&stack, 6, |i| format!("q{i}")).await;
    assert_eq!(counts.get("b1"), Some(&6), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_going_down_is_routed_around() {
    let stack = Stack::start(2, &["--max-scrape-failures", "2"]).await;
    stack.backend("b0").kill();
    let metrics = stack.epp.metrics;
    eventually(
        "b0 scrapes failing",
        Duration::from_secs(10),
        || async move {
            http::get(metrics, "/metrics").await.is_ok_and(|r| {
                r.text()
                    .lines()
                    .find_map(|l| l.strip_prefix("epp_metrics_scrape_failures_total "))
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v >= 2)
            })
        },
    )
    .await;
    let counts = spread(&stack, 8, |i| format!("after the outage {i}")).await;
    assert_eq!(counts.get("b1"), Some(&8), "{counts:?}");
}

const SESSION_AFFINITY: &str = "plugins:
- type: session-affinity-scorer
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: session-affinity-scorer, weight: 10}
  - {pluginRef: queue-scorer}
";

async fn completion_with(stack: &Stack, prompt: &str, headers: &[(&str, &str)]) -> http::Reply {
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1});
    http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        headers,
        Some(body.to_string().into_bytes()),
    )
    .await
    .unwrap()
}

/// llm-d's session affinity through Envoy: the picker names the endpoint
/// that served in `x-session-token`, and a request that sends it back goes
/// there although the queue scorer would now send it elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_brings_the_next_request_to_the_same_endpoint() {
    let stack = Stack::start(2, &["--config-text", SESSION_AFFINITY]).await;
    let first = stack.completion("turn one").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let token = first
        .header("x-session-token")
        .expect("the response names the endpoint")
        .to_owned();
    let home = first.backend().to_owned();
    let away = if home == "b0" { "b1" } else { "b0" };
    stack.backend(&home).set_load(8, 0.1);
    stack.backend(away).set_load(0, 0.1);
    wait_for_metric(
        &stack,
        "inference_pool_average_queue_size{name=\"default\"} 4",
    )
    .await;

    // Without the token the queue decides...
    for i in 0..5 {
        let r = stack.completion(&format!("stranger {i}")).await;
        assert_eq!(r.backend(), away, "{}", r.text());
        assert_ne!(r.header("x-session-token"), Some(token.as_str()));
    }
    // ...with it, the session stays, and keeps its token.
    for i in 0..10 {
        let r = completion_with(&stack, &format!("turn {i}"), &[("x-session-token", &token)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend(), home, "turn {i}");
        assert_eq!(r.header("x-session-token"), Some(token.as_str()));
    }
    // A token that names no endpoint (here an address) selects nothing.
    let forged = "MTI3LjAuMC4xOjgw"; // base64 of "127.0.0.1:80"
    let r = completion_with(&stack, "forged", &[("x-session-token", forged)]).await;
    assert_eq!((r.status, r.backend()), (200, away));
}
