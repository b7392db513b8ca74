//! The endpoint store: every model-server endpoint of the pool, with the
//! signals the scheduler reads.
//!
//! Data flows one way. Discovery (file or Kubernetes) publishes the desired
//! endpoint set with [`EndpointStore::replace`]; the metrics scraper writes the
//! per-endpoint atomics in [`EndpointMetrics`]; the request path only reads.
//!
//! Invariants:
//! - The request path takes one [`EndpointSet`] snapshot per request (an
//!   `ArcSwap` load: no lock, no allocation). A snapshot never changes; a
//!   discovery update publishes a new one.
//! - An endpoint that stays in the set across updates keeps its `Arc`, so its
//!   scraped metrics, in-flight count and prefix-index slot survive.
//! - Each live endpoint owns a distinct `slot` (a small integer the prefix
//!   index uses instead of a name) and a never-reused `uid`. A slot is reused
//!   once its endpoint leaves; the prefix index tells old and new owners apart
//!   by `uid`, so stale cache entries can never be attributed to a newcomer.

mod kv_events;
mod lora;
mod metrics;
mod pool_metrics;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

pub use kv_events::{KvEventsCell, KvView};
pub use lora::{Adapters, LoraCell, LoraSeries, LoraState};
pub use metrics::{EndpointMetrics, MetricsSample};
pub use pool_metrics::PoolMetrics;

/// The pod label that names the model-server engine, as in GIE.
pub const ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// What discovery knows about one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub labels: BTreeMap<String, String>,
    /// Port to scrape `/metrics` on; the serving port when `None`.
    pub metrics_port: Option<u16>,
    /// Where its KV-cache events are published; `None` when not subscribed.
    pub kv_events: Option<KvEventsSpec>,
}

/// Where an endpoint publishes its KV-cache events, resolved from the flags
/// and the endpoint's own settings (`discovery::kv_events`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvEventsSpec {
    /// PUB port of rank 0; rank `r` publishes on `port + r`.
    pub port: u16,
    /// Replay ROUTER port of rank 0, if the publisher keeps a replay buffer.
    pub replay_port: Option<u16>,
    /// Topic prefix subscribed to; empty for every topic.
    pub topic: String,
    /// Data-parallel ranks, at least 1.
    pub ranks: u16,
}

impl EndpointSpec {
    /// The `ip:port` form used on the wire (IPv6 in brackets).
    pub fn host_port(&self) -> String {
        match self.address {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }
}

/// One endpoint of the pool as the request path sees it.
#[derive(Debug)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    /// `ip:port`, precomputed because every routed request writes it.
    pub host_port: Arc<str>,
    /// Index used by the prefix index; unique among live endpoints.
    pub slot: u16,
    /// Never reused across the life of the process.
    pub uid: u64,
    pub metrics: EndpointMetrics,
    /// LoRA adapters, from the engine's LoRA gauge (vLLM); written by the
    /// scraper only when they change.
    pub lora: LoraCell,
    /// What the endpoint's KV-cache events say it holds, when configured.
    pub kv_events: KvEventsCell,
    in_flight: AtomicU32,
    /// Requests routed here since the last successful scrape and still in
    /// flight: the scrape cannot have seen them, so the queue scorer adds them.
    dispatched_since_scrape: AtomicU32,
    /// Requests of this picker that a scrape may have seen running and that
    /// finished after it: the scrape still counts them, but they are ours and
    /// gone, so they must not read as someone else's load. Without this, a
    /// conversation's next turn, sent right after the previous one finished,
    /// sees its own pod as busy until the next scrape and loses its cache.
    finished_since_scrape: AtomicU32,
    /// Incremented at every successful scrape; a request remembers the value
    /// it was routed under to know whether the scrape has seen it since.
    scrape_seq: AtomicU64,
    /// Estimated prompt tokens still to be prefilled by requests routed here
    /// that have not produced their first response byte yet.
    prefill_backlog: AtomicU64,
    /// Requests routed here that have not produced their first response
    /// byte yet, whatever their uncached length (a fully cached prompt still
    /// takes its turn in a serialized prefill lane).
    prefilling: AtomicU32,
}

