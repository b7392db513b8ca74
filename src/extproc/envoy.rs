//! Building and reading Envoy ext_proc messages: header mutations, the
//! destination's dynamic metadata, body chunks and immediate responses.
//! Only protocol shapes live here; what to put in them is decided elsewhere.

use std::collections::HashMap;

use envoy_types::pb::{
    envoy::{
        config::core::v3::{
            HeaderMap, HeaderValue, HeaderValueOption, Metadata,
            header_value_option::HeaderAppendAction,
        },
        extensions::filters::http::ext_proc::v3::{
            ProcessingMode,
            processing_mode::{BodySendMode, HeaderSendMode},
        },
        service::ext_proc::v3::{
            BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse,
            HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse,
            StreamedBodyResponse, TrailersResponse, body_mutation::Mutation,
            processing_request::Request, processing_response::Response,
        },
        r#type::v3::HttpStatus,
    },
    google::protobuf::{Struct, Value, value::Kind},
};

/// Request header carrying the destination list (and its metadata key).
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// Metadata key under `envoy.lb` where the gateway reports the served endpoint.
pub const SERVED: &str = "x-gateway-destination-endpoint-served";
/// Metadata key under `envoy.lb.subset_hint` restricting the candidates.
pub const SUBSET: &str = "x-gateway-destination-endpoint-subset";
/// Dynamic metadata namespace of the destination and served endpoint.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Dynamic metadata namespace of the subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Response header echoing the served endpoint for GIE conformance tests.
pub const CONFORMANCE_SERVED: &str = "x-conformance-test-served-endpoint";

/// Largest body chunk sent back: some proxies cap streamed chunks at 64 KiB.
pub const MAX_CHUNK: usize = 62_000;

/// Names (lower-cased, each once) of the request's headers that a client
/// could use to steer routing and that must be removed before forwarding:
/// every `x-gateway-destination-endpoint*` header except the destination
/// itself (which the answer overwrites), in any case and whatever the
/// suffix (`-served` and `-subset` today, whatever gateways and
/// load-balancing policies read tomorrow); plus the conformance echo header.
pub fn client_routing_headers(map: Option<&HeaderMap>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let Some(map) = map else {
        return out;
    };
    for h in &map.headers {
        let key = h.key.as_str();
        let steering = key
            .get(..DESTINATION.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(DESTINATION))
            && key.len() > DESTINATION.len();
        if (steering || key.eq_ignore_ascii_case(CONFORMANCE_SERVED))
            && !out.iter().any(|o| o.eq_ignore_ascii_case(key))
        {
            out.push(key.to_ascii_lowercase());
        }
    }
    out
}

/// Value of a header in an Envoy header map (raw bytes take precedence, as
/// Envoy fills `raw_value` since 1.27).
pub fn header<'a>(map: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    let h = map?
        .headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))?;
    if h.raw_value.is_empty() {
        Some(h.value.as_str())
    } else {
        std::str::from_utf8(&h.raw_value).ok()
    }
}

pub fn has_header(map: Option<&HeaderMap>, name: &str) -> bool {
    map.is_some_and(|m| m.headers.iter().any(|h| h.key.eq_ignore_ascii_case(name)))
}

