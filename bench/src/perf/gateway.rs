//! What the picker costs in the request path, through a real Envoy.
//!
//! Paths measured on the same static backends, in one run:
//! - `envoy`: Envoy alone; the load generator names the endpoint itself in
//!   `x-gateway-destination-endpoint` (override_host), no ext_proc;
//! - `noop`: Envoy + a no-op ext_proc server (`noop-extproc`): buffers the
//!   body, names an endpoint round robin, passes everything back. The
//!   protocol's own cost, the floor any picker pays;
//! - `epp`: Envoy + the picker with its default config, every phase;
//! - `noop-lean`, `epp-lean`: the same with Envoy asked only for what routing
//!   needs (request headers and body; response bodies not sent);
//! - `epp-buffered-lean`: the picker with buffered request bodies (one
//!   message instead of one per chunk) and no response bodies;
//! - `epp-traced`: `epp` exporting OpenTelemetry traces to a live collector
//!   (an in-process OTLP receiver, [`super::otlp_sink`]) at the sampling
//!   ratio `--trace-sample`. Measured in the same rotation as `epp`, so each
//!   rotation gives one traced/untraced pair under the same background load:
//!   the report shows the mean of the per-rotation ratios and its spread,
//!   which resolves a small cost far better than best runs of whole runs.
//!
//! For each body size and concurrency: p50/p99 latency, throughput, and for
//! the ext_proc servers their CPU time per 1,000 requests (from
//! /proc/<pid>/stat) and peak RSS (VmHWM).

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;

use super::{
    backend::{SMALL_METRICS, StaticBackends},
    driver::{DriveSpec, drive},
    proc_stats::ProcStats,
};
use crate::stack::{
    Binaries, BodyMode, EnvoyOptions, Proc, StackError, start_envoy, start_scraped_epp,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayPath {
    Envoy,
    Noop,
    Epp,
    NoopLean,
    EppLean,
    EppBufferedLean,
    EppTraced,
}

impl GatewayPath {
    pub const ALL: [GatewayPath; 7] = [
        Self::Envoy,
        Self::Noop,
        Self::Epp,
        Self::NoopLean,
        Self::EppLean,
        Self::EppBufferedLean,
        Self::EppTraced,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Envoy => "envoy (client routes)",
            Self::Noop => "noop ext_proc",
            Self::Epp => "epp",
            Self::NoopLean => "noop ext_proc, lean",
            Self::EppLean => "epp, lean",
            Self::EppBufferedLean => "epp, buffered + lean",
            Self::EppTraced => "epp, traced",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "envoy" => Self::Envoy,
            "noop" => Self::Noop,
            "epp" => Self::Epp,
            "noop-lean" => Self::NoopLean,
            "epp-lean" => Self::EppLean,
            "epp-buffered-lean" => Self::EppBufferedLean,
            "epp-traced" => Self::EppTraced,
            _ => return None,
        })
    }

    fn lean(self) -> bool {
        matches!(self, Self::NoopLean | Self::EppLean | Self::EppBufferedLean)
    }
}

/// How to read the tables (printed with them).
const NOTE: &str = "Static backends (answers cost nothing), Envoy 1.40 with one worker, the HTTP load driver, the ext_proc server and the backends all on the same two cores. Paths: `envoy` routes by a destination header the client sets (no ext_proc); `noop` is `noop-extproc` (buffers the body, names an endpoint round robin, passes everything back: the protocol's floor); `epp` is the picker with its default config; `lean` paths do not send response bodies to ext_proc; `buffered + lean` also sends the request body in one BUFFERED message. Each step runs every path back to back, three times in rotation, and keeps each path's best run; on two shared cores, throughput of the same path still varies by about 10% between whole runs.";

