//! Several picker replicas behind one Envoy (`--epp-replicas N`): N `epp`
//! processes with the same config and endpoints file, each on its own
//! kernel-chosen ports, all listed in Envoy's ext_proc cluster (round robin
//! per request, see [`super::envoy::EnvoyOptions::extra_epp_ports`]).
//!
//! Replicas share nothing: each scrapes the pods itself and each one's
//! approximate prefix index records only the requests it routed, which is
//! what a horizontally scaled picker deployment looks like (the KV-event
//! index is the remedy it is compared with). Per-replica request counts
//! come from each replica's own /metrics.
//!
//! `--kill-replica-at SECS` ([`ReplicaKiller`]) SIGKILLs the last replica
//! that long into the run, reading the pods' prefix-cache counters just
//! before, so the report can give the hit rate before and after; what the
//! gateway did with the requests is in the run's error counts.

use std::{net::SocketAddr, path::Path, time::Duration};

use tokio::task::JoinHandle;

use super::{Binaries, EppAddrs, EppLaunch, Proc, StackError, wait_scraped};
use crate::load::{
    client::HttpClient,
    result::ReplicaKill,
    runner::{FleetCounters, PodSet, cache_delta, get_text, scrape_fleet},
};

/// Starts `n` (at least 1) pickers, one after another, each returned once it
/// has scraped every pod. Replica 0 logs to `epp.log`, replica i to
/// `epp-i.log`.
#[allow(clippy::too_many_arguments)]
pub async fn start_replicas(
    bin: &Binaries,
    config: &Path,
    extra: &[String],
    endpoints: &Path,
    tls: bool,
    logs: &Path,
    n: usize,
    pods: usize,
    client: &HttpClient,
) -> Result<Vec<(Proc, EppAddrs)>, StackError> {
    let mut out = Vec::with_capacity(n.max(1));
    for i in 0..n.max(1) {
        let log = if i == 0 {
            "epp.log".to_owned()
        } else {
            format!("epp-{i}.log")
        };
        let launch = EppLaunch {
            config,
            extra,
            endpoints,
            tls,
            logs,
            log_name: &log,
            env: &[],
        };
        let (mut p, addrs) = launch.start(bin).await?;
        wait_scraped(client, addrs.metrics, pods, Some(&mut p)).await?;
        out.push((p, addrs));
    }
    Ok(out)
}

/// Requests each replica routed (`inference_objective_request_total`
/// summed over its labels), in replica order; `None` for a replica whose
/// page could not be read or parsed.
pub async fn routed_per_replica(client: &HttpClient, metrics: &[SocketAddr]) -> Vec<Option<f64>> {
    let mut out = Vec::with_capacity(metrics.len());
    for m in metrics {
        let page = get_text(
            client,
            &format!("http://{m}/metrics"),
            Duration::from_secs(5),
        )
        .await;
        // A replica that routed nothing has no series yet: 0.
        out.push(page.ok().and_then(|text| {
            crate::prom::sum(&text, "inference_objective_request_total")
                .ok()
                .map(|v| v.unwrap_or(0.0))
        }));
    }
    out
}

/// A timer that kills one picker replica mid-run.
pub struct ReplicaKiller {
    at: Duration,
    replica: usize,
    client: HttpClient,
    pods: PodSet,
    start: Option<FleetCounters>,
    /// Whether the replica was killed, and the counters just before.
    task: JoinHandle<(bool, Option<FleetCounters>)>,
}

impl ReplicaKiller {
    /// Arms the timer now: at `at`, the pods' counters are read and process
    /// `pid` (replica number `replica`, a child of this process) is killed.
    pub async fn arm(
        client: HttpClient,
        pods: Vec<String>,
        pid: u32,
        replica: usize,
        at: Duration,
    ) -> Self {
        let pods = PodSet { urls: pods };
        let start = scrape_fleet(&client, &pods).await.ok();
        let task = {
            let (client, pods) = (client.clone(), pods.clone());
            tokio::spawn(async move {
                tokio::time::sleep(at).await;
                let counters = scrape_fleet(&client, &pods).await.ok();
                let killed = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                eprintln!("killed picker replica {replica} (pid {pid}): {killed}");
                (killed, counters)
            })
        };
        Self {
            at,
            replica,
            client,
            pods,
            start,
            task,
        }
    }

    /// After the run: what the kill changed (nothing killed if the run ended
    /// first).
    pub async fn finish(self) -> ReplicaKill {
        let mut kill = ReplicaKill {
            at_s: self.at.as_secs_f64(),
            replica: self.replica,
            happened: false,
            before: None,
            after: None,
        };
        if !self.task.is_finished() {
            self.task.abort();
            return kill;
        }
        let Ok((true, at_kill)) = self.task.await else {
            return kill;
        };
        kill.happened = true;
        let end = scrape_fleet(&self.client, &self.pods).await.ok();
        if let Some(at_kill) = at_kill {
            kill.before = self.start.map(|s| cache_delta(s, at_kill));
            kill.after = end.map(|e| cache_delta(at_kill, e));
        }
        kill
    }
}
