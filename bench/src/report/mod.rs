//! Tables and charts from [`BenchRun`]s.
//!
//! * [`seed_table`]: the seed deployment's table layout, to compare with the
//!   issue's numbers line by line.
//! * [`phase_table`]: a per-run summary printed after every workload.
//! * [`write_report`]: the routing comparison — several runs of one workload
//!   (one per policy label) as a markdown table plus PNG charts in a results
//!   directory, with the command lines that produced them, so every figure in
//!   bench/results/ can be regenerated.
//!
//! [`cli`] is the `report` subcommand; [`provenance`] is what every results
//! file records about how it was made; [`paired`] compares two setups
//! request by request from their `--records`.

pub mod charts;
pub mod cli;
pub mod paired;
pub mod provenance;
pub mod tenants;

pub use tenants::tenants_table;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::load::{BenchRun, PhaseResult};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a bench result")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("drawing a chart: {0}")]
    Chart(String),
    #[error("nothing to report: {0}")]
    Empty(String),
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

/// Markdown code span that survives backticks inside the command.
fn code(s: &str) -> String {
    if s.contains('`') {
        format!("`` {s} ``")
    } else {
        format!("`{s}`")
    }
}

/// The seed deployment's table: Scenario | Requests | Concurrency |
/// Throughput | Mean latency | P95 latency (end to end).
pub fn seed_table(run: &BenchRun) -> String {
    let mut out = String::from(
        "| Scenario | Requests | Concurrency | Throughput | Mean latency | P95 latency |\n|---|---|---|---|---|---|\n",
    );
    for p in &run.phases {
        let e2e = p.e2e_ms.as_ref();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} req/s | {} | {} |",
            p.name,
            p.requests_sent,
            p.concurrency
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            p.throughput_rps,
            ms(e2e.map(|s| s.mean_ms)),
            ms(e2e.map(|s| s.p95_ms)),
        );
    }
    out
}

fn errors_cell(p: &PhaseResult) -> String {
    if p.errors.is_empty() {
        return "0".to_owned();
    }
    let parts: Vec<String> = p.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{} ({})", p.error_count(), parts.join(", "))
}

/// One row per phase of one run.
pub fn phase_table(run: &BenchRun) -> String {
    let mut out = String::from(
        "| Phase | Sent | OK | Throughput | TTFT mean | TTFT p50 | TTFT p95 | TTFT p99 | E2E mean | E2E p95 | Hit rate | Ideal | Max/mean pod | Stickiness | Errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in &run.phases {
        let t = p.ttft_ms.as_ref();
        let e = p.e2e_ms.as_ref();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} req/s | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.name,
            p.requests_sent,
            p.requests_ok,
            p.throughput_rps,
            ms(t.map(|s| s.mean_ms)),
            ms(t.map(|s| s.p50_ms)),
            ms(t.map(|s| s.p95_ms)),
            ms(t.map(|s| s.p99_ms)),
            ms(e.map(|s| s.mean_ms)),
            ms(e.map(|s| s.p95_ms)),
            pct(p.prefix_cache.map(|c| c.hit_rate)),
            pct(p.ideal_hit_rate),
            ratio(p.pod_load_max_over_mean),
            pct(p.stickiness),
            errors_cell(p),
        );
    }
    out
}

