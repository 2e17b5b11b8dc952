#!/usr/bin/env bash
# Connection churn: does lua-sse give back what clients that come and go leave behind?
# Starts bench/servers/lua-sse.lua, then bench/churn.c (built here) runs CYCLES
# connect/disconnect cycles against its /sub stream while one keep-alive connection
# publishes PUB_RATE events a second: streams read to their first bytes and then reset
# or closed cleanly, half-sent request heads and half-sent bodies abandoned (see churn.c).
# Every CYCLES/10 cycles the churn pauses until the server's descriptor count settles and
# prints a row: cycles, the server's VmRSS (KB), its open descriptors.
#
# Environment (defaults in brackets):
#   CYCLES [100000]  PARALLEL [64] cycles in flight  PUB_RATE [20] events/s
#   RSS_GROWTH_KB [16384] allowed RSS growth from the first row to the last
#   TREE [.] the checkout whose lua/ and build/lib/ the server loads (built unless NO_BUILD=1)
#   CHURN_ARGS more options for churn.c, e.g. "--only 0" (one kind of cycle alone)
# Exit status: 0 when the descriptors came back to the first row's count and the RSS grew
# at most RSS_GROWTH_KB; 1 otherwise; 3 when the server did not start or cycles failed.
set -uo pipefail
cd "$(dirname "$0")/.."

CYCLES=${CYCLES:-100000} PARALLEL=${PARALLEL:-64} PUB_RATE=${PUB_RATE:-20}
RSS_GROWTH_KB=${RSS_GROWTH_KB:-16384} TREE=${TREE:-.}

work=$(mktemp -d)
server_pid=
cleanup() {
  if [[ -n "$server_pid" ]]; then
    kill "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

cc -O2 -Wall -Wextra -std=c11 -o "$work/churn" bench/churn.c || exit 3
if [[ "${NO_BUILD:-}" != 1 ]]; then
  { cmake -S "$TREE" -B "$TREE/build" -DSSE_TESTS=OFF >/dev/null &&
    cmake --build "$TREE/build" -j2 >/dev/null; } || { echo "churn: build failed" >&2; exit 3; }
fi
export LUA_PATH="$TREE/lua/?.lua;$TREE/lua/?/init.lua;;" LUA_CPATH="$TREE/build/lib/?.so;;"

lua5.4 bench/servers/lua-sse.lua 0 >"$work/out" 2>"$work/err" &
server_pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/^ready \([0-9]*\)$/\1/p' "$work/out")
  [[ -n "$port" ]] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [[ -z "$port" ]]; then
  echo "churn: the server did not start:" >&2
  cat "$work/err" >&2
  exit 3
fi

echo "churn: $CYCLES cycles, $PARALLEL in flight, $PUB_RATE events/s, against lua-sse (pid $server_pid, port $port, tree $TREE)"
"$work/churn" --port "$port" --pid "$server_pid" --cycles "$CYCLES" --parallel "$PARALLEL" \
  --pub-rate "$PUB_RATE" --rss-growth-kb "$RSS_GROWTH_KB" ${CHURN_ARGS:-}
status=$?

if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "churn: the server died"
  status=1
fi
lines=$(wc -l <"$work/err")
echo "server log (warnings and errors): $lines lines"
if [[ $lines -gt 0 ]]; then
  sed -E "s/[0-9]+/N/g" "$work/err" | sort | uniq -c | sort -rn | head -5
fi
exit "$status"
