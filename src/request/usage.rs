//! Token usage read back from model-server responses: from a complete JSON
//! body, or from the stream of server-sent events where only the final chunk
//! carries it (when the client asked for `stream_options.include_usage`).

use serde::Deserialize;

/// Token counts of one finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<RawUsage>,
    /// Responses API streams put usage under `response` in the final event.
    #[serde(default)]
    response: Option<Box<WithUsage>>,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: u64,
    #[serde(
        default,
        alias = "prompt_token_details",
        alias = "input_tokens_details"
    )]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl WithUsage {
    fn into_usage(self) -> Option<Usage> {
        if let Some(u) = self.usage {
            return Some(Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                cached_tokens: u
                    .prompt_tokens_details
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0),
            });
        }
        self.response.and_then(|r| r.into_usage())
    }
}

/// Usage of a complete (non-streaming) JSON response, if it has any.
pub fn parse_json_usage(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<WithUsage>(body)
        .ok()
        .and_then(WithUsage::into_usage)
}

/// Finds usage in a server-sent event stream fed chunk by chunk. Chunks may
/// split lines anywhere; a partial line is carried over, up to a bound so a
/// stream without newlines cannot grow memory.
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    partial: Vec<u8>,
    usage: Option<Usage>,
    overflowed: bool,
}

/// Longest SSE line kept across chunk boundaries.
const MAX_CARRY: usize = 1 << 20;

impl SseUsageScanner {
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                if !self.overflowed {
                    self.line(&joined);
                }
                joined.clear();
                self.partial = joined;
                self.overflowed = false;
            }
        }
        if !rest.is_empty() {
            if self.partial.len() + rest.len() > MAX_CARRY {
                self.overflowed = true;
                self.partial.clear();
            } else if !self.overflowed {
                self.partial.extend_from_slice(rest);
            }
        }
    }

    /// Usage seen so far (the last chunk that carried one wins).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        // Cheap pre-check: most chunks are token deltas without usage.
        if memchr::memmem::find(data, b"\"usage\"").is_none() {
            return;
        }
        if let Some(u) = parse_json_usage(data) {
            self.usage = Some(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_with_cached_tokens() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        assert_eq!(
            parse_json_usage(body),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 3,
                cached_tokens: 8
            })
        );
        assert_eq!(parse_json_usage(br#"{"usage":null}"#), None);
        assert_eq!(parse_json_usage(b"garbage"), None);
    }

    #[test]
    fn responses_api_usage() {
        let body = br#"{"type":"response.completed","response":{"usage":{"input_tokens":4,"output_tokens":2,"input_tokens_details":{"cached_tokens":1}}}}"#;
        assert_eq!(
            parse_json_usage(body),
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 2,
                cached_tokens: 1
            })
        );
    }

    #[test]
    fn sse_usage_split_across_chunks() {
        let stream = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut s = SseUsageScanner::default();
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            assert_eq!(
                s.usage(),
                Some(Usage {
                    prompt_tokens: 7,
                    completion_tokens: 2,
                    cached_tokens: 0
                }),
                "split at {split}"
            );
        }
    }

    #[test]
    fn sse_without_usage() {
        let mut s = SseUsageScanner::default();
        s.feed(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(s.usage(), None);
    }

    #[test]
    fn sse_carry_is_bounded() {
        let mut s = SseUsageScanner::default();
        let big = vec![b'x'; MAX_CARRY / 2 + 1];
        s.feed(&big);
        s.feed(&big);
        assert!(s.partial.len() <= MAX_CARRY);
        s.feed(b"\ndata: {\"usage\":{\"prompt_tokens\":1}}\n");
        assert_eq!(s.usage().map(|u| u.prompt_tokens), Some(1));
    }
}
