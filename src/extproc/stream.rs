//! The per-request ext_proc state machine.
//!
//! Envoy opens one gRPC stream per HTTP request and sends, in order, request
//! headers, request body chunks, optional trailers, then the same for the
//! response. The answers must follow the same order per direction.
//!
//! Request side, by body mode (from the first message's `protocol_config`;
//! FULL_DUPLEX_STREAMED when absent, as GKE and the Go picker use it):
//! - FULL_DUPLEX_STREAMED: the headers answer is held back until the whole
//!   body has arrived, because it carries the destination; then it goes out,
//!   followed by the (possibly rewritten) body as streamed chunks of at most
//!   62,000 bytes, the last one with `end_of_stream`.
//! - BUFFERED: Envoy waits for the headers answer before sending the body, so
//!   headers are answered at once and the destination travels in the body
//!   answer (header mutation, `clear_route_cache`, dynamic metadata), with a
//!   plain body mutation when the body changed.
//! - NONE / STREAMED: the body cannot be held back, so the request is routed
//!   by load at the headers.
//!
//! A request without a body (`end_of_stream` on headers) is routed at once,
//! except a POST to an inference API, which needs a body: it gets 400.
//!
//! A request whose `content-encoding` is anything but `identity` (gzip, br,
//! zstd...) is routed at the headers by load, like NONE / STREAMED: the picker
//! does not decompress, so it cannot read the prompt, and holding the body
//! back would only add latency. Its body chunks are passed back byte for byte
//! (in full-duplex mode Envoy then forwards it chunked, without its length).
//!
//! Response side: headers are answered at once (with the served endpoint
//! echoed when enabled, and the session header the ticket names when session
//! affinity is configured); body chunks are passed back immediately
//! (server-sent events are never buffered). What the response shows (status,
//! first byte, usage) is handed to the routed request's `RequestTicket`,
//! which the director issued and which owns the request's accounting; it is
//! finished at the end of the response, or simply dropped with the stream
//! (error, client cancel), which releases everything as well.
//!
//! Errors in the client's HTTP request become ImmediateResponses with an
//! OpenAI-style JSON body; a client error never aborts the gRPC stream.
//! Messages that break the ext_proc protocol itself (a body or trailers
//! before the request headers, repeated request headers, messages after the
//! end of their direction, an empty `ProcessingRequest`) are the gateway's
//! fault, not the client's: the gRPC stream ends with INVALID_ARGUMENT
//! naming the violation, and whatever the request held is released at once.
//! Tolerated, because Envoy really sends them:
//! - a final body chunk (`end_of_stream` set) repeated after its direction
//!   ended (envoyproxy/envoy#46237): ignored;
//! - messages racing an ImmediateResponse: ignored;
//! - response messages with no request before them: Envoy's own local
//!   replies (431 for too many headers, 400 for malformed HTTP) pass through
//!   the filter although the request never did. They are answered as usual.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use envoy_types::pb::envoy::{
    config::core::v3::HeaderValueOption,
    extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
    service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request::Request,
    },
};

use super::envoy::{self, DESTINATION, LB_NAMESPACE};
use crate::{
    config::{MODEL_REWRITE_HEADER, TEST_SELECTION_HEADER},
    director::{
        Director, MAX_SESSION_TOKEN_BYTES, RequestTicket, RouteError, RouteInput, Routed,
        SLO_TTFT_HEADER, parse_slo_objective,
    },
    flow_control::{FAIRNESS_ID_HEADER, Waiting},
    request::ApiKind,
    telemetry::{
        logging::Clip,
        traces::{self, RequestTracer},
    },
};

/// Most a request body buffer is sized to before its bytes arrive (from
/// Content-Length); larger bodies grow as they come.
const RESERVE_LIMIT: usize = 1 << 20;

/// Settings shared by every stream.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub max_request_body: usize,
    /// Echo the served endpoint into `x-conformance-test-served-endpoint`.
    pub echo_served_endpoint: bool,
    /// Ask for response bodies on every request, not only when one needs them.
    pub always_want_response_body: bool,
    /// Honour the gateway's subset hint.
    pub honour_subset_hint: bool,
    /// Starts the trace span of each sampled request.
    pub tracer: RequestTracer,
}

