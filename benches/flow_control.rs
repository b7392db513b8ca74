//! Flow control's per-request queue overhead: with 10,000 requests queued,
//! one request is admitted (queued behind them) and the head is dispatched,
//! so the queue stays at 10,000: one iteration is one request's whole
//! passage (admission, queueing, dispatch, delivery of the token, release).
//! `cargo bench --bench flow_control`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use criterion::{BenchmarkId, Criterion};
use epp::{
    config::EndpointPickerConfig,
    flow_control::{
        Admission, Capacity, FlowControlSettings, FlowController, FlowRequest, Waiting,
    },
};

/// Full unless the bench opens it for one dispatch.
#[derive(Debug, Default)]
struct Gate(AtomicBool);

impl Capacity for Gate {
    fn saturation(&self) -> f64 {
        if self.0.load(Ordering::Acquire) {
            0.0
        } else {
            1.0
        }
    }
}

const QUEUED: usize = 10_000;
const FLOWS: usize = 100;

fn bench_queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_control_enqueue_dispatch");
    for (name, band) in [
        ("global-strict+fcfs", ""),
        (
            "round-robin+edf",
            "  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy, orderingPolicyRef: edf-ordering-policy}\n",
        ),
    ] {
        let text =
            format!("featureGates: [flowControl]\nflowControl:\n  defaultRequestTTL: 60s\n{band}");
        let cfg = EndpointPickerConfig::parse(&text).unwrap();
        let settings = FlowControlSettings::from_config(&cfg).unwrap().unwrap();
        let gate = Arc::new(Gate::default());
        let registry = prometheus::Registry::new();
        let ctl = FlowController::new(settings, gate.clone(), &registry, "pool").unwrap();
        let flows: Vec<String> = (0..FLOWS).map(|i| format!("tenant-{i}")).collect();
        let admit = |i: usize| -> Waiting {
            let req = FlowRequest {
                fairness_id: Some(&flows[i % FLOWS]),
                priority: 0,
                bytes: 4096,
            };
            match ctl.admit(&req) {
                Admission::Wait(w) => w,
                other => panic!("expected to queue, got {other:?}"),
            }
        };
        let mut waiting: VecDeque<Waiting> = (0..QUEUED).map(admit).collect();
        let mut cx = Context::from_waker(Waker::noop());
        let mut i = QUEUED;
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                waiting.push_back(admit(i));
                i += 1;
                gate.0.store(true, Ordering::Release);
                ctl.kick();
                gate.0.store(false, Ordering::Release);
                // One priority, and flows admitted in turn: under both
                // policies the dispatched request is the oldest.
                let mut head = waiting.pop_front().expect("queued");
                assert!(matches!(head.poll_dispatch(&mut cx), Poll::Ready(Ok(_))));
            });
        });
        assert_eq!(ctl.queued(), QUEUED as u64);
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_queue(&mut c);
    c.final_summary();
}
