//! The picker's Prometheus registry and the metrics of the request path,
//! named as GIE's Go picker names them where an equivalent exists, so
//! dashboards and alerts carry over:
//!
//! - `inference_objective_*{model_name,target_model_name}`: requests, errors,
//!   duration, request/response sizes, input/output/cached tokens, running;
//! - `inference_extension_*`: scheduler latency and attempts, prefix hit
//!   ratio, build info.
//!
//! Everything else is exported by the subsystem that owns the state, as a
//! [`Computed`] collector registered when the server is wired: pool gauges
//! (`endpoints`), scrape counters (`scrape`), the prefix index size
//! (`prefix`), the endpoint sources and leadership. So this module, and the
//! request path that uses it, depends on none of those subsystems.
//!
//! Label values that come from clients (model names) are bounded: after
//! [`MAX_MODEL_LABELS`] distinct names, further ones are reported as
//! `other`, so a client cannot grow the series count without bound.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// Distinct client-supplied model names kept as label values.
pub const MAX_MODEL_LABELS: usize = 100;
/// Label value used for model names beyond the bound.
pub const OVERFLOW_LABEL: &str = "other";

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
const SCHEDULER_BUCKETS: &[f64] = &[
    0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];
const RATIO_BUCKETS: &[f64] = &[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// 64 B .. 1 GiB, x4 per bucket.
pub fn size_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(64.0, 4.0, 13).unwrap_or_default()
}

fn token_buckets() -> Vec<f64> {
    // 1 .. ~1M tokens, x2 per bucket.
    prometheus::exponential_buckets(1.0, 2.0, 21).unwrap_or_default()
}

/// Keeps client-supplied label values bounded.
#[derive(Debug, Default)]
pub struct BoundedLabels {
    known: DashMap<String, ()>,
    count: AtomicUsize,
    max: usize,
}

impl BoundedLabels {
    pub fn new(max: usize) -> Self {
        Self {
            known: DashMap::new(),
            count: AtomicUsize::new(0),
            max,
        }
    }

