//! HTTP/1.1 front of the simulated pods (hyper 1): routing, vLLM's responses,
//! SSE streaming, and one accept loop per pod.
//!
//! A streamed response is produced by a task that owns the request's
//! [`Ticket`] and feeds a small channel read by the response body; when the
//! client goes away the channel closes, the task ends, and the ticket's drop
//! aborts the request inside the engine (slot, blocks and queue place freed).
//! A non-streamed response is generated inside the service future itself, which
//! hyper drops on disconnect with the same effect.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::SimError;
use super::api::{self, ApiError, Endpoint, ResponseMeta, Usage};
use super::config::SimConfig;
use super::engine::{Pod, Prepared, Ticket};
use super::kv::block_hashes;
use super::kv_events::{self, KvEventsAddrs};
use super::tokens::PromptTokenizer;

pub type RespBody = UnsyncBoxBody<Bytes, Infallible>;

/// Request bodies above this are refused (a 220 KB prompt is far below).
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Chunks buffered between the token clock and a slow client.
const STREAM_BUFFER: usize = 16;

/// Per-pod constants shared by its connections.
struct PodCtx {
    pod: Arc<Pod>,
    model_json: String,
    /// JSON-escaped adapter names, indexed like the configured adapters.
    adapter_json: Arc<Vec<String>>,
    /// Block-hash seeds per adapter (the base model's is 0).
    adapter_seeds: Arc<Vec<u64>>,
    tokenizer: Arc<PromptTokenizer>,
    pod_header: HeaderValue,
    port_header: HeaderValue,
}

/// A response body fed by a channel, one SSE event per message.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).boxed_unsync()
}

impl PodCtx {
    fn respond(
        &self,
        status: StatusCode,
        content_type: &'static str,
        body: RespBody,
    ) -> Response<RespBody> {
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert("x-inference-pod", self.pod_header.clone());
        h.insert("x-inference-port", self.port_header.clone());
        resp
    }

    fn json(&self, status: StatusCode, body: String) -> Response<RespBody> {
        self.respond(status, "application/json", full(body))
    }

    fn error(&self, e: &ApiError) -> Response<RespBody> {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
        self.json(status, e.body())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn handle(
    ctx: Arc<PodCtx>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let endpoint = match req.uri().path() {
        "/v1/completions" => Some(Endpoint::Completions),
        "/v1/chat/completions" => Some(Endpoint::Chat),
        _ => None,
    };
    let resp = match (req.method(), req.uri().path(), endpoint) {
        (&Method::POST, _, Some(ep)) => infer(&ctx, req, ep).await,
        (&Method::GET, "/health", _) => ctx.respond(StatusCode::OK, "application/json", full("")),
        (&Method::GET, "/v1/models", _) => models(&ctx),
        (&Method::POST, "/admin/restart", _) => {
            ctx.pod.restart();
            ctx.json(
                StatusCode::OK,
                format!(r#"{{"restarted":true,"epoch":{}}}"#, ctx.pod.epoch()),
            )
        }
        (&Method::POST, "/reset_prefix_cache", _) => {
            if ctx.pod.reset_prefix_cache() {
                ctx.json(StatusCode::OK, "true".to_owned())
            } else {
                ctx.error(&ApiError {
                    status: 409,
                    kind: "ConflictError",
                    message: "running requests hold cached blocks".to_owned(),
                })
            }
        }
        (&Method::GET, "/metrics", _) => {
            // `name[]` filters like vLLM's prometheus_client does.
            let names = crate::prom::requested_names(req.uri().query());
            match ctx.pod.metrics_page(names.as_deref()) {
                Ok(text) => ctx.respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    full(text),
                ),
                Err(e) => {
                    let cause = std::error::Error::source(&e)
                        .map(|s| format!(": {s}"))
                        .unwrap_or_default();
                    ctx.respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain; charset=utf-8",
                        full(format!("{e}{cause}")),
                    )
                }
            }
        }
        (
            _,
            "/health" | "/v1/models" | "/metrics" | "/admin/restart" | "/reset_prefix_cache",
            _,
        )
        | (_, _, Some(_)) => ctx.json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"detail":"Method Not Allowed"}"#.to_owned(),
        ),
        _ => ctx.json(
            StatusCode::NOT_FOUND,
            r#"{"detail":"Not Found"}"#.to_owned(),
        ),
    };
    Ok(resp)
}

