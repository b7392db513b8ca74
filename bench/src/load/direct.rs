//! The proof scenarios' additions to a workload: traffic around the picker
//! (`--direct-fraction`) and a restart of every pod mid-run
//! (`--restart-pods-at`).
//!
//! **Direct traffic.** Request i goes straight to a pod, not through the
//! gateway, when a hash of (seed, i) falls below the fraction; the pod is
//! then drawn uniformly at random from a second hash. Both draws depend only
//! on the seed and the request index, so every policy of a comparison sends
//! exactly the same requests around the picker to the same pods. Uniform
//! rather than round robin: round robin over pods, with the workload's
//! round-robin order over groups, would send a group's direct requests to
//! the same pod every time whenever the group count and the pod count share
//! a factor, which is cache-friendly by accident; independent clients that
//! bypass the gateway (a batch job on a Service, a debugging user on a pod
//! address) have no such correlation with prefixes. Direct requests count
//! in the phase's figures like any other; [`SplitStats`] gives both shares
//! separately, the picker's share being the one a routing claim is about.
//!
//! **Restart.** Every request from index k = ceil(fraction x requests) on
//! waits until the pods were restarted once ([`crate::sim::FleetRestarter`]);
//! request k triggers it. So the requests after the restart are known
//! exactly, whatever the pace, and the ideal hit rate can count each
//! group's first request after it as the miss it has to be.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::Uri;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::LoadError;
use super::client::{HttpClient, Record, RequestSpec, send};
use super::runner::JobFn;
use super::stats::{LatencySummary, max_over_mean};
use super::workload::sub_seed;
use crate::sim::FleetRestarter;

/// Which requests bypass the gateway, and to which pod.
#[derive(Debug, Clone)]
pub struct DirectSplit {
    fraction: f64,
    seed: u64,
    /// The workload's endpoint (path) on every pod.
    pods: Vec<Uri>,
}

impl DirectSplit {
    /// `pods` are the pods' base URLs, `path` the API path requests use.
    pub fn new(fraction: f64, seed: u64, pods: &[String], path: &str) -> Result<Self, LoadError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(LoadError::Args(
                "--direct-fraction must be within 0..=1".into(),
            ));
        }
        if fraction > 0.0 && pods.is_empty() {
            return Err(LoadError::Args(
                "--direct-fraction needs the pods (--pod-metrics or --sim-pods)".into(),
            ));
        }
        let pods = pods
            .iter()
            .map(|base| {
                let s = format!("{}{path}", base.trim_end_matches('/'));
                s.parse()
                    .map_err(|e| LoadError::Args(format!("pod URL {s}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            fraction,
            seed,
            pods,
        })
    }

    /// The pod request `i` goes to directly, `None` when it goes through the
    /// gateway.
    pub fn pod_for(&self, i: usize) -> Option<usize> {
        if self.fraction <= 0.0 || self.pods.is_empty() {
            return None;
        }
        let u = unit(sub_seed(self.seed, &[10, i as u64]));
        (u < self.fraction)
            .then(|| (sub_seed(self.seed, &[11, i as u64]) % self.pods.len() as u64) as usize)
    }
}

/// A hash mapped to [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Restarts the pods once, just before request `at` is sent.
#[derive(Debug, Clone)]
pub struct RestartGate {
    pub at: usize,
    restarter: FleetRestarter,
    done: Arc<OnceLock<Instant>>,
}

impl RestartGate {
    pub fn new(at: usize, restarter: FleetRestarter) -> Self {
        Self {
            at,
            restarter,
            done: Arc::new(OnceLock::new()),
        }
    }

    /// Called before request `i`: the first caller at or past `at` restarts
    /// the pods, the others wait for that (a restart is a few lock-held
    /// map clears, so waiting briefly on it is fine).
    fn before(&self, i: usize) {
        if i >= self.at {
            self.done.get_or_init(|| {
                self.restarter.restart_all();
                Instant::now()
            });
        }
    }

    /// Whether the restart happened (the run reached request `at`).
    pub fn happened(&self) -> bool {
        self.done.get().is_some()
    }
}

/// `--restart-pods-at`: `0.5` or `50%` of the requests.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let (num, scale) = match s.strip_suffix('%') {
        Some(p) => (p, 100.0),
        None => (s, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|e| format!("{s:?}: {e} (give 0.5 or 50%)"))?;
    let v = v / scale;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?}: a fraction within 0..=1 (or 0%..=100%)"))
    }
}

/// One request per job, sent directly to a pod when `split` says so, after
/// the restart when `gate` says so.
pub fn routed_job(
    client: HttpClient,
    timeout: Duration,
    make: Arc<dyn Fn(usize) -> RequestSpec + Send + Sync>,
    split: Option<DirectSplit>,
    gate: Option<RestartGate>,
) -> JobFn {
    Arc::new(move |i, _deadline| {
        let client = client.clone();
        let make = Arc::clone(&make);
        let (split, gate) = (split.clone(), gate.clone());
        Box::pin(async move {
            if let Some(g) = &gate {
                g.before(i);
            }
            let mut spec = make(i);
            let direct = split.as_ref().and_then(|s| Some((s, s.pod_for(i)?)));
            if let Some((s, pod)) = direct {
                spec.uri = s.pods[pod].clone();
            }
            let start = Instant::now();
            let (pod, outcome) = send(&client, &spec, timeout).await;
            vec![Record {
                job: i,
                turn: 0,
                start,
                pod,
                direct: direct.is_some(),
                outcome,
            }]
        })
    })
}

