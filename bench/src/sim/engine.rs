//! One pod's scheduler: slots, the FIFO waiting queue, the serialized prefill
//! lane, LoRA adapter slots and the per-token decode clock (the model is
//! described in the [`crate::sim`] module header).
//!
//! All shared state sits behind one `parking_lot::Mutex` taken only for short,
//! non-awaiting sections (submit, admit, release, reading the gauges). The
//! running count is mirrored in an atomic so the per-token load factor needs
//! no lock, and the `/metrics` counters are atomics of their own, so a page
//! is encoded outside the lock. A request is represented by a [`Ticket`];
//! its `Drop` releases whatever the request still holds, which is how client
//! disconnects are handled.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::SimError;
use super::config::SimConfig;
use super::kv::{Allocation, KvCache};
use super::kv_events::{EventSink, SimEvent};
use super::lora::{Acquired, LoraSlots, bit};
use super::metrics::{Gauges, PodMetrics};

/// A validated request reduced to what the engine needs.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// Chained hashes of the prompt's full blocks (see [`Pod::chain_seed`]).
    pub hashes: Vec<u64>,
    /// Token ids of the prompt's full blocks; only needed (and kept) when
    /// the pod publishes KV events, which carry them.
    pub tokens: Vec<u32>,
    /// The LoRA adapter the request runs with (index into the configured
    /// adapters); `None` for the base model.
    pub adapter: Option<usize>,
    /// Seeds this request's jitter with `--jitter-per-request`; `None` draws
    /// it from the pod's RNG.
    pub jitter_seed: Option<u64>,
}

impl Prepared {
    /// Blocks the request holds while running (prompt + all output tokens).
    pub fn total_blocks(&self, block_size: usize) -> usize {
        (self.prompt_tokens + self.max_tokens).div_ceil(block_size)
    }
}

/// What a request learns when it is admitted.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub arrival: Instant,
    pub admitted_at: Instant,
    /// End of this request's prefill: when the first token is emitted.
    pub first_token_at: Instant,
    pub cached_tokens: usize,
    /// The request's adapter had to be loaded into a slot first.
    pub loaded_adapter: bool,
    /// Seeds the request's decode jitter, drawn after its prefill jitter
    /// (from the pod's RNG in admission order, or from the request's own
    /// seed), so runs are reproducible without a per-token lock.
    seed: u64,
}

struct Waiter {
    id: u64,
    arrival: Instant,
    req: Prepared,
    tx: oneshot::Sender<Admission>,
}

struct PodState {
    kv: KvCache,
    waiting: VecDeque<Waiter>,
    /// Running requests by id: their blocks and adapter.
    allocs: HashMap<u64, (Allocation, Option<usize>)>,
    /// `None` when the pod serves no adapters.
    lora: Option<LoraSlots>,
    /// Queued requests per adapter.
    waiting_by_adapter: Vec<usize>,
    next_id: u64,
    prefill_free_at: Instant,
    rng: fastrand::Rng,
    /// KV events of the current scheduling pass, published as one batch.
    pending: Vec<SimEvent>,
}

pub struct Pod {
    pub index: usize,
    pub name: String,
    pub port: u16,
    cfg: Arc<SimConfig>,
    running: AtomicUsize,
    state: Mutex<PodState>,
    metrics: PodMetrics,
    events: Option<EventSink>,
    /// Seeds every block-hash chain; random per engine start, as vLLM's
    /// without PYTHONHASHSEED, so hashes are opaque to subscribers.
    hash_seed: AtomicU64,
    /// Engine starts (restarts) so far: a ticket from an earlier epoch fails.
    epoch: AtomicU64,
}

/// Gaussian multiplier `1 + jitter * z`, clamped to [0.3, 1.7] like the
/// llm-d simulator, applied to `base`.
pub fn jittered(base: Duration, jitter: f64, rng: &mut fastrand::Rng) -> Duration {
    if jitter <= 0.0 {
        return base;
    }
    // Box-Muller; 1 - f64() is in (0, 1], so ln() is finite.
    let u1 = 1.0 - rng.f64();
    let u2 = rng.f64();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    base.mul_f64((1.0 + jitter * z).clamp(0.3, 1.7))
}

impl Pod {
    pub fn new(
        index: usize,
        name: String,
        port: u16,
        cfg: Arc<SimConfig>,
    ) -> Result<Self, SimError> {
        Self::with_events(index, name, port, cfg, None)
    }

