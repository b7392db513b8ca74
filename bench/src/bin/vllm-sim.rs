//! `vllm-sim`: hosts N simulated vLLM pods on consecutive ports.
//!
//! The engine model and every flag are documented in `epp_bench::sim` and
//! bench/README.md.

use anyhow::Context as _;
use clap::Parser;
use epp_bench::sim::{SimConfig, spawn_fleet};
use tracing_subscriber::EnvFilter;

/// A vLLM-compatible simulated model server (OpenAI completions and chat,
/// /v1/models, /health, vLLM's /metrics) with a queueing, prefix-cache and
/// timing model faithful enough to compare routing policies.
#[derive(Debug, Parser)]
#[command(name = "vllm-sim", version)]
struct Cli {
    #[command(flatten)]
    sim: SimConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let fleet = spawn_fleet(cli.sim.clone())
        .await
        .context("starting the simulated pods")?;
    for p in &fleet.pods {
        // Stdout, one line per pod, so a script can wait for readiness.
        println!("{} listening on {}", p.name, p.url());
        if let Some(kv) = &p.kv_events {
            let replay = kv
                .replay
                .map_or_else(|| "off".to_owned(), |r| format!("tcp://{r}"));
            println!(
                "{} kv events on tcp://{} replay {replay}",
                p.name, kv.events
            );
        }
    }
    tracing::info!(pods = fleet.pods.len(), model = %cli.sim.model, "vllm-sim ready");
    shutdown_signal().await;
    tracing::info!("shutting down");
    fleet.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    () = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