fn models(ctx: &PodCtx) -> Response<RespBody> {
    let cfg = ctx.pod.config();
    let created = unix_now();
    let mut data = vec![serde_json::json!({
        "id": cfg.model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": cfg.model,
        "parent": null,
        "max_model_len": cfg.max_model_len,
    })];
    // vLLM lists each adapter with the base model as its parent.
    data.extend(cfg.lora_adapters.iter().map(|a| {
        serde_json::json!({
            "id": a,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": format!("/adapters/{a}"),
            "parent": cfg.model,
            "max_model_len": null,
        })
    }));
    let body = serde_json::json!({ "object": "list", "data": data });
    ctx.json(StatusCode::OK, body.to_string())
}

async fn infer(
    ctx: &Arc<PodCtx>,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Response<RespBody> {
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return ctx.error(&ApiError::bad_request(format!("reading the body: {e}"))),
    };
    let cfg = ctx.pod.config();
    let v = match api::validate(&body, endpoint, cfg) {
        Ok(v) => v,
        Err(e) => return ctx.error(&e),
    };
    let mut tokens = Vec::new();
    ctx.tokenizer.tokenize(&v, &body, endpoint, &mut tokens);
    // With the model's tokenizer the prompt is as long as its token ids:
    // usage, prefill time and the prefix-cache counters must count the same
    // tokens the cached blocks hold (the byte estimate is only for chunks).
    let prompt_tokens = match &*ctx.tokenizer {
        PromptTokenizer::Model(_) if !tokens.is_empty() => tokens.len(),
        _ => v.prompt_tokens,
    };
    let mut hashes = Vec::with_capacity(tokens.len() / cfg.block_size + 1);
    let adapter_seed = v
        .adapter
        .and_then(|a| ctx.adapter_seeds.get(a).copied())
        .unwrap_or(0);
    block_hashes(
        &tokens,
        cfg.block_size,
        ctx.pod.chain_seed(adapter_seed),
        &mut hashes,
    );
    if ctx.pod.publishes_events() {
        tokens.truncate(hashes.len() * cfg.block_size);
    } else {
        tokens = Vec::new();
    }
    let prepared = Prepared {
        prompt_tokens,
        max_tokens: v.max_tokens,
        hashes,
        tokens,
        adapter: v.adapter,
        jitter_seed: cfg
            .jitter_per_request
            .then(|| xxhash_rust::xxh3::xxh3_64_with_seed(&body, cfg.seed)),
    };
    let ticket = match ctx.pod.submit(prepared) {
        Ok(t) => t,
        Err(SimError::QueueFull) => {
            return ctx.error(&ApiError {
                status: 429,
                kind: "TooManyRequestsError",
                message: "The waiting queue is full.".to_owned(),
            });
        }
        Err(e) => {
            return ctx.error(&ApiError {
                status: 500,
                kind: "InternalServerError",
                message: e.to_string(),
            });
        }
    };
    let job = Job {
        ctx: Arc::clone(ctx),
        adapter: v.adapter,
        endpoint,
        id: format!(
            "{}-{}-{}",
            match endpoint {
                Endpoint::Completions => "cmpl",
                Endpoint::Chat => "chatcmpl",
            },
            ctx.pod.name,
            fastrand::u64(..)
        ),
        created: unix_now(),
        prompt_tokens,
        max_tokens: v.max_tokens,
        include_usage: v.include_usage,
    };
    if v.stream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(job.stream(ticket, tx));
        ctx.respond(
            StatusCode::OK,
            "text/event-stream; charset=utf-8",
            ChannelBody(rx).boxed_unsync(),
        )
    } else {
        job.whole(ticket).await
    }
}