    /// `value` itself while fewer than `max` distinct values were seen (or it
    /// is one of them), else [`OVERFLOW_LABEL`].
    pub fn get<'a>(&self, value: &'a str) -> &'a str {
        if self.known.contains_key(value) {
            return value;
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < self.max {
            self.known.insert(value.to_owned(), ());
            value
        } else {
            self.count.fetch_sub(1, Ordering::Relaxed);
            OVERFLOW_LABEL
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metric registration")]
    Prometheus(#[from] prometheus::Error),
}

/// Registers `c` and hands it back, for struct literals of metrics.
pub fn register<C: Collector + Clone + 'static>(r: &Registry, c: C) -> Result<C, TelemetryError> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// The text exposition of every metric in `registry`; [`Computed`]
/// collectors read their sources now, so they are exact at scrape time and
/// cost nothing in between.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::with_capacity(16 << 10);
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Registers `inference_extension_info` (the build's commit and version).
pub fn register_build_info(registry: &Registry) -> Result<(), TelemetryError> {
    let info = IntGaugeVec::new(
        Opts::new(
            "inference_extension_info",
            "Build information of the endpoint picker.",
        ),
        &["commit", "build_ref"],
    )?;
    info.with_label_values(&[
        option_env!("EPP_COMMIT").unwrap_or("unknown"),
        env!("CARGO_PKG_VERSION"),
    ])
    .set(1);
    registry.register(Box::new(info))?;
    Ok(())
}

/// Metrics whose values live elsewhere (atomics of the scraper, the
/// endpoint store, the Kubernetes watches) and are copied into Prometheus
/// types only when /metrics is rendered.
pub trait ComputedMetrics: Send + Sync + 'static {
    /// The Prometheus metrics, each already holding its values' shape.
    fn metrics(&self) -> Vec<&dyn Collector>;
    /// Brings every value up to date with the source.
    fn refresh(&self);
}

/// Adapts [`ComputedMetrics`] to a registrable collector.
#[derive(Debug)]
pub struct Computed<T>(pub T);

impl<T: ComputedMetrics> Collector for Computed<T> {
    fn desc(&self) -> Vec<&Desc> {
        self.0
            .metrics()
            .into_iter()
            .flat_map(|m| m.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.refresh();
        self.0
            .metrics()
            .into_iter()
            .flat_map(|m| m.collect())
            .collect()
    }
}

/// Raises a counter to a running total kept elsewhere (counters only go up,
/// so a total that went down, which a restart of its source would cause, is
/// ignored until it passes the counter again).
pub fn sync_counter(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// The metrics of the request path, shared by the director and every
/// request ticket.
#[derive(Debug)]
pub struct RequestMetrics {
    models: BoundedLabels,
    pub request_total: IntCounterVec,
    pub request_error_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub request_sizes: HistogramVec,
    pub response_sizes: HistogramVec,
    pub input_tokens: HistogramVec,
    pub output_tokens: HistogramVec,
    pub cached_tokens: HistogramVec,
    pub running_requests: IntGaugeVec,
    pub scheduler_duration: Histogram,
    pub scheduler_attempts: IntCounterVec,
    pub prefix_hit_ratio: Histogram,
    pub prefix_hit_bytes: Histogram,
    /// Prompts tokenized for the token-exact prefix match, by outcome.
    pub tokenize_total: IntCounterVec,
}

impl RequestMetrics {
    /// Creates the metrics and registers them in `r`.
    pub fn new(r: &Registry) -> Result<Self, TelemetryError> {
        let model_labels = &["model_name", "target_model_name"];
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                model_labels,
            )
        };
        Ok(Self {
            request_total: register(r, IntCounterVec::new(
                Opts::new("inference_objective_request_total", "Requests routed, by requested and target model."),
                model_labels,
            )?)?,
            request_error_total: register(r, IntCounterVec::new(
                Opts::new("inference_objective_request_error_total", "Requests that failed, by model and error code."),
                &["model_name", "target_model_name", "error_code"],
            )?)?,
            request_duration: register(r, hist(
                "inference_objective_request_duration_seconds",
                "Time from the request headers to the end of the response, in seconds.",
                DURATION_BUCKETS.to_vec(),
            )?)?,
            request_sizes: register(r, hist(
                "inference_objective_request_sizes",
                "Request body sizes in bytes.",
                size_buckets(),
            )?)?,
            response_sizes: register(r, hist(
                "inference_objective_response_sizes",
                "Response body sizes in bytes.",
                size_buckets(),
            )?)?,
            input_tokens: register(r, hist(
                "inference_objective_input_tokens",
                "Prompt tokens per request, as reported by the model server.",
                token_buckets(),
            )?)?,
            output_tokens: register(r, hist(
                "inference_objective_output_tokens",
                "Generated tokens per request, as reported by the model server.",
                token_buckets(),
            )?)?,
            cached_tokens: register(r, hist(
                "inference_objective_prompt_cached_tokens",
                "Prompt tokens served from the model server's prefix cache.",
                token_buckets(),
            )?)?,
            running_requests: register(r, IntGaugeVec::new(
                Opts::new("inference_objective_running_requests", "Requests routed and not yet finished."),
                &["model_name"],
            )?)?,
            scheduler_duration: register(r, Histogram::with_opts(
                HistogramOpts::new(
                    "inference_extension_scheduler_e2e_duration_seconds",
                    "Time to parse a request and choose its endpoint, in seconds.",
                )
                .buckets(SCHEDULER_BUCKETS.to_vec()),
            )?)?,
            tokenize_total: register(r, IntCounterVec::new(
                Opts::new(
                    "epp_tokenize_total",
                    "Prompts tokenized for the token-exact prefix match, by outcome: ok, no_tokenizer (the model has none: approximate index), or the tokenizer's error code (the request is still routed, by the approximate index).",
                ),
                &["outcome"],
            )?)?,
            scheduler_attempts: register(r, IntCounterVec::new(
                Opts::new("inference_extension_scheduler_attempts_total", "Scheduling attempts by outcome."),
                &["status"],
            )?)?,
            prefix_hit_ratio: register(r, Histogram::with_opts(
                HistogramOpts::new(
                    "inference_extension_prefix_indexer_hit_ratio",
                    "Fraction of a prompt's blocks the chosen endpoint was expected to have cached.",
                )
                .buckets(RATIO_BUCKETS.to_vec()),
            )?)?,
            prefix_hit_bytes: register(r, Histogram::with_opts(
                HistogramOpts::new(
                    "inference_extension_prefix_indexer_hit_bytes",
                    "Prompt bytes the chosen endpoint was expected to have cached.",
                )
                .buckets(size_buckets()),
            )?)?,
            models: BoundedLabels::new(MAX_MODEL_LABELS),
        })
    }

    /// Metrics in a registry of their own, for tests and benches.
    pub fn standalone() -> Result<Self, TelemetryError> {
        Self::new(&Registry::new())
    }

    /// A bounded label value for a client-supplied model name.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if model.is_empty() {
            return "";
        }
        self.models.get(model)
    }
}

