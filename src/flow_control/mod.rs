//! Flow control: hold requests in the picker while the pool is saturated,
//! and hand them to the scheduler, by priority and fairly between tenants,
//! when an endpoint has room (GIE's `flowControl` feature gate).
//!
//! Where it sits: between parsing and scheduling. The director asks
//! [`FlowController::admit`] before it schedules; the answer is go now,
//! wait ([`Waiting`], a future-like handle the protocol layer polls), or a
//! rejection. A waiting request is scheduled only when it is dispatched
//! (late binding), so the scheduler sees the pool as it is then, not as it
//! was when the request arrived.
//!
//! Admission: with nothing queued and nothing in transit, a request goes at
//! once while the pool has room, so flow control costs an atomic load or two
//! when the pool is not saturated. Otherwise it is queued (see `queue` for
//! the bands, flows and ordering), unless a request or byte bound refuses it
//! (`RejectedCapacity`, 429 as GIE answers).
//!
//! Dispatch ([`FlowController::kick`]): while something is queued, nothing
//! is in transit and the pool's saturation (the configured detector, read
//! through [`Capacity`]) is below 1, the head of the highest non-empty band
//! is popped and sent a [`Dispatched`] token. The token marks the request
//! "in transit" until the protocol layer has scheduled it (its in-flight
//! accounting then shows in the next saturation reading) and drops the
//! token; the drop triggers the next dispatch. So one request is in transit
//! at a time and each dispatch decision sees the previous one's effect.
//! A band with `dispatchHeadroom` h (ours) is dispatched while the
//! saturation is below 1 + h, so capacity is held back from the bands with
//! less (a negative h stops a band short of saturation): strict priority
//! puts the higher band's requests at the head whenever they are queued, so
//! the head's band is the one that decides.
//! Kicks come from: a request being queued, a routed request finishing (its
//! ticket's [`ReleaseHook`]), a token being dropped, and a periodic tick
//! ([`FlowController::run_ticker`]) for room that only a scrape reveals.
//!
//! Leaving the queue otherwise: the request's TTL (`defaultRequestTTL`)
//! runs out while it is polled (`EvictedTTL`, 503 as GIE answers), or the
//! handle is dropped because the client went away (`EvictedContextCancelled`,
//! the slot is freed at once). A token dropped without being used (its
//! waiter left between pop and delivery) is released without a kick and the
//! dispatcher moves on to the next request, so nothing admitted is lost and
//! no capacity leaks.
//!
//! Locking: one `parking_lot` mutex over the queues, held for O(log n) work
//! and never across an await or a saturation reading; counters mirrored in
//! atomics let the common paths (empty queue, ticket drop) skip the lock.

pub mod config;
mod metrics;
mod queue;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use prometheus::Registry;
use tokio::sync::{oneshot, watch};

pub use config::{FEATURE_GATE, FlowControlConfigError, FlowControlSettings};
pub use metrics::MAX_FAIRNESS_LABELS;
use metrics::{Admitted, FlowMetrics, Labels, Outcome};
use queue::{Key, Queues};

use crate::telemetry::TelemetryError;

/// The request header naming the flow (tenant) a request belongs to.
pub const FAIRNESS_ID_HEADER: &str = "x-gateway-inference-fairness-id";
/// The flow of requests without a fairness id.
pub const DEFAULT_FLOW: &str = "default-flow";
/// Longest fairness id kept; longer ones are cut (at a char boundary).
pub const MAX_FAIRNESS_ID_BYTES: usize = 128;
/// How often queued requests are re-offered to the pool when nothing else
/// triggers a dispatch (room that only a scrape reveals).
pub const TICK: Duration = Duration::from_millis(20);

/// How full the pool is, from the configured saturation detector.
pub trait Capacity: Send + Sync + fmt::Debug {
    /// 1.0 or more means saturated: nothing is dispatched.
    fn saturation(&self) -> f64;
}

/// What flow control needs to know about a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlowRequest<'a> {
    /// `x-gateway-inference-fairness-id`; the default flow when absent.
    pub fairness_id: Option<&'a str>,
    /// The InferenceObjective's priority.
    pub priority: i32,
    /// Body bytes (what the byte bounds count).
    pub bytes: u64,
}

