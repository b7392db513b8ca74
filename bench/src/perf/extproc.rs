//! How many requests one picker core routes, with the gateway taken out.
//!
//! Through Envoy on this two-core machine Envoy and the HTTP load generator
//! take most of the CPU, so the gateway runs never reach the picker's own
//! ceiling. Here the load generator speaks ext_proc itself, message for
//! message as Envoy does for one HTTP request (one bidi stream per request):
//! request headers carrying `protocol_config`, the body in one message, then
//! the response headers and, in the `full` profile, a response body. The
//! picker is pinned to CPU 0 and this process to CPU 1 (`taskset`), so the
//! picker has exactly one core.
//!
//! Reported per step: routed requests/s, latency from the first message to
//! the destination, the picker's CPU share of its core and its CPU time per
//! request (from /proc). When the driver, not the picker, is what saturates
//! (the picker's core not busy), the CPU time per request still says what
//! one picker core would sustain: `1 / cpu_per_request`.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue},
    extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
    service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
        body_mutation::Mutation, external_processor_client::ExternalProcessorClient,
        processing_request::Request, processing_response::Response,
    },
};
use tonic::transport::Channel;

use super::{
    backend::{SMALL_METRICS, StaticBackends},
    driver::DriveResult,
    gateway::grouped_bodies,
    proc_stats::ProcStats,
};
use crate::stack::{Binaries, StackError, start_scraped_epp};

/// The header the picker names the destination in.
const DESTINATION: &str = "x-gateway-destination-endpoint";

/// Which phases the driver sends, as the two Envoy configurations would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phases {
    /// Every phase, response bodies included (the picker's default).
    Full,
    /// Request headers and body, response headers; no response bodies
    /// (`--response-processing minimal`, response_body_mode NONE).
    Lean,
}

impl Phases {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "full" => Some(Self::Full),
            "lean" => Some(Self::Lean),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Lean => "lean",
        }
    }
}

/// Which ext_proc server the driver measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The picker, default config, scraping its endpoints.
    Epp,
    /// `noop-extproc`: the protocol's floor (round robin, no parsing).
    Noop,
}

impl Server {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "epp" => Some(Self::Epp),
            "noop" => Some(Self::Noop),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Epp => "epp",
            Self::Noop => "noop",
        }
    }
}

/// Settings of the one-core throughput measurement.
#[derive(Debug, Clone)]
pub struct ExtProcPerf {
    /// Servers measured one after the other, each with every phase profile.
    pub servers: Vec<Server>,
    pub body_size: usize,
    pub phases: Vec<Phases>,
    pub concurrency: Vec<usize>,
    /// HTTP/2 connections the streams are spread over (Envoy opens one per
    /// worker thread).
    pub connections: usize,
    pub requests_per_step: usize,
    pub max_step: Duration,
    pub warmup: usize,
    pub backends: usize,
    /// CPU list for the picker and for this driver (`taskset -c`); `None`
    /// leaves both unpinned (a machine without `taskset` or one core).
    pub pin: Option<(String, String)>,
}

/// How to read the table (printed with it).
const NOTE: &str = "Each request is one bidi stream, message for message as Envoy sends them (request headers with `protocol_config`, the body, response headers, and in the `full` profile a response body), over HTTP/2 connections as Envoy workers would open them. The picker is pinned to one CPU and the driver to the other, so the picker has exactly one core; it routes with its default config over 8 static endpoints scraped every 50 ms. The `noop` server (`noop-extproc`, round robin, no parsing: the protocol's floor) gets the same driver and the same core, so its CPU per request is what any picker pays. \"Picker core busy\" near 100% means the figure is the picker's own ceiling, not the driver's; the one-core capacity column is 1 / (CPU time per request).";

/// One measured step.
#[derive(Debug, Clone)]
pub struct ExtProcPoint {
    pub server: Server,
    pub phases: Phases,
    pub concurrency: usize,
    pub routed: usize,
    pub errors: usize,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Picker CPU seconds / wall seconds of the step (1.0 = its core busy).
    pub picker_core_share: f64,
    pub picker_cpu_us_per_request: f64,
    pub picker_peak_rss_mb: f64,
}

