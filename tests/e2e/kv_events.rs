//! KV-cache events end to end: the real picker, given each endpoint's event
//! port in its endpoints file, subscribes to two ZeroMQ publishers speaking
//! vLLM's format; ListEndpoints and /metrics show each one's state, events
//! never cross endpoints, and one publisher turning to garbage leaves
//! routing and the other endpoint's state alone.

use std::{collections::HashMap, time::Duration};

use epp::admin::pb::{EndpointInfo, KvEventsRank, ListEndpointsRequest, admin_client::AdminClient};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{
    Stack,
    epp::Epp,
    eventually, free_port, http,
    kv_events::{Publisher, batch, stored},
};

/// Each endpoint's rank-0 event state, by endpoint name.
async fn ranks(stack: &Stack) -> HashMap<String, KvEventsRank> {
    let Ok(mut admin) = AdminClient::connect(format!("http://{}", stack.epp.admin)).await else {
        return HashMap::new();
    };
    let Ok(r) = admin.list_endpoints(ListEndpointsRequest {}).await else {
        return HashMap::new();
    };
    r.into_inner()
        .endpoints
        .into_iter()
        .filter_map(|e| Some((e.name, e.kv_events.into_iter().next()?)))
        .collect()
}

/// A batch storing `n` chained blocks of 4 tokens (`first` the first hash).
fn blocks(map: bool, first: u64, n: u64) -> Vec<u8> {
    let tokens: Vec<u32> = (0..n as u32 * 4).collect();
    let hashes: Vec<u64> = (first..first + n).collect();
    batch(map, vec![stored(map, &hashes, None, &tokens)])
}