/// A header set that overwrites any existing value.
pub fn set_header(key: &str, value: impl Into<Vec<u8>>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.into(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

/// `{namespace: {key: value}}` as dynamic metadata.
pub fn metadata(namespace: &str, key: &str, value: &str) -> Struct {
    let inner = Struct {
        fields: HashMap::from([(key.to_owned(), string_value(value))]),
    };
    Struct {
        fields: HashMap::from([(
            namespace.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// A string field of the request's filter metadata.
fn metadata_value<'a>(md: Option<&'a Metadata>, namespace: &str, key: &str) -> Option<&'a Value> {
    md?.filter_metadata.get(namespace)?.fields.get(key)
}

/// The served endpoint the gateway reports in the response phase.
pub fn served_endpoint(md: Option<&Metadata>) -> Option<&str> {
    match &metadata_value(md, LB_NAMESPACE, SERVED)?.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    }
}

/// A string attribute Envoy attached to the message (requested with
/// `request_attributes` / `response_attributes`), under any filter name.
pub fn attribute<'a>(attrs: &'a HashMap<String, Struct>, key: &str) -> Option<&'a str> {
    attrs.values().find_map(|s| match &s.fields.get(key)?.kind {
        Some(Kind::StringValue(v)) if !v.is_empty() => Some(v.as_str()),
        _ => None,
    })
}

/// The subset hint, given as a list of strings or one comma-separated string.
/// `Some(empty)` means the gateway sent a hint with no endpoint in it.
pub fn subset_hint(md: Option<&Metadata>) -> Option<Vec<String>> {
    let v = metadata_value(md, SUBSET_NAMESPACE, SUBSET)?;
    let mut out = Vec::new();
    let mut push_csv = |s: &str| {
        out.extend(
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
        );
    };
    match &v.kind {
        Some(Kind::StringValue(s)) => push_csv(s),
        Some(Kind::ListValue(list)) => {
            for item in &list.values {
                if let Some(Kind::StringValue(s)) = &item.kind {
                    push_csv(s);
                }
            }
        }
        _ => {}
    }
    Some(out)
}

fn common(
    header_mutation: Option<HeaderMutation>,
    body_mutation: Option<BodyMutation>,
    clear_route_cache: bool,
) -> Option<CommonResponse> {
    if header_mutation.is_none() && body_mutation.is_none() && !clear_route_cache {
        return None; // CONTINUE with nothing to change
    }
    Some(CommonResponse {
        header_mutation,
        body_mutation,
        clear_route_cache,
        ..CommonResponse::default()
    })
}

pub fn header_mutation(set: Vec<HeaderValueOption>, remove: Vec<String>) -> Option<HeaderMutation> {
    if set.is_empty() && remove.is_empty() {
        None
    } else {
        Some(HeaderMutation {
            set_headers: set,
            remove_headers: remove,
        })
    }
}

/// Answer to request or response headers.
pub fn headers_response(
    request: bool,
    mutation: Option<HeaderMutation>,
    clear_route_cache: bool,
) -> Response {
    let r = HeadersResponse {
        response: common(mutation, None, clear_route_cache),
    };
    if request {
        Response::RequestHeaders(r)
    } else {
        Response::ResponseHeaders(r)
    }
}

/// Answer to a body message; `body` replaces the whole (buffered) body.
pub fn body_response(
    request: bool,
    mutation: Option<HeaderMutation>,
    body: Option<Vec<u8>>,
    clear_route_cache: bool,
) -> Response {
    let body_mutation = body.map(|b| BodyMutation {
        mutation: Some(Mutation::Body(b)),
    });
    let r = BodyResponse {
        response: common(mutation, body_mutation, clear_route_cache),
    };
    if request {
        Response::RequestBody(r)
    } else {
        Response::ResponseBody(r)
    }
}

/// One streamed body chunk (FULL_DUPLEX_STREAMED mode).
pub fn streamed_chunk(request: bool, body: Vec<u8>, end_of_stream: bool) -> Response {
    let r = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..StreamedBodyResponse::default()
                })),
            }),
            ..CommonResponse::default()
        }),
    };
    if request {
        Response::RequestBody(r)
    } else {
        Response::ResponseBody(r)
    }
}

/// Pushes `body` as streamed chunks of at most [`MAX_CHUNK`] bytes; the last
/// one carries `end_of_stream`. An empty body still sends one (empty) chunk
/// so the end of stream is signalled. The first chunk keeps `body`'s own
/// allocation, so only what follows it is copied (nothing when one chunk
/// suffices).
pub fn push_streamed(
    out: &mut Vec<ProcessingResponse>,
    request: bool,
    mut body: Vec<u8>,
    end_of_stream: bool,
) {
    if body.len() <= MAX_CHUNK {
        out.push(response(streamed_chunk(request, body, end_of_stream)));
        return;
    }
    let rest: Vec<Vec<u8>> = body[MAX_CHUNK..]
        .chunks(MAX_CHUNK)
        .map(<[u8]>::to_vec)
        .collect();
    body.truncate(MAX_CHUNK);
    out.push(response(streamed_chunk(request, body, false)));
    let n = rest.len();
    for (i, chunk) in rest.into_iter().enumerate() {
        out.push(response(streamed_chunk(
            request,
            chunk,
            end_of_stream && i + 1 == n,
        )));
    }
}

