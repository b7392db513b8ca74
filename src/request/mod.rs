//! Turns an OpenAI-style request body into one [`InferenceRequest`]: the
//! model, the prompt text the prefix cache sees, and the few options routing
//! and accounting need. Also the way back: token usage read out of responses,
//! and a rewritten model name restored in them.
//!
//! Parsing borrows from the body wherever it can: the body is kept as received
//! and only the `model` value may be spliced when a rewrite applies, so a
//! request the picker does not change is forwarded byte for byte.

mod model_name;
mod openai;
mod skeleton;
mod usage;

use std::{borrow::Cow, ops::Range};

pub use model_name::{ResponseRename, rewrite_model};
pub use openai::{parse, parse_cutting};
pub use usage::{SseUsageScanner, Usage, parse_json_usage};

/// The API a request path names. Decides which fields carry the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    Completions,
    ChatCompletions,
    Responses,
    Embeddings,
    Conversations,
    /// Any other path: routed by load only, the body is not interpreted.
    Other,
}

impl ApiKind {
    /// Classifies a request path (query string ignored) by its suffix, as GIE
    /// does, so `/v1/chat/completions` and `/openai/v1/chat/completions` agree.
    pub fn from_path(path: &str) -> Self {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Self::ChatCompletions
        } else if path.ends_with("/completions") {
            Self::Completions
        } else if path.ends_with("/responses") {
            Self::Responses
        } else if path.ends_with("/embeddings") {
            Self::Embeddings
        } else if path.ends_with("/conversations") {
            Self::Conversations
        } else {
            Self::Other
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completions => "completions",
            Self::ChatCompletions => "chat_completions",
            Self::Responses => "responses",
            Self::Embeddings => "embeddings",
            Self::Conversations => "conversations",
            Self::Other => "other",
        }
    }
}

/// A parsed request, borrowing from the body.
#[derive(Debug)]
pub struct InferenceRequest<'a> {
    pub api: ApiKind,
    /// The model the client asked for; empty for [`ApiKind::Other`].
    pub model: Cow<'a, str>,
    /// Byte range of the `model` value (quotes included) in the body.
    pub model_span: Option<Range<usize>>,
    pub stream: bool,
    /// `stream_options.include_usage`: the stream will end with a usage chunk.
    pub include_usage: bool,
    pub cache_salt: Option<Cow<'a, str>>,
    /// The prompt as the model server's prefix cache sees it, in order.
    pub prompt: Prompt<'a>,
}

/// Prompt text as a sequence of pieces. Hashing consumes the pieces in order
/// as one byte stream, so a chat prompt never has to be concatenated.
///
/// The parser also records the prompt's structure over the same pieces (no
/// copy): where each chat message's role and text content lie, or that a
/// completions prompt was one string. Tokenizing with the model's chat
/// template needs the messages, not the flattened stream.
#[derive(Debug, Default)]
pub struct Prompt<'a> {
    pieces: Vec<Cow<'a, str>>,
    /// Chat messages, in order; empty for other APIs.
    messages: Vec<MessageSpan>,
    /// The prompt is exactly one string: `pieces` holds it (or nothing, if
    /// it was empty).
    single_text: bool,
}

/// One chat message as indices into [`Prompt`]'s pieces.
#[derive(Debug, Clone)]
struct MessageSpan {
    role: usize,
    /// The text content's pieces (one per text part); meaningful when plain.
    text: Range<usize>,
    plain: bool,
}

/// A chat message as the model's chat template sees it: a role and text.
#[derive(Debug, Clone, Copy)]
pub struct ChatMessage<'p> {
    pub role: &'p str,
    parts: &'p [Cow<'p, str>],
    plain: bool,
}

impl<'p> ChatMessage<'p> {
    /// The content's text parts; a string content is one part. The server
    /// joins parts with a newline (vLLM's chat parsing does).
    pub fn text_parts(&self) -> impl Iterator<Item = &'p str> + use<'p> {
        self.parts.iter().map(|p| p.as_ref())
    }

    /// The message is only a role and text (a string, null, or text parts,
    /// none empty), with no other field (tool calls, names, images): its
    /// rendering needs nothing the span does not hold.
    pub fn is_plain(&self) -> bool {
        self.plain
    }
}

impl<'a> Prompt<'a> {
    pub fn push(&mut self, piece: impl Into<Cow<'a, str>>) {
        let piece = piece.into();
        if !piece.is_empty() {
            self.pieces.push(piece);
        }
    }

    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().map(|p| p.as_bytes())
    }

    /// Total bytes of prompt text.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The prompt as one string, when the request gave exactly one (a
    /// completions `prompt` string), else None.
    pub fn single_text(&self) -> Option<&str> {
        if !self.single_text {
            return None;
        }
        Some(self.pieces.first().map_or("", |p| p.as_ref()))
    }

    /// The chat messages, in order (none unless the request was a chat).
    pub fn messages(&self) -> impl ExactSizeIterator<Item = ChatMessage<'_>> {
        self.messages.iter().map(|m| ChatMessage {
            role: self.pieces.get(m.role).map_or("", |p| p.as_ref()),
            parts: self.pieces.get(m.text.clone()).unwrap_or(&[]),
            plain: m.plain,
        })
    }

    /// Marks the prompt as one string (the parser, after pushing it).
    pub(crate) fn mark_single_text(&mut self) {
        self.single_text = true;
    }

    /// Pieces pushed so far: the parser's bookmarks for [`Self::end_message`].
    pub(crate) fn mark(&self) -> usize {
        self.pieces.len()
    }

    /// Records a message whose role is the piece at `role` (`usize::MAX`:
    /// empty) and whose text parts are `text`. Never plain without a role.
    pub(crate) fn end_message(&mut self, role: usize, text: Range<usize>, plain: bool) {
        let plain = plain && role < text.start && text.end <= self.pieces.len();
        self.messages.push(MessageSpan { role, text, plain });
    }
}

/// Why a body was refused. Every variant is the client's fault (HTTP 400).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("request body is nested too deeply")]
    TooDeep,
    #[error("field `model` is required")]
    MissingModel,
    #[error("field `model` must be a non-empty string")]
    InvalidModel,
    #[error("field `{0}` is required")]
    MissingField(&'static str),
    #[error("invalid request body: {0}")]
    InvalidType(String),
    #[error("field `{field}` {expected}")]
    InvalidField {
        field: &'static str,
        expected: &'static str,
    },
}

impl ParseError {
    /// A stable machine-readable code for the error body and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::NotAnObject => "invalid_body",
            Self::TooDeep => "too_deeply_nested",
            Self::MissingModel | Self::InvalidModel => "invalid_model",
            Self::MissingField(_) | Self::InvalidField { .. } => "invalid_prompt",
            Self::InvalidType(_) => "invalid_request",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_kind_from_path() {
        assert_eq!(ApiKind::from_path("/v1/completions"), ApiKind::Completions);
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions?x=1"),
            ApiKind::ChatCompletions
        );
        assert_eq!(
            ApiKind::from_path("/openai/v1/chat/completions/"),
            ApiKind::ChatCompletions
        );
        assert_eq!(ApiKind::from_path("/v1/responses"), ApiKind::Responses);
        assert_eq!(ApiKind::from_path("/v1/embeddings"), ApiKind::Embeddings);
        assert_eq!(ApiKind::from_path("/v1/models"), ApiKind::Other);
        assert_eq!(ApiKind::from_path(""), ApiKind::Other);
    }
}
