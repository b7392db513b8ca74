//! The scraper's own counters (`epp_metrics_scrape*`), copied from
//! [`ScrapeStats`]' atomics when /metrics is rendered, so a scrape round
//! touches no Prometheus type.

use std::sync::{Arc, atomic::Ordering};

use prometheus::{Counter, IntCounter, core::Collector};

use super::ScrapeStats;
use crate::telemetry::{Computed, ComputedMetrics, sync_counter};

#[derive(Debug)]
pub struct ScrapeMetrics {
    stats: Arc<ScrapeStats>,
    scrapes: IntCounter,
    failures: IntCounter,
    seconds: Counter,
}

impl ScrapeMetrics {
    pub fn new(stats: Arc<ScrapeStats>) -> Result<Computed<Self>, prometheus::Error> {
        Ok(Computed(Self {
            stats,
            scrapes: IntCounter::new("epp_metrics_scrapes_total", "Model-server metrics scrapes.")?,
            failures: IntCounter::new(
                "epp_metrics_scrape_failures_total",
                "Model-server metrics scrapes that failed.",
            )?,
            seconds: Counter::new(
                "epp_metrics_scrape_duration_seconds_total",
                "Total time spent scraping model-server metrics, in seconds.",
            )?,
        }))
    }
}

impl ComputedMetrics for ScrapeMetrics {
    fn metrics(&self) -> Vec<&dyn Collector> {
        vec![&self.scrapes, &self.failures, &self.seconds]
    }

    fn refresh(&self) {
        let s = &self.stats;
        sync_counter(&self.scrapes, s.scrapes.load(Ordering::Relaxed));
        sync_counter(&self.failures, s.failures.load(Ordering::Relaxed));
        let secs = s.duration_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let delta = secs - self.seconds.get();
        if delta > 0.0 {
            self.seconds.inc_by(delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Registry;

    use super::*;
    use crate::telemetry::render;

    #[test]
    fn counters_follow_the_stats() {
        let stats = Arc::new(ScrapeStats::default());
        let r = Registry::new();
        r.register(Box::new(ScrapeMetrics::new(Arc::clone(&stats)).unwrap()))
            .unwrap();
        stats.scrapes.store(5, Ordering::Relaxed);
        stats.failures.store(2, Ordering::Relaxed);
        stats.duration_micros.store(1_500_000, Ordering::Relaxed);
        let text = render(&r);
        for needle in [
            "epp_metrics_scrapes_total 5",
            "epp_metrics_scrape_failures_total 2",
            "epp_metrics_scrape_duration_seconds_total 1.5",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
