//! One pod's scheduler: slots, the FIFO waiting queue, the serialized prefill
//! lane and the per-token decode clock (the model is described in the
//! [`crate::sim`] module header).
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::SimError;
use super::config::SimConfig;
use super::kv::{Allocation, KvCache};
use super::metrics::{Gauges, PodMetrics};

/// A validated request reduced to what the engine needs.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// Chained hashes of the prompt's full blocks.
    pub hashes: Vec<u64>,
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
    /// Seeds the request's own jitter RNG, drawn from the pod's RNG in
    /// admission order so runs are reproducible without a per-token lock.
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
    /// Running requests by id.
    allocs: HashMap<u64, Allocation>,
    next_id: u64,
    prefill_free_at: Instant,
    rng: fastrand::Rng,
}

pub struct Pod {
    pub index: usize,
    pub name: String,
    pub port: u16,
    cfg: Arc<SimConfig>,
    running: AtomicUsize,
    state: Mutex<PodState>,
    metrics: PodMetrics,
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
        let seed = cfg.seed.wrapping_add(index as u64);
        let metrics = PodMetrics::new(&cfg.model, cfg.block_size, cfg.kv_blocks)
            .map_err(SimError::Metrics)?;
        let state = PodState {
            kv: KvCache::new(cfg.kv_blocks),
            waiting: VecDeque::new(),
            allocs: HashMap::new(),
            next_id: 0,
            prefill_free_at: Instant::now(),
            rng: fastrand::Rng::with_seed(seed),
        };
        Ok(Self {
            index,
            name,
            port,
            cfg,
            running: AtomicUsize::new(0),
            state: Mutex::new(state),
            metrics,
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Admits the request now if nothing is queued and it fits, else queues it
    /// (FIFO), else rejects it.
    pub fn submit(self: &Arc<Self>, req: Prepared) -> Result<Ticket, SimError> {
        let now = Instant::now();
        // The ticket is built only after the lock is released: dropping a
        // ticket takes the lock, so one must never be dropped under it.
        let (id, admitted, rx) = {
            let mut st = self.state.lock();
            let id = st.next_id;
            st.next_id += 1;
            if st.waiting.is_empty()
                && let Some(adm) = self.admit(&mut st, id, &req, now, now)
            {
                (id, Some(adm), None)
            } else if st.waiting.len() >= self.cfg.max_waiting {
                return Err(SimError::QueueFull);
            } else {
                let (tx, rx) = oneshot::channel();
                st.waiting.push_back(Waiter {
                    id,
                    arrival: now,
                    req,
                    tx,
                });
                (id, None, Some(rx))
            }
        };
        let mut ticket = Ticket {
            pod: Arc::clone(self),
            id,
            arrival: now,
            rx,
            admission: None,
            next_token_at: now,
            rng: fastrand::Rng::with_seed(0),
            emitted: 0,
            finished: false,
        };
        if let Some(adm) = admitted {
            ticket.set_admission(adm);
        }
        Ok(ticket)
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
        let cached_tokens = alloc.hit_blocks * bs;
        st.allocs.insert(id, alloc);
        let running = st.allocs.len();
        self.running.store(running, Ordering::Relaxed);

        let base = cfg.prefill_base(req.prompt_tokens - cached_tokens);
        let prefill = jittered(
            base.mul_f64(cfg.load_factor(running)),
            cfg.jitter,
            &mut st.rng,
        );
        let start = now.max(st.prefill_free_at);
        let first_token_at = start + prefill;
        st.prefill_free_at = first_token_at;

        self.metrics
            .admitted(req.prompt_tokens, cached_tokens, now - arrival);
        Some(Admission {
            arrival,
            admitted_at: now,
            first_token_at,
            cached_tokens,
            seed: st.rng.u64(..),
        })
    }

    /// Admits queued requests in order until the head does not fit.
    fn drain_queue(&self, st: &mut PodState) {
        let now = Instant::now();
        // Pop, try, and put back on failure: avoids cloning the head's
        // block hashes on every release while it stays blocked.
        while let Some(head) = st.waiting.pop_front() {
            match self.admit(st, head.id, &head.req, head.arrival, now) {
                // A closed receiver means the ticket is being dropped right
                // now; its drop will find the allocation and release it.
                Some(adm) => {
                    let _ = head.tx.send(adm);
                }
                None => {
                    st.waiting.push_front(head);
                    break;
                }
            }
        }
    }

    /// Releases request `id` wherever it is (queue or running).
    fn release(&self, id: u64, outcome: Outcome) {
        let mut st = self.state.lock();
        if let Some(pos) = st.waiting.iter().position(|w| w.id == id) {
            st.waiting.remove(pos);
            // Removing a blocked head may unblock the next one.
            self.drain_queue(&mut st);
            return;
        }
        let Some(alloc) = st.allocs.remove(&id) else {
            return;
        };
        st.kv.release(alloc);
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

    /// Waits through the queue and the prefill; returns when the first token
    /// is due (and counts it as emitted).
    pub async fn first_token(&mut self) -> Result<Admission, SimError> {
        if self.admission.is_none() {
            let rx = self.rx.take().ok_or(SimError::LostInQueue)?;
            let adm = rx.await.map_err(|_| SimError::LostInQueue)?;
            self.set_admission(adm);
        }
        let adm = self.admission.ok_or(SimError::LostInQueue)?;
        tokio::time::sleep_until(adm.first_token_at).await;
        self.emitted = 1;
        Ok(adm)
    }

    /// Waits until the next output token is due. Deadlines accumulate from
    /// the first token, so timer rounding does not add up over long outputs.
    pub async fn next_token(&mut self) {
        let cfg = self.pod.config();
        let factor = cfg.load_factor(self.pod.running());
        let itl = jittered(cfg.itl_base().mul_f64(factor), cfg.jitter, &mut self.rng);
        self.next_token_at += itl;
        tokio::time::sleep_until(self.next_token_at).await;
        self.emitted += 1;
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
        let mut hashes = Vec::new();
        block_hashes(text.as_bytes(), 4, &mut hashes);
        Prepared {
            prompt_tokens: text.len(),
            max_tokens,
            hashes,
        }
    }

    async fn run(mut t: Ticket, tokens: usize) -> (Admission, Instant) {
        let adm = t.first_token().await.unwrap();
        for _ in 1..tokens {
            t.next_token().await;
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
        a.next_token().await;
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
            t.next_token().await;
        }))
        .await;
        assert_eq!(
            Instant::now() - t0,
            Duration::from_millis(10),
            "5 ms x factor 2"
        );
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