const FULL_DUPLEX: i32 = BodySendMode::FullDuplexStreamed as i32;
const NONE: i32 = BodySendMode::None as i32;
const BUFFERED: i32 = BodySendMode::Buffered as i32;
const BUFFERED_PARTIAL: i32 = BodySendMode::BufferedPartial as i32;

/// A message sequence no well-behaved gateway sends. The stream ends with
/// INVALID_ARGUMENT rather than an ImmediateResponse: the client's HTTP
/// request may be fine, and a 4xx would blame it for the gateway's bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty ProcessingRequest: no headers, body or trailers")]
    EmptyMessage,
    #[error("request headers sent twice")]
    RepeatedRequestHeaders,
    #[error("{0} before the request headers")]
    BeforeRequestHeaders(&'static str),
    #[error("{0} after the request ended")]
    AfterRequestEnd(&'static str),
    #[error("{0} after the response ended")]
    AfterResponseEnd(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestPhase {
    /// Waiting for request headers.
    Headers,
    /// Collecting the body; the destination is not sent yet.
    Body,
    /// The whole request is here and waits in flow control's queue; no
    /// request message may follow, and nothing is answered until it is
    /// dispatched (then routed) or rejected.
    Queued,
    /// The destination went out; further request messages are passed through.
    Routed,
    /// An immediate response was sent; Envoy ends the request.
    Rejected,
}

/// State of one ext_proc stream.
#[derive(Debug)]
pub struct ExtProcStream {
    director: Arc<Director>,
    settings: Arc<StreamSettings>,
    /// When the stream (the request's headers) arrived.
    arrived: Instant,
    request_mode: i32,
    response_mode: i32,
    phase: RequestPhase,
    path: String,
    request_id: String,
    objective: Option<String>,
    fairness_id: Option<String>,
    slo_ttft_ms: Option<u64>,
    model_rewrite: Option<String>,
    test_selection: Option<String>,
    /// The session token sent back, when the director has a session header.
    session_token: Option<String>,
    subset: Option<Vec<String>>,
    /// Routing headers the client sent that must be removed.
    forbidden_present: Vec<String>,
    body: Vec<u8>,
    /// The request's Content-Length when it declared one within the limit:
    /// the body buffer is sized once instead of doubling per chunk (each
    /// doubling copies everything received so far).
    declared_len: usize,
    /// The forwarded request body has ended (or there was none).
    request_body_done: bool,
    /// The request ended at its headers: no body message may follow, not
    /// even the repeated final chunk tolerated after a body.
    bodiless: bool,
    /// The routed request, until its response ends.
    ticket: Option<RequestTicket>,
    /// The response direction ended; nothing more may arrive on it.
    response_done: bool,
    observability_only: bool,
    /// The request's trace span: disabled unless the request is sampled.
    span: tracing::Span,
    /// The request waiting in flow control's queue.
    queued: Option<Queued>,
}

/// A stream that ends while its request waits (the client went away)
/// says so on the wait's span; the queue itself lets go of the request
/// when its `Waiting` drops.
impl Drop for ExtProcStream {
    fn drop(&mut self) {
        self.abandon_queue();
    }
}

/// A request waiting for flow control to dispatch it.
#[derive(Debug)]
struct Queued {
    waiting: Waiting,
    /// The wait's trace span (disabled unless the request is sampled).
    span: tracing::Span,
    body: Option<Vec<u8>>,
    trailers_follow: bool,
    /// The request trailers arrived and their answer must follow the route.
    answer_trailers: bool,
}

impl ExtProcStream {
    pub fn new(director: Arc<Director>, settings: Arc<StreamSettings>) -> Self {
        Self {
            director,
            settings,
            arrived: Instant::now(),
            request_mode: FULL_DUPLEX,
            response_mode: FULL_DUPLEX,
            phase: RequestPhase::Headers,
            path: String::new(),
            request_id: String::new(),
            objective: None,
            fairness_id: None,
            slo_ttft_ms: None,
            model_rewrite: None,
            test_selection: None,
            session_token: None,
            subset: None,
            forbidden_present: Vec::new(),
            body: Vec::new(),
            declared_len: 0,
            request_body_done: false,
            bodiless: false,
            ticket: None,
            response_done: false,
            observability_only: false,
            span: tracing::Span::none(),
            queued: None,
        }
    }

    /// Whether the request waits in flow control's queue: the caller must
    /// then poll [`ExtProcStream::poll_queued`] as well as Envoy's messages.
    pub fn is_queued(&self) -> bool {
        self.queued.is_some()
    }

    /// Polls the queued request; once flow control dispatches it, it is
    /// routed (with the pool's state at that moment) and the answers are
    /// appended to `out`; a rejection (TTL) answers with the error.
    pub fn poll_queued(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<ProcessingResponse>,
    ) -> Poll<()> {
        let Some(q) = &mut self.queued else {
            return Poll::Ready(());
        };
        let result = match q.waiting.poll_dispatch(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let Some(q) = self.queued.take() else {
            return Poll::Ready(());
        };
        traces::queue_outcome(
            &q.span,
            match &result {
                Ok(_) => "dispatched",
                Err(rejection) => rejection.code(),
            },
        );
        // Ended here, so the decision's span follows it.
        drop(q.span);
        match result {
            Ok(token) => {
                self.route_now(q.body, q.trailers_follow, out);
                // Scheduled: its in-flight accounting shows now, so the
                // next dispatch may be decided.
                drop(token);
                if q.answer_trailers && self.phase != RequestPhase::Rejected {
                    out.push(envoy::response(envoy::trailers_response(true)));
                }
            }
            Err(rejection) => {
                let e = self
                    .director
                    .flow_rejected(&self.route_input(None), rejection);
                self.reject(&e, out);
            }
        }
        Poll::Ready(())
    }

    /// Takes the request out of flow control's queue, if it is there,
    /// without routing it.
    fn abandon_queue(&mut self) {
        if let Some(q) = self.queued.take() {
            traces::queue_outcome(&q.span, "abandoned");
        }
    }

    /// Handles one message from Envoy, appending the answers to `out`.
    ///
    /// On a protocol violation nothing is appended, the request's in-flight
    /// accounting is released, and the caller must end the gRPC stream with
    /// the error.
    pub fn on_message(
        &mut self,
        msg: ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), ProtocolError> {
        let start = out.len();
        let result = self.dispatch(msg, out);
        if result.is_err() {
            out.truncate(start);
            // Ends the request now rather than whenever the transport drops
            // the stream.
            self.ticket = None;
            self.abandon_queue();
            self.body = Vec::new();
            self.phase = RequestPhase::Rejected;
            self.response_done = true;
        } else if self.observability_only {
            // Envoy ignores answers in observability mode; do not send any.
            out.truncate(start);
        }
        result
    }

    fn dispatch(
        &mut self,
        msg: ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), ProtocolError> {
        if let Some(pc) = msg.protocol_config {
            self.request_mode = pc.request_body_mode;
            self.response_mode = pc.response_body_mode;
        }
        self.observability_only = msg.observability_mode;
        let Some(request) = msg.request else {
            return Err(ProtocolError::EmptyMessage);
        };
        let (what, is_request) = match &request {
            Request::RequestHeaders(_) => ("request headers", true),
            Request::RequestBody(_) => ("request body", true),
            Request::RequestTrailers(_) => ("request trailers", true),
            Request::ResponseHeaders(_) => ("response headers", false),
            Request::ResponseBody(_) => ("response body", false),
            Request::ResponseTrailers(_) => ("response trailers", false),
        };
        if self.phase == RequestPhase::Headers
            && matches!(
                request,
                Request::RequestBody(_) | Request::RequestTrailers(_)
            )
        {
            return Err(ProtocolError::BeforeRequestHeaders(what));
        }
        // Response messages may come first: Envoy runs its own local replies
        // (431 for too many headers, 400 for a malformed request) through the
        // filter even when the request never reached it. They are answered
        // like any response; nothing was routed, so nothing is accounted.
        // A request cannot start once its response is over, though.
        if self.response_done && matches!(request, Request::RequestHeaders(_)) {
            return Err(ProtocolError::AfterResponseEnd(what));
        }
        if !is_request && self.phase == RequestPhase::Queued {
            // The gateway answered the client itself (its own timeout):
            // the request will never be routed, so it leaves the queue.
            self.abandon_queue();
            self.phase = RequestPhase::Rejected;
        }
        if !is_request && self.response_done {
            return match request {
                // A final chunk repeated, as Envoy can do on the request
                // side (envoyproxy/envoy#46237): harmless, so tolerated.
                Request::ResponseBody(b) if b.end_of_stream => Ok(()),
                _ => Err(ProtocolError::AfterResponseEnd(what)),
            };
        }
        match request {
            Request::RequestHeaders(h) => self.request_headers(h, &msg.metadata_context, out)?,
            Request::RequestBody(b) => self.request_body(b, out)?,
            Request::RequestTrailers(_) => self.request_trailers(out)?,
            Request::ResponseHeaders(h) => {
                self.response_headers(h, &msg.metadata_context, &msg.attributes, out)
            }
            Request::ResponseBody(b) => self.response_body(b, out),
            Request::ResponseTrailers(_) => {
                out.push(envoy::response(envoy::trailers_response(false)));
                self.complete_response();
            }
        }
        Ok(())
    }

    fn request_headers(
        &mut self,
        h: HttpHeaders,
        md: &Option<envoy_types::pb::envoy::config::core::v3::Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), ProtocolError> {
        if self.phase != RequestPhase::Headers {
            return Err(ProtocolError::RepeatedRequestHeaders);
        }
        let map = h.headers.as_ref();
        self.path = envoy::header(map, ":path").unwrap_or("/").to_owned();
        self.request_id = envoy::header(map, "x-request-id").unwrap_or("").to_owned();
        self.objective = envoy::header(map, "x-gateway-inference-objective").map(str::to_owned);
        self.fairness_id = envoy::header(map, FAIRNESS_ID_HEADER).map(str::to_owned);
        self.slo_ttft_ms = envoy::header(map, SLO_TTFT_HEADER).and_then(parse_slo_objective);
        self.model_rewrite = envoy::header(map, MODEL_REWRITE_HEADER).map(str::to_owned);
        self.test_selection = envoy::header(map, TEST_SELECTION_HEADER).map(str::to_owned);
        self.session_token = self
            .director
            .session_header()
            .and_then(|h| envoy::header(map, h))
            .filter(|v| v.len() <= MAX_SESSION_TOKEN_BYTES)
            .map(str::to_owned);
        if self.settings.tracer.is_enabled() {
            // W3C traceparent, else GCP's x-cloud-trace-context: the parent.
            self.span = self.settings.tracer.request_span(
                |name| envoy::header(map, name),
                &self.path,
                &self.request_id,
            );
        }
        self.forbidden_present = envoy::client_routing_headers(map);
        if self.settings.honour_subset_hint {
            self.subset = envoy::subset_hint(md.as_ref());
        }
        let declared_len =
            envoy::header(map, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > self.settings.max_request_body as u64) {
            self.reject_too_large(out);
            return Ok(());
        }
        // Within max_request_body (checked above), so it fits in usize.
        self.declared_len = declared_len.map_or(0, |n| usize::try_from(n).unwrap_or(0));

        if h.end_of_stream
            && envoy::header(map, ":method") == Some("POST")
            && ApiKind::from_path(&self.path) != ApiKind::Other
        {
            // An inference call without a body would reach a model server
            // only to be refused there; parsing the empty body answers 400.
            self.request_body_done = true;
            self.bodiless = true;
            self.route(Some(Vec::new()), false, out);
            return Ok(());
        }
        // The picker does not decompress, so an encoded body is not read.
        let encoded = envoy::header(map, "content-encoding").is_some_and(|v| {
            let v = v.trim();
            !v.is_empty() && !v.eq_ignore_ascii_case("identity")
        });
        let buffered = matches!(self.request_mode, BUFFERED | BUFFERED_PARTIAL);
        if h.end_of_stream || encoded || !(buffered || self.request_mode == FULL_DUPLEX) {
            // No body to wait for, one Envoy will not hold back for us, or
            // one the picker cannot read.
            self.request_body_done = h.end_of_stream;
            self.bodiless = h.end_of_stream;
            self.route(None, false, out);
            return Ok(());
        }
        self.phase = RequestPhase::Body;
        if buffered {
            // Envoy sends the body only after this answer.
            let mutation = envoy::header_mutation(Vec::new(), self.forbidden_removals());
            let mut resp = envoy::response(envoy::headers_response(true, mutation, false));
            self.add_mode_override(&mut resp);
            out.push(resp);
        }
        Ok(())
    }

    fn request_body(
        &mut self,
        b: HttpBody,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), ProtocolError> {
        match self.phase {
            RequestPhase::Body => {}
            RequestPhase::Routed => {
                if self.request_body_done {
                    if !b.end_of_stream || self.bodiless {
                        return Err(ProtocolError::AfterRequestEnd("request body"));
                    }
                    // Envoy 1.35+ can re-deliver the final chunk after the
                    // end of stream was handled (envoyproxy/envoy#46237);
                    // echoing it would corrupt the forwarded body.
                    tracing::debug!(request_id = %Clip(&self.request_id), "request body chunk after end of stream ignored");
                    return Ok(());
                }
                // Routed at the headers (STREAMED mode, or an encoded body):
                // pass chunks through unchanged.
                self.request_body_done = b.end_of_stream;
                if self.request_mode == FULL_DUPLEX {
                    envoy::push_streamed(out, true, b.body, b.end_of_stream);
                } else {
                    out.push(envoy::response(envoy::body_response(
                        true, None, None, false,
                    )));
                }
                return Ok(());
            }
            // The body ended already; only the repeated final chunk
            // (envoyproxy/envoy#46237) is tolerated.
            RequestPhase::Queued => {
                return if b.end_of_stream && !self.bodiless {
                    Ok(())
                } else {
                    Err(ProtocolError::AfterRequestEnd("request body"))
                };
            }
            // Headers: refused by `dispatch`. Rejected: chunks Envoy sent
            // before it saw the ImmediateResponse.
            RequestPhase::Headers | RequestPhase::Rejected => return Ok(()),
        }
        let total = self.body.len() + b.body.len();
        if total > self.settings.max_request_body {
            // Refused before copying, so a stream never holds more than the
            // limit.
            self.reject_too_large(out);
            return Ok(());
        }
        if self.body.is_empty() {
            if self.declared_len > b.body.len() {
                // More chunks follow: one allocation of the final size, but
                // never more up front than RESERVE_LIMIT, so a client that
                // declares a large body and sends a few bytes cannot make
                // every stream hold megabytes.
                self.body = Vec::with_capacity(self.declared_len.min(RESERVE_LIMIT));
                self.body.extend_from_slice(&b.body);
            } else {
                self.body = b.body; // the whole body: take it without copying
            }
        } else {
            if total > self.body.capacity() {
                // Doubling, but never past the limit: a body just under it
                // must not cost twice the limit.
                let want = (self.body.capacity() * 2)
                    .max(total)
                    .min(self.settings.max_request_body);
                self.body.reserve_exact(want - self.body.len());
            }
            self.body.extend_from_slice(&b.body);
        }
        if b.end_of_stream || self.request_mode == BUFFERED_PARTIAL || self.request_mode == BUFFERED
        {
            self.finish_request_body(false, out);
        }
        Ok(())
    }

    fn request_trailers(&mut self, out: &mut Vec<ProcessingResponse>) -> Result<(), ProtocolError> {
        match self.phase {
            // The body ended without end_of_stream because trailers follow.
            RequestPhase::Body => self.finish_request_body(true, out),
            RequestPhase::Routed if self.request_body_done => {
                return Err(ProtocolError::AfterRequestEnd("request trailers"));
            }
            RequestPhase::Routed => self.request_body_done = true,
            RequestPhase::Queued => {
                return Err(ProtocolError::AfterRequestEnd("request trailers"));
            }
            RequestPhase::Headers | RequestPhase::Rejected => {}
        }
        match (&mut self.queued, self.phase) {
            // Answered after the route, which is still to come.
            (Some(q), _) => q.answer_trailers = true,
            (None, RequestPhase::Rejected) => {}
            (None, _) => out.push(envoy::response(envoy::trailers_response(true))),
        }
        Ok(())
    }

    fn finish_request_body(&mut self, trailers_follow: bool, out: &mut Vec<ProcessingResponse>) {
        self.request_body_done = true;
        let body = std::mem::take(&mut self.body);
        self.route(Some(body), trailers_follow, out);
    }

    /// What the director needs to know about this request.
    fn route_input<'a>(&'a self, body: Option<&'a [u8]>) -> RouteInput<'a> {
        RouteInput {
            path: &self.path,
            body,
            objective: self.objective.as_deref(),
            fairness_id: self.fairness_id.as_deref(),
            slo_ttft_ms: self.slo_ttft_ms,
            model_rewrite: self.model_rewrite.as_deref(),
            test_selection: self.test_selection.as_deref(),
            session_token: self.session_token.as_deref(),
            subset: self.subset.as_deref(),
            request_id: &self.request_id,
            arrived: Some(self.arrived),
            trace: Some(&self.span),
        }
    }

    /// Answers with an OpenAI-style error; Envoy ends the request.
    fn reject(&mut self, e: &RouteError, out: &mut Vec<ProcessingResponse>) {
        self.span
            .record("http.response.status_code", e.http_status());
        self.span.record("error.type", e.code());
        out.push(envoy::immediate_error(
            e.http_status(),
            &e.to_string(),
            e.error_type(),
            e.code(),
        ));
        self.phase = RequestPhase::Rejected;
        self.body = Vec::new();
    }

    /// Asks flow control whether the request may be routed now: routes it,
    /// queues it (asking the gateway to wait longer for the answer), or
    /// rejects it.
    fn route(
        &mut self,
        body: Option<Vec<u8>>,
        trailers_follow: bool,
        out: &mut Vec<ProcessingResponse>,
    ) {
        if self.observability_only {
            // The gateway does not wait for answers: nothing to hold back.
            return self.route_now(body, trailers_follow, out);
        }
        match self.director.admit(&self.route_input(body.as_deref())) {
            Ok(None) => self.route_now(body, trailers_follow, out),
            Ok(Some(waiting)) => {
                if let Some(timeout) = waiting.gateway_timeout() {
                    out.push(envoy::override_message_timeout(timeout));
                }
                let span = traces::queue_span(
                    &self.span,
                    self.objective.as_deref().unwrap_or(""),
                    self.fairness_id.as_deref().unwrap_or(""),
                );
                self.queued = Some(Queued {
                    waiting,
                    span,
                    body,
                    trailers_follow,
                    answer_trailers: false,
                });
                self.phase = RequestPhase::Queued;
            }
            Err(e) => self.reject(&e, out),
        }
    }

    /// Routes the request and answers with the destination, or rejects it.
    fn route_now(
        &mut self,
        body: Option<Vec<u8>>,
        trailers_follow: bool,
        out: &mut Vec<ProcessingResponse>,
    ) {
        let routed = self.director.route(&self.route_input(body.as_deref()));
        let Routed {
            destination,
            new_body,
            ticket,
        } = match routed {
            Ok(r) => r,
            Err(e) => return self.reject(&e, out),
        };
        self.ticket = Some(ticket);
        self.phase = RequestPhase::Routed;

        let mut set: Vec<HeaderValueOption> =
            vec![envoy::set_header(DESTINATION, destination.as_bytes())];
        let changed = new_body.is_some();
        let body = new_body.or(body);
        let buffered = matches!(self.request_mode, BUFFERED | BUFFERED_PARTIAL);
        // Streamed bodies lose their length on the way through Envoy unless it
        // is set again; a changed body needs its new length in every mode.
        if let Some(b) = &body
            && (changed || !buffered)
        {
            set.push(envoy::set_header("content-length", b.len().to_string()));
        }
        let mutation = envoy::header_mutation(set, self.forbidden_removals());
        let dynamic_metadata = Some(envoy::metadata(LB_NAMESPACE, DESTINATION, &destination));

        match body {
            Some(body) if buffered => {
                let mut resp = envoy::response(envoy::body_response(
                    true,
                    mutation,
                    if changed { Some(body) } else { None },
                    true,
                ));
                resp.dynamic_metadata = dynamic_metadata;
                out.push(resp);
            }
            Some(body) => {
                let mut resp = envoy::response(envoy::headers_response(true, mutation, true));
                resp.dynamic_metadata = dynamic_metadata;
                self.add_mode_override(&mut resp);
                out.push(resp);
                envoy::push_streamed(out, true, body, !trailers_follow);
            }
            None => {
                let mut resp = envoy::response(envoy::headers_response(true, mutation, true));
                resp.dynamic_metadata = dynamic_metadata;
                self.add_mode_override(&mut resp);
                out.push(resp);
            }
        }
    }

    fn forbidden_removals(&self) -> Vec<String> {
        self.forbidden_present.clone()
    }

    /// Asks for the response body (FULL_DUPLEX_STREAMED) when the gateway is
    /// configured not to send it and this request wants it.
    ///
    /// Envoy (1.40) honours a mode override only in the answer to request
    /// headers while it is still waiting for that answer, and only when
    /// neither body mode of the filter is FULL_DUPLEX_STREAMED. So this works
    /// with BUFFERED (or NONE) request bodies and a response body mode of
    /// NONE; with full-duplex request bodies the answer is deferred past the
    /// body and any override would be ignored, so none is sent. Only the
    /// upgrade is attempted: a picker that believed a refused downgrade took
    /// effect would answer chunks in the wrong shape.
    fn add_mode_override(&mut self, resp: &mut ProcessingResponse) {
        let wants_body = self.settings.always_want_response_body
            || (self.model_rewrite.is_some() && self.director.trusts_model_rewrite_header())
            || self
                .ticket
                .as_ref()
                .is_some_and(RequestTicket::rewrites_response);
        if wants_body && self.response_mode == NONE && self.request_mode != FULL_DUPLEX {
            resp.mode_override = Some(envoy::stream_response_body());
            self.response_mode = FULL_DUPLEX;
        }
    }

    fn reject_too_large(&mut self, out: &mut Vec<ProcessingResponse>) {
        let e = self
            .director
            .body_too_large(&self.route_input(None), self.settings.max_request_body);
        self.reject(&e, out);
    }

    fn response_headers(
        &mut self,
        h: HttpHeaders,
        md: &Option<envoy_types::pb::envoy::config::core::v3::Metadata>,
        attributes: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Struct>,
        out: &mut Vec<ProcessingResponse>,
    ) {
        let map = h.headers.as_ref();
        if let Some(ticket) = &mut self.ticket {
            let status = envoy::header(map, ":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let sse = envoy::header(map, "content-type")
                .is_some_and(|ct| ct.contains("text/event-stream"));
            ticket.on_response_headers(status, sse);
        }
        // The protocol's metadata key; Envoy's own upstream.address attribute
        // when the gateway does not set it.
        let served = envoy::served_endpoint(md.as_ref())
            .or_else(|| envoy::attribute(attributes, "upstream.address"));
        let mut set = Vec::new();
        if self.settings.echo_served_endpoint
            && let Some(served) = served
        {
            set.push(envoy::set_header(
                envoy::CONFORMANCE_SERVED,
                served.as_bytes(),
            ));
        }
        if let Some((name, token)) = self.ticket.as_ref().and_then(|t| t.session_header(served)) {
            set.push(envoy::set_header(name, token.as_bytes()));
        }
        if let (Some(served), Some(ticket)) = (served, &self.ticket) {
            let picked = ticket.picked();
            if served != picked {
                tracing::debug!(request_id = %Clip(&self.request_id), picked, served = %Clip(served), "gateway served another endpoint (fallback or retry)");
            }
        }
        out.push(envoy::response(envoy::headers_response(
            false,
            envoy::header_mutation(set, Vec::new()),
            false,
        )));
        if h.end_of_stream {
            self.complete_response();
        }
    }

    fn response_body(&mut self, b: HttpBody, out: &mut Vec<ProcessingResponse>) {
        let (body, renamed) = match &mut self.ticket {
            Some(ticket) => ticket.on_response_chunk(b.body),
            None => (b.body, false),
        };
        match self.response_mode {
            FULL_DUPLEX => envoy::push_streamed(out, false, body, b.end_of_stream),
            _ => {
                // A buffered body's headers are still held, so its length
                // can (and must) follow the mutation.
                let mutation = renamed.then(|| {
                    envoy::header_mutation(
                        vec![envoy::set_header("content-length", body.len().to_string())],
                        Vec::new(),
                    )
                });
                out.push(envoy::response(envoy::body_response(
                    false,
                    mutation.flatten(),
                    renamed.then_some(body),
                    false,
                )))
            }
        }
        if b.end_of_stream {
            self.complete_response();
        }
    }

    /// The response finished: the ticket records what it showed and
    /// releases the request.
    fn complete_response(&mut self) {
        if self.response_done {
            return;
        }
        self.response_done = true;
        if let Some(ticket) = self.ticket.take() {
            ticket.finish();
        }
    }
}

#[cfg(test)]
mod tests;
