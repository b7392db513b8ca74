//! One routed request, from "routed" to "finished".
//!
//! The director hands every routed request to the protocol layer as a
//! [`RequestTicket`]. The ticket is the single owner of what the request
//! holds and counts while it runs: the picked endpoint's in-flight and
//! prefill-backlog accounting, the `inference_objective_running_requests`
//! gauge, the model labels its metrics carry, and the rename that restores
//! the client's model name in responses. The protocol layer reports what it
//! sees (response headers, each response chunk, the end) and the ticket turns
//! that into accounting and metrics.
//!
//! Invariant: whatever the ticket took is given back exactly once, when it
//! is dropped, on every path: a finished response, an error, a client that
//! went away, a stream ended for a protocol violation. Only [`finish`]
//! records the response's metrics; a ticket dropped without it counts as
//! running no longer, and nothing else.
//!
//! [`finish`]: RequestTicket::finish

use std::{sync::Arc, time::Instant};

use tracing::{Span, field::Empty};

use crate::{
    endpoints::{Endpoint, InFlightGuard},
    flow_control::ReleaseHook,
    request::{ResponseRename, SseUsageScanner, Usage, parse_json_usage},
    scheduling::session,
    telemetry::{RequestMetrics, traces::TARGET},
};

/// Non-streaming response bodies kept for usage parsing, at most.
const MAX_USAGE_BODY: usize = 4 << 20;

#[derive(Debug)]
pub struct RequestTicket {
    metrics: Arc<RequestMetrics>,
    guard: InFlightGuard,
    model: String,
    target_model: String,
    rename: Option<ResponseRename>,
    /// When the request's headers arrived: durations count from there.
    arrived: Instant,
    response: ResponseTally,
    /// The request's trace span when it is sampled, and the response's
    /// under it once the response headers arrived (disabled otherwise).
    request_span: Span,
    response_span: Span,
    session: Option<SessionReply>,
    /// SLO admission's model, the request's cost and when it was routed:
    /// the first byte feeds the model.
    slo: Option<(Arc<super::SloAdmission>, f64, Instant)>,
    /// Flow control's hook, last so that it drops after `guard`: when it
    /// fires, the endpoint's in-flight accounting is released already.
    release: Option<ReleaseHook>,
}

/// The session header to set on the response: a token for each endpoint of
/// the destination list, so it can name the one that really served.
#[derive(Debug)]
pub(super) struct SessionReply {
    header: Arc<str>,
    /// (`ip:port`, token), the pick first.
    tokens: Vec<(Arc<str>, String)>,
}

impl SessionReply {
    pub(super) fn new(header: Arc<str>, endpoints: &[Arc<Endpoint>]) -> Self {
        Self {
            header,
            tokens: endpoints
                .iter()
                .map(|e| (Arc::clone(&e.host_port), session::token(e)))
                .collect(),
        }
    }
}

/// What the response showed so far.
#[derive(Debug, Default)]
struct ResponseTally {
    status: u16,
    sse: bool,
    first_byte: bool,
    bytes: u64,
    scanner: SseUsageScanner,
    json: Vec<u8>,
    json_overflow: bool,
}

impl RequestTicket {
    pub(super) fn new(
        metrics: Arc<RequestMetrics>,
        guard: InFlightGuard,
        model: String,
        target_model: String,
        arrived: Instant,
        session: Option<SessionReply>,
    ) -> Self {
        metrics
            .running_requests
            .with_label_values(&[metrics.model_label(&model)])
            .inc();
        Self {
            rename: ResponseRename::new(&target_model, &model),
            metrics,
            guard,
            model,
            target_model,
            arrived,
            response: ResponseTally::default(),
            session,
            request_span: Span::none(),
            response_span: Span::none(),
            slo: None,
            release: None,
        }
    }

    /// Reports the time to the first response byte of a successful
    /// response to SLO admission, for a request of `cost` routed now.
    pub(super) fn on_first_byte(&mut self, slo: Arc<super::SloAdmission>, cost: f64) {
        self.slo = Some((slo, cost, Instant::now()));
    }

    /// Fires `hook` when the request ends (flow control's dispatch signal).
    pub(super) fn on_release(&mut self, hook: ReleaseHook) {
        self.release = Some(hook);
    }

    /// Traces the response under the (sampled) request span.
    pub(super) fn trace(&mut self, request: Span) {
        self.request_span = request;
    }

    /// The endpoint the request was routed to, `ip:port`.
    pub fn picked(&self) -> &str {
        &self.guard.endpoint().host_port
    }

