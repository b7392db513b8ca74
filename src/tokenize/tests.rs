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
fn the_native_chatml_renderer_writes_what_the_template_writes() {
    let t = qwen3();
    assert!(t.renders_chat_natively(), "Qwen3's template is ChatML");
    let mut rng = fastrand::Rng::with_seed(0xc4a7);
    let roles = ["system", "user", "assistant", "tool"];
    let mut compared = 0;
    for _ in 0..400 {
        let messages: Vec<Value> = (0..rng.usize(1..8))
            .map(|_| {
                let role = roles[rng.usize(0..roles.len())];
                let content = if rng.bool() {
                    json!(random_text(&mut rng))
                } else {
                    (0..rng.usize(1..3))
                        .map(|_| json!({"type": "text", "text": random_text(&mut rng) + "x"}))
                        .collect()
                };
                json!({"role": role, "content": content})
            })
            .collect();
        let body = chat_body(&Value::Array(messages));
        let req = parse(&body, ApiKind::ChatCompletions).unwrap();
        let want = t.render_chat_interpreted(req.prompt.messages());
        let got = t.render_chat(req.prompt.messages());
        match (got, want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            (got, want) => assert_eq!(got.is_ok(), want.is_ok(), "{got:?} vs {want:?}"),
        }
        compared += 1;
    }
    assert_eq!(compared, 400);
}

#[test]
fn a_template_the_native_renderer_does_not_reproduce_keeps_the_interpreter() {
    // ChatML that trims contents and adds a default system prompt: the
    // probes show both.
    for template in [
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}{{ '<|im_start|>assistant\\n' }}",
        "{% if messages[0].role != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{{ '<|im_start|>assistant\\n' }}",
    ] {
        let config = serde_json::to_string(&json!({"chat_template": template})).unwrap();
        let d = dir_with(Some(&config), None);
        let t = ModelTokenizer::from_dir(d.path(), 0).unwrap();
        assert!(!t.renders_chat_natively(), "{template}");
    }
    // The plain ChatML loop is reproduced (the generation prompt in an
    // expression: Jinja drops a template's final newline).
    let plain = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{{ '<|im_start|>assistant\\n' }}";
    let config = serde_json::to_string(&json!({"chat_template": plain})).unwrap();
    let d = dir_with(Some(&config), None);
    assert!(
        ModelTokenizer::from_dir(d.path(), 0)
            .unwrap()
            .renders_chat_natively()
    );
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

// ---- The fast BPE encoder against the library ----

#[test]
fn qwen3_uses_the_fast_encoder() {
    // The golden tests above go through it only if this holds.
    assert!(qwen3().uses_fast_encoder());
}

/// Qwen3 without the segment cache: every segment goes through the fast
/// encoder.
fn qwen3_uncached() -> &'static ModelTokenizer {
    static T: OnceLock<ModelTokenizer> = OnceLock::new();
    T.get_or_init(|| ModelTokenizer::from_dir(&qwen3_dir(), 0).unwrap())
}

