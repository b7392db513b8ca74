//! Negative cases for the checks in hardening.rs (and the TPU and RBAC
//! additions to checks.rs), on the same hand-written install as negative.rs:
//! each mutation must be rejected by the check it targets.

use crate::{
    checks,
    negative::{VALID, ctx, parse, plus, rejects, run, with},
};

// ------------------------------------------------------------ TPU server

#[test]
fn rejects_a_tpu_server_that_surges_or_is_best_effort() {
    rejects(
        &with(
            "strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}",
            "strategy: {type: RollingUpdate}",
        ),
        "tpu-model-server",
        "maxSurge None",
    );
    rejects(
        &with(
            "{google.com/tpu: \"4\", cpu: \"8\", memory: 2Gi, ephemeral-storage: 10Gi}",
            "{google.com/tpu: \"4\"}",
        ),
        "tpu-model-server",
        "requests cpu None",
    );
    rejects(
        &with("memory: 2Gi, ephemeral", "memory: 512Mi, ephemeral"),
        "tpu-model-server",
        "requests memory",
    );
    rejects(
        &with("ephemeral-storage: 10Gi}", "ephemeral-storage: 1Gi}"),
        "tpu-model-server",
        "requests ephemeral-storage",
    );
    rejects(
        &with(", {name: tpu-metrics, containerPort: 8431}]", "]"),
        "tpu-model-server",
        "containerPort 8431",
    );
}

