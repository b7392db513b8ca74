//! The precise prefix-cache path end to end (issue 14): simulated pods
//! tokenizing with the real Qwen3 tokenizer and publishing vLLM-format KV
//! events on ZeroMQ, the real picker subscribed to them (`--kv-events`) and
//! tokenizing the same prompts (`--tokenizer`), real Envoy in front, all on
//! 127.0.0.1. The picker must learn what the serving pod cached from that
//! pod's own events, send the next request of the prefix there, and drop
//! the entries when the pods restart (a new process reports nothing of what
//! the old one held) while routing goes on.
//!
//! Needs `scripts/setup-tools.sh` (Envoy, the tokenizer) and the `epp`
//! binary built beside this test (`cargo build -p epp`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use epp::admin::pb::{
    ExplainRequest, ExplainResponse, KvEventsRank, ListEndpointsRequest, admin_client::AdminClient,
};
use epp_bench::load::client::{HttpClient, http_client};
use epp_bench::sim::SimConfig;
use epp_bench::stack::{Binaries, Router, Stack, StackOptions};
use http_body_util::BodyExt;
use tokio::time::{Instant, timeout};

/// Bound of every wait here.
const PATIENCE: Duration = Duration::from_secs(30);
const CHAT: &str = "/v1/chat/completions";

/// A system prompt of several hundred real tokens, distinct per `topic`.
fn system_prompt(topic: &str) -> String {
    let mut s = format!("You are the support assistant for the {topic} team. ");
    for i in 0..40 {
        s.push_str(&format!(
            "Rule {i}: answer questions about {topic} precisely, cite the relevant section, \
             and never invent figures that the manual does not state. "
        ));
    }
    s
}

fn chat_body(model: &str, system: &str, question: &str) -> String {
    serde_json::json!({
        "model": model,
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    })
    .to_string()
}

/// What a served request tells: the pod that ran it and the prompt tokens
/// it found cached.
#[derive(Debug)]
struct Served {
    pod: String,
    cached_tokens: u64,
    prompt_tokens: u64,
}

