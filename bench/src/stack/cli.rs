//! `epp-bench local`: starts one stack, runs the seed workload through it
//! and prints the seed's table, then, with `--keep`, leaves the stack up
//! for manual requests until Ctrl-C.

use super::{Binaries, Router, Stack, StackError, args::StackArgs};
use crate::{
    load::{self, LoadError, args::SeedArgs},
    report,
};

#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Routing policy (see `compare --policies`).
    #[arg(long, default_value = "epp-default")]
    pub policy: String,
    /// Keep the stack running after the workload until Ctrl-C, for curl.
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub seed: SeedArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error("starting the local stack")]
    Start(#[source] StackError),
    #[error(transparent)]
    Load(#[from] LoadError),
}

pub async fn local(args: LocalArgs, command: &str) -> Result<(), LocalError> {
    let bin = Binaries::locate()?;
    let router = Router::policy(&args.policy, &bin.repo)?;
    let opts = args.stack.options(router)?;
    let stack = Stack::start(&bin, &opts).await.map_err(LocalError::Start)?;
    println!(
        "stack up: gateway {} -> epp ({}) -> {} simulated pods",
        stack.gateway,
        args.policy,
        stack.pod_urls.len()
    );
    let mut seed = args.seed.clone();
    seed.common
        .point_at(&stack.gateway, &stack.pod_urls, &args.policy);
    let run = load::run_seed(&seed, command).await?;
    println!("\n{}", report::seed_table(&run));
    for p in &run.phases {
        if let Some(counts) = report::pod_requests(p) {
            println!("{}: per-pod requests {counts}", p.name);
        }
    }
    if args.keep {
        println!("\nThe stack keeps running; try:");
        println!(
            "  curl -s {}/v1/completions -H 'content-type: application/json' -d '{{\"model\":\"{}\",\"prompt\":\"Hello\",\"max_tokens\":8}}'",
            stack.gateway, seed.common.model
        );
        println!("  curl -s {}/v1/models", stack.gateway);
        if let Some(m) = stack.epp_metrics {
            println!("  curl -s http://{m}/metrics | grep inference_");
        }
        if let Some(a) = stack.epp_admin {
            println!("  grpcurl -plaintext {a} epp.admin.v1.Admin/ListEndpoints");
        }
        println!("Ctrl-C stops it.");
        let _ = tokio::signal::ctrl_c().await;
    }
    stack.stop().await;
    Ok(())
}
