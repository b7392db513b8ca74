//! The soak's traffic: chat conversations sharing a few system prompts and
//! growing turn by turn (so the picker's prefix index and affinity are
//! exercised the whole time), sent open loop at a fixed rate, every outcome
//! kept.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use tokio::{task::JoinSet, time::Instant};

use crate::load::{
    client::HttpClient,
    workload::{filler_text, sub_seed},
};

/// Which conversation turn request `i` is, and what its body says.
#[derive(Debug, Clone)]
pub struct Workload {
    pub model: String,
    /// Distinct system prompts (each shared by sessions / groups sessions).
    pub groups: usize,
    /// Sessions active at once; after `turns` turns each is replaced.
    pub sessions: usize,
    pub turns: usize,
    pub system_tokens: usize,
    pub user_tokens: usize,
    /// Length of the (made-up) earlier assistant replies in the history.
    pub reply_tokens: usize,
    pub max_tokens: usize,
    pub chars_per_token: usize,
    pub seed: u64,
}

impl Workload {
    /// (session, turn) of request `i`: the active sessions take one turn
    /// each in rotation, then a fresh set starts.
    pub fn position(&self, i: usize) -> (usize, usize) {
        let sessions = self.sessions.max(1);
        let per_cycle = sessions * self.turns.max(1);
        let within = i % per_cycle;
        (
            (i / per_cycle) * sessions + within % sessions,
            within / sessions,
        )
    }

    /// The chat completion body of request `i`, streaming off.
    pub fn body(&self, i: usize) -> Bytes {
        let (session, turn) = self.position(i);
        let cpt = self.chars_per_token;
        let group = (session % self.groups.max(1)) as u64;
        let mut messages = vec![serde_json::json!({
            "role": "system",
            "content": filler_text(sub_seed(self.seed, &[1, group]), self.system_tokens * cpt),
        })];
        let s = session as u64;
        for t in 0..turn as u64 {
            messages.push(serde_json::json!({
                "role": "user",
                "content": filler_text(sub_seed(self.seed, &[2, s, t]), self.user_tokens * cpt),
            }));
            messages.push(serde_json::json!({
                "role": "assistant",
                "content": filler_text(sub_seed(self.seed, &[3, s, t]), self.reply_tokens * cpt),
            }));
        }
        messages.push(serde_json::json!({
            "role": "user",
            "content": filler_text(sub_seed(self.seed, &[2, s, turn as u64]), self.user_tokens * cpt),
        }));
        let body = serde_json::json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stream": false,
        });
        Bytes::from(body.to_string())
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with a completion; the pod that served it (`x-inference-pod`).
    Ok { pod: Option<String> },
    /// `kind`: `http <status>`, `connect`, `reset` (the connection failed
    /// after it was established), `timeout`, `body` (the response broke
    /// off), `bad-response` (200 without a completion) or `not sent`.
    Failed { kind: String, detail: String },
}

/// One request, its times relative to the start of the run.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: usize,
    pub sent: Duration,
    pub done: Duration,
    pub outcome: Outcome,
}

impl Record {
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }
}

/// Open-loop pacing: request `i` is due at `i / rate` whatever is still in
/// flight. Bounded three ways: `count` requests, nothing sent after
/// `deadline`, and at most `max_inflight` at once (beyond that a due
/// request is recorded as not sent rather than delayed, which would turn
/// the load closed-loop).
#[derive(Debug, Clone)]
pub struct Pacing {
    pub rate: f64,
    pub count: usize,
    pub max_inflight: usize,
    pub timeout: Duration,
}

