//! Extraction of a few signals from a Prometheus text exposition page.
//!
//! A vLLM /metrics page is ~50 KB and ~600 lines, of which the picker needs
//! five. Scraping every 50 ms across many endpoints makes a general parser
//! (one allocation per sample, a map per label set) the dominant cost, and
//! has caused out-of-memory kills in the Go picker. So this parser never
//! builds a model of the page: it walks lines with memchr, compares each
//! line's metric name with the handful of wanted names, and parses labels
//! and values only for lines that match. It allocates nothing.
//!
//! The same line walker and sample parser are public as [`samples`], for
//! readers that want every sample rather than a mapping's signals (the
//! benchmark tools), so the workspace has one reading of the format.

use super::engines::{EngineMapping, MetricSpec, Signals};
use crate::{
    endpoints::{LoraSeries, MetricsSample},
    text::closing_quote,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("none of the expected metrics ({0}) is on the page")]
    NothingFound(String),
    #[error("malformed sample line for {name}: {line}")]
    Malformed { name: String, line: String },
}

/// Accumulates the samples of one signal across matching series.
#[derive(Debug, Default, Clone, Copy)]
struct Acc {
    sum: f64,
    count: u32,
}

impl Acc {
    fn add(&mut self, v: f64) {
        if v.is_finite() {
            self.sum += v;
            self.count += 1;
        }
    }
}

/// Reads the signals `mapping` describes from `page`. Counts (waiting,
/// running) are summed over matching series, so a data-parallel server that
/// exports one series per engine reports its total; KV usage is averaged.
/// Block size and cache size come from `cache_info` labels or from gauges.
pub fn extract(page: &[u8], mapping: &EngineMapping) -> Result<MetricsSample, ParseError> {
    extract_signals(page, mapping).map(|(sample, _)| sample)
}

/// Like [`extract`], and also says which signals the page carried, so a
/// page filtered by the server can be told from a complete one.
pub fn extract_signals(
    page: &[u8],
    mapping: &EngineMapping,
) -> Result<(MetricsSample, Signals), ParseError> {
    let mut waiting = Acc::default();
    let mut running = Acc::default();
    let mut kv = vec_acc(mapping.kv_usage.len());
    let mut block_size = Acc::default();
    let mut num_blocks = Acc::default();

    for line in Lines(page) {
        let Some(name_end) = name_end(line) else {
            continue;
        };
        let name = &line[..name_end];
        if !mapping.wants(name) {
            continue;
        }
        let sample = Sample::parse(line, name_end).ok_or_else(|| malformed(line, name_end))?;
        if let Some(spec) = &mapping.queued
            && spec.matches(name, &sample)
        {
            waiting.add(sample.value);
        }
        if let Some(spec) = &mapping.running
            && spec.matches(name, &sample)
        {
            running.add(sample.value);
        }
        for (spec, acc) in mapping.kv_usage.iter().zip(kv.iter_mut()) {
            if spec.matches(name, &sample) {
                acc.add(sample.value);
            }
        }
        if let Some(info) = &mapping.cache_info
            && info.spec.matches(name, &sample)
        {
            if let Some(v) = sample.label_number(info.block_size_label.as_bytes()) {
                block_size.add(v);
            }
            if let Some(v) = sample.label_number(info.num_blocks_label.as_bytes()) {
                num_blocks.add(v);
            }
        }
        if let Some(spec) = &mapping.block_size
            && spec.matches(name, &sample)
        {
            block_size.add(sample.value);
        }
        if let Some(spec) = &mapping.num_blocks
            && spec.matches(name, &sample)
        {
            num_blocks.add(sample.value);
        }
    }

    // The first KV spec that matched anything wins (current name before the
    // deprecated one).
    let kv = kv.iter().find(|a| a.count > 0).copied().unwrap_or_default();
    if waiting.count == 0 && running.count == 0 && kv.count == 0 {
        return Err(ParseError::NothingFound(mapping.describe()));
    }
    let mut found = Signals::NONE;
    for (acc, signal) in [
        (&waiting, Signals::WAITING),
        (&running, Signals::RUNNING),
        (&kv, Signals::KV_USAGE),
        (&block_size, Signals::BLOCK_SIZE),
        (&num_blocks, Signals::NUM_BLOCKS),
    ] {
        if acc.count > 0 {
            found = found.with(signal);
        }
    }
    let sample = MetricsSample {
        waiting: to_u32(waiting.sum),
        running: to_u32(running.sum),
        kv_usage: if kv.count > 0 {
            (kv.sum / f64::from(kv.count)).clamp(0.0, 1.0)
        } else {
            0.0
        },
        // Several engines report the same configuration: take one copy.
        block_size: if block_size.count > 0 {
            to_u32(block_size.sum / f64::from(block_size.count))
        } else {
            0
        },
        num_blocks: to_u32(num_blocks.sum),
    };
    Ok((sample, found))
}

