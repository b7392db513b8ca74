//! The routing decision as an OpenTelemetry span (`epp.schedule`, a child
//! of the request's span), for sampled requests only: the pick, its
//! fallbacks, the prefix hit, and the best candidates' total scores,
//! bounded to [`MAX_SCORED`] candidates so a large pool does not make a
//! span large.

use tracing::{Span, field::Empty};

use super::{Plan, RouteError};
use crate::telemetry::traces::TARGET;

/// Candidates whose totals a span lists, best first.
pub const MAX_SCORED: usize = 8;

/// A new decision span under the request's.
pub(super) fn schedule_span(request: &Span) -> Span {
    tracing::info_span!(target: TARGET, parent: request, "epp.schedule",
        epp.endpoint = Empty,
        epp.fallbacks = Empty,
        epp.candidates = Empty,
        epp.scores = Empty,
        epp.pick_scores = Empty,
        epp.prompt_blocks = Empty,
        epp.matched_blocks = Empty,
        epp.prefix_hit_ratio = Empty,
        epp.model = Empty,
        epp.target_model = Empty,
        otel.status_code = Empty,
        "error.type" = Empty,
    )
}

/// What was decided, on the decision span and the request span.
pub(super) fn record_plan(span: &Span, request: &Span, plan: &Plan) {
    let d = &plan.decision;
    let pick = d.endpoints.first().map(|e| e.host_port.to_string());
    let fallbacks = d
        .endpoints
        .iter()
        .skip(1)
        .map(|e| e.host_port.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if let Some(pick) = &pick {
        span.record("epp.endpoint", pick.as_str());
        request.record("epp.endpoint", pick.as_str());
    }
    span.record("epp.fallbacks", fallbacks.as_str());
    span.record("epp.prompt_blocks", d.prompt_blocks);
    span.record("epp.matched_blocks", d.matched_blocks);
    if d.prompt_blocks > 0 {
        span.record(
            "epp.prefix_hit_ratio",
            f64::from(d.matched_blocks) / f64::from(d.prompt_blocks),
        );
    }
    let model = crate::telemetry::logging::Clip(&plan.model).to_string();
    let target = crate::telemetry::logging::Clip(&plan.target_model).to_string();
    for s in [span, request] {
        s.record("epp.model", model.as_str());
        s.record("epp.target_model", target.as_str());
    }
    let Some(ex) = &d.explanation else { return };
    span.record("epp.candidates", ex.candidates.len());
    let mut scored: Vec<_> = ex
        .candidates
        .iter()
        .filter(|c| c.filtered_by.is_none())
        .collect();
    scored.sort_by(|a, b| b.total.total_cmp(&a.total));
    let scores = scored
        .iter()
        .take(MAX_SCORED)
        .map(|c| format!("{}={:.4}", c.address, c.total))
        .collect::<Vec<_>>()
        .join(" ");
    span.record("epp.scores", scores.as_str());
    if let Some(picked) = pick
        .as_deref()
        .and_then(|p| ex.candidates.iter().find(|c| c.address == p))
    {
        let per_scorer = picked
            .scores
            .iter()
            .take(MAX_SCORED)
            .map(|(name, score)| format!("{name}={score:.4}"))
            .collect::<Vec<_>>()
            .join(" ");
        span.record("epp.pick_scores", per_scorer.as_str());
    }
}

/// A refused request, on the decision span and the request span.
pub(super) fn record_error(span: &Span, request: &Span, e: &RouteError) {
    span.record("error.type", e.code());
    request.record("error.type", e.code());
    request.record("http.response.status_code", e.http_status());
    if e.http_status() >= 500 {
        span.record("otel.status_code", "error");
        request.record("otel.status_code", "error");
    }
}
