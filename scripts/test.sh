#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script).
#   1. installs the real tools the tests use (Envoy, kubectl, promtool) into the repo
#   2. checks formatting and lints
#   3. builds the release binaries exactly as the Dockerfile does
#   4. runs unit, end-to-end (through a real Envoy), Kubernetes-mock and manifest tests
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-tools.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The Dockerfile's build step (no Docker engine in CI, so run it here).
scripts/build-release.sh
cargo test --workspace --locked
