//! The checks run on every rendered install. Each is a plain function over
//! the objects returning the violations it finds, so a hand-written YAML
//! can prove it fails (see negative.rs).
//!
//! Checks named `pitfall:*` guard the failures the first ("seed") GKE
//! deployment hit; their messages name the pitfall.

use std::{collections::BTreeSet, fmt, sync::Arc, time::Duration};

use epp::{
    config::EndpointPickerConfig,
    prefix::PrefixIndex,
    scheduling::{SchedulerOptions, build_scheduler},
    scrape::ScrapeSettings,
};
use serde_json::Value;

use crate::{
    epp::{EppContainer, arg_value, epp_containers},
    hardening,
    model::{
        self, Obj, Workload, args, arr_at, find, group, id, is_cluster_scoped, kind, map_at,
        match_labels, name, namespace, of_kind, str_at, workloads,
    },
    observability,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub check: &'static str,
    pub msg: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.check, self.msg)
    }
}

/// What the checks need besides the objects.
pub struct Ctx<'a> {
    /// A GKE install: GKE-only objects are required and the model server
    /// must be the TPU one.
    pub gke: bool,
    /// Long flags `epp --help` lists.
    pub epp_flags: &'a BTreeSet<String>,
    /// Model-server pods each pool must select at least (replicas summed):
    /// with fewer than two the picker has nothing to choose between. 1 only
    /// for an install that is one server on purpose (gke-tpu-2x2).
    pub min_endpoints: u64,
}

