#!/usr/bin/env bash
# The one prepared GPU check (DESIGN.md section 6).
#
#   scripts/device-check.sh prepare   # here (no GPU): build release test/bench binaries,
#                                     # bundle them into device-bin/bundle.tgz (git-ignored)
#   scripts/device-check.sh run       # on the lent GPU machine (no Rust toolchain there):
#                                     # CUDA tests, compute-sanitizer, wgpu on NVIDIA's Vulkan,
#                                     # short benches, peer script; logs under $OUT, table last.
# Knobs: DC_BUDGET (seconds, 420), DC_PRESETS, DC_SKIP_PEERS, DC_SAN (stage tests under the
# sanitizer), DC_TOOLS (sanitizer tools), DC_CASES (property cases on the GPU, 300), DC_NEXT
# (1: also run everything that the opt-in kernel set changes with MOE_CUDA_KERNELS=next, the
# default; 0: the verified set only).
#
# Two kernel sets (src/cuda/mod.rs KernelSet): the verified one (default) and
# MOE_CUDA_KERNELS=next (issue 15: weight-streaming decode GEMM, one-launch gate, tensor-core
# router; assembled and checked offline, never run on a GPU before this script). Each is run
# against the CPU reference (the test binaries, the demo) and timed (moe bench): the verified
# set's steps keep their names, the next set's are prefixed `next-`; its bench points go to
# $OUT/ours-next.jsonl and $OUT/compare-next.txt. The lib's next-vs-verified device tests
# (`next-lib-device`: decode bitwise equal to the tiled GEMM, fused gate equal to the launch
# sequence, tensor-core router within the reference's tolerance) run first of all: they are
# what decides whether `next` may become the default. Sized for one call with both sets:
# DC_BUDGET=540 (the device call's own limit is 600 s).
#
# Carry `device-bin` (and `.gl` for the Vulkan loader, see the device README) with the call:
#   run(command="bash scripts/device-check.sh run", carry=["device-bin", ".gl"])
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"

if [ "$MODE" = prepare ]; then
  set -e
  rm -rf device-bin && mkdir -p device-bin/bin
  cargo test --release --no-run --message-format=json 2>/dev/null \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] and m["target"]["kind"] in (["test"], ["lib"]):
        name = "lib" if m["target"]["kind"] == ["lib"] else m["target"]["name"]
        print(name, m["executable"])