impl Endpoint {
    fn new(spec: EndpointSpec, slot: u16, uid: u64) -> Self {
        let host_port: Arc<str> = spec.host_port().into();
        Self {
            spec,
            host_port,
            slot,
            uid,
            metrics: EndpointMetrics::default(),
            lora: LoraCell::default(),
            kv_events: KvEventsCell::default(),
            in_flight: AtomicU32::new(0),
            dispatched_since_scrape: AtomicU32::new(0),
            finished_since_scrape: AtomicU32::new(0),
            scrape_seq: AtomicU64::new(0),
            prefill_backlog: AtomicU64::new(0),
            prefilling: AtomicU32::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.spec.labels.get(key).map(String::as_str)
    }

    /// Requests routed here by this picker that are still running.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn dispatched_since_scrape(&self) -> u32 {
        self.dispatched_since_scrape.load(Ordering::Relaxed)
    }

    /// Requests routed before the last scrape that have finished since.
    pub fn finished_since_scrape(&self) -> u32 {
        self.finished_since_scrape.load(Ordering::Relaxed)
    }

    /// Estimated prompt tokens waiting to be prefilled here.
    pub fn prefill_backlog(&self) -> u64 {
        self.prefill_backlog.load(Ordering::Relaxed)
    }

    /// Requests routed here still waiting for their first response byte.
    pub fn prefilling(&self) -> u32 {
        self.prefilling.load(Ordering::Relaxed)
    }

    /// Marks a request as routed here, with `prefill_tokens` of prompt the
    /// endpoint is expected to compute (its uncached part). The returned guard
    /// releases everything when dropped, so every exit path (end of stream,
    /// error, client cancel) gives the accounting back exactly once.
    pub fn begin_request(self: &Arc<Self>, prefill_tokens: u32) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.dispatched_since_scrape.fetch_add(1, Ordering::Relaxed);
        self.prefill_backlog
            .fetch_add(u64::from(prefill_tokens), Ordering::Relaxed);
        self.prefilling.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            endpoint: Arc::clone(self),
            prefilling: true,
            pending_prefill: prefill_tokens,
            scrape_seq: self.scrape_seq.load(Ordering::Relaxed),
        }
    }

    /// Called by the scraper after a successful scrape.
    pub fn record_scrape(&self, sample: &MetricsSample, at: Instant, epoch: Instant) {
        self.metrics.store(sample, at, epoch);
        self.scrape_seq.fetch_add(1, Ordering::Relaxed);
        self.dispatched_since_scrape.store(0, Ordering::Relaxed);
        self.finished_since_scrape.store(0, Ordering::Relaxed);
    }
}

/// Keeps one in-flight request counted against an endpoint.
#[derive(Debug)]
pub struct InFlightGuard {
    endpoint: Arc<Endpoint>,
    /// Still counted in the endpoint's `prefilling`.
    prefilling: bool,
    pending_prefill: u32,
    scrape_seq: u64,
}

