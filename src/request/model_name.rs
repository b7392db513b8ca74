//! The model name a request is sent as, and the name its response shows.
//!
//! A model rewrite (config rule or header) changes the `model` value of the
//! request body on the way to the model server; the model server then
//! answers with the target's name, which the client never asked for. So the
//! same rewrite is undone in response bodies: every `"model":"<target>"`
//! (with or without a space after the colon, both common JSON encodings)
//! becomes `"model":"<client's name>"`. Both directions splice bytes and
//! leave everything else as it was.

use std::ops::Range;

/// Replaces the `model` value of `body` with `new_model` (JSON-encoded),
/// leaving every other byte as it was.
pub fn rewrite_model(body: &[u8], span: Range<usize>, new_model: &str) -> Vec<u8> {
    let encoded = json_string(new_model);
    let mut out = Vec::with_capacity(body.len() + encoded.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(encoded.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// Restores the client's model name in the response of a rewritten request.
#[derive(Debug, Clone)]
pub struct ResponseRename {
    /// (pattern naming the target, replacement naming the client's model)
    patterns: [(Vec<u8>, Vec<u8>); 2],
}

impl ResponseRename {
    /// `None` when nothing was rewritten.
    pub fn new(target: &str, client: &str) -> Option<Self> {
        if client.is_empty() || target == client {
            return None;
        }
        let (t, c) = (json_string(target), json_string(client));
        Some(Self {
            patterns: [
                (
                    format!("\"model\":{t}").into_bytes(),
                    format!("\"model\":{c}").into_bytes(),
                ),
                (
                    format!("\"model\": {t}").into_bytes(),
                    format!("\"model\": {c}").into_bytes(),
                ),
            ],
        })
    }

    /// Replaces every occurrence; returns the chunk untouched (no copy) and
    /// `false` when nothing matches.
    ///
    /// Works per chunk: a name split across two chunks is not restored. The
    /// model servers write each JSON object (or SSE event) in one write, so
    /// the gateway sees whole objects in practice.
    pub fn apply(&self, body: Vec<u8>) -> (Vec<u8>, bool) {
        let find = memchr::memmem::find;
        if !self
            .patterns
            .iter()
            .any(|(from, _)| find(&body, from).is_some())
        {
            return (body, false);
        }
        let mut out = body;
        for (from, to) in &self.patterns {
            let mut result = Vec::with_capacity(out.len());
            let mut rest = &out[..];
            while let Some(i) = find(rest, from) {
                result.extend_from_slice(&rest[..i]);
                result.extend_from_slice(to);
                rest = &rest[i + from.len()..];
            }
            result.extend_from_slice(rest);
            out = result;
        }
        (out, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ApiKind, parse};

    #[test]
    fn rewrite_model_splices_only_the_value() {
        let body = br#"{"model": "a", "prompt":"x"}"#;
        let req = parse(body, ApiKind::Completions).unwrap();
        let out = rewrite_model(body, req.model_span.clone().unwrap(), "b\"c");
        assert_eq!(out, br#"{"model": "b\"c", "prompt":"x"}"#.to_vec());
    }

    #[test]
    fn rename_replaces_every_occurrence_and_skips_copies_otherwise() {
        let r = ResponseRename::new("t", "c").unwrap();
        let (out, changed) = r.apply(br#"{"model":"t"} {"model": "t"}"#.to_vec());
        assert!(changed);
        assert_eq!(out, br#"{"model":"c"} {"model": "c"}"#.to_vec());
        let input = b"nothing".to_vec();
        let ptr = input.as_ptr();
        let (out, changed) = r.apply(input);
        assert!(!changed);
        assert_eq!(out.as_ptr(), ptr, "an unchanged chunk is not copied");
    }

    #[test]
    fn no_rename_without_a_rewrite() {
        assert!(ResponseRename::new("m", "m").is_none());
        assert!(ResponseRename::new("m", "").is_none());
        let r = ResponseRename::new("a\"b", "c").unwrap();
        let (out, _) = r.apply(br#"{"model":"a\"b"}"#.to_vec());
        assert_eq!(out, br#"{"model":"c"}"#.to_vec());
    }
}
