//! The local stack: simulated vLLM pods, the endpoint picker and Envoy on
//! loopback, started and stopped as one unit.
//!
//! ```text
//!   load generator --HTTP--> Envoy (ext_proc filter) --HTTP--> vllm-sim pods
//!                              |  ^
//!                      ext_proc|  |destination
//!                              v  |
//!                             epp (endpoints file, scrapes the pods' /metrics)
//! ```
//!
//! Every port is chosen by the kernel (port 0) and read back, so several
//! stacks (or tests) can run side by side. The simulated pods run in this
//! process on their own runtime thread, the picker and Envoy as child
//! processes that are killed when the [`Stack`] is dropped. Each stack starts
//! from cold pods, so policies compared one after another see the same
//! workload on the same fresh caches.
//!
//! [`args`] turns the stack flags of `local` and `compare` into
//! [`StackOptions`]; [`cli`] is the `local` subcommand.

pub mod args;
pub mod cli;
pub mod envoy;
pub mod replicas;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

pub use envoy::{BodyMode, EnvoyOptions};

use crate::{
    load::{
        client::{HttpClient, http_client},
        runner::get_text,
    },
    sim::{FleetRestarter, SimConfig, SimFleet, kv_events::KvEventsAddrs, spawn_fleet},
};

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        what: &'static str,
        path: String,
        hint: &'static str,
    },
    #[error("starting {what}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {secs} s; log: {log}")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: String,
    },
    #[error("{what} exited early ({status}); log: {log}")]
    Exited {
        what: &'static str,
        status: String,
        log: String,
    },
    #[error("simulated pods: {0}")]
    Sim(String),
    #[error("--sim-arg values must be vllm-sim flags")]
    SimArgs(#[source] clap::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(
        "unknown policy {0:?}: use a name from bench/configs, epp-default, gie-default, envoy-rr, direct, or a config file path"
    )]
    UnknownPolicy(String),
}

/// Where the programs the stack runs are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub epp: PathBuf,
    pub envoy: PathBuf,
    /// The repository's envoy/ directory (template and parts).
    pub envoy_dir: PathBuf,
    pub repo: PathBuf,
}

impl Binaries {
    /// `epp` next to the running executable (or `$EPP_BIN`), Envoy from
    /// `scripts/setup-tools.sh` (`.tools/bin`, or `$EPP_TOOLS_DIR`).
    pub fn locate() -> Result<Self, StackError> {
        let repo = repo_root();
        let epp = match std::env::var_os("EPP_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe()?;
                // target/<profile>/epp-bench, or target/<profile>/deps/<test>.
                exe.ancestors()
                    .skip(1)
                    .take(2)
                    .map(|d| d.join("epp"))
                    .find(|p| p.exists())
                    .unwrap_or_else(|| exe.with_file_name("epp"))
            }
        };
        Self::with_epp(epp, repo)
    }

    pub fn with_epp(epp: PathBuf, repo: PathBuf) -> Result<Self, StackError> {
        let envoy = tool_in(&repo, "envoy");
        if !epp.exists() {
            return Err(StackError::Missing {
                what: "epp",
                path: epp.display().to_string(),
                hint: "build it (cargo build --release -p epp) or set EPP_BIN",
            });
        }
        if !envoy.exists() {
            return Err(StackError::Missing {
                what: "envoy",
                path: envoy.display().to_string(),
                hint: "run scripts/setup-tools.sh",
            });
        }
        Ok(Self {
            epp,
            envoy,
            envoy_dir: repo.join("envoy"),
            repo,
        })
    }
}

/// Where `scripts/setup-tools.sh` installs tool `name` (envoy, kubectl,
/// promtool) in this repository: `.tools/bin`, or `$EPP_TOOLS_DIR`. The
/// path may not exist yet.
pub fn tool(name: &str) -> PathBuf {
    tool_in(&repo_root(), name)
}

/// The repository this crate was built from.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn tool_in(repo: &Path, name: &str) -> PathBuf {
    std::env::var_os("EPP_TOOLS_DIR")
        .map_or_else(|| repo.join(".tools/bin"), PathBuf::from)
        .join(name)
}

