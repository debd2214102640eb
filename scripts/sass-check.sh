#!/usr/bin/env bash
# scripts/sass-check.sh -- SASS-level checks of the expert GEMM kernels (what ptxas -v cannot
# tell): every PTX module exactly as `moe ptx --dump` writes it is assembled for sm_90a
# (ptxas 12.9, -arch=sm_90a, a cubin) and disassembled (cuobjdump -sass); then, for every
# kernel `expert_gemm_*`, its MAIN LOOP must
#   1. have no local-memory traffic (no LDL / STL);
#   2. keep its 16-byte global loads: LDG.E.128 (FFMA kernels: the weight tile, plus the
#      activation tile with f32 activations; tensor-core kernels with register-staged
#      activations: the activation tile) and, in the tensor-core kernels, the cp.async copies
#      LDGSTS.E.BYPASS.128 (weights; with activation dtype == weight dtype also the
#      activations);
#   3. where the activation dtype equals the weight dtype (expert_gemm_f32,
#      expert_gemm_bf16_abf16, expert_gemm_f16_af16), convert nothing: no F2F / F2FP.
# The QUANTIZED kernels (expert_gemm_<fmt>_s<scale>[_a<A>], fmt fp8 | mxfp4 | int4; FFMA main
# loop, weights decoded on their way to shared memory) must, in their main loop,
#   4. have no LDL / STL;
#   5. read the packed weights with 16-byte loads: LDG.E.128 at least A + 1 times, where A is
#      the number of 16-byte activation loads per thread and k tile (QH activations of
#      A_SIZE bytes: fp8 QH = 16, 4-bit QH = 32, so A = QH A_SIZE / 16 = 4 | 2 | 8 | 4) and
#      the one more is the tile's 16 packed bytes (SASS cannot tell which LDG is which, so the
#      count must exceed the activations' alone);
#   6. decode there: FMUL by 2^120 (fp8, >= 16: one per e4m3 code), FMUL by 2^126 (mxfp4,
#      >= 32 per e2m1 nibble) or I2F(P).F32.S32 (int4, >= 32: q - z to f32).
# The HOPPER kernels (expert_gemm_wgmma_<w>_a<w>, kernels/expert_gemm_sm90.ptx, sm_90a; warp
# specialized, so the k loop of the consumers and that of the producer are different loops)
# must show
#   7. in the consumers' main loop (the NARROWEST backward-branch range holding the most
#      HGMMA: the k-tile loop, not the tile loop around it): at least 4 HGMMA (one per k16 of
#      the 64-wide k tile), WARPGROUP.ARRIVE (wgmma.fence) and WARPGROUP.DEPBAR (wait_group),
#      an mbarrier wait (SYNCS.PHASECHK), no UTMALDG, no LDL / STL, no F2F / F2FP;
#   8. in the producer's loop (the narrowest range holding the most UTMALDG): at least 3
#      UTMALDG (A and the two halves of B per k tile), the expect-tx arrive
#      (SYNCS.ARRIVE.TRANS64) and an mbarrier wait, no HGMMA, no LDL / STL;
#   9. both register reconfigurations (USETMAXREG.DEALLOC for the producer, .TRY_ALLOC for
#      the consumers: setmaxnreg was honoured).
# It also fails on LDL / STL anywhere in any kernel of any module.
# The kernels of the opt-in set MOE_CUDA_KERNELS=next (issue 15) must, in their main loop,
#   7. expert_decode_<W>[_a<A>] (weight-streaming decode GEMM): tensor-core variants (W = f16 /
#      bf16) HMMA >= 2, LDSM >= 2 and the ring's cp.async copies LDGSTS.E.BYPASS.128 >= 3
#      (two weight rows and the activations; >= 4 with f32 activations); A = W converts nothing
#      (no F2F / F2FP), A != W converts there (F2FP, the activations rounded to W); the f32
#      variants FFMA >= 64 and LDGSTS.128 >= 5 (four weight rows and the activations);
#   8. router_mma_<W>: HMMA >= 2, LDSM >= 2, LDGSTS.128 >= 4, no F2F / F2FP;
#   and none may have LDL / STL. gate_fused (no GEMM main loop) is checked as a whole: no LDL /
#   STL, at least one REDUX (the FAST select), no WARPSYNC.COLLECTIVE.
# It also fails on LDL / STL anywhere in any kernel of any module, and on WARPSYNC.COLLECTIVE
# anywhere: ptxas emits that slow fallback around a warp collective (shfl / redux / vote) it
# cannot prove convergent, which none of these kernels needs.
#
# MAIN-LOOP HEURISTIC. SASS has no loop markers, but every loop closes with a backward branch:
# a BRA (predicated or not) at address b whose target t <= b. Each backward branch spans the
# instruction range [t, b]. Counting the kernel's math instructions (HMMA for the tensor-core
# kernels, FFMA for the FFMA kernels) in each range, the main loop is the range with the most
# of them (ties: the widest). Inner loops (the k-steps over one shared-memory tile, when ptxas
# keeps them rolled) hold no more math than the loop around them, so the widest maximum is
# the outer k-tile loop, with its global loads, cp.async and shared stores; the epilogue's
# loops (bias, activation: a few FFMA, no HMMA) hold far fewer. Branch targets are read as
# hex addresses (`BRA 0x5b0`) or as labels (`BRA `(.L_x_3)`, with `.L_x_3:` lines).
# A negative control runs first: expert_gemm_bf16 (f32 activations rounded to bf16 on their way
# to shared memory) must show F2FP in its main loop, or the heuristic is broken.
#
# Tools (cached outside the clone, installed on first use from PyPI with pip --target):
#   ptxas      nvidia-cuda-nvcc-cu12==12.9.86       $CACHE/nvcc-12.9.86/nvidia/cuda_nvcc/bin
#   cuobjdump  nvidia-cuda-cuobjdump==13.5.37 and  $CACHE/cuobjdump-13.5.37/nvidia/cu13/bin
#              nvidia-cuda-nvdisasm==13.5.37 (cuobjdump -sass runs nvdisasm)
# CACHE = ${XDG_CACHE_HOME:-~/.cache}/moe-kernels. The moe binary: $MOE_BIN if set, else
# `cargo build --release --bin moe` (a no-op when it is fresh) and target/release/moe.
#
# Usage: scripts/sass-check.sh [WORKDIR]   (WORKDIR keeps the .ptx, .cubin and .sass files;
# default a temporary directory). Exit status 0 when every check passes, 1 otherwise (each
# failure names the module, the kernel and what was found).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moe-kernels"
NVCC_DIR="$CACHE/nvcc-12.9.86"
PTXAS="$NVCC_DIR/nvidia/cuda_nvcc/bin/ptxas"
OBJ_DIR="$CACHE/cuobjdump-13.5.37"
OBJ_BIN="$OBJ_DIR/nvidia/cu13/bin"