type Check = fn(&[Obj], &Ctx<'_>) -> Vec<Violation>;

/// Every check, by name.
pub const ALL: &[(&str, Check)] = &[
    ("well-formed", well_formed),
    ("one-namespace", one_namespace),
    ("namespaced-install", namespaced_install),
    ("route-targets-pool", route_targets_pool),
    ("pool-picker-ref", pool_picker_ref),
    ("pool-selects-model-server", pool_selects_model_server),
    ("epp-rbac", epp_rbac),
    ("epp-flags", epp_flags),
    ("epp-deployment", epp_deployment),
    ("epp-config", epp_config),
    ("monitors-resolve", monitors_resolve),
    ("images-pinned", images_pinned),
    ("no-committed-secrets", no_committed_secrets),
    ("tpu-model-server", tpu_model_server),
    ("pool-has-choice", hardening::pool_has_choice),
    ("no-service-links", hardening::no_service_links),
    ("kv-events", hardening::kv_events),
    ("epp-service-protocol", hardening::epp_service_protocol),
    ("drain-budget", hardening::drain_budget),
    ("disruption-budgets", hardening::disruption_budgets),
    ("network-policies", hardening::network_policies),
    ("picker-tokenizer", hardening::picker_tokenizer),
    ("objectives-resolve", hardening::objectives_resolve),
    ("metrics-auth", observability::metrics_auth),
    ("admin-port", observability::admin_port),
    (
        "pitfall:regional-gateway-class",
        pitfall_regional_gateway_class,
    ),
    ("pitfall:httproute-timeouts", pitfall_httproute_timeouts),
    ("pitfall:health-check-path", pitfall_health_check_path),
    ("pitfall:backend-timeout", pitfall_backend_timeout),
    ("pitfall:plain-http-backend", pitfall_plain_http_backend),
    (
        "pitfall:gateway-class-shipped",
        pitfall_gateway_class_shipped,
    ),
    ("pitfall:bodiless-requests", pitfall_bodiless_requests),
    ("pitfall:crds-absent-on-gke", pitfall_crds_absent_on_gke),
];

pub fn run_all(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    ALL.iter().flat_map(|(_, check)| check(objs, ctx)).collect()
}

/// Collects violations for one check.
pub(crate) struct Out {
    check: &'static str,
    found: Vec<Violation>,
}

impl Out {
    pub(crate) fn new(check: &'static str) -> Self {
        Self {
            check,
            found: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, msg: impl Into<String>) {
        self.found.push(Violation {
            check: self.check,
            msg: msg.into(),
        });
    }

    pub(crate) fn done(self) -> Vec<Violation> {
        self.found
    }
}

/// The GKE regional classes that support InferencePool backends.
pub const REGIONAL_GKE_CLASSES: &[&str] = &["gke-l7-regional-external-managed", "gke-l7-rilb"];
/// Other implementations with InferencePool support, for local clusters.
pub const OTHER_CLASSES: &[&str] = &["istio", "kgateway", "agentgateway"];

// ---------------------------------------------------------------- structure

/// Every object has apiVersion, kind and metadata.name; no two objects
/// share kind, namespace and name (the later would silently replace the
/// earlier on apply).
pub fn well_formed(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("well-formed");
    let mut seen = BTreeSet::new();
    for (i, o) in objs.iter().enumerate() {
        for (ptr, what) in [
            ("/apiVersion", "apiVersion"),
            ("/kind", "kind"),
            ("/metadata/name", "metadata.name"),
        ] {
            if str_at(o, ptr).is_none_or(str::is_empty) {
                out.push(format!("object #{i} ({}) has no {what}", id(o)));
            }
        }
        if !seen.insert((
            group(o).to_owned(),
            kind(o).to_owned(),
            namespace(o).map(str::to_owned),
            name(o).to_owned(),
        )) {
            out.push(format!("{} appears twice", id(o)));
        }
    }
    out.done()
}

/// Namespaced objects all sit in one namespace, the one the install
/// creates, and ServiceAccount subjects name it: a component added outside
/// the overlay's namespace transformer lands in `default` and binds nothing.
pub fn one_namespace(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("one-namespace");
    let namespaces: BTreeSet<_> = objs
        .iter()
        .filter(|o| !is_cluster_scoped(o))
        .map(|o| namespace(o).unwrap_or(""))
        .collect();
    if namespaces.len() > 1 || namespaces.contains("") {
        for o in objs
            .iter()
            .filter(|o| !is_cluster_scoped(o) && namespace(o).is_none())
        {
            out.push(format!("{} has no namespace", id(o)));
        }
        if namespaces.len() > 1 {
            out.push(format!("objects are spread over namespaces {namespaces:?}"));
        }
    }
    for ns in of_kind(objs, "Namespace") {
        if !namespaces.is_empty() && !namespaces.contains(name(ns)) {
            out.push(format!(
                "Namespace {} is created but the objects live in {namespaces:?}",
                name(ns)
            ));
        }
    }
    for rb in of_kind(objs, "RoleBinding") {
        for s in arr_at(rb, "/subjects")
            .iter()
            .filter(|s| str_at(s, "/kind") == Some("ServiceAccount"))
            .filter(|s| !observability::is_gmp_collector(s))
        {
            if str_at(s, "/namespace") != namespace(rb) {
                out.push(format!(
                    "{} binds ServiceAccount {} in namespace {:?}, not its own {:?}",
                    id(rb),
                    str_at(s, "/name").unwrap_or("?"),
                    str_at(s, "/namespace"),
                    namespace(rb)
                ));
            }
        }
    }
    out.done()
}

/// Nothing cluster-scoped but the Namespace and what /metrics
/// authentication needs (ClusterRoles for the picker's TokenReview and
/// SubjectAccessReview and the scrapers' `get /metrics`, with their
/// bindings, only while a picker checks tokens with the Kubernetes API):
/// no other ClusterRole, no CRDs (GKE manages them; elsewhere they are a
/// documented prerequisite).
pub fn namespaced_install(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("namespaced-install");
    for o in objs.iter().filter(|o| is_cluster_scoped(o)) {
        if let Err(why) = observability::allowed_cluster_scoped(objs, o) {
            out.push(why);
        }
    }
    for rb in of_kind(objs, "RoleBinding") {
        if str_at(rb, "/roleRef/kind") != Some("Role") {
            out.push(format!(
                "{} refers to a {:?}, not a namespaced Role",
                id(rb),
                str_at(rb, "/roleRef/kind")
            ));
        }
    }
    out.done()
}

// ---------------------------------------------------------------- references

/// HTTPRoutes attach to a Gateway of the install and send traffic only to
/// InferencePools (v1 group) that exist: a Service backend would bypass the
/// picker, and the old x-k8s group is not what the gateway watches.
pub fn route_targets_pool(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("route-targets-pool");
    for route in of_kind(objs, "HTTPRoute") {
        let ns = namespace(route);
        let parents = arr_at(route, "/spec/parentRefs");
        if parents.is_empty() {
            out.push(format!("{} has no parentRefs", id(route)));
        }
        for p in parents {
            let k = str_at(p, "/kind").unwrap_or("Gateway");
            let n = str_at(p, "/name").unwrap_or("");
            let pns = str_at(p, "/namespace").or(ns);
            if k != "Gateway" || find(objs, "Gateway", n, pns).is_none() {
                out.push(format!(
                    "{} parentRef {k}/{n} is not a Gateway of this install",
                    id(route)
                ));
            }
        }
        for (i, rule) in arr_at(route, "/spec/rules").iter().enumerate() {
            let refs = arr_at(rule, "/backendRefs");
            if refs.is_empty() {
                out.push(format!("{} rule {i} has no backendRefs", id(route)));
            }
            for b in refs {
                let k = str_at(b, "/kind").unwrap_or("Service");
                let g = str_at(b, "/group").unwrap_or("");
                let n = str_at(b, "/name").unwrap_or("");
                if k != "InferencePool" {
                    out.push(format!(
                        "{} rule {i} backendRef {k}/{n} is not an InferencePool: requests would bypass the endpoint picker",
                        id(route)
                    ));
                } else if g != "inference.networking.k8s.io" {
                    out.push(format!(
                        "{} rule {i} backendRef InferencePool {n} has group {g:?}, not inference.networking.k8s.io",
                        id(route)
                    ));
                } else if !of_kind(objs, "InferencePool").any(|p| {
                    name(p) == n && namespace(p) == str_at(b, "/namespace").or(ns) && group(p) == g
                }) {
                    out.push(format!(
                        "{} rule {i} names InferencePool {n}, which is not in the output",
                        id(route)
                    ));
                }
            }
        }
    }
    out.done()
}

/// Each InferencePool is v1 and its endpointPickerRef names a Service of
/// the install, on a port that Service exposes, with an explicit
/// failureMode; the Service selects the picker watching this pool and
/// forwards to its ext_proc port.
pub fn pool_picker_ref(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pool-picker-ref");
    let epps = epp_containers(objs);
    for pool in of_kind(objs, "InferencePool") {
        let pid = id(pool);
        if str_at(pool, "/apiVersion") != Some("inference.networking.k8s.io/v1") {
            out.push(format!(
                "{pid} is {:?}, not inference.networking.k8s.io/v1",
                str_at(pool, "/apiVersion")
            ));
            continue;
        }
        let Some(r) = pool.pointer("/spec/endpointPickerRef") else {
            out.push(format!("{pid} has no endpointPickerRef"));
            continue;
        };
        let (g, k) = (
            str_at(r, "/group").unwrap_or(""),
            str_at(r, "/kind").unwrap_or("Service"),
        );
        if (g, k) != ("", "Service") {
            out.push(format!(
                "{pid} endpointPickerRef is {g}/{k}; only a core Service is supported"
            ));
            continue;
        }
        match str_at(r, "/failureMode") {
            Some("FailOpen" | "FailClose") => {}
            other => out.push(format!(
                "{pid} endpointPickerRef.failureMode is {other:?}: set FailOpen or FailClose explicitly (the choice is documented)"
            )),
        }
        let svc_name = str_at(r, "/name").unwrap_or("");
        let Some(svc) = find(objs, "Service", svc_name, namespace(pool)) else {
            out.push(format!(
                "{pid} endpointPickerRef names Service {svc_name}, which is not in the output"
            ));
            continue;
        };
        let Some(port) = r.pointer("/port/number").and_then(Value::as_u64) else {
            out.push(format!(
                "{pid} endpointPickerRef has no port.number (required for a Service)"
            ));
            continue;
        };
        let Some(svc_port) = arr_at(svc, "/spec/ports")
            .iter()
            .find(|p| p.get("port").and_then(Value::as_u64) == Some(port))
        else {
            out.push(format!(
                "{pid} endpointPickerRef port {port} is not a port of Service {svc_name}"
            ));
            continue;
        };
        let target = svc_port.get("targetPort").unwrap_or(&svc_port["port"]);
        let selector = map_at(svc, "/spec/selector").cloned().unwrap_or_default();
        let pickers: Vec<&EppContainer<'_>> = epps
            .iter()
            .filter(|e| {
                e.workload.namespace() == namespace(pool) && e.workload.selected_by(&selector)
            })
            .collect();
        if pickers.is_empty() {
            out.push(format!(
                "Service {svc_name} (endpointPickerRef of {pid}) selects no endpoint-picker pods"
            ));
        }
        for e in pickers {
            if e.arg_value("--pool-name") != Some(name(pool)) {
                out.push(format!(
                    "{} behind {pid}'s endpointPickerRef watches pool {:?}, not {}",
                    e.name(),
                    e.arg_value("--pool-name"),
                    name(pool)
                ));
            }
            let grpc = e.flags().map_or(9002, |f| u64::from(f.grpc_port));
            if e.workload.resolve_port(target) != Some(grpc) {
                out.push(format!(
                    "Service {svc_name} port {port} forwards to {target}, which is not {}'s ext_proc port {grpc}",
                    e.name()
                ));
            }
        }
    }
    out.done()
}

/// The pool's selector picks model-server pods (and not the picker), and
/// those pods expose every target port.
pub fn pool_selects_model_server(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pool-selects-model-server");
    for pool in of_kind(objs, "InferencePool") {
        let pid = id(pool);
        let Some(selector) = pool.pointer("/spec/selector").and_then(match_labels) else {
            out.push(format!("{pid} has no spec.selector.matchLabels"));
            continue;
        };
        let ports: Vec<u64> = arr_at(pool, "/spec/targetPorts")
            .iter()
            .filter_map(|p| p.get("number").and_then(Value::as_u64))
            .collect();
        if ports.is_empty() {
            out.push(format!("{pid} has no targetPorts"));
        }
        let selected: Vec<Workload<'_>> = workloads(objs)
            .filter(|w| w.namespace() == namespace(pool) && w.selected_by(selector))
            .collect();
        if selected.is_empty() {
            out.push(format!(
                "{pid} selector {selector:?} matches no pod template labels in the output"
            ));
        }
        for w in &selected {
            let is_picker = w
                .containers()
                .iter()
                .any(|c| args(c).iter().any(|a| a.starts_with("--pool-name")));
            if is_picker {
                out.push(format!(
                    "{pid} selector also matches the endpoint picker {}",
                    id(w.obj)
                ));
                continue;
            }
            for p in &ports {
                if w.resolve_port(&Value::from(*p)).is_none() {
                    out.push(format!(
                        "{pid} target port {p} is not a container port of {}",
                        id(w.obj)
                    ));
                }
            }
        }
    }
    out.done()
}

/// The picker's Role grants what it watches: pods, its InferencePool and
/// InferenceObjectives in both groups (get/list/watch); Lease write access only when
/// leader election is on. Bound to the picker's own ServiceAccount.
pub fn epp_rbac(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("epp-rbac");
    const READ: &[&str] = &["get", "list", "watch"];
    const LEASE: &[&str] = &["get", "list", "watch", "create", "update", "patch"];
    for e in epp_containers(objs) {
        let ns = e.workload.namespace();
        let Some(sa) = str_at(e.workload.pod_spec(), "/serviceAccountName") else {
            out.push(format!(
                "{} runs as the default ServiceAccount; give the picker its own",
                e.name()
            ));
            continue;
        };
        if find(objs, "ServiceAccount", sa, ns).is_none() {
            out.push(format!(
                "ServiceAccount {sa} of {} is not in the output",
                e.name()
            ));
        }
        let rules: Vec<&Value> = of_kind(objs, "RoleBinding")
            .filter(|rb| namespace(rb) == ns)
            .filter(|rb| {
                arr_at(rb, "/subjects").iter().any(|s| {
                    str_at(s, "/kind") == Some("ServiceAccount")
                        && str_at(s, "/name") == Some(sa)
                        && str_at(s, "/namespace") == ns
                })
            })
            .filter(|rb| str_at(rb, "/roleRef/kind") == Some("Role"))
            .filter_map(|rb| find(objs, "Role", str_at(rb, "/roleRef/name").unwrap_or(""), ns))
            .flat_map(|role| arr_at(role, "/rules"))
            .collect();
        let grants = |g: &str, resource: &str, verb: &str| {
            rules.iter().any(|r| {
                let has = |field: &str, want: &str| {
                    arr_at(r, field)
                        .iter()
                        .any(|v| v.as_str().is_some_and(|v| v == want || v == "*"))
                };
                has("/apiGroups", g) && has("/resources", resource) && has("/verbs", verb)
            })
        };
        let mut need = vec![
            ("", "pods"),
            ("inference.networking.x-k8s.io", "inferenceobjectives"),
            ("inference.networking.x-k8s.io", "inferencemodelrewrites"),
            // Where the API moved after GIE v1.5 (llm-d-router).
            ("llm-d.ai", "inferenceobjectives"),
            ("llm-d.ai", "inferencemodelrewrites"),
        ];
        if e.arg_value("--pool-name").is_some() {
            need.push((
                e.arg_value("--pool-group")
                    .unwrap_or("inference.networking.k8s.io"),
                "inferencepools",
            ));
        }
        for (g, res) in need {
            for verb in READ {
                if !grants(g, res, verb) {
                    out.push(format!("the Role bound to {sa} does not grant {verb} on {g}/{res}, which {} watches", e.name()));
                }
            }
        }
        let le = e.leader_election();
        for verb in LEASE {
            let granted = grants("coordination.k8s.io", "leases", verb);
            if le && !granted {
                out.push(format!(
                    "{} runs leader election but its Role does not grant {verb} on leases",
                    e.name()
                ));
            }
        }
        if !le
            && rules
                .iter()
                .any(|r| arr_at(r, "/resources").iter().any(|v| v == "leases"))
        {
            out.push(format!(
                "the Role bound to {sa} grants leases but {} has no --ha-enable-leader-election (least privilege)",
                e.name()
            ));
        }
    }
    out.done()
}

/// Every flag given to the picker is one `epp --help` lists, and the whole
/// command line parses with the picker's own parser (values included).
pub fn epp_flags(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("epp-flags");
    for e in epp_containers(objs) {
        for a in e.args() {
            if let Some(flag) = a.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap_or(flag);
                if !ctx.epp_flags.contains(flag) {
                    out.push(format!(
                        "{} passes --{flag}, which `epp --help` does not list",
                        e.name()
                    ));
                }
            }
        }
        if let Err(err) = e.flags() {
            out.push(format!(
                "{} args {:?} are rejected by epp: {}",
                e.name(),
                e.args(),
                err.trim()
            ));
        }
    }
    out.done()
}

/// The picker's Deployment as the EPP protocol and Kubernetes need it.
pub fn epp_deployment(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("epp-deployment");
    let epps = epp_containers(objs);
    if epps.is_empty() && of_kind(objs, "InferencePool").next().is_some() {
        out.push(
            "InferencePools are shipped but no endpoint picker (no container with --pool-name)",
        );
    }
    for e in epps {
        let who = e.name();
        let Ok(flags) = e.flags() else { continue }; // reported by epp-flags
        let pod = e.workload.pod_spec();
        let ns = e.workload.namespace();

        let pool = e.arg_value("--pool-name");
        match pool {
            Some(p) if find(objs, "InferencePool", p, ns).is_none() => {
                out.push(format!(
                    "{who} watches InferencePool {p}, which is not in the output"
                ));
            }
            _ => {}
        }
        match e.arg_value("--pool-namespace") {
            Some("$(NAMESPACE)") => {
                let from_downward_api = arr_at(e.container, "/env").iter().any(|v| {
                    str_at(v, "/name") == Some("NAMESPACE")
                        && str_at(v, "/valueFrom/fieldRef/fieldPath") == Some("metadata.namespace")
                });
                if !from_downward_api {
                    out.push(format!("{who} uses $(NAMESPACE) but NAMESPACE is not the pod's namespace (downward API)"));
                }
            }
            Some(literal) if Some(literal) != ns => {
                out.push(format!(
                    "{who} watches namespace {literal} but runs in {ns:?}"
                ));
            }
            _ => {}
        }
        for (var, field) in [
            ("NAMESPACE", "metadata.namespace"),
            ("POD_NAME", "metadata.name"),
        ] {
            let ok = arr_at(e.container, "/env").iter().any(|v| {
                str_at(v, "/name") == Some(var)
                    && str_at(v, "/valueFrom/fieldRef/fieldPath") == Some(field)
            });
            if !ok {
                out.push(format!(
                    "{who} lacks env {var} from the downward API ({field})"
                ));
            }
        }
        if e.arg_value("--config-file").is_none() {
            out.push(format!(
                "{who} has no --config-file: ship the EndpointPickerConfig explicitly"
            ));
        }

        let ports: Vec<(Option<&str>, u64)> = arr_at(e.container, "/ports")
            .iter()
            .filter_map(|p| Some((str_at(p, "/name"), p.get("containerPort")?.as_u64()?)))
            .collect();
        for (want_name, port) in [
            ("grpc", flags.grpc_port),
            ("grpc-health", flags.grpc_health_port),
            ("metrics", flags.metrics_port),
        ] {
            if !ports.contains(&(Some(want_name), u64::from(port))) {
                out.push(format!(
                    "{who} does not declare container port {want_name}: {port}"
                ));
            }
        }
        for (probe, service) in [
            ("livenessProbe", "liveness"),
            ("readinessProbe", "readiness"),
        ] {
            let p = e.container.get(probe);
            let port = p
                .and_then(|p| p.pointer("/grpc/port"))
                .and_then(Value::as_u64);
            let svc = p.and_then(|p| str_at(p, "/grpc/service"));
            if port != Some(u64::from(flags.grpc_health_port)) || svc != Some(service) {
                out.push(format!(
                    "{who} {probe} must be gRPC on the health port {} with service {service:?} (got port {port:?}, service {svc:?})",
                    flags.grpc_health_port
                ));
            }
        }

        let grace = pod
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(30);
        if flags.shutdown_grace_period >= Duration::from_secs(grace) {
            out.push(format!(
                "{who} --shutdown-grace-period {:?} is not below terminationGracePeriodSeconds {grace}: the kubelet would kill it mid-drain",
                flags.shutdown_grace_period
            ));
        }

        if kind(e.workload.obj) == "Deployment" {
            let replicas = e
                .workload
                .obj
                .pointer("/spec/replicas")
                .and_then(Value::as_u64)
                .unwrap_or(1);
            // Several active pickers are supported only with KV events:
            // each replica then indexes every pod's cache from its events.
            // Without them each would hold a fraction of a prefix index.
            let active_active = replicas > 1 && !flags.ha_enable_leader_election;
            if active_active && !flags.kv_events.enabled {
                out.push(format!(
                    "{who} runs {replicas} replicas without --ha-enable-leader-election or --kv-events: each would hold a fraction of a prefix index"
                ));
            }
            if !active_active && str_at(e.workload.obj, "/spec/strategy/type") != Some("Recreate") {
                out.push(format!(
                    "{who} Deployment strategy must be Recreate (a rolling update runs two pickers, or stalls on leader-gated readiness)"
                ));
            }
        }

        let non_root = [
            pod.pointer("/securityContext/runAsNonRoot"),
            e.container.pointer("/securityContext/runAsNonRoot"),
        ]
        .into_iter()
        .flatten()
        .any(|v| v == true);
        if !non_root {
            out.push(format!("{who} must set runAsNonRoot"));
        }
        if e.container
            .pointer("/securityContext/readOnlyRootFilesystem")
            != Some(&Value::Bool(true))
        {
            out.push(format!("{who} must set readOnlyRootFilesystem"));
        }
    }
    out.done()
}

/// The EndpointPickerConfig the picker is given parses and builds a
/// scheduler and a scrape mapping, exactly as `epp` does at startup
/// (src/server.rs), so a broken config fails here and not in the cluster.
pub fn epp_config(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("epp-config");
    for e in epp_containers(objs) {
        let text = match e.config_text(objs) {
            Ok(Some(t)) => t,
            Ok(None) => continue, // built-in default; epp-deployment asks for a file
            Err(err) => {
                out.push(format!("{}: {err}", e.name()));
                continue;
            }
        };
        let Ok(flags) = e.flags() else { continue };
        let cfg = match EndpointPickerConfig::parse(text) {
            Ok(c) => c,
            Err(err) => {
                out.push(format!("{}: the config does not parse: {err}", e.name()));
                continue;
            }
        };
        let built = build_scheduler(
            &cfg,
            &SchedulerOptions {
                fallback_endpoints: flags.fallback_endpoints,
                max_scrape_failures: flags.max_scrape_failures,
                staleness: flags.metrics_staleness_threshold,
                epoch: std::time::Instant::now(),
                kv_events: false,
            },
            Arc::new(PrefixIndex::new()),
        );
        if let Err(err) = built {
            out.push(format!(
                "{}: the config does not build a scheduler: {err}",
                e.name()
            ));
        }
        if let Err(err) = ScrapeSettings::from_config(
            &cfg,
            flags.model_server_metrics_scheme.as_deref(),
            flags.model_server_metrics_path.as_deref(),
            flags.model_server_metrics_port,
        ) {
            out.push(format!(
                "{}: the config's metrics mapping is invalid: {err}",
                e.name()
            ));
        }
    }
    out.done()
}

/// Scrape configs point at pods and ports that exist: a typo here fails
/// silently in the cluster (an empty dashboard).
pub fn monitors_resolve(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("monitors-resolve");
    for m in objs
        .iter()
        .filter(|o| matches!(kind(o), "PodMonitoring" | "PodMonitor" | "ServiceMonitor"))
    {
        let Some(selector) = m.pointer("/spec/selector").and_then(match_labels) else {
            out.push(format!("{} has no selector.matchLabels", id(m)));
            continue;
        };
        let endpoints = match kind(m) {
            "PodMonitor" => arr_at(m, "/spec/podMetricsEndpoints"),
            _ => arr_at(m, "/spec/endpoints"),
        };
        if endpoints.is_empty() {
            out.push(format!("{} has no endpoints", id(m)));
        }
        if kind(m) == "ServiceMonitor" {
            let svcs: Vec<&Obj> = of_kind(objs, "Service")
                .filter(|s| namespace(s) == namespace(m))
                .filter(|s| {
                    map_at(s, "/metadata/labels")
                        .is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
                })
                .collect();
            if svcs.is_empty() {
                out.push(format!(
                    "{} selects no Service by its labels {selector:?}",
                    id(m)
                ));
            }
            for ep in endpoints {
                let port = str_at(ep, "/port").unwrap_or("");
                if !svcs.iter().all(|s| {
                    arr_at(s, "/spec/ports")
                        .iter()
                        .any(|p| str_at(p, "/name") == Some(port))
                }) {
                    out.push(format!(
                        "{} port {port:?} is not a named port of the selected Services",
                        id(m)
                    ));
                }
            }
            continue;
        }
        let pods: Vec<Workload<'_>> = workloads(objs)
            .filter(|w| w.namespace() == namespace(m) && w.selected_by(selector))
            .collect();
        if pods.is_empty() {
            out.push(format!("{} selects no pods by {selector:?}", id(m)));
        }
        for ep in endpoints {
            let port = ep
                .get("port")
                .or_else(|| ep.get("targetPort"))
                .unwrap_or(&Value::Null);
            for w in &pods {
                if w.resolve_port(port).is_none() {
                    out.push(format!(
                        "{} port {port} is not a container port of {}",
                        id(m),
                        id(w.obj)
                    ));
                }
            }
        }
    }
    out.done()
}

/// Every image names a fixed version: no `latest`/`nightly`, no untagged
/// placeholder left from the base (a missed `images:` entry).
pub fn images_pinned(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("images-pinned");
    for w in workloads(objs) {
        for c in w
            .containers()
            .iter()
            .chain(arr_at(w.template, "/spec/initContainers"))
        {
            let image = str_at(c, "/image").unwrap_or("");
            let last = image.rsplit('/').next().unwrap_or(image);
            let tag = if image.contains('@') {
                Some("digest")
            } else {
                last.split_once(':').map(|(_, t)| t)
            };
            match tag {
                None => out.push(format!(
                    "{} image {image:?} has no tag (a placeholder the overlay did not replace?)",
                    id(w.obj)
                )),
                Some("latest" | "nightly" | "") => {
                    out.push(format!("{} image {image:?} is not pinned", id(w.obj)))
                }
                Some(_) => {}
            }
        }
    }
    out.done()
}

/// Tokens never live in the repo: the HF token Secret is created out of
/// band, so the output holds no Secret but empty ServiceAccount token
/// requests (the metrics reader's, filled in by the token controller).
pub fn no_committed_secrets(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("no-committed-secrets");
    for s in of_kind(objs, "Secret").filter(|s| !observability::is_token_request(objs, s)) {
        out.push(format!(
            "{} is rendered from the repo; create Secrets out of band",
            id(s)
        ));
    }
    out.done()
}

/// The pods the InferencePools select.
pub(crate) fn model_servers(objs: &[Obj]) -> Vec<Workload<'_>> {
    let selectors: Vec<_> = of_kind(objs, "InferencePool")
        .filter_map(|p| {
            Some((
                namespace(p),
                p.pointer("/spec/selector").and_then(match_labels)?,
            ))
        })
        .collect();
    workloads(objs)
        .filter(|w| {
            selectors
                .iter()
                .any(|(ns, sel)| *ns == w.namespace() && w.selected_by(sel))
        })
        .collect()
}

