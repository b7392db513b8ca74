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

/// A Kubernetes resource quantity ("32Gi", "500m", "8", "1.5G") in base
/// units (bytes, cores): binary and decimal suffixes, milli for CPU. None
/// for anything else (an exponent form, garbage).
pub fn quantity(v: &Value) -> Option<f64> {
    let s = match v {
        Value::String(s) => s.as_str(),
        Value::Number(n) => return n.as_f64(),
        _ => return None,
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * factor)
}

/// `spec.replicas` of a workload (1 when unset, as the API defaults it).
pub fn replicas(w: &Workload<'_>) -> u64 {
    w.obj
        .pointer("/spec/replicas")
        .and_then(Value::as_u64)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_kubernetes_reads_them() {
        let q = |s: &str| quantity(&Value::from(s));
        assert_eq!(q("20Gi"), Some(20.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(q("500m"), Some(0.5));
        assert_eq!(q("8"), Some(8.0));
        assert_eq!(q("1.5G"), Some(1.5e9));
        assert_eq!(quantity(&Value::from(4)), Some(4.0));
        assert_eq!(q("1e3"), None);
        assert_eq!(q("lots"), None);
    }
}
