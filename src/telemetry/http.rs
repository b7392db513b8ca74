//! The HTTP server for Prometheus `/metrics` (port 9090 by default).
//! `/metrics` is gated by [`MetricsAuth`] when one is given
//! (`--metrics-endpoint-auth`, see `metrics_auth`); `/healthz` is always
//! open (it says nothing but "ok").

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::Registry;
use tokio::{net::TcpStream, sync::watch};

use super::metrics_auth::{MetricsAuth, Verdict};

/// Serves `/metrics` on the connections `incoming` yields until `shutdown`
/// turns true. Accepting is the caller's (`listener::Listener`, which
/// handles accept failures the same way for every server).
pub async fn serve_metrics<S>(
    mut incoming: S,
    metrics: Registry,
    auth: Option<Arc<MetricsAuth>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Stream<Item = Result<TcpStream, std::io::Error>> + Unpin,
{
    loop {
        let stream = tokio::select! {
            s = incoming.next() => match s {
                Some(Ok(s)) => s,
                Some(Err(_)) => continue,
                None => return,
            },
            _ = crate::shutdown::requested(&mut shutdown) => return,
        };
        let metrics = metrics.clone();
        let auth = auth.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                let auth = auth.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics, auth.as_deref()).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    req: &Request<Incoming>,
    metrics: &Registry,
    auth: Option<&MetricsAuth>,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let verdict = match auth {
                Some(auth) => {
                    let header = req
                        .headers()
                        .get(header::AUTHORIZATION)
                        .map(|v| v.as_bytes());
                    auth.check(header).await
                }
                None => Verdict::Allowed,
            };
            match verdict {
                Verdict::Allowed => (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    Bytes::from(super::render(metrics)),
                ),
                Verdict::Unauthenticated => (
                    verdict.http_status(),
                    "text/plain",
                    Bytes::from_static(b"Unauthorized: send a bearer token\n"),
                ),
                Verdict::Forbidden => (
                    verdict.http_status(),
                    "text/plain",
                    Bytes::from_static(b"Forbidden: the token may not get /metrics\n"),
                ),
                Verdict::Unavailable => (
                    verdict.http_status(),
                    "text/plain",
                    Bytes::from_static(b"the token cannot be checked now\n"),
                ),
            }
        }
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found; try /metrics\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}
