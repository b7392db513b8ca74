//! Borrowing parser for OpenAI request bodies.
//!
//! One scan checks nesting and decodes long strings (`request::skeleton`);
//! serde then visits the rest of the body once. Strings without escapes are
//! borrowed from the body; fields routing does not need are skipped (still
//! validated as JSON, with serde_json's nesting limit of 128 levels). The
//! `model` value is read as a raw slice so its byte range is known for an
//! in-place rewrite.
//!
//! Prompt text per API, in the order the model server's cache sees it:
//! - completions: `prompt` (a string, or each element of an array);
//! - chat: for every message in order, its role, its content (text parts'
//!   text, other parts as their JSON), then any other fields such as
//!   `tool_calls`, each followed by a separator so that role and content
//!   boundaries change the hash;
//! - responses: `instructions` then `input`; embeddings: `input`;
//!   conversations: `items` (non-string values as their JSON text).

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, SeqAccess, Visitor},
};
use serde_json::value::RawValue;

use super::{
    ApiKind, InferenceRequest, ParseError, Prompt,
    skeleton::{self, BodyMap, LONG_STRING, Skeleton},
};

/// Separators between chat pieces. Static, so they cost no allocation.
const ROLE_END: &str = "\n";
const MESSAGE_END: &str = "\n\n";

/// Parses `body` as a request of the given API.
///
/// [`ApiKind::Other`] bodies are not interpreted at all: such requests are
/// routed by load, and their body may be anything.
pub fn parse(body: &[u8], api: ApiKind) -> Result<InferenceRequest<'_>, ParseError> {
    parse_cutting(body, api, LONG_STRING)
}

/// [`parse`], with strings of at least `min_cut` bytes decoded outside serde
/// (see `request::skeleton`); `usize::MAX` leaves every string to serde.
/// Public only so that tests and fuzzing can check that both ways agree.
#[doc(hidden)]
pub fn parse_cutting(
    body: &[u8],
    api: ApiKind,
    min_cut: usize,
) -> Result<InferenceRequest<'_>, ParseError> {
    if api == ApiKind::Other {
        return Ok(InferenceRequest {
            api,
            model: Cow::Borrowed(""),
            model_span: None,
            stream: false,
            include_usage: false,
            cache_salt: None,
            prompt: Prompt::default(),
        });
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(match serde_json::from_slice::<de::IgnoredAny>(body) {
            Ok(_) => ParseError::NotAnObject,
            Err(e) => classify(e),
        });
    }
    let long = skeleton::scan(body, MAX_DEPTH, min_cut)?;
    let skeleton = Skeleton::new(body, &long);
    if skeleton.is_verbatim() {
        return parse_skeleton(skeleton, api);
    }
    // serde's messages name a line and column, which only the body itself
    // gets right; bad bodies are rare enough to parse twice.
    parse_skeleton(skeleton, api).or_else(|_| parse_skeleton(Skeleton::verbatim(body), api))
}

/// Deepest nesting of arrays and objects accepted anywhere in a body.
/// serde_json enforces its own limit (128) on what it deserializes, but not
/// on values it skips, so a body is checked as a whole first.
pub const MAX_DEPTH: usize = 64;

