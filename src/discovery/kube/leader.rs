//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it, for GIE's active-passive high availability: only
//! the leader reports SERVING, so the gateway only talks to it.
//!
//! Every `retry_period` each replica reads the Lease and then:
//! - no Lease: creates it naming itself (a lost create race is a 409);
//! - held by someone else and still valid: stays a follower;
//! - free (empty holder), held by itself, or expired: writes itself as
//!   holder with a fresh `renewTime` through `replace`, which carries the
//!   `resourceVersion` read, so two replicas racing for it cannot both win
//!   (the loser gets 409 Conflict).
//!
//! "Expired" is judged as client-go does, on the local monotonic clock: a
//! lease is valid until `leaseDurationSeconds` after the moment this replica
//! last saw its record change. Wall-clock `renewTime` values from other
//! nodes are never compared with ours, so clock skew cannot make two leaders;
//! the price is that a newcomer waits one lease duration before taking over
//! a lease whose holder died (a cleanly stopped leader releases it, so then
//! the takeover is immediate).
//!
//! A leader that cannot renew within `renew_deadline` (shorter than the lease
//! duration) steps down before anyone else may take over. On shutdown the
//! leader releases the lease (empty holder, 1 s duration).

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::{sync::watch, time::Instant};

use super::{
    KubeDiscoveryError,
    stats::{DiscoveryStats, WatchedResource},
};

use crate::telemetry::logging::chain;

/// The Lease name GIE's picker uses, so Go and Rust pickers of the same pool
/// exclude each other during a migration.
pub fn lease_name(namespace: &str, pool: &str) -> String {
    format!("epp-{namespace}-{pool}.gateway-api-inference-extension.sigs.k8s.io")
}

/// `POD_NAME` (set from the downward API) or the host name, plus a random
/// suffix so a restarted pod never mistakes its predecessor's lease for its own.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "epp".to_owned());
    format!("{base}_{:016x}", fastrand::u64(..))
}

/// Timing and identity of the election.
#[derive(Debug, Clone)]
pub struct LeaderElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// How long a lease stays valid after its last observed renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    /// Interval between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// client-go's and GIE's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, pool: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            lease_name: lease_name(namespace, pool),
            identity: default_identity(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The outcome of one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Leader,
    Follower {
        holder: String,
    },
    /// Someone wrote the lease between our read and our write.
    Conflict,
}

/// When this replica last saw the lease record change, and the duration the
/// record announced then.
#[derive(Debug)]
struct Observed {
    resource_version: Option<String>,
    at: Instant,
    duration: Duration,
}

