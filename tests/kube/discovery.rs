//! Pool and pod discovery, InferenceObjectives, and API failures.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use epp::{
    discovery::kube::{
        ACTIVE_PORTS_ANNOTATION, AppProtocol, DiscoveryStats, KubeDiscovery, KubeDiscoveryOptions,
        POOL_GROUP_V1, PoolSpec, RewriteRule, Target, WatchedResource,
    },
    endpoints::EndpointStore,
};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    WAIT,
    fake::{
        self, FakeApi, LLMD_OBJECTIVES_V1, LLMD_OBJECTIVES_V1ALPHA2, LLMD_REWRITES_V1,
        LLMD_REWRITES_V1ALPHA2, NS, OBJECTIVES, PODS, POOLS, REWRITES,
    },
    pod, poll_until, pool, wait_endpoints, wait_store,
};

pub(crate) struct Running {
    pub(crate) store: Arc<EndpointStore>,
    pub(crate) fake: FakeApi,
    pub(crate) stats: Arc<DiscoveryStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    objectives: watch::Receiver<Option<HashMap<String, i32>>>,
    rewrites: watch::Receiver<Option<Vec<RewriteRule>>>,
}

impl Running {
    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("discovery stops on shutdown")
            .expect("discovery task did not panic");
    }
}

pub(crate) fn pool_target() -> Target {
    Target::Pool {
        name: "pool".into(),
        group: POOL_GROUP_V1.into(),
    }
}

/// Starts discovery of `target` over a fake server that `seed` fills first.
pub(crate) fn start(target: Target, seed: impl FnOnce(&FakeApi)) -> Running {
    let (client, fake, stats) = fake::start();
    seed(&fake);
    let store = Arc::new(EndpointStore::new(Duration::from_secs(2)));
    let (objectives_tx, objectives) = watch::channel(None);
    let (rewrites_tx, rewrites) = watch::channel(None);
    let discovery = KubeDiscovery::new(
        client,
        KubeDiscoveryOptions::new(NS, target),
        Arc::clone(&store),
        Arc::clone(&stats),
    )
    .with_objectives(Arc::new(move |m| {
        objectives_tx.send_replace(Some(m));
    }))
    .with_rewrites(Arc::new(move |rules| {
        rewrites_tx.send_replace(Some(rules));
    }));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        discovery.run(stop_rx).await.expect("watches never end");
    });
    Running {
        store,
        fake,
        stats,
        stop,
        task,
        objectives,
        rewrites,
    }
}

pub(crate) fn vllm() -> serde_json::Value {
    json!({"app": "vllm"})
}

