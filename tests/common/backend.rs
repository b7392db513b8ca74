//! A fake OpenAI/vLLM model server for end-to-end tests.
//!
//! It serves `/metrics` with vLLM metric names and values the test sets,
//! `/health`, `/v1/models`, and POST `/v1/completions` and
//! `/v1/chat/completions` (JSON or server-sent events). Every response names
//! the backend in `x-backend`, and the backend keeps what it received so
//! tests can check that bodies arrive intact.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

/// What a backend reports and has seen.
#[derive(Debug, Default)]
pub struct BackendState {
    pub waiting: AtomicU32,
    pub running: AtomicU32,
    /// KV-cache usage in thousandths.
    pub kv_milli: AtomicU32,
    /// When set, /metrics answers 500.
    pub metrics_broken: AtomicBool,
    pub requests: AtomicU64,
    pub last_body: Mutex<Vec<u8>>,
    pub last_headers: Mutex<Vec<(String, String)>>,
    /// SSE responses wait for this after their first event, so a test can
    /// prove the first event reached the client before the rest was sent.
    pub release_stream: Notify,
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    task: JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(BackendState::default());
        let (st, nm) = (Arc::clone(&state), name.to_owned());
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let conns = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (st, nm) = (Arc::clone(&st), nm.clone());
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (st, nm) = (Arc::clone(&st), nm.clone());
                        async move { Ok::<_, Infallible>(handle(req, st, &nm).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                conns.lock().push(conn.abort_handle());
            }
        });
        Self {
            name: name.to_owned(),
            addr,
            state,
            task,
            connections,
        }
    }

    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_load(&self, waiting: u32, kv: f64) {
        self.state.waiting.store(waiting, Ordering::SeqCst);
        self.state
            .kv_milli
            .store((kv * 1000.0) as u32, Ordering::SeqCst);
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Stops serving: open connections are closed and the port refuses new
    /// ones afterwards.
    pub fn kill(&self) {
        self.task.abort();
        for c in self.connections.lock().drain(..) {
            c.abort();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, name: &str, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-backend", name)
        .body(Full::new(body.into()).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    st: Arc<BackendState>,
    name: &str,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/metrics") => {
            if st.metrics_broken.load(Ordering::SeqCst) {
                return full(500, name, "text/plain", "broken");
            }
            let page = format!(
                "# HELP vllm:num_requests_waiting Waiting.\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {}\nvllm:num_requests_running{{model_name=\"m\"}} {}\nvllm:kv_cache_usage_perc{{model_name=\"m\"}} {}\nvllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"1000\"}} 1.0\n",
                st.waiting.load(Ordering::SeqCst),
                st.running.load(Ordering::SeqCst),
                f64::from(st.kv_milli.load(Ordering::SeqCst)) / 1000.0
            );
            full(200, name, "text/plain; version=0.0.4", page)
        }
        ("GET", "/health") => full(200, name, "text/plain", "ok"),
        ("GET", "/v1/models") => full(
            200,
            name,
            "application/json",
            format!(r#"{{"object":"list","data":[{{"id":"m","backend":"{name}"}}]}}"#),
        ),
        ("POST", _) => {
            *st.last_headers.lock() = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return full(400, name, "text/plain", "body read failed"),
            };
            st.requests.fetch_add(1, Ordering::SeqCst);
            *st.last_body.lock() = body.to_vec();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let model = json["model"].as_str().unwrap_or("").to_owned();
            if json["stream"].as_bool() == Some(true) {
                return sse(name, &model, Arc::clone(&st));
            }
            let reply = serde_json::json!({
                "id": "cmpl-1",
                "object": "text_completion",
                "model": model,
                "backend": name,
                "body_len": body.len(),
                "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": body.len() / 4, "completion_tokens": 1, "total_tokens": body.len() / 4 + 1,
                          "prompt_tokens_details": {"cached_tokens": 0}}
            });
            full(200, name, "application/json", reply.to_string())
        }
        _ => full(404, name, "text/plain", "not found"),
    }
}

/// Events of a streamed completion: `EVENTS` text chunks, a usage chunk and
/// `[DONE]`. After the first chunk it waits for `release_stream`.
pub const EVENTS: usize = 5;

fn sse(name: &str, model: &str, st: Arc<BackendState>) -> Response<Body> {
    let model = model.to_owned();
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let (model, st) = (model.clone(), Arc::clone(&st));
        async move {
            if i > EVENTS + 1 {
                return None;
            }
            if i == 1 {
                st.release_stream.notified().await;
            }
            let line = if i < EVENTS {
                format!(
                    "data: {{\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"t{i}\"}}]}}\n\n"
                )
            } else if i == EVENTS {
                format!(
                    "data: {{\"model\":\"{model}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":10,\"completion_tokens\":{EVENTS},\"prompt_tokens_details\":{{\"cached_tokens\":8}}}}}}\n\n"
                )
            } else {
                "data: [DONE]\n\n".to_owned()
            };
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), i + 1))
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("x-backend", name)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}
