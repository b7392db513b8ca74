//! The ext_proc state machine driven by a gateway that misbehaves: any
//! message in any order, repeated, with body modes changing mid-stream,
//! odd or lying headers (content-length, routing headers, subset hints),
//! bodies larger than the limit.
//!
//! The input is decoded (with `arbitrary`) into stream settings, endpoint
//! metrics and a sequence of `ProcessingRequest`s. Bodies are taken from a
//! few valid templates (so routing is reached often), raw bytes, or a short
//! pattern repeated up to 160 KiB (so the 64 KiB body limit is crossed).
//!
//! Checks, beyond "no panic":
//! - a protocol error (which ends the gRPC stream) comes with no answers and
//!   has already released the request's in-flight accounting;
//! - every answer carries a response, and none are sent in observability mode;
//! - an immediate response is 400/413/429/503 with an OpenAI-style JSON error,
//!   and a stream gets at most one;
//! - the destination (header and dynamic metadata) is set at most once per
//!   stream and lists only endpoints of the store;
//! - no streamed chunk is larger than `MAX_CHUNK`; in a stream whose body
//!   mode never changes, the content-length sent with the destination equals
//!   the bytes of the request body that follow it, and at most one request
//!   chunk carries `end_of_stream`;
//! - the heap grows by a bounded amount while the stream lives (the request
//!   body is capped by `max_request_body`, the kept response by 4 MiB);
//! - once the stream is dropped, every endpoint's in-flight count and
//!   prefill backlog are back to zero.
#![no_main]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::{HashMap, HashSet},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use envoy_types::pb::{
    envoy::{
        config::core::v3::{HeaderMap, HeaderValue, Metadata},
        extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
        service::ext_proc::v3::{
            HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
            ProtocolConfiguration, body_mutation::Mutation, processing_request::Request,
            processing_response::Response,
        },
    },
    google::protobuf::{ListValue, Struct, Value, value::Kind},
};
use epp::{
    config::EndpointPickerConfig,
    director::Director,
    endpoints::{EndpointSpec, EndpointStore, MetricsSample},
    extproc::{
        CONFORMANCE_SERVED, DESTINATION, ExtProcStream, LB_NAMESPACE, MAX_CHUNK, SERVED, SUBSET,
        SUBSET_NAMESPACE, StreamSettings,
    },
    prefix::PrefixIndex,
    scheduling::{SchedulerOptions, build_scheduler},
    telemetry::RequestMetrics,
};
use libfuzzer_sys::fuzz_target;

// ---------------------------------------------------------------- heap meter

/// Counts live heap bytes and their peak, so the target can bound what one
/// stream holds. Wraps the system allocator (which ASan intercepts).
struct Meter;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        p
    }
}