struct Job {
    ctx: Arc<PodCtx>,
    adapter: Option<usize>,
    endpoint: Endpoint,
    id: String,
    created: u64,
    prompt_tokens: usize,
    max_tokens: usize,
    include_usage: bool,
}

impl Job {
    fn meta(&self) -> ResponseMeta<'_> {
        ResponseMeta {
            endpoint: self.endpoint,
            id: &self.id,
            created: self.created,
            // vLLM answers with the name the request used.
            model_json: self
                .adapter
                .and_then(|a| self.ctx.adapter_json.get(a))
                .unwrap_or(&self.ctx.model_json),
        }
    }

    fn internal_error(&self) -> Response<RespBody> {
        self.ctx.error(&ApiError {
            status: 500,
            kind: "InternalServerError",
            message: "the request was lost (queue dropped or engine restarted)".to_owned(),
        })
    }

    async fn whole(self, mut ticket: Ticket) -> Response<RespBody> {
        let Ok(adm) = ticket.first_token().await else {
            return self.internal_error();
        };
        for _ in 1..self.max_tokens {
            if ticket.next_token().await.is_err() {
                return self.internal_error();
            }
        }
        ticket.finish();
        let usage = Usage {
            prompt: self.prompt_tokens,
            completion: self.max_tokens,
            cached: adm.cached_tokens,
        };
        let body = self.meta().full(&api::filler(self.max_tokens), &usage);
        self.ctx.json(StatusCode::OK, body)
    }

    async fn stream(self, mut ticket: Ticket, tx: mpsc::Sender<Bytes>) {
        let meta = self.meta();
        let adm = tokio::select! {
            r = ticket.first_token() => match r {
                Ok(a) => a,
                Err(_) => return,
            },
            // Client gone while queued or prefilling: the ticket's drop aborts.
            () = tx.closed() => return,
        };
        let mut buf = String::with_capacity(512);
        for i in 0..self.max_tokens {
            if i > 0 {
                tokio::select! {
                    r = ticket.next_token() => if r.is_err() {
                        // The engine restarted: the stream ends without
                        // [DONE], as when a vLLM process dies.
                        return;
                    },
                    () = tx.closed() => return,
                }
            }
            buf.clear();
            meta.chunk(&mut buf, api::word(i), i == 0, i + 1 == self.max_tokens);
            if tx.send(Bytes::from(buf.clone())).await.is_err() {
                return;
            }
        }
        ticket.finish();
        buf.clear();
        if self.include_usage {
            let usage = Usage {
                prompt: self.prompt_tokens,
                completion: self.max_tokens,
                cached: adm.cached_tokens,
            };
            meta.usage_chunk(&mut buf, &usage);
        }
        buf.push_str(api::DONE);
        // The request is complete either way; a client that left at the last
        // moment just misses the trailer.
        let _ = tx.send(Bytes::from(buf)).await;
    }
}

/// One running pod.
pub struct SimPodHandle {
    pub name: String,
    pub addr: SocketAddr,
    pub pod: Arc<Pod>,
    /// The KV-event sockets, when the pod publishes events.
    pub kv_events: Option<KvEventsAddrs>,
}

impl SimPodHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// What [`SimFleet::restarter`] returns.
#[derive(Clone)]
pub struct FleetRestarter(Vec<Arc<Pod>>);

impl FleetRestarter {
    /// The one place a harness restarts the pods: every pod's
    /// [`Pod::restart`].
    pub fn restart_all(&self) {
        for p in &self.0 {
            p.restart();
        }
    }
}

impl std::fmt::Debug for FleetRestarter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FleetRestarter({} pods)", self.0.len())
    }
}

