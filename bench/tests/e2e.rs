//! End to end on loopback: simulated pods in-process, real HTTP, the load
//! generator's library entry points. Timings are shrunk so this takes well
//! under a few seconds.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in
// #[test] functions; this extends it to the helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use epp_bench::load::args::{LoraArgs, MultiTurnArgs, SharedPrefixArgs};
use epp_bench::load::direct::DirectSplit;
use epp_bench::load::{run_lora, run_multi_turn, run_shared_prefix};
use epp_bench::sim::{SimConfig, SimFleet, spawn_fleet};
use http_body_util::BodyExt;

fn fast_sim(pods: u16) -> SimConfig {
    SimConfig {
        pods,
        base_port: 0,
        prefill_overhead_ms: 1.0,
        prefill_us_per_token: 10.0,
        itl_ms: 1.0,
        ..SimConfig::default()
    }
}

#[derive(Parser)]
struct SharedPrefixCli {
    #[command(flatten)]
    args: SharedPrefixArgs,
}

#[derive(Parser)]
struct MultiTurnCli {
    #[command(flatten)]
    args: MultiTurnArgs,
}

async fn fleet(pods: u16) -> (SimFleet, String) {
    let fleet = spawn_fleet(fast_sim(pods)).await.expect("pods start");
    let url = fleet.pods[0].url();
    (fleet, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_against_one_pod_hits_the_cache() {
    let (fleet, url) = fleet(1).await;
    let cli = SharedPrefixCli::parse_from([
        "t",
        "--target",
        &url,
        "--pod-metrics",
        &url,
        "--groups",
        "3",
        "--prompts-per-group",
        "4",
        "--system-tokens",
        "64",
        "--question-tokens",
        "8",
        "--output-tokens",
        "4",
        "--concurrency",
        "2",
        "--max-duration",
        "20",
        "--request-timeout",
        "10",
        "--label",
        "direct",
    ]);
    let run = run_shared_prefix(&cli.args, "test").await.expect("run");
    assert_eq!(run.workload, "shared-prefix");
    assert_eq!(run.label, "direct");
    let p = &run.phases[0];
    assert_eq!((p.requests_sent, p.requests_ok), (12, 12), "{:?}", p.errors);
    assert!(p.errors.is_empty());
    assert_eq!(p.pod_requests.get("sim-0"), Some(&12));
    assert_eq!(p.pod_load_max_over_mean, Some(1.0));
    let ttft = p.ttft_ms.expect("streaming measures TTFT");
    let e2e = p.e2e_ms.expect("e2e");
    assert_eq!((ttft.count, e2e.count), (12, 12));
    assert!(ttft.p50_ms <= e2e.p50_ms && ttft.max_ms <= e2e.max_ms);
    assert!(ttft.p50_ms <= ttft.p95_ms && ttft.p95_ms <= ttft.p99_ms);
    // One pod with room for every group: each repeated system prompt hits,
    // so the measured rate is the ideal one: 3 groups x 3 repeats x 64
    // tokens over 12 x 72 tokens.
    let ideal = p.ideal_hit_rate.expect("ideal");
    assert!((ideal - 576.0 / 864.0).abs() < 1e-9);
    let cache = p.prefix_cache.expect("scraped");
    assert!(cache.hit_rate > 0.0);
    assert_eq!(cache.query_tokens, 864.0);
    assert!((cache.hit_rate - ideal).abs() < 1e-9, "{cache:?}");
    // The responses' usage agrees with the pod's counters.
    assert!((p.usage_cached_ratio.expect("usage") - cache.hit_rate).abs() < 1e-9);
    assert!(p.throughput_rps > 0.0);
    // The JSON round-trips.
    let text = serde_json::to_string(&run).unwrap();
    let back: epp_bench::load::BenchRun = serde_json::from_str(&text).unwrap();
    assert_eq!(back.phases[0].requests_ok, 12);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_sessions_grow_and_stick() {
    let (fleet, url) = fleet(2).await;
    // Target pod 0 only: every turn lands there, so stickiness is 1 and each
    // follow-up turn reuses the conversation so far.
    let cli = MultiTurnCli::parse_from([
        "t",
        "--target",
        &url,
        "--pod-metrics",
        &url,
        "--sessions",
        "3",
        "--turns",
        "3",
        "--system-tokens",
        "64",
        "--user-tokens",
        "16",
        "--output-tokens",
        "4",
        "--concurrency",
        "3",
        "--max-duration",
        "20",
    ]);
    let run = run_multi_turn(&cli.args, "test").await.expect("run");
    let p = &run.phases[0];
    assert_eq!(p.requests_ok, 9, "{:?}", p.errors);
    assert_eq!(p.stickiness, Some(1.0));
    assert!(p.prefix_cache.expect("scraped").hit_rate > 0.3);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_look_like_vllm() {
    let fleet = spawn_fleet(SimConfig {
        max_num_seqs: 1,
        max_waiting: 0,
        itl_ms: 50.0,
        ..fast_sim(2)
    })
    .await
    .expect("pods start");
    assert_ne!(fleet.pods[0].addr.port(), fleet.pods[1].addr.port());
    let client = epp_bench::load::client::http_client(4);
    let url = fleet.pods[1].url();
    let post = |path: &str, body: &str| {
        let req = http::Request::post(format!("{url}{path}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .unwrap();
        client.request(req)
    };
    let bad = post("/v1/completions", "{nope").await.unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["x-inference-pod"], "sim-1");
    let missing = post("/v1/chat/completions", r#"{"messages":[]}"#)
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    let model = post("/v1/completions", r#"{"model":"x","prompt":"a"}"#)
        .await
        .unwrap();
    assert_eq!(model.status(), 404);
    // One slot, no queue: a second request while the first runs gets 429.
    // A streamed response's headers arrive once the request is admitted, so
    // awaiting them is the synchronisation point.
    let slow = post(
        "/v1/completions",
        r#"{"prompt":"hello","max_tokens":20,"stream":true}"#,
    )
    .await
    .unwrap();
    assert_eq!(slow.status(), 200);
    let busy = post("/v1/completions", r#"{"prompt":"again"}"#)
        .await
        .unwrap();
    assert_eq!(busy.status(), 429);
    let body = slow.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    let metrics = epp_bench::load::runner::get_text(
        &client,
        &format!("{url}/metrics"),
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let sum = |name| epp_bench::prom::sum(&metrics, name).expect("well-formed page");
    assert_eq!(sum("vllm:request_success_total"), Some(1.0));
    assert_eq!(sum("vllm:num_requests_running"), Some(0.0));
    fleet.shutdown().await;
}

/// What `promtool check metrics` objects to in `page`, beyond the one thing
/// the simulator does on purpose: vLLM's metric names contain a colon
/// (`vllm:num_requests_waiting`), and the picker, dashboards and recording
/// rules look them up by those names, so promtool's naming lint ("metric
/// names should not contain ':'", exit status 3) is tolerated for `vllm:`
/// names. Anything else is returned: a parse error (status 1, "error while
/// linting: ...") or any other lint (missing help, counter suffixes, units).
fn promtool_objections(page: &str) -> Vec<String> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let path = epp_bench::stack::tool("promtool");
    let mut child = Command::new(&path)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/setup-tools.sh installs it)",
                path.display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tolerated =
        |l: &str| l.starts_with("vllm:") && l.ends_with(" metric names should not contain ':'");
    match out.status.code() {
        Some(0) => Vec::new(),
        Some(3) => text
            .lines()
            .filter(|l| !l.trim().is_empty() && !tolerated(l))
            .map(str::to_owned)
            .collect(),
        code => vec![format!("exit status {code:?}: {text}")],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_page_passes_promtool() {
    let (fleet, url) = fleet(1).await;
    let client = epp_bench::load::client::http_client(2);
    // Observations in every histogram.
    for prompt in ["one", "two"] {
        let req = http::Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                r#"{{"prompt":"{prompt}","max_tokens":3}}"#
            ))))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let get = |query: String| {
        let client = &client;
        let url = format!("{url}/metrics{query}");
        async move {
            epp_bench::load::runner::get_text(client, &url, std::time::Duration::from_secs(5))
                .await
                .unwrap()
        }
    };
    let full = get(String::new()).await;
    let filter = epp::scrape::name_filter_query(&epp::scrape::EngineMapping::vllm());
    let filtered = get(format!("?{filter}")).await;
    fleet.shutdown().await;
    assert_eq!(full.matches("# TYPE ").count(), 12, "{full}");
    assert_eq!(filtered.matches("# TYPE ").count(), 4, "{filtered}");
    for page in [&full, &filtered] {
        assert_eq!(promtool_objections(page), Vec::<String>::new(), "{page}");
    }
    // The check can fail: an unterminated label set, and a family without
    // its help text.
    let broken = full.replacen("\"} ", "\" ", 1);
    assert!(
        promtool_objections(&broken)
            .iter()
            .any(|p| p.contains("parsing error")),
        "{broken}"
    );
    let no_help: String = full
        .lines()
        .filter(|l| !l.starts_with("# HELP vllm:num_requests_waiting "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        promtool_objections(&no_help),
        ["vllm:num_requests_waiting no help text"]
    );
}

#[derive(Parser)]
struct LoraCli {
    #[command(flatten)]
    args: LoraArgs,
}

/// A pod serving adapters: lists them, answers under their names, keeps
/// their prefix caches apart, counts loads, and passes promtool with the
/// LoRA families on the page; the `lora` workload reads the loads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_pod_serves_adapters_in_one_slot() {
    let adapters: Vec<String> = (0..4).map(|i| format!("lora-{i}")).collect();
    let fleet = spawn_fleet(SimConfig {
        lora_adapters: adapters.clone(),
        max_loras: 1,
        lora_load_ms: 5.0,
        ..fast_sim(1)
    })
    .await
    .expect("pods start");
    let url = fleet.pods[0].url();
    let client = epp_bench::load::client::http_client(4);
    let get = |path: &str| {
        let url = format!("{url}{path}");
        let client = &client;
        async move {
            epp_bench::load::runner::get_text(client, &url, std::time::Duration::from_secs(5))
                .await
                .unwrap()
        }
    };
    let models: serde_json::Value = serde_json::from_str(&get("/v1/models").await).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(ids[1..], ["lora-0", "lora-1", "lora-2", "lora-3"]);
    assert_eq!(models["data"][1]["parent"], SimConfig::default().model);
    // The same 80-token prompt, twice under lora-0, then under the base model.
    let prompt = "x".repeat(320);
    let mut cached = Vec::new();
    for model in ["lora-0", "lora-0", SimConfig::default().model.as_str()] {
        let req = http::Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 2}).to_string(),
            )))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["model"], model, "answered under the name asked for");
        cached.push(body["usage"]["prompt_tokens_details"]["cached_tokens"].clone());
    }
    assert_eq!(
        cached,
        [0, 64, 0],
        "adapters and the base model share no blocks"
    );

    let cli = LoraCli::parse_from([
        "t",
        "--target",
        &url,
        "--pod-metrics",
        &url,
        "--requests",
        "40",
        "--adapters",
        "4",
        "--system-tokens",
        "32",
        "--question-tokens",
        "8",
        "--output-tokens",
        "3",
        "--concurrency",
        "4",
        "--max-duration",
        "20",
    ]);
    let run = run_lora(&cli.args, "test").await.expect("run");
    let p = &run.phases[0];
    assert_eq!((p.requests_sent, p.requests_ok), (40, 40), "{:?}", p.errors);
    let lora = p.lora.expect("the pod counts adapter loads");
    let targets = p.target_pods.as_ref().expect("per-target breakdown");
    let adapters_used = targets.keys().filter(|t| t.starts_with("lora-")).count() as f64;
    assert!(lora.loads >= adapters_used, "{lora:?} {targets:?}");
    // One slot, already holding lora-0 from the requests above: every load
    // evicts the adapter before it.
    assert_eq!(lora.evictions, lora.loads, "{lora:?}");
    assert_eq!(lora.loads_per_1k_requests, lora.loads * 25.0);
    assert_eq!(
        targets
            .values()
            .map(|by_pod| by_pod["sim-0"])
            .sum::<usize>(),
        40
    );
    let page = get("/metrics").await;
    fleet.shutdown().await;
    assert!(
        page.contains("\n# TYPE vllm:lora_requests_info gauge\n"),
        "{page}"
    );
    assert_eq!(promtool_objections(&page), Vec::<String>::new(), "{page}");
}

