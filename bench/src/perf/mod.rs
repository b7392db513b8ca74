//! Performance measurements of the endpoint picker (issue: measure the EPP's
//! overhead, throughput and scale against Envoy alone).
//!
//! - [`gateway`]: latency and throughput through Envoy with no ext_proc, a
//!   no-op ext_proc (the protocol's floor) and the picker, lean variants;
//! - [`scrape`]: CPU and memory of scraping many endpoints at 50 ms;
//! - [`footprint`]: decision time against pool size and prompt length, and
//!   prefix-index memory per block (in process, on the picker's library);
//! - [`scale`]: the real picker with pools of up to 1,024 simulated pods;
//! - [`extproc`]: the picker alone on one core, driven over ext_proc
//!   directly (no Envoy, no HTTP load generator);
//! - [`noop`]: the no-op ext_proc server itself.
//!
//! `epp-bench perf <measurement>` ([`cli`]) runs one of them and prints its
//! markdown; `epp-bench perf all` ([`all`]) runs everything and writes
//! bench/results/perf.md.

pub mod all;
pub mod backend;
pub mod cli;
pub mod driver;
pub mod extproc;
pub mod footprint;
pub mod gateway;
pub mod noop;
pub mod otlp_sink;
pub mod proc_stats;
pub mod scale;
pub mod scrape;

use std::path::PathBuf;

use crate::{report::ReportError, sim::SimConfig, stack::StackError};

#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("unknown path {0}")]
    UnknownPath(String),
    #[error("unknown phases {0}")]
    UnknownPhases(String),
    #[error("unknown server {0}")]
    UnknownServer(String),
    #[error("--pin {0}: expected PICKER_CPUS/DRIVER_CPUS")]
    Pin(String),
    #[error("timing decisions: {0}")]
    Decisions(String),
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The picker's flags in every overhead measurement: no fallback endpoints
/// (the destination header names one), and with `lean` only the response
/// phases routing needs.
pub fn epp_perf_args(lean: bool) -> Vec<String> {
    let mut args = vec!["--fallback-endpoints".to_owned(), "0".to_owned()];
    if lean {
        args.extend(["--response-processing".to_owned(), "minimal".to_owned()]);
    }
    args
}

/// The simulator's default flags (as `vllm-sim` with no arguments).
pub fn default_sim_config() -> SimConfig {
    flag_defaults()
}

/// A flag group's defaults, as parsing no arguments gives them (how `perf
/// all` runs a step with the settings its own subcommand would use).
///
/// # Panics
/// When a flag of `T` has no default: a programming error that the first
/// run of the command shows.
pub fn flag_defaults<T: clap::Args>() -> T {
    #[derive(clap::Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        a: A,
    }
    <Cli<T> as clap::Parser>::try_parse_from(["defaults"])
        .map(|c| c.a)
        .unwrap_or_else(|e| panic!("flag defaults do not parse: {e}"))
}
