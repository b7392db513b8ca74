//! `--records`: every request of a run as one JSON line, for questions the
//! summary cannot answer (which requests made a percentile, where each one
//! went, how two policies treated the same request). Lines are appended, so
//! the phases of a run and the policies of a `compare` share one file; each
//! line names its setup and phase, and `job`/`turn` identify the request
//! across setups (the workloads are seeded).

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use super::LoadError;
use super::client::Record;

#[derive(Serialize)]
struct Line<'a> {
    label: &'a str,
    phase: &'a str,
    job: usize,
    turn: usize,
    /// Start of the request, from the first request of the phase.
    start_ms: f64,
    pod: Option<&'a str>,
    direct: bool,
    ttft_ms: Option<f64>,
    e2e_ms: Option<f64>,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    error: Option<&'a str>,
}

/// Appends `records` of one phase to `path`.
pub fn append(path: &Path, label: &str, phase: &str, records: &[Record]) -> Result<(), LoadError> {
    let write_err = |source| LoadError::Write {
        path: path.to_owned(),
        source,
    };
    let Some(t0) = records.iter().map(|r| r.start).min() else {
        return Ok(());
    };
    let mut out = Vec::with_capacity(records.len() * 200);
    for r in records {
        let ok = r.outcome.as_ref().ok();
        let usage = ok.and_then(|s| s.usage);
        let line = Line {
            label,
            phase,
            job: r.job,
            turn: r.turn,
            start_ms: ms(r.start - t0),
            pod: r.pod.as_deref(),
            direct: r.direct,
            ttft_ms: ok.and_then(|s| s.ttft).map(ms),
            e2e_ms: ok.map(|s| ms(s.e2e)),
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            cached_tokens: usage
                .and_then(|u| u.prompt_tokens_details)
                .and_then(|d| d.cached_tokens),
            error: r.outcome.as_ref().err().map(String::as_str),
        };
        serde_json::to_writer(&mut out, &line).map_err(LoadError::Serialize)?;
        out.push(b'\n');
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(&out))
        .map_err(write_err)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::load::client::Success;
    use crate::load::sse::{PromptDetails, UsageJson};

    #[test]
    fn each_request_is_one_line_and_lines_are_appended() {
        let t0 = Instant::now();
        let ok = Record {
            job: 3,
            turn: 0,
            start: t0 + Duration::from_millis(5),
            pod: Some("sim-1".into()),
            direct: true,
            outcome: Ok(Success {
                ttft: Some(Duration::from_millis(20)),
                e2e: Duration::from_millis(90),
                usage: Some(UsageJson {
                    prompt_tokens: 100,
                    completion_tokens: 4,
                    prompt_tokens_details: Some(PromptDetails {
                        cached_tokens: Some(64),
                    }),
                }),
                text: String::new(),
            }),
        };
        let failed = Record {
            job: 4,
            turn: 1,
            start: t0,
            pod: None,
            direct: false,
            outcome: Err("503".into()),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        append(&path, "a", "p1", &[ok, failed.clone()]).unwrap();
        append(&path, "b", "p2", &[failed]).unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        let first = &lines[0];
        assert_eq!(first["label"], "a");
        assert_eq!(first["job"], 3);
        assert_eq!(first["pod"], "sim-1");
        assert_eq!(first["direct"], true);
        assert_eq!(first["start_ms"], 5.0);
        assert_eq!(first["ttft_ms"], 20.0);
        assert_eq!(first["cached_tokens"], 64);
        assert_eq!(lines[1]["error"], "503");
        assert_eq!(lines[1]["ttft_ms"], serde_json::Value::Null);
        assert_eq!(
            (&lines[2]["label"], &lines[2]["phase"]),
            (&"b".into(), &"p2".into())
        );
    }
}
