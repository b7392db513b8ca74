//! The metrics scraper: one task per endpoint polls `http://ip:port/metrics`
//! every refresh interval and publishes the parsed signals into the
//! endpoint's atomics in the store.
//!
//! Design points:
//! - one kept-alive HTTP/1.1 connection per endpoint with a minimal client
//!   (no connection task, reused buffers), reconnected on error, so
//!   steady-state scraping allocates nothing;
//! - the request asks for only the metric names the endpoint's mapping reads
//!   (`?name[]=...`, see [`name_filter_query`]): a vLLM page shrinks to a
//!   small fraction of its size, which is less to copy through the kernel,
//!   to parse, and for the model server to render;
//! - every endpoint's ticks are aligned on the same instants (multiples of
//!   the interval from the store's epoch): the runtime wakes once per round
//!   and handles the whole burst, instead of waking for each endpoint at a
//!   different moment, which costs more CPU in thread wake-ups than the
//!   scrapes themselves; for the same reason the sockets are polled on those
//!   shared timer ticks rather than registered for readiness (see
//!   `client`), so a late answer does not wake the thread on its own;
//! - a supervisor follows the store's change notifications, starting tasks for
//!   new endpoints and aborting those of departed ones;
//! - failures are counted per endpoint (the scheduler stops picking endpoints
//!   that keep failing) and logged on transitions only, not per failure.

mod client;
pub mod engines;
mod metrics;
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

pub use engines::{EngineMapping, MetricSpec, ScrapeSettings, SettingsError, Signals};
pub use metrics::ScrapeMetrics;
pub use parse::{ParseError, Sample, Samples, extract, extract_lora, extract_signals, samples};

use crate::endpoints::{Endpoint, EndpointStore, MetricsSample};

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

/// Counters the scraper keeps, exported by [`ScrapeMetrics`].
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

/// The query asking a Prometheus client library for only the metric names
/// `mapping` reads: `name[]=...` repeated, as Python's prometheus_client
/// (vLLM, SGLang) understands it. It keeps the samples whose names are listed,
/// with their families' HELP and TYPE lines; servers that do not know the
/// parameter ignore it and send the whole page.
pub fn name_filter_query(mapping: &EngineMapping) -> String {
    let mut q = String::new();
    for name in mapping.metric_names() {
        if !q.is_empty() {
            q.push('&');
        }
        q.push_str("name%5B%5D=");
        for b in name.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                q.push(char::from(b));
            } else {
                q.push_str(&format!("%{b:02X}"));
            }
        }
    }
    q
}

/// Whether an endpoint is asked for only the metrics its mapping reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    /// Plain path: the flag is off, or the server was seen to drop metrics
    /// from a filtered page that its full page has.
    Off,
    /// Filtered, and the filtered page has not yet been seen complete.
    Unverified,
    /// Filtered, and a filtered page had every signal the mapping reads, or
    /// every one the full page has.
    Trusted,
}

/// One endpoint's scrapes: the connection, the mapping and the filter state.
struct EndpointScraper {
    client: MetricsClient,
    mapping: EngineMapping,
    filter: Filter,
    /// Where the LoRA state read from each page goes (`None` in tests that
    /// only look at the sample).
    endpoint: Option<Arc<Endpoint>>,
}

impl EndpointScraper {
    fn new(client: MetricsClient, mapping: EngineMapping, filter: bool) -> Self {
        let mut client = client;
        let query = name_filter_query(&mapping);
        let filter = if filter && !query.is_empty() {
            client.set_filter_query(&query);
            Filter::Unverified
        } else {
            Filter::Off
        };
        Self {
            client,
            mapping,
            filter,
            endpoint: None,
        }
    }

    async fn fetch(&mut self, timeout: Duration) -> Result<(MetricsSample, Signals), ScrapeError> {
        let page = self.client.fetch(timeout).await?;
        let found = extract_signals(page, &self.mapping)?;
        if let (Some(e), Some(spec)) = (&self.endpoint, &self.mapping.lora) {
            e.lora.observe(extract_lora(page, spec).as_ref());
        }
        Ok(found)
    }

