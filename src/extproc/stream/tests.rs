use std::{collections::HashMap, sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{HeaderValue, Metadata},
        service::ext_proc::v3::{
            CommonResponse, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest,
            ProcessingResponse, ProtocolConfiguration, body_mutation::Mutation,
            processing_request::Request, processing_response::Response,
        },
    },
    google::protobuf::{Struct, Value, value::Kind},
};

use super::*;
use crate::extproc::envoy::{
    CONFORMANCE_SERVED, SERVED, SUBSET, SUBSET_NAMESPACE, gateway_headers as headers,
    gateway_message as msg,
};
use crate::{
    director::testing,
    endpoints::{EndpointStore, MetricsSample, testing::store_with},
    telemetry::render,
};

/// A director whose request metrics are registered in `registry`.
fn director_with(
    store: Arc<EndpointStore>,
    cfg: &str,
    registry: &prometheus::Registry,
) -> Arc<Director> {
    Arc::new(testing::director(store, cfg, registry))
}

/// A config that lets clients rewrite the model by header.
const TRUST_REWRITE: &str = "trustedHeaders: [x-gateway-model-name-rewrite]";

fn settings() -> StreamSettings {
    StreamSettings {
        max_request_body: 1 << 20,
        echo_served_endpoint: false,
        always_want_response_body: true,
        honour_subset_hint: true,
    }
}

struct Harness {
    store: Arc<EndpointStore>,
    registry: prometheus::Registry,
    stream: ExtProcStream,
}

impl Harness {
    fn new(settings: StreamSettings) -> Self {
        Self::with_config(settings, crate::config::DEFAULT_CONFIG)
    }

    fn with_config(settings: StreamSettings, cfg: &str) -> Self {
        let store = Arc::new(store_with(&[8001, 8002], &[MetricsSample::default(); 2]));
        let registry = prometheus::Registry::new();
        let director = director_with(Arc::clone(&store), cfg, &registry);
        let stream = ExtProcStream::new(director, Arc::new(settings));
        Self {
            store,
            registry,
            stream,
        }
    }

    fn send(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        self.try_send(msg).expect("well-formed message sequence")
    }

    fn try_send(
        &mut self,
        msg: ProcessingRequest,
    ) -> Result<Vec<ProcessingResponse>, ProtocolError> {
        let mut out = Vec::new();
        self.stream.on_message(msg, &mut out)?;
        Ok(out)
    }

    fn in_flight(&self) -> u32 {
        self.store
            .snapshot()
            .endpoints()
            .iter()
            .map(|e| e.in_flight())
            .sum()
    }
}

fn first(mode: BodySendMode, request: Request) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: mode as i32,
            response_body_mode: mode as i32,
            ..ProtocolConfiguration::default()
        }),
        ..ProcessingRequest::default()
    }
}

fn post(path: &str) -> HttpHeaders {
    headers(
        &[
            (":method", "POST"),
            (":path", path),
            ("content-type", "application/json"),
        ],
        false,
    )
}

fn body(bytes: &[u8], end_of_stream: bool) -> Request {
    Request::RequestBody(HttpBody {
        body: bytes.to_vec(),
        end_of_stream,
        ..HttpBody::default()
    })
}

fn resp_body(bytes: &[u8], end_of_stream: bool) -> Request {
    Request::ResponseBody(HttpBody {
        body: bytes.to_vec(),
        end_of_stream,
        ..HttpBody::default()
    })
}

fn common(r: &ProcessingResponse) -> &CommonResponse {
    match r.response.as_ref().unwrap() {
        Response::RequestHeaders(h) | Response::ResponseHeaders(h) => h.response.as_ref().unwrap(),
        Response::RequestBody(b) | Response::ResponseBody(b) => b.response.as_ref().unwrap(),
        other => panic!("no common response in {other:?}"),
    }
}

fn set_header(r: &ProcessingResponse, key: &str) -> Option<String> {
    common(r)
        .header_mutation
        .as_ref()?
        .set_headers
        .iter()
        .find(|h| h.header.as_ref().unwrap().key == key)
        .map(|h| String::from_utf8(h.header.as_ref().unwrap().raw_value.clone()).unwrap())
}

