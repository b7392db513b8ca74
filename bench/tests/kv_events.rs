//! The simulator's KV events against the picker's own decoder and index:
//! real ZeroMQ sockets on 127.0.0.1 (a SUB and a replay DEALER from the
//! `zeromq` crate), payloads through `epp::kv_events::decode_into`, applied
//! to a `BlockIndex`, whose keys must be the ones the picker computes from
//! the prompt's token ids.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use epp::kv_events::{Batch, BlockIndex, Event, block_keys, chain_seed, decode_into};
use epp_bench::load::client::{HttpClient, http_client};
use epp_bench::sim::config::KvEventsEncoding;
use epp_bench::sim::kv_events::KvEventsAddrs;
use epp_bench::sim::tokens::chunk_token_ids;
use epp_bench::sim::{SimConfig, SimFleet, spawn_fleet};
use http_body_util::BodyExt;
use tokio::time::{Instant, timeout};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const BLOCK: usize = 4;
const TOPIC: &str = "kv@sim";
/// Bound of every wait in these tests.
const PATIENCE: Duration = Duration::from_secs(10);

fn sim(encoding: KvEventsEncoding) -> SimConfig {
    SimConfig {
        pods: 1,
        base_port: 0,
        prefill_overhead_ms: 1.0,
        prefill_us_per_token: 1.0,
        itl_ms: 1.0,
        jitter: 0.0,
        block_size: BLOCK,
        kv_blocks: 256,
        lora_adapters: vec!["ad1".into()],
        kv_events_port: Some(0),
        kv_events_replay_port: Some(0),
        kv_events_topic: TOPIC.into(),
        kv_events_encoding: encoding,
        ..SimConfig::default()
    }
}

/// The picker's chain seed for a model (`None`: the base model). The one
/// place to adapt when `chain_seed` gains a cache-salt argument.
fn seed(lora: Option<&str>) -> u64 {
    chain_seed(lora.map(epp::kv_events::lora_key), None)
}

/// The picker's keys for a completion prompt as the pod tokenizes it.
fn keys(prompt: &str, lora: Option<&str>) -> Vec<u64> {
    let mut tokens = Vec::new();
    chunk_token_ids(
        prompt.as_bytes(),
        SimConfig::default().chars_per_token,
        &mut tokens,
    );
    let mut k = Vec::new();
    block_keys(seed(lora), &tokens, BLOCK, &mut k);
    k
}

async fn post(client: &HttpClient, url: &str, path: &str, body: String) -> (u16, Bytes) {
    let req = http::Request::post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap();
    let resp = timeout(PATIENCE, client.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = timeout(PATIENCE, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, body)
}

async fn complete(client: &HttpClient, url: &str, model: &str, prompt: &str) {
    let body = serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 2});
    let (status, text) = post(client, url, "/v1/completions", body.to_string()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&text));
}

