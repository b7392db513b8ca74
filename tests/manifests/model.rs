//! The rendered objects as JSON values, and the few accessors the checks
//! share. Kubernetes YAML is parsed into `serde_json::Value` so every check
//! uses JSON pointers, whatever the kind.

use serde::Deserialize;
use serde_json::{Map, Value};

/// One rendered object.
pub type Obj = Value;

/// Parses a multi-document YAML stream (what `kubectl kustomize` prints).
pub fn parse_docs(text: &str) -> Result<Vec<Obj>, String> {
    let mut out = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).map_err(|e| format!("invalid YAML: {e}"))?;
        // `---` followed by nothing (or comments only) is an empty document.
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

pub fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

pub fn arr_at<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

pub fn map_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a Map<String, Value>> {
    v.pointer(ptr).and_then(Value::as_object)
}

pub fn kind(o: &Obj) -> &str {
    str_at(o, "/kind").unwrap_or("")
}

pub fn name(o: &Obj) -> &str {
    str_at(o, "/metadata/name").unwrap_or("")
}

pub fn namespace(o: &Obj) -> Option<&str> {
    str_at(o, "/metadata/namespace")
}

/// The API group: "" for the core group (`apiVersion: v1`).
pub fn group(o: &Obj) -> &str {
    str_at(o, "/apiVersion")
        .and_then(|v| v.rsplit_once('/'))
        .map_or("", |(g, _)| g)
}

/// "Kind/name" for messages.
pub fn id(o: &Obj) -> String {
    format!("{}/{}", kind(o), name(o))
}

pub fn of_kind<'a>(objs: &'a [Obj], k: &'a str) -> impl Iterator<Item = &'a Obj> + 'a {
    objs.iter().filter(move |o| kind(o) == k)
}

/// The object of kind `k` named `n` in namespace `ns`.
pub fn find<'a>(objs: &'a [Obj], k: &str, n: &str, ns: Option<&str>) -> Option<&'a Obj> {
    objs.iter()
        .find(|o| kind(o) == k && name(o) == n && namespace(o) == ns)
}

/// Kinds this install may contain that are cluster-scoped.
pub const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "GatewayClass",
    "ClusterPodMonitoring",
    "ClusterRules",
    "PriorityClass",
    "StorageClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
];

pub fn is_cluster_scoped(o: &Obj) -> bool {
    CLUSTER_SCOPED.contains(&kind(o))
}

/// A workload and its pod template (`spec.template`), or a bare Pod.
pub struct Workload<'a> {
    pub obj: &'a Obj,
    pub template: &'a Value,
}

impl<'a> Workload<'a> {
    pub fn labels(&self) -> Option<&'a Map<String, Value>> {
        map_at(self.template, "/metadata/labels")
    }

    pub fn pod_spec(&self) -> &'a Value {
        self.template.get("spec").unwrap_or(&Value::Null)
    }

    pub fn containers(&self) -> &'a [Value] {
        arr_at(self.template, "/spec/containers")
    }

    pub fn namespace(&self) -> Option<&'a str> {
        namespace(self.obj)
    }

    /// Whether `selector` (matchLabels-style map) selects this workload's
    /// pods: every pair is present, and the selector is not empty (an empty
    /// selector matching everything is never what these manifests mean).
    pub fn selected_by(&self, selector: &Map<String, Value>) -> bool {
        let Some(labels) = self.labels() else {
            return false;
        };
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The container port (number) a named or numbered port refers to.
    pub fn resolve_port(&self, port: &Value) -> Option<u64> {
        self.containers().iter().find_map(|c| {
            arr_at(c, "/ports").iter().find_map(|p| {
                let number = p.get("containerPort").and_then(Value::as_u64)?;
                let hit = match port {
                    Value::String(s) => p.get("name").and_then(Value::as_str) == Some(s),
                    Value::Number(n) => n.as_u64() == Some(number),
                    _ => false,
                };
                hit.then_some(number)
            })
        })
    }
}

pub fn workloads(objs: &[Obj]) -> impl Iterator<Item = Workload<'_>> {
    objs.iter().filter_map(|o| match kind(o) {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => o
            .pointer("/spec/template")
            .map(|template| Workload { obj: o, template }),
        "Pod" => Some(Workload {
            obj: o,
            template: o,
        }),
        _ => None,
    })
}

/// `labelSelector.matchLabels`, or a flat map when given one directly
/// (Service selectors, InferencePool v1alpha2).
pub fn match_labels(selector: &Value) -> Option<&Map<String, Value>> {
    selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .or_else(|| {
            selector
                .as_object()
                .filter(|m| !m.contains_key("matchLabels"))
        })
}

/// The container's `args` (and `command` after the executable) as strings.
pub fn args(container: &Value) -> Vec<&str> {
    let command = arr_at(container, "/command");
    command
        .iter()
        .skip(1)
        .chain(arr_at(container, "/args"))
        .filter_map(Value::as_str)
        .collect()
}
