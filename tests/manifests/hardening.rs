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
        Obj, Workload, args, arr_at, find, id, map_at, match_labels, name, namespace, of_kind,
        replicas, str_at, workloads,
    },
};

/// Google's health-check probe ranges, the sources of health checks for
/// the regional Application Load Balancers besides their proxy-only subnet
/// (cloud.google.com/load-balancing/docs/firewall-rules).
pub const GCP_HEALTH_CHECK_RANGES: &[&str] = &["35.191.0.0/16", "130.211.0.0/22"];

/// The namespaces Managed Service for Prometheus runs its collectors in
/// (GKE Standard, Autopilot), and their pod label
/// (GoogleCloudPlatform/prometheus-engine charts/operator/templates).
pub const GMP_NAMESPACES: &[&str] = &["gmp-system", "gke-gmp-system"];
pub const GMP_COLLECTOR_LABEL: (&str, &str) = ("app.kubernetes.io/name", "collector");

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

/// Where the picker finds the served model's tokenizer files.
pub const TOKENIZER_DIR: &str = "/var/lib/epp/tokenizers";

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

/// The container port (name, number) pairs of a workload.
fn container_ports<'a>(w: &Workload<'a>) -> Vec<(Option<&'a str>, u64)> {
    w.containers()
        .iter()
        .flat_map(|c| arr_at(c, "/ports"))
        .filter_map(|p| Some((str_at(p, "/name"), p.get("containerPort")?.as_u64()?)))
        .collect()
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
    // Active-active pickers (several replicas, no lease): every one is
    // Ready and serving, so a drain must take them one at a time, and a
    // rollout must not stop them all at once.
    for e in &pickers {
        let w = &e.workload;
        if replicas(w) < 2 || e.leader_election() {
            continue;
        }
        if !covered.contains(&id(w.obj)) {
            out.push(format!(
                "{} runs {} active pickers with no PodDisruptionBudget: a drain may take them all at once",
                id(w.obj),
                replicas(w)
            ));
        }
        if str_at(w.obj, "/spec/strategy/type") == Some("Recreate") {
            out.push(format!(
                "{} runs {} active pickers with the Recreate strategy: a rollout stops every one before starting any",
                id(w.obj),
                replicas(w)
            ));
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

// ---------------------------------------------------- network policies

fn parse_cidr(cidr: &str) -> Option<([u8; 4], u8)> {
    let (ip, len) = cidr.split_once('/')?;
    let octets: Vec<u8> = ip
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<_>>()?;
    let octets: [u8; 4] = octets.try_into().ok()?;
    Some((octets, len.parse().ok().filter(|l| *l <= 32)?))
}

/// An RFC 1918 range of a proxy-only subnet's size (/26 minimum, /23
/// recommended; no wider than /16).
fn is_private_subnet(cidr: &str) -> bool {
    let Some((o, len)) = parse_cidr(cidr) else {
        return false;
    };
    let private =
        o[0] == 10 || (o[0] == 172 && (16..32).contains(&o[1])) || (o[0] == 192 && o[1] == 168);
    private && (16..=26).contains(&len)
}

/// The pod label sets a peer's podSelector matches (only pods of this
/// install, same namespace, no namespaceSelector).
fn peer_selects<'a>(peer: &Value, w: &Workload<'a>) -> bool {
    peer.get("namespaceSelector").is_none()
        && peer
            .pointer("/podSelector")
            .and_then(match_labels)
            .is_some_and(|sel| w.selected_by(sel))
}

fn peer_is_gmp_collector(peer: &Value) -> bool {
    let pod_ok = peer
        .pointer("/podSelector/matchLabels")
        .and_then(|m| m.get(GMP_COLLECTOR_LABEL.0))
        .and_then(Value::as_str)
        == Some(GMP_COLLECTOR_LABEL.1);
    let ns = peer.get("namespaceSelector");
    let names: BTreeSet<&str> = ns
        .map(|n| {
            let exprs = arr_at(n, "/matchExpressions").iter().filter(|e| {
                str_at(e, "/key") == Some("kubernetes.io/metadata.name")
                    && str_at(e, "/operator") == Some("In")
            });
            exprs
                .flat_map(|e| arr_at(e, "/values"))
                .filter_map(Value::as_str)
                .chain(str_at(n, "/matchLabels/kubernetes.io~1metadata.name"))
                .collect()
        })
        .unwrap_or_default();
    pod_ok && !names.is_empty() && names.iter().all(|n| GMP_NAMESPACES.contains(n))
}

/// Whether a rule port entry means container port (name, number).
fn rule_port_is(p: &Value, port: (Option<&str>, u64)) -> bool {
    match p.get("port") {
        Some(Value::String(s)) => Some(s.as_str()) == port.0,
        Some(Value::Number(n)) => n.as_u64() == Some(port.1),
        _ => false,
    }
}

/// The peers admitted to `port` on a workload selected by `np`.
fn peers_for<'a>(np: &'a Obj, port: (Option<&str>, u64)) -> Vec<&'a Value> {
    arr_at(np, "/spec/ingress")
        .iter()
        .filter(|r| arr_at(r, "/ports").iter().any(|p| rule_port_is(p, port)))
        .flat_map(|r| arr_at(r, "/from"))
        .collect()
}

