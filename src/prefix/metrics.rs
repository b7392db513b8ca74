//! `inference_extension_prefix_indexer_size`: block entries in the index,
//! read when /metrics is rendered (the index keeps its own count; nothing on
//! the request path touches a metric for it).

use std::sync::Arc;

use prometheus::{IntGauge, core::Collector};

use super::PrefixIndex;
use crate::telemetry::{Computed, ComputedMetrics};

#[derive(Debug)]
pub struct IndexMetrics {
    index: Arc<PrefixIndex>,
    size: IntGauge,
}

impl IndexMetrics {
    pub fn new(index: Arc<PrefixIndex>) -> Result<Computed<Self>, prometheus::Error> {
        Ok(Computed(Self {
            index,
            size: IntGauge::new(
                "inference_extension_prefix_indexer_size",
                "Block entries in the prefix index.",
            )?,
        }))
    }
}

impl ComputedMetrics for IndexMetrics {
    fn metrics(&self) -> Vec<&dyn Collector> {
        vec![&self.size]
    }

    fn refresh(&self) {
        self.size
            .set(i64::try_from(self.index.len()).unwrap_or(i64::MAX));
    }
}