fn vec_acc(n: usize) -> smallvec_acc::Accs {
    smallvec_acc::Accs::new(n)
}

/// A tiny fixed-capacity vector so extraction stays allocation-free for the
/// usual one or two KV specs.
mod smallvec_acc {
    use super::Acc;

    const INLINE: usize = 4;

    pub(super) enum Accs {
        Inline([Acc; INLINE], usize),
        Heap(Vec<Acc>),
    }

    impl Accs {
        pub(super) fn new(n: usize) -> Self {
            if n <= INLINE {
                Self::Inline([Acc::default(); INLINE], n)
            } else {
                Self::Heap(vec![Acc::default(); n])
            }
        }

        pub(super) fn iter_mut(&mut self) -> std::slice::IterMut<'_, Acc> {
            match self {
                Self::Inline(a, n) => a[..*n].iter_mut(),
                Self::Heap(v) => v.iter_mut(),
            }
        }

        pub(super) fn iter(&self) -> std::slice::Iter<'_, Acc> {
            match self {
                Self::Inline(a, n) => a[..*n].iter(),
                Self::Heap(v) => v.iter(),
            }
        }
    }
}

fn to_u32(v: f64) -> u32 {
    if v.is_finite() && v > 0.0 {
        v.round().min(f64::from(u32::MAX)) as u32
    } else {
        0
    }
}

struct Lines<'a>(&'a [u8]);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let (line, rest) = match memchr::memchr(b'\n', self.0) {
            Some(i) => (&self.0[..i], &self.0[i + 1..]),
            None => (self.0, &[][..]),
        };
        self.0 = rest;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

/// Where the metric name of a sample line ends, or `None` for a line that
/// carries no sample (blank, a comment, or indented).
fn name_end(line: &[u8]) -> Option<usize> {
    match line.first()? {
        b'#' | b' ' | b'\t' => None,
        _ => Some(memchr::memchr2(b'{', b' ', line).unwrap_or(line.len())),
    }
}

fn malformed(line: &[u8], name_end: usize) -> ParseError {
    ParseError::Malformed {
        name: String::from_utf8_lossy(&line[..name_end]).into_owned(),
        line: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
    }
}

/// Every sample of `page`, in page order, for readers that want more than a
/// mapping's signals (the benchmark's load generator reads the pods'
/// counters with it). It walks lines and parses samples exactly as
/// [`extract`] does, so both read a page the same way, and it allocates
/// nothing: each [`Sample`] borrows from the page.
///
/// Blank, comment and indented lines are skipped, as [`extract`] skips
/// them. Unlike [`extract`], which only looks at the lines it wants, every
/// other line must be a sample (`name[{labels}] value [timestamp]`): a line
/// that is not yields an error in its place and iteration goes on, so a
/// caller summing counters cannot under-count without knowing.
pub fn samples(page: &[u8]) -> Samples<'_> {
    Samples(Lines(page))
}

/// The iterator [`samples`] returns.
pub struct Samples<'a>(Lines<'a>);

impl<'a> Iterator for Samples<'a> {
    type Item = Result<Sample<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        for line in self.0.by_ref() {
            let Some(name_end) = name_end(line) else {
                continue;
            };
            let sample = Sample::parse(line, name_end).filter(|_| name_end > 0);
            return Some(sample.ok_or_else(|| malformed(line, name_end)));
        }
        None
    }
}

/// One sample line, borrowed from the page: metric name, raw label block
/// (without braces) and value. A trailing timestamp is ignored.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    name: &'a [u8],
    labels: &'a [u8],
    value: f64,
}