/// Settings of the gateway overhead measurement.
#[derive(Debug, Clone)]
pub struct GatewayPerf {
    pub paths: Vec<GatewayPath>,
    pub body_sizes: Vec<usize>,
    pub concurrency: Vec<usize>,
    pub requests_per_step: usize,
    pub max_step: Duration,
    pub warmup: usize,
    pub backends: usize,
    pub envoy_concurrency: usize,
    /// Rotations over the paths per step; each path keeps its best run.
    pub repeats: usize,
    /// Sampling ratio of the `epp-traced` path (parent-based trace-id ratio).
    pub trace_sample: f64,
}

/// One measured point.
#[derive(Debug, Clone)]
pub struct GatewayPoint {
    pub path: GatewayPath,
    pub body: usize,
    pub concurrency: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub throughput: f64,
    pub errors: usize,
    /// CPU seconds of the ext_proc server per 1,000 requests.
    pub server_cpu_per_1k: Option<f64>,
    pub server_peak_rss_mb: Option<f64>,
    /// Throughput of every rotation, in order (the point is the best).
    pub runs: Vec<f64>,
    /// The ext_proc server's CPU seconds per 1,000 requests of every
    /// rotation, in order (0 where unreadable).
    pub cpu_runs: Vec<f64>,
    /// Spans the collector received during this path's runs (traced path).
    pub spans: Option<u64>,
}

/// A request body of about `size` bytes shaped like an OpenAI completion.
pub fn body_of(size: usize) -> Bytes {
    let head = r#"{"model":"m","max_tokens":1,"prompt":""#;
    let tail = r#""}"#;
    let filler = size.saturating_sub(head.len() + tail.len()).max(1);
    let mut s = String::with_capacity(size);
    s.push_str(head);
    let words = "the quick brown fox jumps over the lazy dog ";
    while s.len() < head.len() + filler {
        s.push_str(words);
    }
    s.truncate(head.len() + filler);
    s.push_str(tail);
    Bytes::from(s)
}

/// `groups` bodies of about `size` bytes whose prompts differ from their
/// first block, so the prefix index fills and affinity spreads them over the
/// pool instead of sending every request to one endpoint.
pub fn grouped_bodies(size: usize, groups: usize) -> Vec<Bytes> {
    let base = String::from_utf8_lossy(&body_of(size)).into_owned();
    (0..groups.max(1))
        .map(|g| {
            Bytes::from(base.replacen("\"prompt\":\"", &format!("\"prompt\":\"group {g:02} "), 1))
        })
        .collect()
}

struct Running {
    gateway: SocketAddr,
    server: Option<Proc>,
    _envoy: Proc,
}

async fn start_path(
    bin: &Binaries,
    path: GatewayPath,
    backends: &[SocketAddr],
    envoy_concurrency: usize,
    trace_env: &[(String, String)],
    dir: &std::path::Path,
) -> Result<Running, StackError> {
    let client = crate::load::client::http_client(4);
    let mut server = None;
    let mut opts = EnvoyOptions::new(0, backends.to_vec());
    opts.response_bodies = !path.lean();
    match path {
        GatewayPath::Envoy => {
            opts.without_epp = true;
            opts.client_routes = true;
        }
        GatewayPath::Noop | GatewayPath::NoopLean => {
            let (p, addr) = super::noop::spawn(bin, backends, dir).await?;
            opts.epp_port = addr.port();
            server = Some(p);
        }
        GatewayPath::Epp
        | GatewayPath::EppLean
        | GatewayPath::EppBufferedLean
        | GatewayPath::EppTraced => {
            let extra = super::epp_perf_args(path.lean());
            let env = if path == GatewayPath::EppTraced {
                trace_env
            } else {
                &[]
            };
            let (p, addrs) = start_scraped_epp(bin, backends, &extra, env, dir).await?;
            opts.epp_port = addrs.ext_proc.port();
            if path == GatewayPath::EppBufferedLean {
                opts.body_mode = BodyMode::Buffered;
            }
            server = Some(p);
        }
    }
    let (envoy, _admin, listen) =
        start_envoy(bin, &opts, envoy_concurrency, dir, dir, &client).await?;
    Ok(Running {
        gateway: listen,
        server,
        _envoy: envoy,
    })
}

