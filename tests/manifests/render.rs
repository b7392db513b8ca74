//! Rendering with the real tools: `kubectl kustomize` for the manifests and
//! `epp --help` for the flags the picker accepts. Each is run once per test
//! process and shared.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Component, Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::model::{Obj, parse_docs};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn manifests_dir() -> PathBuf {
    repo_root().join("manifests")
}

/// kubectl as installed by scripts/setup-tools.sh (1.37, with kustomize
/// v5.8). `EPP_TOOLS_DIR` overrides the directory, as for the e2e tests.
/// A distro kubectl is not used on purpose: Debian's embeds a kustomize too
/// old for Components.
pub fn kubectl() -> PathBuf {
    let dir = std::env::var_os("EPP_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/bin"));
    let path = dir.join("kubectl");
    assert!(
        path.exists(),
        "{} not found: run scripts/setup-tools.sh first (it installs kubectl with kustomize into .tools/bin; \
         EPP_TOOLS_DIR overrides that directory)",
        path.display()
    );
    path
}

/// `kubectl kustomize DIR`, parsed.
pub fn kustomize(dir: &Path) -> Result<Vec<Obj>, String> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run kubectl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kubectl kustomize {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_docs(&String::from_utf8_lossy(&out.stdout))
}

/// Every overlay directory under manifests/overlays, by name.
pub fn overlay_dirs() -> BTreeMap<String, PathBuf> {
    let dir = manifests_dir().join("overlays");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect()
}

/// Every overlay, rendered once per test process.
pub fn rendered_overlays() -> &'static BTreeMap<String, Vec<Obj>> {
    static RENDERED: OnceLock<BTreeMap<String, Vec<Obj>>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        overlay_dirs()
            .into_iter()
            .map(|(name, dir)| {
                let objs = kustomize(&dir).unwrap_or_else(|e| panic!("overlay {name}: {e}"));
                (name, objs)
            })
            .collect()
    })
}

/// Renders `overlay` with extra `components`, the way a user enables one:
/// a kustomization that takes the overlay as its resource, adds the
/// components and keeps the overlay's namespace. Kustomize refuses absolute
/// paths, hence the relative ones from a temporary directory.
pub fn compose(overlay: &str, components: &[&str], namespace: &str) -> Result<Vec<Obj>, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let rel = |p: PathBuf| relative(tmp.path(), &p).display().to_string();
    let mut k = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {namespace}\nresources:\n- {}\ncomponents:\n",
        rel(manifests_dir().join("overlays").join(overlay))
    );
    for c in components {
        k.push_str(&format!(
            "- {}\n",
            rel(manifests_dir().join("components").join(c))
        ));
    }
    std::fs::write(tmp.path().join("kustomization.yaml"), k).map_err(|e| e.to_string())?;
    kustomize(tmp.path())
}

/// The path of `to` relative to `from` (both absolute).
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// Long flag names `epp --help` lists (without the leading `--`).
pub fn epp_help_flags() -> &'static BTreeSet<String> {
    static FLAGS: OnceLock<BTreeSet<String>> = OnceLock::new();
    FLAGS.get_or_init(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_epp"))
            .arg("--help")
            .output()
            .expect("run epp --help");
        assert!(out.status.success(), "epp --help failed");
        let flags = parse_help_flags(&String::from_utf8_lossy(&out.stdout));
        // Guards the parser itself: if clap's layout changed and nothing
        // parsed, every manifest flag would look unknown, or worse, a broken
        // parser could accept anything.
        for expected in ["pool-name", "config-file", "grpc-port"] {
            assert!(
                flags.contains(expected),
                "epp --help parsing found no --{expected}: {flags:?}"
            );
        }
        flags
    })
}

/// Flag names from clap help text: the `--name` tokens that start an option
/// line (`  -v, --v [<VERBOSITY>]`, `      --pool-name <POOL_NAME>`).
pub fn parse_help_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            l.split([' ', ','])
                .filter_map(|t| t.strip_prefix("--"))
                .map(|t| t.split(['=', '[', '<']).next().unwrap_or(t))
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}
