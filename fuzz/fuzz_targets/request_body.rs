//! OpenAI request bodies and response usage, as a client or model server
//! could send them.
//!
//! Input: byte 0 seeds where an SSE stream is split into chunks, the rest is
//! the body. Checks, beyond "no panic": a parsed model's span points at a JSON
//! string holding that model; splicing another model in (what a model rewrite
//! does) leaves a body that parses to the same prompt and options; decoding
//! strings outside serde gives the same result as serde alone; the SSE
//! usage scanner gives the same answer however the stream is chunked.
#![no_main]

use epp::request::{self, ApiKind, SseUsageScanner, parse_json_usage};
use libfuzzer_sys::fuzz_target;

const APIS: [ApiKind; 6] = [
    ApiKind::Completions,
    ApiKind::ChatCompletions,
    ApiKind::Responses,
    ApiKind::Embeddings,
    ApiKind::Conversations,
    ApiKind::Other,
];

fuzz_target!(|data: &[u8]| {
    let Some((&split_seed, body)) = data.split_first() else {
        return;
    };
    for api in APIS {
        check_parse(body, api);
    }
    check_usage(body, split_seed);
});

fn check_parse(body: &[u8], api: ApiKind) {
    // Decoding strings outside serde (the skeleton parse) changes nothing a
    // caller sees, errors included; cutting every string tests it hardest.
    let cut = format!("{:?}", request::parse_cutting(body, api, 0));
    let whole = format!("{:?}", request::parse_cutting(body, api, usize::MAX));
    assert_eq!(cut, whole, "the skeleton parse disagrees with serde alone");

    let Ok(req) = request::parse(body, api) else {
        return;
    };
    let Some(span) = req.model_span.clone() else {
        assert_eq!(
            api,
            ApiKind::Other,
            "only unparsed bodies lack a model span"
        );
        return;
    };
    let raw = &body[span.clone()];
    let decoded: String = serde_json::from_slice(raw).expect("model span is a JSON string");
    assert_eq!(decoded, req.model, "model span and model disagree");
    assert!(!req.model.is_empty());

    let rewritten = request::rewrite_model(body, span, "fuzz/\"model\"");
    let again = request::parse(&rewritten, api).expect("a rewritten body still parses");
    assert_eq!(again.model, "fuzz/\"model\"");
    assert_eq!(again.stream, req.stream);
    assert_eq!(again.include_usage, req.include_usage);
    assert_eq!(again.cache_salt, req.cache_salt);
    let a: Vec<&[u8]> = req.prompt.pieces().collect();
    let b: Vec<&[u8]> = again.prompt.pieces().collect();
    assert_eq!(a, b, "a model rewrite changed the prompt");
}

fn check_usage(body: &[u8], split_seed: u8) {
    let _ = parse_json_usage(body);

    let mut whole = SseUsageScanner::default();
    whole.feed(body);

    // Chunk sizes from a tiny LCG seeded by the first byte, so the fuzzer
    // controls (and can minimise) the split pattern.
    let mut split = SseUsageScanner::default();
    let mut state = u32::from(split_seed) | 1;
    let mut rest = body;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = 1 + (state >> 16) as usize % 64;
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        split.feed(chunk);
        rest = tail;
    }
    assert_eq!(
        whole.usage(),
        split.usage(),
        "SSE usage depends on how the stream was chunked"
    );
}
