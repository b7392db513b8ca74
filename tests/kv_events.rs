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
use rmpv::Value;
use wire::{Publisher, batch, cleared, ints, keys, removed, s, stored};

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

/// Serves the publisher side of a ZMTP 3.0 NULL handshake by hand (so the
/// test can then misbehave in ways a real socket never would), and reads the
/// subscription the client sends.
async fn zmtp_server_handshake(c: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    c.write_all(&g).await?;
    let mut peer = [0u8; 64];
    c.read_exact(&mut peer).await?;
    let mut ready = vec![5];
    ready.extend_from_slice(b"READY");
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&3u32.to_be_bytes());
    ready.extend_from_slice(b"PUB");
    c.write_all(&[0x04, ready.len() as u8]).await?;
    c.write_all(&ready).await?;
    // The client's READY command, then its subscription message.
    for _ in 0..2 {
        let mut h = [0u8; 2];
        c.read_exact(&mut h).await?;
        let mut body = vec![0u8; usize::from(h[1])];
        c.read_exact(&mut body).await?;
    }
    Ok(())
}

fn short_target(addr: SocketAddr) -> SubscriptionTarget {
    SubscriptionTarget {
        events: addr,
        replay: None,
        topic: b"kv@".to_vec(),
        handshake_timeout: Duration::from_millis(300),
        max_message: 1 << 20,
    }
}

#[tokio::test]
async fn a_publisher_stalling_mid_message_or_handshake_is_dropped_and_retried() {
    use std::sync::atomic::AtomicU64;
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            let n = acc.fetch_add(1, Ordering::SeqCst);
            if n.is_multiple_of(2) {
                // A whole message first (idle after it is fine), then half
                // of a frame announcing 5 bytes, then nothing.
                if zmtp_server_handshake(&mut c).await.is_ok() {
                    let b = batch(true, vec![cleared(true)]);
                    let mut m = vec![0x01, 4];
                    m.extend_from_slice(b"kv@a");
                    m.extend_from_slice(&[0x01, 8]);
                    m.extend_from_slice(&0u64.to_be_bytes());
                    m.extend_from_slice(&[0x00, b.len() as u8]);
                    m.extend_from_slice(&b);
                    m.extend_from_slice(&[0x01, 5, b'k', b'v']);
                    let _ = c.write_all(&m).await;
                }
            }
            // Odd connections: accepted, then silence (a stalled handshake).
            held.push(c);
        }
    });
    let state = Arc::new(RankState::new(100));
    let (_tx, rx) = watch::channel(false);
    tokio::spawn(run(short_target(addr), Arc::clone(&state), rx));
    until(&state, "stalls on both kinds of connection", |s| {
        s.stalls.load(Ordering::Relaxed) >= 3
    })
    .await;
    assert!(
        state.batches.load(Ordering::Relaxed) >= 1,
        "the whole message was applied"
    );
    assert!(state.protocol_errors.load(Ordering::Relaxed) >= 3);
    assert!(
        accepted.load(Ordering::SeqCst) >= 3,
        "reconnected after each stall"
    );
}

#[tokio::test]
async fn an_idle_publisher_is_not_a_stall() {
    let mut p = Publisher::new().await;
    let tokens: Vec<u32> = (0..4).collect();
    let state = Arc::new(RankState::new(100));
    let (_tx, rx) = watch::channel(false);
    let mut t = target(&p, None);
    t.handshake_timeout = Duration::from_millis(100);
    tokio::spawn(run(t, Arc::clone(&state), rx));
    let first = batch(true, vec![stored(true, &[1], None, &tokens)]);
    for _ in 0..500 {
        p.send("kv@a", 0, first.clone()).await;
        if state.batches.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Idle for several stall timeouts: the connection must stay up. The
    // wait is the point of the test, not synchronisation.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(state.stalls.load(Ordering::Relaxed), 0);
    assert!(state.connected.load(Ordering::Relaxed));
    p.send("kv@a", 1, batch(true, vec![removed(true, &[1])]))
        .await;
    until(&state, "seq 1 on the same connection", |s| {
        s.snapshot().last_seq == Some(1)
    })
    .await;
    assert_eq!(state.protocol_errors.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_garbage_tcp_peer_is_a_protocol_error_with_backoff() {
    use std::sync::atomic::AtomicU64;
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(3);
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            acc.fetch_add(1, Ordering::SeqCst);
            let junk: Vec<u8> = (0..4096).map(|_| rng.u8(..)).collect();
            let _ = c.write_all(&junk).await;
        }
    });
    let state = Arc::new(RankState::new(100));
    let (_tx, rx) = watch::channel(false);
    let started = std::time::Instant::now();
    tokio::spawn(run(short_target(addr), Arc::clone(&state), rx));
    until(&state, "four protocol errors", |s| {
        s.protocol_errors.load(Ordering::Relaxed) >= 4
    })
    .await;
    // Backoff doubles from 50 ms: four attempts take at least 50+100+200 ms.
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert!(accepted.load(Ordering::SeqCst) >= 4);
    assert_eq!(state.batches.load(Ordering::Relaxed), 0);
    assert!(!state.known.load(Ordering::Relaxed));
}

