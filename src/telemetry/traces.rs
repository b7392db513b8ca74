//! OpenTelemetry traces (`--tracing`, default on, as in the Go picker),
//! exported over OTLP/gRPC and configured by the standard variables:
//!
//! | variable | |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT` | the collector (`http://host:4317`); **without either, nothing is recorded or sent** (unless `OTEL_TRACES_EXPORTER=otlp`, then `http://localhost:4317`) |
//! | `OTEL_TRACES_EXPORTER` | `otlp` or `none`; anything else turns traces off, said at startup |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL`, `_TRACES_PROTOCOL` | `grpc` only; another value turns traces off, said at startup |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | the resource (service name `gateway-api-inference-extension` by default, as the Go picker) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`, `parentbased_always_off`, `parentbased_traceidratio`; default `parentbased_traceidratio` with 0.1, as the Go picker |
//! | `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT` | per export call |
//! | `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` | the export queue (2,048 spans, 5 s, 512 by default) |
//! | `OTEL_SDK_DISABLED=true` | off |
//!
//! The request's trace is continued: its W3C `traceparent` (with
//! `tracestate`), else GCP's `x-cloud-trace-context`
//! (`TRACE_ID/SPAN_ID;o=1`, what Google's load balancers send), is the
//! parent of the picker's request span.
//!
//! **Cost.** The sampling decision is taken first, from the request headers,
//! before any span exists: a request that is not sampled creates no span at
//! all (a disabled `tracing::Span`), so with 1% sampling 99% of requests pay
//! one header lookup and one random number. Sampled requests become
//! `tracing` spans of target [`TARGET`], which only the OpenTelemetry layer
//! sees (logs never print them), exported by the SDK's batch processor on
//! its own thread through a bounded queue: when the collector is slow or
//! gone the queue fills and further spans are dropped; the request path
//! never waits for it.

use std::{str::FromStr, sync::Arc};

use opentelemetry::{
    Context,
    trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
    },
};
use opentelemetry_sdk::{
    Resource,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, Sampler as SdkSampler, SdkTracer, SdkTracerProvider,
    },
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span (and span event) meant for export.
pub const TARGET: &str = "epp::trace";

/// The service name when `OTEL_SERVICE_NAME` is not set: the Go picker's,
/// so existing trace queries find the picker.
pub const DEFAULT_SERVICE_NAME: &str = "gateway-api-inference-extension";

/// Default sampler argument, as the Go picker.
pub const DEFAULT_RATIO: f64 = 0.1;

/// Span names, in one place so dashboards and tests agree.
pub mod names {
    /// One request, from its headers to the end of its response (kind
    /// server). Parent: the gateway's span from `traceparent`.
    pub const REQUEST: &str = "epp.request";
    /// The routing decision (child of the request).
    pub const SCHEDULE: &str = "epp.schedule";
    /// The time a request waits in flow control's queue before it is
    /// scheduled (child of the request, ended before `epp.schedule`
    /// starts), with how the wait ended.
    pub const FLOW_CONTROL_QUEUE: &str = "epp.flow_control.queue";
    /// The response, from its headers to its end (child of the request).
    pub const RESPONSE: &str = "epp.response";
}

/// The span of a request's wait in flow control, under its request span;
/// disabled when the request is not sampled. Objective and fairness id are
/// the client's headers, clipped like log text; [`queue_outcome`]
/// records how the wait ended.
pub fn queue_span(request: &tracing::Span, objective: &str, fairness_id: &str) -> tracing::Span {
    if request.is_disabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(target: TARGET, parent: request, "epp.flow_control.queue",
        epp.objective = %super::logging::Clip(objective),
        epp.fairness_id = %super::logging::Clip(fairness_id),
        epp.flow_control.outcome = tracing::field::Empty,
    )
}

/// How a wait in flow control ended, on its span: `dispatched`, the
/// rejection's error code (`flow_control_ttl_expired`, ...), or
/// `abandoned` (the client or the gateway ended the request first).
pub fn queue_outcome(span: &tracing::Span, outcome: &str) {
    span.record("epp.flow_control.outcome", outcome);
}

/// How root requests (and, without `parentbased_`, every request) are
/// sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    AlwaysOn,
    AlwaysOff,
    /// Fraction of trace ids, as OpenTelemetry's TraceIdRatioBased.
    Ratio(f64),
}