#[tokio::test(start_paused = true)]
async fn pool_and_ready_pods_become_endpoints_once_the_pool_exists() {
    let started = Instant::now();
    let r = start(pool_target(), |f| {
        f.apply(
            PODS,
            pod("a", "10.0.0.1", true, json!({"app": "vllm", "zone": "z1"})),
        );
        f.apply(PODS, pod("b-unready", "10.0.0.2", false, vllm()));
        f.apply(
            PODS,
            pod("c-other", "10.0.0.3", true, json!({"app": "sglang"})),
        );
        let mut terminating = pod("d-terminating", "10.0.0.4", true, vllm());
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        f.apply(PODS, terminating);
        let mut narrowed = pod("e", "10.0.0.5", true, vllm());
        narrowed["metadata"]["annotations"] = json!({ACTIVE_PORTS_ANNOTATION: "8001"});
        f.apply(PODS, narrowed);
        let mut no_ip = pod("f-no-ip", "", true, vllm());
        no_ip["status"].as_object_mut().unwrap().remove("podIP");
        f.apply(PODS, no_ip);
    });
    poll_until("both watches open", || async {
        r.fake.watches(PODS) == 1 && r.fake.watches(POOLS) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !r.store.is_synced(),
        "lists seen but no pool: not ready (as GIE's PoolHasSynced)"
    );
    assert!(!r.stats.is_synced());

    r.fake.apply(POOLS, pool("other-pool", vllm(), &[7000]));
    r.fake.apply(POOLS, pool("pool", vllm(), &[8000, 8001]));
    wait_endpoints(
        &r.store,
        &[
            "a-rank-0@10.0.0.1:8000",
            "a-rank-1@10.0.0.1:8001",
            "e-rank-1@10.0.0.5:8001",
        ],
    )
    .await;
    let snapshot = r.store.snapshot();
    let a = snapshot.get("10.0.0.1:8000").unwrap();
    assert_eq!(
        a.label("zone"),
        Some("z1"),
        "labels are copied from the pod"
    );
    assert!(r.stats.is_synced());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "no backoff or timer delayed the sync"
    );
    assert!(
        r.fake
            .requests("pools")
            .iter()
            .all(|q| q.contains("fieldSelector=metadata.name%3Dpool")),
        "the pool is watched by name: {:?}",
        r.fake.requests("pools")
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pods_becoming_ready_unready_terminating_and_deleted() {
    let r = start(pool_target(), |f| {
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
        f.apply(PODS, pod("b", "10.0.0.2", false, vllm()));
    });
    wait_endpoints(&r.store, &["a-rank-0@10.0.0.1:8000"]).await;

    r.fake.apply(PODS, pod("b", "10.0.0.2", true, vllm()));
    wait_endpoints(
        &r.store,
        &["a-rank-0@10.0.0.1:8000", "b-rank-0@10.0.0.2:8000"],
    )
    .await;

    r.fake.apply(PODS, pod("a", "10.0.0.1", false, vllm()));
    wait_endpoints(&r.store, &["b-rank-0@10.0.0.2:8000"]).await;

    let mut terminating = pod("b", "10.0.0.2", true, vllm());
    terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    r.fake.apply(PODS, terminating);
    wait_endpoints(&r.store, &[]).await;

    r.fake.delete(PODS, "b");
    r.fake.apply(PODS, pod("a", "10.0.0.9", true, vllm()));
    wait_endpoints(&r.store, &["a-rank-0@10.0.0.9:8000"]).await;

    r.fake.delete(PODS, "a");
    wait_endpoints(&r.store, &[]).await;
    assert!(r.store.is_synced(), "an empty pool is still a synced view");
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pool_selector_and_port_changes_apply_without_restart_and_deletion_empties_the_set() {
    let r = start(pool_target(), |f| {
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("v", "10.0.0.1", true, vllm()));
        f.apply(PODS, pod("s", "10.0.0.2", true, json!({"app": "sglang"})));
    });
    wait_endpoints(&r.store, &["v-rank-0@10.0.0.1:8000"]).await;
    let pod_lists = r.fake.requests("/pods?").len();

    r.fake
        .apply(POOLS, pool("pool", json!({"app": "sglang"}), &[8000]));
    wait_endpoints(&r.store, &["s-rank-0@10.0.0.2:8000"]).await;

    r.fake
        .apply(POOLS, pool("pool", json!({"app": "sglang"}), &[9000, 9001]));
    wait_endpoints(
        &r.store,
        &["s-rank-0@10.0.0.2:9000", "s-rank-1@10.0.0.2:9001"],
    )
    .await;

    // An invalid spec (the CRD would reject it, but be safe) keeps the last valid one.
    let mut invalid = pool("pool", json!({"app": "sglang"}), &[9000]);
    invalid["spec"]["targetPorts"] = json!([]);
    r.fake.apply(POOLS, invalid);
    r.fake
        .apply(PODS, pod("s2", "10.0.0.3", true, json!({"app": "sglang"})));
    wait_endpoints(
        &r.store,
        &[
            "s-rank-0@10.0.0.2:9000",
            "s-rank-1@10.0.0.2:9001",
            "s2-rank-0@10.0.0.3:9000",
            "s2-rank-1@10.0.0.3:9001",
        ],
    )
    .await;

    r.fake.delete(POOLS, "pool");
    wait_endpoints(&r.store, &[]).await;
    assert!(
        r.store.is_synced(),
        "a deleted pool serves 503s, it does not unready"
    );

    r.fake.apply(POOLS, pool("pool", vllm(), &[8000]));
    wait_endpoints(&r.store, &["v-rank-0@10.0.0.1:8000"]).await;
    assert_eq!(
        r.fake.requests("/pods?").len(),
        pod_lists,
        "pool changes need no new pod list"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bursts_are_coalesced_and_the_first_sync_is_immediate() {
    let started = Instant::now();
    let r = start(pool_target(), |f| {
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
    });
    wait_endpoints(&r.store, &["a-rank-0@10.0.0.1:8000"]).await;
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "the first sync is not debounced (took {:?})",
        started.elapsed()
    );
    let generation = r.store.snapshot().generation();
    for i in 0..20 {
        r.fake.apply(
            PODS,
            pod(&format!("p{i}"), &format!("10.0.1.{i}"), true, vllm()),
        );
    }
    wait_store(&r.store, "21 endpoints", |s| s.snapshot().len() == 21).await;
    assert_eq!(
        r.store.snapshot().generation(),
        generation + 1,
        "a burst of 20 pods is one publication"
    );

    // Changes to pods outside the pool publish nothing.
    for i in 0..5 {
        r.fake.apply(
            PODS,
            pod(
                &format!("x{i}"),
                &format!("10.0.2.{i}"),
                true,
                json!({"app": "x"}),
            ),
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(r.store.snapshot().generation(), generation + 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn watch_errors_keep_the_last_endpoints_until_the_watch_recovers() {
    let r = start(pool_target(), |f| {
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
        f.apply(PODS, pod("b", "10.0.0.2", true, vllm()));
        // The first two pod lists fail: discovery retries with backoff.
        f.fail_next(PODS, 500, 2);
    });
    wait_endpoints(
        &r.store,
        &["a-rank-0@10.0.0.1:8000", "b-rank-0@10.0.0.2:8000"],
    )
    .await;
    assert_eq!(r.stats.errors(WatchedResource::Pods), 2);
    assert!(r.stats.is_synced());

    // Record every published set from here on: none may be empty. (The
    // debounce spaces publications out, so the recorder sees each one.)
    let sizes = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let recorder = {
        let mut changes = r.store.subscribe();
        let store = Arc::clone(&r.store);
        let sizes = Arc::clone(&sizes);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                sizes.lock().push(store.snapshot().len());
            }
        })
    };

    // The watch connection drops and the API server then fails for a while.
    r.fake.fail_next(PODS, 500, 3);
    r.fake.drop_watches(PODS);
    r.fake.apply(PODS, pod("c", "10.0.0.3", true, vllm()));
    poll_until("the reconnect attempts to fail", || async {
        r.stats.errors(WatchedResource::Pods) >= 4
    })
    .await;
    assert!(!r.stats.is_synced(), "the synced gauge shows the outage");
    assert!(
        r.store.is_synced(),
        "readiness keeps serving the last known set"
    );
    assert_eq!(r.store.snapshot().len(), 2, "last known endpoints kept");

    // The watch resumes from its resourceVersion and replays what it missed.
    wait_endpoints(
        &r.store,
        &[
            "a-rank-0@10.0.0.1:8000",
            "b-rank-0@10.0.0.2:8000",
            "c-rank-0@10.0.0.3:8000",
        ],
    )
    .await;
    assert_eq!(r.stats.errors(WatchedResource::Pods), 5);
    poll_until("the gauge to recover", || async { r.stats.is_synced() }).await;

    // History compacted during a disconnect: 410 Gone, then a relist whose
    // first attempts fail. The old set stays until the relist completes and
    // is then replaced in one step (never an empty intermediate).
    r.fake.drop_watches(PODS);
    r.fake.delete(PODS, "a");
    r.fake.apply(PODS, pod("d", "10.0.0.4", true, vllm()));
    r.fake.compact();
    r.fake.fail_next_lists(PODS, 500, 2);
    wait_endpoints(
        &r.store,
        &[
            "b-rank-0@10.0.0.2:8000",
            "c-rank-0@10.0.0.3:8000",
            "d-rank-0@10.0.0.4:8000",
        ],
    )
    .await;

    // The pool watch fails too: endpoints stay.
    let before = r.store.snapshot().generation();
    r.fake.fail_next(POOLS, 503, 2);
    r.fake.drop_watches(POOLS);
    poll_until("pool watch errors", || async {
        r.stats.errors(WatchedResource::InferencePool) >= 2
    })
    .await;
    assert_eq!(r.store.snapshot().generation(), before);
    poll_until("the pool watch to reconnect", || async {
        r.fake.watches(POOLS) == 1 && r.stats.is_synced()
    })
    .await;
    r.fake.apply(POOLS, pool("pool", vllm(), &[8080]));
    wait_endpoints(
        &r.store,
        &[
            "b-rank-0@10.0.0.2:8080",
            "c-rank-0@10.0.0.3:8080",
            "d-rank-0@10.0.0.4:8080",
        ],
    )
    .await;

    recorder.abort();
    let sizes = sizes.lock().clone();
    assert!(
        sizes.len() >= 3 && sizes.iter().all(|&n| n > 0),
        "no publication was empty: {sizes:?}"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn standalone_selector_watches_selected_pods_without_crds() {
    let spec = PoolSpec::new(
        BTreeMap::from([("app".into(), "vllm".into())]),
        vec![8000, 8001],
        AppProtocol::Http,
    )
    .unwrap();
    let r = start(Target::Selector(spec), |f| {
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
        f.apply(PODS, pod("b", "10.0.0.2", true, json!({"app": "other"})));
    });
    wait_endpoints(
        &r.store,
        &["a-rank-0@10.0.0.1:8000", "a-rank-1@10.0.0.1:8001"],
    )
    .await;
    assert!(r.fake.requests("inferencepools").is_empty());
    assert!(
        r.fake.requests("inferenceobjectives").is_empty(),
        "no objectives in standalone mode"
    );
    let pods = r.fake.requests("/pods");
    assert!(
        !pods.is_empty() && pods.iter().all(|q| q.contains("labelSelector=app%3Dvllm")),
        "the selector is applied by the API server: {pods:?}"
    );

    // Relabelled out of the selector: the API server sends DELETED.
    r.fake
        .apply(PODS, pod("a", "10.0.0.1", true, json!({"app": "other"})));
    wait_endpoints(&r.store, &[]).await;
    r.fake.apply(PODS, pod("b", "10.0.0.2", true, vllm()));
    wait_endpoints(
        &r.store,
        &["b-rank-0@10.0.0.2:8000", "b-rank-1@10.0.0.2:8001"],
    )
    .await;
    r.stop().await;
}

fn objective(name: &str, pool: &str, priority: Option<i32>) -> serde_json::Value {
    let mut spec = json!({"poolRef": {"name": pool, "group": POOL_GROUP_V1}});
    if let Some(p) = priority {
        spec["priority"] = json!(p);
    }
    json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": name},
        "spec": spec,
    })
}

async fn wait_objectives(
    rx: &mut watch::Receiver<Option<HashMap<String, i32>>>,
    want: &[(&str, i32)],
) {
    let want: HashMap<String, i32> = want.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    let got = tokio::time::timeout(WAIT, rx.wait_for(|m| m.as_ref() == Some(&want)))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        got,
        "objectives {want:?} never pushed; last {:?}",
        *rx.borrow()
    );
}

#[tokio::test(start_paused = true)]
async fn objectives_of_our_pool_are_pushed() {
    let mut r = start(pool_target(), |f| {
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
        f.apply(OBJECTIVES, objective("chat", "pool", Some(2)));
        f.apply(OBJECTIVES, objective("batch", "pool", Some(-1)));
        f.apply(OBJECTIVES, objective("default", "pool", None));
        f.apply(OBJECTIVES, objective("elsewhere", "other-pool", Some(9)));
    });
    wait_objectives(
        &mut r.objectives,
        &[("chat", 2), ("batch", -1), ("default", 0)],
    )
    .await;

    r.fake
        .apply(OBJECTIVES, objective("batch", "pool", Some(-5)));
    wait_objectives(
        &mut r.objectives,
        &[("chat", 2), ("batch", -5), ("default", 0)],
    )
    .await;

    r.fake.delete(OBJECTIVES, "chat");
    r.fake.delete(OBJECTIVES, "default");
    wait_objectives(&mut r.objectives, &[("batch", -5)]).await;

    r.fake
        .apply(OBJECTIVES, objective("elsewhere", "other-pool", Some(1)));
    r.fake
        .apply(OBJECTIVES, objective("batch", "other-pool", Some(1)));
    wait_objectives(&mut r.objectives, &[]).await;
    assert_eq!(r.stats.errors(WatchedResource::InferenceObjectives), 0);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_objective_crd_is_not_an_error_and_is_looked_for_again_rarely() {
    let mut r = start(pool_target(), |f| {
        f.set_absent(OBJECTIVES, true);
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
    });
    wait_endpoints(&r.store, &["a-rank-0@10.0.0.1:8000"]).await;
    let gie = "x-k8s.io/v1alpha2/namespaces/ns/inferenceobjectives";
    poll_until("the objectives list", || async {
        !r.fake.requests(gie).is_empty()
    })
    .await;
    let at = Instant::now();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        r.fake.requests(gie).len(),
        1,
        "a missing CRD is not retried with the watcher's seconds-scale backoff"
    );
    assert_eq!(r.stats.errors(WatchedResource::InferenceObjectives), 0);
    assert!(
        r.stats.is_synced() && r.store.is_synced(),
        "readiness does not depend on it"
    );
    assert!(r.objectives.borrow().is_none(), "nothing pushed");

    // The CRD gets installed: picked up at the next look.
    r.fake.set_absent(OBJECTIVES, false);
    r.fake.apply(OBJECTIVES, objective("chat", "pool", Some(3)));
    wait_objectives(&mut r.objectives, &[("chat", 3)]).await;
    assert!(
        at.elapsed() >= Duration::from_secs(240),
        "retried after minutes"
    );

    // And removed again: its objectives go with it.
    r.fake.set_absent(OBJECTIVES, true);
    r.fake.drop_watches(OBJECTIVES);
    wait_objectives(&mut r.objectives, &[]).await;
    r.stop().await;
}

/// An InferenceObjective in llm-d-router's group: `llm-d.ai/v1` names its
/// pools in a list.
fn llmd_objective(name: &str, pools: &[&str], priority: i32) -> serde_json::Value {
    let refs: Vec<serde_json::Value> = pools.iter().map(|p| json!({"name": p})).collect();
    json!({
        "apiVersion": "llm-d.ai/v1",
        "kind": "InferenceObjective",
        "metadata": {"name": name},
        "spec": {"poolRefs": refs, "priority": priority},
    })
}

#[tokio::test(start_paused = true)]
async fn objectives_of_both_groups_are_merged_and_other_pools_ignored() {
    let mut r = start(pool_target(), |f| {
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
        f.apply(OBJECTIVES, objective("gie-only", "pool", Some(1)));
        f.apply(OBJECTIVES, objective("both", "pool", Some(1)));
        f.apply(
            LLMD_OBJECTIVES_V1,
            llmd_objective("llmd", &["other", "pool"], 4),
        );
        f.apply(LLMD_OBJECTIVES_V1, llmd_objective("both", &["pool"], 7));
        f.apply(LLMD_OBJECTIVES_V1, llmd_objective("foreign", &["other"], 9));
    });
    wait_objectives(
        &mut r.objectives,
        &[("gie-only", 1), ("llmd", 4), ("both", 7)],
    )
    .await;
    // The llm-d object leaves: GIE's one of the same name applies again.
    r.fake.delete(LLMD_OBJECTIVES_V1, "both");
    wait_objectives(
        &mut r.objectives,
        &[("gie-only", 1), ("llmd", 4), ("both", 1)],
    )
    .await;
    assert_eq!(r.stats.errors(WatchedResource::InferenceObjectives), 0);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn llmd_v1alpha2_is_watched_where_v1_is_not_served() {
    let mut r = start(pool_target(), |f| {
        f.set_absent(LLMD_OBJECTIVES_V1, true);
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
        let mut older = objective("chat", "pool", Some(5));
        older["apiVersion"] = json!("llm-d.ai/v1alpha2");
        f.apply(LLMD_OBJECTIVES_V1ALPHA2, older);
    });
    wait_objectives(&mut r.objectives, &[("chat", 5)]).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn policy_crds_installed_after_startup_are_picked_up() {
    let mut r = start(pool_target(), |f| {
        for key in [
            OBJECTIVES,
            LLMD_OBJECTIVES_V1,
            LLMD_OBJECTIVES_V1ALPHA2,
            REWRITES,
            LLMD_REWRITES_V1,
            LLMD_REWRITES_V1ALPHA2,
        ] {
            f.set_absent(key, true);
        }
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
    });
    wait_endpoints(&r.store, &["a-rank-0@10.0.0.1:8000"]).await;
    poll_until("every group looked at", || async {
        !r.fake
            .requests("llm-d.ai/v1alpha2/namespaces/ns/inferencemodelrewrites")
            .is_empty()
            && !r
                .fake
                .requests("llm-d.ai/v1alpha2/namespaces/ns/inferenceobjectives")
                .is_empty()
    })
    .await;
    assert!(r.store.is_synced(), "readiness does not wait for them");
    assert!(r.objectives.borrow().is_none() && r.rewrites.borrow().is_none());

    r.fake.set_absent(LLMD_OBJECTIVES_V1, false);
    r.fake.set_absent(LLMD_REWRITES_V1, false);
    r.fake
        .apply(LLMD_OBJECTIVES_V1, llmd_objective("late", &["pool"], 2));
    r.fake
        .apply(LLMD_REWRITES_V1, rewrite("late", &["m"], "m-v2"));
    wait_objectives(&mut r.objectives, &[("late", 2)]).await;
    wait_rewrites(&mut r.rewrites, &[(&["m"], "m-v2")]).await;
    assert_eq!(r.stats.errors(WatchedResource::InferenceModelRewrites), 0);
    r.stop().await;
}

/// An InferenceModelRewrite of llm-d.ai/v1 for our pool with one rule.
fn rewrite(name: &str, models: &[&str], target: &str) -> serde_json::Value {
    let matches: Vec<serde_json::Value> = models
        .iter()
        .map(|m| json!({"model": {"type": "Exact", "value": m}}))
        .collect();
    json!({
        "apiVersion": "llm-d.ai/v1",
        "kind": "InferenceModelRewrite",
        "metadata": {"name": name},
        "spec": {
            "poolRefs": [{"name": "pool"}],
            "rules": [{"matches": matches, "targets": [{"modelRewrite": target}]}],
        },
    })
}

async fn wait_rewrites(
    rx: &mut watch::Receiver<Option<Vec<RewriteRule>>>,
    want: &[(&[&str], &str)],
) {
    let matches = |rules: &Option<Vec<RewriteRule>>| {
        rules.as_ref().is_some_and(|rules| {
            rules.len() == want.len()
                && rules.iter().zip(want).all(|(r, (models, target))| {
                    r.models == *models && r.targets.first().map(|t| t.0.as_str()) == Some(target)
                })
        })
    };
    let got = tokio::time::timeout(WAIT, rx.wait_for(|r| matches(r)))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        got,
        "rewrites {want:?} never pushed; last {:?}",
        *rx.borrow()
    );
}

#[tokio::test(start_paused = true)]
async fn model_rewrites_of_both_groups_apply_in_precedence_order() {
    let mut r = start(pool_target(), |f| {
        f.apply(POOLS, pool("pool", vllm(), &[8000]));
        f.apply(PODS, pod("a", "10.0.0.1", true, vllm()));
        let mut gie = rewrite("gie", &[], "catch-all");
        gie["apiVersion"] = json!("inference.networking.x-k8s.io/v1alpha2");
        gie["spec"] = json!({"poolRef": {"name": "pool"}, "rules": gie["spec"]["rules"].clone()});
        gie["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        f.apply(REWRITES, gie);
        let mut exact = rewrite("exact", &["m"], "m-new");
        exact["metadata"]["creationTimestamp"] = json!("2026-05-01T00:00:00Z");
        f.apply(LLMD_REWRITES_V1, exact);
        let mut foreign = rewrite("foreign", &["m"], "elsewhere");
        foreign["spec"]["poolRefs"] = json!([{"name": "other"}]);
        f.apply(LLMD_REWRITES_V1, foreign);
    });
    wait_rewrites(&mut r.rewrites, &[(&["m"], "m-new"), (&[], "catch-all")]).await;
    r.fake.delete(REWRITES, "gie");
    wait_rewrites(&mut r.rewrites, &[(&["m"], "m-new")]).await;
    r.stop().await;
}
