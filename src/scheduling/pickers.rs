//! Pickers: order candidates by their total score and return the best
//! `count` indices (the pick, then the fallbacks).
//!
//! - `max-score-picker` (GIE default): highest total first, random order among
//!   equal totals so ties spread load instead of favouring the first endpoint;
//! - `random-picker`: uniform random order, ignoring scores;
//! - `weighted-random-picker`: random order weighted by total (A-Res sampling,
//!   key = u^(1/w)); zero totals come last;
//! - `round-robin-picker`: rotates through the candidates, ignoring scores.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Picker;

#[derive(Debug, Default)]
pub struct MaxScorePicker;

impl Picker for MaxScorePicker {
    fn pick(&self, totals: &[f64], count: usize, out: &mut Vec<usize>) {
        out.extend(0..totals.len());
        fastrand::shuffle(out);
        // Stable sort after a shuffle: random tie-break.
        out.sort_by(|&a, &b| totals[b].total_cmp(&totals[a]));
        out.truncate(count);
    }
}

#[derive(Debug, Default)]
pub struct RandomPicker;

impl Picker for RandomPicker {
    fn pick(&self, totals: &[f64], count: usize, out: &mut Vec<usize>) {
        out.extend(0..totals.len());
        fastrand::shuffle(out);
        out.truncate(count);
    }
}

#[derive(Debug, Default)]
pub struct WeightedRandomPicker;

impl Picker for WeightedRandomPicker {
    fn pick(&self, totals: &[f64], count: usize, out: &mut Vec<usize>) {
        let mut keyed: Vec<(f64, usize)> = totals
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let key = if w > 0.0 {
                    fastrand::f64().powf(1.0 / w)
                } else {
                    -fastrand::f64() // after every positive weight, random among zeros
                };
                (key, i)
            })
            .collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        out.extend(keyed.into_iter().take(count).map(|(_, i)| i));
    }
}

#[derive(Debug, Default)]
pub struct RoundRobinPicker {
    next: AtomicUsize,
}

impl Picker for RoundRobinPicker {
    fn pick(&self, totals: &[f64], count: usize, out: &mut Vec<usize>) {
        let n = totals.len();
        if n == 0 {
            return;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        out.extend((0..count.min(n)).map(|k| (start + k) % n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &dyn Picker, totals: &[f64], count: usize) -> Vec<usize> {
        let mut out = Vec::new();
        p.pick(totals, count, &mut out);
        out
    }

    #[test]
    fn max_score_orders_by_total() {
        assert_eq!(run(&MaxScorePicker, &[0.1, 0.9, 0.5], 3), vec![1, 2, 0]);
        assert_eq!(run(&MaxScorePicker, &[0.1, 0.9, 0.5], 1), vec![1]);
    }

    #[test]
    fn max_score_breaks_ties_randomly() {
        let mut seen = [0u32; 3];
        for _ in 0..300 {
            seen[run(&MaxScorePicker, &[1.0, 1.0, 1.0], 1)[0]] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn random_returns_distinct_indices() {
        let mut got = run(&RandomPicker, &[0.0; 5], 5);
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn weighted_random_prefers_heavier_and_never_picks_zero_first() {
        let mut heavy = 0;
        for _ in 0..1000 {
            let first = run(&WeightedRandomPicker, &[0.0, 1.0, 9.0], 3);
            assert_ne!(first[0], 0);
            assert_eq!(first.len(), 3);
            if first[0] == 2 {
                heavy += 1;
            }
        }
        assert!(heavy > 700, "{heavy}");
    }

    #[test]
    fn round_robin_rotates() {
        let p = RoundRobinPicker::default();
        let firsts: Vec<usize> = (0..6).map(|_| run(&p, &[0.0; 3], 2)[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(run(&p, &[0.0; 3], 2), vec![0, 1]);
    }
}
