#!/usr/bin/env bash
# Builds the `candle-cuda` feature and its test binary (tests/candle.rs) on a machine with no
# GPU and no CUDA toolkit, e.g. to carry the binary to a lent GPU machine:
#  - nvcc 13.0, cicc, the CUDA headers and libcudart from PyPI wheels (cached outside the clone;
#    13.0 matches the lent machines' driver: PTX from a newer nvcc does not load on it);
#  - link-time stubs of libcuda, libcublas, libcublasLt, libcurand and libnvrtc (candle-core
#    makes cudarc link them; the stubs carry the real libraries' SONAMEs, so the binary loads
#    the real ones where it runs). Each stub function returns an error code, so with
#    `--run` the binary runs here against them: the CPU tests run, the CUDA test is skipped.
# Usage: scripts/candle-cuda.sh [--run]. Prints where the test binary is. About 15 minutes on
# 2 cores the first time (candle-kernels' nvcc step), seconds after that.
set -euo pipefail
cd "$(dirname "$0")/.."

# MOE_CUDA_WHEELS: where the wheels are (or go); by default a cache outside the clone.
CACHE="${MOE_CUDA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-kernels/cu13-13.0}"
CU="$CACHE/nvidia/cu13"
if [ ! -x "$CU/bin/nvcc" ] || [ ! -x "$CU/nvvm/bin/cicc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$CACHE" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
export CUDA_HOME="$CU" CUDA_PATH="$CU" PATH="$CU/bin:$PATH"
# No GPU to ask: the compute capability candle-kernels builds for (90 = H100 / H200).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -2

echo "== the library with candle-cuda (candle-kernels: nvcc on every .cu file)"
cargo build --release --features candle-cuda --lib

echo "== link-time stubs for the libraries cudarc links"
STUBS=target/cuda-link-stubs
mkdir -p "$STUBS/run"
# The linking build of cudarc is the one whose object code calls cuInit directly.
RLIB=""
for f in target/release/deps/libcudarc-*.rlib; do
  if nm "$f" 2>/dev/null | grep ' U cuInit$' >/dev/null; then RLIB="$f"; fi
done
[ -n "$RLIB" ] || { echo "no dynamically linking cudarc build found" >&2; exit 1; }
nm "$RLIB" 2>/dev/null | awk '$1 == "U" { print $2 }' | sort -u >"$STUBS/symbols.txt"
stub() { # stub NAME SONAME REGEX RETURN
  grep -E "$3" "$STUBS/symbols.txt" | grep -vE "${5:-^$}" |
    sed "s/.*/int &(void) { return $4; }/" >"$STUBS/$1.c"
  gcc -shared -fPIC -Wl,-soname,"$2" -o "$STUBS/lib$1.so" "$STUBS/$1.c"
  ln -sf "../lib$1.so" "$STUBS/run/$2"
}
stub cuda libcuda.so.1 '^cu[A-Z]' 100 # CUDA_ERROR_NO_DEVICE
stub cublas libcublas.so.13 '^cublas' 1 '^cublasLt'
stub cublasLt libcublasLt.so.13 '^cublasLt' 1
stub curand libcurand.so.10 '^curand' 1
stub nvrtc libnvrtc.so.13 '^nvrtc' 1
ln -sf "$CU/lib/libcudart.so.13" "$STUBS/libcudart.so"
ln -sf "$CU/lib/libcudart.so.13" "$STUBS/run/libcudart.so.13"

echo "== tests/candle.rs with candle-cuda"
LIBRARY_PATH="$STUBS" cargo test --release --features candle-cuda --test candle --no-run 2>&1 |
  tee "$STUBS/build.log" | tail -1
BIN=$(sed -n 's/.*Executable tests\/candle.rs (\(.*\))/\1/p' "$STUBS/build.log")
echo "test binary: $BIN (needs libcuda.so.1, libcudart.so.13, libcublas.so.13, libcublasLt.so.13,"
echo "libcurand.so.10 and libnvrtc.so.13 where it runs; $CU/lib has libcudart)"
if [ "${1:-}" = "--run" ]; then
  LD_LIBRARY_PATH="$PWD/$STUBS/run" "$BIN"
fi