fn metadata_destination(r: &ProcessingResponse) -> String {
    let lb = &r.dynamic_metadata.as_ref().unwrap().fields[LB_NAMESPACE];
    let Some(Kind::StructValue(s)) = &lb.kind else {
        panic!()
    };
    let Some(Kind::StringValue(v)) = &s.fields[DESTINATION].kind else {
        panic!()
    };
    v.clone()
}

fn streamed(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    match &common(r).body_mutation.as_ref().unwrap().mutation {
        Some(Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        other => panic!("not streamed: {other:?}"),
    }
}

fn immediate_status(r: &ProcessingResponse) -> (i32, serde_json::Value) {
    match r.response.as_ref().unwrap() {
        Response::ImmediateResponse(i) => (
            i.status.unwrap().code,
            serde_json::from_slice(&i.body).unwrap(),
        ),
        other => panic!("not immediate: {other:?}"),
    }
}

const BODY: &[u8] = br#"{"model":"m","prompt":"hello world, a prompt long enough to span a block or two of sixty four bytes"}"#;

#[test]
fn full_duplex_defers_headers_until_the_body_is_complete() {
    let mut h = Harness::new(settings());
    assert!(
        h.send(first(
            BodySendMode::FullDuplexStreamed,
            Request::RequestHeaders(post("/v1/completions"))
        ))
        .is_empty()
    );
    assert!(h.send(msg(body(&BODY[..10], false))).is_empty());
    let out = h.send(msg(body(&BODY[10..], true)));
    assert_eq!(out.len(), 2, "headers answer then one body chunk");
    assert!(matches!(out[0].response, Some(Response::RequestHeaders(_))));
    assert!(common(&out[0]).clear_route_cache);
    let dest = set_header(&out[0], DESTINATION).unwrap();
    assert_eq!(dest.split(',').count(), 2, "pick plus one fallback");
    assert_eq!(metadata_destination(&out[0]), dest);
    assert_eq!(
        set_header(&out[0], "content-length"),
        Some(BODY.len().to_string())
    );
    assert_eq!(streamed(&out[1]), (BODY.to_vec(), true));
    assert_eq!(h.in_flight(), 1);
}

/// With a Content-Length the body buffer is sized up front; the body that
/// goes on must still be exactly the chunks received, whether the declared
/// length is right, too small or huge.
#[test]
fn bodies_with_a_declared_length_reassemble_across_chunks() {
    for declared in [BODY.len(), 5, 1 << 20] {
        let mut h = Harness::new(settings());
        let mut hdrs = post("/v1/completions");
        if let Some(map) = hdrs.headers.as_mut() {
            map.headers.push(HeaderValue {
                key: "content-length".into(),
                value: String::new(),
                raw_value: declared.to_string().into_bytes(),
            });
        }
        assert!(
            h.send(first(
                BodySendMode::FullDuplexStreamed,
                Request::RequestHeaders(hdrs)
            ))
            .is_empty()
        );
        assert!(h.send(msg(body(&BODY[..7], false))).is_empty());
        assert!(h.send(msg(body(&BODY[7..40], false))).is_empty());
        let out = h.send(msg(body(&BODY[40..], true)));
        assert_eq!(out.len(), 2, "declared {declared}");
        assert_eq!(
            streamed(&out[1]),
            (BODY.to_vec(), true),
            "declared {declared}"
        );
    }
}

#[test]
fn buffered_mode_answers_headers_at_once_and_routes_in_the_body_answer() {
    let mut h = Harness::new(settings());
    let out = h.send(first(
        BodySendMode::Buffered,
        Request::RequestHeaders(post("/v1/completions")),
    ));
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].response, Some(Response::RequestHeaders(_))));
    let out = h.send(msg(body(BODY, true)));
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].response, Some(Response::RequestBody(_))));
    let c = common(&out[0]);
    assert!(c.clear_route_cache);
    assert!(c.body_mutation.is_none(), "unchanged body is not resent");
    assert!(set_header(&out[0], DESTINATION).is_some());
    assert!(out[0].dynamic_metadata.is_some());
}

#[test]
fn bodiless_requests_are_routed_at_the_headers() {
    let mut h = Harness::new(settings());
    let out = h.send(msg(Request::RequestHeaders(headers(
        &[(":method", "GET"), (":path", "/v1/models")],
        true,
    ))));
    assert_eq!(out.len(), 1);
    assert!(set_header(&out[0], DESTINATION).is_some());
}

