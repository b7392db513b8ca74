//! Flow control's metrics, under GIE's names and labels so its dashboards
//! carry over:
//!
//! - `inference_extension_flow_control_queue_size` and `..._queue_bytes`
//!   `{fairness_id, priority, inference_pool}`: requests (bytes) waiting now;
//! - `inference_extension_flow_control_request_queue_duration_seconds`
//!   `{fairness_id, priority, outcome, inference_pool}`: from admission to
//!   the final outcome (`Dispatched`, `RejectedCapacity`, `EvictedTTL`,
//!   `EvictedContextCancelled`, GIE's outcome names);
//! - `inference_extension_flow_control_request_enqueue_duration_seconds`
//!   `{fairness_id, priority, outcome}`: the admission decision itself;
//! - `inference_extension_flow_control_dispatch_cycle_duration_seconds`:
//!   one dispatch attempt;
//! - `inference_extension_flow_control_pool_saturation{inference_pool}`.
//!
//! GIE also labels the first two by model; we do not, because the model is
//! read from the body only when the request is scheduled (late binding).
//! `fairness_id` comes from clients, so its values are bounded: after
//! [`MAX_FAIRNESS_LABELS`] distinct ids, further ones are reported as
//! `other`. `priority` values come from InferenceObjectives (operators).

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use parking_lot::RwLock;
use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, Opts, Registry};

use crate::telemetry::{BoundedLabels, TelemetryError, register};

/// Distinct fairness ids kept as label values.
pub const MAX_FAIRNESS_LABELS: usize = 100;

const QUEUE_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const CYCLE_BUCKETS: &[f64] = &[
    0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];

/// GIE's queue outcome names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Dispatched,
    RejectedCapacity,
    EvictedTtl,
    EvictedContextCancelled,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Dispatched => "Dispatched",
            Self::RejectedCapacity => "RejectedCapacity",
            Self::EvictedTtl => "EvictedTTL",
            Self::EvictedContextCancelled => "EvictedContextCancelled",
        }
    }
}

/// (priority, fairness label) pairs whose metric handles are kept; beyond
/// it (thousands of priorities, which only operators create) a request's
/// handles are looked up afresh, as they all were before the cache.
const MAX_CACHED_LABELS: usize = 4096;

/// How the admission decision ended (the `outcome` label of the enqueue
/// histogram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Dispatched,
    Enqueued,
    RejectedCapacity,
}

impl Admitted {
    fn label(self) -> &'static str {
        match self {
            Self::Dispatched => "Dispatched",
            Self::Enqueued => "Enqueued",
            Self::RejectedCapacity => "RejectedCapacity",
        }
    }
}

#[derive(Debug)]
pub struct FlowMetrics {
    pool: String,
    fairness: BoundedLabels,
    /// Resolved handles per (priority, fairness label): a label-vector
    /// lookup hashes every label value and takes the vector's lock, several
    /// times per request otherwise.
    handles: RwLock<HashMap<i32, HashMap<Box<str>, Labels>>>,
    cached: std::sync::atomic::AtomicUsize,
    queue_size: GaugeVec,
    queue_bytes: GaugeVec,
    queue_duration: HistogramVec,
    enqueue_duration: HistogramVec,
    pub dispatch_cycle: Histogram,
    pub pool_saturation: Gauge,
}

/// The metric handles of one request's label values, fixed at admission
/// and shared by every request of the same flow and priority. The
/// per-outcome histograms are resolved on first use, so a series appears
/// only once something is observed in it (as with `with_label_values`).
#[derive(Debug, Clone)]
pub struct Labels(Arc<Handles>);

#[derive(Debug)]
struct Handles {
    fairness: Box<str>,
    priority: Box<str>,
    queue_size: Gauge,
    queue_bytes: Gauge,
    /// By [`Outcome`], in declaration order.
    finished: [OnceLock<Histogram>; 4],
    /// By [`Admitted`], in declaration order.
    admitted: [OnceLock<Histogram>; 3],
}

