//! The soak's results: per-second rows (soak.csv), a chart of throughput,
//! failures, latency and the picker's memory and CPU with the kill and
//! restart times marked (soak.png), and a README.md with the totals, each
//! failure explained, and latency per window.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use plotters::prelude::*;

use super::{Event, EventKind, Outcome, Record, Sample, SoakRun};
use crate::{
    load::stats::percentile,
    report::{
        ReportError,
        charts::{FONT, font_available, write_png_sized},
    },
};

/// Why a request did not succeed, once attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// It was in flight at the moment a pod was killed: a request the pod
    /// had already received dies with the pod's connection, and the
    /// gateway does not retry a request that may have been processed.
    InFlightAtKill,
    /// Anything else: this is what the soak is looking for.
    Other,
}

/// One second of the run (requests counted when sent, outcomes when done).
#[derive(Debug, Clone, Default)]
pub struct Second {
    pub sent: usize,
    pub ok: usize,
    pub failed: BTreeMap<String, usize>,
    /// Latencies of the requests that succeeded in this second, ms.
    pub ok_ms: Vec<f64>,
    pub sample: Option<Sample>,
    pub events: Vec<String>,
}

/// A pod's outage and what it cost.
#[derive(Debug, Clone)]
pub struct Outage {
    pub pod: String,
    pub killed_at: f64,
    pub restarted_at: Option<f64>,
    /// Failed requests that were in flight at the kill.
    pub failed_in_flight: usize,
    /// Requests in flight at the kill that still succeeded (on other pods,
    /// or finished just before the connection died).
    pub survived_in_flight: usize,
    /// Seconds from the restart until the pod's first successful request.
    pub back_after: Option<f64>,
    /// Successful requests the pod served between its restart and the next
    /// kill (or the end).
    pub served_after: usize,
}

/// A window of the run.
#[derive(Debug, Clone)]
pub struct Window {
    pub from: u64,
    pub to: u64,
    pub sent: usize,
    pub ok: usize,
    pub failed: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub kills: usize,
}

/// The totals a reader (and the smoke test) checks.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Requests due by the schedule.
    pub due: usize,
    /// Due but not sent (client in-flight cap).
    pub not_sent: usize,
    pub sent: usize,
    pub ok: usize,
    pub failed: usize,
    /// (cause, kind) -> (count, one example's detail).
    pub failures: BTreeMap<(Cause, String), (usize, String)>,
    pub failed_at_kill: usize,
    pub failed_other: usize,
    pub outages: Vec<Outage>,
    pub served_by_pod: BTreeMap<String, usize>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub windows: Vec<Window>,
    pub rss_start_kb: u64,
    pub rss_end_kb: u64,
    pub rss_max_kb: u64,
    pub cpu_mean_pct: f64,
    pub loadavg_mean: f64,
    pub loadavg_max: f64,
    pub seconds: Vec<Second>,
    /// Error kinds in a stable order (the CSV's columns).
    pub kinds: Vec<String>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The cause of a failed record.
