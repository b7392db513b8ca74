//! Checks of what the picker exposes about itself: /metrics authentication
//! (`--metrics-endpoint-auth`: the picker's reviews, the scrapers' token)
//! and the admin API's port (localhost only).

use serde_json::Value;

use crate::{
    checks::{Ctx, Out, Violation},
    epp::{EppContainer, epp_containers},
    hardening::GMP_NAMESPACES,
    model::{
        Obj, Workload, arr_at, find, id, kind, map_at, match_labels, namespace, of_kind, str_at,
    },
};

/// The rules /metrics authentication needs, and nothing else may be granted
/// cluster-wide: the picker's two reviews, the scrapers' `get /metrics`.
fn is_metrics_auth_rule(r: &Value) -> bool {
    let list = |f: &str| -> Vec<&str> { arr_at(r, f).iter().filter_map(Value::as_str).collect() };
    let (groups, resources, verbs, urls) = (
        list("/apiGroups"),
        list("/resources"),
        list("/verbs"),
        list("/nonResourceURLs"),
    );
    if !urls.is_empty() {
        return urls == ["/metrics"]
            && verbs == ["get"]
            && groups.is_empty()
            && resources.is_empty();
    }
    verbs == ["create"]
        && ((groups == ["authentication.k8s.io"] && resources == ["tokenreviews"])
            || (groups == ["authorization.k8s.io"] && resources == ["subjectaccessreviews"]))
}

/// A ClusterRole of /metrics authentication (only such rules).
pub fn is_metrics_auth_role(role: &Obj) -> bool {
    kind(role) == "ClusterRole"
        && !arr_at(role, "/rules").is_empty()
        && arr_at(role, "/rules").iter().all(is_metrics_auth_rule)
}

/// Whether `e` checks /metrics tokens with the Kubernetes API: auth on
/// (the default), no token file, Kubernetes discovery.
pub fn kube_metrics_auth(e: &EppContainer<'_>) -> bool {
    e.flags().is_ok_and(|f| {
        f.metrics_endpoint_auth && f.metrics_auth_token_file.is_none() && f.endpoints_file.is_none()
    })
}

/// The cluster-wide rules bound to ServiceAccount `sa` of `ns`.
fn cluster_rules<'a>(objs: &'a [Obj], sa: &str, ns: Option<&str>) -> Vec<&'a Value> {
    of_kind(objs, "ClusterRoleBinding")
        .filter(|b| {
            arr_at(b, "/subjects").iter().any(|s| {
                str_at(s, "/kind") == Some("ServiceAccount")
                    && str_at(s, "/name") == Some(sa)
                    && str_at(s, "/namespace") == ns
            })
        })
        .filter(|b| str_at(b, "/roleRef/kind") == Some("ClusterRole"))
        .filter_map(|b| {
            find(
                objs,
                "ClusterRole",
                str_at(b, "/roleRef/name").unwrap_or(""),
                None,
            )
        })
        .flat_map(|r| arr_at(r, "/rules"))
        .collect()
}

fn grants(rules: &[&Value], field: &str, group: Option<&str>, what: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        let has = |f: &str, want: &str| {
            arr_at(r, f)
                .iter()
                .any(|v| v.as_str().is_some_and(|v| v == want || v == "*"))
        };
        has(field, what) && has("/verbs", verb) && group.is_none_or(|g| has("/apiGroups", g))
    })
}

/// The monitors that scrape `picker`'s pods (directly or through a
/// Service).
fn monitors_of<'a>(objs: &'a [Obj], picker: &Workload<'_>) -> Vec<&'a Obj> {
    objs.iter()
        .filter(|m| namespace(m) == picker.namespace())
        .filter(|m| match kind(m) {
            "PodMonitoring" | "PodMonitor" => m
                .pointer("/spec/selector")
                .and_then(match_labels)
                .is_some_and(|s| picker.selected_by(s)),
            "ServiceMonitor" => {
                let Some(sel) = m.pointer("/spec/selector").and_then(match_labels) else {
                    return false;
                };
                of_kind(objs, "Service")
                    .filter(|s| namespace(s) == namespace(m))
                    .filter(|s| {
                        map_at(s, "/metadata/labels")
                            .is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v)))
                    })
                    .any(|s| {
                        s.pointer("/spec/selector")
                            .and_then(Value::as_object)
                            .is_some_and(|ps| picker.selected_by(ps))
                    })
            }
            _ => false,
        })
        .collect()
}

