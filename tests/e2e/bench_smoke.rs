//! A short smoke of the benchmark tooling against the local stack: simulated
//! pods, the real `epp` binary and a real Envoy, driven by the load
//! generator's own workloads (seconds, not minutes). The long comparisons are
//! benchmarks in bench/, not tests.

use clap::Parser;
use epp_bench::{
    load::{
        self,
        args::{LoraArgs, MultiTurnArgs, SharedPrefixArgs},
    },
    sim::SimConfig,
    stack::{Binaries, Router, Stack, StackOptions, replicas::routed_per_replica},
};

use crate::common::repo_root;

/// Parses workload flags the way `epp-bench` does.
fn parse<T: clap::Args>(argv: &[&str]) -> T {
    #[derive(Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        a: A,
    }
    Cli::<T>::try_parse_from(std::iter::once("epp-bench").chain(argv.iter().copied()))
        .expect("workload flags")
        .a
}

/// A fast simulator: short prefills and decode so the smoke takes seconds.
fn fast_pods(pods: u16) -> SimConfig {
    let mut sim: SimConfig = parse(&[
        "--prefill-us-per-token",
        "20",
        "--itl-ms",
        "2",
        "--kv-blocks",
        "2048",
    ]);
    sim.pods = pods;
    sim
}

async fn stack(pods: u16) -> Stack {
    let bin = Binaries::with_epp(env!("CARGO_BIN_EXE_epp").into(), repo_root()).expect("binaries");
    let router = Router::policy("epp-default", &repo_root()).expect("policy");
    Stack::start(&bin, &StackOptions::new(fast_pods(pods), router))
        .await
        .expect("stack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_workload_through_the_local_stack() {
    let stack = stack(2).await;
    let mut args: SharedPrefixArgs = parse(&[
        "--groups",
        "4",
        "--prompts-per-group",
        "4",
        "--system-tokens",
        "400",
        "--question-tokens",
        "20",
        "--output-tokens",
        "4",
        // One session at a time: with no competing load a turn has no reason
        // to leave its cache, so anything below full stickiness is a routing
        // fault, not a trade-off the scorer made against a queue.
        "--concurrency",
        "1",
        "--max-duration",
        "60",
    ]);
    args.common.target = stack.gateway.clone();
    args.common.pod_metrics = stack.pod_urls.clone();
    let run = load::run_shared_prefix(&args, "smoke").await.expect("run");
    let phase = &run.phases[0];
    assert_eq!(phase.requests_ok, 16, "{:?}", phase.errors);
    assert!(phase.errors.is_empty(), "{:?}", phase.errors);
    let ideal = phase.ideal_hit_rate.expect("ideal hit rate");
    let hit = phase.prefix_cache.as_ref().expect("hit rate").hit_rate;
    assert!(
        hit > 0.5 * ideal && hit <= ideal + 1e-9,
        "hit {hit} ideal {ideal}"
    );
    assert!(phase.ttft_ms.is_some(), "streaming TTFT measured");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_workload_through_the_local_stack() {
    let stack = stack(2).await;
    let mut args: MultiTurnArgs = parse(&[
        "--sessions",
        "4",
        "--turns",
        "3",
        "--system-tokens",
        "200",
        "--user-tokens",
        "50",
        "--output-tokens",
        "4",
        // One session at a time: with no competing load a turn has no reason
        // to leave its cache, so anything below full stickiness is a routing
        // fault, not a trade-off the scorer made against a queue.
        "--concurrency",
        "1",
        "--max-duration",
        "60",
    ]);
    args.common.target = stack.gateway.clone();
    args.common.pod_metrics = stack.pod_urls.clone();
    let run = load::run_multi_turn(&args, "smoke").await.expect("run");
    let phase = &run.phases[0];
    assert_eq!(phase.requests_ok, 12, "{:?}", phase.errors);
    assert!(
        phase.stickiness.expect("stickiness") >= 0.9,
        "{:?}",
        phase.stickiness
    );
    stack.stop().await;
}

/// The LoRA workload through the picker and Envoy to pods serving its
/// adapters in one slot each: every request is answered under its adapter
/// and the pods' adapter loads come back in the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_workload_through_the_local_stack() {
    let bin = Binaries::with_epp(env!("CARGO_BIN_EXE_epp").into(), repo_root()).expect("binaries");
    let router = Router::policy("epp-default", &repo_root()).expect("policy");
    let mut sim = fast_pods(2);
    sim.lora_adapters = (0..3).map(|i| format!("lora-{i}")).collect();
    sim.max_loras = 1;
    sim.lora_load_ms = 5.0;
    let stack = Stack::start(&bin, &StackOptions::new(sim, router))
        .await
        .expect("stack");
    let mut args: LoraArgs = parse(&[
        "--requests",
        "24",
        "--adapters",
        "3",
        "--system-tokens",
        "100",
        "--question-tokens",
        "10",
        "--output-tokens",
        "4",
        "--concurrency",
        "2",
        "--max-duration",
        "60",
    ]);
    args.common.target = stack.gateway.clone();
    args.common.pod_metrics = stack.pod_urls.clone();
    let run = load::run_lora(&args, "smoke").await.expect("run");
    stack.stop().await;
    let phase = &run.phases[0];
    assert_eq!(phase.requests_ok, 24, "{:?}", phase.errors);
    let lora = phase.lora.expect("adapter loads scraped from the pods");
    let targets = phase.target_pods.as_ref().expect("per-target breakdown");
    let adapters = targets.keys().filter(|t| t.starts_with("lora-")).count();
    assert!(lora.loads >= adapters as f64, "{lora:?} {targets:?}");
    assert!(phase.ttft_ms.is_some(), "streaming TTFT measured");
}

/// The one-core throughput driver speaks ext_proc well enough that the real
/// picker, and the no-op server it is compared with, route every request it
/// sends, in both phase profiles; the CPU accounting it reports comes from
/// each server's /proc entry. (`noop-extproc` is the bench crate's binary,
/// built beside `epp` by `cargo test --workspace`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_driver_gets_every_request_routed_by_the_picker() {
    use epp_bench::perf::extproc::{ExtProcPerf, Phases, Server, run};
    let bin = Binaries::with_epp(env!("CARGO_BIN_EXE_epp").into(), repo_root()).expect("binaries");
    let settings = ExtProcPerf {
        servers: vec![Server::Epp, Server::Noop],
        body_size: 4096,
        phases: vec![Phases::Full, Phases::Lean],
        concurrency: vec![4],
        connections: 2,
        requests_per_step: 300,
        max_step: std::time::Duration::from_secs(30),
        warmup: 20,
        backends: 3,
        // Pinning would pin the test process itself.
        pin: None,
    };
    let points = run(&bin, &settings).await.expect("ext_proc run");
    let measured: Vec<_> = points.iter().map(|p| (p.server, p.phases)).collect();
    assert_eq!(
        measured,
        [
            (Server::Epp, Phases::Full),
            (Server::Epp, Phases::Lean),
            (Server::Noop, Phases::Full),
            (Server::Noop, Phases::Lean),
        ]
    );
    for p in &points {
        assert_eq!(
            (p.routed, p.errors),
            (300, 0),
            "{:?} {:?}",
            p.server,
            p.phases
        );
        // NaN when the picker's /proc entry could not be read.
        assert!(p.picker_cpu_us_per_request.is_finite(), "{p:?}");
        assert!(p.picker_peak_rss_mb > 0.0, "{p:?}");
    }
}