impl<'a> Sample<'a> {
    fn parse(line: &'a [u8], name_end: usize) -> Option<Self> {
        let mut rest = &line[name_end..];
        let mut labels: &[u8] = &[];
        if rest.first() == Some(&b'{') {
            let close = label_block_end(rest)?;
            labels = &rest[1..close];
            rest = &rest[close + 1..];
        }
        let rest = trim(rest);
        let value_end = rest
            .iter()
            .position(|b| *b == b' ' || *b == b'\t')
            .unwrap_or(rest.len());
        let value = parse_value(&rest[..value_end])?;
        Some(Self {
            name: &line[..name_end],
            labels,
            value,
        })
    }

    /// The metric name as written: a histogram's or summary's series keep
    /// their `_bucket`, `_sum` or `_count` suffix.
    pub fn name(&self) -> &'a [u8] {
        self.name
    }

    /// The sample's value (`NaN` and the infinities included).
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Whether the label block contains `key="value"` exactly (`value` as
    /// written on the page, escapes included).
    pub fn has_label(&self, key: &[u8], value: &[u8]) -> bool {
        self.label(key).is_some_and(|v| v == value)
    }

    /// The value of label `key` as written on the page: escapes (`\"`,
    /// `\\`, `\n`) are left in, which keeps the lookup allocation-free and
    /// does not matter for the numbers and identifiers labels usually hold.
    pub fn label(&self, key: &[u8]) -> Option<&'a [u8]> {
        let mut rest = self.labels;
        loop {
            rest = trim_start(rest);
            if rest.is_empty() {
                return None;
            }
            let eq = memchr::memchr(b'=', rest)?;
            let k = trim(&rest[..eq]);
            let after = trim_start(&rest[eq + 1..]);
            if after.first() != Some(&b'"') {
                return None;
            }
            let end = closing_quote(after, 1)?;
            let v = &after[1..end];
            if k == key {
                return Some(v);
            }
            rest = &after[end + 1..];
            rest = trim_start(rest);
            if rest.first() == Some(&b',') {
                rest = &rest[1..];
            }
        }
    }

    fn label_number(&self, key: &[u8]) -> Option<f64> {
        let v = self.label(key)?;
        std::str::from_utf8(v).ok()?.trim().parse::<f64>().ok()
    }
}

impl MetricSpec {
    pub(super) fn matches(&self, name: &[u8], sample: &Sample<'_>) -> bool {
        name == self.name.as_bytes()
            && self
                .labels
                .iter()
                .all(|(k, v)| sample.has_label(k.as_bytes(), v.as_bytes()))
    }
}