/// The Secret name an endpoint's bearer token comes from, if it sends one.
fn token_secret<'a>(monitor: &Obj, ep: &'a Value) -> Option<&'a str> {
    let auth = ep.get("authorization")?;
    if str_at(auth, "/type").is_some_and(|t| !t.eq_ignore_ascii_case("bearer")) {
        return None;
    }
    match kind(monitor) {
        "PodMonitoring" => str_at(auth, "/credentials/secret/name"),
        _ => str_at(auth, "/credentials/name"),
    }
}

/// Pickers that check tokens with the Kubernetes API may create
/// TokenReviews and SubjectAccessReviews; every monitor scraping them sends
/// a ServiceAccount token (from a token Secret of the install) whose
/// account may `get /metrics`; Managed Prometheus may read that Secret.
pub fn metrics_auth(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("metrics-auth");
    for e in epp_containers(objs).iter().filter(|e| kube_metrics_auth(e)) {
        let ns = e.workload.namespace();
        let who = e.name();
        let sa = str_at(e.workload.pod_spec(), "/serviceAccountName").unwrap_or("default");
        let rules = cluster_rules(objs, sa, ns);
        for (group, resource) in [
            ("authentication.k8s.io", "tokenreviews"),
            ("authorization.k8s.io", "subjectaccessreviews"),
        ] {
            if !grants(&rules, "/resources", Some(group), resource, "create") {
                out.push(format!(
                    "{who} checks /metrics tokens (--metrics-endpoint-auth) but no ClusterRoleBinding lets {sa} create {group}/{resource}: every scrape would get 503"
                ));
            }
        }
        for m in monitors_of(objs, &e.workload) {
            let endpoints = match kind(m) {
                "PodMonitor" => arr_at(m, "/spec/podMetricsEndpoints"),
                _ => arr_at(m, "/spec/endpoints"),
            };
            for ep in endpoints {
                let Some(secret) = token_secret(m, ep) else {
                    out.push(format!(
                        "{} scrapes {who} without a bearer token; /metrics answers 401 (send a metrics-reader token, or run with --metrics-endpoint-auth=false)",
                        id(m)
                    ));
                    continue;
                };
                let Some(s) = find(objs, "Secret", secret, ns) else {
                    out.push(format!(
                        "{} sends the token of Secret {secret}, which is not in the output",
                        id(m)
                    ));
                    continue;
                };
                let reader = str_at(
                    s,
                    "/metadata/annotations/kubernetes.io~1service-account.name",
                );
                let allowed = str_at(s, "/type") == Some("kubernetes.io/service-account-token")
                    && reader.is_some_and(|r| {
                        grants(
                            &cluster_rules(objs, r, ns),
                            "/nonResourceURLs",
                            None,
                            "/metrics",
                            "get",
                        )
                    });
                if !allowed {
                    out.push(format!(
                        "{} sends the token of Secret {secret}, whose ServiceAccount ({reader:?}) no ClusterRole lets get /metrics: 403",
                        id(m)
                    ));
                }
                if kind(m) == "PodMonitoring" && !gmp_reads_secret(objs, secret, ns) {
                    out.push(format!(
                        "Managed Prometheus' collectors ({GMP_NAMESPACES:?}) may not read Secret {secret} that {} names",
                        id(m)
                    ));
                }
            }
        }
    }
    out.done()
}

