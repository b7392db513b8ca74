//! The tenants workload's traffic mix and its figures (flow control's
//! proof, bench/results/flow-control).
//!
//! Traffic: one Poisson stream at the sum of the tenants' rates; request i
//! belongs to a tenant drawn with probability rate / total and is critical
//! with probability `critical_share`, both from a seeded RNG of (seed, i)
//! alone. Thinning a Poisson stream this way gives each tenant (and each
//! class) an independent Poisson stream at its own rate.
//!
//! Figures: per (tenant, objective) the successes, errors and TTFT; per
//! tenant goodput (successful requests completed within the arrival window,
//! per second of it: the allocation while both tenants compete, not the
//! drain of one tenant's backlog after arrivals stop) against its max-min
//! fair share of the total goodput; Jain's index over the tenants' goodput
//! (as the issue states the target) and over goodput / fair share (1 when
//! every tenant gets its fair share whatever the demands); requests refused
//! by the picker with a code of its own, apart from requests lost after
//! admission.

use std::collections::BTreeMap;

use super::LoadError;
use super::client::Record;
use super::result::{ClassStats, PredictionStats, TenantShare, TenantsStats};
use super::stats::{LatencySummary, jain_index, max_min_shares};
use super::workload::sub_seed;

/// The tenants and the critical share.
#[derive(Debug, Clone)]
pub struct Mix {
    /// (name, arrivals per second).
    pub tenants: Vec<(String, f64)>,
    pub critical_share: f64,
    pub seed: u64,
}

impl Mix {
    /// Parses `NAME=RATE` entries.
    pub fn parse(specs: &[String], critical_share: f64, seed: u64) -> Result<Self, LoadError> {
        let mut tenants = Vec::with_capacity(specs.len());
        for s in specs {
            let (name, rate) = s
                .split_once('=')
                .ok_or_else(|| LoadError::Args(format!("--tenants {s}: expected NAME=RATE")))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|e| LoadError::Args(format!("--tenants {s}: {e}")))?;
            let name = name.trim();
            if name.is_empty() || !(rate.is_finite() && rate > 0.0) {
                return Err(LoadError::Args(format!(
                    "--tenants {s}: needs a name and a rate > 0"
                )));
            }
            if tenants.iter().any(|(n, _)| n == name) {
                return Err(LoadError::Args(format!("--tenants: {name} given twice")));
            }
            tenants.push((name.to_owned(), rate));
        }
        if tenants.is_empty() {
            return Err(LoadError::Args("--tenants: none given".into()));
        }
        if !(0.0..=1.0).contains(&critical_share) {
            return Err(LoadError::Args(
                "--critical-share must be within 0..=1".into(),
            ));
        }
        Ok(Self {
            tenants,
            critical_share,
            seed,
        })
    }

    pub fn total_rate(&self) -> f64 {
        self.tenants.iter().map(|(_, r)| r).sum()
    }

    /// (tenant index, critical) of request `i`.
    pub fn class(&self, i: usize) -> (usize, bool) {
        let mut rng = fastrand::Rng::with_seed(sub_seed(self.seed, &[7, i as u64]));
        let mut x = rng.f64() * self.total_rate();
        let mut tenant = self.tenants.len() - 1;
        for (k, (_, r)) in self.tenants.iter().enumerate() {
            if x < *r {
                tenant = k;
                break;
            }
            x -= r;
        }
        (tenant, rng.f64() < self.critical_share)
    }
}

/// Whether an error kind (see `client::error_kind`) is the picker refusing
/// a request it never admitted: flow control's queue bound or TTL, shedding
/// under saturation, SLO admission.
pub fn is_refusal(kind: &str) -> bool {
    let code = kind.split_once(' ').map_or("", |(_, c)| c);
    code.starts_with("flow_control_") || code == "pool_saturated" || code.starts_with("slo_")
}