/// Ingress NetworkPolicies admit named callers only, on named ports:
/// every rule lists its sources and ports; ipBlocks are Google's health-check
/// ranges or one private range (the proxy-only subnet), the same in every
/// policy; no rule opens a port to all namespaces. Where they select the
/// picker: ext_proc is open to the load balancer (health ranges and the
/// proxy range), /metrics to Managed Prometheus' collectors, and the
/// plaintext health port to no pod at all. Where they select the
/// model servers: the serving port to the load balancer, the KV-event
/// sockets to the picker only.
pub fn network_policies(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("network-policies");
    let mut private_ranges: BTreeSet<&str> = BTreeSet::new();
    let pickers = picker_workloads(objs);
    let servers = model_servers(objs);
    for np in of_kind(objs, "NetworkPolicy") {
        let nid = id(np);
        let selector = np.pointer("/spec/podSelector").and_then(match_labels);
        let selected: Vec<Workload<'_>> = workloads(objs)
            .filter(|w| {
                w.namespace() == namespace(np) && selector.is_some_and(|s| w.selected_by(s))
            })
            .collect();
        if selected.is_empty() {
            out.push(format!("{nid} selects no pods of this install"));
            continue;
        }
        if !arr_at(np, "/spec/policyTypes")
            .iter()
            .any(|t| t == "Ingress")
        {
            out.push(format!("{nid} does not list Ingress in policyTypes"));
        }
        for (i, rule) in arr_at(np, "/spec/ingress").iter().enumerate() {
            if arr_at(rule, "/from").is_empty() {
                out.push(format!(
                    "{nid} ingress rule {i} has no `from`: it admits every source"
                ));
            }
            let ports = arr_at(rule, "/ports");
            if ports.is_empty() {
                out.push(format!(
                    "{nid} ingress rule {i} has no `ports`: it opens every port"
                ));
            }
            for p in ports {
                for w in &selected {
                    if !container_ports(w).iter().any(|cp| rule_port_is(p, *cp)) {
                        out.push(format!(
                            "{nid} ingress rule {i} port {} is not a container port of {}",
                            p.get("port").unwrap_or(&Value::Null),
                            id(w.obj)
                        ));
                    }
                }
            }
            for peer in arr_at(rule, "/from") {
                if let Some(cidr) = str_at(peer, "/ipBlock/cidr") {
                    if is_private_subnet(cidr) {
                        private_ranges.insert(cidr);
                    } else if !GCP_HEALTH_CHECK_RANGES.contains(&cidr) {
                        out.push(format!(
                            "{nid} ingress rule {i} admits {cidr}: only Google's health-check ranges {GCP_HEALTH_CHECK_RANGES:?} and the proxy-only subnet (a private /16-/26) belong here"
                        ));
                    }
                }
                if let Some(ns) = peer.get("namespaceSelector")
                    && map_at(ns, "/matchLabels").is_none_or(|m| m.is_empty())
                    && arr_at(ns, "/matchExpressions").is_empty()
                {
                    out.push(format!("{nid} ingress rule {i} admits every namespace"));
                }
            }
        }
        for w in &selected {
            let wid = id(w.obj);
            let port = |n: &str| {
                container_ports(w)
                    .into_iter()
                    .find(|(name, _)| *name == Some(n))
            };
            let from_lb = |peers: &[&Value]| {
                let cidrs: BTreeSet<&str> = peers
                    .iter()
                    .filter_map(|p| str_at(p, "/ipBlock/cidr"))
                    .collect();
                GCP_HEALTH_CHECK_RANGES.iter().all(|r| cidrs.contains(r))
                    && cidrs.iter().any(|c| is_private_subnet(c))
            };
            if pickers.iter().any(|p| p.obj == w.obj) {
                if let Some(grpc) = port("grpc")
                    && !from_lb(&peers_for(np, grpc))
                {
                    out.push(format!(
                        "{nid}: {wid}'s ext_proc port must admit the load balancer: {GCP_HEALTH_CHECK_RANGES:?} and the proxy-only subnet"
                    ));
                }
                if let Some(health) = port("grpc-health")
                    && peers_for(np, health)
                        .iter()
                        .any(|p| p.get("ipBlock").is_none())
                {
                    out.push(format!(
                        "{nid} opens {wid}'s plaintext health port to pods; only the load balancer's health checks (and the kubelet, always allowed) need it"
                    ));
                }
                if let Some(metrics) = port("metrics")
                    && !peers_for(np, metrics)
                        .iter()
                        .any(|p| peer_is_gmp_collector(p))
                {
                    out.push(format!(
                        "{nid} does not admit Managed Prometheus' collectors ({GMP_NAMESPACES:?}, {}={}) to {wid}'s metrics port",
                        GMP_COLLECTOR_LABEL.0, GMP_COLLECTOR_LABEL.1
                    ));
                }
            }
            if servers.iter().any(|s| s.obj == w.obj) {
                if let Some(http) = port("http")
                    && !from_lb(&peers_for(np, http))
                {
                    out.push(format!(
                        "{nid}: {wid}'s serving port must admit the load balancer: {GCP_HEALTH_CHECK_RANGES:?} and the proxy-only subnet"
                    ));
                }
                for kv in ["kv-events", "kv-replay"] {
                    let Some(p) = port(kv) else { continue };
                    let peers = peers_for(np, p);
                    let only_picker = !peers.is_empty()
                        && peers
                            .iter()
                            .all(|peer| pickers.iter().any(|pk| peer_selects(peer, pk)));
                    if !only_picker {
                        out.push(format!(
                            "{nid} must admit the picker, and only the picker, to {wid}'s {kv} port (unauthenticated ZMQ)"
                        ));
                    }
                }
            }
        }
    }
    if private_ranges.len() > 1 {
        out.push(format!(
            "the NetworkPolicies name several proxy-only ranges {private_ranges:?}; a region and VPC have one"
        ));
    }
    out.done()
}

