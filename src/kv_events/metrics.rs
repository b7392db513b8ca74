//! `epp_kv_events_*{name, model_server_pod, rank}`: each subscribed rank's
//! state and counters, copied from its [`RankState`] atomics when /metrics
//! is rendered (the subscriber tasks touch no Prometheus type); and
//! `epp_kv_events_fallback_endpoints{name}`, the pool's event-enabled
//! endpoints the approximate index answers for (`super::readiness`), the
//! one series to alert on when replicas should all see the same caches.
//!
//! Every series is rebuilt at each render from the endpoints that have a
//! view, so an endpoint that left (or was resubscribed, its counters
//! starting again from zero: a counter reset to Prometheus) keeps no stale
//! series. The heap-bytes gauge takes each rank's index lock briefly.
//!
//! [`RankState`]: super::subscriber::RankState

use std::sync::{Arc, atomic::Ordering};

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, core::Collector};

use crate::{
    endpoints::EndpointStore,
    telemetry::{Computed, ComputedMetrics},
};

const LABELS: &[&str] = &["name", "model_server_pod", "rank"];

#[derive(Debug)]
pub struct KvEventsMetrics {
    store: Arc<EndpointStore>,
    pool_name: String,
    connected: IntGaugeVec,
    known: IntGaugeVec,
    last_seq: IntGaugeVec,
    lag: GaugeVec,
    blocks: IntGaugeVec,
    heap_bytes: IntGaugeVec,
    fallback: IntGaugeVec,
    /// In the order of [`COUNTERS`].
    counters: Vec<IntCounterVec>,
}

/// Counter name suffix, help, and how to read it from a rank.
type Read = fn(&super::subscriber::RankState) -> u64;
const COUNTERS: &[(&str, &str, Read)] = &[
    ("batches_total", "Event batches applied.", |s| {
        s.batches.load(Ordering::Relaxed)
    }),
    (
        "block_events_total",
        "Block events (stored and removed blocks) applied.",
        |s| s.block_events.load(Ordering::Relaxed),
    ),
    ("gaps_total", "Sequence gaps seen (missed batches).", |s| {
        s.gaps.load(Ordering::Relaxed)
    }),
    (
        "replays_total",
        "Replays asked of the publisher's replay socket.",
        |s| s.replays.load(Ordering::Relaxed),
    ),
    (
        "replay_failures_total",
        "Replays that did not recover the gap (entries dropped).",
        |s| s.replay_failures.load(Ordering::Relaxed),
    ),
    (
        "restarts_total",
        "Publisher restarts seen (sequence went back; entries dropped).",
        |s| s.restarts.load(Ordering::Relaxed),
    ),
    (
        "decode_errors_total",
        "Batches that could not be decoded (entries dropped).",
        |s| s.decode_errors.load(Ordering::Relaxed),
    ),
    (
        "protocol_errors_total",
        "Malformed ZeroMQ messages, non-ZeroMQ peers, oversized messages.",
        |s| s.protocol_errors.load(Ordering::Relaxed),
    ),
    (
        "unknown_events_total",
        "Events of a type this picker does not know (ignored).",
        |s| s.unknown_events.load(Ordering::Relaxed),
    ),
    (
        "orphan_blocks_total",
        "Stored blocks whose parent is not indexed (not keyable; skipped).",
        |s| s.orphans.load(Ordering::Relaxed),
    ),
    (
        "evicted_blocks_total",
        "Blocks dropped from the index to stay within its bound.",
        |s| s.evicted.load(Ordering::Relaxed),
    ),
];

impl KvEventsMetrics {
    pub fn new(
        store: Arc<EndpointStore>,
        pool_name: &str,
    ) -> Result<Computed<Self>, prometheus::Error> {
        let opts = |n: &str, h: &str| Opts::new(format!("epp_kv_events_{n}"), h);
        let int = |n: &str, h: &str| IntGaugeVec::new(opts(n, h), LABELS);
        Ok(Computed(Self {
            store,
            pool_name: pool_name.to_owned(),
            connected: int("connected", "1 while the event subscription is connected.")?,
            known: int(
                "known",
                "1 while the rank's index is usable (0 before events, after a lost batch or restart).",
            )?,
            last_seq: int("last_seq", "Sequence number of the last batch applied.")?,
            lag: GaugeVec::new(
                opts(
                    "lag_seconds",
                    "Receive time minus the publisher's timestamp of the last batch.",
                ),
                LABELS,
            )?,
            blocks: int("blocks", "Blocks indexed (per medium).")?,
            heap_bytes: int("index_bytes", "Heap bytes held by the rank's block index.")?,
            fallback: IntGaugeVec::new(
                opts(
                    "fallback_endpoints",
                    "Endpoints with KV events configured whose events are not usable (no rank known); the approximate index answers for them.",
                ),
                &["name"],
            )?,
            counters: COUNTERS
                .iter()
                .map(|(n, h, _)| IntCounterVec::new(opts(n, h), LABELS))
                .collect::<Result<_, _>>()?,
        }))
    }
}