fn grow(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

#[global_allocator]
static METER: Meter = Meter;

// ---------------------------------------------------------------- fixtures

const MAX_BODY: usize = 64 << 10;
const MAX_REPEAT: usize = 160 << 10;
/// What one stream may add to the heap: the kept response body for usage
/// (4 MiB, doubled by Vec growth), the request body and its copies (rewrite,
/// chunking), the chunk being handled, and room for the shared prefix index
/// and metric families to grow.
const HEAP_BOUND: usize = 2 * (4 << 20) + 4 * MAX_BODY + 2 * MAX_REPEAT + (8 << 20);

const ENDPOINTS: [&str; 3] = ["127.0.0.1:8001", "127.0.0.1:8002", "[::1]:8003"];

const DEFAULT_CONFIG: &str = r#"
plugins:
- type: prefill-cost-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefill-cost-scorer
  - pluginRef: max-score-picker
objectives:
- {name: batch, priority: -1}
- {name: critical, priority: 10}
modelRewrites:
- model: qwen
  targets: [{model: Qwen/Qwen2.5-3B-Instruct, weight: 1}, {model: "q\"2", weight: 1}]
"#;

const TESTING_CONFIG: &str = r#"
plugins:
- type: header-based-testing-filter
- type: queue-scorer
- type: prefix-cache-scorer
- type: weighted-random-picker
  parameters: {maxNumOfEndpoints: 2}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - pluginRef: weighted-random-picker
modelRewrites:
- model: "*"
  targets: [{model: rewritten, weight: 1}]
trustedHeaders: [x-gateway-model-name-rewrite, test-epp-endpoint-selection]
"#;

struct World {
    store: Arc<EndpointStore>,
    directors: [Arc<Director>; 2],
    known: HashSet<&'static str>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let store = Arc::new(EndpointStore::new(Duration::from_secs(2)));
        let specs = [
            ("a", [127, 0, 0, 1].into(), 8001),
            ("b", [127, 0, 0, 1].into(), 8002),
            ("c", std::net::Ipv6Addr::LOCALHOST.into(), 8003),
        ]
        .into_iter()
        .map(|(name, address, port)| EndpointSpec {
            name: name.into(),
            address,
            port,
            labels: Default::default(),
            metrics_port: None,
            kv_events: None,
        })
        .collect();
        store.replace(specs).expect("three endpoints fit");
        let metrics = Arc::new(RequestMetrics::standalone().expect("metric families register"));
        let director = |text: &str| {
            let cfg = EndpointPickerConfig::parse(text).expect("fixture config parses");
            let scheduler = build_scheduler(
                &cfg,
                &SchedulerOptions {
                    fallback_endpoints: 2,
                    max_scrape_failures: 3,
                    staleness: Duration::from_secs(2),
                    epoch: store.epoch(),
                },
                Arc::new(PrefixIndex::new()),
            )
            .expect("fixture config builds");
            Arc::new(Director::new(
                Arc::clone(&store),
                scheduler,
                &cfg,
                Arc::clone(&metrics),
            ))
        };
        World {
            directors: [director(DEFAULT_CONFIG), director(TESTING_CONFIG)],
            store,
            known: ENDPOINTS.into_iter().collect(),
        }
    })
}

const REQUEST_BODIES: &[&str] = &[
    r#"{"model":"m","prompt":"hello world, a prompt long enough to fill a block or two of tokens"}"#,
    r#"{"model":"qwen","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"x"}}]}],"stream":true,"stream_options":{"include_usage":true}}"#,
    r#"{"model":"m","input":"embed me"}"#,
    r#"{"model":"m","instructions":"sys","input":[{"role":"user","content":"x"}],"cache_salt":"s"}"#,
    r#"{"model":"qwen","items":[{"type":"message","role":"user","content":"c"}]}"#,
    r#"{"model":"m","prompt":["a","b"],"stream":false}"#,
    r#"{"model":""}"#,
    r#"[1,2,3]"#,
];

const RESPONSE_BODIES: &[&str] = &[
    "{\"id\":\"x\",\"model\":\"Qwen/Qwen2.5-3B-Instruct\",\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":4}}}",
    "data: {\"model\": \"Qwen/Qwen2.5-3B-Instruct\",\"choices\":[]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
    "event: response.completed\ndata: {\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":6}}}\n\n",
    "{\"model\":\"rewritten\",\"usage\":{\"input_tokens\":9}}",
];

// ---------------------------------------------------------------- input

#[derive(Arbitrary, Debug)]
struct Input {
    testing_config: bool,
    always_want_response_body: bool,
    echo_served: bool,
    honour_subset_hint: bool,
    /// (waiting, kv usage in 1/255) per endpoint for this run.
    metrics: [(u8, u8); 3],
    messages: Vec<Message>,
}

