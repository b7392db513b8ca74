//! Soak: a bounded run at a fixed request rate through Envoy and the real
//! picker to simulated pods, killing one pod on a schedule and restarting it
//! on the same address, while recording every request and, each second, the
//! picker's memory and CPU.
//!
//! What it answers (issue 6, "Soak"): does the load hold over minutes, are
//! pod crashes survived (the gateway retries onto the picker's fallbacks,
//! the picker stops picking the dead pod and picks it again once it is
//! back), which requests are lost and why, and does the picker's memory stay
//! flat. `epp-bench soak` ([`cli`]) runs it; [`report`] writes soak.csv,
//! soak.png and README.md.
//!
//! Bounded: the request count is rate x duration, nothing is sent after the
//! duration, each request has a timeout, at most `max_inflight` are in
//! flight, and kills are only scheduled while the pod can come back and
//! serve again before the end.

pub mod cli;
pub mod load;
pub mod pods;
pub mod report;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

pub use load::{Outcome, Pacing, Record, Workload};

use crate::{
    load::{client::http_client, runner::get_text},
    perf::proc_stats::ProcStats,
    report::ReportError,
    stack::{
        Binaries, EnvoyOptions, StackError, endpoints_yaml, start_envoy, start_epp, wait_scraped,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error("pod: {0}")]
    Pod(String),
    #[error("invalid soak settings: {0}")]
    Config(String),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub duration: Duration,
    /// Requests per second, open loop.
    pub rate: f64,
    pub pods: usize,
    /// First kill, then one every `kill_every`; each pod is down `down_for`.
    pub first_kill: Duration,
    pub kill_every: Duration,
    pub down_for: Duration,
    pub request_timeout: Duration,
    pub max_inflight: usize,
    pub workload: Workload,
    /// `vllm-sim` and its flags (beyond pods, port and name).
    pub sim_bin: PathBuf,
    pub sim_args: Vec<String>,
    /// Extra picker flags.
    pub epp_args: Vec<String>,
    pub envoy_concurrency: usize,
    /// Run Envoy with this cluster-wide cap on concurrent retries instead of
    /// the template's (to measure what the template's setting is for).
    pub envoy_max_retries: Option<u32>,
    /// Where the pods', picker's and Envoy's logs go (a temporary directory
    /// when unset).
    pub log_dir: Option<PathBuf>,
}

impl SoakConfig {
    /// Kill times: every `kill_every` from `first_kill`, as long as the pod
    /// is back at least `down_for` before the end, so each outage is
    /// followed by time in which the restarted pod can be seen serving.
    pub fn kill_times(&self) -> Vec<Duration> {
        let mut out = Vec::new();
        if self.kill_every.is_zero() {
            return out;
        }
        let mut t = self.first_kill;
        while t + self.down_for * 2 <= self.duration && out.len() < 10_000 {
            out.push(t);
            t += self.kill_every;
        }
        out
    }

    fn validate(&self) -> Result<(), SoakError> {
        let bad = |m: &str| Err(SoakError::Config(m.to_owned()));
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 10_000.0) {
            return bad("--rate must be within (0, 10000]");
        }
        if self.pods < 2 {
            return bad("--pods must be at least 2 (one is killed while the others serve)");
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(24 * 3600) {
            return bad("--duration must be within (0, 24 h]");
        }
        if self.max_inflight == 0 {
            return bad("--max-inflight must be at least 1");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Kill,
    Restart,
}

/// A pod killed or back (once it answers).
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Duration,
    pub kind: EventKind,
    pub pod: String,
}

/// One second's process measurements.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub at: Duration,
    pub epp_rss_kb: u64,
    /// Percent of one core over the last interval.
    pub epp_cpu_pct: f64,
    pub envoy_rss_kb: u64,
    pub inflight: usize,
    /// The machine's 1-minute load average (it is shared with other work).
    pub loadavg: f64,
}

/// What a run produced, for the report.
#[derive(Debug, Clone)]
pub struct SoakRun {
    pub config: SoakConfig,
    pub records: Vec<Record>,
    pub events: Vec<Event>,
    pub samples: Vec<Sample>,
    pub pods: Vec<(String, SocketAddr)>,
    /// The picker's peak RSS (VmHWM) at the end.
    pub epp_peak_rss_kb: u64,
    /// Envoy's `cluster.pool.*` retry and connection counters at the end.
    pub envoy_stats: Vec<(String, u64)>,
    /// Per pod address: Envoy's connection failures to it.
    pub envoy_connect_failures: Vec<(String, u64)>,
    /// The picker's scrape counters at the end.
    pub epp_scrapes: (f64, f64),
    /// The retry settings of the rendered Envoy template, as written there.
    pub gateway_retry: String,
    /// The picker binary that ran (release or debug).
    pub epp_bin: String,
    /// Warning and error lines in the picker's log.
    pub epp_log_warnings: usize,
    pub epp_log_sample: Vec<String>,
}

