#!/usr/bin/env bash
# Builds the load generator and lua-sse (in place), then runs each benchmark mode against
# bench/servers/lua-sse.lua and prints one JSON object per run (see bench/README.md).
# Each mode gets a fresh server, so one mode's memory does not show in the next one's RSS.
# Scale through the environment (defaults in brackets):
#   SUBS [1000]  EVENTS [2000]  SIZE [64]  RATE [0 = as fast as accepted]
#   FANOUT_RUNS [5]      single-publish runs; their median fanout_time_ms is printed last
#   IDLE_CONNS ["1000 10000"]   COUNT_CLIENTS [50]  COUNT_EVENTS [20000]
#   TIMEOUT [120] seconds per run   PORT [0 = any free port]
# Exits non-zero if any run missed deliveries or connections.
set -euo pipefail
cd "$(dirname "$0")/.."

SUBS=${SUBS:-1000} EVENTS=${EVENTS:-2000} SIZE=${SIZE:-64} RATE=${RATE:-0}
FANOUT_RUNS=${FANOUT_RUNS:-5} IDLE_CONNS=${IDLE_CONNS:-"1000 10000"}
COUNT_CLIENTS=${COUNT_CLIENTS:-50} COUNT_EVENTS=${COUNT_EVENTS:-20000}
TIMEOUT=${TIMEOUT:-120} PORT=${PORT:-0}

make -s -C bench loadgen
cmake -S . -B build >/dev/null && cmake --build build >/dev/null
export LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/lib/?.so;;"

server_pid='' server_port='' status=0
server_out=$(mktemp)
trap 'stop_server; rm -f "$server_out"' EXIT

start_server() {
  lua5.4 bench/servers/lua-sse.lua "$PORT" >"$server_out" &
  server_pid=$!
  for _ in $(seq 100); do
    server_port=$(sed -n 's/^ready \([0-9]*\)$/\1/p' "$server_out")
    [ -n "$server_port" ] && return
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "run-lua-sse: the server did not start" >&2
  exit 1
}

stop_server() {
  [ -n "$server_pid" ] || return 0
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

loadgen() {
  bench/loadgen "$@" --port "$server_port" --pid "$server_pid" --label lua-sse \
    --timeout "$TIMEOUT" --json || status=1
}

# (a) one publish to SUBS subscribers, FANOUT_RUNS times: publish -> last delivery
start_server
times=()
for _ in $(seq "$FANOUT_RUNS"); do
  line=$(loadgen fanout --conns "$SUBS" --events 1 --size "$SIZE")
  echo "$line"
  times+=("$(sed -n 's/.*"fanout_time_ms":\([0-9.e+-]*\).*/\1/p' <<<"$line")")
done
stop_server

# (b) EVENTS publishes to SUBS subscribers at RATE
start_server
loadgen fanout --conns "$SUBS" --events "$EVENTS" --size "$SIZE" --rate "$RATE"
stop_server

# (c) RSS per idle connection
for n in $IDLE_CONNS; do
  start_server
  loadgen idle --conns "$n" --settle 1000
  stop_server
done

# (d) finite streams
start_server
loadgen count --conns "$COUNT_CLIENTS" --events "$COUNT_EVENTS"
stop_server

median=$(printf '%s\n' "${times[@]}" | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }')
echo "fanout_time_ms median of ${#times[@]} (${SUBS} subscribers): ${median:-none}"
exit "$status"
