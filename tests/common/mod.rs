//! Shared helpers for end-to-end tests: fake model servers, a real Envoy,
//! the real `epp` binary, and an HTTP client. Everything listens on
//! 127.0.0.1 only. Processes are killed when their handle drops.

#![allow(dead_code)] // each test binary uses a different subset

pub mod backend;
pub mod envoy;
pub mod epp;
pub mod faults;
pub mod http;
pub mod kv_events;
pub mod otlp;

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    time::Duration,
};

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool installed by `scripts/setup-tools.sh` (envoy, kubectl, promtool),
/// found where the bench's stack finds it (`EPP_TOOLS_DIR` overrides the
/// directory).
pub fn tool(name: &str) -> PathBuf {
    let path = epp_bench::stack::tool(name);
    assert!(
        path.exists(),
        "{} not found: run scripts/setup-tools.sh first (it installs envoy, kubectl and promtool into .tools/bin)",
        path.display()
    );
    path
}

/// A currently free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `cond` until it holds; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Backends + epp + Envoy, wired together.
pub struct Stack {
    pub backends: Vec<backend::Backend>,
    pub epp: epp::Epp,
    pub envoy: envoy::Envoy,
}

impl Stack {
    /// `n` fake model servers behind Envoy and an epp started with `epp_args`
    /// (plaintext ext_proc unless the args ask otherwise).
    pub async fn start(n: usize, epp_args: &[&str]) -> Self {
        Self::start_with(n, epp_args, |_| {}).await
    }

    pub async fn start_with(
        n: usize,
        epp_args: &[&str],
        tune: impl FnOnce(&mut envoy::EnvoyOptions),
    ) -> Self {
        Self::start_with_env(n, epp_args, &[], tune).await
    }

    /// Like [`Self::start_with`], with environment variables for the picker.
    pub async fn start_with_env(
        n: usize,
        epp_args: &[&str],
        env: &[(&str, &str)],
        tune: impl FnOnce(&mut envoy::EnvoyOptions),
    ) -> Self {
        let mut backends = Vec::with_capacity(n);
        for i in 0..n {
            backends.push(backend::Backend::start(&format!("b{i}")).await);
        }
        let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        let secure = epp_args
            .iter()
            .any(|a| *a == "--secure-serving" || *a == "--secure-serving=true");
        let mut args = vec![];
        if !epp_args.contains(&"--fallback-endpoints") {
            args.extend(["--fallback-endpoints", "1"]);
        }
        if !secure {
            args.push("--secure-serving=false");
        }
        args.extend_from_slice(epp_args);
        let epp = epp::Epp::start_with_env(&pool, &args, env).await;
        epp.wait_scraped(n).await;
        let mut opts = envoy::EnvoyOptions::new(epp.grpc.port(), pool);
        opts.epp_tls = secure;
        tune(&mut opts);
        let envoy = envoy::Envoy::start(&opts).await;
        Self {
            backends,
            epp,
            envoy,
        }
    }

    pub fn backend(&self, name: &str) -> &backend::Backend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    pub async fn completion(&self, prompt: &str) -> http::Reply {
        http::post_json(
            self.envoy.listen,
            "/v1/completions",
            &serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1}),
        )
        .await
        .expect("request through envoy")
    }
}

/// `promtool check metrics` accepts the page (names, help, units).
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
