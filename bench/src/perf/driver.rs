//! A closed-loop HTTP/1.1 load driver for gateway overhead measurements.
//!
//! `concurrency` workers each keep one connection and send the same POST
//! back to back; every request's latency is recorded. Bounded by a request
//! count and a duration, whichever ends first. Unlike the workload runner it
//! does no SSE parsing or bookkeeping per request, so it can push a gateway
//! to its limit on the same two cores.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One measured run.
#[derive(Debug, Clone, Default)]
pub struct DriveResult {
    /// Latency of every successful request, in milliseconds, sorted.
    pub latencies_ms: Vec<f64>,
    pub errors: usize,
    pub elapsed: Duration,
}

impl DriveResult {
    pub fn throughput(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, q: f64) -> f64 {
        crate::load::stats::percentile(&self.latencies_ms, q).unwrap_or(f64::NAN)
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct DriveSpec {
    pub target: SocketAddr,
    pub path: String,
    /// Sent in turn; several distinct bodies spread prompts over the pool.
    pub bodies: Vec<Bytes>,
    /// When set, each request carries `x-gateway-destination-endpoint`
    /// naming these in turn (the gateway-alone path: the client routes).
    pub destinations: Vec<String>,
    pub concurrency: usize,
    pub max_requests: usize,
    pub max_duration: Duration,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Option<Sender> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

/// Runs the closed loop and returns every latency.
pub async fn drive(spec: &DriveSpec) -> DriveResult {
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + spec.max_duration;
    let mut workers = Vec::with_capacity(spec.concurrency);
    for w in 0..spec.concurrency.max(1) {
        let spec = spec.clone();
        let issued = Arc::clone(&issued);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut sender: Option<Sender> = None;
            let authority = spec.target.to_string();
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= spec.max_requests || Instant::now() >= deadline {
                    break;
                }
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    sender = connect(spec.target).await;
                }
                let Some(s) = sender.as_mut() else {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let mut req = http::Request::post(spec.path.as_str())
                    .header(http::header::HOST, authority.as_str())
                    .header(http::header::CONTENT_TYPE, "application/json");
                if !spec.destinations.is_empty() {
                    let d = &spec.destinations[(i + w) % spec.destinations.len()];
                    req = req.header("x-gateway-destination-endpoint", d.as_str());
                }
                let Some(body) = spec.bodies.get((i + w) % spec.bodies.len().max(1)) else {
                    errors += 1;
                    break;
                };
                let Ok(req) = req.body(Full::new(body.clone())) else {
                    errors += 1;
                    continue;
                };
                let t = Instant::now();
                let ok = match s.ready().await {
                    Ok(()) => match s.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            resp.into_body().collect().await.is_ok() && status.is_success()
                        }
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    errors += 1;
                    sender = None;
                }
            }
            (lat, errors)
        }));
    }
    let mut result = DriveResult::default();
    for w in workers {
        if let Ok((lat, errors)) = w.await {
            result.latencies_ms.extend(lat);
            result.errors += errors;
        }
    }
    result.elapsed = started.elapsed();
    result.latencies_ms.sort_by(|a, b| a.total_cmp(b));
    result
}