pub fn cause(r: &Record, kills: &[f64]) -> Cause {
    let (sent, done) = (secs(r.sent), secs(r.done));
    if kills.iter().any(|&k| sent <= k && k <= done) {
        Cause::InFlightAtKill
    } else {
        Cause::Other
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Folds a run into per-second rows and totals.
pub fn summarize(run: &SoakRun) -> Summary {
    let mut s = Summary::default();
    let kills: Vec<f64> = run
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Kill)
        .map(|e| secs(e.at))
        .collect();
    let end = run
        .records
        .iter()
        .map(|r| secs(r.done))
        .chain(run.samples.iter().map(|x| secs(x.at)))
        .fold(secs(run.config.duration), f64::max);
    let n = end.ceil() as usize + 1;
    s.seconds = vec![Second::default(); n];
    let at = |t: Duration| (t.as_secs() as usize).min(n - 1);
    let mut all_ok = Vec::new();
    let mut kinds = std::collections::BTreeSet::new();
    s.due = run.records.len();
    for r in &run.records {
        match &r.outcome {
            Outcome::Ok { pod } => {
                s.sent += 1;
                s.seconds[at(r.sent)].sent += 1;
                s.ok += 1;
                let ms = secs(r.done - r.sent) * 1000.0;
                all_ok.push(ms);
                let sec = &mut s.seconds[at(r.done)];
                sec.ok += 1;
                sec.ok_ms.push(ms);
                *s.served_by_pod
                    .entry(pod.clone().unwrap_or_else(|| "(no header)".into()))
                    .or_default() += 1;
            }
            Outcome::Failed { kind, detail } => {
                if kind == "not sent" {
                    s.not_sent += 1;
                } else {
                    s.sent += 1;
                    s.seconds[at(r.sent)].sent += 1;
                    s.failed += 1;
                }
                kinds.insert(kind.clone());
                *s.seconds[at(r.done)]
                    .failed
                    .entry(kind.clone())
                    .or_default() += 1;
                let c = cause(r, &kills);
                match c {
                    Cause::InFlightAtKill => s.failed_at_kill += 1,
                    Cause::Other => s.failed_other += 1,
                }
                let e = s
                    .failures
                    .entry((c, kind.clone()))
                    .or_insert_with(|| (0, detail.clone()));
                e.0 += 1;
            }
        }
    }
    s.kinds = kinds.into_iter().collect();
    let all_ok = sorted(all_ok);
    s.p50_ms = percentile(&all_ok, 0.5);
    s.p99_ms = percentile(&all_ok, 0.99);
    s.max_ms = all_ok.last().copied();
    for x in &run.samples {
        let i = (x.at.as_secs_f64().round() as usize).min(n - 1);
        s.seconds[i].sample = Some(*x);
    }
    for e in &run.events {
        let verb = match e.kind {
            EventKind::Kill => "kill",
            EventKind::Restart => "restart",
        };
        s.seconds[at(e.at)].events.push(format!("{verb} {}", e.pod));
    }
    s.outages = outages(&run.events, &run.records);
    s.windows = windows(run, &kills);
    let rss: Vec<u64> = run
        .samples
        .iter()
        .map(|x| x.epp_rss_kb)
        .filter(|&v| v > 0)
        .collect();
    s.rss_start_kb = rss.first().copied().unwrap_or(0);
    s.rss_end_kb = rss.last().copied().unwrap_or(0);
    s.rss_max_kb = rss.iter().copied().max().unwrap_or(0);
    let cpu: Vec<f64> = run.samples.iter().skip(1).map(|x| x.epp_cpu_pct).collect();
    s.cpu_mean_pct = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64;
    let load: Vec<f64> = run
        .samples
        .iter()
        .map(|x| x.loadavg)
        .filter(|v| v.is_finite())
        .collect();
    s.loadavg_mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
    s.loadavg_max = load.iter().copied().fold(0.0, f64::max);
    s
}

fn outages(events: &[Event], records: &[Record]) -> Vec<Outage> {
    let mut out: Vec<Outage> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if e.kind != EventKind::Kill {
            continue;
        }
        let k = secs(e.at);
        let restart = events[i + 1..]
            .iter()
            .find(|x| x.kind == EventKind::Restart && x.pod == e.pod)
            .map(|x| secs(x.at));
        let next_kill = events[i + 1..]
            .iter()
            .find(|x| x.kind == EventKind::Kill && x.pod == e.pod)
            .map_or(f64::INFINITY, |x| secs(x.at));
        let in_flight = records.iter().filter(|r| {
            secs(r.sent) <= k
                && k <= secs(r.done)
                && !matches!(&r.outcome, Outcome::Failed { kind, .. } if kind == "not sent")
        });
        let (mut failed, mut survived) = (0, 0);
        for r in in_flight {
            if r.is_ok() {
                survived += 1;
            } else {
                failed += 1;
            }
        }
        let mut back_after = None;
        let mut served_after = 0;
        if let Some(rs) = restart {
            for r in records {
                let served_here = matches!(&r.outcome, Outcome::Ok { pod: Some(p) } if *p == e.pod);
                if served_here && secs(r.sent) >= rs && secs(r.sent) < next_kill {
                    served_after += 1;
                    let after = secs(r.done) - rs;
                    back_after = Some(back_after.map_or(after, |b: f64| b.min(after)));
                }
            }
        }
        out.push(Outage {
            pod: e.pod.clone(),
            killed_at: k,
            restarted_at: restart,
            failed_in_flight: failed,
            survived_in_flight: survived,
            back_after,
            served_after,
        });
    }
    out
}

