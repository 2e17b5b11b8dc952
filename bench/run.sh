#!/usr/bin/env bash
# Compares lua-sse with other SSE servers on the contract of bench/README.md and writes
# the table to bench/results.md (also printed).
#
#   bash bench/run.sh                        # full scale, about 15 minutes on 2 cores
#   BENCH_SCALE=tiny bash bench/run.sh       # smoke run: the same steps in under a minute
#                                            # (plus the packages' install on a new machine)
#   SERVERS="lua-sse go-nethttp" RUNS=1 bash bench/run.sh
#
# Environment (defaults in brackets):
#   BENCH_SCALE [full]  full | tiny
#   SERVERS     [lua-sse nchan openresty go-nethttp node-http lua-http]  scripts in servers/
#   WORKLOADS   [fanout-1k fanout-10k burst idle-10k count light]  a subset, e.g. to
#                       compare two builds run after run (interleaved: the machine drifts)
#   RUNS        [full: 3, tiny: 1]  runs per cell; the table shows the median run
#   LIGHT_RUNS  [1]     runs of the 30-second "light" workload (3 would add 6 minutes to
#                       the full run; one run holds 600,000 latency samples)
#   OUT         [full: bench/results.md, tiny: bench/.build/results-tiny.md] (a smoke run
#               leaves the committed full-scale table alone)
#
# For every server and workload: a fresh server (so one workload's memory and state never
# show in the next one's), one bench/loadgen --json run, the server stopped. A server that
# fails a workload, or does not start, becomes a row saying so, never an abort. The servers
# install what they need from Debian packages on their first start (outside any
# measurement: the driver waits for "ready"). Raw loadgen lines go to
# bench/.build/results-$BENCH_SCALE.tsv, each server's stderr to bench/.build/logs/.
# Exit status: 0 when every cell ran cleanly (all delivered, no failed connection), 1
# otherwise; the table is written either way.
set -uo pipefail
cd "$(dirname "$0")/.."

BENCH_SCALE=${BENCH_SCALE:-full}
SERVERS=${SERVERS:-"lua-sse nchan openresty go-nethttp node-http lua-http"}
LIGHT_RUNS=${LIGHT_RUNS:-1}
WORKLOADS=${WORKLOADS:-"fanout-1k fanout-10k burst idle-10k count light"}

# Workload name -> loadgen arguments. The names are those of the full scale; tiny keeps
# the names and shrinks the numbers so every code path still runs.
declare -A ARGS
case $BENCH_SCALE in
  full)
    RUNS=${RUNS:-3} TIMEOUT=120 OUT=${OUT:-bench/results.md}
    ARGS[fanout-1k]="fanout --conns 1000 --events 2000"
    ARGS[fanout-10k]="fanout --conns 10000 --events 200"
    ARGS[burst]="fanout --conns 100 --events 20000"
    ARGS[idle-10k]="idle --conns 10000 --settle 1000"
    ARGS[count]="count --conns 50 --events 20000"
    ARGS[light]="fanout --conns 1000 --events 600 --rate 20"     # 30 s
    ;;
  tiny)
    RUNS=${RUNS:-1} LIGHT_RUNS=1 TIMEOUT=20 OUT=${OUT:-bench/.build/results-tiny.md}
    ARGS[fanout-1k]="fanout --conns 50 --events 50"
    ARGS[fanout-10k]="fanout --conns 200 --events 20"
    ARGS[burst]="fanout --conns 10 --events 500"
    ARGS[idle-10k]="idle --conns 200 --settle 200"
    ARGS[count]="count --conns 5 --events 500"
    ARGS[light]="fanout --conns 50 --events 20 --rate 20"        # 1 s
    ;;
  *) echo "run.sh: BENCH_SCALE is full or tiny" >&2; exit 2 ;;
esac

# Cells a server does not implement: n/a in the table.
not_applicable() {
  case "$1 $2" in
    "nchan count") return 0 ;;   # Nchan publishes to channels: no per-request stream
  esac
  return 1
}

server_cmd() {
  case $1 in
    lua-sse) echo "lua5.4 bench/servers/lua-sse.lua" ;;
    *) echo "bash bench/servers/$1.sh" ;;
  esac
}

log() { echo "run.sh: $*" >&2; }

# ---- build ----
make -s -C bench loadgen || exit 1
if [[ " $SERVERS " == *" lua-sse "* ]]; then
  { cmake -S . -B build >/dev/null && cmake --build build >/dev/null; } || { log "lua-sse build failed"; exit 1; }
fi
# Only lua5.4 reads the _5_4 variables: the lua-http peer (lua5.2) keeps its own paths.
export LUA_PATH_5_4="lua/?.lua;lua/?/init.lua;;" LUA_CPATH_5_4="build/lib/?.so;;"
# Every subscriber is a descriptor, in loadgen and in the server alike.
ulimit -n "$(ulimit -Hn)"

