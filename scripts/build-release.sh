#!/usr/bin/env bash
# The release build of the container image's two binaries: the endpoint
# picker (package epp) and the vLLM simulator (package epp-bench, used by
# manifests/overlays/kind). The Dockerfile runs exactly this script, and CI
# runs it too, so a build that would break the image breaks CI first (no
# Docker engine runs there).
#
# --locked: build what Cargo.lock says, never re-resolve.
# -p ... : vllm-sim lives in a workspace member that is not a default member,
#          so `--bin vllm-sim` alone would not find it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo build --release --locked -p epp -p epp-bench --bin epp --bin vllm-sim "$@"
