//! `epp-bench perf`: one subcommand per measurement, each printing its
//! markdown section, and `perf all`, which runs them all into perf.md
//! ([`super::all`]). The flags here become the measurement modules'
//! settings; `perf all` runs each step with the defaults of its subcommand.

use std::{path::PathBuf, time::Duration};

use clap::Subcommand;

use super::{PerfError, all, extproc, footprint, gateway, scale, scrape};
use crate::stack::Binaries;

#[derive(Debug, Subcommand)]
pub enum PerfCommand {
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
    All(all::AllPerfArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Paths: envoy, noop, epp, noop-lean, epp-lean, epp-buffered-lean,
    /// epp-traced.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "envoy,noop,epp,noop-lean,epp-lean,epp-buffered-lean,epp-traced"
    )]
    pub paths: Vec<String>,
    /// Request body sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "1024,16384,225280")]
    pub bodies: Vec<usize>,
    /// Concurrency ladder.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub ladder: Vec<usize>,
    /// Measured requests per step (after a warm-up).
    #[arg(long, default_value_t = 3000)]
    pub requests: usize,
    /// Warm-up requests per step.
    #[arg(long, default_value_t = 300)]
    pub warmup: usize,
    /// Cap on each step's duration, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub max_step: f64,
    #[arg(long, default_value_t = 4)]
    pub backends: usize,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 1)]
    pub envoy_concurrency: usize,
    /// Rotations over the paths per step (each path keeps its best run).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Sampling ratio of the epp-traced path.
    #[arg(long, default_value_t = 0.01)]
    pub trace_sample: f64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ScrapeArgs {
    #[arg(long, default_value_t = 256)]
    pub endpoints: usize,
    #[arg(long, default_value = "50ms")]
    pub interval: String,
    /// Measurement window, seconds.
    #[arg(long, default_value_t = 300.0)]
    pub duration: f64,
    /// `sim` (vllm-sim pods) or a path to a captured /metrics page.
    #[arg(long, default_value = "sim")]
    pub page: String,
    /// The picker's --metrics-name-filter (`=false`: full pages, as before the filter).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    pub name_filter: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DecisionArgs {
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024")]
    pub endpoints: Vec<usize>,
    /// Prompt sizes in bytes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,4096,16384,65536,225280"
    )]
    pub prompts: Vec<usize>,
    #[arg(long, default_value_t = 5000)]
    pub samples: usize,
    /// Directory for the charts.
    #[arg(long, default_value = "bench/results/perf")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct IndexArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub blocks: usize,
    #[arg(long, default_value_t = 64)]
    pub endpoints: u16,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    pub endpoints: Vec<usize>,
    /// Simulated pods per vllm-sim process.
    #[arg(long, default_value_t = 256)]
    pub per_process: usize,
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Scrape interval (1,024 endpoints at 50 ms would take this machine's
    /// cores away from what is measured).
    #[arg(long, default_value = "500ms")]
    pub interval: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ExtProcArgs {
    /// Servers to measure: epp (the picker), noop (the protocol's floor).
    #[arg(long, value_delimiter = ',', default_value = "epp,noop")]
    pub servers: Vec<String>,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 4096)]
    pub body: usize,
    /// Phase profiles: full (response bodies too), lean (no response bodies).
    #[arg(long, value_delimiter = ',', default_value = "full,lean")]
    pub phases: Vec<String>,
    /// Concurrent streams per step.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub ladder: Vec<usize>,
    /// HTTP/2 connections (Envoy opens one per worker).
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    #[arg(long, default_value_t = 40000)]
    pub requests: usize,
    #[arg(long, default_value_t = 2000)]
    pub warmup: usize,
    /// Cap on each step's duration, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub max_step: f64,
    #[arg(long, default_value_t = 8)]
    pub backends: usize,
    /// CPUs for the picker and for the driver (`taskset -c` lists); `none`
    /// to run both unpinned.
    #[arg(long, default_value = "0/1")]
    pub pin: String,
}

