#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (libFuzzer + AddressSanitizer, nightly
# toolchain). Not part of CI: a run takes minutes per target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 600; TARGET defaults to every target.
# FUZZ_JOBS=2 runs two targets at a time (default 1); FUZZ_NICE sets the
# niceness (default 15) so a run on a shared machine yields to builds.
#
# Each target keeps its working corpus in fuzz/corpus/<target>/ (only the
# seed-* files there are committed), writes crashes to
# fuzz/artifacts/<target>/ and its full log to fuzz/logs/<target>.log. The
# final libFuzzer statistics of every target are printed at the end; the
# script exits non-zero when any target found a crash, timeout or OOM.
# Reproduce a finding with: cd fuzz && cargo +nightly fuzz run <target> <file>
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-600}
shift || true
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=(request_body prometheus_text endpoints_file extproc_stream kv_events_decode)
fi
jobs=${FUZZ_JOBS:-1}
niceness=${FUZZ_NICE:-15}

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: the nightly toolchain is required (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

mkdir -p logs
nice -n "$niceness" cargo +nightly fuzz build

run_one() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "fuzz.sh: $t for ${seconds}s ($(date -u +%FT%TZ))"
  # -max_len bounds inputs (seeds larger than it are truncated); -timeout
  # flags any single input that takes more than 10 s; -rss_limit_mb any
  # that needs more than 2 GiB.
  nice -n "$niceness" cargo +nightly fuzz run "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"logs/$t.log" 2>&1 || true
}

pids=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
    wait -n || true
  done
done
wait

status=0
for t in "${targets[@]}"; do
  echo
  echo "== $t"
  # The last status line (#runs, cov, ft, corp, exec/s) and the final stats.
  grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "logs/$t.log" | tail -n 1 || true
  grep -E '^stat::' "logs/$t.log" || true
  findings=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | sort)
  corpus=$(find "corpus/$t" -type f | wc -l)
  echo "corpus files: $corpus"
  if [ -n "$findings" ]; then
    status=1
    echo "FINDINGS:"
    echo "$findings"
    grep -E -m 3 'panicked at|ERROR: (libFuzzer|AddressSanitizer)' "logs/$t.log" || true
  else
    echo "findings: none"
  fi
done
exit "$status"
