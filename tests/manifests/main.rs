//! Manifest checks (CI): renders every overlay under manifests/overlays, and
//! the components combined with them, with the real `kubectl kustomize`
//! (installed by scripts/setup-tools.sh), then checks the objects: that the
//! references between them resolve, that the picker gets RBAC, flags and a
//! config it accepts (checked with `epp --help`, its flag parser and its
//! scheduler builder), and that none of the failures the first GKE
//! deployment hit can come back (checks.rs, `pitfall:*`).
//!
//! No cluster is needed: everything is offline and takes about a second.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in
// #[test] functions; this extends it to the helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod checks;
mod dashboard;
mod epp;
mod hardening;
mod model;
mod negative;
mod negative_hardening;
mod negative_observability;
mod observability;
mod render;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use checks::{Ctx, Violation};
use model::{Obj, arr_at, kind, of_kind, str_at, workloads};
use render::{compose, epp_help_flags, manifests_dir, overlay_dirs, rendered_overlays, repo_root};

/// GKE overlays are named gke-*: they must carry the GKE objects and the
/// TPU model server.
fn is_gke(overlay: &str) -> bool {
    overlay.starts_with("gke")
}

/// Overlays that run one model server on purpose (the seed's shape, kept
/// for comparison); every other install gives the picker a choice.
fn single_server(overlay: &str) -> bool {
    overlay.ends_with("-2x2")
}

fn ctx(overlay: &str) -> Ctx<'static> {
    Ctx {
        gke: is_gke(overlay),
        epp_flags: epp_help_flags(),
        min_endpoints: if single_server(overlay) { 1 } else { 2 },
    }
}

#[track_caller]
fn assert_clean(what: &str, found: &[Violation]) {
    assert!(
        found.is_empty(),
        "{what}: {} problem(s):\n{}",
        found.len(),
        found.iter().map(|v| format!("  {v}\n")).collect::<String>()
    );
}

/// Overlays that must exist; any other overlay is checked too.
const OVERLAYS: &[&str] = &[
    "gke-tpu",
    "gke-tpu-2x2",
    "gke-tpu-internal",
    "kind",
    "kind-istio",
];

/// Components enabled on top of an overlay, as the docs describe.
const COMPOSITIONS: &[(&str, &[&str])] = &[
    (
        "gke-tpu",
        &[
            "ha",
            "https-listener",
            "gke-network-policy",
            "objectives-llm-d",
        ],
    ),
    ("gke-tpu-2x2", &["gke-network-policy", "objectives-x-k8s"]),
    ("gke-tpu", &["active-active", "gke-network-policy"]),
    (
        "gke-tpu-internal",
        &["https-listener", "gke-network-policy"],
    ),
    ("kind", &["prometheus-operator", "ha", "objectives-x-k8s"]),
    ("kind", &["picker-tokenizer", "objectives-llm-d"]),
];

#[test]
fn every_overlay_passes_every_check() {
    let rendered = rendered_overlays();
    for want in OVERLAYS {
        assert!(
            rendered.contains_key(*want),
            "overlay {want} is missing from manifests/overlays"
        );
    }
    // All overlays' problems in one report: a shared component usually
    // breaks several at once.
    let mut found = Vec::new();
    for (name, objs) in rendered {
        assert!(!objs.is_empty(), "overlay {name} renders nothing");
        found.extend(
            checks::run_all(objs, &ctx(name))
                .into_iter()
                .map(|v| Violation {
                    msg: format!("overlay {name}: {}", v.msg),
                    ..v
                }),
        );
    }
    assert_clean("overlays", &found);
}

