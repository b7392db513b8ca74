//! `epp-bench`: load generator and report writer for the endpoint picker.
//! Workloads and measurements are documented in `epp_bench::load`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use epp_bench::load::args::{
    CommonArgs, LongPromptArgs, MultiTurnArgs, SeedArgs, SharedPrefixArgs,
};
use epp_bench::load::{self, BenchRun};
use epp_bench::report;
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
    /// Combines --json results of one workload (one per policy) into a
    /// markdown table and PNG charts.
    Report(ReportArgs),
}

#[derive(Debug, clap::Args)]
struct ReportArgs {
    /// Result files written by --json, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    inputs: Vec<PathBuf>,
    /// Directory for the markdown and the charts.
    #[arg(long)]
    out: PathBuf,
    /// Title of the report (default: the workload).
    #[arg(long)]
    title: Option<String>,
}

/// The command line as typed, shell-quoted where needed, for the record.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn finish(run: &BenchRun, common: &CommonArgs) -> anyhow::Result<()> {
    println!("\n{} ({}):\n", run.workload, run.label);
    print!("{}", report::phase_table(run));
    for p in &run.phases {
        if let Some(e) = &p.prefix_cache_error {
            eprintln!("note: {}: no hit rate: {e}", p.name);
        }
        if p.hit_max_duration {
            eprintln!("note: {}: stopped by --max-duration", p.name);
        }
        if !p.pod_requests.is_empty() {
            let counts: Vec<String> = p
                .pod_requests
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("{} per-pod requests: {}", p.name, counts.join(" "));
        }
    }
    if let Some(path) = &common.json {
        let text = serde_json::to_string_pretty(run).context("serializing the result")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
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
    let command = command_line();
    match cli.cmd {
        Cmd::Seed(a) => {
            let run = load::run_seed(&a, &command).await?;
            println!("{}", report::seed_table(&run));
            finish(&run, &a.common)?;
        }
        Cmd::SharedPrefix(a) => {
            let run = load::run_shared_prefix(&a, &command).await?;
            if let Some(i) = run.phases.first().and_then(|p| p.ideal_hit_rate) {
                println!(
                    "ideal prefix-cache hit rate of this workload: {:.1}%",
                    i * 100.0
                );
            }
            finish(&run, &a.common)?;
        }
        Cmd::LongPrompt(a) => {
            let run = load::run_long_prompt(&a, &command).await?;
            finish(&run, &a.common)?;
        }
        Cmd::MultiTurn(a) => {
            let run = load::run_multi_turn(&a, &command).await?;
            finish(&run, &a.common)?;
        }
        Cmd::Report(a) => {
            let runs = report::load_runs(&a.inputs)?;
            let title = a
                .title
                .clone()
                .or_else(|| runs.first().map(|(_, r)| r.workload.clone()))
                .unwrap_or_default();
            let files = report::write_report(&a.out, &title, &command, &runs)?;
            println!("{}", std::fs::read_to_string(&files.markdown)?);
            eprintln!(
                "wrote {} and {} charts",
                files.markdown.display(),
                files.charts.len()
            );
        }
    }
    Ok(())
}