impl ExtProcPoint {
    /// Requests/s one fully busy picker core would route at this CPU cost.
    pub fn per_core_capacity(&self) -> f64 {
        if self.picker_cpu_us_per_request > 0.0 {
            1e6 / self.picker_cpu_us_per_request
        } else {
            f64::NAN
        }
    }
}

/// Pins every thread of `pid` to `cpus`. Returns false when `taskset` is
/// missing or refuses (the run goes on unpinned and says so).
fn pin(pid: u32, cpus: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn header_value(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value: String::new(),
        raw_value: value.as_bytes().to_vec(),
    }
}

/// The messages of one request, built once per step and cloned per stream
/// (as Envoy would serialise them afresh).
#[derive(Clone)]
struct Script {
    request_headers: ProcessingRequest,
    request_body: ProcessingRequest,
    response_headers: ProcessingRequest,
    response_body: Option<ProcessingRequest>,
}

fn script(body: &Bytes, phases: Phases) -> Script {
    let response_mode = match phases {
        Phases::Full => BodySendMode::FullDuplexStreamed,
        Phases::Lean => BodySendMode::None,
    };
    let request_headers = ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header_value(":method", "POST"),
                    header_value(":path", "/v1/completions"),
                    header_value(":authority", "gateway"),
                    header_value("content-type", "application/json"),
                    header_value("content-length", &body.len().to_string()),
                ],
            }),
            end_of_stream: false,
            ..HttpHeaders::default()
        })),
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: BodySendMode::FullDuplexStreamed as i32,
            response_body_mode: response_mode as i32,
            ..ProtocolConfiguration::default()
        }),
        ..ProcessingRequest::default()
    };
    let request_body = ProcessingRequest {
        request: Some(Request::RequestBody(HttpBody {
            body: body.to_vec(),
            end_of_stream: true,
            ..HttpBody::default()
        })),
        ..ProcessingRequest::default()
    };
    let response_headers = ProcessingRequest {
        request: Some(Request::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header_value(":status", "200"),
                    header_value("content-type", "application/json"),
                ],
            }),
            end_of_stream: phases == Phases::Lean,
            ..HttpHeaders::default()
        })),
        ..ProcessingRequest::default()
    };
    let response_body = (phases == Phases::Full).then(|| ProcessingRequest {
        request: Some(Request::ResponseBody(HttpBody {
            body: br#"{"id":"x","object":"text_completion","choices":[{"index":0,"text":"ok","finish_reason":"length"}],"usage":{"prompt_tokens":1000,"completion_tokens":1,"total_tokens":1001}}"#.to_vec(),
            end_of_stream: true,
            ..HttpBody::default()
        })),
        ..ProcessingRequest::default()
    });
    Script {
        request_headers,
        request_body,
        response_headers,
        response_body,
    }
}

/// Why one request failed.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("gRPC")]
    Grpc(#[from] tonic::Status),
    #[error("the stream ended early")]
    Ended,
    #[error("the picker answered with an immediate response")]
    Immediate,
    #[error("the headers answer named no destination")]
    NoDestination,
}

fn names_destination(r: &ProcessingResponse) -> bool {
    let Some(Response::RequestHeaders(h)) = &r.response else {
        return false;
    };
    h.response
        .as_ref()
        .and_then(|c| c.header_mutation.as_ref())
        .is_some_and(|m| {
            m.set_headers.iter().any(|o| {
                o.header
                    .as_ref()
                    .is_some_and(|h| h.key.eq_ignore_ascii_case(DESTINATION))
            })
        })
}

fn ends_request_body(r: &ProcessingResponse) -> bool {
    let Some(Response::RequestBody(b)) = &r.response else {
        return false;
    };
    match b
        .response
        .as_ref()
        .and_then(|c| c.body_mutation.as_ref())
        .and_then(|m| m.mutation.as_ref())
    {
        Some(Mutation::StreamedResponse(s)) => s.end_of_stream,
        // A plain (or no) mutation answers the whole buffered body.
        _ => true,
    }
}

