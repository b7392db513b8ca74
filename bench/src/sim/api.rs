//! The OpenAI-compatible surface as vLLM serves it: request validation with
//! vLLM's error shapes, chat rendering, and the response and SSE chunk bodies.
//!
//! Responses are formatted by hand from pre-escaped pieces because a stream
//! writes one chunk per token and serde's `Value` tree would allocate far more
//! per chunk than the chunk itself.

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::Value;

use super::config::{Served, SimConfig};

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: Option<String>,
    #[serde(default)]
    pub content: Value,
}

/// Union of the completion and chat request fields the simulator honours;
/// unknown fields are ignored, as vLLM ignores (most of) them.
#[derive(Debug, Deserialize)]
pub struct InferenceRequest {
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Value,
    pub messages: Option<Vec<ChatMessage>>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// An error answered to the client, vLLM style.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "BadRequestError",
            message: message.into(),
        }
    }

    pub fn body(&self) -> String {
        serde_json::json!({
            "object": "error",
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.status,
        })
        .to_string()
    }
}

/// A request after validation: the prompt text the cache sees and the
/// response parameters.
#[derive(Debug)]
pub struct Validated {
    /// The adapter the request names (index into the configured adapters),
    /// `None` for the base model.
    pub adapter: Option<usize>,
    pub text: String,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub stream: bool,
    pub include_usage: bool,
}

fn content_text(content: &Value, out: &mut String) -> Result<(), ApiError> {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Null => {}
        Value::Array(parts) => {
            for p in parts {
                match p.get("text").and_then(Value::as_str) {
                    Some(t) => out.push_str(t),
                    None => {
                        return Err(ApiError::bad_request(
                            "only text content parts are supported",
                        ));
                    }
                }
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "message content must be a string or a list of parts",
            ));
        }
    }
    Ok(())
}

/// Renders messages with Qwen's ChatML template, so the text of an earlier
/// conversation is a prefix of the text of its continuation.
pub fn render_chat(messages: &[ChatMessage]) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let mut out = String::new();
    for m in messages {
        let role = m
            .role
            .as_deref()
            .ok_or_else(|| ApiError::bad_request("every message needs a role"))?;
        let _ = writeln!(out, "<|im_start|>{role}");
        content_text(&m.content, &mut out)?;
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    Ok(out)
}

fn prompt_text(prompt: &Value) -> Result<String, ApiError> {
    let missing = || ApiError::bad_request("prompt must be a non-empty string or list");
    match prompt {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::Array(items) if !items.is_empty() => {
            // A list of strings (one batch entry is all the sim serves) or
            // a list of token ids, which become one "word" per id.
            let mut out = String::new();
            for item in items {
                match item {
                    Value::String(s) => out.push_str(s),
                    Value::Number(n) => {
                        let _ = write!(out, "{n:>3} ");
                    }
                    _ => return Err(missing()),
                }
            }
            if out.is_empty() {
                return Err(missing());
            }
            Ok(out)
        }
        _ => Err(missing()),
    }
}

/// Parses and validates a request body as vLLM would.
pub fn validate(body: &[u8], endpoint: Endpoint, cfg: &SimConfig) -> Result<Validated, ApiError> {
    let req: InferenceRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    // No `model` means the base model, as in vLLM.
    let adapter = match req.model.as_deref().map(|m| (m, cfg.resolve_model(m))) {
        None | Some((_, Some(Served::Base))) => None,
        Some((_, Some(Served::Adapter(a)))) => Some(a),
        Some((model, None)) => {
            return Err(ApiError {
                status: 404,
                kind: "NotFoundError",
                message: format!("The model `{model}` does not exist."),
            });
        }
    };
    let text = match endpoint {
        Endpoint::Completions => prompt_text(&req.prompt)?,
        Endpoint::Chat => render_chat(
            req.messages
                .as_deref()
                .ok_or_else(|| ApiError::bad_request("messages is required"))?,
        )?,
    };
    let requested = match endpoint {
        Endpoint::Chat => req.max_completion_tokens.or(req.max_tokens),
        Endpoint::Completions => req.max_tokens,
    };
    let max_tokens = match requested {
        None => cfg.default_max_tokens,
        Some(n) if n >= 1 => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "max_tokens must be at least 1, got {n}."
            )));
        }
    };
    let prompt_tokens = cfg.tokens_for_bytes(text.len());
    if prompt_tokens + max_tokens > cfg.max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
            cfg.max_model_len,
            prompt_tokens + max_tokens,
            prompt_tokens,
            max_tokens
        )));
    }
    if (prompt_tokens + max_tokens).div_ceil(cfg.block_size) > cfg.kv_blocks {
        return Err(ApiError::bad_request(format!(
            "The request needs more KV-cache blocks than the pod has ({}).",
            cfg.kv_blocks
        )));
    }
    Ok(Validated {
        adapter,
        text,
        prompt_tokens,
        max_tokens,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Filler output: token i of a request is one short word.
const WORDS: [&str; 16] = [
    "the ", "model ", "routes ", "tokens ", "to ", "a ", "pod ", "with ", "warm ", "cache ",
    "and ", "low ", "queue ", "so ", "it ", "flows ",
];

pub fn word(i: usize) -> &'static str {
    WORDS[i % WORDS.len()]
}

pub fn filler(n: usize) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        s.push_str(word(i));
    }
    s
}