/// TPU v6e topologies served by one VM with all its chips: 1x1
/// (ct6e-standard-1t) and 2x2 (ct6e-standard-4t), cloud.google.com/tpu/docs/v6e
/// "Supported configurations".
pub const V6E_ONE_VM_TOPOLOGIES: &[&str] = &["1x1", "2x2"];

/// GKE: vLLM on whole single-VM TPU v6e hosts, with what XLA compilation,
/// the engine, the scheduler and GKE's TPU metrics need. A regression here
/// costs a 30-minute failed rollout.
pub fn tpu_model_server(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("tpu-model-server");
    if !ctx.gke {
        return out.done();
    }
    let servers = model_servers(objs);
    if servers.is_empty() {
        out.push("no model server is selected by an InferencePool");
    }
    for w in servers {
        let who = id(w.obj);
        let spec = w.pod_spec();
        if str_at(spec, "/nodeSelector/cloud.google.com~1gke-tpu-accelerator")
            != Some("tpu-v6e-slice")
        {
            out.push(format!(
                "{who} nodeSelector must pick cloud.google.com/gke-tpu-accelerator: tpu-v6e-slice"
            ));
        }
        let topology =
            str_at(spec, "/nodeSelector/cloud.google.com~1gke-tpu-topology").unwrap_or("");
        let chips: Option<u64> = topology.split('x').map(|d| d.parse::<u64>().ok()).product();
        if !V6E_ONE_VM_TOPOLOGIES.contains(&topology) {
            out.push(format!(
                "{who} gke-tpu-topology is {topology:?}, expected one of {V6E_ONE_VM_TOPOLOGIES:?} (one v6e VM, all its chips)"
            ));
        }
        // Every pod takes a whole TPU host and the node pool has exactly one
        // per replica: a surge pod would wait for a node that never comes.
        let surge = w.obj.pointer("/spec/strategy/rollingUpdate/maxSurge");
        let recreate = str_at(w.obj, "/spec/strategy/type") == Some("Recreate");
        if !recreate && surge != Some(&Value::from(0)) && surge != Some(&Value::from("0%")) {
            out.push(format!(
                "{who} rolls out with maxSurge {surge:?}: set maxSurge 0 (or Recreate), a surge pod needs a spare TPU node"
            ));
        }
        let Some(c) = w
            .containers()
            .iter()
            .find(|c| c.pointer("/resources/limits/google.com~1tpu").is_some())
        else {
            out.push(format!("{who} has no container requesting google.com/tpu"));
            continue;
        };
        let tpu = |ptr: &str| {
            c.pointer(ptr).and_then(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .or_else(|| v.as_u64().map(|n| n.to_string()))
            })
        };
        let (req, lim) = (
            tpu("/resources/requests/google.com~1tpu"),
            tpu("/resources/limits/google.com~1tpu"),
        );
        if req != lim {
            out.push(format!(
                "{who} google.com/tpu requests {req:?} != limits {lim:?}"
            ));
        }
        let lim: Option<u64> = lim.and_then(|l| l.parse().ok());
        if lim != chips {
            out.push(format!("{who} requests {lim:?} TPU chips but topology {topology} has {chips:?}: take the whole host"));
        }
        let a = args(c);
        let tp = arg_value(&a, "--tensor-parallel-size").and_then(|v| v.parse::<u64>().ok());
        if tp != lim {
            out.push(format!("{who} --tensor-parallel-size {tp:?} must equal the chip count {lim:?} on a single host"));
        }
        let startup = c.get("startupProbe").map_or(0, |p| {
            let n = |k: &str, d: u64| p.get(k).and_then(Value::as_u64).unwrap_or(d);
            n("initialDelaySeconds", 0) + n("periodSeconds", 10) * n("failureThreshold", 3)
        });
        if startup < 1800 {
            out.push(format!(
                "{who} startupProbe allows {startup} s; XLA compilation needs at least 1800 s"
            ));
        }
        let mounts: Vec<(&str, &str)> = arr_at(c, "/volumeMounts")
            .iter()
            .filter_map(|m| Some((str_at(m, "/mountPath")?, str_at(m, "/name")?)))
            .collect();
        let env = |n: &str| {
            arr_at(c, "/env")
                .iter()
                .find(|e| str_at(e, "/name") == Some(n))
        };
        match env("VLLM_XLA_CACHE_PATH").and_then(|e| str_at(e, "/value")) {
            Some(path)
                if mounts
                    .iter()
                    .any(|(m, _)| path == *m || path.starts_with(&format!("{m}/"))) => {}
            other => out.push(format!(
                "{who} VLLM_XLA_CACHE_PATH {other:?} is not on a mounted volume"
            )),
        }
        let shm_volume = mounts
            .iter()
            .find(|(m, _)| *m == "/dev/shm")
            .map(|(_, v)| *v);
        let shm_in_memory = shm_volume.is_some_and(|v| {
            arr_at(spec, "/volumes").iter().any(|vol| {
                str_at(vol, "/name") == Some(v) && str_at(vol, "/emptyDir/medium") == Some("Memory")
            })
        });
        if !shm_in_memory {
            out.push(format!(
                "{who} needs /dev/shm on an emptyDir with medium Memory"
            ));
        }
        // Not BestEffort: CPU, memory and disk requested, memory enough for
        // the memory-backed volumes (they count against it), disk enough for
        // the disk-backed ones.
        let request = |r: &str| {
            c.pointer(&format!("/resources/requests/{r}"))
                .and_then(model::quantity)
        };
        let (mut in_memory, mut on_disk) = (0.0, 0.0);
        for vol in arr_at(spec, "/volumes") {
            let Some(size) = vol.pointer("/emptyDir/sizeLimit").and_then(model::quantity) else {
                continue;
            };
            if str_at(vol, "/emptyDir/medium") == Some("Memory") {
                in_memory += size;
            } else {
                on_disk += size;
            }
        }
        for (r, floor) in [
            ("cpu", 0.0),
            ("memory", in_memory),
            ("ephemeral-storage", on_disk),
        ] {
            match request(r) {
                Some(q) if q > 0.0 && q >= floor => {}
                got => out.push(format!(
                    "{who} requests {r} {got:?}; it needs a request of at least {floor} (the emptyDir volumes it backs)"
                )),
            }
        }
        if !arr_at(c, "/ports")
            .iter()
            .any(|p| p.get("containerPort").and_then(Value::as_u64) == Some(8431))
        {
            out.push(format!(
                "{who} does not declare containerPort 8431: GKE collects TPU duty cycle and HBM use only from containers that do"
            ));
        }
        let token_ok = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .iter()
            .filter_map(|n| env(n))
            .any(|e| e.pointer("/valueFrom/secretKeyRef/optional") == Some(&Value::Bool(true)));
        if !token_ok {
            out.push(format!("{who} must read HF_TOKEN from a Secret with optional: true (the model is not gated)"));
        }
    }
    out.done()
}

