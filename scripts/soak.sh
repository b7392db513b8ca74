#!/usr/bin/env bash
# Bounded soak (docs/reliability.md, "Soak"): fixed-rate load through Envoy
# and the release picker to 4 vllm-sim processes for DURATION seconds
# (default 600), SIGKILLing one pod every 90 s and restarting it on the same
# port 25 s later. Writes bench/results/soak/{soak.csv,soak.png,README.md}.
#   scripts/soak.sh [DURATION] [extra epp-bench soak flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-600}"
shift || true
case "$duration" in
  '' | *[!0-9]*) echo "usage: $0 [DURATION_SECONDS] [epp-bench soak flags]" >&2; exit 2 ;;
esac
scripts/setup-tools.sh >/dev/null
cargo build --release --locked -p epp -p epp-bench --bin epp --bin vllm-sim --bin epp-bench
exec target/release/epp-bench soak --duration "$duration" --out bench/results/soak "$@"
