//! The Kubernetes API server becoming unreachable (connections refused,
//! watches cut) for a long time: the picker keeps routing to the endpoints
//! it last knew, stays ready, and catches up on what changed once the API
//! server is back.

use std::{sync::Arc, time::Duration};

use epp::discovery::kube::WatchedResource;

use crate::{
    discovery::{pool_target, start, vllm},
    fake::{PODS, POOLS},
    pod, poll_until, pool, wait_endpoints,
};

#[tokio::test(start_paused = true)]
async fn an_unreachable_api_server_keeps_the_last_endpoints_and_catches_up_after() {
    let r = start(pool_target(), |f| {
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
        f.apply(PODS, pod("b", "10.0.0.2", true, vllm()));
    });
    wait_endpoints(
        &r.store,
        &["a-rank-0@10.0.0.1:8000", "b-rank-0@10.0.0.2:8000"],
    )
    .await;
    let generation = r.store.snapshot().generation();

    // Record every publication during the outage: there must be none.
    let published = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let recorder = {
        let mut changes = r.store.subscribe();
        let store = Arc::clone(&r.store);
        let published = Arc::clone(&published);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                published.lock().push(store.snapshot().len());
            }
        })
    };

    r.fake.set_unreachable(true);
    // While it is down the cluster changes: a pod goes, another comes.
    r.fake.delete(PODS, "a");
    r.fake.apply(PODS, pod("c", "10.0.0.3", true, vllm()));
    poll_until("reconnects to be refused", || async {
        r.fake.refused() >= 5 && r.stats.errors(WatchedResource::Pods) >= 3
    })
    .await;
    // Ten (virtual) minutes of outage, with the client retrying throughout.
    let refused = r.fake.refused();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(
        r.fake.refused() > refused,
        "discovery keeps trying to reconnect"
    );
    assert!(!r.stats.is_synced(), "the synced gauge shows the outage");
    assert!(r.store.is_synced(), "readiness keeps serving");
    assert_eq!(
        r.store.snapshot().generation(),
        generation,
        "nothing was published during the outage"
    );
    assert_eq!(
        crate::endpoint_list(&r.store).len(),
        2,
        "last known set kept"
    );
    assert!(published.lock().is_empty(), "{:?}", published.lock());

    // Back: the watches resume and replay what changed meanwhile.
    r.fake.set_unreachable(false);
    wait_endpoints(
        &r.store,
        &["b-rank-0@10.0.0.2:8000", "c-rank-0@10.0.0.3:8000"],
    )
    .await;
    poll_until("the synced gauge to recover", || async {
        r.stats.is_synced()
    })
    .await;
    recorder.abort();
    assert!(
        published.lock().iter().all(|&n| n > 0),
        "no publication was empty: {:?}",
        published.lock()
    );
    r.stop().await;
}
