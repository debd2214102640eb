#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ for a fixed time each and prints one summary line per
# target (executions, coverage, corpus, crashes). Exit status 1 when any target crashed.
#
#   scripts/fuzz.sh                 # 60 s per target, every target
#   scripts/fuzz.sh 10              # 10 s per target (CI)
#   scripts/fuzz.sh 300 routing     # only the named targets
#
# Works with the stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags
# (AddressSanitizer, sanitizer coverage). Installs cargo-fuzz when missing (about one minute
# of build time). Needs a C++ compiler for libFuzzer (Debian: apt-get install build-essential).
#
# Crashes land in fuzz/artifacts/<target>/; reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-...
# and minimize it with `cargo fuzz tmin <target> <file>`. New corpus entries go to
# fuzz/corpus/<target>/ next to the committed seed-* files (git ignores all but the seeds).
# Logs: fuzz/target/fuzz-logs/<target>.log.
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-60}"
shift || true
case "$SECONDS_PER_TARGET" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;;
esac

export RUSTC_BOOTSTRAP=1
# The CPU reference parallelises over rows with rayon; on fuzz-sized inputs threads only cost.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz not found: installing it (cargo install cargo-fuzz --locked, ~1 min)"
  start=$(date +%s)
  cargo install cargo-fuzz --locked || { echo "cargo install cargo-fuzz failed" >&2; exit 2; }
  echo "cargo-fuzz installed in $(( $(date +%s) - start )) s"
fi
if ! command -v c++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1 \
  && ! command -v g++ >/dev/null 2>&1; then
  echo "no C++ compiler (libFuzzer needs one): apt-get install -y build-essential" >&2
  exit 2
fi

if [ "$#" -gt 0 ]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(cargo fuzz list --fuzz-dir fuzz)
fi

echo "building fuzz targets: ${TARGETS[*]}"
start=$(date +%s)
for t in "${TARGETS[@]}"; do
  cargo fuzz build --fuzz-dir fuzz "$t" || { echo "build of fuzz target $t failed" >&2; exit 2; }
done
echo "built in $(( $(date +%s) - start )) s"

LOGS=fuzz/target/fuzz-logs
mkdir -p "$LOGS"
SUMMARY=()
FAILED=0
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  before=$(find "fuzz/artifacts/$t" -maxdepth 1 -type f | sort)
  log="$LOGS/$t.log"
  echo "fuzzing $t for ${SECONDS_PER_TARGET} s (log: $log)"
  cargo fuzz run --fuzz-dir fuzz "$t" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=20 -rss_limit_mb=4096 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$runs" ] || runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  after=$(find "fuzz/artifacts/$t" -maxdepth 1 -type f | sort)
  new=$(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | sed '/^$/d')
  crashes=$(printf '%s\n' "$new" | sed '/^$/d' | wc -l)
  line="$t: ${runs:-0} runs${secs:+ in ${secs} s}, ${cov:-no coverage line}, crashes $crashes"
  if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
    FAILED=1
    why=$(grep -m1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log")
    msg=$(grep -m1 -A1 "panicked at" "$log" | tail -1)
    line="$line (exit $rc): ${why:-see $log}${msg:+ -- $msg}"
    for f in $new; do line="$line; input $f"; done
  fi
  SUMMARY+=("$line")
done

echo
echo "== fuzz summary (${SECONDS_PER_TARGET} s per target) =="
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