/// Runs the election; see the module docs.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderElectionConfig,
    stats: Arc<DiscoveryStats>,
    observed: Option<Observed>,
    /// The lease as we last wrote it while holding it (for the release).
    held: Option<Lease>,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderElectionConfig, stats: Arc<DiscoveryStats>) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            stats,
            observed: None,
            held: None,
        }
    }

    /// Runs until `shutdown`, keeping `leader` true exactly while this
    /// replica holds the lease; releases it on the way out.
    pub async fn run(mut self, leader: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let cfg = self.config.clone();
        tracing::info!(lease = %cfg.lease_name, identity = %cfg.identity, "leader election started");
        let stats = Arc::clone(&self.stats);
        let set = |is_leader: bool| {
            stats.set_leader(is_leader);
            leader.send_if_modified(|v| std::mem::replace(v, is_leader) != is_leader);
        };
        set(false);
        // One attempt may take at most twice the retry period, and a leader's
        // attempt never runs past its renew deadline, so a leader that cannot
        // reach the API server stops serving by the deadline (well before the
        // lease expires for the others).
        let attempt_timeout = (cfg.retry_period * 2).max(Duration::from_secs(1));
        let mut is_leader = false;
        let mut last_renew = Instant::now();
        let mut last_holder = String::new();
        loop {
            let started = Instant::now();
            let budget = if is_leader {
                cfg.renew_deadline
                    .saturating_sub(started.duration_since(last_renew))
                    .min(attempt_timeout)
            } else {
                attempt_timeout
            };
            let attempt = tokio::time::timeout(budget, self.try_acquire_or_renew())
                .await
                .unwrap_or(Err(KubeDiscoveryError::Timeout(budget)));
            match attempt {
                Ok(Attempt::Leader) => {
                    self.stats.record_ok(WatchedResource::Lease);
                    last_renew = started;
                    if !is_leader {
                        tracing::info!(lease = %cfg.lease_name, identity = %cfg.identity, "became the leader");
                        is_leader = true;
                    }
                }
                Ok(Attempt::Follower { holder }) => {
                    self.stats.record_ok(WatchedResource::Lease);
                    if is_leader {
                        tracing::warn!(lease = %cfg.lease_name, %holder, "lost the lease; now a follower (NOT_SERVING)");
                        is_leader = false;
                    } else if holder != last_holder {
                        tracing::info!(lease = %cfg.lease_name, %holder, "following the current leader (NOT_SERVING)");
                    }
                    last_holder = holder;
                }
                Ok(Attempt::Conflict) => {
                    tracing::debug!(lease = %cfg.lease_name, "lease changed concurrently; retrying");
                }
                Err(e) => self.stats.record_error(WatchedResource::Lease, &chain(&e)),
            }
            if is_leader && last_renew.elapsed() >= cfg.renew_deadline {
                tracing::warn!(lease = %cfg.lease_name, deadline = ?cfg.renew_deadline,
                    "could not renew the lease in time; stepping down (NOT_SERVING)");
                is_leader = false;
                self.held = None;
            }
            set(is_leader);
            tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => break,
                () = tokio::time::sleep(cfg.retry_period) => {}
            }
        }
        set(false);
        if is_leader {
            match tokio::time::timeout(attempt_timeout, self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %cfg.lease_name, "lease released"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %chain(&e), "releasing the lease failed; it expires on its own")
                }
                Err(_) => tracing::warn!("releasing the lease timed out; it expires on its own"),
            }
        }
    }

    /// Notes the record if it changed since last seen (resets the expiry clock).
    fn observe(&mut self, lease: &Lease, now: Instant) {
        let rv = lease.metadata.resource_version.clone();
        if self
            .observed
            .as_ref()
            .is_some_and(|o| o.resource_version == rv && rv.is_some())
        {
            return;
        }
        let seconds = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|&s| s > 0);
        self.observed = Some(Observed {
            resource_version: rv,
            at: now,
            duration: seconds.map_or(self.config.lease_duration, Duration::from_secs),
        });
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, KubeDiscoveryError> {
        let now = Instant::now();
        let stamp = MicroTime(Timestamp::now());
        let name = self.config.lease_name.clone();
        let me = self.config.identity.clone();
        let pp = PostParams::default();

        let Some(current) = self.api.get_opt(&name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(stamp.clone()),
                    renew_time: Some(stamp),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(created) => {
                    self.observe(&created, now);
                    self.held = Some(created);
                    Ok(Attempt::Leader)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e.into()),
            };
        };

        self.observe(&current, now);
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if !holder.is_empty() && holder != me {
            let valid = self
                .observed
                .as_ref()
                .is_some_and(|o| now < o.at + o.duration);
            if valid {
                self.held = None;
                return Ok(Attempt::Follower { holder });
            }
            tracing::info!(lease = %name, previous = %holder, "lease expired; taking over");
        }

        let mut next = current;
        let mut spec = spec;
        if holder != me {
            spec.acquire_time = Some(stamp.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(me);
        spec.lease_duration_seconds = Some(self.duration_seconds());
        spec.renew_time = Some(stamp);
        next.spec = Some(spec);
        match self.api.replace(&name, &pp, &next).await {
            Ok(updated) => {
                self.observe(&updated, now);
                self.held = Some(updated);
                Ok(Attempt::Leader)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up so a follower takes over at its next attempt
    /// instead of after a full lease duration. The resourceVersion of our
    /// last write guards against clearing a lease someone else took since.
    async fn release(&mut self) -> Result<(), KubeDiscoveryError> {
        let Some(mut lease) = self.held.take() else {
            return Ok(());
        };
        let stamp = MicroTime(Timestamp::now());
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(stamp.clone());
        spec.renew_time = Some(stamp);
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else wrote it since: not ours to release any more.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_gie() {
        assert_eq!(
            lease_name("ns", "pool"),
            "epp-ns-pool.gateway-api-inference-extension.sigs.k8s.io"
        );
        let a = default_identity();
        let b = default_identity();
        assert_ne!(a, b, "random suffix");
        assert!(a.rsplit_once('_').is_some_and(|(_, s)| s.len() == 16));
        let c = LeaderElectionConfig::new("ns", "pool");
        assert!(c.renew_deadline < c.lease_duration && c.retry_period < c.renew_deadline);
    }
}