/// serde parses the skeleton; every string it yields is resolved to the body
/// before any check on it, so an emptied string is never taken for empty.
fn parse_skeleton(
    skeleton: Skeleton<'_>,
    api: ApiKind,
) -> Result<InferenceRequest<'_>, ParseError> {
    let (text, mut map) = skeleton.into_parts();
    let raw: RawBody<'_> = serde_json::from_slice(&text).map_err(classify)?;

    let model_raw = raw.model.ok_or(ParseError::MissingModel)?;
    let model = map.text(json_str(model_raw).ok_or(ParseError::InvalidModel)?)?;
    if model.is_empty() {
        return Err(ParseError::InvalidModel);
    }
    let start = model_raw.get().as_ptr() as usize - text.as_ptr() as usize;
    let model_span = map.span(start..start + model_raw.get().len());

    let mut prompt = Prompt::default();
    match api {
        ApiKind::Completions => {
            let p = raw.prompt.ok_or(ParseError::MissingField("prompt"))?;
            if let TextOrRaw::Seq {
                token_like: false, ..
            } = p
            {
                // Objects, booleans or nulls: no model server accepts them
                // as a prompt, so refuse here rather than route a request
                // that can only fail (the Responses API's `input`, where
                // objects are valid, shares the type but not this check).
                return Err(ParseError::InvalidField {
                    field: "prompt",
                    expected: "must be a string, an array of strings, or token ids",
                });
            }
            let single = matches!(p, TextOrRaw::Text(_));
            if !p.append_to(&mut prompt, &mut map)? {
                return Err(ParseError::InvalidField {
                    field: "prompt",
                    expected: "must be a non-empty string or array",
                });
            }
            if single {
                prompt.mark_single_text();
            }
        }
        ApiKind::ChatCompletions => {
            let messages = raw.messages.ok_or(ParseError::MissingField("messages"))?;
            if messages.0.is_empty() {
                return Err(ParseError::InvalidField {
                    field: "messages",
                    expected: "must be a non-empty array",
                });
            }
            for m in messages.0 {
                let mut role = prompt.mark();
                prompt.push(map.text(m.role)?);
                if prompt.mark() == role {
                    role = usize::MAX; // empty: no piece, never plain
                }
                prompt.push(ROLE_END);
                let text_start = prompt.mark();
                let mut text_end = text_start;
                // Plain: no field but role and content, and every content
                // part a non-empty text (an empty one, not pushed, would
                // change how the parts join).
                let mut plain = m.content_len == m.pieces.len();
                let parts = m.content_len;
                for (i, piece) in m.pieces.into_iter().enumerate() {
                    let before = prompt.mark();
                    let (text, is_text) = piece.resolve(&mut map)?;
                    prompt.push(text);
                    if i < parts {
                        plain &= is_text && (prompt.mark() > before || parts == 1);
                        text_end = prompt.mark();
                    }
                }
                prompt.push(MESSAGE_END);
                prompt.end_message(role, text_start..text_end, plain);
            }
        }
        ApiKind::Responses => {
            let input = raw.input.ok_or(ParseError::MissingField("input"))?;
            if let Some(instructions) = raw.instructions {
                instructions.append_to(&mut prompt, &mut map)?;
                prompt.push(MESSAGE_END);
            }
            input.append_to(&mut prompt, &mut map)?;
        }
        ApiKind::Embeddings => {
            raw.input
                .ok_or(ParseError::MissingField("input"))?
                .append_to(&mut prompt, &mut map)?;
        }
        ApiKind::Conversations => {
            raw.items
                .ok_or(ParseError::MissingField("items"))?
                .append_to(&mut prompt, &mut map)?;
        }
        ApiKind::Other => {}
    }

    Ok(InferenceRequest {
        api,
        model,
        model_span: Some(model_span),
        stream: raw.stream.unwrap_or(false),
        include_usage: raw
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        cache_salt: raw.cache_salt.map(|s| map.text(s.0)).transpose()?,
        prompt,
    })
}

fn classify(e: serde_json::Error) -> ParseError {
    let msg = e.to_string();
    if msg.contains("recursion limit") {
        ParseError::TooDeep
    } else if e.is_data() {
        ParseError::InvalidType(msg)
    } else {
        ParseError::InvalidJson(msg)
    }
}

/// A JSON string value, borrowed when it has no escapes.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(text) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
    }
}

#[derive(Deserialize)]
struct RawBody<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<TextOrRaw<'a>>,
    #[serde(borrow, default)]
    messages: Option<Messages<'a>>,
    #[serde(borrow, default)]
    input: Option<TextOrRaw<'a>>,
    #[serde(borrow, default)]
    instructions: Option<TextOrRaw<'a>>,
    #[serde(borrow, default)]
    items: Option<TextOrRaw<'a>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(borrow, default)]
    cache_salt: Option<BorrowedStr<'a>>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A string, or an array whose string elements are text and whose other
/// elements (token ids, objects) count as their JSON text.
enum TextOrRaw<'a> {
    Text(Cow<'a, str>),
    Seq {
        items: Vec<Cow<'a, str>>,
        /// Every element is a string, a number or an array of numbers (a
        /// completions prompt: text, token ids, or lists of token ids).
        token_like: bool,
    },
}

/// A string, a number, or an array holding only numbers (and arrays of them).
fn is_token_like(raw: &RawValue) -> bool {
    let v = raw.get().as_bytes();
    match v.first() {
        Some(b'"' | b'-' | b'0'..=b'9') => true,
        Some(b'[') => v.iter().all(|b| {
            matches!(
                b,
                b'0'..=b'9' | b'-' | b',' | b'[' | b']' | b' ' | b'\t' | b'\r' | b'\n'
            )
        }),
        _ => false,
    }
}