/// Ten windows (at least 1 s each) over the configured duration.
fn windows(run: &SoakRun, kills: &[f64]) -> Vec<Window> {
    let total = run.config.duration.as_secs().max(1);
    let width = if total >= 600 { 60 } else { total.div_ceil(10) };
    let mut out = Vec::new();
    let mut from = 0;
    while from < total {
        let to = (from + width).min(total);
        let inside = |d: Duration| {
            let t = secs(d);
            t >= from as f64 && (t < to as f64 || to == total)
        };
        let mut w = Window {
            from,
            to,
            sent: 0,
            ok: 0,
            failed: 0,
            p50_ms: None,
            p99_ms: None,
            kills: kills
                .iter()
                .filter(|&&k| k >= from as f64 && k < to as f64)
                .count(),
        };
        let mut lat = Vec::new();
        for r in run.records.iter().filter(|r| inside(r.sent)) {
            match &r.outcome {
                Outcome::Ok { .. } => {
                    w.sent += 1;
                    w.ok += 1;
                    lat.push(secs(r.done - r.sent) * 1000.0);
                }
                Outcome::Failed { kind, .. } if kind != "not sent" => {
                    w.sent += 1;
                    w.failed += 1;
                }
                Outcome::Failed { .. } => {}
            }
        }
        let lat = sorted(lat);
        w.p50_ms = percentile(&lat, 0.5);
        w.p99_ms = percentile(&lat, 0.99);
        out.push(w);
        from = to;
    }
    out
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// soak.csv: one row per second.
pub fn csv(s: &Summary) -> String {
    let mut out = String::from("t_s,sent,ok,failed");
    for k in &s.kinds {
        let _ = write!(out, ",failed_{}", k.replace(' ', "_"));
    }
    out.push_str(
        ",ok_p50_ms,ok_p99_ms,epp_rss_kib,epp_cpu_pct,envoy_rss_kib,inflight,loadavg1,events\n",
    );
    for (t, sec) in s.seconds.iter().enumerate() {
        let failed: usize = sec.failed.values().sum();
        let _ = write!(out, "{t},{},{},{failed}", sec.sent, sec.ok);
        for k in &s.kinds {
            let _ = write!(out, ",{}", sec.failed.get(k).copied().unwrap_or(0));
        }
        let lat = sorted(sec.ok_ms.clone());
        let f = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.1}"));
        let _ = write!(
            out,
            ",{},{}",
            f(percentile(&lat, 0.5)),
            f(percentile(&lat, 0.99))
        );
        match &sec.sample {
            Some(x) => {
                let _ = write!(
                    out,
                    ",{},{:.1},{},{},{:.2}",
                    x.epp_rss_kb, x.epp_cpu_pct, x.envoy_rss_kb, x.inflight, x.loadavg
                );
            }
            None => out.push_str(",,,,,"),
        }
        let _ = writeln!(out, ",{}", sec.events.join(";"));
    }
    out
}

const CHART_W: u32 = 1200;
const CHART_H: u32 = 1500;

fn chart_err<E: std::fmt::Debug>(e: E) -> ReportError {
    ReportError::Chart(format!("{e:?}"))
}

type Series = (String, RGBColor, Vec<(f64, f64)>);