    /// The session header and token to set on the response, when session
    /// affinity is configured: the token of the endpoint that `served`
    /// (`ip:port` as the gateway reports it), or of the pick when the
    /// gateway does not say or names an endpoint outside the destination.
    pub fn session_header(&self, served: Option<&str>) -> Option<(&str, &str)> {
        let s = self.session.as_ref()?;
        let (_, token) = served
            .and_then(|served| s.tokens.iter().find(|(hp, _)| **hp == *served))
            .or_else(|| s.tokens.first())?;
        Some((&s.header, token))
    }

    /// Whether response bodies must pass through the picker to be correct
    /// (the model name was rewritten and must be restored), as opposed to
    /// only being counted.
    pub fn rewrites_response(&self) -> bool {
        self.rename.is_some()
    }

    /// The response headers arrived.
    pub fn on_response_headers(&mut self, status: u16, event_stream: bool) {
        self.response.status = status;
        self.response.sse = event_stream;
        if !self.request_span.is_disabled() {
            self.request_span
                .record("http.response.status_code", status);
            self.response_span = tracing::info_span!(target: TARGET, parent: &self.request_span,
                "epp.response",
                http.response.status_code = status,
                epp.streaming = event_stream,
                epp.response_bytes = Empty,
                gen_ai.usage.input_tokens = Empty,
                gen_ai.usage.output_tokens = Empty,
                epp.cached_tokens = Empty,
                otel.status_code = Empty,
            );
            if status >= 500 {
                self.response_span.record("otel.status_code", "error");
                self.request_span.record("otel.status_code", "error");
            }
        }
    }

    /// Accounts one response body chunk and returns it as it must be
    /// forwarded, with whether it changed. The first chunk is the first
    /// byte: the prompt has been prefilled, so it stops counting against the
    /// endpoint's prefill backlog.
    pub fn on_response_chunk(&mut self, chunk: Vec<u8>) -> (Vec<u8>, bool) {
        if !self.response.first_byte {
            self.response.first_byte = true;
            self.guard.prefill_done();
            if let Some((slo, cost, routed)) = self.slo.take()
                && self.response.status < 400
            {
                slo.observed(cost, routed.elapsed());
            }
            if !self.response_span.is_disabled() {
                tracing::info!(target: TARGET, parent: &self.response_span, "first byte");
            }
        }
        let r = &mut self.response;
        r.bytes += chunk.len() as u64;
        if r.sse {
            r.scanner.feed(&chunk);
        } else if !r.json_overflow {
            if r.json.len() + chunk.len() <= MAX_USAGE_BODY {
                r.json.extend_from_slice(&chunk);
            } else {
                r.json_overflow = true;
                r.json = Vec::new();
            }
        }
        match &self.rename {
            Some(rename) => rename.apply(chunk),
            None => (chunk, false),
        }
    }

    /// The response ended: records its duration, size, status and token
    /// usage, then releases the request.
    pub fn finish(self) {
        let m = &*self.metrics;
        let labels = [
            m.model_label(&self.model),
            m.model_label(&self.target_model),
        ];
        let r = &self.response;
        m.request_duration
            .with_label_values(&labels)
            .observe(self.arrived.elapsed().as_secs_f64());
        m.response_sizes
            .with_label_values(&labels)
            .observe(r.bytes as f64);
        if r.status >= 500 {
            m.request_error_total
                .with_label_values(&[labels[0], labels[1], "model_server_error"])
                .inc();
        }
        let usage: Option<Usage> = if r.sse {
            r.scanner.usage()
        } else if !r.json.is_empty() {
            parse_json_usage(&r.json)
        } else {
            None
        };
        if !self.response_span.is_disabled() {
            let s = &self.response_span;
            s.record("epp.response_bytes", r.bytes);
            if let Some(u) = &usage {
                s.record("gen_ai.usage.input_tokens", u.prompt_tokens);
                s.record("gen_ai.usage.output_tokens", u.completion_tokens);
                s.record("epp.cached_tokens", u.cached_tokens);
            }
        }
        if let Some(u) = usage {
            m.input_tokens
                .with_label_values(&labels)
                .observe(u.prompt_tokens as f64);
            m.output_tokens
                .with_label_values(&labels)
                .observe(u.completion_tokens as f64);
            m.cached_tokens
                .with_label_values(&labels)
                .observe(u.cached_tokens as f64);
        }
    }
}

impl Drop for RequestTicket {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.running_requests
            .with_label_values(&[m.model_label(&self.model)])
            .dec();
        // The in-flight guard releases the endpoint's accounting as it drops.
    }
}