fn secs_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs the soak. The caller writes the report from the result.
pub async fn run(bin: &Binaries, cfg: &SoakConfig) -> Result<SoakRun, SoakError> {
    cfg.validate()?;
    let tmp = tempfile::tempdir().map_err(StackError::from)?;
    let logs = cfg
        .log_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&logs).map_err(StackError::from)?;
    let spec = pods::PodSpec {
        sim_bin: cfg.sim_bin.clone(),
        sim_args: cfg.sim_args.clone(),
        log_dir: logs.clone(),
    };
    let mut pods = pods::allocate(cfg.pods)?;
    for p in &mut pods {
        p.start(&spec).await?;
    }
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
    let endpoints = tmp.path().join("endpoints.yaml");
    std::fs::write(&endpoints, endpoints_yaml(&addrs)).map_err(StackError::from)?;
    let config = bin.repo.join("config/default.yaml");
    // TLS on the ext_proc port, as deployed.
    let (mut epp, eaddrs) = start_epp(bin, &config, &cfg.epp_args, &endpoints, true, &logs).await?;
    let client = http_client(8);
    wait_scraped(&client, eaddrs.metrics, addrs.len(), Some(&mut epp)).await?;
    let mut envoy_opts = EnvoyOptions::new(eaddrs.ext_proc.port(), addrs.clone());
    envoy_opts.epp_tls = true;
    let overridden;
    let envoy_bin = match cfg.envoy_max_retries {
        Some(n) => {
            overridden = with_max_retries(bin, n, tmp.path())?;
            &overridden
        }
        None => bin,
    };
    let (envoy, admin, listen) = start_envoy(
        envoy_bin,
        &envoy_opts,
        cfg.envoy_concurrency,
        tmp.path(),
        &logs,
        &client,
    )
    .await?;
    let uri: http::Uri = format!("http://{listen}/v1/chat/completions")
        .parse()
        .map_err(|e| SoakError::Config(format!("gateway address: {e}")))?;

    let start = Instant::now();
    let deadline = start + cfg.duration;
    let inflight = Arc::new(AtomicUsize::new(0));
    let count = (cfg.rate * cfg.duration.as_secs_f64()).ceil() as usize;
    let pacing = Pacing {
        rate: cfg.rate,
        count,
        max_inflight: cfg.max_inflight,
        timeout: cfg.request_timeout,
    };
    let load_client = http_client(cfg.max_inflight.min(1024));
    let load = tokio::spawn(load::run(
        load_client,
        uri,
        cfg.workload.clone(),
        pacing,
        start,
        deadline,
        Arc::clone(&inflight),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(
        epp.pid(),
        envoy.pid(),
        start,
        Arc::clone(&inflight),
        Arc::clone(&stop),
    ));

    let mut events = Vec::new();
    for (k, at) in cfg.kill_times().into_iter().enumerate() {
        tokio::time::sleep_until(start + at).await;
        let pod = &mut pods[k % cfg.pods];
        pod.kill();
        events.push(Event {
            at: start.elapsed(),
            kind: EventKind::Kill,
            pod: pod.name.clone(),
        });
        eprintln!("soak: {:.1} s: killed {}", secs_since(start), pod.name);
        tokio::time::sleep_until(start + at + cfg.down_for).await;
        if let Err(e) = pod.start(&spec).await {
            // Nothing else stops these two tasks on the way out.
            load.abort();
            sampler.abort();
            return Err(e);
        }
        events.push(Event {
            at: start.elapsed(),
            kind: EventKind::Restart,
            pod: pod.name.clone(),
        });
        eprintln!("soak: {:.1} s: {} is back", secs_since(start), pod.name);
    }

    let records = load.await;
    stop.store(true, Ordering::Relaxed);
    let records = records.map_err(|e| SoakError::Pod(format!("load task: {e}")))?;
    let samples = sampler.await.unwrap_or_default();

    let epp_peak_rss_kb = ProcStats::read(epp.pid()).map_or(0, |s| s.peak_rss_kb);
    // Read once at the end; a page that cannot be fetched counts as empty.
    let fetch = |url: String| {
        let client = &client;
        async move {
            get_text(client, &url, Duration::from_secs(5))
                .await
                .unwrap_or_default()
        }
    };
    let stats = fetch(format!("http://{admin}/stats?filter=^cluster\\.pool\\.")).await;
    let envoy_stats = envoy_counters(&stats);
    let clusters = fetch(format!("http://{admin}/clusters")).await;
    let envoy_connect_failures = host_counter(&clusters, "pool", "cx_connect_fail");
    let metrics = fetch(format!("http://{}/metrics", eaddrs.metrics)).await;
    let metric = |name: &str| {
        crate::prom::sum(&metrics, name)
            .ok()
            .flatten()
            .unwrap_or(f64::NAN)
    };
    let epp_scrapes = (
        metric("epp_metrics_scrapes_total"),
        metric("epp_metrics_scrape_failures_total"),
    );
    drop(envoy);
    drop(epp);
    let log = std::fs::read_to_string(logs.join("epp.log")).unwrap_or_default();
    let warn: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    let epp_log_sample = warn.iter().take(5).map(|l| l.to_string()).collect();
    let pod_list = pods.iter().map(|p| (p.name.clone(), p.addr)).collect();
    for p in &mut pods {
        p.kill();
    }
    Ok(SoakRun {
        config: cfg.clone(),
        records,
        events,
        samples,
        pods: pod_list,
        epp_peak_rss_kb,
        envoy_stats,
        envoy_connect_failures,
        epp_scrapes,
        gateway_retry: retry_settings(&envoy_bin.envoy_dir),
        epp_bin: bin
            .epp
            .strip_prefix(&bin.repo)
            .unwrap_or(&bin.epp)
            .display()
            .to_string(),
        epp_log_warnings: warn.len(),
        epp_log_sample,
    })
}