/// A RoleBinding of `ns` lets the GMP collectors get `secret`.
fn gmp_reads_secret(objs: &[Obj], secret: &str, ns: Option<&str>) -> bool {
    let subjects_ok = |b: &Obj| {
        GMP_NAMESPACES.iter().all(|g| {
            arr_at(b, "/subjects").iter().any(|s| {
                str_at(s, "/kind") == Some("ServiceAccount")
                    && str_at(s, "/name") == Some("collector")
                    && str_at(s, "/namespace") == Some(g)
            })
        })
    };
    of_kind(objs, "RoleBinding")
        .filter(|b| namespace(b) == ns && subjects_ok(b))
        .filter(|b| str_at(b, "/roleRef/kind") == Some("Role"))
        .filter_map(|b| find(objs, "Role", str_at(b, "/roleRef/name").unwrap_or(""), ns))
        .flat_map(|r| arr_at(r, "/rules"))
        .any(|r| {
            let names = arr_at(r, "/resourceNames");
            arr_at(r, "/resources").iter().any(|v| v == "secrets")
                && arr_at(r, "/verbs").iter().any(|v| v == "get")
                && (names.is_empty() || names.iter().any(|n| n == secret))
        })
}

/// The admin API stays on localhost (`--admin-address`, 127.0.0.1 by
/// default): it shows pod addresses and scores to whoever connects, so it
/// is reached with `kubectl port-forward` and never published as a
/// container port.
pub fn admin_port(objs: &[Obj], _: &Ctx<'_>) -> Vec<Violation> {
    let mut out = Out::new("admin-port");
    for e in epp_containers(objs) {
        let Ok(f) = e.flags() else { continue };
        if !f.admin_address.is_loopback() {
            out.push(format!(
                "{} serves the admin API (ListEndpoints, Explain) on {}: keep --admin-address on localhost and use kubectl port-forward",
                e.name(),
                f.admin_address
            ));
        }
        for p in arr_at(e.container, "/ports") {
            if p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(f.admin_port)) {
                out.push(format!(
                    "{} declares the admin port {} as a container port; it listens on localhost only and must not be published",
                    e.name(),
                    f.admin_port
                ));
            }
        }
    }
    out.done()
}

/// Cluster-scoped objects this install may hold: the Namespace, a
/// GatewayClass, and the ClusterRoles (with their bindings) of /metrics
/// authentication, those only while some picker checks tokens with the
/// Kubernetes API. Err says why `o` may not be here.
pub fn allowed_cluster_scoped(objs: &[Obj], o: &Obj) -> Result<(), String> {
    let auth_role = |n: &str| find(objs, "ClusterRole", n, None).is_some_and(is_metrics_auth_role);
    let is_auth = match kind(o) {
        "Namespace" | "GatewayClass" => return Ok(()),
        "ClusterRole" => {
            if !is_metrics_auth_role(o) {
                return Err(format!(
                    "{} grants more than /metrics authentication needs; the install must stay namespaced",
                    id(o)
                ));
            }
            true
        }
        "ClusterRoleBinding" => auth_role(str_at(o, "/roleRef/name").unwrap_or("")),
        _ => false,
    };
    if !is_auth {
        return Err(format!(
            "{} is cluster-scoped; the install must stay namespaced",
            id(o)
        ));
    }
    if !epp_containers(objs).iter().any(kube_metrics_auth) {
        return Err(format!(
            "{} is for /metrics authentication, which no picker here checks with the Kubernetes API (least privilege)",
            id(o)
        ));
    }
    Ok(())
}

/// A Secret the install may hold: a ServiceAccount token Secret without
/// data (the token controller fills it in) for a ServiceAccount of the
/// install.
pub fn is_token_request(objs: &[Obj], s: &Obj) -> bool {
    str_at(s, "/type") == Some("kubernetes.io/service-account-token")
        && s.get("data")
            .is_none_or(|d| d.as_object().is_none_or(|m| m.is_empty()))
        && s.get("stringData").is_none()
        && str_at(
            s,
            "/metadata/annotations/kubernetes.io~1service-account.name",
        )
        .is_some_and(|sa| find(objs, "ServiceAccount", sa, namespace(s)).is_some())
}

/// Whether a RoleBinding subject outside the install's namespace is Managed
/// Prometheus' collector (which reads the metrics token Secret).
pub fn is_gmp_collector(subject: &Value) -> bool {
    str_at(subject, "/name") == Some("collector")
        && str_at(subject, "/namespace").is_some_and(|n| GMP_NAMESPACES.contains(&n))
}
