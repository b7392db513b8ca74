#!/usr/bin/env bash
# Issue 14's proof: the approximate prefix index (what the picker routed,
# aged by an LRU) against the precise one (the pods' own KV-cache events),
# same workload and offered load, on five scenarios:
#   churn     pods' KV caches hold a third of the working set
#   restart   every pod restarted halfway through
#   replicas  3 picker replicas behind one Envoy, each with its own index
#   direct    30% of the requests sent straight to pods, around the picker
#   direct-large  the same over 1,440 requests instead of 480 (not in the
#             default set: ~10 minutes)
#   direct-exact  direct with the pods' timing jitter off (not in the
#             default set)
#   tight     the caches together only 6% larger than the working set
# Each scenario runs `epp-bench compare shared-prefix` once per index (each
# on fresh pods), then `epp-bench report` puts both in
# bench/results/precise-prefix/<scenario>/, with every request in
# records.jsonl.gz and the two halves compared request by request in
# paired.md. About 3-5 minutes per scenario on 2 cores. The ideal hit rate accounts for bounded caches and the restart
# (bench/results/README.md, "Ideal hit rate").
#
# Usage: scripts/bench-precise.sh [--approximate-only] [scenario...]
set -euo pipefail
cd "$(dirname "$0")/.."

approx_only=false
if [[ "${1:-}" == --approximate-only ]]; then
  approx_only=true
  shift
fi
scenarios=("$@")
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=(churn restart replicas direct tight)

scripts/setup-tools.sh >/dev/null
cargo build --release --locked -p epp -p epp-bench --bins
bench=${CARGO_TARGET_DIR:-target}/release/epp-bench
out=bench/results/precise-prefix
model=Qwen/Qwen2.5-3B-Instruct

# The precise index: the stack's --kv-events makes every pod publish real
# vLLM-format events on ZeroMQ (its ports written into the picker's endpoints
# file) and gives the picker --kv-events; pods and picker key blocks with the
# same tokenizer (the workload's model name is the pods' default served
# model, so the picker's --tokenizer names it).
tokenizer=.tools/tokenizers/qwen3
precise_args=(
  --kv-events
  "--epp-arg=--tokenizer=$model=$tokenizer"
)

# Four pods, 2,000-token shared system prompts (125 blocks of 16 tokens),
# 100-token questions, 16 output tokens, open loop at 6 req/s. Prompts are
# shuffled: in round-robin group order each picker replica (Envoy's round
# robin) and each direct pod draw would see the same groups every time, a
# pattern no real traffic has.
common=(--pods 4 --system-tokens 2000 --question-tokens 100 --output-tokens 16
  --rate 6 --shuffle --model "$model"
  # Both halves on the same pods: tokenizing with the model's tokenizer, so
  # hit rates and prefill times count the same tokens.
  "--sim-arg=--tokenizer=$tokenizer"
  # Each request's 5% timing jitter is drawn from its own body, not from
  # the pod's RNG in arrival order: both halves give the same request the
  # same noise, so their difference is what routing changed (a miss's
  # prefill is as slow under either picker).
  --sim-arg=--jitter-per-request)

# name | workload and stack flags
declare -A flags=(
  # 96 groups x 125 blocks = 12,000 blocks; 4 x 1,000 blocks keep 8 groups
  # a pod, 32 of 96: a third.
  [churn]="--groups 96 --prompts-per-group 8 --sim-arg=--kv-blocks=1000"
  # 48 groups, room for all; every pod's cache emptied before request 240.
  [restart]="--groups 48 --prompts-per-group 10 --restart-pods-at 50%"
  [replicas]="--groups 48 --prompts-per-group 10 --epp-replicas 3"
  [direct]="--groups 48 --prompts-per-group 10 --direct-fraction 0.3"
  # The same fractions over three times the requests (144 groups, 18,000
  # blocks: still room for all): its p95 rests on 72 requests, not 24.
  [direct-large]="--groups 144 --prompts-per-group 10 --direct-fraction 0.3"
  # The same as direct with the pods' 5% timing jitter off: a miss then
  # takes the same time wherever it lands, so the p95 moves only with what
  # routing changes (waits, the number of misses).
  [direct-exact]="--groups 48 --prompts-per-group 10 --direct-fraction 0.3 --sim-arg=--jitter=0"
  # 64 groups x 125 blocks = 8,000 blocks; 4 x 2,120 = 8,480 blocks (6%
  # more), 16 groups a pod if placed by footprint.
  [tight]="--groups 64 --prompts-per-group 10 --sim-arg=--kv-blocks=2120"
)

for s in "${scenarios[@]}"; do
  [[ -n "${flags[$s]:-}" ]] || { echo "unknown scenario $s" >&2; exit 2; }
  dir=$out/$s
  mkdir -p "$dir"
  # Every request of both halves, one JSON line each (appended: start empty;
  # kept gzipped, which `epp-bench paired` reads as it is).
  records=$dir/records.jsonl
  rm -f "$records" "$records.gz"
  # shellcheck disable=SC2086 # the scenario's flags are words on purpose
  $bench compare shared-prefix "${common[@]}" ${flags[$s]} --records "$records" \
    --policies approximate=epp-default --out "$dir/approximate"
  inputs=$dir/approximate/approximate.json
  if ! $approx_only; then
    # shellcheck disable=SC2086
    $bench compare shared-prefix "${common[@]}" ${flags[$s]} --records "$records" \
      "${precise_args[@]}" --policies precise=epp-default --out "$dir/precise"
    inputs=$inputs,$dir/precise/precise.json
  fi
  $bench report --inputs "$inputs" --title "Precise prefix cache: $s" --out "$dir"
  if ! $approx_only; then
    # The same requests under both pickers, side by side.
    $bench paired --records "$records" --base approximate --other precise >"$dir/paired.md"
  fi
  gzip -9f "$records"
done
