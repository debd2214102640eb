#!/usr/bin/env bash
# Builds the crate for the browser and writes the static site to web/dist/:
#   web/dist/index.html, main.js    the demo page (web/)
#   web/dist/pkg/moe_kernels.js     wasm-bindgen's ES module (--target web)
#   web/dist/pkg/moe_kernels_bg.wasm
# The library is compiled for wasm32-unknown-unknown with `--no-default-features --features
# web`: the wgpu backend on the browser's WebGPU plus the f64 CPU reference, no CUDA, no CLI.
# Installs what is missing: the wasm32 target (rustup) and wasm-bindgen-cli at exactly the
# wasm-bindgen version Cargo.lock pins, cached outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "== rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

# The CLI must be the version of the wasm-bindgen crate in Cargo.lock (their schemas must agree).
WB_VERSION="$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
if [ -z "$WB_VERSION" ]; then
  echo "Cargo.lock pins no wasm-bindgen" >&2
  exit 1
fi
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moe-kernels/wasm-bindgen-$WB_VERSION"
WB="$CACHE/bin/wasm-bindgen"
if [ ! -x "$WB" ] || [ "$("$WB" --version 2>/dev/null)" != "wasm-bindgen $WB_VERSION" ]; then
  echo "== cargo install wasm-bindgen-cli $WB_VERSION (into $CACHE)"
  # --locked first. Its lock file can name a dependency the registry no longer serves (0.2.130's
  # names webpki-roots 1.0.11, which is not there): then the newest compatible versions.
  cargo install --quiet --locked wasm-bindgen-cli --version "$WB_VERSION" --root "$CACHE" \
    || cargo install --quiet wasm-bindgen-cli --version "$WB_VERSION" --root "$CACHE"
fi
"$WB" --version

echo "== cargo rustc --target wasm32-unknown-unknown --no-default-features --features web (cdylib)"
cargo rustc --quiet --lib --release --target wasm32-unknown-unknown \
  --no-default-features --features web --crate-type cdylib
WASM=target/wasm32-unknown-unknown/release/moe_kernels.wasm

echo "== wasm-bindgen --target web -> web/dist"
rm -rf web/dist
mkdir -p web/dist/pkg
"$WB" --target web --no-typescript --out-dir web/dist/pkg "$WASM"
cp web/index.html web/main.js web/dist/
ls -l web/dist web/dist/pkg