    /// A pod that publishes its cache changes to `events`.
    pub fn with_events(
        index: usize,
        name: String,
        port: u16,
        cfg: Arc<SimConfig>,
        events: Option<EventSink>,
    ) -> Result<Self, SimError> {
        let seed = cfg.seed.wrapping_add(index as u64);
        let mut metrics = PodMetrics::new(&cfg.model, cfg.block_size, cfg.kv_blocks)
            .map_err(SimError::Metrics)?;
        let lora = (!cfg.lora_adapters.is_empty()).then(|| LoraSlots::new(cfg.max_loras));
        if lora.is_some() {
            metrics
                .enable_lora(&cfg.lora_adapters, cfg.max_loras)
                .map_err(SimError::Metrics)?;
        }
        if let Some(sink) = &events {
            metrics
                .register_kv_events(&sink.counters)
                .map_err(SimError::Metrics)?;
        }
        let state = PodState {
            kv: Self::fresh_cache(&cfg, events.is_some()),
            waiting: VecDeque::new(),
            allocs: HashMap::new(),
            lora,
            waiting_by_adapter: vec![0; cfg.lora_adapters.len()],
            next_id: 0,
            prefill_free_at: Instant::now(),
            rng: fastrand::Rng::with_seed(seed),
            pending: Vec::new(),
        };
        Ok(Self {
            index,
            name,
            port,
            cfg,
            running: AtomicUsize::new(0),
            state: Mutex::new(state),
            metrics,
            events,
            hash_seed: AtomicU64::new(fastrand::u64(..)),
            epoch: AtomicU64::new(0),
        })
    }

    fn fresh_cache(cfg: &SimConfig, logged: bool) -> KvCache {
        if logged {
            KvCache::with_log(cfg.kv_blocks)
        } else {
            KvCache::new(cfg.kv_blocks)
        }
    }

    /// Whether this pod publishes KV events (callers then keep
    /// [`Prepared::tokens`]).
    pub fn publishes_events(&self) -> bool {
        self.events.is_some()
    }