/// What sits between the load generator and the pods.
#[derive(Debug, Clone)]
pub enum Router {
    /// Envoy + the endpoint picker with this scheduler config.
    Epp {
        config: PathBuf,
        extra_args: Vec<String>,
    },
    /// Envoy alone, round robin over the pods (a plain Kubernetes Service).
    EnvoyRoundRobin,
    /// No gateway: the load generator talks to pod 0.
    Direct,
}

impl Router {
    /// A policy by name: `epp-default`, `gie-default`, `envoy-rr`, `direct`,
    /// a file stem in bench/configs (e.g. `prefix-only`), or a config path.
    pub fn policy(name: &str, repo: &Path) -> Result<Self, StackError> {
        let epp = |config: PathBuf| Router::Epp {
            config,
            extra_args: Vec::new(),
        };
        Ok(match name {
            "envoy-rr" => Router::EnvoyRoundRobin,
            "direct" => Router::Direct,
            "epp-default" => epp(repo.join("config/default.yaml")),
            "gie-default" => epp(repo.join("config/gie-default.yaml")),
            other => {
                let named = repo.join("bench/configs").join(format!("{other}.yaml"));
                if named.exists() {
                    epp(named)
                } else if Path::new(other).exists() {
                    epp(PathBuf::from(other))
                } else {
                    return Err(StackError::UnknownPolicy(other.to_owned()));
                }
            }
        })
    }
}

/// How to build a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub sim: SimConfig,
    pub router: Router,
    pub body_mode: BodyMode,
    pub response_bodies: bool,
    pub epp_tls: bool,
    /// Envoy worker threads.
    pub envoy_concurrency: usize,
    /// Keep the picker's and Envoy's logs here (else a temporary directory).
    pub log_dir: Option<PathBuf>,
    /// Pods publish KV events (each its own PUB and replay port), the
    /// endpoints file lists them (`kvEvents: {port, replayPort}`), and the
    /// picker gets `--kv-events` when its `--help` offers that flag.
    pub kv_events: bool,
    /// Picker processes behind Envoy (see [`replicas`]).
    pub epp_replicas: usize,
}

impl StackOptions {
    pub fn new(sim: SimConfig, router: Router) -> Self {
        Self {
            sim,
            router,
            body_mode: BodyMode::FullDuplex,
            response_bodies: true,
            epp_tls: true,
            envoy_concurrency: 1,
            log_dir: None,
            kv_events: false,
            epp_replicas: 1,
        }
    }
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr (and stdout) going to `log`.
    pub fn spawn(mut cmd: Command, what: &'static str, log: PathBuf) -> Result<Self, StackError> {
        let file = fs::File::create(&log)?;
        let child = cmd
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|source| StackError::Spawn { what, source })?;
        Ok(Self { child, what, log })
    }

    /// Waits (up to the stack's ready timeout) for a log line containing
    /// `needle` and returns it.
    pub async fn wait_for_line(&mut self, needle: &str) -> Result<String, StackError> {
        let started = Instant::now();
        loop {
            self.check_running()?;
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(StackError::NotReady {
                    what: self.what,
                    secs: READY_TIMEOUT.as_secs(),
                    log: self.log_text(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn check_running(&mut self) -> Result<(), StackError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(StackError::Exited {
                what: self.what,
                status: status.to_string(),
                log: self.log_text(),
            });
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A runtime on its own threads for the simulated pods, so the load
/// generator's work in this process does not delay their timers. Dropping it
/// from async code is allowed (it shuts down in the background).
pub struct SimRuntime(Option<tokio::runtime::Runtime>);

impl SimRuntime {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("vllm-sim")
                .enable_all()
                .build()?,
        )))
    }

    /// Starts the simulated pods on this runtime.
    pub async fn spawn_fleet(&self, cfg: SimConfig) -> Result<SimFleet, StackError> {
        let rt = self
            .0
            .as_ref()
            .ok_or_else(|| StackError::Sim("runtime stopped".into()))?;
        rt.spawn(spawn_fleet(cfg))
            .await
            .map_err(|e| StackError::Sim(e.to_string()))?
            .map_err(|e| StackError::Sim(e.to_string()))
    }

    /// Stops the pods gracefully.
    pub async fn shutdown_fleet(&self, fleet: SimFleet) {
        if let Some(rt) = &self.0 {
            let _ = rt.spawn(fleet.shutdown()).await;
        }
    }
}

impl Drop for SimRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for SimRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimRuntime")
    }
}