    /// One scrape. A filtered page that lacks a signal, or a 4xx refusal of
    /// the filtered request, is checked against the full page: a server that filters
    /// differently from prometheus_client (an older one returns nothing for
    /// collectors it cannot name, such as multiprocess mode) is then scraped
    /// without the filter from then on.
    async fn scrape(
        &mut self,
        timeout: Duration,
        endpoint: &str,
    ) -> Result<MetricsSample, ScrapeError> {
        if self.filter == Filter::Off {
            return self.fetch(timeout).await.map(|(sample, _)| sample);
        }
        let filtered = self.fetch(timeout).await;
        match &filtered {
            Ok((sample, found)) if found.covers(self.mapping.signals()) => {
                self.filter = Filter::Trusted;
                return Ok(*sample);
            }
            // Once the filtered page was as good as the full one, a page
            // with fewer signals is what the server has now.
            Ok((sample, _)) if self.filter == Filter::Trusted => return Ok(*sample),
            // A page without the signals, or a refusal of the request, may be
            // the filter's doing; anything else (unreachable, slow, a server
            // error, a broken answer) is not, and is not worth a second request.
            Ok(_) | Err(ScrapeError::Parse(_)) => {}
            Err(ScrapeError::Status(status)) if (400..500).contains(status) => {}
            Err(_) => return filtered.map(|(sample, _)| sample),
        }
        self.client.use_filter(false);
        let full = self.fetch(timeout).await;
        match (filtered, full) {
            (Ok((sample, found)), Ok((_, full_found))) if found.covers(full_found) => {
                self.filter = Filter::Trusted;
                self.client.use_filter(true);
                Ok(sample)
            }
            (_, Ok((sample, _))) => {
                self.filter = Filter::Off;
                tracing::info!(
                    endpoint,
                    "the metrics server's answer to a name[] filtered request lacks metrics its full page has; scraping the full page from now on"
                );
                Ok(sample)
            }
            (Ok((sample, _)), Err(_)) => {
                // The full page fails where the filtered one works: keep the filter.
                self.filter = Filter::Trusted;
                self.client.use_filter(true);
                Ok(sample)
            }
            (Err(e), Err(_)) => {
                self.client.use_filter(true);
                Err(e)
            }
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
    let mut scraper = EndpointScraper::new(
        MetricsClient::new(addr, &path, MAX_PAGE_BYTES),
        mapping,
        settings.name_filter,
    );
    scraper.endpoint = Some(Arc::clone(&endpoint));

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
        let result = scraper.scrape(options.timeout, &endpoint.host_port).await;
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
mod lora_tests;
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
            kv_events: None,
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

    /// How a test server answers a request target: status and page.
    type Answer = fn(&str) -> (u16, String);

    /// A metrics server that answers each request with `answer(target)`
    /// and records every request target, in order.
    async fn serve_by_target(answer: Answer) -> (SocketAddr, Arc<parking_lot::Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let seen = Arc::clone(&targets);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match sock.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&req[..end]).into_owned();
                        req.drain(..end + 4);
                        let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                        let (status, page) = answer(&target);
                        seen.lock().push(target);
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{page}",
                            page.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, targets)
    }

    const FULL_PAGE: &str = "# HELP vllm:num_requests_waiting w\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 3\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\nvllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"900\"} 1\nvllm:prompt_tokens_total 12345\n";

    fn vllm_filter() -> String {
        name_filter_query(&EngineMapping::vllm())
    }

    /// Scrapes `n` times with the vLLM mapping and returns the last sample.
    async fn scrape_n(addr: SocketAddr, filter: bool, n: usize) -> MetricsSample {
        let mut s = EndpointScraper::new(
            MetricsClient::new(addr, "/metrics", MAX_PAGE_BYTES),
            EngineMapping::vllm(),
            filter,
        );
        let mut last = None;
        for _ in 0..n {
            last = Some(s.scrape(Duration::from_secs(5), "e").await.unwrap());
        }
        last.unwrap()
    }

    fn expected_full() -> MetricsSample {
        MetricsSample {
            waiting: 3,
            running: 2,
            kv_usage: 0.5,
            block_size: 32,
            num_blocks: 900,
        }
    }

    #[test]
    fn the_filter_query_names_every_metric_each_mapping_reads() {
        assert_eq!(
            vllm_filter(),
            "name%5B%5D=vllm%3Anum_requests_waiting&name%5B%5D=vllm%3Anum_requests_running\
             &name%5B%5D=vllm%3Akv_cache_usage_perc&name%5B%5D=vllm%3Agpu_cache_usage_perc\
             &name%5B%5D=vllm%3Acache_config_info&name%5B%5D=vllm%3Alora_requests_info"
        );
        assert_eq!(
            name_filter_query(&EngineMapping::sglang()),
            "name%5B%5D=sglang%3Anum_queue_reqs&name%5B%5D=sglang%3Anum_running_reqs\
             &name%5B%5D=sglang%3Atoken_usage&name%5B%5D=sglang%3Acache_config_info"
        );
        assert_eq!(
            name_filter_query(&EngineMapping::trtllm_serve()),
            "name%5B%5D=trtllm_num_requests_waiting&name%5B%5D=trtllm_num_requests_running\
             &name%5B%5D=trtllm_kv_cache_utilization&name%5B%5D=trtllm_kv_cache_tokens_per_block\
             &name%5B%5D=trtllm_kv_cache_max_blocks"
        );
        // Label matchers select series, not names: each name is asked once.
        assert_eq!(
            name_filter_query(&EngineMapping::triton_trtllm()),
            "name%5B%5D=nv_trt_llm_request_metrics&name%5B%5D=nv_trt_llm_kv_cache_block_metrics"
        );
        let mut custom = EngineMapping::vllm();
        custom.queued = Some(MetricSpec::parse("jet:queue{slot=\"a b\"}").unwrap());
        custom.running = None;
        custom.kv_usage.clear();
        custom.cache_info = None;
        custom.lora = None;
        assert_eq!(name_filter_query(&custom), "name%5B%5D=jet%3Aqueue");
        custom.queued = None;
        assert_eq!(name_filter_query(&custom), "");
    }

