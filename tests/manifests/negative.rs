//! Every check can fail: a small hand-written install that passes them all,
//! and for each check at least one mutation of it that the check rejects.
//! Without these, a check that silently matched nothing would pass forever.

use crate::{
    checks::{self, Ctx, Violation},
    model::{Obj, parse_docs},
    render::{epp_help_flags, parse_help_flags},
};

/// A minimal GKE-shaped install: picker, pool, TPU model server, gateway,
/// route and GKE policies, all in namespace `ns`.
pub(crate) const VALID: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: epp, namespace: ns}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: epp, namespace: ns}
rules:
- {apiGroups: [""], resources: [pods], verbs: [get, list, watch]}
- {apiGroups: [inference.networking.k8s.io], resources: [inferencepools], verbs: [get, list, watch]}
- {apiGroups: [inference.networking.x-k8s.io], resources: [inferenceobjectives], verbs: [get, list, watch]}
- {apiGroups: [llm-d.ai], resources: [inferenceobjectives], verbs: [get, list, watch]}
- {apiGroups: [inference.networking.x-k8s.io, llm-d.ai], resources: [inferencemodelrewrites], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: epp, namespace: ns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: epp}
subjects: [{kind: ServiceAccount, name: epp, namespace: ns}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: epp-config, namespace: ns}
data:
  default.yaml: |
    apiVersion: inference.networking.x-k8s.io/v1alpha1
    kind: EndpointPickerConfig
    plugins:
    - type: queue-scorer
    - type: max-score-picker
    schedulingProfiles:
    - name: default
      plugins:
      - pluginRef: queue-scorer
      - pluginRef: max-score-picker
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: epp, namespace: ns}
spec:
  replicas: 1
  strategy: {type: Recreate}
  selector: {matchLabels: {app: epp}}
  template:
    metadata: {labels: {app: epp}}
    spec:
      serviceAccountName: epp
      terminationGracePeriodSeconds: 340
      securityContext: {runAsNonRoot: true}
      initContainers:
      - name: fetch-tokenizer
        image: registry.example/curl:8.0
        env: [{name: MODEL, value: m}]
        volumeMounts: [{name: tokenizers, mountPath: /var/lib/epp/tokenizers}]
      containers:
      - name: epp
        image: registry.example/epp:1.0
        args: [--pool-name, pool, --pool-namespace, $(NAMESPACE), --config-file, /config/default.yaml, --tokenizers-dir=/var/lib/epp/tokenizers, --kv-events, --shutdown-grace-period, 330s]
        env:
        - {name: NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        ports:
        - {name: grpc, containerPort: 9002}
        - {name: grpc-health, containerPort: 9003}
        - {name: metrics, containerPort: 9090}
        livenessProbe: {grpc: {port: 9003, service: liveness}}
        readinessProbe: {grpc: {port: 9003, service: readiness}}
        securityContext: {readOnlyRootFilesystem: true}
        volumeMounts:
        - {name: config, mountPath: /config}
        - {name: tokenizers, mountPath: /var/lib/epp/tokenizers, readOnly: true}
      volumes:
      - {name: config, configMap: {name: epp-config}}
      - {name: tokenizers, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: epp, namespace: ns, labels: {app: epp}}
spec:
  selector: {app: epp}
  ports:
  - {name: grpc-ext-proc, port: 9002, targetPort: grpc, appProtocol: http2}
  - {name: http-metrics, port: 9090, targetPort: metrics}
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: ns}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: epp, port: {number: 9002}, failureMode: FailOpen}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vllm, namespace: ns}
spec:
  replicas: 2
  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}
  selector: {matchLabels: {app: vllm}}
  template:
    metadata: {labels: {app: vllm}}
    spec:
      enableServiceLinks: false
      terminationGracePeriodSeconds: 340
      nodeSelector:
        cloud.google.com/gke-tpu-accelerator: tpu-v6e-slice
        cloud.google.com/gke-tpu-topology: "2x2"
      containers:
      - name: vllm
        image: vllm/vllm-tpu:v0.27.0
        command: [vllm, serve]
        args: [m, --port=8000, --tensor-parallel-size=4, --shutdown-timeout=300, --kv-events-config, '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv@$(POD_IP):8000@m"}']
        env:
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        - {name: HF_TOKEN, valueFrom: {secretKeyRef: {name: hf, key: token, optional: true}}}
        - {name: VLLM_XLA_CACHE_PATH, value: /cache/xla}
        ports: [{name: http, containerPort: 8000}, {name: kv-events, containerPort: 5557}, {name: kv-replay, containerPort: 5558}, {name: tpu-metrics, containerPort: 8431}]
        resources: {requests: {google.com/tpu: "4", cpu: "8", memory: 2Gi, ephemeral-storage: 10Gi}, limits: {google.com/tpu: "4"}}
        lifecycle: {preStop: {sleep: {seconds: 30}}}
        livenessProbe: {httpGet: {path: /health, port: http}}
        readinessProbe: {httpGet: {path: /health, port: http}}
        startupProbe: {httpGet: {path: /health, port: http}, periodSeconds: 10, failureThreshold: 180}
        volumeMounts: [{name: shm, mountPath: /dev/shm}, {name: cache, mountPath: /cache}]
      volumes: [{name: shm, emptyDir: {medium: Memory, sizeLimit: 1Gi}}, {name: cache, emptyDir: {sizeLimit: 10Gi}}]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: vllm, namespace: ns}
