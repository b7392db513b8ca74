//! One subscription: a ZeroMQ SUB to one endpoint's publisher for one
//! data-parallel rank, feeding that rank's [`BlockIndex`].
//!
//! Sequence handling (vLLM numbers batches from 0 per publisher):
//! - `seq == next`: apply;
//! - `seq > next`: a gap. With a replay address, ask the publisher's ROUTER
//!   for `next..` (`["", next]` -> `["", seq, payload]`* then seq -1) and
//!   apply the batches before `seq`; if the replay fails or no longer reaches
//!   back to `next`, the gap is unrecoverable;
//! - `seq < next`: the publisher restarted;
//! - an undecodable batch is a lost batch.
//!
//! An unrecoverable gap, a restart or a lost batch drops this rank's entries
//! and marks it unknown; the next applied batch makes it known again. The
//! sequence survives reconnects, so a dropped connection is a gap like any
//! other. The task reads, decodes and applies inline (no queue between), so
//! a flooding publisher is throttled by TCP and its own high-water mark,
//! and the task yields to the runtime every [`YIELD_EVERY`] messages. The
//! index lock is held only to apply one batch, never across an await.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::{
    decode::{Batch, Event, decode_into},
    error::{Error, ErrorKind},
    index::{BlockIndex, PrefixMatch},
    zmtp::{Connection, Message},
};
use crate::telemetry::log_limit::LogLimiter;

const YIELD_EVERY: u32 = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct SubscriptionTarget {
    pub events: SocketAddr,
    pub replay: Option<SocketAddr>,
    pub topic: Vec<u8>,
    pub handshake_timeout: Duration,
    pub max_message: usize,
}

/// One rank's index and counters, shared with readers (scorer, metrics,
/// admin).
#[derive(Debug)]
pub struct RankState {
    index: Mutex<BlockIndex>,
    pub connected: AtomicBool,
    /// Set on the first connection and never cleared: readiness waits for
    /// it (or a timeout) once at startup, and a stream that drops later
    /// does not undo it (see `kv_events::readiness`).
    pub ever_connected: AtomicBool,
    /// False until a batch is applied, and again after entries were dropped.
    pub known: AtomicBool,
    /// Next expected seq plus one; 0 before the first batch.
    next_seq: AtomicU64,
    pub batches: AtomicU64,
    pub block_events: AtomicU64,
    pub gaps: AtomicU64,
    pub replays: AtomicU64,
    pub replay_failures: AtomicU64,
    pub restarts: AtomicU64,
    pub decode_errors: AtomicU64,
    /// A peer that is not a ZeroMQ publisher, an oversized or misframed
    /// message, a stalled handshake or message.
    pub protocol_errors: AtomicU64,
    /// Of `protocol_errors`, peers that stopped inside a message or the
    /// handshake.
    pub stalls: AtomicU64,
    pub unknown_events: AtomicU64,
    pub orphans: AtomicU64,
    pub evicted: AtomicU64,
    /// Now minus the last batch's `ts`, in microseconds.
    pub lag_micros: AtomicU64,
    pub blocks: AtomicU64,
    /// Tokens per block, from the last stored event; 0 before one.
    block_size: AtomicU32,
}

/// A point-in-time view of one rank, for `Admin.ListEndpoints`.
#[derive(Debug, Clone, PartialEq)]
pub struct RankSnapshot {
    pub connected: bool,
    pub known: bool,
    pub last_seq: Option<u64>,
    pub batches: u64,
    pub gaps: u64,
    pub replays: u64,
    pub restarts: u64,
    pub decode_errors: u64,
    pub protocol_errors: u64,
    pub lag: Duration,
    pub blocks: u64,
}

impl RankState {
    pub fn new(capacity: usize) -> Self {
        Self {
            index: Mutex::new(BlockIndex::new(capacity)),
            connected: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
            known: AtomicBool::new(false),
            next_seq: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            block_events: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            replay_failures: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            unknown_events: AtomicU64::new(0),
            orphans: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            lag_micros: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            block_size: AtomicU32::new(0),
        }
    }

    /// The longest cached prefix of `keys`, or `None` while unknown.
    pub fn longest_prefix(&self, keys: &[u64]) -> Option<PrefixMatch> {
        self.longest_prefix_near(keys, 0)
    }

    /// [`Self::longest_prefix`], probing around `hint` blocks first (see
    /// `BlockIndex::longest_prefix_near`). One lock acquisition per query,
    /// waited for: an ingest holds it for one batch, and answering from the
    /// approximate index instead would make the pick depend on timing.
    pub fn longest_prefix_near(&self, keys: &[u64], hint: usize) -> Option<PrefixMatch> {
        if !self.known.load(Ordering::Acquire) {
            return None;
        }
        Some(self.index.lock().longest_prefix_near(keys, hint))
    }

