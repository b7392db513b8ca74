//! KV-cache events as vLLM publishes them (`vllm/distributed/kv_events.py`),
//! so the picker's subscriber can be tested and benchmarked against pods
//! whose caches really churn.
//!
//! # Wire format
//! - PUB socket, one multipart message per batch: `[topic, seq, payload]`,
//!   `seq` a u64 big-endian counter from 0 per publisher (0 again after a
//!   restart, which is how subscribers detect one).
//! - Payload (msgpack): a batch `[ts, events, data_parallel_rank?]` (the rank
//!   only when `--kv-events-dp-rank` is set). Events in `map` encoding (current
//!   vLLM) are maps with `"type"`; in `array` encoding (vLLM before mid-2026)
//!   positional arrays with the tag first:
//!   `BlockStored {block_hashes, parent_block_hash, token_ids, block_size,
//!   lora_id, medium, lora_name}`, `BlockRemoved {block_hashes, medium}`,
//!   `AllBlocksCleared {}`.
//! - Replay (optional ROUTER): a DEALER sends `["", start_seq u64 BE]` and gets
//!   `["", seq, payload]` for every buffered batch with `seq >= start_seq`,
//!   oldest first, then `["", -1 as i64 BE, ""]`. The buffer keeps the last
//!   `--kv-events-buffer` batches (vLLM's `buffer_steps`).
//!
//! # Flow
//! The engine collects the events of one scheduling pass (its "step": every
//! admission done under one lock) and hands them to [`EventSink::send`],
//! which only `try_send`s on a bounded channel: the engine never waits for
//! the network. A full channel drops the batch and counts it, as vLLM drops
//! past its high-water mark. The publisher task numbers, encodes, sends and
//! buffers batches, and answers replays.
//!
//! Restart: [`EventSink::restart`] bumps an epoch shared with the task; the
//! task then restarts `seq` at 0, empties its replay buffer and discards
//! batches collected before the restart (a crashed vLLM loses them too).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rmp::encode::{self as mp, RmpWrite, ValueWriteError};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::SimError;
use super::config::{KvEventsEncoding, SimConfig};
use super::metrics::KvEventCounters;

/// Batches queued between the engine and the publisher task before new
/// ones are dropped.
const QUEUE_BATCHES: usize = 4096;

/// One KV-cache change, in the engine's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEvent {
    /// Blocks stored anew, consecutive in one prompt: `parent` is the hash
    /// of the block before the first (`None` at the prompt's start),
    /// `tokens` the ids of exactly these blocks.
    Stored {
        parent: Option<u64>,
        hashes: Vec<u64>,
        tokens: Vec<u32>,
        /// Index into the configured LoRA adapters.
        adapter: Option<usize>,
    },
    Removed {
        hashes: Vec<u64>,
    },
    Cleared,
}

struct PendingBatch {
    epoch: u64,
    ts: f64,
    events: Vec<SimEvent>,
}

/// The engine's end: cheap to call under the engine's lock.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<PendingBatch>,
    epoch: Arc<AtomicU64>,
    /// Batches queued, and batches the task has finished with (published,
    /// discarded or failed): equal when the publisher is idle.
    queued: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    /// The publisher's counters, for the pod's page.
    pub counters: KvEventCounters,
}

impl std::fmt::Debug for PendingBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingBatch")
            .field("events", &self.events.len())
            .finish()
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventSink {
    /// Queues one step's events as a batch; drops it (counted) when the
    /// publisher is behind.
    pub fn send(&self, events: Vec<SimEvent>) {
        let batch = PendingBatch {
            epoch: self.epoch.load(Ordering::Acquire),
            ts: unix_seconds(),
            events,
        };
        if self.tx.try_send(batch).is_ok() {
            self.queued.fetch_add(1, Ordering::AcqRel);
        } else {
            self.counters.dropped.inc();
        }
    }

    /// The engine restarted: `seq` starts again at 0 with an empty replay
    /// buffer, and batches queued before now are never published.
    pub fn restart(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether every queued batch has been handled (for tests and benches
    /// that must see a step's events before they look).
    pub fn idle(&self) -> bool {
        self.done.load(Ordering::Acquire) >= self.queued.load(Ordering::Acquire)
    }
}

/// Where a pod's publisher listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvEventsAddrs {
    pub events: SocketAddr,
    pub replay: Option<SocketAddr>,
}

/// Encodes batches in one of the two shapes.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub encoding: KvEventsEncoding,
    pub block_size: u32,
    pub dp_rank: Option<u32>,
    /// LoRA adapter names, indexed like the configured adapters.
    pub adapters: Arc<Vec<String>>,
}

