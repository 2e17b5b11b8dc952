#!/usr/bin/env bash
# Builds the libFuzzer harnesses (test/fuzz/) in build-fuzz/ with clang, ASan and UBSan,
# and runs each for SECONDS (default 600), starting from the committed seeds in
# test/fuzz/corpus/<harness>/. New corpus entries go to a temporary directory, so the
# committed seeds stay small; crash, leak and timeout inputs are kept in
# build-fuzz/artifacts/<harness>/ for reproducing (see test/fuzz/README.md).
#   bash scripts/fuzz.sh [seconds] [harness...]     # harness: parser frame queue gzip request
# Prints one line per harness, "fuzz_<h>: ok, N executions in S s" or
# "fuzz_<h>: FINDING ..."; exits non-zero on any finding or a failed build.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
harnesses=("$@")
((${#harnesses[@]})) || harnesses=(parser frame queue gzip request)
cc=${CC:-clang-14}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
targets=("${harnesses[@]/#/fuzz_}")
if ! { CC=$cc cmake -S . -B build-fuzz -DSSE_FUZZ=ON -DSSE_TESTS=OFF \
         -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$work/build.log" 2>&1 &&
       cmake --build build-fuzz -j2 --target "${targets[@]}" >>"$work/build.log" 2>&1; }; then
  tail -40 "$work/build.log"
  echo "fuzz: build failed"
  exit 2
fi

findings=0
for h in "${harnesses[@]}"; do
  art=build-fuzz/artifacts/$h
  mkdir -p "$work/corpus-$h" "$art"
  touch "$work/start-$h"
  # -timeout: one input running 10 s is a hang; the harnesses bound their own waits
  # well below that (fuzz_request: about 2.3 s at worst).
  build-fuzz/fuzz_$h -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
    -rss_limit_mb=2048 -artifact_prefix="$art/" \
    "$work/corpus-$h" "test/fuzz/corpus/$h" >"$work/$h.log" 2>&1
  rc=$?
  execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$work/$h.log" | tail -1)
  new=$(find "$art" -type f -newer "$work/start-$h" -printf '%f ')
  if [[ $rc == 0 && -z "$new" ]]; then
    echo "fuzz_$h: ok, ${execs:-?} executions in $secs s"
  else
    findings=$((findings + 1))
    grep -E '^(==[0-9]+==ERROR|SUMMARY|.*runtime error|fuzz_[a-z]+: )|ALARM|deadly signal' \
      "$work/$h.log" | head -20
    echo "fuzz_$h: FINDING (exit status $rc), ${execs:-?} executions; input: ${new:-none saved}" \
         "(in $art/)"
  fi
done
((findings == 0))
