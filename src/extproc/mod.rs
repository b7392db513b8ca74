//! The Envoy ext_proc gRPC service (envoy.service.ext_proc.v3).
//!
//! Each gRPC stream is one HTTP request. Its messages are handled by a
//! synchronous state machine ([`stream::ExtProcStream`]); this module only
//! adapts it to tonic: the response stream polls the inbound stream and hands
//! each message to the state machine, then yields whatever answers it queued.
//! No task is spawned and nothing is awaited while routing, so a stream costs
//! one allocation for its state and its answers go out as soon as they exist.
//! The one wait is flow control's queue: the stream then polls the queued
//! request's handle beside Envoy's messages, and answers when it is
//! dispatched.

/// Message builders; public so the bench's no-op ext_proc server sends the
/// very same message shapes as the picker.
pub mod envoy;
mod route;
mod stream;

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use envoy_types::pb::envoy::service::ext_proc::v3::{
    ProcessingRequest, ProcessingResponse, external_processor_server::ExternalProcessor,
};
use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

pub use envoy::{
    CONFORMANCE_SERVED, DESTINATION, LB_NAMESPACE, MAX_CHUNK, SERVED, SUBSET, SUBSET_NAMESPACE,
};
pub use route::ExtProcServer;
pub use stream::{ExtProcStream, ProtocolError, StreamSettings};

use crate::director::Director;

/// The gRPC service name gateways health-check.
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

#[derive(Debug, Clone)]
pub struct ExtProcService {
    director: Arc<Director>,
    settings: Arc<StreamSettings>,
}

impl ExtProcService {
    pub fn new(director: Arc<Director>, settings: StreamSettings) -> Self {
        Self {
            director,
            settings: Arc::new(settings),
        }
    }

    pub fn into_server(self) -> ExtProcServer<Self> {
        // Request bodies arrive in chunks well under this; it bounds what a
        // misbehaving peer can make us buffer per message.
        ExtProcServer::new(self, 64 << 20)
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        Ok(Response::new(ResponseStream {
            inbound: request.into_inner(),
            state: ExtProcStream::new(Arc::clone(&self.director), Arc::clone(&self.settings)),
            pending: VecDeque::new(),
            scratch: Vec::new(),
            ended: false,
        }))
    }
}

/// The answers of one ext_proc stream, produced as Envoy's messages arrive.
pub struct ResponseStream {
    inbound: Streaming<ProcessingRequest>,
    state: ExtProcStream,
    pending: VecDeque<ProcessingResponse>,
    scratch: Vec<ProcessingResponse>,
    ended: bool,
}

impl Stream for ResponseStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(r) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            // A request waiting in flow control's queue: its answers come
            // when it is dispatched. Envoy's side is polled as well, so a
            // client that goes away frees its place at once.
            if this.state.is_queued() && this.state.poll_queued(cx, &mut this.scratch).is_ready() {
                this.pending.extend(this.scratch.drain(..));
                continue;
            }
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    if let Err(e) = this.state.on_message(msg, &mut this.scratch) {
                        // Debug, not warn: whoever can reach the port could
                        // otherwise write a log line per stream at will.
                        tracing::debug!(error = %e, "ext_proc protocol violation; stream ended");
                        this.ended = true;
                        return Poll::Ready(Some(Err(Status::invalid_argument(format!(
                            "ext_proc protocol violation: {e}"
                        )))));
                    }
                    this.pending.extend(this.scratch.drain(..));
                }
                // Envoy closed its side, or the stream broke (client gone):
                // dropping the state releases any in-flight accounting.
                Poll::Ready(Some(Err(status))) => {
                    tracing::debug!(%status, "ext_proc stream ended with an error");
                    this.ended = true;
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
