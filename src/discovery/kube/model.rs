//! The pure part of Kubernetes discovery: what an InferencePool, a Pod and an
//! InferenceObjective mean for the endpoint set, with no I/O.
//!
//! `endpoints(pool, pods)` is the whole mapping: a pod serves when its
//! `Ready` condition is `True`, it has `status.podIP`, it has no
//! `deletionTimestamp` and its labels match the pool selector; each target
//! port at index `i` that the pod's active-ports annotation allows (all when
//! absent) is one endpoint named `<pod>-rank-<i>`, as GIE names them.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{NamespaceResourceScope, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::core::{ApiResource, DynamicObject};
use serde::Deserialize;

use super::KubeDiscoveryError;
use crate::{
    discovery::kv_events::{KvEventsOverride, KvEventsSettings},
    endpoints::EndpointSpec,
};

/// Pod annotation listing the target ports a pod really serves ("8000,8001").
pub const ACTIVE_PORTS_ANNOTATION: &str = "inference.networking.k8s.io/active-ports";
/// llm-d's name for the same annotation; read when GIE's is absent.
pub const LLMD_ACTIVE_PORTS_ANNOTATION: &str = "llm-d.ai/active-ports";

/// The InferencePool group of GIE v1.
pub const POOL_GROUP_V1: &str = "inference.networking.k8s.io";
/// The experimental group, whose InferencePool is `v1alpha2`.
pub const X_K8S_GROUP: &str = "inference.networking.x-k8s.io";

/// Most target ports an InferencePool may list (the CRD's bound).
const MAX_TARGET_PORTS: usize = 8;

/// The InferencePool resource of `group` (`v1`, or `v1alpha2` for the
/// experimental `x-k8s.io` group, which older GKE samples still use).
pub fn pool_resource(group: &str) -> ApiResource {
    let version = if group == X_K8S_GROUP {
        "v1alpha2"
    } else {
        "v1"
    };
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: format!("{group}/{version}"),
        kind: "InferencePool".to_owned(),
        plural: "inferencepools".to_owned(),
    }
}

/// llm-d-router's group, where InferenceObjective and InferenceModelRewrite
/// live since the picker left GIE (v1.6).
pub const LLMD_GROUP: &str = "llm-d.ai";

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: format!("{group}/{version}"),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// The InferenceObjective resource of GIE v1.5 (experimental group).
pub fn objective_resource() -> ApiResource {
    resource(
        X_K8S_GROUP,
        "v1alpha2",
        "InferenceObjective",
        "inferenceobjectives",
    )
}

/// A kind that may be served in several versions of one group: the versions
/// to try, newest first; the first the API server serves is watched.
#[derive(Debug, Clone)]
pub struct VersionedResource {
    pub kind: &'static str,
    pub candidates: Vec<ApiResource>,
}

/// InferenceObjective in both groups: GIE v1.5's, and llm-d-router's (`v1`,
/// falling back to `v1alpha2` on clusters with the older CRD).
pub fn objective_resources() -> Vec<VersionedResource> {
    let kind = "InferenceObjective";
    let plural = "inferenceobjectives";
    vec![
        VersionedResource {
            kind,
            candidates: vec![objective_resource()],
        },
        VersionedResource {
            kind,
            candidates: vec![
                resource(LLMD_GROUP, "v1", kind, plural),
                resource(LLMD_GROUP, "v1alpha2", kind, plural),
            ],
        },
    ]
}

/// InferenceModelRewrite in both groups, as [`objective_resources`].
pub fn model_rewrite_resources() -> Vec<VersionedResource> {
    let kind = "InferenceModelRewrite";
    let plural = "inferencemodelrewrites";
    vec![
        VersionedResource {
            kind,
            candidates: vec![resource(X_K8S_GROUP, "v1alpha2", kind, plural)],
        },
        VersionedResource {
            kind,
            candidates: vec![
                resource(LLMD_GROUP, "v1", kind, plural),
                resource(LLMD_GROUP, "v1alpha2", kind, plural),
            ],
        },
    ]
}