/// Everything that stays constant across one response's chunks.
pub struct ResponseMeta<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    /// JSON-escaped model name, quotes included.
    pub model_json: &'a str,
}

pub struct Usage {
    pub prompt: usize,
    pub completion: usize,
    pub cached: usize,
}

fn write_usage(out: &mut String, u: &Usage) {
    let _ = write!(
        out,
        "{{\"prompt_tokens\":{},\"total_tokens\":{},\"completion_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":{}}}}}",
        u.prompt,
        u.prompt + u.completion,
        u.completion,
        u.cached
    );
}

impl ResponseMeta<'_> {
    fn open(&self, out: &mut String, chunk: bool) {
        let object = match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
        };
        let _ = write!(
            out,
            "{{\"id\":\"{}\",\"object\":\"{object}\",\"created\":{},\"model\":{},\"choices\":[",
            self.id, self.created, self.model_json
        );
    }

    /// One SSE event carrying `text` (already JSON-safe); chat's first chunk
    /// also announces the assistant role, as vLLM's does.
    pub fn chunk(&self, out: &mut String, text: &str, first: bool, last: bool) {
        out.push_str("data: ");
        self.open(out, true);
        let finish = if last { "\"length\"" } else { "null" };
        match self.endpoint {
            Endpoint::Completions => {
                let _ = write!(
                    out,
                    "{{\"index\":0,\"text\":\"{text}\",\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null}}"
                );
            }
            Endpoint::Chat => {
                let role = if first { "\"role\":\"assistant\"," } else { "" };
                let _ = write!(
                    out,
                    "{{\"index\":0,\"delta\":{{{role}\"content\":\"{text}\"}},\"logprobs\":null,\"finish_reason\":{finish}}}"
                );
            }
        }
        out.push_str("]}\n\n");
    }

    /// The final usage-only chunk (`stream_options.include_usage`).
    pub fn usage_chunk(&self, out: &mut String, usage: &Usage) {
        out.push_str("data: ");
        self.open(out, true);
        out.push_str("],\"usage\":");
        write_usage(out, usage);
        out.push_str("}\n\n");
    }

    /// A whole non-streaming response.
    pub fn full(&self, text: &str, usage: &Usage) -> String {
        let mut out = String::with_capacity(text.len() + 512);
        self.open(&mut out, false);
        match self.endpoint {
            Endpoint::Completions => {
                let _ = write!(
                    out,
                    "{{\"index\":0,\"text\":\"{text}\",\"logprobs\":null,\"finish_reason\":\"length\",\"stop_reason\":null,\"prompt_logprobs\":null}}"
                );
            }
            Endpoint::Chat => {
                let _ = write!(
                    out,
                    "{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{text}\",\"tool_calls\":[]}},\"logprobs\":null,\"finish_reason\":\"length\",\"stop_reason\":null}}"
                );
            }
        }
        out.push_str("],\"usage\":");
        write_usage(&mut out, usage);
        out.push('}');
        out
    }
}