/// Every second until `stop`: the picker's and Envoy's memory, the
/// picker's CPU, requests in flight, the machine's load.
async fn sample(
    epp: u32,
    envoy: u32,
    start: Instant,
    inflight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Instant, f64)> = None;
    while !stop.load(Ordering::Relaxed) && out.len() < 7 * 24 * 3600 {
        tick.tick().await;
        let now = Instant::now();
        let e = ProcStats::read(epp).unwrap_or_default();
        let cpu = match last {
            Some((t, c)) if now > t => {
                100.0 * (e.cpu_seconds - c) / now.duration_since(t).as_secs_f64()
            }
            _ => 0.0,
        };
        last = Some((now, e.cpu_seconds));
        out.push(Sample {
            at: now.duration_since(start),
            epp_rss_kb: e.rss_kb,
            epp_cpu_pct: cpu,
            envoy_rss_kb: ProcStats::read(envoy).map_or(0, |s| s.rss_kb),
            inflight: inflight.load(Ordering::Relaxed),
            loadavg: loadavg(),
        });
    }
    out
}

/// A copy of the Envoy template directory in `dir` whose circuit breaker
/// allows `n` concurrent retries, and binaries pointing at it.
fn with_max_retries(bin: &Binaries, n: u32, dir: &std::path::Path) -> Result<Binaries, SoakError> {
    let copy = dir.join("envoy");
    let io = |e: std::io::Error| SoakError::Stack(StackError::from(e));
    std::fs::create_dir_all(copy.join("parts")).map_err(io)?;
    for entry in std::fs::read_dir(bin.envoy_dir.join("parts")).map_err(io)? {
        let entry = entry.map_err(io)?;
        std::fs::copy(entry.path(), copy.join("parts").join(entry.file_name())).map_err(io)?;
    }
    let template = std::fs::read_to_string(bin.envoy_dir.join("envoy.yaml.tmpl")).map_err(io)?;
    let mut found = false;
    let text: Vec<String> = template
        .lines()
        .map(|l| match l.split_once("max_retries:") {
            Some((indent, _)) if indent.trim().is_empty() => {
                found = true;
                format!("{indent}max_retries: {n}")
            }
            _ => l.to_owned(),
        })
        .collect();
    if !found {
        return Err(SoakError::Config(
            "--envoy-max-retries: the Envoy template has no max_retries line".into(),
        ));
    }
    std::fs::write(copy.join("envoy.yaml.tmpl"), text.join("\n") + "\n").map_err(io)?;
    Ok(Binaries {
        envoy_dir: copy,
        ..bin.clone()
    })
}