#[test]
fn accepts_a_one_chip_server() {
    let objs = parse(
        &VALID
            .replacen("gke-tpu-topology: \"2x2\"", "gke-tpu-topology: \"1x1\"", 1)
            .replacen("--tensor-parallel-size=4", "--tensor-parallel-size=1", 1)
            .replace("google.com/tpu: \"4\"", "google.com/tpu: \"1\""),
    );
    let found = run(&objs, true);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn rejects_rbac_without_the_llm_d_objectives() {
    rejects(
        &with(
            "- {apiGroups: [llm-d.ai], resources: [inferenceobjectives], verbs: [get, list, watch]}\n",
            "",
        ),
        "epp-rbac",
        "llm-d.ai/inferenceobjectives",
    );
}

// -------------------------------------------------------- several pods

#[test]
fn rejects_a_pool_with_a_single_server() {
    rejects(
        &with("replicas: 2\n  strategy", "replicas: 1\n  strategy"),
        "pool-has-choice",
        "selects 1 model-server pod(s)",
    );
    // An install that is one server on purpose says so.
    let one = with("replicas: 2\n  strategy", "replicas: 1\n  strategy");
    let found = checks::run_all(
        &one,
        &checks::Ctx {
            min_endpoints: 1,
            ..ctx(true)
        },
    );
    assert!(
        found.iter().all(|v| v.check != "pool-has-choice"),
        "{found:#?}"
    );
}

#[test]
fn rejects_service_links_on_the_model_server() {
    rejects(
        &with("      enableServiceLinks: false\n", ""),
        "no-service-links",
        "enableServiceLinks: false",
    );
}

// ------------------------------------------------------------ KV events

#[test]
fn rejects_kv_events_a_subscriber_cannot_use() {
    rejects(
        &with(
            "\"publisher\":\"zmq\",",
            "\"publisher\":\"zmq\",\"buffer\":5,",
        ),
        "kv-events",
        "key \"buffer\"",
    );
    rejects(
        &with(
            "\"endpoint\":\"tcp://*:5557\"",
            "\"endpoint\":\"tcp://*:5559\"",
        ),
        "kv-events",
        "named kv-events",
    );
    rejects(
        &with(
            "\"endpoint\":\"tcp://*:5557\"",
            "\"endpoint\":\"tcp://10.0.0.1:5557\"",
        ),
        "kv-events",
        "must bind tcp://*:<port>",
    );
    rejects(
        &with("\"replay_endpoint\":\"tcp://*:5558\",", ""),
        "kv-events",
        "named kv-replay",
    );
    rejects(
        &with("\"topic\":\"kv@$(POD_IP):8000@m\"", "\"topic\":\"kv\""),
        "kv-events",
        "topic \"kv\"",
    );
    rejects(
        &with(
            "\"enable_kv_cache_events\":true",
            "\"enable_kv_cache_events\":false",
        ),
        "kv-events",
        "enable_kv_cache_events: true",
    );
    rejects(
        &with("\"publisher\":\"zmq\"", "\"publisher\":\"null\""),
        "kv-events",
        "publisher must be \"zmq\"",
    );
    rejects(
        &with(
            "        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}\n",
            "",
        ),
        "kv-events",
        "no POD_IP env",
    );
    rejects(
        &with(
            "'{\"enable_kv_cache_events\"",
            "'{{\"enable_kv_cache_events\"",
        ),
        "kv-events",
        "is not JSON",
    );
    rejects(
        &with(", --kv-events-config, '{", ", --no-kv-events, '{"),
        "kv-events",
        "without --kv-events-config",
    );
}

// ------------------------------------------------------ picker Service

#[test]
fn rejects_a_picker_service_protocol_the_picker_does_not_speak() {
    rejects(
        &with(
            "targetPort: grpc, appProtocol: http2}",
            "targetPort: grpc, appProtocol: kubernetes.io/h2c}",
        ),
        "epp-service-protocol",
        "appProtocol Some(\"kubernetes.io/h2c\"); it must be HTTP2",
    );
    rejects(
        &with("targetPort: grpc, appProtocol: http2}", "targetPort: grpc}"),
        "epp-service-protocol",
        "appProtocol None",
    );
    rejects(
        &with(
            "targetPort: grpc, appProtocol: http2}",
            "targetPort: grpc, appProtocol: https}",
        ),
        "epp-service-protocol",
        "appProtocol Some(\"https\")",
    );
    rejects(
        &with(
            "--shutdown-grace-period, 330s]",
            "--shutdown-grace-period, 330s, --secure-serving=false]",
        ),
        "epp-service-protocol",
        "must be kubernetes.io/h2c",
    );
}

// --------------------------------------------------------- drain budget

#[test]
fn rejects_a_drain_chain_that_cuts_streams() {
    rejects(
        &with(
            "connectionDraining: {drainingTimeoutSec: 300}",
            "connectionDraining: {drainingTimeoutSec: 60}",
        ),
        "drain-budget",
        "drainingTimeoutSec 60 is below timeoutSec 300",
    );
    rejects(
        &with(
            "default: {timeoutSec: 300, connectionDraining: {drainingTimeoutSec: 300}}",
            "default: {timeoutSec: 300}",
        ),
        "drain-budget",
        "drainingTimeoutSec 0",
    );
    rejects(
        &with("--shutdown-timeout=300", "--shutdown-timeout=60"),
        "drain-budget",
        "less than the 300 s the load balancer drains it",
    );
    rejects(
        &with(
            "      enableServiceLinks: false\n      terminationGracePeriodSeconds: 340",
            "      enableServiceLinks: false\n      terminationGracePeriodSeconds: 130",
        ),
        "drain-budget",
        "the kubelet kills it mid-drain",
    );
    rejects(
        &with(
            "      serviceAccountName: epp\n      terminationGracePeriodSeconds: 340",
            "      serviceAccountName: epp\n      terminationGracePeriodSeconds: 130",
        ),
        "drain-budget",
        "below the model servers' 340",
    );
}

// -------------------------------------------------- disruption budgets

#[test]
fn rejects_disruption_budgets_that_stall_drains_or_are_missing() {
    rejects(
        &with(
            "spec:\n  maxUnavailable: 1\n",
            "spec:\n  maxUnavailable: 0\n",
        ),
        "disruption-budgets",
        "allows no eviction",
    );
    rejects(
        &with("spec:\n  maxUnavailable: 1\n", "spec:\n  minAvailable: 2\n"),
        "disruption-budgets",
        "allows no eviction",
    );
    rejects(
        &with(
            "  maxUnavailable: 1\n  selector: {matchLabels: {app: vllm}}",
            "  maxUnavailable: 1\n  selector: {matchLabels: {app: vlm}}",
        ),
        "disruption-budgets",
        "selects no pods",
    );
    rejects(
        &with(
            "kind: PodDisruptionBudget\nmetadata: {name: vllm, namespace: ns}",
            "kind: PodDisruptionBudgetX\nmetadata: {name: vllm, namespace: ns}",
        ),
        "disruption-budgets",
        "no PodDisruptionBudget",
    );
    let ha = VALID
        .replacen("replicas: 1\n  strategy", "replicas: 2\n  strategy", 1)
        .replacen(
            "--shutdown-grace-period, 330s]",
            "--shutdown-grace-period, 330s, --ha-enable-leader-election]",
            1,
        );
    let pdb = "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: epp, namespace: ns}\nspec:\n  maxUnavailable: 1\n  selector: {matchLabels: {app: epp}}";
    rejects(
        &parse(&format!("{ha}\n---\n{pdb}")),
        "disruption-budgets",
        "only the leader is Ready",
    );
}

// ----------------------------------------------------- network policies

/// The shape of components/gke-network-policy, for the fixture's labels.
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: epp, namespace: ns}
spec:
  podSelector: {matchLabels: {app: epp}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 192.168.0.0/23}}, {ipBlock: {cidr: 35.191.0.0/16}}, {ipBlock: {cidr: 130.211.0.0/22}}]
    ports: [{port: grpc, protocol: TCP}, {port: grpc-health, protocol: TCP}]
  - from:
    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [gmp-system, gke-gmp-system]}]}
      podSelector: {matchLabels: {app.kubernetes.io/name: collector}}
    ports: [{port: metrics, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: vllm, namespace: ns}
spec:
  podSelector: {matchLabels: {app: vllm}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 192.168.0.0/23}}, {ipBlock: {cidr: 35.191.0.0/16}}, {ipBlock: {cidr: 130.211.0.0/22}}]
    ports: [{port: http, protocol: TCP}]
  - from: [{podSelector: {matchLabels: {app: epp}}}]
    ports: [{port: http, protocol: TCP}, {port: kv-events, protocol: TCP}, {port: kv-replay, protocol: TCP}]
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]
    ports: [{port: tpu-metrics, protocol: TCP}]
