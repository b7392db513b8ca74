//! The KV-event subscriber against real ZeroMQ sockets on 127.0.0.1: a PUB
//! and a replay ROUTER from the independent `zeromq` crate, speaking vLLM's
//! framing (`[topic, seq u64 BE, msgpack]`; replay `["", seq, payload]`*
//! then seq -1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use epp::kv_events::{
    PrefixMatch,
    subscriber::{RankState, SubscriptionTarget, run},
};
use tokio::sync::watch;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

#[path = "common/kv_events.rs"]
#[allow(dead_code)]
mod wire;
use wire::{Publisher, batch, cleared, keys, removed, stored};

fn target(p: &Publisher, replay: Option<SocketAddr>) -> SubscriptionTarget {
    SubscriptionTarget {
        events: p.addr,
        replay,
        topic: b"kv@".to_vec(),
        handshake_timeout: Duration::from_secs(2),
        max_message: 1 << 20,
    }
}

/// Awaits `cond` on the state, polling (bounded: 5 s).
async fn until(state: &RankState, what: &str, cond: impl Fn(&RankState) -> bool) {
    for _ in 0..500 {
        if cond(state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}: {:?}", state.snapshot());
}

/// Starts a subscriber and sends seq 0 until it has been applied (a PUB
/// drops what it sends before the subscription reaches it).
async fn subscribed(
    p: &mut Publisher,
    replay: Option<SocketAddr>,
    first: Vec<u8>,
) -> (Arc<RankState>, watch::Sender<bool>) {
    let state = Arc::new(RankState::new(10_000));
    let (tx, rx) = watch::channel(false);
    tokio::spawn(run(target(p, replay), Arc::clone(&state), rx));
    for _ in 0..50 {
        p.send("kv@a", 0, first.clone()).await;
        for _ in 0..20 {
            if state.batches.load(Ordering::Relaxed) > 0 {
                return (state, tx);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    panic!("subscriber never received seq 0");
}

#[tokio::test]
async fn stored_removed_cleared_in_both_shapes() {
    for map in [true, false] {
        let mut p = Publisher::new().await;
        let tokens: Vec<u32> = (0..12).collect();
        let (st, _stop) = subscribed(
            &mut p,
            None,
            batch(map, vec![stored(map, &[1, 2], None, &tokens[..8])]),
        )
        .await;
        p.send(
            "kv@a",
            1,
            batch(map, vec![stored(map, &[3], Some(2), &tokens[8..])]),
        )
        .await;
        until(&st, "seq 1", |s| s.batches.load(Ordering::Relaxed) == 2).await;
        assert_eq!(
            st.longest_prefix(&keys(&tokens)),
            Some(PrefixMatch { gpu: 3, any: 3 })
        );
        p.send("kv@a", 2, batch(map, vec![removed(map, &[2])]))
            .await;
        until(&st, "seq 2", |s| s.batches.load(Ordering::Relaxed) == 3).await;
        assert_eq!(
            st.longest_prefix(&keys(&tokens)),
            Some(PrefixMatch { gpu: 1, any: 1 })
        );
        // Another topic is filtered out.
        p.send("other", 3, batch(map, vec![cleared(map)])).await;
        p.send("kv@a", 3, batch(map, vec![cleared(map)])).await;
        until(&st, "seq 3", |s| s.batches.load(Ordering::Relaxed) == 4).await;
        assert_eq!(
            st.longest_prefix(&keys(&tokens)),
            Some(PrefixMatch::default())
        );
        let snap = st.snapshot();
        assert_eq!(
            (snap.gaps, snap.restarts, snap.last_seq, snap.connected),
            (0, 0, Some(3), true)
        );
    }
}

#[tokio::test]
async fn a_gap_is_replayed_over_the_router() {
    let mut p = Publisher::new().await;
    let mut router = RouterSocket::new();
    let ep = router.bind("tcp://127.0.0.1:0").await.unwrap();
    let raddr: SocketAddr = ep.to_string().trim_start_matches("tcp://").parse().unwrap();
    let tokens: Vec<u32> = (0..12).collect();
    let b1 = batch(true, vec![stored(true, &[2], Some(1), &tokens[4..8])]);
    let b2 = batch(false, vec![stored(false, &[3], Some(2), &tokens[8..])]);
    let buffer = [(1u64, b1), (2u64, b2)];
    tokio::spawn(async move {
        let req = router.recv().await.unwrap();
        let frames = req.into_vecdeque();
        let id = frames[0].clone();
        let start = u64::from_be_bytes(frames[2].as_ref().try_into().unwrap());
        for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
            let m = ZmqMessage::try_from(vec![
                id.clone(),
                Bytes::new(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                Bytes::from(payload.clone()),
            ])
            .unwrap();
            router.send(m).await.unwrap();
        }
        let end = ZmqMessage::try_from(vec![
            id,
            Bytes::new(),
            Bytes::copy_from_slice(&(-1i64).to_be_bytes()),
            Bytes::new(),
        ])
        .unwrap();
        router.send(end).await.unwrap();
    });
    let (st, _stop) = subscribed(
        &mut p,
        Some(raddr),
        batch(true, vec![stored(true, &[1], None, &tokens[..4])]),
    )
    .await;
    // Seq 1 and 2 are "lost"; 3 arrives.
    p.send("kv@a", 3, batch(true, vec![removed(true, &[99])]))
        .await;
    until(&st, "replay", |s| s.batches.load(Ordering::Relaxed) == 4).await;
    let snap = st.snapshot();
    assert_eq!(
        (snap.gaps, snap.replays, snap.known, snap.last_seq),
        (1, 1, true, Some(3))
    );
    assert_eq!(st.replay_failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        st.longest_prefix(&keys(&tokens)),
        Some(PrefixMatch { gpu: 3, any: 3 })
    );
}

#[tokio::test]
async fn a_restart_or_an_unreplayable_gap_drops_entries() {
    let mut p = Publisher::new().await;
    let tokens: Vec<u32> = (0..8).collect();
    let (st, _stop) = subscribed(
        &mut p,
        None,
        batch(true, vec![stored(true, &[1, 2], None, &tokens)]),
    )
    .await;
    assert_eq!(st.longest_prefix(&keys(&tokens)).unwrap().gpu, 2);
    // Gap without a replay port: entries dropped, then the new batch applies.
    p.send("kv@a", 5, batch(true, vec![removed(true, &[42])]))
        .await;
    until(&st, "gap", |s| s.gaps.load(Ordering::Relaxed) == 1).await;
    until(&st, "applied", |s| s.batches.load(Ordering::Relaxed) == 2).await;
    assert_eq!(st.longest_prefix(&keys(&tokens)).unwrap().gpu, 0);
    p.send(
        "kv@a",
        6,
        batch(true, vec![stored(true, &[1], None, &tokens[..4])]),
    )
    .await;
    until(&st, "seq 6", |s| s.batches.load(Ordering::Relaxed) == 3).await;
    assert_eq!(st.longest_prefix(&keys(&tokens)).unwrap().gpu, 1);
    // Publisher restart: seq back to 0.
    p.send("kv@a", 0, batch(true, vec![])).await;
    until(&st, "restart", |s| s.restarts.load(Ordering::Relaxed) == 1).await;
    until(&st, "applied", |s| s.batches.load(Ordering::Relaxed) == 4).await;
    assert_eq!(st.longest_prefix(&keys(&tokens)).unwrap().gpu, 0);
    assert_eq!(st.snapshot().last_seq, Some(0));
}

#[tokio::test]
async fn garbage_is_counted_and_survived_and_endpoints_are_isolated() {
    let tokens: Vec<u32> = (0..4).collect();
    let mut a = Publisher::new().await;
    let mut b = Publisher::new().await;
    let (sa, _stop_a) = subscribed(
        &mut a,
        None,
        batch(true, vec![stored(true, &[1], None, &tokens)]),
    )
    .await;
    let (sb, _stop_b) = subscribed(
        &mut b,
        None,
        batch(false, vec![stored(false, &[1], None, &tokens)]),
    )
    .await;
    for (i, junk) in [
        vec![0xc1],
        vec![0x92, 0xcb],
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        b"not msgpack".to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        a.send("kv@a", 1 + i as u64, junk).await;
    }
    until(&sa, "decode errors", |s| {
        s.decode_errors.load(Ordering::Relaxed) == 4
    })
    .await;
    assert_eq!(
        sa.longest_prefix(&keys(&tokens)),
        None,
        "unknown after a lost batch"
    );
    assert_eq!(
        sb.longest_prefix(&keys(&tokens)),
        Some(PrefixMatch { gpu: 1, any: 1 }),
        "b untouched"
    );
    a.send(
        "kv@a",
        5,
        batch(true, vec![stored(true, &[1], None, &tokens)]),
    )
    .await;
    until(&sa, "recovered", |s| s.known.load(Ordering::Relaxed)).await;
    assert_eq!(
        sa.longest_prefix(&keys(&tokens)),
        Some(PrefixMatch { gpu: 1, any: 1 })
    );
}

#[tokio::test]
async fn a_non_zeromq_peer_is_counted_and_retried() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for _ in 0..3 {
            let (mut c, _) = listener.accept().await.unwrap();
            let _ = c
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            // A huge announced frame would be next; the client must not allocate it.
        }
    });
    let state = Arc::new(RankState::new(10));
    let (_tx, rx) = watch::channel(false);
    let t = SubscriptionTarget {
        events: addr,
        replay: None,
        topic: vec![],
        handshake_timeout: Duration::from_secs(2),
        max_message: 1 << 20,
    };
    tokio::spawn(run(t, Arc::clone(&state), rx));
    until(&state, "two protocol errors", |s| {
        s.protocol_errors.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert!(!state.connected.load(Ordering::Relaxed));
}
