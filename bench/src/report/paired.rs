//! `epp-bench paired`: two setups' `--records` compared request by request.
//!
//! The workloads are seeded, so job `j` of one setup sent the same prompt,
//! at the same offset, on the same path (gateway or direct pod) as job `j`
//! of the other. Pairing them removes what the summary's percentiles cannot:
//! which requests changed class (a hit under one setup, a miss under the
//! other) and, among requests of the same class, what the second setup cost
//! or saved per request. With the simulator's `--jitter-per-request` both
//! setups give a request the same timing noise, so a same-class difference
//! is the path's own cost (picker work, waits behind other prefills) plus
//! timer resolution.
//!
//! A request counts as a hit when at least half its prompt tokens were
//! cached (`usage.prompt_tokens_details.cached_tokens`): in the
//! shared-prefix workloads a hit holds the whole shared prefix and a miss
//! almost nothing, so the threshold only has to fall between the two.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ReportError;
use crate::load::stats::percentile;

#[derive(Debug, Clone, clap::Args)]
pub struct PairedArgs {
    /// A file written by `--records` holding both setups.
    #[arg(long)]
    pub records: PathBuf,
    /// Label of the setup compared against.
    #[arg(long)]
    pub base: String,
    /// Label of the setup whose differences are reported (other - base).
    #[arg(long)]
    pub other: String,
}

#[derive(Debug, Deserialize)]
struct Line {
    label: String,
    phase: String,
    job: usize,
    turn: usize,
    #[serde(default)]
    direct: bool,
    ttft_ms: Option<f64>,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
}

impl Line {
    fn hit(&self) -> bool {
        match (self.cached_tokens, self.prompt_tokens) {
            (Some(c), Some(p)) => p > 0 && 2 * c >= p,
            _ => false,
        }
    }
}

/// One request measured under both setups.
#[derive(Debug, Clone, Copy)]
struct Pair {
    direct: bool,
    base: (bool, f64),
    other: (bool, f64),
}

pub fn run(a: &PairedArgs) -> Result<(), ReportError> {
    let text = read_records(&a.records).map_err(|source| ReportError::Io {
        path: a.records.clone(),
        source,
    })?;
    let pairs = pair(&a.records, &text, &a.base, &a.other)?;
    print!("{}", table(&pairs, &a.base, &a.other));
    Ok(())
}

/// The file's text, gunzipped when its name ends in `.gz` (the results
/// directories keep their records compressed).
fn read_records(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)?;
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)?;
    }
    Ok(text)
}

/// Requests both setups completed with a TTFT, matched by (phase, job, turn).
fn pair(path: &Path, text: &str, base: &str, other: &str) -> Result<Vec<Pair>, ReportError> {
    // (phase, job, turn) -> (base's line, other's line).
    type Both = (Option<Line>, Option<Line>);
    let mut by_key: HashMap<(String, usize, usize), Both> = HashMap::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let line: Line = serde_json::from_str(l).map_err(|source| ReportError::Json {
            path: path.to_owned(),
            source,
        })?;
        let slot = by_key
            .entry((line.phase.clone(), line.job, line.turn))
            .or_default();
        if line.label == base {
            slot.0 = Some(line);
        } else if line.label == other {
            slot.1 = Some(line);
        }
    }
    let mut keys: Vec<_> = by_key.keys().cloned().collect();
    keys.sort();
    let pairs: Vec<Pair> = keys
        .iter()
        .filter_map(|k| {
            let (Some(b), Some(o)) = by_key.get(k)? else {
                return None;
            };
            Some(Pair {
                direct: b.direct,
                base: (b.hit(), b.ttft_ms?),
                other: (o.hit(), o.ttft_ms?),
            })
        })
        .collect();
    if pairs.is_empty() {
        return Err(ReportError::Empty(format!(
            "no request of {} has a TTFT under both {base} and {other}",
            path.display()
        )));
    }
    Ok(pairs)
}

