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
use epp_bench::sim::SimConfig;
use epp_bench::stack::{Binaries, BodyMode, Router, Stack, StackOptions};
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
    /// Runs one workload through a fresh local stack (simulated pods, the
    /// picker, Envoy) per routing policy, and writes the comparison.
    Compare {
        #[command(subcommand)]
        workload: CompareWorkload,
    },
    /// Starts the local stack (simulated pods, the picker, Envoy on
    /// loopback), runs the seed workload through it and prints the table.
    Local(LocalArgs),
}

#[derive(Debug, Subcommand)]
enum CompareWorkload {
    Seed {
        #[command(flatten)]
        args: SeedArgs,
        #[command(flatten)]
        compare: CompareArgs,
    },
    SharedPrefix {
        #[command(flatten)]
        args: SharedPrefixArgs,
        #[command(flatten)]
        compare: CompareArgs,
    },
    LongPrompt {
        #[command(flatten)]
        args: LongPromptArgs,
        #[command(flatten)]
        compare: CompareArgs,
    },
    MultiTurn {
        #[command(flatten)]
        args: MultiTurnArgs,
        #[command(flatten)]
        compare: CompareArgs,
    },
}

/// How to build each stack.
#[derive(Debug, Clone, clap::Args)]
struct StackArgs {
    /// Simulated pods.
    #[arg(long, default_value_t = 8)]
    pods: u16,
    /// A vllm-sim flag applied to every pod, e.g. --sim-arg=--kv-blocks=4096 (repeatable).
    #[arg(long = "sim-arg", allow_hyphen_values = true)]
    sim_args: Vec<String>,
    /// An epp flag added to the picker's command line (repeatable).
    #[arg(long = "epp-arg", allow_hyphen_values = true)]
    epp_args: Vec<String>,
    /// Envoy sends request and response bodies buffered instead of full-duplex streamed.
    #[arg(long)]
    buffered: bool,
    /// Envoy talks plaintext h2c to the picker (default: TLS, as in production).
    #[arg(long)]
    plaintext: bool,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 1)]
    envoy_concurrency: usize,
    /// Keep the picker's and Envoy's logs in this directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
struct CompareArgs {
    #[command(flatten)]
    stack: StackArgs,
    /// Routing policies, in order: epp-default, gie-default, any bench/configs/<name>,
    /// a config file path, envoy-rr (Envoy round robin, no picker) or direct (pod 0, no gateway).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "epp-default,gie-default,prefix-only,queue-only,random,round-robin,envoy-rr"
    )]
    policies: Vec<String>,
    /// Directory for the markdown report, charts and per-policy JSON.
    #[arg(long)]
    out: PathBuf,
    /// Report title (default: the workload).
    #[arg(long)]
    title: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
struct LocalArgs {
    #[command(flatten)]
    stack: StackArgs,
    /// Routing policy (see `compare --policies`).
    #[arg(long, default_value = "epp-default")]
    policy: String,
    /// Keep the stack running after the workload until Ctrl-C, for curl.
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    seed: SeedArgs,
}

/// Parses the per-pod simulator flags.
fn sim_config(args: &StackArgs) -> anyhow::Result<SimConfig> {
    #[derive(Parser)]
    struct SimCli {
        #[command(flatten)]
        sim: SimConfig,
    }
    let argv = std::iter::once("vllm-sim".to_owned()).chain(args.sim_args.iter().cloned());
    let mut sim = SimCli::try_parse_from(argv)
        .context("--sim-arg values must be vllm-sim flags")?
        .sim;
    sim.pods = args.pods;
    Ok(sim)
}

fn stack_options(args: &StackArgs, router: Router) -> anyhow::Result<StackOptions> {
    let mut opts = StackOptions::new(sim_config(args)?, router);
    if let Router::Epp { extra_args, .. } = &mut opts.router {
        extra_args.extend(args.epp_args.iter().cloned());
    }
    if args.buffered {
        opts.body_mode = BodyMode::Buffered;
    }
    opts.epp_tls = !args.plaintext;
    opts.envoy_concurrency = args.envoy_concurrency;
    opts.log_dir = args.log_dir.clone();
    Ok(opts)
}

