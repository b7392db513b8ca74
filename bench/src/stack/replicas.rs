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

use std::{net::SocketAddr, path::Path, time::Duration};

use super::{Binaries, EppAddrs, EppLaunch, Proc, StackError, wait_scraped};
use crate::load::client::HttpClient;
use crate::load::runner::get_text;

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