/// The figures of a phase whose arrivals lasted `window_s` seconds and
/// whose request `r.job` has class `class(r.job)`; `objectives` names the
/// (standard, critical) objectives.
pub fn stats(
    mix: &Mix,
    objectives: (&str, &str),
    slo_ttft_ms: Option<u64>,
    records: &[Record],
    window_s: f64,
) -> TenantsStats {
    struct Acc {
        sent: usize,
        ok: usize,
        /// Successes completed within the window.
        in_window: usize,
        errors: BTreeMap<String, usize>,
        ttft: Vec<f64>,
        met: usize,
    }
    let t0 = records.iter().map(|r| r.start).min();
    let end = t0.map(|t| t + std::time::Duration::from_secs_f64(window_s.max(0.0)));
    let mut acc: Vec<Acc> = (0..mix.tenants.len() * 2)
        .map(|_| Acc {
            sent: 0,
            ok: 0,
            in_window: 0,
            errors: BTreeMap::new(),
            ttft: Vec::new(),
            met: 0,
        })
        .collect();
    let (mut refused, mut lost) = (0, 0);
    for r in records {
        let (tenant, critical) = mix.class(r.job);
        let a = &mut acc[tenant * 2 + usize::from(critical)];
        a.sent += 1;
        match &r.outcome {
            Ok(s) => {
                a.ok += 1;
                if end.is_some_and(|end| r.start + s.e2e <= end) {
                    a.in_window += 1;
                }
                if let Some(t) = s.ttft {
                    let ms = t.as_secs_f64() * 1e3;
                    a.ttft.push(ms);
                    if slo_ttft_ms.is_some_and(|slo| ms <= slo as f64) {
                        a.met += 1;
                    }
                }
            }
            Err(kind) => {
                *a.errors.entry(kind.clone()).or_default() += 1;
                if is_refusal(kind) {
                    refused += 1;
                } else {
                    lost += 1;
                }
            }
        }
    }
    let secs = window_s.max(1e-9);
    let goodput: Vec<f64> = (0..mix.tenants.len())
        .map(|t| (acc[t * 2].in_window + acc[t * 2 + 1].in_window) as f64 / secs)
        .collect();
    let offered: Vec<f64> = mix.tenants.iter().map(|(_, r)| *r).collect();
    let fair = max_min_shares(&offered, goodput.iter().sum());
    let normalized: Vec<f64> = goodput
        .iter()
        .zip(&fair)
        .map(|(g, f)| if *f > 0.0 { g / f } else { 0.0 })
        .collect();
    let mut ttft_by_objective = BTreeMap::new();
    for (critical, name) in [(false, objectives.0), (true, objectives.1)] {
        let mut pooled: Vec<f64> = acc
            .iter()
            .skip(usize::from(critical))
            .step_by(2)
            .flat_map(|a| a.ttft.iter().copied())
            .collect();
        if let Some(s) = LatencySummary::from_ms(&mut pooled) {
            ttft_by_objective.insert(name.to_owned(), s);
        }
    }
    let (ok, met, sent): (usize, usize, usize) = acc
        .iter()
        .fold((0, 0, 0), |(o, m, s), a| (o + a.ok, m + a.met, s + a.sent));
    let classes = acc
        .iter_mut()
        .enumerate()
        .map(|(k, a)| ClassStats {
            tenant: mix.tenants[k / 2].0.clone(),
            objective: (if k % 2 == 1 {
                objectives.1
            } else {
                objectives.0
            })
            .to_owned(),
            sent: a.sent,
            ok: a.ok,
            errors: std::mem::take(&mut a.errors),
            goodput_rps: a.in_window as f64 / secs,
            ttft_ms: LatencySummary::from_ms(&mut a.ttft),
            slo_met: slo_ttft_ms
                .filter(|_| a.ok > 0)
                .map(|_| a.met as f64 / a.ok as f64),
        })
        .collect();
    TenantsStats {
        goodput_rps: goodput.iter().sum(),
        window_s,
        classes,
        ttft_by_objective,
        tenants: mix
            .tenants
            .iter()
            .enumerate()
            .map(|(t, (name, rate))| {
                (
                    name.clone(),
                    TenantShare {
                        offered_rps: *rate,
                        goodput_rps: goodput[t],
                        fair_share_rps: fair[t],
                    },
                )
            })
            .collect(),
        jain_goodput: jain_index(&goodput),
        jain_of_fair_share: jain_index(&normalized),
        refused,
        lost,
        slo_ttft_ms,
        slo_met_of_sent: slo_ttft_ms
            .filter(|_| sent > 0)
            .map(|_| met as f64 / sent as f64),
        slo_met_of_ok: slo_ttft_ms
            .filter(|_| ok > 0)
            .map(|_| met as f64 / ok as f64),
        prediction: None,
    }
}

