//! Traces, /metrics authentication and the admin port, end to end: the real
//! picker behind a real Envoy, exporting to an OTLP receiver on loopback.

use std::time::{Duration, Instant};

use epp::admin::pb::{ListEndpointsRequest, admin_client::AdminClient};

use crate::common::{Stack, epp::Epp, eventually, http, otlp};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const WAIT: Duration = Duration::from_secs(20);

fn completion_body(prompt: &str) -> Vec<u8> {
    serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1})
        .to_string()
        .into_bytes()
}

/// A request through Envoy with `headers`; its status.
async fn send(stack: &Stack, headers: &[(&str, &str)], prompt: &str) -> u16 {
    http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        headers,
        Some(completion_body(prompt)),
    )
    .await
    .expect("request through envoy")
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_is_continued_in_the_pickers_spans() {
    let receiver = otlp::Receiver::start().await;
    let endpoint = receiver.endpoint();
    let mut env = otlp::parent_sampled_env(&endpoint);
    env.push(("OTEL_SERVICE_NAME", "epp-e2e"));
    let stack = Stack::start_with_env(2, &[], &env, |_| {}).await;
    assert!(
        stack.epp.log().contains("traces exported over OTLP/gRPC"),
        "{}",
        stack.epp.log()
    );

    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    assert_eq!(
        send(&stack, &[("traceparent", &traceparent)], "traced").await,
        200
    );
    // Not sampled by the gateway, or no trace at all: no spans.
    let unsampled = format!("00-{}-{PARENT_ID}-00", "1".repeat(32));
    assert_eq!(
        send(&stack, &[("traceparent", &unsampled)], "unsampled").await,
        200
    );
    assert_eq!(send(&stack, &[], "untraced").await, 200);
    // GKE's load balancer sends GCP's header instead.
    let gcp_trace = "105445aa7843bc8bf206b12000100000";
    let cloud = format!("{gcp_trace}/123;o=1");
    assert_eq!(
        send(&stack, &[("x-cloud-trace-context", &cloud)], "gcp").await,
        200
    );

    let spans = receiver
        .wait_for(
            "the request, decision and response spans of both traces",
            WAIT,
            |s| {
                s.iter().filter(|r| r.span.name == "epp.response").count() >= 2
                    && s.iter().filter(|r| r.span.name == "epp.request").count() >= 2
            },
        )
        .await;
    let in_trace = |t: &str| -> Vec<&otlp::Received> {
        spans.iter().filter(|s| s.trace_id_hex() == t).collect()
    };
    let traced = in_trace(TRACE_ID);
    let find = |name: &str| {
        *traced
            .iter()
            .find(|s| s.span.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {traced:#?}"))
    };
    let request = find("epp.request");
    assert_eq!(
        request.parent_id_hex(),
        PARENT_ID,
        "the gateway's span is the parent"
    );
    assert!(request.service.contains("epp-e2e"), "{}", request.service);
    assert_eq!(request.attr("url.path").as_deref(), Some("/v1/completions"));
    assert_eq!(request.attr("epp.model").as_deref(), Some("m"));
    assert_eq!(
        request.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    let backends: Vec<String> = stack.backends.iter().map(|b| b.addr.to_string()).collect();
    let picked = request.attr("epp.endpoint").expect("the pick");
    assert!(backends.contains(&picked), "{picked} not in {backends:?}");

    let schedule = find("epp.schedule");
    assert_eq!(schedule.parent_id_hex(), request.span_id_hex());
    assert_eq!(schedule.attr("epp.endpoint"), Some(picked.clone()));
    let fallbacks = schedule.attr("epp.fallbacks").expect("fallbacks");
    assert!(
        backends.contains(&fallbacks) && fallbacks != picked,
        "{fallbacks}"
    );
    assert_eq!(schedule.attr("epp.candidates").as_deref(), Some("2"));
    let scores = schedule.attr("epp.scores").expect("scores");
    assert_eq!(scores.split(' ').count(), 2, "{scores}");
    assert!(schedule.attr("epp.prompt_blocks").is_some());
    assert!(
        schedule
            .attr("epp.pick_scores")
            .is_some_and(|s| s.contains("scorer="))
    );

    let response = find("epp.response");
    assert_eq!(response.parent_id_hex(), request.span_id_hex());
    assert_eq!(
        response.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(
        response.span.events.iter().any(|e| e.name == "first byte"),
        "{:?}",
        response.span.events
    );
    assert_eq!(
        response.attr("gen_ai.usage.output_tokens").as_deref(),
        Some("1")
    );

    let gcp = in_trace(gcp_trace);
    let gcp_request = gcp
        .iter()
        .find(|s| s.span.name == "epp.request")
        .expect("a request span in the GCP trace");
    assert_eq!(gcp_request.parent_id_hex(), format!("{:016x}", 123));

    // Give a late export the time to arrive, then: nothing else was traced.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let others: Vec<String> = receiver
        .spans()
        .iter()
        .map(otlp::Received::trace_id_hex)
        .filter(|t| t != TRACE_ID && t != gcp_trace)
        .collect();
    assert!(
        others.is_empty(),
        "unsampled requests were traced: {others:?}"
    );
}

/// p50 of `n` sequential requests' latency through Envoy.
async fn p50(stack: &Stack, n: usize, tag: &str) -> Duration {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        assert_eq!(send(stack, &[], &format!("{tag} {i}")).await, 200);
        took.push(t.elapsed());
    }
    took.sort();
    took[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_gone_collector_never_delays_routing() {
    let mut receiver = otlp::Receiver::start().await;
    let endpoint = receiver.endpoint();
    // Every request traced, a small queue: the most a collector can weigh.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_TRACES_SAMPLER", "always_on"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "16"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
    ];
    let stack = Stack::start_with_env(2, &[], &env, |_| {}).await;
    let _ = p50(&stack, 20, "warm").await;
    receiver
        .wait_for("spans from the warm-up", WAIT, |s| !s.is_empty())
        .await;
    let healthy = p50(&stack, 150, "healthy").await;

    // Slow: each export takes 5 s, so the queue fills and spans are dropped.
    receiver.slow_down(Duration::from_secs(5));
    let slow = p50(&stack, 150, "slow").await;

    // Gone: the port refuses connections.
    receiver.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gone = p50(&stack, 150, "gone").await;

    // A routing path that waited for the collector would add seconds (each
    // export takes 5 s, or fails after a 2 s timeout); the bound leaves
    // room for two shared cores' noise only.
    let bound = healthy.mul_f64(2.0) + Duration::from_millis(5);
    eprintln!("p50 healthy {healthy:?}, slow collector {slow:?}, collector gone {gone:?}");
    assert!(slow <= bound, "slow collector: p50 {slow:?} vs {healthy:?}");
    assert!(gone <= bound, "collector gone: p50 {gone:?} vs {healthy:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_collector_nothing_is_traced_and_the_log_says_so() {
    let epp = Epp::start(&[], &["--secure-serving=false"]).await;
    eventually("the traces line", WAIT, || async {
        epp.log().contains("traces off: no collector configured")
    })
    .await;
    let epp = Epp::start(&[], &["--secure-serving=false", "--tracing=false"]).await;
    eventually("the traces line", WAIT, || async {
        epp.log().contains("traces off (--tracing=false)")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_auth_with_a_token_file_and_its_absence_said_at_startup() {
    // An endpoints file and no token file: open, with a warning.
    let open = Epp::start(&[], &["--secure-serving=false"]).await;
    assert!(
        open.log()
            .contains("/metrics is served WITHOUT authentication"),
        "{}",
        open.log()
    );
    assert_eq!(
        http::get(open.metrics, "/metrics").await.unwrap().status,
        200
    );

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let file_arg = format!("--metrics-auth-token-file={}", token.display());
    let gated = Epp::start(&[], &["--secure-serving=false", &file_arg]).await;
    let scrape = |auth: Option<&'static str>| {
        let addr = gated.metrics;
        async move {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("authorization", a)).into_iter().collect();
            http::request(addr, "GET", "/metrics", &headers, None)
                .await
                .unwrap()
        }
    };
    let none = scrape(None).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    assert_eq!(scrape(Some("Bearer wrong")).await.status, 401);
    let ok = scrape(Some("Bearer s3cret")).await;
    assert_eq!(ok.status, 200);
    assert!(ok.text().contains("inference_extension_info"));
    assert_eq!(
        http::get(gated.metrics, "/healthz").await.unwrap().status,
        200,
        "/healthz stays open"
    );

    // A token file that cannot be read refuses to start.
    let missing = dir.path().join("absent");
    let os = std::ffi::OsStr::new;
    let err = crate::operations::startup_failure(&[
        os("--endpoints-file"),
        os("/dev/null"),
        os("--metrics-auth-token-file"),
        missing.as_os_str(),
    ]);
    assert!(
        err.contains("cannot read --metrics-auth-token-file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_on_its_own_localhost_port_and_health_stays_open() {
    let epp = Epp::start(&[], &["--secure-serving=false"]).await;
    assert!(epp.admin.ip().is_loopback());
    assert_ne!(epp.admin.port(), epp.health.port());
    let mut admin = AdminClient::connect(format!("http://{}", epp.admin))
        .await
        .unwrap();
    assert!(admin.list_endpoints(ListEndpointsRequest {}).await.is_ok());
    let mut on_health = AdminClient::connect(format!("http://{}", epp.health))
        .await
        .unwrap();
    let e = on_health
        .list_endpoints(ListEndpointsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    assert!(
        epp.health_status("readiness").await.is_some(),
        "health on 9003"
    );
}
