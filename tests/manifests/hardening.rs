//! Checks added with the GKE second pass: several model servers, vLLM's
//! KV-cache events, the picker's Service protocol, the drain chain from the
//! load balancer to the model server, disruption budgets, network policies,
//! the picker's tokenizer files and InferenceObjective references. Like
//! checks.rs, each is a plain function over the rendered objects, listed in
//! checks::ALL, with negative cases in negative_hardening.rs.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::{
    checks::{Ctx, Out, Violation, model_servers, targeting},
    epp::{arg_value, epp_containers},
    model::{
        Obj, Workload, args, arr_at, find, id, map_at, match_labels, namespace, of_kind, replicas,
        str_at, workloads,
    },
};

/// Fields of vLLM's KVEventsConfig (vllm/config/kv_events.py).
pub const KV_EVENTS_KEYS: &[&str] = &[
    "enable_kv_cache_events",
    "publisher",
    "endpoint",
    "replay_endpoint",
    "buffer_steps",
    "hwm",
    "max_queue_size",
    "topic",
];

/// The model a server container serves: `--model`, or the first positional
/// argument (`vllm serve <model>`).
pub fn served_model(c: &Value) -> Option<&str> {
    let a = args(c);
    // `command: [vllm, serve]`: args() includes the subcommand.
    let a = a.strip_prefix(&["serve"]).unwrap_or(&a);
    arg_value(a, "--model").or_else(|| a.first().copied().filter(|s| !s.starts_with('-')))
}

/// The workloads running the endpoint picker.
fn picker_workloads(objs: &[Obj]) -> Vec<Workload<'_>> {
    let mut seen = BTreeSet::new();
    epp_containers(objs)
        .into_iter()
        .filter(|e| seen.insert(id(e.workload.obj)))
        .map(|e| e.workload)
        .collect()
}

fn is_picker(w: &Workload<'_>, objs: &[Obj]) -> bool {
    picker_workloads(objs).iter().any(|p| p.obj == w.obj)
}

// ------------------------------------------------------------ several pods

/// Each pool selects at least `ctx.min_endpoints` model-server pods: with
/// one endpoint, prefix-aware routing has nothing to choose between.
pub fn pool_has_choice(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pool-has-choice");
    for pool in of_kind(objs, "InferencePool") {
        let Some(selector) = pool.pointer("/spec/selector").and_then(match_labels) else {
            continue; // pool-selects-model-server reports it
        };
        let pods: u64 = workloads(objs)
            .filter(|w| w.namespace() == namespace(pool) && w.selected_by(selector))
            .filter(|w| !is_picker(w, objs))
            .map(|w| replicas(&w))
            .sum();
        if pods < ctx.min_endpoints {
            out.push(format!(
                "{} selects {pods} model-server pod(s); the picker needs at least {} to have a choice",
                id(pool),
                ctx.min_endpoints
            ));
        }
    }
    out.done()
}

/// Model-server pods get no Service environment variables: the picker's
/// Service (vllm-qwen25-3b-epp) would inject VLLM_QWEN25_3B_EPP_PORT=tcp://...
/// and friends into vLLM's own VLLM_* settings namespace, and a Service
/// named "vllm" would set VLLM_PORT itself (GIE's and GKE's vLLM samples
/// set enableServiceLinks: false for this).
pub fn no_service_links(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("no-service-links");
    for w in model_servers(objs) {
        if w.pod_spec().get("enableServiceLinks") != Some(&Value::Bool(false)) {
            out.push(format!(
                "{} must set enableServiceLinks: false: Service variables such as VLLM_..._PORT=tcp://... land in vLLM's VLLM_* settings",
                id(w.obj)
            ));
        }
    }
    out.done()
}

// ------------------------------------------------------------- KV events

/// The port of `tcp://*:<port>` (a bind address: vLLM binds on `*`).
fn bind_port(endpoint: &str) -> Option<u64> {
    endpoint.strip_prefix("tcp://*:")?.parse().ok()
}