// ---------------------------------------------------------------- pitfalls

/// Pitfall: only REGIONAL gateway classes support InferencePool on GKE.
pub fn pitfall_regional_gateway_class(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pitfall:regional-gateway-class");
    let gateways: Vec<&Obj> = of_kind(objs, "Gateway").collect();
    if ctx.gke && gateways.is_empty() {
        out.push("a GKE install must ship its Gateway");
    }
    for g in gateways {
        let class = str_at(g, "/spec/gatewayClassName").unwrap_or("");
        let allowed = if ctx.gke {
            REGIONAL_GKE_CLASSES.contains(&class)
        } else {
            REGIONAL_GKE_CLASSES.contains(&class) || OTHER_CLASSES.contains(&class)
        };
        if !allowed {
            out.push(format!(
                "{} uses gatewayClassName {class:?}: only regional GKE classes {REGIONAL_GKE_CLASSES:?} support InferencePool \
                 (global classes such as gke-l7-global-external-managed do not){}",
                id(g),
                if ctx.gke { "" } else { ", or a non-GKE implementation with InferencePool support" }
            ));
        }
    }
    out.done()
}

/// Pitfall: GKE rejects HTTPRoutes with `timeouts` (Accepted=False).
pub fn pitfall_httproute_timeouts(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pitfall:httproute-timeouts");
    for r in of_kind(objs, "HTTPRoute") {
        for (i, rule) in arr_at(r, "/spec/rules").iter().enumerate() {
            if rule.get("timeouts").is_some() {
                out.push(format!(
                    "{} rule {i} sets timeouts: GKE does not support HTTPRoute timeouts and rejects the route; \
                     set GCPBackendPolicy timeoutSec instead",
                    id(r)
                ));
            }
        }
    }
    out.done()
}