impl ComputedMetrics for KvEventsMetrics {
    fn metrics(&self) -> Vec<&dyn Collector> {
        let mut m: Vec<&dyn Collector> = vec![
            &self.connected,
            &self.known,
            &self.last_seq,
            &self.lag,
            &self.blocks,
            &self.heap_bytes,
            &self.fallback,
        ];
        m.extend(self.counters.iter().map(|c| c as &dyn Collector));
        m
    }

    fn refresh(&self) {
        self.connected.reset();
        self.known.reset();
        self.last_seq.reset();
        self.lag.reset();
        self.blocks.reset();
        self.heap_bytes.reset();
        for c in &self.counters {
            c.reset();
        }
        let snapshot = self.store.snapshot();
        let streams = super::readiness::StreamsState::of(&snapshot);
        self.fallback
            .with_label_values(&[self.pool_name.as_str()])
            .set(i64::try_from(streams.fallback).unwrap_or(i64::MAX));
        let mut rank_label = String::new();
        for e in snapshot.endpoints() {
            let Some(view) = e.kv_events.view() else {
                continue;
            };
            for (r, state) in view.ranks.iter().enumerate() {
                rank_label.clear();
                rank_label.push_str(&r.to_string());
                let labels = [self.pool_name.as_str(), e.name(), rank_label.as_str()];
                let s = state.snapshot();
                let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                self.connected
                    .with_label_values(&labels)
                    .set(i64::from(s.connected));
                self.known
                    .with_label_values(&labels)
                    .set(i64::from(s.known));
                if let Some(seq) = s.last_seq {
                    self.last_seq.with_label_values(&labels).set(i(seq));
                }
                self.lag.with_label_values(&labels).set(s.lag.as_secs_f64());
                self.blocks.with_label_values(&labels).set(i(s.blocks));
                self.heap_bytes
                    .with_label_values(&labels)
                    .set(i(state.heap_bytes() as u64));
                for (c, (_, _, read)) in self.counters.iter().zip(COUNTERS) {
                    c.with_label_values(&labels).inc_by(read(state));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus::Registry;

    use super::*;
    use crate::{
        endpoints::{EndpointSpec, KvEventsSpec, KvView},
        kv_events::subscriber::RankState,
        telemetry::render,
    };

    #[test]
    fn series_per_subscribed_rank_and_none_after_leaving() {
        let store = Arc::new(EndpointStore::new(Duration::from_secs(1)));
        let spec = |name: &str, port, kv| EndpointSpec {
            name: name.into(),
            address: [127, 0, 0, 1].into(),
            port,
            labels: Default::default(),
            metrics_port: None,
            kv_events: kv,
        };
        let kv = Some(KvEventsSpec {
            port: 1,
            replay_port: None,
            topic: String::new(),
            ranks: 2,
        });
        store
            .replace(vec![spec("a", 1, kv), spec("b", 2, None)])
            .unwrap();
        let a = Arc::clone(&store.snapshot().endpoints()[0]);
        let ranks: Box<[Arc<RankState>]> =
            vec![Arc::new(RankState::new(10)), Arc::new(RankState::new(10))].into();
        ranks[1].decode_errors.store(3, Ordering::Relaxed);
        ranks[0].connected.store(true, Ordering::Relaxed);
        a.kv_events.set(Some(Arc::new(KvView {
            ranks: ranks.clone(),
        })));
        let r = Registry::new();
        r.register(Box::new(
            KvEventsMetrics::new(Arc::clone(&store), "p").unwrap(),
        ))
        .unwrap();
        let text = render(&r);
        for needle in [
            r#"epp_kv_events_decode_errors_total{model_server_pod="a",name="p",rank="1"} 3"#,
            r#"epp_kv_events_connected{model_server_pod="a",name="p",rank="0"} 1"#,
            r#"epp_kv_events_known{model_server_pod="a",name="p",rank="0"} 0"#,
            r#"epp_kv_events_fallback_endpoints{name="p"} 1"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(!text.contains(r#"model_server_pod="b""#), "{text}");
        ranks[0].known.store(true, Ordering::Release);
        assert!(
            render(&r).contains(r#"epp_kv_events_fallback_endpoints{name="p"} 0"#),
            "one known rank is enough"
        );
        a.kv_events.set(None);
        let text = render(&r);
        assert!(!text.contains(r#"model_server_pod="a""#), "{text}");
    }
}