#[test]
fn components_compose_with_the_overlays_and_pass_every_check() {
    for (overlay, components) in COMPOSITIONS {
        let objs = compose(overlay, components, "inference")
            .unwrap_or_else(|e| panic!("{overlay} + {components:?}: {e}"));
        assert_clean(
            &format!("{overlay} + {components:?}"),
            &checks::run_all(&objs, &ctx(overlay)),
        );

        let epps = epp::epp_containers(&objs);
        if components.contains(&"ha") {
            let replicas = epps[0]
                .workload
                .obj
                .pointer("/spec/replicas")
                .and_then(|v| v.as_u64());
            assert_eq!(replicas, Some(2), "ha: two picker replicas");
            assert!(epps[0].leader_election(), "ha: --ha-enable-leader-election");
        }
        if components.contains(&"active-active") {
            let w = &epps[0].workload.obj;
            assert_eq!(
                w.pointer("/spec/replicas").and_then(|v| v.as_u64()),
                Some(3),
                "active-active: three picker replicas"
            );
            assert!(!epps[0].leader_election(), "active-active: no lease");
            assert!(
                epps[0].args().contains(&"--refresh-metrics-interval=20ms"),
                "active-active: scrapes every 20 ms (bench/results/replicas)"
            );
            assert_eq!(
                str_at(w, "/spec/strategy/type"),
                Some("RollingUpdate"),
                "active-active: rolling updates"
            );
            assert_eq!(
                arr_at(w, "/spec/template/spec/topologySpreadConstraints").len(),
                2,
                "active-active: spread over nodes and zones"
            );
            assert!(
                of_kind(&objs, "PodDisruptionBudget")
                    .any(|p| model::name(p) == "vllm-qwen25-3b-epp"),
                "active-active: a picker PodDisruptionBudget"
            );
        }
        if components.contains(&"https-listener") {
            let gw = of_kind(&objs, "Gateway").next().expect("a Gateway");
            let https = arr_at(gw, "/spec/listeners")
                .iter()
                .find(|l| str_at(l, "/protocol") == Some("HTTPS"))
                .expect("https-listener adds an HTTPS listener");
            assert_eq!(https["port"], 443);
            assert_eq!(
                str_at(https, "/tls/certificateRefs/0/name"),
                Some("inference-gateway-tls")
            );
        }
        if components.contains(&"gke-network-policy") {
            let policies: BTreeSet<&str> =
                of_kind(&objs, "NetworkPolicy").map(model::name).collect();
            assert_eq!(
                policies,
                BTreeSet::from(["vllm-qwen25-3b", "vllm-qwen25-3b-epp"]),
                "gke-network-policy covers the picker and the model servers"
            );
        }
        for (component, version) in [
            ("objectives-x-k8s", "inference.networking.x-k8s.io/v1alpha2"),
            ("objectives-llm-d", "llm-d.ai/v1"),
        ] {
            if components.contains(&component) {
                let n = of_kind(&objs, "InferenceObjective")
                    .filter(|o| str_at(o, "/apiVersion") == Some(version))
                    .count();
                assert_eq!(n, 2, "{component} ships two {version} objectives");
            }
        }
        if components.contains(&"picker-tokenizer") {
            assert!(
                checks::run_all(
                    &objs,
                    &Ctx {
                        gke: true,
                        ..ctx(overlay)
                    }
                )
                .iter()
                .all(|v| v.check != "picker-tokenizer"),
                "picker-tokenizer on {overlay} passes the GKE tokenizer check"
            );
        }
        if components.contains(&"prometheus-operator") {
            for k in ["ServiceMonitor", "PodMonitor"] {
                assert!(
                    of_kind(&objs, k).next().is_some(),
                    "prometheus-operator ships a {k}"
                );
            }
        }
    }
}

#[test]
fn every_component_is_rendered_by_some_test() {
    let mut used: BTreeSet<String> = COMPOSITIONS
        .iter()
        .flat_map(|(_, c)| c.iter().map(|s| s.to_string()))
        .collect();
    for dir in overlay_dirs().values() {
        let k = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        used.extend(
            k.lines()
                .filter_map(|l| l.trim().strip_prefix("- ../../components/"))
                .map(str::to_owned),
        );
    }
    // Components a used component includes (`components: [- ../name]`).
    loop {
        let before = used.len();
        for c in used.clone() {
            let path = manifests_dir()
                .join("components")
                .join(&c)
                .join("kustomization.yaml");
            let k = std::fs::read_to_string(path).unwrap_or_default();
            used.extend(
                k.lines()
                    .filter_map(|l| l.trim().strip_prefix("- ../"))
                    .filter(|n| !n.contains('/'))
                    .map(str::to_owned),
            );
        }
        if used.len() == before {
            break;
        }
    }
    for entry in std::fs::read_dir(manifests_dir().join("components")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            used.contains(&name),
            "component {name} is in no overlay and no COMPOSITIONS entry, so nothing checks it"
        );
    }
}