    #[tokio::test]
    async fn a_server_that_filters_is_asked_only_for_the_wanted_names() {
        // Filters like prometheus_client: only the listed sample names.
        let (addr, targets) = serve_by_target(|target| {
            let Some((_, q)) = target.split_once('?') else {
                return (200, FULL_PAGE.to_owned());
            };
            let page = FULL_PAGE
                .lines()
                .filter(|l| {
                    let name = l.split(['{', ' ']).next().unwrap_or("");
                    !l.starts_with('#') && q.contains(&name.replace(':', "%3A"))
                })
                .map(|l| format!("{l}\n"))
                .collect();
            (200, page)
        })
        .await;
        assert_eq!(scrape_n(addr, true, 4).await, expected_full());
        let want = format!("/metrics?{}", vllm_filter());
        assert_eq!(*targets.lock(), vec![want; 4]);
    }

    #[tokio::test]
    async fn a_server_that_filters_differently_is_scraped_without_the_filter() {
        let servers: [(&str, Answer); 3] = [
            // An older prometheus_client in multiprocess mode answers a
            // filtered request with an empty page.
            ("empty filtered page", |target| {
                if target.contains('?') {
                    (200, String::new())
                } else {
                    (200, FULL_PAGE.to_owned())
                }
            }),
            // One that drops a family the mapping reads (cache_config_info).
            ("a family dropped", |target| {
                if target.contains('?') {
                    (200, "vllm:num_requests_waiting 3\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n".to_owned())
                } else {
                    (200, FULL_PAGE.to_owned())
                }
            }),
            // One that refuses a query string.
            ("query refused", |target| {
                if target.contains('?') {
                    (400, "bad query".to_owned())
                } else {
                    (200, FULL_PAGE.to_owned())
                }
            }),
        ];
        for (case, answer) in servers {
            let (addr, targets) = serve_by_target(answer).await;
            assert_eq!(scrape_n(addr, true, 3).await, expected_full(), "{case}");
            let t = targets.lock().clone();
            assert_eq!(
                t.len(),
                4,
                "{case}: one filtered try, then the full page: {t:?}"
            );
            assert!(t[0].contains("name%5B%5D="), "{case}: {t:?}");
            assert!(t[1..].iter().all(|t| t == "/metrics"), "{case}: {t:?}");
        }
    }

    #[tokio::test]
    async fn a_failing_server_is_not_asked_twice_per_scrape() {
        // A server error says nothing about the filter: one request per
        // scrape, and the filter stays on.
        let (addr, targets) = serve_by_target(|_| (500, "oops".to_owned())).await;
        let mut s = EndpointScraper::new(
            MetricsClient::new(addr, "/metrics", MAX_PAGE_BYTES),
            EngineMapping::vllm(),
            true,
        );
        for _ in 0..3 {
            let err = s.scrape(Duration::from_secs(5), "e").await;
            assert!(matches!(err, Err(ScrapeError::Status(500))), "{err:?}");
        }
        let t = targets.lock().clone();
        assert_eq!(t.len(), 3, "{t:?}");
        assert!(t.iter().all(|t| t.contains("name%5B%5D=")), "{t:?}");
        assert_eq!(s.filter, Filter::Unverified);
    }

    #[tokio::test]
    async fn a_filtered_page_as_complete_as_the_full_one_keeps_the_filter() {
        // A server that ignores the query and has no cache_config_info: the
        // first incomplete page is checked against the full page once.
        let (addr, targets) = serve_by_target(|_| {
            (200, "vllm:num_requests_waiting 1\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.25\n".to_owned())
        })
        .await;
        let s = scrape_n(addr, true, 4).await;
        assert_eq!((s.waiting, s.kv_usage, s.block_size), (1, 0.25, 0));
        let t = targets.lock().clone();
        assert_eq!(t.len(), 5, "{t:?}");
        assert_eq!(t[1], "/metrics", "the one check against the full page");
        assert!(
            t.iter()
                .enumerate()
                .all(|(i, t)| i == 1 || t.contains("name%5B%5D=")),
            "{t:?}"
        );
    }

    #[tokio::test]
    async fn with_the_filter_off_the_plain_path_is_scraped() {
        let (addr, targets) = serve_by_target(|_| (200, FULL_PAGE.to_owned())).await;
        assert_eq!(scrape_n(addr, false, 3).await, expected_full());
        assert_eq!(*targets.lock(), vec!["/metrics"; 3]);
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