/// The phase's requests per pod (`sim-0=12 sim-1=4`), `None` when the
/// responses named no pod.
pub fn pod_requests(phase: &PhaseResult) -> Option<String> {
    (!phase.pod_requests.is_empty()).then(|| {
        phase
            .pod_requests
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// Successful requests per target (LoRA adapter or base model) and pod, as
/// a markdown table with a column per pod; `None` when the phase has no
/// such breakdown.
pub fn target_pods_table(phase: &PhaseResult) -> Option<String> {
    let targets = phase.target_pods.as_ref()?;
    let mut pods: Vec<&String> = phase.pod_requests.keys().collect();
    for by_pod in targets.values() {
        pods.extend(by_pod.keys());
    }
    pods.sort();
    pods.dedup();
    let mut out = String::from("| Target |");
    let mut rule = String::from("|---|");
    for pod in &pods {
        let _ = write!(out, " {pod} |");
        rule.push_str("---|");
    }
    let _ = writeln!(out, " Pods used |\n{rule}---|");
    for (target, by_pod) in targets {
        let _ = write!(out, "| {target} |");
        for pod in &pods {
            let _ = write!(out, " {} |", by_pod.get(*pod).copied().unwrap_or(0));
        }
        let _ = writeln!(out, " {} |", by_pod.values().filter(|n| **n > 0).count());
    }
    Some(out)
}

/// The comparison table of several policies on one workload.
pub fn comparison_markdown(title: &str, command: &str, runs: &[(String, BenchRun)]) -> String {
    let multi_phase = runs.iter().any(|(_, r)| r.phases.len() > 1);
    let sticky = runs
        .iter()
        .any(|(_, r)| r.phases.iter().any(|p| p.stickiness.is_some()));
    let lora = runs
        .iter()
        .any(|(_, r)| r.phases.iter().any(|p| p.lora.is_some()));
    let mut out = String::new();
    let _ = writeln!(out, "# {title}\n");
    let _ = writeln!(out, "Generated by {}\n", code(command));
    let machines: Vec<&str> = runs
        .iter()
        .filter_map(|(_, r)| r.machine.as_deref())
        .collect();
    if let Some(first) = machines.first() {
        let _ = writeln!(out, "Machine: {first}\n");
    }
    if let Some((_, first)) = runs.first() {
        let _ = writeln!(
            out,
            "Workload: **{}**, parameters: {}\n",
            first.workload,
            code(&first.params.to_string())
        );
        if let Some(ideal) = first.phases.iter().find_map(|p| p.ideal_hit_rate) {
            let unbounded = first.params["ideal_hit_rate_unbounded"].as_f64();
            let how = match unbounded {
                Some(u) if (u - ideal).abs() > 1e-9 => format!(
                    "every repeated block a hit that an oracle placement keeps cached, after any restart; {} with unbounded caches and no restart, see bench/results/README.md",
                    pct(Some(u))
                ),
                _ => "every repeated block a hit".to_owned(),
            };
            let _ = writeln!(
                out,
                "Ideal prefix-cache hit rate of the workload ({how}): **{}**\n",
                pct(Some(ideal))
            );
        }
    }
    let mut header = String::from("| Policy |");
    let mut rule = String::from("|---|");
    if multi_phase {
        header.push_str(" Phase |");
        rule.push_str("---|");
    }
    header.push_str(" Throughput | TTFT mean | TTFT p50 | TTFT p95 | TTFT p99 | E2E p95 | Hit rate | Ideal hit rate | Max/mean pod load |");
    rule.push_str("---|---|---|---|---|---|---|---|---|");
    if sticky {
        header.push_str(" Stickiness |");
        rule.push_str("---|");
    }
    if lora {
        header.push_str(" Adapter loads / 1k req | Evictions |");
        rule.push_str("---|---|");
    }
    header.push_str(" Errors |");
    rule.push_str("---|");
    let _ = writeln!(out, "{header}\n{rule}");
    for (label, run) in runs {
        for p in &run.phases {
            let t = p.ttft_ms.as_ref();
            let mut row = format!("| {label} |");
            if multi_phase {
                let _ = write!(row, " {} |", p.name);
            }
            let _ = write!(
                row,
                " {:.2} req/s | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.throughput_rps,
                ms(t.map(|s| s.mean_ms)),
                ms(t.map(|s| s.p50_ms)),
                ms(t.map(|s| s.p95_ms)),
                ms(t.map(|s| s.p99_ms)),
                ms(p.e2e_ms.as_ref().map(|s| s.p95_ms)),
                pct(p.prefix_cache.map(|c| c.hit_rate)),
                pct(p.ideal_hit_rate),
                ratio(p.pod_load_max_over_mean),
            );
            if sticky {
                let _ = write!(row, " {} |", pct(p.stickiness));
            }
            if lora {
                match p.lora {
                    Some(l) => {
                        let _ = write!(row, " {:.1} | {} |", l.loads_per_1k_requests, l.evictions);
                    }
                    None => row.push_str(" - | - |"),
                }
            }
            let _ = write!(row, " {} |", errors_cell(p));
            let _ = writeln!(out, "{row}");
        }
    }
    let breakdowns: Vec<(&String, String)> = runs
        .iter()
        .flat_map(|(l, r)| {
            r.phases
                .iter()
                .filter_map(move |p| Some((l, target_pods_table(p)?)))
        })
        .collect();
    if !breakdowns.is_empty() {
        let _ = writeln!(out, "\n## Requests per target and pod\n");
        for (label, table) in breakdowns {
            let _ = writeln!(out, "**{label}**\n\n{table}");
        }
    }
    scenario_details(&mut out, runs);
    if let Some(t) = tenants_table(runs) {
        let _ = writeln!(out, "\n## Tenants and priorities\n\n{t}");
    }
    let _ = writeln!(out, "\n## Runs\n");
    for (label, run) in runs {
        let _ = writeln!(
            out,
            "- **{label}** (target {}): {}",
            run.target,
            code(&run.command)
        );
    }
    out
}

/// The proof scenarios' figures (bench/results/precise-prefix): hit rate
/// against the ideal, traffic through the picker and around it, the
/// restart, and per-replica request counts; nothing when no run has them.
fn scenario_details(out: &mut String, runs: &[(String, BenchRun)]) {
    let phases: Vec<(&String, &PhaseResult)> = runs
        .iter()
        .flat_map(|(l, r)| r.phases.iter().map(move |p| (l, p)))
        .filter(|(_, p)| {
            p.split.is_some()
                || p.restart.is_some()
                || p.epp_replica_requests.is_some()
                || p.replica_kill.is_some()
        })
        .collect();
    if phases.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n## Scenario details\n\n| Policy | Hit rate / ideal | Via picker: TTFT p95 | Via picker: hit rate (usage) | Direct: TTFT p95 | Direct: hit rate (usage) | First request per group after the restart: hit rate | Requests per picker replica | Replica killed: hit rate before / after |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (label, p) in phases {
        let of_ideal = match (p.prefix_cache, p.ideal_hit_rate) {
            (Some(c), Some(i)) if i > 0.0 => ratio(Some(c.hit_rate / i)),
            _ => "-".to_owned(),
        };
        let share = |s: Option<&crate::load::direct::ShareStats>| {
            (
                ms(s.and_then(|s| s.ttft_ms.map(|t| t.p95_ms))),
                pct(s.and_then(|s| s.usage_hit_rate)),
            )
        };
        let (via_ttft, via_hit) = share(p.split.as_ref().map(|s| &s.via_picker));
        let (direct_ttft, direct_hit) = share(p.split.as_ref().map(|s| &s.direct));
        let restart = p.restart.as_ref().map_or_else(
            || "-".to_owned(),
            |r| {
                if r.happened {
                    format!(
                        "{} (from request {})",
                        pct(r.first_after_restart_hit_rate),
                        r.at_request
                    )
                } else {
                    "not reached".to_owned()
                }
            },
        );
        let replicas = p.epp_replica_requests.as_ref().map_or_else(
            || "-".to_owned(),
            |counts| {
                counts
                    .iter()
                    .map(|c| c.map_or_else(|| "?".to_owned(), |c| format!("{c:.0}")))
                    .collect::<Vec<_>>()
                    .join(" / ")
            },
        );
        let kill = p.replica_kill.as_ref().map_or_else(
            || "-".to_owned(),
            |k| {
                if k.happened {
                    format!(
                        "replica {} at {:.0} s: {} / {}",
                        k.replica,
                        k.at_s,
                        pct(k.before.map(|c| c.hit_rate)),
                        pct(k.after.map(|c| c.hit_rate))
                    )
                } else {
                    "not reached".to_owned()
                }
            },
        );
        let _ = writeln!(
            out,
            "| {label} | {of_ideal} | {via_ttft} | {via_hit} | {direct_ttft} | {direct_hit} | {restart} | {replicas} | {kill} |"
        );
    }
}

/// Files written by [`write_report`].
#[derive(Debug, Default)]
pub struct ReportFiles {
    pub markdown: PathBuf,
    pub charts: Vec<PathBuf>,
}

fn slug(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').to_owned()
}

/// Writes `<out_dir>/<workload>.md` and its charts for several policies'
/// runs of one workload. `command` is recorded verbatim in the markdown.
pub fn write_report(
    out_dir: &Path,
    title: &str,
    command: &str,
    runs: &[(String, BenchRun)],
) -> Result<ReportFiles, ReportError> {
    let Some((_, first)) = runs.first() else {
        return Err(ReportError::Empty("no runs given".into()));
    };
    let workload = slug(&first.workload);
    std::fs::create_dir_all(out_dir).map_err(|source| ReportError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut files = ReportFiles::default();
    let labels: Vec<String> = runs.iter().map(|(l, _)| l.clone()).collect();
    let max_phases = runs.iter().map(|(_, r)| r.phases.len()).max().unwrap_or(0);
    if max_phases <= 1 {
        let phase = |r: &BenchRun| r.phases.first().cloned();
        let p95: Vec<f64> = runs
            .iter()
            .map(|(_, r)| {
                phase(r)
                    .and_then(|p| p.ttft_ms.map(|t| t.p95_ms))
                    .unwrap_or(f64::NAN)
            })
            .collect();
        let path = out_dir.join(format!("{workload}-ttft-p95.png"));
        charts::bar_chart(
            &path,
            &format!("{title}: p95 time to first token"),
            "p95 TTFT (ms)",
            &labels,
            &p95,
            None,
        )?;
        files.charts.push(path);
        let hits: Vec<f64> = runs
            .iter()
            .map(|(_, r)| {
                phase(r)
                    .and_then(|p| p.prefix_cache.map(|c| c.hit_rate * 100.0))
                    .unwrap_or(f64::NAN)
            })
            .collect();
        let ideal = runs
            .iter()
            .find_map(|(_, r)| phase(r).and_then(|p| p.ideal_hit_rate))
            .map(|i| (i * 100.0, "ideal hit rate"));
        let path = out_dir.join(format!("{workload}-hit-rate.png"));
        charts::bar_chart(
            &path,
            &format!("{title}: prefix-cache hit rate"),
            "hit rate (%)",
            &labels,
            &hits,
            ideal,
        )?;
        files.charts.push(path);
        let load: Vec<f64> = runs
            .iter()
            .map(|(_, r)| {
                phase(r)
                    .and_then(|p| p.pod_load_max_over_mean)
                    .unwrap_or(f64::NAN)
            })
            .collect();
        let path = out_dir.join(format!("{workload}-pod-load.png"));
        charts::bar_chart(
            &path,
            &format!("{title}: busiest pod / mean"),
            "max/mean requests per pod",
            &labels,
            &load,
            Some((1.0, "perfect balance")),
        )?;
        files.charts.push(path);
        if runs
            .iter()
            .any(|(_, r)| phase(r).is_some_and(|p| p.lora.is_some()))
        {
            let loads: Vec<f64> = runs
                .iter()
                .map(|(_, r)| {
                    phase(r)
                        .and_then(|p| p.lora.map(|l| l.loads_per_1k_requests))
                        .unwrap_or(f64::NAN)
                })
                .collect();
            let path = out_dir.join(format!("{workload}-adapter-loads.png"));
            charts::bar_chart(
                &path,
                &format!("{title}: LoRA adapter loads"),
                "adapter loads per 1,000 requests",
                &labels,
                &loads,
                None,
            )?;
            files.charts.push(path);
        }
    } else {
        let x: Vec<String> = runs
            .iter()
            .max_by_key(|(_, r)| r.phases.len())
            .map(|(_, r)| r.phases.iter().map(|p| p.name.clone()).collect())
            .unwrap_or_default();
        let series = |f: &dyn Fn(&PhaseResult) -> Option<f64>| -> Vec<(String, Vec<f64>)> {
            runs.iter()
                .map(|(l, r)| {
                    (
                        l.clone(),
                        r.phases.iter().map(|p| f(p).unwrap_or(f64::NAN)).collect(),
                    )
                })
                .collect()
        };
        let path = out_dir.join(format!("{workload}-ttft-p95.png"));
        charts::line_chart(
            &path,
            &format!("{title}: p95 time to first token"),
            "p95 TTFT (ms)",
            &x,
            &series(&|p| p.ttft_ms.map(|t| t.p95_ms)),
        )?;
        files.charts.push(path);
        let path = out_dir.join(format!("{workload}-e2e-p95.png"));
        charts::line_chart(
            &path,
            &format!("{title}: p95 end-to-end latency"),
            "p95 latency (ms)",
            &x,
            &series(&|p| p.e2e_ms.map(|t| t.p95_ms)),
        )?;
        files.charts.push(path);
        let path = out_dir.join(format!("{workload}-throughput.png"));
        charts::line_chart(
            &path,
            &format!("{title}: throughput"),
            "req/s",
            &x,
            &series(&|p| Some(p.throughput_rps)),
        )?;
        files.charts.push(path);
    }
    files
        .charts
        .extend(tenants::tenants_charts(out_dir, title, &workload, runs)?);
    let mut md = comparison_markdown(title, command, runs);
    let _ = writeln!(md, "\n## Charts\n");
    for c in &files.charts {
        if let Some(name) = c.file_name().and_then(|n| n.to_str()) {
            let _ = writeln!(md, "![{name}]({name})");
        }
    }
    if !charts::font_available() {
        let _ = writeln!(
            md,
            "\n(Charts drawn without text: {} was not found.)",
            charts::FONT_PATH
        );
    }
    let path = out_dir.join(format!("{workload}.md"));
    std::fs::write(&path, md).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    files.markdown = path;
    Ok(files)
}

/// Reads `--json` files; the label is the run's own, or the file stem when
/// the run has none.
pub fn load_runs(paths: &[PathBuf]) -> Result<Vec<(String, BenchRun)>, ReportError> {
    let mut runs = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
            path: path.clone(),
            source,
        })?;
        let run: BenchRun = serde_json::from_str(&text).map_err(|source| ReportError::Json {
            path: path.clone(),
            source,
        })?;
        let label = if run.label.is_empty() {
            path.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("run")
                .to_owned()
        } else {
            run.label.clone()
        };
        runs.push((label, run));
    }
    if let Some((_, first)) = runs.first()
        && let Some((l, other)) = runs.iter().find(|(_, r)| r.workload != first.workload)
    {
        return Err(ReportError::Empty(format!(
            "runs mix workloads ({} and {} in {l})",
            first.workload, other.workload
        )));
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::load::CacheStats;
    use crate::load::stats::LatencySummary;

    fn lat(p95: f64) -> LatencySummary {
        LatencySummary {
            count: 10,
            mean_ms: p95 / 2.0,
            p50_ms: p95 / 2.0,
            p95_ms: p95,
            p99_ms: p95 * 1.1,
            min_ms: 1.0,
            max_ms: p95 * 1.2,
        }
    }

    fn phase(name: &str, p95: f64, hit: f64) -> PhaseResult {
        PhaseResult {
            name: name.into(),
            planned_jobs: 10,
            concurrency: Some(2),
            rate_rps: None,
            duration_s: 1.0,
            hit_max_duration: false,
            requests_sent: 10,
            requests_ok: 9,
            errors: BTreeMap::from([("429".to_owned(), 1)]),
            throughput_rps: 9.0,
            output_tokens_per_s: 144.0,
            ttft_ms: Some(lat(p95)),
            e2e_ms: Some(lat(p95 * 2.0)),
            pod_requests: BTreeMap::from([("sim-0".to_owned(), 5), ("sim-1".to_owned(), 4)]),
            pod_load_max_over_mean: Some(5.0 / 4.5),
            prefix_cache: Some(CacheStats {
                hit_tokens: hit * 100.0,
                query_tokens: 100.0,
                hit_rate: hit,
            }),
            prefix_cache_error: None,
            usage_cached_ratio: Some(hit),
            ideal_hit_rate: Some(0.7),
            stickiness: None,
            lora: None,
            target_pods: None,
            split: None,
            restart: None,
            epp_replica_requests: None,
            tenants: None,
            replica_kill: None,
        }
    }

    fn run(label: &str, phases: Vec<PhaseResult>) -> BenchRun {
        BenchRun {
            schema: 1,
            tool: "epp-bench test".into(),
            workload: "shared-prefix".into(),
            label: label.into(),
            target: "http://127.0.0.1:1".into(),
            command: format!("epp-bench shared-prefix --label {label}"),
            started_unix_s: 0,
            machine: Some("2 cores (test CPU), today".into()),
            params: serde_json::json!({"groups": 2}),
            phases,
        }
    }

    #[test]
    fn seed_table_matches_issue_layout() {
        let r = run("x", vec![phase("Baseline", 100.0, 0.0)]);
        let t = seed_table(&r);
        assert!(t.starts_with(
            "| Scenario | Requests | Concurrency | Throughput | Mean latency | P95 latency |"
        ));
        assert!(
            t.contains("| Baseline | 10 | 2 | 9.00 req/s | 100 ms | 200 ms |"),
            "{t}"
        );
    }

    #[test]
    fn report_writes_table_and_charts() {
        let dir = std::env::temp_dir().join(format!("epp-bench-report-{}", std::process::id()));
        let runs = vec![
            (
                "epp-default".to_owned(),
                run("epp-default", vec![phase("shared-prefix", 120.0, 0.68)]),
            ),
            (
                "round-robin".to_owned(),
                run("round-robin", vec![phase("shared-prefix", 900.0, 0.05)]),
            ),
        ];
        let files = write_report(
            &dir,
            "Shared prefix",
            "epp-bench report --inputs a.json,b.json",
            &runs,
        )
        .unwrap();
        let md = std::fs::read_to_string(&files.markdown).unwrap();
        assert!(md.contains("`epp-bench report --inputs a.json,b.json`"));
        assert!(
            md.contains("\nMachine: 2 cores (test CPU), today\n"),
            "{md}"
        );
        assert!(md.contains("| epp-default | 9.00 req/s | 60 ms | 60 ms | 120 ms | 132 ms | 240 ms | 68.0% | 70.0% | 1.11 | 1 (429: 1) |"), "{md}");
        assert!(md.contains("Ideal prefix-cache hit rate of the workload"));
        assert!(md.contains("`epp-bench shared-prefix --label round-robin`"));
        assert_eq!(files.charts.len(), 3);
        for c in &files.charts {
            let bytes = std::fs::read(c).unwrap();
            assert_eq!(&bytes[1..4], b"PNG");
        }
        // Multi-phase runs get line charts and a phase column.
        let ladder = vec![(
            "a".to_owned(),
            run(
                "a",
                vec![phase("c=20", 100.0, 0.0), phase("c=60", 300.0, 0.0)],
            ),
        )];
        let files = write_report(&dir, "Ladder", "cmd", &ladder).unwrap();
        let md = std::fs::read_to_string(&files.markdown).unwrap();
        assert!(md.contains("| Policy | Phase |"));
        assert!(md.contains("| a | c=60 |"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lora_runs_get_swap_columns_a_breakdown_and_a_chart() {
        let dir = std::env::temp_dir().join(format!("epp-bench-lora-{}", std::process::id()));
        let mut p = phase("lora", 300.0, 0.5);
        p.lora = Some(crate::load::LoraStats {
            loads: 12.0,
            evictions: 4.0,
            loads_per_1k_requests: 12.0 * 1000.0 / 9.0,
        });
        p.target_pods = Some(BTreeMap::from([
            (
                "lora-0".to_owned(),
                BTreeMap::from([("sim-0".to_owned(), 5)]),
            ),
            (
                "m".to_owned(),
                BTreeMap::from([("sim-0".to_owned(), 1), ("sim-1".to_owned(), 3)]),
            ),
        ]));
        let runs = vec![
            ("ours".to_owned(), run("ours", vec![p])),
            ("rr".to_owned(), run("rr", vec![phase("lora", 900.0, 0.1)])),
        ];
        let files = write_report(&dir, "LoRA", "cmd", &runs).unwrap();
        let md = std::fs::read_to_string(&files.markdown).unwrap();
        assert!(
            md.contains("| Adapter loads / 1k req | Evictions | Errors |"),
            "{md}"
        );
        assert!(md.contains("| 1333.3 | 4 | 1 (429: 1) |"), "{md}");
        assert!(md.contains("| - | - | 1 (429: 1) |"), "{md}");
        assert!(
            md.contains("| Target | sim-0 | sim-1 | Pods used |"),
            "{md}"
        );
        assert!(md.contains("| lora-0 | 5 | 0 | 1 |"), "{md}");
        assert!(md.contains("| m | 1 | 3 | 2 |"), "{md}");
        assert_eq!(files.charts.len(), 4);
        assert!(files.charts[3].ends_with("shared-prefix-adapter-loads.png"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_runs_round_trips_json() {
        let dir = std::env::temp_dir().join(format!("epp-bench-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = run("", vec![phase("p", 1.0, 0.5)]);
        let path = dir.join("rr.json");
        std::fs::write(&path, serde_json::to_string(&r).unwrap()).unwrap();
        let runs = load_runs(std::slice::from_ref(&path)).unwrap();
        assert_eq!(runs[0].0, "rr", "file stem when unlabeled");
        r.workload = "seed".into();
        let other = dir.join("other.json");
        std::fs::write(&other, serde_json::to_string(&r).unwrap()).unwrap();
        assert!(load_runs(&[path, other]).is_err(), "mixed workloads");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