/// Why flow control refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("flow control queue is at capacity")]
    QueueFull,
    #[error("request timed out in the flow control queue")]
    TtlExpired,
    #[error("flow control stopped before dispatching the request")]
    Stopped,
}

impl Rejection {
    /// GIE's answers: capacity is `InferencePoolResourceExhausted` (429),
    /// a TTL eviction `ServiceUnavailable` (503).
    pub fn http_status(self) -> u16 {
        match self {
            Self::QueueFull => 429,
            Self::TtlExpired | Self::Stopped => 503,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::QueueFull => "flow_control_queue_full",
            Self::TtlExpired => "flow_control_ttl_expired",
            Self::Stopped => "flow_control_stopped",
        }
    }
}

/// The answer to [`FlowController::admit`].
#[derive(Debug)]
pub enum Admission {
    /// Schedule now.
    Go,
    /// Queued: poll the handle until it is dispatched or rejected.
    Wait(Waiting),
    Reject(Rejection),
}

struct Waiter {
    tx: oneshot::Sender<Dispatched>,
    enqueued: Instant,
    labels: Labels,
}

impl fmt::Debug for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("enqueued", &self.enqueued)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct FlowController {
    settings: FlowControlSettings,
    queues: Mutex<Queues<Waiter>>,
    /// Mirrors the queues' length, for lock-free emptiness checks.
    queued: AtomicU64,
    /// Dispatched requests not yet scheduled (at most one, see the header).
    in_transit: AtomicUsize,
    capacity: Arc<dyn Capacity>,
    /// Origin of the EDF deadlines.
    epoch: Instant,
    /// `settings.max_dispatch_headroom()`: at or above `1 +` this, the pool
    /// is full for every band, checked without the lock.
    max_headroom: f64,
    /// Some band has a negative `dispatchHeadroom`.
    has_reserve: bool,
    metrics: FlowMetrics,
}

impl FlowController {
    /// `pool` labels the metrics, which register in `registry`.
    pub fn new(
        settings: FlowControlSettings,
        capacity: Arc<dyn Capacity>,
        registry: &Registry,
        pool: &str,
    ) -> Result<Arc<Self>, TelemetryError> {
        let has_reserve = settings.any_band(|b| b.dispatch_headroom < 0.0);
        Ok(Arc::new(Self {
            queues: Mutex::new(Queues::new(settings.clone())),
            max_headroom: settings.max_dispatch_headroom(),
            has_reserve,
            settings,
            queued: AtomicU64::new(0),
            in_transit: AtomicUsize::new(0),
            capacity,
            epoch: Instant::now(),
            metrics: FlowMetrics::new(registry, pool)?,
        }))
    }

    pub fn settings(&self) -> &FlowControlSettings {
        &self.settings
    }

    /// Requests waiting now.
    pub fn queued(&self) -> u64 {
        self.queued.load(AtomicOrdering::Acquire)
    }

    /// Decides whether `req` goes now, waits, or is refused.
    pub fn admit(self: &Arc<Self>, req: &FlowRequest<'_>) -> Admission {
        self.admit_within(req, None)
    }

