#!/usr/bin/env bash
# Coverage-guided fuzzing (docs/fuzzing.md): builds the targets under fuzz/ with cargo fuzz
# (libFuzzer, the nightly toolchain) and runs each for SECONDS (default 60) from its committed
# seeds, in parallel with nothing else. Prints one `fuzz:` line per target; exits non-zero on
# any crash, leak or timeout libFuzzer reports (the input that caused it is kept under
# fuzz/artifacts/TARGET/ and printed).
#   e2e/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
mkdir -p target
seconds=${1:-60}
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(spec_files tar_upload multipart_upload webhook api_requests)

# Debug assertions on, as in the tests; no sanitizer (the code forbids unsafe; the C parts are
# libFuzzer's own) so that each run executes several times more inputs.
build=(cargo +nightly fuzz build --dev --sanitizer none)
# (Every target at once: `cargo fuzz build` takes one target or none.)
"${build[@]}" >/dev/null 2>target/build.log || { cat target/build.log >&2; exit 2; }

failed=0
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  cp corpus/"$t"/seed-* "$work"/
  mkdir -p artifacts/"$t"
  log=$(mktemp)
  set +e
  "${build[0]}" +nightly fuzz run --dev --sanitizer none "$t" "$work" -- \
    -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix=artifacts/"$t"/ -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  corpus=$(ls "$work" | wc -l)
  if [ "$rc" -eq 0 ]; then
    echo "fuzz: $t ok ${seconds}s runs=${runs:-0} cov=${cov:-0} corpus=$corpus"
  else
    failed=1
    echo "fuzz: $t FAILED (exit $rc) runs=${runs:-0} cov=${cov:-0}"
    grep -E 'panicked|ERROR|SUMMARY|Test unit written|Base64' "$log" | head -20 | sed 's/^/  /'
  fi
  rm -rf "$work" "$log"
done
exit "$failed"
