//! vLLM's metric names, types, labels and histogram buckets (vLLM v1,
//! `vllm/v1/metrics/loggers.py`), so scrapers written for vLLM (the EPP's
//! metrics collector, dashboards) read the simulator unchanged. Counters are
//! declared with their `_total` name, as Python's client writes them.

use crate::prom::{Histogram, escape_label, header, sample};

pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Finish reasons vLLM reports; the simulator produces `length` (it always
/// generates max_tokens) and `abort` (client went away after admission).
pub const FINISH_REASONS: [&str; 3] = ["stop", "length", "abort"];

#[derive(Debug, Clone)]
pub struct PodMetrics {
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Indexed like [`FINISH_REASONS`].
    pub finished: [u64; 3],
    pub ttft: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
}

impl Default for PodMetrics {
    fn default() -> Self {
        Self {
            prefix_queries: 0,
            prefix_hits: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            finished: [0; 3],
            ttft: Histogram::new(&TTFT_BUCKETS),
            e2e: Histogram::new(&E2E_BUCKETS),
            queue_time: Histogram::new(&E2E_BUCKETS),
        }
    }
}

/// Point-in-time engine state for the gauges.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub block_size: usize,
    pub num_gpu_blocks: usize,
}

/// Renders the whole `/metrics` body.
pub fn render(model: &str, m: &PodMetrics, g: &Gauges) -> String {
    let base = format!("engine=\"0\",model_name=\"{}\"", escape_label(model));
    let mut out = String::with_capacity(8 * 1024);
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        header(out, name, help, "gauge");
        sample(out, name, &base, v);
    };
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        header(out, name, help, "counter");
        sample(out, name, &base, v as f64);
    };
    gauge(
        &mut out,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        g.running as f64,
    );
    gauge(
        &mut out,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        g.waiting as f64,
    );
    gauge(
        &mut out,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        g.kv_usage,
    );
    header(
        &mut out,
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        "gauge",
    );
    sample(
        &mut out,
        "vllm:cache_config_info",
        &format!(
            "block_size=\"{}\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"{}\"",
            g.block_size, g.num_gpu_blocks
        ),
        1.0,
    );
    counter(
        &mut out,
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
        m.prefix_queries,
    );
    counter(
        &mut out,
        "vllm:prefix_cache_hits_total",
        "Prefix cache hits, in terms of number of cached tokens.",
        m.prefix_hits,
    );
    counter(
        &mut out,
        "vllm:prompt_tokens_total",
        "Number of prefill tokens processed.",
        m.prompt_tokens,
    );
    counter(
        &mut out,
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
        m.generation_tokens,
    );
    header(
        &mut out,
        "vllm:request_success_total",
        "Count of successfully processed requests.",
        "counter",
    );
    for (reason, n) in FINISH_REASONS.iter().zip(m.finished) {
        sample(
            &mut out,
            "vllm:request_success_total",
            &format!("{base},finished_reason=\"{reason}\""),
            n as f64,
        );
    }
    m.ttft.write(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &base,
    );
    m.e2e.write(
        &mut out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &base,
    );
    m.queue_time.write(
        &mut out,
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &base,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prom;

    /// What the server sends for the picker's `name[]` filter: the same
    /// signals in a fraction of the page.
    #[test]
    fn the_name_filtered_page_carries_the_picker_signals() {
        let g = Gauges {
            running: 3,
            waiting: 2,
            kv_usage: 0.5,
            block_size: 16,
            num_gpu_blocks: 4096,
        };
        let text = render("m", &PodMetrics::default(), &g);
        let vllm = epp::scrape::EngineMapping::vllm();
        let q = epp::scrape::name_filter_query(&vllm);
        let names = prom::requested_names(Some(&q)).unwrap();
        let small = prom::restrict(&text, &names);
        prom::parse(&small).unwrap();
        assert_eq!(small.lines().count(), 12, "{small}");
        assert!(
            small.len() * 10 < text.len(),
            "{} of {}",
            small.len(),
            text.len()
        );
        let full = epp::scrape::extract(text.as_bytes(), &vllm).unwrap();
        assert_eq!(epp::scrape::extract(small.as_bytes(), &vllm).unwrap(), full);
        assert_eq!((full.waiting, full.running, full.num_blocks), (2, 3, 4096));
    }

    #[test]
    fn renders_parseable_vllm_metrics() {
        let mut m = PodMetrics {
            prefix_queries: 100,
            prefix_hits: 48,
            finished: [0, 3, 1],
            ..PodMetrics::default()
        };
        m.ttft.observe(0.03);
        m.ttft.observe(0.7);
        m.e2e.observe(0.45);
        let g = Gauges {
            running: 2,
            waiting: 1,
            kv_usage: 0.25,
            block_size: 16,
            num_gpu_blocks: 8192,
        };
        let text = render("Qwen/Qwen2.5-3B-Instruct", &m, &g);
        let p = prom::parse(&text).unwrap();
        let one = |n: &str| p.sum(n).unwrap();
        assert_eq!(one("vllm:num_requests_running"), 2.0);
        assert_eq!(one("vllm:num_requests_waiting"), 1.0);
        assert_eq!(one("vllm:kv_cache_usage_perc"), 0.25);
        assert_eq!(one("vllm:prefix_cache_queries_total"), 100.0);
        assert_eq!(one("vllm:prefix_cache_hits_total"), 48.0);
        assert_eq!(one("vllm:request_success_total"), 4.0);
        assert_eq!(one("vllm:time_to_first_token_seconds_count"), 2.0);
        assert_eq!(one("vllm:e2e_request_latency_seconds_count"), 1.0);
        assert_eq!(p.types["vllm:prefix_cache_hits_total"], "counter");
        assert_eq!(p.types["vllm:time_to_first_token_seconds"], "histogram");
        let info = p
            .samples
            .iter()
            .find(|s| s.name == "vllm:cache_config_info")
            .unwrap();
        assert_eq!(info.label("block_size"), Some("16"));
        assert_eq!(info.label("num_gpu_blocks"), Some("8192"));
        assert!(
            p.samples
                .iter()
                .filter(|s| s.name.starts_with("vllm:num_requests"))
                .all(
                    |s| s.label("model_name") == Some("Qwen/Qwen2.5-3B-Instruct")
                        && s.label("engine") == Some("0")
                )
        );
    }
}
