#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: the C tests (ctest, built with
# AddressSanitizer and UndefinedBehaviorSanitizer) and the busted specs against a real
# server. Ends with one line "N passed, N failed"; exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
SSE_SETUP_TEST=1 bash scripts/setup.sh || { echo "0 passed, 1 failed"; exit 1; }

passed=0 failed=0
log=$(mktemp -d)

# --- C tests, sanitized ---
if cmake -S . -B build-asan -DSSE_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >"$log/cmake" 2>&1 &&
   cmake --build build-asan -j2 >>"$log/cmake" 2>&1; then
  (cd build-asan && ctest --output-on-failure) | tee "$log/ctest"
  c_pass=$(grep -oE '[0-9]+ tests passed|tests passed, [0-9]+ tests failed out of [0-9]+' "$log/ctest" | tail -1)
  total=$(sed -nE 's/.*tests failed out of ([0-9]+).*/\1/p' "$log/ctest" | tail -1)
  cfail=$(sed -nE 's/.*, ([0-9]+) tests failed out of.*/\1/p' "$log/ctest" | tail -1)
  total=${total:-0} cfail=${cfail:-1}
  passed=$((passed + total - cfail)) failed=$((failed + cfail))
else
  cat "$log/cmake"; echo "C build failed"; failed=$((failed + 1))
fi

# --- Lua specs against the module built here (build/) ---
cmake -S . -B build -DSSE_TESTS=OFF >/dev/null && cmake --build build -j2 >/dev/null || failed=$((failed + 1))
busted --lua=lua5.4 -o utfTerminal 2>&1 | tee "$log/busted"
line=$(grep -E '[0-9]+ successes? / [0-9]+ failures? / [0-9]+ errors?' "$log/busted" | tail -1 | sed 's/\x1b\[[0-9;]*m//g')
if [[ -n "$line" ]]; then
  s=$(sed -nE 's/.*([0-9]+) successes? .*/\1/p' <<<"$line")
  s=$(grep -oE '^[0-9]+' <<<"$line")
  f=$(sed -nE 's/.* ([0-9]+) failures? .*/\1/p' <<<"$line")
  e=$(sed -nE 's/.* ([0-9]+) errors? .*/\1/p' <<<"$line")
  passed=$((passed + s)) failed=$((failed + f + e))
else
  echo "busted printed no summary"; failed=$((failed + 1))
fi

rm -rf "$log"
echo "${passed} passed, ${failed} failed"
[[ $failed == 0 ]]
