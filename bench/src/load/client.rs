//! One request against the target, timed: a pooled hyper client (HTTP/1.1,
//! keep-alive, like Envoy's listener expects) and a reader that stamps time to
//! first token when the first text-carrying SSE event is complete.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::sse::{SseReader, UsageJson, parse_full};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client(max_idle_per_host: usize) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(30))
        .build(conn)
}

/// What to send.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub uri: Uri,
    pub body: Bytes,
    pub stream: bool,
    /// Collect the generated text (multi-turn needs the reply).
    pub keep_text: bool,
    /// Extra request headers (fairness id, objective, TTFT objective).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

#[derive(Debug, Clone, Default)]
pub struct Success {
    pub ttft: Option<Duration>,
    pub e2e: Duration,
    pub usage: Option<UsageJson>,
    pub text: String,
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Record {
    /// Job index (request, or session for multi-turn).
    pub job: usize,
    /// Turn within the session (0 otherwise).
    pub turn: usize,
    pub start: Instant,
    pub pod: Option<String>,
    /// Sent straight to a pod, around the gateway (`--direct-fraction`).
    pub direct: bool,
    /// Error kind (see `PhaseResult::errors`) or the measurements.
    pub outcome: Result<Success, String>,
}

/// Bytes of an error body read for its code.
const MAX_ERROR_BODY: usize = 4096;

/// An error's kind: the status, followed by the OpenAI-style body's
/// `error.code` when it has one (`503 flow_control_ttl_expired`), so
/// refusals can be told from failures.
pub fn error_kind(status: u16, body: &[u8]) -> String {
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .filter(|c| !c.is_empty() && c.len() <= 64 && !c.contains(char::is_whitespace));
    match code {
        Some(c) => format!("{status} {c}"),
        None => status.to_string(),
    }
}

/// Sends `spec`, failing with "timeout" after `timeout` in total.
pub async fn send(
    client: &HttpClient,
    spec: &RequestSpec,
    timeout: Duration,
) -> (Option<String>, Result<Success, String>) {
    let start = Instant::now();
    let mut pod = None;
    let res = tokio::time::timeout(timeout, exchange(client, spec, start, &mut pod)).await;
    let outcome = match res {
        Ok(r) => r,
        Err(_) => Err("timeout".to_owned()),
    };
    (pod, outcome)
}

async fn exchange(
    client: &HttpClient,
    spec: &RequestSpec,
    start: Instant,
    pod: &mut Option<String>,
) -> Result<Success, String> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(spec.uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json");
    for (name, value) in &spec.headers {
        req = req.header(name.clone(), value.clone());
    }
    let req = req
        .body(Full::new(spec.body.clone()))
        .map_err(|_| "request".to_owned())?;
    let resp = client.request(req).await.map_err(|e| {
        if e.is_connect() {
            "connect".to_owned()
        } else {
            "send".to_owned()
        }
    })?;
    *pod = resp
        .headers()
        .get("x-inference-pod")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        // Drain so the connection can be reused, keeping the start of the
        // body for its error code.
        let mut head = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                let room = MAX_ERROR_BODY.saturating_sub(head.len());
                head.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        return Err(error_kind(status.as_u16(), &head));
    }
    if spec.stream {
        let mut reader = SseReader::new(spec.keep_text);
        let mut ttft = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| "body".to_owned())?;
            if let Some(data) = frame.data_ref() {
                let text = reader.feed(data).map_err(|_| "decode".to_owned())?;
                if text && ttft.is_none() {
                    ttft = Some(start.elapsed());
                }
            }
        }
        if !reader.done {
            return Err("incomplete".to_owned());
        }
        Ok(Success {
            ttft,
            e2e: start.elapsed(),
            usage: reader.usage,
            text: reader.text,
        })
    } else {
        let bytes = body
            .collect()
            .await
            .map_err(|_| "body".to_owned())?
            .to_bytes();
        let e2e = start.elapsed();
        let (text, usage) = parse_full(&bytes).map_err(|_| "decode".to_owned())?;
        Ok(Success {
            ttft: None,
            e2e,
            usage,
            text: if spec.keep_text { text } else { String::new() },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::error_kind;

    #[test]
    fn error_kinds_carry_the_body_code() {
        let body = br#"{"error":{"message":"x","type":"service_unavailable","code":"flow_control_ttl_expired"}}"#;
        assert_eq!(error_kind(503, body), "503 flow_control_ttl_expired");
        assert_eq!(error_kind(429, b"Too many"), "429");
        assert_eq!(error_kind(500, br#"{"error":{"code":42}}"#), "500");
        assert_eq!(error_kind(500, br#"{"error":{"code":"has space"}}"#), "500");
    }
}
