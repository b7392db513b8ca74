//! Prometheus text pages as a model server (or anything answering on its
//! metrics port) could serve them, through every built-in engine mapping and
//! one mapping whose metric selector comes from the input itself.
//!
//! Input: the page. If its first line starts with `#spec `, the rest of that
//! line is parsed as a metric selector (as in a config file's engine
//! mapping) and used for every signal. Checks, beyond "no panic": KV usage is
//! a finite fraction in 0..=1, and a page is read the same with CRLF line
//! endings.
#![no_main]

use epp::scrape::{EngineMapping, MetricSpec, extract};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|page: &[u8]| {
    let mut mappings = vec![
        EngineMapping::vllm(),
        EngineMapping::sglang(),
        EngineMapping::trtllm_serve(),
        EngineMapping::triton_trtllm(),
    ];
    if let Some(rest) = page.strip_prefix(b"#spec ") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        if let Ok(text) = std::str::from_utf8(line)
            && let Ok(spec) = MetricSpec::parse(text)
        {
            let mut m = EngineMapping::vllm();
            m.name = "fuzz".into();
            m.queued = Some(spec.clone());
            m.running = Some(spec.clone());
            m.kv_usage = vec![spec.clone(); 6];
            m.block_size = Some(spec.clone());
            m.num_blocks = Some(spec);
            mappings.push(m);
        }
    }
    // Servers behind some proxies answer with CRLF; only pages without a
    // stray CR can be converted without changing their meaning.
    let crlf = (!page.contains(&b'\r')).then(|| {
        let mut v = Vec::with_capacity(page.len() * 2);
        for &b in page {
            if b == b'\n' {
                v.push(b'\r');
            }
            v.push(b);
        }
        v
    });
    for m in &mappings {
        let _ = m.describe();
        let result = extract(page, m);
        if let Ok(s) = &result {
            assert!(
                s.kv_usage.is_finite() && (0.0..=1.0).contains(&s.kv_usage),
                "kv usage {} out of range",
                s.kv_usage
            );
        }
        if let Some(crlf) = &crlf {
            assert_eq!(
                result,
                extract(crlf, m),
                "CRLF line endings changed the result"
            );
        }
    }
});