/// Pitfall: GCP health checks must ask vLLM's /health (the default "/" is
/// a 404, every endpoint goes unhealthy and the gateway answers 503); the
/// kubelet probes use /health too.
pub fn pitfall_health_check_path(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pitfall:health-check-path");
    for w in model_servers(objs) {
        for c in w.containers() {
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(path) = c.get(probe).and_then(|p| str_at(p, "/httpGet/path")) {
                    if path != "/health" {
                        out.push(format!(
                            "{} {probe} asks {path}; the model server's health path is /health",
                            id(w.obj)
                        ));
                    }
                } else if probe != "startupProbe" {
                    out.push(format!("{} has no HTTP {probe} on /health", id(w.obj)));
                }
            }
        }
    }
    if !ctx.gke {
        return out.done();
    }
    for pool in of_kind(objs, "InferencePool") {
        let ports: Vec<u64> = arr_at(pool, "/spec/targetPorts")
            .iter()
            .filter_map(|p| p["number"].as_u64())
            .collect();
        let policies: Vec<&Obj> = targeting(objs, "HealthCheckPolicy", pool).collect();
        if policies.len() != 1 {
            out.push(format!(
                "{} has {} HealthCheckPolicies; it needs exactly one asking /health (GCP health checks default to \"/\")",
                id(pool),
                policies.len()
            ));
        }
        for hc in policies {
            let ty = str_at(hc, "/spec/default/config/type");
            let path = str_at(hc, "/spec/default/config/httpHealthCheck/requestPath");
            let port = hc
                .pointer("/spec/default/config/httpHealthCheck/port")
                .and_then(Value::as_u64);
            let serving_port = str_at(hc, "/spec/default/config/httpHealthCheck/portSpecification")
                == Some("USE_SERVING_PORT");
            if ty != Some("HTTP")
                || path != Some("/health")
                || !(serving_port || port.is_some_and(|p| ports.contains(&p)))
            {
                out.push(format!(
                    "{} must be type HTTP, requestPath /health, on a target port {ports:?} (got type {ty:?}, path {path:?}, port {port:?}): \
                     GCP health checks must use /health",
                    id(hc)
                ));
            }
        }
    }
    out.done()
}

