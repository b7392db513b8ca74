//! `epp-bench`: load generator and report writer for the endpoint picker.
//! Workloads and measurements are documented in `epp_bench::load`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use epp_bench::load::args::{
    CommonArgs, LongPromptArgs, MultiTurnArgs, SeedArgs, SharedPrefixArgs,
};
use epp_bench::load::{self, BenchRun};
use epp_bench::perf;
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
    /// Performance measurements of the picker (overhead through Envoy,
    /// scraping, decision time, index memory); `perf all` writes perf.md.
    Perf {
        #[command(subcommand)]
        what: PerfCmd,
    },
    /// A bounded soak: fixed-rate load through Envoy and the picker to
    /// vllm-sim processes, killing and restarting pods on a schedule;
    /// writes soak.csv, soak.png and README.md.
    Soak(epp_bench::soak::args::SoakArgs),
}

#[derive(Debug, Subcommand)]
enum PerfCmd {
    /// Latency and throughput through Envoy: alone, with a no-op ext_proc, with the picker.
    Gateway(GatewayArgs),
    /// CPU and memory of scraping many endpoints.
    Scrape(ScrapeArgs),
    /// Decision time against pool size and prompt length (in process), with charts.
    Decisions(DecisionArgs),
    /// Prefix-index memory per block.
    Index(IndexArgs),
    /// The real picker with growing pools of simulated pods.
    Scale(ScaleArgs),
    /// Routed requests/s of one picker core, driven over ext_proc directly (no Envoy).
    ExtProc(ExtProcArgs),
    /// Everything above; writes OUT/perf.md and charts.
    All(AllPerfArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct GatewayArgs {
    /// Paths: envoy, noop, epp, noop-lean, epp-lean, epp-buffered-lean.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "envoy,noop,epp,noop-lean,epp-lean,epp-buffered-lean"
    )]
    paths: Vec<String>,
    /// Request body sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "1024,16384,225280")]
    bodies: Vec<usize>,
    /// Concurrency ladder.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    ladder: Vec<usize>,
    /// Measured requests per step (after a warm-up).
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// Warm-up requests per step.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// Cap on each step's duration, seconds.
    #[arg(long, default_value_t = 20.0)]
    max_step: f64,
    #[arg(long, default_value_t = 4)]
    backends: usize,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 1)]
    envoy_concurrency: usize,
    /// Rotations over the paths per step (each path keeps its best run).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct ScrapeArgs {
    #[arg(long, default_value_t = 256)]
    endpoints: usize,
    #[arg(long, default_value = "50ms")]
    interval: String,
    /// Measurement window, seconds.
    #[arg(long, default_value_t = 300.0)]
    duration: f64,
    /// `sim` (vllm-sim pods) or a path to a captured /metrics page.
    #[arg(long, default_value = "sim")]
    page: String,
    /// The picker's --metrics-name-filter (`=false`: full pages, as before the filter).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    name_filter: bool,
}

#[derive(Debug, Clone, clap::Args)]
struct DecisionArgs {
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024")]
    endpoints: Vec<usize>,
    /// Prompt sizes in bytes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,4096,16384,65536,225280"
    )]
    prompts: Vec<usize>,
    #[arg(long, default_value_t = 5000)]
    samples: usize,
    /// Directory for the charts.
    #[arg(long, default_value = "bench/results/perf")]
    out: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
struct IndexArgs {
    #[arg(long, default_value_t = 1_000_000)]
    blocks: usize,
    #[arg(long, default_value_t = 64)]
    endpoints: u16,
}