/// How the gateway talks to the model servers (`spec.appProtocol`). The
/// picker itself does not use it (it only names endpoints); it is parsed so
/// an unsupported value is reported instead of silently ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AppProtocol {
    #[default]
    Http,
    H2c,
}

/// What discovery needs from an InferencePool (or from the standalone
/// `--endpoint-selector`/`--endpoint-target-ports` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Equality label selector; never empty (an empty one would select every
    /// pod of the namespace).
    pub selector: BTreeMap<String, String>,
    /// Distinct ports, in the pool's order (the index names the endpoint).
    pub target_ports: Vec<u16>,
    pub app_protocol: AppProtocol,
}

impl PoolSpec {
    /// Validates selector and ports; used for both the CRD and the flags.
    pub fn new(
        selector: BTreeMap<String, String>,
        target_ports: Vec<u16>,
        app_protocol: AppProtocol,
    ) -> Result<Self, KubeDiscoveryError> {
        let invalid = |m: String| KubeDiscoveryError::InvalidPool(m);
        if selector.is_empty() {
            return Err(invalid("the selector is empty".into()));
        }
        if target_ports.is_empty() {
            return Err(invalid("no target ports".into()));
        }
        if target_ports.len() > MAX_TARGET_PORTS {
            return Err(invalid(format!(
                "{} target ports (at most {MAX_TARGET_PORTS})",
                target_ports.len()
            )));
        }
        let mut seen = BTreeSet::new();
        for &p in &target_ports {
            if p == 0 {
                return Err(invalid("target port 0".into()));
            }
            if !seen.insert(p) {
                return Err(invalid(format!("target port {p} is listed twice")));
            }
        }
        Ok(Self {
            selector,
            target_ports,
            app_protocol,
        })
    }

    /// True when every selector label is on the pod with the same value.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPoolSpec {
    #[serde(default)]
    selector: Option<RawSelector>,
    /// v1: `[{number: 8000}]`.
    #[serde(default)]
    target_ports: Option<Vec<RawPort>>,
    /// v1alpha2: a single port.
    #[serde(default)]
    target_port_number: Option<i64>,
    #[serde(default)]
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSelector {
    /// v1: `{matchLabels: {...}}`.
    V1 {
        #[serde(rename = "matchLabels")]
        match_labels: BTreeMap<String, String>,
    },
    /// v1alpha2: a flat label map.
    Flat(BTreeMap<String, String>),
}

#[derive(Debug, Deserialize)]
struct RawPort {
    number: i64,
}

fn port(n: i64) -> Result<u16, KubeDiscoveryError> {
    u16::try_from(n)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| KubeDiscoveryError::InvalidPool(format!("port {n} is out of range 1-65535")))
}

/// Reads an InferencePool object (either API version's shape).
pub fn parse_pool(obj: &DynamicObject) -> Result<PoolSpec, KubeDiscoveryError> {
    let spec = obj
        .data
        .get("spec")
        .ok_or_else(|| KubeDiscoveryError::InvalidPool("no spec".into()))?;
    let raw: RawPoolSpec =
        serde_json::from_value(spec.clone()).map_err(KubeDiscoveryError::MalformedPool)?;
    let selector = match raw.selector {
        Some(RawSelector::V1 { match_labels }) => match_labels,
        Some(RawSelector::Flat(labels)) => labels,
        None => BTreeMap::new(),
    };
    let target_ports = match (raw.target_ports, raw.target_port_number) {
        (Some(ports), _) if !ports.is_empty() => ports
            .iter()
            .map(|p| port(p.number))
            .collect::<Result<Vec<_>, _>>()?,
        (_, Some(n)) => vec![port(n)?],
        _ => Vec::new(),
    };
    let app_protocol = match raw.app_protocol.as_deref() {
        None | Some("" | "http") => AppProtocol::Http,
        Some("kubernetes.io/h2c") => AppProtocol::H2c,
        Some(other) => {
            return Err(KubeDiscoveryError::InvalidPool(format!(
                "unsupported appProtocol {other:?}"
            )));
        }
    };
    PoolSpec::new(selector, target_ports, app_protocol)
}