/// vLLM publishes KV-cache events where a subscriber can reach them: the
/// config parses with only KVEventsConfig's keys, turns events on over ZMQ,
/// binds the event and replay sockets on the container ports named
/// kv-events and kv-replay, and names this pod (POD_IP from the downward
/// API), its port and the served model in the topic. Required on GKE's TPU
/// servers; checked wherever present.
pub fn kv_events(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("kv-events");
    let target_ports: BTreeSet<u64> = of_kind(objs, "InferencePool")
        .flat_map(|p| arr_at(p, "/spec/targetPorts"))
        .filter_map(|p| p.get("number").and_then(Value::as_u64))
        .collect();
    for w in model_servers(objs) {
        let who = id(w.obj);
        for c in w.containers() {
            let a = args(c);
            let tpu = c.pointer("/resources/limits/google.com~1tpu").is_some();
            let Some(text) = arg_value(&a, "--kv-events-config") else {
                if ctx.gke && tpu {
                    out.push(format!(
                        "{who} runs vLLM on TPU without --kv-events-config: the picker's precise prefix routing needs the events"
                    ));
                }
                continue;
            };
            let cfg: serde_json::Map<String, Value> = match serde_json::from_str(text) {
                Ok(Value::Object(m)) => m,
                Ok(other) => {
                    out.push(format!(
                        "{who} --kv-events-config is not a JSON object: {other}"
                    ));
                    continue;
                }
                Err(e) => {
                    out.push(format!("{who} --kv-events-config is not JSON: {e}"));
                    continue;
                }
            };
            for k in cfg.keys().filter(|k| !KV_EVENTS_KEYS.contains(&k.as_str())) {
                out.push(format!(
                    "{who} --kv-events-config has key {k:?}, which vLLM's KVEventsConfig does not know ({KV_EVENTS_KEYS:?})"
                ));
            }
            if cfg.get("enable_kv_cache_events") != Some(&Value::Bool(true)) {
                out.push(format!(
                    "{who} --kv-events-config must set enable_kv_cache_events: true"
                ));
            }
            if cfg.get("publisher").and_then(Value::as_str) != Some("zmq") {
                out.push(format!(
                    "{who} --kv-events-config publisher must be \"zmq\" (got {:?})",
                    cfg.get("publisher")
                ));
            }
            let ports: Vec<(Option<&str>, u64)> = arr_at(c, "/ports")
                .iter()
                .filter_map(|p| Some((str_at(p, "/name"), p.get("containerPort")?.as_u64()?)))
                .collect();
            for (key, port_name) in [("endpoint", "kv-events"), ("replay_endpoint", "kv-replay")] {
                let endpoint = cfg.get(key).and_then(Value::as_str).unwrap_or("");
                let declared = ports
                    .iter()
                    .find(|(n, _)| *n == Some(port_name))
                    .map(|p| p.1);
                match (bind_port(endpoint), declared) {
                    (Some(p), Some(d)) if p == d => {}
                    (bound, declared) => out.push(format!(
                        "{who} --kv-events-config {key} {endpoint:?} must bind tcp://*:<port> on the container port named {port_name} (bound {bound:?}, declared {declared:?})"
                    )),
                }
            }
            let topic = cfg.get("topic").and_then(Value::as_str).unwrap_or("");
            let model = served_model(c).unwrap_or("");
            let names_pod = target_ports
                .iter()
                .any(|p| topic.starts_with(&format!("kv@$(POD_IP):{p}@")));
            if !names_pod || !topic.ends_with(&format!("@{model}")) {
                out.push(format!(
                    "{who} --kv-events-config topic {topic:?} must be kv@$(POD_IP):<target port>@{model}: subscribers tell the pods apart by it"
                ));
            }
            let pod_ip_env = arr_at(c, "/env").iter().any(|e| {
                str_at(e, "/name") == Some("POD_IP")
                    && str_at(e, "/valueFrom/fieldRef/fieldPath") == Some("status.podIP")
            });
            if topic.contains("$(POD_IP)") && !pod_ip_env {
                out.push(format!(
                    "{who} uses $(POD_IP) in the KV-events topic but has no POD_IP env from status.podIP"
                ));
            }
        }
    }
    out.done()
}