// ------------------------------------------------- picker's tokenizer

/// The picker finds the served model's tokenizer files at
/// /var/lib/epp/tokenizers/<model>/: a read-only mount of an emptyDir that
/// an init container of the same pod fills for exactly the model the pool
/// serves. Required on GKE (where the KV events it will be matched with are
/// on); checked wherever mounted.
pub fn picker_tokenizer(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("picker-tokenizer");
    let models: BTreeSet<&str> = model_servers(objs)
        .iter()
        .flat_map(|w| w.containers().iter().filter_map(served_model))
        .collect();
    for e in epp_containers(objs) {
        let who = e.name();
        let Some(mount) = arr_at(e.container, "/volumeMounts")
            .iter()
            .find(|m| str_at(m, "/mountPath") == Some(TOKENIZER_DIR))
        else {
            if ctx.gke {
                out.push(format!(
                    "{who} does not mount the tokenizer files at {TOKENIZER_DIR} (components/picker-tokenizer)"
                ));
            }
            continue;
        };
        if mount.get("readOnly") != Some(&Value::Bool(true)) {
            out.push(format!("{who} must mount {TOKENIZER_DIR} read-only"));
        }
        // Mounted but unread files would leave the picker on the
        // approximate index without a word: it must be told where they are,
        // and, since the pool's vLLM publishes KV events, to subscribe.
        let flags = e.flags().ok();
        let dir = flags
            .as_ref()
            .and_then(|f| f.tokenizer.tokenizers_dir.clone());
        if dir.as_deref() != Some(std::path::Path::new(TOKENIZER_DIR)) {
            out.push(format!(
                "{who} mounts {TOKENIZER_DIR} but is not run with --tokenizers-dir {TOKENIZER_DIR}"
            ));
        }
        if !flags.is_some_and(|f| f.kv_events.enabled) {
            out.push(format!(
                "{who} has the tokenizer files but not --kv-events: the precise prefix path needs both"
            ));
        }
        let volume = str_at(mount, "/name").unwrap_or("");
        let spec = e.workload.pod_spec();
        let is_empty_dir = arr_at(spec, "/volumes")
            .iter()
            .any(|v| str_at(v, "/name") == Some(volume) && v.get("emptyDir").is_some());
        if !is_empty_dir {
            out.push(format!(
                "{who} {TOKENIZER_DIR} volume {volume:?} is not an emptyDir of the pod"
            ));
        }
        let fillers: Vec<&Value> = arr_at(spec, "/initContainers")
            .iter()
            .filter(|c| {
                arr_at(c, "/volumeMounts").iter().any(|m| {
                    str_at(m, "/name") == Some(volume)
                        && str_at(m, "/mountPath") == Some(TOKENIZER_DIR)
                        && m.get("readOnly") != Some(&Value::Bool(true))
                })
            })
            .collect();
        if fillers.is_empty() {
            out.push(format!(
                "no init container of {who}'s pod writes the tokenizer files into {TOKENIZER_DIR}"
            ));
        }
        for f in fillers {
            let model = arr_at(f, "/env")
                .iter()
                .find(|v| str_at(v, "/name") == Some("MODEL"))
                .and_then(|v| str_at(v, "/value"));
            let ok = model.is_some_and(|m| {
                models.contains(m) && !m.split('/').any(|part| part.is_empty() || part == "..")
            });
            if !ok {
                out.push(format!(
                    "{who}'s init container {:?} fetches the tokenizer of {model:?}, but the pool serves {models:?}",
                    str_at(f, "/name").unwrap_or("?")
                ));
            }
        }
    }
    out.done()
}

