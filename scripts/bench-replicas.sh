#!/usr/bin/env bash
# Issue 15's proof: several active picker replicas behind one Envoy, each
# with its own approximate index or with the pods' KV events (precise).
# Runs, one stack each (fresh pods), same workload and offered load:
#   shared    shared-prefix, 1 and 3 replicas (or $REPLICAS, e.g. "1 2 3")
#             x approximate / precise
#   cold      a cold-heavy burst (many groups, 2 prompts each, faster
#             arrivals): 1 vs 3 replicas, precise and approximate, and
#             3 precise replicas with two load settings
#   kill      3 replicas, the last one SIGKILLed 40 s into the 80 s run,
#             precise then approximate
# `epp-bench report` then puts each set side by side in
# bench/results/replicas/<set>/. About 2 minutes per run on 2 cores.
#
# Usage: scripts/bench-replicas.sh [set...]
set -euo pipefail
cd "$(dirname "$0")/.."

sets=("$@")
[[ ${#sets[@]} -gt 0 ]] || sets=(shared cold kill)

scripts/setup-tools.sh >/dev/null
cargo build --release --locked -p epp -p epp-bench --bins
bench=${CARGO_TARGET_DIR:-target}/release/epp-bench
out=bench/results/replicas
model=Qwen/Qwen2.5-3B-Instruct
tokenizer=.tools/tokenizers/qwen3
precise_args=(--kv-events "--epp-arg=--tokenizer=$model=$tokenizer")
# The workload of bench/results/precise-prefix: 4 pods, 2,000-token shared
# system prompts, 100-token questions, 16 output tokens, shuffled.
common=(--pods 4 --system-tokens 2000 --question-tokens 100 --output-tokens 16
  --shuffle --model "$model" "--sim-arg=--tokenizer=$tokenizer")
shared=(--groups 48 --prompts-per-group 10 --rate 6)
# Cold-heavy: 120 system prompts seen twice each, at 8 req/s: half of the
# requests are misses, each a 2,100-token prefill.
cold=(--groups 120 --prompts-per-group 2 --rate 8)

# run DIR LABEL REPLICAS MODE WORKLOAD-ARGS...
run() {
  local dir=$1 label=$2 n=$3 mode=$4
  shift 4
  local extra=()
  [[ $mode == precise ]] && extra=("${precise_args[@]}")
  $bench compare shared-prefix "${common[@]}" "$@" --epp-replicas "$n" "${extra[@]}" \
    --policies "$label=${policy:-epp-default}" --out "$dir/$label"
  inputs=${inputs:+$inputs,}$dir/$label/$label.json
}

for s in "${sets[@]}"; do
  dir=$out/$s
  mkdir -p "$dir"
  inputs=
  case $s in
    shared)
      for n in ${REPLICAS:-1 3}; do
        run "$dir" "approximate-$n" "$n" approximate "${shared[@]}"
        run "$dir" "precise-$n" "$n" precise "${shared[@]}"
      done
      ;;
    cold)
      for n in 1 3; do
        run "$dir" "approximate-$n" "$n" approximate "${cold[@]}"
        run "$dir" "precise-$n" "$n" precise "${cold[@]}"
      done
      # The candidates for load between replicas that are settings: other
      # replicas' requests priced as cold prompts, and scraping 2.5x as often.
      policy=foreign-priced run "$dir" precise-3-foreign-priced 3 precise "${cold[@]}"
      run "$dir" precise-3-scrape-20ms 3 precise "${cold[@]}" --epp-arg=--refresh-metrics-interval=20ms
      ;;
    kill)
      run "$dir" precise-3-kill 3 precise "${shared[@]}" --kill-replica-at 40
      run "$dir" approximate-3-kill 3 approximate "${shared[@]}" --kill-replica-at 40
      ;;
    *) echo "unknown set $s" >&2; exit 2 ;;
  esac
  $bench report --inputs "$inputs" --title "Picker replicas: $s" --out "$dir"
done