/// Batches the pod's publisher has sent so far (its own counter), once it
/// has caught up with the engine.
async fn published(fleet: &SimFleet) -> u64 {
    let pod = &fleet.pods[0].pod;
    let deadline = Instant::now() + PATIENCE;
    while !pod.events_idle() {
        assert!(Instant::now() < deadline, "the publisher never caught up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let page = pod.metrics_page(None).unwrap();
    epp_bench::prom::sum(&page, "vllm_sim_kv_event_batches_published_total")
        .unwrap()
        .unwrap_or(0.0) as u64
}

fn seq_of(frame: &[u8]) -> i64 {
    i64::from_be_bytes(frame.try_into().unwrap())
}

/// Asks the replay socket for everything from `start`: the (seq, payload)
/// answers before the end marker.
async fn replay(addr: SocketAddr, start: u64) -> Vec<(u64, Bytes)> {
    let mut dealer = DealerSocket::new();
    dealer.connect(&format!("tcp://{addr}")).await.unwrap();
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    dealer.send(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        let m = timeout(PATIENCE, dealer.recv()).await.unwrap().unwrap();
        let f = m.into_vecdeque();
        assert_eq!(f.len(), 3, "[\"\", seq, payload]");
        assert!(f[0].is_empty());
        let seq = seq_of(&f[1]);
        if seq == -1 {
            assert!(f[2].is_empty());
            return out;
        }
        out.push((u64::try_from(seq).unwrap(), f[2].clone()));
    }
}

/// A subscriber mirroring one pod's cache the way the picker does.
struct Mirror {
    sub: SubSocket,
    replay: SocketAddr,
    index: BlockIndex,
    batch: Batch,
    next_seq: u64,
    /// Seqs applied, in order (a restart shows as a return to 0).
    seqs: Vec<u64>,
    removed_blocks: usize,
    cleared: usize,
    largest: usize,
}

impl Mirror {
    async fn connect(addrs: KvEventsAddrs) -> Self {
        let mut sub = SubSocket::new();
        sub.connect(&format!("tcp://{}", addrs.events))
            .await
            .unwrap();
        sub.subscribe(TOPIC).await.unwrap();
        Self {
            sub,
            replay: addrs.replay.unwrap(),
            index: BlockIndex::new(1 << 16),
            batch: Batch::default(),
            next_seq: 0,
            seqs: Vec::new(),
            removed_blocks: 0,
            cleared: 0,
            largest: 0,
        }
    }

    fn apply(&mut self, seq: u64, payload: &[u8]) {
        if seq == 0 && self.next_seq > 0 {
            // The publisher restarted: what it held before is gone.
            self.index.clear();
            self.next_seq = 0;
        }
        if seq < self.next_seq {
            return; // Already applied (replayed, then seen live).
        }
        assert_eq!(seq, self.next_seq, "gaps are replayed before applying");
        decode_into(payload, &mut self.batch).unwrap();
        assert_eq!(self.batch.unknown_events, 0);
        for ev in &self.batch.events {
            match ev {
                Event::Removed { hashes, .. } => self.removed_blocks += hashes.len(),
                Event::Cleared => self.cleared += 1,
                Event::Stored { block_size, .. } => assert_eq!(*block_size as usize, BLOCK),
            }
        }
        let applied = self.index.apply(&self.batch);
        assert_eq!(applied.orphans, 0, "every stored block's parent is known");
        self.largest = self.largest.max(self.index.len());
        self.seqs.push(seq);
        self.next_seq = seq + 1;
    }

    /// Applies batches until `next_seq` reaches `target`: live ones from
    /// the SUB socket, and a replay whenever the stream is quiet or skips
    /// (the subscription may start after the first batches).
    async fn sync_to(&mut self, target: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.next_seq < target {
            assert!(Instant::now() < deadline, "stuck at seq {}", self.next_seq);
            match timeout(Duration::from_millis(100), self.sub.recv()).await {
                Ok(m) => {
                    let f = m.unwrap().into_vecdeque();
                    assert_eq!(f.len(), 3);
                    assert_eq!(&f[0][..], TOPIC.as_bytes());
                    let seq = u64::try_from(seq_of(&f[1])).unwrap();
                    if seq > self.next_seq {
                        self.catch_up().await;
                    }
                    self.apply(seq, &f[2]);
                }
                Err(_) => self.catch_up().await,
            }
        }
    }

    async fn catch_up(&mut self) {
        for (seq, payload) in replay(self.replay, self.next_seq).await {
            self.apply(seq, &payload);
        }
    }

    fn cached_blocks(&self, keys: &[u64]) -> usize {
        self.index.longest_prefix(keys).gpu
    }
}

const SYSTEM: &str = "You are a careful assistant. Answer briefly and cite the manual section. ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_blocks_are_indexed_under_the_pickers_keys_in_both_encodings() {
    for encoding in [KvEventsEncoding::Map, KvEventsEncoding::Array] {
        let fleet = spawn_fleet(sim(encoding)).await.unwrap();
        let url = fleet.pods[0].url();
        let client = http_client(2);
        let mut mirror = Mirror::connect(fleet.pods[0].kv_events.unwrap()).await;
        let model = SimConfig::default().model;
        let a = format!("{SYSTEM}Where is the fuse box?");
        let b = format!("{SYSTEM}How do I reset the breaker?");
        complete(&client, &url, &model, &a).await;
        complete(&client, &url, &model, &b).await;
        complete(&client, &url, "ad1", &a).await;
        mirror.sync_to(published(&fleet).await).await;

        let (ka, kb, kl) = (keys(&a, None), keys(&b, None), keys(&a, Some("ad1")));
        assert!(ka.len() > SYSTEM.len() / 4 / BLOCK, "{}", ka.len());
        assert_eq!(mirror.cached_blocks(&ka), ka.len(), "{encoding:?}");
        assert_eq!(mirror.cached_blocks(&kb), kb.len(), "{encoding:?}");
        assert_eq!(mirror.cached_blocks(&kl), kl.len(), "adapter chain");
        // The shared system prompt was stored once: b added only its own
        // blocks, the adapter a chain of its own.
        let shared = ka.iter().zip(&kb).take_while(|(x, y)| x == y).count();
        assert!(shared >= SYSTEM.len() / 4 / BLOCK - 1, "{shared}");
        assert_eq!(
            mirror.index.len(),
            ka.len() + kb.len() - shared + kl.len(),
            "BlockStored only for newly stored blocks"
        );
        assert_eq!(mirror.removed_blocks, 0);

        // vLLM's /reset_prefix_cache empties the cache with AllBlocksCleared.
        let (status, _) = post(&client, &url, "/reset_prefix_cache", String::new()).await;
        assert_eq!(status, 200);
        mirror.sync_to(published(&fleet).await).await;
        assert_eq!(mirror.cleared, 1);
        assert!(mirror.index.is_empty());
        fleet.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_pressure_publishes_every_removal() {
    let kv_blocks = 24;
    let fleet = spawn_fleet(SimConfig {
        kv_blocks,
        ..sim(KvEventsEncoding::Map)
    })
    .await
    .unwrap();
    let url = fleet.pods[0].url();
    let client = http_client(2);
    let mut mirror = Mirror::connect(fleet.pods[0].kv_events.unwrap()).await;
    let model = SimConfig::default().model;
    // 20 distinct prompts of 5 blocks each (100 blocks) through 24 blocks.
    let prompts: Vec<String> = (0..20)
        .map(|i| format!("{i:02} {}", "x".repeat(77)))
        .collect();
    for p in &prompts {
        complete(&client, &url, &model, p).await;
        mirror.sync_to(published(&fleet).await).await;
        assert!(mirror.index.len() <= kv_blocks, "{}", mirror.index.len());
    }
    assert!(
        mirror.removed_blocks >= 100 - kv_blocks,
        "{}",
        mirror.removed_blocks
    );
    assert!(mirror.largest <= kv_blocks, "{}", mirror.largest);
    let last = keys(prompts.last().unwrap(), None);
    assert_eq!(last.len(), 5);
    assert_eq!(
        mirror.cached_blocks(&last),
        5,
        "the newest prompt is cached"
    );
    assert_eq!(
        mirror.cached_blocks(&keys(&prompts[0], None)),
        0,
        "the oldest was evicted and its removal published"
    );
    // Stored minus removed is what the pod holds: nothing runs now, so
    // every cached block is unreferenced and the index matches it exactly.
    assert_eq!(mirror.index.len(), 100 - mirror.removed_blocks);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_empties_the_cache_and_starts_seq_again() {
    let fleet = spawn_fleet(SimConfig {
        itl_ms: 5.0,
        ..sim(KvEventsEncoding::Map)
    })
    .await
    .unwrap();
    let url = fleet.pods[0].url();
    let client = http_client(4);
    let kv = fleet.pods[0].kv_events.unwrap();
    let mut mirror = Mirror::connect(kv).await;
    let model = SimConfig::default().model;
    let before = format!("{SYSTEM}before the restart");
    complete(&client, &url, &model, &before).await;
    complete(
        &client,
        &url,
        &model,
        "another prompt, long enough for blocks",
    )
    .await;
    mirror.sync_to(published(&fleet).await).await;
    assert!(mirror.next_seq >= 2);
    assert_eq!(
        mirror.cached_blocks(&keys(&before, None)),
        keys(&before, None).len()
    );

    // A long stream in flight when the engine restarts fails: its body ends
    // without [DONE].
    let body = serde_json::json!({"model": model, "prompt": "streaming", "max_tokens": 600, "stream": true});
    let stream = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, "/v1/completions", body.to_string()).await }
    });
    let deadline = Instant::now() + PATIENCE;
    while fleet.pods[0].pod.gauges().running == 0 {
        assert!(Instant::now() < deadline, "the stream never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (status, text) = post(&client, &url, "/admin/restart", String::new()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&text));
    assert_eq!(fleet.pods[0].pod.epoch(), 1);
    let (status, streamed) = stream.await.unwrap();
    assert_eq!(status, 200);
    assert!(!streamed.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(fleet.pods[0].pod.gauges().kv_usage, 0.0);

    // The replay buffer went with the old engine.
    assert!(replay(kv.replay.unwrap(), 0).await.is_empty());
    // The next batch, live on the same subscription, has seq 0 again.
    let after = format!("{SYSTEM}after the restart");
    complete(&client, &url, &model, &after).await;
    let m = timeout(PATIENCE, mirror.sub.recv()).await.unwrap().unwrap();
    let f = m.into_vecdeque();
    assert_eq!(seq_of(&f[1]), 0);
    mirror.apply(0, &f[2]);
    assert_eq!(mirror.seqs.last(), Some(&0), "{:?}", mirror.seqs);
    assert_eq!(
        mirror.cached_blocks(&keys(&after, None)),
        keys(&after, None).len()
    );
    assert_eq!(
        mirror.cached_blocks(&keys(&before, None)),
        keys(&after, None)
            .iter()
            .zip(&keys(&before, None))
            .take_while(|(a, b)| a == b)
            .count(),
        "only what the new engine stored again"
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_returns_the_buffered_range_then_minus_one() {
    let fleet = spawn_fleet(SimConfig {
        kv_events_buffer: 3,
        ..sim(KvEventsEncoding::Array)
    })
    .await
    .unwrap();
    let url = fleet.pods[0].url();
    let client = http_client(2);
    let model = SimConfig::default().model;
    for i in 0..5 {
        complete(
            &client,
            &url,
            &model,
            &format!("prompt number {i} with some blocks"),
        )
        .await;
    }
    assert_eq!(published(&fleet).await, 5, "one batch per admission");
    let addr = fleet.pods[0].kv_events.unwrap().replay.unwrap();
    let seqs = |r: &[(u64, Bytes)]| r.iter().map(|(s, _)| *s).collect::<Vec<_>>();
    let all = replay(addr, 0).await;
    assert_eq!(seqs(&all), [2, 3, 4], "only the last 3 batches are kept");
    let mut b = Batch::default();
    for (_, payload) in &all {
        decode_into(payload, &mut b).unwrap();
        assert!(matches!(b.events[0], Event::Stored { .. }));
    }
    assert_eq!(seqs(&replay(addr, 3).await), [3, 4]);
    assert!(replay(addr, 10).await.is_empty());
    fleet.shutdown().await;
}
