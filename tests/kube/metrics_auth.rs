//! /metrics behind `--metrics-endpoint-auth`, checked with the Kubernetes
//! API (TokenReview, then SubjectAccessReview for `get /metrics`) of the
//! fake API server: the real metrics HTTP server on loopback, scraped with
//! and without tokens. Real time here (not the paused clock): the server
//! and its client talk over real sockets.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use epp::{
    listener::Listener,
    telemetry::{metrics_auth::MetricsAuth, register_build_info, serve_metrics},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

use crate::fake::{self, FakeApi};

const READER: &str = "system:serviceaccount:ns:metrics-reader";
const OTHER: &str = "system:serviceaccount:ns:someone";

/// The metrics server with Kubernetes auth over the fake API, its address,
/// the fake, and the sender that stops it when dropped.
async fn start() -> (SocketAddr, FakeApi, watch::Sender<bool>) {
    let (client, fake, _stats) = fake::start();
    fake.add_token("reader-token", READER);
    fake.add_token("other-token", OTHER);
    fake.allow_metrics(READER);
    let registry = prometheus::Registry::new();
    register_build_info(&registry).unwrap();
    let listener = Listener::bind(SocketAddr::from(([127, 0, 0, 1], 0)), "metrics")
        .await
        .unwrap();
    let addr = listener.local_addr();
    let (stop_tx, stop) = watch::channel(false);
    let auth = MetricsAuth::kubernetes(client).with_review_timeout(Duration::from_secs(2));
    tokio::spawn(serve_metrics(
        listener,
        registry,
        Some(Arc::new(auth)),
        stop,
    ));
    (addr, fake, stop_tx)
}

/// The status of `GET path` with `Authorization: Bearer token`.
async fn scrape(addr: SocketAddr, path: &str, token: Option<&str>) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text.split(' ').nth(1).unwrap_or("0").parse().unwrap();
    if status == 200 && path == "/metrics" {
        assert!(text.contains("inference_extension_info"), "{text}");
    }
    status
}

#[tokio::test]
async fn a_token_allowed_to_get_metrics_is_let_in_and_others_are_not() {
    let (addr, _fake, _stop) = start().await;
    assert_eq!(scrape(addr, "/metrics", None).await, 401, "no token");
    assert_eq!(
        scrape(addr, "/metrics", Some("forged")).await,
        401,
        "bad token"
    );
    assert_eq!(
        scrape(addr, "/metrics", Some("other-token")).await,
        403,
        "valid token without the permission"
    );
    assert_eq!(scrape(addr, "/metrics", Some("reader-token")).await, 200);
    assert_eq!(
        scrape(addr, "/healthz", None).await,
        200,
        "/healthz is open"
    );
}

#[tokio::test]
async fn verdicts_are_cached_so_scrapes_do_not_each_cost_two_api_calls() {
    let (addr, fake, _stop) = start().await;
    for _ in 0..5 {
        assert_eq!(scrape(addr, "/metrics", Some("reader-token")).await, 200);
        assert_eq!(scrape(addr, "/metrics", Some("other-token")).await, 403);
        assert_eq!(scrape(addr, "/metrics", Some("forged")).await, 401);
    }
    assert_eq!(fake.requests("tokenreviews").len(), 3, "one per token");
    assert_eq!(
        fake.requests("subjectaccessreviews").len(),
        2,
        "one per authenticated token"
    );
}

#[tokio::test]
async fn an_api_server_that_cannot_be_asked_fails_closed_and_is_not_cached() {
    let (addr, fake, _stop) = start().await;
    fake.set_unreachable(true);
    assert_eq!(scrape(addr, "/metrics", Some("reader-token")).await, 503);
    assert_eq!(scrape(addr, "/metrics", Some("reader-token")).await, 503);
    assert!(fake.refused() >= 2, "each scrape asked again");
    fake.set_unreachable(false);
    assert_eq!(
        scrape(addr, "/metrics", Some("reader-token")).await,
        200,
        "a failure is not remembered"
    );

    // The API server answers, but with an error: closed too.
    fake.fail_next("tokenreviews", 500, 1);
    assert_eq!(scrape(addr, "/metrics", Some("other-token")).await, 503);
    fake.fail_next("subjectaccessreviews", 500, 1);
    assert_eq!(scrape(addr, "/metrics", Some("other-token")).await, 503);
    assert_eq!(scrape(addr, "/metrics", Some("other-token")).await, 403);
    // No token needs no API call: still 401.
    fake.set_unreachable(true);
    assert_eq!(scrape(addr, "/metrics", None).await, 401);
}