// ----------------------------------------------------- picker's Service

/// The Service port a pool's endpointPickerRef names declares the protocol
/// the picker really serves there: HTTP2 (HTTP/2 over TLS, as GKE documents
/// it and GIE's chart sets it on its GKE callout backend) when the picker
/// serves TLS, kubernetes.io/h2c (cleartext HTTP/2) only with
/// --secure-serving=false. Absent means HTTP/1.1 on GKE, which gRPC cannot
/// use; h2c against a TLS port fails the handshake, and FailOpen then hides
/// the picker.
pub fn epp_service_protocol(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("epp-service-protocol");
    let epps = epp_containers(objs);
    for pool in of_kind(objs, "InferencePool") {
        let Some(r) = pool.pointer("/spec/endpointPickerRef") else {
            continue;
        };
        let svc_name = str_at(r, "/name").unwrap_or("");
        let port = r.pointer("/port/number").and_then(Value::as_u64);
        let Some(svc) = find(objs, "Service", svc_name, namespace(pool)) else {
            continue; // pool-picker-ref reports it
        };
        let Some(svc_port) = arr_at(svc, "/spec/ports")
            .iter()
            .find(|p| p.get("port").and_then(Value::as_u64) == port)
        else {
            continue;
        };
        let selector = map_at(svc, "/spec/selector").cloned().unwrap_or_default();
        let tls: BTreeSet<bool> = epps
            .iter()
            .filter(|e| e.workload.selected_by(&selector))
            .filter_map(|e| e.flags().ok())
            .map(|f| f.secure_serving)
            .collect();
        let proto = str_at(svc_port, "/appProtocol");
        for secure in tls {
            let ok = if secure {
                proto.is_some_and(|p| p.eq_ignore_ascii_case("http2"))
            } else {
                proto == Some("kubernetes.io/h2c")
            };
            if !ok {
                let want = if secure {
                    "HTTP2 (HTTP/2 over TLS: the picker serves TLS)"
                } else {
                    "kubernetes.io/h2c (the picker runs with --secure-serving=false)"
                };
                out.push(format!(
                    "{} port {port:?} (endpointPickerRef of {}) has appProtocol {proto:?}; it must be {want}",
                    id(svc),
                    id(pool)
                ));
            }
        }
    }
    out.done()
}

// -------------------------------------------------------- drain budget

fn seconds(v: Option<&Value>, default: u64) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(default)
}

/// A model server's drain: the preStop sleep and the server's own
/// --shutdown-timeout after SIGTERM.
fn drain_of(w: &Workload<'_>) -> (u64, u64) {
    w.containers()
        .iter()
        .map(|c| {
            let pre_stop = seconds(c.pointer("/lifecycle/preStop/sleep/seconds"), 0);
            let a = args(c);
            let shutdown = arg_value(&a, "--shutdown-timeout")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (pre_stop, shutdown)
        })
        .max_by_key(|(p, s)| p + s)
        .unwrap_or((0, 0))
}