impl FlowMetrics {
    pub fn new(r: &Registry, pool: &str) -> Result<Self, TelemetryError> {
        let queue_labels = &["fairness_id", "priority", "inference_pool"];
        let pool_saturation = GaugeVec::new(
            Opts::new(
                "inference_extension_flow_control_pool_saturation",
                "Saturation of the inference pool as flow control sees it (0 empty, 1 full).",
            ),
            &["inference_pool"],
        )?;
        let pool_gauge = pool_saturation.with_label_values(&[pool]);
        register(r, pool_saturation)?;
        Ok(Self {
            pool: pool.to_owned(),
            fairness: BoundedLabels::new(MAX_FAIRNESS_LABELS),
            handles: RwLock::default(),
            cached: Default::default(),
            queue_size: register(
                r,
                GaugeVec::new(
                    Opts::new(
                        "inference_extension_flow_control_queue_size",
                        "Requests waiting in the flow control queues.",
                    ),
                    queue_labels,
                )?,
            )?,
            queue_bytes: register(
                r,
                GaugeVec::new(
                    Opts::new(
                        "inference_extension_flow_control_queue_bytes",
                        "Body bytes of the requests waiting in the flow control queues.",
                    ),
                    queue_labels,
                )?,
            )?,
            queue_duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "inference_extension_flow_control_request_queue_duration_seconds",
                        "Time from flow control admission to the request's final outcome.",
                    )
                    .buckets(QUEUE_BUCKETS.to_vec()),
                    &["fairness_id", "priority", "outcome", "inference_pool"],
                )?,
            )?,
            enqueue_duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "inference_extension_flow_control_request_enqueue_duration_seconds",
                        "Time to decide a request's admission into flow control.",
                    )
                    .buckets(CYCLE_BUCKETS.to_vec()),
                    &["fairness_id", "priority", "outcome"],
                )?,
            )?,
            dispatch_cycle: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "inference_extension_flow_control_dispatch_cycle_duration_seconds",
                        "Time of one flow control dispatch attempt.",
                    )
                    .buckets(CYCLE_BUCKETS.to_vec()),
                )?,
            )?,
            pool_saturation: pool_gauge,
        })
    }

    pub fn labels(&self, fairness_id: &str, priority: i32) -> Labels {
        let fairness = self.fairness.get(fairness_id);
        if let Some(l) = self
            .handles
            .read()
            .get(&priority)
            .and_then(|m| m.get(fairness))
        {
            return l.clone();
        }
        let priority_label = priority.to_string();
        let queue = [fairness, priority_label.as_str(), self.pool.as_str()];
        let l = Labels(Arc::new(Handles {
            fairness: fairness.into(),
            priority: priority_label.as_str().into(),
            queue_size: self.queue_size.with_label_values(&queue),
            queue_bytes: self.queue_bytes.with_label_values(&queue),
            finished: Default::default(),
            admitted: Default::default(),
        }));
        use std::sync::atomic::Ordering::Relaxed;
        if self.cached.load(Relaxed) < MAX_CACHED_LABELS {
            let mut m = self.handles.write();
            let by_fairness = m.entry(priority).or_default();
            if let Some(existing) = by_fairness.get(fairness) {
                return existing.clone();
            }
            by_fairness.insert(fairness.into(), l.clone());
            self.cached.fetch_add(1, Relaxed);
        }
        l
    }

    pub fn queued(&self, l: &Labels, bytes: u64, sign: f64) {
        l.0.queue_size.add(sign);
        l.0.queue_bytes.add(sign * bytes as f64);
    }

    pub fn finished(&self, l: &Labels, outcome: Outcome, seconds: f64) {
        let h = &l.0;
        h.finished[outcome as usize]
            .get_or_init(|| {
                self.queue_duration.with_label_values(&[
                    &h.fairness,
                    &h.priority,
                    outcome.label(),
                    &self.pool,
                ])
            })
            .observe(seconds);
    }

    pub fn admitted(&self, l: &Labels, outcome: Admitted, seconds: f64) {
        let h = &l.0;
        h.admitted[outcome as usize]
            .get_or_init(|| {
                self.enqueue_duration.with_label_values(&[
                    &h.fairness,
                    &h.priority,
                    outcome.label(),
                ])
            })
            .observe(seconds);
    }
}