/// Sends the workload to `uri` and returns every request's record, in
/// order of sending.
pub async fn run(
    client: HttpClient,
    uri: http::Uri,
    workload: Workload,
    pacing: Pacing,
    start: Instant,
    deadline: Instant,
    inflight: Arc<AtomicUsize>,
) -> Vec<Record> {
    let records = Arc::new(Mutex::new(Vec::with_capacity(pacing.count)));
    let mut tasks = JoinSet::new();
    let gap = 1.0 / pacing.rate.max(1e-3);
    for i in 0..pacing.count {
        let due = start + Duration::from_secs_f64(i as f64 * gap);
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due).await;
        // Reap finished tasks so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
        let sent = start.elapsed();
        if inflight.load(Ordering::Relaxed) >= pacing.max_inflight {
            records.lock().push(Record {
                seq: i,
                sent,
                done: sent,
                outcome: Outcome::Failed {
                    kind: "not sent".into(),
                    detail: format!("{} requests already in flight", pacing.max_inflight),
                },
            });
            continue;
        }
        inflight.fetch_add(1, Ordering::Relaxed);
        let (client, uri, body) = (client.clone(), uri.clone(), workload.body(i));
        let (records, inflight) = (Arc::clone(&records), Arc::clone(&inflight));
        let timeout = pacing.timeout;
        tasks.spawn(async move {
            let outcome = match tokio::time::timeout(timeout, send(&client, uri, body)).await {
                Ok(o) => o,
                Err(_) => Outcome::Failed {
                    kind: "timeout".into(),
                    detail: format!("no complete response within {} s", timeout.as_secs()),
                },
            };
            let done = start.elapsed();
            inflight.fetch_sub(1, Ordering::Relaxed);
            records.lock().push(Record {
                seq: i,
                sent,
                done,
                outcome,
            });
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut out = std::mem::take(&mut *records.lock());
    out.sort_by_key(|r| r.seq);
    out
}

/// The text of an error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(240)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn send(client: &HttpClient, uri: http::Uri, body: Bytes) -> Outcome {
    let failed = |kind: &str, detail: String| Outcome::Failed {
        kind: kind.to_owned(),
        detail,
    };
    let req = match http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
    {
        Ok(r) => r,
        Err(e) => return failed("request", e.to_string()),
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return failed("connect", error_chain(&e)),
        Err(e) => return failed("reset", error_chain(&e)),
    };
    let status = resp.status();
    let pod = resp
        .headers()
        .get("x-inference-pod")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return failed("body", error_chain(&e)),
    };
    if !status.is_success() {
        return failed(&format!("http {}", status.as_u16()), one_line(&bytes));
    }
    let completed = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("choices").and_then(|c| c.as_array()).map(Vec::len))
        .is_some_and(|n| n > 0);
    if completed {
        Outcome::Ok { pod }
    } else {
        failed("bad-response", one_line(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> Workload {
        Workload {
            model: "m".into(),
            groups: 2,
            sessions: 3,
            turns: 2,
            system_tokens: 8,
            user_tokens: 2,
            reply_tokens: 3,
            max_tokens: 4,
            chars_per_token: 4,
            seed: 7,
        }
    }

    #[test]
    fn sessions_take_turns_then_are_replaced() {
        let w = w();
        let pos: Vec<_> = (0..8).map(|i| w.position(i)).collect();
        assert_eq!(
            pos,
            [
                (0, 0),
                (1, 0),
                (2, 0),
                (0, 1),
                (1, 1),
                (2, 1),
                (3, 0),
                (4, 0)
            ]
        );
    }

    #[test]
    fn a_later_turn_extends_the_earlier_one() {
        let w = w();
        let parse = |i| -> serde_json::Value { serde_json::from_slice(&w.body(i)).unwrap() };
        let (first, second) = (parse(0), parse(3));
        assert_eq!(first["stream"], false);
        let m1 = first["messages"].as_array().unwrap();
        let m2 = second["messages"].as_array().unwrap();
        assert_eq!((m1.len(), m2.len()), (2, 4));
        // Same system prompt and first user message: a shared prefix.
        assert_eq!(m1[..2], m2[..2]);
        assert_eq!(m2[2]["role"], "assistant");
        // Sessions 0 and 2 share group 0's system prompt; 1 has its own.
        let other = parse(1);
        let third = parse(2);
        assert_eq!(third["messages"][0], m1[0]);
        assert_ne!(other["messages"][0], m1[0]);
    }
}
