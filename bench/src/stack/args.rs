//! Flags that build a stack, shared by `local` and `compare`.

use std::path::PathBuf;

use clap::Parser;

use super::{BodyMode, Router, StackError, StackOptions};
use crate::sim::SimConfig;

/// How to build each stack.
#[derive(Debug, Clone, clap::Args)]
pub struct StackArgs {
    /// Simulated pods.
    #[arg(long, default_value_t = 8)]
    pub pods: u16,
    /// A vllm-sim flag applied to every pod, e.g. --sim-arg=--kv-blocks=4096 (repeatable).
    #[arg(long = "sim-arg", allow_hyphen_values = true)]
    pub sim_args: Vec<String>,
    /// An epp flag added to the picker's command line (repeatable).
    #[arg(long = "epp-arg", allow_hyphen_values = true)]
    pub epp_args: Vec<String>,
    /// Envoy sends request and response bodies buffered instead of full-duplex streamed.
    #[arg(long)]
    pub buffered: bool,
    /// Envoy talks plaintext h2c to the picker (default: TLS, as in production).
    #[arg(long)]
    pub plaintext: bool,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 1)]
    pub envoy_concurrency: usize,
    /// Keep the picker's and Envoy's logs in this directory.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Pods publish KV events (vLLM's ZeroMQ format, each pod its own event
    /// and replay port); the endpoints file lists them per endpoint
    /// (`kvEvents: {port, replayPort}`) and the picker gets `--kv-events`
    /// when it has that flag. Shape and topic: --sim-arg=--kv-events-encoding=array etc.
    #[arg(long)]
    pub kv_events: bool,
    /// Picker replicas behind Envoy, each with its own index (round robin
    /// over their ext_proc servers).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub epp_replicas: u16,
}

impl StackArgs {
    /// The options of a stack routed by `router`.
    pub fn options(&self, router: Router) -> Result<StackOptions, StackError> {
        let mut opts = StackOptions::new(self.sim_config()?, router);
        if let Router::Epp { extra_args, .. } = &mut opts.router {
            extra_args.extend(self.epp_args.iter().cloned());
        }
        if self.buffered {
            opts.body_mode = BodyMode::Buffered;
        }
        opts.epp_tls = !self.plaintext;
        opts.envoy_concurrency = self.envoy_concurrency;
        opts.log_dir = self.log_dir.clone();
        opts.kv_events = self.kv_events;
        opts.epp_replicas = usize::from(self.epp_replicas);
        Ok(opts)
    }

    /// The pods' simulator settings: `--sim-arg` values parsed as
    /// `vllm-sim` parses its command line, so both accept the same flags.
    fn sim_config(&self) -> Result<SimConfig, StackError> {
        #[derive(Parser)]
        struct SimCli {
            #[command(flatten)]
            sim: SimConfig,
        }
        let argv = std::iter::once("vllm-sim".to_owned()).chain(self.sim_args.iter().cloned());
        let mut sim = SimCli::try_parse_from(argv)
            .map_err(StackError::SimArgs)?
            .sim;
        sim.pods = self.pods;
        Ok(sim)
    }
}
