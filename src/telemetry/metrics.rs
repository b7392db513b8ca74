//! The picker's own Prometheus metrics, named as GIE's Go picker names them
//! where an equivalent exists, so dashboards and alerts carry over:
//!
//! - `inference_objective_*{model_name,target_model_name}`: requests, errors,
//!   duration, request/response sizes, input/output/cached tokens, running;
//! - `inference_pool_*{name}`: average KV-cache utilisation, queue size and
//!   running requests over endpoints with fresh metrics, ready pods, and the
//!   per-pod queue size;
//! - `inference_extension_*`: scheduler latency and attempts, prefix index
//!   size and hit ratio, build info.
//!
//! Ours, prefixed `epp_`: scrape counters; Kubernetes discovery errors per
//! resource, whether discovery is synced and connected, and whether this
//! replica is the leader.
//!
//! Label values that come from clients (model names) are bounded: after
//! [`MAX_MODEL_LABELS`] distinct names, further ones are reported as
//! `other`, so a client cannot grow the series count without bound. Pool
//! gauges are recomputed from the endpoint store when /metrics is rendered,
//! so they are exact at scrape time and cost nothing in between.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use dashmap::DashMap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};

use crate::{
    discovery::kube::{DiscoveryStats, WatchedResource},
    endpoints::EndpointStore,
    prefix::PrefixIndex,
    scrape::ScrapeStats,
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

fn size_buckets() -> Vec<f64> {
    // 64 B .. 1 GiB, x4 per bucket.
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
    #[error("metric registration: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// Everything the picker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
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
    prefix_size: IntGauge,
    pool_kv: prometheus::GaugeVec,
    pool_queue: prometheus::GaugeVec,
    pool_running: prometheus::GaugeVec,
    pool_ready: IntGaugeVec,
    pool_per_pod_queue: IntGaugeVec,
    scrapes: IntCounter,
    scrape_failures: IntCounter,
    scrape_seconds: prometheus::Counter,
    discovery_errors: IntCounterVec,
    discovery_synced: IntGauge,
    leader: IntGauge,
    pool_name: String,
    sources: Option<Sources>,
    /// Set once Kubernetes discovery or leader election starts (after the
    /// metrics are shared, hence not a `with_` builder).
    discovery: OnceLock<Arc<DiscoveryStats>>,
}

#[derive(Debug)]
struct Sources {
    store: Arc<EndpointStore>,
    index: Arc<PrefixIndex>,
    scrape: Arc<ScrapeStats>,
}

fn register<C: Collector + Clone + 'static>(r: &Registry, c: C) -> Result<C, TelemetryError> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new(pool_name: &str) -> Result<Self, TelemetryError> {
        let r = Registry::new();
        let model_labels = &["model_name", "target_model_name"];
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                model_labels,
            )
        };
        let m = Self {
            request_total: register(&r, IntCounterVec::new(
                Opts::new("inference_objective_request_total", "Requests routed, by requested and target model."),
                model_labels,
            )?)?,
            request_error_total: register(&r, IntCounterVec::new(
                Opts::new("inference_objective_request_error_total", "Requests that failed, by model and error code."),
                &["model_name", "target_model_name", "error_code"],
            )?)?,
            request_duration: register(&r, hist(
                "inference_objective_request_duration_seconds",
                "Time from the request headers to the end of the response, in seconds.",
                DURATION_BUCKETS.to_vec(),
            )?)?,
            request_sizes: register(&r, hist(
                "inference_objective_request_sizes",
                "Request body sizes in bytes.",
                size_buckets(),
            )?)?,
            response_sizes: register(&r, hist(
                "inference_objective_response_sizes",
                "Response body sizes in bytes.",
                size_buckets(),
            )?)?,
            input_tokens: register(&r, hist(
                "inference_objective_input_tokens",
                "Prompt tokens per request, as reported by the model server.",
                token_buckets(),
            )?)?,
            output_tokens: register(&r, hist(
                "inference_objective_output_tokens",
                "Generated tokens per request, as reported by the model server.",
                token_buckets(),
            )?)?,
            cached_tokens: register(&r, hist(
                "inference_objective_prompt_cached_tokens",
                "Prompt tokens served from the model server's prefix cache.",
                token_buckets(),
            )?)?,
            running_requests: register(&r, IntGaugeVec::new(
                Opts::new("inference_objective_running_requests", "Requests routed and not yet finished."),
                &["model_name"],
            )?)?,
            scheduler_duration: register(&r, Histogram::with_opts(
                HistogramOpts::new(
                    "inference_extension_scheduler_e2e_duration_seconds",
                    "Time to parse a request and choose its endpoint, in seconds.",
                )
                .buckets(SCHEDULER_BUCKETS.to_vec()),
            )?)?,
            scheduler_attempts: register(&r, IntCounterVec::new(
                Opts::new("inference_extension_scheduler_attempts_total", "Scheduling attempts by outcome."),
                &["status"],
            )?)?,
            prefix_hit_ratio: register(&r, Histogram::with_opts(
                HistogramOpts::new(
                    "inference_extension_prefix_indexer_hit_ratio",
                    "Fraction of a prompt's blocks the chosen endpoint was expected to have cached.",
                )
                .buckets(RATIO_BUCKETS.to_vec()),
            )?)?,
            prefix_hit_bytes: register(&r, Histogram::with_opts(
                HistogramOpts::new(
                    "inference_extension_prefix_indexer_hit_bytes",
                    "Prompt bytes the chosen endpoint was expected to have cached.",
                )
                .buckets(size_buckets()),
            )?)?,
            prefix_size: register(&r, IntGauge::new(
                "inference_extension_prefix_indexer_size",
                "Block entries in the prefix index.",
            )?)?,
            pool_kv: register(&r, prometheus::GaugeVec::new(
                Opts::new("inference_pool_average_kv_cache_utilization", "Mean KV-cache utilisation of endpoints with fresh metrics."),
                &["name"],
            )?)?,
            pool_queue: register(&r, prometheus::GaugeVec::new(
                Opts::new("inference_pool_average_queue_size", "Mean waiting requests of endpoints with fresh metrics."),
                &["name"],
            )?)?,
            pool_running: register(&r, prometheus::GaugeVec::new(
                Opts::new("inference_pool_average_running_requests", "Mean running requests of endpoints with fresh metrics."),
                &["name"],
            )?)?,
            pool_ready: register(&r, IntGaugeVec::new(
                Opts::new("inference_pool_ready_pods", "Endpoints in the pool."),
                &["name"],
            )?)?,
            pool_per_pod_queue: register(&r, IntGaugeVec::new(
                Opts::new("inference_pool_per_pod_queue_size", "Waiting requests per endpoint."),
                &["name", "model_server_pod"],
            )?)?,
            scrapes: register(&r, IntCounter::new("epp_metrics_scrapes_total", "Model-server metrics scrapes.")?)?,
            scrape_failures: register(&r, IntCounter::new(
                "epp_metrics_scrape_failures_total",
                "Model-server metrics scrapes that failed.",
            )?)?,
            scrape_seconds: register(&r, prometheus::Counter::new(
                "epp_metrics_scrape_duration_seconds_total",
                "Total time spent scraping model-server metrics, in seconds.",
            )?)?,
            discovery_errors: register(&r, IntCounterVec::new(
                Opts::new(
                    "epp_discovery_errors_total",
                    "Failed Kubernetes API calls and watches of discovery and leader election, by resource.",
                ),
                &["resource"],
            )?)?,
            discovery_synced: register(&r, IntGauge::new(
                "epp_discovery_synced",
                "1 when discovery has published a complete endpoint set and its watches are connected.",
            )?)?,
            leader: register(&r, IntGauge::new(
                "epp_leader",
                "1 when this replica may serve: it holds the leader lease, or leader election is off.",
            )?)?,
            models: BoundedLabels::new(MAX_MODEL_LABELS),
            pool_name: pool_name.to_owned(),
            sources: None,
            discovery: OnceLock::new(),
            registry: r,
        };
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
        m.registry.register(Box::new(info))?;
        Ok(m)
    }

    /// Connects the gauges computed at render time to their sources.
    pub fn with_sources(
        mut self,
        store: Arc<EndpointStore>,
        index: Arc<PrefixIndex>,
        scrape: Arc<ScrapeStats>,
    ) -> Self {
        self.sources = Some(Sources {
            store,
            index,
            scrape,
        });
        self
    }

    /// Connects the discovery gauges and counters to Kubernetes discovery.
    /// Only the first call has an effect.
    pub fn attach_discovery(&self, stats: Arc<DiscoveryStats>) {
        let _ = self.discovery.set(stats);
    }

    /// A bounded label value for a client-supplied model name.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if model.is_empty() {
            return "";
        }
        self.models.get(model)
    }

    /// The text exposition of every metric, with pool gauges refreshed.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = Vec::with_capacity(16 << 10);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn refresh(&self) {
        self.refresh_discovery();
        let Some(src) = &self.sources else { return };
        let name = self.pool_name.as_str();
        let snapshot = src.store.snapshot();
        let now = std::time::Instant::now();
        let (mut kv, mut queue, mut running, mut fresh) = (0.0, 0.0, 0.0, 0u32);
        self.pool_per_pod_queue.reset();
        for e in snapshot.endpoints() {
            let m = e.metrics.sample_or_default();
            self.pool_per_pod_queue
                .with_label_values(&[name, e.name()])
                .set(i64::from(m.waiting));
            if src.store.is_fresh(e, now) {
                fresh += 1;
                kv += m.kv_usage;
                queue += f64::from(m.waiting);
                running += f64::from(m.running);
            }
        }
        let mean = |sum: f64| {
            if fresh > 0 {
                sum / f64::from(fresh)
            } else {
                0.0
            }
        };
        self.pool_kv.with_label_values(&[name]).set(mean(kv));
        self.pool_queue.with_label_values(&[name]).set(mean(queue));
        self.pool_running
            .with_label_values(&[name])
            .set(mean(running));
        self.pool_ready
            .with_label_values(&[name])
            .set(i64::try_from(snapshot.len()).unwrap_or(i64::MAX));
        self.prefix_size
            .set(i64::try_from(src.index.len()).unwrap_or(i64::MAX));
        let total = src.scrape.scrapes.load(Ordering::Relaxed);
        self.scrapes
            .inc_by(total.saturating_sub(self.scrapes.get()));
        let failed = src.scrape.failures.load(Ordering::Relaxed);
        self.scrape_failures
            .inc_by(failed.saturating_sub(self.scrape_failures.get()));
        if self.discovery.get().is_none() {
            // File discovery: synced once the file was loaded.
            self.discovery_synced.set(i64::from(src.store.is_synced()));
        }
        let secs = src.scrape.duration_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let delta = secs - self.scrape_seconds.get();
        if delta > 0.0 {
            self.scrape_seconds.inc_by(delta);
        }
    }

    fn refresh_discovery(&self) {
        let Some(stats) = self.discovery.get() else {
            self.leader.set(1);
            return;
        };
        for resource in WatchedResource::ALL {
            let counter = self.discovery_errors.with_label_values(&[resource.label()]);
            counter.inc_by(stats.errors(resource).saturating_sub(counter.get()));
        }
        self.discovery_synced.set(i64::from(stats.is_synced()));
        self.leader.set(i64::from(stats.leader().unwrap_or(true)));
    }
}

