//! `epp-bench soak`: its flags, whose defaults are the recorded run
//! (bench/results/soak: 10 minutes, 40 req/s, 4 pods, a kill every 90 s),
//! and the command that runs the soak and writes its results directory.

use std::{path::PathBuf, time::Duration};

use super::{SoakConfig, SoakError, Workload};
use crate::{
    report::{ReportError, provenance::machine_line},
    stack::Binaries,
};

#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Length of the run, seconds (requests are sent until then).
    #[arg(long, default_value_t = 600)]
    pub duration: u64,
    /// Requests per second, open loop.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// Pods, each a separate vllm-sim process.
    #[arg(long, default_value_t = 4)]
    pub pods: usize,
    /// Seconds until the first kill.
    #[arg(long, default_value_t = 45)]
    pub first_kill: u64,
    /// Seconds between kills (0: none).
    #[arg(long, default_value_t = 90)]
    pub kill_every: u64,
    /// Seconds a killed pod stays down before it is started again.
    #[arg(long, default_value_t = 25)]
    pub down_for: u64,
    #[arg(long, default_value_t = 30)]
    pub request_timeout: u64,
    /// Beyond this many requests in flight a due request is counted as not sent.
    #[arg(long, default_value_t = 2000)]
    pub max_inflight: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: usize,
    /// Distinct system prompts.
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// Conversations active at once.
    #[arg(long, default_value_t = 48)]
    pub sessions: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 6)]
    pub turns: usize,
    #[arg(long, default_value_t = 512)]
    pub system_tokens: usize,
    #[arg(long, default_value_t = 48)]
    pub user_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub reply_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A vllm-sim flag for every pod, e.g. --sim-arg=--itl-ms=10 (repeatable).
    #[arg(long = "sim-arg", allow_hyphen_values = true)]
    pub sim_args: Vec<String>,
    /// An epp flag (repeatable).
    #[arg(long = "epp-arg", allow_hyphen_values = true)]
    pub epp_args: Vec<String>,
    /// The vllm-sim binary (default: next to epp).
    #[arg(long)]
    pub sim_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub envoy_concurrency: usize,
    /// Override the Envoy template's cap on concurrent retries in the pool
    /// cluster (e.g. 3, Envoy's default, to see what the template's is for).
    #[arg(long)]
    pub envoy_max_retries: Option<u32>,
    /// Keep the pods', picker's and Envoy's logs here.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Results directory (soak.csv, soak.png, README.md).
    #[arg(long, default_value = "bench/results/soak")]
    pub out: PathBuf,
}

impl SoakArgs {
    /// The run these flags describe; `epp` locates the default vllm-sim.
    pub fn config(&self, epp: &std::path::Path) -> SoakConfig {
        SoakConfig {
            duration: Duration::from_secs(self.duration),
            rate: self.rate,
            pods: self.pods,
            first_kill: Duration::from_secs(self.first_kill),
            kill_every: Duration::from_secs(self.kill_every),
            down_for: Duration::from_secs(self.down_for),
            request_timeout: Duration::from_secs(self.request_timeout),
            max_inflight: self.max_inflight,
            workload: Workload {
                // vllm-sim's default served model.
                model: crate::sim::SimConfig::default().model,
                groups: self.groups,
                sessions: self.sessions,
                turns: self.turns,
                system_tokens: self.system_tokens,
                user_tokens: self.user_tokens,
                reply_tokens: self.reply_tokens,
                max_tokens: self.max_tokens,
                chars_per_token: crate::sim::SimConfig::default().chars_per_token,
                seed: self.seed,
            },
            sim_bin: self
                .sim_bin
                .clone()
                .unwrap_or_else(|| epp.with_file_name("vllm-sim")),
            sim_args: self.sim_args.clone(),
            epp_args: self.epp_args.clone(),
            envoy_concurrency: self.envoy_concurrency,
            envoy_max_retries: self.envoy_max_retries,
            log_dir: self.log_dir.clone(),
        }
    }
}

pub async fn run(a: &SoakArgs, command: &str) -> Result<(), SoakError> {
    let bin = Binaries::locate()?;
    let cfg = a.config(&bin.epp);
    eprintln!(
        "soak: {} s at {} req/s, {} pods, kills at {:?}",
        cfg.duration.as_secs(),
        cfg.rate,
        cfg.pods,
        cfg.kill_times()
    );
    let run = super::run(&bin, &cfg).await?;
    let summary = super::report::summarize(&run);
    let files = super::report::write(&a.out, &run, &summary, command, &machine_line())?;
    let readme = std::fs::read_to_string(&files.readme).map_err(|source| ReportError::Io {
        path: files.readme.clone(),
        source,
    })?;
    println!("{readme}");
    eprintln!(
        "wrote {}, {} and {}",
        files.readme.display(),
        files.csv.display(),
        files.png.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_recorded_run() {
        let a: SoakArgs = crate::perf::flag_defaults();
        let c = a.config(std::path::Path::new("/x/epp"));
        assert_eq!(c.duration, Duration::from_secs(600));
        assert_eq!(c.kill_times().len(), 6);
        assert_eq!(c.sim_bin, PathBuf::from("/x/vllm-sim"));
    }
}