fn table(pairs: &[Pair], base: &str, other: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Paired by request, {other} against {base} (difference = {other} - {base}).\n"
    );
    let _ = writeln!(
        s,
        "| share | requests | TTFT p95 {base} | TTFT p95 {other} | difference |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    type Keep = fn(&Pair) -> bool;
    let shares: [(&str, Keep); 3] = [
        ("all", |_| true),
        ("via the gateway", |p| !p.direct),
        ("direct to pods", |p| p.direct),
    ];
    // Without direct traffic the gateway's share is all of it.
    let split = pairs.iter().any(|p| p.direct) && pairs.iter().any(|p| !p.direct);
    for (name, keep) in shares.into_iter().take(if split { 3 } else { 1 }) {
        let share: Vec<&Pair> = pairs.iter().filter(|p| keep(p)).collect();
        let p95 = |f: fn(&Pair) -> f64| {
            let mut v: Vec<f64> = share.iter().map(|p| f(p)).collect();
            v.sort_by(f64::total_cmp);
            percentile(&v, 0.95).unwrap_or(f64::NAN)
        };
        let (b, o) = (p95(|p| p.base.1), p95(|p| p.other.1));
        let _ = writeln!(
            s,
            "| {name} | {} | {b:.2} ms | {o:.2} ms | {:+.2} ms |",
            share.len(),
            o - b
        );
    }
    let _ = writeln!(
        s,
        "\n| share | {base} -> {other} | requests | TTFT difference p25 | median | p75 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let class = |hit: bool| if hit { "hit" } else { "miss" };
    for (name, direct) in [("via the gateway", false), ("direct to pods", true)] {
        for (from, to) in [(true, true), (true, false), (false, true), (false, false)] {
            let mut d: Vec<f64> = pairs
                .iter()
                .filter(|p| p.direct == direct && p.base.0 == from && p.other.0 == to)
                .map(|p| p.other.1 - p.base.1)
                .collect();
            if d.is_empty() {
                continue;
            }
            d.sort_by(f64::total_cmp);
            let q = |x| percentile(&d, x).unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "| {name} | {} -> {} | {} | {:+.2} ms | {:+.2} ms | {:+.2} ms |",
                class(from),
                class(to),
                d.len(),
                q(0.25),
                q(0.5),
                q(0.75)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(label: &str, job: usize, direct: bool, cached: u64, ttft: f64) -> String {
        format!(
            r#"{{"label":"{label}","phase":"p","job":{job},"turn":0,"direct":{direct},"ttft_ms":{ttft},"prompt_tokens":100,"cached_tokens":{cached}}}"#
        )
    }

    #[test]
    fn requests_are_paired_by_job_and_classed_by_their_hits() {
        let text = [
            line("a", 0, false, 96, 20.0),
            line("b", 0, false, 96, 21.0),
            line("a", 1, false, 0, 180.0),
            line("b", 1, false, 96, 25.0),
            line("a", 2, true, 0, 190.0),
            line("b", 2, true, 0, 189.0),
            // Only under one setup: not paired.
            line("a", 3, false, 0, 500.0),
            // A third setup in the same file is ignored.
            line("c", 0, false, 0, 900.0),
        ]
        .join("\n");
        let pairs = pair(Path::new("r.jsonl"), &text, "a", "b").unwrap();
        assert_eq!(pairs.len(), 3);
        let t = table(&pairs, "a", "b");
        assert!(
            t.contains("| via the gateway | hit -> hit | 1 | +1.00 ms |"),
            "{t}"
        );
        assert!(
            t.contains("| via the gateway | miss -> hit | 1 | -155.00 ms |"),
            "{t}"
        );
        assert!(
            t.contains("| direct to pods | miss -> miss | 1 | -1.00 ms |"),
            "{t}"
        );
        assert!(!t.contains("hit -> miss"), "{t}");
        assert!(
            t.contains("| direct to pods | 1 | 190.00 ms | 189.00 ms | -1.00 ms |"),
            "{t}"
        );
    }

    #[test]
    fn without_direct_traffic_the_shares_are_not_split() {
        let text = [line("a", 0, false, 0, 10.0), line("b", 0, false, 0, 12.0)].join("\n");
        let t = table(
            &pair(Path::new("r.jsonl"), &text, "a", "b").unwrap(),
            "a",
            "b",
        );
        assert!(
            t.contains("| all | 1 | 10.00 ms | 12.00 ms | +2.00 ms |"),
            "{t}"
        );
        assert!(!t.contains("| via the gateway | 1 |"), "{t}");
    }

    #[test]
    fn gzipped_records_read_as_plain_ones() {
        use std::io::Write as _;
        let text = [line("a", 0, false, 0, 10.0), line("b", 0, false, 0, 12.0)].join("\n");
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("r.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
        assert_eq!(read_records(&gz).unwrap(), text);
        assert!(read_records(&dir.path().join("missing.gz")).is_err());
    }

    #[test]
    fn nothing_in_common_is_an_error() {
        let text = [line("a", 0, false, 0, 1.0), line("b", 1, false, 0, 1.0)].join("\n");
        assert!(pair(Path::new("r.jsonl"), &text, "a", "b").is_err());
        assert!(pair(Path::new("r.jsonl"), "{not json", "a", "b").is_err());
    }
}