#[cfg(test)]
mod tests {
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
    fn discovery_metrics_follow_the_stats() {
        use crate::endpoints::testing::store_with;
        let store = Arc::new(store_with(&[1], &[]));
        let m = Metrics::new("pool").unwrap().with_sources(
            Arc::clone(&store),
            Arc::new(PrefixIndex::new()),
            Arc::default(),
        );
        let text = m.render();
        assert!(
            text.contains("epp_discovery_synced 1"),
            "file discovery: the store's sync\n{text}"
        );
        assert!(text.contains("epp_leader 1"));

        let stats = Arc::new(DiscoveryStats::default());
        m.attach_discovery(Arc::clone(&stats));
        stats.record_error(WatchedResource::Pods, &"down");
        stats.record_error(WatchedResource::Pods, &"down");
        stats.set_leader(false);
        let text = m.render();
        for needle in [
            "epp_discovery_errors_total{resource=\"pods\"} 2",
            "epp_discovery_errors_total{resource=\"inferencepool\"} 0",
            "epp_discovery_synced 0",
            "epp_leader 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        stats.record_error(WatchedResource::Pods, &"down");
        assert!(
            m.render()
                .contains("epp_discovery_errors_total{resource=\"pods\"} 3")
        );
    }

    #[test]
    fn renders_gie_names_and_pool_gauges() {
        use crate::endpoints::{MetricsSample, testing::store_with};
        let store = Arc::new(store_with(
            &[1, 2],
            &[
                MetricsSample {
                    waiting: 2,
                    kv_usage: 0.5,
                    ..MetricsSample::default()
                },
                MetricsSample {
                    waiting: 4,
                    kv_usage: 0.1,
                    ..MetricsSample::default()
                },
            ],
        ));
        let m = Metrics::new("pool").unwrap().with_sources(
            store,
            Arc::new(PrefixIndex::new()),
            Arc::default(),
        );
        m.request_total.with_label_values(&["m", "m"]).inc();
        let text = m.render();
        for needle in [
            "inference_objective_request_total{model_name=\"m\",target_model_name=\"m\"} 1",
            "inference_pool_average_queue_size{name=\"pool\"} 3",
            "inference_pool_average_kv_cache_utilization{name=\"pool\"} 0.3",
            "inference_pool_ready_pods{name=\"pool\"} 2",
            "inference_pool_per_pod_queue_size{model_server_pod=\"ep-2\",name=\"pool\"} 4",
            "inference_extension_prefix_indexer_size 0",
            "inference_extension_info{",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