spec:
  maxUnavailable: 1
  selector: {matchLabels: {app: vllm}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: ns}
spec:
  gatewayClassName: gke-l7-regional-external-managed
  listeners: [{name: http, protocol: HTTP, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: route, namespace: ns}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: pool}]
---
apiVersion: networking.gke.io/v1
kind: HealthCheckPolicy
metadata: {name: pool, namespace: ns}
spec:
  targetRef: {group: inference.networking.k8s.io, kind: InferencePool, name: pool}
  default: {config: {type: HTTP, httpHealthCheck: {requestPath: /health, port: 8000}}}
---
apiVersion: networking.gke.io/v1
kind: GCPBackendPolicy
metadata: {name: pool, namespace: ns}
spec:
  targetRef: {group: inference.networking.k8s.io, kind: InferencePool, name: pool}
  default: {timeoutSec: 300, connectionDraining: {drainingTimeoutSec: 300}}
---
apiVersion: monitoring.googleapis.com/v1
kind: PodMonitoring
metadata: {name: vllm, namespace: ns}
spec:
  selector: {matchLabels: {app: vllm}}
  endpoints: [{port: http, path: /metrics}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: epp-metrics-auth}
rules:
- {apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}
- {apiGroups: [authorization.k8s.io], resources: [subjectaccessreviews], verbs: [create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: epp-metrics-auth}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: epp-metrics-auth}
subjects: [{kind: ServiceAccount, name: epp, namespace: ns}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: epp-metrics-reader}
rules:
- {nonResourceURLs: [/metrics], verbs: [get]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: metrics-reader, namespace: ns}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: epp-metrics-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: epp-metrics-reader}
subjects: [{kind: ServiceAccount, name: metrics-reader, namespace: ns}]
---
apiVersion: v1
kind: Secret
metadata: {name: metrics-reader, namespace: ns, annotations: {kubernetes.io/service-account.name: metrics-reader}}
type: kubernetes.io/service-account-token
---
apiVersion: monitoring.googleapis.com/v1
kind: PodMonitoring
metadata: {name: epp, namespace: ns}
spec:
  selector: {matchLabels: {app: epp}}
  endpoints:
  - {port: metrics, path: /metrics, authorization: {type: Bearer, credentials: {secret: {name: metrics-reader, key: token}}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: metrics-reader-secret, namespace: ns}
rules:
- {apiGroups: [""], resources: [secrets], resourceNames: [metrics-reader], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: metrics-reader-secret, namespace: ns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: metrics-reader-secret}
subjects:
- {kind: ServiceAccount, name: collector, namespace: gmp-system}
- {kind: ServiceAccount, name: collector, namespace: gke-gmp-system}
"#;

pub(crate) fn parse(text: &str) -> Vec<Obj> {
    parse_docs(text).expect("fixture parses")
}

/// VALID with the first occurrence of `from` replaced by `to`.
pub(crate) fn with(from: &str, to: &str) -> Vec<Obj> {
    assert!(VALID.contains(from), "the fixture has no {from:?}");
    parse(&VALID.replacen(from, to, 1))
}

/// VALID plus more documents.
pub(crate) fn plus(extra: &str) -> Vec<Obj> {
    parse(&format!("{VALID}\n---\n{extra}"))
}

pub(crate) fn run(objs: &[Obj], gke: bool) -> Vec<Violation> {
    checks::run_all(objs, &ctx(gke))
}

pub(crate) fn ctx(gke: bool) -> Ctx<'static> {
    Ctx {
        gke,
        epp_flags: epp_help_flags(),
        min_endpoints: 2,
    }
}

