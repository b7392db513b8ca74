//! Negative cases of the /metrics authentication and admin-port checks
//! (and of the cluster-scoped objects and Secrets they let in).

use crate::negative::{VALID, parse, plus, rejects, run, with};

const EPP_ARGS: &str = "args: [--pool-name, pool,";

#[test]
fn rejects_a_picker_that_cannot_review_tokens() {
    rejects(
        &with(
            "roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: epp-metrics-auth}\nsubjects: [{kind: ServiceAccount, name: epp, namespace: ns}]",
            "roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: epp-metrics-auth}\nsubjects: [{kind: ServiceAccount, name: someone-else, namespace: ns}]",
        ),
        "metrics-auth",
        "create authentication.k8s.io/tokenreviews",
    );
    rejects(
        &with(
            "- {apiGroups: [authorization.k8s.io], resources: [subjectaccessreviews], verbs: [create]}\n",
            "",
        ),
        "metrics-auth",
        "create authorization.k8s.io/subjectaccessreviews",
    );
}

#[test]
fn rejects_a_monitor_without_a_token_or_with_one_that_may_not_read() {
    rejects(
        &with(
            "- {port: metrics, path: /metrics, authorization: {type: Bearer, credentials: {secret: {name: metrics-reader, key: token}}}}",
            "- {port: metrics, path: /metrics}",
        ),
        "metrics-auth",
        "without a bearer token",
    );
    rejects(
        &with(
            "subjects: [{kind: ServiceAccount, name: metrics-reader, namespace: ns}]",
            "subjects: [{kind: ServiceAccount, name: epp, namespace: ns}]",
        ),
        "metrics-auth",
        "no ClusterRole lets get /metrics",
    );
    rejects(
        &with(
            "credentials: {secret: {name: metrics-reader,",
            "credentials: {secret: {name: absent,",
        ),
        "metrics-auth",
        "Secret absent, which is not in the output",
    );
    rejects(
        &with(
            "- {kind: ServiceAccount, name: collector, namespace: gke-gmp-system}\n",
            "",
        ),
        "metrics-auth",
        "may not read Secret metrics-reader",
    );
}

#[test]
fn accepts_a_picker_with_auth_off_and_no_cluster_roles() {
    // Auth off: no review rights needed, no token, and the ClusterRoles
    // must go (least privilege).
    let text = VALID.replacen(
        EPP_ARGS,
        "args: [--metrics-endpoint-auth=false, --pool-name, pool,",
        1,
    );
    let objs = parse(&text);
    let found = run(&objs, true);
    assert!(
        found.iter().all(|v| v.check != "metrics-auth"),
        "{found:#?}"
    );
    rejects(
        &objs,
        "namespaced-install",
        "ClusterRole/epp-metrics-auth is for /metrics authentication, which no picker here checks",
    );
}

#[test]
fn rejects_cluster_roles_beyond_metrics_auth_and_token_secrets_with_data() {
    rejects(
        &with(
            "- {nonResourceURLs: [/metrics], verbs: [get]}",
            "- {nonResourceURLs: [/metrics], verbs: [get]}\n- {apiGroups: [\"\"], resources: [secrets], verbs: [get]}",
        ),
        "namespaced-install",
        "ClusterRole/epp-metrics-reader grants more than",
    );
    rejects(
        &plus(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: t, namespace: ns, annotations: {kubernetes.io/service-account.name: metrics-reader}}\ntype: kubernetes.io/service-account-token\ndata: {token: c2VjcmV0}",
        ),
        "no-committed-secrets",
        "Secret/t",
    );
    rejects(
        &with(
            "- {kind: ServiceAccount, name: collector, namespace: gmp-system}",
            "- {kind: ServiceAccount, name: intruder, namespace: gmp-system}",
        ),
        "one-namespace",
        "binds ServiceAccount intruder",
    );
}

#[test]
fn rejects_an_admin_api_beyond_localhost() {
    rejects(
        &with(
            EPP_ARGS,
            "args: [--admin-address=0.0.0.0, --pool-name, pool,",
        ),
        "admin-port",
        "serves the admin API (ListEndpoints, Explain) on 0.0.0.0",
    );
    rejects(
        &with(
            "- {name: grpc-health, containerPort: 9003}",
            "- {name: grpc-health, containerPort: 9003}\n        - {name: admin, containerPort: 9004}",
        ),
        "admin-port",
        "declares the admin port 9004",
    );
}