/// A running stack.
pub struct Stack {
    /// Base URL the load generator should use.
    pub gateway: String,
    /// Base URLs of the pods (for their /metrics).
    pub pod_urls: Vec<String>,
    /// Each pod's KV-event sockets (all `None` without `kv_events`).
    pub pod_kv_events: Vec<Option<KvEventsAddrs>>,
    /// The picker's /metrics address, when there is a picker.
    pub epp_metrics: Option<SocketAddr>,
    /// The picker's health/admin address.
    pub epp_health: Option<SocketAddr>,
    /// The picker's admin API (epp.admin.v1.Admin), when there is a picker.
    pub epp_admin: Option<SocketAddr>,
    pub envoy_admin: Option<SocketAddr>,
    /// Every picker replica's /metrics address, replica 0 (`epp_metrics`)
    /// first.
    pub epp_replica_metrics: Vec<SocketAddr>,
    envoy: Option<Proc>,
    epp: Option<Proc>,
    /// Replicas 1.. (replica 0 is `epp`).
    epp_replicas: Vec<Proc>,
    fleet: Option<SimFleet>,
    sim_runtime: SimRuntime,
    _dir: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Order: gateway first, then the picker, then the pods.
        self.envoy.take();
        self.epp.take();
        self.epp_replicas.clear();
        self.fleet.take();
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("gateway", &self.gateway)
            .field("pods", &self.pod_urls.len())
            .finish()
    }
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Stack {
    pub async fn start(bin: &Binaries, opts: &StackOptions) -> Result<Self, StackError> {
        let dir = tempfile::tempdir()?;
        let logs = opts
            .log_dir
            .clone()
            .unwrap_or_else(|| dir.path().to_path_buf());
        fs::create_dir_all(&logs)?;

        let sim_runtime = SimRuntime::new()?;
        let mut sim = opts.sim.clone();
        sim.base_port = 0;
        sim.host = "127.0.0.1".into();
        if opts.kv_events {
            sim.kv_events_port = Some(0);
            sim.kv_events_replay_port = Some(0);
        }
        let fleet = sim_runtime.spawn_fleet(sim).await?;
        let pod_urls = fleet.urls();
        let pod_kv_events: Vec<_> = fleet.pods.iter().map(|p| p.kv_events).collect();
        let pods: Vec<SocketAddr> = pod_urls
            .iter()
            .filter_map(|u| u.trim_start_matches("http://").parse().ok())
            .collect();

        let mut stack = Self {
            gateway: pod_urls.first().cloned().unwrap_or_default(),
            pod_urls,
            pod_kv_events,
            epp_metrics: None,
            epp_health: None,
            epp_admin: None,
            envoy_admin: None,
            epp_replica_metrics: Vec::new(),
            envoy: None,
            epp: None,
            epp_replicas: Vec::new(),
            fleet: Some(fleet),
            sim_runtime,
            _dir: dir,
        };
        let client = http_client(4);

        let mut extra_epp_ports = Vec::new();
        let epp_port = match &opts.router {
            Router::Direct => return Ok(stack),
            Router::EnvoyRoundRobin => 0,
            Router::Epp { config, extra_args } => {
                let endpoints = stack._dir.path().join("endpoints.yaml");
                fs::write(
                    &endpoints,
                    endpoints_yaml_with_events(&pods, &stack.pod_kv_events),
                )?;
                let mut args = extra_args.clone();
                if opts.kv_events && epp_offers_flag(&bin.epp, "--kv-events") {
                    args.push("--kv-events".to_owned());
                }
                let mut started = replicas::start_replicas(
                    bin,
                    config,
                    &args,
                    &endpoints,
                    opts.epp_tls,
                    &logs,
                    opts.epp_replicas,
                    pods.len(),
                    &client,
                )
                .await?
                .into_iter();
                let Some((proc_, addrs)) = started.next() else {
                    return Err(StackError::Sim("no picker replica started".into()));
                };
                stack.epp = Some(proc_);
                stack.epp_metrics = Some(addrs.metrics);
                stack.epp_health = Some(addrs.health);
                stack.epp_admin = addrs.admin;
                stack.epp_replica_metrics.push(addrs.metrics);
                for (p, a) in started {
                    stack.epp_replicas.push(p);
                    stack.epp_replica_metrics.push(a.metrics);
                    extra_epp_ports.push(a.ext_proc.port());
                }
                addrs.ext_proc.port()
            }
        };

        let mut envoy_opts = EnvoyOptions::new(epp_port, pods);
        envoy_opts.extra_epp_ports = extra_epp_ports;
        envoy_opts.without_epp = matches!(opts.router, Router::EnvoyRoundRobin);
        envoy_opts.epp_tls = opts.epp_tls;
        envoy_opts.body_mode = opts.body_mode;
        envoy_opts.response_bodies = opts.response_bodies;
        let (proc_, admin, listen) = start_envoy(
            bin,
            &envoy_opts,
            opts.envoy_concurrency,
            stack._dir.path(),
            &logs,
            &client,
        )
        .await?;
        stack.envoy = Some(proc_);
        stack.envoy_admin = Some(admin);
        stack.gateway = format!("http://{listen}");
        Ok(stack)
    }

    /// Process id of the picker (for CPU and memory measurements).
    pub fn epp_pid(&self) -> Option<u32> {
        self.epp.as_ref().map(Proc::pid)
    }

    /// Process ids of the picker replicas, replica 0 first.
    pub fn epp_replica_pids(&self) -> Vec<u32> {
        self.epp
            .iter()
            .chain(&self.epp_replicas)
            .map(Proc::pid)
            .collect()
    }

    pub fn envoy_pid(&self) -> Option<u32> {
        self.envoy.as_ref().map(Proc::pid)
    }

    /// Restarts the simulated pods mid-run (`--restart-pods-at`).
    pub fn restarter(&self) -> Option<FleetRestarter> {
        self.fleet.as_ref().map(SimFleet::restarter)
    }

    /// Stops everything (also done on drop).
    pub async fn stop(mut self) {
        self.envoy.take();
        self.epp.take();
        self.epp_replicas.clear();
        if let Some(f) = self.fleet.take() {
            self.sim_runtime.shutdown_fleet(f).await;
        }
    }
}

