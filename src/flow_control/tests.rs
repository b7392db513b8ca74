//! The controller with a pool whose room the test sets.

use std::{
    sync::atomic::AtomicU32,
    task::{Poll, Waker},
};

use super::*;

/// A pool of `slots` that the test fills and frees.
#[derive(Debug, Default)]
struct Slots {
    slots: AtomicU32,
    used: AtomicU32,
}

impl Capacity for Slots {
    fn saturation(&self) -> f64 {
        let slots = self.slots.load(AtomicOrdering::Acquire);
        if slots == 0 {
            return 1.0;
        }
        f64::from(self.used.load(AtomicOrdering::Acquire)) / f64::from(slots)
    }
}

fn controller(text: &str, slots: u32) -> (Arc<FlowController>, Arc<Slots>, Registry) {
    let cfg = crate::config::EndpointPickerConfig::parse(text).unwrap();
    let settings = FlowControlSettings::from_config(&cfg).unwrap().unwrap();
    let pool = Arc::new(Slots {
        slots: AtomicU32::new(slots),
        used: AtomicU32::new(0),
    });
    let registry = Registry::new();
    let ctl = FlowController::new(settings, pool.clone(), &registry, "pool").unwrap();
    (ctl, pool, registry)
}

fn req(fairness_id: Option<&str>, priority: i32) -> FlowRequest<'_> {
    FlowRequest {
        fairness_id,
        priority,
        bytes: 100,
    }
}

fn poll(w: &mut Waiting) -> Poll<Result<Dispatched, Rejection>> {
    w.poll_dispatch(&mut Context::from_waker(Waker::noop()))
}

fn wait(a: Admission) -> Waiting {
    match a {
        Admission::Wait(w) => w,
        other => panic!("expected to wait, got {other:?}"),
    }
}

fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| {
            if name.ends_with("_seconds") {
                m.get_histogram().get_sample_count() as f64
            } else {
                m.get_gauge().get_value()
            }
        })
        .sum()
}

const GATE: &str = "featureGates: [flowControl]\n";

#[test]
fn goes_at_once_while_the_pool_has_room() {
    let (ctl, _, registry) = controller(GATE, 1);
    assert!(matches!(ctl.admit(&req(None, 0)), Admission::Go));
    assert_eq!(ctl.queued(), 0);
    assert_eq!(
        metric(
            &registry,
            "inference_extension_flow_control_request_queue_duration_seconds",
            &[("outcome", "Dispatched"), ("fairness_id", DEFAULT_FLOW)]
        ),
        1.0
    );
}

#[test]
fn a_critical_request_is_dispatched_before_earlier_sheddable_ones() {
    let (ctl, pool, registry) = controller(GATE, 1);
    pool.used.store(1, AtomicOrdering::Release);
    let mut sheddable: Vec<Waiting> = (0..3).map(|_| wait(ctl.admit(&req(None, -1)))).collect();
    let mut critical = wait(ctl.admit(&req(Some("gold"), 10)));
    assert_eq!(ctl.queued(), 4);
    assert_eq!(
        metric(
            &registry,
            "inference_extension_flow_control_queue_size",
            &[("priority", "-1")]
        ),
        3.0
    );
    assert!(poll(&mut critical).is_pending());
    // The running request ends: its ticket's hook kicks the queue.
    pool.used.store(0, AtomicOrdering::Release);
    drop(ctl.release_hook());
    let Poll::Ready(Ok(token)) = poll(&mut critical) else {
        panic!("the critical request goes first");
    };
    assert!(sheddable.iter_mut().all(|w| poll(w).is_pending()));
    // Scheduled: the pool fills again; dropping the token dispatches none.
    pool.used.store(1, AtomicOrdering::Release);
    drop(token);
    assert!(sheddable.iter_mut().all(|w| poll(w).is_pending()));
    assert_eq!(ctl.queued(), 3);
    // Room again: the sheddable ones go in arrival order, one at a time:
    // the next is dispatched only once the previous token is dropped.
    pool.used.store(0, AtomicOrdering::Release);
    ctl.kick();
    for i in 0..3 {
        let Poll::Ready(Ok(token)) = poll(&mut sheddable[i]) else {
            panic!("request {i} is next");
        };
        assert!(sheddable[i + 1..].iter_mut().all(|w| poll(w).is_pending()));
        drop(token);
    }
    assert_eq!(ctl.queued(), 0);
    assert_eq!(
        metric(
            &registry,
            "inference_extension_flow_control_queue_size",
            &[]
        ),
        0.0
    );
}

