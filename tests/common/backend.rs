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
    /// Milliseconds a completion waits before its response headers (time to
    /// first token) and between its first and last body bytes (generation).
    /// With both zero the answer is immediate and in one piece.
    pub ttft_ms: AtomicU64,
    pub gen_ms: AtomicU64,
    /// Completions whose headers are out and whose body is not finished: what
    /// a gateway can no longer retry elsewhere if this server dies now.
    pub open_responses: AtomicU64,
    /// Completions received and not answered yet (waiting for their first
    /// byte): what a gateway can still retry elsewhere.
    pub unanswered: AtomicU64,
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    task: Mutex<JoinHandle<()>>,
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
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let task = serve(listener, Arc::clone(&state), name, Arc::clone(&connections));
        Self {
            name: name.to_owned(),
            addr,
            state,
            task: Mutex::new(task),
            connections,
        }
    }

    /// Serves again on the same address after [`Backend::kill`], with the
    /// same state (a pod restarted in place: same IP and port).
    pub async fn restart(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        // The killed accept task releases the port when it is dropped,
        // which the runtime does shortly after the abort.
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "rebind {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        };
        *self.task.lock() = serve(
            listener,
            Arc::clone(&self.state),
            &self.name,
            Arc::clone(&self.connections),
        );
    }

    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// The value of a header in the last request this backend received.
    pub fn last_header(&self, name: &str) -> Option<String> {
        self.state
            .last_headers
            .lock()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
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
        self.task.lock().abort();
        for c in self.connections.lock().drain(..) {
            c.abort();
        }
    }
}

fn serve(
    listener: TcpListener,
    state: Arc<BackendState>,
    name: &str,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
) -> JoinHandle<()> {
    let nm = name.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (st, nm) = (Arc::clone(&state), nm.clone());
            let conn = tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let (st, nm) = (Arc::clone(&st), nm.clone());
                    async move { Ok::<_, Infallible>(handle(req, st, &nm).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            let mut conns = connections.lock();
            conns.retain(|c| !c.is_finished());
            conns.push(conn.abort_handle());
        }
    })
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
            let (ttft, gen_ms) = (
                st.ttft_ms.load(Ordering::SeqCst),
                st.gen_ms.load(Ordering::SeqCst),
            );
            if ttft == 0 && gen_ms == 0 {
                return full(200, name, "application/json", reply.to_string());
            }
            st.unanswered.fetch_add(1, Ordering::SeqCst);
            let waiting = Unanswered(Arc::clone(&st));
            tokio::time::sleep(std::time::Duration::from_millis(ttft)).await;
            drop(waiting);
            slow(name, reply.to_string(), gen_ms, st)
        }
        _ => full(404, name, "text/plain", "not found"),
    }
}

/// Counts a response as open from its headers until its body is finished
/// (or dropped with the connection).
struct OpenResponse(Arc<BackendState>);

impl Drop for OpenResponse {
    fn drop(&mut self) {
        self.0.open_responses.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Unanswered(Arc<BackendState>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.unanswered.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A JSON answer sent as a first byte right away and the rest after
/// `gen_ms`, with a Content-Length, so a client can tell a cut body.
fn slow(name: &str, body: String, gen_ms: u64, st: Arc<BackendState>) -> Response<Body> {
    st.open_responses.fetch_add(1, Ordering::SeqCst);
    let guard = OpenResponse(st);
    let len = body.len();
    let bytes = Bytes::from(body);
    let stream = futures_util::stream::unfold(
        (0u8, bytes, Some(guard)),
        move |(i, bytes, guard)| async move {
            match i {
                0 => Some((Ok(Frame::data(bytes.slice(..1))), (1, bytes, guard))),
                1 => {
                    tokio::time::sleep(std::time::Duration::from_millis(gen_ms)).await;
                    Some((Ok(Frame::data(bytes.slice(1..))), (2, bytes, guard)))
                }
                _ => None,
            }
        },
    );
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("content-length", len)
        .header("x-backend", name)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
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
