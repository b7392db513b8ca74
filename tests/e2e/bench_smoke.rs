//! A short smoke of the benchmark tooling against the local stack: simulated
//! pods, the real `epp` binary and a real Envoy, driven by the load
//! generator's own workloads (seconds, not minutes). The long comparisons are
//! benchmarks in bench/, not tests.

use clap::Parser;
use epp_bench::{
    load::{
        self,
        args::{MultiTurnArgs, SharedPrefixArgs},
    },
    sim::SimConfig,
    stack::{Binaries, Router, Stack, StackOptions},
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
        "--concurrency",
        "2",
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
        "--concurrency",
        "2",
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
