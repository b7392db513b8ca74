#!/usr/bin/env bash
# Issue 15's proof: several active picker replicas behind one Envoy, each
# with its own approximate index or with the pods' KV events (precise).
# Runs, one stack each (fresh pods), same workload and offered load:
#   shared    shared-prefix, 1, 2 and 3 replicas (or $REPLICAS, e.g. "1 3")
#             x approximate / precise
#   cold      a cold-heavy burst (many groups, 2 prompts each, faster
#             arrivals): 1 vs 3 replicas, precise and approximate, and
#             3 precise replicas with two load settings
#   kill      3 replicas, the last one SIGKILLed 40 s into the 80 s run,
#             precise then approximate
#   multiturn bench/results/multi-turn's workload (8 pods, 100 sessions x 5
#             turns, 1,000-token system prompts, 200-token user turns, 64
#             output tokens, 16 sessions at once): 1, 2 and 3 replicas x
#             approximate / precise, and precise with 20 ms scrapes
#   wide      bench/results/shared-prefix's workload (8 pods, 150 system
#             prompts of 4,000 tokens, 5 questions each, 16 req/s): 1, 2 and
#             3 replicas x approximate / precise
# `epp-bench report` then puts each set side by side in
# bench/results/replicas/<set>/. About 2 minutes per run on 2 cores.
#
# Usage: scripts/bench-replicas.sh [set...]
set -euo pipefail
cd "$(dirname "$0")/.."

sets=("$@")
[[ ${#sets[@]} -gt 0 ]] || sets=(shared cold kill multiturn wide)

scripts/setup-tools.sh >/dev/null
cargo build --release --locked -p epp -p epp-bench --bins
bench=${CARGO_TARGET_DIR:-target}/release/epp-bench
out=bench/results/replicas
model=Qwen/Qwen2.5-3B-Instruct
tokenizer=.tools/tokenizers/qwen3
precise_args=(--kv-events "--epp-arg=--tokenizer=$model=$tokenizer")
# The workload of bench/results/precise-prefix: 4 pods, 2,000-token shared
# system prompts, 100-token questions, 16 output tokens, shuffled.
tok=(--model "$model" "--sim-arg=--tokenizer=$tokenizer")
common=(--pods 4 --system-tokens 2000 --question-tokens 100 --output-tokens 16
  --shuffle "${tok[@]}")
shared=("${common[@]}" --groups 48 --prompts-per-group 10 --rate 6)
# Cold-heavy: 120 system prompts seen twice each, at 8 req/s: half of the
# requests are misses, each a 2,100-token prefill.
cold=("${common[@]}" --groups 120 --prompts-per-group 2 --rate 8)
wide=(--pods 8 --groups 150 --prompts-per-group 5 --system-tokens 4000 --question-tokens 100
  --output-tokens 16 --rate 16 "${tok[@]}")
multiturn=(--pods 8 --sessions 100 --turns 5 --system-tokens 1000 --user-tokens 200
  --output-tokens 64 --concurrency 16 "${tok[@]}")

# run DIR LABEL REPLICAS MODE WORKLOAD WORKLOAD-ARGS...
run() {
  local dir=$1 label=$2 n=$3 mode=$4 workload=$5
  shift 5
  local extra=()
  [[ $mode == precise ]] && extra=("${precise_args[@]}")
  $bench compare "$workload" "$@" --epp-replicas "$n" "${extra[@]}" \
    --policies "$label=${policy:-epp-default}" --out "$dir/$label"
  inputs=${inputs:+$inputs,}$dir/$label/$label.json
}

for s in "${sets[@]}"; do
  dir=$out/$s
  mkdir -p "$dir"
  inputs=
  case $s in
    shared)
      for n in ${REPLICAS:-1 2 3}; do
        run "$dir" "approximate-$n" "$n" approximate shared-prefix "${shared[@]}"
        run "$dir" "precise-$n" "$n" precise shared-prefix "${shared[@]}"
      done
      ;;
    cold)
      for n in 1 3; do
        run "$dir" "approximate-$n" "$n" approximate shared-prefix "${cold[@]}"
        run "$dir" "precise-$n" "$n" precise shared-prefix "${cold[@]}"
      done
      # The candidates for load between replicas that are settings: other
      # replicas' requests priced as cold prompts, and scraping 2.5x as often.
      policy=foreign-priced run "$dir" precise-3-foreign-priced 3 precise shared-prefix "${cold[@]}"
      run "$dir" precise-3-scrape-20ms 3 precise shared-prefix "${cold[@]}" --epp-arg=--refresh-metrics-interval=20ms
      ;;
    kill)
      run "$dir" precise-3-kill 3 precise shared-prefix "${shared[@]}" --kill-replica-at 40
      run "$dir" approximate-3-kill 3 approximate shared-prefix "${shared[@]}" --kill-replica-at 40
      ;;
    multiturn)
      for n in ${REPLICAS:-1 2 3}; do
        run "$dir" "approximate-$n" "$n" approximate multi-turn "${multiturn[@]}"
        run "$dir" "precise-$n" "$n" precise multi-turn "${multiturn[@]}"
      done
      for n in 1 3; do
        run "$dir" "precise-$n-scrape-20ms" "$n" precise multi-turn "${multiturn[@]}" \
          --epp-arg=--refresh-metrics-interval=20ms
      done
      ;;
    wide)
      for n in ${REPLICAS:-1 2 3}; do
        run "$dir" "approximate-$n" "$n" approximate shared-prefix "${wide[@]}"
        run "$dir" "precise-$n" "$n" precise shared-prefix "${wide[@]}"
      done
      ;;
    *) echo "unknown set $s" >&2; exit 2 ;;
  esac
  $bench report --inputs "$inputs" --title "Picker replicas: $s" --out "$dir"
done