pub fn trailers_response(request: bool) -> Response {
    let r = TrailersResponse::default();
    if request {
        Response::RequestTrailers(r)
    } else {
        Response::ResponseTrailers(r)
    }
}

pub fn response(r: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..ProcessingResponse::default()
    }
}

/// Asks the gateway to wait up to `timeout` for the answer to the message it
/// is waiting on (Envoy honours the first such answer per message, and only
/// up to the filter's `max_message_timeout`).
pub fn override_message_timeout(timeout: std::time::Duration) -> ProcessingResponse {
    ProcessingResponse {
        override_message_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(timeout.subsec_nanos()).unwrap_or(0),
        }),
        ..ProcessingResponse::default()
    }
}

/// An error answered by the gateway itself, with an OpenAI-style JSON body.
pub fn immediate_error(
    status: u16,
    message: &str,
    error_type: &str,
    code: &str,
) -> ProcessingResponse {
    let body = serde_json::json!({
        "error": { "message": message, "type": error_type, "code": code }
    });
    let mut headers = vec![set_header("content-type", "application/json")];
    if status == 429 || status == 503 {
        headers.push(set_header("retry-after", "1"));
    }
    response(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(status),
        }),
        headers: Some(HeaderMutation {
            set_headers: headers,
            remove_headers: Vec::new(),
        }),
        body: body.to_string().into_bytes(),
        details: format!("epp_{code}"),
        ..ImmediateResponse::default()
    }))
}

/// Mode override asking Envoy to stream the response body (and trailers,
/// which that mode requires) to the picker.
pub fn stream_response_body() -> ProcessingMode {
    ProcessingMode {
        response_header_mode: HeaderSendMode::Send as i32,
        response_body_mode: BodySendMode::FullDuplexStreamed as i32,
        response_trailer_mode: HeaderSendMode::Send as i32,
        ..ProcessingMode::default()
    }
}

/// Request or response headers as Envoy sends them (values in `raw_value`).
/// The picker never builds these; its tests, the fuzz target and direct
/// ext_proc clients do, and one builder keeps them all in Envoy's shape.
pub fn gateway_headers(pairs: &[(&str, &str)], end_of_stream: bool) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: (*k).into(),
                    value: String::new(),
                    raw_value: v.as_bytes().to_vec(),
                })
                .collect(),
        }),
        end_of_stream,
        ..HttpHeaders::default()
    }
}

