//! A no-op ext_proc server: the protocol's own cost, the floor any endpoint
//! picker pays.
//!
//! It does what every picker must do and nothing else: buffer the request
//! body (the destination can only be chosen once it is complete), name an
//! endpoint (round robin over a fixed list), answer with the destination
//! header, `clear_route_cache` and the `envoy.lb` metadata, send the body back
//! in chunks of at most 62,000 bytes, and pass response messages back as they
//! come. No parsing, no scoring, no metrics.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{
            HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
        },
        extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
        service::ext_proc::v3::{
            BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse,
            ProcessingRequest, ProcessingResponse, StreamedBodyResponse, TrailersResponse,
            body_mutation::Mutation, external_processor_server::ExternalProcessor,
            processing_request::Request, processing_response::Response,
        },
    },
    google::protobuf::{Struct, Value, value::Kind},
};
use futures_util::Stream;
use tonic::{Status, Streaming};

const CHUNK: usize = 62_000;

/// The no-op service. Clones share the round-robin counter.
#[derive(Debug, Clone)]
pub struct NoopExtProc {
    endpoints: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
}

impl NoopExtProc {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints: Arc::new(endpoints),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn pick(&self) -> String {
        let n = self.endpoints.len().max(1);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        self.endpoints.get(i).cloned().unwrap_or_default()
    }
}

#[tonic::async_trait]
impl ExternalProcessor for NoopExtProc {
    type ProcessStream = NoopStream;

    async fn process(
        &self,
        request: tonic::Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<NoopStream>, Status> {
        Ok(tonic::Response::new(NoopStream {
            inbound: request.into_inner(),
            picker: self.clone(),
            out: std::collections::VecDeque::new(),
            body: Vec::new(),
            full_duplex: true,
            routed: false,
            ended: false,
        }))
    }
}

pub struct NoopStream {
    inbound: Streaming<ProcessingRequest>,
    picker: NoopExtProc,
    out: std::collections::VecDeque<ProcessingResponse>,
    body: Vec<u8>,
    full_duplex: bool,
    routed: bool,
    ended: bool,
}

fn resp(r: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..ProcessingResponse::default()
    }
}

fn streamed(request: bool, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
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
    resp(if request {
        Response::RequestBody(r)
    } else {
        Response::ResponseBody(r)
    })
}

impl NoopStream {
    fn destination(&self) -> (CommonResponse, Struct) {
        let dest = self.picker.pick();
        let common = CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "x-gateway-destination-endpoint".into(),
                        value: String::new(),
                        raw_value: dest.clone().into_bytes(),
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..HeaderValueOption::default()
                }],
                remove_headers: Vec::new(),
            }),
            clear_route_cache: true,
            ..CommonResponse::default()
        };
        let inner = Struct {
            fields: HashMap::from([(
                "x-gateway-destination-endpoint".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(dest)),
                },
            )]),
        };
        let md = Struct {
            fields: HashMap::from([(
                "envoy.lb".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(inner)),
                },
            )]),
        };
        (common, md)
    }

    fn on_message(&mut self, msg: ProcessingRequest) {
        if let Some(pc) = msg.protocol_config {
            self.full_duplex = pc.request_body_mode == BodySendMode::FullDuplexStreamed as i32;
        }
        match msg.request {
            Some(Request::RequestHeaders(h)) if h.end_of_stream || !self.full_duplex => {
                let (common, md) = self.destination();
                let mut r = resp(Response::RequestHeaders(HeadersResponse {
                    response: Some(common),
                }));
                r.dynamic_metadata = Some(md);
                self.routed = h.end_of_stream;
                self.out.push_back(r);
            }
            Some(Request::RequestHeaders(_)) => {}
            Some(Request::RequestBody(b)) => {
                if self.routed {
                    return;
                }
                if self.body.is_empty() {
                    self.body = b.body;
                } else {
                    self.body.extend_from_slice(&b.body);
                }
                if !b.end_of_stream {
                    return;
                }
                self.routed = true;
                let body = std::mem::take(&mut self.body);
                if self.full_duplex {
                    let (common, md) = self.destination();
                    let mut r = resp(Response::RequestHeaders(HeadersResponse {
                        response: Some(common),
                    }));
                    r.dynamic_metadata = Some(md);
                    self.out.push_back(r);
                    let n = body.len().div_ceil(CHUNK).max(1);
                    if body.len() <= CHUNK {
                        self.out.push_back(streamed(true, body, true));
                    } else {
                        for (i, c) in body.chunks(CHUNK).enumerate() {
                            self.out.push_back(streamed(true, c.to_vec(), i + 1 == n));
                        }
                    }
                } else {
                    self.out
                        .push_back(resp(Response::RequestBody(BodyResponse { response: None })));
                }
            }
            Some(Request::RequestTrailers(_)) => {
                self.out
                    .push_back(resp(Response::RequestTrailers(TrailersResponse::default())));
            }
            Some(Request::ResponseHeaders(_)) => {
                self.out
                    .push_back(resp(Response::ResponseHeaders(HeadersResponse::default())));
            }
            Some(Request::ResponseBody(b)) => {
                if self.full_duplex {
                    self.out.push_back(streamed(false, b.body, b.end_of_stream));
                } else {
                    self.out
                        .push_back(resp(Response::ResponseBody(BodyResponse::default())));
                }
            }
            Some(Request::ResponseTrailers(_)) => {
                self.out.push_back(resp(
                    Response::ResponseTrailers(TrailersResponse::default()),
                ));
            }
            None => {}
        }
    }
}

impl Stream for NoopStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(r) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => this.on_message(msg),
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
