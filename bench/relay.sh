#!/usr/bin/env bash
# The relay's cost, in one run (bench/README.md has the contract and loadgen):
#   direct   N subscribers read the upstream (bench/servers/lua-sse.lua) themselves
#   relay    the same N through the relay (bench/relay.lua, sse.relay): N upstream requests
#   shared   the same N through the relay with shared = true: ONE upstream request (fan-in)
# each on two workloads: "burst" (M events published as fast as they are accepted:
# deliveries/s) and "paced" (events at RATE/s: p50/p99 latency from publish to delivery).
# Prints one row per run and the ratios: relay / direct, shared / relay.
#
#   bash bench/relay.sh                      # full scale: 1,000 subscribers
#   BENCH_SCALE=tiny bash bench/relay.sh     # the same steps in a few seconds
#   CONNS=500 EVENTS=500 bash bench/relay.sh
#
# Environment: BENCH_SCALE (full | tiny), CONNS, EVENTS (burst), RATE and PACED_EVENTS
# (paced), TIMEOUT (seconds per loadgen run). Raw loadgen JSON lines go to
# bench/.build/relay-$BENCH_SCALE.tsv, the servers' stderr to bench/.build/logs/relay.*.log.
# Each run gets fresh servers. The publisher posts to the relay's /pub in the relay runs
# (one more hop on the way in, inside the latency) unless loadgen knows --pub-port, in
# which case it posts to the upstream in every run and only the way out differs.
# Exit status: 0 when every run delivered everything, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

BENCH_SCALE=${BENCH_SCALE:-full}
case $BENCH_SCALE in
  full) CONNS=${CONNS:-1000} EVENTS=${EVENTS:-1000} RATE=${RATE:-20} PACED_EVENTS=${PACED_EVENTS:-200}
        TIMEOUT=${TIMEOUT:-120} ;;
  tiny) CONNS=${CONNS:-20} EVENTS=${EVENTS:-50} RATE=${RATE:-20} PACED_EVENTS=${PACED_EVENTS:-10}
        TIMEOUT=${TIMEOUT:-20} ;;
  *) echo "relay.sh: BENCH_SCALE is full or tiny" >&2; exit 2 ;;
esac

log() { echo "relay.sh: $*" >&2; }

make -s -C bench loadgen || exit 1
{ cmake -S . -B build >/dev/null && cmake --build build >/dev/null; } || { log "lua-sse build failed"; exit 1; }
export LUA_PATH_5_4="lua/?.lua;lua/?/init.lua;;" LUA_CPATH_5_4="build/lib/?.so;;"
ulimit -n "$(ulimit -Hn)"

PUB_PORT_OPT=0
usage=$(bench/loadgen 2>&1 || true)   # (not a pipe into grep -q: with pipefail, its early exit fails the test)
[[ $usage == *--pub-port* ]] && PUB_PORT_OPT=1

mkdir -p bench/.build/logs
RAW=bench/.build/relay-$BENCH_SCALE.tsv
: >"$RAW"
pids=()
trap 'stop_all' EXIT
trap 'exit 130' INT TERM

# start NAME LOG CMD...: runs CMD (its first argument after the script: port 0), waits for
# "ready <port>"; sets $port and $pid.
start() {
  local name=$1 logf=$2 out word p
  shift 2
  out=$(mktemp)
  "$@" 0 >"$out" 2>>"$logf" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 300); do
    if read -r word p <"$out" 2>/dev/null && [ "$word" = ready ] && [ -n "$p" ]; then
      port=$p
      rm -f "$out"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  rm -f "$out"
  log "$name did not start (see $logf)"
  return 1
}

stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  pids=()
}

# Established TCP connections whose local port is $1 (the upstream's side of each), from
# /proc/net/tcp: state 01.
conns_on() {
  local hex
  hex=$(printf '%04X' "$1")
  awk -v p=":$hex" '$2 ~ p"$" && $4 == "01" { n++ } END { print n + 0 }' /proc/net/tcp
}

