//! Scale-out through the real picker: pools of simulated pods (several
//! `vllm-sim` processes), the picker discovering them from a file, Envoy in
//! front, a short load; the picker's own scheduling histogram and memory as
//! the pool grows.

use std::{fmt::Write as _, net::SocketAddr, path::Path, process::Command, time::Duration};

use super::{
    driver::{DriveSpec, drive},
    gateway::grouped_bodies,
    proc_stats::ProcStats,
};
use crate::{
    load::{client::http_client, runner::get_text},
    stack::{Binaries, EnvoyOptions, Proc, StackError, start_envoy, start_scraped_epp},
};

#[derive(Debug, Clone)]
pub struct ScalePoint {
    pub endpoints: usize,
    pub sim_processes: usize,
    pub requests: usize,
    pub errors: usize,
    pub decision_mean_us: f64,
    /// Upper bound of the histogram bucket holding the 99th percentile.
    pub decision_p99_bucket_us: f64,
    pub rss_mb: f64,
    pub throughput: f64,
}

/// Mean and p99 bucket of a Prometheus histogram from its text exposition.
fn histogram(text: &str, name: &str) -> (f64, f64) {
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let sum = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}_sum")))
        .and_then(value)
        .unwrap_or(0.0);
    let count = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}_count")))
        .and_then(value)
        .unwrap_or(0.0);
    let mut p99 = f64::NAN;
    for l in text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
    {
        let le = l
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|v| v.parse::<f64>().ok());
        if let (Some(le), Some(n)) = (le, value(l))
            && n >= 0.99 * count
        {
            p99 = le;
            break;
        }
    }
    (if count > 0.0 { sum / count } else { 0.0 }, p99)
}

/// How to read the table (printed with it).
const NOTE: &str = "The simulated pods are made nearly free (no prefill overhead, 1 µs per prompt token, 1 ms per output token) so that what saturates is the stack itself: the load driver, Envoy, the simulators and the picker share the two cores. Prompts are 16 KiB in 64 groups that differ from their first block, so the prefix index fills and affinity spreads them. The scheduling time is read from the picker's own `inference_extension_scheduler_e2e_duration_seconds`, so with the CPU saturated it includes waiting for a core; its bucket boundaries are the Go EPP's, so the p99 can only be given as a bucket.";

/// Starts one `vllm-sim` process hosting `pods` nearly free pods on free
/// ports and returns it with the pods' addresses (from its stdout lines).
async fn start_sim_process(
    bin: &Binaries,
    pods: usize,
    log: &Path,
) -> Result<(Proc, Vec<SocketAddr>), StackError> {
    let mut cmd = Command::new(bin.epp.with_file_name("vllm-sim"));
    cmd.args(["--pods", &pods.to_string(), "--base-port", "0"])
        // The same model name the gateway bodies carry.
        .args(["--model", "m"])
        // Fast pods: what is measured is the picker, not the model.
        .args(["--itl-ms", "1", "--prefill-us-per-token", "1"])
        .args(["--prefill-overhead-ms", "0"])
        .env("RUST_LOG", "warn,vllm_sim=info");
    let mut sim = Proc::spawn(cmd, "vllm-sim", log.to_path_buf())?;
    sim.wait_for_line("vllm-sim ready").await?;
    let text = std::fs::read_to_string(log)?;
    let addrs: Vec<SocketAddr> = text
        .lines()
        .filter(|l| l.contains(" listening on "))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|u| u.trim_start_matches("http://").parse().ok())
        .collect();
    if addrs.len() != pods {
        return Err(StackError::Sim(format!(
            "vllm-sim announced {} of {pods} pods",
            addrs.len()
        )));
    }
    Ok((sim, addrs))
}

/// Runs one pool size.
pub async fn run_one(
    bin: &Binaries,
    endpoints: usize,
    per_process: usize,
    requests: usize,
    interval: &str,
) -> Result<ScalePoint, StackError> {
    let dir = tempfile::tempdir()?;
    let client = http_client(4);
    // Several `vllm-sim` processes, `per_process` pods each.
    let groups = endpoints.div_ceil(per_process.max(1));
    let mut sims = Vec::with_capacity(groups);
    let mut addrs: Vec<SocketAddr> = Vec::with_capacity(endpoints);
    for g in 0..groups {
        let pods = (endpoints - g * per_process).min(per_process);
        let (sim, pod_addrs) =
            start_sim_process(bin, pods, &dir.path().join(format!("sim{g}.log"))).await?;
        addrs.extend(pod_addrs);
        sims.push(sim);
    }
    let extra = vec![
        "--refresh-metrics-interval".to_owned(),
        interval.to_owned(),
        "--fallback-endpoints".to_owned(),
        "0".to_owned(),
    ];
    let (epp, eaddrs) = start_scraped_epp(bin, &addrs, &extra, &[], dir.path()).await?;
    let mut opts = EnvoyOptions::new(eaddrs.ext_proc.port(), addrs.clone());
    opts.response_bodies = true;
    let (_envoy, _admin, listen) =
        start_envoy(bin, &opts, 1, dir.path(), dir.path(), &client).await?;
    // 16 KiB prompts in 64 groups that differ from their first block, so
    // the index fills and affinity spreads them over the pool.
    let bodies = grouped_bodies(16 << 10, 64);
    let spec = DriveSpec {
        target: listen,
        path: "/v1/completions".into(),
        bodies,
        destinations: Vec::new(),
        concurrency: 8,
        max_requests: requests,
        max_duration: Duration::from_secs(60),
    };
    let r = drive(&spec).await;
    let text = get_text(
        &client,
        &format!("http://{}/metrics", eaddrs.metrics),
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_default();
    let (mean, p99) = histogram(&text, "inference_extension_scheduler_e2e_duration_seconds");
    let rss = ProcStats::read(epp.pid()).map_or(0.0, |s| s.rss_kb as f64 / 1024.0);
    drop(epp);
    drop(sims);
    Ok(ScalePoint {
        endpoints: addrs.len(),
        sim_processes: groups,
        requests: r.latencies_ms.len(),
        errors: r.errors,
        decision_mean_us: mean * 1e6,
        decision_p99_bucket_us: p99 * 1e6,
        rss_mb: rss,
        throughput: r.throughput(),
    })
}

pub fn markdown(points: &[ScalePoint], interval: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Through the real picker and Envoy, 16 KiB completions at concurrency 8, pods scraped every {interval}. {}\n",
        NOTE
    );
    let _ = writeln!(
        md,
        "| endpoints | vllm-sim processes | requests (errors) | throughput | scheduling mean (picker histogram) | scheduling p99 bucket | picker RSS |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for p in points {
        let _ = writeln!(
            md,
            "| {} | {} | {} ({}) | {:.0} req/s | {:.1} µs | ≤ {:.0} µs | {:.1} MiB |",
            p.endpoints,
            p.sim_processes,
            p.requests,
            p.errors,
            p.throughput,
            p.decision_mean_us,
            p.decision_p99_bucket_us,
            p.rss_mb
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_mean_and_p99_bucket() {
        let text = "h_bucket{le=\"0.00001\"} 50\nh_bucket{le=\"0.00002\"} 98\nh_bucket{le=\"0.00005\"} 100\nh_bucket{le=\"+Inf\"} 100\nh_sum 0.0015\nh_count 100\n";
        let (mean, p99) = histogram(text, "h");
        assert!((mean - 0.000015).abs() < 1e-12);
        assert_eq!(p99, 0.00005);
    }
}
