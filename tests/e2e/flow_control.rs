//! Flow control through the real Envoy: two slow pods of one slot each
//! (concurrency detector, `maxConcurrency: 1`), so the third request waits
//! in the picker's queue.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use epp_bench::stack::envoy::BodyMode;

use crate::common::{Stack, eventually, http, otlp};

/// How long the pods take to answer: long enough that what the tests
/// check happens while both are busy.
const TTFT_MS: u64 = 400;
const LONG_TTFT_MS: u64 = 3000;

fn config(max_requests: u32) -> String {
    format!(
        "featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {{maxConcurrency: 1}}
- type: queue-scorer
saturationDetector: {{pluginRef: concurrency-detector}}
objectives:
- {{name: critical, priority: 10}}
- {{name: batch, priority: -1}}
flowControl:
  maxRequests: {max_requests}
  defaultRequestTTL: 60s
  gatewayMaxMessageTimeout: 120s
"
    )
}

async fn stack(max_requests: u32, ttft_ms: u64, mode: BodyMode) -> Stack {
    let cfg = config(max_requests);
    let stack = Stack::start_with(2, &["--config-text", &cfg], |o| o.body_mode = mode).await;
    for b in &stack.backends {
        b.state.ttft_ms.store(ttft_ms, Ordering::SeqCst);
    }
    stack
}

/// Requests waiting in the picker's queues (the sum over its series).
async fn queued(stack: &Stack) -> f64 {
    let Ok(r) = http::get(stack.epp.metrics, "/metrics").await else {
        return -1.0;
    };
    r.text()
        .lines()
        .filter(|l| l.starts_with("inference_extension_flow_control_queue_size{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn completion(stack: &Stack, objective: &str, prompt: &str) -> (http::Reply, Instant) {
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1});
    let r = http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        &[("x-gateway-inference-objective", objective)],
        Some(body.to_string().into_bytes()),
    )
    .await
    .expect("request through envoy");
    (r, Instant::now())
}

fn in_flight(stack: &Stack) -> u64 {
    stack
        .backends
        .iter()
        .map(|b| b.state.unanswered.load(Ordering::SeqCst))
        .sum()
}

/// Fills both pods with batch requests that will finish on their own.
async fn fill(stack: &Stack) -> Vec<tokio::task::JoinHandle<(http::Reply, Instant)>> {
    let mut running = Vec::new();
    for i in 0..2 {
        running.push(spawn_completion(stack, "batch", format!("running {i}")));
    }
    eventually("both pods busy", Duration::from_secs(10), || async {
        in_flight(stack) == 2
    })
    .await;
    running
}