/// Text that mixes what the split pattern and BPE treat differently.
fn mixed_text(rng: &mut fastrand::Rng) -> String {
    const PIECES: &[&str] = &[
        "'s",
        "'t",
        "'re",
        "'ve",
        "'m",
        "'ll",
        "'d",
        "'S",
        "'LL",
        "'Re",
        "'\u{17f}",
        "'x",
        "'\u{df}",
        "'\u{fb05}",
        "'\u{1efb}",
        "'\u{212a}",
        "'",
        "''",
        "don't",
        "WE'LL",
        "it's",
        "12",
        "3",
        "2026",
        "\u{665}\u{666}",
        "\u{bd}",
        "\u{b2}",
        "\u{216b}",
        "!",
        "...",
        "?!",
        "--",
        "==",
        "(){}",
        "\"",
        "#",
        "@",
        "$",
        "%",
        "&*",
        "+",
        "_",
        "`",
        "~",
        "\\",
        "|",
        "/",
        "<",
        ">",
        "\r",
        "\n",
        "\r\n",
        "\n\n\n",
        " \n",
        "\t\n",
        "  \n  ",
        " ",
        "  ",
        "   ",
        "\t",
        "\t\t",
        " \t ",
        "\u{a0}",
        "\u{3000}",
        "\u{2028}",
        "\u{85}",
        "\u{b}",
        "\u{c}",
        "\u{200b}",
        "\u{200d}",
        "你好",
        "世界",
        "東京",
        "数据",
        "こんにちは",
        "한국어",
        "🙂",
        "🌍",
        "👩\u{200d}💻",
        "e\u{301}",
        "\u{301}",
        "a\u{308}\u{301}",
        "A\u{30a}",
        "\u{212b}",
        "\u{1e9b}\u{323}",
        "\u{1100}\u{1161}",
        "\u{e9}",
        "\u{fb01}",
        "\u{2460}",
        "Straße",
        "naïve",
        "über",
        "Ωμέγα",
        "Привет",
        "مرحبا",
        "नमस्ते",
        "\u{5d0}\u{5b8}",
        "ǅ",
        "ʰ",
        "\u{10400}",
        "\u{1d400}",
        "\u{e000}",
        "\u{10ffff}",
        "\u{fffd}",
        "\u{0}",
        "\u{1}",
        "\u{7f}",
    ];
    let mut s = String::new();
    for _ in 0..rng.usize(0..40) {
        match rng.u8(0..10) {
            0..=3 => s.push_str(PIECES[rng.usize(0..PIECES.len())]),
            4 | 5 => {
                // An ASCII word, case mixed, with or without a leading space.
                if rng.bool() {
                    s.push(' ');
                }
                for _ in 0..rng.usize(1..12) {
                    let c = char::from(rng.u8(b'a'..=b'z'));
                    s.push(if rng.u8(0..5) == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    });
                }
            }
            6 => {
                // Any scalar value: classes the piece list misses.
                s.push(rng.char(..));
            }
            7 => {
                // Whitespace runs before newlines, text ends.
                for _ in 0..rng.usize(1..5) {
                    s.push([' ', '\t', '\n', '\r', '\u{a0}'][rng.usize(0..5)]);
                }
            }
            8 => s.push_str(&rng.u32(..).to_string()),
            _ => {
                // Now and then a piece longer than the merge loop takes.
                let unit = ["a", "=", " ", "ab", "\u{4e00}", "1", "\n"][rng.usize(0..7)];
                let max = if rng.u8(0..8) == 0 { 400 } else { 8 };
                s.push_str(&unit.repeat(rng.usize(1..max)));
            }
        }
    }
    s
}

fn assert_same_as_library(t: &ModelTokenizer, lib: &tokenizers::Tokenizer, text: &str) {
    let want = lib.encode(text, false).unwrap();
    let mut got = Vec::new();
    t.encode(text, false, &mut got).unwrap();
    assert_eq!(got, want.get_ids(), "{text:?}");
}

#[test]
fn fast_encoder_matches_the_library_on_generated_text() {
    let t = qwen3_uncached();
    assert!(t.uses_fast_encoder());
    let mut rng = fastrand::Rng::with_seed(0xb9e);
    for _ in 0..3_000 {
        let text = mixed_text(&mut rng);
        assert_same_as_library(t, reference(), &text);
    }
}

#[test]
fn fast_encoder_matches_the_library_on_text_around_added_tokens() {
    let t = qwen3_uncached();
    let mut rng = fastrand::Rng::with_seed(0xadd);
    for _ in 0..500 {
        let mut text = mixed_text(&mut rng);
        text.push_str(["<|im_end|>", "<|im_start|>", "<think>"][rng.usize(0..3)]);
        text.push_str(&mixed_text(&mut rng));
        assert_same_as_library(t, reference(), &text);
    }
}

#[test]
fn chunked_long_segments_match_the_library() {
    // Chunks of ~8 bytes: every generated text is cut wherever it may be.
    let mut t = ModelTokenizer::from_dir(&qwen3_dir(), 1 << 20).unwrap();
    t.set_chunk_bytes(8);
    let mut rng = fastrand::Rng::with_seed(0xc47);
    for _ in 0..1_500 {
        let mut text = mixed_text(&mut rng);
        text.push_str(" plain words between the generated parts ");
        text.push_str(&mixed_text(&mut rng));
        assert_same_as_library(&t, reference(), &text);
        // Again from the cache: the chunks' cached ids are the same ids.
        assert_same_as_library(&t, reference(), &text);
    }
}

