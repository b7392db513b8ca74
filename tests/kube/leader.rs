//! Lease leader election.

use std::{sync::Arc, time::Duration};

use epp::{
    admin::health::{READINESS_SERVICES, ReadinessInputs, readiness_loop},
    discovery::kube::{
        DiscoveryStats, LeaderElectionConfig, LeaderElector, WatchedResource, lease_name,
    },
    endpoints::EndpointStore,
};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tonic_health::{
    pb::{HealthCheckRequest, health_check_response::ServingStatus, health_server::Health},
    server::{HealthReporter, HealthService},
};

use crate::{
    WAIT,
    fake::{self, FakeApi, LEASES, NS},
    poll_until,
};

fn config(identity: &str) -> LeaderElectionConfig {
    LeaderElectionConfig {
        identity: identity.to_owned(),
        ..LeaderElectionConfig::new(NS, "pool")
    }
}

fn lease() -> String {
    lease_name(NS, "pool")
}

struct Elector {
    leader: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Elector {
    fn start(client: kube::Client, stats: Arc<DiscoveryStats>, identity: &str) -> Self {
        let (leader_tx, leader) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(
            LeaderElector::new(client, config(identity), stats).run(leader_tx, stop_rx),
        );
        Self { leader, stop, task }
    }

    async fn wait_leader(&mut self, want: bool) {
        let r = tokio::time::timeout(WAIT, self.leader.wait_for(|l| *l == want)).await;
        assert!(matches!(r, Ok(Ok(_))), "leader never became {want}");
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the elector stops on shutdown")
            .expect("no panic");
    }
}

/// The lease as another replica `holder` would write it, renewed now.
fn held_by(fake: &FakeApi, holder: &str, renew: &str) -> Value {
    let mut lease = fake.get(LEASES, &lease()).unwrap_or_else(|| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": lease()}, "spec": {"leaseTransitions": 0}})
    });
    lease["spec"]["holderIdentity"] = json!(holder);
    lease["spec"]["leaseDurationSeconds"] = json!(15);
    lease["spec"]["renewTime"] = json!(renew);
    lease["spec"]["acquireTime"] = json!(renew);
    lease
}

fn holder(fake: &FakeApi) -> Option<String> {
    fake.get(LEASES, &lease())?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(start_paused = true)]
async fn acquires_a_missing_lease_and_releases_it_on_shutdown() {
    let (client, fake, stats) = fake::start();
    let mut me = Elector::start(client, Arc::clone(&stats), "me");
    me.wait_leader(true).await;
    let l = fake.get(LEASES, &lease()).unwrap();
    assert_eq!(l["spec"]["holderIdentity"], "me");
    assert_eq!(l["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(l["spec"]["leaseTransitions"], 0);
    assert!(l["spec"]["renewTime"].is_string());
    assert_eq!(stats.leader(), Some(true));

    // Renewals keep it: the record changes every retry period.
    let rv = l["metadata"]["resourceVersion"].clone();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(*me.leader.borrow());
    assert_ne!(
        fake.get(LEASES, &lease()).unwrap()["metadata"]["resourceVersion"],
        rv
    );

    let mut leader = me.leader.clone();
    me.stop().await;
    assert!(!*leader.borrow_and_update(), "not serving once stopped");
    assert_eq!(holder(&fake), None, "released: the holder is cleared");
    assert_eq!(
        fake.get(LEASES, &lease()).unwrap()["spec"]["leaseDurationSeconds"],
        1
    );
}

#[tokio::test(start_paused = true)]
async fn follows_a_live_holder_and_takes_over_only_after_it_stops_renewing() {
    let (client, fake, stats) = fake::start();
    fake.apply(
        LEASES,
        held_by(&fake, "other", "2026-01-01T00:00:00.000000Z"),
    );
    let started = Instant::now();
    let mut me = Elector::start(client, stats, "me");

    // The other holder renews every 5 s for a minute: we never lead, even
    // though its renewTime (another node's clock) looks ancient to us.
    for i in 0..12 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !*me.leader.borrow(),
            "led while another holder renewed ({i})"
        );
        fake.apply(
            LEASES,
            held_by(&fake, "other", "2026-01-01T00:00:00.000000Z"),
        );
    }
    assert_eq!(holder(&fake).as_deref(), Some("other"));

    // It stops renewing: expired after one lease duration of no change, as
    // observed on our clock.
    let last_renewal = Instant::now();
    me.wait_leader(true).await;
    let waited = last_renewal.elapsed();
    assert!(
        waited >= Duration::from_secs(15) && waited <= Duration::from_secs(20),
        "took over after {waited:?}"
    );
    assert!(started.elapsed() > Duration::from_secs(60));
    let l = fake.get(LEASES, &lease()).unwrap();
    assert_eq!(l["spec"]["holderIdentity"], "me");
    assert_eq!(
        l["spec"]["leaseTransitions"], 1,
        "a takeover is a transition"
    );
    me.stop().await;
}

