//! Against the real Qwen3 tokenizer (scripts/setup-tools.sh installs it) and
//! values computed independently in Python
//! (tests/data/tokenize/make_qwen3_golden.py).

use std::{path::Path, sync::OnceLock};

use serde_json::{Value, json};

use super::*;
use crate::request::{ApiKind, parse};

fn qwen3_dir() -> PathBuf {
    qwen3_test_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// Loaded once: the file is large and debug builds parse it slowly.
fn qwen3() -> &'static ModelTokenizer {
    static T: OnceLock<ModelTokenizer> = OnceLock::new();
    T.get_or_init(|| ModelTokenizer::from_dir(&qwen3_dir(), 8 << 20).unwrap())
}

/// The library itself on the whole text: the reference for the cache.
fn reference() -> &'static tokenizers::Tokenizer {
    static T: OnceLock<tokenizers::Tokenizer> = OnceLock::new();
    T.get_or_init(|| tokenizers::Tokenizer::from_file(qwen3_dir().join("tokenizer.json")).unwrap())
}

fn golden() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenize/qwen3_golden.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn tokenize(body: &[u8], api: ApiKind) -> Result<Vec<u32>, TokenizeError> {
    let req = parse(body, api).unwrap();
    let mut out = Vec::new();
    qwen3().tokenize(&req, &mut out).map(|()| out)
}

fn chat_body(messages: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": "qwen3", "messages": messages})).unwrap()
}

#[test]
fn chats_render_and_tokenize_as_python_does() {
    let g = golden();
    let chats = g["chats"].as_array().unwrap();
    assert!(chats.len() >= 5);
    for (i, c) in chats.iter().enumerate() {
        let body = chat_body(&c["messages"]);
        let req = parse(&body, ApiKind::ChatCompletions).unwrap();
        let rendered = qwen3().render_chat(req.prompt.messages()).unwrap();
        assert_eq!(rendered, c["rendered"].as_str().unwrap(), "chat {i}");
        // Twice: cold, then every segment from the cache.
        for pass in 0..2 {
            let got = tokenize(&body, ApiKind::ChatCompletions).unwrap();
            assert_eq!(got, ids(&c["ids"]), "chat {i}, pass {pass}");
        }
    }
}

