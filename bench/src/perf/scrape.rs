//! What scraping costs: the picker scraping many endpoints at the default
//! 50 ms interval, its CPU share and its memory over time.
//!
//! Endpoints are either simulated vLLM pods (their real /metrics page, small)
//! or static servers returning a captured vLLM /metrics page (~50 KB, the
//! worst realistic case: histograms of every kind).

use std::{fmt::Write as _, sync::Arc, time::Duration};

use super::{backend::StaticBackends, proc_stats::ProcStats};
use crate::{
    load::{client::http_client, runner::get_text},
    sim::SimConfig,
    stack::{Binaries, SimRuntime, StackError, start_scraped_epp},
};

#[derive(Debug, Clone)]
pub enum Page {
    /// vllm-sim pods.
    Simulated,
    /// A captured vLLM page served by static backends.
    Captured { name: String, text: Arc<str> },
}

#[derive(Debug, Clone)]
pub struct ScrapePerf {
    pub endpoints: usize,
    pub interval: String,
    pub duration: Duration,
    pub sample_every: Duration,
    pub page: Page,
    /// Whether the picker asks for only the metrics it reads (`name[]`).
    pub name_filter: bool,
}

#[derive(Debug, Clone)]
pub struct ScrapeResult {
    pub label: String,
    pub endpoints: usize,
    pub interval: String,
    pub page_bytes: usize,
    /// What the picker receives: the page filtered to the names it reads,
    /// or the whole page without the filter.
    pub fetched_bytes: usize,
    pub duration_s: f64,
    /// Percent of one core.
    pub cpu_percent: f64,
    pub scrapes_per_s: f64,
    pub failures: f64,
    /// (seconds since start of measurement, RSS MiB)
    pub rss_mb: Vec<(f64, f64)>,
}

/// A counter of the picker's own page; 0 when the page does not have it.
fn counter(text: &str, name: &str) -> f64 {
    crate::prom::sum(text, name).ok().flatten().unwrap_or(0.0)
}

pub async fn run(bin: &Binaries, p: &ScrapePerf) -> Result<ScrapeResult, StackError> {
    let dir = tempfile::tempdir()?;
    let client = http_client(4);
    // Keep the endpoints alive for the whole measurement.
    let mut _backends = None;
    let mut _fleet = None;
    let sim_rt = SimRuntime::new()?;
    let (addrs, page_bytes, label) = match &p.page {
        Page::Captured { name, text } => {
            let b = StaticBackends::start(p.endpoints, Arc::clone(text)).await?;
            let addrs = b.addrs.clone();
            _backends = Some(b);
            (addrs, text.len(), format!("captured vLLM page ({name})"))
        }
        Page::Simulated => {
            let mut cfg: SimConfig = crate::perf::default_sim_config();
            cfg.pods = u16::try_from(p.endpoints).unwrap_or(u16::MAX);
            cfg.base_port = 0;
            let fleet = sim_rt.spawn_fleet(cfg).await?;
            let urls = fleet.urls();
            let page = get_text(
                &client,
                &format!("{}/metrics", urls[0]),
                Duration::from_secs(5),
            )
            .await
            .map(|t| t.len())
            .unwrap_or(0);
            let addrs = urls
                .iter()
                .filter_map(|u| u.trim_start_matches("http://").parse().ok())
                .collect();
            _fleet = Some(fleet);
            (addrs, page, "simulated pods (vllm-sim page)".to_owned())
        }
    };
    let fetched_bytes = if p.name_filter {
        let query = epp::scrape::name_filter_query(&epp::scrape::EngineMapping::vllm());
        let url = format!(
            "http://{}/metrics?{query}",
            addrs.first().copied().unwrap_or(([127, 0, 0, 1], 0).into())
        );
        get_text(&client, &url, Duration::from_secs(5))
            .await
            .map(|t| t.len())
            .unwrap_or(0)
    } else {
        page_bytes
    };
    let label = if p.name_filter {
        format!("{label}, name[] filter")
    } else {
        format!("{label}, no filter")
    };
    let mut extra = vec!["--refresh-metrics-interval".to_owned(), p.interval.clone()];
    if !p.name_filter {
        extra.push("--metrics-name-filter=false".to_owned());
    }
    let (epp, eaddrs) = start_scraped_epp(bin, &addrs, &extra, &[], dir.path()).await?;
    // Let connection pools and buffers reach their steady size first.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let metrics_url = format!("http://{}/metrics", eaddrs.metrics);
    let before = ProcStats::read(epp.pid()).unwrap_or_default();
    let text0 = get_text(&client, &metrics_url, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    let started = std::time::Instant::now();
    let mut rss = vec![(0.0, before.rss_kb as f64 / 1024.0)];
    while started.elapsed() < p.duration {
        tokio::time::sleep(
            p.sample_every
                .min(p.duration.saturating_sub(started.elapsed())),
        )
        .await;
        if let Some(s) = ProcStats::read(epp.pid()) {
            rss.push((started.elapsed().as_secs_f64(), s.rss_kb as f64 / 1024.0));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = ProcStats::read(epp.pid()).unwrap_or_default();
    let text1 = get_text(&client, &metrics_url, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    let scrapes =
        counter(&text1, "epp_metrics_scrapes_total") - counter(&text0, "epp_metrics_scrapes_total");
    let failures = counter(&text1, "epp_metrics_scrape_failures_total")
        - counter(&text0, "epp_metrics_scrape_failures_total");
    drop(epp);
    drop(_fleet);
    drop(sim_rt);
    Ok(ScrapeResult {
        label,
        endpoints: addrs.len(),
        interval: p.interval.clone(),
        page_bytes,
        fetched_bytes,
        duration_s: elapsed,
        cpu_percent: (after.cpu_seconds - before.cpu_seconds) / elapsed * 100.0,
        scrapes_per_s: scrapes / elapsed,
        failures,
        rss_mb: rss,
    })
}

pub fn markdown(results: &[ScrapeResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| endpoints | interval | page | page size | fetched per scrape | duration | scrapes/s | failures | picker CPU (% of one core) | RSS start | RSS end | RSS max |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let start = r.rss_mb.first().map_or(0.0, |x| x.1);
        let end = r.rss_mb.last().map_or(0.0, |x| x.1);
        let max = r.rss_mb.iter().map(|x| x.1).fold(0.0f64, f64::max);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} KB | {} B | {:.0} s | {:.0} | {:.0} | {:.1}% | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            r.endpoints,
            r.interval,
            r.label,
            r.page_bytes as f64 / 1000.0,
            r.fetched_bytes,
            r.duration_s,
            r.scrapes_per_s,
            r.failures,
            r.cpu_percent,
            start,
            end,
            max
        );
    }
    out
}