    /// Tokens per block as the engine reports it, once it has stored one.
    pub fn block_size(&self) -> Option<u32> {
        match self.block_size.load(Ordering::Relaxed) {
            0 => None,
            b => Some(b),
        }
    }

    /// Bounds the index (e.g. to the endpoint's `num_gpu_blocks`).
    pub fn set_capacity(&self, capacity: usize) {
        let mut idx = self.index.lock();
        let ev = idx.set_capacity(capacity);
        self.evicted.fetch_add(ev, Ordering::Relaxed);
        self.blocks.store(idx.len() as u64, Ordering::Relaxed);
    }

    pub fn heap_bytes(&self) -> usize {
        self.index.lock().heap_bytes()
    }

    pub fn snapshot(&self) -> RankSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RankSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            known: self.known.load(Ordering::Relaxed),
            last_seq: l(&self.next_seq).checked_sub(2),
            batches: l(&self.batches),
            gaps: l(&self.gaps),
            replays: l(&self.replays),
            restarts: l(&self.restarts),
            decode_errors: l(&self.decode_errors),
            protocol_errors: l(&self.protocol_errors),
            lag: Duration::from_micros(l(&self.lag_micros)),
            blocks: l(&self.blocks),
        }
    }

    fn drop_entries(&self) {
        self.known.store(false, Ordering::Release);
        self.index.lock().clear();
        self.blocks.store(0, Ordering::Relaxed);
    }

    /// Applies a decoded batch as if it had arrived in order (for feeding a
    /// rank from somewhere other than a subscription: tests, benchmarks).
    pub fn apply_batch(&self, batch: &Batch) {
        self.apply(batch);
    }

    fn apply(&self, batch: &Batch) {
        let a = {
            let mut idx = self.index.lock();
            let a = idx.apply(batch);
            self.blocks.store(idx.len() as u64, Ordering::Relaxed);
            a
        };
        if let Some(bs) = batch.events.iter().rev().find_map(|e| match e {
            Event::Stored { block_size, .. } if *block_size > 0 => Some(*block_size),
            _ => None,
        }) {
            self.block_size.store(bs, Ordering::Relaxed);
        }
        self.known.store(true, Ordering::Release);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.block_events
            .fetch_add(batch.block_events() as u64, Ordering::Relaxed);
        self.unknown_events
            .fetch_add(u64::from(batch.unknown_events), Ordering::Relaxed);
        self.orphans.fetch_add(a.orphans, Ordering::Relaxed);
        self.evicted.fetch_add(a.evicted, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let lag = (now - batch.ts).clamp(0.0, 1e9);
        self.lag_micros.store((lag * 1e6) as u64, Ordering::Relaxed);
    }
}

/// One limiter per kind of trouble, so a flood of one cannot hide another.
static LOG: LogLimiter = LogLimiter::new(Duration::from_secs(30));
static LOG_DECODE: LogLimiter = LogLimiter::new(Duration::from_secs(30));
static LOG_FRAMES: LogLimiter = LogLimiter::new(Duration::from_secs(30));
static LOG_UNKNOWN: LogLimiter = LogLimiter::new(Duration::from_secs(30));