"#;

fn with_policies(from: &str, to: &str) -> Vec<crate::model::Obj> {
    assert!(POLICIES.contains(from), "the policies have no {from:?}");
    plus(&POLICIES.replacen(from, to, 1))
}

#[test]
fn accepts_the_network_policies() {
    let found = run(&plus(POLICIES), true);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn rejects_network_policies_that_open_too_much_or_too_little() {
    rejects(
        &with_policies(
            "  - from: [{podSelector: {matchLabels: {app: epp}}}]\n    ports",
            "  - ports",
        ),
        "network-policies",
        "has no `from`",
    );
    rejects(
        &with_policies(
            "    ports: [{port: tpu-metrics, protocol: TCP}]",
            "    ports: []",
        ),
        "network-policies",
        "has no `ports`",
    );
    rejects(
        &with_policies(
            "{ipBlock: {cidr: 35.191.0.0/16}}",
            "{ipBlock: {cidr: 0.0.0.0/0}}",
        ),
        "network-policies",
        "admits 0.0.0.0/0",
    );
    rejects(
        &with_policies(
            "[{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]",
            "[{namespaceSelector: {}}]",
        ),
        "network-policies",
        "admits every namespace",
    );
    rejects(
        &with_policies(
            "ports: [{port: grpc, protocol: TCP}, {port: grpc-health, protocol: TCP}]",
            "ports: [{port: grpc, protocol: TCP}]\n  - from: [{podSelector: {}}]\n    ports: [{port: grpc-health, protocol: TCP}]",
        ),
        "network-policies",
        "plaintext health port to pods",
    );
    rejects(
        &with_policies(
            "{port: kv-events, protocol: TCP}, {port: kv-replay, protocol: TCP}]",
            "{port: kv-replay, protocol: TCP}]\n  - from: [{ipBlock: {cidr: 35.191.0.0/16}}]\n    ports: [{port: kv-events, protocol: TCP}]",
        ),
        "network-policies",
        "only the picker, to Deployment/vllm's kv-events",
    );
    rejects(
        &with_policies(
            "app.kubernetes.io/name: collector}}\n    ports: [{port: metrics",
            "app.kubernetes.io/name: prometheus}}\n    ports: [{port: metrics",
        ),
        "network-policies",
        "Managed Prometheus' collectors",
    );
    rejects(
        &with_policies(
            "ports: [{port: grpc, protocol: TCP}, {port: grpc-health",
            "ports: [{port: grpcs, protocol: TCP}, {port: grpc-health",
        ),
        "network-policies",
        "port \"grpcs\" is not a container port",
    );
    rejects(
        &with_policies(
            "    ports: [{port: http, protocol: TCP}]\n  - from: [{podSelector",
            "    ports: [{port: metrics, protocol: TCP}]\n  - from: [{podSelector",
        ),
        "network-policies",
        "serving port must admit the load balancer",
    );
    let two_ranges = POLICIES.replacen("192.168.0.0/23", "10.200.0.0/23", 1);
    rejects(
        &plus(&two_ranges),
        "network-policies",
        "several proxy-only ranges",
    );
}

// ----------------------------------------------------- picker tokenizer

#[test]
fn rejects_tokenizer_files_for_another_model_or_writable() {
    rejects(
        &with(
            "env: [{name: MODEL, value: m}]",
            "env: [{name: MODEL, value: other}]",
        ),
        "picker-tokenizer",
        "fetches the tokenizer of Some(\"other\")",
    );
    rejects(
        &with(
            "mountPath: /var/lib/epp/tokenizers, readOnly: true}",
            "mountPath: /var/lib/epp/tokenizers}",
        ),
        "picker-tokenizer",
        "read-only",
    );
    rejects(
        &with(
            "        volumeMounts: [{name: tokenizers, mountPath: /var/lib/epp/tokenizers}]\n",
            "",
        ),
        "picker-tokenizer",
        "no init container",
    );
    rejects(
        &with(
            "        - {name: tokenizers, mountPath: /var/lib/epp/tokenizers, readOnly: true}\n",
            "",
        ),
        "picker-tokenizer",
        "does not mount the tokenizer files",
    );
    rejects(
        &with(
            "      - {name: tokenizers, emptyDir: {}}",
            "      - {name: tokenizers, configMap: {name: tok}}",
        ),
        "picker-tokenizer",
        "is not an emptyDir",
    );
}

#[test]
fn rejects_tokenizer_files_the_picker_does_not_read() {
    rejects(
        &with("--tokenizers-dir=/var/lib/epp/tokenizers, ", ""),
        "picker-tokenizer",
        "is not run with --tokenizers-dir",
    );
    rejects(
        &with(
            "--tokenizers-dir=/var/lib/epp/tokenizers, ",
            "--tokenizers-dir=/tmp/elsewhere, ",
        ),
        "picker-tokenizer",
        "is not run with --tokenizers-dir",
    );
    rejects(
        &with("--kv-events, ", ""),
        "picker-tokenizer",
        "not --kv-events",
    );
}

// ------------------------------------------------------------ objectives

#[test]
fn rejects_objectives_that_name_no_pool() {
    let x_k8s = "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata: {name: o, namespace: ns}\nspec:\n  priority: 1\n  poolRef: {group: inference.networking.k8s.io, name: pool}";
    let llm_d = "apiVersion: llm-d.ai/v1\nkind: InferenceObjective\nmetadata: {name: o, namespace: ns}\nspec:\n  priority: -1\n  poolRefs: [{group: inference.networking.k8s.io, name: pool}]";
    let found = run(&plus(&format!("{x_k8s}\n---\n{llm_d}")), true);
    assert!(found.is_empty(), "{found:#?}");

    rejects(
        &plus(&x_k8s.replace("name: pool}", "name: nope}")),
        "objectives-resolve",
        "\"nope\"",
    );
    rejects(
        &plus(&llm_d.replace(
            "  poolRefs: [{group: inference.networking.k8s.io, name: pool}]",
            "  poolRef: {name: pool}",
        )),
        "objectives-resolve",
        "has no spec.poolRefs",
    );
    rejects(
        &plus(
            &llm_d
                .replace("llm-d.ai/v1\n", "llm-d.ai/v1alpha2\n")
                .replace(
                    "  poolRefs: [{group: inference.networking.k8s.io, name: pool}]",
                    "  poolRef: {name: pool}",
                ),
        ),
        "objectives-resolve",
        "in group \"llm-d.ai\"",
    );
    rejects(
        &plus(&x_k8s.replace("v1alpha2", "v1alpha1")),
        "objectives-resolve",
        "has apiVersion",
    );
    rejects(
        &plus(&x_k8s.replace("priority: 1", "priority: high")),
        "objectives-resolve",
        "must be an integer",
    );
}

// ------------------------------------------------- active-active pickers

#[test]
fn rejects_active_pickers_without_a_budget_or_with_recreate() {
    let three = with(
        "  replicas: 1\n  strategy: {type: Recreate}",
        "  replicas: 3\n  strategy: {type: Recreate}",
    );
    rejects(
        &three,
        "disruption-budgets",
        "3 active pickers with no PodDisruptionBudget",
    );
    rejects(&three, "disruption-budgets", "with the Recreate strategy");
}
