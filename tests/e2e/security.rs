//! Security promises, tested as an attacker would probe them: through a real
//! Envoy in front of the real picker, or straight at the picker's ports.
//!
//! - a client cannot choose its destination, whatever routing header it
//!   forges (any suffix, any case, repeated);
//! - a subset hint naming addresses outside the pool never yields them;
//! - bad requests do not grow the log at the default level, and debug lines
//!   do not echo unbounded client text;
//! - credentials and prompts never reach the log;
//! - a replaced certificate is served without a restart.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, ring::default_provider},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    Stack,
    backend::Backend,
    envoy::{Envoy, EnvoyOptions},
    epp::{Epp, endpoints_yaml},
    eventually, http,
};

/// Every spelling of a routing header a client might forge. The override_host
/// policy of the gateway reads `x-gateway-destination-endpoint`; the others
/// are read by other gateways, the conformance suite, or a future policy.
fn forged_headers(victim: &str) -> String {
    [
        "X-Gateway-Destination-Endpoint",
        "x-gateway-destination-endpoint",
        "X-GATEWAY-DESTINATION-ENDPOINT-FALLBACK",
        "x-gateway-destination-endpoint-served",
        "X-Gateway-Destination-Endpoint-Subset",
        "x-gateway-destination-endpoint-served",
        "x-gateway-destination-endpoint-anything-else",
        "X-Conformance-Test-Served-Endpoint",
    ]
    .iter()
    .map(|name| format!("{name}: {victim}\r\n"))
    .collect()
}