#[tokio::test(start_paused = true)]
async fn loses_the_lease_to_a_fresh_holder() {
    let (client, fake, stats) = fake::start();
    let mut me = Elector::start(client, stats, "me");
    me.wait_leader(true).await;

    // Another replica writes itself in (e.g. after a partition healed) and
    // keeps renewing.
    let now = "2030-01-01T00:00:00.000000Z";
    fake.apply(LEASES, held_by(&fake, "other", now));
    me.wait_leader(false).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        fake.apply(LEASES, held_by(&fake, "other", now));
        assert!(!*me.leader.borrow());
    }
    assert_eq!(holder(&fake).as_deref(), Some("other"));
    me.stop().await;
    assert_eq!(
        holder(&fake).as_deref(),
        Some("other"),
        "a follower releases nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_steps_down_before_the_lease_expires() {
    let (client, fake, stats) = fake::start();
    let mut me = Elector::start(client, Arc::clone(&stats), "me");
    me.wait_leader(true).await;
    let last_ok = Instant::now();

    // Eight attempts (16 s at one per retry period) fail.
    fake.fail_next(LEASES, 500, 8);
    me.wait_leader(false).await;
    let after = last_ok.elapsed();
    assert!(
        after <= Duration::from_secs(12),
        "stepped down after {after:?}: must be before others may take over (15 s)"
    );
    assert!(stats.errors(WatchedResource::Lease) >= 3);

    // The API server comes back: the lease still names us, so we renew it.
    me.wait_leader(true).await;
    assert_eq!(holder(&fake).as_deref(), Some("me"));
    me.stop().await;
}

#[tokio::test(start_paused = true)]
async fn two_replicas_one_leader_and_a_clean_handover() {
    let (client, fake, stats) = fake::start();
    let mut a = Elector::start(client.clone(), Arc::clone(&stats), "a");
    a.wait_leader(true).await;
    let mut b = Elector::start(client, stats, "b");
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            *a.leader.borrow() && !*b.leader.borrow(),
            "exactly one leader"
        );
    }
    let stopped = Instant::now();
    a.stop().await;
    b.wait_leader(true).await;
    assert!(
        stopped.elapsed() <= Duration::from_secs(3),
        "a released lease is taken at the next attempt, not after expiry ({:?})",
        stopped.elapsed()
    );
    assert_eq!(holder(&fake).as_deref(), Some("b"));
    b.stop().await;
}

/// The status of `service`; `None` while it has not been set yet.
async fn status(health: &HealthService, service: &str) -> Option<ServingStatus> {
    let response = health
        .check(tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        }))
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

#[tokio::test(start_paused = true)]
async fn followers_report_not_serving_on_readiness_and_ext_proc_health() {
    let (client, fake, stats) = fake::start();
    fake.apply(
        LEASES,
        held_by(&fake, "other", "2030-01-01T00:00:00.000000Z"),
    );
    let store = Arc::new(EndpointStore::new(Duration::from_secs(2)));
    store.replace(Vec::new()).unwrap();
    let reporter = HealthReporter::new();
    let health = HealthService::from_health_reporter(reporter.clone());
    let (leader_tx, leader_rx) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(readiness_loop(
        reporter,
        Arc::clone(&store),
        ReadinessInputs {
            leader: leader_rx,
            shutdown: stop_rx.clone(),
            kv_events_timeout: None,
        },
    ));
    let elector =
        tokio::spawn(LeaderElector::new(client, config("me"), stats).run(leader_tx, stop_rx));

    poll_until("readiness published", || async {
        status(&health, "liveness").await == Some(ServingStatus::Serving)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for service in READINESS_SERVICES {
        assert_eq!(
            status(&health, service).await,
            Some(ServingStatus::NotServing),
            "follower, service {service:?}"
        );
    }
    assert_eq!(
        status(&health, "liveness").await,
        Some(ServingStatus::Serving)
    );

    // The holder releases the lease: we lead and serve.
    let mut released = held_by(&fake, "", "2030-01-01T00:00:00.000000Z");
    released["spec"]["holderIdentity"] = Value::Null;
    fake.apply(LEASES, released);
    poll_until("serving as the leader", || async {
        status(&health, "envoy.service.ext_proc.v3.ExternalProcessor").await
            == Some(ServingStatus::Serving)
    })
    .await;
    for service in READINESS_SERVICES {
        assert_eq!(
            status(&health, service).await,
            Some(ServingStatus::Serving),
            "{service:?}"
        );
    }
    stop.send_replace(true);
    let _ = tokio::time::timeout(WAIT, elector).await;
}