/// The soak's code path, shrunk: 12 s at 30 req/s through the real Envoy
/// and picker (debug build) to 2 vllm-sim processes, one SIGKILLed at 3 s
/// and back at 6 s. Requests take ~0.5 s, so the kill catches several in
/// flight on the dead pod at once: the gateway must retry all of them on the
/// fallback (more than Envoy's default of 3 concurrent retries; with that
/// default this test loses requests). Every request is accounted for and
/// succeeds, the killed pod serves again once back, and the results
/// directory is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_survives_a_pod_kill_and_writes_its_report() {
    use epp_bench::soak::{self, EventKind, SoakConfig, Workload};
    use std::time::Duration;
    let bin = epp_bench::stack::Binaries::locate()
        .expect("the epp binary (cargo build -p epp) and Envoy (scripts/setup-tools.sh)");
    let cfg = SoakConfig {
        duration: Duration::from_secs(12),
        rate: 30.0,
        pods: 2,
        first_kill: Duration::from_secs(3),
        kill_every: Duration::from_secs(60),
        down_for: Duration::from_secs(3),
        request_timeout: Duration::from_secs(20),
        max_inflight: 500,
        workload: Workload {
            model: SimConfig::default().model,
            groups: 2,
            sessions: 6,
            turns: 3,
            system_tokens: 64,
            user_tokens: 8,
            reply_tokens: 8,
            max_tokens: 8,
            chars_per_token: 4,
            seed: 3,
        },
        sim_bin: env!("CARGO_BIN_EXE_vllm-sim").into(),
        sim_args: [
            "--itl-ms=60",
            "--prefill-overhead-ms=1",
            "--prefill-us-per-token=10",
        ]
        .map(str::to_owned)
        .to_vec(),
        epp_args: Vec::new(),
        envoy_concurrency: 1,
        envoy_max_retries: None,
        log_dir: None,
    };
    let run = soak::run(&bin, &cfg).await.expect("soak runs");
    let s = soak::report::summarize(&run);
    assert_eq!(s.due, 360);
    assert_eq!(s.not_sent, 0);
    assert_eq!(s.sent, s.ok + s.failed);
    let kinds: Vec<(EventKind, &str)> = run
        .events
        .iter()
        .map(|e| (e.kind, e.pod.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [(EventKind::Kill, "pod0-0"), (EventKind::Restart, "pod0-0")]
    );
    let outage = &s.outages[0];
    assert_eq!(
        s.failed, 0,
        "lost requests, by cause and kind: {:?}; Envoy: {:?}",
        s.failures, run.envoy_stats
    );
    let in_flight_on_pod0 = run
        .envoy_stats
        .iter()
        .find(|(k, _)| k == "upstream_cx_destroy_remote_with_active_rq")
        .map_or(0, |(_, n)| *n);
    assert!(
        in_flight_on_pod0 > 3,
        "the kill caught only {in_flight_on_pod0} requests in flight on the pod: too few to exercise concurrent retries"
    );
    assert!(
        outage.back_after.is_some() && outage.served_after > 0,
        "the restarted pod was never picked again: {outage:?} {:?}",
        s.served_by_pod
    );
    assert!(s.served_by_pod.get("pod1-0").is_some_and(|&n| n > 0));
    assert!(run.samples.len() >= 8, "{} samples", run.samples.len());
    assert!(s.rss_max_kb > 0 && s.rss_end_kb > 0);

    let out = tempfile::tempdir().unwrap();
    let files = soak::report::write(out.path(), &run, &s, "test", "test machine").expect("report");
    let csv = std::fs::read_to_string(&files.csv).unwrap();
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("t_s,sent,ok,failed"));
    assert!(lines.count() >= 12);
    assert!(csv.contains("kill pod0-0") && csv.contains("restart pod0-0"));
    let png = std::fs::read(&files.png).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    let md = std::fs::read_to_string(&files.readme).unwrap();
    assert!(
        md.contains("## Totals") && md.contains("| pod0-0 |"),
        "{md}"
    );
}

