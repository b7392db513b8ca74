//! A simulated pod's `/metrics` page: vLLM's metric names, types, labels,
//! help texts and histogram buckets (vLLM v1, `vllm/v1/metrics/loggers.py`),
//! so scrapers written for vLLM (the EPP's metrics collector, dashboards)
//! read the simulator unchanged.
//!
//! Each pod has its own `prometheus` [`Registry`], encoded by the crate's
//! text encoder, so the page is well-formed by construction rather than by a
//! hand-written writer. The engine counts into the counters and histograms
//! as requests are admitted and finish; the gauges describe the engine's
//! state, which only the engine knows, so they are set from a [`Gauges`]
//! snapshot when the page is rendered. Counters are registered under their
//! `_total` names, which is how Python's client writes them and how the
//! picker and dashboards look them up.
//!
//! A `name[]` query (see [`crate::prom::requested_names`]) drops whole
//! families from the gathered registry before encoding, which is cheaper
//! than rendering the page and cutting it down.
//!
//! # LoRA
//!
//! With adapters configured the page also has vLLM's
//! `vllm:lora_requests_info{max_lora, running_lora_adapters,
//! waiting_lora_adapters}` gauge, with vLLM's value semantics: each distinct
//! pair of adapter lists is its own series, whose value is the Unix time (in
//! seconds) at which that pair was last the engine's state; old pairs stay
//! on the page, so a reader takes the series with the largest value (GIE
//! does). The lists are comma-joined adapter names: `running` the adapters
//! of admitted requests, `waiting` those of queued ones (vLLM's
//! definitions: an adapter loaded but idle is in neither). Where the
//! simulator differs: vLLM stamps the current pair at every engine step, the
//! simulator at every change and whenever the page is rendered while the pod
//! has work (same order of values, so the same newest series); names are
//! joined in configuration order (vLLM: first-seen order); values strictly
//! increase, so the newest series is unique; only the
//! [`LORA_INFO_SERIES_KEPT`] most recent pairs are kept (vLLM keeps every
//! pair ever seen), which no reader of the newest one can tell apart.
//!
//! Two counters are the simulator's own, not vLLM's (vLLM exports no count
//! of adapter loads): `vllm_sim_lora_adapter_loads_total{adapter}` and
//! `vllm_sim_lora_adapter_evictions_total{adapter}`, for the benchmark to
//! count swaps. Their names carry no colon, so promtool accepts them as
//! they are.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder, core::Collector,
};

use super::lora::bit;

pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Finish reasons vLLM reports; the simulator produces `length` (it always
/// generates max_tokens) and `abort` (client went away after admission).
/// All three are exported from the start, as vLLM does, so a rate over
/// `stop` is 0 rather than absent.
pub const FINISH_REASONS: [&str; 3] = ["stop", "length", "abort"];
const LENGTH: usize = 1;
const ABORT: usize = 2;

/// Adapter-list pairs kept as `vllm:lora_requests_info` series.
pub const LORA_INFO_SERIES_KEPT: usize = 32;

pub const LORA_INFO: &str = "vllm:lora_requests_info";
pub const LORA_LOADS: &str = "vllm_sim_lora_adapter_loads_total";
pub const LORA_EVICTIONS: &str = "vllm_sim_lora_adapter_evictions_total";

/// Point-in-time engine state for the gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
}

/// One pod's metrics. The handles share their values with the registry, so
/// counting needs no lock and rendering reads the current values.
#[derive(Debug)]
pub struct PodMetrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    /// Indexed like [`FINISH_REASONS`].
    finished: [IntCounter; 3],
    ttft: Histogram,
    e2e: Histogram,
    queue_time: Histogram,
    lora: Option<LoraMetrics>,
    model: String,
}

/// The KV-event publisher's counters (registered on the pod's page).
#[derive(Debug, Clone)]
pub struct KvEventCounters {
    pub published: IntCounter,
    pub dropped: IntCounter,
    pub replayed: IntCounter,
    pub bad_requests: IntCounter,
}