#[tokio::test]
async fn unknown_events_are_counted_and_the_rest_applied_and_huge_claims_refused() {
    let mut p = Publisher::new().await;
    let tokens: Vec<u32> = (0..8).collect();
    let (st, _stop) = subscribed(&mut p, None, batch(true, vec![])).await;
    let unknown = Value::Map(vec![
        (s("type"), s("BlockPinned")),
        (s("block_hashes"), ints([1])),
    ]);
    let unknown_arr = Value::Array(vec![s("BlockMoved"), ints([1]), Value::Nil]);
    p.send(
        "kv@a",
        1,
        batch(
            true,
            vec![unknown, stored(true, &[1, 2], None, &tokens), unknown_arr],
        ),
    )
    .await;
    until(&st, "seq 1", |s| s.batches.load(Ordering::Relaxed) == 2).await;
    assert_eq!(st.unknown_events.load(Ordering::Relaxed), 2);
    assert_eq!(st.longest_prefix(&keys(&tokens)).unwrap().gpu, 2);
    // A stored event claiming 10^9 blocks in a few bytes: refused as
    // malformed before anything is reserved.
    let mut claim = vec![0x92, 0x00, 0x91, 0x95, 0xab];
    claim.extend_from_slice(b"BlockStored");
    claim.push(0xdd);
    claim.extend_from_slice(&1_000_000_000u32.to_be_bytes());
    claim.extend_from_slice(&[0x01, 0x02]);
    p.send("kv@a", 2, claim).await;
    until(&st, "decode error", |s| {
        s.decode_errors.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(st.heap_bytes() < 64 << 10, "{}", st.heap_bytes());
}

#[tokio::test]
async fn a_flooding_publisher_stays_within_capacity() {
    const CAPACITY: usize = 500;
    const MESSAGES: u64 = 5_000;
    let mut p = Publisher::new().await;
    let state = Arc::new(RankState::new(CAPACITY));
    let (_tx, rx) = watch::channel(false);
    tokio::spawn(run(target(&p, None), Arc::clone(&state), rx));
    let mut rng = fastrand::Rng::with_seed(9);
    // Wait until subscribed (a PUB drops what it sends before that).
    let mut seq = 0u64;
    for _ in 0..500 {
        p.send("kv@a", seq, batch(false, vec![])).await;
        seq += 1;
        if state.batches.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 16 new blocks a message, as fast as the socket takes them: a PUB drops
    // past its high-water mark, which the subscriber sees as gaps.
    for _ in 0..MESSAGES {
        let hashes: Vec<u64> = (0..16).map(|_| rng.u64(..)).collect();
        let tokens: Vec<u32> = (0..64).map(|_| rng.u32(..)).collect();
        p.send(
            "kv@a",
            seq,
            batch(false, vec![stored(false, &hashes, None, &tokens)]),
        )
        .await;
        seq += 1;
    }
    // The flood's tail may have been dropped: mark its end until a marker
    // is seen (bounded).
    let mut caught_up = false;
    let first_marker = seq;
    for _ in 0..500 {
        p.send("kv@a", seq, batch(false, vec![])).await;
        if state.snapshot().last_seq.is_some_and(|l| l >= first_marker) {
            caught_up = true;
            break;
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(caught_up, "{:?}", state.snapshot());
    let snap = state.snapshot();
    assert!(snap.blocks as usize <= CAPACITY, "{snap:?}");
    assert!(
        state.heap_bytes() <= CAPACITY * 64 + (16 << 10),
        "{}",
        state.heap_bytes()
    );
    assert!(snap.batches + snap.gaps > 0);
}