/// The picker's prediction-error histogram (`epp_slo_ttft_prediction_ratio`)
/// summarized from a /metrics page; `None` without observations.
pub fn prediction_stats(page: &str) -> Option<PredictionStats> {
    const NAME: &str = "epp_slo_ttft_prediction_ratio_bucket{";
    let mut buckets: Vec<(f64, f64)> = page
        .lines()
        .filter(|l| l.starts_with(NAME))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = buckets.last()?.1;
    if count <= 0.0 {
        return None;
    }
    let at = |le: f64| {
        buckets
            .iter()
            .rev()
            .find(|(b, _)| *b <= le + 1e-9)
            .map_or(0.0, |(_, c)| *c)
    };
    Some(PredictionStats {
        count,
        within_25pct: (at(1.25) - at(0.8)) / count,
        within_2x: (at(2.0) - at(0.5)) / count,
        median_ratio_le: buckets
            .iter()
            .find(|(_, c)| *c >= count / 2.0)
            .map_or(f64::INFINITY, |(le, _)| *le),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::load::client::Success;

    fn mix() -> Mix {
        Mix::parse(&["heavy=8".into(), "light=2".into()], 0.25, 1).unwrap()
    }

    #[test]
    fn classes_follow_the_rates_and_share() {
        let m = mix();
        let n = 20_000;
        let (mut light, mut critical) = (0usize, 0usize);
        for i in 0..n {
            let (t, c) = m.class(i);
            light += usize::from(t == 1);
            critical += usize::from(c);
        }
        let light = light as f64 / n as f64;
        let critical = critical as f64 / n as f64;
        assert!((light - 0.2).abs() < 0.01, "{light}");
        assert!((critical - 0.25).abs() < 0.01, "{critical}");
        assert_eq!(m.class(5), m.class(5), "a request's class is fixed");
        for bad in [
            vec!["x".to_owned()],
            vec!["a=0".to_owned()],
            vec!["a=1".to_owned(), "a=2".to_owned()],
            vec![],
        ] {
            assert!(Mix::parse(&bad, 0.1, 0).is_err(), "{bad:?}");
        }
        assert!(Mix::parse(&["a=1".into()], 1.5, 0).is_err());
    }

    #[test]
    fn prediction_stats_from_the_histogram() {
        let page = "# HELP x\n\
epp_slo_ttft_prediction_ratio_bucket{le=\"0.5\"} 1\n\
epp_slo_ttft_prediction_ratio_bucket{le=\"0.8\"} 2\n\
epp_slo_ttft_prediction_ratio_bucket{le=\"1\"} 6\n\
epp_slo_ttft_prediction_ratio_bucket{le=\"1.25\"} 8\n\
epp_slo_ttft_prediction_ratio_bucket{le=\"2\"} 9\n\
epp_slo_ttft_prediction_ratio_bucket{le=\"+Inf\"} 10\n\
epp_slo_ttft_prediction_ratio_count 10\n";
        let p = prediction_stats(page).unwrap();
        assert_eq!(p.count, 10.0);
        assert!((p.within_25pct - 0.6).abs() < 1e-12);
        assert!((p.within_2x - 0.8).abs() < 1e-12);
        assert_eq!(p.median_ratio_le, 1.0);
        assert_eq!(prediction_stats("other 1\n"), None);
    }

    #[test]
    fn refusals_are_the_pickers_own_codes() {
        assert!(is_refusal("503 flow_control_ttl_expired"));
        assert!(is_refusal("429 flow_control_queue_full"));
        assert!(is_refusal("429 pool_saturated"));
        assert!(is_refusal("429 slo_ttft_unattainable"));
        assert!(!is_refusal("503"));
        assert!(!is_refusal("timeout"));
        assert!(!is_refusal("503 no_ready_endpoint"));
    }

    fn record(job: usize, outcome: Result<u64, &str>) -> Record {
        Record {
            job,
            turn: 0,
            start: Instant::now(),
            pod: None,
            direct: false,
            outcome: outcome
                .map(|ms| Success {
                    ttft: Some(Duration::from_millis(ms)),
                    ..Success::default()
                })
                .map_err(str::to_owned),
        }
    }

    #[test]
    fn stats_split_by_class_and_score_fairness() {
        let m = mix();
        // Find jobs of each class.
        let of = |want: (usize, bool)| (0..).find(|&i| m.class(i) == want).unwrap();
        let (hs, hc, ls) = (of((0, false)), of((0, true)), of((1, false)));
        let records = vec![
            record(hs, Ok(100)),
            record(hs, Ok(300)),
            record(hs, Err("503 flow_control_ttl_expired")),
            record(hc, Ok(50)),
            record(ls, Ok(80)),
            record(ls, Err("timeout")),
        ];
        let mut late = record(ls, Ok(70));
        if let Ok(s) = &mut late.outcome {
            s.e2e = Duration::from_secs(5);
        }
        let mut records = records;
        records.push(late);
        let s = stats(&m, ("standard", "critical"), Some(90), &records, 2.0);
        assert_eq!((s.refused, s.lost), (1, 1));
        // The late success ends after the 2 s window: served, not goodput.
        assert_eq!(s.goodput_rps, 2.0);
        let heavy = &s.tenants["heavy"];
        let light = &s.tenants["light"];
        assert_eq!((heavy.goodput_rps, light.goodput_rps), (1.5, 0.5));
        // Total goodput 2 req/s, offered 8 and 2: equal split of 1 each.
        assert_eq!((heavy.fair_share_rps, light.fair_share_rps), (1.0, 1.0));
        assert_eq!(s.jain_goodput, jain_index(&[1.5, 0.5]));
        assert_eq!(s.jain_of_fair_share, jain_index(&[1.5, 0.5]));
        let hc_stats = s
            .classes
            .iter()
            .find(|c| c.tenant == "heavy" && c.objective == "critical")
            .unwrap();
        assert_eq!((hc_stats.sent, hc_stats.ok), (1, 1));
        assert_eq!(hc_stats.ttft_ms.unwrap().p95_ms, 50.0);
        let standard = s.ttft_by_objective["standard"];
        assert_eq!((standard.count, standard.max_ms), (4, 300.0));
        assert_eq!(s.ttft_by_objective["critical"].count, 1);
        // Met 90 ms: 50, 80 and 70, of 5 successes and 7 sent.
        assert_eq!(s.slo_met_of_ok, Some(3.0 / 5.0));
        assert_eq!(s.slo_met_of_sent, Some(3.0 / 7.0));
    }
}