/// The GKE policies of kind `k` whose targetRef is `pool`.
pub(crate) fn targeting<'a>(
    objs: &'a [Obj],
    k: &'a str,
    pool: &'a Obj,
) -> impl Iterator<Item = &'a Obj> + 'a {
    of_kind(objs, k).filter(move |p| {
        namespace(p) == namespace(pool)
            && str_at(p, "/spec/targetRef/group") == Some("inference.networking.k8s.io")
            && str_at(p, "/spec/targetRef/kind") == Some("InferencePool")
            && str_at(p, "/spec/targetRef/name") == Some(name(pool))
    })
}

/// Pitfall (the other half of no HTTPRoute timeouts): on GKE the backend
/// timeout is a GCPBackendPolicy, and its 30 s default cuts generations.
pub fn pitfall_backend_timeout(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pitfall:backend-timeout");
    if !ctx.gke {
        return out.done();
    }
    for pool in of_kind(objs, "InferencePool") {
        let timeouts: Vec<Option<u64>> = targeting(objs, "GCPBackendPolicy", pool)
            .map(|p| {
                p.pointer("/spec/default/timeoutSec")
                    .and_then(Value::as_u64)
            })
            .collect();
        if !matches!(timeouts.as_slice(), [Some(t)] if *t >= 300) {
            out.push(format!(
                "{} needs one GCPBackendPolicy with timeoutSec >= 300 (found {timeouts:?}); HTTPRoute timeouts are not supported on GKE \
                 and the 30 s default cuts long generations",
                id(pool)
            ));
        }
    }
    out.done()
}

