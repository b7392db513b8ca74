#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script).
#   1. installs the real tools the tests use (Envoy, kubectl, promtool) into the repo
#   2. checks formatting, the supply chain (cargo-deny) and lints
#   3. builds the release binaries exactly as the Dockerfile does
#   4. runs unit, end-to-end (through a real Envoy), Kubernetes-mock and manifest tests
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-tools.sh

cargo fmt --all -- --check
# Supply chain (deny.toml): licences, sources, duplicate versions. The crates
# are fetched first so cargo-deny itself never touches the network.
cargo fetch --locked --quiet
deny=(.tools/bin/cargo-deny --frozen --workspace --color never)
"${deny[@]}" check --hide-inclusion-graph licenses bans sources
# Advisories need the RustSec database, which CI cannot clone (it reaches
# package registries only); check them against a local copy when one is given.
if [ -n "${CARGO_DENY_ADVISORY_DB:-}" ]; then
  "${deny[@]}" check advisories
else
  echo "cargo-deny advisories: skipped, no local advisory database (set CARGO_DENY_ADVISORY_DB to a directory filled by 'cargo deny fetch')"
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
# The Dockerfile's build step (no Docker engine in CI, so run it here).
scripts/build-release.sh
cargo test --workspace --locked