status=0
# run MODE WORKLOAD: fresh upstream (and relay), one loadgen run, one line in $RAW.
run() {
  local mode=$1 w=$2 logf="bench/.build/logs/relay.$1.$2.log" up_port target target_pid args line rc max=0
  : >"$logf"
  start upstream "$logf" lua5.4 bench/servers/lua-sse.lua || { status=1; return; }
  up_port=$port target=$port target_pid=$pid
  if [ "$mode" != direct ]; then
    local shared=0
    [ "$mode" = shared ] && shared=1
    UPSTREAM="http://127.0.0.1:$up_port" SHARED=$shared \
      start relay "$logf" lua5.4 bench/relay.lua || { stop_all; status=1; return; }
    target=$port target_pid=$pid
  fi
  if [ "$w" = burst ]; then
    args="fanout --conns $CONNS --events $EVENTS"
  else
    args="fanout --conns $CONNS --events $PACED_EVENTS --rate $RATE"
  fi
  [ "$PUB_PORT_OPT" = 1 ] && args="$args --pub-port $up_port"
  # the upstream's connections, sampled while loadgen runs (its busiest moment counts)
  (
    m=0
    while sleep 0.05; do
      n=$(conns_on "$up_port")
      [ "$n" -gt "$m" ] && m=$n && echo "$m" >"$logf.conns"
    done
  ) &
  local sampler=$!
  # shellcheck disable=SC2086  # args holds several words on purpose
  line=$(bench/loadgen $args --port "$target" --pid "$target_pid" --label "$mode" \
    --timeout "$TIMEOUT" --json)
  rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  [ -f "$logf.conns" ] && max=$(cat "$logf.conns") && rm -f "$logf.conns"
  [ "$rc" = 0 ] || status=1
  [ -n "$line" ] || line='{"error":"loadgen exited '$rc' without a report"}'
  stop_all
  printf '%s\t%s\t%s\t%s\n' "$w" "$mode" "$max" "$line" >>"$RAW"
  log "$w $mode (upstream connections at most $max): $line"
}

log "scale $BENCH_SCALE: $CONNS subscribers; burst $EVENTS events; paced $PACED_EVENTS at $RATE/s"
for w in burst paced; do
  for mode in direct relay shared; do
    run "$mode" "$w"
  done
done

PUB_NOTE="the relay runs publish through the relay's /pub (one more hop, inside their latency)"
[ "$PUB_PORT_OPT" = 1 ] && PUB_NOTE="every run publishes to the upstream (--pub-port)"

lua5.4 - "$RAW" "$CONNS" "$PUB_NOTE" <<'LUA'
local cjson = require("cjson")
local raw, conns, note = arg[1], arg[2], arg[3]
local rows, by = {}, {}
for line in io.lines(raw) do
  local w, mode, ups, json = line:match("^(%S+)\t(%S+)\t(%S+)\t(.*)$")
  local ok, r = pcall(cjson.decode, json)
  if not ok then r = { error = json } end
  r.w, r.mode, r.ups = w, mode, tonumber(ups)
  rows[#rows + 1] = r
  by[w .. " " .. mode] = r
end
local function num(v, fmt)
  if type(v) ~= "number" then return "" end
  return (fmt or "%.0f"):format(v)
end
print(("# the relay: %s subscribers (%s)"):format(conns, note))
print()
print("| workload | mode | delivered | events/s | p50 ms | p99 ms | CPU-s per M (measured process) | RSS | upstream conns |")
print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
for _, r in ipairs(rows) do
  if r.error then
    print(("| %s | %s | %s | | | | | | |"):format(r.w, r.mode, tostring(r.error)))
  else
    print(("| %s | %s | %s/%s | %s | %s | %s | %s | %s | %s |"):format(r.w,
      r.mode == "direct" and "direct (upstream)" or r.mode == "relay" and "relay (per client)" or "relay shared",
      num(r.delivered), num(r.expected), num(r.deliveries_per_s), num(r.p50_ms, "%.2f"),
      num(r.p99_ms, "%.2f"), num(r.server_cpu_s_per_M, "%.2f"),
      r.server_rss_kb and ("%.0f MB"):format(r.server_rss_kb / 1024) or "", num(r.ups)))
  end
end
print()
local function ratio(a, b, field, w)
  local x, y = by[w .. " " .. a], by[w .. " " .. b]
  if not x or not y or type(x[field]) ~= "number" or type(y[field]) ~= "number" or y[field] == 0 then
    return "n/a"
  end
  return ("%.2f"):format(x[field] / y[field])
end
print("| ratio | events/s (burst) | p50 (paced) | p99 (paced) | CPU per M (burst) |")
print("|---|--:|--:|--:|--:|")
for _, pair in ipairs({ { "relay", "direct" }, { "shared", "direct" }, { "shared", "relay" } }) do
  local a, b = pair[1], pair[2]
  print(("| %s / %s | %s | %s | %s | %s |"):format(a, b, ratio(a, b, "deliveries_per_s", "burst"),
    ratio(a, b, "p50_ms", "paced"), ratio(a, b, "p99_ms", "paced"), ratio(a, b, "server_cpu_s_per_M", "burst")))
end
print()
print("CPU is the measured process's: the upstream for direct, the relay for relay and shared"
  .. " (the upstream's own work is not in those rows). Upstream conns: established"
  .. " connections to the upstream's port at the busiest sample (subscribers or relay"
  .. " requests, plus publishers).")
LUA
exit "$status"