    /// [`FlowController::admit`], waiting at most `max_wait` when queued
    /// (less than the TTL: SLO admission's budget), evicted as by the TTL.
    pub fn admit_within(
        self: &Arc<Self>,
        req: &FlowRequest<'_>,
        max_wait: Option<Duration>,
    ) -> Admission {
        let started = Instant::now();
        let flow = fairness_id(req.fairness_id);
        if self.queued() == 0
            && self.in_transit.load(AtomicOrdering::Acquire) == 0
            && self.capacity.saturation() < self.go_limit(req.priority)
        {
            let labels = self.metrics.labels(flow, req.priority);
            self.metrics.finished(&labels, Outcome::Dispatched, 0.0);
            self.metrics.admitted(
                &labels,
                Admitted::Dispatched,
                started.elapsed().as_secs_f64(),
            );
            return Admission::Go;
        }
        let (tx, rx) = oneshot::channel();
        let ttl = match (self.settings.default_ttl, max_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = ttl.map(|ttl| started + ttl);
        let order = deadline.map(|d| {
            u64::try_from(d.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
        });
        let labels = self.metrics.labels(flow, req.priority);
        let waiter = Waiter {
            tx,
            enqueued: started,
            labels: labels.clone(),
        };
        let pushed = {
            let mut q = self.queues.lock();
            let r = q.push(req.priority, flow, req.bytes, order, waiter);
            self.queued.store(q.len(), AtomicOrdering::Release);
            r
        };
        match pushed {
            Err(_) => {
                self.metrics
                    .finished(&labels, Outcome::RejectedCapacity, 0.0);
                self.metrics.admitted(
                    &labels,
                    Admitted::RejectedCapacity,
                    started.elapsed().as_secs_f64(),
                );
                Admission::Reject(Rejection::QueueFull)
            }
            Ok(key) => {
                self.metrics.queued(&labels, req.bytes, 1.0);
                self.metrics
                    .admitted(&labels, Admitted::Enqueued, started.elapsed().as_secs_f64());
                let waiting = Waiting {
                    ctl: Arc::clone(self),
                    rx,
                    key: Some(key),
                    deadline,
                    timer: None,
                };
                // Room may have appeared since the check above.
                self.kick();
                Admission::Wait(waiting)
            }
        }
    }

    /// The saturation below which a request of `priority` skips the queue:
    /// 1, or less for a band with negative headroom (a band with positive
    /// headroom is queued past 1 and dispatched at once by the kick).
    fn go_limit(&self, priority: i32) -> f64 {
        if !self.has_reserve {
            return 1.0;
        }
        1.0 + self.settings.band(priority).dispatch_headroom.min(0.0)
    }

    /// Dispatches queued requests while the pool has room (see the module
    /// header); returns at once when nothing is queued or one is in transit.
    pub fn kick(self: &Arc<Self>) {
        loop {
            if self.queued() == 0 || self.in_transit.load(AtomicOrdering::Acquire) > 0 {
                return;
            }
            let started = Instant::now();
            let saturation = self.capacity.saturation();
            self.metrics.pool_saturation.set(saturation);
            if saturation >= 1.0 + self.max_headroom {
                return;
            }
            let popped = {
                let mut q = self.queues.lock();
                // Checked under the lock so two kickers cannot both dispatch.
                if self.in_transit.load(AtomicOrdering::Acquire) > 0 {
                    return;
                }
                // The head's band decides: it goes below `1 + headroom`
                // (1 for GIE's bands, more or less with ours).
                if q.head_band()
                    .is_none_or(|b| saturation >= 1.0 + b.dispatch_headroom)
                {
                    return;
                }
                let popped = q.pop();
                if popped.is_some() {
                    self.in_transit.fetch_add(1, AtomicOrdering::AcqRel);
                }
                self.queued.store(q.len(), AtomicOrdering::Release);
                popped
            };
            let Some((_, item)) = popped else {
                return;
            };
            let w = item.payload;
            self.metrics.queued(&w.labels, item.bytes, -1.0);
            let token = Dispatched {
                ctl: Some(Arc::clone(self)),
            };
            let sent = w.tx.send(token);
            self.metrics
                .dispatch_cycle
                .observe(started.elapsed().as_secs_f64());
            match sent {
                Ok(()) => {
                    self.metrics.finished(
                        &w.labels,
                        Outcome::Dispatched,
                        w.enqueued.elapsed().as_secs_f64(),
                    );
                    return;
                }
                Err(mut token) => {
                    // The waiter left between the pop and now: its place is
                    // gone already; release the token without recursing and
                    // offer the room to the next request.
                    self.metrics.finished(
                        &w.labels,
                        Outcome::EvictedContextCancelled,
                        w.enqueued.elapsed().as_secs_f64(),
                    );
                    token.release(false);
                }
            }
        }
    }

    /// Removes a queued request; false when it was dispatched already.
    fn remove(&self, key: Key, outcome: Outcome) -> bool {
        let removed = {
            let mut q = self.queues.lock();
            let r = q.remove(key);
            self.queued.store(q.len(), AtomicOrdering::Release);
            r
        };
        let Some(item) = removed else {
            return false;
        };
        let w = item.payload;
        self.metrics.queued(&w.labels, item.bytes, -1.0);
        self.metrics
            .finished(&w.labels, outcome, w.enqueued.elapsed().as_secs_f64());
        true
    }

    /// A hook for a routed request's ticket: when the request ends, its
    /// endpoint may have room, so the queue is offered to the pool.
    pub fn release_hook(self: &Arc<Self>) -> ReleaseHook {
        ReleaseHook(Arc::clone(self))
    }

    /// Re-offers queued requests to the pool every [`TICK`] (and refreshes
    /// the pool saturation gauge) until `stop` turns true.
    pub async fn run_ticker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if self.queued() > 0 {
                        self.kick();
                    } else {
                        self.metrics.pool_saturation.set(self.capacity.saturation());
                    }
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// The fairness id a request is queued under, bounded in length.
fn fairness_id(id: Option<&str>) -> &str {
    match id.map(str::trim) {
        None | Some("") => DEFAULT_FLOW,
        Some(id) if id.len() <= MAX_FAIRNESS_ID_BYTES => id,
        Some(id) => {
            let mut end = MAX_FAIRNESS_ID_BYTES;
            while !id.is_char_boundary(end) {
                end -= 1;
            }
            &id[..end]
        }
    }
}

/// The right to schedule one dispatched request. Hold it until the request
/// is scheduled (its in-flight accounting is then visible), then drop it:
/// the drop lets the next request be dispatched.
pub struct Dispatched {
    ctl: Option<Arc<FlowController>>,
}

impl fmt::Debug for Dispatched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dispatched")
    }
}

impl Dispatched {
    fn release(&mut self, kick: bool) {
        if let Some(ctl) = self.ctl.take() {
            ctl.in_transit.fetch_sub(1, AtomicOrdering::AcqRel);
            if kick {
                ctl.kick();
            }
        }
    }
}

impl Drop for Dispatched {
    fn drop(&mut self) {
        self.release(true);
    }
}

/// A queued request, from the protocol layer's side. Poll it with
/// [`Waiting::poll_dispatch`]; drop it to leave the queue (the client went
/// away), which frees the place at once.
#[derive(Debug)]
pub struct Waiting {
    ctl: Arc<FlowController>,
    rx: oneshot::Receiver<Dispatched>,
    /// Where the request sits while it is queued; `None` once resolved.
    key: Option<Key>,
    deadline: Option<Instant>,
    /// Created on the first poll (a timer needs the runtime).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Waiting {
    /// Ready with the dispatch token, or with the rejection (TTL).
    pub fn poll_dispatch(&mut self, cx: &mut Context<'_>) -> Poll<Result<Dispatched, Rejection>> {
        if let Poll::Ready(r) = Pin::new(&mut self.rx).poll(cx) {
            self.key = None;
            return Poll::Ready(r.map_err(|_| Rejection::Stopped));
        }
        if let Some(deadline) = self.deadline {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
            if timer.as_mut().poll(cx).is_ready() {
                self.deadline = None;
                self.timer = None;
                if let Some(key) = self.key
                    && self.ctl.remove(key, Outcome::EvictedTtl)
                {
                    self.key = None;
                    return Poll::Ready(Err(Rejection::TtlExpired));
                }
                // Popped just now: the token is on its way; `rx` is
                // registered above and wakes us.
            }
        }
        Poll::Pending
    }

    /// The per-message timeout to ask the gateway for while waiting
    /// (`gatewayMaxMessageTimeout`), cut to the request's TTL plus a second
    /// so the gateway's timer is not what ends the wait.
    pub fn gateway_timeout(&self) -> Option<Duration> {
        let max = self.ctl.settings.gateway_max_message_timeout?;
        Some(match self.deadline {
            Some(d) => {
                max.min(d.saturating_duration_since(Instant::now()) + Duration::from_secs(1))
            }
            None => max,
        })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            // Still queued: free the place now. Already popped: the token,
            // in `rx` or failing to get there, releases itself.
            self.ctl.remove(key, Outcome::EvictedContextCancelled);
        }
    }
}

/// Held by a routed request's ticket; dropping it (after the request's
/// in-flight accounting was released) offers the queue to the pool.
pub struct ReleaseHook(Arc<FlowController>);

impl fmt::Debug for ReleaseHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReleaseHook")
    }
}

impl Drop for ReleaseHook {
    fn drop(&mut self) {
        if self.0.queued() > 0 {
            self.0.kick();
        }
    }
}

#[cfg(test)]
mod tests;