impl TextOrRaw<'_> {
    /// Appends the text, resolved to the body, to `prompt`. False if there
    /// was none: an empty string or an empty array.
    fn append_to<'b>(
        self,
        prompt: &mut Prompt<'b>,
        map: &mut BodyMap<'b>,
    ) -> Result<bool, ParseError> {
        match self {
            Self::Text(t) => {
                let t = map.text(t)?;
                let some = !t.is_empty();
                prompt.push(t);
                Ok(some)
            }
            Self::Seq { items, .. } => {
                let some = !items.is_empty();
                for item in items {
                    prompt.push(map.text(item)?);
                    prompt.push(ROLE_END);
                }
                Ok(some)
            }
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for TextOrRaw<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextOrRaw<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(TextOrRaw::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TextOrRaw::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(TextOrRaw::Text(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                let mut token_like = true;
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    token_like &= is_token_like(raw);
                    items.push(json_str(raw).unwrap_or(Cow::Borrowed(raw.get())));
                }
                Ok(TextOrRaw::Seq { items, token_like })
            }
        }
        d.deserialize_any(V)
    }
}

struct Messages<'a>(Vec<Message<'a>>);

/// One chat message reduced to the pieces that identify it.
struct Message<'a> {
    role: Cow<'a, str>,
    /// Content's pieces, then other fields' JSON.
    pieces: Vec<Piece<'a>>,
    /// How many of `pieces` are the content.
    content_len: usize,
}

/// Part of a message's text as serde found it. Content parts are judged only
/// once their strings are resolved, since in a skeleton a part's `type` may
/// be an emptied string.
enum Piece<'a> {
    Text(Cow<'a, str>),
    Part(&'a RawValue),
}

impl Piece<'_> {
    /// The piece's text, and whether it is message text (a string content
    /// or a text part) rather than some value's JSON.
    fn resolve<'b>(self, map: &mut BodyMap<'b>) -> Result<(Cow<'b, str>, bool), ParseError> {
        match self {
            Self::Text(t) => Ok((map.text(t)?, true)),
            Self::Part(raw) => part_text(raw, map),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Messages<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                while let Some(m) = seq.next_element::<Message<'de>>()? {
                    out.push(m);
                }
                Ok(Messages(out))
            }
        }
        d.deserialize_seq(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Message<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object with a string `role`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut role = None;
                let mut content = Vec::new();
                let mut extra = Vec::new();
                while let Some(key) = map.next_key::<BorrowedStr<'de>>()? {
                    match key.0.as_ref() {
                        "role" => role = Some(map.next_value::<BorrowedStr<'de>>()?.0),
                        "content" => content = map.next_value::<Content<'de>>()?.0,
                        _ => {
                            let raw = map.next_value::<&'de RawValue>()?;
                            if raw.get() != "null" {
                                extra.push(Piece::Text(Cow::Borrowed(raw.get())));
                            }
                        }
                    }
                }
                let role = role.ok_or_else(|| de::Error::missing_field("role"))?;
                let content_len = content.len();
                content.append(&mut extra);
                Ok(Message {
                    role,
                    pieces: content,
                    content_len,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// A string that borrows when it can. Every string read from a skeleton
/// must be read this way (or as `&str`/`RawValue`): serde's own
/// `Option<Cow<str>>` always copies, and a copied `""` could not be told
/// apart from an emptied long string.
struct BorrowedStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BorrowedStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BorrowedStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BorrowedStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(BorrowedStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Message content: a string, null, or an array of parts. Text parts
/// contribute their text; other parts (images, audio) their JSON, so two
/// different images never look like the same prefix.
struct Content<'a>(Vec<Piece<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, null or an array of content parts")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content(Vec::new()))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content(Vec::new()))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Content(vec![Piece::Text(Cow::Borrowed(v))]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Content(vec![Piece::Text(Cow::Owned(v.to_owned()))]))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Content(vec![Piece::Text(Cow::Owned(v))]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    parts.push(Piece::Part(raw));
                }
                Ok(Content(parts))
            }
        }
        d.deserialize_any(V)
    }
}

