//! Drives jobs at a pace and turns the records into a [`PhaseResult`].
//!
//! A job is one request, or one whole multi-turn session. Closed loop: C
//! workers each take the next job as soon as their previous one ends. Open
//! loop: jobs start at Poisson arrivals of rate R (exponential gaps from a
//! seeded RNG), whatever is in flight, up to `max_inflight` (beyond which the
//! dispatcher waits, so an overloaded target cannot exhaust the client).
//! Either way no job starts after `max_duration`, and every request has its
//! own timeout, so a phase ends within max_duration + request timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::LoadError;
use super::client::{HttpClient, Record};
use super::result::{CacheStats, LoraStats, PhaseResult};
use super::stats::{LatencySummary, max_over_mean};
use crate::prom;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    Closed { concurrency: usize },
    Poisson { rate: f64, max_inflight: usize },
}

/// Runs one job: (job index, deadline after which no new request starts).
pub type JobFn = Arc<dyn Fn(usize, Instant) -> BoxFuture<'static, Vec<Record>> + Send + Sync>;

pub struct Driven {
    pub records: Vec<Record>,
    pub duration: Duration,
    pub hit_max_duration: bool,
}

pub async fn drive(
    jobs: usize,
    pace: Pace,
    max_duration: Duration,
    seed: u64,
    job: JobFn,
) -> Driven {
    let start = Instant::now();
    let deadline = start + max_duration;
    let mut records = Vec::with_capacity(jobs);
    let mut hit_max_duration = false;
    match pace {
        Pace::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut workers = JoinSet::new();
            for _ in 0..concurrency.max(1) {
                let next = Arc::clone(&next);
                let job = Arc::clone(&job);
                workers.spawn(async move {
                    let mut mine = Vec::new();
                    let mut cut = false;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= jobs {
                            break;
                        }
                        if Instant::now() >= deadline {
                            cut = true;
                            break;
                        }
                        mine.extend(job(i, deadline).await);
                    }
                    (mine, cut)
                });
            }
            while let Some(r) = workers.join_next().await {
                if let Ok((mine, cut)) = r {
                    records.extend(mine);
                    hit_max_duration |= cut;
                }
            }
        }
        Pace::Poisson { rate, max_inflight } => {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut inflight = JoinSet::new();
            let mut at = start;
            for i in 0..jobs {
                tokio::time::sleep_until(at).await;
                if Instant::now() >= deadline {
                    hit_max_duration = true;
                    break;
                }
                while inflight.len() >= max_inflight.max(1) {
                    if let Some(Ok(r)) = inflight.join_next().await {
                        records.extend(r);
                    }
                }
                inflight.spawn(job(i, deadline));
                // Exponential gap; 1 - f64() is in (0, 1].
                let gap = -(1.0 - rng.f64()).ln() / rate.max(1e-9);
                at += Duration::from_secs_f64(gap.min(3600.0));
            }
            while let Some(r) = inflight.join_next().await {
                if let Ok(r) = r {
                    records.extend(r);
                }
            }
        }
    }
    records.sort_by_key(|r| (r.start, r.job, r.turn));
    Driven {
        records,
        duration: start.elapsed(),
        hit_max_duration,
    }
}

/// The pods whose /metrics are read for the hit rate.
#[derive(Debug, Clone, Default)]
pub struct PodSet {
    pub urls: Vec<String>,
}

/// Counters summed over the fleet at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct FleetCounters {
    pub hits: f64,
    pub queries: f64,
    /// LoRA adapter (loads, evictions), when every pod exports the
    /// simulator's counters.
    pub lora: Option<(f64, f64)>,
}

pub async fn get_text(client: &HttpClient, url: &str, timeout: Duration) -> Result<String, String> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url.parse().map_err(|e| format!("bad url {url}: {e}"))?;
    let fut = async {
        let req = http::Request::get(uri)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timeout".to_owned())?
}