pip_install() { # target dir, packages...
  local dir="$1"
  shift
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" "$@"
}
if [ ! -x "$PTXAS" ]; then
  echo "== installing ptxas 12.9 (nvidia-cuda-nvcc-cu12) into $NVCC_DIR"
  pip_install "$NVCC_DIR" nvidia-cuda-nvcc-cu12==12.9.86
fi
if [ ! -x "$OBJ_BIN/cuobjdump" ] || [ ! -x "$OBJ_BIN/nvdisasm" ]; then
  echo "== installing cuobjdump and nvdisasm 13.5 into $OBJ_DIR"
  pip_install "$OBJ_DIR" nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
fi
export PATH="$OBJ_BIN:$PATH"
"$PTXAS" --version | tail -1
cuobjdump --version | tail -1

if [ -n "${MOE_BIN:-}" ]; then
  MOE="$MOE_BIN"
else
  cargo build --release --bin moe
  MOE=target/release/moe
fi

WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
"$MOE" ptx --dump "$WORK" >/dev/null
shopt -s nullglob
ptx=("$WORK"/*.ptx)
if [ "${#ptx[@]}" -eq 0 ]; then
  echo "sass-check: moe ptx --dump wrote no module" >&2
  exit 1
fi
for f in "${ptx[@]}"; do
  base="${f%.ptx}"
  "$PTXAS" -arch=sm_90a "$f" -o "$base.cubin" 2>"$base.ptxas.log" || {
    cat "$base.ptxas.log" >&2
    echo "sass-check: ptxas failed on $(basename "$f") for sm_90a" >&2
    exit 1
  }
  # nvdisasm warns about the ELF flavour on stderr; the listing is on stdout.
  cuobjdump -sass "$base.cubin" >"$base.sass" 2>"$base.cuobjdump.log" || {
    cat "$base.cuobjdump.log" >&2
    echo "sass-check: cuobjdump -sass failed on $(basename "$base").cubin" >&2
    exit 1
  }
done
echo "sass-check: ${#ptx[@]} module(s) assembled for sm_90a and disassembled in $WORK"

python3 - "$WORK" <<'PY'
import glob
import os
import re
import sys

work = sys.argv[1]
INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRA = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:!?U?P[T0-9]+\s*,\s*)?(?:0x([0-9a-f]+)|`\((\.L_x_\d+)\))")


def functions(path):
    """{kernel: [(address, instruction text)]} and each kernel's {label: address}."""
    funcs, labels, name, pending = {}, {}, None, []
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.search(r"Function\s*:\s*(\S+)", line)
        if m:
            name = m.group(1)
            funcs[name], labels[name], pending = [], {}, []
            continue
        if name is None:
            continue
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = INSN.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[name][lab] = addr
            pending = []
            funcs[name].append((addr, m.group(2)))
    return funcs, labels


def loops(insns, labels):
    """Every backward branch as (first address, last address)."""
    out = []
    for addr, text in insns:
        m = BRA.search(text)
        if not m:
            continue
        target = int(m.group(1), 16) if m.group(1) else labels.get(m.group(2))
        if target is not None and target <= addr:
            out.append((target, addr))
    return out


def count(insns, lo, hi, pattern):
    rx = re.compile(pattern)
    return sum(1 for a, t in insns if lo <= a <= hi and rx.search(t))


def main_loop(insns, labels, math):
    best = None
    for lo, hi in loops(insns, labels):
        key = (count(insns, lo, hi, math), hi - lo)
        if best is None or key > best[0]:
            best = (key, lo, hi)
    if best is None or best[0][0] == 0:
        return None
    return best[1], best[2]


QUANT = re.compile(r"expert_gemm_(fp8|mxfp4|int4)_s(f32|f16|bf16|e8m0)(?:_a(f16|bf16))?")
LDG128 = r"\bLDG\.E\.128\b"
DECODE = {
    "fp8": (r"\bFMUL\b.*\b1\.32922799578491587290e\+36\b", 16),  # x 2^120
    "mxfp4": (r"\bFMUL\b.*\b8\.50705917302346158658e\+37\b", 32),  # x 2^126
    "int4": (r"\bI2FP?\.F32\.S32\b", 32),
}


DECODE_K = re.compile(r"expert_decode_(f32|f16|bf16)(?:_a(f16|bf16))?")
ROUTER_MMA = re.compile(r"router_mma_(f16|bf16)")
LDSM = r"\bLDSM\.16\.M88\.4\b"
F2FP = r"\bF2FP\b"
HMMA = r"\bHMMA\b"
FFMA = r"\bFFMA\b"


def expectations(kernel):
    """(math opcode, {pattern: minimum count} in the main loop, conversions forbidden)."""
    d = DECODE_K.fullmatch(kernel)
    if d:
        w, a = d.group(1), d.group(2) or "f32"
        ldgsts = r"\bLDGSTS\.E\.BYPASS\.128\b"
        if w == "f32":
            return "FFMA", {FFMA: 64, ldgsts: 6 if a == "f32" else 5}, a == "f32"
        need = {HMMA: 2, LDSM: 2, ldgsts: 4 if a == "f32" else 3}
        if a != w:
            need[F2FP] = 1
        return "HMMA", need, a == w
    if ROUTER_MMA.fullmatch(kernel):
        return "HMMA", {HMMA: 2, LDSM: 2, r"\bLDGSTS\.E\.BYPASS\.128\b": 4}, True
    q = QUANT.fullmatch(kernel)
    if q:
        fmt, a = q.group(1), q.group(3) or "f32"
        qh = 16 if fmt == "fp8" else 32
        a_loads = qh * (4 if a == "f32" else 2) // 16
        pattern, n = DECODE[fmt]
        return "FFMA", {LDG128: a_loads + 1, pattern: n}, False
    m = re.fullmatch(r"expert_gemm_(f32|f16|bf16)(?:_a(f16|bf16))?", kernel)
    if not m:
        return None
    w, a = m.group(1), m.group(2) or "f32"
    ldg128 = r"\bLDG\.E\.128\b"
    ldgsts = r"\bLDGSTS\.E\.BYPASS\.128\b"
    if w == "f32":
        need = {ldg128: 2 if a == "f32" else 1}
        return "FFMA", need, a == w
    if a == w:
        return "HMMA", {ldgsts: 4}, True
    return "HMMA", {ldgsts: 2, ldg128: 2}, False


NAMES = {
    HMMA: "HMMA",
    FFMA: "FFMA",
    LDSM: "LDSM",
    F2FP: "F2FP",
    r"\bLDG\.E\.128\b": "LDG.E.128",
    r"\bLDGSTS\.E\.BYPASS\.128\b": "LDGSTS.128",
    DECODE["fp8"][0]: "FMUL 2^120",
    DECODE["mxfp4"][0]: "FMUL 2^126",
    DECODE["int4"][0]: "I2F.F32.S32",
}
CONVERT = r"\bF2FP?\b"
LOCAL = r"\b(LDL|STL)\b"

WGMMA = re.compile(r"expert_gemm_wgmma_(bf16|f16)_a(bf16|f16)")


def inner_loop(insns, labels, pattern):
    """The narrowest backward-branch range holding the most `pattern` instructions."""
    best = None
    for lo, hi in loops(insns, labels):
        key = (count(insns, lo, hi, pattern), -(hi - lo))
        if best is None or key > best[0]:
            best = (key, lo, hi)
    if best is None or best[0][0] == 0:
        return None
    return best[1], best[2]


def check_wgmma(module, kernel, insns, labels):
    """Checks 7-9 of the header; returns (report line, failures)."""
    bad = []
    cons = inner_loop(insns, labels, r"\bHGMMA\b")
    prod = inner_loop(insns, labels, r"\bUTMALDG\b")
    parts = []
    if cons is None:
        bad.append("no loop with HGMMA")
    else:
        lo, hi = cons
        n = {name: count(insns, lo, hi, pat) for name, pat in [
            ("HGMMA", r"\bHGMMA\b"), ("ARRIVE", r"\bWARPGROUP\.ARRIVE\b"),
            ("DEPBAR", r"\bWARPGROUP\.DEPBAR\b"), ("PHASECHK", r"\bSYNCS\.PHASECHK\b"),
            ("UTMALDG", r"\bUTMALDG\b"), ("LDL/STL", LOCAL), ("F2F/F2FP", CONVERT)]}
        for name, minimum in [("HGMMA", 4), ("ARRIVE", 1), ("DEPBAR", 1), ("PHASECHK", 1)]:
            if n[name] < minimum:
                bad.append(f"consumer loop: {n[name]} {name} (needs >= {minimum})")
        for name in ["UTMALDG", "LDL/STL", "F2F/F2FP"]:
            if n[name]:
                bad.append(f"consumer loop: {n[name]} {name} (needs 0)")
        parts.append(f"consumer loop {lo:#06x}..{hi:#06x}: " + ", ".join(f"{k} {v}" for k, v in n.items()))
    if prod is None:
        bad.append("no loop with UTMALDG")
    else:
        lo, hi = prod
        n = {name: count(insns, lo, hi, pat) for name, pat in [
            ("UTMALDG", r"\bUTMALDG\b"), ("ARRIVE.TRANS64", r"\bSYNCS\.ARRIVE\.TRANS64\b"),
            ("PHASECHK", r"\bSYNCS\.PHASECHK\b"), ("HGMMA", r"\bHGMMA\b"), ("LDL/STL", LOCAL)]}
        for name, minimum in [("UTMALDG", 3), ("ARRIVE.TRANS64", 1), ("PHASECHK", 1)]:
            if n[name] < minimum:
                bad.append(f"producer loop: {n[name]} {name} (needs >= {minimum})")
        for name in ["HGMMA", "LDL/STL"]:
            if n[name]:
                bad.append(f"producer loop: {n[name]} {name} (needs 0)")
        parts.append(f"producer loop {lo:#06x}..{hi:#06x}: " + ", ".join(f"{k} {v}" for k, v in n.items()))
    for what in ["USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC"]:
        if not any(what in t for _, t in insns):
            bad.append(f"no {what} (setmaxnreg ignored)")
    status = "FAIL: " + "; ".join(bad) if bad else "ok"
    return f"  {module:30} {kernel:30} " + "; ".join(parts) + f": {status}", bad


COLLECTIVE = r"\bWARPSYNC\.COLLECTIVE\b"
failures, checked = [], 0
wgmma_checked = 0
control_seen = False
quant_checked = set()
next_seen = set()
for sass in sorted(glob.glob(os.path.join(work, "*.sass"))):
    module = os.path.basename(sass)[: -len(".sass")]
    funcs, labels = functions(sass)
    if not funcs:
        failures.append(f"{module}: no kernel found in the SASS listing")
    for kernel, insns in funcs.items():
        local = [t for _, t in insns if re.search(LOCAL, t)]
        if local:
            failures.append(f"{module} {kernel}: local memory ({len(local)} LDL/STL, e.g. {local[0]})")
        coll = sum(1 for _, t in insns if re.search(COLLECTIVE, t))
        if coll:
            failures.append(f"{module} {kernel}: {coll} WARPSYNC.COLLECTIVE (a warp collective "
                            "ptxas cannot prove convergent)")
        if kernel == "gate_fused":
            next_seen.add("gate_fused")
            redux = sum(1 for _, t in insns if re.search(r"\bREDUX\b", t))
            print(f"  {module:30} {kernel:30} whole kernel: REDUX {redux}, WARPSYNC.COLLECTIVE "
                  f"{coll}, LDL/STL {len(local)}: {'ok' if redux and not coll and not local else 'FAIL'}")
            if not redux:
                failures.append(f"{module} {kernel}: no REDUX (the FAST select's L = 32 picks)")
        if DECODE_K.fullmatch(kernel):
            next_seen.add("expert_decode")
        if ROUTER_MMA.fullmatch(kernel):
            next_seen.add("router_mma")
        if WGMMA.fullmatch(kernel):
            line, bad = check_wgmma(module, kernel, insns, labels[kernel])
            print(line)
            checked += 1
            wgmma_checked += 1
            failures.extend(f"{module} {kernel}: {b}" for b in bad)
            continue
        exp = expectations(kernel)
        if exp is None:
            continue
        op, need, no_convert = exp
        math = rf"\b{op}\b"
        span = main_loop(insns, labels[kernel], math)
        if span is None:
            failures.append(f"{module} {kernel}: no loop with {op} found")
            continue
        lo, hi = span
        n_math = count(insns, lo, hi, math)
        n_local = count(insns, lo, hi, LOCAL)
        n_conv = count(insns, lo, hi, CONVERT)
        found = {p: count(insns, lo, hi, p) for p in need}
        bad = []
        if n_local:
            bad.append(f"{n_local} LDL/STL")
        for p, minimum in need.items():
            if found[p] < minimum:
                bad.append(f"{found[p]} {NAMES[p]} (needs >= {minimum})")
        if no_convert and n_conv:
            bad.append(f"{n_conv} F2F/F2FP (activation dtype == weight dtype: no conversion)")
        q = QUANT.fullmatch(kernel)
        if q:
            quant_checked.add(q.group(1))
        if kernel == "expert_gemm_bf16":
            control_seen = True
            if n_conv == 0:
                bad.append("negative control: the f32 activations' F2FP rounding is not seen "
                           "in the main loop, so the heuristic found the wrong loop")
        loads = ", ".join(f"{NAMES[p]} {found[p]}" for p in need if p != math)
        status = "FAIL: " + "; ".join(bad) if bad else "ok"
        print(f"  {module:30} {kernel:30} main loop {lo:#06x}..{hi:#06x}: "
              f"{op} {n_math}, {loads}, F2F/F2FP {n_conv}, "
              f"LDL/STL {n_local}: {status}")
        checked += 1
        if bad:
            failures.append(f"{module} {kernel}: " + "; ".join(bad))
for fmt in sorted(set(DECODE) - quant_checked):
    failures.append(f"no quantized {fmt} kernel was dumped")
if wgmma_checked == 0:
    failures.append("no Hopper kernel (expert_gemm_wgmma_*) was dumped")
for k in sorted({"expert_decode", "router_mma", "gate_fused"} - next_seen):
    failures.append(f"no {k} kernel (MOE_CUDA_KERNELS=next) was dumped")
if not control_seen:
    failures.append("expert_gemm_bf16 (the negative control) was not dumped")
if checked == 0:
    failures.append("no expert_gemm kernel was checked")
for f in failures:
    print(f"sass-check: {f}", file=sys.stderr)
print(f"sass-check: {checked} GEMM kernel(s) checked, {len(failures)} failure(s)")
sys.exit(1 if failures else 0)
PY