impl KvEventCounters {
    /// Fresh counters for a pod serving `model` (registered later, with
    /// [`PodMetrics::register_kv_events`]).
    pub fn new(model: &str) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| {
            IntCounter::with_opts(
                Opts::new(name, help)
                    .const_label("engine", "0")
                    .const_label("model_name", model),
            )
        };
        Ok(Self {
            published: counter(
                "vllm_sim_kv_event_batches_published_total",
                "KV-event batches sent on the PUB socket (vllm-sim's own metric).",
            )?,
            dropped: counter(
                "vllm_sim_kv_event_batches_dropped_total",
                "KV-event batches dropped because the publisher fell behind the engine (vllm-sim's own metric).",
            )?,
            replayed: counter(
                "vllm_sim_kv_event_replays_total",
                "Replay requests answered on the ROUTER socket (vllm-sim's own metric).",
            )?,
            bad_requests: counter(
                "vllm_sim_kv_event_bad_replay_requests_total",
                "Replay requests that were not [\"\", seq u64] (vllm-sim's own metric).",
            )?,
        })
    }
}

/// The LoRA families of a pod serving adapters.
#[derive(Debug)]
struct LoraMetrics {
    info: GaugeVec,
    max_lora: String,
    adapters: Vec<String>,
    /// Indexed like the adapters.
    loads: Vec<IntCounter>,
    evictions: Vec<IntCounter>,
    series: Mutex<LoraSeries>,
}

/// Which `vllm:lora_requests_info` series exist, by (running, waiting)
/// adapter sets, oldest first; the last is the engine's current state.
#[derive(Debug, Default)]
struct LoraSeries {
    pairs: VecDeque<(u64, u64)>,
    last_stamp: f64,
}

impl LoraMetrics {
    fn names(&self, set: u64) -> String {
        let mut out = String::new();
        for (i, name) in self.adapters.iter().enumerate() {
            if set & bit(i) != 0 {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(name);
            }
        }
        out
    }

    /// Sets the series of `pair` to the current Unix time. The caller holds
    /// the series lock, so stamps are handed out in order.
    fn stamp(&self, series: &mut LoraSeries, pair: (u64, u64)) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        // A microsecond is a few ulps of a present-day Unix time.
        let stamp = now.max(series.last_stamp + 1e-6);
        series.last_stamp = stamp;
        let (running, waiting) = (self.names(pair.0), self.names(pair.1));
        self.info
            .with_label_values(&[&self.max_lora, &waiting, &running])
            .set(stamp);
    }

    fn observe(&self, running: u64, waiting: u64) {
        let mut series = self.series.lock();
        let pair = (running, waiting);
        if series.pairs.back() == Some(&pair) {
            return;
        }
        if let Some(pos) = series.pairs.iter().position(|p| *p == pair) {
            series.pairs.remove(pos);
        }
        series.pairs.push_back(pair);
        self.stamp(&mut series, pair);
        while series.pairs.len() > LORA_INFO_SERIES_KEPT {
            if let Some((r, w)) = series.pairs.pop_front() {
                let (running, waiting) = (self.names(r), self.names(w));
                // Present by construction; a miss would only mean the series
                // is already gone.
                let _ = self
                    .info
                    .remove_label_values(&[&self.max_lora, &waiting, &running]);
            }
        }
    }

    /// Stamps the current pair again, as vLLM does at each engine step.
    fn refresh(&self) {
        let mut series = self.series.lock();
        if let Some(&pair) = series.pairs.back() {
            self.stamp(&mut series, pair);
        }
    }
}