/// The template's retry lines (policy and circuit breaker), so the report
/// says what the gateway was allowed to retry.
fn retry_settings(envoy_dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(envoy_dir.join("envoy.yaml.tmpl")).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| {
            ["retry_on:", "num_retries:", "max_retries:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `cluster.pool.<name>: <n>` lines worth reporting (retries, resets,
/// connection failures).
fn envoy_counters(stats: &str) -> Vec<(String, u64)> {
    const KEEP: [&str; 9] = [
        "upstream_rq_total",
        "upstream_rq_retry",
        "upstream_rq_retry_success",
        "upstream_rq_retry_overflow",
        "upstream_rq_retry_limit_exceeded",
        "upstream_cx_connect_fail",
        "upstream_rq_pending_failure_eject",
        "upstream_cx_destroy_remote_with_active_rq",
        "upstream_rq_rx_reset",
    ];
    stats
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            let name = k.strip_prefix("cluster.pool.")?;
            KEEP.contains(&name)
                .then(|| Some((name.to_owned(), v.trim().parse().ok()?)))
                .flatten()
        })
        .collect()
}

/// Per host of `cluster` in Envoy's /clusters text
/// (`pool::127.0.0.1:8000::cx_connect_fail::3`).
fn host_counter(clusters: &str, cluster: &str, counter: &str) -> Vec<(String, u64)> {
    clusters
        .lines()
        .filter_map(|l| {
            let mut parts = l.split("::");
            (parts.next()? == cluster).then_some(())?;
            let host = parts.next()?;
            (parts.next()? == counter).then_some(())?;
            Some((host.to_owned(), parts.next()?.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(duration: u64) -> SoakConfig {
        SoakConfig {
            duration: Duration::from_secs(duration),
            rate: 10.0,
            pods: 4,
            first_kill: Duration::from_secs(45),
            kill_every: Duration::from_secs(90),
            down_for: Duration::from_secs(25),
            request_timeout: Duration::from_secs(30),
            max_inflight: 100,
            workload: Workload {
                model: "m".into(),
                groups: 1,
                sessions: 1,
                turns: 1,
                system_tokens: 1,
                user_tokens: 1,
                reply_tokens: 1,
                max_tokens: 1,
                chars_per_token: 4,
                seed: 0,
            },
            sim_bin: PathBuf::new(),
            sim_args: Vec::new(),
            epp_args: Vec::new(),
            envoy_concurrency: 1,
            envoy_max_retries: None,
            log_dir: None,
        }
    }

    #[test]
    fn kills_leave_room_to_come_back() {
        let secs: Vec<u64> = cfg(600)
            .kill_times()
            .iter()
            .map(Duration::as_secs)
            .collect();
        // 585 s would restart at 610, after the end.
        assert_eq!(secs, [45, 135, 225, 315, 405, 495]);
        assert!(cfg(60).kill_times().is_empty());
        let bad = SoakConfig { pods: 1, ..cfg(60) };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn overrides_the_retry_cap_in_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("parts")).unwrap();
        std::fs::write(
            src.join("envoy.yaml.tmpl"),
            "a: 1\n      - priority: DEFAULT\n        max_retries: 4096\n",
        )
        .unwrap();
        std::fs::write(src.join("parts/x.yaml"), "x").unwrap();
        let bin = Binaries {
            epp: PathBuf::new(),
            envoy: PathBuf::new(),
            envoy_dir: src.clone(),
            repo: PathBuf::new(),
        };
        let b = with_max_retries(&bin, 3, dir.path()).unwrap();
        assert_eq!(retry_settings(&b.envoy_dir), "max_retries: 3");
        assert!(b.envoy_dir.join("parts/x.yaml").exists());
        assert_eq!(retry_settings(&src), "max_retries: 4096");
        std::fs::write(src.join("envoy.yaml.tmpl"), "a: 1\n").unwrap();
        assert!(with_max_retries(&bin, 3, dir.path()).is_err());
    }

    #[test]
    fn reads_envoy_counters() {
        let stats = "cluster.pool.upstream_rq_retry: 7\ncluster.pool.upstream_rq_total: 100\ncluster.pool.other: 1\ncluster.epp.upstream_rq_retry: 3\n";
        assert_eq!(
            envoy_counters(stats),
            [
                ("upstream_rq_retry".to_owned(), 7),
                ("upstream_rq_total".to_owned(), 100)
            ]
        );
        let clusters = "pool::127.0.0.1:8000::cx_connect_fail::3\npool::127.0.0.1:8000::rq_total::9\nepp::127.0.0.1:9::cx_connect_fail::1\n";
        assert_eq!(
            host_counter(clusters, "pool", "cx_connect_fail"),
            [("127.0.0.1:8000".to_owned(), 3)]
        );
    }
}