/// An endpoints file for the picker.
pub fn endpoints_yaml(pods: &[SocketAddr]) -> String {
    endpoints_yaml_with_events(pods, &[])
}

/// An endpoints file whose pod i also lists its KV-event ports when
/// `kv_events[i]` is set (`kvEvents: {port: P, replayPort: R}`; a picker
/// that does not know the field refuses the file).
pub fn endpoints_yaml_with_events(
    pods: &[SocketAddr],
    kv_events: &[Option<KvEventsAddrs>],
) -> String {
    let mut s = String::from("endpoints:\n");
    if pods.is_empty() {
        return "endpoints: []\n".into();
    }
    for (i, a) in pods.iter().enumerate() {
        s.push_str(&format!(
            "- name: sim-{i}\n  address: {}\n  port: {}\n  labels: {{inference.networking.k8s.io/engine-type: vllm}}\n",
            a.ip(),
            a.port()
        ));
        if let Some(Some(kv)) = kv_events.get(i) {
            match kv.replay {
                Some(r) => s.push_str(&format!(
                    "  kvEvents: {{port: {}, replayPort: {}}}\n",
                    kv.events.port(),
                    r.port()
                )),
                None => s.push_str(&format!("  kvEvents: {{port: {}}}\n", kv.events.port())),
            }
        }
    }
    s
}

/// Whether `epp --help` lists `flag` itself (not merely a longer flag
/// starting with it), so the stack passes new picker flags only to pickers
/// that have them.
pub fn epp_offers_flag(epp: &Path, flag: &str) -> bool {
    let Ok(out) = Command::new(epp).arg("--help").output() else {
        return false;
    };
    let help = String::from_utf8_lossy(&out.stdout);
    help.match_indices(flag).any(|(at, _)| {
        help[at + flag.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '-' || c == '_'))
    })
}

/// Addresses the picker bound.
#[derive(Debug, Clone, Copy)]
pub struct EppAddrs {
    pub ext_proc: SocketAddr,
    pub health: SocketAddr,
    /// The admin API (localhost).
    pub admin: Option<SocketAddr>,
    pub metrics: SocketAddr,
}