fn register<C: Collector + Clone + 'static>(r: &Registry, c: C) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl PodMetrics {
    /// The metrics of a pod serving `model` with `num_gpu_blocks` KV blocks
    /// of `block_size` tokens (both exported as `vllm:cache_config_info`
    /// labels, where the picker reads them).
    pub fn new(model: &str, block_size: usize, num_gpu_blocks: usize) -> prometheus::Result<Self> {
        let r = Registry::new();
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .const_label("engine", "0")
                .const_label("model_name", model)
        };
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .const_label("engine", "0")
                    .const_label("model_name", model)
                    .buckets(buckets.to_vec()),
            )
        };
        let info = Opts::new(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
        )
        .const_label("block_size", block_size.to_string())
        .const_label("enable_prefix_caching", "True")
        .const_label("engine", "0")
        .const_label("num_gpu_blocks", num_gpu_blocks.to_string());
        register(&r, IntGauge::with_opts(info)?)?.set(1);
        let finished = register(
            &r,
            IntCounterVec::new(
                opts(
                    "vllm:request_success_total",
                    "Count of successfully processed requests.",
                ),
                &["finished_reason"],
            )?,
        )?;
        let reason = |r: &str| finished.get_metric_with_label_values(&[r]);
        Ok(Self {
            running: register(
                &r,
                IntGauge::with_opts(opts(
                    "vllm:num_requests_running",
                    "Number of requests in model execution batches.",
                ))?,
            )?,
            waiting: register(
                &r,
                IntGauge::with_opts(opts(
                    "vllm:num_requests_waiting",
                    "Number of requests waiting to be processed.",
                ))?,
            )?,
            kv_usage: register(
                &r,
                Gauge::with_opts(opts(
                    "vllm:kv_cache_usage_perc",
                    "KV-cache usage. 1 means 100 percent usage.",
                ))?,
            )?,
            prefix_queries: register(
                &r,
                IntCounter::with_opts(opts(
                    "vllm:prefix_cache_queries_total",
                    "Prefix cache queries, in terms of number of queried tokens.",
                ))?,
            )?,
            prefix_hits: register(
                &r,
                IntCounter::with_opts(opts(
                    "vllm:prefix_cache_hits_total",
                    "Prefix cache hits, in terms of number of cached tokens.",
                ))?,
            )?,
            prompt_tokens: register(
                &r,
                IntCounter::with_opts(opts(
                    "vllm:prompt_tokens_total",
                    "Number of prefill tokens processed.",
                ))?,
            )?,
            generation_tokens: register(
                &r,
                IntCounter::with_opts(opts(
                    "vllm:generation_tokens_total",
                    "Number of generation tokens processed.",
                ))?,
            )?,
            finished: [
                reason(FINISH_REASONS[0])?,
                reason(FINISH_REASONS[1])?,
                reason(FINISH_REASONS[2])?,
            ],
            ttft: register(
                &r,
                hist(
                    "vllm:time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                    &TTFT_BUCKETS,
                )?,
            )?,
            e2e: register(
                &r,
                hist(
                    "vllm:e2e_request_latency_seconds",
                    "Histogram of e2e request latency in seconds.",
                    &E2E_BUCKETS,
                )?,
            )?,
            queue_time: register(
                &r,
                hist(
                    "vllm:request_queue_time_seconds",
                    "Histogram of time spent in WAITING phase for request.",
                    &E2E_BUCKETS,
                )?,
            )?,
            registry: r,
            lora: None,
            model: model.to_owned(),
        })
    }

    /// Adds the LoRA families for a pod serving `adapters` in `max_loras`
    /// slots. `vllm:lora_requests_info` has no series until the first
    /// request, as in vLLM; the counters start at 0 for every adapter.
    pub fn enable_lora(&mut self, adapters: &[String], max_loras: usize) -> prometheus::Result<()> {
        let model = self.model.as_str();
        let r = &self.registry;
        let info = register(
            r,
            GaugeVec::new(
                Opts::new(LORA_INFO, "Running stats on lora requests."),
                &["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )?,
        )?;
        let counter = |name: &str, help: &str| -> prometheus::Result<Vec<IntCounter>> {
            let vec = register(
                r,
                IntCounterVec::new(
                    Opts::new(name, help)
                        .const_label("engine", "0")
                        .const_label("model_name", model),
                    &["adapter"],
                )?,
            )?;
            adapters
                .iter()
                .map(|a| vec.get_metric_with_label_values(&[a]))
                .collect()
        };
        let loads = counter(
            LORA_LOADS,
            "Adapter loads into a LoRA slot (vllm-sim's own metric, not vLLM's).",
        )?;
        let evictions = counter(
            LORA_EVICTIONS,
            "Idle adapters evicted from a LoRA slot to load another (vllm-sim's own metric, not vLLM's).",
        )?;
        self.lora = Some(LoraMetrics {
            info,
            max_lora: max_loras.to_string(),
            adapters: adapters.to_vec(),
            loads,
            evictions,
            series: Mutex::new(LoraSeries::default()),
        });
        Ok(())
    }

    /// Puts the KV-event publisher's counters on this pod's page.
    pub fn register_kv_events(&mut self, c: &KvEventCounters) -> prometheus::Result<()> {
        for counter in [&c.published, &c.dropped, &c.replayed, &c.bad_requests] {
            register(&self.registry, counter.clone())?;
        }
        Ok(())
    }

    /// Adapter `adapter` was loaded into a slot, evicting `evicted`.
    pub fn lora_loaded(&self, adapter: usize, evicted: Option<usize>) {
        if let Some(l) = &self.lora {
            if let Some(c) = l.loads.get(adapter) {
                c.inc();
            }
            if let Some(c) = evicted.and_then(|e| l.evictions.get(e)) {
                c.inc();
            }
        }
    }

    /// The engine's adapter sets changed (bitmasks over adapter indices):
    /// `running` has admitted requests, `waiting` queued ones.
    pub fn lora_state(&self, running: u64, waiting: u64) {
        if let Some(l) = &self.lora {
            l.observe(running, waiting);
        }
    }

    /// A request was admitted after `queued` in the waiting queue; its
    /// prompt of `prompt_tokens` found `cached_tokens` in the prefix cache.
    pub fn admitted(&self, prompt_tokens: usize, cached_tokens: usize, queued: Duration) {
        self.prefix_queries.inc_by(prompt_tokens as u64);
        self.prefix_hits.inc_by(cached_tokens as u64);
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.queue_time.observe(queued.as_secs_f64());
    }

    /// A request generated all its tokens.
    pub fn finished(&self, ttft: Duration, e2e: Duration, generated: usize) {
        self.finished[LENGTH].inc();
        self.generation_tokens.inc_by(generated as u64);
        self.ttft.observe(ttft.as_secs_f64());
        self.e2e.observe(e2e.as_secs_f64());
    }

    /// An admitted request's client went away after `generated` tokens.
    pub fn aborted(&self, generated: usize) {
        self.finished[ABORT].inc();
        self.generation_tokens.inc_by(generated as u64);
    }

    /// The text exposition with the gauges set to `g`; with `names`, only
    /// the families that have one of those sample names.
    pub fn render(&self, g: Gauges, names: Option<&[String]>) -> prometheus::Result<String> {
        self.running
            .set(i64::try_from(g.running).unwrap_or(i64::MAX));
        self.waiting
            .set(i64::try_from(g.waiting).unwrap_or(i64::MAX));
        self.kv_usage.set(g.kv_usage);
        if let Some(l) = &self.lora
            && g.running + g.waiting > 0
        {
            l.refresh();
        }
        let mut families = self.registry.gather();
        if let Some(names) = names {
            families.retain(|f| crate::prom::family_requested(f, names));
        }
        let mut out = String::with_capacity(if names.is_some() { 1024 } else { 8 * 1024 });
        TextEncoder::new().encode_utf8(&families, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(page: &str, name: &str) -> f64 {
        crate::prom::sum(page, name)
            .unwrap()
            .unwrap_or_else(|| panic!("no {name} on\n{page}"))
    }

    /// What the server sends for the picker's `name[]` filter: the same
    /// signals in a fraction of the page.
    #[test]
    fn the_name_filtered_page_carries_the_picker_signals() {
        let m = PodMetrics::new("m", 16, 4096).unwrap();
        let g = Gauges {
            running: 3,
            waiting: 2,
            kv_usage: 0.5,
        };
        let text = m.render(g, None).unwrap();
        let vllm = epp::scrape::EngineMapping::vllm();
        let q = epp::scrape::name_filter_query(&vllm);
        let names = crate::prom::requested_names(Some(&q)).unwrap();
        let small = m.render(g, Some(&names)).unwrap();
        // waiting, running, KV usage and cache_config_info: HELP, TYPE, one
        // sample each (the deprecated gpu_cache_usage_perc is not exported).
        assert_eq!(small.lines().count(), 12, "{small}");
        assert!(
            small.len() * 10 < text.len(),
            "{} of {}",
            small.len(),
            text.len()
        );
        let full = epp::scrape::extract(text.as_bytes(), &vllm).unwrap();
        assert_eq!(epp::scrape::extract(small.as_bytes(), &vllm).unwrap(), full);
        assert_eq!((full.waiting, full.running, full.num_blocks), (2, 3, 4096));
        assert_eq!(full.kv_usage, 0.5);
        let (_, found) = epp::scrape::extract_signals(small.as_bytes(), &vllm).unwrap();
        assert_eq!(
            found,
            vllm.signals(),
            "every signal is on the filtered page"
        );
    }

    #[test]
    fn a_filter_keeps_a_histogram_for_any_of_its_series() {
        let m = PodMetrics::new("m", 16, 4096).unwrap();
        let g = Gauges {
            running: 0,
            waiting: 0,
            kv_usage: 0.0,
        };
        let only = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            m.render(g, Some(&names)).unwrap()
        };
        let page = only(&["vllm:time_to_first_token_seconds_count", "nope"]);
        assert!(page.starts_with("# HELP vllm:time_to_first_token_seconds "));
        assert_eq!(
            page.lines()
                .filter(|l| l.starts_with("# TYPE"))
                .collect::<Vec<_>>(),
            ["# TYPE vllm:time_to_first_token_seconds histogram"]
        );
        assert_eq!(
            only(&["vllm:time_to_first_token_seconds"]),
            "",
            "a histogram's own name is none of its sample names"
        );
        assert_eq!(only(&["nope"]), "");
    }

    /// The LoRA families: none of them without adapters; vLLM's gauge with
    /// its three labels and a Unix-time value that grows with each new
    /// state, old states kept up to the cap; our counters per adapter.
    #[test]
    fn lora_families_follow_vllm() {
        let g = Gauges {
            running: 1,
            waiting: 0,
            kv_usage: 0.0,
        };
        let plain = PodMetrics::new("m", 16, 4096).unwrap();
        assert!(!plain.render(g, None).unwrap().contains("lora"));
        let mut m = PodMetrics::new("m", 16, 4096).unwrap();
        let adapters: Vec<String> = (0..40).map(|i| format!("a{i}")).collect();
        m.enable_lora(&adapters, 2).unwrap();
        let text = m.render(g, None).unwrap();
        assert!(
            !text.contains(LORA_INFO),
            "no series before the first request"
        );
        assert_eq!(sum(&text, LORA_LOADS), 0.0);
        m.lora_state(0b1, 0b110);
        m.lora_loaded(0, None);
        m.lora_loaded(2, Some(0));
        let newest = |text: &str| {
            epp::scrape::samples(text.as_bytes())
                .map(Result::unwrap)
                .filter(|s| s.name() == LORA_INFO.as_bytes())
                .map(|s| {
                    let l = |n: &[u8]| String::from_utf8(s.label(n).unwrap().to_vec()).unwrap();
                    (
                        s.value(),
                        l(b"running_lora_adapters"),
                        l(b"waiting_lora_adapters"),
                        l(b"max_lora"),
                    )
                })
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap()
        };
        let first = newest(&m.render(g, None).unwrap());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - first.0).abs() < 60.0, "a Unix time: {}", first.0);
        assert_eq!(
            (&first.1[..], &first.2[..], &first.3[..]),
            ("a0", "a1,a2", "2")
        );
        // Rendering while busy stamps the current state again.
        let again = newest(&m.render(g, None).unwrap());
        assert!(again.0 > first.0 && again.1 == first.1);
        m.lora_state(0b100, 0);
        let text = m.render(g, None).unwrap();
        assert_eq!(newest(&text).1, "a2");
        assert!(text.contains(r#"running_lora_adapters="a0",waiting_lora_adapters="a1,a2""#));
        for i in 0..40 {
            m.lora_state(1 << i, 0);
        }
        let text = m.render(g, None).unwrap();
        assert_eq!(
            text.matches("vllm:lora_requests_info{").count(),
            LORA_INFO_SERIES_KEPT
        );
        assert_eq!(newest(&text).1, "a39");
        // Going back to an earlier state makes its series the newest again.
        m.lora_state(1 << 20, 0);
        assert_eq!(newest(&m.render(g, None).unwrap()).1, "a20");
        assert!(text.contains("\n# TYPE vllm:lora_requests_info gauge\n"));
        assert!(text.contains("\n# TYPE vllm_sim_lora_adapter_loads_total counter\n"));
        let text = m.render(g, None).unwrap();
        assert_eq!(sum(&text, LORA_LOADS), 2.0);
        assert_eq!(sum(&text, LORA_EVICTIONS), 1.0);
        assert!(text.contains(
            r#"vllm_sim_lora_adapter_evictions_total{adapter="a0",engine="0",model_name="m"} 1"#
        ));
    }

    #[test]
    fn renders_vllm_names_labels_and_counts() {
        let m = PodMetrics::new("Qwen/Qwen2.5-3B-Instruct", 16, 8192).unwrap();
        m.admitted(60, 28, Duration::from_millis(5));
        m.admitted(40, 20, Duration::ZERO);
        m.finished(Duration::from_millis(30), Duration::from_millis(450), 8);
        m.finished(Duration::from_millis(700), Duration::from_secs(2), 8);
        m.aborted(3);
        let g = Gauges {
            running: 2,
            waiting: 1,
            kv_usage: 0.25,
        };
        let text = m.render(g, None).unwrap();
        assert_eq!(sum(&text, "vllm:num_requests_running"), 2.0);
        assert_eq!(sum(&text, "vllm:num_requests_waiting"), 1.0);
        assert_eq!(sum(&text, "vllm:kv_cache_usage_perc"), 0.25);
        assert_eq!(sum(&text, "vllm:prefix_cache_queries_total"), 100.0);
        assert_eq!(sum(&text, "vllm:prefix_cache_hits_total"), 48.0);
        assert_eq!(sum(&text, "vllm:prompt_tokens_total"), 100.0);
        assert_eq!(sum(&text, "vllm:generation_tokens_total"), 19.0);
        assert_eq!(sum(&text, "vllm:request_success_total"), 3.0);
        assert_eq!(sum(&text, "vllm:time_to_first_token_seconds_count"), 2.0);
        assert_eq!(sum(&text, "vllm:e2e_request_latency_seconds_count"), 2.0);
        assert_eq!(sum(&text, "vllm:request_queue_time_seconds_count"), 2.0);
        assert!((sum(&text, "vllm:e2e_request_latency_seconds_sum") - 2.45).abs() < 1e-9);
        for (name, kind) in [
            ("vllm:prefix_cache_hits_total", "counter"),
            ("vllm:request_success_total", "counter"),
            ("vllm:num_requests_running", "gauge"),
            ("vllm:cache_config_info", "gauge"),
            ("vllm:time_to_first_token_seconds", "histogram"),
            ("vllm:e2e_request_latency_seconds", "histogram"),
            ("vllm:request_queue_time_seconds", "histogram"),
        ] {
            assert!(
                text.contains(&format!("\n# TYPE {name} {kind}\n")),
                "{name} {kind}"
            );
        }
        let samples: Vec<_> = epp::scrape::samples(text.as_bytes())
            .map(Result::unwrap)
            .collect();
        let by_reason = |reason: &str| {
            samples
                .iter()
                .find(|s| {
                    s.name() == b"vllm:request_success_total"
                        && s.has_label(b"finished_reason", reason.as_bytes())
                })
                .map(|s| s.value())
        };
        assert_eq!(
            FINISH_REASONS.map(by_reason),
            [Some(0.0), Some(2.0), Some(1.0)]
        );
        let info = samples
            .iter()
            .find(|s| s.name() == b"vllm:cache_config_info")
            .unwrap();
        assert_eq!(info.label(b"block_size"), Some(&b"16"[..]));
        assert_eq!(info.label(b"num_gpu_blocks"), Some(&b"8192"[..]));
        assert!(info.has_label(b"enable_prefix_caching", b"True"));
        assert_eq!(info.value(), 1.0);
        for s in samples
            .iter()
            .filter(|s| s.name() != b"vllm:cache_config_info")
        {
            assert!(
                s.has_label(b"model_name", b"Qwen/Qwen2.5-3B-Instruct")
                    && s.has_label(b"engine", b"0"),
                "{:?}",
                String::from_utf8_lossy(s.name())
            );
        }
        // Every bound is a bucket; `le` is inclusive and buckets cumulative.
        let ttft: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name() == b"vllm:time_to_first_token_seconds_bucket")
            .map(|s| {
                let le = std::str::from_utf8(s.label(b"le").unwrap()).unwrap();
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, s.value())
            })
            .collect();
        assert_eq!(ttft.len(), TTFT_BUCKETS.len() + 1);
        assert!(ttft.iter().zip(TTFT_BUCKETS).all(|((le, _), b)| *le == b));
        let count_upto = |bound: f64| ttft.iter().find(|(le, _)| *le == bound).unwrap().1;
        assert_eq!(count_upto(0.02), 0.0);
        assert_eq!(count_upto(0.04), 1.0);
        assert_eq!(count_upto(0.75), 2.0);
        assert_eq!(count_upto(f64::INFINITY), 2.0);
    }
}