#[derive(Debug, Clone, clap::Args)]
struct ScaleArgs {
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    endpoints: Vec<usize>,
    /// Simulated pods per vllm-sim process.
    #[arg(long, default_value_t = 256)]
    per_process: usize,
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Scrape interval (1,024 endpoints at 50 ms would take this machine's
    /// cores away from what is measured).
    #[arg(long, default_value = "500ms")]
    interval: String,
}

#[derive(Debug, Clone, clap::Args)]
struct ExtProcArgs {
    /// Servers to measure: epp (the picker), noop (the protocol's floor).
    #[arg(long, value_delimiter = ',', default_value = "epp,noop")]
    servers: Vec<String>,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 4096)]
    body: usize,
    /// Phase profiles: full (response bodies too), lean (no response bodies).
    #[arg(long, value_delimiter = ',', default_value = "full,lean")]
    phases: Vec<String>,
    /// Concurrent streams per step.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    ladder: Vec<usize>,
    /// HTTP/2 connections (Envoy opens one per worker).
    #[arg(long, default_value_t = 2)]
    connections: usize,
    #[arg(long, default_value_t = 40000)]
    requests: usize,
    #[arg(long, default_value_t = 2000)]
    warmup: usize,
    /// Cap on each step's duration, seconds.
    #[arg(long, default_value_t = 20.0)]
    max_step: f64,
    #[arg(long, default_value_t = 8)]
    backends: usize,
    /// CPUs for the picker and for the driver (`taskset -c` lists); `none`
    /// to run both unpinned.
    #[arg(long, default_value = "0/1")]
    pin: String,
}

#[derive(Debug, Clone, clap::Args)]
struct AllPerfArgs {
    /// Output directory: perf.md and perf/*.png.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Criterion output of `cargo bench --bench picker` to include.
    #[arg(long)]
    micro: Option<PathBuf>,
    /// Scraping window, seconds.
    #[arg(long, default_value_t = 300.0)]
    scrape_duration: f64,
    /// A captured vLLM /metrics page for the second scraping run.
    #[arg(
        long,
        default_value = "tests/fixtures/metrics/vllm-metrics-inferstack.txt"
    )]
    captured_page: PathBuf,
    #[command(flatten)]
    gateway: GatewayArgs,
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
        Cmd::Perf { what } => perf(what, &command).await?,
        Cmd::Soak(a) => soak(&a, &command).await?,
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