/// One HTTP request's worth of ext_proc messages on a fresh stream.
/// Returns the time from the first message to the routing answer.
async fn exchange(
    client: &mut ExternalProcessorClient<Channel>,
    s: &Script,
) -> Result<Duration, ExchangeError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<ProcessingRequest>(4);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let started = Instant::now();
    // The channel has room for every message; a send fails only once the
    // stream is gone, which the inbound side then reports.
    let _ = tx.try_send(s.request_headers.clone());
    let _ = tx.try_send(s.request_body.clone());
    let mut inbound = client.process(outbound).await?.into_inner();
    let mut routed = None;
    let mut body_done = false;
    while routed.is_none() || !body_done {
        let r = inbound.message().await?.ok_or(ExchangeError::Ended)?;
        if matches!(r.response, Some(Response::ImmediateResponse(_))) {
            return Err(ExchangeError::Immediate);
        }
        if matches!(r.response, Some(Response::RequestHeaders(_))) {
            if !names_destination(&r) {
                return Err(ExchangeError::NoDestination);
            }
            routed = Some(started.elapsed());
        }
        body_done |= ends_request_body(&r);
    }
    let _ = tx.try_send(s.response_headers.clone());
    inbound.message().await?.ok_or(ExchangeError::Ended)?;
    if let Some(b) = &s.response_body {
        let _ = tx.try_send(b.clone());
        inbound.message().await?.ok_or(ExchangeError::Ended)?;
    }
    // Half-close as Envoy does at the end of the response, and let the
    // picker finish the stream.
    drop(tx);
    while inbound.message().await?.is_some() {}
    routed.ok_or(ExchangeError::Ended)
}

async fn step(
    clients: &[ExternalProcessorClient<Channel>],
    scripts: &Arc<Vec<Script>>,
    concurrency: usize,
    max_requests: usize,
    max_duration: Duration,
) -> (DriveResult, Option<String>) {
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + max_duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency.max(1) {
        let mut client = clients[w % clients.len()].clone();
        let scripts = Arc::clone(scripts);
        let issued = Arc::clone(&issued);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= max_requests || Instant::now() >= deadline {
                    break;
                }
                let s = &scripts[(i + w) % scripts.len()];
                match exchange(&mut client, s).await {
                    Ok(d) => lat.push(d.as_secs_f64() * 1e3),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut out = DriveResult::default();
    let mut first_error = None;
    for t in tasks {
        if let Ok((lat, errors, first)) = t.await {
            out.latencies_ms.extend(lat);
            out.errors += errors;
            if first_error.is_none() {
                first_error = first;
            }
        }
    }
    out.elapsed = started.elapsed();
    out.latencies_ms.sort_by(|a, b| a.total_cmp(b));
    (out, first_error)
}

/// Starts a picker per phase profile and measures every concurrency step.
pub async fn run(bin: &Binaries, p: &ExtProcPerf) -> Result<Vec<ExtProcPoint>, StackError> {
    let pinned = match &p.pin {
        Some((_, driver)) => pin(std::process::id(), driver),
        None => false,
    };
    if p.pin.is_some() && !pinned {
        eprintln!("taskset unavailable: picker and driver run unpinned");
    }
    let backends = StaticBackends::start(p.backends, Arc::from(SMALL_METRICS)).await?;
    let bodies = grouped_bodies(p.body_size, 64);
    let mut points = Vec::new();
    for (server, phases) in p
        .servers
        .iter()
        .flat_map(|&s| p.phases.iter().map(move |&ph| (s, ph)))
    {
        let dir = tempfile::tempdir()?;
        let (mut proc, addr) = match server {
            Server::Epp => {
                let extra = super::epp_perf_args(phases == Phases::Lean);
                let (p, addrs) =
                    start_scraped_epp(bin, &backends.addrs, &extra, &[], dir.path()).await?;
                (p, addrs.ext_proc)
            }
            Server::Noop => super::noop::spawn(bin, &backends.addrs, dir.path()).await?,
        };
        if pinned && let Some((picker, _)) = &p.pin {
            pin(proc.pid(), picker);
        }
        let clients = connect(addr, p.connections.max(1)).await?;
        let scripts: Arc<Vec<Script>> =
            Arc::new(bodies.iter().map(|b| script(b, phases)).collect());
        for &conc in &p.concurrency {
            step(&clients, &scripts, conc, p.warmup, p.max_step).await;
            let before = ProcStats::read(proc.pid());
            let (r, first_error) =
                step(&clients, &scripts, conc, p.requests_per_step, p.max_step).await;
            let after = ProcStats::read(proc.pid());
            let cpu = match (before, after) {
                (Some(b), Some(a)) => a.cpu_seconds - b.cpu_seconds,
                _ => f64::NAN,
            };
            let n = r.latencies_ms.len();
            let point = ExtProcPoint {
                server,
                phases,
                concurrency: conc,
                routed: n,
                errors: r.errors,
                throughput: r.throughput(),
                p50_ms: r.percentile(0.5),
                p99_ms: r.percentile(0.99),
                picker_core_share: cpu / r.elapsed.as_secs_f64().max(1e-9),
                picker_cpu_us_per_request: if n > 0 {
                    cpu * 1e6 / n as f64
                } else {
                    f64::NAN
                },
                picker_peak_rss_mb: after.map_or(f64::NAN, |a| a.peak_rss_kb as f64 / 1024.0),
            };
            eprintln!(
                "extproc {:<4} {:<4} c{:<4} {:>7.0} routed/s p50 {:.3} ms p99 {:.3} ms picker core {:>4.0}% {:>6.1} us/req errors {}{}",
                server.name(),
                phases.name(),
                conc,
                point.throughput,
                point.p50_ms,
                point.p99_ms,
                point.picker_core_share * 100.0,
                point.picker_cpu_us_per_request,
                point.errors,
                first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default(),
            );
            points.push(point);
        }
        proc.check_running()?;
    }
    Ok(points)
}

async fn connect(
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<ExternalProcessorClient<Channel>>, StackError> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| StackError::Sim(format!("ext_proc address: {e}")))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| StackError::Sim(format!("connecting to the picker's ext_proc: {e}")))?;
        clients.push(ExternalProcessorClient::new(channel));
    }
    Ok(clients)
}