#[test]
fn gke_overlays_are_the_tpu_stack_behind_a_regional_gateway() {
    let rendered = rendered_overlays();
    // The default stack: four one-chip pods (the picker has a choice), the
    // seed's single 2x2 pod kept as gke-tpu-2x2; the same chips either way.
    for (overlay, topology, pods, chips) in [
        ("gke-tpu", "1x1", 4, "1"),
        ("gke-tpu-internal", "1x1", 4, "1"),
        ("gke-tpu-2x2", "2x2", 1, "4"),
    ] {
        let objs = &rendered[overlay];
        let server = workloads(objs)
            .find(|w| {
                w.containers()
                    .iter()
                    .any(|c| c.pointer("/resources/limits/google.com~1tpu").is_some())
            })
            .unwrap_or_else(|| panic!("{overlay}: no TPU workload"));
        assert_eq!(model::replicas(&server), pods, "{overlay} replicas");
        assert_eq!(
            str_at(
                server.pod_spec(),
                "/nodeSelector/cloud.google.com~1gke-tpu-topology"
            ),
            Some(topology),
            "{overlay} topology"
        );
        assert_eq!(
            str_at(&server.containers()[0], "/resources/limits/google.com~1tpu"),
            Some(chips),
            "{overlay} chips per pod"
        );
        assert_eq!(
            pods * chips.parse::<u64>().unwrap(),
            4,
            "{overlay}: four chips in all, so the two shapes cost the same"
        );
    }
    for (overlay, class) in [
        ("gke-tpu", "gke-l7-regional-external-managed"),
        ("gke-tpu-2x2", "gke-l7-regional-external-managed"),
        ("gke-tpu-internal", "gke-l7-rilb"),
    ] {
        let objs = &rendered[overlay];
        let gw = of_kind(objs, "Gateway").next().expect("a Gateway");
        assert_eq!(
            str_at(gw, "/spec/gatewayClassName"),
            Some(class),
            "{overlay}"
        );
        let vllm = workloads(objs)
            .flat_map(|w| w.containers().iter())
            .find(|c| str_at(c, "/image").is_some_and(|i| i.contains("vllm/vllm-tpu:")))
            .unwrap_or_else(|| panic!("{overlay}: no vllm/vllm-tpu container"));
        let a = model::args(vllm);
        assert!(
            a.contains(&"Qwen/Qwen2.5-3B-Instruct"),
            "{overlay}: serves Qwen2.5-3B-Instruct: {a:?}"
        );
        assert!(a.contains(&"--port=8000"), "{overlay}: {a:?}");
        assert_eq!(
            str_at(
                &of_kind(objs, "InferencePool").next().unwrap()["spec"]["endpointPickerRef"],
                "/failureMode"
            ),
            Some("FailOpen"),
            "docs/deploy-gke-tpu.md explains FailOpen; change both together"
        );
    }
}

/// docs/deploy-gke-tpu.md sets the picker image in a local overlay kept out
/// of git (`kustomize edit set image <placeholder>=<yours>`), not by editing
/// a tracked file: the overlays' placeholder must be replaceable from
/// outside, and the rest of the install must come through unchanged.
#[test]
fn a_local_overlay_sets_the_picker_image() {
    let tmp = tempfile::tempdir().unwrap();
    for overlay in ["gke-tpu", "gke-tpu-2x2", "gke-tpu-internal"] {
        let dir = tmp.path().join(overlay);
        std::fs::create_dir_all(&dir).unwrap();
        let target = render::relative(&dir, &manifests_dir().join("overlays").join(overlay));
        // What `kustomize create --namespace inference --resources <overlay>`
        // and `kustomize edit set image us-central1-docker.pkg.dev/PROJECT_ID/
        // inference/epp=europe-west4-docker.pkg.dev/p/r/epp:abc123` write.
        let k = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: inference\nresources:\n- {}\nimages:\n- name: us-central1-docker.pkg.dev/PROJECT_ID/inference/epp\n  newName: europe-west4-docker.pkg.dev/p/r/epp\n  newTag: abc123\n",
            target.display()
        );
        std::fs::write(dir.join("kustomization.yaml"), k).unwrap();
        let objs = render::kustomize(&dir).unwrap_or_else(|e| panic!("{overlay}: {e}"));
        let epps = epp::epp_containers(&objs);
        assert_eq!(
            str_at(epps[0].container, "/image"),
            Some("europe-west4-docker.pkg.dev/p/r/epp:abc123"),
            "{overlay}"
        );
        assert_eq!(
            objs.len(),
            rendered_overlays()[overlay].len(),
            "{overlay}: the local overlay renders the same objects"
        );
        assert_clean(overlay, &checks::run_all(&objs, &ctx(overlay)));
    }
}

#[test]
fn the_shipped_picker_config_is_the_repo_default() {
    // kustomize cannot read config/default.yaml (above its root), so the
    // base holds a copy; the picker's built-in default is the same file.
    let copy =
        std::fs::read_to_string(manifests_dir().join("base/epp-config/default.yaml")).unwrap();
    let original = std::fs::read_to_string(repo_root().join("config/default.yaml")).unwrap();
    assert!(
        copy == original,
        "manifests/base/epp-config/default.yaml differs from config/default.yaml: cp config/default.yaml manifests/base/epp-config/"
    );
}

#[test]
fn the_dashboard_charts_metrics_that_exist() {
    let json =
        std::fs::read_to_string(manifests_dir().join("observability/grafana-dashboard.json"))
            .unwrap();
    // The picker's metric names are registered where each subsystem keeps
    // its collector (telemetry, scrape, endpoints, ...), so read them all.
    let source = rust_sources(&repo_root().join("src"));
    let fixtures = repo_root().join("tests/fixtures/metrics");
    let captures: String = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vllm-"))
        })
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let problems = dashboard::check(&json, &source, &captures);
    assert!(problems.is_empty(), "grafana-dashboard.json: {problems:#?}");
}

