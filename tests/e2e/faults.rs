//! Faults the gateway + picker pair must survive, each through a real Envoy:
//! a model server dying under load, a metrics page that hangs or answers
//! garbage, the picker dying or restarting (FailOpen and FailClose), a
//! corrupted or deleted endpoints file, and SIGTERM under load.
//! docs/reliability.md ("Faults") describes what each loses and why.

use std::{sync::atomic::Ordering, time::Duration};

use epp::admin::pb::ListEndpointsResponse;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{
    Stack,
    backend::Backend,
    envoy::{BodyMode, Envoy, EnvoyOptions},
    epp::Epp,
    eventually,
    faults::{
        BadMetrics, BadMetricsMode, Load, Outcome, completion, endpoints_yaml_with_metrics,
        last_destination, list_endpoints, open_fds, signal,
    },
};

const WAIT: Duration = Duration::from_secs(20);

fn count(outcomes: &[Outcome], pred: impl Fn(&Outcome) -> bool) -> usize {
    outcomes.iter().filter(|o| pred(o)).count()
}

/// 300 requests, 8 at a time, through Envoy to three model servers that
/// take 15 ms to the first byte and 15 ms more to the last (the one that
/// dies 60 + 60 ms); it dies after the first 100. Every request that the dead server had not started to
/// answer is retried on the picker's fallbacks; only answers already under
/// way (headers sent to the client) break off. Then the picker drops the
/// dead server once its scrapes fail, and takes it back once it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_server_dying_under_load_fails_over_and_is_picked_again_once_back() {
    let stack = Stack::start(
        3,
        &["--fallback-endpoints", "2", "--max-scrape-failures", "2"],
    )
    .await;
    for b in &stack.backends {
        b.state.ttft_ms.store(15, Ordering::SeqCst);
        b.state.gen_ms.store(15, Ordering::SeqCst);
    }
    // The victim is slower, so that when it dies it holds requests in both
    // states: not answered yet (retriable) and answer under way (not).
    let victim = stack.backend("b1");
    victim.state.ttft_ms.store(60, Ordering::SeqCst);
    victim.state.gen_ms.store(60, Ordering::SeqCst);
    let load = Load::start(stack.envoy.listen, 300, 8);
    let st = &victim.state;
    eventually(
        "100 requests done, the victim holding unanswered and started ones",
        Duration::from_secs(60),
        || async {
            load.finished() >= 100
                && st.unanswered.load(Ordering::SeqCst) > 0
                && st.open_responses.load(Ordering::SeqCst) > 0
        },
    )
    .await;
    let served_before_kill = victim.requests();
    victim.kill();
    // Answers the dead server had started (headers out, body not finished):
    // the only ones a gateway cannot move elsewhere. Read after the kill,
    // so an answer started in between is counted.
    let started = st.open_responses.load(Ordering::SeqCst) as usize;
    let unanswered = st.unanswered.load(Ordering::SeqCst) as usize;
    let outcomes = load.outcomes().await;

    let served = count(&outcomes, Outcome::is_served);
    let cut: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::CutMidBody(_)))
        .collect();
    let retries = stack.envoy.stat("cluster.pool.upstream_rq_retry").await;
    eprintln!(
        "pod kill under load: {} requests, {served} served, {} cut mid-body; at the kill the pod had {unanswered} unanswered and {started} answers under way; {served_before_kill} reached it before; {retries} Envoy retries",
        outcomes.len(),
        cut.len()
    );
    assert_eq!(outcomes.len(), 300);
    assert!(served_before_kill > 0, "the killed pod had taken load");
    // An answer the pod had started may also die before Envoy has parsed
    // its headers: Envoy then answers 502 (a reset after the upstream began
    // responding, which it does not retry). Those, and the answers cut
    // mid-body, are bounded by the answers under way at the kill; anything
    // else is a request that could have been retried and was lost.
    let (reset, lost): (Vec<&Outcome>, Vec<&Outcome>) = outcomes
        .iter()
        .filter(|o| !matches!(o, Outcome::Served(_) | Outcome::CutMidBody(_)))
        .partition(|o| matches!(o, Outcome::Status(502, _)));
    assert!(
        lost.is_empty() && reset.len() + cut.len() <= started,
        "requests lost although they could be retried: {lost:?}; {} resets and {} cuts for {started} answers under way",
        reset.len(),
        cut.len()
    );
    assert!(
        cut.iter()
            .all(|o| matches!(o, Outcome::CutMidBody(b) if b == "b1")),
        "only the killed pod's answers may break off: {cut:?}"
    );
    assert!(
        cut.len() <= started,
        "{} answers cut, but only {started} were under way on the killed pod",
        cut.len()
    );
    assert!(
        retries as usize >= unanswered,
        "each unanswered request was retried on a fallback ({retries} retries, {unanswered} unanswered)"
    );

    // The picker stops picking it once its scrapes fail...
    let admin = stack.epp.admin;
    let victim_addr = victim.host_port();
    eventually("the dead pod is marked failing", WAIT, || {
        let victim_addr = victim_addr.clone();
        async move {
            list_endpoints(admin)
                .await
                .endpoints
                .iter()
                .any(|e| e.address == victim_addr && e.consecutive_scrape_failures >= 2)
        }
    })
    .await;
    let retries_before = stack.envoy.stat("cluster.pool.upstream_rq_retry").await;
    for i in 0..30 {
        match completion(stack.envoy.listen, format!("after the kill {i}")).await {
            Outcome::Served(b) => {
                let dest = last_destination(stack.backend(&b)).expect("routed by the picker");
                assert!(
                    !dest.contains(&victim_addr),
                    "the dead pod is still offered: {dest}"
                );
            }
            other => panic!("request {i} after the kill: {other:?}"),
        }
    }
    assert_eq!(
        stack.envoy.stat("cluster.pool.upstream_rq_retry").await,
        retries_before,
        "nothing was sent to the dead pod"
    );

    // ...and picks it again once it is back on the same address.
    victim.restart().await;
    let before = victim.requests();
    let gateway = stack.envoy.listen;
    eventually("the restarted pod serves again", WAIT, || async move {
        let batch: Vec<_> = (0..8)
            .map(|i| tokio::spawn(completion(gateway, format!("welcome back {i}"))))
            .collect();
        for r in batch {
            assert!(r.await.expect("request task").is_served());
        }
        victim.requests() > before
    })
    .await;
}

