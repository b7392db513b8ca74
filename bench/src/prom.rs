//! Prometheus pages on the bench's side of a scrape: the `name[]` filter
//! the bench's servers honour, and sums read off a page.
//!
//! The filter is vLLM's: prometheus_client's `make_asgi_app` keeps the
//! samples whose names are listed (`?name[]=a&name[]=b`). The simulator
//! applies it to the families gathered from its registry
//! ([`family_requested`]); the static perf backends, which serve a captured
//! page they do not model, apply it to the text ([`restrict`]).
//!
//! Reading goes through the picker's own parser ([`epp::scrape::samples`]),
//! so the bench and the picker cannot disagree about what a page says.

use epp::scrape::ParseError;
use prometheus::proto::{MetricFamily, MetricType};

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

/// Whether the filter keeps `family`: one of its sample names is listed.
///
/// prometheus_client filters samples, so asking for a histogram's `_count`
/// alone gets only that series; an encoded family always carries all of its
/// series, so here the whole histogram is kept. Nothing that scrapes the
/// simulator asks for part of a histogram (the picker asks for gauges).
pub fn family_requested(family: &MetricFamily, names: &[String]) -> bool {
    let suffixes: &[&str] = match family.get_field_type() {
        MetricType::COUNTER | MetricType::GAUGE | MetricType::UNTYPED => &[""],
        MetricType::HISTOGRAM => &["_bucket", "_sum", "_count"],
        MetricType::SUMMARY => &["", "_sum", "_count"],
    };
    let name = family.name();
    names.iter().any(|n| {
        n.strip_prefix(name)
            .is_some_and(|suffix| suffixes.contains(&suffix))
    })
}

/// `page` as prometheus_client serves it for `name[]` filters: only the
/// samples whose names are listed, each kept family with its `# HELP` and
/// `# TYPE` lines, families without a listed sample left out. A line filter,
/// not a parser: it reads no more of a line than its metric name.
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

/// Sum of every sample named `name` (across label sets), `None` when the
/// page has none. A malformed line anywhere on the page is an error: a sum
/// that silently skipped a series would be wrong without saying so.
pub fn sum(page: &str, name: &str) -> Result<Option<f64>, ParseError> {
    let mut total = None;
    for sample in epp::scrape::samples(page.as_bytes()) {
        let sample = sample?;
        if sample.name() == name.as_bytes() {
            *total.get_or_insert(0.0) += sample.value();
        }
    }
    Ok(total)
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
    fn families_are_kept_by_their_sample_names() {
        let family = |name: &str, kind: MetricType| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_owned());
            f.set_field_type(kind);
            f
        };
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let gauge = family("g", MetricType::GAUGE);
        assert!(family_requested(&gauge, &names(&["x", "g"])));
        assert!(!family_requested(&gauge, &names(&["g_count", "gg"])));
        let hist = family("h", MetricType::HISTOGRAM);
        for series in ["h_bucket", "h_sum", "h_count"] {
            assert!(family_requested(&hist, &names(&[series])), "{series}");
        }
        assert!(!family_requested(&hist, &names(&["h", "h_total"])));
        let summary = family("s", MetricType::SUMMARY);
        assert!(family_requested(&summary, &names(&["s"])));
        assert!(family_requested(&summary, &names(&["s_sum"])));
        assert!(!family_requested(&summary, &names(&["s_bucket"])));
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
        // The picker reads the same signals from it.
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
    fn sums_every_series_of_a_name() {
        let page = "# TYPE c_total counter\nc_total{a=\"x\\\"y\",b=\"\"} 2.0\nc_total{a=\"z\"} 3 1700000000\nc_created 5\n";
        assert_eq!(sum(page, "c_total"), Ok(Some(5.0)));
        assert_eq!(sum(page, "c"), Ok(None));
        assert_eq!(sum(page, "missing"), Ok(None));
        assert!(
            sum("c_total 1\nc_total{a=\"b\" 2\n", "c_total").is_err(),
            "a malformed series is not skipped"
        );
    }
}