#[cfg(test)]
mod tests {
    use prometheus::IntGauge;

    use super::*;

    #[test]
    fn model_labels_are_bounded() {
        let b = BoundedLabels::new(2);
        assert_eq!(b.get("a"), "a");
        assert_eq!(b.get("b"), "b");
        assert_eq!(b.get("c"), OVERFLOW_LABEL);
        assert_eq!(b.get("a"), "a");
        assert_eq!(b.known.len(), 2);
    }

    #[test]
    fn renders_gie_names_and_build_info() {
        let r = Registry::new();
        let m = RequestMetrics::new(&r).unwrap();
        register_build_info(&r).unwrap();
        m.request_total.with_label_values(&["m", "m"]).inc();
        let text = render(&r);
        for needle in [
            "inference_objective_request_total{model_name=\"m\",target_model_name=\"m\"} 1",
            "# TYPE inference_extension_scheduler_e2e_duration_seconds histogram",
            "inference_extension_info{",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    /// A source read at render time, as the subsystems' collectors are.
    struct Counted {
        source: std::sync::atomic::AtomicU64,
        total: IntCounter,
        gauge: IntGauge,
    }

    impl ComputedMetrics for Counted {
        fn metrics(&self) -> Vec<&dyn Collector> {
            vec![&self.total, &self.gauge]
        }
        fn refresh(&self) {
            let n = self.source.load(Ordering::Relaxed);
            sync_counter(&self.total, n);
            self.gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    #[test]
    fn computed_collectors_read_their_source_at_render_time() {
        let r = Registry::new();
        let c = std::sync::Arc::new(Computed(Counted {
            source: 3.into(),
            total: IntCounter::new("t_total", "t").unwrap(),
            gauge: IntGauge::new("g", "g").unwrap(),
        }));
        r.register(Box::new(ArcCollector(std::sync::Arc::clone(&c))))
            .unwrap();
        let text = render(&r);
        assert!(text.contains("t_total 3") && text.contains("g 3"), "{text}");
        c.0.source.store(2, Ordering::Relaxed);
        let text = render(&r);
        assert!(
            text.contains("t_total 3") && text.contains("g 2"),
            "a counter never goes down; a gauge follows\n{text}"
        );
        c.0.source.store(10, Ordering::Relaxed);
        assert!(render(&r).contains("t_total 10"));
    }

    struct ArcCollector(std::sync::Arc<Computed<Counted>>);

    impl Collector for ArcCollector {
        fn desc(&self) -> Vec<&Desc> {
            self.0.desc()
        }
        fn collect(&self) -> Vec<MetricFamily> {
            self.0.collect()
        }
    }
}
