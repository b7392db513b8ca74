#!/usr/bin/env bash
# Issue 16's proof: flow control with two tenants (one sending 4x the other)
# and two priorities (10% critical, the rest standard) at twice the pool's
# capacity, with flow control off, GIE's defaults and ours; then SLO
# admission (ours) against the same flow control without it.
#
# Pool: 2 vllm-sim pods of 24 running slots, 100 ms per output token, 32
# prompt and 32 output tokens per request: a request holds its slot ~3.8 s
# at a full batch, so the pool serves ~12.7 requests/s. Offered: heavy
# 20.4/s + light 5.1/s = 25.5/s, twice that, for 120 s (long enough that
# the requests still running when arrivals stop, and the Poisson draw of
# the light tenant's rate, move its goodput by a few percent, not ~15%);
# clients give up after 30 s.
#
# Runs (each on fresh pods, `epp-bench compare tenants`):
#   unloaded   flow control off at ~1/4 of capacity, half the requests
#              critical: the critical TTFT the others are measured against
#   off, gie, ours   the overload, bench/configs/flow-{off,gie,ours}.yaml
#   ours-rr    ours with round-robin fairness instead of least served
#   ours-slo-off, ours-slo   the overload with x-slo-ttft-ms on every
#              request, flow-ours without and with `sloAdmission`
# then `epp-bench report` writes bench/results/flow-control/. About 20 minutes.
#
# Usage: scripts/bench-flow-control.sh [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" != --no-build ]]; then
  scripts/setup-tools.sh >/dev/null
  cargo build --release --locked -p epp -p epp-bench --bins
fi
bench=${CARGO_TARGET_DIR:-target}/release/epp-bench
out=bench/results/flow-control
mkdir -p "$out"

pods=(--pods 2 --sim-arg=--max-num-seqs=24 --sim-arg=--itl-ms=100)
work=(--prompt-tokens 32 --output-tokens 32 --request-timeout 30 --duration 120)
overload=(--tenants heavy=20.4,light=5.1 --critical-share 0.1)
slo_ms=1000

$bench compare tenants "${pods[@]}" "${work[@]}" \
  --tenants heavy=2.4,light=0.6 --critical-share 0.5 \
  --policies unloaded=flow-off --out "$out/unloaded"
$bench compare tenants "${pods[@]}" "${work[@]}" "${overload[@]}" \
  --policies off=flow-off,gie=flow-gie,ours=flow-ours,ours-rr=flow-ours-rr --out "$out/overload"
$bench compare tenants "${pods[@]}" "${work[@]}" "${overload[@]}" \
  --slo-ttft-ms "$slo_ms" \
  --policies ours-slo-off=flow-ours,ours-slo=flow-ours-slo --out "$out/slo"

runs=$out/unloaded/unloaded.json
for p in off gie ours ours-rr; do runs=$runs,$out/overload/$p.json; done
for p in ours-slo-off ours-slo; do runs=$runs,$out/slo/$p.json; done
$bench report --inputs "$runs" --title "Flow control at 2x capacity" --out "$out"