/// A gateway message with nothing but its payload set.
pub fn gateway_message(request: Request) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        ..ProcessingRequest::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    fn md(ns: &str, key: &str, v: Value) -> Metadata {
        Metadata {
            filter_metadata: HashMap::from([(
                ns.to_owned(),
                Struct {
                    fields: HashMap::from([(key.to_owned(), v)]),
                },
            )]),
            ..Metadata::default()
        }
    }

    #[test]
    fn subset_hint_as_list_or_csv() {
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![string_value("1.1.1.1:80"), string_value("2.2.2.2:80")],
            })),
        };
        assert_eq!(
            subset_hint(Some(&md(SUBSET_NAMESPACE, SUBSET, list))),
            Some(vec!["1.1.1.1:80".into(), "2.2.2.2:80".into()])
        );
        let csv = string_value(" 1.1.1.1:80, 2.2.2.2:80 ");
        assert_eq!(
            subset_hint(Some(&md(SUBSET_NAMESPACE, SUBSET, csv)))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            subset_hint(Some(&md(SUBSET_NAMESPACE, SUBSET, string_value("")))),
            Some(vec![])
        );
        assert_eq!(subset_hint(None), None);
    }

    #[test]
    fn attributes_are_read_under_any_filter_name() {
        let attrs = HashMap::from([(
            "envoy.filters.http.ext_proc".to_owned(),
            Struct {
                fields: HashMap::from([(
                    "upstream.address".to_owned(),
                    string_value("10.0.0.2:80"),
                )]),
            },
        )]);
        assert_eq!(attribute(&attrs, "upstream.address"), Some("10.0.0.2:80"));
        assert_eq!(attribute(&attrs, "other"), None);
    }

    #[test]
    fn served_endpoint_is_read() {
        let m = md(LB_NAMESPACE, SERVED, string_value("10.0.0.1:8000"));
        assert_eq!(served_endpoint(Some(&m)), Some("10.0.0.1:8000"));
    }

    #[test]
    fn chunks_are_bounded_and_only_the_last_ends_the_stream() {
        let body: Vec<u8> = (0..MAX_CHUNK * 2 + 5).map(|i| (i % 251) as u8).collect();
        for end_of_stream in [true, false] {
            let mut out = Vec::new();
            push_streamed(&mut out, true, body.clone(), end_of_stream);
            let chunks = streamed_chunks(&out);
            let sizes: Vec<(usize, bool)> = chunks.iter().map(|(b, e)| (b.len(), *e)).collect();
            assert_eq!(
                sizes,
                vec![(MAX_CHUNK, false), (MAX_CHUNK, false), (5, end_of_stream)]
            );
            let joined: Vec<u8> = chunks.iter().flat_map(|(b, _)| b.iter().copied()).collect();
            assert_eq!(joined, body, "chunks in order, nothing lost");
        }
    }

    /// Body and end-of-stream flag of each streamed request-body response.
    fn streamed_chunks(out: &[ProcessingResponse]) -> Vec<(Vec<u8>, bool)> {
        out.iter()
            .map(|r| match &r.response {
                Some(Response::RequestBody(b)) => match &b
                    .response
                    .as_ref()
                    .unwrap()
                    .body_mutation
                    .as_ref()
                    .unwrap()
                    .mutation
                {
                    Some(Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
                    _ => panic!("not streamed"),
                },
                _ => panic!("not a request body response"),
            })
            .collect()
    }

    #[test]
    fn immediate_error_is_openai_shaped() {
        let r = immediate_error(400, "bad \"json\"", "invalid_request_error", "invalid_json");
        let Some(Response::ImmediateResponse(i)) = r.response else {
            panic!()
        };
        assert_eq!(i.status.unwrap().code, 400);
        let v: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(v["error"]["message"], "bad \"json\"");
        assert_eq!(v["error"]["code"], "invalid_json");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn header_prefers_raw_value() {
        let map = HeaderMap {
            headers: vec![HeaderValue {
                key: ":path".into(),
                value: "old".into(),
                raw_value: b"/v1/completions".to_vec(),
            }],
        };
        assert_eq!(header(Some(&map), ":path"), Some("/v1/completions"));
        assert_eq!(header(Some(&map), "x"), None);
    }

    #[test]
    fn every_destination_header_variant_is_a_routing_header() {
        let h = |key: &str| HeaderValue {
            key: key.into(),
            value: String::new(),
            raw_value: b"6.6.6.6:80".to_vec(),
        };
        let map = HeaderMap {
            headers: vec![
                h(":path"),
                h(DESTINATION),
                h("X-Gateway-Destination-Endpoint-Fallback"),
                h("x-gateway-destination-endpoint-fallback"),
                h("X-GATEWAY-DESTINATION-ENDPOINT-SERVED"),
                h("x-gateway-destination-endpoint-subset"),
                h("x-gateway-destination-endpointx"),
                h("x-conformance-test-served-endpoint"),
                h("x-gateway-destination"),
                h("content-type"),
            ],
        };
        assert_eq!(
            client_routing_headers(Some(&map)),
            [
                "x-gateway-destination-endpoint-fallback",
                "x-gateway-destination-endpoint-served",
                "x-gateway-destination-endpoint-subset",
                "x-gateway-destination-endpointx",
                "x-conformance-test-served-endpoint",
            ]
        );
        assert!(client_routing_headers(None).is_empty());
    }
}