/// An HTTP/1.1 request written byte for byte (so header case and repeats
/// reach Envoy exactly as sent); returns the status and the response headers.
async fn raw_request(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, Vec<(String, String)>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = head.as_bytes().to_vec();
    request.extend_from_slice(body);
    stream.write_all(&request).await.expect("write request");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .expect("response within 20 s")
        .expect("read response");
    let text = String::from_utf8_lossy(&response);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_destination_header_is_stripped_or_overwritten() {
    for body_mode in [
        crate::common::envoy::BodyMode::FullDuplex,
        crate::common::envoy::BodyMode::Buffered,
    ] {
        let stack = Stack::start_with(2, &[], |o| o.body_mode = body_mode).await;
        // b0 is busy, so the picker always chooses b1: a request reaching b0
        // went where the client said.
        stack.backend("b0").set_load(20, 0.5);
        let victim = stack.backend("b0").host_port();
        let chosen = stack.backend("b1").host_port();
        let metrics = stack.epp.metrics;
        eventually("b0 queue scraped", Duration::from_secs(10), || async move {
            http::get(metrics, "/metrics").await.is_ok_and(|r| {
                r.text()
                    .contains("model_server_pod=\"backend-0\",name=\"default\"} 20")
            })
        })
        .await;
        let listen = stack.envoy.listen;
        let body = br#"{"model":"m","prompt":"route me where I say"}"#;
        let post = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            forged_headers(&victim)
        );
        let get = format!(
            "GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n{}\r\n",
            forged_headers(&victim)
        );
        for (what, head, body) in [("POST", &post, &body[..]), ("GET", &get, &b""[..])] {
            for i in 0..4 {
                let (status, headers) = raw_request(listen, head, body).await;
                let case = format!("{body_mode:?} {what} #{i}");
                assert_eq!(status, 200, "{case}");
                let backend = headers
                    .iter()
                    .find(|(k, _)| k == "x-backend")
                    .map(|(_, v)| v.as_str());
                assert_eq!(
                    backend,
                    Some("b1"),
                    "{case}: the client picked the endpoint"
                );
                assert!(
                    !headers
                        .iter()
                        .any(|(k, v)| k == "x-conformance-test-served-endpoint" && *v == victim),
                    "{case}: forged echo header came back"
                );
                let seen = stack.backend("b1").state.last_headers.lock().clone();
                let routing: Vec<&(String, String)> = seen
                    .iter()
                    .filter(|(k, _)| {
                        let k = k.to_ascii_lowercase();
                        k.starts_with("x-gateway-destination-endpoint")
                            || k == "x-conformance-test-served-endpoint"
                    })
                    .collect();
                assert_eq!(
                    routing.len(),
                    1,
                    "{case}: only the picker's destination header reaches the model server: {routing:?}"
                );
                assert_eq!(routing[0].0, "x-gateway-destination-endpoint", "{case}");
                assert!(
                    routing[0].1.starts_with(&chosen),
                    "{case}: picker's choice first: {}",
                    routing[0].1
                );
                assert_eq!(
                    routing[0].1,
                    format!("{chosen},{victim}"),
                    "{case}: the value is the picker's whole list, not the client's"
                );
            }
        }
        assert_eq!(stack.backend("b0").requests(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_hint_naming_foreign_addresses_never_yields_them() {
    // A live model server that Envoy's cluster knows but the picker's pool
    // does not: if the picker ever returned it, Envoy would send traffic to it.
    let outsider = Backend::start("outsider").await;
    let outsider_addr = outsider.host_port();
    let stack = Stack::start_with(2, &[], |o| {
        let member = o.pool[1].to_string();
        o.pool.push(outsider.addr);
        o.extra_filters = format!(
            "          - name: envoy.filters.http.set_metadata\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config\n              metadata:\n              - metadata_namespace: envoy.lb.subset_hint\n                value:\n                  x-gateway-destination-endpoint-subset: [\"{outsider_addr}\", \"10.255.255.1:8000\", \"{member}\"]\n"
        );
    })
    .await;
    let member = stack.backend("b1").host_port();
    for i in 0..8 {
        let r = stack.completion(&format!("hinted request {i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend(), "b1");
        let dest = stack
            .backend("b1")
            .last_header("x-gateway-destination-endpoint")
            .unwrap_or_default();
        assert_eq!(
            dest, member,
            "only the pool member of the hint, no fallback outside it"
        );
    }
    // Bodiless requests take the load-only path: same rule.
    let r = http::get(stack.envoy.listen, "/v1/models").await.unwrap();
    assert_eq!(r.backend(), "b1");
    assert_eq!(outsider.requests(), 0);
    assert_eq!(stack.backend("b0").requests(), 0);
}

/// Two model servers, Envoy and a picker with production logging (no
/// `RUST_LOG`, so its own default level applies) and default TLS.
struct QuietStack {
    _backends: Vec<Backend>,
    epp: Epp,
    envoy: Envoy,
}

impl QuietStack {
    async fn start(extra: &[&str], rust_log: Option<&str>) -> Self {
        let backends = vec![Backend::start("b0").await, Backend::start("b1").await];
        let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        let epp = Epp::spawn_with_log_filter(Some(&endpoints_yaml(&pool)), extra, rust_log);
        epp.wait_ready().await;
        epp.wait_scraped(2).await;
        let mut opts = EnvoyOptions::new(epp.grpc.port(), pool);
        opts.epp_tls = true;
        let envoy = Envoy::start(&opts).await;
        let r = http::post_json(
            envoy.listen,
            "/v1/completions",
            &serde_json::json!({"model": "m", "prompt": "warm up"}),
        )
        .await
        .expect("warm-up request");
        assert_eq!(r.status, 200, "{}", r.text());
        Self {
            _backends: backends,
            epp,
            envoy,
        }
    }
}

/// A request as sent: path, headers, body (`None`: a GET without one).
type RawRequest<'a> = (String, &'a [(&'a str, &'a str)], Option<Vec<u8>>);

/// The `i`-th of a rotating set of bad requests a client can send.
async fn bad_request(gateway: SocketAddr, i: usize) -> u16 {
    let junk = format!("{i}-{}", "x".repeat(3000));
    let forged = [
        ("x-gateway-destination-endpoint", "10.0.0.1:1"),
        ("x-gateway-destination-endpoint-served", "10.0.0.1:1"),
        ("x-gateway-inference-objective", junk.as_str()),
    ];
    let (path, headers, body): RawRequest<'_> = match i % 8 {
        0 => (
            "/v1/completions".into(),
            &[],
            Some(format!("{{not json {junk}").into_bytes()),
        ),
        1 => (
            "/v1/completions".into(),
            &[],
            Some(format!(r#"{{"model":"{junk}","prompt":"unknown model"}}"#).into_bytes()),
        ),
        2 => (
            "/v1/completions".into(),
            &[],
            Some(format!(r#"{{"model":"m","prompt":{{"{junk}":1}}}}"#).into_bytes()),
        ),
        3 => (
            "/v1/chat/completions".into(),
            &[],
            Some(format!(r#"{{"model":"{junk}"}}"#).into_bytes()),
        ),
        4 => (
            "/v1/completions".into(),
            &[],
            Some(format!(r#"{{"model":"m","prompt":"{}"}}"#, "y".repeat(20_000)).into_bytes()),
        ),
        5 => (
            "/v1/completions".into(),
            &forged,
            Some(br#"{"model":"m","prompt":"forged"}"#.to_vec()),
        ),
        6 => (
            format!("/{junk}?q={junk}"),
            &[("x-request-id", junk.as_str())],
            None,
        ),
        _ => (
            "/v1/completions".into(),
            &[],
            Some(("[".repeat(200) + &"]".repeat(200)).into_bytes()),
        ),
    };
    let method = if body.is_some() { "POST" } else { "GET" };
    http::request(gateway, method, &path, headers, body)
        .await
        .map_or(0, |r| r.status)
}

/// Sends `n` bad requests, 8 at a time, within `limit`; returns how many got
/// each status.
async fn send_bad_requests(
    gateway: SocketAddr,
    n: usize,
    limit: Duration,
) -> std::collections::BTreeMap<u16, usize> {
    let deadline = Instant::now() + limit;
    let mut statuses = std::collections::BTreeMap::new();
    let mut sent = 0;
    while sent < n {
        assert!(
            Instant::now() < deadline,
            "only {sent} of {n} sent in {limit:?}"
        );
        let batch: Vec<_> = (sent..(sent + 8).min(n))
            .map(|i| tokio::spawn(bad_request(gateway, i)))
            .collect();
        for t in batch {
            *statuses.entry(t.await.expect("request task")).or_insert(0) += 1;
            sent += 1;
        }
    }
    statuses
}

/// Raw garbage at the picker's own ports: not TLS on ext_proc, not HTTP/2 on
/// the (plaintext gRPC) health port, not HTTP on the metrics port.
async fn garbage_connections(epp: &Epp, n: usize) {
    for i in 0..n {
        for addr in [epp.grpc, epp.health, epp.admin, epp.metrics] {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                continue;
            };
            let _ = s
                .write_all(
                    format!("\x16\x03\x01garbage {i} {}\r\n\r\n", "z".repeat(500)).as_bytes(),
                )
                .await;
            let mut buf = [0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_bad_requests_do_not_grow_the_log_at_the_default_level() {
    let stack = QuietStack::start(&["--max-request-body-bytes", "16384"], None).await;
    let before = stack.epp.log();
    let statuses = send_bad_requests(stack.envoy.listen, 1000, Duration::from_secs(240)).await;
    garbage_connections(&stack.epp, 50).await;
    // Every kind of refusal was exercised, and the picker kept serving.
    for status in [400, 413] {
        assert!(
            statuses.get(&status).is_some_and(|&n| n >= 100),
            "{statuses:?}"
        );
    }
    let r = http::post_json(
        stack.envoy.listen,
        "/v1/completions",
        &serde_json::json!({"model": "m", "prompt": "still serving"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let after = stack.epp.log();
    let grown = &after[before.len()..];
    let lines = grown.lines().count();
    eprintln!(
        "1,000 bad requests and 150 garbage connections: statuses {statuses:?}; log grew by {lines} lines, {} bytes",
        grown.len()
    );
    assert!(
        lines <= 5 && grown.len() <= 2048,
        "the log grew by {lines} lines / {} bytes:\n{grown}",
        grown.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logging_sees_bad_requests_but_clips_their_text() {
    // The control for the test above: at debug level the same requests are
    // logged (so an empty log there is not a blind spot), yet no line echoes
    // the kilobytes of client text they carry.
    let stack = QuietStack::start(
        &["--max-request-body-bytes", "16384"],
        Some("epp=debug,info"),
    )
    .await;
    let before = stack.epp.log().len();
    send_bad_requests(stack.envoy.listen, 80, Duration::from_secs(60)).await;
    let log = stack.epp.log();
    let grown = &log[before..];
    let lines = grown.lines().count();
    assert!(
        lines >= 50,
        "only {lines} debug lines for 80 bad requests:\n{grown}"
    );
    let longest = grown.lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest <= 1500,
        "a debug line of {longest} bytes echoes client text:\n{}",
        grown.lines().find(|l| l.len() == longest).unwrap_or("")
    );
}

const CANARY_TOKEN: &str = "CANARY-bearer-7f3a9c";
const CANARY_COOKIE: &str = "CANARY-cookie-51d0e2";
const CANARY_KEY: &str = "CANARY-apikey-c44b18";
const CANARY_PROMPT: &str = "CANARY-prompt-9e6d27";

/// Requests carrying credentials and a marked prompt, accepted and refused.
async fn send_canaries(gateway: SocketAddr) {
    let bearer = format!("Bearer {CANARY_TOKEN}");
    let cookie = format!("session={CANARY_COOKIE}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("cookie", cookie.as_str()),
        ("x-api-key", CANARY_KEY),
    ];
    let bodies = [
        (
            "/v1/completions",
            format!(r#"{{"model":"m","prompt":"secret {CANARY_PROMPT}","max_tokens":1}}"#),
            200,
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"{CANARY_PROMPT}"}}]}}"#
            ),
            200,
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"m","prompt":"{CANARY_PROMPT}" "#),
            400,
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"m","prompt":{{"text":"{CANARY_PROMPT}"}}}}"#),
            400,
        ),
        (
            "/v1/completions",
            format!(
                r#"{{"model":"m","prompt":"{CANARY_PROMPT}{}"}}"#,
                "p".repeat(20_000)
            ),
            413,
        ),
    ];
    for (path, body, want) in bodies {
        let r = http::request(gateway, "POST", path, &headers, Some(body.into_bytes()))
            .await
            .expect("request through envoy");
        assert_eq!(r.status, want, "{path}: {}", r.text());
    }
    let r = http::request(gateway, "GET", "/v1/models", &headers, None)
        .await
        .expect("request through envoy");
    assert_eq!(r.status, 200);
}

fn assert_no_canary(log: &str, canaries: &[&str], level: &str) {
    assert!(
        log.contains("endpoint picker listening"),
        "the log was captured"
    );
    for c in canaries {
        assert!(
            !log.contains(c),
            "{c} leaked into the log at {level}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_prompts_never_reach_the_log() {
    let all = [CANARY_TOKEN, CANARY_COOKIE, CANARY_KEY, CANARY_PROMPT];
    // -v 0 (the default) to -v 3 all mean info.
    for (extra, level) in [
        (&[][..], "the default level"),
        (&["-v", "1"][..], "-v 1"),
        (&["-v", "3"][..], "-v 3"),
    ] {
        let mut args = vec!["--max-request-body-bytes", "16384"];
        args.extend_from_slice(extra);
        let stack = QuietStack::start(&args, None).await;
        send_canaries(stack.envoy.listen).await;
        assert_no_canary(&stack.epp.log(), &all, level);
    }
    // Even at debug, with one line per request, only routing facts are
    // logged: no header value and no prompt text.
    let stack = QuietStack::start(&["--max-request-body-bytes", "16384", "-v", "4"], None).await;
    send_canaries(stack.envoy.listen).await;
    let log = stack.epp.log();
    assert!(
        log.contains("request routed"),
        "-v 4 logs each request:\n{log}"
    );
    assert_no_canary(&log, &all, "-v 4 (debug)");
}

/// Accepts any certificate: the test reads what is served, it does not
/// judge it.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Completes a TLS handshake offering ALPN h2 and returns the served leaf
/// certificate and the negotiated protocol.
async fn served_certificate(addr: SocketAddr) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let provider = Arc::new(default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = connector
        .connect(ServerName::try_from("localhost").ok()?, tcp)
        .await
        .ok()?;
    let (_, conn) = tls.get_ref();
    let leaf = conn.peer_certificates()?.first()?.to_vec();
    Some((leaf, conn.alpn_protocol().map(<[u8]>::to_vec)))
}

/// A fresh self-signed pair, PEM encoded, and the certificate's DER.
fn new_pair(name: &str) -> (String, String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("certificate");
    (
        ck.cert.pem(),
        ck.signing_key.serialize_pem(),
        ck.cert.der().to_vec(),
    )
}

/// Writes a pair the way a Kubernetes Secret mount changes: new files
/// renamed into place, so the picker never reads half a file.
fn install_pair(dir: &std::path::Path, crt: &str, key: &str) {
    for (name, content) in [("tls.key", key), ("tls.crt", crt)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (crt_a, key_a, der_a) = new_pair("first.epp");
    install_pair(certs.path(), &crt_a, &key_a);
    let backend = Backend::start("b0").await;
    let cert_dir = certs.path().to_str().expect("utf-8 path");
    let epp = Epp::start(
        &[backend.addr],
        &["--cert-path", cert_dir, "--enable-cert-reload"],
    )
    .await;
    let pid = epp.pid();

    let (served, alpn) = served_certificate(epp.grpc).await.expect("TLS handshake");
    assert_eq!(served, der_a, "the certificate from --cert-path is served");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN negotiates h2");

    let (crt_b, key_b, der_b) = new_pair("second.epp");
    install_pair(certs.path(), &crt_b, &key_b);
    let addr = epp.grpc;
    let der = der_b.clone();
    eventually(
        "the replaced certificate is served",
        Duration::from_secs(20),
        || {
            let der = der.clone();
            async move {
                served_certificate(addr)
                    .await
                    .is_some_and(|(c, _)| c == der)
            }
        },
    )
    .await;
    assert_eq!(epp.pid(), pid, "same process");
    assert!(epp.log().contains("TLS certificate reloaded"));

    // A broken pair keeps the last good certificate in service.
    std::fs::write(certs.path().join("tls.key"), "not a key").expect("write");
    let log = epp.log();
    eventually(
        "the broken pair is noticed",
        Duration::from_secs(20),
        || async { epp.log().len() > log.len() && epp.log().contains("reload failed") },
    )
    .await;
    let (served, _) = served_certificate(epp.grpc).await.expect("TLS handshake");
    assert_eq!(served, der_b, "the last good certificate stays in service");
}

/// File descriptors the process has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_flood_the_log() {
    // A client that holds many connections open can exhaust the picker's
    // file descriptors; from then on every accept fails at once. Each
    // listener must log that once per interval, not once per attempt.
    let epp = Epp::spawn_with_log_filter(Some("endpoints: []\n"), &[], None);
    let pid = epp.pid().expect("running");
    let metrics = epp.metrics;
    eventually("metrics served", Duration::from_secs(10), || async move {
        http::get(metrics, "/metrics").await.is_ok()
    })
    .await;
    let limit = open_fds(pid) + 4;
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit failed");

    let mut held = Vec::new();
    for _ in 0..12 {
        for addr in [epp.metrics, epp.grpc, epp.health] {
            if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
                held.push(s);
            }
        }
    }
    eventually(
        "accept failures are reported",
        Duration::from_secs(10),
        || async { epp.log().contains("accept failed") },
    )
    .await;
    // Let the condition last: without a limit the failing accept loop logs
    // thousands of lines in this time; with it, none more.
    let before = epp.log();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = epp.log();
    let grown = &after[before.len()..];
    let lines = grown.lines().count();
    eprintln!(
        "descriptors exhausted for 2 s: the log grew by {lines} lines, {} bytes",
        grown.len()
    );
    assert!(
        lines <= 2,
        "the log grew by {lines} lines:\n{}",
        &grown[..grown.len().min(4000)]
    );

    // Once the connections go, the picker serves again.
    drop(held);
    eventually(
        "metrics served again",
        Duration::from_secs(20),
        || async move {
            http::get(metrics, "/metrics")
                .await
                .is_ok_and(|r| r.status == 200)
        },
    )
    .await;
}
