//! Running the picker: metrics, health, the admin API, reloads, shutdown,
//! and startup errors.

use std::{process::Command, time::Duration};

use epp::admin::pb::{ExplainRequest, ListEndpointsRequest, admin_client::AdminClient};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{Stack, epp::Epp, eventually, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_use_gie_names_and_pass_promtool() {
    let stack = Stack::start(2, &[]).await;
    for i in 0..3 {
        assert_eq!(stack.completion(&format!("count me {i}")).await.status, 200);
    }
    let _ = http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        &[],
        Some(b"{bad".to_vec()),
    )
    .await;
    let text = http::get(stack.epp.metrics, "/metrics")
        .await
        .unwrap()
        .text();
    for name in [
        "inference_objective_request_total",
        "inference_objective_request_error_total",
        "inference_objective_request_duration_seconds_bucket",
        "inference_objective_input_tokens_bucket",
        "inference_pool_average_kv_cache_utilization",
        "inference_pool_average_queue_size",
        "inference_pool_ready_pods{name=\"default\"} 2",
        "inference_extension_scheduler_e2e_duration_seconds_bucket",
        "inference_extension_prefix_indexer_hit_ratio_bucket",
        "inference_extension_prefix_indexer_size",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    crate::common::promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_model_names_do_not_grow_the_series() {
    let stack = Stack::start(1, &[]).await;
    for i in 0..(epp::telemetry::MAX_MODEL_LABELS + 20) {
        let body = serde_json::json!({"model": format!("model-{i}"), "prompt": "x"});
        assert_eq!(
            http::post_json(stack.envoy.listen, "/v1/completions", &body)
                .await
                .unwrap()
                .status,
            200
        );
    }
    let text = http::get(stack.epp.metrics, "/metrics")
        .await
        .unwrap()
        .text();
    let series = text
        .lines()
        .filter(|l| l.starts_with("inference_objective_request_total{"))
        .count();
    assert!(
        series <= epp::telemetry::MAX_MODEL_LABELS + 1,
        "{series} series"
    );
    assert!(text.contains("model_name=\"other\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_services_and_admin_api() {
    let stack = Stack::start(2, &[]).await;
    for service in [
        "",
        "liveness",
        "readiness",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        assert_eq!(
            stack.epp.health_status(service).await,
            Some(ServingStatus::Serving),
            "{service:?}"
        );
    }
    let mut admin = AdminClient::connect(format!("http://{}", stack.epp.admin))
        .await
        .unwrap();
    let list = admin
        .list_endpoints(ListEndpointsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.synced);
    assert_eq!(list.endpoints.len(), 2);
    assert!(
        list.endpoints
            .iter()
            .all(|e| e.metrics.as_ref().is_some_and(|m| m.fresh))
    );

    let prompt = "explain where this long prompt would go ".repeat(10);
    assert_eq!(stack.completion(&prompt).await.status, 200);
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1}).to_string();
    let ex = admin
        .explain(ExplainRequest {
            path: "/v1/completions".into(),
            body: body.into_bytes(),
            ..ExplainRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ex.error.is_none());
    assert_eq!(ex.candidates.len(), 2);
    assert!(ex.prompt_blocks > 0);
    assert_eq!(ex.picked.len(), 2);
    // The endpoint that served the prompt before is picked again, and the
    // explanation says so with its scores.
    let list = admin
        .list_endpoints(ListEndpointsRequest {})
        .await
        .unwrap()
        .into_inner();
    let holder = list
        .endpoints
        .iter()
        .find(|e| e.prefix_index_blocks > 0)
        .expect("indexed");
    assert_eq!(ex.picked[0], holder.address);
    let ex = admin
        .explain(ExplainRequest {
            path: "/v1/completions".into(),
            body: b"{".to_vec(),
            ..ExplainRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.error.map(|e| e.http_status), Some(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_discovery_and_file_changes_apply() {
    let b = crate::common::backend::Backend::start("late").await;
    let mut epp = Epp::spawn_with_file(None, &["--secure-serving=false"]);
    eventually("liveness up", Duration::from_secs(20), || async {
        epp.health_status("liveness").await == Some(ServingStatus::Serving)
    })
    .await;
    assert_eq!(
        epp.health_status("readiness").await,
        Some(ServingStatus::NotServing)
    );
    std::fs::write(
        epp.endpoints_file(),
        crate::common::epp::endpoints_yaml(&[b.addr]),
    )
    .unwrap();
    epp.wait_ready().await;
    let mut admin = AdminClient::connect(format!("http://{}", epp.admin))
        .await
        .unwrap();
    assert_eq!(
        admin
            .list_endpoints(ListEndpointsRequest {})
            .await
            .unwrap()
            .into_inner()
            .endpoints
            .len(),
        1
    );
    // An invalid file keeps the last good set.
    std::fs::write(epp.endpoints_file(), "endpoints: [oops").unwrap();
    let e = &epp;
    eventually(
        "invalid file logged",
        Duration::from_secs(10),
        || async move { e.log().contains("endpoints file invalid") },
    )
    .await;
    assert_eq!(
        admin
            .list_endpoints(ListEndpointsRequest {})
            .await
            .unwrap()
            .into_inner()
            .endpoints
            .len(),
        1
    );
    assert_eq!(epp.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let b = crate::common::backend::Backend::start("b").await;
    let mut epp = Epp::start(
        &[b.addr],
        &["--secure-serving=false", "--shutdown-grace-period", "5s"],
    )
    .await;
    let status = epp.terminate();
    assert_eq!(status.code(), Some(0), "{}", epp.log());
    assert!(epp.log().contains("shutting down"));
}

/// Runs the picker with `args` on free ports and the endpoints file
/// `/dev/null`, expecting it to fail at startup; returns its stderr.
pub(crate) fn startup_failure(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(args)
        .args([
            "--grpc-port",
            "0",
            "--grpc-health-port",
            "0",
            "--admin-port",
            "0",
            "--metrics-port",
            "0",
        ])
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn startup_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "plugins:\n- type: no-such-scorer\n").unwrap();
    let os = std::ffi::OsStr::new;
    let err = startup_failure(&[
        os("--config-file"),
        cfg.as_os_str(),
        os("--endpoints-file"),
        os("/dev/null"),
    ]);
    assert!(
        err.contains("no-such-scorer") && err.contains("known types"),
        "{err}"
    );
    // Each cause once: the step that failed, then the reason.
    assert_eq!(err.matches("known types").count(), 1, "{err}");
    assert!(err.contains("scheduler config"), "{err}");

    // A cause with a cause of its own: every level, once each.
    let missing = dir.path().join("missing");
    let err = startup_failure(&[
        os("--secure-serving"),
        os("--cert-path"),
        missing.as_os_str(),
        os("--endpoints-file"),
        os("/dev/null"),
    ]);
    for cause in ["TLS", "cannot read", "No such file or directory"] {
        assert_eq!(err.matches(cause).count(), 1, "{cause:?} once in\n{err}");
    }

    let err = startup_failure(&[]);
    assert!(err.contains("no discovery configured"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_epp"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--grpc-port",
        "--grpc-health-port",
        "--metrics-port",
        "--secure-serving",
        "--cert-path",
        "--endpoints-file",
        "--pool-name",
        "--pool-namespace",
        "--config-file",
        "--fallback-endpoints",
        "--refresh-metrics-interval",
        "--metrics-staleness-threshold",
        "--max-request-body-bytes",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
