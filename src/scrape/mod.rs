//! The metrics scraper: one task per endpoint polls `http://ip:port/metrics`
//! every refresh interval and publishes the parsed signals into the
//! endpoint's atomics in the store.
//!
//! Design points:
//! - one kept-alive HTTP/1.1 connection per endpoint with a minimal client
//!   (no connection task, reused buffers), reconnected on error, so
//!   steady-state scraping allocates nothing;
//! - every endpoint's ticks are aligned on the same instants (multiples of
//!   the interval from the store's epoch): the runtime wakes once per round
//!   and handles the whole burst, instead of waking for each endpoint at a
//!   different moment, which costs more CPU in thread wake-ups than the
//!   scrapes themselves;
//! - a supervisor follows the store's change notifications, starting tasks for
//!   new endpoints and aborting those of departed ones;
//! - failures are counted per endpoint (the scheduler stops picking endpoints
//!   that keep failing) and logged on transitions only, not per failure.

mod client;
pub mod engines;
mod parse;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinHandle};

use client::MetricsClient;

pub use engines::{EngineMapping, MetricSpec, ScrapeSettings, SettingsError};
pub use parse::{ParseError, extract};

use crate::endpoints::{Endpoint, EndpointStore};

/// Largest /metrics page accepted (real vLLM pages are ~50 KB).
const MAX_PAGE_BYTES: usize = 8 << 20;

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("i/o: {0}")]
    Io(std::io::Error),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("connection closed before the response was complete")]
    Closed,
    #[error("status {0}")]
    Status(u16),
    #[error("metrics page larger than {MAX_PAGE_BYTES} bytes")]
    TooLarge,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Parse(#[from] ParseError),
}

/// Counters read by the telemetry module.
#[derive(Debug, Default)]
pub struct ScrapeStats {
    pub scrapes: AtomicU64,
    pub failures: AtomicU64,
    /// Sum of scrape durations in microseconds.
    pub duration_micros: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct ScraperOptions {
    pub interval: Duration,
    pub timeout: Duration,
    pub max_failures: u32,
}

#[derive(Debug)]
pub struct Scraper {
    store: Arc<EndpointStore>,
    settings: Arc<ScrapeSettings>,
    options: ScraperOptions,
    stats: Arc<ScrapeStats>,
}

impl Scraper {
    pub fn new(
        store: Arc<EndpointStore>,
        settings: ScrapeSettings,
        options: ScraperOptions,
    ) -> Self {
        Self {
            store,
            settings: Arc::new(settings),
            options,
            stats: Arc::new(ScrapeStats::default()),
        }
    }