/// soak.png: five panels over time with kill (red) and restart (green)
/// lines: requests sent and succeeded per second, failures per second,
/// latency p50/p99 per second, the picker's RSS, the picker's CPU.
pub fn chart(path: &Path, s: &Summary, events: &[Event], title: &str) -> Result<(), ReportError> {
    let text = font_available();
    let xmax = s.seconds.len().max(2) as f64;
    let per_sec = |f: &dyn Fn(&Second) -> Option<f64>| -> Vec<(f64, f64)> {
        s.seconds
            .iter()
            .enumerate()
            .filter_map(|(t, sec)| f(sec).map(|v| (t as f64, v)))
            .collect()
    };
    let blue = RGBColor(31, 119, 180);
    let grey = RGBColor(150, 150, 150);
    let red = RGBColor(214, 39, 40);
    let orange = RGBColor(255, 127, 14);
    let green = RGBColor(44, 160, 44);
    let panels: Vec<(&str, &str, Vec<Series>, bool)> = vec![
        (
            "Requests per second (sent, succeeded)",
            "req/s",
            vec![
                ("sent".into(), grey, per_sec(&|x| Some(x.sent as f64))),
                ("ok".into(), blue, per_sec(&|x| Some(x.ok as f64))),
            ],
            false,
        ),
        (
            "Failed requests per second (by completion time)",
            "failed/s",
            vec![(
                "failed".into(),
                red,
                per_sec(&|x| Some(x.failed.values().sum::<usize>() as f64)),
            )],
            true,
        ),
        (
            "Latency of successful requests, per second",
            "ms",
            vec![
                (
                    "p50".into(),
                    blue,
                    per_sec(&|x| percentile(&sorted(x.ok_ms.clone()), 0.5)),
                ),
                (
                    "p99".into(),
                    orange,
                    per_sec(&|x| percentile(&sorted(x.ok_ms.clone()), 0.99)),
                ),
            ],
            false,
        ),
        (
            "Picker RSS (VmRSS)",
            "MiB",
            vec![(
                "epp RSS".into(),
                blue,
                per_sec(&|x| {
                    x.sample
                        .filter(|v| v.epp_rss_kb > 0)
                        .map(|v| v.epp_rss_kb as f64 / 1024.0)
                }),
            )],
            false,
        ),
        (
            "Picker CPU (% of one core)",
            "%",
            vec![(
                "epp CPU".into(),
                blue,
                per_sec(&|x| x.sample.map(|v| v.epp_cpu_pct)),
            )],
            false,
        ),
    ];
    // At least 3 px, so a second's failures stay visible beside the
    // kill line over a 10-minute axis.
    let bar_w = (xmax * 3.0 / f64::from(CHART_W)).max(0.9);
    let mut buf = vec![0u8; (CHART_W * CHART_H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (CHART_W, CHART_H)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let root = if text {
            root.titled(title, (FONT, 24)).map_err(chart_err)?
        } else {
            root
        };
        let areas = root.split_evenly((panels.len(), 1));
        for (area, (caption, y_desc, series, bars)) in areas.iter().zip(&panels) {
            let top = series
                .iter()
                .flat_map(|(_, _, pts)| pts.iter().map(|p| p.1))
                .filter(|v| v.is_finite())
                .fold(0.0f64, f64::max);
            let ymax = if top > 0.0 { top * 1.15 } else { 1.0 };
            let mut b = ChartBuilder::on(area);
            b.margin(8);
            if text {
                b.caption(*caption, (FONT, 17))
                    .x_label_area_size(28)
                    .y_label_area_size(70);
            }
            let mut chart = b
                .build_cartesian_2d(0f64..xmax, 0f64..ymax)
                .map_err(chart_err)?;
            let x_fmt = |v: &f64| format!("{v:.0}");
            let y_fmt = |v: &f64| {
                if ymax < 5.0 {
                    format!("{v:.1}")
                } else {
                    format!("{v:.0}")
                }
            };
            let mut mesh = chart.configure_mesh();
            if text {
                mesh.x_desc("seconds")
                    .y_desc(*y_desc)
                    .x_label_formatter(&x_fmt)
                    .y_label_formatter(&y_fmt)
                    .label_style((FONT, 13))
                    .axis_desc_style((FONT, 14))
                    .light_line_style(RGBColor(240, 240, 240));
            } else {
                mesh.x_labels(0).y_labels(0);
            }
            mesh.draw().map_err(chart_err)?;
            for e in events {
                let (t, color) = match e.kind {
                    EventKind::Kill => (secs(e.at), red),
                    EventKind::Restart => (secs(e.at), green),
                };
                chart
                    .draw_series(LineSeries::new(
                        [(t, 0.0), (t, ymax)],
                        color.mix(0.6).stroke_width(2),
                    ))
                    .map_err(chart_err)?;
            }
            for (name, color, pts) in series {
                let color = *color;
                let drawn = if *bars {
                    chart
                        .draw_series(pts.iter().filter(|p| p.1 > 0.0).map(|&(t, v)| {
                            Rectangle::new([(t, 0.0), (t + bar_w, v)], color.filled())
                        }))
                        .map_err(chart_err)?
                } else {
                    chart
                        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                        .map_err(chart_err)?
                };
                if text {
                    drawn.label(name.clone()).legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
                    });
                }
            }
            if text {
                // The markers' meaning, once per panel legend.
                chart
                    .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(chart_err)?
                    .label("pod killed")
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], red.mix(0.6).stroke_width(3))
                    });
                chart
                    .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(chart_err)?
                    .label("pod restarted")
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], green.mix(0.6).stroke_width(3))
                    });
                chart
                    .configure_series_labels()
                    .label_font((FONT, 13))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(chart_err)?;
            }
        }
        root.present().map_err(chart_err)?;
    }
    write_png_sized(path, CHART_W, CHART_H, &buf)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"))
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