/// Asserts `check` reports a violation whose message contains `needle`.
#[track_caller]
pub(crate) fn rejects(objs: &[Obj], check: &str, needle: &str) {
    let found = run(objs, true);
    assert!(
        found
            .iter()
            .any(|v| v.check == check && v.msg.contains(needle)),
        "expected [{check}] ... {needle:?}; got:\n{}",
        found.iter().map(|v| format!("  {v}\n")).collect::<String>()
    );
}

#[test]
fn the_valid_fixture_passes_every_check() {
    let found = run(&parse(VALID), true);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn every_check_has_a_negative_case() {
    // A check added to checks::ALL without a mutation here could be a
    // no-op forever; the negative files' own text says which checks they
    // exercise.
    let source = [
        include_str!("negative.rs"),
        include_str!("negative_hardening.rs"),
        include_str!("negative_observability.rs"),
    ]
    .concat();
    for (check, _) in checks::ALL {
        assert!(
            source.contains(&format!("\"{check}\",")),
            "no negative case calls rejects(.., \"{check}\", ..)"
        );
    }
}

#[test]
fn help_flags_are_parsed_from_clap_output() {
    let help = "Options:\n  -h, --help\n          Print help\n      --pool-name <POOL_NAME>\n          Name\n\
                \x20     --secure-serving [<SECURE_SERVING>]\n  -v, --v [<VERBOSITY>]\n          Use --not-a-flag here\n";
    let flags = parse_help_flags(help);
    let want: std::collections::BTreeSet<String> = ["help", "pool-name", "secure-serving", "v"]
        .map(String::from)
        .into();
    assert_eq!(flags, want);
}

#[test]
fn rejects_objects_without_name_and_duplicates() {
    rejects(
        &with(
            "metadata: {name: epp, namespace: ns}\n---\napiVersion: rbac",
            "metadata: {namespace: ns}\n---\napiVersion: rbac",
        ),
        "well-formed",
        "no metadata.name",
    );
    rejects(
        &plus("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: epp, namespace: ns}"),
        "well-formed",
        "appears twice",
    );
}

#[test]
fn rejects_objects_outside_the_namespace() {
    rejects(
        &with(
            "metadata: {name: gw, namespace: ns}",
            "metadata: {name: gw}",
        ),
        "one-namespace",
        "Gateway/gw has no namespace",
    );
    rejects(
        &with(
            "subjects: [{kind: ServiceAccount, name: epp, namespace: ns}]",
            "subjects: [{kind: ServiceAccount, name: epp}]",
        ),
        "one-namespace",
        "binds ServiceAccount epp",
    );
}

#[test]
fn rejects_cluster_scoped_rbac() {
    rejects(
        &plus(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: metrics-reader}\nrules: []",
        ),
        "namespaced-install",
        "ClusterRole/metrics-reader grants more than /metrics authentication needs",
    );
}

#[test]
fn rejects_routes_to_missing_pools_or_services() {
    rejects(
        &with(
            "kind: InferencePool, name: pool}",
            "kind: InferencePool, name: nope}",
        ),
        "route-targets-pool",
        "names InferencePool nope",
    );
    rejects(
        &with(
            "backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: pool}]",
            "backendRefs: [{name: vllm, port: 8000}]",
        ),
        "route-targets-pool",
        "bypass the endpoint picker",
    );
    rejects(
        &with(
            "backendRefs: [{group: inference.networking.k8s.io,",
            "backendRefs: [{group: inference.networking.x-k8s.io,",
        ),
        "route-targets-pool",
        "not inference.networking.k8s.io",
    );
    rejects(
        &with("parentRefs: [{name: gw}]", "parentRefs: [{name: other}]"),
        "route-targets-pool",
        "not a Gateway of this install",
    );
}

#[test]
fn rejects_a_picker_ref_to_a_port_the_service_lacks() {
    rejects(
        &with("port: {number: 9002}", "port: {number: 9003}"),
        "pool-picker-ref",
        "port 9003 is not a port of Service epp",
    );
    rejects(
        &with(
            "endpointPickerRef: {name: epp,",
            "endpointPickerRef: {name: nope,",
        ),
        "pool-picker-ref",
        "names Service nope",
    );
    rejects(
        &with(", failureMode: FailOpen}", "}"),
        "pool-picker-ref",
        "failureMode",
    );
    rejects(
        &with(
            "targetPort: grpc, appProtocol: http2",
            "targetPort: metrics, appProtocol: http2",
        ),
        "pool-picker-ref",
        "not Deployment/epp container epp's ext_proc port",
    );
    rejects(
        &with(
            "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool",
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferencePool",
        ),
        "pool-picker-ref",
        "not inference.networking.k8s.io/v1",
    );
}

