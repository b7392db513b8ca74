//! Backends that cost nothing: a fixed small completion for every POST and a
//! vLLM-shaped /metrics page, so what a gateway benchmark measures is the
//! gateway, not the model server. The page honours `name[]` filters as
//! vLLM's prometheus_client does; each filtered page is computed once.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

/// The answer to every inference request.
const COMPLETION: &[u8] = br#"{"id":"cmpl-0","object":"text_completion","model":"m","choices":[{"index":0,"text":"ok","finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// A small metrics page with the signals the picker scrapes.
pub const SMALL_METRICS: &str = "vllm:num_requests_waiting{model_name=\"m\"} 0\nvllm:num_requests_running{model_name=\"m\"} 0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.1\nvllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"20000\"} 1\n";

/// Static backends on loopback; stopped when dropped.
#[derive(Debug)]
pub struct StaticBackends {
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for StaticBackends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The metrics page and its filtered versions, shared by every backend.
#[derive(Debug)]
struct Pages {
    full: Bytes,
    /// Filtered pages by query string; a few entries (one per engine mapping).
    filtered: parking_lot::Mutex<HashMap<String, Bytes>>,
}

/// Distinct queries remembered; others are filtered on every request.
const MAX_CACHED_QUERIES: usize = 16;

impl Pages {
    fn get(&self, query: Option<&str>) -> Bytes {
        let Some(q) = query else {
            return self.full.clone();
        };
        if let Some(p) = self.filtered.lock().get(q) {
            return p.clone();
        }
        let Some(names) = crate::prom::requested_names(Some(q)) else {
            return self.full.clone();
        };
        let page = Bytes::from(crate::prom::restrict(
            std::str::from_utf8(&self.full).unwrap_or(""),
            &names,
        ));
        let mut cache = self.filtered.lock();
        if cache.len() < MAX_CACHED_QUERIES {
            cache.insert(q.to_owned(), page.clone());
        }
        page
    }
}

impl StaticBackends {
    /// `n` backends on free ports serving `metrics_page` at /metrics.
    pub async fn start(n: usize, metrics_page: Arc<str>) -> std::io::Result<Self> {
        let mut addrs = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        let metrics_page = Arc::new(Pages {
            full: Bytes::copy_from_slice(metrics_page.as_bytes()),
            filtered: parking_lot::Mutex::new(HashMap::new()),
        });
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?);
            let page = Arc::clone(&metrics_page);
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let _ = stream.set_nodelay(true);
                    let page = Arc::clone(&page);
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let page = Arc::clone(&page);
                            async move { Ok::<_, Infallible>(answer(req, &page).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }));
        }
        Ok(Self { addrs, tasks })
    }
}

async fn answer(req: Request<Incoming>, pages: &Pages) -> Response<Full<Bytes>> {
    let metrics = (req.uri().path() == "/metrics").then(|| pages.get(req.uri().query()));
    // Drain the request body: the backend must read what the gateway sends.
    let _ = req.into_body().collect().await;
    let (body, ct) = if let Some(page) = metrics {
        (page, "text/plain")
    } else {
        (Bytes::from_static(COMPLETION), "application/json")
    };
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ct),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(text: &str) -> Pages {
        Pages {
            full: Bytes::copy_from_slice(text.as_bytes()),
            filtered: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn the_captured_page_is_filtered_like_prometheus_client_does() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/metrics/vllm-metrics-inferstack.txt"
        ))
        .unwrap();
        let p = pages(&text);
        assert_eq!(p.get(None), text.as_bytes(), "no query: the whole page");
        assert_eq!(
            p.get(Some("x=1")),
            text.as_bytes(),
            "no name[]: the whole page"
        );
        let vllm = epp::scrape::EngineMapping::vllm();
        let q = epp::scrape::name_filter_query(&vllm);
        let small = p.get(Some(&q));
        assert!(small.len() < 2_000, "{} bytes", small.len());
        assert_eq!(
            epp::scrape::extract(&small, &vllm).unwrap(),
            epp::scrape::extract(text.as_bytes(), &vllm).unwrap()
        );
        assert_eq!(p.get(Some(&q)), small, "served again from the cache");
        assert_eq!(p.filtered.lock().len(), 1);
        assert_eq!(
            p.get(Some("name[]=nothing")),
            "",
            "nothing listed is on the page"
        );
    }
}