/// The text of every `.rs` file under `dir`, recursively.
fn rust_sources(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
                out.push('\n');
            }
        }
    }
    out
}

/// Destinations of the runtime stage's COPY instructions.
fn image_files(dockerfile: &str) -> BTreeSet<String> {
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap_or(dockerfile);
    runtime
        .lines()
        .filter(|l| l.starts_with("COPY "))
        .filter_map(|l| l.split_whitespace().last())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_image_holds_what_the_manifests_run() {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    // The Dockerfile and CI share the build script, so CI builds exactly
    // the image's binaries.
    assert!(
        dockerfile.contains("scripts/build-release.sh"),
        "the Dockerfile must build with scripts/build-release.sh"
    );
    let script = std::fs::read_to_string(root.join("scripts/build-release.sh")).unwrap();
    for needle in [
        "cargo build --release --locked",
        "--bin epp",
        "--bin vllm-sim",
    ] {
        assert!(
            script.contains(needle),
            "scripts/build-release.sh lacks {needle:?}"
        );
    }
    let files = image_files(&dockerfile);
    for bin in ["/usr/local/bin/epp", "/usr/local/bin/vllm-sim"] {
        assert!(files.contains(bin), "the image lacks {bin}: {files:?}");
    }
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/epp\"]"));
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("FROM gcr.io/distroless/cc-debian12:nonroot")),
        "non-root runtime"
    );

    // EXPOSE lists the picker's default ports.
    use clap::Parser;
    let defaults = ::epp::config::Flags::try_parse_from(["epp"]).unwrap();
    let exposed: BTreeSet<u16> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([
            defaults.grpc_port,
            defaults.grpc_health_port,
            defaults.metrics_port
        ])
    );

    // Containers that run this image with a command override run a binary
    // the image has (the kind overlay's simulator).
    for (overlay, objs) in rendered_overlays() {
        let epp_images: BTreeSet<&str> = epp::epp_containers(objs)
            .iter()
            .filter_map(|e| str_at(e.container, "/image"))
            .collect();
        for w in workloads(objs) {
            for c in w.containers() {
                let same_image = str_at(c, "/image").is_some_and(|i| epp_images.contains(i));
                if let (true, Some(cmd)) = (same_image, str_at(c, "/command/0")) {
                    assert!(
                        files.contains(cmd),
                        "{overlay}: {} runs {cmd}, which the image lacks",
                        model::id(w.obj)
                    );
                }
            }
        }
    }

    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    for entry in ["target/", ".venv/", ".tools/", ".git", "bench/results/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
}

/// The simulator binary, when this build has one (it belongs to another
/// package, so cargo does not build it for this test).
fn vllm_sim() -> Option<PathBuf> {
    let epp = Path::new(env!("CARGO_BIN_EXE_epp"));
    let dir = epp.parent()?;
    [dir.join("vllm-sim"), dir.join("../release/vllm-sim")]
        .into_iter()
        .find(|p| p.exists())
}

#[test]
fn the_kind_simulator_args_are_accepted() {
    let objs = &rendered_overlays()["kind"];
    let sim = workloads(objs)
        .flat_map(|w| w.containers().iter())
        .find(|c| str_at(c, "/command/0") == Some("/usr/local/bin/vllm-sim"))
        .expect("the kind overlay runs /usr/local/bin/vllm-sim");
    let args: Vec<String> = model::args(sim)
        .iter()
        .map(|a| a.replace("$(POD_NAME)", "pod"))
        .collect();
    let Some(bin) = vllm_sim() else {
        eprintln!(
            "note: no vllm-sim binary next to epp; build it (cargo build -p epp-bench) to check {args:?}"
        );
        return;
    };
    // Valid args followed by --help print help and exit 0; an unknown flag
    // or a bad value fails before clap reaches --help.
    let out = Command::new(&bin)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vllm-sim rejects {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rendered_output_parses_as_kubernetes_objects() {
    // A guard for the parser the checks rely on: kinds come out as strings
    // and the picker's Deployment is found in every overlay.
    for (name, objs) in rendered_overlays() {
        let kinds: BTreeSet<&str> = objs.iter().map(|o: &Obj| kind(o)).collect();
        for k in [
            "Deployment",
            "Service",
            "InferencePool",
            "Role",
            "RoleBinding",
            "ConfigMap",
        ] {
            assert!(kinds.contains(k), "{name} has no {k}: {kinds:?}");
        }
        assert_eq!(
            epp::epp_containers(objs).len(),
            1,
            "{name}: one picker container"
        );
    }
}