/// The sampler of `OTEL_TRACES_SAMPLER`/`_ARG`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Follow a remote parent's sampled flag when there is one.
    pub parent_based: bool,
    pub root: Sampling,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            parent_based: true,
            root: Sampling::Ratio(DEFAULT_RATIO),
        }
    }
}

impl Sampler {
    /// From the variables' values; `Err` names a value that is not
    /// understood (the default is used then).
    pub fn parse(sampler: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(DEFAULT_RATIO),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio in [0, 1]")
                    }),
            }
        };
        let (parent_based, root) = match sampler.map(str::trim).unwrap_or("") {
            "" | "parentbased_traceidratio" => (true, Sampling::Ratio(ratio()?)),
            "traceidratio" => (false, Sampling::Ratio(ratio()?)),
            "always_on" => (false, Sampling::AlwaysOn),
            "always_off" => (false, Sampling::AlwaysOff),
            "parentbased_always_on" => (true, Sampling::AlwaysOn),
            "parentbased_always_off" => (true, Sampling::AlwaysOff),
            other => return Err(format!("OTEL_TRACES_SAMPLER={other:?} is not supported")),
        };
        Ok(Self { parent_based, root })
    }

    /// Whether a request with `parent` (a remote span context, if any) is
    /// sampled.
    pub fn sampled(&self, parent: Option<&SpanContext>) -> bool {
        if let (true, Some(p)) = (self.parent_based, parent) {
            return p.is_sampled();
        }
        match self.root {
            Sampling::AlwaysOn => true,
            Sampling::AlwaysOff => false,
            Sampling::Ratio(r) => match parent {
                Some(p) => trace_id_ratio(p.trace_id(), r),
                // No trace id yet: a random draw is the same distribution.
                None => r >= 1.0 || fastrand::f64() < r,
            },
        }
    }
}

/// OpenTelemetry's TraceIdRatioBased decision on a trace id.
fn trace_id_ratio(id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bytes = id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    (u64::from_be_bytes(low) >> 1) < bound
}

/// W3C `traceparent`: `VERSION-TRACEID-PARENTID-FLAGS` in lowercase hex.
pub fn parse_traceparent(value: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may add more.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version, 2)
        || !lower_hex(trace, 32)
        || !lower_hex(span, 16)
        || !lower_hex(flags, 2)
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let state = tracestate
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        state,
    ))
}

/// GCP's `x-cloud-trace-context`: `TRACE_ID/SPAN_ID;o=OPTIONS`, the trace id
/// 32 hex digits, the span id a decimal u64, `o=1` sampled.
pub fn parse_cloud_trace_context(value: &str) -> Option<SpanContext> {
    let (trace, rest) = value.trim().split_once('/')?;
    let (span, options) = match rest.split_once(';') {
        Some((s, o)) => (s, Some(o)),
        None => (rest, None),
    };
    if trace.len() != 32 || !trace.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let trace_id = TraceId::from_hex(&trace.to_ascii_lowercase()).ok()?;
    let span_id = SpanId::from_bytes(span.parse::<u64>().ok()?.to_be_bytes());
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let sampled = options.is_some_and(|o| o.trim() == "o=1");
    Some(SpanContext::new(
        trace_id,
        span_id,
        if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        },
        true,
        TraceState::default(),
    ))
}

/// Starts the request spans; cheap to clone. Disabled (the default) when
/// traces are off: then it never creates a span.
#[derive(Debug, Clone, Default)]
pub struct RequestTracer {
    sampler: Option<Arc<Sampler>>,
}

