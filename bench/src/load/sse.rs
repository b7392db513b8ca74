//! Incremental reader of an OpenAI-style SSE stream.
//!
//! Frames arrive split anywhere (mid-line, several events per frame), so bytes
//! are buffered until a full line is present. Only `data:` lines matter; an
//! event is one `data:` line (vLLM never splits a chunk over several lines).
//! Time to first token is taken at the first event whose choice carries
//! non-empty generated text (`text` for completions, `delta.content` for
//! chat), so a role-only opening chunk does not count.

use serde::Deserialize;

use super::LoadError;

#[derive(Debug, Deserialize)]
struct Delta {
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    text: Option<String>,
    delta: Option<Delta>,
    message: Option<Delta>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq)]
pub struct UsageJson {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Deserialize)]
struct ChunkJson {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<UsageJson>,
}

/// What one event told us.
#[derive(Debug, Default, PartialEq)]
pub struct EventInfo {
    /// The event carried generated text.
    pub has_text: bool,
}

/// Accumulates a stream; `keep_text` also collects the generated text (needed
/// only by multi-turn, which appends the reply to the conversation).
#[derive(Debug, Default)]
pub struct SseReader {
    buf: Vec<u8>,
    keep_text: bool,
    pub text: String,
    pub usage: Option<UsageJson>,
    pub done: bool,
    pub text_events: usize,
}

fn choice_text(c: &Choice) -> Option<&str> {
    c.text
        .as_deref()
        .or_else(|| c.delta.as_ref().and_then(|d| d.content.as_deref()))
        .or_else(|| c.message.as_ref().and_then(|d| d.content.as_deref()))
}

/// Generated text and usage of a whole (non-streaming) response body.
pub fn parse_full(body: &[u8]) -> Result<(String, Option<UsageJson>), LoadError> {
    let c: ChunkJson =
        serde_json::from_slice(body).map_err(|e| LoadError::Decode(e.to_string()))?;
    let text = c
        .choices
        .first()
        .and_then(choice_text)
        .unwrap_or_default()
        .to_owned();
    Ok((text, c.usage))
}

impl SseReader {
    pub fn new(keep_text: bool) -> Self {
        Self {
            keep_text,
            ..Self::default()
        }
    }

    /// Feeds bytes; returns whether any complete event in them carried text
    /// (the caller stamps TTFT on the first `true`).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<bool, LoadError> {
        self.buf.extend_from_slice(bytes);
        // Taken out so `event` can borrow self mutably; put back below.
        let mut buf = std::mem::take(&mut self.buf);
        let mut saw_text = false;
        let mut start = 0;
        let mut result = Ok(());
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            let line_end = start + nl;
            let line = &buf[start..line_end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            start = line_end + 1;
            if let Some(data) = line.strip_prefix(b"data:") {
                let data = data.strip_prefix(b" ").unwrap_or(data);
                match self.event(data) {
                    Ok(info) => saw_text |= info.has_text,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        buf.drain(..start);
        self.buf = buf;
        result?;
        Ok(saw_text)
    }

    fn event(&mut self, data: &[u8]) -> Result<EventInfo, LoadError> {
        if data == b"[DONE]" {
            self.done = true;
            return Ok(EventInfo::default());
        }
        let c: ChunkJson =
            serde_json::from_slice(data).map_err(|e| LoadError::Decode(e.to_string()))?;
        if let Some(u) = c.usage {
            self.usage = Some(u);
        }
        let mut has_text = false;
        for choice in &c.choices {
            if let Some(t) = choice_text(choice)
                && !t.is_empty()
            {
                has_text = true;
                if self.keep_text {
                    self.text.push_str(t);
                }
            }
        }
        if has_text {
            self.text_events += 1;
        }
        Ok(EventInfo { has_text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
    const TOK: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi \"}}]}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,\"total_tokens\":12,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n";

    #[test]
    fn role_only_chunk_is_not_first_token() {
        let mut r = SseReader::new(true);
        assert!(!r.feed(ROLE.as_bytes()).unwrap());
        assert!(r.feed(TOK.as_bytes()).unwrap());
        assert!(!r.feed(USAGE.as_bytes()).unwrap());
        assert!(!r.feed(b"data: [DONE]\n\n").unwrap());
        assert!(r.done);
        assert_eq!(r.text, "hi ");
        assert_eq!(r.text_events, 1);
        let u = r.usage.unwrap();
        assert_eq!(u.prompt_tokens_details.unwrap().cached_tokens, Some(8));
    }

    #[test]
    fn events_split_across_frames() {
        let all = format!("{TOK}{TOK}data: [DONE]\r\n\r\n");
        for cut in 1..all.len() {
            let mut r = SseReader::new(true);
            let first = r.feed(&all.as_bytes()[..cut]).unwrap();
            let second = r.feed(&all.as_bytes()[cut..]).unwrap();
            // The first text event is reported exactly once it is complete.
            let tok_end = TOK.find('\n').unwrap() + 1;
            assert_eq!(first, cut >= tok_end, "cut at {cut}");
            assert!(first || second);
            assert!(r.done);
            assert_eq!(r.text, "hi hi ");
        }
    }

    #[test]
    fn completion_text_and_errors() {
        let mut r = SseReader::new(false);
        assert!(r.feed(b"data: {\"choices\":[{\"text\":\"x\"}]}\n").unwrap());
        assert!(r.text.is_empty(), "text not kept unless asked");
        assert!(r.feed(b": keep-alive comment\n").is_ok());
        assert!(matches!(
            r.feed(b"data: {oops\n"),
            Err(LoadError::Decode(_))
        ));
        let (t, u) = parse_full(br#"{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#).unwrap();
        assert_eq!(t, "ok");
        assert_eq!(u.unwrap().prompt_tokens, 3);
    }
}
