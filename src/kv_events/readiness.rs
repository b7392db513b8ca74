//! What the event streams mean for readiness, and which endpoints are
//! served by the approximate index instead of their events.
//!
//! Several active replicas route alike only if each holds the same view of
//! the caches, so a replica that has just started should not take traffic
//! before its subscriptions have connected: with an empty view it would
//! score every endpoint as cold while its peers know better. But one pod
//! whose publisher is down (misconfigured, restarting, an old vLLM without
//! events) must not keep every replica unready, which would take the whole
//! picker tier out of the path; for such a pod the approximate index
//! answers, as it does for any endpoint whose events are unknown. Hence:
//!
//! - the gate is passed once every event-enabled endpoint has a view and
//!   every rank of it has connected at least once, or once `timeout` has
//!   passed since the pool was first synced, whichever comes first;
//! - the gate is latched: once passed, streams never make the replica
//!   unready again (a stream that drops, or a pod that joins later and never
//!   connects, is covered by the fallback, visible per endpoint in
//!   `Admin.ListEndpoints` and in `epp_kv_events_fallback_endpoints`).
//!
//! An endpoint is "on the fallback" while none of its ranks is known
//! (before its first batch, after a gap, a restart or an undecodable
//! batch): `scheduling::precise` then asks the approximate index for it.

use std::time::{Duration, Instant};

use crate::endpoints::{Endpoint, EndpointSet};

/// Event-stream state of the pool at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamsState {
    /// Endpoints with event settings.
    pub endpoints: usize,
    /// Of those, endpoints with a rank that has never connected (or not
    /// subscribed yet).
    pub never_connected: usize,
    /// Of those, endpoints for which the approximate index answers.
    pub fallback: usize,
}

impl StreamsState {
    pub fn of(set: &EndpointSet) -> Self {
        let mut s = Self::default();
        for e in set.endpoints() {
            if e.spec.kv_events.is_none() {
                continue;
            }
            s.endpoints += 1;
            if !ever_connected(e) {
                s.never_connected += 1;
            }
            if on_fallback(e) {
                s.fallback += 1;
            }
        }
        s
    }
}

/// Whether every rank of `e` has connected at least once (false before the
/// supervisor has subscribed it).
pub fn ever_connected(e: &Endpoint) -> bool {
    e.kv_events.view().is_some_and(|v| {
        v.ranks
            .iter()
            .all(|r| r.ever_connected.load(std::sync::atomic::Ordering::Relaxed))
    })
}

/// Whether the approximate index answers for `e` although it has event
/// settings: no rank is known.
pub fn on_fallback(e: &Endpoint) -> bool {
    e.spec.kv_events.is_some()
        && e.kv_events.view().is_none_or(|v| {
            !v.ranks
                .iter()
                .any(|r| r.known.load(std::sync::atomic::Ordering::Acquire))
        })
}

/// The startup gate on the event streams (see the module header).
#[derive(Debug, Clone)]
pub struct StreamsGate {
    timeout: Duration,
    synced_at: Option<Instant>,
    passed: bool,
}

