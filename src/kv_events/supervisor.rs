//! Starts and stops the KV-event subscriptions as endpoints come and go.
//!
//! The supervisor follows the endpoint store: for every endpoint whose spec
//! carries event settings it runs one [`subscriber::run`] task per
//! data-parallel rank, each feeding its own [`RankState`], and publishes the
//! ranks as the endpoint's [`KvView`]. Endpoints are tracked by `uid`: the
//! store gives an endpoint whose spec changed (event ports included) a new
//! `uid`, so a change is the old endpoint leaving (its tasks stopped, its
//! view cleared, its state dropped with it) and a new one arriving.
//!
//! Each rank's index is bounded by the smaller of the hard maximum and the
//! endpoint's scraped KV-cache size (`num_gpu_blocks`), re-applied on every
//! tick when the scraped value changed. Entries offloaded to CPU count
//! against the same bound, so a pod offloading heavily keeps its newest
//! entries of either tier.
//!
//! Invariants: a view is published only with the ranks of that endpoint's
//! own tasks; no lock is held across an await (the supervisor's state is
//! its own, the rank indexes lock only inside `set_capacity`).
//!
//! [`subscriber::run`]: super::subscriber::run

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

use super::subscriber::{self, RankState, SubscriptionTarget};
use crate::endpoints::{Endpoint, EndpointSet, EndpointStore, KvEventsSpec, KvView};

/// How the supervisor runs its subscriptions.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// Most blocks per rank whatever the endpoint reports.
    pub max_blocks_per_rank: usize,
    pub handshake_timeout: Duration,
    pub max_message: usize,
    /// How often scraped cache sizes are re-applied to the indexes.
    pub capacity_interval: Duration,
}

/// One endpoint's subscriptions.
struct Running {
    endpoint: Weak<Endpoint>,
    ranks: Box<[Arc<RankState>]>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The bound last applied to every rank.
    capacity: usize,
}

impl Running {
    fn stop(self) {
        self.stop.send_replace(true);
        if let Some(e) = self.endpoint.upgrade() {
            e.kv_events.set(None);
        }
        // The tasks end at their next await; aborting as well makes sure a
        // task stuck in a long handshake does not outlive its endpoint.
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Keeps one set of subscriptions per endpoint with event settings.
pub struct Supervisor {
    store: Arc<EndpointStore>,
    settings: SupervisorSettings,
    running: HashMap<u64, Running>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("endpoints", &self.running.len())
            .finish()
    }
}

impl Supervisor {
    pub fn new(store: Arc<EndpointStore>, settings: SupervisorSettings) -> Self {
        Self {
            store,
            settings,
            running: HashMap::new(),
        }
    }

    /// Endpoints with running subscriptions.
    pub fn endpoints(&self) -> usize {
        self.running.len()
    }