/// Starts the picker with an endpoints file and a config, and returns it once
/// it listens.
pub async fn start_epp(
    bin: &Binaries,
    config: &Path,
    extra: &[String],
    endpoints: &Path,
    tls: bool,
    logs: &Path,
) -> Result<(Proc, EppAddrs), StackError> {
    EppLaunch {
        config,
        extra,
        endpoints,
        tls,
        logs,
        log_name: "epp.log",
        env: &[],
    }
    .start(bin)
    .await
}

/// How one picker process is launched: what the single-picker stacks, the
/// replica runner and the perf paths share.
#[derive(Debug, Clone, Copy)]
pub struct EppLaunch<'a> {
    pub config: &'a Path,
    /// Flags after the common ones (ports, endpoints file, config, TLS).
    pub extra: &'a [String],
    pub endpoints: &'a Path,
    pub tls: bool,
    pub logs: &'a Path,
    /// File under `logs` the picker's output goes to.
    pub log_name: &'a str,
    /// Variables added to the picker's environment (`OTEL_*` for traces).
    pub env: &'a [(String, String)],
}

impl EppLaunch<'_> {
    /// Starts the picker and returns it once it listens.
    pub async fn start(&self, bin: &Binaries) -> Result<(Proc, EppAddrs), StackError> {
        let mut cmd = Command::new(&bin.epp);
        cmd.args(["--listen-address", "127.0.0.1"])
            .args([
                "--grpc-port",
                "0",
                "--grpc-health-port",
                "0",
                "--admin-port",
                "0",
                "--metrics-port",
                "0",
            ])
            .arg("--endpoints-file")
            .arg(self.endpoints)
            .arg("--config-file")
            .arg(self.config)
            .arg(format!("--secure-serving={}", self.tls))
            .args(self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1");
        let p = Proc::spawn(cmd, "epp", self.logs.join(self.log_name))?;
        listening(p).await
    }
}

/// Reads the picker's bound addresses from its "listening" line.
async fn listening(mut p: Proc) -> Result<(Proc, EppAddrs), StackError> {
    let line = p.wait_for_line("endpoint picker listening").await?;
    let field = |name: &str| -> Option<SocketAddr> {
        let start = line.find(&format!("{name}="))? + name.len() + 1;
        line[start..].split_whitespace().next()?.parse().ok()
    };
    match (field("ext_proc"), field("health"), field("metrics")) {
        (Some(ext_proc), Some(health), Some(metrics)) => Ok((
            p,
            EppAddrs {
                ext_proc,
                health,
                admin: field("admin"),
                metrics,
            },
        )),
        _ => Err(StackError::NotReady {
            what: "epp (unreadable listening line)",
            secs: 0,
            log: line,
        }),
    }
}

/// The picker as the perf measurements run it: default config, plaintext,
/// discovering `pods` from an endpoints file in `dir`, returned once it has
/// scraped every pod (so the first measured request sees a full pool).
pub async fn start_scraped_epp(
    bin: &Binaries,
    pods: &[SocketAddr],
    extra: &[String],
    env: &[(String, String)],
    dir: &Path,
) -> Result<(Proc, EppAddrs), StackError> {
    let endpoints = dir.join("endpoints.yaml");
    std::fs::write(&endpoints, endpoints_yaml(pods))?;
    let config = bin.repo.join("config/default.yaml");
    let (mut epp, addrs) = EppLaunch {
        config: &config,
        extra,
        endpoints: &endpoints,
        tls: false,
        logs: dir,
        log_name: "epp.log",
        env,
    }
    .start(bin)
    .await?;
    let client = crate::load::client::http_client(2);
    wait_scraped(&client, addrs.metrics, pods.len(), Some(&mut epp)).await?;
    Ok((epp, addrs))
}