#[derive(Arbitrary, Debug)]
struct Message {
    modes: Option<(Mode, Mode)>,
    observability: bool,
    kind: MessageKind,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Mode {
    None,
    Streamed,
    Buffered,
    BufferedPartial,
    FullDuplex,
    Other(i32),
}

impl Mode {
    fn value(self) -> i32 {
        match self {
            Self::None => BodySendMode::None as i32,
            Self::Streamed => BodySendMode::Streamed as i32,
            Self::Buffered => BodySendMode::Buffered as i32,
            Self::BufferedPartial => BodySendMode::BufferedPartial as i32,
            Self::FullDuplex => BodySendMode::FullDuplexStreamed as i32,
            Self::Other(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum MessageKind {
    RequestHeaders {
        path: PathChoice,
        headers: Vec<(NameChoice, ValueChoice)>,
        content_length: Option<LengthChoice>,
        subset: Option<SubsetChoice>,
        end_of_stream: bool,
    },
    RequestBody {
        body: BodyChoice,
        end_of_stream: bool,
    },
    RequestTrailers,
    ResponseHeaders {
        status: u16,
        sse: bool,
        served: Option<AddrChoice>,
        served_as_attribute: bool,
        end_of_stream: bool,
    },
    ResponseBody {
        body: BodyChoice,
        end_of_stream: bool,
    },
    ResponseTrailers,
    Nothing,
}

#[derive(Arbitrary, Debug)]
enum PathChoice {
    Completions,
    Chat,
    Responses,
    Embeddings,
    Conversations,
    Models,
    Missing,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum NameChoice {
    Objective,
    ModelRewrite,
    TestSelection,
    Served,
    Subset,
    ConformanceServed,
    Destination,
    RequestId,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum ValueChoice {
    Batch,
    Critical,
    Model(u8),
    Addr(AddrChoice),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum AddrChoice {
    Known(u8),
    KnownIp(u8),
    List(u8, u8),
    Raw(String),
}

impl AddrChoice {
    fn text(&self) -> String {
        match self {
            Self::Known(i) => ENDPOINTS[usize::from(*i) % 3].to_owned(),
            Self::KnownIp(i) => ["127.0.0.1", "::1", "[::1]"][usize::from(*i) % 3].to_owned(),
            Self::List(a, b) => format!(
                "{}, {}",
                ENDPOINTS[usize::from(*a) % 3],
                ENDPOINTS[usize::from(*b) % 3]
            ),
            Self::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum LengthChoice {
    /// The true length of the first body template.
    OfTemplate(u8),
    Number(u64),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum SubsetChoice {
    Text(AddrChoice),
    List(Vec<AddrChoice>),
    NotAString(f64),
}

#[derive(Arbitrary, Debug)]
enum BodyChoice {
    Template(u8),
    TemplatePart { template: u8, from: u16, to: u16 },
    Raw(Vec<u8>),
    Repeat { unit: Vec<u8>, times: u16 },
}

impl BodyChoice {
    fn bytes(&self, templates: &[&str]) -> Vec<u8> {
        let pick = |i: u8| templates[usize::from(i) % templates.len()].as_bytes();
        match self {
            Self::Template(i) => pick(*i).to_vec(),
            Self::TemplatePart { template, from, to } => {
                let t = pick(*template);
                let a = usize::from(*from).min(t.len());
                let b = usize::from(*to).clamp(a, t.len());
                t[a..b].to_vec()
            }
            Self::Raw(v) => v.clone(),
            Self::Repeat { unit, times } => {
                if unit.is_empty() {
                    return Vec::new();
                }
                let n = (usize::from(*times) * unit.len()).min(MAX_REPEAT);
                unit.iter().copied().cycle().take(n).collect()
            }
        }
    }
}

// ---------------------------------------------------------------- building

fn header_map(pairs: Vec<(String, Vec<u8>)>) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: pairs
            .into_iter()
            .map(|(key, raw_value)| HeaderValue {
                key,
                value: String::new(),
                raw_value,
            })
            .collect(),
    })
}

fn string_value(s: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(s)),
    }
}

fn one_field(namespace: &str, key: &str, value: Value) -> Metadata {
    Metadata {
        filter_metadata: HashMap::from([(
            namespace.to_owned(),
            Struct {
                fields: HashMap::from([(key.to_owned(), value)]),
            },
        )]),
        ..Metadata::default()
    }
}

fn build(m: &Message) -> ProcessingRequest {
    let mut req = ProcessingRequest {
        observability_mode: m.observability,
        protocol_config: m.modes.map(|(rq, rs)| ProtocolConfiguration {
            request_body_mode: rq.value(),
            response_body_mode: rs.value(),
            ..ProtocolConfiguration::default()
        }),
        ..ProcessingRequest::default()
    };
    req.request = match &m.kind {
        MessageKind::RequestHeaders {
            path,
            headers,
            content_length,
            subset,
            end_of_stream,
        } => {
            let mut pairs = Vec::new();
            let path = match path {
                PathChoice::Completions => Some("/v1/completions".to_owned()),
                PathChoice::Chat => Some("/v1/chat/completions".to_owned()),
                PathChoice::Responses => Some("/v1/responses".to_owned()),
                PathChoice::Embeddings => Some("/v1/embeddings".to_owned()),
                PathChoice::Conversations => Some("/v1/conversations".to_owned()),
                PathChoice::Models => Some("/v1/models".to_owned()),
                PathChoice::Missing => None,
                PathChoice::Raw(s) => Some(s.clone()),
            };
            if let Some(p) = path {
                pairs.push((":path".to_owned(), p.into_bytes()));
            }
            pairs.push((":method".to_owned(), b"POST".to_vec()));
            for (name, value) in headers {
                let name = match name {
                    NameChoice::Objective => "x-gateway-inference-objective".to_owned(),
                    NameChoice::ModelRewrite => "x-gateway-model-name-rewrite".to_owned(),
                    NameChoice::TestSelection => "test-epp-endpoint-selection".to_owned(),
                    NameChoice::Served => SERVED.to_owned(),
                    NameChoice::Subset => SUBSET.to_owned(),
                    NameChoice::ConformanceServed => CONFORMANCE_SERVED.to_owned(),
                    NameChoice::Destination => DESTINATION.to_owned(),
                    NameChoice::RequestId => "x-request-id".to_owned(),
                    NameChoice::Raw(s) => s.clone(),
                };
                let value = match value {
                    ValueChoice::Batch => b"batch".to_vec(),
                    ValueChoice::Critical => b"critical".to_vec(),
                    ValueChoice::Model(i) => ["qwen", "m", "", "Qwen/Qwen2.5-3B-Instruct"]
                        [usize::from(*i) % 4]
                        .as_bytes()
                        .to_vec(),
                    ValueChoice::Addr(a) => a.text().into_bytes(),
                    ValueChoice::Raw(v) => v.clone(),
                };
                pairs.push((name, value));
            }
            if let Some(cl) = content_length {
                let v = match cl {
                    LengthChoice::OfTemplate(i) => REQUEST_BODIES
                        [usize::from(*i) % REQUEST_BODIES.len()]
                    .len()
                    .to_string(),
                    LengthChoice::Number(n) => n.to_string(),
                    LengthChoice::Raw(s) => s.clone(),
                };
                pairs.push(("content-length".to_owned(), v.into_bytes()));
            }
            req.metadata_context = subset.as_ref().map(|s| {
                let value = match s {
                    SubsetChoice::Text(a) => string_value(a.text()),
                    SubsetChoice::List(list) => Value {
                        kind: Some(Kind::ListValue(ListValue {
                            values: list.iter().map(|a| string_value(a.text())).collect(),
                        })),
                    },
                    SubsetChoice::NotAString(f) => Value {
                        kind: Some(Kind::NumberValue(*f)),
                    },
                };
                one_field(SUBSET_NAMESPACE, SUBSET, value)
            });
            Some(Request::RequestHeaders(HttpHeaders {
                headers: header_map(pairs),
                end_of_stream: *end_of_stream,
                ..HttpHeaders::default()
            }))
        }
        MessageKind::RequestBody {
            body,
            end_of_stream,
        } => Some(Request::RequestBody(HttpBody {
            body: body.bytes(REQUEST_BODIES),
            end_of_stream: *end_of_stream,
            ..HttpBody::default()
        })),
        MessageKind::RequestTrailers => Some(Request::RequestTrailers(HttpTrailers::default())),
        MessageKind::ResponseHeaders {
            status,
            sse,
            served,
            served_as_attribute,
            end_of_stream,
        } => {
            let mut pairs = vec![(":status".to_owned(), status.to_string().into_bytes())];
            let ct: &[u8] = if *sse {
                b"text/event-stream"
            } else {
                b"application/json"
            };
            pairs.push(("content-type".to_owned(), ct.to_vec()));
            if let Some(served) = served {
                let v = string_value(served.text());
                if *served_as_attribute {
                    req.attributes = HashMap::from([(
                        "envoy.filters.http.ext_proc".to_owned(),
                        Struct {
                            fields: HashMap::from([("upstream.address".to_owned(), v)]),
                        },
                    )]);
                } else {
                    req.metadata_context = Some(one_field(LB_NAMESPACE, SERVED, v));
                }
            }
            Some(Request::ResponseHeaders(HttpHeaders {
                headers: header_map(pairs),
                end_of_stream: *end_of_stream,
                ..HttpHeaders::default()
            }))
        }
        MessageKind::ResponseBody {
            body,
            end_of_stream,
        } => Some(Request::ResponseBody(HttpBody {
            body: body.bytes(RESPONSE_BODIES),
            end_of_stream: *end_of_stream,
            ..HttpBody::default()
        })),
        MessageKind::ResponseTrailers => Some(Request::ResponseTrailers(HttpTrailers::default())),
        MessageKind::Nothing => None,
    };
    req
}

// ---------------------------------------------------------------- checks

/// What the answers of one stream showed so far.
#[derive(Default)]
struct Seen {
    immediate: usize,
    destinations: usize,
    /// content-length sent with the destination, when the body follows as
    /// streamed chunks.
    declared: Option<usize>,
    /// Request body bytes streamed back after the destination.
    streamed_after: usize,
    request_eos: usize,
}

fn check_destination(value: &str, known: &HashSet<&str>) {
    assert!(!value.is_empty(), "empty destination");
    for part in value.split(',') {
        assert!(known.contains(part), "destination {value:?} names {part:?}");
    }
}

fn check_answer(r: &ProcessingResponse, w: &World, seen: &mut Seen) {
    let Some(resp) = &r.response else {
        panic!("answer without a response: {r:?}");
    };
    if let Some(md) = &r.dynamic_metadata {
        let lb = md
            .fields
            .get(LB_NAMESPACE)
            .expect("metadata is under envoy.lb");
        let Some(Kind::StructValue(s)) = &lb.kind else {
            panic!("envoy.lb metadata is not a struct");
        };
        let Some(Kind::StringValue(v)) = s.fields.get(DESTINATION).and_then(|v| v.kind.as_ref())
        else {
            panic!("no destination in envoy.lb metadata");
        };
        check_destination(v, &w.known);
    }
    let common = match resp {
        Response::ImmediateResponse(i) => {
            seen.immediate += 1;
            let code = i.status.as_ref().map_or(0, |s| s.code);
            assert!(
                [400, 413, 429, 503].contains(&code),
                "immediate response status {code}"
            );
            let v: serde_json::Value = serde_json::from_slice(&i.body).expect("error body is JSON");
            for field in ["message", "type", "code"] {
                assert!(
                    v["error"][field].as_str().is_some_and(|s| !s.is_empty()),
                    "error.{field} missing in {v}"
                );
            }
            return;
        }
        Response::RequestHeaders(h) | Response::ResponseHeaders(h) => h.response.as_ref(),
        Response::RequestBody(b) | Response::ResponseBody(b) => b.response.as_ref(),
        Response::RequestTrailers(_) | Response::ResponseTrailers(_) => None,
        Response::StreamedImmediateResponse(_) => {
            panic!("the picker never streams an immediate response")
        }
    };
    let request_side = matches!(
        resp,
        Response::RequestHeaders(_) | Response::RequestBody(_) | Response::RequestTrailers(_)
    );
    let Some(common) = common else { return };
    if let Some(hm) = &common.header_mutation {
        let mut length = None;
        for h in hm.set_headers.iter().filter_map(|o| o.header.as_ref()) {
            let value = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8(h.raw_value.clone()).expect("set headers are UTF-8")
            };
            if h.key.eq_ignore_ascii_case(DESTINATION) {
                assert!(request_side, "destination set on the response");
                seen.destinations += 1;
                check_destination(&value, &w.known);
            }
            if h.key.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().expect("content-length is a number"));
            }
        }
        if hm
            .set_headers
            .iter()
            .any(|o| o.header.as_ref().is_some_and(|h| h.key == DESTINATION))
            && matches!(resp, Response::RequestHeaders(_))
        {
            seen.declared = length;
        }
    }
    if let Some(Mutation::StreamedResponse(s)) = common
        .body_mutation
        .as_ref()
        .and_then(|b| b.mutation.as_ref())
    {
        assert!(s.body.len() <= MAX_CHUNK, "chunk of {} bytes", s.body.len());
        if request_side {
            if seen.destinations > 0 {
                seen.streamed_after += s.body.len();
            }
            if s.end_of_stream {
                seen.request_eos += 1;
            }
        }
    }
}

fn in_flight_is_released(w: &World) {
    for e in w.store.snapshot().endpoints() {
        assert_eq!(e.in_flight(), 0, "in-flight count leaked on {}", e.name());
        assert_eq!(
            e.prefill_backlog(),
            0,
            "prefill backlog leaked on {}",
            e.name()
        );
    }
}

fuzz_target!(|input: Input| {
    let w = world();
    let now = Instant::now();
    for (e, (waiting, kv)) in w.store.snapshot().endpoints().iter().zip(input.metrics) {
        let sample = MetricsSample {
            waiting: u32::from(waiting % 16),
            running: u32::from(waiting / 16),
            kv_usage: f64::from(kv) / 255.0,
            block_size: 16,
            num_blocks: 1024,
        };
        e.record_scrape(&sample, now, w.store.epoch());
    }
    let settings = Arc::new(StreamSettings {
        max_request_body: MAX_BODY,
        echo_served_endpoint: input.echo_served,
        always_want_response_body: input.always_want_response_body,
        honour_subset_hint: input.honour_subset_hint,
        tracer: Default::default(),
    });
    let director = Arc::clone(&w.directors[usize::from(input.testing_config)]);

    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut stream = ExtProcStream::new(director, settings);
    let mut seen = Seen::default();
    let mut first_modes = None;
    let mut modes_changed = false;
    let mut out = Vec::new();
    for (i, m) in input.messages.iter().enumerate() {
        if let Some(modes) = m.modes {
            if i == 0 {
                first_modes = Some(modes);
            } else if first_modes != Some(modes) {
                modes_changed = true;
            }
        }
        let msg = build(m);
        if let Err(e) = stream.on_message(msg, &mut out) {
            // A protocol violation: the server ends the gRPC stream with
            // the error; the request must already be released.
            assert!(out.is_empty(), "answers queued with protocol error {e}");
            assert!(!e.to_string().is_empty());
            in_flight_is_released(w);
            break;
        }
        if m.observability {
            assert!(out.is_empty(), "answers in observability mode");
        }
        for r in &out {
            check_answer(r, w, &mut seen);
        }
        out.clear();
        out.shrink_to_fit();
        let grown = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        assert!(
            grown <= HEAP_BOUND,
            "one stream grew the heap by {grown} bytes"
        );
    }
    assert!(
        seen.immediate <= 1,
        "{} immediate responses",
        seen.immediate
    );
    assert!(seen.destinations <= 1, "{} destinations", seen.destinations);
    if !modes_changed {
        assert!(
            seen.request_eos <= 1,
            "{} request ends of stream",
            seen.request_eos
        );
        if let Some(declared) = seen.declared
            && seen.request_eos == 1
        {
            assert_eq!(
                declared, seen.streamed_after,
                "content-length disagrees with the streamed body"
            );
        }
    }
    drop(stream);
    in_flight_is_released(w);
});
