//! Inputs the fuzz targets in fuzz/ found crashing, kept as tests so the fixes
//! stay fixed. The fuzzers' own inputs are under tests/fixtures/fuzz/ (named
//! after the target and the artifact's hash); each also has a minimal
//! hand-reduced form here. See docs/reliability.md, "Fuzzing".

// Test code: a failed unwrap is a failed test (clippy.toml allows it in
// #[test] functions; this extends it to the helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Shared with the e2e binary, whose re-exports this one does not all use.
#[allow(unused_imports)]
#[path = "common/mod.rs"]
mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use epp::{
    endpoints::{EndpointSpec, EndpointStore},
    request::{self, ApiKind, ParseError},
    scrape::{EngineMapping, ScrapeSettings, Scraper, ScraperOptions, extract},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};

const PARSED_APIS: [ApiKind; 5] = [
    ApiKind::Completions,
    ApiKind::ChatCompletions,
    ApiKind::Responses,
    ApiKind::Embeddings,
    ApiKind::Conversations,
];

/// request_body, 2026-11-27: a body ending in a backslash inside a string
/// made the nesting pre-check step past the end of the body and panic
/// (src/request/openai.rs, `nesting_exceeds`). In the picker that panic ends
/// the ext_proc stream, so Envoy fails the request instead of the client
/// getting a 400.
#[test]
fn body_ending_in_a_backslash_is_invalid_json() {
    let cases: [&[u8]; 4] = [
        br#"{"model":"m","prompt":"\"#,
        br#"{"model":"m","messages":[{"role":"user","content":"a\\\"#,
        br#"{"\"#,
        // The fuzzer's input without its first byte (the target's SSE split
        // seed), exactly as the parser saw it.
        &include_bytes!("fixtures/fuzz/request_body-crash-6e064c48")[1..],
    ];
    for body in cases {
        for api in PARSED_APIS {
            let err = request::parse(body, api).expect_err("an unterminated string");
            assert!(
                matches!(err, ParseError::InvalidJson(_)),
                "{api:?} {:?}: {err:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(err.code(), "invalid_json");
        }
    }
}

/// prometheus_text, 2026-11-27: a label value ending in a backslash at the
/// end of a line made the label scanner slice past the line and panic
/// (src/scrape/parse.rs, `quoted_end`). In the picker that panic kills the
/// endpoint's scrape task for good, so its metrics go stale while the pod is
/// healthy; now the page is refused as malformed and the next scrape retries.
#[test]
fn metrics_label_ending_in_a_backslash_is_malformed() {
    let minimal: &[u8] = b"vllm:num_requests_waiting{model_name=\"\\";
    let err = extract(minimal, &EngineMapping::vllm()).expect_err("unterminated label value");
    assert!(err.to_string().contains("malformed sample line"), "{err}");

    let found = include_bytes!("fixtures/fuzz/prometheus_text-crash-95abcd76");
    for mapping in [
        EngineMapping::vllm(),
        EngineMapping::sglang(),
        EngineMapping::trtllm_serve(),
        EngineMapping::triton_trtllm(),
    ] {
        // Only the outcome's existence matters: it must not panic.
        let _ = extract(found, &mapping);
    }
    let err = extract(found, &EngineMapping::triton_trtllm()).expect_err("malformed page");
    assert!(
        err.to_string()
            .contains("nv_trt_llm_kv_cache_block_metrics"),
        "{err}"
    );
}

/// The first finding end to end: through a real Envoy, the body that used
/// to panic the ext_proc stream now gets the picker's 400 JSON error, and the
/// picker goes on routing.
#[tokio::test(flavor = "multi_thread")]
async fn backslash_body_gets_a_400_through_envoy() {
    let stack = common::Stack::start(1, &[]).await;
    let reply = common::http::request(
        stack.envoy.listen,
        "POST",
        "/v1/completions",
        &[],
        Some(br#"{"model":"m","prompt":"\"#.to_vec()),
    )
    .await
    .expect("request through envoy");
    assert_eq!(reply.status, 400, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["error"]["code"], "invalid_json", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(
        stack.backends[0].requests(),
        0,
        "the bad body reached a server"
    );

    let ok = stack.completion("still routing").await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// Found while writing the prometheus_text target, by reading the code that
/// feeds it (the metrics HTTP client is async and not a fuzz target): a
/// chunked response whose second chunk declares a size near `usize::MAX`
/// overflowed the page-size check (src/scrape/client.rs, `read_chunked`) and
/// panicked, killing the endpoint's scrape task for good. Now the scrape
/// fails as too large and the next one retries: this server answers that way
/// three times, then with a good page, which must be read.
#[tokio::test(flavor = "multi_thread")]
async fn huge_chunk_size_fails_one_scrape_only() {
    const BAD_ANSWERS: u64 = 3;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = Arc::new(AtomicU64::new(0));
    let server = tokio::spawn({
        let served = Arc::clone(&served);
        async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let served = Arc::clone(&served);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        buf.drain(..end + 4);
                        let answer: Vec<u8> = if served.fetch_add(1, Ordering::SeqCst) < BAD_ANSWERS
                        {
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                              6\r\n# page\r\nffffffffffffffff\r\n"
                                .to_vec()
                        } else {
                            let page = "vllm:num_requests_waiting 7\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n";
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{page}",
                                page.len()
                            )
                            .into_bytes()
                        };
                        if conn.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });

    let store = Arc::new(EndpointStore::new(Duration::from_secs(2)));
    store
        .replace(vec![EndpointSpec {
            name: "pod".into(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: addr.port(),
            labels: Default::default(),
            metrics_port: None,
            kv_events: None,
        }])
        .expect("one endpoint");
    let scraper = Scraper::new(
        Arc::clone(&store),
        ScrapeSettings::default(),
        ScraperOptions {
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(1),
            max_failures: 3,
        },
    );
    let stats = scraper.stats();
    let (stop, stopped) = watch::channel(false);
    let scraping = tokio::spawn(scraper.run(stopped));

    let endpoint = Arc::clone(&store.snapshot().endpoints()[0]);
    common::eventually(
        "the good page is scraped after the bad ones",
        Duration::from_secs(10),
        || {
            let waiting = endpoint.metrics.sample().map(|s| s.waiting);
            async move { waiting == Some(7) }
        },
    )
    .await;
    assert!(
        stats.failures.load(Ordering::Relaxed) >= BAD_ANSWERS,
        "the bad answers were not counted as failures"
    );
    assert!(served.load(Ordering::SeqCst) > BAD_ANSWERS);

    stop.send(true).expect("scraper still running");
    scraping.await.expect("scraper stops cleanly");
    server.abort();
}

/// The kv_events_decode target's checks (fuzz/fuzz_targets/kv_events_decode.rs)
/// over its committed seeds, so CI runs the corpus without a fuzzer: every
/// seed decodes or fails cleanly, the index keeps its invariants and its
/// capacity, and the seeds that are real batches decode.
#[test]
fn kv_events_decode_corpus_keeps_the_index_invariants() {
    use epp::kv_events::{Batch, BlockIndex, decode_into};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/kv_events_decode");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .expect("the seed corpus")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 8, "{} seeds", seeds.len());
    let mut decoded = 0;
    for path in &seeds {
        let data = std::fs::read(path).unwrap();
        let Some((&cap, rest)) = data.split_first() else {
            continue;
        };
        let capacity = usize::from(cap % 32) + 1;
        let mut index = BlockIndex::new(capacity);
        let (mut batch, mut again) = (Batch::default(), Batch::default());
        for payload in rest.split_inclusive_seq() {
            let first = decode_into(payload, &mut batch);
            let second = decode_into(payload, &mut again);
            assert_eq!(first.is_ok(), second.is_ok(), "{path:?}");
            if first.is_err() {
                continue;
            }
            decoded += 1;
            assert_eq!(batch, again, "{path:?}");
            index.apply(&batch);
            index
                .check_invariants()
                .unwrap_or_else(|e| panic!("{path:?}: {e}"));
            assert!(index.len() <= capacity, "{path:?}");
        }
    }
    assert!(decoded >= 8, "only {decoded} payloads in the corpus decode");
}

/// Splits a fuzz input into payloads at `c1 c1 c1`, as the target does.
trait SplitPayloads {
    fn split_inclusive_seq(&self) -> Vec<&[u8]>;
}

impl SplitPayloads for [u8] {
    fn split_inclusive_seq(&self) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut d = self;
        while let Some(i) = d.windows(3).position(|w| w == [0xc1, 0xc1, 0xc1]) {
            out.push(&d[..i]);
            d = &d[i + 3..];
        }
        out.push(d);
        out
    }
}

/// Writes the kv_events_decode seeds (run by hand after a schema change:
/// `cargo test -p epp --test fuzz_regressions -- --ignored write_kv_events_seeds`).
/// Each seed is a capacity byte and payloads separated by `c1 c1 c1`.
#[test]
#[ignore = "writes fuzz/corpus/kv_events_decode; run by hand"]
fn write_kv_events_seeds() {
    use rmpv::Value;
    fn enc(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }
    let s = |x: &str| Value::from(x);
    let ints = |xs: &[i64]| Value::Array(xs.iter().map(|&x| Value::from(x)).collect());
    let toks = |n: i64, from: i64| ints(&(from..from + n).collect::<Vec<_>>());
    let stored_map =
        |hashes: &[i64], parent: Value, tokens: Value, bs: i64, extra: Value, lora: Value| {
            Value::Map(vec![
                (s("type"), s("BlockStored")),
                (s("block_hashes"), ints(hashes)),
                (s("parent_block_hash"), parent),
                (s("token_ids"), tokens),
                (s("block_size"), Value::from(bs)),
                (s("lora_id"), Value::Nil),
                (s("medium"), s("GPU")),
                (s("lora_name"), lora),
                (s("extra_keys"), extra),
                (s("group_idx"), Value::from(0)),
                (s("kv_cache_spec_kind"), s("full_attention")),
            ])
        };
    let stored_arr = |hashes: &[i64], parent: Value, tokens: Value, bs: i64, medium: &str| {
        Value::Array(vec![
            s("BlockStored"),
            ints(hashes),
            parent,
            tokens,
            Value::from(bs),
            Value::Nil,
            s(medium),
            Value::Nil,
        ])
    };
    let batch_map = |events: Vec<Value>| {
        Value::Map(vec![
            (s("ts"), Value::F64(1.7e9)),
            (s("events"), Value::Array(events)),
            (s("data_parallel_rank"), Value::from(0)),
        ])
    };
    let batch_arr =
        |events: Vec<Value>| Value::Array(vec![Value::F64(1.7e9), Value::Array(events)]);
    let nils = |n: usize| Value::Array(vec![Value::Nil; n]);
    let seeds: Vec<(&str, u8, Vec<Value>)> = vec![
        (
            "map-stored-removed-cleared",
            8,
            vec![
                batch_map(vec![stored_map(
                    &[1, 2],
                    Value::Nil,
                    toks(8, 0),
                    4,
                    nils(2),
                    Value::Nil,
                )]),
                batch_map(vec![
                    stored_map(&[3], Value::from(2), toks(4, 8), 4, nils(1), Value::Nil),
                    Value::Map(vec![
                        (s("type"), s("BlockRemoved")),
                        (s("block_hashes"), ints(&[1])),
                        (s("medium"), s("GPU")),
                    ]),
                ]),
                batch_map(vec![Value::Map(vec![(s("type"), s("AllBlocksCleared"))])]),
            ],
        ),
        (
            "array-stored-chain-cpu",
            3,
            vec![
                batch_arr(vec![stored_arr(
                    &[10, 11, 12, 13],
                    Value::Nil,
                    toks(64, 100),
                    16,
                    "GPU",
                )]),
                batch_arr(vec![
                    stored_arr(&[10], Value::Nil, toks(16, 100), 16, "CPU"),
                    stored_arr(&[14], Value::from(13), toks(16, 164), 16, "GPU"),
                    Value::Array(vec![s("BlockRemoved"), ints(&[11, 12]), s("GPU")]),
                ]),
            ],
        ),
        (
            "map-salt-lora-multimodal",
            16,
            vec![batch_map(vec![
                stored_map(
                    &[20, 21],
                    Value::Nil,
                    toks(8, 0),
                    4,
                    Value::Array(vec![
                        Value::Array(vec![s("adapter"), s("tenant")]),
                        Value::Array(vec![
                            s("adapter"),
                            Value::Array(vec![s("img"), Value::from(1)]),
                        ]),
                    ]),
                    s("adapter"),
                ),
                stored_map(
                    &[22],
                    Value::from(21),
                    toks(4, 8),
                    4,
                    Value::Array(vec![Value::Array(vec![Value::Binary(vec![7; 32])])]),
                    Value::Nil,
                ),
            ])],
        ),
        (
            "sglang-pages-eagle",
            4,
            vec![batch_arr(vec![
                Value::Array(vec![
                    s("BlockStored"),
                    ints(&[-5]),
                    Value::Nil,
                    ints(&[1]),
                    Value::from(1),
                    Value::Nil,
                ]),
                Value::Array(vec![
                    s("BlockStored"),
                    ints(&[-6]),
                    Value::Nil,
                    Value::Array(vec![Value::Array(vec![Value::from(2), Value::from(3)])]),
                    Value::from(1),
                    Value::Nil,
                ]),
                Value::Array(vec![s("BlockRemoved"), ints(&[-5])]),
            ])],
        ),
        (
            "bytes-hashes-unknown-type",
            5,
            vec![batch_map(vec![
                Value::Map(vec![
                    (s("type"), s("BlockPinned")),
                    (s("block_hashes"), ints(&[1])),
                ]),
                Value::Map(vec![
                    (s("token_ids"), toks(2, 0)),
                    (s("type"), s("BlockStored")),
                    (
                        s("block_hashes"),
                        Value::Array(vec![Value::Binary(vec![1; 32])]),
                    ),
                    (s("block_size"), Value::from(2)),
                    (s("parent_block_hash"), Value::Nil),
                ]),
            ])],
        ),
        (
            "capacity-one-churn",
            0,
            (0..6)
                .map(|i| {
                    batch_arr(vec![stored_arr(
                        &[i, i + 100],
                        Value::Nil,
                        toks(4, i),
                        2,
                        if i % 2 == 0 { "GPU" } else { "CPU" },
                    )])
                })
                .collect(),
        ),
        (
            "map-group-and-orphan",
            8,
            vec![batch_map(vec![
                stored_map(
                    &[30],
                    Value::from(999),
                    toks(4, 0),
                    4,
                    Value::Nil,
                    Value::Nil,
                ),
                {
                    let mut v =
                        stored_map(&[31], Value::Nil, toks(4, 0), 4, Value::Nil, Value::Nil);
                    if let Value::Map(m) = &mut v {
                        m[9].1 = Value::from(1);
                    }
                    v
                },
            ])],
        ),
        (
            "empty-batches",
            2,
            vec![batch_arr(vec![]), batch_map(vec![])],
        ),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/kv_events_decode");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, cap, payloads) in seeds {
        let mut data = vec![cap];
        for (i, p) in payloads.iter().enumerate() {
            if i > 0 {
                data.extend_from_slice(&[0xc1, 0xc1, 0xc1]);
            }
            data.extend_from_slice(&enc(p));
        }
        std::fs::write(dir.join(format!("seed-{name}")), &data).unwrap();
        // A truncated copy of each: malformed input the decoder must refuse.
        data.truncate(data.len() * 2 / 3);
        std::fs::write(dir.join(format!("seed-{name}-truncated")), &data).unwrap();
    }
}
