//! SLO admission (ours) through the real Envoy: once the picker has seen
//! enough first bytes to calibrate its TTFT model, a request whose TTFT
//! objective no endpoint can meet is refused at once (429, never reaching a
//! pod), and one whose objective is meetable is served.

use std::{sync::atomic::Ordering, time::Duration};

use crate::common::{Stack, eventually, http};

/// How long the pods take to the first byte.
const TTFT_MS: u64 = 150;
/// Warm-up requests: more than the model's warm-up weight (16 samples at a
/// decay of 0.99 take 18).
const WARMUP: usize = 24;

async fn completion(stack: &Stack, slo_ms: Option<&str>) -> http::Reply {
    let body =
        serde_json::json!({"model": "m", "prompt": "a prompt of a few words", "max_tokens": 1});
    let mut headers = vec![];
    if let Some(ms) = slo_ms {
        headers.push(("x-slo-ttft-ms", ms));
    }
    http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        &headers,
        Some(body.to_string().into_bytes()),
    )
    .await
    .expect("request through envoy")
}

/// A metric's value from the picker's /metrics (0 when absent).
async fn metric(stack: &Stack, prefix: &str) -> f64 {
    let Ok(r) = http::get(stack.epp.metrics, "/metrics").await else {
        return -1.0;
    };
    r.text()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn served(stack: &Stack) -> u64 {
    stack.backends.iter().map(|b| b.requests()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmeetable_ttft_objective_is_refused_early_and_a_meetable_one_served() {
    let stack = Stack::start(2, &["--config-text", "sloAdmission: {}\n"]).await;
    for b in &stack.backends {
        b.state.ttft_ms.store(TTFT_MS, Ordering::SeqCst);
    }
    // Before calibration nothing is refused, whatever the objective.
    let cold = completion(&stack, Some("1")).await;
    assert_eq!(cold.status, 200, "{}", cold.text());
    // Calibrate: every routed request's first byte feeds the model, with
    // or without an objective.
    for chunk in 0..WARMUP / 4 {
        let mut batch = Vec::new();
        for _ in 0..4 {
            let listen = stack.envoy.listen;
            batch.push(tokio::spawn(async move {
                let body = serde_json::json!({"model": "m", "prompt": format!("warm-up {chunk}"), "max_tokens": 1});
                http::request(
                    listen,
                    "POST",
                    "/v1/completions",
                    &[],
                    Some(body.to_string().into_bytes()),
                )
                .await
                .expect("request through envoy")
            }));
        }
        for r in batch {
            assert_eq!(r.await.unwrap().status, 200);
        }
    }
    eventually(
        "the model has compared predictions",
        Duration::from_secs(10),
        || async { metric(&stack, "epp_slo_ttft_prediction_ratio_count").await > 0.0 },
    )
    .await;

    // 20 ms against about 150 ms: refused before any pod sees it.
    let before = served(&stack);
    let refused = completion(&stack, Some("20")).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "slo_ttft_unattainable");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(served(&stack), before, "refused without reaching a pod");

    // Two seconds: served.
    let met = completion(&stack, Some("2000")).await;
    assert_eq!(met.status, 200, "{}", met.text());
    assert_eq!(served(&stack), before + 1);
    assert_eq!(
        metric(&stack, "epp_slo_admission_total{outcome=\"refused\"}").await,
        1.0
    );
    assert!(metric(&stack, "epp_slo_admission_total{outcome=\"admitted\"}").await >= 1.0);
}