/// `--direct-fraction` sends exactly the requests its seeded draw picks
/// straight to a pod (the rest to --target), and reports both shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_fraction_sends_the_drawn_requests_around_the_target() {
    let fleet = spawn_fleet(fast_sim(3)).await.expect("pods start");
    let urls = fleet.urls();
    let cli = SharedPrefixCli::parse_from([
        "t",
        "--target",
        &urls[0],
        "--pod-metrics",
        &urls.join(","),
        "--groups",
        "6",
        "--prompts-per-group",
        "5",
        "--system-tokens",
        "64",
        "--question-tokens",
        "8",
        "--output-tokens",
        "2",
        "--concurrency",
        "3",
        "--direct-fraction",
        "0.4",
        "--max-duration",
        "30",
        "--request-timeout",
        "10",
    ]);
    let run = run_shared_prefix(&cli.args, "test").await.expect("run");
    fleet.shutdown().await;
    let p = &run.phases[0];
    assert_eq!(p.requests_ok, 30, "{:?}", p.errors);
    let split = p.split.as_ref().expect("split stats");
    let draw = DirectSplit::new(0.4, 0, &urls, "/v1/completions").unwrap();
    let direct: Vec<usize> = (0..30).filter(|&i| draw.pod_for(i).is_some()).collect();
    assert!(!direct.is_empty() && direct.len() < 30, "{direct:?}");
    assert_eq!(split.direct.requests_ok, direct.len());
    assert_eq!(split.via_picker.requests_ok, 30 - direct.len());
    // The gateway here is pod 0 itself: every request through it lands there;
    // the direct ones land where the draw sent them.
    assert_eq!(
        split.via_picker.pod_requests.keys().collect::<Vec<_>>(),
        ["sim-0"]
    );
    for (pod, n) in &split.direct.pod_requests {
        let i: usize = pod.trim_start_matches("sim-").parse().unwrap();
        let want = direct
            .iter()
            .filter(|&&j| draw.pod_for(j) == Some(i))
            .count();
        assert_eq!(*n, want, "{pod}");
    }
    assert!(split.via_picker.ttft_ms.is_some() && split.direct.ttft_ms.is_some());
    assert!(split.via_picker.usage_hit_rate.is_some());
}

