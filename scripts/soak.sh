#!/usr/bin/env bash
# The long reliability runs, one after the other, with one summary line per part:
#   1. scripts/fuzz.sh 600            (when it exists)
#   2. the property tests with MOE_PROPTEST_CASES=3000 (override: SOAK_CASES) and a fresh seed
#      (override: MOE_PROPTEST_SEED; the seed is printed so a failure can be rerun)
#   3. the memory test: 10,000 forwards per backend, RSS flat (tests/memory.rs, --ignored)
# Logs go to $SOAK_LOG_DIR (default target/soak). Exits 1 if any part failed.
# Knobs: SOAK_FUZZ_SECONDS (default 600, per fuzz target), SOAK_FUZZ=0 skips the fuzz part.
#
# Usage: scripts/soak.sh            (from anywhere; runs in the repository root)
set -u
cd "$(dirname "$0")/.."

export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
cases="${SOAK_CASES:-3000}"
seed="${MOE_PROPTEST_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
logs="${SOAK_LOG_DIR:-target/soak}"
mkdir -p "$logs"

summary=()
failed=0

# part NAME LOG COMMAND...: runs COMMAND with its output in LOG, records PASS/FAIL and time.
part() {
    local name="$1" log="$2"
    shift 2
    echo "== $name: $*" >&2
    local start end rc
    start=$(date +%s)
    "$@" >"$log" 2>&1
    rc=$?
    end=$(date +%s)
    local status=PASS
    if [ "$rc" -ne 0 ]; then
        status=FAIL
        failed=1
        tail -n 40 "$log" >&2
    fi
    summary+=("$(printf '%-4s %-34s %5ds  (exit %d, log %s)' "$status" "$name" "$((end - start))" "$rc" "$log")")
}

fuzz_secs="${SOAK_FUZZ_SECONDS:-600}"
if [ "${SOAK_FUZZ:-1}" = 0 ]; then
    summary+=("SKIP fuzz (SOAK_FUZZ=0)")
elif [ -f scripts/fuzz.sh ]; then
    part "fuzz ($fuzz_secs s per target)" "$logs/fuzz.log" bash scripts/fuzz.sh "$fuzz_secs"
else
    summary+=("SKIP fuzz (scripts/fuzz.sh not found)")
fi

part "properties ($cases cases, seed $seed)" "$logs/properties.log" \
    env MOE_PROPTEST_CASES="$cases" MOE_PROPTEST_SEED="$seed" \
    cargo test --release --test properties -- --nocapture

part "memory (10,000 forwards)" "$logs/memory.log" \
    cargo test --release --test memory -- --ignored --nocapture

# The numbers worth reading without opening the logs.
grep -h '^\[.* property\]' "$logs/properties.log" 2>/dev/null || true
grep -h '^\[memory\]' "$logs/memory.log" 2>/dev/null || true

echo "---- soak summary"
for line in "${summary[@]}"; do
    echo "$line"
done
exit "$failed"