#[test]
fn rejects_a_pool_selector_that_matches_no_model_server() {
    rejects(
        &with(
            "selector: {matchLabels: {app: vllm}}\n  targetPorts",
            "selector: {matchLabels: {app: vlm}}\n  targetPorts",
        ),
        "pool-selects-model-server",
        "matches no pod template labels",
    );
    rejects(
        &with(
            "targetPorts: [{number: 8000}]",
            "targetPorts: [{number: 8001}]",
        ),
        "pool-selects-model-server",
        "target port 8001",
    );
}

#[test]
fn rejects_rbac_that_misses_what_the_picker_watches() {
    rejects(
        &with(
            "- {apiGroups: [inference.networking.x-k8s.io], resources: [inferenceobjectives], verbs: [get, list, watch]}",
            "",
        ),
        "epp-rbac",
        "list on inference.networking.x-k8s.io/inferenceobjectives",
    );
    rejects(
        &with(
            "- {apiGroups: [inference.networking.x-k8s.io, llm-d.ai], resources: [inferencemodelrewrites], verbs: [get, list, watch]}",
            "",
        ),
        "epp-rbac",
        "llm-d.ai/inferencemodelrewrites",
    );
    rejects(
        &with(
            "resources: [pods], verbs: [get, list, watch]",
            "resources: [pods], verbs: [get]",
        ),
        "epp-rbac",
        "watch on /pods",
    );
    rejects(
        &with("      serviceAccountName: epp\n", ""),
        "epp-rbac",
        "default ServiceAccount",
    );
}

#[test]
fn rejects_leases_without_leader_election_and_the_reverse() {
    let lease_rule = "- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, list, watch, create, update, patch]}\n";
    let role_end = "verbs: [get, list, watch]}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding";
    let role_end_lease = format!(
        "verbs: [get, list, watch]}}\n{lease_rule}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding"
    );
    rejects(
        &with(role_end, &role_end_lease),
        "epp-rbac",
        "grants leases but",
    );
    rejects(
        &with(
            "--shutdown-grace-period, 330s]",
            "--shutdown-grace-period, 330s, --ha-enable-leader-election]",
        ),
        "epp-rbac",
        "does not grant create on leases",
    );
}

#[test]
fn rejects_flags_epp_does_not_accept() {
    rejects(
        &with(
            "--shutdown-grace-period, 330s]",
            "--shutdown-grace-period, 330s, --no-such-flag]",
        ),
        "epp-flags",
        "--no-such-flag",
    );
    rejects(
        &with(
            "--shutdown-grace-period, 330s]",
            "--shutdown-grace-period, soon]",
        ),
        "epp-flags",
        "rejected by epp",
    );
}

#[test]
fn rejects_an_unsafe_picker_deployment() {
    rejects(
        &with(
            "--shutdown-grace-period, 330s]",
            "--shutdown-grace-period, 400s]",
        ),
        "epp-deployment",
        "not below terminationGracePeriodSeconds 340",
    );
    // Two active pickers without KV events: each indexes half the traffic.
    rejects(
        &parse(
            &VALID
                .replacen("replicas: 1\n  strategy", "replicas: 2\n  strategy", 1)
                .replacen("--kv-events, ", "", 1),
        ),
        "epp-deployment",
        "without --ha-enable-leader-election or --kv-events",
    );
    rejects(
        &with("service: liveness", "service: inference-extension"),
        "epp-deployment",
        "livenessProbe must be gRPC",
    );
    rejects(
        &with(
            "strategy: {type: Recreate}",
            "strategy: {type: RollingUpdate}",
        ),
        "epp-deployment",
        "Recreate",
    );
    rejects(
        &with(
            "securityContext: {readOnlyRootFilesystem: true}",
            "securityContext: {}",
        ),
        "epp-deployment",
        "readOnlyRootFilesystem",
    );
    rejects(
        &with(
            "- {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}",
            "",
        ),
        "epp-deployment",
        "POD_NAME",
    );
    rejects(
        &with("args: [--pool-name, pool,", "args: [--pool-name, other,"),
        "epp-deployment",
        "watches InferencePool other",
    );
}