fn gateway_settings(a: &GatewayArgs) -> anyhow::Result<perf::gateway::GatewayPerf> {
    let paths = a
        .paths
        .iter()
        .map(|p| perf::gateway::GatewayPath::parse(p).with_context(|| format!("unknown path {p}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(perf::gateway::GatewayPerf {
        paths,
        body_sizes: a.bodies.clone(),
        concurrency: a.ladder.clone(),
        requests_per_step: a.requests,
        max_step: std::time::Duration::from_secs_f64(a.max_step),
        warmup: a.warmup,
        backends: a.backends,
        envoy_concurrency: a.envoy_concurrency,
        repeats: a.repeats,
    })
}

fn extproc_settings(a: &ExtProcArgs) -> anyhow::Result<perf::extproc::ExtProcPerf> {
    let phases = a
        .phases
        .iter()
        .map(|p| perf::extproc::Phases::parse(p).with_context(|| format!("unknown phases {p}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pin = match a.pin.as_str() {
        "none" => None,
        s => {
            let (picker, driver) = s
                .split_once('/')
                .with_context(|| format!("--pin {s}: expected PICKER_CPUS/DRIVER_CPUS"))?;
            Some((picker.to_owned(), driver.to_owned()))
        }
    };
    let servers = a
        .servers
        .iter()
        .map(|s| perf::extproc::Server::parse(s).with_context(|| format!("unknown server {s}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(perf::extproc::ExtProcPerf {
        servers,
        body_size: a.body,
        phases,
        concurrency: a.ladder.clone(),
        connections: a.connections,
        requests_per_step: a.requests,
        max_step: std::time::Duration::from_secs_f64(a.max_step),
        warmup: a.warmup,
        backends: a.backends,
        pin,
    })
}

fn scrape_settings(a: &ScrapeArgs) -> anyhow::Result<perf::scrape::ScrapePerf> {
    let page = if a.page == "sim" {
        perf::scrape::Page::Simulated
    } else {
        let text =
            std::fs::read_to_string(&a.page).with_context(|| format!("reading {}", a.page))?;
        perf::scrape::Page::Captured {
            name: std::path::Path::new(&a.page)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            text: text.into(),
        }
    };
    Ok(perf::scrape::ScrapePerf {
        endpoints: a.endpoints,
        interval: a.interval.clone(),
        duration: std::time::Duration::from_secs_f64(a.duration),
        sample_every: std::time::Duration::from_secs(10),
        page,
        name_filter: a.name_filter,
    })
}

/// Decision-time grid (in process) as markdown, with two charts.
fn decisions(a: &DecisionArgs, chart_prefix: &str) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let config = epp::config::DEFAULT_CONFIG;
    let mut grid = Vec::new();
    for &e in &a.endpoints {
        for &p in &a.prompts {
            let t = perf::footprint::decision_times(config, e, p, a.samples)
                .map_err(anyhow::Error::msg)?;
            eprintln!(
                "decision: {e} endpoints, {p} B prompt: p50 {:.1} us p99 {:.1} us",
                t.p50_us, t.p99_us
            );
            grid.push(t);
        }
    }
    std::fs::create_dir_all(&a.out)?;
    let kib = |b: usize| format!("{} KiB", b / 1024);
    let ends: Vec<String> = a.endpoints.iter().map(|e| e.to_string()).collect();
    let by_prompt: Vec<(String, Vec<f64>)> = a
        .prompts
        .iter()
        .map(|&p| {
            (
                format!("{} prompt", kib(p)),
                a.endpoints
                    .iter()
                    .map(|&e| {
                        grid.iter()
                            .find(|t| t.endpoints == e && t.prompt_bytes == p)
                            .map_or(f64::NAN, |t| t.p99_us)
                    })
                    .collect(),
            )
        })
        .collect();
    let c1 = a
        .out
        .join(format!("{chart_prefix}decision-vs-endpoints.png"));
    report::charts::line_chart(
        &c1,
        "Decision time p99 (us) vs endpoints",
        "p99 (us)",
        &ends,
        &by_prompt,
    )?;
    let prompts: Vec<String> = a.prompts.iter().map(|&p| kib(p)).collect();
    let by_pool: Vec<(String, Vec<f64>)> = a
        .endpoints
        .iter()
        .map(|&e| {
            (
                format!("{e} endpoints"),
                a.prompts
                    .iter()
                    .map(|&p| {
                        grid.iter()
                            .find(|t| t.endpoints == e && t.prompt_bytes == p)
                            .map_or(f64::NAN, |t| t.p99_us)
                    })
                    .collect(),
            )
        })
        .collect();
    let c2 = a.out.join(format!("{chart_prefix}decision-vs-prompt.png"));
    report::charts::line_chart(
        &c2,
        "Decision time p99 (us) vs prompt length",
        "p99 (us)",
        &prompts,
        &by_pool,
    )?;
    let mut md = String::new();
    let _ = writeln!(md, "| endpoints | prompt | p50 | p90 | p99 | max |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for t in &grid {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
            t.endpoints,
            kib(t.prompt_bytes),
            t.p50_us,
            t.p90_us,
            t.p99_us,
            t.max_us
        );
    }
    let rel = |p: &std::path::Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let _ = writeln!(
        md,
        "\n![decision time vs endpoints](perf/{})\n![decision time vs prompt length](perf/{})",
        rel(&c1),
        rel(&c2)
    );
    Ok(md)
}

fn index_markdown(m: &perf::footprint::IndexMemory) -> String {
    format!(
        "| blocks | endpoints | bytes per block (index accounting) | RSS growth per block | process RSS after |\n|---|---|---|---|---|\n| {} | {} | {:.1} B | {:.1} B | {:.1} MiB |\n",
        m.blocks, m.endpoints, m.bytes_per_block, m.rss_bytes_per_block, m.rss_mb_after
    )
}

async fn perf(what: PerfCmd, command: &str) -> anyhow::Result<()> {
    match what {
        PerfCmd::Gateway(a) => {
            let bin = Binaries::locate()?;
            let points = perf::gateway::run(&bin, &gateway_settings(&a)?).await?;
            println!("{}", perf::gateway::markdown(&points));
        }
        PerfCmd::Scrape(a) => {
            let bin = Binaries::locate()?;
            let r = perf::scrape::run(&bin, &scrape_settings(&a)?).await?;
            println!("{}", perf::scrape::markdown(&[r]));
        }
        PerfCmd::Decisions(a) => println!("{}", decisions(&a, "")?),
        PerfCmd::Index(a) => {
            let m = perf::footprint::index_memory(a.blocks, a.endpoints);
            println!("{}", index_markdown(&m));
        }
        PerfCmd::Scale(a) => {
            let bin = Binaries::locate()?;
            println!("{}", scale(&bin, &a).await?);
        }
        PerfCmd::ExtProc(a) => {
            let bin = Binaries::locate()?;
            let settings = extproc_settings(&a)?;
            let points = perf::extproc::run(&bin, &settings).await?;
            println!("{}", perf::extproc::markdown(&points, &settings));
        }
        PerfCmd::All(a) => perf_all(&a, command).await?,
    }
    Ok(())
}

async fn scale(bin: &Binaries, a: &ScaleArgs) -> anyhow::Result<String> {
    let mut points = Vec::new();
    for &n in &a.endpoints {
        eprintln!("scale: {n} endpoints...");
        points.push(perf::scale::run_one(bin, n, a.per_process, a.requests, &a.interval).await?);
    }
    Ok(perf::scale::markdown(&points, &a.interval))
}

async fn perf_all(a: &AllPerfArgs, command: &str) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let bin = Binaries::locate()?;
    let charts = a.out.join("perf");
    std::fs::create_dir_all(&charts)?;
    let mut md = String::new();
    let _ = writeln!(md, "# Performance of the endpoint picker\n");
    let _ = writeln!(md, "Generated by `{command}` on {}.\n", machine_line());
    if let Some(micro) = &a.micro {
        let text = std::fs::read_to_string(micro)
            .with_context(|| format!("reading {}", micro.display()))?;
        let _ = writeln!(
            md,
            "## 1. Micro-benchmarks (criterion, `cargo bench --bench picker`)\n"
        );
        let _ = writeln!(md, "{}", perf_micro_table(&text));
    }
    eprintln!("index memory...");
    let m = perf::footprint::index_memory(1_000_000, 64);
    let _ = writeln!(md, "## 2. Prefix index memory\n\n{}", index_markdown(&m));
    eprintln!("decision times...");
    let grid = decisions(
        &DecisionArgs {
            endpoints: vec![16, 64, 256, 1024],
            prompts: vec![1024, 4096, 16384, 65536, 225280],
            samples: 5000,
            out: charts.clone(),
        },
        "",
    )?;
    let _ = writeln!(
        md,
        "## 3. Decision time against pool size and prompt length (in process, default config)\n\n{grid}"
    );
    eprintln!("gateway overhead...");
    let points = perf::gateway::run(&bin, &gateway_settings(&a.gateway)?).await?;
    let _ = writeln!(
        md,
        "## 4. Overhead through Envoy\n\n{}",
        perf::gateway::markdown(&points)
    );
    eprintln!("scraping...");
    let mut scrapes = Vec::new();
    for page in ["sim".to_owned(), a.captured_page.display().to_string()] {
        let s = ScrapeArgs {
            endpoints: 256,
            interval: "50ms".into(),
            duration: a.scrape_duration,
            page,
            name_filter: true,
        };
        scrapes.push(perf::scrape::run(&bin, &scrape_settings(&s)?).await?);
    }
    let _ = writeln!(
        md,
        "## 5. Scraping 256 endpoints every 50 ms\n\n{}",
        perf::scrape::markdown(&scrapes)
    );
    eprintln!("scale-out...");
    let sc = scale(
        &bin,
        &ScaleArgs {
            endpoints: vec![64, 256, 1024],
            per_process: 256,
            requests: 2000,
            interval: "500ms".into(),
        },
    )
    .await?;
    let _ = writeln!(md, "## 6. Scale-out through the real picker\n\n{sc}");
    // Last: it pins this process to one CPU for the rest of its life.
    eprintln!("one picker core over ext_proc...");
    let settings = extproc_settings(&perf::flag_defaults::<ExtProcArgs>())?;
    let points = perf::extproc::run(&bin, &settings).await?;
    let _ = writeln!(
        md,
        "## 7. One picker core, driven over ext_proc directly\n\n`target/release/epp-bench perf ext-proc`: no Envoy and no HTTP client; the driver sends each request's ext_proc messages itself.\n\n{}",
        perf::extproc::markdown(&points, &settings)
    );
    let path = a.out.join("perf.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("{md}");
    eprintln!("wrote {}", path.display());
    Ok(())
}

async fn soak(a: &epp_bench::soak::args::SoakArgs, command: &str) -> anyhow::Result<()> {
    use epp_bench::soak;
    let bin = Binaries::locate()?;
    let cfg = a.config(&bin.epp);
    eprintln!(
        "soak: {} s at {} req/s, {} pods, kills at {:?}",
        cfg.duration.as_secs(),
        cfg.rate,
        cfg.pods,
        cfg.kill_times()
    );
    let run = soak::run(&bin, &cfg).await?;
    let summary = soak::report::summarize(&run);
    let files = soak::report::write(&a.out, &run, &summary, command, &machine_line())?;
    println!("{}", std::fs::read_to_string(&files.readme)?);
    eprintln!(
        "wrote {}, {} and {}",
        files.readme.display(),
        files.csv.display(),
        files.png.display()
    );
    Ok(())
}

/// CPU model, cores and date, for the record.
fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {date}")
}

/// Criterion's `name  time: [lo mid hi]` lines as a table, followed by the
/// decision-percentile table the bench prints itself.
fn perf_micro_table(text: &str) -> String {
    use std::fmt::Write as _;
    let mut md =
        String::from("| benchmark | time (criterion's estimate) | range |\n|---|---|---|\n");
    let mut extra = String::new();
    let mut name = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('|') {
            let _ = writeln!(extra, "{t}");
        } else if let Some(i) = t.find("time:") {
            let head = t[..i].trim();
            if !head.is_empty() {
                name = head.to_owned();
            }
            let inner = t[i + 5..]
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let parts: Vec<&str> = inner.split_whitespace().collect();
            // Criterion's "change:" block repeats `time:` with percentages
            // against the previous run; only absolute times belong here.
            if parts.len() >= 6 && !inner.contains('%') {
                let _ = writeln!(
                    md,
                    "| {name} | {} {} | {} {} .. {} {} |",
                    parts[2], parts[3], parts[0], parts[1], parts[4], parts[5]
                );
            }
        } else if !t.is_empty() && !t.contains(' ') && t.contains('/') {
            name = t.to_owned();
        }
    }
    if !extra.is_empty() {
        let _ = writeln!(
            md,
            "\nFull scheduling decision, one sample per decision (`decision_percentiles` in the bench):\n\n{extra}"
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::perf_micro_table;

    #[test]
    fn micro_table_keeps_absolute_times_and_drops_change_lines() {
        let out = "hash_prompt/16KiB       time:   [1.0 µs 1.1 µs 1.2 µs]\n                        change:\n                        time:   [−9.7% −8.0% −6.4%] (p = 0.00 < 0.05)\n                        Performance has improved.\n";
        let md = perf_micro_table(out);
        assert!(
            md.contains("| hash_prompt/16KiB | 1.1 µs | 1.0 µs .. 1.2 µs |"),
            "{md}"
        );
        assert!(!md.contains('%'), "{md}");
    }
}

#[cfg(test)]
mod extproc_defaults {
    use super::*;

    /// `perf all` runs the ext-proc step with the subcommand's defaults: they
    /// must parse, and the pin list must split into picker and driver CPUs.
    #[test]
    fn perf_all_gets_the_subcommands_defaults() {
        let a: ExtProcArgs = perf::flag_defaults();
        assert_eq!(a.body, 4096);
        let s = extproc_settings(&a).expect("defaults are valid");
        assert_eq!(s.pin, Some(("0".to_owned(), "1".to_owned())));
        assert_eq!(s.phases.len(), 2);
        let bad = ExtProcArgs {
            pin: "0".into(),
            ..a
        };
        assert!(
            extproc_settings(&bad).is_err(),
            "a pin without '/' is refused"
        );
    }
}