impl InFlightGuard {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The first response byte arrived: the prompt has been prefilled, so it
    /// no longer delays requests behind it. Idempotent.
    pub fn prefill_done(&mut self) {
        if std::mem::take(&mut self.prefilling) {
            self.endpoint.prefilling.fetch_sub(1, Ordering::Relaxed);
        }
        let tokens = std::mem::take(&mut self.pending_prefill);
        if tokens > 0 {
            self.endpoint
                .prefill_backlog
                .fetch_sub(u64::from(tokens), Ordering::Relaxed);
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.prefill_done();
        let e = &self.endpoint;
        e.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Finished before any scrape saw it: it no longer adds to the queue.
        if e.scrape_seq.load(Ordering::Relaxed) == self.scrape_seq {
            let _ =
                e.dispatched_since_scrape
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        } else {
            // A scrape since routing may still show it running.
            e.finished_since_scrape.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An immutable snapshot of the pool.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    by_host_port: HashMap<Arc<str>, usize>,
    generation: u64,
}

impl EndpointSet {
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn get(&self, host_port: &str) -> Option<&Arc<Endpoint>> {
        self.by_host_port
            .get(host_port)
            .map(|&i| &self.endpoints[i])
    }

    /// Highest slot in use plus one: the size scratch tables indexed by slot need.
    pub fn slot_bound(&self) -> usize {
        self.endpoints
            .iter()
            .map(|e| usize::from(e.slot) + 1)
            .max()
            .unwrap_or(0)
    }
}

/// Why discovery could not publish a set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("more than {max} endpoints in the pool", max = u16::MAX)]
    TooManyEndpoints,
}

/// The shared endpoint store.
pub struct EndpointStore {
    current: ArcSwap<EndpointSet>,
    /// Serialises writers so slot allocation and publication stay consistent.
    writer: Mutex<SlotAllocator>,
    next_uid: AtomicU64,
    synced: AtomicBool,
    changes: watch::Sender<u64>,
    epoch: Instant,
    staleness: Duration,
}

#[derive(Default)]
struct SlotAllocator {
    in_use: Vec<bool>,
}

impl SlotAllocator {
    fn take(&mut self) -> Option<u16> {
        if let Some(i) = self.in_use.iter().position(|used| !used) {
            self.in_use[i] = true;
            return u16::try_from(i).ok();
        }
        let i = u16::try_from(self.in_use.len()).ok()?;
        self.in_use.push(true);
        Some(i)
    }

    fn release(&mut self, slot: u16) {
        if let Some(used) = self.in_use.get_mut(usize::from(slot)) {
            *used = false;
        }
    }
}

impl std::fmt::Debug for EndpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointStore")
            .field("endpoints", &self.current.load().len())
            .field("synced", &self.is_synced())
            .finish()
    }
}