#[test]
fn rejects_a_config_the_picker_cannot_build() {
    rejects(
        &with("- type: queue-scorer\n", "- type: no-such-scorer\n"),
        "epp-config",
        "does not build a scheduler",
    );
    rejects(
        &with(
            "    kind: EndpointPickerConfig",
            "    kind: SchedulerConfig",
        ),
        "epp-config",
        "does not parse",
    );
    rejects(
        &with(
            "--config-file, /config/default.yaml",
            "--config-file, /config/other.yaml",
        ),
        "epp-config",
        "no key other.yaml",
    );
    rejects(
        &with(
            "--config-file, /config/default.yaml",
            "--config-file, /etc/epp.yaml",
        ),
        "epp-config",
        "not under any volumeMount",
    );
}

#[test]
fn rejects_monitors_that_scrape_nothing() {
    rejects(
        &with(
            "endpoints: [{port: http, path: /metrics}]",
            "endpoints: [{port: metricz, path: /metrics}]",
        ),
        "monitors-resolve",
        "port \"metricz\"",
    );
    rejects(
        &plus(
            "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: epp, namespace: ns}\nspec:\n  selector: {matchLabels: {app: nope}}\n  endpoints: [{port: http-metrics}]",
        ),
        "monitors-resolve",
        "selects no Service",
    );
}

#[test]
fn rejects_unpinned_images() {
    rejects(
        &with(
            "image: vllm/vllm-tpu:v0.27.0",
            "image: vllm/vllm-tpu:latest",
        ),
        "images-pinned",
        "not pinned",
    );
    rejects(
        &with("image: registry.example/epp:1.0", "image: epp"),
        "images-pinned",
        "has no tag",
    );
}

#[test]
fn rejects_committed_secrets() {
    rejects(
        &plus(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: hf-token, namespace: ns}\nstringData: {token: hf_x}",
        ),
        "no-committed-secrets",
        "Secret/hf-token",
    );
}

#[test]
fn rejects_a_tpu_server_that_does_not_fit_v6e_2x2() {
    rejects(
        &with("--tensor-parallel-size=4", "--tensor-parallel-size=8"),
        "tpu-model-server",
        "--tensor-parallel-size Some(8)",
    );
    rejects(
        &with("failureThreshold: 180", "failureThreshold: 60"),
        "tpu-model-server",
        "startupProbe allows 600 s",
    );
    rejects(
        &with(
            "limits: {google.com/tpu: \"4\"}",
            "limits: {google.com/tpu: \"8\"}",
        ),
        "tpu-model-server",
        "requests Some(\"4\") != limits",
    );
    rejects(
        &with(
            "{name: shm, emptyDir: {medium: Memory, sizeLimit: 1Gi}}",
            "{name: shm, emptyDir: {sizeLimit: 1Gi}}",
        ),
        "tpu-model-server",
        "/dev/shm",
    );
    rejects(
        &with("key: token, optional: true}", "key: token}"),
        "tpu-model-server",
        "optional: true",
    );
    rejects(
        &with("value: /cache/xla}", "value: /var/xla}"),
        "tpu-model-server",
        "VLLM_XLA_CACHE_PATH",
    );
    rejects(
        &with("gke-tpu-topology: \"2x2\"", "gke-tpu-topology: \"2x4\""),
        "tpu-model-server",
        "expected one of [\"1x1\", \"2x2\"]",
    );
}

