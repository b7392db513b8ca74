//! Prometheus text exposition (format 0.0.4): a histogram type and a writer for
//! the simulator, and a strict parser for the load generator (which reads the
//! pods' counters) and for tests (which check that what the simulator writes
//! is well-formed).
//!
//! The parser enforces what standard scrapers reject: names and label syntax,
//! one `# TYPE` per family placed before its samples, samples belonging to a
//! declared family, and for histograms an `le` label on every bucket,
//! cumulative bucket counts, and a `+Inf` bucket equal to `_count`.

use std::collections::HashMap;
use std::fmt::Write as _;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PromError {
    #[error("line {line}: {msg}")]
    Syntax { line: usize, msg: String },
    #[error("histogram {family}: {msg}")]
    Histogram { family: String, msg: String },
}

/// A cumulative-bucket histogram with fixed upper bounds (without `+Inf`).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bound; one extra slot for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Writes `_bucket`, `_sum` and `_count` lines; `labels` is the label set
    /// without braces (e.g. `engine="0",model_name="m"`).
    pub fn write(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        header(out, name, help, "histogram");
        let mut cum = 0u64;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{}\"}} {cum}",
                fmt_f64(*b)
            );
        }
        cum += self.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", fmt_f64(self.sum));
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// `# HELP` and `# TYPE` lines of one family.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line.
pub fn sample(out: &mut String, name: &str, labels: &str, value: f64) {
    let _ = writeln!(out, "{name}{{{labels}}} {}", fmt_f64(value));
}

/// Floats the way Python's client prints them (`1.0`, `0.25`, `+Inf`), which
/// every parser accepts.
pub fn fmt_f64(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned();
    }
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Escapes a label value.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// The metric names a scrape asks for with `name[]=...` (repeated), decoded
/// as Python's `parse_qs` does (`%XX`, `+` for a space, blank values
/// dropped); `None` when the query asks for no name, which means the whole
/// page. This is how prometheus_client's `make_asgi_app` (vLLM, SGLang)
/// reads the query.
pub fn requested_names(query: Option<&str>) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for pair in query?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if form_decode(k) == "name[]" && !v.is_empty() {
            names.push(form_decode(v));
        }
    }
    (!names.is_empty()).then_some(names)
}

fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 1 < b.len() => match (hex(b[i + 1]), b.get(i + 2).copied().and_then(hex)) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                // Not an escape: kept as it is, like Python's unquote.
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The page as prometheus_client serves it for `name[]` filters: only the
/// samples whose names are listed, each kept family with its `# HELP` and
/// `# TYPE` lines, families without a listed sample left out.
pub fn restrict(page: &str, names: &[String]) -> String {
    let mut out = String::new();
    // HELP/TYPE lines of the current family, written before its first kept sample.
    let mut head = String::new();
    let mut family = "";
    let mut head_written = false;
    for line in page.split_inclusive('\n') {
        let text = line.trim_end_matches(['\n', '\r']);
        if let Some(rest) = text
            .strip_prefix("# HELP ")
            .or_else(|| text.strip_prefix("# TYPE "))
        {
            let name = rest.split(' ').next().unwrap_or("");
            if name != family {
                family = name;
                head.clear();
                head_written = false;
            }
            head.push_str(text);
            head.push('\n');
            continue;
        }
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let name = text.split(['{', ' ']).next().unwrap_or("");
        if names.iter().any(|n| n == name) {
            if !head_written {
                out.push_str(&head);
                head_written = true;
            }
            out.push_str(text);
            out.push('\n');
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name to declared type.
    pub types: HashMap<String, String>,
}

impl Scrape {
    /// Sum of every sample named `name` (across label sets).
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in self.samples.iter().filter(|s| s.name == name) {
            found = true;
            total += s.value;
        }
        found.then_some(total)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// The family a sample name belongs to, given the declared families.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count", "_total", "_created"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.contains_key(base)
        {
            return Some(base);
        }
    }
    None
}

/// Parses and validates a whole exposition.
pub fn parse(text: &str) -> Result<Scrape, PromError> {
    let mut scrape = Scrape::default();
    let mut seen_samples_of: HashMap<String, bool> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |msg: &str| PromError::Syntax {
            line: line_no,
            msg: msg.to_owned(),
        };
        let line = raw.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().ok_or_else(|| err("TYPE without a name"))?;
                    let kind = parts.next().ok_or_else(|| err("TYPE without a type"))?;
                    if !is_metric_name(name) {
                        return Err(err("bad metric name in TYPE"));
                    }
                    if !matches!(
                        kind,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(err("unknown metric type"));
                    }
                    if scrape.types.contains_key(name) {
                        return Err(err("second TYPE line for one family"));
                    }
                    if seen_samples_of.contains_key(name) {
                        return Err(err("TYPE after the family's samples"));
                    }
                    scrape.types.insert(name.to_owned(), kind.to_owned());
                }
                Some("HELP") => {
                    let name = parts.next().ok_or_else(|| err("HELP without a name"))?;
                    if !is_metric_name(name) {
                        return Err(err("bad metric name in HELP"));
                    }
                }
                _ => {} // plain comment
            }
            continue;
        }
        let s = parse_sample(line).map_err(|m| err(&m))?;
        let family = family_of(&s.name, &scrape.types)
            .ok_or_else(|| err(&format!("sample {} has no TYPE", s.name)))?
            .to_owned();
        seen_samples_of.insert(family, true);
        scrape.samples.push(s);
    }
    check_histograms(&scrape)?;
    Ok(scrape)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("sample without a value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            // Label name up to '='.
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            match chars.peek() {
                Some((j, '}')) => {
                    end = Some(*j);
                    break;
                }
                None => break,
                _ => {}
            }
            let start = chars.peek().map(|(j, _)| *j).unwrap_or(0);
            let mut eq = None;
            for (j, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(j);
                    break;
                }
            }
            let eq = eq.ok_or("label without '='")?;
            let lname = &body[start..eq];
            if !is_label_name(lname) {
                return Err(format!("bad label name {lname:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".to_owned());
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        _ => return Err("bad escape in label value".to_owned()),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err("unterminated label value".to_owned());
            }
            if labels.iter().any(|(k, _)| k == lname) {
                return Err(format!("duplicate label {lname}"));
            }
            labels.push((lname.to_owned(), value));
            match chars.peek() {
                Some((_, ',')) | Some((_, '}')) => {}
                _ => return Err("expected ',' or '}' after a label".to_owned()),
            }
        }
        let end = end.ok_or("unterminated label set")?;
        rest = &body[end + 1..];
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("sample without a value")?;
    let value = parse_value(value).ok_or_else(|| format!("bad value {value:?}"))?;
    if let Some(ts) = fields.next()
        && ts.parse::<i64>().is_err()
    {
        return Err(format!("bad timestamp {ts:?}"));
    }
    if fields.next().is_some() {
        return Err("trailing fields".to_owned());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A label set without `le`: identifies one histogram series.
type Labels = Vec<(String, String)>;
/// (le, cumulative count) per bucket, and `_count`.
type Series = (Vec<(f64, f64)>, Option<f64>);

fn check_histograms(scrape: &Scrape) -> Result<(), PromError> {
    for (family, kind) in &scrape.types {
        if kind != "histogram" {
            continue;
        }
        let herr = |msg: String| PromError::Histogram {
            family: family.clone(),
            msg,
        };
        // Group by the label set without `le`.
        let mut series: HashMap<Labels, Series> = HashMap::new();
        let bucket = format!("{family}_bucket");
        let count = format!("{family}_count");
        for s in &scrape.samples {
            if s.name == bucket {
                let le = s
                    .label("le")
                    .ok_or_else(|| herr("bucket without le".into()))?;
                let le = parse_value(le).ok_or_else(|| herr(format!("bad le {le:?}")))?;
                let key: Vec<_> = s
                    .labels
                    .iter()
                    .filter(|(k, _)| k != "le")
                    .cloned()
                    .collect();
                series.entry(key).or_default().0.push((le, s.value));
            } else if s.name == count {
                series.entry(s.labels.clone()).or_default().1 = Some(s.value);
            }
        }
        for (key, (buckets, total)) in series {
            let mut prev_le = f64::NEG_INFINITY;
            let mut prev_v = 0.0;
            for (le, v) in &buckets {
                if *le <= prev_le {
                    return Err(herr(format!("{key:?}: le not increasing")));
                }
                if *v < prev_v {
                    return Err(herr(format!("{key:?}: buckets not cumulative")));
                }
                prev_le = *le;
                prev_v = *v;
            }
            let Some(&(last_le, last_v)) = buckets.last() else {
                return Err(herr(format!("{key:?}: no buckets")));
            };
            if last_le != f64::INFINITY {
                return Err(herr(format!("{key:?}: no +Inf bucket")));
            }
            match total {
                Some(t) if t == last_v => {}
                _ => return Err(herr(format!("{key:?}: _count differs from +Inf bucket"))),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured_vllm_page() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/metrics/vllm-metrics-inferstack.txt"
        );
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn requested_names_are_read_like_parse_qs() {
        assert_eq!(requested_names(None), None);
        assert_eq!(requested_names(Some("")), None);
        assert_eq!(requested_names(Some("foo=1&name=x")), None);
        assert_eq!(
            requested_names(Some("name[]=")),
            None,
            "blank values are dropped"
        );
        assert_eq!(
            requested_names(Some(
                "name%5B%5D=vllm%3Aa&name[]=vllm:b&x=1&name%5b%5d=c+d%2"
            )),
            Some(vec!["vllm:a".into(), "vllm:b".into(), "c d%2".into()])
        );
    }

    #[test]
    fn restrict_keeps_listed_samples_with_their_family_headers() {
        let page = captured_vllm_page();
        let names = requested_names(Some(&epp::scrape::name_filter_query(
            &epp::scrape::EngineMapping::vllm(),
        )))
        .unwrap();
        let small = restrict(&page, &names);
        let lines: Vec<&str> = small.lines().collect();
        // waiting, running, KV usage and cache_config_info (gpu_cache_usage_perc,
        // the deprecated name, is not on this page): HELP, TYPE, one sample each.
        assert_eq!(lines.len(), 12, "{small}");
        for name in [
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:cache_config_info",
        ] {
            assert!(
                lines.contains(&format!("# TYPE {name} gauge").as_str()),
                "{name}"
            );
            assert_eq!(
                lines
                    .iter()
                    .filter(|l| l.starts_with(&format!("{name}{{")))
                    .count(),
                1,
                "{name}"
            );
        }
        assert!(small.len() < 2_000, "{} bytes", small.len());
        assert!(page.len() > 50_000);
        // Well-formed, and the picker reads the same signals from it.
        parse(&small).unwrap();
        let vllm = epp::scrape::EngineMapping::vllm();
        assert_eq!(
            epp::scrape::extract(small.as_bytes(), &vllm).unwrap(),
            epp::scrape::extract(page.as_bytes(), &vllm).unwrap()
        );
        let (_, found) = epp::scrape::extract_signals(small.as_bytes(), &vllm).unwrap();
        assert_eq!(
            found,
            vllm.signals(),
            "every signal is on the filtered page"
        );
    }

    #[test]
    fn restrict_matches_sample_names_not_family_names() {
        let page = captured_vllm_page();
        let small = restrict(
            &page,
            &[
                "vllm:time_to_first_token_seconds_count".to_owned(),
                "nope".to_owned(),
            ],
        );
        let lines: Vec<&str> = small.lines().collect();
        assert_eq!(lines.len(), 3, "{small}");
        assert!(lines[0].starts_with("# HELP vllm:time_to_first_token_seconds "));
        assert_eq!(
            lines[1],
            "# TYPE vllm:time_to_first_token_seconds histogram"
        );
        assert!(lines[2].starts_with("vllm:time_to_first_token_seconds_count{"));
        // A family's own name matches nothing when its samples are suffixed.
        assert_eq!(
            restrict(&page, &["vllm:time_to_first_token_seconds".to_owned()]),
            ""
        );
    }

    #[test]
    fn histogram_round_trip() {
        static B: [f64; 3] = [0.1, 0.5, 1.0];
        let mut h = Histogram::new(&B);
        for v in [0.05, 0.1, 0.3, 2.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.write(&mut out, "x_seconds", "help", "a=\"b\"");
        let p = parse(&out).unwrap();
        let b: Vec<f64> = p
            .samples
            .iter()
            .filter(|s| s.name == "x_seconds_bucket")
            .map(|s| s.value)
            .collect();
        assert_eq!(b, vec![2.0, 3.0, 3.0, 4.0], "le is inclusive, cumulative");
        assert_eq!(p.sum("x_seconds_count"), Some(4.0));
        assert!((p.sum("x_seconds_sum").unwrap() - 2.45).abs() < 1e-9);
    }

    #[test]
    fn rejects_malformed() {
        assert!(parse("x 1\n").is_err(), "no TYPE");
        assert!(parse("# TYPE x gauge\nx{a=b} 1\n").is_err());
        assert!(parse("# TYPE x gauge\nx{a=\"b\" 1\n").is_err());
        assert!(parse("# TYPE x gauge\nx{a=\"b\"} one\n").is_err());
        let bad_hist =
            "# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n";
        assert!(parse(bad_hist).is_err());
        let no_inf = "# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_count 2\n";
        assert!(parse(no_inf).is_err());
    }

    #[test]
    fn parses_escapes_and_sums() {
        let text = "# HELP c_total things\n# TYPE c_total counter\nc_total{a=\"x\\\"y\",b=\"\"} 2.0\nc_total{a=\"z\"} 3 1700000000\n";
        let p = parse(text).unwrap();
        assert_eq!(p.samples[0].label("a"), Some("x\"y"));
        assert_eq!(p.sum("c_total"), Some(5.0));
        assert_eq!(p.sum("missing"), None);
    }

    #[test]
    fn formats_like_python_client() {
        assert_eq!(fmt_f64(1.0), "1.0");
        assert_eq!(fmt_f64(0.25), "0.25");
        assert_eq!(fmt_f64(f64::INFINITY), "+Inf");
        assert_eq!(escape_label("a\"b\\"), "a\\\"b\\\\");
    }
}