/// Parses `--endpoint-selector`: `k=v[,k2=v2]` (`==` also accepted). Only
/// equality selectors exist in an InferencePool, so only those are taken.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, KubeDiscoveryError> {
    let invalid = |m: String| KubeDiscoveryError::InvalidSelector(m);
    let mut out = BTreeMap::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| invalid(format!("{term:?} is not of the form key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.ends_with('!') || v.contains('=') {
            return Err(invalid(format!(
                "{term:?}: only equality selectors key=value are supported"
            )));
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(invalid(format!("label {k:?} is given twice")));
        }
    }
    if out.is_empty() {
        return Err(invalid("the selector is empty".into()));
    }
    Ok(out)
}

/// A Pod as deserialised from the API server: only the fields discovery
/// reads, so a pod costs a few hundred bytes instead of its full spec.
#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<PodStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default)]
    pub conditions: Option<Vec<PodCondition>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub status: String,
}

impl kube::Resource for Pod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What discovery keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub ip: Option<IpAddr>,
    /// `Ready` is `True`.
    pub ready: bool,
    /// `deletionTimestamp` is set.
    pub terminating: bool,
    pub labels: BTreeMap<String, String>,
    /// Ports from the active-ports annotation; `None` when absent (all
    /// target ports). Entries that are not port numbers are dropped, as GIE does.
    pub active_ports: Option<BTreeSet<u16>>,
    /// The `epp/kv-events*` annotations.
    pub kv_events: KvEventsOverride,
}

impl PodView {
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let annotations = pod.metadata.annotations.as_ref();
        let active_ports = annotations
            .and_then(|a| {
                a.get(ACTIVE_PORTS_ANNOTATION)
                    .or_else(|| a.get(LLMD_ACTIVE_PORTS_ANNOTATION))
            })
            .map(|v| parse_active_ports(v));
        let mut invalid = Vec::new();
        let kv_events = KvEventsOverride::from_annotations(
            |k| annotations.and_then(|a| a.get(k)).map(String::as_str),
            &mut invalid,
        );
        if !invalid.is_empty() {
            tracing::debug!(pod = ?pod.metadata.name, annotations = ?invalid,
                "ignoring KV-event annotations that are not valid values");
        }
        Self {
            name: pod.metadata.name.clone().unwrap_or_default(),
            ip,
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            active_ports,
            kv_events,
        }
    }

    /// Whether the pod takes traffic for `pool` at all.
    pub fn serves(&self, pool: &PoolSpec) -> bool {
        self.ready && !self.terminating && self.ip.is_some() && pool.selects(&self.labels)
    }
}

fn parse_active_ports(value: &str) -> BTreeSet<u16> {
    value
        .split(',')
        .filter_map(|p| p.trim().parse::<u16>().ok())
        .filter(|&p| p > 0)
        .collect()
}