    /// Where the block-hash chain of a request starts: the engine's random
    /// seed mixed with the request's adapter (`adapter_seed`, 0 for the base
    /// model), so adapters never share blocks.
    pub fn chain_seed(&self, adapter_seed: u64) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(
            &adapter_seed.to_le_bytes(),
            self.hash_seed.load(Ordering::Relaxed),
        )
    }

    /// Whether the KV-event publisher has handled every batch the engine
    /// produced (always true without events).
    pub fn events_idle(&self) -> bool {
        self.events.as_ref().is_none_or(EventSink::idle)
    }

    /// Engine starts so far (0 until the first [`Pod::restart`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Restarts the engine in place, as a vLLM process restart would: the
    /// cache empties (without events: a new process does not report what
    /// the old one held), the hash seed changes, the event `seq` starts
    /// again at 0 with an empty replay buffer, and every in-flight request
    /// fails (queued ones at once, running ones at their next token).
    pub fn restart(&self) {
        let dropped_waiters = {
            let mut st = self.state.lock();
            self.epoch.fetch_add(1, Ordering::AcqRel);
            self.hash_seed.store(fastrand::u64(..), Ordering::Relaxed);
            st.kv = Self::fresh_cache(&self.cfg, self.events.is_some());
            st.allocs.clear();
            st.waiting_by_adapter.iter_mut().for_each(|n| *n = 0);
            if let Some(slots) = &mut st.lora {
                *slots = LoraSlots::new(self.cfg.max_loras);
            }
            st.prefill_free_at = Instant::now();
            st.pending.clear();
            self.running.store(0, Ordering::Relaxed);
            if let Some(sink) = &self.events {
                sink.restart();
            }
            self.publish_lora(&st);
            std::mem::take(&mut st.waiting)
        };
        // Their tickets see the closed channel and fail.
        drop(dropped_waiters);
    }

    /// Drops every cached block, as vLLM's `/reset_prefix_cache` does, and
    /// publishes `AllBlocksCleared`. Refused (false) while a running request
    /// holds cached blocks.
    pub fn reset_prefix_cache(&self) -> bool {
        let mut st = self.state.lock();
        if !st.kv.reset() {
            return false;
        }
        if self.events.is_some() {
            st.pending.push(SimEvent::Cleared);
            self.flush_events(&mut st);
        }
        true
    }

    /// Publishes this pass's events as one batch.
    fn flush_events(&self, st: &mut PodState) {
        if let Some(sink) = &self.events
            && !st.pending.is_empty()
        {
            sink.send(std::mem::take(&mut st.pending));
        }
    }

    /// Turns the cache's change log of one allocation into events: removals
    /// first (they made room), then one `BlockStored` per run of
    /// consecutive new blocks, parented on the block before the run.
    fn collect_events(st: &mut PodState, req: &Prepared, bs: usize) {
        let PodState { kv, pending, .. } = st;
        let Some(log) = kv.log_mut() else {
            return;
        };
        if !log.evicted.is_empty() {
            pending.push(SimEvent::Removed {
                hashes: std::mem::take(&mut log.evicted),
            });
        }
        let mut i = 0;
        while i < log.stored.len() {
            let first = log.stored[i];
            let mut end = first + 1;
            i += 1;
            while i < log.stored.len() && log.stored[i] == end {
                end += 1;
                i += 1;
            }
            let (Some(hashes), Some(tokens)) = (
                req.hashes.get(first..end),
                req.tokens.get(first * bs..end * bs),
            ) else {
                continue;
            };
            pending.push(SimEvent::Stored {
                parent: first
                    .checked_sub(1)
                    .and_then(|p| req.hashes.get(p).copied()),
                hashes: hashes.to_vec(),
                tokens: tokens.to_vec(),
                adapter: req.adapter,
            });
        }
        log.stored.clear();
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Queues the request and admits whatever can start (this request
    /// included, when it fits); rejects it when it would wait behind a full
    /// queue.
    pub fn submit(self: &Arc<Self>, req: Prepared) -> Result<Ticket, SimError> {
        let now = Instant::now();
        if let Some(a) = req.adapter
            && a >= self.cfg.lora_adapters.len()
        {
            return Err(SimError::Config(format!("unknown adapter index {a}")));
        }
        // The ticket is built only after the lock is released: dropping a
        // ticket takes the lock, so one must never be dropped under it.
        let (id, rx, epoch) = {
            let mut st = self.state.lock();
            let id = st.next_id;
            st.next_id += 1;
            let (tx, rx) = oneshot::channel();
            if let Some(n) = req.adapter.and_then(|a| st.waiting_by_adapter.get_mut(a)) {
                *n += 1;
            }
            st.waiting.push_back(Waiter {
                id,
                arrival: now,
                req,
                tx,
            });
            self.drain_queue(&mut st);
            if st.waiting.back().is_some_and(|w| w.id == id)
                && st.waiting.len() > self.cfg.max_waiting
            {
                if let Some(w) = st.waiting.pop_back() {
                    self.unqueued(&mut st, &w);
                }
                self.publish_lora(&st);
                return Err(SimError::QueueFull);
            }
            (id, rx, self.epoch())
        };
        Ok(Ticket {
            pod: Arc::clone(self),
            id,
            arrival: now,
            rx: Some(rx),
            epoch,
            admission: None,
            next_token_at: now,
            rng: fastrand::Rng::with_seed(0),
            emitted: 0,
            finished: false,
        })
    }

    /// Bookkeeping for a request that left the queue.
    fn unqueued(&self, st: &mut PodState, w: &Waiter) {
        if let Some(n) = w.req.adapter.and_then(|a| st.waiting_by_adapter.get_mut(a)) {
            *n = n.saturating_sub(1);
        }
    }

    /// Hands the adapter sets to the metrics (a no-op without LoRA).
    fn publish_lora(&self, st: &PodState) {
        if let Some(slots) = &st.lora {
            let waiting = st
                .waiting_by_adapter
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .fold(0, |m, (i, _)| m | bit(i));
            self.metrics.lora_state(slots.running_mask(), waiting);
        }
    }

    /// Tries to start `req`: takes a slot and KV blocks and books the prefill
    /// lane. Caller holds the lock.
    fn admit(
        &self,
        st: &mut PodState,
        id: u64,
        req: &Prepared,
        arrival: Instant,
        now: Instant,
    ) -> Option<Admission> {
        let cfg = &*self.cfg;
        if st.allocs.len() >= cfg.max_num_seqs {
            return None;
        }
        let bs = cfg.block_size;
        // vLLM always computes the last prompt token, so a fully cached
        // prompt still misses the block holding it.
        let max_hit_blocks = req.prompt_tokens.saturating_sub(1) / bs;
        let private = req.total_blocks(bs).saturating_sub(req.hashes.len());
        let alloc = st.kv.try_allocate(&req.hashes, max_hit_blocks, private)?;
        Self::collect_events(st, req, bs);
        let acquired = match (req.adapter, st.lora.as_mut()) {
            (Some(a), Some(slots)) => match slots.acquire(a) {
                Some(acquired) => Some(acquired),
                None => {
                    // Callers check the slots first; undo rather than trust it.
                    st.kv.release(alloc);
                    return None;
                }
            },
            _ => None,
        };
        let cached_tokens = alloc.hit_blocks * bs;
        st.allocs.insert(id, (alloc, req.adapter));
        let running = st.allocs.len();
        self.running.store(running, Ordering::Relaxed);

        let mut own_rng = req.jitter_seed.map(fastrand::Rng::with_seed);
        let rng = own_rng.as_mut().unwrap_or(&mut st.rng);
        let mut start = now.max(st.prefill_free_at);
        let loaded_adapter =
            if let (Some(a), Some(Acquired::Loaded { evicted })) = (req.adapter, acquired) {
                // The load occupies the prefill lane: vLLM loads adapters inside
                // the engine step, so it holds up the pod's other prefills too.
                start += jittered(cfg.lora_load_base(), cfg.jitter, rng);
                self.metrics.lora_loaded(a, evicted);
                true
            } else {
                false
            };
        let base = cfg.prefill_base(req.prompt_tokens - cached_tokens);
        let prefill = jittered(base.mul_f64(cfg.load_factor(running)), cfg.jitter, rng);
        let first_token_at = start + prefill;
        st.prefill_free_at = first_token_at;

        self.metrics
            .admitted(req.prompt_tokens, cached_tokens, now - arrival);
        Some(Admission {
            arrival,
            admitted_at: now,
            first_token_at,
            cached_tokens,
            loaded_adapter,
            seed: rng.u64(..),
        })
    }

    /// Admits queued requests in order until one does not fit. A request
    /// whose adapter cannot get a slot is passed over and the ones behind it
    /// are considered (vLLM's scheduler skips it for this step); any other
    /// shortage (running slots, KV blocks) stops the scan, as FCFS does.
    fn drain_queue(&self, st: &mut PodState) {
        let now = Instant::now();
        let mut i = 0;
        while i < st.waiting.len() && st.allocs.len() < self.cfg.max_num_seqs {
            if let (Some(a), Some(slots)) = (st.waiting[i].req.adapter, &st.lora)
                && !slots.can_acquire(a)
            {
                i += 1;
                continue;
            }
            // Take it out, try, and put it back on failure: avoids cloning
            // its block hashes on every release while it stays blocked.
            let Some(w) = st.waiting.remove(i) else {
                break;
            };
            match self.admit(st, w.id, &w.req, w.arrival, now) {
                Some(adm) => {
                    self.unqueued(st, &w);
                    // A closed receiver means the ticket is being dropped
                    // right now; its drop will find the allocation and
                    // release it.
                    let _ = w.tx.send(adm);
                }
                None => {
                    st.waiting.insert(i, w);
                    break;
                }
            }
        }
        self.publish_lora(st);
        self.flush_events(st);
    }

    /// Releases request `id` wherever it is (queue or running).
    fn release(&self, id: u64, outcome: Outcome) {
        let mut st = self.state.lock();
        if let Some(w) = st
            .waiting
            .iter()
            .position(|w| w.id == id)
            .and_then(|pos| st.waiting.remove(pos))
        {
            self.unqueued(&mut st, &w);
            // Removing a blocked head may unblock the next one.
            self.drain_queue(&mut st);
            return;
        }
        let Some((alloc, adapter)) = st.allocs.remove(&id) else {
            return;
        };
        st.kv.release(alloc);
        if let (Some(a), Some(slots)) = (adapter, st.lora.as_mut()) {
            slots.release(a);
        }
        self.running.store(st.allocs.len(), Ordering::Relaxed);
        match outcome {
            Outcome::Finished {
                ttft,
                e2e,
                generated,
            } => self.metrics.finished(ttft, e2e, generated),
            Outcome::Aborted { generated } => self.metrics.aborted(generated),
        }
        self.drain_queue(&mut st);
    }

    /// The engine's state as the gauges report it.
    pub fn gauges(&self) -> Gauges {
        let st = self.state.lock();
        Gauges {
            running: st.allocs.len(),
            waiting: st.waiting.len(),
            kv_usage: st.kv.used_blocks() as f64 / st.kv.capacity() as f64,
        }
    }

    /// Adapters in a slot, busy or idle, as a bitmask over adapter indices.
    pub fn loaded_adapters(&self) -> u64 {
        self.state
            .lock()
            .lora
            .as_ref()
            .map_or(0, LoraSlots::loaded_mask)
    }

    /// The `/metrics` page, restricted to `names` when given (see
    /// [`PodMetrics::render`]). The engine's lock is held only to read the
    /// gauges, not while the page is encoded.
    pub fn metrics_page(&self, names: Option<&[String]>) -> Result<String, SimError> {
        self.metrics
            .render(self.gauges(), names)
            .map_err(SimError::Metrics)
    }
}

enum Outcome {
    Finished {
        ttft: Duration,
        e2e: Duration,
        generated: usize,
    },
    Aborted {
        generated: usize,
    },
}

/// A request's claim on its pod. Dropping it without [`Ticket::finish`]
/// aborts the request and frees its slot, blocks or queue place.
pub struct Ticket {
    pod: Arc<Pod>,
    id: u64,
    arrival: Instant,
    rx: Option<oneshot::Receiver<Admission>>,
    /// The engine start this request was submitted to.
    epoch: u64,
    admission: Option<Admission>,
    next_token_at: Instant,
    rng: fastrand::Rng,
    emitted: usize,
    finished: bool,
}

impl Ticket {
    fn set_admission(&mut self, adm: Admission) {
        self.next_token_at = adm.first_token_at;
        self.rng = fastrand::Rng::with_seed(adm.seed);
        self.admission = Some(adm);
    }

    pub fn arrival(&self) -> Instant {
        self.arrival
    }

    /// Fails once the engine restarted under this request.
    fn alive(&self) -> Result<(), SimError> {
        if self.pod.epoch() == self.epoch {
            Ok(())
        } else {
            Err(SimError::Restarted)
        }
    }

    /// Waits through the queue and the prefill; returns when the first token
    /// is due (and counts it as emitted).
    pub async fn first_token(&mut self) -> Result<Admission, SimError> {
        if self.admission.is_none() {
            let rx = self.rx.take().ok_or(SimError::LostInQueue)?;
            let adm = match rx.await {
                Ok(adm) => adm,
                Err(_) => {
                    self.alive()?;
                    return Err(SimError::LostInQueue);
                }
            };
            self.set_admission(adm);
        }
        let adm = self.admission.ok_or(SimError::LostInQueue)?;
        tokio::time::sleep_until(adm.first_token_at).await;
        self.alive()?;
        self.emitted = 1;
        Ok(adm)
    }

    /// Waits until the next output token is due. Deadlines accumulate from
    /// the first token, so timer rounding does not add up over long outputs.
    pub async fn next_token(&mut self) -> Result<(), SimError> {
        let cfg = self.pod.config();
        let factor = cfg.load_factor(self.pod.running());
        let itl = jittered(cfg.itl_base().mul_f64(factor), cfg.jitter, &mut self.rng);
        self.next_token_at += itl;
        tokio::time::sleep_until(self.next_token_at).await;
        self.alive()?;
        self.emitted += 1;
        Ok(())
    }

    /// Completes the request successfully, recording its latencies.
    pub fn finish(mut self) {
        let Some(adm) = self.admission else {
            return; // Drop aborts it.
        };
        self.finished = true;
        let now = Instant::now();
        self.pod.release(
            self.id,
            Outcome::Finished {
                ttft: adm.first_token_at - self.arrival,
                e2e: now - self.arrival,
                generated: self.emitted,
            },
        );
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            self.pod.release(
                self.id,
                Outcome::Aborted {
                    generated: self.emitted,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::kv::block_hashes;
    use crate::sim::tokens::chunk_token_ids;

    fn cfg() -> SimConfig {
        SimConfig {
            jitter: 0.0,
            max_num_seqs: 4,
            kv_blocks: 64,
            block_size: 4,
            chars_per_token: 1,
            prefill_overhead_ms: 10.0,
            prefill_us_per_token: 1000.0,
            itl_ms: 5.0,
            time_factor_under_load: 1.0,
            max_waiting: 2,
            ..SimConfig::default()
        }
    }

    fn pod(c: SimConfig) -> Arc<Pod> {
        Arc::new(Pod::new(0, "sim-0".into(), 0, Arc::new(c)).unwrap())
    }

    /// Sum of the samples named `name` on the pod's page.
    fn counter(p: &Pod, name: &str) -> f64 {
        let page = p.metrics_page(None).unwrap();
        crate::prom::sum(&page, name).unwrap().unwrap()
    }

    /// `vllm:request_success_total` for one finish reason.
    fn finished(p: &Pod, reason: &str) -> f64 {
        let page = p.metrics_page(None).unwrap();
        epp::scrape::samples(page.as_bytes())
            .map(Result::unwrap)
            .find(|s| {
                s.name() == b"vllm:request_success_total"
                    && s.has_label(b"finished_reason", reason.as_bytes())
            })
            .map(|s| s.value())
            .unwrap()
    }

    fn req(text: &str, max_tokens: usize) -> Prepared {
        let mut tokens = Vec::new();
        chunk_token_ids(text.as_bytes(), 1, &mut tokens);
        let mut hashes = Vec::new();
        block_hashes(&tokens, 4, 0, &mut hashes);
        Prepared {
            prompt_tokens: text.len(),
            max_tokens,
            hashes,
            tokens: Vec::new(),
            adapter: None,
            jitter_seed: None,
        }
    }

    async fn run(mut t: Ticket, tokens: usize) -> (Admission, Instant) {
        let adm = t.first_token().await.unwrap();
        for _ in 1..tokens {
            t.next_token().await.unwrap();
        }
        let end = Instant::now();
        t.finish();
        (adm, end)
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_prompt_hits_and_prefills_faster() {
        let p = pod(cfg());
        let prompt = "0123456789abcdefghij"; // 20 tokens, 5 blocks
        let (a, end_a) = run(p.submit(req(prompt, 3)).unwrap(), 3).await;
        assert_eq!(a.cached_tokens, 0);
        // 10 ms + 20 tokens x 1 ms, then 2 x 5 ms.
        assert_eq!(a.first_token_at - a.arrival, Duration::from_millis(30));
        assert_eq!(end_a - a.arrival, Duration::from_millis(40));
        let (b, _) = run(p.submit(req(prompt, 3)).unwrap(), 3).await;
        // The block holding the last token is recomputed: 4 of 5 blocks hit.
        assert_eq!(b.cached_tokens, 16);
        assert_eq!(b.first_token_at - b.arrival, Duration::from_millis(14));
        assert_eq!(counter(&p, "vllm:prefix_cache_queries_total"), 40.0);
        assert_eq!(counter(&p, "vllm:prefix_cache_hits_total"), 16.0);
        assert_eq!(finished(&p, "length"), 2.0);
        assert_eq!(counter(&p, "vllm:generation_tokens_total"), 6.0);
        let g = p.gauges();
        assert_eq!(g.running, 0);
        assert_eq!(g.kv_usage, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn per_request_jitter_follows_the_request_not_the_pod() {
        let jittery = || {
            Arc::new(SimConfig {
                jitter: 0.3,
                ..cfg()
            })
        };
        // Different pod seeds, and pod b has drawn from its RNG before.
        let a = Arc::new(Pod::new(0, "sim-0".into(), 0, jittery()).unwrap());
        let b = Arc::new(Pod::new(1, "sim-1".into(), 0, jittery()).unwrap());
        run(b.submit(req("warm-up prompt", 2)).unwrap(), 2).await;
        let timing = |(adm, end): (Admission, Instant)| {
            (adm.first_token_at - adm.arrival, end - adm.arrival)
        };
        let own = |seed| Prepared {
            jitter_seed: Some(seed),
            ..req("the same prompt on both", 4)
        };
        let on_a = timing(run(a.submit(own(42)).unwrap(), 4).await);
        let on_b = timing(run(b.submit(own(42)).unwrap(), 4).await);
        assert_eq!(on_a, on_b);
        // Drawn from the pods' RNGs instead, the same request differs.
        let shared = req("another prompt for both", 4);
        let on_a = timing(run(a.submit(shared.clone()).unwrap(), 4).await);
        let on_b = timing(run(b.submit(shared).unwrap(), 4).await);
        assert_ne!(on_a, on_b);
    }

    #[tokio::test(start_paused = true)]
    async fn full_slots_queue_fifo_and_full_queue_rejects() {
        let p = pod(SimConfig {
            max_num_seqs: 1,
            ..cfg()
        });
        let mut a = p.submit(req("aaaa", 2)).unwrap();
        let b = p.submit(req("bbbb", 2)).unwrap();
        let c = p.submit(req("cccc", 2)).unwrap();
        assert!(matches!(p.submit(req("dddd", 2)), Err(SimError::QueueFull)));
        assert_eq!(p.gauges().waiting, 2);
        let hb = tokio::spawn(run(b, 2));
        let hc = tokio::spawn(run(c, 2));
        let adm_a = a.first_token().await.unwrap();
        a.next_token().await.unwrap();
        let end_a = Instant::now();
        a.finish();
        let (adm_b, end_b) = hb.await.unwrap();
        let (adm_c, _) = hc.await.unwrap();
        assert_eq!(adm_b.admitted_at, end_a, "b starts when a's slot frees");
        assert_eq!(adm_c.admitted_at, end_b, "c strictly after b");
        // Queue wait is part of TTFT.
        assert_eq!(
            adm_b.first_token_at - adm_b.arrival,
            (end_a - adm_a.arrival) + Duration::from_millis(14)
        );
        assert_eq!(finished(&p, "length"), 3.0);
    }

    #[tokio::test(start_paused = true)]
    async fn prefills_are_serialized() {
        let p = pod(cfg());
        let a = p.submit(req("aaaaaaaa", 1)).unwrap(); // 18 ms prefill
        let b = p.submit(req("bbbbbbbb", 1)).unwrap();
        let ((x, _), (y, _)) = tokio::join!(run(a, 1), run(b, 1));
        assert_eq!(x.first_token_at - x.arrival, Duration::from_millis(18));
        assert_eq!(y.first_token_at - y.arrival, Duration::from_millis(36));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_kv_blocks_and_cancel_frees_them() {
        // 8 blocks; each request needs 2 prompt + 4 output blocks.
        let p = pod(SimConfig {
            kv_blocks: 8,
            ..cfg()
        });
        let a = p.submit(req("aaaabbbb", 16)).unwrap();
        let mut b = p.submit(req("ccccdddd", 16)).unwrap();
        let g = p.gauges();
        assert_eq!(g.running, 1);
        assert_eq!(g.waiting, 1, "no blocks although a slot is free");
        assert_eq!(g.kv_usage, 6.0 / 8.0);
        assert_eq!(counter(&p, "vllm:num_requests_waiting"), 1.0);
        drop(a); // client went away
        let adm = b.first_token().await.unwrap();
        assert_eq!(adm.cached_tokens, 0);
        assert_eq!(finished(&p, "abort"), 1.0, "counted as aborted");
        drop(b);
        let g = p.gauges();
        assert_eq!((g.running, g.waiting, g.kv_usage), (0, 0, 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn load_factor_slows_decode() {
        let c = SimConfig {
            time_factor_under_load: 2.0,
            max_num_seqs: 5,
            prefill_overhead_ms: 0.0,
            prefill_us_per_token: 0.0,
            ..cfg()
        };
        assert_eq!(c.load_factor(1), 1.0);
        assert_eq!(c.load_factor(3), 1.5);
        assert_eq!(c.load_factor(5), 2.0);
        assert_eq!(c.load_factor(50), 2.0);
        let p = pod(c);
        let mut tickets: Vec<_> = (0..5)
            .map(|i| p.submit(req(&format!("{i}{i}{i}{i}"), 2)).unwrap())
            .collect();
        assert_eq!(p.running(), 5);
        let t0 = Instant::now();
        // All five decode concurrently, so each ITL sees a full batch.
        futures_util::future::join_all(tickets.iter_mut().map(|t| async move {
            t.first_token().await.unwrap();
            t.next_token().await.unwrap();
        }))
        .await;
        assert_eq!(
            Instant::now() - t0,
            Duration::from_millis(10),
            "5 ms x factor 2"
        );
    }

    fn lora_cfg(max_loras: usize) -> SimConfig {
        SimConfig {
            lora_adapters: vec!["a0".into(), "a1".into(), "a2".into()],
            max_loras,
            lora_load_ms: 50.0,
            ..cfg()
        }
    }

    fn on(adapter: usize, text: &str, max_tokens: usize) -> Prepared {
        Prepared {
            adapter: Some(adapter),
            ..req(text, max_tokens)
        }
    }

    /// The newest `vllm:lora_requests_info` series: (running, waiting,
    /// max_lora), and how many series the page has.
    fn lora_info(p: &Pod) -> ((String, String, String), usize) {
        let page = p.metrics_page(None).unwrap();
        let series: Vec<_> = epp::scrape::samples(page.as_bytes())
            .map(Result::unwrap)
            .filter(|s| s.name() == b"vllm:lora_requests_info")
            .map(|s| {
                let label = |n: &[u8]| String::from_utf8(s.label(n).unwrap().to_vec()).unwrap();
                let labels = (
                    label(b"running_lora_adapters"),
                    label(b"waiting_lora_adapters"),
                    label(b"max_lora"),
                );
                (s.value(), labels)
            })
            .collect();
        let n = series.len();
        let newest = series
            .into_iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        (newest.1, n)
    }

    fn strs(r: &str, w: &str, m: &str) -> (String, String, String) {
        (r.into(), w.into(), m.into())
    }

    #[tokio::test(start_paused = true)]
    async fn loading_an_adapter_costs_its_load_time_once() {
        let p = pod(lora_cfg(2));
        // 50 ms load, then 10 ms + 8 tokens x 1 ms of prefill.
        let (a, _) = run(p.submit(on(0, "aaaabbbb", 2)).unwrap(), 2).await;
        assert!(a.loaded_adapter);
        assert_eq!(a.first_token_at - a.arrival, Duration::from_millis(68));
        let (b, _) = run(p.submit(on(0, "ccccdddd", 2)).unwrap(), 2).await;
        assert!(!b.loaded_adapter, "still resident");
        assert_eq!(b.first_token_at - b.arrival, Duration::from_millis(18));
        // The base model needs no slot.
        let (c, _) = run(p.submit(req("eeeeffff", 2)).unwrap(), 2).await;
        assert!(!c.loaded_adapter);
        assert_eq!(counter(&p, "vllm_sim_lora_adapter_loads_total"), 1.0);
        assert_eq!(counter(&p, "vllm_sim_lora_adapter_evictions_total"), 0.0);
        assert_eq!(p.loaded_adapters(), 0b001);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_while_every_slot_is_in_use_and_others_pass_it() {
        let p = pod(lora_cfg(1));
        let mut a = p.submit(on(0, "aaaa", 3)).unwrap();
        let mut b = p.submit(on(1, "bbbb", 2)).unwrap();
        // Behind b, but its adapter is resident: it starts while b waits.
        let mut c = p.submit(on(0, "cccc", 2)).unwrap();
        let g = p.gauges();
        assert_eq!((g.running, g.waiting), (2, 1), "b waits for a slot");
        assert_eq!(lora_info(&p).0, strs("a0", "a1", "1"));
        let adm_a = a.first_token().await.unwrap();
        let adm_c = c.first_token().await.unwrap();
        assert!(!adm_c.loaded_adapter);
        assert!(adm_c.admitted_at < adm_a.first_token_at, "c did not queue");
        c.next_token().await.unwrap();
        c.finish();
        assert_eq!(p.gauges().waiting, 1, "a0 still in use by a");
        a.next_token().await.unwrap();
        a.next_token().await.unwrap();
        let a_done = Instant::now();
        a.finish();
        // a0 is idle now: a1 replaces it, and pays the load.
        let adm_b = b.first_token().await.unwrap();
        assert_eq!(adm_b.admitted_at, a_done);
        assert!(adm_b.loaded_adapter);
        assert_eq!(
            adm_b.first_token_at - adm_b.admitted_at,
            Duration::from_millis(50 + 14)
        );
        assert_eq!(p.loaded_adapters(), 0b010);
        assert_eq!(lora_info(&p).0, strs("a1", "", "1"));
        drop(b);
        assert_eq!(counter(&p, "vllm_sim_lora_adapter_loads_total"), 2.0);
        assert_eq!(counter(&p, "vllm_sim_lora_adapter_evictions_total"), 1.0);
        // Once idle, the newest series says nothing runs or waits.
        assert_eq!(lora_info(&p).0, strs("", "", "1"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_least_recently_used_idle_adapter_is_evicted() {
        let p = pod(lora_cfg(2));
        let a = p.submit(on(0, "aaaa", 2)).unwrap();
        let b = p.submit(on(1, "bbbb", 4)).unwrap();
        assert_eq!(lora_info(&p).0, strs("a0,a1", "", "2"));
        // a0's request ends first, so a0 is the least recently used.
        let ((_, end_a), (_, end_b)) = tokio::join!(run(a, 2), run(b, 4));
        assert!(end_a < end_b);
        let (c, _) = run(p.submit(on(2, "cccc", 1)).unwrap(), 1).await;
        assert!(c.loaded_adapter);
        assert_eq!(p.loaded_adapters(), 0b110);
        let evicted = |name: &str| {
            let page = p.metrics_page(None).unwrap();
            epp::scrape::samples(page.as_bytes())
                .map(Result::unwrap)
                .find(|s| {
                    s.name() == b"vllm_sim_lora_adapter_evictions_total"
                        && s.has_label(b"adapter", name.as_bytes())
                })
                .map(|s| s.value())
                .unwrap()
        };
        assert_eq!((evicted("a0"), evicted("a1")), (1.0, 0.0));
        // Every pair of adapter lists seen is a series of its own.
        assert!(lora_info(&p).1 >= 3, "{:?}", lora_info(&p));
    }

    #[test]
    fn jitter_is_seeded_and_clamped() {
        let base = Duration::from_millis(100);
        let mut a = fastrand::Rng::with_seed(7);
        let mut b = fastrand::Rng::with_seed(7);
        let xs: Vec<_> = (0..1000).map(|_| jittered(base, 0.5, &mut a)).collect();
        let ys: Vec<_> = (0..1000).map(|_| jittered(base, 0.5, &mut b)).collect();
        assert_eq!(xs, ys);
        assert!(
            xs.iter()
                .all(|d| *d >= base.mul_f64(0.3) && *d <= base.mul_f64(1.7))
        );
        let mean = xs.iter().map(|d| d.as_secs_f64()).sum::<f64>() / 1000.0;
        assert!((mean - 0.1).abs() < 0.01, "{mean}");
    }
}