/// Starts a picker over two healthy servers and one whose metrics port is
/// `bad` (its serving port is a healthy server, so a pick of it would be
/// served and seen), and an Envoy over all three.
async fn stack_with_bad_metrics(bad: &BadMetrics) -> (Vec<Backend>, Epp, Envoy) {
    let backends = vec![
        Backend::start("b0").await,
        Backend::start("b1").await,
        Backend::start("bad").await,
    ];
    let file = endpoints_yaml_with_metrics(&[
        (backends[0].addr, None),
        (backends[1].addr, None),
        (backends[2].addr, Some(bad.addr.port())),
    ]);
    let epp = Epp::spawn_with_file(
        Some(&file),
        &[
            "--secure-serving=false",
            "--fallback-endpoints",
            "1",
            "--metrics-scrape-timeout",
            "100ms",
            "--max-scrape-failures",
            "3",
            "--metrics-staleness-threshold",
            "500ms",
        ],
    );
    epp.wait_ready().await;
    let envoy = Envoy::start(&EnvoyOptions::new(
        epp.grpc.port(),
        backends.iter().map(|b| b.addr).collect(),
    ))
    .await;
    (backends, epp, envoy)
}

fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A metrics page that stops answering (accepts, reads, stays silent) or
/// starts answering garbage: scrapes fail within the timeout, the endpoint's
/// metrics age past the staleness threshold and it is shown failing and not
/// picked, the picker holds at most one connection to it and its file
/// descriptors and threads stay flat, and the healthy endpoints stay
/// freshly scraped and keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_garbage_metrics_page_makes_the_endpoint_stale_without_piling_up() {
    for (mode, scrapes) in [(BadMetricsMode::Hang, 30), (BadMetricsMode::Garbage, 150)] {
        let bad = BadMetrics::start().await;
        let (backends, epp, envoy) = stack_with_bad_metrics(&bad).await;
        let pid = epp.pid().expect("running");
        let bad_addr = backends[2].host_port();
        let admin = epp.admin;
        let endpoint = |list: &ListEndpointsResponse| {
            list.endpoints
                .iter()
                .find(|e| e.address == bad_addr)
                .cloned()
                .expect("listed")
        };
        eventually(&format!("{mode:?}: first scraped fine"), WAIT, || async {
            endpoint(&list_endpoints(admin).await)
                .metrics
                .is_some_and(|m| m.fresh)
        })
        .await;

        bad.set_mode(mode);
        eventually(
            &format!("{mode:?}: the endpoint is stale and failing"),
            WAIT,
            || async {
                let e = endpoint(&list_endpoints(admin).await);
                e.consecutive_scrape_failures >= 3
                    && e.metrics.is_some_and(|m| !m.fresh && m.age_seconds > 0.5)
            },
        )
        .await;

        // Many scrape timeouts (or garbage pages) later, nothing has piled up.
        let fds_start = open_fds(pid);
        let threads_start = threads(pid);
        let (mut fds_max, mut threads_max, mut open_max) = (fds_start, threads_start, 0);
        let seen_start = bad.requests.load(Ordering::SeqCst);
        let requests = std::sync::Arc::clone(&bad.requests);
        eventually(
            &format!("{mode:?}: {scrapes} more scrapes"),
            Duration::from_secs(60),
            || {
                fds_max = fds_max.max(open_fds(pid));
                threads_max = threads_max.max(threads(pid));
                open_max = open_max.max(bad.open.load(Ordering::SeqCst));
                let seen = requests.load(Ordering::SeqCst);
                async move { seen >= seen_start + scrapes }
            },
        )
        .await;
        eprintln!(
            "{mode:?}: {} scrapes of the bad page, {} connections accepted, picker fds {fds_start}..{fds_max}, threads {threads_start}..{threads_max}, at most {open_max} open to the bad page",
            bad.requests.load(Ordering::SeqCst),
            bad.accepted.load(Ordering::SeqCst),
        );
        assert!(
            open_max <= 2,
            "{mode:?}: {open_max} connections open to one metrics page"
        );
        assert!(
            fds_max <= fds_start + 4,
            "{mode:?}: picker fds grew from {fds_start} to {fds_max}"
        );
        // tokio's blocking pool (the endpoints file reads) adds and retires
        // a thread or two on its own; a leak per scrape would be dozens.
        assert!(
            threads_max <= threads_start + 4,
            "{mode:?}: threads grew from {threads_start} to {threads_max}"
        );

        // The healthy endpoints are freshly scraped, and take all the traffic.
        let list = list_endpoints(admin).await;
        for e in list.endpoints.iter().filter(|e| e.address != bad_addr) {
            let m = e.metrics.as_ref().expect("scraped");
            assert!(m.fresh && e.consecutive_scrape_failures == 0, "{e:?}");
        }
        for i in 0..20 {
            match completion(envoy.listen, format!("{mode:?} {i}")).await {
                Outcome::Served(b) => {
                    assert_ne!(b, "bad", "{mode:?}: a stale endpoint was picked")
                }
                other => panic!("{mode:?}: {other:?}"),
            }
        }
        assert!(
            epp.log().contains("metrics scrapes keep failing"),
            "{mode:?}: the failure is logged"
        );
    }
}