/// `--restart-pods-at` empties every pod's cache once, before the chosen
/// request: each group's next request misses, and the ideal counts it so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_empties_the_caches_before_the_chosen_request() {
    let argv = |restart: bool| {
        let mut v = vec![
            "t",
            "--groups",
            "3",
            "--prompts-per-group",
            "4",
            "--system-tokens",
            "64",
            "--question-tokens",
            "8",
            "--output-tokens",
            "2",
            // One at a time: nothing is running when the pod restarts.
            "--concurrency",
            "1",
            "--max-duration",
            "30",
        ];
        if restart {
            v.extend(["--restart-pods-at", "50%"]);
        }
        v
    };
    let mut results = Vec::new();
    for restart in [false, true] {
        let (fleet, url) = fleet(1).await;
        let mut cli = SharedPrefixCli::parse_from(argv(restart));
        cli.args.common.target = url.clone();
        cli.args.common.pod_metrics = vec![url];
        if restart {
            let err = run_shared_prefix(&cli.args, "test").await.unwrap_err();
            assert!(err.to_string().contains("--restart-pods-at"), "{err}");
            cli.args.restarter = Some(fleet.restarter());
        }
        let run = run_shared_prefix(&cli.args, "test").await.expect("run");
        fleet.shutdown().await;
        results.push(run.phases[0].clone());
    }
    let (plain, restarted) = (&results[0], &results[1]);
    assert!(plain.restart.is_none());
    let r = restarted.restart.as_ref().expect("restart stats");
    assert!(r.happened);
    assert_eq!(r.at_request, 6);
    // Requests 6..9 are each group's third prompt (round-robin order): a hit
    // without the restart, a miss right after it; the fourth hits again.
    assert_eq!(r.first_after_restart_hit_rate, Some(0.0));
    assert!(r.after_restart_hit_rate.unwrap() > 0.0);
    let (hit, hit_restarted) = (
        plain.prefix_cache.unwrap().hit_rate,
        restarted.prefix_cache.unwrap().hit_rate,
    );
    assert!(hit_restarted < hit, "{hit_restarted} vs {hit}");
    // One pod with room for every group, one request at a time: each run
    // reaches its own ideal exactly, and the restart's is two thirds.
    for p in &results {
        let ideal = p.ideal_hit_rate.unwrap();
        assert!(
            (p.prefix_cache.unwrap().hit_rate - ideal).abs() < 1e-9,
            "{p:?}"
        );
    }
    let (i0, i1) = (
        plain.ideal_hit_rate.unwrap(),
        restarted.ideal_hit_rate.unwrap(),
    );
    assert!((i1 - i0 * 2.0 / 3.0).abs() < 1e-9, "{i1} vs {i0}");
}