#[test]
fn text_parts_join_with_newlines() {
    let parts = json!([{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
    let joined = json!([{"role": "user", "content": "a\nb"}]);
    assert_eq!(
        tokenize(&chat_body(&parts), ApiKind::ChatCompletions).unwrap(),
        tokenize(&chat_body(&joined), ApiKind::ChatCompletions).unwrap()
    );
}

#[test]
fn completions_tokenize_as_python_does() {
    for c in golden()["completions"].as_array().unwrap() {
        let body = serde_json::to_vec(&json!({"model": "qwen3", "prompt": c["prompt"]})).unwrap();
        let got = tokenize(&body, ApiKind::Completions).unwrap();
        assert_eq!(got, ids(&c["ids"]), "{}", c["prompt"]);
    }
}

#[test]
fn qwen3_splits_at_added_tokens() {
    assert!(qwen3().caches_segments());
}

/// Text pieces that stress segment edges: whitespace runs, newlines, CJK,
/// combining marks, digits, code, added-token look-alikes and real ones.
fn random_text(rng: &mut fastrand::Rng) -> String {
    const PIECES: &[&str] = &[
        "hello",
        " world",
        "  ",
        "\n",
        "\n\n",
        "\r\n",
        "\t",
        "你好",
        "世界",
        "e\u{301}",
        "\u{301}",
        "12345",
        " 6.7",
        "fn main() { }",
        "'s",
        "'ll",
        "ﬁ",
        "🌍",
        "<|im_end|>",
        "<|im_start|>",
        "<think>",
        "</think>",
        "<|im",
        "|>",
        "<tool_call>",
        "é",
        "\u{a0}",
        "...",
        "!!",
    ];
    let n = rng.usize(0..24);
    (0..n).map(|_| PIECES[rng.usize(0..PIECES.len())]).collect()
}

#[test]
fn segment_ids_concatenate_to_whole_text_ids_on_generated_conversations() {
    let mut rng = fastrand::Rng::with_seed(0x70c3);
    let roles = ["system", "user", "assistant"];
    let mut checked = 0;
    for _ in 0..300 {
        let mut messages = Vec::new();
        for i in 0..rng.usize(1..7) {
            let role = if i == 0 {
                roles[rng.usize(0..3)]
            } else {
                roles[1 + rng.usize(0..2)]
            };
            messages.push(json!({"role": role, "content": random_text(&mut rng)}));
        }
        let body = chat_body(&Value::Array(messages));
        let req = parse(&body, ApiKind::ChatCompletions).unwrap();
        let Ok(rendered) = qwen3().render_chat(req.prompt.messages()) else {
            continue;
        };
        let whole = reference().encode(rendered.as_str(), false).unwrap();
        // Cold or warm, the split (and cached) ids are the library's.
        for _ in 0..2 {
            let mut got = Vec::new();
            qwen3().encode(&rendered, false, &mut got).unwrap();
            assert_eq!(got, whole.get_ids(), "{rendered:?}");
        }
        // Completions-style, with the post-processor's tokens.
        let with = reference().encode(rendered.as_str(), true).unwrap();
        let mut got = Vec::new();
        qwen3().encode(&rendered, true, &mut got).unwrap();
        assert_eq!(got, with.get_ids());
        checked += 1;
    }
    assert!(checked > 250, "only {checked} conversations rendered");
    let stats = qwen3().cache_stats();
    assert!(stats.hits > 0 && stats.misses > 0, "{stats:?}");
}

#[test]
fn a_grown_conversation_reuses_its_earlier_messages() {
    let t = ModelTokenizer::from_dir(&qwen3_dir(), 1 << 20).unwrap();
    let mut messages = vec![
        json!({"role": "system", "content": "A long system prompt. ".repeat(50)}),
        json!({"role": "user", "content": "first question"}),
    ];
    let mut out = Vec::new();
    let req_body = chat_body(&Value::Array(messages.clone()));
    t.tokenize(
        &parse(&req_body, ApiKind::ChatCompletions).unwrap(),
        &mut out,
    )
    .unwrap();
    let cold = t.cache_stats();
    messages.push(json!({"role": "assistant", "content": "first answer"}));
    messages.push(json!({"role": "user", "content": "second question"}));
    let req_body = chat_body(&Value::Array(messages));
    out.clear();
    t.tokenize(
        &parse(&req_body, ApiKind::ChatCompletions).unwrap(),
        &mut out,
    )
    .unwrap();
    let warm = t.cache_stats();
    // System and first user message: hits; the two new ones: misses.
    assert!(warm.hits >= cold.hits + 2, "{cold:?} -> {warm:?}");
    assert_eq!(warm.misses, cold.misses + 2, "{cold:?} -> {warm:?}");
}

#[test]
fn requests_it_cannot_reproduce_are_unsupported() {
    let cases: &[(&str, ApiKind)] = &[
        (r#"{"model":"m","prompt":["a","b"]}"#, ApiKind::Completions),
        (r#"{"model":"m","prompt":[1,2]}"#, ApiKind::Completions),
        (r#"{"model":"m","input":"a"}"#, ApiKind::Embeddings),
        (
            r#"{"model":"m","messages":[{"role":"assistant","content":"x","tool_calls":[{"id":"1"}]}]}"#,
            ApiKind::ChatCompletions,
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"u"}}]}]}"#,
            ApiKind::ChatCompletions,
        ),
    ];
    for (body, api) in cases {
        let err = tokenize(body.as_bytes(), *api).unwrap_err();
        assert!(
            matches!(err, TokenizeError::Unsupported(_)),
            "{body}: {err}"
        );
        assert_eq!(err.code(), "unsupported");
    }
}

/// A directory with Qwen3's tokenizer.json linked and the given config.
fn dir_with(config: Option<&str>, json: Option<&[u8]>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    match json {
        Some(bytes) => std::fs::write(d.path().join("tokenizer.json"), bytes).unwrap(),
        None => std::os::unix::fs::symlink(
            qwen3_dir().join("tokenizer.json"),
            d.path().join("tokenizer.json"),
        )
        .unwrap(),
    }
    if let Some(c) = config {
        std::fs::write(d.path().join("tokenizer_config.json"), c).unwrap();
    }
    d
}

fn load_err(dir: &Path) -> String {
    ModelTokenizer::from_dir(dir, 0).unwrap_err().to_string()
}