/// Waits until the picker has scraped every pod at least twice.
pub async fn wait_scraped(
    client: &HttpClient,
    metrics: SocketAddr,
    pods: usize,
    mut epp: Option<&mut Proc>,
) -> Result<(), StackError> {
    let started = Instant::now();
    let url = format!("http://{metrics}/metrics");
    loop {
        if let Some(p) = epp.as_deref_mut() {
            p.check_running()?;
        }
        if let Ok(text) = get_text(client, &url, Duration::from_secs(2)).await {
            let count = |name| crate::prom::sum(&text, name).ok().flatten().unwrap_or(0.0);
            let scrapes = count("epp_metrics_scrapes_total");
            let failures = count("epp_metrics_scrape_failures_total");
            if scrapes - failures >= 2.0 * pods as f64 {
                return Ok(());
            }
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(StackError::NotReady {
                what: "epp (scraping the pods)",
                secs: READY_TIMEOUT.as_secs(),
                log: epp.map(|p| p.log_text()).unwrap_or_default(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts Envoy from the template and returns it with its admin and listener
/// addresses once it is ready.
pub async fn start_envoy(
    bin: &Binaries,
    opts: &EnvoyOptions,
    concurrency: usize,
    dir: &Path,
    logs: &Path,
    client: &HttpClient,
) -> Result<(Proc, SocketAddr, SocketAddr), StackError> {
    let config = dir.join("envoy.yaml");
    fs::write(&config, envoy::render(&bin.envoy_dir, opts)?)?;
    let admin_path = dir.join("envoy-admin-address");
    let mut cmd = Command::new(&bin.envoy);
    cmd.arg("-c")
        .arg(&config)
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args(["--disable-hot-restart", "-l", "warning"])
        .args(["--concurrency", &concurrency.max(1).to_string()]);
    let mut p = Proc::spawn(cmd, "envoy", logs.join("envoy.log"))?;
    let started = Instant::now();
    loop {
        p.check_running()?;
        let admin = fs::read_to_string(&admin_path)
            .ok()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok());
        if let Some(admin) = admin {
            let ready = get_text(
                client,
                &format!("http://{admin}/ready"),
                Duration::from_secs(2),
            )
            .await;
            if ready.is_ok_and(|t| t.trim() == "LIVE") {
                let listeners = get_text(
                    client,
                    &format!("http://{admin}/listeners?format=json"),
                    Duration::from_secs(2),
                )
                .await
                .map_err(|e| StackError::Sim(format!("envoy listeners: {e}")))?;
                let v: serde_json::Value = serde_json::from_str(&listeners)
                    .map_err(|e| StackError::Sim(format!("envoy listeners: {e}")))?;
                let port =
                    v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or_else(|| {
                            StackError::Sim("envoy listener port not reported".into())
                        })?;
                return Ok((p, admin, SocketAddr::from(([127, 0, 0, 1], port))));
            }
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(StackError::NotReady {
                what: "envoy",
                secs: READY_TIMEOUT.as_secs(),
                log: p.log_text(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_file_lists_event_ports_per_pod() {
        let pods: Vec<SocketAddr> = vec![
            "127.0.0.1:8000".parse().unwrap(),
            "127.0.0.1:8001".parse().unwrap(),
        ];
        let kv = KvEventsAddrs {
            events: "127.0.0.1:5557".parse().unwrap(),
            replay: Some("127.0.0.1:5558".parse().unwrap()),
        };
        let text = endpoints_yaml_with_events(&pods, &[Some(kv), None]);
        assert_eq!(text.matches("kvEvents").count(), 1, "{text}");
        assert!(
            text.contains("  port: 8000\n  labels: {inference.networking.k8s.io/engine-type: vllm}\n  kvEvents: {port: 5557, replayPort: 5558}\n- name: sim-1"),
            "{text}"
        );
        assert_eq!(
            endpoints_yaml(&pods),
            endpoints_yaml_with_events(&pods, &[None, None])
        );
    }

    #[test]
    fn a_flag_is_offered_only_by_its_exact_name() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("epp");
        fs::write(
            &fake,
            "#!/bin/sh\necho '      --kv-events-port <P>'\necho '      --other'\n",
        )
        .unwrap();
        let mut perms = fs::metadata(&fake).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        fs::set_permissions(&fake, perms).unwrap();
        assert!(!epp_offers_flag(&fake, "--kv-events"));
        assert!(epp_offers_flag(&fake, "--kv-events-port"));
        assert!(epp_offers_flag(&fake, "--other"));
        assert!(!epp_offers_flag(&dir.path().join("missing"), "--other"));
    }
}