    pub fn stats(&self) -> Arc<ScrapeStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` turns true (or its sender is dropped).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        let mut tasks: HashMap<u64, JoinHandle<()>> = HashMap::new();
        loop {
            let snapshot = self.store.snapshot();
            let live: HashMap<u64, &Arc<Endpoint>> =
                snapshot.endpoints().iter().map(|e| (e.uid, e)).collect();
            tasks.retain(|uid, task| {
                let keep = live.contains_key(uid);
                if !keep {
                    task.abort();
                }
                keep
            });
            for (uid, endpoint) in live {
                tasks.entry(uid).or_insert_with(|| {
                    tokio::spawn(scrape_loop(
                        Arc::clone(endpoint),
                        Arc::clone(&self.settings),
                        self.options.clone(),
                        self.store.epoch(),
                        Arc::clone(&self.stats),
                    ))
                });
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = crate::shutdown::requested(&mut shutdown) => break,
            }
        }
        for task in tasks.into_values() {
            task.abort();
        }
    }
}

/// Where an endpoint's metrics are served.
fn target(e: &Endpoint, settings: &ScrapeSettings) -> SocketAddr {
    let port = settings
        .port_override
        .or(e.spec.metrics_port)
        .unwrap_or(e.spec.port);
    SocketAddr::new(e.spec.address, port)
}

async fn scrape_loop(
    endpoint: Arc<Endpoint>,
    settings: Arc<ScrapeSettings>,
    options: ScraperOptions,
    epoch: Instant,
    stats: Arc<ScrapeStats>,
) {
    let mapping = settings.mapping_for(&endpoint).clone();
    let path = mapping
        .path
        .clone()
        .unwrap_or_else(|| settings.path.clone());
    let addr = target(&endpoint, &settings);
    let interval = options.interval.max(Duration::from_millis(1));
    let mut client = MetricsClient::new(addr, &path, MAX_PAGE_BYTES);

    // The next multiple of the interval since the epoch: every endpoint's
    // task ticks at the same instants.
    let since = Instant::now().saturating_duration_since(epoch).as_nanos();
    let period = interval.as_nanos().max(1);
    let wait = Duration::from_nanos(u64::try_from(period - since % period).unwrap_or(0));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + wait, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        let started = Instant::now();
        let result = client
            .fetch(options.timeout)
            .await
            .and_then(|page| extract(page, &mapping).map_err(ScrapeError::from));
        let done = Instant::now();
        stats.scrapes.fetch_add(1, Ordering::Relaxed);
        stats.duration_micros.fetch_add(
            u64::try_from(done.duration_since(started).as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        match result {
            Ok(sample) => {
                endpoint.record_scrape(&sample, done, epoch);
                if failing {
                    failing = false;
                    tracing::info!(endpoint = %endpoint.host_port, "metrics scrape recovered");
                }
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                let n = endpoint.metrics.record_failure();
                if n == options.max_failures {
                    failing = true;
                    tracing::warn!(endpoint = %endpoint.host_port, error = %e, failures = n,
                        "metrics scrapes keep failing; endpoint is not picked until they recover");
                } else {
                    tracing::debug!(endpoint = %endpoint.host_port, error = %e, "metrics scrape failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::EndpointSpec;
    use std::collections::BTreeMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tiny HTTP server answering every request with `page`; counts
    /// requests and currently open connections.
    async fn serve(
        page: &'static str,
        status: u16,
    ) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let (h, o) = (Arc::clone(&hits), Arc::clone(&open));
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (h, o) = (Arc::clone(&h), Arc::clone(&o));
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let n = match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                o.fetch_sub(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => n,
                        };
                        if !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        h.fetch_add(1, Ordering::SeqCst);
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{page}",
                            page.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            o.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                    }
                });
            }
        });
        (addr, hits, open)
    }

    fn spec(addr: SocketAddr) -> EndpointSpec {
        EndpointSpec {
            name: "e".into(),
            address: addr.ip(),
            port: addr.port(),
            labels: BTreeMap::new(),
            metrics_port: None,
        }
    }

    async fn wait_until(mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition not reached within 10s");
    }

    #[tokio::test]
    async fn scrapes_publish_metrics_over_one_connection() {
        let (addr, hits, open) = serve(
            "vllm:num_requests_waiting 3\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n",
            200,
        )
        .await;
        let store = Arc::new(EndpointStore::new(Duration::from_secs(2)));
        store.replace(vec![spec(addr)]).unwrap();
        let scraper = Scraper::new(
            Arc::clone(&store),
            ScrapeSettings::default(),
            ScraperOptions {
                interval: Duration::from_millis(10),
                timeout: Duration::from_secs(1),
                max_failures: 3,
            },
        );
        let stats = scraper.stats();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(scraper.run(stopped));
        let e = Arc::clone(&store.snapshot().endpoints()[0]);
        wait_until(|| stats.scrapes.load(Ordering::Relaxed) >= 3).await;
        let s = e.metrics.sample().unwrap();
        assert_eq!((s.waiting, s.running, s.kv_usage), (3, 2, 0.5));
        assert!(hits.load(Ordering::SeqCst) >= 3);
        assert_eq!(open.load(Ordering::SeqCst), 1, "one kept-alive connection");
        stop.send_replace(true);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn failures_are_counted_and_endpoint_removal_stops_the_task() {
        let (addr, _hits, open) = serve("oops", 500).await;
        let store = Arc::new(EndpointStore::new(Duration::from_secs(2)));
        store.replace(vec![spec(addr)]).unwrap();
        let scraper = Scraper::new(
            Arc::clone(&store),
            ScrapeSettings::default(),
            ScraperOptions {
                interval: Duration::from_millis(5),
                timeout: Duration::from_secs(1),
                max_failures: 3,
            },
        );
        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(scraper.run(stopped));
        let e = Arc::clone(&store.snapshot().endpoints()[0]);
        wait_until(|| e.metrics.consecutive_failures() >= 3).await;
        assert!(e.metrics.sample().is_none());
        wait_until(|| open.load(Ordering::SeqCst) >= 1).await;
        store.replace(vec![]).unwrap();
        // The aborted task drops its connection.
        wait_until(|| open.load(Ordering::SeqCst) == 0).await;
    }

    #[tokio::test]
    async fn unreachable_endpoint_fails_without_panicking() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut client = MetricsClient::new(addr, "/metrics", MAX_PAGE_BYTES);
        assert!(matches!(
            client.fetch(Duration::from_secs(5)).await,
            Err(ScrapeError::Connect(_))
        ));
    }
}
