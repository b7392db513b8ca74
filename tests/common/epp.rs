//! The real `epp` binary, started as a child process on free loopback ports.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{eventually, localhost};

pub struct Epp {
    pub grpc: SocketAddr,
    pub health: SocketAddr,
    /// The admin API (epp.admin.v1.Admin), on localhost.
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Drop for Epp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- epp log ---\n{}", self.log());
        }
    }
}

/// An endpoints file entry for a backend address.
pub fn endpoints_yaml(addrs: &[SocketAddr]) -> String {
    if addrs.is_empty() {
        return "endpoints: []\n".to_owned();
    }
    let mut s = String::from("endpoints:\n");
    for (i, a) in addrs.iter().enumerate() {
        s.push_str(&format!(
            "- name: backend-{i}\n  address: {}\n  port: {}\n",
            a.ip(),
            a.port()
        ));
    }
    s
}

impl Epp {
    /// Starts `epp` discovering `pool` from an endpoints file, with extra
    /// flags, and waits until it reports ready.
    pub async fn start(pool: &[SocketAddr], extra: &[&str]) -> Self {
        let e = Self::spawn(pool, extra);
        e.wait_ready().await;
        e
    }

    /// Starts without waiting for readiness.
    pub fn spawn(pool: &[SocketAddr], extra: &[&str]) -> Self {
        Self::spawn_with_file(Some(&endpoints_yaml(pool)), extra)
    }

    /// Starts with the given endpoints file content (`None`: no file yet).
    pub fn spawn_with_file(content: Option<&str>, extra: &[&str]) -> Self {
        Self::spawn_with_log_filter(content, extra, Some("epp=debug,info"))
    }

    /// Like [`Self::spawn_with_file`] with `RUST_LOG` set to `rust_log`, or
    /// unset (`None`) so the picker logs at its own default level, as in
    /// production.
    pub fn spawn_with_log_filter(
        content: Option<&str>,
        extra: &[&str],
        rust_log: Option<&str>,
    ) -> Self {
        Self::spawn_with_env(content, extra, rust_log, &[])
    }

    /// Starts `pool`'s picker with extra environment variables (the
    /// `OTEL_*` ones) and waits until it reports ready.
    pub async fn start_with_env(pool: &[SocketAddr], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let e = Self::spawn_with_env(
            Some(&endpoints_yaml(pool)),
            extra,
            Some("epp=debug,info"),
            env,
        );
        e.wait_ready().await;
        e
    }

    /// Like [`Self::spawn_with_log_filter`], with extra environment
    /// variables. `OTEL_*` variables of the test's own environment are not
    /// passed on.
    pub fn spawn_with_env(
        content: Option<&str>,
        extra: &[&str],
        rust_log: Option<&str>,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(content) = content {
            fs::write(dir.path().join("endpoints.yaml"), content).expect("endpoints file");
        }
        let log = fs::File::create(dir.path().join("epp.log")).expect("log file");
        // Port 0 everywhere: the picker binds free ports itself and logs them,
        // so concurrent tests can never race for a port.
        let mut command = Command::new(env!("CARGO_BIN_EXE_epp"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
            command.env_remove(k);
        }
        command.envs(env.iter().copied());
        match rust_log {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let child = command
            .args(["--listen-address", "127.0.0.1"])
            // A port given in `extra` (a restart on the same port) replaces
            // the default: the flags parser refuses a flag given twice.
            .args(
                [
                    "--grpc-port",
                    "--grpc-health-port",
                    "--admin-port",
                    "--metrics-port",
                ]
                .into_iter()
                .filter(|p| !extra.contains(p))
                .flat_map(|p| [p, "0"]),
            )
            .arg("--endpoints-file")
            .arg(dir.path().join("endpoints.yaml"))
            .args(["--endpoints-file-poll-interval", "50ms"])
            .args(["--refresh-metrics-interval", "20ms"])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start epp");
        let mut epp = Self {
            grpc: localhost(0),
            health: localhost(0),
            admin: localhost(0),
            metrics: localhost(0),
            dir,
            child: Some(child),
        };
        epp.read_bound_addresses();
        epp
    }

    /// Waits for the "listening" log line and takes the bound addresses from it.
    fn read_bound_addresses(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("endpoint picker listening"))
            {
                let field = |name: &str| -> SocketAddr {
                    let start = line.find(&format!("{name}=")).expect("field") + name.len() + 1;
                    let rest = &line[start..];
                    let end = rest.find(' ').unwrap_or(rest.len());
                    rest[..end].parse().expect("socket address")
                };
                self.grpc = field("ext_proc");
                self.health = field("health");
                self.admin = field("admin");
                self.metrics = field("metrics");
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("epp exited before listening ({status}):\n{log}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "epp did not start listening:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn endpoints_file(&self) -> PathBuf {
        self.dir.path().join("endpoints.yaml")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("epp.log")).unwrap_or_default()
    }

    /// gRPC health status of `service` on the health port.
    pub async fn health_status(&self, service: &str) -> Option<ServingStatus> {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.health))
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = HealthClient::new(channel);
        let resp = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(resp.into_inner().status).ok()
    }

    pub async fn wait_ready(&self) {
        eventually("epp readiness SERVING", Duration::from_secs(20), || async {
            self.health_status("readiness").await == Some(ServingStatus::Serving)
        })
        .await;
    }

    /// Waits until every endpoint has been scraped at least once.
    pub async fn wait_scraped(&self, n: usize) {
        eventually("all endpoints scraped", Duration::from_secs(10), || async {
            let Ok(r) = super::http::get(self.metrics, "/metrics").await else {
                return false;
            };
            r.text()
                .lines()
                .find_map(|l| l.strip_prefix("epp_metrics_scrapes_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|v| v >= 2 * n as u64)
        })
        .await;
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY-free: send the signal with the kill command.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().expect("wait epp")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}