pub async fn scrape_fleet(client: &HttpClient, pods: &PodSet) -> Result<FleetCounters, LoadError> {
    let mut total = FleetCounters {
        lora: (!pods.urls.is_empty()).then_some((0.0, 0.0)),
        ..FleetCounters::default()
    };
    for base in &pods.urls {
        let url = format!("{}/metrics", base.trim_end_matches('/'));
        let text = get_text(client, &url, Duration::from_secs(10))
            .await
            .map_err(|msg| LoadError::Scrape {
                url: url.clone(),
                msg,
            })?;
        let get = |name: &str| match prom::sum(&text, name) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(LoadError::Scrape {
                url: url.clone(),
                msg: format!("no {name}"),
            }),
            Err(e) => Err(LoadError::Scrape {
                url: url.clone(),
                msg: e.to_string(),
            }),
        };
        total.hits += get("vllm:prefix_cache_hits_total")?;
        total.queries += get("vllm:prefix_cache_queries_total")?;
        let optional = |name: &str| prom::sum(&text, name).ok().flatten();
        total.lora = match (
            total.lora,
            optional(crate::sim::metrics::LORA_LOADS),
            optional(crate::sim::metrics::LORA_EVICTIONS),
        ) {
            (Some((l, e)), Some(loads), Some(evictions)) => Some((l + loads, e + evictions)),
            _ => None,
        };
    }
    Ok(total)
}

/// Inputs to [`summarize`] besides the records.
pub struct PhaseMeta {
    pub name: String,
    pub planned_jobs: usize,
    pub pace: Pace,
    pub known_pods: usize,
    pub ideal_hit_rate: Option<f64>,
    pub cache: Result<CacheStats, String>,
    /// Adapter (loads, evictions) over the phase, when the pods count them.
    pub lora: Option<(f64, f64)>,
}

/// Adapter (loads, evictions) between two scrapes.
pub fn lora_delta(before: FleetCounters, after: FleetCounters) -> Option<(f64, f64)> {
    let ((l0, e0), (l1, e1)) = (before.lora?, after.lora?);
    Some(((l1 - l0).max(0.0), (e1 - e0).max(0.0)))
}

/// Cache delta between two scrapes.
pub fn cache_delta(before: FleetCounters, after: FleetCounters) -> CacheStats {
    let hit_tokens = (after.hits - before.hits).max(0.0);
    let query_tokens = (after.queries - before.queries).max(0.0);
    CacheStats {
        hit_tokens,
        query_tokens,
        hit_rate: if query_tokens > 0.0 {
            hit_tokens / query_tokens
        } else {
            0.0
        },
    }
}

/// Share of follow-up turns (turn > 0) whose pod is the pod of the same
/// session's previous turn; both turns must have succeeded.
pub fn stickiness(records: &[Record]) -> Option<f64> {
    let mut by_turn: BTreeMap<(usize, usize), &str> = BTreeMap::new();
    for r in records {
        if let (Ok(_), Some(pod)) = (&r.outcome, &r.pod) {
            by_turn.insert((r.job, r.turn), pod.as_str());
        }
    }
    let (mut same, mut total) = (0usize, 0usize);
    for (&(job, turn), pod) in &by_turn {
        if turn == 0 {
            continue;
        }
        if let Some(prev) = by_turn.get(&(job, turn - 1)) {
            total += 1;
            if prev == pod {
                same += 1;
            }
        }
    }
    (total > 0).then(|| same as f64 / total as f64)
}