pub async fn run(what: PerfCommand, command: &str) -> Result<(), PerfError> {
    match what {
        PerfCommand::Gateway(a) => {
            let bin = Binaries::locate()?;
            let points = gateway::run(&bin, &a.settings()?).await?;
            println!("{}", gateway::markdown(&points));
        }
        PerfCommand::Scrape(a) => {
            let bin = Binaries::locate()?;
            let r = scrape::run(&bin, &a.settings()?).await?;
            println!("{}", scrape::markdown(&[r]));
        }
        PerfCommand::Decisions(a) => println!(
            "{}",
            footprint::decisions_report(&a.endpoints, &a.prompts, a.samples, &a.out)?
        ),
        PerfCommand::Index(a) => {
            let m = footprint::index_memory(a.blocks, a.endpoints);
            println!("{}", footprint::index_markdown(&m));
        }
        PerfCommand::Scale(a) => {
            let bin = Binaries::locate()?;
            println!("{}", a.run(&bin).await?);
        }
        PerfCommand::ExtProc(a) => {
            let bin = Binaries::locate()?;
            let settings = a.settings()?;
            let points = extproc::run(&bin, &settings).await?;
            println!("{}", extproc::markdown(&points, &settings));
        }
        PerfCommand::All(a) => all::run(&a, command).await?,
    }
    Ok(())
}

impl GatewayArgs {
    pub fn settings(&self) -> Result<gateway::GatewayPerf, PerfError> {
        let paths = self
            .paths
            .iter()
            .map(|p| {
                gateway::GatewayPath::parse(p).ok_or_else(|| PerfError::UnknownPath(p.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(gateway::GatewayPerf {
            paths,
            body_sizes: self.bodies.clone(),
            concurrency: self.ladder.clone(),
            requests_per_step: self.requests,
            max_step: Duration::from_secs_f64(self.max_step),
            warmup: self.warmup,
            backends: self.backends,
            envoy_concurrency: self.envoy_concurrency,
            repeats: self.repeats,
            trace_sample: self.trace_sample,
        })
    }
}

impl ExtProcArgs {
    pub fn settings(&self) -> Result<extproc::ExtProcPerf, PerfError> {
        let phases = self
            .phases
            .iter()
            .map(|p| extproc::Phases::parse(p).ok_or_else(|| PerfError::UnknownPhases(p.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let pin = match self.pin.as_str() {
            "none" => None,
            s => {
                let (picker, driver) = s
                    .split_once('/')
                    .ok_or_else(|| PerfError::Pin(s.to_owned()))?;
                Some((picker.to_owned(), driver.to_owned()))
            }
        };
        let servers = self
            .servers
            .iter()
            .map(|s| extproc::Server::parse(s).ok_or_else(|| PerfError::UnknownServer(s.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(extproc::ExtProcPerf {
            servers,
            body_size: self.body,
            phases,
            concurrency: self.ladder.clone(),
            connections: self.connections,
            requests_per_step: self.requests,
            max_step: Duration::from_secs_f64(self.max_step),
            warmup: self.warmup,
            backends: self.backends,
            pin,
        })
    }
}

impl ScrapeArgs {
    pub fn settings(&self) -> Result<scrape::ScrapePerf, PerfError> {
        let page = if self.page == "sim" {
            scrape::Page::Simulated
        } else {
            let text = std::fs::read_to_string(&self.page).map_err(|source| PerfError::Io {
                action: "reading",
                path: PathBuf::from(&self.page),
                source,
            })?;
            scrape::Page::Captured {
                name: std::path::Path::new(&self.page)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                text: text.into(),
            }
        };
        Ok(scrape::ScrapePerf {
            endpoints: self.endpoints,
            interval: self.interval.clone(),
            duration: Duration::from_secs_f64(self.duration),
            sample_every: Duration::from_secs(10),
            page,
            name_filter: self.name_filter,
        })
    }
}

impl ScaleArgs {
    /// One scale-out point per pool size, as markdown.
    pub async fn run(&self, bin: &Binaries) -> Result<String, PerfError> {
        let mut points = Vec::new();
        for &n in &self.endpoints {
            eprintln!("scale: {n} endpoints...");
            points.push(
                scale::run_one(bin, n, self.per_process, self.requests, &self.interval).await?,
            );
        }
        Ok(scale::markdown(&points, &self.interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `perf all` runs the ext-proc step with the subcommand's defaults: they
    /// must parse, and the pin list must split into picker and driver CPUs.
    #[test]
    fn perf_all_gets_the_ext_proc_defaults() {
        let a: ExtProcArgs = crate::perf::flag_defaults();
        assert_eq!(a.body, 4096);
        let s = a.settings().expect("defaults are valid");
        assert_eq!(s.pin, Some(("0".to_owned(), "1".to_owned())));
        assert_eq!(s.phases.len(), 2);
        let bad = ExtProcArgs {
            pin: "0".into(),
            ..a
        };
        assert!(
            matches!(bad.settings(), Err(PerfError::Pin(p)) if p == "0"),
            "a pin without '/' is refused"
        );
    }
}