/// The figures of one share of the traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShareStats {
    pub requests_sent: usize,
    pub requests_ok: usize,
    pub ttft_ms: Option<LatencySummary>,
    /// Cached over prompt tokens from the responses' usage (the pods'
    /// counters cannot tell the shares apart).
    pub usage_hit_rate: Option<f64>,
    pub pod_requests: BTreeMap<String, usize>,
    pub pod_load_max_over_mean: Option<f64>,
}

/// Requests through the picker and around it, separately.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    pub direct_fraction: f64,
    pub via_picker: ShareStats,
    pub direct: ShareStats,
}

/// What the restart did to the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartStats {
    /// Requests from this index on were sent after the restart.
    pub at_request: usize,
    pub happened: bool,
    /// Cached over prompt tokens (usage) of each group's first request
    /// after the restart: what a restart should make 0.
    pub first_after_restart_hit_rate: Option<f64>,
    /// The same over every request after the restart.
    pub after_restart_hit_rate: Option<f64>,
}

fn usage_tokens(r: &Record) -> Option<(u64, u64)> {
    let u = r.outcome.as_ref().ok()?.usage.as_ref()?;
    let cached = u
        .prompt_tokens_details
        .as_ref()
        .and_then(|d| d.cached_tokens)
        .unwrap_or(0);
    Some((cached, u.prompt_tokens))
}

fn ratio(cached: u64, prompt: u64) -> Option<f64> {
    (prompt > 0).then(|| cached as f64 / prompt as f64)
}

fn share<'a>(records: impl Iterator<Item = &'a Record>, known_pods: usize) -> ShareStats {
    let mut s = ShareStats::default();
    let (mut ttft, mut cached, mut prompt) = (Vec::new(), 0u64, 0u64);
    for r in records {
        s.requests_sent += 1;
        let Ok(ok) = &r.outcome else { continue };
        s.requests_ok += 1;
        if let Some(t) = ok.ttft {
            ttft.push(t.as_secs_f64() * 1e3);
        }
        if let Some((c, p)) = usage_tokens(r) {
            cached += c;
            prompt += p;
        }
        if let Some(pod) = &r.pod {
            *s.pod_requests.entry(pod.clone()).or_default() += 1;
        }
    }
    s.ttft_ms = LatencySummary::from_ms(&mut ttft);
    s.usage_hit_rate = ratio(cached, prompt);
    s.pod_load_max_over_mean = max_over_mean(s.pod_requests.values().copied(), known_pods);
    s
}

/// Splits `records` by the path each one took ([`Record::direct`], set by
/// [`routed_job`] from [`DirectSplit::pod_for`]).
pub fn split_stats(split: &DirectSplit, records: &[Record]) -> SplitStats {
    let pods = split.pods.len();
    SplitStats {
        direct_fraction: split.fraction,
        via_picker: share(records.iter().filter(|r| !r.direct), pods),
        direct: share(records.iter().filter(|r| r.direct), pods),
    }
}

/// [`RestartStats`] of records whose job `j` belongs to group `group(j)`.
pub fn restart_stats(
    gate: &RestartGate,
    records: &[Record],
    group: impl Fn(usize) -> usize,
) -> RestartStats {
    let mut after: Vec<&Record> = records.iter().filter(|r| r.job >= gate.at).collect();
    after.sort_by_key(|r| r.job);
    let mut seen = HashSet::new();
    let (mut first, mut all) = ((0u64, 0u64), (0u64, 0u64));
    for r in after {
        let Some((c, p)) = usage_tokens(r) else {
            continue;
        };
        all = (all.0 + c, all.1 + p);
        if seen.insert(group(r.job)) {
            first = (first.0 + c, first.1 + p);
        }
    }
    RestartStats {
        at_request: gate.at,
        happened: gate.happened(),
        first_after_restart_hit_rate: ratio(first.0, first.1),
        after_restart_hit_rate: ratio(all.0, all.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_split_is_seeded_and_near_its_fraction() {
        let pods: Vec<String> = (0..4)
            .map(|i| format!("http://127.0.0.1:{}", 8000 + i))
            .collect();
        let s = DirectSplit::new(0.3, 7, &pods, "/v1/completions").unwrap();
        let picks: Vec<Option<usize>> = (0..10_000).map(|i| s.pod_for(i)).collect();
        let again: Vec<Option<usize>> = (0..10_000).map(|i| s.pod_for(i)).collect();
        assert_eq!(picks, again, "same requests, same pods, every policy");
        let direct = picks.iter().flatten().count() as f64 / 10_000.0;
        assert!((direct - 0.3).abs() < 0.02, "{direct}");
        for pod in 0..4 {
            let n = picks.iter().filter(|p| **p == Some(pod)).count() as f64 / 10_000.0;
            assert!((n - 0.075).abs() < 0.01, "pod {pod}: {n}");
        }
        assert_eq!(
            s.pods[2].to_string(),
            "http://127.0.0.1:8002/v1/completions"
        );
        let none = DirectSplit::new(0.0, 7, &[], "/v1/completions").unwrap();
        assert!((0..100).all(|i| none.pod_for(i).is_none()));
        assert!(DirectSplit::new(0.5, 7, &[], "/x").is_err());
        assert!(DirectSplit::new(1.5, 7, &pods, "/x").is_err());
    }

    #[test]
    fn restart_fraction_parses_both_forms() {
        assert_eq!(parse_fraction("0.5"), Ok(0.5));
        assert_eq!(parse_fraction("25%"), Ok(0.25));
        assert!(parse_fraction("150%").is_err());
        assert!(parse_fraction("half").is_err());
    }
}
