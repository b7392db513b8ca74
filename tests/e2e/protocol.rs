//! The ext_proc contract as a client sees it through Envoy: errors, bodiless
//! requests, streaming, large bodies, spoofing, body modes and TLS.

use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::BodyExt;

use crate::common::{
    Stack,
    backend::EVENTS,
    envoy::BodyMode,
    http::{self, post_json},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_openai_style_json() {
    let stack = Stack::start(1, &["--max-request-body-bytes", "2048"]).await;
    let l = stack.envoy.listen;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid_json"),
        (b"[1,2,3]".to_vec(), 400, "invalid_body"),
        (br#"{"prompt":"no model"}"#.to_vec(), 400, "invalid_model"),
        (br#"{"model":"m"}"#.to_vec(), 400, "invalid_prompt"),
        (
            format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(4096)).into_bytes(),
            413,
            "request_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let r = http::request(l, "POST", "/v1/completions", &[], Some(body))
            .await
            .unwrap();
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(v["error"]["type"].is_string());
    }
    assert_eq!(
        stack.backends[0].requests(),
        0,
        "no bad request reached the model server"
    );
    // The picker kept serving everyone else.
    assert_eq!(stack.completion("fine").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ready_endpoint_is_503() {
    let stack = Stack::start(1, &[]).await;
    std::fs::write(stack.epp.endpoints_file(), "endpoints: []\n").unwrap();
    let l = stack.envoy.listen;
    crate::common::eventually("pool emptied", Duration::from_secs(10), || async move {
        http::get(l, "/v1/models")
            .await
            .is_ok_and(|r| r.status == 503)
    })
    .await;
    let r = stack.completion("anyone?").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "no_ready_endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_requests_are_routed() {
    let stack = Stack::start(2, &[]).await;
    for path in ["/v1/models", "/health"] {
        let r = http::get(stack.envoy.listen, path).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(r.backend().starts_with('b'));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_pass_through_unbuffered_and_count_usage() {
    let stack = Stack::start(1, &[]).await;
    let body = serde_json::json!({"model": "m", "prompt": "stream please", "stream": true,
                                  "stream_options": {"include_usage": true}});
    let resp = http::send(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        &[],
        Some(body.to_string().into_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let mut frames = resp.into_body().into_data_stream();
    // The backend holds every event after the first until released, so
    // receiving the first one proves nothing buffers the stream.
    let first = tokio::time::timeout(Duration::from_secs(10), frames.next())
        .await
        .expect("first event arrives while the backend still holds the rest")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"t0\""));
    stack.backends[0].state.release_stream.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = frames.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&rest)
    );
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), EVENTS + 2, "{text}");
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    for (i, event) in events.iter().take(EVENTS).enumerate() {
        assert!(event.contains(&format!("\"t{i}\"")), "event {i}: {event}");
    }
    let m = stack.epp.metrics;
    crate::common::eventually("usage counted", Duration::from_secs(5), || async move {
        http::get(m, "/metrics").await.is_ok_and(|r| {
            r.text().contains("inference_objective_prompt_cached_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 8")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_body_arrives_intact() {
    let stack = Stack::start(2, &[]).await;
    let prompt: String = (0..(1 << 20) / 8)
        .map(|i| format!("w{:06} ", i % 1_000_000))
        .collect();
    let body = serde_json::json!({"model": "m", "prompt": prompt})
        .to_string()
        .into_bytes();
    assert!(body.len() > 1 << 20);
    let r = http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        &[],
        Some(body.clone()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let served = stack.backend(r.backend());
    assert_eq!(served.state.last_body.lock().len(), body.len());
    assert!(
        *served.state.last_body.lock() == body,
        "body changed on the way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_destination_header_is_ignored() {
    let stack = Stack::start(2, &[]).await;
    stack.backend("b0").set_load(20, 0.5);
    stack.epp.wait_scraped(4).await;
    let victim = stack.backend("b0").host_port();
    let m = stack.epp.metrics;
    crate::common::eventually("b0 queue scraped", Duration::from_secs(10), || async move {
        http::get(m, "/metrics").await.is_ok_and(|r| {
            r.text()
                .contains("model_server_pod=\"backend-0\",name=\"default\"} 20")
        })
    })
    .await;
    for _ in 0..5 {
        let r = http::request(
            stack.envoy.listen,
            "POST",
            "/v1/completions",
            &[
                ("x-gateway-destination-endpoint", &victim),
                ("x-gateway-destination-endpoint-served", &victim),
            ],
            Some(br#"{"model":"m","prompt":"route me where I say"}"#.to_vec()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), "b1", "the client must not pick the endpoint");
    }
    let dest = stack
        .backend("b1")
        .last_header("x-gateway-destination-endpoint")
        .unwrap_or_default();
    assert!(
        dest.starts_with(&stack.backend("b1").host_port()),
        "picker's choice first: {dest}"
    );
    assert_eq!(
        stack
            .backend("b1")
            .last_header("x-gateway-destination-endpoint-served"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_body_mode_works_end_to_end() {
    let stack = Stack::start_with(2, &TRUST_REWRITE, |o| o.body_mode = BodyMode::Buffered).await;
    let body = serde_json::json!({"model": "m", "prompt": "buffered ".repeat(2000)});
    let r = post_json(stack.envoy.listen, "/v1/completions", &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        *stack.backend(r.backend()).state.last_body.lock(),
        body.to_string().into_bytes()
    );
    let r = http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        &[],
        Some(b"{oops".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        http::get(stack.envoy.listen, "/v1/models")
            .await
            .unwrap()
            .status,
        200
    );
    // A rewritten model travels as a plain body mutation in this mode.
    let r = post_with_rewrite_header(&stack).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "alias", "client sees its own model name");
    assert_eq!(model_sent(&stack, &r), "served-name");
}

/// A completion for model `alias` with a header asking for `served-name`.
async fn post_with_rewrite_header(stack: &Stack) -> http::Reply {
    http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        &[("x-gateway-model-name-rewrite", "served-name")],
        Some(br#"{"model":"alias","prompt":"hi"}"#.to_vec()),
    )
    .await
    .unwrap()
}

/// The model the backend that served `r` was sent.
fn model_sent(stack: &Stack, r: &http::Reply) -> serde_json::Value {
    let sent: serde_json::Value =
        serde_json::from_slice(&stack.backend(r.backend()).state.last_body.lock()).unwrap();
    sent["model"].clone()
}

/// Picker flags whose config lets clients rewrite the model by header.
const TRUST_REWRITE: [&str; 2] = [
    "--config-text",
    "trustedHeaders: [x-gateway-model-name-rewrite]",
];

/// By default a client's rewrite header is ignored: the model server gets
/// the model the body names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_model_rewrite_header_is_ignored_unless_trusted() {
    let stack = Stack::start(1, &[]).await;
    let r = post_with_rewrite_header(&stack).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(model_sent(&stack, &r), "alias");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_rewrite_in_full_duplex_mode() {
    let stack = Stack::start(1, &TRUST_REWRITE).await;
    let r = post_with_rewrite_header(&stack).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "alias");
    assert_eq!(model_sent(&stack, &r), "served-name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_over_tls_with_alpn_h2() {
    let stack = Stack::start(2, &["--secure-serving"]).await;
    let r = stack.completion("over TLS").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        stack.envoy.stat("cluster.epp.ssl.handshake").await >= 1,
        "Envoy spoke TLS to the picker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_only_when_needed_saves_messages() {
    // Both gateways buffer request bodies and are configured not to send
    // response bodies; the picker in full mode asks for them per request with
    // a mode override (Envoy honours overrides only outside full-duplex mode).
    let lean_gateway = |o: &mut crate::common::envoy::EnvoyOptions| {
        o.body_mode = BodyMode::Buffered;
        o.response_bodies = false;
    };
    let full = Stack::start_with(1, &[], lean_gateway).await;
    let lean = Stack::start_with(1, &["--response-processing", "minimal"], lean_gateway).await;
    for stack in [&full, &lean] {
        for i in 0..4 {
            let r = stack.completion(&format!("mode override {i}")).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(r.json()["choices"].is_array(), "response body intact");
        }
    }
    let sent_full = full
        .envoy
        .stat("http.gateway.ext_proc.stream_msgs_sent")
        .await;
    let sent_lean = lean
        .envoy
        .stat("http.gateway.ext_proc.stream_msgs_sent")
        .await;
    assert!(
        sent_lean < sent_full,
        "mode override saves messages: {sent_lean} vs {sent_full}"
    );
    // In-flight accounting is still released when Envoy ends the stream.
    let m = lean.epp.metrics;
    crate::common::eventually(
        "running back to zero",
        Duration::from_secs(5),
        || async move {
            http::get(m, "/metrics").await.is_ok_and(|r| {
                r.text()
                    .contains("inference_objective_running_requests{model_name=\"m\"} 0")
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_needed_response_body_is_requested_from_a_lean_gateway() {
    // Model rewrite needs the response body to restore the client's name.
    let mut args = vec!["--response-processing", "minimal"];
    args.extend(TRUST_REWRITE);
    let stack = Stack::start_with(1, &args, |o| {
        o.body_mode = BodyMode::Buffered;
        o.response_bodies = false;
    })
    .await;
    let r = post_with_rewrite_header(&stack).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "alias");
}
