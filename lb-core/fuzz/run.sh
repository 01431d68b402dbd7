#!/usr/bin/env bash
# Runs each fuzz target for a bounded time and reports executions and crashes.
#
#   lb-core/fuzz/run.sh [SECONDS_PER_TARGET]      (default 60)
#   FUZZ_TARGETS="config" lb-core/fuzz/run.sh 10  (a subset)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`): the
# sanitizer and coverage flags cargo-fuzz adds are nightly-only. Each target's
# corpus grows in fuzz/corpus/TARGET (ignored by git) from the checked-in seeds
# in fuzz/seeds/TARGET; a crash, hang or out-of-memory input lands in
# fuzz/artifacts/TARGET. Exits non-zero if any target found one or did not
# finish cleanly. Not part of CI: CI only builds the crate (see README, Fuzzing).
set -euo pipefail
fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
cd "$fuzz_dir/.." # cargo fuzz looks for ./fuzz

secs="${1:-60}"
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;; esac
read -r -a targets <<<"${FUZZ_TARGETS:-proxy_header config udp_flow_ops}"

# Build first, outside the per-target time bound (a cold build takes minutes).
for t in "${targets[@]}"; do cargo +nightly fuzz build "$t"; done
failed=0
for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t" artifacts="fuzz/artifacts/$t" log="fuzz/artifacts/$t.log"
  mkdir -p "$corpus" "$artifacts"
  before=$(find "$artifacts" -type f | wc -l)
  extra=()
  [ -f "fuzz/dicts/$t.dict" ] && extra+=("-dict=fuzz/dicts/$t.dict")
  # -max_total_time bounds libFuzzer; `timeout` bounds everything else
  # (startup, a wedged process). -timeout turns a slow input into a finding.
  rc=0
  timeout --kill-after=10 "$((secs + 120))" \
    cargo +nightly fuzz run "$t" "$corpus" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -print_final_stats=1 "${extra[@]}" \
    >"$log" 2>&1 || rc=$?
  crashes=$(($(find "$artifacts" -type f | wc -l) - before))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 || true)
  printf '%-14s execs=%-10s crashes=%d rc=%d corpus=%s\n' \
    "$t" "${execs:-?}" "$crashes" "$rc" "$(find "$corpus" -type f | wc -l) files"
  [ -n "$done_line" ] && printf '  %s\n' "$done_line"
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    echo "  FAILED: see $log and $artifacts" >&2
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -n5 >&2 || true
  fi
done
exit "$failed"