/// `--epp-replicas 3`: Envoy balances the ext_proc streams over three
/// picker processes, so each routes some of the requests and together they
/// route every one exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_picker_replicas_each_route_a_share() {
    let bin = Binaries::with_epp(env!("CARGO_BIN_EXE_epp").into(), repo_root()).expect("binaries");
    let router = Router::policy("epp-default", &repo_root()).expect("policy");
    let mut opts = StackOptions::new(fast_pods(2), router);
    opts.epp_replicas = 3;
    let stack = Stack::start(&bin, &opts).await.expect("stack");
    assert_eq!(stack.epp_replica_metrics.len(), 3);
    let mut args: SharedPrefixArgs = parse(&[
        "--groups",
        "6",
        "--prompts-per-group",
        "5",
        "--system-tokens",
        "100",
        "--question-tokens",
        "10",
        "--output-tokens",
        "2",
        "--concurrency",
        "2",
        "--max-duration",
        "60",
    ]);
    args.common.target = stack.gateway.clone();
    args.common.pod_metrics = stack.pod_urls.clone();
    let run = load::run_shared_prefix(&args, "smoke").await.expect("run");
    assert_eq!(run.phases[0].requests_ok, 30, "{:?}", run.phases[0].errors);
    let client = epp_bench::load::client::http_client(2);
    let counts = routed_per_replica(&client, &stack.epp_replica_metrics).await;
    stack.stop().await;
    let counts: Vec<f64> = counts
        .into_iter()
        .map(|c| c.expect("replica metrics"))
        .collect();
    assert!(counts.iter().all(|&c| c > 0.0), "{counts:?}");
    assert_eq!(counts.iter().sum::<f64>(), 30.0, "{counts:?}");
}