/// The text of a `{"type":"text","text":...}` part (true), else the part's
/// JSON (false).
fn part_text<'b>(
    raw: &RawValue,
    map: &mut BodyMap<'b>,
) -> Result<(Cow<'b, str>, bool), ParseError> {
    #[derive(Deserialize)]
    struct TextPart<'a> {
        #[serde(borrow, rename = "type")]
        kind: BorrowedStr<'a>,
        #[serde(borrow, default)]
        text: Option<BorrowedStr<'a>>,
    }
    if let Ok(TextPart {
        kind,
        text: Some(text),
    }) = serde_json::from_str::<TextPart<'_>>(raw.get())
    {
        let kind = map.text(kind.0)?;
        if kind == "text" || kind == "input_text" {
            return Ok((map.text(text.0)?, true));
        }
    }
    Ok((map.text(Cow::Borrowed(raw.get()))?, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(p: &Prompt<'_>) -> String {
        p.pieces()
            .map(|b| std::str::from_utf8(b).unwrap())
            .collect()
    }

    #[test]
    fn completions_prompt_and_options() {
        let body = br#"{"model":"m","prompt":"hello","stream":true,"stream_options":{"include_usage":true},"cache_salt":"s","max_tokens":5}"#;
        let r = parse(body, ApiKind::Completions).unwrap();
        assert_eq!(r.model, "m");
        assert!(matches!(r.model, Cow::Borrowed(_)));
        assert!(r.stream);
        assert!(r.include_usage);
        assert_eq!(r.cache_salt.as_deref(), Some("s"));
        assert_eq!(text(&r.prompt), "hello");
        assert_eq!(&body[r.model_span.unwrap()], br#""m""#);
    }

    #[test]
    fn prompt_string_is_borrowed_without_escapes_and_unescaped_with() {
        let body = br#"{"model":"m","prompt":"a\nb"}"#;
        let r = parse(body, ApiKind::Completions).unwrap();
        assert_eq!(text(&r.prompt), "a\nb");
        let body = br#"{"model":"m","prompt":"plain"}"#;
        let r = parse(body, ApiKind::Completions).unwrap();
        assert_eq!(r.prompt.len(), 5);
    }

    #[test]
    fn completions_prompt_arrays() {
        let r = parse(br#"{"model":"m","prompt":["a","b"]}"#, ApiKind::Completions).unwrap();
        assert_eq!(text(&r.prompt), "a\nb\n");
        let r = parse(br#"{"model":"m","prompt":[1,2,3]}"#, ApiKind::Completions).unwrap();
        assert_eq!(text(&r.prompt), "1\n2\n3\n");
        let r = parse(
            br#"{"model":"m","prompt":[[1, 2],[-3]]}"#,
            ApiKind::Completions,
        )
        .unwrap();
        assert_eq!(text(&r.prompt), "[1, 2]\n[-3]\n");
        // A string that looks like an object is text.
        parse(br#"{"model":"m","prompt":["{}"]}"#, ApiKind::Completions).unwrap();
    }

    #[test]
    fn completions_prompt_arrays_refuse_objects_and_other_values() {
        for prompt in [
            r#"["text", {}]"#,
            r#"[{"text":"a"}]"#,
            "[true]",
            "[null]",
            r#"[[1, {"a":1}]]"#,
            r#"[["a"]]"#,
        ] {
            let body = format!(r#"{{"model":"m","prompt":{prompt}}}"#);
            let e = parse(body.as_bytes(), ApiKind::Completions).unwrap_err();
            assert_eq!(e.code(), "invalid_prompt", "{prompt}");
        }
        // The Responses API's input may hold objects.
        let r = parse(
            br#"{"model":"m","input":["text", {"role":"user","content":"hi"}]}"#,
            ApiKind::Responses,
        )
        .unwrap();
        assert!(text(&r.prompt).contains("hi"));
    }

    #[test]
    fn chat_uses_every_message_role_and_content() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}
        ]}"#;
        let r = parse(body, ApiKind::ChatCompletions).unwrap();
        let t = text(&r.prompt);
        assert!(t.starts_with("system\nbe brief\n\nuser\nhi"), "{t}");
        assert!(t.contains("image_url"));
        assert!(t.contains("assistant\n[{\"id\":\"1\"}]"), "{t}");
    }

    fn messages(r: &InferenceRequest<'_>) -> Vec<(String, String, bool)> {
        r.prompt
            .messages()
            .map(|m| {
                let text: Vec<&str> = m.text_parts().collect();
                (m.role.to_owned(), text.join("\n"), m.is_plain())
            })
            .collect()
    }

    #[test]
    fn chat_records_messages_over_the_pieces() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b\u00e9"}]},
            {"role":"assistant","content":null},
            {"role":"assistant","content":""},
            {"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":"c","tool_calls":[{"id":"1"}]},
            {"role":"user","content":[{"type":"text","text":""},{"type":"text","text":"d"}]},
            {"role":"","content":"e"}
        ]}"#;
        let r = parse(body, ApiKind::ChatCompletions).unwrap();
        let got = messages(&r);
        let s = |r: &str, t: &str, p: bool| (r.to_owned(), t.to_owned(), p);
        assert_eq!(got[0], s("system", "be brief", true));
        assert_eq!(got[1], s("user", "a\nb\u{e9}", true));
        assert_eq!(got[2], s("assistant", "", true));
        assert_eq!(got[3], s("assistant", "", true));
        assert!(!got[4].2, "an image part is not plain text");
        assert!(!got[5].2, "tool calls are not plain");
        assert!(!got[6].2, "an empty text part changes the join");
        assert!(!got[7].2, "an empty role");
        assert_eq!(got.len(), 8);
        // The flattened stream is unchanged by the recording.
        assert!(text(&r.prompt).starts_with("system\nbe brief\n\nuser\nab\u{e9}\n\n"));
        assert!(r.prompt.single_text().is_none());
    }

    #[test]
    fn completions_single_string_is_marked() {
        let r = parse(br#"{"model":"m","prompt":"hi"}"#, ApiKind::Completions).unwrap();
        assert_eq!(r.prompt.single_text(), Some("hi"));
        assert_eq!(r.prompt.messages().len(), 0);
        let r = parse(br#"{"model":"m","prompt":["hi"]}"#, ApiKind::Completions).unwrap();
        assert_eq!(r.prompt.single_text(), None);
    }

    #[test]
    fn chat_prompts_differ_by_role() {
        let a = parse(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            ApiKind::ChatCompletions,
        )
        .unwrap();
        let b = parse(
            br#"{"model":"m","messages":[{"role":"system","content":"x"}]}"#,
            ApiKind::ChatCompletions,
        )
        .unwrap();
        assert_ne!(text(&a.prompt), text(&b.prompt));
    }

    #[test]
    fn responses_and_embeddings() {
        let r = parse(
            br#"{"model":"m","instructions":"sys","input":"q"}"#,
            ApiKind::Responses,
        )
        .unwrap();
        assert_eq!(text(&r.prompt), "sys\n\nq");
        let r = parse(br#"{"model":"m","input":["a","b"]}"#, ApiKind::Embeddings).unwrap();
        assert_eq!(text(&r.prompt), "a\nb\n");
    }

    #[test]
    fn other_paths_are_not_interpreted() {
        let r = parse(b"not json at all", ApiKind::Other).unwrap();
        assert!(r.prompt.is_empty());
        assert!(r.model_span.is_none());
    }

    #[test]
    fn errors() {
        use ParseError::*;
        type Check = fn(&ParseError) -> bool;
        let cases: &[(&[u8], ApiKind, Check)] = &[
            (b"{", ApiKind::Completions, |e| matches!(e, InvalidJson(_))),
            (b"", ApiKind::Completions, |e| matches!(e, InvalidJson(_))),
            (b"[1]", ApiKind::Completions, |e| *e == NotAnObject),
            (b"\"s\"", ApiKind::Completions, |e| *e == NotAnObject),
            (br#"{"prompt":"x"}"#, ApiKind::Completions, |e| {
                *e == MissingModel
            }),
            (
                br#"{"model":null,"prompt":"x"}"#,
                ApiKind::Completions,
                |e| *e == MissingModel,
            ),
            (br#"{"model":3,"prompt":"x"}"#, ApiKind::Completions, |e| {
                *e == InvalidModel
            }),
            (br#"{"model":"","prompt":"x"}"#, ApiKind::Completions, |e| {
                *e == InvalidModel
            }),
            (br#"{"model":"m"}"#, ApiKind::Completions, |e| {
                *e == MissingField("prompt")
            }),
            (br#"{"model":"m","prompt":""}"#, ApiKind::Completions, |e| {
                matches!(e, InvalidField { .. })
            }),
            (br#"{"model":"m","prompt":5}"#, ApiKind::Completions, |e| {
                matches!(e, InvalidType(_))
            }),
            (br#"{"model":"m"}"#, ApiKind::ChatCompletions, |e| {
                *e == MissingField("messages")
            }),
            (
                br#"{"model":"m","messages":[]}"#,
                ApiKind::ChatCompletions,
                |e| matches!(e, InvalidField { .. }),
            ),
            (
                br#"{"model":"m","messages":"hi"}"#,
                ApiKind::ChatCompletions,
                |e| matches!(e, InvalidType(_)),
            ),
            (
                br#"{"model":"m","messages":[{"content":"x"}]}"#,
                ApiKind::ChatCompletions,
                |e| matches!(e, InvalidType(_)),
            ),
            (
                br#"{"model":"m","messages":[{"role":1,"content":"x"}]}"#,
                ApiKind::ChatCompletions,
                |e| matches!(e, InvalidType(_)),
            ),
            (
                br#"{"model":"m","prompt":"x","stream":"yes"}"#,
                ApiKind::Completions,
                |e| matches!(e, InvalidType(_)),
            ),
            (br#"{"model":"m"}"#, ApiKind::Embeddings, |e| {
                *e == MissingField("input")
            }),
        ];
        for (body, api, check) in cases {
            let err = parse(body, *api).expect_err(std::str::from_utf8(body).unwrap());
            assert!(check(&err), "{}: {err:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn nesting_limit_is_inclusive() {
        let ok = format!(
            r#"{{"model":"m","prompt":"x","t":{}1{}}}"#,
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert!(parse(ok.as_bytes(), ApiKind::Completions).is_ok());
        let deep = format!(
            r#"{{"model":"m","prompt":"x","t":{}1{}}}"#,
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert_eq!(
            parse(deep.as_bytes(), ApiKind::Completions).unwrap_err(),
            ParseError::TooDeep
        );
    }

    /// A JSON string literal: mostly valid text of any length around the
    /// cut threshold, sometimes with an escape serde refuses.
    fn random_string(rng: &mut fastrand::Rng) -> String {
        let valid = rng.u8(0..50) > 0;
        let mut content = crate::request::skeleton::tests::random_content(rng, valid);
        if rng.bool() {
            let n = rng.usize(0..600);
            const FILL: &[u8] = br"abc def\n ";
            content.extend(FILL.iter().cycle().take(n));
        }
        format!("\"{}\"", String::from_utf8_lossy(&content))
    }

    fn random_value(rng: &mut fastrand::Rng, depth: usize) -> String {
        match rng.u8(0..if depth > 3 { 4 } else { 8 }) {
            0 | 1 => random_string(rng),
            2 => rng.i32(..).to_string(),
            3 => ["null", "true", "false"][rng.usize(0..3)].to_owned(),
            4 | 5 => random_array(rng, depth + 1),
            6 => format!(r#"{{"type":"text","text":{}}}"#, random_string(rng)),
            _ => {
                let fields: Vec<String> = (0..rng.usize(0..4))
                    .map(|_| {
                        let key = ["role", "content", "text", "type", "tool_calls"]
                            .get(rng.usize(0..7))
                            .map_or_else(|| random_string(rng), |k| format!("\"{k}\""));
                        format!("{key}:{}", random_value(rng, depth + 1))
                    })
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
        }
    }

    fn random_array(rng: &mut fastrand::Rng, depth: usize) -> String {
        let items: Vec<String> = (0..rng.usize(0..4))
            .map(|_| random_value(rng, depth))
            .collect();
        format!("[{}]", items.join(","))
    }

    /// A body with the fields the parser reads, each maybe of a wrong type,
    /// in any order, sometimes twice, then maybe damaged.
    fn random_body(rng: &mut fastrand::Rng) -> Vec<u8> {
        let keys = [
            "model",
            "prompt",
            "messages",
            "input",
            "instructions",
            "items",
            "stream",
            "stream_options",
            "cache_salt",
            "max_tokens",
        ];
        let mut order = keys.to_vec();
        rng.shuffle(&mut order);
        // Each field usually once, "model" almost always, now and then a
        // duplicate (which serde refuses).
        order.retain(|&k| rng.u8(0..20) < if k == "model" { 19 } else { 12 });
        if rng.u8(0..20) == 0 {
            order.push(keys[rng.usize(0..keys.len())]);
        }
        let mut fields = Vec::new();
        for key in order {
            let value = match key {
                // Each field of the right type nine times in ten.
                _ if rng.u8(0..10) == 0 => random_value(rng, 0),
                "model" | "cache_salt" => random_string(rng),
                "prompt" | "input" | "instructions" | "items" if rng.bool() => random_string(rng),
                "prompt" | "input" | "instructions" | "items" => random_array(rng, 1),
                "messages" => {
                    let msgs: Vec<String> = (0..rng.usize(0..4))
                        .map(|_| {
                            let content = match rng.u8(0..10) {
                                0 => "null".to_owned(),
                                1..5 => random_string(rng),
                                _ => random_array(rng, 1),
                            };
                            format!(
                                r#"{{"role":{},"content":{content},"x":{}}}"#,
                                random_string(rng),
                                random_value(rng, 2)
                            )
                        })
                        .collect();
                    format!("[{}]", msgs.join(","))
                }
                "stream" => ["true", "false"][rng.usize(0..2)].to_owned(),
                "stream_options" => r#"{"include_usage":true}"#.to_owned(),
                _ => random_value(rng, 0),
            };
            fields.push(format!("\"{key}\":{value}"));
        }
        let mut body = format!("{{{}}}", fields.join(",")).into_bytes();
        if rng.u8(0..6) == 0 && !body.is_empty() {
            let at = rng.usize(0..body.len());
            match rng.u8(0..3) {
                0 => body.truncate(at),
                1 => body[at] = rng.u8(..),
                _ => body.insert(at, [b'"', b'\\', b'[', b'}', b','][rng.usize(0..5)]),
            }
        }
        body
    }

    /// Everything a caller can observe of a parse.
    fn observed(r: Result<InferenceRequest<'_>, ParseError>) -> String {
        match r {
            Ok(r) => format!(
                "model={:?} span={:?} stream={} usage={} salt={:?} prompt={:?}",
                r.model,
                r.model_span,
                r.stream,
                r.include_usage,
                r.cache_salt,
                r.prompt.pieces().collect::<Vec<_>>()
            ),
            Err(e) => format!("error {e:?}"),
        }
    }

    #[test]
    fn cutting_long_strings_changes_nothing_observable() {
        let apis = [
            ApiKind::Completions,
            ApiKind::ChatCompletions,
            ApiKind::Responses,
            ApiKind::Embeddings,
            ApiKind::Conversations,
        ];
        let mut rng = fastrand::Rng::with_seed(0xc0ffee);
        let mut parsed = 0;
        for _ in 0..1_000 {
            let body = random_body(&mut rng);
            let mut any = false;
            for api in apis {
                let whole = observed(parse_cutting(&body, api, usize::MAX));
                any |= whole.starts_with("model=");
                for min_cut in [0, 1, 8, LONG_STRING] {
                    let cut = observed(parse_cutting(&body, api, min_cut));
                    assert_eq!(
                        cut,
                        whole,
                        "min_cut {min_cut}, {api:?}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
            parsed += usize::from(any);
        }
        // The comparison means little unless many bodies parse.
        assert!(parsed > 300, "only {parsed} of 1,000 bodies parsed");
    }

    #[test]
    fn a_long_prompt_is_decoded_outside_serde_and_still_borrowed() {
        let long = "lorem ipsum ".repeat(100);
        let body = format!(r#"{{"model":"m","prompt":"{long}"}}"#);
        let r = parse(body.as_bytes(), ApiKind::Completions).unwrap();
        let piece = r.prompt.pieces().next().unwrap();
        assert_eq!(piece, long.as_bytes());
        // Borrowed from the body itself, not from a copy.
        let at = (piece.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
        assert_eq!(
            body.as_bytes().get(at..at + piece.len()),
            Some(long.as_bytes())
        );
        let escaped = format!(r#"{{"model":"m","prompt":"{long}\n\u00e9"}}"#);
        let r = parse(escaped.as_bytes(), ApiKind::Completions).unwrap();
        assert_eq!(text(&r.prompt), format!("{long}\né"));
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let mut body = String::from(r#"{"model":"m","prompt":"x","extra":"#);
        body.push_str(&"[".repeat(100_000));
        let err = parse(body.as_bytes(), ApiKind::Completions).unwrap_err();
        assert_eq!(err, ParseError::TooDeep);
    }
}