#[test]
fn a_dropped_waiter_frees_its_place_at_once() {
    let (ctl, pool, registry) = controller(
        "featureGates: [flowControl]\nflowControl: {maxRequests: 1}\n",
        1,
    );
    pool.used.store(1, AtomicOrdering::Release);
    let first = wait(ctl.admit(&req(None, 0)));
    assert!(matches!(
        ctl.admit(&req(None, 0)),
        Admission::Reject(Rejection::QueueFull)
    ));
    drop(first);
    assert_eq!(ctl.queued(), 0);
    let _second = wait(ctl.admit(&req(None, 0)));
    assert_eq!(
        metric(
            &registry,
            "inference_extension_flow_control_request_queue_duration_seconds",
            &[("outcome", "EvictedContextCancelled")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &registry,
            "inference_extension_flow_control_request_queue_duration_seconds",
            &[("outcome", "RejectedCapacity")]
        ),
        1.0
    );
}

#[test]
fn a_token_whose_waiter_left_passes_the_room_on() {
    let (ctl, pool, _) = controller(GATE, 1);
    pool.used.store(1, AtomicOrdering::Release);
    let gone = wait(ctl.admit(&req(None, 5)));
    let mut next = wait(ctl.admit(&req(None, 0)));
    pool.used.store(0, AtomicOrdering::Release);
    // Dispatched while nobody polls it, then the client leaves: the token
    // in the channel is released and the next request is dispatched.
    ctl.kick();
    assert_eq!(ctl.queued(), 1);
    drop(gone);
    assert!(matches!(poll(&mut next), Poll::Ready(Ok(_))));
    assert_eq!(ctl.in_transit.load(AtomicOrdering::Acquire), 0);
}

#[tokio::test(start_paused = true)]
async fn the_ttl_evicts_with_503() {
    let (ctl, pool, registry) = controller(
        "featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 2s, gatewayMaxMessageTimeout: 60s}\n",
        1,
    );
    pool.used.store(1, AtomicOrdering::Release);
    let mut w = wait(ctl.admit(&req(None, 0)));
    let timeout = w.gateway_timeout().unwrap();
    assert!(
        timeout > Duration::from_secs(2) && timeout <= Duration::from_secs(3),
        "{timeout:?}"
    );
    let r = std::future::poll_fn(|cx| w.poll_dispatch(cx)).await;
    let e = r.unwrap_err();
    assert_eq!((e, e.http_status()), (Rejection::TtlExpired, 503));
    assert_eq!(ctl.queued(), 0);
    assert_eq!(
        metric(
            &registry,
            "inference_extension_flow_control_request_queue_duration_seconds",
            &[("outcome", "EvictedTTL")]
        ),
        1.0
    );
}

#[test]
fn fairness_ids_are_bounded_in_length_and_labels() {
    let long = "x".repeat(1000);
    assert_eq!(fairness_id(Some(&long)).len(), MAX_FAIRNESS_ID_BYTES);
    assert_eq!(fairness_id(Some("  ")), DEFAULT_FLOW);
    let (ctl, pool, registry) = controller(GATE, 1);
    pool.used.store(1, AtomicOrdering::Release);
    let waiting: Vec<Waiting> = (0..300)
        .map(|i| wait(ctl.admit(&req(Some(&format!("tenant-{i}")), 0))))
        .collect();
    let series = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "inference_extension_flow_control_queue_size")
        .map(|f| f.get_metric().len())
        .sum::<usize>();
    assert_eq!(series, MAX_FAIRNESS_LABELS + 1, "the bound and `other`");
    drop(waiting);
    assert_eq!(ctl.queued(), 0);
}

#[test]
fn dispatch_headroom_lets_only_its_band_past_saturation() {
    let (ctl, pool, _) = controller(
        "featureGates: [flowControl]\nflowControl:\n  priorityBands:\n  - {priority: 10, dispatchHeadroom: 0.2}\n",
        10,
    );
    pool.used.store(10, AtomicOrdering::Release);
    let mut standard = wait(ctl.admit(&req(Some("a"), 0)));
    assert!(
        poll(&mut standard).is_pending(),
        "full for the default band"
    );
    // Saturation 1.0 < 1.2: the critical request overtakes and goes.
    let mut critical = wait(ctl.admit(&req(Some("b"), 10)));
    let Poll::Ready(Ok(token)) = poll(&mut critical) else {
        panic!("the headroom band is dispatched past saturation");
    };
    pool.used.store(11, AtomicOrdering::Release);
    drop(token);
    assert!(poll(&mut standard).is_pending());
    // 1.2 and above: full for every band.
    pool.used.store(12, AtomicOrdering::Release);
    let mut second = wait(ctl.admit(&req(Some("b"), 10)));
    assert!(poll(&mut second).is_pending());
    // Room below 1 again: strict priority, the critical request first.
    pool.used.store(9, AtomicOrdering::Release);
    ctl.kick();
    let Poll::Ready(Ok(token)) = poll(&mut second) else {
        panic!("the critical request goes first");
    };
    assert!(poll(&mut standard).is_pending(), "one in transit at a time");
    drop(token);
    assert!(matches!(poll(&mut standard), Poll::Ready(Ok(_))));
}

#[test]
fn negative_headroom_stops_its_band_short_of_saturation() {
    let (ctl, pool, _) = controller(
        "featureGates: [flowControl]\nflowControl:\n  priorityBands:\n  - {priority: 10}\n  - {priority: 0, dispatchHeadroom: -0.2}\n",
        10,
    );
    // 0.7 < 0.8: a standard request still skips the queue.
    pool.used.store(7, AtomicOrdering::Release);
    assert!(matches!(ctl.admit(&req(Some("a"), 0)), Admission::Go));
    // 0.8: the standard band is full, the critical band is not.
    pool.used.store(8, AtomicOrdering::Release);
    let mut standard = wait(ctl.admit(&req(Some("a"), 0)));
    assert!(poll(&mut standard).is_pending(), "held back at 0.8");
    let mut critical = wait(ctl.admit(&req(Some("b"), 10)));
    let Poll::Ready(Ok(token)) = poll(&mut critical) else {
        panic!("the critical band goes up to 1");
    };
    pool.used.store(9, AtomicOrdering::Release);
    drop(token);
    assert!(poll(&mut standard).is_pending());
    // Back below 0.8: the standard request goes.
    pool.used.store(7, AtomicOrdering::Release);
    ctl.kick();
    assert!(matches!(poll(&mut standard), Poll::Ready(Ok(_))));
}