/// Runs one subscription until `stop` turns true.
pub async fn run(
    target: SubscriptionTarget,
    state: Arc<RankState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut sub = Subscriber {
        target,
        state,
        batch: Batch::default(),
        msg: Message::default(),
    };
    while !*stop.borrow() {
        let result = tokio::select! {
            r = sub.session() => r,
            _ = stop.changed() => return,
        };
        sub.state.connected.store(false, Ordering::Relaxed);
        let healthy = match result {
            Ok(applied) => applied,
            Err((e, applied)) => {
                if e.kind() == ErrorKind::Protocol {
                    sub.state.protocol_errors.fetch_add(1, Ordering::Relaxed);
                }
                if matches!(e, Error::Stalled(_) | Error::HandshakeTimeout) {
                    sub.state.stalls.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(suppressed) = LOG.allow(Instant::now()) {
                    tracing::warn!(error = %crate::telemetry::logging::chain(&e), events = %sub.target.events, suppressed, "KV-event subscription failed; reconnecting");
                }
                applied
            }
        };
        if healthy {
            backoff = BACKOFF_MIN;
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
        tokio::select! {
            () = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Subscriber {
    target: SubscriptionTarget,
    state: Arc<RankState>,
    batch: Batch,
    msg: Message,
}

impl Subscriber {
    /// One connection; the error carries whether any batch was applied.
    async fn session(&mut self) -> Result<bool, (Error, bool)> {
        let t = &self.target;
        let mut conn = Connection::connect(t.events, "SUB", t.handshake_timeout, t.max_message)
            .await
            .map_err(|e| (e, false))?;
        conn.subscribe(&t.topic).await.map_err(|e| (e, false))?;
        self.state.connected.store(true, Ordering::Relaxed);
        self.state.ever_connected.store(true, Ordering::Relaxed);
        let mut applied = false;
        let mut n: u32 = 0;
        loop {
            let mut msg = std::mem::take(&mut self.msg);
            let r = conn.recv(&mut msg).await;
            if let Err(e) = r {
                self.msg = msg;
                return Err((e, applied));
            }
            applied |= self.handle(&msg).await;
            self.msg = msg;
            n = n.wrapping_add(1);
            if n.is_multiple_of(YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Handles one `[topic, seq, payload]` message; true if it was applied.
    async fn handle(&mut self, msg: &Message) -> bool {
        let (Some(_topic), Some(seq), Some(payload), None) =
            (msg.frame(0), msg.frame(1), msg.frame(2), msg.frame(3))
        else {
            self.misframed(msg.frames.len());
            return false;
        };
        let Ok(seq) = <[u8; 8]>::try_from(seq).map(u64::from_be_bytes) else {
            self.misframed(msg.frames.len());
            return false;
        };
        let s = &self.state;
        let next = s.next_seq.load(Ordering::Relaxed).checked_sub(1);
        match next {
            Some(next) if seq < next => {
                s.restarts.fetch_add(1, Ordering::Relaxed);
                s.drop_entries();
            }
            Some(next) if seq > next => {
                s.gaps.fetch_add(1, Ordering::Relaxed);
                if !self.replay(next, seq).await {
                    self.state.drop_entries();
                }
            }
            _ => {}
        }
        self.state
            .next_seq
            .store(seq.saturating_add(2), Ordering::Relaxed);
        self.decode_and_apply(payload)
    }

    /// A message that is not `[topic, seq u64, payload]`.
    fn misframed(&self, frames: usize) {
        self.state.protocol_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = LOG_FRAMES.allow(Instant::now()) {
            tracing::warn!(events = %self.target.events, frames, suppressed, "KV-event message is not [topic, seq, payload]; ignored");
        }
    }

    fn decode_and_apply(&mut self, payload: &[u8]) -> bool {
        match decode_into(payload, &mut self.batch) {
            Ok(()) => {
                self.state.apply(&self.batch);
                if self.batch.unknown_events > 0
                    && let Some(suppressed) = LOG_UNKNOWN.allow(Instant::now())
                {
                    tracing::info!(events = %self.target.events, unknown = self.batch.unknown_events, suppressed, "KV-event batch has event types this picker does not know; skipped them");
                }
                true
            }
            Err(e) => {
                self.state.decode_errors.fetch_add(1, Ordering::Relaxed);
                self.state.drop_entries();
                if let Some(suppressed) = LOG_DECODE.allow(Instant::now()) {
                    tracing::warn!(error = %crate::telemetry::logging::chain(&e), events = %self.target.events, suppressed, "undecodable KV-event batch; this endpoint's entries dropped");
                }
                false
            }
        }
    }

    /// Replays `from..until`; true if every batch in it was applied.
    async fn replay(&mut self, from: u64, until: u64) -> bool {
        let Some(addr) = self.target.replay else {
            return false;
        };
        self.state.replays.fetch_add(1, Ordering::Relaxed);
        let timeout = self.target.handshake_timeout;
        let max = self.target.max_message;
        let mut msg = Message::default();
        let ok = tokio::time::timeout(timeout.saturating_mul(4), async {
            let mut c = Connection::connect(addr, "DEALER", timeout, max)
                .await
                .ok()?;
            c.send(&[b"", &from.to_be_bytes()]).await.ok()?;
            let mut expect = from;
            // Bounded: at most until - from batches are applied, then we hang up.
            while expect < until {
                c.recv(&mut msg).await.ok()?;
                let seq = msg
                    .frame(1)
                    .and_then(|f| <[u8; 8]>::try_from(f).ok())
                    .map(i64::from_be_bytes)?;
                if seq < 0 {
                    return None;
                }
                let seq = seq as u64;
                if seq < expect {
                    continue;
                }
                if seq > expect {
                    return None;
                }
                let payload = msg.frame(2)?.to_vec();
                if !self.decode_and_apply(&payload) {
                    return None;
                }
                expect += 1;
            }
            Some(())
        })
        .await
        .ok()
        .flatten()
        .is_some();
        if !ok {
            self.state.replay_failures.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}