#[test]
fn load_errors_name_the_file_and_the_cause() {
    let missing = tempfile::tempdir().unwrap();
    let e = load_err(missing.path());
    assert!(
        e.starts_with("cannot read ") && e.contains("tokenizer.json"),
        "{e}"
    );

    let d = dir_with(Some("{}"), Some(b"{not json"));
    let e = load_err(d.path());
    assert!(
        e.contains("tokenizer.json is not a usable tokenizer.json"),
        "{e}"
    );

    let d = dir_with(Some("{\"chat_template\": "), None);
    let e = load_err(d.path());
    assert!(
        e.contains("tokenizer_config.json is not a usable tokenizer_config.json"),
        "{e}"
    );

    let d = dir_with(Some(r#"{"chat_template": "{% if %}"}"#), None);
    let e = load_err(d.path());
    assert!(
        e.contains("chat template in") && e.contains("does not compile"),
        "{e}"
    );
}

#[test]
fn render_errors_and_missing_templates_are_errors_not_panics() {
    let d = dir_with(
        Some(r#"{"chat_template": "{{ raise_exception('no system role') }}"}"#),
        None,
    );
    let t = ModelTokenizer::from_dir(d.path(), 0).unwrap();
    let body = chat_body(&json!([{"role": "system", "content": "x"}]));
    let req = parse(&body, ApiKind::ChatCompletions).unwrap();
    let e = t.tokenize(&req, &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("no system role"), "{e}");
    assert_eq!(e.code(), "render");

    // No tokenizer_config.json: completions work, chats cannot render.
    let d = dir_with(None, None);
    let t = ModelTokenizer::from_dir(d.path(), 0).unwrap();
    let e = t.tokenize(&req, &mut Vec::new()).unwrap_err();
    assert!(matches!(e, TokenizeError::NoChatTemplate { .. }), "{e}");
    let body = br#"{"model":"m","prompt":"Hello world"}"#;
    let mut out = Vec::new();
    t.tokenize(&parse(body, ApiKind::Completions).unwrap(), &mut out)
        .unwrap();
    assert_eq!(out, [9707, 1879]);
}

#[test]
fn chat_template_file_wins_over_the_config() {
    let d = dir_with(Some(r#"{"chat_template": "config"}"#), None);
    std::fs::write(
        d.path().join("chat_template.jinja"),
        "file {{ messages[0].content }}",
    )
    .unwrap();
    let t = ModelTokenizer::from_dir(d.path(), 0).unwrap();
    let body = chat_body(&json!([{"role": "user", "content": "x"}]));
    let req = parse(&body, ApiKind::ChatCompletions).unwrap();
    assert_eq!(t.render_chat(req.prompt.messages()).unwrap(), "file x");
}

fn link_model(root: &Path, model: &str) {
    let dir = root.join(model);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::os::unix::fs::symlink(qwen3_dir().join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn a_tokenizers_dir_serves_models_by_their_path() {
    let root = tempfile::tempdir().unwrap();
    link_model(root.path(), "Qwen/Qwen3-0.6B");
    link_model(root.path(), "plain");
    std::fs::create_dir_all(root.path().join("Org/Failed")).unwrap();
    std::fs::write(root.path().join("Org/Failed/FETCH_FAILED"), "").unwrap();
    let explicit = dir_with(Some("{}"), None);
    let flags = TokenizerFlags {
        tokenizers: vec![crate::config::TokenizerSpec {
            model: "plain".into(),
            dir: explicit.path().to_owned(),
        }],
        tokenizers_dir: Some(root.path().to_owned()),
        tokenizer_cache_bytes: 1 << 20,
    };
    let t = Tokenizers::load(&flags).unwrap();
    let mut models: Vec<&str> = t.models().collect();
    models.sort_unstable();
    assert_eq!(models, ["Qwen/Qwen3-0.6B", "plain"]);
    assert!(t.get("Org/Failed").is_none() && t.get("Qwen").is_none());
    // --tokenizer replaced the directory's entry.
    assert_eq!(t.get("plain").unwrap().dir(), explicit.path());

    let mut dup = flags.clone();
    dup.tokenizers_dir = None;
    dup.tokenizers.push(dup.tokenizers[0].clone());
    let e = Tokenizers::load(&dup).unwrap_err();
    assert!(matches!(e, TokenizeError::Duplicate { .. }), "{e}");

    let mut bad = flags;
    bad.tokenizers[0].dir = root.path().join("nowhere");
    let e = Tokenizers::load(&bad).unwrap_err().to_string();
    assert!(e.contains("nowhere/tokenizer.json"), "{e}");
}
