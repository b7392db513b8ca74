#!/usr/bin/env bash
# The performance measurements of bench/results/perf.md: criterion
# micro-benchmarks, then index memory, decision time, the overhead through
# Envoy, scraping, scale-out and one picker core over ext_proc (about 40
# minutes on 2 cores). Run it on an idle machine:
# ratios within one run are what count, absolute times drift.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-tools.sh >/dev/null
cargo build --release --locked -p epp -p epp-bench --bins
mkdir -p target/perf
cargo bench --locked --bench picker -- --noplot 2>&1 | tee target/perf/micro.txt
target/release/epp-bench perf all --micro target/perf/micro.txt --out bench/results