/// Runs every path, body size and concurrency step.
///
/// Every path's gateway is started first and stays up; each step then
/// measures the paths back to back, `repeats` times in rotation, keeping each
/// path's best run. On two shared cores a path measured minutes after
/// another sees different background noise; adjacent, repeated runs make the
/// comparison between paths (what the targets are about) hold.
pub async fn run(bin: &Binaries, p: &GatewayPerf) -> Result<Vec<GatewayPoint>, StackError> {
    let backends = StaticBackends::start(p.backends, Arc::from(SMALL_METRICS)).await?;
    let destinations: Vec<String> = backends.addrs.iter().map(ToString::to_string).collect();
    let sink = if p.paths.contains(&GatewayPath::EppTraced) {
        Some(super::otlp_sink::OtlpSink::start().await?)
    } else {
        None
    };
    let trace_env = sink
        .as_ref()
        .map(|s| trace_env(&s.endpoint(), p.trace_sample))
        .unwrap_or_default();
    let mut running = Vec::with_capacity(p.paths.len());
    let mut dirs = Vec::with_capacity(p.paths.len());
    for &path in &p.paths {
        let dir = tempfile::tempdir()?;
        let r = start_path(
            bin,
            path,
            &backends.addrs,
            p.envoy_concurrency,
            &trace_env,
            dir.path(),
        )
        .await?;
        running.push((path, r));
        dirs.push(dir);
    }
    let mut points = Vec::new();
    for &size in &p.body_sizes {
        let body = body_of(size);
        for &conc in &p.concurrency {
            let mut best: Vec<Option<GatewayPoint>> = vec![None; running.len()];
            let mut runs: Vec<Vec<f64>> = vec![Vec::new(); running.len()];
            let mut cpu_runs: Vec<Vec<f64>> = vec![Vec::new(); running.len()];
            let mut spans = vec![0u64; running.len()];
            for _ in 0..p.repeats.max(1) {
                for (k, (path, r)) in running.iter().enumerate() {
                    let before = sink.as_ref().map_or(0, |s| s.spans());
                    let point = measure(*path, r, &body, size, conc, &destinations, p).await;
                    spans[k] += sink.as_ref().map_or(0, |s| s.spans()) - before;
                    runs[k].push(point.throughput);
                    cpu_runs[k].push(point.server_cpu_per_1k.unwrap_or(0.0));
                    let keep = match &best[k] {
                        Some(b) => point.throughput > b.throughput,
                        None => true,
                    };
                    if keep {
                        best[k] = Some(point);
                    }
                }
            }
            for (k, point) in best.iter_mut().enumerate() {
                if let Some(point) = point {
                    point.runs = std::mem::take(&mut runs[k]);
                    point.cpu_runs = std::mem::take(&mut cpu_runs[k]);
                    if point.path == GatewayPath::EppTraced {
                        point.spans = Some(spans[k]);
                    }
                }
            }
            for point in best.into_iter().flatten() {
                eprintln!(
                    "{:<26} body {:>7} c{:<3} p50 {:>7.3} ms p99 {:>7.3} ms {:>8.0} req/s cpu/1k {:?} errors {}",
                    point.path.name(),
                    size,
                    conc,
                    point.p50_ms,
                    point.p99_ms,
                    point.throughput,
                    point.server_cpu_per_1k,
                    point.errors
                );
                points.push(point);
            }
        }
    }
    drop(running);
    Ok(points)
}