fn spawn_completion(
    stack: &Stack,
    objective: &'static str,
    prompt: String,
) -> tokio::task::JoinHandle<(http::Reply, Instant)> {
    let listen = stack.envoy.listen;
    tokio::spawn(async move {
        let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1});
        let r = http::request(
            listen,
            "POST",
            "/v1/completions",
            &[("x-gateway-inference-objective", objective)],
            Some(body.to_string().into_bytes()),
        )
        .await
        .expect("request through envoy");
        (r, Instant::now())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_request_overtakes_queued_sheddable_ones() {
    let stack = stack(16, TTFT_MS, BodyMode::FullDuplex).await;
    let running = fill(&stack).await;
    let mut batch = Vec::new();
    for i in 0..3 {
        batch.push(spawn_completion(&stack, "batch", format!("queued {i}")));
        let want = f64::from(i + 1);
        eventually("batch request queued", Duration::from_secs(10), || async {
            queued(&stack).await == want
        })
        .await;
    }
    let critical = spawn_completion(&stack, "critical", "critical".into());
    eventually(
        "critical request queued",
        Duration::from_secs(10),
        || async { queued(&stack).await == 4.0 },
    )
    .await;
    for r in running {
        let (r, _) = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (critical, critical_done) = critical.await.unwrap();
    assert_eq!(critical.status, 200, "{}", critical.text());
    let mut later = 0;
    for b in batch {
        let (r, done) = b.await.unwrap();
        assert_eq!(r.status, 200, "admitted requests are served: {}", r.text());
        later += usize::from(done > critical_done);
    }
    // Two slots: the critical request is dispatched with the first queued
    // batch request, the other two wait for it to finish.
    assert!(
        later >= 2,
        "only {later} batch requests finished after the critical one"
    );
    assert_eq!(queued(&stack).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_a_client_that_leaves_frees_its_place() {
    for mode in [BodyMode::FullDuplex, BodyMode::Buffered] {
        full_queue_and_cancel(mode).await;
    }
}

async fn full_queue_and_cancel(mode: BodyMode) {
    let stack = stack(1, LONG_TTFT_MS, mode).await;
    let running = fill(&stack).await;
    let waiting = spawn_completion(&stack, "batch", "waits".into());
    eventually("request queued", Duration::from_secs(10), || async {
        queued(&stack).await == 1.0
    })
    .await;

    // The picker asked the gateway to wait longer for the queued message.
    // Envoy runs a per-message timer only on a message it waits for
    // (buffered bodies), so in full-duplex mode it has nothing to extend.
    // Envoy counts the override when it handles it, which may be after the
    // picker's queue gauge moved: wait until it was counted either way.
    let overrides = || async {
        let extended = stack
            .envoy
            .stat("http.gateway.ext_proc.override_message_timeout_received")
            .await;
        let ignored = stack
            .envoy
            .stat("http.gateway.ext_proc.override_message_timeout_ignored")
            .await;
        (extended, ignored)
    };
    eventually(
        "the gateway counted the override",
        Duration::from_secs(10),
        || async {
            let (extended, ignored) = overrides().await;
            extended + ignored >= 1
        },
    )
    .await;
    let (extended, ignored) = overrides().await;
    match mode {
        BodyMode::Buffered => assert_eq!((extended, ignored), (1, 0), "{mode:?}"),
        BodyMode::FullDuplex => assert_eq!((extended, ignored), (0, 1), "{mode:?}"),
    }
    let (full, _) = completion(&stack, "critical", "no room").await;
    assert_eq!(full.status, 429, "{}", full.text());
    assert_eq!(full.json()["error"]["code"], "flow_control_queue_full");
    assert!(full.header("retry-after").is_some());

    // The waiting client goes away: its place is free at once, long before
    // the pods have room.
    waiting.abort();
    eventually("the place freed", Duration::from_secs(10), || async {
        queued(&stack).await == 0.0
    })
    .await;
    assert_eq!(
        in_flight(&stack),
        2,
        "freed while the pods are still busy, not dispatched"
    );
    let (again, _) = completion(&stack, "critical", "queued, then served").await;
    assert_eq!(again.status, 200, "{}", again.text());
    for r in running {
        assert_eq!(r.await.unwrap().0.status, 200);
    }
}

/// A sampled request that waits in the queue gets an
/// `epp.flow_control.queue` span under its request span, ended with how
/// the wait ended and before the decision's span starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_request_traces_its_wait_in_the_queue() {
    const TRACE_ID: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    const PARENT_ID: &str = "10f067aa0ba902b8";
    let receiver = otlp::Receiver::start().await;
    let endpoint = receiver.endpoint();
    let env = otlp::parent_sampled_env(&endpoint);
    let cfg = config(16);
    let stack = Stack::start_with_env(2, &["--config-text", &cfg], &env, |_| {}).await;
    for b in &stack.backends {
        b.state.ttft_ms.store(TTFT_MS, Ordering::SeqCst);
    }
    let running = fill(&stack).await;
    let listen = stack.envoy.listen;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let traced = tokio::spawn(async move {
        let body = serde_json::json!({"model": "m", "prompt": "traced", "max_tokens": 1});
        http::request(
            listen,
            "POST",
            "/v1/completions",
            &[
                ("traceparent", traceparent.as_str()),
                ("x-gateway-inference-fairness-id", "tenant-a"),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await
        .expect("request through envoy")
    });
    eventually(
        "the traced request queued",
        Duration::from_secs(10),
        || async { queued(&stack).await == 1.0 },
    )
    .await;
    for r in running {
        assert_eq!(r.await.unwrap().0.status, 200);
    }
    let r = traced.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // Every span this test reads: they end (and are exported) at
    // different times, the request's own span last.
    let wanted = ["epp.request", "epp.flow_control.queue", "epp.schedule"];
    let spans = receiver
        .wait_for("the traced request's spans", Duration::from_secs(20), |s| {
            wanted.iter().all(|name| {
                s.iter()
                    .any(|r| r.span.name == *name && r.trace_id_hex() == TRACE_ID)
            })
        })
        .await;
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.span.name == name && s.trace_id_hex() == TRACE_ID)
            .unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
    };
    let request = find("epp.request");
    let queue = find("epp.flow_control.queue");
    let schedule = find("epp.schedule");
    assert_eq!(queue.parent_id_hex(), request.span_id_hex());
    assert_eq!(
        queue.attr("epp.flow_control.outcome").as_deref(),
        Some("dispatched")
    );
    assert_eq!(queue.attr("epp.fairness_id").as_deref(), Some("tenant-a"));
    assert!(
        queue.span.end_time_unix_nano <= schedule.span.start_time_unix_nano,
        "the wait ends before the decision starts"
    );
    assert!(
        queue.span.end_time_unix_nano > queue.span.start_time_unix_nano,
        "the wait took time"
    );
}