/// The endpoint set of `pool` over `pods`, sorted by name so equal inputs give
/// equal outputs (the caller compares sets to skip no-op publications).
/// Event settings resolve over `kv_events` (the flags'); a pod whose
/// annotations cannot work (ports past 65535) gets no subscription.
pub fn endpoints<'a>(
    pool: &PoolSpec,
    pods: impl IntoIterator<Item = &'a PodView>,
    kv_events: &KvEventsSettings,
) -> Vec<EndpointSpec> {
    let mut out = Vec::new();
    for pod in pods {
        let Some(address) = pod.ip.filter(|_| pod.serves(pool)) else {
            continue;
        };
        for (rank, &port) in pool.target_ports.iter().enumerate() {
            if pod
                .active_ports
                .as_ref()
                .is_some_and(|active| !active.contains(&port))
            {
                continue;
            }
            let ranks = pod.kv_events.ranks.unwrap_or(kv_events.ranks);
            let offset = u16::try_from(rank)
                .ok()
                .and_then(|r| r.checked_mul(ranks))
                .unwrap_or(u16::MAX);
            let events = kv_events
                .resolve(&pod.kv_events, offset)
                .unwrap_or_else(|e| {
                    tracing::debug!(pod = %pod.name, error = %e, "no KV-event subscription");
                    None
                });
            out.push(EndpointSpec {
                name: format!("{}-rank-{rank}", pod.name),
                address,
                port,
                labels: pod.labels.clone(),
                metrics_port: None,
                kv_events: events,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Most pools one object may name (`spec.poolRefs`), and most rules, match
/// entries and targets read from one InferenceModelRewrite: the objects come
/// from the cluster's users, and the picker's memory must stay bounded.
const MAX_REFS: usize = 64;

/// The pool names an object refers to: `spec.poolRef.name` (GIE v1.5,
/// llm-d.ai v1alpha2) or every `spec.poolRefs[].name` (llm-d.ai v1). Refs of
/// another kind than InferencePool are not about a pool.
fn pool_refs(spec: &serde_json::Value) -> Option<Vec<String>> {
    let name_of = |r: &serde_json::Value| {
        let kind = r
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("InferencePool");
        (kind == "InferencePool")
            .then(|| r.get("name").and_then(|n| n.as_str()).map(str::to_owned))
            .flatten()
    };
    if let Some(refs) = spec.get("poolRefs").and_then(|r| r.as_array()) {
        return Some(refs.iter().take(MAX_REFS).filter_map(name_of).collect());
    }
    let one = spec.get("poolRef")?;
    Some(name_of(one).into_iter().collect())
}

/// What an InferenceObjective says: the pools it is about and its priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objective {
    pub pools: Vec<String>,
    pub priority: i32,
}

impl Objective {
    pub fn is_for(&self, pool: &str) -> bool {
        self.pools.iter().any(|p| p == pool)
    }
}

/// Reads an InferenceObjective: its pool refs and `spec.priority` (unset
/// means 0, GIE's default).
pub fn parse_objective(obj: &DynamicObject) -> Result<Objective, KubeDiscoveryError> {
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    let invalid = |m: &str| KubeDiscoveryError::InvalidObjective(format!("{name}: {m}"));
    let spec = obj.data.get("spec").ok_or_else(|| invalid("no spec"))?;
    let pools = pool_refs(spec).ok_or_else(|| invalid("no spec.poolRef or spec.poolRefs"))?;
    let priority = match spec.get("priority") {
        None | Some(serde_json::Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| invalid("spec.priority is not a 32-bit integer"))?,
    };
    Ok(Objective { pools, priority })
}

/// One rule of an InferenceModelRewrite: requests for one of `models` (any
/// model when empty) are sent as one of `targets`, chosen by weight.
#[derive(Debug, Clone, PartialEq)]
pub struct RewriteRule {
    pub models: Vec<String>,
    pub targets: Vec<(String, f64)>,
}

/// What an InferenceModelRewrite says.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRewrite {
    pub pools: Vec<String>,
    /// Creation time (RFC 3339), the tie-breaker between objects: the
    /// oldest object's rule wins.
    pub created: String,
    pub rules: Vec<RewriteRule>,
}

impl ModelRewrite {
    pub fn is_for(&self, pool: &str) -> bool {
        self.pools.iter().any(|p| p == pool)
    }
}

/// Reads an InferenceModelRewrite (`spec.poolRef`/`poolRefs`, `spec.rules[]`
/// with `matches[].model.value` (type `Exact`, the only one defined) and
/// `targets[].{modelRewrite, weight}`). Weights are optional, all or none;
/// none means equal shares.
pub fn parse_model_rewrite(obj: &DynamicObject) -> Result<ModelRewrite, KubeDiscoveryError> {
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    let invalid = |m: String| KubeDiscoveryError::InvalidModelRewrite(format!("{name}: {m}"));
    let spec = obj
        .data
        .get("spec")
        .ok_or_else(|| invalid("no spec".into()))?;
    let pools =
        pool_refs(spec).ok_or_else(|| invalid("no spec.poolRef or spec.poolRefs".into()))?;
    let rules = spec
        .get("rules")
        .and_then(|r| r.as_array())
        .ok_or_else(|| invalid("no spec.rules".into()))?;
    let mut out = Vec::with_capacity(rules.len().min(MAX_REFS));
    for (i, rule) in rules.iter().take(MAX_REFS).enumerate() {
        let mut models = Vec::new();
        for m in rule
            .get("matches")
            .and_then(|m| m.as_array())
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .take(MAX_REFS)
        {
            let Some(model) = m.get("model") else {
                continue;
            };
            let kind = model
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("Exact");
            if kind != "Exact" {
                return Err(invalid(format!(
                    "rule {i}: match type {kind:?} (only Exact)"
                )));
            }
            match model.get("value").and_then(|v| v.as_str()) {
                Some(v) if !v.is_empty() => models.push(v.to_owned()),
                _ => return Err(invalid(format!("rule {i}: a model match without a value"))),
            }
        }
        let mut targets = Vec::new();
        for t in rule
            .get("targets")
            .and_then(|t| t.as_array())
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .take(MAX_REFS)
        {
            let model = t
                .get("modelRewrite")
                .and_then(|m| m.as_str())
                .filter(|m| !m.is_empty())
                .ok_or_else(|| invalid(format!("rule {i}: a target without modelRewrite")))?;
            let weight = match t.get("weight") {
                None | Some(serde_json::Value::Null) => 1.0,
                Some(w) => w
                    .as_u64()
                    .filter(|w| (1..=1_000_000).contains(w))
                    .ok_or_else(|| invalid(format!("rule {i}: weight must be 1..1000000")))?
                    as f64,
            };
            targets.push((model.to_owned(), weight));
        }
        if targets.is_empty() {
            return Err(invalid(format!("rule {i}: no targets")));
        }
        out.push(RewriteRule { models, targets });
    }
    Ok(ModelRewrite {
        pools,
        created: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        rules: out,
    })
}

/// The rewrite rules of `objects` that are about `pool`, in the order they
/// apply: rules naming models before rules matching any model, then the
/// oldest object first, then each object's rules in order (llm-d-router's
/// precedence). A lookup takes the first rule that matches.
pub fn rewrite_rules_for(pool: &str, objects: &[&ModelRewrite]) -> Vec<RewriteRule> {
    let mut ours: Vec<&ModelRewrite> = objects.iter().copied().filter(|o| o.is_for(pool)).collect();
    ours.sort_by(|a, b| a.created.cmp(&b.created));
    let rules = || ours.iter().flat_map(|o| o.rules.iter());
    rules()
        .filter(|r| !r.models.is_empty())
        .chain(rules().filter(|r| r.models.is_empty()))
        .cloned()
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;

    pub fn dynamic(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    pub fn pod_json(
        name: &str,
        ip: &str,
        ready: bool,
        labels: serde_json::Value,
    ) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "labels": labels},
            "status": {
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            },
        })
    }

    fn view(value: serde_json::Value) -> PodView {
        PodView::from_pod(&serde_json::from_value(value).unwrap())
    }

    fn pool(ports: &[u16]) -> PoolSpec {
        PoolSpec::new(
            BTreeMap::from([("app".into(), "vllm".into())]),
            ports.to_vec(),
            AppProtocol::Http,
        )
        .unwrap()
    }

    #[test]
    fn v1_pool() {
        let p = parse_pool(&dynamic(json!({
            "metadata": {"name": "p"},
            "spec": {
                "selector": {"matchLabels": {"app": "vllm"}},
                "targetPorts": [{"number": 8000}, {"number": 8001}],
                "appProtocol": "kubernetes.io/h2c",
                "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
            },
        })))
        .unwrap();
        assert_eq!(p.selector, BTreeMap::from([("app".into(), "vllm".into())]));
        assert_eq!(p.target_ports, vec![8000, 8001]);
        assert_eq!(p.app_protocol, AppProtocol::H2c);
    }

    #[test]
    fn v1alpha2_pool() {
        let p = parse_pool(&dynamic(json!({
            "metadata": {"name": "p"},
            "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000,
                     "extensionRef": {"name": "epp"}},
        })))
        .unwrap();
        assert_eq!(p.target_ports, vec![8000]);
        assert_eq!(p.app_protocol, AppProtocol::Http);
    }

    #[test]
    fn invalid_pools_say_why() {
        for (spec, needle) in [
            (
                json!({"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}),
                "selector is empty",
            ),
            (json!({"targetPorts": [{"number": 1}]}), "selector is empty"),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}}),
                "no target ports",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 70000}]}),
                "out of range",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 1}, {"number": 1}]}),
                "twice",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 1}], "appProtocol": "grpc"}),
                "appProtocol",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": "8000"}),
                "malformed InferencePool spec: invalid type",
            ),
        ] {
            let err =
                parse_pool(&dynamic(json!({"metadata": {"name": "p"}, "spec": spec}))).unwrap_err();
            let err = crate::telemetry::logging::chain(&err).to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
        assert!(parse_pool(&dynamic(json!({"metadata": {"name": "p"}}))).is_err());
    }

    #[test]
    fn selectors() {
        assert_eq!(
            parse_selector("app=vllm, tier==gpu").unwrap(),
            BTreeMap::from([("app".into(), "vllm".into()), ("tier".into(), "gpu".into())])
        );
        for bad in ["", "app", "app!=x", "a=b,a=c", "=x", "app in (a,b)"] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pod_views() {
        let v = view(json!({
            "metadata": {"name": "a", "labels": {"app": "vllm"}, "deletionTimestamp": "2026-01-01T00:00:00Z",
                         "annotations": {ACTIVE_PORTS_ANNOTATION: "8001, x, 0,8002"}},
            "status": {"podIP": "fd00::1", "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]},
        }));
        assert!(v.ready && v.terminating);
        assert_eq!(v.ip, Some("fd00::1".parse().unwrap()));
        assert_eq!(v.active_ports, Some(BTreeSet::from([8001, 8002])));
        let bare = view(json!({"metadata": {"name": "b"}, "status": {"conditions": null}}));
        assert!(!bare.ready && bare.ip.is_none() && bare.active_ports.is_none());
        let llmd = view(
            json!({"metadata": {"name": "c", "annotations": {LLMD_ACTIVE_PORTS_ANNOTATION: "1"}}}),
        );
        assert_eq!(llmd.active_ports, Some(BTreeSet::from([1])));
    }

    #[test]
    fn only_ready_matching_live_pods_with_ips_serve() {
        let app = json!({"app": "vllm", "zone": "a"});
        let mut terminating = pod_json("terminating", "10.0.0.4", true, app.clone());
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let pods = [
            view(pod_json("ready", "10.0.0.1", true, app.clone())),
            view(pod_json("unready", "10.0.0.2", false, app.clone())),
            view(pod_json(
                "other",
                "10.0.0.3",
                true,
                json!({"app": "sglang"}),
            )),
            view(terminating),
            view(json!({"metadata": {"name": "no-ip", "labels": app},
                        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
        ];
        let eps = endpoints(&pool(&[8000]), &pods, &KvEventsSettings::default());
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].name, "ready-rank-0");
        assert_eq!(eps[0].host_port(), "10.0.0.1:8000");
        assert_eq!(eps[0].labels["zone"], "a", "labels are copied from the pod");
    }

    #[test]
    fn every_target_port_is_an_endpoint_narrowed_by_the_annotation() {
        let mut narrowed = pod_json("b", "10.0.0.2", true, json!({"app": "vllm"}));
        narrowed["metadata"]["annotations"] = json!({ACTIVE_PORTS_ANNOTATION: "8002,9999"});
        let mut none = pod_json("c", "10.0.0.3", true, json!({"app": "vllm"}));
        none["metadata"]["annotations"] = json!({ACTIVE_PORTS_ANNOTATION: ""});
        let pods = [
            view(pod_json("a", "10.0.0.1", true, json!({"app": "vllm"}))),
            view(narrowed),
            view(none),
        ];
        let eps = endpoints(
            &pool(&[8000, 8001, 8002]),
            &pods,
            &KvEventsSettings::default(),
        );
        let names: Vec<(&str, String)> = eps
            .iter()
            .map(|e| (e.name.as_str(), e.host_port()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("a-rank-0", "10.0.0.1:8000".to_owned()),
                ("a-rank-1", "10.0.0.1:8001".to_owned()),
                ("a-rank-2", "10.0.0.1:8002".to_owned()),
                ("b-rank-2", "10.0.0.2:8002".to_owned()),
            ],
            "the rank is the port's index in the pool, not in the annotation"
        );
    }

    #[test]
    fn kv_events_from_flags_then_annotations_offset_per_target_port() {
        use crate::{
            discovery::kv_events::{
                KV_EVENTS_ANNOTATION, KV_EVENTS_PORT_ANNOTATION, KV_EVENTS_RANKS_ANNOTATION,
                KV_EVENTS_TOPIC_ANNOTATION,
            },
            endpoints::KvEventsSpec,
        };
        let mut annotated = pod_json("b", "10.0.0.2", true, json!({"app": "vllm"}));
        annotated["metadata"]["annotations"] = json!({
            KV_EVENTS_PORT_ANNOTATION: "6000",
            KV_EVENTS_RANKS_ANNOTATION: "2",
            KV_EVENTS_TOPIC_ANNOTATION: "kv@",
        });
        let mut off = pod_json("c", "10.0.0.3", true, json!({"app": "vllm"}));
        off["metadata"]["annotations"] = json!({KV_EVENTS_ANNOTATION: "false"});
        let pods = [
            view(pod_json("a", "10.0.0.1", true, json!({"app": "vllm"}))),
            view(annotated),
            view(off),
        ];
        let on = KvEventsSettings {
            enabled: true,
            ..KvEventsSettings::default()
        };
        let eps = endpoints(&pool(&[8000, 8001]), &pods, &on);
        let got: Vec<(&str, Option<KvEventsSpec>)> = eps
            .iter()
            .map(|e| (e.name.as_str(), e.kv_events.clone()))
            .collect();
        let spec = |port, replay, topic: &str, ranks| {
            Some(KvEventsSpec {
                port,
                replay_port: Some(replay),
                topic: topic.into(),
                ranks,
            })
        };
        assert_eq!(
            got,
            vec![
                ("a-rank-0", spec(5557, 5558, "", 1)),
                ("a-rank-1", spec(5558, 5559, "", 1)),
                ("b-rank-0", spec(6000, 5558, "kv@", 2)),
                ("b-rank-1", spec(6002, 5560, "kv@", 2)),
                ("c-rank-0", None),
                ("c-rank-1", None),
            ]
        );
        let eps = endpoints(&pool(&[8000]), &pods, &KvEventsSettings::default());
        assert!(
            eps.iter().all(|e| e.kv_events.is_none()),
            "annotations alone do not turn events on"
        );
    }

    #[test]
    fn objectives() {
        let o = parse_objective(&dynamic(json!({
            "metadata": {"name": "chat"},
            "spec": {"priority": -1, "poolRef": {"name": "pool", "group": POOL_GROUP_V1}},
        })))
        .unwrap();
        assert_eq!(
            o,
            Objective {
                pools: vec!["pool".into()],
                priority: -1
            }
        );
        // llm-d.ai/v1: a list of pools.
        let o = parse_objective(&dynamic(json!({
            "metadata": {"name": "chat"},
            "spec": {"priority": 3, "poolRefs": [{"name": "a"}, {"name": "b", "kind": "InferencePool"},
                {"name": "c", "kind": "Service"}]},
        })))
        .unwrap();
        assert_eq!(o.pools, vec!["a".to_owned(), "b".to_owned()]);
        assert!(o.is_for("b") && !o.is_for("c"));
        let unset = parse_objective(&dynamic(json!({
            "metadata": {"name": "x"}, "spec": {"poolRef": {"name": "pool"}},
        })))
        .unwrap();
        assert_eq!(unset.priority, 0);
        assert!(parse_objective(&dynamic(json!({"metadata": {"name": "x"}, "spec": {}}))).is_err());
        assert!(
            parse_objective(&dynamic(json!({
                "metadata": {"name": "x"}, "spec": {"poolRef": {"name": "p"}, "priority": 1e12},
            })))
            .is_err()
        );
    }

    fn rewrite(name: &str, created: &str, rules: serde_json::Value) -> ModelRewrite {
        parse_model_rewrite(&dynamic(json!({
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"poolRef": {"name": "pool"}, "rules": rules},
        })))
        .unwrap()
    }

    #[test]
    fn model_rewrites_parse_and_order_by_precedence() {
        let older = rewrite(
            "older",
            "2026-01-01T00:00:00Z",
            json!([
                {"targets": [{"modelRewrite": "generic-old"}]},
                {"matches": [{"model": {"value": "m"}}],
                 "targets": [{"modelRewrite": "a", "weight": 3}, {"modelRewrite": "b", "weight": 1}]},
            ]),
        );
        assert_eq!(
            older.rules[1].targets,
            vec![("a".to_owned(), 3.0), ("b".to_owned(), 1.0)]
        );
        let newer = rewrite(
            "newer",
            "2026-06-01T00:00:00Z",
            json!([{"matches": [{"model": {"type": "Exact", "value": "m"}}],
                    "targets": [{"modelRewrite": "new"}]}]),
        );
        let mut elsewhere = newer.clone();
        elsewhere.pools = vec!["other".into()];
        let rules = rewrite_rules_for("pool", &[&newer, &elsewhere, &older]);
        let firsts: Vec<&str> = rules.iter().map(|r| r.targets[0].0.as_str()).collect();
        assert_eq!(
            firsts,
            ["a", "new", "generic-old"],
            "exact first, oldest first"
        );

        for bad in [
            json!([{"targets": []}]),
            json!([{"matches": [{"model": {"type": "Prefix", "value": "m"}}], "targets": [{"modelRewrite": "x"}]}]),
            json!([{"targets": [{"modelRewrite": "x", "weight": 0}]}]),
            json!([{"targets": [{"weight": 1}]}]),
        ] {
            let r = parse_model_rewrite(&dynamic(json!({
                "metadata": {"name": "bad"},
                "spec": {"poolRef": {"name": "pool"}, "rules": bad},
            })));
            assert!(r.is_err(), "{bad}");
        }
    }

    #[test]
    fn resources() {
        assert_eq!(
            pool_resource(POOL_GROUP_V1).api_version,
            "inference.networking.k8s.io/v1"
        );
        assert_eq!(pool_resource(X_K8S_GROUP).version, "v1alpha2");
        assert_eq!(objective_resource().plural, "inferenceobjectives");
        let llmd = &objective_resources()[1].candidates;
        assert_eq!(llmd[0].api_version, "llm-d.ai/v1");
        assert_eq!(llmd[1].api_version, "llm-d.ai/v1alpha2");
        assert_eq!(
            model_rewrite_resources()[0].candidates[0].plural,
            "inferencemodelrewrites"
        );
    }
}