mkdir -p bench/.build/logs
RAW=bench/.build/results-$BENCH_SCALE.tsv
: >"$RAW"
srv_out=$(mktemp)
srv_pid='' work_pid='' port='' status=0
trap 'stop_server; rm -f "$srv_out"' EXIT
trap 'exit 130' INT TERM

# start_server NAME LOG: starts it on a free port and waits for "ready <port> [pid]";
# the optional pid is the process doing the work when it is not the one started (nginx's
# worker). The first start of a server may install packages or build: up to 10 minutes.
start_server() {
  : >"$srv_out"
  $(server_cmd "$1") 0 >"$srv_out" 2>>"$2" &
  srv_pid=$!
  local word pid
  for _ in $(seq 6000); do
    # a whole line only (read fails before its newline): never half a port number
    if read -r word port pid <"$srv_out" 2>/dev/null && [ "$word" = ready ] && [ -n "$port" ]; then
      work_pid=${pid:-$srv_pid}
      return 0
    fi
    kill -0 "$srv_pid" 2>/dev/null || break
    sleep 0.1
  done
  stop_server
  return 1
}

# stop_server: SIGTERM, then SIGKILL to what is left after 10 s.
stop_server() {
  [ -n "$srv_pid" ] || return 0
  kill -TERM "$srv_pid" 2>/dev/null
  for _ in $(seq 100); do
    kill -0 "$srv_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$srv_pid" 2>/dev/null && kill -KILL "$srv_pid" "$work_pid" 2>/dev/null
  wait "$srv_pid" 2>/dev/null
  srv_pid='' work_pid=''
}

# run_cell WORKLOAD SERVER RUN: one fresh server, one loadgen run, one line in $RAW.
run_cell() {
  local w=$1 s=$2 line rc logf="bench/.build/logs/$1.$2.$3.log"
  : >"$logf"
  if ! start_server "$s" "$logf"; then
    line='{"error":"server did not start (see '"$logf"')"}'
    status=1
  else
    # shellcheck disable=SC2086  # ARGS holds several words on purpose
    line=$(bench/loadgen ${ARGS[$w]} --port "$port" --pid "$work_pid" --label "$s" \
      --timeout "$TIMEOUT" --json)
    rc=$?
    [ "$rc" = 0 ] || status=1
    [ -n "$line" ] || line='{"error":"loadgen exited '$rc' without a report"}'
    kill -0 "$work_pid" 2>/dev/null || line="${line%\}},\"server_died\":true}"
    stop_server
  fi
  printf '%s\t%s\t%s\n' "$w" "$s" "$line" >>"$RAW"
  log "$w $s #$3: $line"
}

t0=$SECONDS
log "scale $BENCH_SCALE, servers: $SERVERS"
for s in $SERVERS; do
  for w in $WORKLOADS; do
    if not_applicable "$s" "$w"; then
      printf '%s\t%s\t%s\n' "$w" "$s" '{"na":true}' >>"$RAW"
      continue
    fi
    runs=$RUNS
    [ "$w" = light ] && runs=$LIGHT_RUNS
    for r in $(seq "$runs"); do
      run_cell "$w" "$s" "$r"
    done
  done
done
elapsed=$((SECONDS - t0))

# ---- the report: the machine, what ran, the table ----
pkg() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo '?'; }
{
  echo "# lua-sse against other SSE servers"
  echo
  echo "Written by \`bench/run.sh\` (BENCH_SCALE=$BENCH_SCALE) on $(date -u '+%Y-%m-%d %H:%M UTC'), in $((elapsed / 60)) min $((elapsed % 60)) s."
  echo
  echo "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1), $(nproc) cores (shared with other work: expect noise)"
  echo "- memory: $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo); kernel $(uname -r); $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "- loadgen and the server share the machine: on 2 cores the load generator takes a large part of it"
  echo "- lua-sse $(git describe --always --dirty 2>/dev/null) on Lua 5.4 ($(pkg liblua5.4-0)); nginx $(pkg nginx) with Nchan $(pkg libnginx-mod-nchan) and ngx_lua $(pkg libnginx-mod-http-lua) (LuaJIT $(pkg libluajit2-5.1-2)); $(go version 2>/dev/null | awk '{print $3}' || echo 'go ?'); Node $(node --version 2>/dev/null); lua-http $(pkg lua-http) on Lua 5.2"
  echo
  lua5.4 bench/report.lua "$RAW" "$RUNS" "$LIGHT_RUNS"
  echo
  echo "Workloads at this scale (loadgen arguments):"
  echo
  for w in $WORKLOADS; do echo "- $w: \`${ARGS[$w]}\`"; done
} >"$OUT"
cat "$OUT"
exit "$status"
