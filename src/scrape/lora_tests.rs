//! The LoRA gauge: extraction from real and synthetic pages, and the
//! scraper publishing it into the endpoint only when it changes.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{EndpointScraper, MAX_PAGE_BYTES, client::MetricsClient, *};
use crate::endpoints::{EndpointSpec, LoraSeries};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/metrics/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const FIXTURES: [&str; 3] = [
    "vllm-metrics-inferstack.txt",
    "vllm-metrics-hwrouter-loaded.txt",
    "vllm-metrics-hwrouter-idle.txt",
];

/// Three series as vLLM leaves them on the page: every label combination it
/// ever set, each valued with the time it was set (labels in vLLM's order).
const LORA_SERIES: &str = "# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 1.7580000001e+09
vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"sql-lora,chat-lora\",waiting_lora_adapters=\"tts-lora\"} 1.7580000523e+09
vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"sql-lora\",waiting_lora_adapters=\"\"} 1.7580000234e+09
";

fn lora(page: &[u8]) -> Option<LoraSeries<'_>> {
    extract_lora(page, EngineMapping::vllm().lora.as_ref().unwrap())
}

#[test]
fn captured_vllm_pages_have_no_lora_gauge() {
    // None of the captured servers ran with --enable-lora.
    for name in FIXTURES {
        assert_eq!(lora(&fixture(name)), None, "{name}");
    }
    assert_eq!(lora(&fixture("sglang-metrics-sglang-docs.txt")), None);
}

#[test]
fn the_newest_series_wins_and_other_signals_are_unchanged() {
    for name in FIXTURES {
        let plain = fixture(name);
        let mut page = plain.clone();
        page.extend_from_slice(LORA_SERIES.as_bytes());
        let s = lora(&page).unwrap();
        assert_eq!(
            (s.running, s.waiting, s.max_lora),
            (&b"sql-lora,chat-lora"[..], &b"tts-lora"[..], &b"2"[..]),
            "{name}"
        );
        let vllm = EngineMapping::vllm();
        assert_eq!(
            extract_signals(&page, &vllm).unwrap(),
            extract_signals(&plain, &vllm).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn lora_lines_are_matched_strictly_and_never_fail_a_scrape() {
    let page = b"vllm:lora_requests_info_created 5e9\n\
        vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"a\"} 10\n\
        vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"b\" 20\n\
        vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"c\"} NaN\n\
        vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"d\"} -5\n\
        vllm:num_requests_waiting 1\n";
    let s = lora(page).unwrap();
    assert_eq!((s.running, s.waiting), (&b"a"[..], &b""[..]));
    assert!(extract(page, &EngineMapping::vllm()).is_ok());
    // Ties keep the first; a label selector in the spec narrows the series.
    let tie = b"x{running_lora_adapters=\"a\",engine=\"0\"} 7\nx{running_lora_adapters=\"b\",engine=\"1\"} 7\n";
    let spec = MetricSpec::parse("x").unwrap();
    assert_eq!(extract_lora(tie, &spec).unwrap().running, b"a");
    let spec = MetricSpec::parse("x{engine=\"1\"}").unwrap();
    assert_eq!(extract_lora(tie, &spec).unwrap().running, b"b");
}

#[test]
fn the_lora_spec_is_configurable_and_asked_for_by_name() {
    let cfg = crate::config::EndpointPickerConfig::parse(
        "plugins:\n- type: core-metrics-extractor\n  parameters:\n    engineConfigs:\n    - name: vllm\n      loraSpec: ''\n    - name: custom\n      queuedRequestsSpec: q\n      loraSpec: 'my:lora{pool=\"a\"}'\n",
    )
    .unwrap();
    let s = ScrapeSettings::from_config(&cfg, None, None, None).unwrap();
    assert!(
        s.engines["vllm"].lora.is_none(),
        "an empty spec disables it"
    );
    let custom = &s.engines["custom"];
    assert_eq!(custom.lora.as_ref().unwrap().name, "my:lora");
    assert!(!custom.wants(b"my:lora"), "read by its own pass");
    assert!(name_filter_query(custom).ends_with("name%5B%5D=my%3Alora"));
    assert!(EngineMapping::sglang().lora.is_none());
}

/// Serves `pages[i]` to the i-th request (the last one after that).
async fn serve(pages: Vec<String>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut req = Vec::new();
        let mut served = 0;
        loop {
            if let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                req.drain(..end + 4);
                let page = &pages[served.min(pages.len() - 1)];
                served += 1;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{page}",
                    page.len()
                );
                if sock.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
    });
    addr
}

#[tokio::test]
async fn scrapes_publish_lora_state_only_when_it_changes() {
    let base =
        "vllm:num_requests_waiting 0\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n";
    let with = |series: &str| format!("{base}{series}");
    let a = "vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a\",waiting_lora_adapters=\"\"} 100\n";
    let b = "vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a\",waiting_lora_adapters=\"\"} 100\nvllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 200\n";
    let addr = serve(vec![with(a), with(a), with(b), base.to_owned()]).await;
    let store = crate::endpoints::EndpointStore::new(Duration::from_secs(2));
    store
        .replace(vec![EndpointSpec {
            name: "e".into(),
            address: addr.ip(),
            port: addr.port(),
            labels: Default::default(),
            metrics_port: None,
            kv_events: None,
        }])
        .unwrap();
    let endpoint = Arc::clone(&store.snapshot().endpoints()[0]);
    let mut s = EndpointScraper::new(
        MetricsClient::new(addr, "/metrics", MAX_PAGE_BYTES),
        EngineMapping::vllm(),
        false,
    );
    s.endpoint = Some(Arc::clone(&endpoint));
    let t = Duration::from_secs(5);

    s.scrape(t, "e").await.unwrap();
    let first = endpoint.lora.get().unwrap();
    assert!(first.running.contains("a") && first.has_free_slot());
    s.scrape(t, "e").await.unwrap();
    assert!(
        Arc::ptr_eq(&first, &endpoint.lora.get().unwrap()),
        "an unchanged series is not rebuilt"
    );
    s.scrape(t, "e").await.unwrap();
    let second = endpoint.lora.get().unwrap();
    assert!(second.running.contains("b") && !second.has_free_slot());
    s.scrape(t, "e").await.unwrap();
    assert!(
        endpoint.lora.get().is_none(),
        "gauge gone: no adapters known"
    );
}