#[test]
fn pitfall_rejects_global_gateway_classes() {
    rejects(
        &with(
            "gatewayClassName: gke-l7-regional-external-managed",
            "gatewayClassName: gke-l7-global-external-managed",
        ),
        "pitfall:regional-gateway-class",
        "only regional GKE classes",
    );
    rejects(
        &with(
            "gatewayClassName: gke-l7-regional-external-managed",
            "gatewayClassName: istio",
        ),
        "pitfall:regional-gateway-class",
        "\"istio\"",
    );
    // Outside GKE, an implementation with InferencePool support is fine.
    let objs = with(
        "gatewayClassName: gke-l7-regional-external-managed",
        "gatewayClassName: istio",
    );
    let found = checks::pitfall_regional_gateway_class(&objs, &ctx(false));
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn pitfall_rejects_httproute_timeouts() {
    rejects(
        &with(
            "  - matches: [{path: {type: PathPrefix, value: /}}]",
            "  - timeouts: {request: 300s}\n    matches: [{path: {type: PathPrefix, value: /}}]",
        ),
        "pitfall:httproute-timeouts",
        "GKE does not support HTTPRoute timeouts",
    );
}

#[test]
fn pitfall_rejects_health_checks_off_health() {
    rejects(
        &with("requestPath: /health", "requestPath: /"),
        "pitfall:health-check-path",
        "GCP health checks must use /health",
    );
    rejects(
        &with(
            "apiVersion: networking.gke.io/v1\nkind: HealthCheckPolicy",
            "apiVersion: networking.gke.io/v1\nkind: HealthCheckPolicyX",
        ),
        "pitfall:health-check-path",
        "0 HealthCheckPolicies",
    );
    rejects(
        &with(
            "httpHealthCheck: {requestPath: /health, port: 8000}",
            "httpHealthCheck: {requestPath: /health, port: 9000}",
        ),
        "pitfall:health-check-path",
        "got type Some(\"HTTP\"), path Some(\"/health\"), port Some(9000)",
    );
    rejects(
        &with(
            "livenessProbe: {httpGet: {path: /health, port: http}}",
            "livenessProbe: {httpGet: {path: /, port: http}}",
        ),
        "pitfall:health-check-path",
        "livenessProbe asks /",
    );
}

#[test]
fn pitfall_rejects_the_default_backend_timeout() {
    rejects(
        &with("default: {timeoutSec: 300,", "default: {timeoutSec: 30,"),
        "pitfall:backend-timeout",
        "timeoutSec >= 300",
    );
}

#[test]
fn pitfall_rejects_https_toward_the_model_server() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: vllm, namespace: ns}\nspec:\n  selector: {app: vllm}\n  ports: [{name: http, port: 8000, appProtocol: https}]";
    rejects(
        &plus(svc),
        "pitfall:plain-http-backend",
        "appProtocol \"https\"",
    );
    let annotated = "apiVersion: v1\nkind: Service\nmetadata:\n  name: vllm\n  namespace: ns\n  annotations: {cloud.google.com/app-protocols: '{\"http\":\"HTTPS\"}'}\nspec:\n  selector: {app: vllm}\n  ports: [{name: http, port: 8000}]";
    rejects(
        &plus(annotated),
        "pitfall:plain-http-backend",
        "cloud.google.com/app-protocols",
    );
    rejects(
        &with(
            "ports: [{name: http, containerPort: 8000},",
            "ports: [{name: https, containerPort: 8000},",
        ),
        "pitfall:plain-http-backend",
        "port name \"https\"",
    );
    rejects(
        &with(
            "targetPorts: [{number: 8000}]",
            "targetPorts: [{number: 8000}]\n  appProtocol: kubernetes.io/h2c",
        ),
        "pitfall:plain-http-backend",
        "appProtocol is \"kubernetes.io/h2c\"",
    );
    rejects(
        &with(
            "args: [m, --port=8000,",
            "args: [m, --ssl-keyfile=/k, --port=8000,",
        ),
        "pitfall:plain-http-backend",
        "--ssl-keyfile",
    );
    rejects(
        &with("config: {type: HTTP,", "config: {type: HTTPS,"),
        "pitfall:plain-http-backend",
        "health checks with HTTPS",
    );
}

#[test]
fn pitfall_rejects_a_shipped_gateway_class() {
    rejects(
        &plus(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mine}\nspec: {controllerName: example.com/gw}",
        ),
        "pitfall:gateway-class-shipped",
        "GatewayClass/mine",
    );
}

#[test]
fn pitfall_rejects_routes_that_leave_bodiless_requests_unrouted() {
    rejects(
        &with(
            "matches: [{path: {type: PathPrefix, value: /}}]",
            "matches: [{path: {type: PathPrefix, value: /v1/c}}]",
        ),
        "pitfall:bodiless-requests",
        "GET /v1/models",
    );
    rejects(
        &with(
            "matches: [{path: {type: PathPrefix, value: /}}]",
            "matches: [{method: POST, path: {type: PathPrefix, value: /}}]",
        ),
        "pitfall:bodiless-requests",
        "GET /health",
    );
}

#[test]
fn pitfall_rejects_kinds_gke_has_no_crd_for() {
    let pm = "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: vllm2, namespace: ns}\nspec:\n  selector: {matchLabels: {app: vllm}}\n  podMetricsEndpoints: [{port: http}]";
    rejects(&plus(pm), "pitfall:crds-absent-on-gke", "PodMonitor/vllm2");
}