/// All pods of one process. Dropping it stops accepting connections.
pub struct SimFleet {
    pub pods: Vec<SimPodHandle>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SimFleet {
    pub fn urls(&self) -> Vec<String> {
        self.pods.iter().map(SimPodHandle::url).collect()
    }

    /// Restarts every pod's engine (see [`super::engine::Pod::restart`]).
    pub fn restart_all(&self) {
        self.restarter().restart_all();
    }

    /// A handle that restarts these pods from anywhere (the load generator
    /// holds one for `--restart-pods-at`), without owning the fleet.
    pub fn restarter(&self) -> FleetRestarter {
        FleetRestarter(self.pods.iter().map(|p| Arc::clone(&p.pod)).collect())
    }

    /// Stops the accept loops and waits for them to exit.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<PodCtx>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let stream = match stream {
            Ok((s, _)) => s,
            Err(e) => {
                // Usually EMFILE under a connection storm: back off briefly
                // instead of spinning.
                tracing::warn!(pod = %ctx.pod.name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(Arc::clone(&ctx), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// Binds and starts every pod of `cfg`.
pub async fn spawn_fleet(cfg: SimConfig) -> Result<SimFleet, SimError> {
    cfg.validate()?;
    let cfg = Arc::new(cfg);
    let json_name =
        |n: &String| serde_json::to_string(n).map_err(|e| SimError::Config(format!("{n}: {e}")));
    let model_json = json_name(&cfg.model)?;
    let adapter_json = Arc::new(
        cfg.lora_adapters
            .iter()
            .map(json_name)
            .collect::<Result<Vec<_>, _>>()?,
    );
    let adapter_seeds = Arc::new(
        cfg.lora_adapters
            .iter()
            .map(|a| xxhash_rust::xxh3::xxh3_64(a.as_bytes()).max(1))
            .collect::<Vec<_>>(),
    );
    let tokenizer = Arc::new(PromptTokenizer::from_config(&cfg)?);
    let (shutdown, rx) = watch::channel(false);
    let mut pods = Vec::with_capacity(usize::from(cfg.pods));
    let mut tasks = Vec::with_capacity(usize::from(cfg.pods));
    for i in 0..cfg.pods {
        let port = if cfg.base_port == 0 {
            0
        } else {
            cfg.base_port + i
        };
        let bind = format!("{}:{port}", cfg.host);
        let listener = TcpListener::bind(&bind)
            .await
            .map_err(|source| SimError::Bind {
                addr: bind.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: bind.clone(),
            source,
        })?;
        let name = format!("{}{i}", cfg.pod_name_prefix);
        let (sink, kv_addrs) = match kv_events::start(&cfg, usize::from(i), rx.clone()).await? {
            Some((sink, addrs, task)) => {
                tasks.push(task);
                (Some(sink), Some(addrs))
            }
            None => (None, None),
        };
        let pod = Arc::new(Pod::with_events(
            usize::from(i),
            name.clone(),
            addr.port(),
            Arc::clone(&cfg),
            sink,
        )?);
        let pod_header = HeaderValue::from_str(&name).map_err(|_| {
            SimError::Config(format!("pod name {name:?} is not a valid header value"))
        })?;
        let ctx = Arc::new(PodCtx {
            pod: Arc::clone(&pod),
            model_json: model_json.clone(),
            adapter_json: Arc::clone(&adapter_json),
            adapter_seeds: Arc::clone(&adapter_seeds),
            tokenizer: Arc::clone(&tokenizer),
            pod_header,
            port_header: HeaderValue::from(addr.port()),
        });
        tasks.push(tokio::spawn(accept_loop(listener, ctx, rx.clone())));
        pods.push(SimPodHandle {
            name,
            addr,
            pod,
            kv_events: kv_addrs,
        });
    }
    Ok(SimFleet {
        pods,
        shutdown,
        tasks,
    })
}