impl StreamsGate {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            synced_at: None,
            passed: false,
        }
    }

    /// Whether the gate is passed, given the pool's state now; `synced` is
    /// whether discovery has delivered its first complete set.
    pub fn check(&mut self, synced: bool, set: &EndpointSet, now: Instant) -> bool {
        if self.passed {
            return true;
        }
        if !synced {
            return false;
        }
        let since = *self.synced_at.get_or_insert(now);
        let state = StreamsState::of(set);
        if state.never_connected == 0 || now.duration_since(since) >= self.timeout {
            if state.never_connected > 0 {
                tracing::warn!(
                    endpoints = state.never_connected,
                    timeout = ?self.timeout,
                    "KV-event streams not connected yet; ready anyway, the approximate index serves those endpoints"
                );
            }
            self.passed = true;
        }
        self.passed
    }

    /// When to check again while not passed (the streams connect on their
    /// own thread, with no notification to wait on).
    pub fn recheck_in(&self) -> Option<Duration> {
        (!self.passed).then_some(Duration::from_millis(100))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::Ordering};

    use super::*;
    use crate::{
        endpoints::{EndpointSpec, EndpointStore, KvEventsSpec, KvView},
        kv_events::subscriber::RankState,
    };

    fn store(kv: &[bool]) -> Arc<EndpointStore> {
        let store = Arc::new(EndpointStore::new(Duration::from_secs(1)));
        let specs = kv
            .iter()
            .enumerate()
            .map(|(i, &kv)| EndpointSpec {
                name: format!("e{i}"),
                address: [127, 0, 0, 1].into(),
                port: 8000 + i as u16,
                labels: Default::default(),
                metrics_port: None,
                kv_events: kv.then(|| KvEventsSpec {
                    port: 5557,
                    replay_port: None,
                    topic: String::new(),
                    ranks: 2,
                }),
            })
            .collect();
        store.replace(specs).unwrap();
        store
    }

    /// Publishes a view of two fresh ranks for endpoint `i`.
    fn subscribe(store: &EndpointStore, i: usize) -> Box<[Arc<RankState>]> {
        let ranks: Box<[Arc<RankState>]> =
            vec![Arc::new(RankState::new(10)), Arc::new(RankState::new(10))].into();
        store.snapshot().endpoints()[i]
            .kv_events
            .set(Some(Arc::new(KvView {
                ranks: ranks.clone(),
            })));
        ranks
    }

    #[test]
    fn the_gate_waits_for_every_rank_to_connect_once_then_stays_open() {
        let store = store(&[true, false, true]);
        let t0 = Instant::now();
        let mut gate = StreamsGate::new(Duration::from_secs(10));
        assert!(!gate.check(false, &store.snapshot(), t0), "not synced");
        assert!(
            !gate.check(true, &store.snapshot(), t0),
            "no subscription yet: pending, not vacuously ready"
        );
        let a = subscribe(&store, 0);
        let c = subscribe(&store, 2);
        a[0].ever_connected.store(true, Ordering::Relaxed);
        a[1].ever_connected.store(true, Ordering::Relaxed);
        c[0].ever_connected.store(true, Ordering::Relaxed);
        let state = StreamsState::of(&store.snapshot());
        assert_eq!(
            state,
            StreamsState {
                endpoints: 2,
                never_connected: 1,
                fallback: 2
            }
        );
        assert!(
            !gate.check(true, &store.snapshot(), t0),
            "c's rank 1 pending"
        );
        assert!(gate.recheck_in().is_some());
        c[1].ever_connected.store(true, Ordering::Relaxed);
        assert!(gate.check(true, &store.snapshot(), t0));
        assert!(gate.recheck_in().is_none());

        // Latched: a stream that drops, even a whole endpoint's view gone,
        // does not undo it.
        store.snapshot().endpoints()[0].kv_events.set(None);
        assert!(gate.check(true, &store.snapshot(), t0));
    }

    #[test]
    fn a_stream_that_never_connects_delays_readiness_only_up_to_the_timeout() {
        let store = store(&[true]);
        let _ranks = subscribe(&store, 0);
        let t0 = Instant::now();
        let mut gate = StreamsGate::new(Duration::from_secs(10));
        assert!(!gate.check(true, &store.snapshot(), t0));
        assert!(!gate.check(true, &store.snapshot(), t0 + Duration::from_secs(9)));
        assert!(gate.check(true, &store.snapshot(), t0 + Duration::from_secs(10)));
        assert_eq!(StreamsState::of(&store.snapshot()).fallback, 1);
    }

    #[test]
    fn the_timeout_counts_from_the_first_sync() {
        let store = store(&[true]);
        let t0 = Instant::now();
        let mut gate = StreamsGate::new(Duration::from_secs(10));
        assert!(!gate.check(false, &store.snapshot(), t0));
        let t1 = t0 + Duration::from_secs(30);
        assert!(!gate.check(true, &store.snapshot(), t1), "synced just now");
        assert!(gate.check(true, &store.snapshot(), t1 + Duration::from_secs(10)));
    }

    #[test]
    fn an_endpoint_is_on_the_fallback_until_one_rank_is_known() {
        let store = store(&[true, false]);
        let e = Arc::clone(&store.snapshot().endpoints()[0]);
        assert!(on_fallback(&e), "not subscribed yet");
        let ranks = subscribe(&store, 0);
        assert!(on_fallback(&e), "subscribed, nothing applied");
        ranks[1].known.store(true, Ordering::Release);
        assert!(!on_fallback(&e));
        assert!(
            !on_fallback(&store.snapshot().endpoints()[1]),
            "no events configured: not a fallback, simply approximate"
        );
        let none = self::store(&[false, false]);
        let no_events = StreamsState::of(&none.snapshot());
        assert_eq!(no_events, StreamsState::default());
    }
}
