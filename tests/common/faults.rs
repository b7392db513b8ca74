//! Helpers for the fault tests (tests/e2e/faults.rs): a bounded load driver
//! that classifies every request, a metrics server that hangs or answers
//! garbage, and ways to look at the picker process from outside (open file
//! descriptors, SIGKILL, the admin API).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use epp::admin::pb::{ListEndpointsRequest, ListEndpointsResponse, admin_client::AdminClient};
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use super::http;

/// What became of one request sent through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with the whole body; the backend that served it.
    Served(String),
    /// Response headers arrived (from this backend), then the body broke
    /// off: the server died after it had started answering.
    CutMidBody(String),
    /// A complete answer with another status.
    Status(u16, String),
    /// No response at all (connection error).
    NoResponse(String),
    /// Nothing within the per-request bound.
    TimedOut,
}

impl Outcome {
    pub fn is_served(&self) -> bool {
        matches!(self, Self::Served(_))
    }
}

/// Longest a single request of a load run may take.
pub const REQUEST_BOUND: Duration = Duration::from_secs(30);

/// One completion request through `gateway`, classified.
pub async fn completion(gateway: SocketAddr, prompt: impl Into<String>) -> Outcome {
    let prompt: String = prompt.into();
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1}).to_string();
    let attempt = async {
        let resp = match http::send(
            gateway,
            "POST",
            "/v1/completions",
            &[],
            Some(body.into_bytes()),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return Outcome::NoResponse(e.to_string()),
        };
        let status = resp.status().as_u16();
        let backend = resp
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        match resp.into_body().collect().await {
            Ok(b) if status == 200 => {
                // A cut body can still look complete to the client when
                // Envoy re-frames it; the fake server's JSON must parse.
                if serde_json::from_slice::<serde_json::Value>(&b.to_bytes()).is_ok() {
                    Outcome::Served(backend)
                } else {
                    Outcome::CutMidBody(backend)
                }
            }
            Ok(b) => Outcome::Status(status, String::from_utf8_lossy(&b.to_bytes()).into_owned()),
            Err(_) => Outcome::CutMidBody(backend),
        }
    };
    tokio::time::timeout(REQUEST_BOUND, attempt)
        .await
        .unwrap_or(Outcome::TimedOut)
}

/// A bounded load run: `total` requests, `concurrency` at a time.
pub struct Load {
    /// Requests finished so far (any outcome).
    pub done: Arc<AtomicUsize>,
    task: JoinHandle<Vec<Outcome>>,
}

impl Load {
    pub fn start(gateway: SocketAddr, total: usize, concurrency: usize) -> Self {
        let done = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let workers: Vec<JoinHandle<Vec<Outcome>>> = (0..concurrency)
            .map(|_| {
                let (done, next) = (Arc::clone(&done), Arc::clone(&next));
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= total {
                            return out;
                        }
                        out.push(completion(gateway, format!("load request {i}")).await);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let task = tokio::spawn(async move {
            let mut all = Vec::with_capacity(total);
            for w in workers {
                all.extend(w.await.expect("load worker"));
            }
            all
        });
        Self { done, task }
    }

    pub fn finished(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Every outcome, once all requests are done.
    pub async fn outcomes(self) -> Vec<Outcome> {
        self.task.await.expect("load run")
    }
}

/// How a [`BadMetrics`] server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadMetricsMode {
    /// A valid vLLM page, until the test breaks it.
    Good,
    /// Accepts connections, reads requests, never answers.
    Hang,
    /// Answers 200 with bytes that are not a Prometheus page.
    Garbage,
}

impl BadMetricsMode {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Good,
            1 => Self::Hang,
            _ => Self::Garbage,
        }
    }
}

/// A metrics endpoint that can be made to misbehave; it counts the
/// connections it holds.
pub struct BadMetrics {
    pub addr: SocketAddr,
    mode: Arc<std::sync::atomic::AtomicU8>,
    /// Connections currently open from the scraper.
    pub open: Arc<AtomicU64>,
    /// Connections accepted in total.
    pub accepted: Arc<AtomicU64>,
    /// Requests read in total.
    pub requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for BadMetrics {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BadMetrics {
    /// Starts serving a good page.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let m = Arc::clone(&mode);
        let open = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (o, a, r) = (
            Arc::clone(&open),
            Arc::clone(&accepted),
            Arc::clone(&requests),
        );
        let task = tokio::spawn(async move {
            // Connection tasks end when the peer closes; the accept loop's
            // abort does not reach them, so they are tracked and ended with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (o, r, m) = (Arc::clone(&o), Arc::clone(&r), Arc::clone(&m));
                conns.spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            r.fetch_add(1, Ordering::SeqCst);
                            let body = match BadMetricsMode::from_u8(m.load(Ordering::SeqCst)) {
                                BadMetricsMode::Hang => continue,
                                BadMetricsMode::Good => GOOD_PAGE,
                                BadMetricsMode::Garbage => {
                                    "\u{1}\u{2} this is {not} a \"metrics\" page\n\u{ff}\n"
                                }
                            };
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if sock.write_all(resp.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            mode,
            open,
            accepted,
            requests,
            task,
        }
    }

    pub fn set_mode(&self, mode: BadMetricsMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

const GOOD_PAGE: &str = "vllm:num_requests_waiting{model_name=\"m\"} 0\nvllm:num_requests_running{model_name=\"m\"} 0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.1\n";

/// An endpoints file whose entries serve on `serve` and, where given,
/// expose metrics on another port.
pub fn endpoints_yaml_with_metrics(entries: &[(SocketAddr, Option<u16>)]) -> String {
    let mut s = String::from("endpoints:\n");
    for (i, (a, metrics)) in entries.iter().enumerate() {
        s.push_str(&format!(
            "- name: backend-{i}\n  address: {}\n  port: {}\n",
            a.ip(),
            a.port()
        ));
        if let Some(m) = metrics {
            s.push_str(&format!("  metricsPort: {m}\n"));
        }
    }
    s
}

/// Open file descriptors of process `pid` (sockets, files, pipes).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// Sends `signal` (`KILL`, `TERM`) to `pid` with the kill command.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// The admin API's view of the endpoints.
pub async fn list_endpoints(admin: SocketAddr) -> ListEndpointsResponse {
    let mut admin = AdminClient::connect(format!("http://{admin}"))
        .await
        .expect("admin connect");
    admin
        .list_endpoints(ListEndpointsRequest {})
        .await
        .expect("ListEndpoints")
        .into_inner()
}

/// The value of an unlabelled counter or gauge on the picker's /metrics.
pub async fn metric(metrics: SocketAddr, name: &str) -> Option<f64> {
    let text = http::get(metrics, "/metrics").await.ok()?.text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// The `x-gateway-destination-endpoint` header the backend last received.
pub fn last_destination(b: &super::backend::Backend) -> Option<String> {
    b.last_header("x-gateway-destination-endpoint")
}