/// Sends seq `0..` of `payload` until `name` shows an applied batch (a PUB
/// drops what it sends before the subscription reaches it); returns the
/// next seq.
async fn first_batch(stack: &Stack, p: &mut Publisher, name: &str, payload: &[u8]) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seq = 0;
    loop {
        p.send("kv@test", seq, payload.to_vec()).await;
        seq += 1;
        if ranks(stack).await.get(name).is_some_and(|r| r.batches > 0) {
            return seq;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never applied a batch: {:?}",
            ranks(stack).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn events_per_endpoint_are_visible_isolated_and_garbage_does_not_stop_routing() {
    let mut pa = Publisher::new().await;
    let mut pb = Publisher::new().await;
    let stack = Stack::start(2, &["--kv-events", "--kv-events-replay-port", "0"]).await;
    // Each endpoint gets its own event port through the endpoints file.
    let mut file = String::from("endpoints:\n");
    for (i, (b, port)) in stack
        .backends
        .iter()
        .zip([pa.addr.port(), pb.addr.port()])
        .enumerate()
    {
        file.push_str(&format!(
            "- name: backend-{i}\n  address: {}\n  port: {}\n  kvEvents: {{port: {port}}}\n",
            b.addr.ip(),
            b.addr.port()
        ));
    }
    std::fs::write(stack.epp.endpoints_file(), file).unwrap();

    // A (map encoding) stores 4 blocks, B (positional encoding) 2.
    let next_a = first_batch(&stack, &mut pa, "backend-0", &blocks(true, 1, 4)).await;
    let next_b = first_batch(&stack, &mut pb, "backend-1", &blocks(false, 100, 2)).await;
    // More batches for A only: 3 more blocks chained under A's last.
    let tokens: Vec<u32> = (0..12).collect();
    let mut seq_a = next_a;
    for i in 0..3u64 {
        pa.send(
            "kv@test",
            seq_a,
            batch(
                true,
                vec![stored(
                    true,
                    &[10 + i],
                    Some(if i == 0 { 4 } else { 9 + i }),
                    &tokens[4 * i as usize..4 * i as usize + 4],
                )],
            ),
        )
        .await;
        seq_a += 1;
    }
    let last_a = seq_a - 1;
    eventually("A's batches applied", Duration::from_secs(10), || async {
        ranks(&stack)
            .await
            .get("backend-0")
            .is_some_and(|r| r.last_seq == Some(last_a) && r.blocks == 7)
    })
    .await;
    let r = ranks(&stack).await;
    let (a, b) = (&r["backend-0"], &r["backend-1"]);
    assert!(a.connected && a.known && b.connected && b.known, "{r:?}");
    assert_eq!(b.blocks, 2, "A's events never reach B: {r:?}");
    assert_eq!(b.last_seq, Some(next_b - 1));
    assert_eq!(a.block_size_tokens, 4);
    assert_eq!(
        (a.gaps, a.decode_errors, b.decode_errors),
        (0, 0, 0),
        "{r:?}"
    );

    let metrics = http::get(stack.epp.metrics, "/metrics")
        .await
        .unwrap()
        .text();
    for needle in [
        r#"epp_kv_events_connected{model_server_pod="backend-0",name="default",rank="0"} 1"#,
        r#"epp_kv_events_blocks{model_server_pod="backend-0",name="default",rank="0"} 7"#,
        r#"epp_kv_events_blocks{model_server_pod="backend-1",name="default",rank="0"} 2"#,
        &format!(
            r#"epp_kv_events_last_seq{{model_server_pod="backend-0",name="default",rank="0"}} {last_a}"#
        ),
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    crate::common::promtool_check(&metrics);

    // A's stream turns to garbage (bounded: 2,000 messages) while requests
    // keep being routed.
    let flood = tokio::spawn(async move {
        for (i, seq) in (seq_a..seq_a + 2_000).enumerate() {
            let len = fastrand::usize(1..512);
            let mut junk: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
                .take(len)
                .collect();
            if i % 2 == 0 {
                // 0xc1 is never valid msgpack: surely undecodable.
                junk[0] = 0xc1;
            }
            pa.send("kv@test", seq, junk).await;
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        pa
    });
    for i in 0..200 {
        let reply = stack
            .completion(&format!("request {i} while A floods garbage"))
            .await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
    }
    let _pa = flood.await.unwrap();
    eventually(
        "A's decode errors counted",
        Duration::from_secs(10),
        || async {
            ranks(&stack)
                .await
                .get("backend-0")
                .is_some_and(|r| r.decode_errors > 0)
        },
    )
    .await;
    let r = ranks(&stack).await;
    let b = &r["backend-1"];
    assert_eq!(
        (
            b.decode_errors,
            b.protocol_errors,
            b.blocks,
            b.known,
            b.connected
        ),
        (0, 0, 2, true, true),
        "B untouched: {r:?}"
    );
    let metrics = http::get(stack.epp.metrics, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(
            r#"epp_kv_events_decode_errors_total{model_server_pod="backend-1",name="default",rank="0"} 0"#
        ),
        "{metrics}"
    );
}

/// Every endpoint as ListEndpoints shows it, by name.
async fn endpoints(epp: &Epp) -> HashMap<String, EndpointInfo> {
    let Ok(mut admin) = AdminClient::connect(format!("http://{}", epp.admin)).await else {
        return HashMap::new();
    };
    let Ok(r) = admin.list_endpoints(ListEndpointsRequest {}).await else {
        return HashMap::new();
    };
    r.into_inner()
        .endpoints
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect()
}

fn fallback_gauge(metrics: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"epp_kv_events_fallback_endpoints{name="default"} "#))
        .and_then(|v| v.trim().parse().ok())
}

/// An endpoints file of two endpoints (no model servers behind them: only
/// their event streams matter here), with event ports `a` and `b`.
fn two_with_events(a: u16, b: u16) -> String {
    format!(
        "endpoints:\n- {{name: a, address: 127.0.0.1, port: {}, kvEvents: {{port: {a}}}}}\n- {{name: b, address: 127.0.0.1, port: {}, kvEvents: {{port: {b}}}}}\n",
        free_port(),
        free_port()
    )
}

#[tokio::test]
async fn readiness_waits_for_event_streams_once_at_most_the_timeout_and_never_again() {
    let mut pa = Publisher::new().await;
    // Nothing listens on B's event port: its stream never connects.
    let dead = free_port();
    let started = std::time::Instant::now();
    let epp = Epp::spawn_with_file(
        Some(&two_with_events(pa.addr.port(), dead)),
        &[
            "--kv-events",
            "--kv-events-replay-port",
            "0",
            "--kv-events-ready-timeout",
            "3s",
        ],
    );
    eventually("A's stream connected", Duration::from_secs(10), || async {
        endpoints(&epp)
            .await
            .get("a")
            .is_some_and(|e| e.kv_events.first().is_some_and(|r| r.ever_connected))
    })
    .await;
    if started.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            epp.health_status("readiness").await,
            Some(ServingStatus::NotServing),
            "B has never connected and the timeout has not passed"
        );
    }
    epp.wait_ready().await;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "ready only once the timeout passed: {:?}",
        started.elapsed()
    );
    let e = endpoints(&epp).await;
    assert!(
        e["b"].kv_events_fallback && !e["b"].kv_events[0].ever_connected,
        "{e:?}"
    );
    assert!(
        e["a"].kv_events_fallback,
        "connected but nothing applied: still the approximate index"
    );
    let m = http::get(epp.metrics, "/metrics").await.unwrap().text();
    assert_eq!(fallback_gauge(&m), Some(2), "{m}");

    // A batch makes A's events usable: off the fallback.
    let payload = blocks(false, 1, 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seq = 0;
    while endpoints(&epp)
        .await
        .get("a")
        .is_none_or(|e| e.kv_events_fallback)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never applied a batch"
        );
        pa.send("kv@test", seq, payload.clone()).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(
        "the fallback gauge at 1",
        Duration::from_secs(5),
        || async {
            let m = http::get(epp.metrics, "/metrics").await.unwrap().text();
            fallback_gauge(&m) == Some(1)
        },
    )
    .await;

    // A's publisher goes away: A's stream is down, the picker stays ready.
    drop(pa);
    eventually("A disconnected", Duration::from_secs(10), || async {
        endpoints(&epp)
            .await
            .get("a")
            .is_some_and(|e| e.kv_events.first().is_some_and(|r| !r.connected))
    })
    .await;
    assert_eq!(
        epp.health_status("readiness").await,
        Some(ServingStatus::Serving)
    );
}

#[tokio::test]
async fn readiness_comes_as_soon_as_every_stream_has_connected() {
    let pa = Publisher::new().await;
    let pb = Publisher::new().await;
    let started = std::time::Instant::now();
    let epp = Epp::spawn_with_file(
        Some(&two_with_events(pa.addr.port(), pb.addr.port())),
        &[
            "--kv-events",
            "--kv-events-replay-port",
            "0",
            "--kv-events-ready-timeout",
            "120s",
        ],
    );
    // wait_ready gives up after 20 s: far below the timeout, so readiness
    // came from the connections.
    epp.wait_ready().await;
    assert!(started.elapsed() < Duration::from_secs(60));
    let e = endpoints(&epp).await;
    assert!(
        e.values()
            .all(|e| e.kv_events.iter().all(|r| r.ever_connected)),
        "{e:?}"
    );
}