#[test]
fn client_errors_become_openai_style_immediate_responses() {
    for (b, status, code) in [
        (&b"{not json"[..], 400, "invalid_json"),
        (&b"[1,2]"[..], 400, "invalid_body"),
        (&br#"{"prompt":"x"}"#[..], 400, "invalid_model"),
        (&br#"{"model":"m"}"#[..], 400, "invalid_prompt"),
    ] {
        let mut h = Harness::new(settings());
        h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
        let out = h.send(msg(body(b, true)));
        assert_eq!(out.len(), 1);
        let (s, v) = immediate_status(&out[0]);
        assert_eq!(s, status);
        assert_eq!(v["error"]["code"], code);
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
        assert_eq!(h.in_flight(), 0);
        // Later messages are ignored rather than failing the stream.
        assert!(h.send(msg(body(b"x", true))).is_empty());
    }
}

#[test]
fn oversized_bodies_get_413_by_header_or_by_size() {
    let small = StreamSettings {
        max_request_body: 16,
        ..settings()
    };
    let mut h = Harness::new(small.clone());
    let out = h.send(msg(Request::RequestHeaders(headers(
        &[(":path", "/v1/completions"), ("content-length", "17")],
        false,
    ))));
    assert_eq!(immediate_status(&out[0]).0, 413);
    let mut h = Harness::new(small);
    h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
    assert!(h.send(msg(body(&[b' '; 10], false))).is_empty());
    let out = h.send(msg(body(&[b' '; 10], false)));
    assert_eq!(immediate_status(&out[0]).0, 413);
}

#[test]
fn spoofed_routing_headers_are_removed_or_overwritten() {
    let mut h = Harness::new(settings());
    h.send(msg(Request::RequestHeaders(headers(
        &[
            (":path", "/v1/completions"),
            (DESTINATION, "6.6.6.6:80"),
            (SERVED, "6.6.6.6:80"),
        ],
        false,
    ))));
    let out = h.send(msg(body(BODY, true)));
    let dest = set_header(&out[0], DESTINATION).unwrap();
    assert!(!dest.contains("6.6.6.6"));
    let removed = &common(&out[0])
        .header_mutation
        .as_ref()
        .unwrap()
        .remove_headers;
    assert!(removed.contains(&SERVED.to_owned()));
}

#[test]
fn subset_hint_from_metadata() {
    let mut h = Harness::new(settings());
    let hint = Struct {
        fields: HashMap::from([(
            SUBSET.to_owned(),
            Value {
                kind: Some(Kind::StringValue("127.0.0.1:8002".into())),
            },
        )]),
    };
    let mut m = msg(Request::RequestHeaders(post("/v1/completions")));
    m.metadata_context = Some(Metadata {
        filter_metadata: HashMap::from([(SUBSET_NAMESPACE.to_owned(), hint)]),
        ..Metadata::default()
    });
    h.send(m);
    let out = h.send(msg(body(BODY, true)));
    assert_eq!(set_header(&out[0], DESTINATION).unwrap(), "127.0.0.1:8002");
}

#[test]
fn model_rewrite_changes_body_and_restores_the_name_in_responses() {
    let mut h = Harness::with_config(settings(), TRUST_REWRITE);
    h.send(msg(Request::RequestHeaders(headers(
        &[
            (":path", "/v1/completions"),
            ("x-gateway-model-name-rewrite", "big-model"),
        ],
        false,
    ))));
    let out = h.send(msg(body(BODY, true)));
    let (sent, _) = streamed(&out[1]);
    let v: serde_json::Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(v["model"], "big-model");
    assert_eq!(
        set_header(&out[0], "content-length").unwrap(),
        sent.len().to_string()
    );

    h.send(msg(Request::ResponseHeaders(headers(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    ))));
    let out = h.send(msg(resp_body(
        br#"{"model":"big-model","usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
        true,
    )));
    let (back, eos) = streamed(&out[0]);
    assert!(eos);
    assert_eq!(
        String::from_utf8(back).unwrap(),
        r#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":1}}"#
    );
    assert_eq!(h.in_flight(), 0);
}

#[test]
fn sse_chunks_pass_through_immediately_and_release_at_the_end() {
    let mut h = Harness::new(settings());
    h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
    h.send(msg(body(BODY, true)));
    assert_eq!(h.in_flight(), 1);
    let out = h.send(msg(Request::ResponseHeaders(headers(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    ))));
    assert_eq!(out.len(), 1);
    let chunk = b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n";
    let out = h.send(msg(resp_body(chunk, false)));
    assert_eq!(
        streamed(&out[0]),
        (chunk.to_vec(), false),
        "echoed at once, unchanged"
    );
    let pick = h
        .store
        .snapshot()
        .endpoints()
        .iter()
        .find(|e| e.in_flight() == 1)
        .cloned()
        .unwrap();
    assert_eq!(
        pick.prefill_backlog(),
        0,
        "first byte ends the prefill estimate"
    );
    let last = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":16}}}\n\ndata: [DONE]\n\n";
    let out = h.send(msg(resp_body(last, true)));
    assert!(streamed(&out[0]).1);
    assert_eq!(h.in_flight(), 0);
    let text = render(&h.registry);
    assert!(text.contains("inference_objective_prompt_cached_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 16"), "{text}");
}

#[test]
fn dropping_the_stream_releases_in_flight() {
    let mut h = Harness::new(settings());
    h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
    h.send(msg(body(BODY, true)));
    assert_eq!(h.in_flight(), 1);
    let store = Arc::clone(&h.store);
    drop(h);
    assert_eq!(
        store
            .snapshot()
            .endpoints()
            .iter()
            .map(|e| e.in_flight())
            .sum::<u32>(),
        0
    );
}

#[test]
fn served_endpoint_is_echoed_when_enabled() {
    let mut h = Harness::new(StreamSettings {
        echo_served_endpoint: true,
        ..settings()
    });
    h.send(msg(Request::RequestHeaders(headers(
        &[(":path", "/v1/models")],
        true,
    ))));
    let served = Struct {
        fields: HashMap::from([(
            SERVED.to_owned(),
            Value {
                kind: Some(Kind::StringValue("127.0.0.1:8001".into())),
            },
        )]),
    };
    let mut m = msg(Request::ResponseHeaders(headers(
        &[(":status", "200")],
        false,
    )));
    m.metadata_context = Some(Metadata {
        filter_metadata: HashMap::from([(LB_NAMESPACE.to_owned(), served)]),
        ..Metadata::default()
    });
    let out = h.send(m);
    assert_eq!(
        set_header(&out[0], CONFORMANCE_SERVED).as_deref(),
        Some("127.0.0.1:8001")
    );
}

fn first_with_modes(
    request_mode: BodySendMode,
    response: BodySendMode,
    request: Request,
) -> ProcessingRequest {
    let mut m = first(request_mode, request);
    m.protocol_config.as_mut().unwrap().response_body_mode = response as i32;
    m
}

#[test]
fn response_bodies_are_requested_when_the_gateway_sends_none() {
    use BodySendMode::{Buffered, FullDuplexStreamed, None as NoBody};
    // Full: always asks, in the answer to the request headers.
    let mut h = Harness::new(settings());
    let out = h.send(first_with_modes(
        Buffered,
        NoBody,
        Request::RequestHeaders(post("/v1/completions")),
    ));
    let mode = out[0].mode_override.as_ref().expect("override");
    assert_eq!(mode.response_body_mode, FullDuplexStreamed as i32);
    h.send(msg(body(BODY, true)));
    // The picker then answers response chunks as streamed chunks.
    h.send(msg(Request::ResponseHeaders(headers(
        &[(":status", "200")],
        false,
    ))));
    let out = h.send(msg(resp_body(b"{}", true)));
    assert_eq!(streamed(&out[0]), (b"{}".to_vec(), true));

    // Minimal: only when the request needs it (a model rewrite).
    let minimal = StreamSettings {
        always_want_response_body: false,
        ..settings()
    };
    let mut h = Harness::new(minimal.clone());
    let out = h.send(first_with_modes(
        Buffered,
        NoBody,
        Request::RequestHeaders(post("/v1/completions")),
    ));
    assert!(out[0].mode_override.is_none());
    let rewrite = || {
        first_with_modes(
            Buffered,
            NoBody,
            Request::RequestHeaders(headers(
                &[
                    (":path", "/v1/completions"),
                    ("x-gateway-model-name-rewrite", "x"),
                ],
                false,
            )),
        )
    };
    let mut h = Harness::with_config(minimal.clone(), TRUST_REWRITE);
    assert!(h.send(rewrite())[0].mode_override.is_some());
    // An untrusted rewrite header changes nothing, so needs no body.
    let mut h = Harness::new(minimal);
    assert!(h.send(rewrite())[0].mode_override.is_none());

    // Envoy ignores overrides when request bodies are full-duplex: none sent.
    let mut h = Harness::new(settings());
    h.send(first_with_modes(
        FullDuplexStreamed,
        NoBody,
        Request::RequestHeaders(post("/v1/completions")),
    ));
    assert!(h.send(msg(body(BODY, true)))[0].mode_override.is_none());
    // Never a downgrade: a gateway streaming bodies keeps doing so.
    let mut h = Harness::new(settings());
    h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
    assert!(h.send(msg(body(BODY, true)))[0].mode_override.is_none());
}

#[test]
fn trailers_after_the_body_end_the_request() {
    let mut h = Harness::new(settings());
    h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
    assert!(h.send(msg(body(BODY, false))).is_empty());
    let out = h.send(msg(Request::RequestTrailers(HttpTrailers::default())));
    assert_eq!(out.len(), 3, "headers, body chunk, trailers");
    assert!(!streamed(&out[1]).1, "trailers carry the end of stream");
    assert!(matches!(
        out[2].response,
        Some(Response::RequestTrailers(_))
    ));
}

#[test]
fn observability_mode_sends_nothing() {
    let mut h = Harness::new(settings());
    let mut m = msg(Request::RequestHeaders(headers(
        &[(":path", "/v1/models")],
        true,
    )));
    m.observability_mode = true;
    assert!(h.send(m).is_empty());
}

#[test]
fn empty_pool_is_503() {
    let store = Arc::new(EndpointStore::new(Duration::from_secs(1)));
    let mut s = ExtProcStream::new(
        director_with(
            store,
            crate::config::DEFAULT_CONFIG,
            &prometheus::Registry::new(),
        ),
        Arc::new(settings()),
    );
    let mut out = Vec::new();
    s.on_message(
        msg(Request::RequestHeaders(headers(
            &[(":path", "/health")],
            true,
        ))),
        &mut out,
    )
    .unwrap();
    assert_eq!(immediate_status(&out[0]).0, 503);
}

#[test]
fn a_repeated_final_body_chunk_is_not_echoed() {
    // envoyproxy/envoy#46237: the last chunk may arrive twice.
    let mut h = Harness::new(settings());
    h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
    let out = h.send(msg(body(BODY, true)));
    assert_eq!(out.len(), 2);
    assert!(h.send(msg(body(BODY, true))).is_empty());
    assert_eq!(h.in_flight(), 1, "routed once");
}

fn with_header(mut h: HttpHeaders, key: &str, value: &str) -> HttpHeaders {
    if let Some(map) = h.headers.as_mut() {
        map.headers.push(HeaderValue {
            key: key.into(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        });
    }
    h
}

/// Not JSON, so reading it would be a 400: routing proves it went unread.
const GZIP: &[u8] = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xabV\xca\xcdOI\xcd\x01\x00";

#[test]
fn encoded_bodies_are_routed_at_the_headers_and_passed_through_unread() {
    for encoding in ["gzip", "br", "zstd", " GZIP ", "deflate, gzip"] {
        let mut h = Harness::new(settings());
        let hdrs = with_header(
            with_header(post("/v1/completions"), "content-encoding", encoding),
            "content-length",
            &GZIP.len().to_string(),
        );
        let out = h.send(first(
            BodySendMode::FullDuplexStreamed,
            Request::RequestHeaders(hdrs),
        ));
        assert_eq!(out.len(), 1, "{encoding}: routed before any body byte");
        assert!(matches!(out[0].response, Some(Response::RequestHeaders(_))));
        assert!(set_header(&out[0], DESTINATION).is_some());
        assert_eq!(h.in_flight(), 1);
        let out = h.send(msg(body(&GZIP[..5], false)));
        assert_eq!(streamed(&out[0]), (GZIP[..5].to_vec(), false));
        let out = h.send(msg(body(&GZIP[5..], true)));
        assert_eq!(streamed(&out[0]), (GZIP[5..].to_vec(), true));
        // Nothing was hashed for prefix affinity.
        assert!(
            h.stream.director.scheduler().index().is_empty(),
            "{encoding}"
        );
    }

    // Buffered: destination in the headers answer, body left as it is.
    let mut h = Harness::new(settings());
    let out = h.send(first(
        BodySendMode::Buffered,
        Request::RequestHeaders(with_header(
            post("/v1/completions"),
            "content-encoding",
            "gzip",
        )),
    ));
    assert!(set_header(&out[0], DESTINATION).is_some());
    let out = h.send(msg(body(GZIP, true)));
    assert_eq!(out.len(), 1);
    let Some(Response::RequestBody(b)) = &out[0].response else {
        panic!("not a body answer: {:?}", out[0]);
    };
    assert!(
        b.response
            .as_ref()
            .is_none_or(|c| c.body_mutation.is_none()),
        "unchanged"
    );

    // identity is no encoding: the body is read as usual.
    let mut h = Harness::new(settings());
    assert!(
        h.send(msg(Request::RequestHeaders(with_header(
            post("/v1/completions"),
            "content-encoding",
            "identity",
        ))))
        .is_empty()
    );
    let (status, _) = immediate_status(&h.send(msg(body(GZIP, true)))[0]);
    assert_eq!(status, 400);
}

#[test]
fn a_post_to_an_inference_api_without_a_body_is_400() {
    let mut h = Harness::new(settings());
    let out = h.send(msg(Request::RequestHeaders(headers(
        &[(":method", "POST"), (":path", "/v1/chat/completions")],
        true,
    ))));
    let (status, v) = immediate_status(&out[0]);
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "invalid_json", "{v}");
    assert_eq!(h.in_flight(), 0);
    // Other paths and methods without a body are routed by load.
    for (method, path) in [("POST", "/tokenize"), ("GET", "/v1/completions")] {
        let mut h = Harness::new(settings());
        let out = h.send(msg(Request::RequestHeaders(headers(
            &[(":method", method), (":path", path)],
            true,
        ))));
        assert!(
            set_header(&out[0], DESTINATION).is_some(),
            "{method} {path}"
        );
    }
}

/// The request buffer never holds (or reserves) more than the limit, so a
/// body streamed without a length costs at most the limit before its 413.
#[test]
fn the_body_buffer_never_grows_past_the_limit() {
    let max = 10_000;
    let mut h = Harness::new(StreamSettings {
        max_request_body: max,
        ..settings()
    });
    h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
    let chunk = [b' '; 3_000];
    for _ in 0..3 {
        assert!(h.send(msg(body(&chunk, false))).is_empty());
        assert!(
            h.stream.body.capacity() <= max,
            "{}",
            h.stream.body.capacity()
        );
    }
    let out = h.send(msg(body(&chunk, false)));
    assert_eq!(immediate_status(&out[0]).0, 413);
    assert_eq!(h.stream.body.capacity(), 0, "released at the refusal");
}

fn eos_headers() -> Request {
    Request::RequestHeaders(headers(&[(":path", "/v1/models")], true))
}

/// Message orders no gateway sends: each ends the stream with a named
/// protocol error, nothing is answered, the request's in-flight accounting
/// is released at once, and later messages cannot revive the stream.
#[test]
fn protocol_violations_end_the_stream_and_release_the_request() {
    let trailers = || Request::RequestTrailers(HttpTrailers::default());
    let resp_headers = || Request::ResponseHeaders(headers(&[(":status", "200")], false));
    type Case = (
        &'static str,
        Vec<ProcessingRequest>,
        ProcessingRequest,
        ProtocolError,
    );
    let cases: Vec<Case> = vec![
        (
            "body before headers",
            vec![],
            msg(body(BODY, true)),
            ProtocolError::BeforeRequestHeaders("request body"),
        ),
        (
            "trailers first",
            vec![],
            msg(trailers()),
            ProtocolError::BeforeRequestHeaders("request trailers"),
        ),
        (
            "empty message",
            vec![],
            ProcessingRequest::default(),
            ProtocolError::EmptyMessage,
        ),
        (
            "empty message mid-stream",
            vec![msg(Request::RequestHeaders(post("/v1/completions")))],
            ProcessingRequest::default(),
            ProtocolError::EmptyMessage,
        ),
        (
            "repeated headers while collecting the body",
            vec![msg(Request::RequestHeaders(post("/v1/completions")))],
            msg(Request::RequestHeaders(post("/v1/completions"))),
            ProtocolError::RepeatedRequestHeaders,
        ),
        (
            "repeated headers after routing",
            vec![
                msg(Request::RequestHeaders(post("/v1/completions"))),
                msg(body(BODY, true)),
            ],
            msg(Request::RequestHeaders(post("/v1/completions"))),
            ProtocolError::RepeatedRequestHeaders,
        ),
        (
            "body after headers ended the request",
            vec![msg(eos_headers())],
            msg(body(b"late", true)),
            ProtocolError::AfterRequestEnd("request body"),
        ),
        (
            "more body after the body ended",
            vec![
                msg(Request::RequestHeaders(post("/v1/completions"))),
                msg(body(BODY, true)),
            ],
            msg(body(b"more", false)),
            ProtocolError::AfterRequestEnd("request body"),
        ),
        (
            "trailers after the body ended",
            vec![
                msg(Request::RequestHeaders(post("/v1/completions"))),
                msg(body(BODY, true)),
            ],
            msg(trailers()),
            ProtocolError::AfterRequestEnd("request trailers"),
        ),
        (
            "response headers after the response ended",
            vec![
                msg(eos_headers()),
                msg(resp_headers()),
                msg(resp_body(b"{}", true)),
            ],
            msg(resp_headers()),
            ProtocolError::AfterResponseEnd("response headers"),
        ),
        (
            "response body after the response ended",
            vec![
                msg(eos_headers()),
                msg(Request::ResponseHeaders(headers(
                    &[(":status", "200")],
                    true,
                ))),
            ],
            msg(resp_body(b"x", false)),
            ProtocolError::AfterResponseEnd("response body"),
        ),
    ];
    for (name, before, bad, expected) in cases {
        let mut h = Harness::new(settings());
        for m in before {
            h.send(m);
        }
        let err = h.try_send(bad).expect_err(name);
        assert_eq!(err, expected, "{name}");
        assert!(err.to_string().len() > 10, "{name}: {err}");
        assert_eq!(h.in_flight(), 0, "{name}: released at the violation");
        // Whatever follows gets no answer and cannot route anything.
        for m in [
            msg(Request::RequestHeaders(post("/v1/completions"))),
            msg(body(BODY, true)),
            msg(resp_headers()),
            msg(resp_body(b"{}", true)),
            msg(trailers()),
        ] {
            assert!(h.try_send(m).unwrap_or_default().is_empty(), "{name}");
        }
        assert_eq!(h.in_flight(), 0, "{name}");
    }
}

/// Envoy's own local reply (here the 431 for too many request headers)
/// passes through the filter although the request never did: the response
/// is answered as usual and nothing is routed; a request cannot follow it.
#[test]
fn a_response_with_no_request_before_it_is_answered() {
    let mut h = Harness::new(settings());
    let out = h.send(first(
        BodySendMode::FullDuplexStreamed,
        Request::ResponseHeaders(headers(
            &[(":status", "431"), ("content-type", "text/plain")],
            false,
        )),
    ));
    assert_eq!(out.len(), 1);
    assert!(matches!(
        out[0].response,
        Some(Response::ResponseHeaders(_))
    ));
    let out = h.send(msg(resp_body(b"Request Header Fields Too Large", true)));
    assert_eq!(
        streamed(&out[0]),
        (b"Request Header Fields Too Large".to_vec(), true)
    );
    assert_eq!(h.in_flight(), 0);
    assert_eq!(
        h.try_send(msg(Request::RequestHeaders(post("/v1/completions")))),
        Err(ProtocolError::AfterResponseEnd("request headers"))
    );
    assert_eq!(h.in_flight(), 0);
}

/// What the rules above must not catch: Envoy's own re-deliveries and
/// messages racing an ImmediateResponse.
#[test]
fn tolerated_repeats_get_no_answer_and_no_error() {
    // A repeated final response chunk (the request-side #46237 pattern).
    let mut h = Harness::new(settings());
    h.send(msg(eos_headers()));
    h.send(msg(Request::ResponseHeaders(headers(
        &[(":status", "200")],
        false,
    ))));
    assert_eq!(h.send(msg(resp_body(b"{}", true))).len(), 1);
    assert!(h.send(msg(resp_body(b"{}", true))).is_empty());
    // Body chunks and trailers in flight when the picker answered 413.
    let mut h = Harness::new(StreamSettings {
        max_request_body: 4,
        ..settings()
    });
    h.send(msg(Request::RequestHeaders(post("/v1/completions"))));
    assert_eq!(immediate_status(&h.send(msg(body(BODY, false)))[0]).0, 413);
    assert!(h.send(msg(body(b"more", false))).is_empty());
    assert!(
        h.send(msg(Request::RequestTrailers(HttpTrailers::default())))
            .is_empty()
    );
}

const SESSION_CONFIG: &str = "plugins:\n- type: session-affinity-scorer\n- type: queue-scorer\nschedulingProfiles:\n- name: d\n  plugins:\n  - {pluginRef: session-affinity-scorer, weight: 10}\n  - {pluginRef: queue-scorer}\n";

/// Response headers with the gateway's served-endpoint metadata.
fn served_response(served: &str) -> ProcessingRequest {
    let fields = Struct {
        fields: HashMap::from([(
            SERVED.to_owned(),
            Value {
                kind: Some(Kind::StringValue(served.into())),
            },
        )]),
    };
    let mut m = msg(Request::ResponseHeaders(headers(
        &[(":status", "200")],
        false,
    )));
    m.metadata_context = Some(Metadata {
        filter_metadata: HashMap::from([(LB_NAMESPACE.to_owned(), fields)]),
        ..Metadata::default()
    });
    m
}

/// Routes one completion carrying `token` (if any); returns the destination.
fn route_with_token(h: &mut Harness, token: Option<&str>) -> String {
    let mut req = post("/v1/completions");
    if let Some(t) = token {
        req = with_header(req, "x-session-token", t);
    }
    assert!(
        h.send(first(
            BodySendMode::FullDuplexStreamed,
            Request::RequestHeaders(req)
        ))
        .is_empty()
    );
    let out = h.send(msg(body(BODY, true)));
    set_header(&out[0], DESTINATION).unwrap()
}

#[test]
fn the_session_token_names_the_endpoint_that_served_and_brings_the_next_request_back() {
    let mut h = Harness::with_config(settings(), SESSION_CONFIG);
    let dest = route_with_token(&mut h, None);
    let fallback = dest.split(',').nth(1).unwrap().to_owned();
    // The gateway served the fallback: the token names it, not the pick.
    let out = h.send(served_response(&fallback));
    let token = set_header(&out[0], "x-session-token").unwrap();
    let name = h.store.snapshot().get(&fallback).unwrap().name().to_owned();
    assert_eq!(token, base64_of(&name));

    for _ in 0..20 {
        // A new request on a new stream, same picker.
        h.stream = ExtProcStream::new(Arc::clone(&h.stream.director), Arc::new(settings()));
        let dest = route_with_token(&mut h, Some(&token));
        assert!(
            dest.starts_with(&fallback),
            "{dest} should start with {fallback}"
        );
    }
    // Tokens that name nothing (or are not tokens) are ignored.
    for bad in [base64_of("10.0.0.1:80"), "%%%".to_owned(), "x".repeat(600)] {
        let mut other = Harness::with_config(settings(), SESSION_CONFIG);
        assert_eq!(
            route_with_token(&mut other, Some(&bad)).split(',').count(),
            2
        );
    }
}

#[test]
fn no_session_header_without_a_session_plugin() {
    let mut h = Harness::new(settings());
    let dest = route_with_token(&mut h, None);
    let out = h.send(served_response(dest.split(',').next().unwrap()));
    let Some(Response::ResponseHeaders(r)) = &out[0].response else {
        panic!("{out:?}")
    };
    let set = r
        .response
        .as_ref()
        .and_then(|c| c.header_mutation.as_ref())
        .map(|m| m.set_headers.len())
        .unwrap_or(0);
    assert_eq!(set, 0, "{out:?}");
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