/// The markdown section of perf.md for these points.
pub fn markdown(points: &[ExtProcPoint], p: &ExtProcPerf) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{NOTE}\n");
    let _ = writeln!(
        s,
        "Body {} bytes in 64 prompt groups, {} HTTP/2 connection(s), {}.\n",
        p.body_size,
        p.connections,
        match &p.pin {
            Some((picker, driver)) =>
                format!("picker pinned to CPU {picker}, driver to CPU {driver} (`taskset`)"),
            None => "unpinned".to_owned(),
        }
    );
    s.push_str("| server | phases | concurrency | routed (errors) | routed req/s | p50 to destination | p99 | picker core busy | picker CPU per request | one-core capacity (1 / CPU per request) | picker peak RSS |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for pt in points {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} ({}) | {:.0} | {:.3} ms | {:.3} ms | {:.0}% | {:.1} µs | {:.0} req/s | {:.0} MiB |",
            pt.server.name(),
            pt.phases.name(),
            pt.concurrency,
            pt.routed,
            pt.errors,
            pt.throughput,
            pt.p50_ms,
            pt.p99_ms,
            pt.picker_core_share * 100.0,
            pt.picker_cpu_us_per_request,
            pt.per_core_capacity(),
            pt.picker_peak_rss_mb,
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_script_sends_every_phase_and_lean_skips_response_bodies() {
        let body = Bytes::from_static(br#"{"model":"m","prompt":"hi"}"#);
        let full = script(&body, Phases::Full);
        let lean = script(&body, Phases::Lean);
        assert!(full.response_body.is_some());
        assert!(lean.response_body.is_none());
        let mode = |s: &Script| {
            s.request_headers
                .protocol_config
                .as_ref()
                .map(|c| c.response_body_mode)
        };
        assert_eq!(mode(&full), Some(BodySendMode::FullDuplexStreamed as i32));
        assert_eq!(mode(&lean), Some(BodySendMode::None as i32));
        let Some(Request::RequestBody(b)) = &full.request_body.request else {
            panic!("second message is not the request body");
        };
        assert!(b.end_of_stream);
        assert_eq!(b.body, body.to_vec());
    }

    #[test]
    fn capacity_is_the_inverse_of_cpu_per_request() {
        let p = ExtProcPoint {
            server: Server::Epp,
            phases: Phases::Lean,
            concurrency: 1,
            routed: 10,
            errors: 0,
            throughput: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            picker_core_share: 0.5,
            picker_cpu_us_per_request: 125.0,
            picker_peak_rss_mb: 0.0,
        };
        assert!((p.per_core_capacity() - 8000.0).abs() < 1e-6);
    }
}