    /// Runs until `stop` turns true, then stops every subscription.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        let mut tick = tokio::time::interval(self.settings.capacity_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.reconcile();
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = tick.tick() => {}
                _ = crate::shutdown::requested(&mut stop) => break,
            }
        }
        self.stop_all();
    }

    /// Brings the subscriptions in line with the current endpoint set and
    /// the scraped cache sizes.
    pub fn reconcile(&mut self) {
        let set = self.store.snapshot();
        self.stop_departed(&set);
        for e in set.endpoints() {
            let Some(spec) = &e.spec.kv_events else {
                continue;
            };
            let capacity = self.capacity_of(e);
            match self.running.get_mut(&e.uid) {
                Some(r) => {
                    if r.capacity != capacity {
                        for rank in r.ranks.iter() {
                            rank.set_capacity(capacity);
                        }
                        r.capacity = capacity;
                    }
                }
                None => {
                    let r = self.start(e, spec, capacity);
                    self.running.insert(e.uid, r);
                }
            }
        }
    }

    pub fn stop_all(&mut self) {
        for (_, r) in self.running.drain() {
            r.stop();
        }
    }

    fn stop_departed(&mut self, set: &EndpointSet) {
        if self.running.is_empty() {
            return;
        }
        let live: std::collections::HashSet<u64> = set
            .endpoints()
            .iter()
            .filter(|e| e.spec.kv_events.is_some())
            .map(|e| e.uid)
            .collect();
        let gone: Vec<u64> = self
            .running
            .keys()
            .filter(|uid| !live.contains(uid))
            .copied()
            .collect();
        for uid in gone {
            if let Some(r) = self.running.remove(&uid) {
                r.stop();
            }
        }
    }

    fn capacity_of(&self, e: &Endpoint) -> usize {
        let max = self.settings.max_blocks_per_rank.max(1);
        match usize::try_from(e.metrics.num_blocks()).unwrap_or(usize::MAX) {
            0 => max,
            n => n.min(max),
        }
    }

    fn start(&self, e: &Arc<Endpoint>, spec: &KvEventsSpec, capacity: usize) -> Running {
        let (stop, rx) = watch::channel(false);
        let mut ranks = Vec::with_capacity(usize::from(spec.ranks));
        let mut tasks = Vec::with_capacity(usize::from(spec.ranks));
        for r in 0..spec.ranks {
            let state = Arc::new(RankState::new(capacity));
            let Some(target) = self.target(e, spec, r) else {
                continue;
            };
            tasks.push(tokio::spawn(subscriber::run(
                target,
                Arc::clone(&state),
                rx.clone(),
            )));
            ranks.push(state);
        }
        let ranks: Box<[Arc<RankState>]> = ranks.into();
        e.kv_events.set(Some(Arc::new(KvView {
            ranks: ranks.clone(),
        })));
        tracing::info!(endpoint = %e.name(), port = spec.port, replay_port = ?spec.replay_port,
            ranks = spec.ranks, "subscribing to KV-cache events");
        Running {
            endpoint: Arc::downgrade(e),
            ranks,
            stop,
            tasks,
            capacity,
        }
    }

    /// Rank `r`'s addresses: ports `port + r` and `replay_port + r`
    /// (discovery checked they fit).
    fn target(&self, e: &Endpoint, spec: &KvEventsSpec, r: u16) -> Option<SubscriptionTarget> {
        let ip = e.spec.address;
        Some(SubscriptionTarget {
            events: SocketAddr::new(ip, spec.port.checked_add(r)?),
            replay: match spec.replay_port {
                Some(p) => Some(SocketAddr::new(ip, p.checked_add(r)?)),
                None => None,
            },
            topic: spec.topic.as_bytes().to_vec(),
            handshake_timeout: self.settings.handshake_timeout,
            max_message: self.settings.max_message,
        })
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::Ordering, time::Instant};

    use bytes::Bytes;
    use rmpv::Value;
    use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

    use super::*;
    use crate::endpoints::{EndpointSpec, MetricsSample};

    /// A batch storing `n` chained blocks of 4 tokens (positional encoding).
    fn stored_batch(n: u64) -> Vec<u8> {
        let tokens: Vec<Value> = (0..n * 4).map(Value::from).collect();
        let ev = Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array((1..=n).map(Value::from).collect()),
            Value::Nil,
            Value::Array(tokens),
            Value::from(4),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(
            &mut out,
            &Value::Array(vec![Value::F64(0.0), Value::Array(vec![ev])]),
        )
        .unwrap();
        out
    }

    async fn publisher() -> (PubSocket, u16) {
        let mut socket = PubSocket::new();
        let ep = socket.bind("tcp://127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = ep.to_string().trim_start_matches("tcp://").parse().unwrap();
        (socket, addr.port())
    }

    fn spec(name: &str, port: u16, kv: Option<(u16, Option<u16>)>) -> EndpointSpec {
        EndpointSpec {
            name: name.into(),
            address: [127, 0, 0, 1].into(),
            port,
            labels: Default::default(),
            metrics_port: None,
            kv_events: kv.map(|(port, replay_port)| KvEventsSpec {
                port,
                replay_port,
                topic: String::new(),
                ranks: 1,
            }),
        }
    }

    fn settings() -> SupervisorSettings {
        SupervisorSettings {
            max_blocks_per_rank: 100,
            handshake_timeout: Duration::from_secs(2),
            max_message: 1 << 20,
            capacity_interval: Duration::from_millis(20),
        }
    }

    fn endpoint(store: &EndpointStore, name: &str) -> Arc<Endpoint> {
        store
            .snapshot()
            .endpoints()
            .iter()
            .find(|e| e.name() == name)
            .map(Arc::clone)
            .unwrap()
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Publishes seq 0.. until the rank has applied a batch (a PUB drops
    /// what it sends before the subscription reaches it).
    async fn feed(p: &mut PubSocket, rank: &RankState, payload: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seq = 0u64;
        while rank.batches.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "no batch applied");
            let m = ZmqMessage::try_from(vec![
                Bytes::from_static(b"kv"),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                Bytes::copy_from_slice(payload),
            ])
            .unwrap();
            p.send(m).await.unwrap();
            seq += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn subscriptions_follow_the_endpoints() {
        let (mut pa, port_a) = publisher().await;
        let store = Arc::new(EndpointStore::new(Duration::from_secs(1)));
        store
            .replace(vec![spec("a", 1, Some((port_a, None))), spec("b", 2, None)])
            .unwrap();
        let mut sup = Supervisor::new(Arc::clone(&store), settings());
        sup.reconcile();
        assert_eq!(sup.endpoints(), 1);
        let a = endpoint(&store, "a");
        assert!(
            endpoint(&store, "b").kv_events.view().is_none(),
            "no events configured, no view"
        );
        let view = a.kv_events.view().expect("a's view is published");
        assert_eq!(view.ranks.len(), 1);
        let rank = Arc::clone(&view.ranks[0]);
        feed(&mut pa, &rank, &stored_batch(4)).await;
        assert_eq!(rank.snapshot().blocks, 4);
        assert!(rank.snapshot().connected);

        // The scraped cache size bounds the index once it is known.
        a.record_scrape(
            &MetricsSample {
                num_blocks: 2,
                ..MetricsSample::default()
            },
            Instant::now(),
            store.epoch(),
        );
        sup.reconcile();
        assert_eq!(rank.snapshot().blocks, 2);
        assert_eq!(rank.evicted.load(Ordering::Relaxed), 2);

        // A changed event spec is a new endpoint: the old subscription stops
        // and its view is cleared, the new one starts with fresh state.
        store
            .replace(vec![
                spec("a", 1, Some((port_a, Some(1)))),
                spec("b", 2, None),
            ])
            .unwrap();
        sup.reconcile();
        assert_eq!(sup.endpoints(), 1);
        assert!(
            a.kv_events.view().is_none(),
            "the old endpoint's view is cleared"
        );
        let a2 = endpoint(&store, "a");
        assert_ne!(a2.uid, a.uid);
        let rank2 = Arc::clone(&a2.kv_events.view().unwrap().ranks[0]);
        assert_eq!(rank2.snapshot().blocks, 0);
        drop(view);
        until("the old subscription task to end", || {
            Arc::strong_count(&rank) == 1
        })
        .await;
        feed(&mut pa, &rank2, &stored_batch(3)).await;
        assert_eq!(rank2.snapshot().blocks, 3);

        // Leaving stops it.
        store.replace(vec![spec("b", 2, None)]).unwrap();
        sup.reconcile();
        assert_eq!(sup.endpoints(), 0);
        assert!(a2.kv_events.view().is_none());
        until("the subscription task to end", || {
            Arc::strong_count(&rank2) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn run_reacts_to_changes_and_stops_on_shutdown() {
        let (_pa, port_a) = publisher().await;
        let store = Arc::new(EndpointStore::new(Duration::from_secs(1)));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(Supervisor::new(Arc::clone(&store), settings()).run(rx));
        store
            .replace(vec![spec("a", 1, Some((port_a, None)))])
            .unwrap();
        let a = endpoint(&store, "a");
        until("a's view", || a.kv_events.view().is_some()).await;
        let rank = Arc::clone(&a.kv_events.view().unwrap().ranks[0]);
        until("connected", || rank.snapshot().connected).await;
        tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("supervisor stops on shutdown")
            .unwrap();
        assert!(a.kv_events.view().is_none());
        until("the subscription task to end", || {
            Arc::strong_count(&rank) == 1
        })
        .await;
    }
}