'  | grep -v -E '^(cli|config|environment) ' \
    | while read -r name exe; do cp "$exe" "device-bin/bin/test-$name"; done
  cargo build --release --bin moe --example cuda_runtime --example wgpu_runtime
  cp target/release/moe device-bin/bin/moe
  cp target/release/examples/cuda_runtime target/release/examples/wgpu_runtime device-bin/bin/
  strip device-bin/bin/* 2>/dev/null || true
  # Tests read fixtures relative to the crate root, which travels with the working tree.
  tar -C device-bin -czf device-bin/bundle.tgz bin && rm -rf device-bin/bin
  ls -la device-bin
  exit 0
fi

# ---------------------------------------------------------------- on the GPU machine
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
# At most 8 files come back from $OUT: step logs go to L and are bundled at the end.
L=/tmp/dc-logs
rm -rf "$L" && mkdir -p "$L"
LOG="$OUT/device-check.log"
: >"$LOG"
B=/tmp/moe-bin
rm -rf "$B" && mkdir -p "$B" && tar -C /tmp -xzf device-bin/bundle.tgz && mv /tmp/bin/* "$B"/
if ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$ICD" ] && export VK_DRIVER_FILES="${VK_DRIVER_FILES:-$ICD}" __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
export XDG_RUNTIME_DIR=/tmp/xdg && mkdir -p -m 0700 "$XDG_RUNTIME_DIR"
export CARGO_MANIFEST_DIR="$PWD"
# Issue 12: run the (unverified until this run) f16 / bf16 activation kernels on CUDA.
export MOE_CUDA_ACT16=1
# Quantized expert weights (FP8 block, MXFP4, INT4) on CUDA: unverified until this run, refused
# without the variable (cuda::quant_enabled).
export MOE_CUDA_QUANT=1
declare -a TABLE
row() { TABLE+=("$(printf '%-34s %s' "$1" "$2")"); }

# The whole run stays inside DC_BUDGET seconds (the device call's own limit is larger): a step
# gets at most what is left, and steps past the budget are skipped, not started.
DC_BUDGET="${DC_BUDGET:-420}"
step() { # name, timeout seconds, command...
  local name="$1" t="$2"; shift 2
  local left=$((DC_BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then
    row "$name" "skipped (budget spent)"
    return 0
  fi
  [ "$t" -gt "$left" ] && t=$left
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$t" "$@" >"$L/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$L/$name.log" >>"$LOG"
  local res
  res=$(grep -E "^test result:" "$L/$name.log" | tail -1)
  row "$name" "rc=$rc $((SECONDS - start))s ${res#test result: }"
  return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$LOG" 2>&1
# Most important first: the whole run must fit one call (the order is the priority).
NEXT="${DC_NEXT:-1}"
step info 30 "$B/moe" info
step demo-cuda 60 "$B/moe" demo --backend cuda
if [ "$NEXT" = 1 ]; then
  # The next set's own device tests (each compares next with verified on the same inputs),
  # then the demo with next.
  step next-lib-device 120 env MOE_CUDA_KERNELS=next "$B/test-lib" cuda::expert_decode \
    cuda::gate::tests::fused cuda::router_mma --test-threads=1 --nocapture
  step next-demo-cuda 60 env MOE_CUDA_KERNELS=next "$B/moe" demo --backend cuda
fi
step demo-wgpu 60 "$B/moe" demo --backend wgpu
# Issue 12: a runtime's own stream / device, bf16 activations, 100 device-resident forwards.
step example-cuda-runtime 60 "$B/cuda_runtime"
step example-wgpu-runtime 60 "$B/wgpu_runtime"
# Quantized weights, ahead of the other test binaries (MOE_CUDA_QUANT=1 above): tests/quant.rs
# runs every backend through `Backend`; then the library's device test of every quantized
# kernel variant (cuda::expert_gemm::tests::quantized_*).
if [ -x "$B/test-quant" ]; then
  step test-quant 90 "$B/test-quant" --test-threads=8 --nocapture
else
  row test-quant "missing (no tests/quant.rs in this build)"
fi
step lib-quant-cuda 90 "$B/test-lib" cuda::expert_gemm::tests::quantized --test-threads=1 --nocapture
# Issue 15, Hopper grouped GEMM (kernels/expert_gemm_sm90.ptx: wgmma + TMA, sm_90a only, opt-in
# MOE_CUDA_KERNELS=next): its device test (forces the kernel; T = 1, 7, 300, odd H/F, an empty
# expert, batch invariance), the CUDA unit tests and the 16-bit-activation layer tests (runtime
# API, CUDA-graph replay: where the kernel applies) with the opt-in, then the prefill expert
# GEMM timed with and without it in this run (bf16 weights and activations).
step hopper-lib 90 env MOE_CUDA_KERNELS=next "$B/test-lib" cuda:: --test-threads=4 --nocapture
step hopper-runtime 60 env MOE_CUDA_KERNELS=next "$B/test-runtime" --test-threads=8
step hopper-cuda-graph 60 env MOE_CUDA_KERNELS=next "$B/test-cuda_graph" --test-threads=4
step hopper-bench-verified 90 "$B/moe" bench --backend cuda --preset mixtral,deepseek_v3 --tokens 4096 --dtype bf16 --iters 10 --warmup 2 --dense 8192
step hopper-bench-next 90 env MOE_CUDA_KERNELS=next "$B/moe" bench --backend cuda --preset mixtral,deepseek_v3 --tokens 4096 --dtype bf16 --iters 10 --warmup 2 --dense 8192
# Every test binary: CPU, CUDA and (with NVIDIA's Vulkan driver) wgpu.
for t in "$B"/test-*; do
  [ "$(basename "$t")" = test-quant ] && continue
  step "$(basename "$t")" 60 "$t" --test-threads=8
done
# The next set on every test binary: the whole suite (stage tests, layer tests with bitwise
# determinism and batch invariance, presets, the CUDA-graph capture and replay) against the
# reference with MOE_CUDA_KERNELS=next.
if [ "$NEXT" = 1 ]; then
  for t in "$B"/test-*; do
    [ "$(basename "$t")" = test-quant ] && continue
    step "next-$(basename "$t")" 60 env MOE_CUDA_KERNELS=next "$t" --test-threads=8
  done
fi
# Ours (both sets) and the PyTorch peers on the same card, then one comparison table each.
BENCH=(bench --backend cuda --preset "${DC_PRESETS:-mixtral,deepseek_v3,qwen3_30b_a3b}" --tokens 1,64,4096 --dtype bf16 --iters 10 --warmup 2 --dense 8192 --json)
step bench-cuda 150 "$B/moe" "${BENCH[@]}"
grep '^{' "$L/bench-cuda.log" >"$OUT/ours.jsonl"
if [ "$NEXT" = 1 ]; then
  step next-bench-cuda 150 env MOE_CUDA_KERNELS=next "$B/moe" "${BENCH[@]}"
  grep '^{' "$L/next-bench-cuda.log" >"$OUT/ours-next.jsonl"
fi
if [ -f bench/peers.py ] && [ -z "${DC_SKIP_PEERS:-}" ]; then
  step peers 150 python3 bench/peers.py --out "$OUT/peers.jsonl" --budget-s 120
  step compare 30 python3 bench/compare.py "$OUT/ours.jsonl" "$OUT/peers.jsonl"
  cp "$L/compare.log" "$OUT/compare.txt"
  if [ "$NEXT" = 1 ] && [ -s "$OUT/ours-next.jsonl" ]; then
    step next-compare 30 python3 bench/compare.py "$OUT/ours-next.jsonl" "$OUT/peers.jsonl"
    cp "$L/next-compare.log" "$OUT/compare-next.txt"
  fi
fi
# Issue 12: the same points with f32 activations (the bench above runs bf16 activations).
step bench-act-f32-cuda 120 "$B/moe" bench --backend cuda --preset mixtral,deepseek_v3 --tokens 1,64,4096 --dtype bf16 --act f32 --iters 10 --warmup 2
step bench-f32-cuda 90 "$B/moe" bench --backend cuda --preset mixtral --tokens 1,4096 --dtype f32 --iters 5 --warmup 1 --routing both
step bench-wgpu 90 "$B/moe" bench --backend wgpu --preset mixtral --tokens 1,32,4096 --dtype f32 --iters 5 --warmup 1 --dense 4096
# Issue 15, WGSL decode on NVIDIA's Vulkan: the split-k GEMV (automatic split count) against one
# split, bf16 weights at T = 1 and 32 (the split count never changes a bit; it only sets the
# loads in flight; columns %copy and %read).
step bench-wgpu-decode 60 "$B/moe" bench --backend wgpu --preset qwen3_30b_a3b,mixtral --tokens 1,32 --iters 20 --warmup 3
step bench-wgpu-decode-s1 60 env MOE_WGPU_GEMV_SPLITS=1 "$B/moe" bench --backend wgpu --preset qwen3_30b_a3b,mixtral --tokens 1,32 --iters 20 --warmup 3
# Issue 6 on the GPU: the property suite at a larger size and the 10,000-forward memory test
# (CUDA included), then every compute-sanitizer tool (DC_TOOLS to choose).
step properties-cuda 120 env MOE_PROPTEST_CASES="${DC_CASES:-300}" "$B/test-properties" --nocapture
step memory-10k 120 "$B/test-memory" --ignored --nocapture
# compute-sanitizer on the CUDA unit tests and two stage tests (the lib's tests include the
# next set's device tests, which launch the next kernels whatever the variable says).
for tool in ${DC_TOOLS:-memcheck racecheck initcheck synccheck}; do
  step "san-$tool-lib" 90 compute-sanitizer --tool "$tool" --error-exitcode 9 "$B/test-lib" cuda:: --test-threads=1
  for s in ${DC_SAN:-gate permute}; do
    step "san-$tool-$s" 90 compute-sanitizer --tool "$tool" --error-exitcode 9 "$B/test-$s" --test-threads=1
    if [ "$NEXT" = 1 ]; then
      step "next-san-$tool-$s" 90 env MOE_CUDA_KERNELS=next compute-sanitizer --tool "$tool" --error-exitcode 9 "$B/test-$s" --test-threads=1
    fi
  done
done
tar -C /tmp -czf "$OUT/logs.tgz" dc-logs
echo
echo "==== device-check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null))"
printf '%s\n' "${TABLE[@]}"
