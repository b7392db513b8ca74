//! SLO admission (ours, beyond GIE): a request carrying a TTFT objective
//! (`x-slo-ttft-ms`, milliseconds) is admitted only if some endpoint's
//! predicted time to first token meets it; otherwise it waits in flow
//! control's queue (when flow control is on, the pool is saturated and an
//! idle endpoint would meet it: room will come, and the wait is bounded by
//! the objective) or is refused at once (429 `slo_ttft_unattainable`, with
//! `retry-after`), instead of timing out late.
//!
//! Prediction: the prefill-cost scorer's unit, tokens of prefill ahead of
//! the request on an endpoint (its prefill backlog, prompt tokens routed
//! there and not yet answered) plus the request's own prompt tokens, mapped
//! to milliseconds by a line `ttft = a + b * cost` fitted online: every
//! routed request records its cost at routing time, and when the picker
//! sees its first response byte the (cost, observed TTFT) pair updates a
//! weighted least-squares fit whose weights decay by [`DECAY`] per sample,
//! so the fit follows the pool as it changes (about the last 1 / (1 -
//! DECAY) requests count). Prompt caching is ignored on both sides (cost
//! counts every prompt token), which keeps the fit consistent and the
//! prediction conservative. Until [`WARMUP`] samples are in, nothing is
//! refused.
//!
//! The observed TTFT is measured by the picker, from routing to the first
//! response byte, so it leaves out the time queued in flow control, which
//! the admission decision accounts for separately. Each observation's ratio
//! to the prediction made for it is exported
//! (`epp_slo_ttft_prediction_ratio`), as is every admission outcome.

use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

use crate::telemetry::TelemetryError;

/// The request header carrying the TTFT objective in milliseconds.
pub const SLO_TTFT_HEADER: &str = "x-slo-ttft-ms";
/// Weight kept by past samples at each new one.
pub const DECAY: f64 = 0.99;
/// Samples (in decayed weight) before predictions are made.
pub const WARMUP: f64 = 16.0;

/// Exponentially weighted sums of a least-squares line fit.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

/// The online TTFT model.
#[derive(Debug, Default)]
pub struct TtftModel {
    sums: Mutex<Sums>,
}

impl TtftModel {
    /// Adds one observation: `cost` in tokens, `ttft_ms` observed.
    pub fn observe(&self, cost: f64, ttft_ms: f64) {
        if !(cost.is_finite() && ttft_ms.is_finite() && cost >= 0.0 && ttft_ms >= 0.0) {
            return;
        }
        let mut s = self.sums.lock();
        s.w = s.w * DECAY + 1.0;
        s.x = s.x * DECAY + cost;
        s.y = s.y * DECAY + ttft_ms;
        s.xx = s.xx * DECAY + cost * cost;
        s.xy = s.xy * DECAY + cost * ttft_ms;
    }

    /// (intercept ms, slope ms per token) once warmed up. A negative slope
    /// (noise) or costs that never varied give the mean TTFT as a flat line.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        let s = *self.sums.lock();
        if s.w < WARMUP {
            return None;
        }
        let mean_x = s.x / s.w;
        let mean_y = s.y / s.w;
        let var = s.xx / s.w - mean_x * mean_x;
        let cov = s.xy / s.w - mean_x * mean_y;
        // Costs spread by less than a token: no slope to learn.
        let slope = if var > 1.0 { (cov / var).max(0.0) } else { 0.0 };
        Some((mean_y - slope * mean_x, slope))
    }

    /// Predicted TTFT in milliseconds at `cost`; `None` while warming up.
    pub fn predict(&self, cost: f64) -> Option<f64> {
        self.coefficients().map(|(a, b)| (a + b * cost).max(0.0))
    }
}

/// What SLO admission decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// No objective, or the model is not warmed up yet.
    Unknown,
    /// Some endpoint's prediction meets the objective: if it has to queue,
    /// it may wait this long (the objective minus the prediction).
    Meets { max_wait: Duration },
    /// None does now (`predicted_ms` on the least-loaded endpoint), but an
    /// idle endpoint would: it may wait this long (the objective minus the
    /// idle prediction) for room.
    Wait {
        max_wait: Duration,
        predicted_ms: f64,
    },
    /// Not even an idle endpoint would meet it.
    Refuse { predicted_ms: f64 },
}

/// SLO admission: the model and its metrics.
#[derive(Debug)]
pub struct SloAdmission {
    pub model: TtftModel,
    ratio: Histogram,
    outcomes: IntCounterVec,
}

