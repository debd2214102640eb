#!/usr/bin/env bash
# Runs the demo page (web/dist, from scripts/web-build.sh) in headless Chromium on WebGPU:
# the GPT-4-style demo layer, and a fixture of tests/fixtures/ for every preset (a small layer
# with transformers' float64 outputs; WEB_TEST_FIXTURES=all for all of them) through
# index.html?config=&weights=&input=.
# Fails unless every page reports PASS on the wgpu backend (a WebGPU adapter, not the CPU
# fallback) and each fixture also matches transformers (scripts/web_check.py).
#
#   scripts/web-test.sh [--screenshot PNG]     e.g. --screenshot docs/web-demo.png
#
# Chromium is Debian's package (installed when missing); it is driven over the DevTools
# protocol through --remote-debugging-pipe by scripts/cdp.py (Python stdlib only). The pages
# are served by python3 -m http.server on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

SHOT=""
if [ "${1:-}" = "--screenshot" ]; then
  SHOT="$(realpath -m "$2")"
fi

CHROMIUM="${CHROMIUM:-$(command -v chromium || true)}"
if [ -z "$CHROMIUM" ]; then
  echo "== apt-get install chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  CHROMIUM="$(command -v chromium)"
fi
"$CHROMIUM" --version

if [ ! -f web/dist/pkg/moe_kernels_bg.wasm ]; then
  bash scripts/web-build.sh
fi

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# The site plus the fixtures, served from one origin (the page fetches same-origin files only).
cp -r web/dist "$WORK/site"
mkdir -p "$WORK/site/layers"
# One fixture per preset (the first by name; a software adapter compiles each page's pipelines
# in ~20 s), or every fixture with WEB_TEST_FIXTURES=all.
names=()
if [ "${WEB_TEST_FIXTURES:-presets}" = "all" ]; then
  for cfg in tests/fixtures/*.config.json; do names+=("$(basename "$cfg" .config.json)"); done
else
  for preset in mixtral gpt4 qwen2_moe qwen3_moe deepseek_v3 gpt_oss switch nllb_moe; do
    first="$(ls tests/fixtures/"${preset}"_e*.config.json | sort | head -1)"
    names+=("$(basename "$first" .config.json)")
  done
fi
# The demo layer, plus a small one with bf16 activations (x as Uint16Array bits).
urls=("index.html" "index.html?tokens=33&hidden=128&ffn=96&seed=3&dtype=bf16&act=bf16")
for name in "${names[@]}"; do
  for part in config.json weights.safetensors input.safetensors; do
    cp "tests/fixtures/$name.$part" "$WORK/site/layers/"
  done
  urls+=("index.html?config=layers/$name.config.json&weights=layers/$name.weights.safetensors&input=layers/$name.input.safetensors")
done

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/site" >"$WORK/http.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 50); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/index.html')" 2>/dev/null; then break; fi
  sleep 0.1
done

echo "== headless Chromium (--enable-unsafe-webgpu) on ${#urls[@]} pages"
full=()
for u in "${urls[@]}"; do full+=("http://127.0.0.1:$PORT/$u"); done
args=(--chromium "$CHROMIUM" --timeout "${WEB_PAGE_TIMEOUT:-300}" --out "$WORK/results.json" --log "$WORK/chromium.log")
if [ -n "$SHOT" ]; then args+=(--screenshot "$SHOT"); fi
start=$(date +%s)
python3 scripts/cdp.py "${args[@]}" "${full[@]}" >"$WORK/pages.log" || true
echo "pages ran in $(( $(date +%s) - start )) s"
if [ ! -s "$WORK/results.json" ]; then
  cat "$WORK/pages.log"
  tail -30 "$WORK/chromium.log"
  echo "the DevTools driver wrote no results" >&2
  exit 1
fi
python3 scripts/web_check.py "$WORK/results.json" tests/fixtures