pub const DONE: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimConfig {
        SimConfig::default()
    }

    #[test]
    fn validates_like_vllm() {
        let c = cfg();
        let e = validate(b"{nope", Endpoint::Completions, &c).unwrap_err();
        assert_eq!((e.status, e.kind), (400, "BadRequestError"));
        let body: Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(body["object"], "error");
        assert_eq!(body["code"], 400);
        assert!(body["param"].is_null());
        let e = validate(br#"{"prompt":""}"#, Endpoint::Completions, &c).unwrap_err();
        assert_eq!(e.status, 400);
        let e = validate(br#"{"messages":[]}"#, Endpoint::Chat, &c).unwrap_err();
        assert_eq!(e.status, 400);
        let e = validate(br#"{"prompt":"x"}"#, Endpoint::Chat, &c).unwrap_err();
        assert_eq!(e.status, 400);
        let e = validate(
            br#"{"model":"other","prompt":"x"}"#,
            Endpoint::Completions,
            &c,
        )
        .unwrap_err();
        assert_eq!((e.status, e.kind), (404, "NotFoundError"));
        let long = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(c.max_model_len * 4));
        let e = validate(long.as_bytes(), Endpoint::Completions, &c).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("maximum context length"));
        let e = validate(
            br#"{"prompt":"x","max_tokens":0}"#,
            Endpoint::Completions,
            &c,
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn output_length_fields() {
        let c = cfg();
        let v = validate(br#"{"prompt":"abcdefgh"}"#, Endpoint::Completions, &c).unwrap();
        assert_eq!((v.prompt_tokens, v.max_tokens), (2, c.default_max_tokens));
        let v = validate(
            br#"{"model":"Qwen/Qwen2.5-3B-Instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_completion_tokens":7,"stream":true,"stream_options":{"include_usage":true},"ignore_eos":true}"#,
            Endpoint::Chat,
            &c,
        )
        .unwrap();
        assert_eq!(v.max_tokens, 7);
        assert!(v.stream && v.include_usage);
        assert_eq!(v.adapter, None);
    }

    #[test]
    fn adapters_are_models_too() {
        let c = SimConfig {
            lora_adapters: vec!["sql".into(), "chat".into()],
            ..cfg()
        };
        let body = |model: &str| format!(r#"{{"model":"{model}","prompt":"x"}}"#);
        let adapter = |model: &str| {
            validate(body(model).as_bytes(), Endpoint::Completions, &c).map(|v| v.adapter)
        };
        assert_eq!(adapter("chat"), Ok(Some(1)));
        assert_eq!(adapter(&c.model), Ok(None));
        assert_eq!(adapter("other").map_err(|e| e.status), Err(404));
        // Without adapters configured an adapter name is an unknown model.
        let e = validate(body("chat").as_bytes(), Endpoint::Completions, &cfg()).unwrap_err();
        assert_eq!(e.status, 404);
    }

    #[test]
    fn chat_rendering_is_prefix_stable() {
        let m = |role: &str, content: &str| ChatMessage {
            role: Some(role.into()),
            content: Value::String(content.into()),
        };
        let one = render_chat(&[m("system", "be brief"), m("user", "hi")]).unwrap();
        let two = render_chat(&[
            m("system", "be brief"),
            m("user", "hi"),
            m("assistant", "hello"),
            m("user", "more"),
        ])
        .unwrap();
        let stem = one.trim_end_matches("<|im_start|>assistant\n");
        assert!(two.starts_with(stem));
    }

    #[test]
    fn bodies_are_valid_json() {
        for endpoint in [Endpoint::Completions, Endpoint::Chat] {
            let meta = ResponseMeta {
                endpoint,
                id: "cmpl-1",
                created: 1,
                model_json: "\"m\"",
            };
            let usage = Usage {
                prompt: 10,
                completion: 2,
                cached: 8,
            };
            let full: Value = serde_json::from_str(&meta.full(&filler(2), &usage)).unwrap();
            assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
            assert_eq!(full["usage"]["total_tokens"], 12);
            let mut s = String::new();
            meta.chunk(&mut s, word(0), true, false);
            meta.chunk(&mut s, word(1), false, true);
            meta.usage_chunk(&mut s, &usage);
            let events: Vec<Value> = s
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            assert_eq!(events.len(), 3);
            assert_eq!(events[1]["choices"][0]["finish_reason"], "length");
            assert_eq!(events[2]["usage"]["completion_tokens"], 2);
            assert_eq!(events[2]["choices"].as_array().map(Vec::len), Some(0));
        }
    }
}
