//! Latency summaries.
//!
//! Percentiles use linear interpolation between closest ranks (numpy's
//! default, "type 7"): p-quantile of sorted x[0..n] is x[h] interpolated at
//! h = (n - 1) p. With few samples this lies between the two nearest
//! observations instead of jumping to one of them, which keeps the seed table
//! (5 requests) stable across runs.

use serde::{Deserialize, Serialize};

/// Milliseconds throughout; `count` is the number of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// The `p`-quantile (0..=1) of an ascending slice; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let h = (n - 1) as f64 * p.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (h - lo as f64))
}

impl LatencySummary {
    /// Summarizes samples in milliseconds (sorts them in place).
    pub fn from_ms(samples: &mut [f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let pct = |p| percentile(samples, p).unwrap_or(f64::NAN);
        Some(Self {
            count: samples.len(),
            mean_ms: samples.iter().sum::<f64>() / samples.len() as f64,
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            min_ms: samples[0],
            max_ms: samples[samples.len() - 1],
        })
    }
}

/// Max over mean of per-pod counts, over `pods` pods (pods that served
/// nothing count as zero). `None` when nothing was served.
pub fn max_over_mean(counts: impl IntoIterator<Item = usize>, pods: usize) -> Option<f64> {
    let mut total = 0usize;
    let mut max = 0usize;
    let mut seen = 0usize;
    for c in counts {
        total += c;
        max = max.max(c);
        seen += 1;
    }
    let n = pods.max(seen);
    if total == 0 || n == 0 {
        return None;
    }
    Some(max as f64 / (total as f64 / n as f64))
}

/// Jain's fairness index of `xs`: (sum x)^2 / (n sum x^2), 1 when all are
/// equal, 1/n when one gets everything. `None` when empty or all zero.
pub fn jain_index(xs: &[f64]) -> Option<f64> {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    (!xs.is_empty() && squares > 0.0).then(|| sum * sum / (xs.len() as f64 * squares))
}

/// Max-min fair shares of `capacity` among `demands` (water filling): a
/// demand below an equal split gets all it asks, what it leaves is split
/// among the rest. The shares sum to min(capacity, total demand).
pub fn max_min_shares(demands: &[f64], capacity: f64) -> Vec<f64> {
    let mut shares = vec![0.0; demands.len()];
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| demands[a].total_cmp(&demands[b]));
    let mut left = capacity.max(0.0);
    for (k, &i) in order.iter().enumerate() {
        let split = left / (order.len() - k) as f64;
        shares[i] = demands[i].max(0.0).min(split);
        left -= shares[i];
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index_of_shares() {
        assert_eq!(jain_index(&[3.0, 3.0]), Some(1.0));
        assert_eq!(jain_index(&[5.0, 0.0]), Some(0.5));
        // One tenant with 4x the other's goodput.
        assert!((jain_index(&[4.0, 1.0]).unwrap() - 25.0 / 34.0).abs() < 1e-12);
        assert_eq!(jain_index(&[]), None);
        assert_eq!(jain_index(&[0.0, 0.0]), None);
    }

    #[test]
    fn max_min_shares_fill_small_demands_first() {
        // Two tenants at 4:1 offering twice the capacity of 10: the light
        // one gets all of its 4, the heavy one the remaining 6.
        assert_eq!(max_min_shares(&[16.0, 4.0], 10.0), vec![6.0, 4.0]);
        // Both above an equal split: split equally.
        assert_eq!(max_min_shares(&[16.0, 8.0], 10.0), vec![5.0, 5.0]);
        // Enough for everyone.
        assert_eq!(max_min_shares(&[1.0, 2.0], 10.0), vec![1.0, 2.0]);
        assert_eq!(max_min_shares(&[], 10.0), Vec::<f64>::new());
        // The max-min allocation of the 4:1 case is Jain-fair to 0.96.
        let j = jain_index(&max_min_shares(&[16.0, 4.0], 10.0)).unwrap();
        assert!((j - 100.0 / 104.0).abs() < 1e-12, "{j}");
    }

    #[test]
    fn interpolated_percentiles() {
        let xs = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&xs, 0.5), Some(3.0));
        assert_eq!(percentile(&xs, 1.0), Some(5.0));
        assert_eq!(percentile(&xs, 0.95), Some(4.8));
        assert_eq!(percentile(&xs, 0.25), Some(2.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&hundred, 0.99).unwrap() - 99.01).abs() < 1e-9);
        assert!((percentile(&hundred, 0.95).unwrap() - 95.05).abs() < 1e-9);
    }

    #[test]
    fn summary_sorts_and_averages() {
        let mut xs = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        let s = LatencySummary::from_ms(&mut xs).unwrap();
        assert_eq!(s.count, 5);
        assert_eq!(s.mean_ms, 3.0);
        assert_eq!(s.p50_ms, 3.0);
        assert_eq!((s.min_ms, s.max_ms), (1.0, 5.0));
        assert!(LatencySummary::from_ms(&mut []).is_none());
    }

    #[test]
    fn load_ratio_counts_idle_pods() {
        assert_eq!(max_over_mean([10, 10], 2), Some(1.0));
        assert_eq!(max_over_mean([30, 10], 2), Some(1.5));
        // A third pod that served nothing lowers the mean.
        assert_eq!(max_over_mean([30, 10], 3), Some(30.0 / (40.0 / 3.0)));
        assert_eq!(max_over_mean([], 4), None);
    }
}