impl RequestTracer {
    /// A tracer that samples with `sampler` (traces must be exported: the
    /// OpenTelemetry layer installed, see `logging::init`).
    pub fn new(sampler: Sampler) -> Self {
        Self {
            sampler: Some(Arc::new(sampler)),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.sampler.is_some()
    }

    /// The span of one request, or a disabled span when it is not sampled.
    /// `header` looks up a request header by lowercase name.
    pub fn request_span<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a str>,
        path: &str,
        request_id: &str,
    ) -> tracing::Span {
        let Some(sampler) = &self.sampler else {
            return tracing::Span::none();
        };
        let parent = match header("traceparent") {
            Some(tp) => parse_traceparent(tp, header("tracestate")),
            None => header("x-cloud-trace-context").and_then(parse_cloud_trace_context),
        };
        if !sampler.sampled(parent.as_ref()) {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(target: TARGET, parent: None, "epp.request",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            url.path = %super::logging::Clip(path),
            epp.request_id = %super::logging::Clip(request_id),
            epp.model = tracing::field::Empty,
            epp.target_model = tracing::field::Empty,
            epp.endpoint = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        );
        if let Some(parent) = parent {
            // Fails only without the OpenTelemetry layer, which `enabled`
            // tracers always have.
            let _ = span.set_parent(Context::new().with_remote_span_context(parent));
        }
        span
    }
}

/// Traces as the environment configures them.
#[derive(Debug)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
    sampler: Sampler,
    /// What was decided, for the startup log (logging is not set up yet
    /// when this is built).
    notes: Vec<(bool, String)>,
}