/// Kills the picker with SIGKILL and waits until its port refuses.
async fn kill_picker(stack: &Stack) {
    signal(stack.epp.pid().expect("running"), "KILL");
    let grpc = stack.epp.grpc;
    eventually("the picker's port refuses", WAIT, || async move {
        tokio::net::TcpStream::connect(grpc).await.is_err()
    })
    .await;
}

/// A new picker on the dead one's ext_proc port, as a restarted pod behind
/// the same Service would be.
async fn restart_picker(stack: &mut Stack) {
    let port = stack.epp.grpc.port().to_string();
    let pool: Vec<_> = stack.backends.iter().map(|b| b.addr).collect();
    stack.epp = Epp::start(
        &pool,
        &[
            "--secure-serving=false",
            "--fallback-endpoints",
            "1",
            "--grpc-port",
            &port,
        ],
    )
    .await;
    stack.epp.wait_scraped(pool.len()).await;
}

/// Waits until requests are routed by the picker again (the destination
/// header reaches the backend). Each try is one request.
async fn wait_routed_again(stack: &Stack) {
    let mut tries = 0;
    eventually("requests routed by the picker again", WAIT, || {
        tries += 1;
        let n = tries;
        async move {
            match completion(stack.envoy.listen, format!("back {n}")).await {
                Outcome::Served(b) => last_destination(stack.backend(&b)).is_some(),
                _ => false,
            }
        }
    })
    .await;
}