async fn measure(
    path: GatewayPath,
    running: &Running,
    body: &Bytes,
    size: usize,
    conc: usize,
    destinations: &[String],
    p: &GatewayPerf,
) -> GatewayPoint {
    let mut spec = DriveSpec {
        target: running.gateway,
        path: "/v1/completions".into(),
        bodies: vec![body.clone()],
        destinations: if path == GatewayPath::Envoy {
            destinations.to_vec()
        } else {
            Vec::new()
        },
        concurrency: conc,
        max_requests: p.warmup,
        max_duration: p.max_step,
    };
    drive(&spec).await;
    spec.max_requests = p.requests_per_step;
    let before = running
        .server
        .as_ref()
        .and_then(|s| ProcStats::read(s.pid()));
    let r = drive(&spec).await;
    let after = running
        .server
        .as_ref()
        .and_then(|s| ProcStats::read(s.pid()));
    let cpu = match (before, after) {
        (Some(b), Some(a)) if !r.latencies_ms.is_empty() => {
            Some((a.cpu_seconds - b.cpu_seconds) * 1000.0 / r.latencies_ms.len() as f64)
        }
        _ => None,
    };
    GatewayPoint {
        path,
        body: size,
        concurrency: conc,
        p50_ms: r.percentile(0.5),
        p99_ms: r.percentile(0.99),
        throughput: r.throughput(),
        errors: r.errors,
        server_cpu_per_1k: cpu,
        server_peak_rss_mb: after.map(|a| a.peak_rss_kb as f64 / 1024.0),
        runs: Vec::new(),
        cpu_runs: Vec::new(),
        spans: None,
    }
}