/// Reads an environment variable, empty counting as unset.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Traces {
    /// Off: nothing recorded, nothing sent.
    pub fn off() -> Self {
        Self {
            provider: None,
            sampler: Sampler::default(),
            notes: Vec::new(),
        }
    }

    /// Traces from `--tracing` and the `OTEL_*` variables. Must run inside
    /// a tokio runtime (the gRPC exporter's channel belongs to it).
    pub fn from_env(enabled: bool) -> Self {
        let mut t = Self::off();
        if !enabled {
            t.note(false, "traces off (--tracing=false)".into());
            return t;
        }
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            t.note(false, "traces off (OTEL_SDK_DISABLED=true)".into());
            return t;
        }
        let exporter = env("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase());
        let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
        match exporter.as_deref() {
            Some("none") => {
                t.note(false, "traces off (OTEL_TRACES_EXPORTER=none)".into());
                return t;
            }
            Some("otlp") => {}
            Some(other) => {
                t.note(
                    true,
                    format!(
                        "traces off: OTEL_TRACES_EXPORTER={other:?} is not supported (otlp or none)"
                    ),
                );
                return t;
            }
            None if endpoint.is_none() => {
                t.note(false, "traces off: no collector configured (set OTEL_EXPORTER_OTLP_ENDPOINT to export)".into());
                return t;
            }
            None => {}
        }
        let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
        if let Some(p) = protocol.filter(|p| p.trim() != "grpc") {
            t.note(
                true,
                format!(
                    "traces off: OTEL_EXPORTER_OTLP_PROTOCOL={p:?} is not supported (grpc only)"
                ),
            );
            return t;
        }
        match Sampler::parse(
            env("OTEL_TRACES_SAMPLER").as_deref(),
            env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        ) {
            Ok(s) => t.sampler = s,
            Err(e) => t.note(
                true,
                format!("{e}; sampling with parentbased_traceidratio {DEFAULT_RATIO}"),
            ),
        }
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                t.note(
                    true,
                    format!("traces off: the OTLP exporter cannot be built: {e}"),
                );
                return t;
            }
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(BatchConfigBuilder::default().build())
            .build();
        let mut resource = Resource::builder();
        if env("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        // Every span reaching the SDK was sampled already (by RequestTracer,
        // before it existed); children follow their parent.
        let provider = SdkTracerProvider::builder()
            .with_sampler(SdkSampler::AlwaysOn)
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        t.note(
            false,
            format!(
                "traces exported over OTLP/gRPC to {} (sampler {:?})",
                endpoint.as_deref().unwrap_or("http://localhost:4317"),
                t.sampler
            ),
        );
        t.provider = Some(provider);
        t
    }

    fn note(&mut self, warn: bool, text: String) {
        self.notes.push((warn, text));
    }

    /// The tracer the OpenTelemetry layer exports through, when traces are on.
    pub fn tracer(&self) -> Option<SdkTracer> {
        self.provider.as_ref().map(|p| p.tracer("epp"))
    }

    /// What request handling uses to start spans.
    pub fn requests(&self) -> RequestTracer {
        match &self.provider {
            Some(_) => RequestTracer::new(self.sampler),
            None => RequestTracer::default(),
        }
    }

    /// Logs what was decided (once logging is set up).
    pub fn log_startup(&self) {
        for (warn, text) in &self.notes {
            if *warn {
                tracing::warn!("{text}");
            } else {
                tracing::info!("{text}");
            }
        }
    }

    /// Exports what is queued, waiting at most `timeout`.
    pub fn shutdown(self, timeout: std::time::Duration) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown_with_timeout(timeout)
        {
            tracing::warn!(error = %e, "traces not all exported at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_parsed_strictly() {
        let c = parse_traceparent(TP, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(c.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id().to_string(), "00f067aa0ba902b7");
        assert!(c.is_sampled() && c.is_remote());
        assert_eq!(c.trace_state().get("congo"), Some("t61rcWkgMzE"));
        let unsampled = TP.replace("-01", "-00");
        assert!(!parse_traceparent(&unsampled, None).unwrap().is_sampled());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?}");
        }
        assert!(
            parse_traceparent(&format!("01{}-future", &TP[2..]), None).is_some(),
            "a later version may add fields"
        );
    }

    #[test]
    fn cloud_trace_context_is_parsed() {
        let c = parse_cloud_trace_context("105445aa7843bc8bf206b12000100000/1;o=1").unwrap();
        assert_eq!(c.trace_id().to_string(), "105445aa7843bc8bf206b12000100000");
        assert_eq!(c.span_id().to_string(), "0000000000000001");
        assert!(c.is_sampled());
        let c = parse_cloud_trace_context("105445AA7843BC8BF206B12000100000/18446744073709551615")
            .unwrap();
        assert!(!c.is_sampled());
        assert_eq!(c.span_id().to_string(), "ffffffffffffffff");
        for bad in [
            "",
            "abc/1",
            "105445aa7843bc8bf206b12000100000/x;o=1",
            "105445aa7843bc8bf206b12000100000/0;o=1",
        ] {
            assert!(parse_cloud_trace_context(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn samplers_from_the_environment() {
        assert_eq!(Sampler::parse(None, None), Ok(Sampler::default()));
        assert_eq!(
            Sampler::parse(Some("parentbased_traceidratio"), Some("0.01")),
            Ok(Sampler {
                parent_based: true,
                root: Sampling::Ratio(0.01)
            })
        );
        assert_eq!(
            Sampler::parse(Some("always_on"), None),
            Ok(Sampler {
                parent_based: false,
                root: Sampling::AlwaysOn
            })
        );
        assert!(Sampler::parse(Some("jaeger_remote"), None).is_err());
        assert!(Sampler::parse(Some("traceidratio"), Some("2")).is_err());
        assert!(Sampler::parse(Some("traceidratio"), Some("x")).is_err());
    }

    #[test]
    fn parent_based_sampling_follows_the_parent() {
        let s = Sampler {
            parent_based: true,
            root: Sampling::AlwaysOff,
        };
        let sampled = parse_traceparent(TP, None).unwrap();
        let unsampled = parse_traceparent(&TP.replace("-01", "-00"), None).unwrap();
        assert!(s.sampled(Some(&sampled)));
        assert!(!s.sampled(Some(&unsampled)));
        assert!(!s.sampled(None));
        let ratio = Sampler {
            parent_based: false,
            root: Sampling::Ratio(0.0),
        };
        assert!(
            !ratio.sampled(Some(&sampled)),
            "not parent based: the ratio decides"
        );
        let all = Sampler {
            parent_based: false,
            root: Sampling::Ratio(1.0),
        };
        assert!(all.sampled(Some(&unsampled)) && all.sampled(None));
    }

    #[test]
    fn ratio_sampling_samples_about_the_ratio() {
        let s = Sampler {
            parent_based: true,
            root: Sampling::Ratio(0.01),
        };
        let n = (0..100_000).filter(|_| s.sampled(None)).count();
        assert!((700..1300).contains(&n), "{n} of 100000 at 1%");
        let by_id = (0..10_000u128)
            .filter(|i| {
                trace_id_ratio(
                    TraceId::from((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)),
                    0.5,
                )
            })
            .count();
        assert!((4_000..6_000).contains(&by_id), "{by_id}");
    }

    #[test]
    fn a_disabled_tracer_creates_no_span() {
        let t = RequestTracer::default();
        assert!(!t.is_enabled());
        assert!(t.request_span(|_| Some(TP), "/", "").is_disabled());
        let never = RequestTracer::new(Sampler {
            parent_based: false,
            root: Sampling::AlwaysOff,
        });
        assert!(never.request_span(|_| None, "/", "").is_disabled());
    }
}
