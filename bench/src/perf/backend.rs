//! Backends that cost nothing: a fixed small completion for every POST and a
//! vLLM-shaped /metrics page, so what a gateway benchmark measures is the
//! gateway, not the model server.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

/// The answer to every inference request.
const COMPLETION: &[u8] = br#"{"id":"cmpl-0","object":"text_completion","model":"m","choices":[{"index":0,"text":"ok","finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// A small metrics page with the signals the picker scrapes.
pub const SMALL_METRICS: &str = "vllm:num_requests_waiting{model_name=\"m\"} 0\nvllm:num_requests_running{model_name=\"m\"} 0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.1\nvllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"20000\"} 1\n";

/// Static backends on loopback; stopped when dropped.
#[derive(Debug)]
pub struct StaticBackends {
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for StaticBackends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StaticBackends {
    /// `n` backends on free ports serving `metrics_page` at /metrics.
    pub async fn start(n: usize, metrics_page: Arc<str>) -> std::io::Result<Self> {
        let mut addrs = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?);
            let page = Arc::clone(&metrics_page);
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let _ = stream.set_nodelay(true);
                    let page = Arc::clone(&page);
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let page = Arc::clone(&page);
                            async move { Ok::<_, Infallible>(answer(req, &page).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }));
        }
        Ok(Self { addrs, tasks })
    }
}

async fn answer(req: Request<Incoming>, page: &str) -> Response<Full<Bytes>> {
    let is_metrics = req.uri().path() == "/metrics";
    // Drain the request body: the backend must read what the gateway sends.
    let _ = req.into_body().collect().await;
    let (body, ct) = if is_metrics {
        (Bytes::copy_from_slice(page.as_bytes()), "text/plain")
    } else {
        (Bytes::from_static(COMPLETION), "application/json")
    };
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ct),
    );
    resp
}