impl SloAdmission {
    pub fn new(registry: &Registry) -> Result<Self, TelemetryError> {
        let ratio = Histogram::with_opts(
            HistogramOpts::new(
                "epp_slo_ttft_prediction_ratio",
                "Observed over predicted time to first token of routed requests (ours: SLO admission's model)",
            )
            .buckets(vec![
                0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0,
            ]),
        )?;
        let outcomes = IntCounterVec::new(
            Opts::new(
                "epp_slo_admission_total",
                "Requests with a TTFT objective by SLO admission's verdict (ours)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(ratio.clone()))?;
        registry.register(Box::new(outcomes.clone()))?;
        Ok(Self {
            model: TtftModel::default(),
            ratio,
            outcomes,
        })
    }

    /// The verdict for a request of `tokens` prompt tokens whose objective
    /// is `slo_ms`, when the least-loaded endpoint has `best_backlog` tokens
    /// of prefill ahead.
    pub fn verdict(&self, slo_ms: u64, tokens: f64, best_backlog: f64) -> Verdict {
        let slo = slo_ms as f64;
        let budget = |predicted: f64| Duration::from_secs_f64((slo - predicted).max(0.0) / 1e3);
        let v = match (
            self.model.predict(best_backlog + tokens),
            self.model.predict(tokens),
        ) {
            (Some(now), _) if now <= slo => Verdict::Meets {
                max_wait: budget(now),
            },
            (Some(now), Some(idle)) if idle <= slo => Verdict::Wait {
                max_wait: budget(idle),
                predicted_ms: now,
            },
            (Some(_), Some(idle)) => Verdict::Refuse { predicted_ms: idle },
            _ => Verdict::Unknown,
        };
        let label = match v {
            Verdict::Unknown => "unknown",
            Verdict::Meets { .. } => "admitted",
            Verdict::Wait { .. } => "wait",
            Verdict::Refuse { .. } => "refused",
        };
        self.outcomes.with_label_values(&[label]).inc();
        v
    }

    /// A routed request's first byte: `cost` was its cost at routing time.
    pub fn observed(&self, cost: f64, ttft: Duration) {
        let ms = ttft.as_secs_f64() * 1e3;
        if let Some(p) = self.model.predict(cost).filter(|p| *p > 0.0) {
            self.ratio.observe(ms / p);
        }
        self.model.observe(cost, ms);
    }
}

/// The objective a request carries, when the header parses as a positive
/// integer of milliseconds (anything else is ignored, as if absent).
pub fn parse_objective(v: &str) -> Option<u64> {
    v.trim().parse::<u64>().ok().filter(|&ms| ms > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_line_and_predicts_nothing_while_cold() {
        let m = TtftModel::default();
        assert_eq!(m.predict(100.0), None);
        // ttft = 20 ms + 0.1 ms per token, costs 0..1000.
        for i in 0..200 {
            let cost = f64::from(i % 10) * 100.0;
            m.observe(cost, 20.0 + 0.1 * cost);
        }
        let (a, b) = m.coefficients().unwrap();
        assert!((a - 20.0).abs() < 1e-6 && (b - 0.1).abs() < 1e-9, "{a} {b}");
        assert!((m.predict(500.0).unwrap() - 70.0).abs() < 1e-6);
    }

    #[test]
    fn follows_a_change_and_forgets_the_old_line() {
        let m = TtftModel::default();
        for i in 0..300 {
            let cost = f64::from(i % 10) * 100.0;
            m.observe(cost, 20.0 + 0.1 * cost);
        }
        // The pool slows down threefold.
        for i in 0..600 {
            let cost = f64::from(i % 10) * 100.0;
            m.observe(cost, 60.0 + 0.3 * cost);
        }
        let p = m.predict(500.0).unwrap();
        assert!((p - 210.0).abs() < 2.0, "{p}");
    }

    #[test]
    fn flat_or_noisy_costs_give_the_mean() {
        let m = TtftModel::default();
        for i in 0..50 {
            m.observe(100.0, if i % 2 == 0 { 40.0 } else { 60.0 });
        }
        assert!((m.predict(10_000.0).unwrap() - 50.0).abs() < 0.5);
        // A negative slope (noise) is clamped to a flat line.
        let m = TtftModel::default();
        for i in 0..50 {
            let cost = f64::from(i) * 10.0;
            m.observe(cost, 100.0 - 0.01 * cost);
        }
        let (_, b) = m.coefficients().unwrap();
        assert_eq!(b, 0.0);
        m.observe(f64::NAN, 1.0);
        m.observe(-1.0, 1.0);
        assert_eq!(m.coefficients().unwrap().1, 0.0, "bad samples ignored");
    }

    #[test]
    fn verdicts() {
        let s = SloAdmission::new(&Registry::new()).unwrap();
        assert_eq!(s.verdict(100, 10.0, 0.0), Verdict::Unknown);
        for i in 0..100 {
            let cost = f64::from(i % 10) * 100.0;
            s.observed(cost, Duration::from_secs_f64((20.0 + 0.1 * cost) / 1e3));
        }
        // 100 tokens: 30 ms idle; 1000 tokens ahead: 130 ms.
        match s.verdict(50, 100.0, 0.0) {
            Verdict::Meets { max_wait } => {
                assert!(
                    (max_wait.as_secs_f64() - 0.020).abs() < 1e-6,
                    "{max_wait:?}"
                );
            }
            v => panic!("{v:?}"),
        }
        match s.verdict(50, 100.0, 1000.0) {
            Verdict::Wait {
                max_wait,
                predicted_ms,
            } => {
                assert!(
                    (max_wait.as_secs_f64() - 0.020).abs() < 1e-6,
                    "{max_wait:?}"
                );
                assert!((predicted_ms - 130.0).abs() < 1e-6);
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            s.verdict(25, 100.0, 0.0),
            Verdict::Refuse { predicted_ms } if (predicted_ms - 30.0).abs() < 1e-6
        ));
        // Every observation after the warm-up was compared with a prediction.
        let mut w = 0.0;
        let warm = (0..100)
            .filter(|_| {
                let warm = w >= WARMUP;
                w = w * DECAY + 1.0;
                warm
            })
            .count();
        assert_eq!(s.ratio.get_sample_count(), warm as u64);
        assert!(warm > 70, "{warm}");
        assert_eq!(parse_objective(" 250 "), Some(250));
        assert_eq!(parse_objective("0"), None);
        assert_eq!(parse_objective("fast"), None);
    }
}