#[test]
fn a_completions_prompt_sharing_a_long_prefix_reuses_its_chunks() {
    let t = ModelTokenizer::from_dir(&qwen3_dir(), 1 << 20).unwrap();
    let mut rng = fastrand::Rng::with_seed(0x5a);
    let words = ["alpha", "beta", "gamma", "delta", "echo", "foxtrot"];
    let system: String = (0..2_000)
        .map(|_| words[rng.usize(..words.len())])
        .collect::<Vec<_>>()
        .join(" ");
    let first = format!("{system} what is the first question");
    let second = format!("{system} and a second, different one?");
    assert_same_as_library(&t, reference(), &first);
    let before = t.cache_stats();
    assert_same_as_library(&t, reference(), &second);
    let after = t.cache_stats();
    // Every chunk of the shared prefix but the one holding its end is a hit.
    let chunks = system.len() / super::model::CHUNK_BYTES;
    assert!(
        after.hits - before.hits + 2 >= chunks as u64,
        "{before:?} {after:?}, ~{chunks} chunks"
    );
    assert!(after.misses - before.misses <= 2, "{before:?} {after:?}");
}

/// Every scalar value, in order (the onig check below scans it).
fn all_chars() -> String {
    (0..=0x10_ffffu32).filter_map(char::from_u32).collect()
}

/// The characters the Oniguruma pattern matches (one per match).
fn onig_set(pattern: &str, haystack: &str) -> std::collections::HashSet<char> {
    let re = onig::Regex::new(pattern).unwrap();
    re.find_iter(haystack)
        .map(|(s, e)| {
            let mut c = haystack[s..e].chars();
            let first = c.next().unwrap();
            assert!(
                c.next().is_none(),
                "{pattern} matched {:?}",
                &haystack[s..e]
            );
            first
        })
        .collect()
}

#[test]
fn pretokenizer_classes_are_oniguruma_s_on_every_code_point() {
    use super::pretok::{Classes, LETTER, NEWLINE, NUMBER, SPACE};
    let classes = Classes::get().unwrap();
    let all = all_chars();
    for (pattern, bit) in [
        (r"\p{L}", LETTER),
        (r"\p{N}", NUMBER),
        (r"\s", SPACE),
        (r"[\r\n]", NEWLINE),
    ] {
        let want = onig_set(pattern, &all);
        let diff: Vec<char> = all
            .chars()
            .filter(|&c| want.contains(&c) != (classes.of(c) & bit != 0))
            .collect();
        assert!(
            diff.is_empty(),
            "{pattern}: {} differ, {:?}",
            diff.len(),
            &diff[..diff.len().min(20)]
        );
    }
    for letter in "strevmld".bytes() {
        let pattern = format!("(?i:{})", char::from(letter));
        let want = onig_set(&pattern, &all);
        let diff: Vec<char> = all
            .chars()
            .filter(|&c| want.contains(&c) != classes.folds_to(c, letter))
            .collect();
        assert!(diff.is_empty(), "{pattern}: {diff:?}");
    }
}

/// Qwen3's tokenizer.json with the changes `edit` makes, loaded both ways
/// (ours without the segment cache, and the library's).
fn edited_qwen3(edit: impl FnOnce(&mut Value)) -> (ModelTokenizer, tokenizers::Tokenizer) {
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(qwen3_dir().join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut v);
    let bytes = serde_json::to_vec(&v).unwrap();
    let d = dir_with(Some("{}"), Some(&bytes));
    let ours = ModelTokenizer::from_dir(d.path(), 0).unwrap();
    let lib = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
    (ours, lib)
}

#[test]
fn llama3_style_tokenizers_use_the_fast_encoder_and_match_the_library() {
    // Llama-3's shape: digits in runs of three, no normalizer, whole-word
    // vocabulary hits before merges.
    let (mut t, lib) = edited_qwen3(|v| {
        v["normalizer"] = Value::Null;
        let p = &mut v["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"];
        *p = Value::from(p.as_str().unwrap().replace(r"\p{N}|", r"\p{N}{1,3}|"));
        v["model"]["ignore_merges"] = Value::from(true);
    });
    assert!(t.uses_fast_encoder());
    let mut rng = fastrand::Rng::with_seed(0x11a);
    for _ in 0..1_500 {
        assert_same_as_library(&t, &lib, &mixed_text(&mut rng));
    }
    // And cut into chunks wherever they may be cut.
    t.set_chunk_bytes(8);
    for _ in 0..500 {
        let text = format!(
            "{} words to cut {}",
            mixed_text(&mut rng),
            mixed_text(&mut rng)
        );
        assert_same_as_library(&t, &lib, &text);
    }
}

#[test]
fn other_shapes_fall_back_to_the_library() {
    let (t, lib) = edited_qwen3(|v| {
        v["normalizer"] = json!({"type": "NFKC"});
    });
    assert!(!t.uses_fast_encoder());
    let mut rng = fastrand::Rng::with_seed(0xfa11);
    for _ in 0..100 {
        assert_same_as_library(&t, &lib, &mixed_text(&mut rng));
    }
}