async fn chat(client: &HttpClient, base: &str, body: &str) -> Served {
    let req = http::Request::post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = timeout(PATIENCE, client.request(req))
        .await
        .expect("answered in time")
        .expect("HTTP");
    let status = resp.status();
    let pod = resp
        .headers()
        .get("x-inference-pod")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = timeout(PATIENCE, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Served {
        pod: pod.expect("the pod names itself"),
        cached_tokens: v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap(),
    }
}

async fn admin(stack: &Stack) -> AdminClient<tonic::transport::Channel> {
    let addr = stack.epp_admin.expect("the picker's admin API");
    AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Rank 0's event state per endpoint name.
async fn ranks(stack: &Stack) -> HashMap<String, KvEventsRank> {
    admin(stack)
        .await
        .list_endpoints(ListEndpointsRequest {})
        .await
        .unwrap()
        .into_inner()
        .endpoints
        .into_iter()
        .filter_map(|e| Some((e.name, e.kv_events.into_iter().next()?)))
        .collect()
}

async fn explain(stack: &Stack, body: &str) -> ExplainResponse {
    admin(stack)
        .await
        .explain(ExplainRequest {
            path: CHAT.into(),
            body: body.as_bytes().to_vec(),
            ..ExplainRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls `cond` until it holds; fails with `what` and the last state seen.
async fn eventually<T: std::fmt::Debug, F, Fut>(
    what: &str,
    mut probe: F,
    cond: impl Fn(&T) -> bool,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = probe().await;
        if cond(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: never; last seen {v:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Explain's answer for `pod`: (prefix source, cached GPU tokens).
fn candidate(e: &ExplainResponse, pod: &str) -> (String, u32) {
    let c = e
        .candidates
        .iter()
        .find(|c| c.name == pod)
        .unwrap_or_else(|| panic!("{pod} is no candidate: {e:#?}"));
    (c.prefix_source.clone(), c.cached_tokens_gpu)
}

fn metric(page: &str, name: &str, label: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn epp_metrics(client: &HttpClient, stack: &Stack) -> String {
    let addr = stack.epp_metrics.expect("the picker's /metrics");
    let resp = timeout(
        PATIENCE,
        client.get(format!("http://{addr}/metrics").parse().unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_route_the_prefix_to_its_pod_and_a_restart_drops_them() {
    let bin = Binaries::locate().expect("epp built and scripts/setup-tools.sh run");
    let tokenizer: PathBuf = bin.repo.join(".tools/tokenizers/qwen3");
    assert!(
        tokenizer.join("tokenizer.json").exists(),
        "run scripts/setup-tools.sh (the Qwen3 tokenizer)"
    );
    let model = SimConfig::default().model;
    let sim = SimConfig {
        pods: 3,
        prefill_overhead_ms: 1.0,
        prefill_us_per_token: 10.0,
        itl_ms: 1.0,
        jitter: 0.0,
        tokenizer: Some(tokenizer.clone()),
        ..SimConfig::default()
    };
    let router = Router::Epp {
        config: bin.repo.join("config/default.yaml"),
        extra_args: vec![
            "--tokenizer".into(),
            format!("{model}={}", tokenizer.display()),
        ],
    };
    let mut opts = StackOptions::new(sim, router);
    opts.kv_events = true;
    let stack = Stack::start(&bin, &opts).await.expect("stack starts");
    let client = http_client(4);

    // Every pod's subscription is up before anything is published (a PUB
    // drops what it sends before a subscriber is connected).
    eventually(
        "all three subscriptions connected",
        || ranks(&stack),
        |r| r.len() == 3 && r.values().all(|k| k.connected),
    )
    .await;

    let support = system_prompt("billing");
    let first = chat_body(&model, &support, "How do I get a refund?");
    let s1 = chat(&client, &stack.gateway, &first).await;
    assert_eq!(s1.cached_tokens, 0, "cold pods: {s1:?}");
    assert!(s1.prompt_tokens > 400, "{s1:?}");

    // The serving pod's events reach the picker: Explain answers for it from
    // the events, with (nearly) the whole shared system prompt cached.
    let second = chat_body(&model, &support, "Which invoices can be split?");
    let e = eventually(
        "the serving pod's blocks indexed from its events",
        || explain(&stack, &second),
        |e| {
            let (src, cached) = candidate(e, &s1.pod);
            src == "events" && cached >= 256
        },
    )
    .await;
    // `picked` lists the primary first, then fallbacks.
    let picked = e
        .candidates
        .iter()
        .find(|c| c.address == e.picked[0])
        .unwrap();
    assert_eq!(picked.name, s1.pod, "{e:#?}");
    for c in e.candidates.iter().filter(|c| c.name != s1.pod) {
        assert_eq!(c.cached_tokens_gpu, 0, "nothing else cached it: {e:#?}");
    }
    let page = epp_metrics(&client, &stack).await;
    assert!(
        metric(&page, "epp_tokenize_total", r#"outcome="ok""#) >= 2.0,
        "{page}"
    );
    let label = format!(r#"model_server_pod="{}""#, s1.pod);
    assert!(
        metric(&page, "epp_kv_events_blocks", &label) > 0.0,
        "{page}"
    );

    // The next request of the prefix goes there and finds it cached.
    let s2 = chat(&client, &stack.gateway, &second).await;
    assert_eq!(s2.pod, s1.pod, "{s2:?}");
    assert!(s2.cached_tokens >= 256, "{s2:?}");

    // Every pod restarts: its cache and event seq start again. Each pod then
    // serves one unrelated prompt (straight, around the picker), whose
    // events at seq 0 tell the picker of the restart.
    let before = ranks(&stack).await;
    stack.restarter().expect("pods").restart_all();
    let other = chat_body(&model, &system_prompt("shipping"), "Where is my parcel?");
    for url in &stack.pod_urls {
        chat(&client, url, &other).await;
    }
    let after = eventually(
        "every pod's restart seen and its new events applied",
        || ranks(&stack),
        |r| {
            r.values().all(|k| k.known && k.last_seq.is_some())
                && r[&s1.pod].restarts > before[&s1.pod].restarts
        },
    )
    .await;
    // The old entries are gone: every pod now holds just the unrelated
    // prompt's blocks, the one that served the billing prompt included.
    let shipping = after[&s1.pod].blocks;
    assert!(shipping > 0, "{after:#?}");
    assert!(
        after.values().all(|k| k.blocks == shipping),
        "before {before:#?}\nafter {after:#?}"
    );
    let third = chat_body(&model, &support, "Can I change my billing date?");
    // The pick of the billing prompt's last request is also remembered
    // speculatively for a short TTL (the scheduler's speculative indexing),
    // so the events' answer shows once that lapses.
    eventually(
        "the billing prompt cached nowhere after the restart",
        || explain(&stack, &third),
        |e| {
            e.candidates
                .iter()
                .all(|c| c.prefix_source == "events" && c.cached_tokens_gpu == 0)
        },
    )
    .await;
    let page = epp_metrics(&client, &stack).await;
    assert!(
        metric(&page, "epp_kv_events_restarts_total", &label) >= 1.0,
        "{page}"
    );

    // Routing goes on: the prefix lands somewhere cold, and its next request
    // follows it there.
    let s3 = chat(&client, &stack.gateway, &third).await;
    assert_eq!(s3.cached_tokens, 0, "{s3:?}");
    let fourth = chat_body(&model, &support, "Do you accept wire transfers?");
    eventually(
        "the new placement indexed",
        || explain(&stack, &fourth),
        |e| candidate(e, &s3.pod).1 >= 256,
    )
    .await;
    let s4 = chat(&client, &stack.gateway, &fourth).await;
    assert_eq!(s4.pod, s3.pod, "{s4:?}");
    assert!(s4.cached_tokens >= 256, "{s4:?}");

    stack.stop().await;
}