/// Pitfall: the model server is plain HTTP end to end. The seed's Service
/// said https (port name, appProtocol, GKE app-protocols annotation), the
/// load balancer spoke TLS to a cleartext vLLM, and /v1/models failed with a
/// TLS error.
pub fn pitfall_plain_http_backend(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pitfall:plain-http-backend");
    let tls_word = |s: &str| {
        let s = s.to_ascii_lowercase();
        s.contains("https") || s.contains("tls") || s.contains("ssl")
    };
    for pool in of_kind(objs, "InferencePool") {
        if let Some(p) = str_at(pool, "/spec/appProtocol").filter(|p| *p != "http") {
            out.push(format!(
                "{} appProtocol is {p:?}; the model server speaks plain HTTP/1.1 (http)",
                id(pool)
            ));
        }
    }
    let servers = model_servers(objs);
    for w in &servers {
        for c in w.containers() {
            for p in arr_at(c, "/ports") {
                if let Some(n) = str_at(p, "/name").filter(|n| tls_word(n)) {
                    out.push(format!(
                        "{} port name {n:?} says TLS; the model server is plain HTTP",
                        id(w.obj)
                    ));
                }
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(s) = c
                    .get(probe)
                    .and_then(|p| str_at(p, "/httpGet/scheme"))
                    .filter(|s| *s != "HTTP")
                {
                    out.push(format!(
                        "{} {probe} scheme {s}; the model server is plain HTTP",
                        id(w.obj)
                    ));
                }
            }
            for a in args(c).into_iter().filter(|a| a.starts_with("--ssl")) {
                out.push(format!(
                    "{} passes {a}: the model server must serve plain HTTP",
                    id(w.obj)
                ));
            }
        }
    }
    for svc in of_kind(objs, "Service") {
        for key in map_at(svc, "/metadata/annotations")
            .into_iter()
            .flat_map(|m| m.keys())
        {
            if key.contains("app-protocols") {
                out.push(format!("{} has annotation {key}, which forces the backend protocol; keep it plain HTTP", id(svc)));
            }
        }
        let selector = map_at(svc, "/spec/selector").cloned().unwrap_or_default();
        if !servers
            .iter()
            .any(|w| namespace(svc) == w.namespace() && w.selected_by(&selector))
        {
            continue;
        }
        for p in arr_at(svc, "/spec/ports") {
            let pname = str_at(p, "/name").unwrap_or("");
            let proto = str_at(p, "/appProtocol").unwrap_or("");
            if tls_word(pname)
                || tls_word(proto)
                || matches!(proto, "kubernetes.io/h2c" | "http2" | "HTTP2")
            {
                out.push(format!(
                    "{} port {pname:?} (appProtocol {proto:?}) in front of the model server says TLS or HTTP/2; it must be plain HTTP",
                    id(svc)
                ));
            }
        }
    }
    for hc in of_kind(objs, "HealthCheckPolicy") {
        if let Some(t) = str_at(hc, "/spec/default/config/type").filter(|t| *t != "HTTP") {
            out.push(format!(
                "{} health checks with {t}; the model server is plain HTTP",
                id(hc)
            ));
        }
    }
    out.done()
}