type WriteError = ValueWriteError<<Vec<u8> as RmpWrite>::Error>;

fn nil(out: &mut Vec<u8>) -> Result<(), WriteError> {
    mp::write_nil(out).map_err(ValueWriteError::InvalidMarkerWrite)
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn u64s(out: &mut Vec<u8>, xs: &[u64]) -> Result<(), WriteError> {
    mp::write_array_len(out, len32(xs.len()))?;
    for &x in xs {
        mp::write_uint(out, x)?;
    }
    Ok(())
}

impl Encoder {
    pub fn new(cfg: &SimConfig) -> Self {
        Self {
            encoding: cfg.kv_events_encoding,
            block_size: len32(cfg.block_size),
            dp_rank: cfg.kv_events_dp_rank,
            adapters: Arc::new(cfg.lora_adapters.clone()),
        }
    }

    /// The msgpack payload of one batch, appended to `out`.
    pub fn encode(&self, ts: f64, events: &[SimEvent], out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail; the Result is the encoder API's.
        if let Err(e) = self.try_encode(ts, events, out) {
            tracing::error!(error = %e, "encoding a KV-event batch");
        }
    }

    fn try_encode(
        &self,
        ts: f64,
        events: &[SimEvent],
        out: &mut Vec<u8>,
    ) -> Result<(), WriteError> {
        mp::write_array_len(out, if self.dp_rank.is_some() { 3 } else { 2 })?;
        mp::write_f64(out, ts)?;
        mp::write_array_len(out, len32(events.len()))?;
        for ev in events {
            self.event(ev, out)?;
        }
        if let Some(r) = self.dp_rank {
            mp::write_uint(out, u64::from(r))?;
        }
        Ok(())
    }

    /// Writes a field name in map encoding (nothing in array encoding).
    fn key(&self, out: &mut Vec<u8>, name: &str) -> Result<(), WriteError> {
        if self.encoding == KvEventsEncoding::Map {
            mp::write_str(out, name)?;
        }
        Ok(())
    }

    /// Starts an event of `fields` fields (the tag not counted).
    fn head(&self, out: &mut Vec<u8>, tag: &str, fields: u32) -> Result<(), WriteError> {
        match self.encoding {
            KvEventsEncoding::Map => {
                mp::write_map_len(out, fields + 1)?;
                mp::write_str(out, "type")?;
            }
            KvEventsEncoding::Array => {
                mp::write_array_len(out, fields + 1)?;
            }
        }
        mp::write_str(out, tag)?;
        Ok(())
    }

    fn event(&self, ev: &SimEvent, out: &mut Vec<u8>) -> Result<(), WriteError> {
        match ev {
            SimEvent::Stored {
                parent,
                hashes,
                tokens,
                adapter,
            } => {
                self.head(out, "BlockStored", 7)?;
                self.key(out, "block_hashes")?;
                u64s(out, hashes)?;
                self.key(out, "parent_block_hash")?;
                match parent {
                    Some(p) => {
                        mp::write_uint(out, *p)?;
                    }
                    None => nil(out)?,
                }
                self.key(out, "token_ids")?;
                mp::write_array_len(out, len32(tokens.len()))?;
                for &t in tokens {
                    mp::write_uint(out, u64::from(t))?;
                }
                self.key(out, "block_size")?;
                mp::write_uint(out, u64::from(self.block_size))?;
                // lora_id is deprecated in vLLM; lora_name identifies the adapter.
                self.key(out, "lora_id")?;
                nil(out)?;
                self.key(out, "medium")?;
                mp::write_str(out, "GPU")?;
                self.key(out, "lora_name")?;
                match adapter.and_then(|a| self.adapters.get(a)) {
                    Some(name) => mp::write_str(out, name)?,
                    None => nil(out)?,
                }
            }
            SimEvent::Removed { hashes } => {
                self.head(out, "BlockRemoved", 2)?;
                self.key(out, "block_hashes")?;
                u64s(out, hashes)?;
                self.key(out, "medium")?;
                mp::write_str(out, "GPU")?;
            }
            SimEvent::Cleared => self.head(out, "AllBlocksCleared", 0)?,
        }
        Ok(())
    }
}

/// `tcp://host:port` for `port`, or port + `index` when a fixed base port is
/// given (pods of one process on consecutive ports).
fn endpoint(host: &str, base: u16, index: usize) -> String {
    let port = if base == 0 {
        0
    } else {
        u32::from(base) + u32::try_from(index).unwrap_or(u32::MAX)
    };
    if host.contains(':') {
        format!("tcp://[{host}]:{port}")
    } else {
        format!("tcp://{host}:{port}")
    }
}

fn bound_addr(ep: &zeromq::Endpoint, asked: &str) -> Result<SocketAddr, SimError> {
    ep.to_string()
        .trim_start_matches("tcp://")
        .parse()
        .map_err(|_| SimError::Config(format!("{asked}: bound to {ep}, not a TCP address")))
}

/// Binds pod `index`'s PUB (and replay ROUTER, when configured) sockets and
/// starts its publisher task. `None` when events are off.
pub async fn start(
    cfg: &SimConfig,
    index: usize,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<(EventSink, KvEventsAddrs, JoinHandle<()>)>, SimError> {
    let Some(port) = cfg.kv_events_port else {
        return Ok(None);
    };
    let bind_err = |addr: &str, e: zeromq::ZmqError| SimError::Bind {
        addr: addr.to_owned(),
        source: std::io::Error::other(e),
    };
    let ep = endpoint(&cfg.host, port, index);
    let mut publisher = PubSocket::new();
    let bound = publisher.bind(&ep).await.map_err(|e| bind_err(&ep, e))?;
    let events = bound_addr(&bound, &ep)?;
    let (router, replay) = match cfg.kv_events_replay_port {
        Some(rport) => {
            let rep = endpoint(&cfg.host, rport, index);
            let mut router = RouterSocket::new();
            let bound = router.bind(&rep).await.map_err(|e| bind_err(&rep, e))?;
            let addr = bound_addr(&bound, &rep)?;
            (Some(router), Some(addr))
        }
        None => (None, None),
    };
    let counters = KvEventCounters::new(&cfg.model).map_err(SimError::Metrics)?;
    let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
    let epoch = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let task = Task {
        publisher,
        router,
        rx,
        epoch: Arc::clone(&epoch),
        done: Arc::clone(&done),
        current_epoch: 0,
        seq: 0,
        buffer: VecDeque::new(),
        buffer_cap: cfg.kv_events_buffer,
        topic: Bytes::from(cfg.kv_events_topic.clone().into_bytes()),
        encoder: Encoder::new(cfg),
        counters: counters.clone(),
    };
    let handle = tokio::spawn(task.run(shutdown));
    Ok(Some((
        EventSink {
            tx,
            epoch,
            queued: Arc::new(AtomicU64::new(0)),
            done,
            counters,
        },
        KvEventsAddrs { events, replay },
        handle,
    )))
}

struct Task {
    publisher: PubSocket,
    router: Option<RouterSocket>,
    rx: mpsc::Receiver<PendingBatch>,
    epoch: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    current_epoch: u64,
    seq: u64,
    buffer: VecDeque<(u64, Bytes)>,
    buffer_cap: usize,
    topic: Bytes,
    encoder: Encoder,
    counters: KvEventCounters,
}

async fn recv_replay(router: &mut Option<RouterSocket>) -> Option<ZmqMessage> {
    match router {
        Some(r) => r.recv().await.ok(),
        None => std::future::pending().await,
    }
}

impl Task {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                batch = self.rx.recv() => match batch {
                    Some(b) => {
                        self.publish(b).await;
                        self.done.fetch_add(1, Ordering::AcqRel);
                    }
                    None => return,
                },
                req = recv_replay(&mut self.router) => {
                    if let Some(req) = req {
                        self.replay(req).await;
                    }
                }
            }
        }
    }

    /// Applies a restart the engine announced since the last look.
    fn sync_epoch(&mut self) {
        let now = self.epoch.load(Ordering::Acquire);
        if now != self.current_epoch {
            self.current_epoch = now;
            self.seq = 0;
            self.buffer.clear();
        }
    }

    async fn publish(&mut self, b: PendingBatch) {
        self.sync_epoch();
        if b.epoch != self.current_epoch {
            return; // Collected before a restart.
        }
        let mut payload = Vec::with_capacity(64 + b.events.len() * 32);
        self.encoder.encode(b.ts, &b.events, &mut payload);
        let payload = Bytes::from(payload);
        let seq = self.seq;
        self.seq += 1;
        let frames = vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload.clone(),
        ];
        if let Ok(m) = ZmqMessage::try_from(frames) {
            match self.publisher.send(m).await {
                Ok(()) => self.counters.published.inc(),
                Err(e) => {
                    self.counters.dropped.inc();
                    tracing::debug!(error = %e, "publishing a KV-event batch");
                }
            }
        }
        if self.buffer_cap > 0 {
            if self.buffer.len() >= self.buffer_cap {
                self.buffer.pop_front();
            }
            self.buffer.push_back((seq, payload));
        }
    }

    /// Answers `[id, "", start_seq]` with the buffered batches from
    /// `start_seq` on, then the end marker.
    async fn replay(&mut self, req: ZmqMessage) {
        self.sync_epoch();
        let frames = req.into_vecdeque();
        let start = match (frames.front(), frames.get(1), frames.get(2), frames.len()) {
            (Some(id), Some(empty), Some(seq), 3) if empty.is_empty() => {
                <[u8; 8]>::try_from(seq.as_ref())
                    .ok()
                    .map(|b| (id.clone(), u64::from_be_bytes(b)))
            }
            _ => None,
        };
        let Some((id, start)) = start else {
            self.counters.bad_requests.inc();
            return;
        };
        self.counters.replayed.inc();
        let Some(router) = self.router.as_mut() else {
            return;
        };
        let first = self.buffer.partition_point(|(s, _)| *s < start);
        for (seq, payload) in self.buffer.range(first..) {
            let m = ZmqMessage::try_from(vec![
                id.clone(),
                Bytes::new(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload.clone(),
            ]);
            if let Ok(m) = m
                && router.send(m).await.is_err()
            {
                return; // The requester left.
            }
        }
        let end = ZmqMessage::try_from(vec![
            id,
            Bytes::new(),
            Bytes::copy_from_slice(&(-1i64).to_be_bytes()),
            Bytes::new(),
        ]);
        if let Ok(m) = end {
            let _ = router.send(m).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use epp::kv_events::{Batch, Event, Medium, decode_into};

    use super::*;

    fn encoder(encoding: KvEventsEncoding, dp_rank: Option<u32>) -> Encoder {
        Encoder {
            encoding,
            block_size: 2,
            dp_rank,
            adapters: Arc::new(vec!["ad".into()]),
        }
    }

    #[test]
    fn both_encodings_decode_to_the_same_batch() {
        let events = [
            SimEvent::Removed { hashes: vec![9] },
            SimEvent::Stored {
                parent: None,
                hashes: vec![1, u64::MAX],
                tokens: vec![10, 11, 12, 13],
                adapter: None,
            },
            SimEvent::Stored {
                parent: Some(u64::MAX),
                hashes: vec![3],
                tokens: vec![14, 15],
                adapter: Some(0),
            },
            SimEvent::Cleared,
        ];
        let mut decoded = Vec::new();
        for (enc, rank) in [
            (KvEventsEncoding::Map, None),
            (KvEventsEncoding::Array, Some(3)),
        ] {
            let mut payload = Vec::new();
            encoder(enc, rank).encode(12.5, &events, &mut payload);
            let mut b = Batch::default();
            decode_into(&payload, &mut b).unwrap();
            assert_eq!(b.ts, 12.5);
            assert_eq!(b.data_parallel_rank, rank);
            assert_eq!(b.unknown_events, 0);
            b.data_parallel_rank = None;
            decoded.push(b);
        }
        assert_eq!(decoded[0], decoded[1]);
        let b = &decoded[0];
        assert_eq!(b.hashes, [9, 1, u64::MAX, 3]);
        assert_eq!(b.tokens, [10, 11, 12, 13, 14, 15]);
        assert!(matches!(
            b.events[1],
            Event::Stored {
                parent: None,
                block_size: 2,
                medium: Medium::Gpu,
                lora: None,
                ..
            }
        ));
        assert!(matches!(
            b.events[2],
            Event::Stored { parent: Some(u64::MAX), lora: Some(l), .. }
                if l == xxhash_rust::xxh3::xxh3_64(b"ad")
        ));
        assert_eq!(b.events[3], Event::Cleared);
    }

    #[test]
    fn endpoints_follow_the_pod_index() {
        assert_eq!(endpoint("127.0.0.1", 5557, 2), "tcp://127.0.0.1:5559");
        assert_eq!(endpoint("0.0.0.0", 0, 2), "tcp://0.0.0.0:0");
        assert_eq!(endpoint("::1", 5557, 0), "tcp://[::1]:5557");
    }
}