/// The picker's environment for the traced path: export to `endpoint`,
/// sample `ratio` of the traces a request starts (the bench's requests
/// carry no `traceparent`), as a deployment sets it with `OTEL_*`.
fn trace_env(endpoint: &str, ratio: f64) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
        ("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Traced over untraced throughput, rotation by rotation: the mean ratio and
/// a 95% interval of it (mean ± 1.96 standard errors; with few rotations a
/// rough one). `None` without at least two pairs.
pub fn paired_ratio(untraced: &[f64], traced: &[f64]) -> Option<(f64, f64, usize)> {
    let ratios: Vec<f64> = untraced
        .iter()
        .zip(traced)
        .filter(|(u, _)| **u > 0.0)
        .map(|(u, t)| t / u)
        .collect();
    let n = ratios.len();
    if n < 2 {
        return None;
    }
    let mean = ratios.iter().sum::<f64>() / n as f64;
    let var = ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((mean, 1.96 * (var / n as f64).sqrt(), n))
}

fn kib(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// The markdown section of perf.md for these points.
pub fn markdown(points: &[GatewayPoint]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{NOTE}\n");
    let base = |body: usize, conc: usize| {
        points
            .iter()
            .find(|q| q.path == GatewayPath::Envoy && q.body == body && q.concurrency == conc)
    };
    let mut sizes: Vec<usize> = points.iter().map(|p| p.body).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for size in sizes {
        let _ = writeln!(out, "\n#### Body {}\n", kib(size));
        let _ = writeln!(
            out,
            "| path | concurrency | p50 | p99 | added p50 vs Envoy alone | added p99 | throughput | ext_proc CPU s / 1k req | ext_proc peak RSS | errors |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for p in points.iter().filter(|p| p.body == size) {
            let (add50, add99) = match base(p.body, p.concurrency) {
                Some(b) if p.path != GatewayPath::Envoy => (
                    format!("{:+.3} ms", p.p50_ms - b.p50_ms),
                    format!("{:+.3} ms", p.p99_ms - b.p99_ms),
                ),
                _ => ("-".into(), "-".into()),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} ms | {:.3} ms | {} | {} | {:.0} req/s | {} | {} | {} |",
                p.path.name(),
                p.concurrency,
                p.p50_ms,
                p.p99_ms,
                add50,
                add99,
                p.throughput,
                p.server_cpu_per_1k
                    .map_or_else(|| "-".into(), |c| format!("{c:.3}")),
                p.server_peak_rss_mb
                    .map_or_else(|| "-".into(), |m| format!("{m:.0} MiB")),
                p.errors
            );
        }
        let _ = writeln!(out, "\nHighest throughput per path:\n");
        let _ = writeln!(out, "| path | best throughput | vs noop floor |");
        let _ = writeln!(out, "|---|---|---|");
        let best = |path: GatewayPath| {
            points
                .iter()
                .filter(|p| p.body == size && p.path == path)
                .map(|p| p.throughput)
                .fold(0.0f64, f64::max)
        };
        let floor = best(GatewayPath::Noop);
        for path in GatewayPath::ALL {
            let b = best(path);
            if b > 0.0 {
                let vs = if floor > 0.0 {
                    format!("{:.0}%", b / floor * 100.0)
                } else {
                    "-".into()
                };
                let _ = writeln!(out, "| {} | {:.0} req/s | {} |", path.name(), b, vs);
            }
        }
        paired_section(&mut out, points, size);
    }
    out
}

/// Traced against untraced, paired by rotation, when both paths ran.
fn paired_section(out: &mut String, points: &[GatewayPoint], size: usize) {
    let of = |path: GatewayPath, conc: usize| {
        points
            .iter()
            .find(|p| p.path == path && p.body == size && p.concurrency == conc)
    };
    let mut rows = Vec::new();
    let mut concs: Vec<usize> = points.iter().map(|p| p.concurrency).collect();
    concs.sort_unstable();
    concs.dedup();
    for conc in concs {
        let (Some(u), Some(t)) = (of(GatewayPath::Epp, conc), of(GatewayPath::EppTraced, conc))
        else {
            continue;
        };
        if let Some((mean, ci, n)) = paired_ratio(&u.runs, &t.runs) {
            let cost = (1.0 - mean) * 100.0;
            let cpu = paired_ratio(&u.cpu_runs, &t.cpu_runs).map_or_else(
                || "-".into(),
                |(m, c, _)| format!("{:+.1}% ± {:.1}%", (m - 1.0) * 100.0, c * 100.0),
            );
            rows.push(format!(
                "| {conc} | {n} | {:.3} | {cost:+.1}% ± {:.1}% | {cpu} | {} |",
                mean,
                ci * 100.0,
                t.spans.map_or_else(|| "-".into(), |s| s.to_string())
            ));
        }
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nTraces: `epp, traced` over `epp`, throughput ratio per rotation (paired: same rotation, adjacent runs):\n"
    );
    let _ = writeln!(
        out,
        "| concurrency | rotations | mean throughput ratio | throughput cost (95% interval) | picker CPU per request (95% interval) | spans received |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(out, "{r}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratio_is_the_mean_of_per_rotation_ratios_with_its_interval() {
        // Ratios 0.9, 1.0, 1.1: mean 1.0, sd 0.1, 1.96 * 0.1 / sqrt(3).
        let (mean, ci, n) = paired_ratio(&[100.0, 200.0, 100.0], &[90.0, 200.0, 110.0]).unwrap();
        assert_eq!(n, 3);
        assert!((mean - 1.0).abs() < 1e-12, "{mean}");
        assert!((ci - 1.96 * 0.1 / 3f64.sqrt()).abs() < 1e-12, "{ci}");
    }

    #[test]
    fn paired_ratio_needs_two_pairs_and_skips_empty_runs() {
        assert!(paired_ratio(&[100.0], &[90.0]).is_none());
        assert!(paired_ratio(&[0.0, 100.0], &[50.0, 90.0]).is_none());
        let (mean, _, n) = paired_ratio(&[0.0, 100.0, 100.0], &[5.0, 90.0, 80.0]).unwrap();
        assert_eq!(n, 2);
        assert!((mean - 0.85).abs() < 1e-12);
    }

    #[test]
    fn the_traced_path_gets_an_exporter_and_a_ratio_sampler() {
        let env = trace_env("http://127.0.0.1:4317", 0.01);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(get("OTEL_TRACES_SAMPLER"), Some("parentbased_traceidratio"));
        assert_eq!(get("OTEL_TRACES_SAMPLER_ARG"), Some("0.01"));
        assert_eq!(
            GatewayPath::parse("epp-traced"),
            Some(GatewayPath::EppTraced)
        );
    }
}