/// Pitfall: no GatewayClass is shipped (GKE provides its classes once the
/// Gateway API is enabled; shipping one fights the controller).
pub fn pitfall_gateway_class_shipped(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pitfall:gateway-class-shipped");
    for gc in of_kind(objs, "GatewayClass") {
        out.push(format!(
            "{} is shipped: use the class the platform provides",
            id(gc)
        ));
    }
    out.done()
}

/// Pitfall: /v1/models and /health must be answered through the gateway.
/// The route has to send these bodiless GETs to the pool (a route matching
/// only the completion paths, or only POST, would 404 them); the picker then
/// routes them to any ready endpoint, which the e2e test
/// tests/e2e/protocol.rs::bodiless_requests_are_routed proves.
pub fn pitfall_bodiless_requests(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pitfall:bodiless-requests");
    if of_kind(objs, "Gateway").next().is_none() {
        return out.done(); // no gateway in this install (kind without one)
    }
    let requests = [
        ("GET", "/health"),
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ];
    for (method, path) in requests {
        let routed = of_kind(objs, "HTTPRoute").any(|r| {
            arr_at(r, "/spec/rules").iter().any(|rule| {
                let to_pool = {
                    let refs = arr_at(rule, "/backendRefs");
                    !refs.is_empty()
                        && refs
                            .iter()
                            .all(|b| str_at(b, "/kind") == Some("InferencePool"))
                };
                let matches = arr_at(rule, "/matches");
                to_pool
                    && (matches.is_empty() || matches.iter().any(|m| route_match(m, method, path)))
            })
        });
        if !routed {
            out.push(format!(
                "no HTTPRoute rule sends {method} {path} to an InferencePool: /v1/models and /health must be answered through \
                 the gateway (the picker routes bodiless requests, tests/e2e/protocol.rs::bodiless_requests_are_routed)"
            ));
        }
    }
    out.done()
}

/// Gateway API match semantics for a plain request with no extra headers
/// or query parameters.
fn route_match(m: &Value, method: &str, path: &str) -> bool {
    if m.get("headers")
        .is_some_and(|h| h.as_array().is_some_and(|a| !a.is_empty()))
        || m.get("queryParams")
            .is_some_and(|q| q.as_array().is_some_and(|a| !a.is_empty()))
    {
        return false;
    }
    if str_at(m, "/method").is_some_and(|mm| mm != method) {
        return false;
    }
    let kind = str_at(m, "/path/type").unwrap_or("PathPrefix");
    let value = str_at(m, "/path/value").unwrap_or("/");
    match kind {
        "Exact" => path == value,
        "PathPrefix" => {
            let prefix = value.trim_end_matches('/');
            prefix.is_empty() || path == prefix || path.starts_with(&format!("{prefix}/"))
        }
        _ => false, // RegularExpression: implementation-specific, not used here
    }
}

/// Pitfall: kinds whose CRDs a GKE cluster does not have make `kubectl
/// apply -k` fail halfway ("no matches for kind"): prometheus-operator
/// monitors (use PodMonitoring) and LeaderWorkerSet (single-host v6e-4
/// needs none).
pub fn pitfall_crds_absent_on_gke(objs: &[Obj], ctx: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("pitfall:crds-absent-on-gke");
    if !ctx.gke {
        return out.done();
    }
    for o in objs {
        if matches!(
            group(o),
            "monitoring.coreos.com" | "leaderworkerset.x-k8s.io" | "networking.istio.io"
        ) {
            out.push(format!(
                "{} needs a CRD GKE does not install; keep it out of GKE overlays",
                id(o)
            ));
        }
    }
    out.done()
}