// ------------------------------------------------------- objectives

/// Every InferenceObjective names an InferencePool of the install, in the
/// schema of its API version: inference.networking.x-k8s.io/v1alpha2 and
/// llm-d.ai/v1alpha2 take one `spec.poolRef`, llm-d.ai/v1 a list
/// `spec.poolRefs` (GIE v1.5 CRD; llm-d-router CRD and sample). The pool
/// group must be inference.networking.k8s.io: llm-d.ai/v1alpha2 defaults it
/// to llm-d.ai, which names no pool here.
pub fn objectives_resolve(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("objectives-resolve");
    for o in of_kind(objs, "InferenceObjective") {
        let oid = id(o);
        let version = str_at(o, "/apiVersion").unwrap_or("");
        let refs: Vec<&Value> = match version {
            "inference.networking.x-k8s.io/v1alpha2" | "llm-d.ai/v1alpha2" => {
                o.pointer("/spec/poolRef").into_iter().collect()
            }
            "llm-d.ai/v1" => arr_at(o, "/spec/poolRefs").iter().collect(),
            other => {
                out.push(format!(
                    "{oid} has apiVersion {other:?}; known: inference.networking.x-k8s.io/v1alpha2, llm-d.ai/v1alpha2, llm-d.ai/v1"
                ));
                continue;
            }
        };
        if refs.is_empty() {
            let field = if version == "llm-d.ai/v1" {
                "spec.poolRefs"
            } else {
                "spec.poolRef"
            };
            out.push(format!("{oid} ({version}) has no {field}"));
        }
        let default_group = if version == "llm-d.ai/v1alpha2" {
            "llm-d.ai"
        } else {
            "inference.networking.k8s.io"
        };
        for r in refs {
            let group = str_at(r, "/group").unwrap_or(default_group);
            let pool_kind = str_at(r, "/kind").unwrap_or("InferencePool");
            let pool = str_at(r, "/name").unwrap_or("");
            let exists = of_kind(objs, "InferencePool").any(|p| {
                name(p) == pool && namespace(p) == namespace(o) && crate::model::group(p) == group
            });
            if pool_kind != "InferencePool" || !exists {
                out.push(format!(
                    "{oid} refers to {pool_kind} {pool:?} in group {group:?}, which is not an InferencePool of this install"
                ));
            }
        }
        if o.pointer("/spec/priority").is_some_and(|p| !p.is_i64()) {
            out.push(format!("{oid} spec.priority must be an integer"));
        }
    }
    out.done()
}
