#!/usr/bin/env bash
# The routing comparison of bench/results: every workload through a fresh
# local stack (simulated vLLM pods, the picker, Envoy) per policy. Takes about
# half an hour on 2 cores; each report records its exact command line.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-tools.sh >/dev/null
cargo build --release --locked -p epp -p epp-bench --bins
bench=target/release/epp-bench
out=bench/results

# 150 groups x 5 prompts, 4000-token shared system prompts, 8 pods whose KV
# caches (8192 blocks = 131k tokens each) cannot hold every group at once.
# Open loop at 16 req/s: the same offered load for every policy, near what
# round robin (every request a cache miss) can serve.
$bench compare shared-prefix --pods 8 --groups 150 --prompts-per-group 5 \
  --system-tokens 4000 --question-tokens 100 --output-tokens 16 --rate 16 \
  --out $out/shared-prefix

# Chat sessions that resend their whole history every turn.
$bench compare multi-turn --pods 8 --sessions 100 --turns 5 --system-tokens 1000 \
  --user-tokens 200 --output-tokens 64 --concurrency 16 \
  --policies epp-default,gie-default,prefix-only,queue-only,random,round-robin,envoy-rr \
  --out $out/multi-turn

# 220 KB prompts up the concurrency ladder: what the picker adds to time to
# first token (a fast simulator, so the gateway path is what differs).
$bench compare long-prompt --pods 4 --prompt-kb 220 --ladder 20,60,100,150 \
  --requests-per-step 300 --output-tokens 4 \
  --sim-arg=--prefill-us-per-token=0.5 --sim-arg=--kv-blocks=65536 --sim-arg=--max-num-seqs=256 \
  --sim-arg=--max-model-len=131072 \
  --policies epp-default,envoy-rr --out $out/long-prompt

# The seed deployment's table on one simulated pod: directly, and through
# Envoy + the picker.
$bench compare seed --pods 1 --policies direct,epp-default --out $out/seed
