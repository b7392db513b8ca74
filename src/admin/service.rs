//! The `epp.admin.v1.Admin` gRPC service: what the picker sees, and why it
//! would route a request where it would.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::pb::{
    CandidateScore, EndpointInfo, EndpointMetrics, ExplainError, ExplainRequest, ExplainResponse,
    KvEventsRank, ListEndpointsRequest, ListEndpointsResponse, admin_server::Admin,
};
use crate::{
    config::{MODEL_REWRITE_HEADER, TEST_SELECTION_HEADER},
    director::{Director, RouteInput},
    endpoints::{ENGINE_LABEL, Endpoint},
};

/// Each subscribed rank's event state; empty without a subscription.
fn kv_events_ranks(e: &Endpoint) -> Vec<KvEventsRank> {
    let Some(view) = e.kv_events.view() else {
        return Vec::new();
    };
    view.ranks
        .iter()
        .enumerate()
        .map(|(r, state)| {
            let s = state.snapshot();
            KvEventsRank {
                rank: u32::try_from(r).unwrap_or(u32::MAX),
                connected: s.connected,
                known: s.known,
                last_seq: s.last_seq,
                batches: s.batches,
                gaps: s.gaps,
                replays: s.replays,
                restarts: s.restarts,
                decode_errors: s.decode_errors,
                protocol_errors: s.protocol_errors,
                lag_seconds: s.lag.as_secs_f64(),
                blocks: s.blocks,
                block_size_tokens: state.block_size().unwrap_or(0),
                ever_connected: state
                    .ever_connected
                    .load(std::sync::atomic::Ordering::Relaxed),
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct AdminService {
    director: Arc<Director>,
}

impl AdminService {
    pub fn new(director: Arc<Director>) -> Self {
        Self { director }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_endpoints(
        &self,
        _: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let store = self.director.store();
        let index = self.director.scheduler().index();
        let now = Instant::now();
        let endpoints = store
            .snapshot()
            .endpoints()
            .iter()
            .map(|e| EndpointInfo {
                name: e.name().to_owned(),
                address: e.host_port.to_string(),
                labels: e.spec.labels.clone().into_iter().collect(),
                engine: e.label(ENGINE_LABEL).unwrap_or("vllm").to_owned(),
                metrics: e.metrics.sample().map(|m| {
                    let age = e.metrics.age(now, store.epoch()).unwrap_or_default();
                    EndpointMetrics {
                        waiting_requests: m.waiting,
                        running_requests: m.running,
                        kv_cache_usage: m.kv_usage,
                        block_size_tokens: m.block_size,
                        num_gpu_blocks: m.num_blocks,
                        age_seconds: age.as_secs_f64(),
                        fresh: age <= store.staleness(),
                    }
                }),
                in_flight: e.in_flight(),
                consecutive_scrape_failures: e.metrics.consecutive_failures(),
                prefix_index_blocks: index.blocks_for(e.slot, e.uid),
                kv_events: kv_events_ranks(e),
                kv_events_fallback: crate::kv_events::readiness::on_fallback(e),
            })
            .collect();
        Ok(Response::new(ListEndpointsResponse {
            endpoints,
            synced: store.is_synced(),
        }))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let req = request.into_inner();
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let path = if req.path.is_empty() {
            "/v1/completions"
        } else {
            req.path.as_str()
        };
        let input = RouteInput {
            path,
            body: (!req.body.is_empty()).then_some(req.body.as_slice()),
            objective: header("x-gateway-inference-objective"),
            model_rewrite: header(MODEL_REWRITE_HEADER),
            test_selection: header(TEST_SELECTION_HEADER),
            session_token: self.director.session_header().and_then(header),
            subset: (!req.subset.is_empty()).then_some(req.subset.as_slice()),
            ..RouteInput::default()
        };
        let resp = match self.director.explain(&input) {
            Ok(routed) => {
                let d = &routed.decision;
                ExplainResponse {
                    picked: d
                        .endpoints
                        .iter()
                        .map(|e| e.host_port.to_string())
                        .collect(),
                    candidates: d
                        .explanation
                        .iter()
                        .flat_map(|x| &x.candidates)
                        .map(|c| CandidateScore {
                            address: c.address.clone(),
                            name: c.name.clone(),
                            scores: c.scores.iter().cloned().collect(),
                            total: c.total,
                            filtered_by: c.filtered_by.clone().unwrap_or_default(),
                            prefix_source: c.cached.source.as_str().to_owned(),
                            cached_tokens_gpu: c.cached.gpu_tokens,
                            cached_tokens_any: c.cached.any_tokens,
                        })
                        .collect(),
                    error: None,
                    model: routed.model,
                    target_model: routed.target_model,
                    prompt_blocks: d.prompt_blocks,
                    prompt_tokens: d.prompt_tokens,
                }
            }
            Err(e) => ExplainResponse {
                error: Some(ExplainError {
                    http_status: u32::from(e.http_status()),
                    message: e.to_string(),
                    code: e.code().to_owned(),
                }),
                ..ExplainResponse::default()
            },
        };
        Ok(Response::new(resp))
    }
}
