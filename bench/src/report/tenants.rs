//! The tenants workload's table and charts (flow control's proof): per
//! policy, critical and standard TTFT, goodput per tenant against its fair
//! share, Jain's index, refusals and losses, and the TTFT objective met.
//!
//! Two runs are references when present: the one labelled `unloaded` (the
//! critical p95 TTFT of a lightly loaded pool) and the one labelled `off`
//! (flow control off: the total goodput others are compared with).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{ReportError, charts, ms, pct, ratio};
use crate::load::{BenchRun, result::TenantsStats};

/// The label of the unloaded reference run.
pub const UNLOADED: &str = "unloaded";
/// The label of the flow-control-off reference run.
pub const OFF: &str = "off";

/// The tenants figures and the goodput within the arrival window.
fn stats(run: &BenchRun) -> Option<(&TenantsStats, f64)> {
    let t = run.phases.first()?.tenants.as_ref()?;
    Some((t, t.goodput_rps))
}

fn objective<'a>(run: &'a BenchRun, key: &str, default: &'a str) -> &'a str {
    run.params[key].as_str().unwrap_or(default)
}

fn critical_p95(run: &BenchRun) -> Option<f64> {
    let (t, _) = stats(run)?;
    let name = objective(run, "critical_objective", "critical");
    t.ttft_by_objective.get(name).map(|s| s.p95_ms)
}

fn reference<'a>(runs: &'a [(String, BenchRun)], label: &str) -> Option<&'a BenchRun> {
    runs.iter().find(|(l, _)| l == label).map(|(_, r)| r)
}

/// The markdown table; `None` when no run has tenant figures.
pub fn tenants_table(runs: &[(String, BenchRun)]) -> Option<String> {
    if !runs.iter().any(|(_, r)| stats(r).is_some()) {
        return None;
    }
    let unloaded = reference(runs, UNLOADED).and_then(critical_p95);
    let off = reference(runs, OFF).and_then(stats).map(|(_, g)| g);
    let mut out = String::from(
        "| Policy | Critical TTFT p50 / p95 | Critical p95 / unloaded | Standard TTFT p50 / p95 | Goodput (arrival window) | Goodput / off | Per tenant: goodput (fair share) | Jain (goodput) | Jain (goodput / fair share) | Refused | Lost after admission | TTFT objective met (of sent / of served) | TTFT prediction: observed / predicted within ±25% (within 2x), median bucket |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (label, run) in runs {
        let Some((t, goodput)) = stats(run) else {
            continue;
        };
        let lat = |key: &str, default: &str| {
            let s = t.ttft_by_objective.get(objective(run, key, default));
            format!("{} / {}", ms(s.map(|s| s.p50_ms)), ms(s.map(|s| s.p95_ms)))
        };
        let per_tenant: Vec<String> = t
            .tenants
            .iter()
            .map(|(n, s)| {
                format!(
                    "{n} {:.2} ({:.2}) of {:.1} offered",
                    s.goodput_rps, s.fair_share_rps, s.offered_rps
                )
            })
            .collect();
        let slo = match t.slo_ttft_ms {
            Some(ms_) => format!(
                "{} / {} (≤ {ms_} ms)",
                pct(t.slo_met_of_sent),
                pct(t.slo_met_of_ok)
            ),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {goodput:.2} req/s | {} | {} | {} | {} | {} | {} | {slo} | {} |",
            lat("critical_objective", "critical"),
            ratio(critical_p95(run).zip(unloaded).map(|(c, u)| c / u)),
            lat("standard_objective", "standard"),
            ratio(off.filter(|o| *o > 0.0).map(|o| goodput / o)),
            per_tenant.join("; "),
            ratio(t.jain_goodput),
            ratio(t.jain_of_fair_share),
            t.refused,
            t.lost,
            t.prediction.map_or_else(
                || "-".to_owned(),
                |p| format!(
                    "{} ({}) of {:.0}, ≤ {}",
                    pct(Some(p.within_25pct)),
                    pct(Some(p.within_2x)),
                    p.count,
                    p.median_ratio_le
                )
            ),
        );
    }
    Some(out)
}

/// Bar charts of the critical p95 TTFT (with the 1.5x-unloaded target),
/// Jain's index (with 0.95) and the total goodput (with 0.95 of off).
pub fn tenants_charts(
    out_dir: &Path,
    title: &str,
    workload: &str,
    runs: &[(String, BenchRun)],
) -> Result<Vec<PathBuf>, ReportError> {
    let runs: Vec<&(String, BenchRun)> = runs.iter().filter(|(_, r)| stats(r).is_some()).collect();
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let labels: Vec<String> = runs.iter().map(|(l, _)| l.clone()).collect();
    let all: Vec<(String, BenchRun)> = runs.iter().map(|(l, r)| (l.clone(), r.clone())).collect();
    let unloaded = reference(&all, UNLOADED).and_then(critical_p95);
    let off = reference(&all, OFF).and_then(stats).map(|(_, g)| g);
    let mut files = Vec::new();
    let critical: Vec<f64> = runs
        .iter()
        .map(|(_, r)| critical_p95(r).unwrap_or(f64::NAN))
        .collect();
    let path = out_dir.join(format!("{workload}-critical-ttft-p95.png"));
    charts::bar_chart(
        &path,
        &format!("{title}: critical requests' p95 TTFT"),
        "p95 TTFT (ms)",
        &labels,
        &critical,
        unloaded.map(|u| (1.5 * u, "1.5x unloaded")),
    )?;
    files.push(path);
    let jain: Vec<f64> = runs
        .iter()
        .map(|(_, r)| {
            stats(r)
                .and_then(|(t, _)| t.jain_goodput)
                .unwrap_or(f64::NAN)
        })
        .collect();
    let path = out_dir.join(format!("{workload}-jain.png"));
    charts::bar_chart(
        &path,
        &format!("{title}: Jain's index over the tenants' goodput"),
        "Jain's index",
        &labels,
        &jain,
        Some((0.95, "target 0.95")),
    )?;
    files.push(path);
    let goodput: Vec<f64> = runs
        .iter()
        .map(|(_, r)| stats(r).map_or(f64::NAN, |(_, g)| g))
        .collect();
    let path = out_dir.join(format!("{workload}-goodput.png"));
    charts::bar_chart(
        &path,
        &format!("{title}: total goodput"),
        "successful requests / s",
        &labels,
        &goodput,
        off.map(|o| (0.95 * o, "0.95 x off")),
    )?;
    files.push(path);
    Ok(files)
}
