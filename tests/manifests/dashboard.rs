//! The Grafana dashboard only queries metrics that exist: the picker's names
//! are checked against its source (every file under src/), vLLM's against
//! the real vLLM /metrics captures in tests/fixtures/metrics, GKE's system
//! metrics against the documented names. A renamed metric otherwise shows
//! up as an empty panel, long after the change.

use std::collections::BTreeSet;

use serde_json::Value;

/// Metrics the dashboard must chart (the picker's and the pool's signals).
pub const REQUIRED: &[&str] = &[
    "inference_objective_request_total",
    "inference_objective_request_duration_seconds_bucket",
    "inference_pool_average_kv_cache_utilization",
    "inference_pool_average_queue_size",
    "inference_pool_ready_pods",
    "inference_extension_scheduler_e2e_duration_seconds_bucket",
    "inference_extension_prefix_indexer_hit_ratio_sum",
    "epp_metrics_scrape_failures_total",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "kubernetes_io:container_accelerator_duty_cycle",
    "kubernetes_io:container_accelerator_memory_used",
    "kubernetes_io:container_accelerator_memory_total",
];

/// GKE system metrics for accelerators, as Managed Service for Prometheus
/// names them in PromQL (kubernetes.io/container/accelerator/duty_cycle is
/// kubernetes_io:container_accelerator_duty_cycle). TPU duty cycle and HBM
/// use per container: GKE's TPU documentation and its metrics list
/// (cloud.google.com/monitoring/api/metrics_kubernetes); collected only from
/// containers declaring port 8431.
pub const GKE_SYSTEM_METRICS: &[&str] = &[
    "kubernetes_io:container_accelerator_duty_cycle",
    "kubernetes_io:container_accelerator_memory_used",
    "kubernetes_io:container_accelerator_memory_total",
    "kubernetes_io:node_accelerator_duty_cycle",
    "kubernetes_io:node_accelerator_memory_used",
    "kubernetes_io:node_accelerator_memory_total",
];

/// Metric names used in the panels' PromQL.
pub fn metric_names(dashboard: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(expr)) = m.get("expr") {
                    names.extend(
                        expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                            .filter(|t| {
                                ["inference_", "epp_", "vllm:", "kubernetes_io:"]
                                    .iter()
                                    .any(|p| t.starts_with(p))
                            })
                            .map(str::to_owned),
                    );
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    names
}

/// Problems with `json`, given the picker's metrics source and vLLM
/// /metrics captures.
pub fn check(json: &str, picker_source: &str, vllm_captures: &str) -> Vec<String> {
    let dashboard: Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => return vec![format!("not valid JSON: {e}")],
    };
    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        if !ids.insert(p["id"].as_u64()) {
            problems.push(format!("panel id {} is used twice", p["id"]));
        }
        let targets = p["targets"].as_array();
        if p["type"] != "row"
            && targets.is_none_or(|t| {
                t.iter()
                    .any(|t| t["expr"].as_str().is_none_or(str::is_empty))
            })
        {
            problems.push(format!(
                "panel {:?} has a target without a query",
                p["title"]
            ));
        }
    }
    let names = metric_names(&dashboard);
    for n in &names {
        let known = if n.starts_with("vllm:") {
            vllm_captures.contains(n.as_str())
        } else if n.starts_with("kubernetes_io:") {
            GKE_SYSTEM_METRICS.contains(&n.as_str())
        } else {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n);
            picker_source.contains(&format!("\"{n}\""))
                || picker_source.contains(&format!("\"{base}\""))
        };
        if !known {
            problems.push(format!(
                "queries {n}, which neither the picker, vLLM nor GKE exports"
            ));
        }
    }
    for r in REQUIRED {
        if !names.contains(*r) {
            problems.push(format!("does not chart {r}"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"Opts::new("inference_pool_ready_pods", "x") HistogramOpts::new("inference_objective_request_duration_seconds", "y")"#;

    fn dash(exprs: &[&str]) -> String {
        let targets: Vec<Value> = exprs
            .iter()
            .map(|e| serde_json::json!({"refId": "A", "expr": e}))
            .collect();
        serde_json::json!({"panels": [{"id": 1, "type": "timeseries", "title": "t", "targets": targets}]}).to_string()
    }

    #[test]
    fn finds_metric_names_in_promql() {
        let d: Value = serde_json::from_str(&dash(&[
            "sum by (pod) (rate(vllm:prefix_cache_hits_total[$__rate_interval])) / inference_pool_ready_pods{name=~\"$pool\"}",
        ]))
        .unwrap();
        let want: BTreeSet<String> = ["vllm:prefix_cache_hits_total", "inference_pool_ready_pods"]
            .map(String::from)
            .into();
        assert_eq!(metric_names(&d), want);
    }

    #[test]
    fn rejects_unknown_and_missing_metrics() {
        let problems = check(
            &dash(&[
                "inference_pool_bogus",
                "histogram_quantile(0.9, rate(inference_objective_request_duration_seconds_bucket[5m]))",
                "vllm:not_a_metric",
            ]),
            SOURCE,
            "vllm:num_requests_waiting{} 0\n",
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("queries inference_pool_bogus")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("queries vllm:not_a_metric")),
            "{problems:?}"
        );
        assert!(
            !problems
                .iter()
                .any(|p| p.contains("queries inference_objective_request_duration_seconds_bucket")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("does not chart vllm:kv_cache_usage_perc")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(
                |p| p.contains("does not chart kubernetes_io:container_accelerator_duty_cycle")
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn rejects_unknown_gke_system_metrics() {
        let problems = check(
            &dash(&[
                "kubernetes_io:container_accelerator_duty_cycle{monitored_resource=\"k8s_container\"}",
                "kubernetes_io:container_tpu_busy",
            ]),
            SOURCE,
            "",
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("queries kubernetes_io:container_tpu_busy")),
            "{problems:?}"
        );
        assert!(
            !problems
                .iter()
                .any(|p| p.contains("queries kubernetes_io:container_accelerator_duty_cycle")),
            "{problems:?}"
        );
    }

    #[test]
    fn rejects_broken_json_and_empty_queries() {
        assert!(check("{", SOURCE, "")[0].contains("not valid JSON"));
        assert!(
            check(&dash(&[""]), SOURCE, "")
                .iter()
                .any(|p| p.contains("without a query"))
        );
    }
}