impl EndpointStore {
    /// `staleness` is how old scraped metrics may be and still count as fresh.
    pub fn new(staleness: Duration) -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            current: ArcSwap::from_pointee(EndpointSet::default()),
            writer: Mutex::new(SlotAllocator::default()),
            next_uid: AtomicU64::new(1),
            synced: AtomicBool::new(false),
            changes,
            epoch: Instant::now(),
            staleness,
        }
    }

    /// The current snapshot; cheap enough to call once per request.
    pub fn snapshot(&self) -> Arc<EndpointSet> {
        self.current.load_full()
    }

    /// Reference instant for the timestamps stored in endpoint metrics.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    pub fn staleness(&self) -> Duration {
        self.staleness
    }

    /// True once discovery has published its first complete view.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Notifies on every published change (the value is the generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Publishes the endpoint set discovery currently wants. Endpoints are
    /// matched by name and address, so a pod that keeps its identity keeps
    /// its state. Marks the store synced.
    pub fn replace(&self, specs: Vec<EndpointSpec>) -> Result<(), StoreError> {
        let mut slots = self.writer.lock();
        let old = self.current.load_full();
        let mut kept: HashMap<&str, &Arc<Endpoint>> =
            old.endpoints.iter().map(|e| (&*e.host_port, e)).collect();

        // First decide which endpoints carry over, so the slots of those that
        // left are free before newcomers take one.
        let mut seen = std::collections::HashSet::with_capacity(specs.len());
        let mut planned: Vec<(EndpointSpec, Option<Arc<Endpoint>>)> =
            Vec::with_capacity(specs.len());
        for spec in specs {
            let host_port = spec.host_port();
            if !seen.insert(host_port.clone()) {
                tracing::warn!(endpoint = %host_port, name = %spec.name, "duplicate endpoint address ignored");
                continue;
            }
            // Same address but anything else changed (name, labels, ports):
            // treated as a new endpoint, since it may be a different pod.
            let existing = kept
                .get(host_port.as_str())
                .filter(|e| e.spec == spec)
                .map(|e| Arc::clone(e));
            if existing.is_some() {
                kept.remove(host_port.as_str());
            }
            planned.push((spec, existing));
        }
        let gone: Vec<u16> = kept.values().map(|e| e.slot).collect();
        for &slot in &gone {
            slots.release(slot);
        }

        let mut endpoints = Vec::with_capacity(planned.len());
        let mut by_host_port = HashMap::with_capacity(planned.len());
        let mut new_slots = Vec::new();
        for (spec, existing) in planned {
            let endpoint = match existing {
                Some(e) => e,
                None => {
                    let Some(slot) = slots.take() else {
                        // Roll back: nothing is published.
                        for slot in new_slots {
                            slots.release(slot);
                        }
                        for slot in gone {
                            slots.in_use[usize::from(slot)] = true;
                        }
                        return Err(StoreError::TooManyEndpoints);
                    };
                    new_slots.push(slot);
                    let uid = self.next_uid.fetch_add(1, Ordering::Relaxed);
                    Arc::new(Endpoint::new(spec, slot, uid))
                }
            };
            by_host_port.insert(Arc::clone(&endpoint.host_port), endpoints.len());
            endpoints.push(endpoint);
        }
        let generation = old.generation + 1;
        self.current.store(Arc::new(EndpointSet {
            endpoints,
            by_host_port,
            generation,
        }));
        drop(slots);
        self.synced.store(true, Ordering::Release);
        self.changes.send_replace(generation);
        Ok(())
    }

    /// Metrics are fresh when scraped within the staleness threshold.
    pub fn is_fresh(&self, endpoint: &Endpoint, now: Instant) -> bool {
        endpoint
            .metrics
            .age(now, self.epoch)
            .is_some_and(|age| age <= self.staleness)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A spec on 127.0.0.1 with the given port and name `ep-<port>`.
    pub fn spec(port: u16) -> EndpointSpec {
        EndpointSpec {
            name: format!("ep-{port}"),
            address: IpAddr::from([127, 0, 0, 1]),
            port,
            labels: BTreeMap::new(),
            metrics_port: None,
            kv_events: None,
        }
    }

    /// A store holding endpoints on the given ports, all with fresh metrics.
    pub fn store_with(ports: &[u16], samples: &[MetricsSample]) -> EndpointStore {
        let store = EndpointStore::new(Duration::from_secs(2));
        store
            .replace(ports.iter().map(|&p| spec(p)).collect())
            .expect("small set");
        let now = Instant::now();
        for (e, s) in store.snapshot().endpoints().iter().zip(samples) {
            e.record_scrape(s, now, store.epoch());
        }
        store
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::spec, *};

    #[test]
    fn replace_keeps_state_of_unchanged_endpoints() {
        let store = EndpointStore::new(Duration::from_secs(2));
        assert!(!store.is_synced());
        store.replace(vec![spec(1), spec(2)]).unwrap();
        assert!(store.is_synced());
        let first = store.snapshot();
        let a = Arc::clone(first.get("127.0.0.1:1").unwrap());
        let _guard = a.begin_request(0);

        store.replace(vec![spec(1), spec(3)]).unwrap();
        let second = store.snapshot();
        let a2 = second.get("127.0.0.1:1").unwrap();
        assert!(Arc::ptr_eq(&a, a2), "unchanged endpoint keeps its Arc");
        assert_eq!(a2.in_flight(), 1);
        assert!(second.get("127.0.0.1:2").is_none());
        assert_eq!(second.generation(), first.generation() + 1);
    }

    #[test]
    fn slots_are_reused_but_uids_are_not() {
        let store = EndpointStore::new(Duration::from_secs(2));
        store.replace(vec![spec(1), spec(2)]).unwrap();
        let before = store.snapshot();
        let b = before.get("127.0.0.1:2").unwrap();
        store.replace(vec![spec(1), spec(3)]).unwrap();
        let after = store.snapshot();
        let c = after.get("127.0.0.1:3").unwrap();
        assert_eq!(c.slot, b.slot, "freed slot is reused");
        assert_ne!(c.uid, b.uid, "uids are never reused");
        let slots: std::collections::HashSet<u16> =
            after.endpoints().iter().map(|e| e.slot).collect();
        assert_eq!(slots.len(), after.len());
    }

    #[test]
    fn changed_labels_make_a_new_endpoint() {
        let store = EndpointStore::new(Duration::from_secs(2));
        store.replace(vec![spec(1)]).unwrap();
        let old_uid = store.snapshot().endpoints()[0].uid;
        let mut changed = spec(1);
        changed.labels.insert("a".into(), "b".into());
        store.replace(vec![changed]).unwrap();
        assert_ne!(store.snapshot().endpoints()[0].uid, old_uid);
    }

    #[test]
    fn duplicate_addresses_are_dropped() {
        let store = EndpointStore::new(Duration::from_secs(2));
        let mut dup = spec(1);
        dup.name = "other".into();
        store.replace(vec![spec(1), dup]).unwrap();
        assert_eq!(store.snapshot().len(), 1);
    }

    #[test]
    fn in_flight_guard_releases_on_drop() {
        let store = EndpointStore::new(Duration::from_secs(2));
        store.replace(vec![spec(1)]).unwrap();
        let e = Arc::clone(&store.snapshot().endpoints()[0]);
        let g1 = e.begin_request(10);
        let mut g2 = e.begin_request(5);
        let mut cached = e.begin_request(0);
        assert_eq!(e.in_flight(), 3);
        assert_eq!(e.prefill_backlog(), 15);
        assert_eq!(e.prefilling(), 3, "a fully cached prompt still waits");
        g2.prefill_done();
        g2.prefill_done();
        cached.prefill_done();
        assert_eq!(e.prefill_backlog(), 10);
        assert_eq!(e.prefilling(), 1);
        drop(cached);
        assert_eq!(e.prefilling(), 1, "released once, at its first byte");
        assert_eq!(e.dispatched_since_scrape(), 2);
        drop(g1);
        assert_eq!(e.prefilling(), 0, "a request ending before its first byte");
        assert_eq!(e.in_flight(), 1);
        assert_eq!(
            e.dispatched_since_scrape(),
            1,
            "a finished request leaves the estimate"
        );
        assert_eq!(e.finished_since_scrape(), 0, "no scrape saw g1");
        e.record_scrape(&MetricsSample::default(), Instant::now(), store.epoch());
        assert_eq!(e.dispatched_since_scrape(), 0);
        drop(g2);
        assert_eq!(e.in_flight(), 0);
        assert_eq!(e.dispatched_since_scrape(), 0, "never underflows");
        assert_eq!(e.finished_since_scrape(), 1, "the scrape may show g2");
        assert_eq!(e.prefill_backlog(), 0);
        e.record_scrape(&MetricsSample::default(), Instant::now(), store.epoch());
        assert_eq!(e.finished_since_scrape(), 0);
    }

    #[test]
    fn ipv6_host_port_is_bracketed() {
        let mut s = spec(8000);
        s.address = "::1".parse().unwrap();
        assert_eq!(s.host_port(), "[::1]:8000");
    }

    #[test]
    fn freshness_follows_the_threshold() {
        let store = EndpointStore::new(Duration::from_millis(100));
        store.replace(vec![spec(1)]).unwrap();
        let e = Arc::clone(&store.snapshot().endpoints()[0]);
        let now = Instant::now();
        assert!(!store.is_fresh(&e, now), "never scraped is not fresh");
        e.record_scrape(&MetricsSample::default(), now, store.epoch());
        assert!(store.is_fresh(&e, now));
        assert!(!store.is_fresh(&e, now + Duration::from_millis(150)));
    }
}