/// A stream survives every step of taking a model server away:
/// - GKE: the load balancer drains a removed endpoint for at least as long
///   as a request may run (GCPBackendPolicy connectionDraining >= timeoutSec;
///   its default, 0, cuts every stream);
/// - the server keeps serving that long (preStop + --shutdown-timeout >=
///   the draining timeout) and the kubelet lets it (grace period >= preStop
///   + --shutdown-timeout + 5 s);
/// - the picker, which every stream passes through to its last byte, is
///   given at least the model servers' grace period (GIE: "mirror the
///   longest grace period of the pods within the pool").
pub fn drain_budget(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("drain-budget");
    let servers = model_servers(objs);
    for pool in of_kind(objs, "InferencePool") {
        if !ctx.gke {
            break;
        }
        for p in targeting(objs, "GCPBackendPolicy", pool) {
            let timeout = seconds(p.pointer("/spec/default/timeoutSec"), 30);
            let draining = seconds(
                p.pointer("/spec/default/connectionDraining/drainingTimeoutSec"),
                0,
            );
            if draining < timeout {
                out.push(format!(
                    "{} connectionDraining.drainingTimeoutSec {draining} is below timeoutSec {timeout}: a stream still running on a removed pod is cut",
                    id(p)
                ));
            }
            for w in &servers {
                let (pre_stop, shutdown) = drain_of(w);
                if pre_stop + shutdown < draining {
                    out.push(format!(
                        "{} serves {pre_stop} s (preStop) + {shutdown} s (--shutdown-timeout) after removal, less than the {draining} s the load balancer drains it",
                        id(w.obj)
                    ));
                }
            }
        }
    }
    let mut longest = 0;
    for w in &servers {
        let grace = seconds(w.pod_spec().get("terminationGracePeriodSeconds"), 30);
        let (pre_stop, shutdown) = drain_of(w);
        longest = longest.max(grace);
        if grace < pre_stop + shutdown + 5 {
            out.push(format!(
                "{} terminationGracePeriodSeconds {grace} < preStop {pre_stop} + --shutdown-timeout {shutdown} + 5 s: the kubelet kills it mid-drain",
                id(w.obj)
            ));
        }
    }
    for p in picker_workloads(objs) {
        let grace = seconds(p.pod_spec().get("terminationGracePeriodSeconds"), 30);
        if grace < longest {
            out.push(format!(
                "{} terminationGracePeriodSeconds {grace} is below the model servers' {longest}: streams passing through the picker are cut when it stops",
                id(p.obj)
            ));
        }
    }
    out.done()
}

// --------------------------------------------------- disruption budgets

/// PodDisruptionBudgets select pods of the install and never block a node
/// drain outright (maxUnavailable 0, minAvailable >= replicas); none covers
/// pickers running leader election, whose readiness follows the lease (a
/// PDB counts Ready pods, so the leader could never be evicted); and
/// model servers running several replicas have one, so a drain takes them
/// one at a time.
pub fn disruption_budgets(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("disruption-budgets");
    let pickers = epp_containers(objs);
    let mut covered: BTreeSet<String> = BTreeSet::new();
    for pdb in of_kind(objs, "PodDisruptionBudget") {
        let pid = id(pdb);
        let Some(selector) = pdb.pointer("/spec/selector").and_then(match_labels) else {
            out.push(format!("{pid} has no selector.matchLabels"));
            continue;
        };
        let selected: Vec<Workload<'_>> = workloads(objs)
            .filter(|w| w.namespace() == namespace(pdb) && w.selected_by(selector))
            .collect();
        if selected.is_empty() {
            out.push(format!("{pid} selects no pods of this install"));
            continue;
        }
        let total: u64 = selected.iter().map(replicas).sum();
        let blocks = match (
            pdb.pointer("/spec/maxUnavailable"),
            pdb.pointer("/spec/minAvailable"),
        ) {
            (Some(v), _) => v.as_u64() == Some(0) || v.as_str() == Some("0%"),
            (None, Some(v)) => v.as_u64().is_some_and(|n| n >= total) || v.as_str() == Some("100%"),
            (None, None) => {
                out.push(format!(
                    "{pid} sets neither maxUnavailable nor minAvailable"
                ));
                false
            }
        };
        if blocks {
            out.push(format!(
                "{pid} allows no eviction of its {total} pod(s): every node drain and GKE upgrade would stall on it"
            ));
        }
        for w in &selected {
            covered.insert(id(w.obj));
            let leader_elected = pickers
                .iter()
                .any(|e| e.workload.obj == w.obj && e.leader_election());
            if leader_elected {
                out.push(format!(
                    "{pid} covers {}, whose pods run leader election: only the leader is Ready, so the budget never allows evicting it and drains stall",
                    id(w.obj)
                ));
            }
        }
    }
    for w in model_servers(objs) {
        if replicas(&w) > 1 && !covered.contains(&id(w.obj)) {
            out.push(format!(
                "{} runs {} model servers with no PodDisruptionBudget: a drain may take them all at once",
                id(w.obj),
                replicas(&w)
            ));
        }
    }
    out.done()
}