/// FailOpen (`failure_mode_allow: true`) with BUFFERED request bodies: with
/// the picker dead, Envoy sends requests on unrouted and the override_host
/// policy's round-robin fallback serves them; a picker restarted on the same
/// port routes again with no other step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_keeps_serving_while_the_picker_is_down_and_a_restart_routes_again() {
    let mut stack = Stack::start_with(2, &[], |o| {
        o.failure_mode_allow = true;
        o.body_mode = BodyMode::Buffered;
    })
    .await;
    wait_routed_again(&stack).await;
    kill_picker(&stack).await;
    let mut served_by = std::collections::HashSet::new();
    for i in 0..20 {
        match completion(stack.envoy.listen, format!("picker down {i}")).await {
            Outcome::Served(b) => {
                assert_eq!(
                    last_destination(stack.backend(&b)),
                    None,
                    "served without a pick"
                );
                served_by.insert(b);
            }
            other => panic!("request {i} with the picker down: {other:?}"),
        }
    }
    assert_eq!(
        served_by.len(),
        2,
        "round robin over the pool: {served_by:?}"
    );
    restart_picker(&mut stack).await;
    wait_routed_again(&stack).await;
}

/// FailOpen with FULL_DUPLEX_STREAMED request bodies (what GIE specifies).
/// Envoy 1.40 ignores `failure_mode_allow` once it has streamed body bytes
/// to the processor, and a connection to a dead picker fails only after
/// that: until Envoy's health check of the picker cluster has noticed, a
/// POST gets 500 as with FailClose (bodiless requests pass). Once it has,
/// the stream fails before the body and every request fails open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_with_full_duplex_bodies_serves_once_the_health_check_marks_the_picker_down() {
    let stack = Stack::start_with(2, &[], |o| o.failure_mode_allow = true).await;
    wait_routed_again(&stack).await;
    kill_picker(&stack).await;
    let r = crate::common::http::get(stack.envoy.listen, "/v1/models")
        .await
        .expect("GET through envoy");
    assert_eq!(
        r.status,
        200,
        "a bodiless request fails open at once: {}",
        r.text()
    );
    let envoy = &stack.envoy;
    eventually(
        "the health check marks the picker down",
        WAIT,
        || async move { envoy.stat("cluster.epp.membership_healthy").await == 0 },
    )
    .await;
    for i in 0..20 {
        match completion(stack.envoy.listen, format!("picker down {i}")).await {
            Outcome::Served(b) => assert_eq!(last_destination(stack.backend(&b)), None),
            other => panic!("POST {i} with the picker marked down: {other:?}"),
        }
    }
}

/// FailClose (`failure_mode_allow: false`, GIE's default): with the picker
/// dead every request gets Envoy's 500 at once (nothing reaches a model
/// server); a restart on the same port routes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_close_answers_500_while_the_picker_is_down_and_a_restart_routes_again() {
    let mut stack = Stack::start(2, &[]).await;
    wait_routed_again(&stack).await;
    kill_picker(&stack).await;
    let before: u64 = stack.backends.iter().map(Backend::requests).sum();
    for i in 0..10 {
        match completion(stack.envoy.listen, format!("picker down {i}")).await {
            Outcome::Status(500, body) => {
                if i == 0 {
                    eprintln!("FailClose answer with the picker down: 500 {body:?}");
                }
            }
            other => panic!("request {i} with the picker down: {other:?}"),
        }
    }
    let after: u64 = stack.backends.iter().map(Backend::requests).sum();
    assert_eq!(before, after, "nothing reached a model server");
    restart_picker(&mut stack).await;
    wait_routed_again(&stack).await;
}

