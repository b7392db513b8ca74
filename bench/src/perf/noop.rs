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
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use envoy_types::pb::envoy::{
    extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
    service::ext_proc::v3::{
        BodyResponse, ProcessingRequest, ProcessingResponse,
        external_processor_server::ExternalProcessor, processing_request::Request,
        processing_response::Response,
    },
};
use epp::extproc::{
    DESTINATION, LB_NAMESPACE,
    envoy::{
        header_mutation, headers_response, metadata, push_streamed, response, set_header,
        streamed_chunk, trailers_response,
    },
};
use futures_util::Stream;
use tonic::{Status, Streaming};

use crate::stack::{Binaries, Proc, StackError};

/// Starts the `noop-extproc` binary beside `bin.epp` on an ephemeral port,
/// routing round robin over `endpoints`; returns it and its address.
pub async fn spawn(
    bin: &Binaries,
    endpoints: &[std::net::SocketAddr],
    dir: &std::path::Path,
) -> Result<(Proc, std::net::SocketAddr), StackError> {
    let mut cmd = std::process::Command::new(bin.epp.with_file_name("noop-extproc"));
    cmd.args(["--port", "0", "--endpoints"]).arg(
        endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    let mut p = Proc::spawn(cmd, "noop-extproc", dir.join("noop.log"))?;
    let line = p.wait_for_line("listening on").await?;
    let addr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| StackError::Sim(format!("noop-extproc said {line:?}")))?;
    Ok((p, addr))
}

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
            out: VecDeque::new(),
            scratch: Vec::new(),
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
    out: VecDeque<ProcessingResponse>,
    /// Reused buffer for the chunks `push_streamed` produces.
    scratch: Vec<ProcessingResponse>,
    body: Vec<u8>,
    full_duplex: bool,
    routed: bool,
    ended: bool,
}

impl NoopStream {
    /// The headers answer naming the next endpoint: destination header,
    /// `clear_route_cache` and the `envoy.lb` metadata.
    fn routed(&self) -> ProcessingResponse {
        let dest = self.picker.pick();
        let mutation = header_mutation(vec![set_header(DESTINATION, dest.as_bytes())], Vec::new());
        let mut r = response(headers_response(true, mutation, true));
        r.dynamic_metadata = Some(metadata(LB_NAMESPACE, DESTINATION, &dest));
        r
    }

    fn on_message(&mut self, msg: ProcessingRequest) {
        if let Some(pc) = msg.protocol_config {
            self.full_duplex = pc.request_body_mode == BodySendMode::FullDuplexStreamed as i32;
        }
        match msg.request {
            Some(Request::RequestHeaders(h)) if h.end_of_stream || !self.full_duplex => {
                self.routed = h.end_of_stream;
                let r = self.routed();
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
                    let r = self.routed();
                    self.out.push_back(r);
                    push_streamed(&mut self.scratch, true, body, true);
                    self.out.extend(self.scratch.drain(..));
                } else {
                    self.out
                        .push_back(response(Response::RequestBody(BodyResponse {
                            response: None,
                        })));
                }
            }
            Some(Request::RequestTrailers(_)) => {
                self.out.push_back(response(trailers_response(true)));
            }
            Some(Request::ResponseHeaders(_)) => {
                self.out
                    .push_back(response(headers_response(false, None, false)));
            }
            Some(Request::ResponseBody(b)) => {
                if self.full_duplex {
                    self.out
                        .push_back(response(streamed_chunk(false, b.body, b.end_of_stream)));
                } else {
                    self.out
                        .push_back(response(Response::ResponseBody(BodyResponse::default())));
                }
            }
            Some(Request::ResponseTrailers(_)) => {
                self.out.push_back(response(trailers_response(false)));
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

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProtocolConfiguration, body_mutation::Mutation,
        external_processor_client::ExternalProcessorClient,
        external_processor_server::ExternalProcessorServer,
    };

    use super::*;

    /// Over real gRPC on loopback: a full-duplex request is answered with
    /// the destination (header and `envoy.lb` metadata) once its body is
    /// complete, then the body comes back in chunks of at most 62,000 bytes,
    /// the last one ending the stream; endpoints rotate.
    #[tokio::test]
    async fn routes_round_robin_and_echoes_the_body_in_chunks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures_util::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        let server = NoopExtProc::new(vec!["10.0.0.1:80".into(), "10.0.0.2:80".into()]);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ExternalProcessorServer::new(server))
                .serve_with_incoming(incoming),
        );
        let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let body: Vec<u8> = (0..130_000u32).map(|i| (i % 251) as u8).collect();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let messages = vec![
                ProcessingRequest {
                    request: Some(Request::RequestHeaders(HttpHeaders::default())),
                    protocol_config: Some(ProtocolConfiguration {
                        request_body_mode: BodySendMode::FullDuplexStreamed as i32,
                        ..ProtocolConfiguration::default()
                    }),
                    ..ProcessingRequest::default()
                },
                ProcessingRequest {
                    request: Some(Request::RequestBody(HttpBody {
                        body: body.clone(),
                        end_of_stream: true,
                        ..HttpBody::default()
                    })),
                    ..ProcessingRequest::default()
                },
            ];
            let mut answers = client
                .process(futures_util::stream::iter(messages))
                .await
                .unwrap()
                .into_inner();
            let first = answers.message().await.unwrap().unwrap();
            let Some(Response::RequestHeaders(h)) = &first.response else {
                panic!("first answer is not the headers answer: {first:?}");
            };
            let common = h.response.as_ref().unwrap();
            assert!(common.clear_route_cache);
            let set = &common.header_mutation.as_ref().unwrap().set_headers[0];
            let header = set.header.as_ref().unwrap();
            assert_eq!(header.key, DESTINATION);
            let dest = String::from_utf8(header.raw_value.clone()).unwrap();
            assert!(
                first
                    .dynamic_metadata
                    .unwrap()
                    .fields
                    .contains_key(LB_NAMESPACE)
            );
            seen.push(dest);
            let mut echoed = Vec::new();
            let mut chunks = 0;
            while let Some(m) = answers.message().await.unwrap() {
                let Some(Response::RequestBody(b)) = m.response else {
                    panic!("not a body chunk");
                };
                let Some(Mutation::StreamedResponse(s)) = b
                    .response
                    .and_then(|c| c.body_mutation)
                    .and_then(|m| m.mutation)
                else {
                    panic!("not a streamed chunk");
                };
                assert!(s.body.len() <= 62_000);
                echoed.extend_from_slice(&s.body);
                chunks += 1;
                if s.end_of_stream {
                    break;
                }
            }
            assert_eq!(chunks, 3);
            assert_eq!(echoed, body);
        }
        assert_eq!(seen, ["10.0.0.1:80", "10.0.0.2:80"]);
    }
}