/// Index of the `}` closing a label block that starts at `s[0] == '{'`,
/// honouring quoted values with escapes.
fn label_block_end(s: &[u8]) -> Option<usize> {
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => i = closing_quote(s, i + 1)? + 1,
            b'}' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn parse_value(v: &[u8]) -> Option<f64> {
    match v {
        b"NaN" => Some(f64::NAN),
        b"+Inf" | b"Inf" => Some(f64::INFINITY),
        b"-Inf" => Some(f64::NEG_INFINITY),
        _ => std::str::from_utf8(v).ok()?.parse().ok(),
    }
}

fn trim_start(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    &s[start..]
}

fn trim(s: &[u8]) -> &[u8] {
    let s = trim_start(s);
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &s[..end]
}

/// The newest series of the LoRA gauge `spec` (vLLM's
/// `vllm:lora_requests_info`): the one with the largest value, which vLLM
/// sets to the time it changed; ties keep the first. Its adapter lists and
/// slot count are returned as raw label bytes borrowed from the page.
/// Malformed lines of it are skipped rather than failing the scrape: the
/// load signals on the same page are still good.
pub fn extract_lora<'p>(page: &'p [u8], spec: &MetricSpec) -> Option<LoraSeries<'p>> {
    let name = spec.name.as_bytes();
    let mut newest: Option<(f64, LoraSeries<'p>)> = None;
    for line in Lines(page) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !matches!(rest.first(), Some(b'{' | b' ')) {
            continue;
        }
        let Some(sample) = Sample::parse(line, name.len()) else {
            continue;
        };
        // GIE starts from -1: negative and NaN values never win.
        let floor = newest.as_ref().map_or(-1.0, |(v, _)| *v);
        if !spec.matches(name, &sample) || sample.value.is_nan() || sample.value <= floor {
            continue;
        }
        let label = |key: &[u8]| sample.label(key).unwrap_or_default();
        newest = Some((
            sample.value,
            LoraSeries {
                running: label(b"running_lora_adapters"),
                waiting: label(b"waiting_lora_adapters"),
                max_lora: label(b"max_lora"),
            },
        ));
    }
    newest.map(|(_, series)| series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::engines::EngineMapping;

    /// Real /metrics pages captured from vLLM and SGLang servers
    /// (tests/fixtures/metrics/SOURCES.md says where each comes from).
    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/metrics/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn real_vllm_pages() {
        let vllm = EngineMapping::vllm();
        let s = extract(&fixture("vllm-metrics-inferstack.txt"), &vllm).unwrap();
        assert_eq!(s.waiting, 0);
        assert_eq!(s.running, 0);
        assert_eq!(s.kv_usage, 0.0);
        assert_eq!(s.block_size, 16);
        assert_eq!(s.num_blocks, 20184);

        let s = extract(&fixture("vllm-metrics-hwrouter-loaded.txt"), &vllm).unwrap();
        assert_eq!((s.block_size, s.num_blocks), (16, 22538));
        let s = extract(&fixture("vllm-metrics-hwrouter-idle.txt"), &vllm).unwrap();
        assert_eq!((s.block_size, s.num_blocks), (16, 2452));
    }

    #[test]
    fn signals_say_what_the_page_carried() {
        let vllm = EngineMapping::vllm();
        let (_, found) = extract_signals(&fixture("vllm-metrics-inferstack.txt"), &vllm).unwrap();
        assert_eq!(found, vllm.signals());
        let (_, found) = extract_signals(
            b"vllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.5\n",
            &vllm,
        )
        .unwrap();
        assert_eq!(found, Signals::WAITING.with(Signals::KV_USAGE));
        assert!(vllm.signals().covers(found) && !found.covers(vllm.signals()));
    }

    #[test]
    fn real_sglang_page() {
        let s = extract(
            &fixture("sglang-metrics-sglang-docs.txt"),
            &EngineMapping::sglang(),
        )
        .unwrap();
        assert_eq!(s.running, 162);
        assert_eq!(s.waiting, 2826);
        assert!((s.kv_usage - 0.28).abs() < 1e-9);
    }

    #[test]
    fn vllm_mapping_on_an_sglang_page_finds_nothing() {
        let err = extract(
            &fixture("sglang-metrics-sglang-docs.txt"),
            &EngineMapping::vllm(),
        );
        assert!(matches!(err, Err(ParseError::NothingFound(_))));
    }

    #[test]
    fn sums_engines_and_falls_back_to_the_deprecated_kv_name() {
        let page = b"# HELP x\nvllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2\nvllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 3.0\nvllm:num_requests_running{engine=\"0\"} 1\nvllm:gpu_cache_usage_perc{engine=\"0\"} 0.5\nvllm:gpu_cache_usage_perc{engine=\"1\"} 0.7\n";
        let s = extract(page, &EngineMapping::vllm()).unwrap();
        assert_eq!((s.waiting, s.running), (5, 1));
        assert!((s.kv_usage - 0.6).abs() < 1e-9);
        let page = b"vllm:kv_cache_usage_perc 0.25\nvllm:gpu_cache_usage_perc 0.9\n";
        let s = extract(page, &EngineMapping::vllm()).unwrap();
        assert_eq!(s.kv_usage, 0.25, "the current name wins");
    }

    #[test]
    fn label_matchers_select_series() {
        let mapping = EngineMapping::triton_trtllm();
        let page = b"nv_trt_llm_request_metrics{model=\"m\",request_type=\"waiting\"} 4\nnv_trt_llm_request_metrics{model=\"m\",request_type=\"scheduled\"} 2\nnv_trt_llm_request_metrics{model=\"m\",request_type=\"context\"} 9\nnv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 0.5\nnv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"tokens_per\"} 64\nnv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"} 1000\n";
        let s = extract(page, &mapping).unwrap();
        assert_eq!(
            (s.waiting, s.running, s.block_size, s.num_blocks),
            (4, 2, 64, 1000)
        );
        assert_eq!(s.kv_usage, 0.5);
    }

    #[test]
    fn escaped_label_values_and_timestamps() {
        let page = b"vllm:num_requests_waiting{model_name=\"a \\\"b\\\" } c\",engine=\"0\"} 7 1700000000000\r\nvllm:num_requests_running 1\n";
        let s = extract(page, &EngineMapping::vllm()).unwrap();
        assert_eq!((s.waiting, s.running), (7, 1));
    }

    #[test]
    fn malformed_wanted_lines_are_errors_but_others_are_ignored() {
        assert!(matches!(
            extract(
                b"vllm:num_requests_waiting{engine=\"0\" 3\n",
                &EngineMapping::vllm()
            ),
            Err(ParseError::Malformed { .. })
        ));
        assert!(matches!(
            extract(b"vllm:num_requests_waiting abc\n", &EngineMapping::vllm()),
            Err(ParseError::Malformed { .. })
        ));
        let s = extract(
            b"garbage{{{ line\nvllm:num_requests_running 2\n",
            &EngineMapping::vllm(),
        )
        .unwrap();
        assert_eq!(s.running, 2);
    }

    #[test]
    fn samples_borrow_name_labels_and_value_of_every_sample_line() {
        let page = b"# HELP c_total Things.\n# TYPE c_total counter\nc_total{a=\"x\\\"y\",b=\"\"} 2.0\n\n  indented 9\nc_total{b=\"q\", a=\"z\"} 3 1700000000\r\nup 1\nh_bucket{le=\"+Inf\"} +Inf\n";
        type Read<'a> = (&'a [u8], Option<&'a [u8]>, f64);
        let got: Vec<Read<'_>> = samples(page)
            .map(|s| {
                let s = s.unwrap();
                (s.name(), s.label(b"a"), s.value())
            })
            .collect();
        let want: Vec<Read<'_>> = vec![
            (b"c_total", Some(b"x\\\"y"), 2.0),
            (b"c_total", Some(b"z"), 3.0),
            (b"up", None, 1.0),
            (b"h_bucket", None, f64::INFINITY),
        ];
        assert_eq!(got, want);
        let inf = samples(page).last().unwrap().unwrap();
        assert!(inf.has_label(b"le", b"+Inf"));
        assert!(!inf.has_label(b"le", b"Inf"));
    }

    #[test]
    fn samples_report_each_malformed_line_and_go_on() {
        let page = b"a 1\nb{x=\"1\" 2\nc abc\n{x=\"1\"} 3\nd 4\n";
        let items: Vec<_> = samples(page).collect();
        assert_eq!(items.len(), 5);
        assert!(
            matches!(&items[1], Err(ParseError::Malformed { name, .. }) if name == "b"),
            "unterminated label block"
        );
        assert!(items[2].is_err(), "not a number");
        assert!(items[3].is_err(), "no metric name");
        assert_eq!(items[4].as_ref().map(Sample::value).ok(), Some(4.0));
    }

    #[test]
    fn samples_read_a_real_page_line_for_line() {
        let page = fixture("vllm-metrics-inferstack.txt");
        let sample_lines = Lines(&page)
            .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
            .count();
        let all: Vec<Sample<'_>> = samples(&page).map(Result::unwrap).collect();
        assert_eq!(all.len(), sample_lines);
        let info = all
            .iter()
            .find(|s| s.name() == b"vllm:cache_config_info")
            .unwrap();
        assert_eq!(info.label(b"num_gpu_blocks"), Some(&b"20184"[..]));
        let hits: Vec<f64> = all
            .iter()
            .filter(|s| s.name() == b"vllm:prefix_cache_hits_total")
            .map(Sample::value)
            .collect();
        assert_eq!(hits, [432.0]);
        // The signal lines the picker reads are among them, with the labels
        // its matchers look at.
        let waiting = all
            .iter()
            .find(|s| s.name() == b"vllm:num_requests_waiting")
            .unwrap();
        assert!(waiting.has_label(b"engine", b"0"));
        assert_eq!(waiting.value(), 0.0);
    }

    #[test]
    fn nan_and_negative_values_do_not_poison() {
        let s = extract(
            b"vllm:num_requests_waiting NaN\nvllm:num_requests_running -3\nvllm:kv_cache_usage_perc 7\n",
            &EngineMapping::vllm(),
        )
        .unwrap();
        assert_eq!((s.waiting, s.running), (0, 0));
        assert_eq!(s.kv_usage, 1.0);
    }
}
