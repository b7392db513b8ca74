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
//!   message instead of one per chunk) and no response bodies.
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
}

impl GatewayPath {
    pub const ALL: [GatewayPath; 6] = [
        Self::Envoy,
        Self::Noop,
        Self::Epp,
        Self::NoopLean,
        Self::EppLean,
        Self::EppBufferedLean,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Envoy => "envoy (client routes)",
            Self::Noop => "noop ext_proc",
            Self::Epp => "epp",
            Self::NoopLean => "noop ext_proc, lean",
            Self::EppLean => "epp, lean",
            Self::EppBufferedLean => "epp, buffered + lean",
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
        GatewayPath::Epp | GatewayPath::EppLean | GatewayPath::EppBufferedLean => {
            let extra = super::epp_perf_args(path.lean());
            let (p, addrs) = start_scraped_epp(bin, backends, &extra, dir).await?;
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
    let mut running = Vec::with_capacity(p.paths.len());
    let mut dirs = Vec::with_capacity(p.paths.len());
    for &path in &p.paths {
        let dir = tempfile::tempdir()?;
        running.push((
            path,
            start_path(bin, path, &backends.addrs, p.envoy_concurrency, dir.path()).await?,
        ));
        dirs.push(dir);
    }
    let mut points = Vec::new();
    for &size in &p.body_sizes {
        let body = body_of(size);
        for &conc in &p.concurrency {
            let mut best: Vec<Option<GatewayPoint>> = vec![None; running.len()];
            for _ in 0..p.repeats.max(1) {
                for (k, (path, r)) in running.iter().enumerate() {
                    let point = measure(*path, r, &body, size, conc, &destinations, p).await;
                    let keep = match &best[k] {
                        Some(b) => point.throughput > b.throughput,
                        None => true,
                    };
                    if keep {
                        best[k] = Some(point);
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
    }
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
    }
    out
}
