//! `inference_pool_*{name}` gauges, computed from the store when /metrics is
//! rendered: the means of KV-cache utilisation, queue size and running
//! requests over endpoints whose metrics are fresh (a stale endpoint would
//! pull the mean towards whatever it last said), the endpoint count, and the
//! queue of every endpoint.

use std::{sync::Arc, time::Instant};

use prometheus::{GaugeVec, IntGaugeVec, Opts, core::Collector};

use super::EndpointStore;
use crate::telemetry::{Computed, ComputedMetrics};

#[derive(Debug)]
pub struct PoolMetrics {
    store: Arc<EndpointStore>,
    pool_name: String,
    kv: GaugeVec,
    queue: GaugeVec,
    running: GaugeVec,
    ready: IntGaugeVec,
    per_pod_queue: IntGaugeVec,
}

impl PoolMetrics {
    pub fn new(
        store: Arc<EndpointStore>,
        pool_name: &str,
    ) -> Result<Computed<Self>, prometheus::Error> {
        let name = &["name"];
        Ok(Computed(Self {
            store,
            pool_name: pool_name.to_owned(),
            kv: GaugeVec::new(
                Opts::new(
                    "inference_pool_average_kv_cache_utilization",
                    "Mean KV-cache utilisation of endpoints with fresh metrics.",
                ),
                name,
            )?,
            queue: GaugeVec::new(
                Opts::new(
                    "inference_pool_average_queue_size",
                    "Mean waiting requests of endpoints with fresh metrics.",
                ),
                name,
            )?,
            running: GaugeVec::new(
                Opts::new(
                    "inference_pool_average_running_requests",
                    "Mean running requests of endpoints with fresh metrics.",
                ),
                name,
            )?,
            ready: IntGaugeVec::new(
                Opts::new("inference_pool_ready_pods", "Endpoints in the pool."),
                name,
            )?,
            per_pod_queue: IntGaugeVec::new(
                Opts::new(
                    "inference_pool_per_pod_queue_size",
                    "Waiting requests per endpoint.",
                ),
                &["name", "model_server_pod"],
            )?,
        }))
    }
}

impl ComputedMetrics for PoolMetrics {
    fn metrics(&self) -> Vec<&dyn Collector> {
        vec![
            &self.kv,
            &self.queue,
            &self.running,
            &self.ready,
            &self.per_pod_queue,
        ]
    }

    fn refresh(&self) {
        let name = self.pool_name.as_str();
        let snapshot = self.store.snapshot();
        let now = Instant::now();
        let (mut kv, mut queue, mut running, mut fresh) = (0.0, 0.0, 0.0, 0u32);
        // Endpoints that left must not keep a series.
        self.per_pod_queue.reset();
        for e in snapshot.endpoints() {
            let m = e.metrics.sample_or_default();
            self.per_pod_queue
                .with_label_values(&[name, e.name()])
                .set(i64::from(m.waiting));
            if self.store.is_fresh(e, now) {
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
        self.kv.with_label_values(&[name]).set(mean(kv));
        self.queue.with_label_values(&[name]).set(mean(queue));
        self.running.with_label_values(&[name]).set(mean(running));
        self.ready
            .with_label_values(&[name])
            .set(i64::try_from(snapshot.len()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Registry;

    use super::*;
    use crate::{
        endpoints::{MetricsSample, testing::store_with},
        telemetry::render,
    };

    #[test]
    fn pool_gauges_follow_the_store() {
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
        let r = Registry::new();
        r.register(Box::new(PoolMetrics::new(store, "pool").unwrap()))
            .unwrap();
        let text = render(&r);
        for needle in [
            "inference_pool_average_queue_size{name=\"pool\"} 3",
            "inference_pool_average_kv_cache_utilization{name=\"pool\"} 0.3",
            "inference_pool_ready_pods{name=\"pool\"} 2",
            "inference_pool_per_pod_queue_size{model_server_pod=\"ep-2\",name=\"pool\"} 4",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
