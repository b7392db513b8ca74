//! `epp-bench`: load generator, local stack, performance measurements and
//! report writer for the endpoint picker. Each subcommand's flags and logic
//! live in the library module it drives (see `epp_bench`'s crate docs);
//! this file only names the subcommands and dispatches.

use clap::{Parser, Subcommand};
use epp_bench::{
    compare,
    load::{
        self,
        args::{LongPromptArgs, LoraArgs, MultiTurnArgs, SeedArgs, SharedPrefixArgs, TenantsArgs},
    },
    perf, report, soak, stack,
};
use tracing_subscriber::EnvFilter;

/// Drives an OpenAI-compatible endpoint (Envoy + EPP, or a pod) with LLM
/// serving workloads and reports throughput, TTFT, latency, errors, per-pod
/// load and the fleet prefix-cache hit rate.
#[derive(Debug, Parser)]
#[command(name = "epp-bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The seed deployment's four scenarios (5@1, 20@5, 50@10, 100@20 short
    /// completions), printed as the seed's table.
    Seed(SeedArgs),
    /// G groups x P prompts sharing a per-group system prompt, interleaved
    /// across groups; prints the ideal hit rate beside the measured one.
    SharedPrefix(SharedPrefixArgs),
    /// Long unshared prompts (220 KiB) up a concurrency ladder.
    LongPrompt(LongPromptArgs),
    /// Chat sessions growing turn by turn; reports pod stickiness.
    MultiTurn(MultiTurnArgs),
    /// Requests over LoRA adapters (Zipf popularity, some base-model
    /// traffic); reports adapter loads per 1,000 requests from the pods.
    Lora(LoraArgs),
    /// Tenants at their own rates, tagged with fairness ids and critical or
    /// standard objectives (flow control's proof); reports per-class TTFT,
    /// per-tenant goodput and Jain's fairness index.
    Tenants(TenantsArgs),
    /// Combines --json results of one workload (one per policy) into a
    /// markdown table and PNG charts.
    Report(report::cli::ReportArgs),
    /// Pairs two setups' --records request by request (same seeded
    /// workload): hits and misses that changed, and the TTFT difference per
    /// class and path.
    Paired(report::paired::PairedArgs),
    /// Runs one workload through a fresh local stack (simulated pods, the
    /// picker, Envoy) per routing policy, and writes the comparison.
    Compare {
        #[command(subcommand)]
        workload: compare::CompareWorkload,
    },
    /// Starts the local stack (simulated pods, the picker, Envoy on
    /// loopback), runs the seed workload through it and prints the table.
    Local(stack::cli::LocalArgs),
    /// Performance measurements of the picker (overhead through Envoy,
    /// scraping, decision time, index memory); `perf all` writes perf.md.
    Perf {
        #[command(subcommand)]
        what: perf::cli::PerfCommand,
    },
    /// A bounded soak: fixed-rate load through Envoy and the picker to
    /// vllm-sim processes, killing and restarting pods on a schedule;
    /// writes soak.csv, soak.png and README.md.
    Soak(soak::cli::SoakArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let command = report::provenance::command_line();
    match cli.cmd {
        Cmd::Seed(a) => load::cli::seed(&a, &command).await?,
        Cmd::SharedPrefix(a) => load::cli::shared_prefix(&a, &command).await?,
        Cmd::LongPrompt(a) => load::cli::long_prompt(&a, &command).await?,
        Cmd::MultiTurn(a) => load::cli::multi_turn(&a, &command).await?,
        Cmd::Lora(a) => load::cli::lora(&a, &command).await?,
        Cmd::Tenants(a) => load::cli::tenants(&a, &command).await?,
        Cmd::Report(a) => report::cli::run(&a, &command)?,
        Cmd::Paired(a) => report::paired::run(&a)?,
        Cmd::Compare { workload } => compare::run(workload, &command).await?,
        Cmd::Local(a) => stack::cli::local(a, &command).await?,
        Cmd::Perf { what } => perf::cli::run(what, &command).await?,
        Cmd::Soak(a) => soak::cli::run(&a, &command).await?,
    }
    Ok(())
}