/// Points a workload's common flags at a stack.
fn aim(common: &mut CommonArgs, stack: &Stack, label: &str) {
    common.target = stack.gateway.clone();
    common.pod_metrics = stack.pod_urls.clone();
    common.sim_pods = None;
    common.label = Some(label.to_owned());
    common.json = None;
}

async fn compare(workload: CompareWorkload, command: &str) -> anyhow::Result<()> {
    let bin = Binaries::locate()?;
    let compare = match &workload {
        CompareWorkload::Seed { compare, .. }
        | CompareWorkload::SharedPrefix { compare, .. }
        | CompareWorkload::LongPrompt { compare, .. }
        | CompareWorkload::MultiTurn { compare, .. } => compare.clone(),
    };
    std::fs::create_dir_all(&compare.out)
        .with_context(|| format!("creating {}", compare.out.display()))?;
    let mut runs = Vec::new();
    for policy in &compare.policies {
        let router = Router::policy(policy, &bin.repo)?;
        let opts = stack_options(&compare.stack, router)?;
        let stack = Stack::start(&bin, &opts)
            .await
            .with_context(|| format!("starting the stack for {policy}"))?;
        eprintln!("{policy}: stack up at {}", stack.gateway);
        let run = match &workload {
            CompareWorkload::Seed { args, .. } => {
                let mut a = args.clone();
                aim(&mut a.common, &stack, policy);
                load::run_seed(&a, command).await?
            }
            CompareWorkload::SharedPrefix { args, .. } => {
                let mut a = args.clone();
                aim(&mut a.common, &stack, policy);
                load::run_shared_prefix(&a, command).await?
            }
            CompareWorkload::LongPrompt { args, .. } => {
                let mut a = args.clone();
                aim(&mut a.common, &stack, policy);
                load::run_long_prompt(&a, command).await?
            }
            CompareWorkload::MultiTurn { args, .. } => {
                let mut a = args.clone();
                aim(&mut a.common, &stack, policy);
                load::run_multi_turn(&a, command).await?
            }
        };
        stack.stop().await;
        print!("{}", report::phase_table(&run));
        let path = compare.out.join(format!("{}.json", safe_name(policy)));
        std::fs::write(&path, serde_json::to_string_pretty(&run)?)
            .with_context(|| format!("writing {}", path.display()))?;
        runs.push((policy.clone(), run));
    }
    let title = compare
        .title
        .clone()
        .or_else(|| runs.first().map(|(_, r)| r.workload.clone()))
        .unwrap_or_default();
    let files = report::write_report(&compare.out, &title, command, &runs)?;
    println!("{}", std::fs::read_to_string(&files.markdown)?);
    eprintln!(
        "wrote {} and {} charts",
        files.markdown.display(),
        files.charts.len()
    );
    Ok(())
}

fn safe_name(policy: &str) -> String {
    std::path::Path::new(policy)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| policy.to_owned())
}

async fn local(args: LocalArgs, command: &str) -> anyhow::Result<()> {
    let bin = Binaries::locate()?;
    let router = Router::policy(&args.policy, &bin.repo)?;
    let opts = stack_options(&args.stack, router)?;
    let stack = Stack::start(&bin, &opts)
        .await
        .context("starting the local stack")?;
    println!(
        "stack up: gateway {} -> epp ({}) -> {} simulated pods",
        stack.gateway,
        args.policy,
        stack.pod_urls.len()
    );
    let mut seed = args.seed.clone();
    aim(&mut seed.common, &stack, &args.policy);
    let run = load::run_seed(&seed, command).await?;
    println!("\n{}", report::seed_table(&run));
    for p in &run.phases {
        if !p.pod_requests.is_empty() {
            let counts: Vec<String> = p
                .pod_requests
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("{}: per-pod requests {}", p.name, counts.join(" "));
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
        if let Some(h) = stack.epp_health {
            println!("  grpcurl -plaintext {h} epp.admin.v1.Admin/ListEndpoints");
        }
        println!("Ctrl-C stops it.");
        let _ = tokio::signal::ctrl_c().await;
    }
    stack.stop().await;
    Ok(())
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
        Cmd::Compare { workload } => compare(workload, &command).await?,
        Cmd::Local(a) => local(a, &command).await?,
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
