//! `epp-bench report`: the `--json` results of one workload, one per
//! policy, combined into a markdown table and PNG charts. `compare` ends
//! the same way with the runs it just made.

use std::path::{Path, PathBuf};

use super::{ReportError, load_runs, write_report};
use crate::load::BenchRun;

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Result files written by --json, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub inputs: Vec<PathBuf>,
    /// Directory for the markdown and the charts.
    #[arg(long)]
    pub out: PathBuf,
    /// Title of the report (default: the workload).
    #[arg(long)]
    pub title: Option<String>,
}

pub fn run(a: &ReportArgs, command: &str) -> Result<(), ReportError> {
    let runs = load_runs(&a.inputs)?;
    write_and_print(&a.out, a.title.clone(), command, &runs)
}

/// Writes the report of `runs` into `out` and prints its markdown; the
/// title defaults to the workload's name.
pub fn write_and_print(
    out: &Path,
    title: Option<String>,
    command: &str,
    runs: &[(String, BenchRun)],
) -> Result<(), ReportError> {
    let title = title
        .or_else(|| runs.first().map(|(_, r)| r.workload.clone()))
        .unwrap_or_default();
    let files = write_report(out, &title, command, runs)?;
    let markdown = std::fs::read_to_string(&files.markdown).map_err(|source| ReportError::Io {
        path: files.markdown.clone(),
        source,
    })?;
    println!("{markdown}");
    eprintln!(
        "wrote {} and {} charts",
        files.markdown.display(),
        files.charts.len()
    );
    Ok(())
}