fn pct(part: usize, whole: usize) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.3}%", 100.0 * part as f64 / whole as f64)
    }
}

/// README.md of the results directory.
pub fn markdown(run: &SoakRun, s: &Summary, command: &str, machine: &str) -> String {
    let c = &run.config;
    let w = &c.workload;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Soak: {} s at {} req/s with pod kills\n",
        c.duration.as_secs(),
        c.rate
    );
    let _ = writeln!(md, "Command: `{command}`  ");
    let _ = writeln!(
        md,
        "Machine: {machine}. The machine was shared: other work (fuzzers, test suites) ran at the same time; its 1-minute load average during the run was {:.1} on average, {:.1} at most (per second in soak.csv).\n",
        s.loadavg_mean, s.loadavg_max
    );
    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(
        md,
        "- Envoy ({} worker(s), `envoy/envoy.yaml.tmpl`: full-duplex ext_proc, override_host pool; `{}`) in front of `{}` (default config, TLS on the ext_proc port, `--fallback-endpoints` default 2, scrapes every 50 ms{}).",
        c.envoy_concurrency,
        run.gateway_retry,
        run.epp_bin,
        if c.epp_args.is_empty() {
            String::new()
        } else {
            format!(", extra flags `{}`", c.epp_args.join(" "))
        }
    );
    let _ = writeln!(
        md,
        "- {} pods, each its own `vllm-sim` process ({}), discovered from an endpoints file.",
        c.pods,
        if c.sim_args.is_empty() {
            "default timings".to_owned()
        } else {
            format!("`{}`", c.sim_args.join(" "))
        }
    );
    let _ = writeln!(
        md,
        "- Open-loop load: {} req/s, one request every {:.1} ms whatever is in flight; request timeout {} s; at most {} in flight. Chat completions, streaming off, `max_tokens` {}: {} sessions at a time over {} shared system prompts of {} tokens, each session {} turns of {} user tokens plus {}-token earlier replies, then replaced (so prefixes are shared across sessions and grow within one).",
        c.rate,
        1000.0 / c.rate,
        c.request_timeout.as_secs(),
        c.max_inflight,
        w.max_tokens,
        w.sessions,
        w.groups,
        w.system_tokens,
        w.turns,
        w.user_tokens,
        w.reply_tokens
    );
    let _ = writeln!(
        md,
        "- Faults: from {} s, every {} s, one pod (in turn) is killed with SIGKILL and started again on the same port {} s later; {} kills.\n",
        c.first_kill.as_secs(),
        c.kill_every.as_secs(),
        c.down_for.as_secs(),
        s.outages.len()
    );
    let _ = writeln!(md, "## Totals\n");
    let _ = writeln!(md, "| | requests | share of sent |\n|---|---|---|");
    let _ = writeln!(md, "| due by the schedule | {} | |", s.due);
    let _ = writeln!(md, "| not sent (client in-flight cap) | {} | |", s.not_sent);
    let _ = writeln!(md, "| sent | {} | 100% |", s.sent);
    let _ = writeln!(md, "| succeeded | {} | {} |", s.ok, pct(s.ok, s.sent));
    let _ = writeln!(
        md,
        "| failed, in flight at a pod kill | {} | {} |",
        s.failed_at_kill,
        pct(s.failed_at_kill, s.sent)
    );
    let _ = writeln!(
        md,
        "| failed, other | {} | {} |\n",
        s.failed_other,
        pct(s.failed_other, s.sent)
    );
    if s.failures.is_empty() {
        let _ = writeln!(md, "No request failed.\n");
    } else {
        let _ = writeln!(
            md,
            "Failures by cause and kind (\"in flight at a kill\": sent before and finished after a kill):\n"
        );
        let _ = writeln!(
            md,
            "| cause | kind | count | example (what the client got) |\n|---|---|---|---|"
        );
        for ((cause, kind), (n, example)) in &s.failures {
            let cause = match cause {
                Cause::InFlightAtKill => "in flight at a kill",
                Cause::Other => "other",
            };
            let example = example.replace('|', "\\|");
            let _ = writeln!(md, "| {cause} | {kind} | {n} | {example} |");
        }
        md.push('\n');
    }
    let _ = writeln!(md, "## Pod outages\n");
    let _ = writeln!(
        md,
        "| pod | killed at | back at | requests in flight (any pod) at the kill: failed / succeeded | first success after restart | served after restart |\n|---|---|---|---|---|---|"
    );
    for o in &s.outages {
        let _ = writeln!(
            md,
            "| {} | {:.1} s | {} | {} / {} | {} | {} |",
            o.pod,
            o.killed_at,
            o.restarted_at.map_or("-".into(), |t| format!("{t:.1} s")),
            o.failed_in_flight,
            o.survived_in_flight,
            o.back_after
                .map_or("never".into(), |t| format!("+{t:.1} s")),
            o.served_after
        );
    }
    let _ = writeln!(
        md,
        "\nSuccessful requests per pod: {}.\n",
        s.served_by_pod
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !run.envoy_stats.is_empty() || !run.envoy_connect_failures.is_empty() {
        let _ = writeln!(
            md,
            "Envoy's counters for the pool at the end: {}.",
            run.envoy_stats
                .iter()
                .map(|(k, v)| format!("`{k}` {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            md,
            "Connection failures per pod (each one an attempt at a dead pod that Envoy retried on the next endpoint in the picker's list, or failed with): {}.\n",
            run.envoy_connect_failures
                .iter()
                .map(|(h, v)| {
                    let name = run
                        .pods
                        .iter()
                        .find(|(_, a)| a.to_string() == *h)
                        .map_or(h.as_str(), |(n, _)| n.as_str());
                    format!("{name} {v}")
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        md,
        "The picker scraped {:.0} times, {:.0} of which failed (a killed pod's scrapes fail until it is back). Its log has {} warning/error lines{}.\n",
        run.epp_scrapes.0,
        run.epp_scrapes.1,
        run.epp_log_warnings,
        if run.epp_log_sample.is_empty() {
            String::new()
        } else {
            format!(", e.g. `{}`", run.epp_log_sample[0].replace('`', "'"))
        }
    );
    let _ = writeln!(md, "## Latency and memory\n");
    let _ = writeln!(
        md,
        "Successful requests, end to end through the gateway: p50 {}, p99 {}, max {}.\n",
        ms(s.p50_ms),
        ms(s.p99_ms),
        ms(s.max_ms)
    );
    let _ = writeln!(
        md,
        "Picker RSS: {} at the start, {} at the end, {} at most (VmHWM {}); CPU {:.1}% of a core on average.\n",
        mib(s.rss_start_kb),
        mib(s.rss_end_kb),
        mib(s.rss_max_kb),
        mib(run.epp_peak_rss_kb),
        s.cpu_mean_pct
    );
    let _ = writeln!(
        md,
        "| window | sent | ok | failed | kills | p50 | p99 |\n|---|---|---|---|---|---|---|"
    );
    for win in &s.windows {
        let _ = writeln!(
            md,
            "| {}-{} s | {} | {} | {} | {} | {} | {} |",
            win.from,
            win.to,
            win.sent,
            win.ok,
            win.failed,
            win.kills,
            ms(win.p50_ms),
            ms(win.p99_ms)
        );
    }
    let _ = writeln!(
        md,
        "\n![errors, latency, RSS and CPU over time, kills in red, restarts in green](soak.png)\n"
    );
    let _ = writeln!(
        md,
        "soak.csv has one row per second: requests sent, succeeded and failed by kind, p50/p99 of the requests that succeeded in that second, the picker's RSS and CPU, Envoy's RSS, requests in flight, the load average, and kill/restart events."
    );
    md
}

/// Files written.
#[derive(Debug, Clone)]
pub struct Written {
    pub csv: PathBuf,
    pub png: PathBuf,
    pub readme: PathBuf,
}

/// Writes soak.csv, soak.png and README.md into `out`.
pub fn write(
    out: &Path,
    run: &SoakRun,
    s: &Summary,
    command: &str,
    machine: &str,
) -> Result<Written, ReportError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let csv_path = out.join("soak.csv");
    std::fs::write(&csv_path, csv(s)).map_err(io_err(&csv_path))?;
    let png = out.join("soak.png");
    let mut title = format!(
        "Soak: {} req/s for {} s, {} pods, {} kills",
        run.config.rate,
        run.config.duration.as_secs(),
        run.config.pods,
        s.outages.len()
    );
    if let Some(n) = run.config.envoy_max_retries {
        let _ = write!(title, ", Envoy max_retries {n}");
    }
    chart(&png, s, &run.events, &title)?;
    let readme = out.join("README.md");
    std::fs::write(&readme, markdown(run, s, command, machine)).map_err(io_err(&readme))?;
    Ok(Written {
        csv: csv_path,
        png,
        readme,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: usize, sent: f64, done: f64, ok: bool) -> Record {
        Record {
            seq,
            sent: Duration::from_secs_f64(sent),
            done: Duration::from_secs_f64(done),
            outcome: if ok {
                Outcome::Ok {
                    pod: Some("pod1-0".into()),
                }
            } else {
                Outcome::Failed {
                    kind: "http 503".into(),
                    detail: "upstream reset".into(),
                }
            },
        }
    }

    #[test]
    fn failures_are_attributed_to_kills_they_span() {
        let kills = [10.0];
        assert_eq!(
            cause(&rec(0, 9.5, 10.2, false), &kills),
            Cause::InFlightAtKill
        );
        assert_eq!(cause(&rec(1, 10.1, 10.3, false), &kills), Cause::Other);
        assert_eq!(cause(&rec(2, 8.0, 9.0, false), &kills), Cause::Other);
    }

    #[test]
    fn outage_counts_in_flight_and_the_return() {
        let ev = |at: f64, kind| Event {
            at: Duration::from_secs_f64(at),
            kind,
            pod: "pod1-0".into(),
        };
        let events = [ev(10.0, EventKind::Kill), ev(15.0, EventKind::Restart)];
        let records = [
            rec(0, 9.5, 10.2, false),
            rec(1, 9.6, 10.1, true),
            rec(2, 14.0, 14.5, true),
            rec(3, 15.5, 16.0, true),
            rec(4, 16.0, 16.2, true),
        ];
        let o = &outages(&events, &records)[0];
        assert_eq!((o.failed_in_flight, o.survived_in_flight), (1, 1));
        assert_eq!(o.served_after, 2);
        assert!((o.back_after.unwrap() - 1.0).abs() < 1e-9);
    }
}
