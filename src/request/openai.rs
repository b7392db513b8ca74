//! One-pass, borrowing parser for OpenAI request bodies.
//!
//! serde visits the body once. Strings without escapes are borrowed from the
//! body; fields routing does not need are skipped (still validated as JSON,
//! with serde_json's nesting limit of 128 levels). The `model` value is read
//! as a raw slice so its byte range is known for an in-place rewrite.
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

use super::{ApiKind, InferenceRequest, ParseError, Prompt};

/// Separators between chat pieces. Static, so they cost no allocation.
const ROLE_END: &str = "\n";
const MESSAGE_END: &str = "\n\n";

/// Parses `body` as a request of the given API.
///
/// [`ApiKind::Other`] bodies are not interpreted at all: such requests are
/// routed by load, and their body may be anything.
pub fn parse(body: &[u8], api: ApiKind) -> Result<InferenceRequest<'_>, ParseError> {
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
    if nesting_exceeds(body, MAX_DEPTH) {
        return Err(ParseError::TooDeep);
    }
    let raw: RawBody<'_> = serde_json::from_slice(body).map_err(classify)?;

    let model_raw = raw.model.ok_or(ParseError::MissingModel)?;
    let model = json_str(model_raw).ok_or(ParseError::InvalidModel)?;
    if model.is_empty() {
        return Err(ParseError::InvalidModel);
    }
    let start = model_raw.get().as_ptr() as usize - body.as_ptr() as usize;
    let model_span = start..start + model_raw.get().len();

    let mut prompt = Prompt::default();
    match api {
        ApiKind::Completions => {
            let p = raw.prompt.ok_or(ParseError::MissingField("prompt"))?;
            if p.is_empty() {
                return Err(ParseError::InvalidField {
                    field: "prompt",
                    expected: "must be a non-empty string or array",
                });
            }
            p.append_to(&mut prompt);
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
                prompt.push(m.role);
                prompt.push(ROLE_END);
                for piece in m.pieces {
                    prompt.push(piece);
                }
                prompt.push(MESSAGE_END);
            }
        }
        ApiKind::Responses => {
            let input = raw.input.ok_or(ParseError::MissingField("input"))?;
            if let Some(instructions) = raw.instructions {
                instructions.append_to(&mut prompt);
                prompt.push(MESSAGE_END);
            }
            input.append_to(&mut prompt);
        }
        ApiKind::Embeddings => {
            raw.input
                .ok_or(ParseError::MissingField("input"))?
                .append_to(&mut prompt);
        }
        ApiKind::Conversations => {
            raw.items
                .ok_or(ParseError::MissingField("items"))?
                .append_to(&mut prompt);
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
        cache_salt: raw.cache_salt,
        prompt,
    })
}

/// Deepest nesting of arrays and objects accepted anywhere in a body.
/// serde_json enforces its own limit (128) on what it deserializes, but not
/// on values it skips, so a body is checked as a whole first.
pub const MAX_DEPTH: usize = 64;

/// True if arrays/objects nest deeper than `limit`. Strings are skipped with
/// memchr, so the cost is dominated by the few structural bytes.
fn nesting_exceeds(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip to the closing quote, stepping over escapes.
                i += 1;
                loop {
                    // `i` can pass the end when the body ends in a backslash.
                    let rest = body.get(i..).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(off) if body[i + off] == b'\\' => i += off + 2,
                        Some(off) => {
                            i += off + 1;
                            break;
                        }
                        None => return false, // unterminated: the parser reports it
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
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
    cache_salt: Option<Cow<'a, str>>,
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
    Seq(Vec<Cow<'a, str>>),
}

impl<'a> TextOrRaw<'a> {
    fn is_empty(&self) -> bool {
        match self {
            Self::Text(t) => t.is_empty(),
            Self::Seq(s) => s.is_empty(),
        }
    }

    fn append_to(self, prompt: &mut Prompt<'a>) {
        match self {
            Self::Text(t) => prompt.push(t),
            Self::Seq(items) => {
                for item in items {
                    prompt.push(item);
                    prompt.push(ROLE_END);
                }
            }
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for TextOrRaw<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextOrRaw<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
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
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    items.push(json_str(raw).unwrap_or(Cow::Borrowed(raw.get())));
                }
                Ok(TextOrRaw::Seq(items))
            }
        }
        d.deserialize_any(V)
    }
}

struct Messages<'a>(Vec<Message<'a>>);

/// One chat message reduced to the pieces that identify it.
struct Message<'a> {
    role: Cow<'a, str>,
    pieces: Vec<Cow<'a, str>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Messages<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
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
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object with a string `role`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut role = None;
                let mut content = Vec::new();
                let mut extra = Vec::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "role" => role = Some(map.next_value::<BorrowedStr<'de>>()?.0),
                        "content" => content = map.next_value::<Content<'de>>()?.0,
                        _ => {
                            let raw = map.next_value::<&'de RawValue>()?;
                            if raw.get() != "null" {
                                extra.push(Cow::Borrowed(raw.get()));
                            }
                        }
                    }
                }
                let role = role.ok_or_else(|| de::Error::missing_field("role"))?;
                content.append(&mut extra);
                Ok(Message {
                    role,
                    pieces: content,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// A string that borrows when it can.
struct BorrowedStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BorrowedStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BorrowedStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
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
struct Content<'a>(Vec<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, null or an array of content parts")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content(Vec::new()))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content(Vec::new()))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Content(vec![Cow::Borrowed(v)]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Content(vec![Cow::Owned(v.to_owned())]))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Content(vec![Cow::Owned(v)]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    parts.push(part_text(raw));
                }
                Ok(Content(parts))
            }
        }
        d.deserialize_any(V)
    }
}

/// The text of a `{"type":"text","text":...}` part, else the part's JSON.
fn part_text(raw: &RawValue) -> Cow<'_, str> {
    #[derive(Deserialize)]
    struct TextPart<'a> {
        #[serde(borrow, rename = "type")]
        kind: Cow<'a, str>,
        #[serde(borrow, default)]
        text: Option<Cow<'a, str>>,
    }
    match serde_json::from_str::<TextPart<'_>>(raw.get()) {
        Ok(TextPart {
            kind,
            text: Some(text),
        }) if kind == "text" || kind == "input_text" => text,
        _ => Cow::Borrowed(raw.get()),
    }
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
    fn nesting_scan_skips_strings() {
        assert!(!nesting_exceeds(br#"{"a":"[[[[[[[[[[","b":"\\\"[[["}"#, 2));
        assert!(nesting_exceeds(br#"{"a":[[1]]}"#, 2));
        assert!(!nesting_exceeds(br#"{"a":[[1]]}"#, 3));
        let ok = format!(
            r#"{{"model":"m","prompt":"x","t":{}1{}}}"#,
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert!(parse(ok.as_bytes(), ApiKind::Completions).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let mut body = String::from(r#"{"model":"m","prompt":"x","extra":"#);
        body.push_str(&"[".repeat(100_000));
        let err = parse(body.as_bytes(), ApiKind::Completions).unwrap_err();
        assert_eq!(err, ParseError::TooDeep);
    }
}