/// A corrupted (garbage, truncated, emptied) or deleted endpoints file
/// keeps the last good set in use, with a warning; a fixed file applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_or_deleted_endpoints_file_keeps_the_last_good_set() {
    let stack = Stack::start(2, &[]).await;
    let path = stack.epp.endpoints_file();
    let good = std::fs::read_to_string(&path).expect("endpoints file");
    let truncated = good[..good.rfind("address").expect("two entries") + 5].to_owned();
    let admin = stack.epp.admin;
    type Damage = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, &str, Damage)> = vec![
        (
            "garbage",
            "endpoints file invalid",
            Box::new(|p| std::fs::write(p, "\u{0}\u{1} {{[not yaml: ::\n").expect("write")),
        ),
        (
            "truncated",
            "endpoints file invalid",
            Box::new(move |p| std::fs::write(p, &truncated).expect("write")),
        ),
        (
            "emptied",
            "endpoints file is empty",
            Box::new(|p| std::fs::write(p, "").expect("write")),
        ),
        (
            "deleted",
            "endpoints file unreadable",
            Box::new(|p| std::fs::remove_file(p).expect("remove")),
        ),
    ];
    for (what, warning, damage) in cases {
        let logged = stack.epp.log().matches(warning).count();
        damage(&path);
        let epp = &stack.epp;
        eventually(&format!("{what}: warning logged"), WAIT, || async move {
            epp.log().matches(warning).count() > logged
        })
        .await;
        let list = list_endpoints(admin).await;
        assert!(list.synced, "{what}");
        assert_eq!(list.endpoints.len(), 2, "{what}: last good set kept");
        assert_eq!(
            stack.epp.health_status("readiness").await,
            Some(ServingStatus::Serving),
            "{what}"
        );
        for i in 0..6 {
            match completion(stack.envoy.listen, format!("{what} {i}")).await {
                Outcome::Served(b) => {
                    assert!(last_destination(stack.backend(&b)).is_some(), "{what}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        // Put the good file back before the next damage.
        std::fs::write(&path, &good).expect("restore");
    }
    // A fixed file with a different set applies.
    std::fs::write(
        &path,
        crate::common::epp::endpoints_yaml(&[stack.backend("b1").addr]),
    )
    .expect("write");
    eventually("the fixed file applies", WAIT, || async move {
        list_endpoints(admin).await.endpoints.len() == 1
    })
    .await;
    for i in 0..6 {
        assert_eq!(
            completion(stack.envoy.listen, format!("fixed {i}")).await,
            Outcome::Served("b1".into())
        );
    }
}

/// SIGTERM while 8 requests are in flight through Envoy (each at a model
/// server that takes 1.5 s to the first byte and 1.5 s more to the last):
/// all 8 complete with 200, a request sent during the drain is refused at
/// once with Envoy's 500 (FailClose) instead of waiting for the drain, and
/// the picker exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_streams_refuses_new_ones_and_exits_zero() {
    let mut stack = Stack::start(2, &["--shutdown-grace-period", "30s"]).await;
    for b in &stack.backends {
        b.state.ttft_ms.store(1500, Ordering::SeqCst);
        b.state.gen_ms.store(1500, Ordering::SeqCst);
    }
    let gateway = stack.envoy.listen;
    let in_flight: Vec<_> = (0..8)
        .map(|i| tokio::spawn(completion(gateway, format!("in flight {i}"))))
        .collect();
    let backends = &stack.backends;
    eventually("8 requests at the model servers", WAIT, || async move {
        backends.iter().map(Backend::requests).sum::<u64>() == 8
    })
    .await;
    signal(stack.epp.pid().expect("running"), "TERM");
    let epp = &stack.epp;
    eventually("the picker is draining", WAIT, || async move {
        epp.log().contains("shutting down")
    })
    .await;

    let grpc = stack.epp.grpc;
    eventually(
        "the draining picker refuses connections",
        WAIT,
        || async move { tokio::net::TcpStream::connect(grpc).await.is_err() },
    )
    .await;
    let late = completion(gateway, "sent during the drain").await;
    let still_running = in_flight.iter().filter(|t| !t.is_finished()).count();
    eprintln!(
        "SIGTERM: a request sent during the drain got {late:?} while {still_running} in-flight requests were still running"
    );
    assert!(
        matches!(late, Outcome::Status(500, _)),
        "a new stream is refused: {late:?}"
    );
    assert!(
        still_running > 0,
        "the refusal did not wait for the drain to end"
    );

    for (i, t) in in_flight.into_iter().enumerate() {
        let o = t.await.expect("request task");
        assert!(o.is_served(), "in-flight request {i}: {o:?}");
    }
    let status = tokio::task::block_in_place(|| stack.epp.terminate());
    assert_eq!(status.code(), Some(0), "{}", stack.epp.log());
    assert!(stack.epp.log().contains("stopped"));
}