pub fn summarize(meta: PhaseMeta, driven: &Driven, with_stickiness: bool) -> PhaseResult {
    let mut errors = BTreeMap::new();
    let mut pod_requests: BTreeMap<String, usize> = BTreeMap::new();
    let mut ttft = Vec::new();
    let mut e2e = Vec::new();
    let (mut ok, mut out_tokens, mut prompt_tokens, mut cached_tokens) = (0usize, 0u64, 0u64, 0u64);
    let mut usage_seen = false;
    for r in &driven.records {
        match &r.outcome {
            Ok(s) => {
                ok += 1;
                if let Some(p) = &r.pod {
                    *pod_requests.entry(p.clone()).or_default() += 1;
                }
                e2e.push(s.e2e.as_secs_f64() * 1e3);
                if let Some(t) = s.ttft {
                    ttft.push(t.as_secs_f64() * 1e3);
                }
                if let Some(u) = s.usage {
                    usage_seen = true;
                    out_tokens += u.completion_tokens;
                    prompt_tokens += u.prompt_tokens;
                    cached_tokens += u
                        .prompt_tokens_details
                        .and_then(|d| d.cached_tokens)
                        .unwrap_or(0);
                }
            }
            Err(kind) => *errors.entry(kind.clone()).or_default() += 1,
        }
    }
    let secs = driven.duration.as_secs_f64().max(1e-9);
    let (concurrency, rate_rps) = match meta.pace {
        Pace::Closed { concurrency } => (Some(concurrency), None),
        Pace::Poisson { rate, .. } => (None, Some(rate)),
    };
    let (prefix_cache, prefix_cache_error) = match meta.cache {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e)),
    };
    PhaseResult {
        name: meta.name,
        planned_jobs: meta.planned_jobs,
        concurrency,
        rate_rps,
        duration_s: driven.duration.as_secs_f64(),
        hit_max_duration: driven.hit_max_duration,
        requests_sent: driven.records.len(),
        requests_ok: ok,
        errors,
        throughput_rps: ok as f64 / secs,
        output_tokens_per_s: out_tokens as f64 / secs,
        ttft_ms: LatencySummary::from_ms(&mut ttft),
        e2e_ms: LatencySummary::from_ms(&mut e2e),
        pod_load_max_over_mean: max_over_mean(pod_requests.values().copied(), meta.known_pods),
        pod_requests,
        prefix_cache,
        prefix_cache_error,
        usage_cached_ratio: (usage_seen && prompt_tokens > 0)
            .then(|| cached_tokens as f64 / prompt_tokens as f64),
        ideal_hit_rate: meta.ideal_hit_rate,
        stickiness: if with_stickiness {
            stickiness(&driven.records)
        } else {
            None
        },
        lora: meta.lora.map(|(loads, evictions)| LoraStats {
            loads,
            evictions,
            loads_per_1k_requests: if ok > 0 {
                loads * 1000.0 / ok as f64
            } else {
                0.0
            },
        }),
        target_pods: None,
        split: None,
        restart: None,
        epp_replica_requests: None,
        tenants: None,
        replica_kill: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::client::Success;

    fn rec(job: usize, turn: usize, pod: &str, ok: bool) -> Record {
        Record {
            job,
            turn,
            start: Instant::now(),
            pod: Some(pod.to_owned()),
            direct: false,
            outcome: if ok {
                Ok(Success::default())
            } else {
                Err("500".into())
            },
        }
    }

    #[test]
    fn stickiness_counts_consecutive_successful_turns() {
        let rs = vec![
            rec(0, 0, "a", true),
            rec(0, 1, "a", true),
            rec(0, 2, "b", true),
            rec(1, 0, "b", true),
            rec(1, 1, "b", false),
            rec(1, 2, "b", true),
        ];
        // Pairs: (0:0->1 same), (0:1->2 moved); session 1 has no valid pair.
        assert_eq!(stickiness(&rs), Some(0.5));
        assert_eq!(stickiness(&rs[..1]), None);
    }

    #[test]
    fn cache_delta_is_a_ratio_of_deltas() {
        let before = FleetCounters {
            hits: 100.0,
            queries: 1000.0,
            lora: Some((3.0, 1.0)),
        };
        let after = FleetCounters {
            hits: 400.0,
            queries: 1500.0,
            lora: Some((10.0, 4.0)),
        };
        let c = cache_delta(before, after);
        assert_eq!(c.hit_rate, 300.0 / 500.0);
        assert_eq!(lora_delta(before, after), Some((7.0, 3.0)));
        let no_lora = FleetCounters {
            lora: None,
            ..after
        };
        assert_eq!(lora_delta(before, no_lora), None);
        assert_eq!(
            cache_delta(FleetCounters::default(), FleetCounters::default()).hit_rate,
            0.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_respects_count_and_deadline() {
        let job: JobFn = Arc::new(|i, _| {
            Box::pin(async move {
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(100)).await;
                vec![Record {
                    job: i,
                    turn: 0,
                    start,
                    pod: None,
                    direct: false,
                    outcome: Ok(Success::default()),
                }]
            })
        });
        let d = drive(
            10,
            Pace::Closed { concurrency: 2 },
            Duration::from_secs(60),
            0,
            Arc::clone(&job),
        )
        .await;
        assert_eq!(d.records.len(), 10);
        assert_eq!(d.duration, Duration::from_millis(500));
        assert!(!d.hit_max_duration);
        let d = drive(
            100,
            Pace::Closed { concurrency: 2 },
            Duration::from_millis(250),
            0,
            Arc::clone(&job),
        )
        .await;
        assert_eq!(
            d.records.len(),
            6,
            "jobs started at 0, 100, 200 ms on 2 workers"
        );
        assert!(d.hit_max_duration);
        let d = drive(
            50,
            Pace::Poisson {
                rate: 100.0,
                max_inflight: 1000,
            },
            Duration::from_secs(60),
            1,
            job,
        )
        .await;
        assert_eq!(d.records.len(), 50);
        // 50 arrivals at 100/s take about half a second.
        assert!(d.duration > Duration::from_millis(200) && d.duration < Duration::from_secs(2));
    }
}
