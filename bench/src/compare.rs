//! `epp-bench compare`: routing policies compared on one workload. Each
//! policy gets a fresh local stack, so every policy meets the workload with
//! cold pods and empty caches; the run is saved as `OUT/<policy>.json` and
//! all of them become one report (markdown and charts), as `epp-bench
//! report` would write it from those files.
//!
//! `compare lora` gives the pods the workload's adapters
//! (`--lora-adapters=lora-0,...`) unless a `--sim-arg` names them; the slot
//! count and load time stay explicit (`--sim-arg=--max-loras=2`).

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::{
    load::{
        self, BenchRun, LoadError,
        args::{LongPromptArgs, LoraArgs, MultiTurnArgs, SeedArgs, SharedPrefixArgs, TenantsArgs},
        workload::LoraMix,
    },
    report::{self, ReportError},
    stack::{
        Binaries, Router, Stack, StackError,
        args::StackArgs,
        replicas::{ReplicaKiller, routed_per_replica},
    },
};

#[derive(Debug, Subcommand)]
pub enum CompareWorkload {
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
    Lora {
        #[command(flatten)]
        args: LoraArgs,
        #[command(flatten)]
        compare: CompareArgs,
    },
    Tenants {
        #[command(flatten)]
        args: TenantsArgs,
        #[command(flatten)]
        compare: CompareArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Routing policies, in order: epp-default, gie-default, any bench/configs/<name>,
    /// a config file path, envoy-rr (Envoy round robin, no picker) or direct (pod 0, no gateway).
    /// `LABEL=POLICY` names a policy's runs LABEL (e.g. approximate=epp-default).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "epp-default,gie-default,prefix-only,queue-only,random,round-robin,envoy-rr"
    )]
    pub policies: Vec<String>,
    /// Directory for the markdown report, charts and per-policy JSON.
    #[arg(long)]
    pub out: PathBuf,
    /// Report title (default: the workload).
    #[arg(long)]
    pub title: Option<String>,
    /// Kill (SIGKILL) the last picker replica this many seconds after the
    /// workload starts (with --epp-replicas >= 2); the report gives the hit
    /// rate before and after, the errors count what the gateway lost.
    #[arg(long)]
    pub kill_replica_at: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("--kill-replica-at needs --epp-replicas 2 or more")]
    KillNeedsReplicas,
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error("starting the stack for {policy}")]
    Start {
        policy: String,
        #[source]
        source: StackError,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("serializing the result of {policy}")]
    Serialize {
        policy: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CompareWorkload {
    fn compare_args(&self) -> &CompareArgs {
        match self {
            Self::Seed { compare, .. }
            | Self::SharedPrefix { compare, .. }
            | Self::LongPrompt { compare, .. }
            | Self::MultiTurn { compare, .. }
            | Self::Lora { compare, .. }
            | Self::Tenants { compare, .. } => compare,
        }
    }

    /// The stack flags, with what the workload needs of the pods added.
    fn stack_args(&self) -> StackArgs {
        let mut stack = self.compare_args().stack.clone();
        if let Self::Lora { args, .. } = self
            && !stack
                .sim_args
                .iter()
                .any(|a| a.starts_with("--lora-adapters"))
        {
            let names: Vec<String> = (0..args.adapters).map(LoraMix::adapter_name).collect();
            stack
                .sim_args
                .push(format!("--lora-adapters={}", names.join(",")));
        }
        stack
    }

    /// Runs the workload through `stack`, labelled `policy`; the pods hold
    /// `kv_blocks` blocks each.
    async fn run_through(
        &self,
        stack: &Stack,
        kv_blocks: usize,
        policy: &str,
        command: &str,
    ) -> Result<BenchRun, LoadError> {
        let (gateway, pods) = (stack.gateway.as_str(), stack.pod_urls.as_slice());
        match self {
            Self::Seed { args, .. } => {
                let mut a = args.clone();
                a.common.point_at(gateway, pods, policy);
                load::run_seed(&a, command).await
            }
            Self::SharedPrefix { args, .. } => {
                let mut a = args.clone();
                a.common.point_at(gateway, pods, policy);
                a.restarter = stack.restarter();
                a.kv_blocks_per_pod.get_or_insert(kv_blocks);
                load::run_shared_prefix(&a, command).await
            }
            Self::LongPrompt { args, .. } => {
                let mut a = args.clone();
                a.common.point_at(gateway, pods, policy);
                load::run_long_prompt(&a, command).await
            }
            Self::MultiTurn { args, .. } => {
                let mut a = args.clone();
                a.common.point_at(gateway, pods, policy);
                load::run_multi_turn(&a, command).await
            }
            Self::Lora { args, .. } => {
                let mut a = args.clone();
                a.common.point_at(gateway, pods, policy);
                load::run_lora(&a, command).await
            }
            Self::Tenants { args, .. } => {
                let mut a = args.clone();
                a.common.point_at(gateway, pods, policy);
                load::run_tenants(&a, command).await
            }
        }
    }
}

pub async fn run(workload: CompareWorkload, command: &str) -> Result<(), CompareError> {
    let bin = Binaries::locate()?;
    let compare = workload.compare_args();
    std::fs::create_dir_all(&compare.out).map_err(|source| CompareError::Io {
        action: "creating",
        path: compare.out.clone(),
        source,
    })?;
    let stack_args = workload.stack_args();
    if compare.kill_replica_at.is_some() && stack_args.epp_replicas < 2 {
        return Err(CompareError::KillNeedsReplicas);
    }
    let mut runs = Vec::new();
    for spec in &compare.policies {
        let (label, policy) = spec.split_once('=').unwrap_or((spec, spec));
        let (label, policy) = (&label.to_owned(), policy);
        let router = Router::policy(policy, &bin.repo)?;
        let opts = stack_args.options(router)?;
        let stack = Stack::start(&bin, &opts)
            .await
            .map_err(|source| CompareError::Start {
                policy: label.clone(),
                source,
            })?;
        eprintln!("{label}: stack up at {}", stack.gateway);
        let pids = stack.epp_replica_pids();
        let killer = match (compare.kill_replica_at, pids.last()) {
            (Some(at), Some(&pid)) if pids.len() > 1 && at.is_finite() && at >= 0.0 => Some(
                ReplicaKiller::arm(
                    crate::load::client::http_client(2),
                    stack.pod_urls.clone(),
                    pid,
                    pids.len() - 1,
                    std::time::Duration::from_secs_f64(at),
                )
                .await,
            ),
            _ => None,
        };
        let mut run = workload
            .run_through(&stack, opts.sim.kv_blocks, label, command)
            .await?;
        if let (Some(m), Some(t)) = (
            stack.epp_metrics,
            run.phases.last_mut().and_then(|p| p.tenants.as_mut()),
        ) {
            let client = crate::load::client::http_client(2);
            let url = format!("http://{m}/metrics");
            if let Ok(page) =
                crate::load::runner::get_text(&client, &url, std::time::Duration::from_secs(10))
                    .await
            {
                t.prediction = crate::load::tenants::prediction_stats(&page);
            }
        }
        if let Some(k) = killer {
            let kill = k.finish().await;
            if let Some(p) = run.phases.last_mut() {
                p.replica_kill = Some(kill);
            }
        }
        if stack.epp_replica_metrics.len() > 1 {
            let client = crate::load::client::http_client(2);
            let counts = routed_per_replica(&client, &stack.epp_replica_metrics).await;
            if let Some(p) = run.phases.last_mut() {
                p.epp_replica_requests = Some(counts);
            }
        }
        stack.stop().await;
        print!("{}", report::phase_table(&run));
        let path = compare.out.join(format!("{}.json", file_name(label)));
        let json =
            serde_json::to_string_pretty(&run).map_err(|source| CompareError::Serialize {
                policy: label.clone(),
                source,
            })?;
        std::fs::write(&path, json).map_err(|source| CompareError::Io {
            action: "writing",
            path: path.clone(),
            source,
        })?;
        runs.push((label.clone(), run));
    }
    report::cli::write_and_print(&compare.out, compare.title.clone(), command, &runs)?;
    Ok(())
}

/// A policy given as a config path is saved under the file's stem.
fn file_name(policy: &str) -> String {
    Path::new(policy)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| policy.to_owned())
}
