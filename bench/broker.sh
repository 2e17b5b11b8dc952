#!/usr/bin/env bash
# Channels on Redis (docs/broker.md) against channels in memory, in one run, on the
# workloads of bench/run.sh (bench/README.md has the contract and loadgen):
#   memory   bench/servers/lua-sse.lua as run.sh starts it: one process, the channel in memory
#   broker   the same server with BROKER=redis://...: the channel in a redis-server started
#            here (one for the whole run); /pub waits for Redis before its 204
#   broker-wN the same with WORKERS=N worker processes (N = WORKERS, default 2) on the
#            WORKER_WORKLOADS (fanout-10k, count): the port shared (SO_REUSEPORT), every
#            worker subscribed to the channel's topic
# For every run: deliveries/s, p50/p99, lua-sse's CPU per million deliveries, Redis's CPU
# per publish (/proc/<redis pid>/stat, and its main thread's schedstat in ns), and from
# `INFO commandstats` before and after: scripts run (EVALSHA + EVAL) per publish — one
# round trip per publish is the design — PUBLISH calls and the pub/sub messages Redis sent
# (PUBLISH calls x the topic's subscribers). Then the ratios: broker / memory (target:
# lua-sse's CPU per fan-out delivery within 1.3x of in memory) and broker-wN / broker.
#
#   bash bench/broker.sh                      # full scale (run.sh's numbers), ~10 minutes
#   BENCH_SCALE=tiny bash bench/broker.sh     # the same steps in ~20 seconds (a smoke run)
#   WORKLOADS="fanout-1k burst" RUNS=1 bash bench/broker.sh
#
# Environment (defaults in brackets):
#   BENCH_SCALE [full]  full | tiny
#   WORKLOADS   [fanout-1k fanout-10k burst count light]   (names as in run.sh)
#   WORKER_WORKLOADS [fanout-10k count]   also run with WORKERS processes
#   WORKERS     [2]
#   RUNS        [full: 3, tiny: 1] runs per cell, interleaved (memory, broker, broker-wN,
#               then again): the table shows the median run by deliveries/s
#   LIGHT_RUNS  [1]     runs of the 30-second light workload
#   HISTORY     [0]     the channel's history (the contract's default: none; with 0 the
#                       publish script does no XADD)
#   REDIS_ARGS  []      more redis-server options, e.g. "--appendonly yes --appendfsync always"
#   TIMEOUT     [full: 120, tiny: 20] seconds per loadgen run
#   OUT         [bench/.build/broker-$BENCH_SCALE.md]  the report (also printed)
#
# CPU: loadgen's --pid figure for single processes (utime + stime over the publishing
# window); for the worker runs (and, to compare like with like, for every run) a sampler
# reads /proc every 10 ms for the server's process tree (the supervisor and its children)
# and Redis, and the same window is cut out of its samples. Redis's CPU is Redis's alone
# (not in lua-sse's figures); at 20 publishes/s its own housekeeping (hz 10, measured idle
# before the first run) is a visible part of it.
# Raw lines (loadgen's JSON plus these figures) go to bench/.build/broker-$BENCH_SCALE.tsv,
# the servers' stderr to bench/.build/logs/broker.*.log.
# Exit status: 0 when every run delivered everything (loadgen's check: all subscribers
# connected, every event to every one, no stream ended, no failed publish), no event that
# is not a publish (a gap event, which loadgen would count as a delivery), and with the
# broker Redis's PUBLISH count equal to the publishes; 1 otherwise; 2 on usage errors.
set -uo pipefail
cd "$(dirname "$0")/.."

BENCH_SCALE=${BENCH_SCALE:-full}
WORKLOADS=${WORKLOADS:-"fanout-1k fanout-10k burst count light"}
WORKER_WORKLOADS=${WORKER_WORKLOADS-"fanout-10k count"}   # (empty: none)
WORKERS=${WORKERS:-2}
LIGHT_RUNS=${LIGHT_RUNS:-1}
HISTORY=${HISTORY:-0}
REDIS_ARGS=${REDIS_ARGS:-}
SETTLE_MS=200        # loadgen's --settle (its default), used to find the window's start

# The same workloads as run.sh (its names and numbers).
declare -A ARGS
case $BENCH_SCALE in
  full)
    RUNS=${RUNS:-3} TIMEOUT=${TIMEOUT:-120}
    ARGS[fanout-1k]="fanout --conns 1000 --events 2000"
    ARGS[fanout-10k]="fanout --conns 10000 --events 200"
    ARGS[burst]="fanout --conns 100 --events 20000"
    ARGS[count]="count --conns 50 --events 20000"
    ARGS[light]="fanout --conns 1000 --events 600 --rate 20"     # 30 s
    ;;
  tiny)
    RUNS=${RUNS:-1} LIGHT_RUNS=1 TIMEOUT=${TIMEOUT:-20}
    ARGS[fanout-1k]="fanout --conns 50 --events 50"
    ARGS[fanout-10k]="fanout --conns 200 --events 20"
    ARGS[burst]="fanout --conns 10 --events 500"
    ARGS[count]="count --conns 5 --events 500"
    ARGS[light]="fanout --conns 50 --events 20 --rate 20"        # 1 s
    ;;
  *) echo "broker.sh: BENCH_SCALE is full or tiny" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/.build/broker-$BENCH_SCALE.md}
for w in $WORKLOADS $WORKER_WORKLOADS; do
  [ -n "${ARGS[$w]:-}" ] || { echo "broker.sh: unknown workload $w (idle-10k has no publish)" >&2; exit 2; }
done
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || { echo "broker.sh: WORKERS is a positive integer" >&2; exit 2; }

log() { echo "broker.sh: $*" >&2; }

command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
  { log "needs redis-server and redis-cli (apt-get install redis-server)"; exit 1; }
make -s -C bench loadgen || exit 1
{ cmake -S . -B build >/dev/null && cmake --build build >/dev/null; } || { log "lua-sse build failed"; exit 1; }
export LUA_PATH_5_4="lua/?.lua;lua/?/init.lua;;" LUA_CPATH_5_4="build/lib/?.so;;"
ulimit -n "$(ulimit -Hn)"

mkdir -p bench/.build/logs
RAW=bench/.build/broker-$BENCH_SCALE.tsv
: >"$RAW"
work=$(mktemp -d)
srv_pid='' redis_pid='' sampler_pid='' kids=''
trap 'stop_sampler; stop_server; stop_redis; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# ---- redis-server: one for the whole run, on a free port, no persistence ----
free_port() {
  lua5.4 -e 'local s = assert(require("socket").bind("127.0.0.1", 0)); local _, p = s:getsockname(); s:close(); print(p)'
}
rcli() { redis-cli -p "$redis_port" "$@"; }
start_redis() {
  local try
  for try in 1 2 3 4 5; do
    redis_port=$(free_port) || return 1
    # shellcheck disable=SC2086  # REDIS_ARGS holds several words on purpose
    redis-server --port "$redis_port" --bind 127.0.0.1 --protected-mode no --save '' \
      --appendonly no --daemonize no --dir "$work" --logfile "$work/redis.log" $REDIS_ARGS \
      </dev/null >/dev/null 2>&1 &
    redis_pid=$!
    for _ in $(seq 100); do
      [ "$(rcli PING 2>/dev/null)" = PONG ] && return 0
      kill -0 "$redis_pid" 2>/dev/null || break
      sleep 0.05
    done
    stop_redis      # the port was taken meanwhile (or it did not start): another one
  done
  log "redis-server did not start: $(tail -n 3 "$work/redis.log" 2>/dev/null)"
  return 1
}
stop_redis() {
  [ -n "$redis_pid" ] || return 0
  kill -TERM "$redis_pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$redis_pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$redis_pid" 2>/dev/null
  wait "$redis_pid" 2>/dev/null
  redis_pid=''
}

# ---- the lua-sse server ----
# Established / listening TCP sockets on local port $1 (/proc/net/tcp: state 01 / 0A).
listeners_on() {
  awk -v p=":$(printf '%04X' "$1")" '$2 ~ p"$" && $4 == "0A" { n++ } END { print n + 0 }' /proc/net/tcp
}
children_of() {
  if [ -r "/proc/$1/task/$1/children" ]; then
    cat "/proc/$1/task/$1/children"
  else
    awk -v pp="$1" '{ sub(/^.*\) /, ""); split($0, f, " "); if (f[2] == pp) print FILENAME }' \
      /proc/[0-9]*/stat 2>/dev/null | sed 's|/proc/\([0-9]*\)/stat|\1|'
  fi
}
# start_server MODE LOG: sets srv_pid, port, kids (the worker pids); ready when it listens
# (every worker, for broker-wN), every process is subscribed to the channel's topic, and
# the broker's sync 300 ms after attaching has run.
start_server() {
  local mode=$1 logf=$2 out=$work/out word p n=1 broker='' workers=''
  case $mode in
    memory) ;;
    broker) broker="redis://127.0.0.1:$redis_port" ;;
    broker-w*) broker="redis://127.0.0.1:$redis_port" workers=${mode#broker-w} n=$workers ;;
  esac
  : >"$out"
  BROKER=$broker WORKERS=$workers HISTORY=$HISTORY lua5.4 bench/servers/lua-sse.lua 0 >"$out" 2>>"$logf" &
  srv_pid=$! port='' kids=''
  for _ in $(seq 200); do
    if read -r word p <"$out" 2>/dev/null && [ "$word" = ready ] && [ -n "$p" ]; then
      port=$p
      break
    fi
    kill -0 "$srv_pid" 2>/dev/null || break
    sleep 0.05
  done
  [ -n "$port" ] || { log "$mode: the server did not start (see $logf)"; stop_server; return 1; }
  for _ in $(seq 200); do
    local ok=1
    [ "$(listeners_on "$port")" -ge "$n" ] || ok=0
    if [ -n "$broker" ]; then
      [ "$(rcli PUBSUB NUMSUB sse:t:bench | sed -n 2p)" = "$n" ] || ok=0
    fi
    [ "$ok" = 1 ] && break
    kill -0 "$srv_pid" 2>/dev/null || break
    sleep 0.05
  done
  [ -n "$workers" ] && kids=$(children_of "$srv_pid" | tr '\n' ' ')
  if [ -n "$workers" ] && [ "$(wc -w <<<"$kids")" != "$workers" ]; then
    log "$mode: expected $workers workers, found '${kids}' (see $logf)"
    stop_server
    return 1
  fi
  sleep 0.4
  return 0
}
stop_server() {
  [ -n "$srv_pid" ] || return 0
  kill -TERM "$srv_pid" 2>/dev/null
  for _ in $(seq 200); do kill -0 "$srv_pid" 2>/dev/null || break; sleep 0.05; done
  # shellcheck disable=SC2086  # kids: several pids
  kill -0 "$srv_pid" 2>/dev/null && kill -KILL "$srv_pid" $kids 2>/dev/null
  wait "$srv_pid" 2>/dev/null
  srv_pid='' kids=''
}

# ---- the sampler: every 10 ms one line "time tree_ticks redis_ticks redis_sched_ns" ----
# (time: wall clock seconds, as bash's EPOCHREALTIME; ticks: utime + stime of
# /proc/PID/stat summed over the server's tree; sched: the first field of Redis's
# /proc/PID/schedstat, its main thread's time on a CPU, in ns)
start_sampler() {
  lua5.4 - "$1" "$redis_pid" "$srv_pid" $kids >"$2" <<'LUA' &
local socket = require("socket")
io.stdout:setvbuf("line")
local interval, redis, tree = tonumber(arg[1]), arg[2], {}
for i = 3, #arg do tree[#tree + 1] = arg[i] end
local function ticks(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return 0 end
  local s = f:read("a")
  f:close()
  local ut, st = s:match("%) %S+" .. (" %S+"):rep(10) .. " (%d+) (%d+)")
  return (tonumber(ut) or 0) + (tonumber(st) or 0)
end
local function sched(pid)
  local f = io.open("/proc/" .. pid .. "/schedstat")
  if not f then return 0 end
  local ns = f:read("n")
  f:close()
  return ns or 0
end
while true do
  local t, sum = socket.gettime(), 0
  for _, p in ipairs(tree) do sum = sum + ticks(p) end
  io.stdout:write(("%.4f %d %d %d\n"):format(t, sum, ticks(redis), sched(redis)))
  socket.sleep(interval)
end
LUA
  sampler_pid=$!
}
stop_sampler() {
  [ -n "$sampler_pid" ] || return 0
  kill -TERM "$sampler_pid" 2>/dev/null
  wait "$sampler_pid" 2>/dev/null
  sampler_pid=''
}

# commandstats "calls" of the commands we count, as "evalsha eval failed publish"
script_calls() {
  rcli INFO commandstats | tr -d '\r' | awk -F'[:=,]' '
    $1 == "cmdstat_evalsha" { es = $3; for (i = 4; i < NF; i++) if ($i == "failed_calls") f += $(i + 1) }
    $1 == "cmdstat_eval"    { e = $3;  for (i = 4; i < NF; i++) if ($i == "failed_calls") f += $(i + 1) }
    $1 == "cmdstat_publish" { p = $3 }
    END { printf "%d %d %d %d\n", es, e, f, p }'
}

# extend LINE SAMPLES T0 CALLS0 CALLS1 NUMSUB: loadgen's JSON with the figures of this run:
# the server tree's and Redis's CPU over loadgen's window (cut from the samples), Redis's
# script and PUBLISH counts.
extend() {
  lua5.4 - "$@" <<'LUA'
local cjson = require("cjson")
local line, samples, t0, c0, c1, numsub = arg[1], arg[2], tonumber(arg[3]), arg[4], arg[5], tonumber(arg[6])
local settle = tonumber(os.getenv("SETTLE_MS")) / 1000
local hz = tonumber(io.popen("getconf CLK_TCK"):read("l")) or 100
local ok, r = pcall(cjson.decode, line)
if not ok or type(r) ~= "table" then print(line) return end
for k, v in pairs(r) do if v == cjson.null then r[k] = nil end end
local s = {}
for l in io.lines(samples) do
  local t, tree, rt, rs = l:match("^(%S+) (%d+) (%d+) (%d+)$")
  if t then s[#s + 1] = { tonumber(t), tonumber(tree), tonumber(rt), tonumber(rs) } end
end
-- the window loadgen measured its server CPU over: fanout from the end of connect + settle
-- to the last delivery; count the whole run
local a, b
if r.mode == "count" and r.elapsed_s then
  a, b = t0, t0 + r.elapsed_s
elseif r.mode == "fanout" and r.window_s and r.connect_s then
  a = t0 + r.connect_s + settle
  b = a + r.window_s
end
local function at(t, k)          -- the sampled value k at time t, linearly between samples
  if #s == 0 then return nil end
  if t <= s[1][1] then return s[1][k] end
  for i = 2, #s do
    if s[i][1] >= t then
      local x, y = s[i - 1], s[i]
      return x[k] + (y[k] - x[k]) * (t - x[1]) / (y[1] - x[1])
    end
  end
  return s[#s][k]
end
local extra = {}
local function add(k, v, fmt)
  if type(v) == "number" then extra[#extra + 1] = ('"%s":' .. (fmt or "%.6g")):format(k, v) end
end
if a and b and #s > 1 and s[1][1] <= a and s[#s][1] >= b then
  local n = r.mode == "count" and r.received or r.delivered
  local tree = (at(b, 2) - at(a, 2)) / hz
  add("tree_cpu_s", tree)
  if n and n > 0 then add("tree_cpu_s_per_M", tree / (n / 1e6)) end
  add("redis_cpu_s", (at(b, 3) - at(a, 3)) / hz)
  add("redis_sched_s", (at(b, 4) - at(a, 4)) / 1e9)
  add("sampled_window_s", b - a)
end
local x0, x1 = {}, {}
for v in c0:gmatch("%d+") do x0[#x0 + 1] = tonumber(v) end
for v in c1:gmatch("%d+") do x1[#x1 + 1] = tonumber(v) end
if #x0 == 4 and #x1 == 4 then
  add("redis_evalsha", x1[1] - x0[1], "%d")
  add("redis_eval", x1[2] - x0[2], "%d")
  add("redis_failed", x1[3] - x0[3], "%d")
  add("redis_publish", x1[4] - x0[4], "%d")
  add("redis_numsub", numsub, "%d")
end
-- loadgen's object as it was (its order), these fields added at its end
print(#extra > 0 and line:gsub("}%s*$", "") .. "," .. table.concat(extra, ",") .. "}" or line)
LUA
}

status=0
# run_cell WORKLOAD MODE RUN: a fresh server, one loadgen run, one line in $RAW.
run_cell() {
  local w=$1 mode=$2 logf="bench/.build/logs/broker.$1.$2.$3.log" line rc t0 c0='' c1='' numsub=0 err=''
  : >"$logf"
  if ! start_server "$mode" "$logf"; then
    line='{"error":"server did not start (see '"$logf"')"}'
    status=1
  else
    [ "$mode" = memory ] || c0=$(script_calls)
    start_sampler 0.01 "$work/samples"
    sleep 0.05
    t0=$EPOCHREALTIME
    # shellcheck disable=SC2086  # ARGS holds several words on purpose
    line=$(bench/loadgen ${ARGS[$w]} --port "$port" --pid "$srv_pid" --label "$mode" \
      --settle "$SETTLE_MS" --timeout "$TIMEOUT" --json)
    rc=$?
    sleep 0.05
    stop_sampler
    if [ "$mode" != memory ]; then
      c1=$(script_calls)
      numsub=$(rcli PUBSUB NUMSUB sse:t:bench | sed -n 2p)
    fi
    [ "$rc" = 0 ] || status=1
    if [ -z "$line" ]; then
      line='{"error":"loadgen exited '$rc' without a report"}'
    else
      kill -0 "$srv_pid" 2>/dev/null || line="${line%\}},\"server_died\":true}"
      [ -n "$kids" ] && for k in $kids; do
        kill -0 "$k" 2>/dev/null || line="${line%\}},\"worker_died\":true}"
      done
      local ext
      ext=$(SETTLE_MS=$SETTLE_MS extend "$line" "$work/samples" "$t0" "$c0" "$c1" "${numsub:-0}") &&
        [ -n "$ext" ] && line=$ext
      # an event without loadgen's stamp is none of the publishes: a gap event (the broker
      # announcing events it lost), which loadgen counts as delivered
      if [[ $line == *'"unstamped":'[1-9]* ]]; then
        err="events that are not publishes (gap events?): $(sed -n 's/.*"unstamped":\([0-9]*\).*/\1/p' <<<"$line")"
        status=1
      fi
      # with the broker: Redis saw one PUBLISH per publish loadgen got a 2xx for
      if [ -z "$err" ] && [ "$mode" != memory ] && [[ $line == *'"mode":"fanout"'* ]]; then
        local pubs published
        pubs=$(sed -n 's/.*"redis_publish":\([0-9]*\).*/\1/p' <<<"$line")
        published=$(sed -n 's/.*"published":\([0-9]*\).*/\1/p' <<<"$line")
        if [ "$pubs" != "$published" ]; then
          err="Redis counted ${pubs:-?} PUBLISH for $published publishes"
          status=1
        fi
      fi
    fi
    stop_server
  fi
  [ -n "$err" ] && line="${line%\}},\"check\":\"$err\"}" && log "$w $mode #$3: $err"
  printf '%s\t%s\t%s\t%s\n' "$w" "$mode" "$3" "$line" >>"$RAW"
  log "$w $mode #$3: $line"
}

start_redis || exit 1
# Redis's own cost while nothing happens (serverCron at hz 10): part of every figure per
# publish below, visible when publishes are few per second
r0=$(awk '{ print $1 }' "/proc/$redis_pid/schedstat")
sleep 2
r1=$(awk '{ print $1 }' "/proc/$redis_pid/schedstat")
REDIS_IDLE_MS_PER_S=$(awk -v a="$r0" -v b="$r1" 'BEGIN { printf "%.2f", (b - a) / 2e6 }')
log "redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on port $redis_port (pid $redis_pid), idle: $REDIS_IDLE_MS_PER_S ms CPU per s"

t_start=$SECONDS
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "scale $BENCH_SCALE, workloads: $WORKLOADS; with $WORKERS workers: $WORKER_WORKLOADS; history $HISTORY"
for w in $WORKLOADS; do
  modes="memory broker"
  [[ " $WORKER_WORKLOADS " == *" $w "* ]] && modes="$modes broker-w$WORKERS"
  runs=$RUNS
  [ "$w" = light ] && runs=$LIGHT_RUNS
  for r in $(seq "$runs"); do
    for m in $modes; do run_cell "$w" "$m" "$r"; done
  done
done
# workloads run with workers only
for w in $WORKER_WORKLOADS; do
  [[ " $WORKLOADS " == *" $w "* ]] && continue
  runs=$RUNS
  [ "$w" = light ] && runs=$LIGHT_RUNS
  for r in $(seq "$runs"); do
    for m in broker "broker-w$WORKERS"; do run_cell "$w" "$m" "$r"; done
  done
done
elapsed=$((SECONDS - t_start))
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- the report ----
pkg() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo '?'; }
{
  echo "## Channels on Redis: bench/broker.sh (BENCH_SCALE=$BENCH_SCALE, $(date -u '+%Y-%m-%d %H:%M UTC'), $((elapsed / 60)) min $((elapsed % 60)) s)"
  echo
  echo "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1), $(nproc) cores shared by lua-sse, Redis and loadgen; $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo); kernel $(uname -r); load average $load_start at the start, $load_end at the end"
  echo "- lua-sse $(git describe --always --dirty 2>/dev/null || echo '(not a git checkout)') on Lua 5.4 ($(pkg liblua5.4-0)), hiredis $(pkg libhiredis-dev); redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') (no persistence${REDIS_ARGS:+, $REDIS_ARGS}; idle: $REDIS_IDLE_MS_PER_S ms CPU per s); channel history $HISTORY"
  echo
  lua5.4 - "$RAW" "$WORKERS" "$REDIS_IDLE_MS_PER_S" <<'LUA'
local cjson = require("cjson")
local raw, nworkers = arg[1], arg[2]
local cells, order, seen = {}, {}, {}
for line in io.lines(raw) do
  local w, mode, run, json = line:match("^(%S+)\t(%S+)\t(%S+)\t(.*)$")
  if w then
    local ok, r = pcall(cjson.decode, json)
    if not ok or type(r) ~= "table" then r = { error = json } end
    r.w, r.m, r.run = w, mode, tonumber(run)
    local key = w .. " " .. mode
    if not seen[key] then seen[key] = true; order[#order + 1] = key end
    cells[key] = cells[key] or {}
    table.insert(cells[key], r)
  end
end
local function rate(r) return r.deliveries_per_s or r.events_per_s end
local function paced(r) return (r.rate or 0) > 0 end
-- the median run by deliveries/s (paced: by p99, lower is better)
local pick = {}
for key, list in pairs(cells) do
  local ok = {}
  for _, r in ipairs(list) do if not r.error and rate(r) then ok[#ok + 1] = r end end
  if #ok == 0 then
    pick[key] = list[1]
  else
    table.sort(ok, function(a, b)
      if paced(a) then return (a.p99_ms or 0) < (b.p99_ms or 0) end
      return rate(a) > rate(b)
    end)
    local m = ok[(#ok + 1) // 2]
    m.nruns, m.nfailed = #list, 0
    for _, r in ipairs(list) do if r.error or r.ok ~= true or r.check then m.nfailed = m.nfailed + 1 end end
    if #ok > 1 and rate(m) > 0 then
      local lo, hi = rate(ok[#ok]), rate(ok[1])
      if paced(m) then lo, hi = ok[1].p99_ms, ok[#ok].p99_ms end
      m.spread = math.abs(hi - lo) / (paced(m) and m.p99_ms or rate(m)) / 2
    end
    pick[key] = m
  end
end
local function thousands(n)
  local s = ("%.0f"):format(n):reverse():gsub("(%d%d%d)", "%1,"):reverse()
  return (s:gsub("^,", ""))
end
local function num(v, fmt)
  if type(v) ~= "number" then return "" end
  return (fmt or "%.2f"):format(v)
end
local function cpu_per_M(r) return r.server_cpu_s_per_M end          -- loadgen's (one process)
local function tree_per_M(r) return r.tree_cpu_s_per_M end           -- sampled, whole tree
local function redis_us_per_pub(r, field)
  if type(r[field]) == "number" and (r.redis_publish or 0) > 0 then return r[field] * 1e6 / r.redis_publish end
end
local function per_pub(r, v) if type(v) == "number" and (r.published or 0) > 0 then return v / r.published end end
local idle = tonumber(arg[3]) or 0     -- Redis's CPU ms per s with nothing to do
local function redis_net_us(r)         -- schedstat over the window less idle housekeeping
  if type(r.redis_sched_s) == "number" and type(r.sampled_window_s) == "number" and (r.redis_publish or 0) > 0 then
    return math.max(0, r.redis_sched_s - idle / 1000 * r.sampled_window_s) * 1e6 / r.redis_publish
  end
end

print("| workload | mode | delivered | deliveries/s | p50 ms | p99 ms | lua-sse CPU-s per M | Redis CPU µs per publish: stat / net of idle | scripts per publish | PUBLISH per publish | pub/sub msgs per publish | spread |")
print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
for _, key in ipairs(order) do
  local r = pick[key]
  if r.error then
    print(("| %s | %s | %s | | | | | | | | | |"):format(r.w, r.m, tostring(r.error)))
  else
    local delivered = r.mode == "count" and r.received or r.delivered
    local mark = (r.nfailed or 0) > 0 and (" ✗ (%d of %d runs failed)"):format(r.nfailed, r.nruns) or ""
    local cpu = r.m:find("^broker%-w") and tree_per_M(r) or cpu_per_M(r)
    local redis, scripts, pubs, msgs = "", "", "", ""
    if r.m ~= "memory" and r.mode == "fanout" then
      redis = ("%s / %s"):format(num(redis_us_per_pub(r, "redis_cpu_s"), "%.0f"), num(redis_net_us(r), "%.0f"))
      scripts = num(per_pub(r, (r.redis_evalsha or 0) + (r.redis_eval or 0)), "%.3f")
      pubs = num(per_pub(r, r.redis_publish), "%.3f")
      msgs = num(per_pub(r, (r.redis_publish or 0) * (r.redis_numsub or 0)), "%.2f")
    end
    print(("| %s | %s | %s/%s%s | **%s** | %s | %s | %s%s | %s | %s | %s | %s | %s |"):format(r.w,
      r.m:find("^broker%-w") and ("broker, %s workers"):format(nworkers) or r.m,
      thousands(delivered or 0), thousands(r.expected or 0), mark, thousands(rate(r) or 0),
      num(r.p50_ms), num(r.p99_ms), num(cpu), r.m:find("^broker%-w") and " (all processes)" or "",
      redis, scripts, pubs, msgs, r.spread and ("±%.0f%%"):format(r.spread * 100) or ""))
  end
end
print()

local function ratio(x, y)
  if type(x) ~= "number" or type(y) ~= "number" or y == 0 then return nil end
  return x / y
end
local function fmt(v) return v and ("%.2f"):format(v) or "n/a" end
print("Broker / memory (lua-sse's CPU: target ≤ 1.3 on the fan-out workloads):")
print()
print("| workload | deliveries/s | p99 | lua-sse CPU per delivery | (run by run) | lua-sse + Redis CPU per delivery | target ≤ 1.3 |")
print("|---|--:|--:|--:|--:|--:|---|")
for _, key in ipairs(order) do
  local w, m = key:match("^(%S+) (%S+)$")
  local b, mem = pick[w .. " broker"], pick[w .. " memory"]
  if m == "broker" and mem and not b.error and not mem.error then
    local c = ratio(cpu_per_M(b), cpu_per_M(mem))
    local both
    if type(b.server_cpu_s) == "number" and type(b.redis_cpu_s) == "number" and (b.delivered or 0) > 0 then
      both = ratio((b.server_cpu_s + b.redis_cpu_s) / (b.delivered / 1e6), cpu_per_M(mem))
    end
    -- the runs are interleaved (memory #k, broker #k, ...): the ratio within each pair
    local lo, hi
    for _, x in ipairs(cells[w .. " broker"]) do
      for _, y in ipairs(cells[w .. " memory"]) do
        local q = x.run == y.run and ratio(cpu_per_M(x), cpu_per_M(y))
        if q then lo, hi = math.min(lo or q, q), math.max(hi or q, q) end
      end
    end
    local range = lo and (lo == hi and fmt(lo) or ("%s–%s"):format(fmt(lo), fmt(hi))) or ""
    local target = "(no channel)"
    if b.mode == "fanout" then target = c and (c <= 1.3 and "met" or "**missed**") or "n/a" end
    if (b.nfailed or 0) + (mem.nfailed or 0) > 0 then target = "runs failed" end
    print(("| %s | %s | %s | %s | %s | %s | %s |"):format(w, fmt(ratio(rate(b), rate(mem))),
      fmt(ratio(b.p99_ms, mem.p99_ms)), fmt(c), range, b.mode == "fanout" and fmt(both) or "", target))
  end
end
print()
print(("%s workers / 1 (both with the broker; CPU summed over the server's processes, sampled from /proc):"):format(nworkers))
print()
print("| workload | deliveries/s, 1 | deliveries/s, " .. nworkers .. " | ratio | CPU-s per M, 1 | CPU-s per M, " .. nworkers .. " | ratio | loadgen CPU-s, 1 / " .. nworkers .. " |")
print("|---|--:|--:|--:|--:|--:|--:|--:|")
for _, key in ipairs(order) do
  local w, m = key:match("^(%S+) (%S+)$")
  if m:find("^broker%-w") then
    local one, many = pick[w .. " broker"], pick[key]
    if one and not one.error and not many.error then
      print(("| %s | %s | %s | %s | %s | %s | %s | %s / %s |"):format(w, thousands(rate(one) or 0),
        thousands(rate(many) or 0), fmt(ratio(rate(many), rate(one))), num(tree_per_M(one)),
        num(tree_per_M(many)), fmt(ratio(tree_per_M(many), tree_per_M(one))),
        num(one.loadgen_cpu_s), num(many.loadgen_cpu_s)))
    end
  end
end
print()
-- the sampler against loadgen's own figure, where both measured the same single process
local worst, n = 0, 0
for _, list in pairs(cells) do
  for _, r in ipairs(list) do
    if not r.m:find("^broker%-w") and type(r.tree_cpu_s) == "number" and type(r.server_cpu_s) == "number" then
      n = n + 1
      worst = math.max(worst, math.abs(r.tree_cpu_s - r.server_cpu_s))
    end
  end
end
print(("Each row is the median run by deliveries/s (light: by p99) of %s; spread: half the"
  .. " range over the runs. lua-sse CPU-s per M: utime + stime of the server process over"
  .. " loadgen's publishing window (count: the whole run) per million deliveries, from"
  .. " loadgen; with workers the sum over the supervisor and its workers, sampled every 10"
  .. " ms (on the %d single-process runs the sampler was within %.2f CPU-s of loadgen)."
  .. " Redis CPU per publish, over the same window: its utime + stime (/proc/PID/stat, 10"
  .. " ms ticks), and its main thread's time on a CPU (/proc/PID/schedstat, ns) less its"
  .. " idle housekeeping (%s ms/s, measured before the first run). Scripts per publish:"
  .. " EVALSHA + EVAL calls (INFO commandstats) over the run per publish, syncs and"
  .. " NOSCRIPT retries included; pub/sub msgs per publish: PUBLISH calls x the topic's"
  .. " subscribers (one subscriber connection per process). Run by run: the broker run over"
  .. " the memory run next to it (the runs are interleaved).")
  :format("the runs of the cell", n, worst, arg[3]))
local retries = {}
for _, key in ipairs(order) do
  for _, r in ipairs(cells[key]) do
    if (r.redis_failed or 0) > 0 then
      retries[#retries + 1] = ("%s %s #%d: %d"):format(r.w, r.m, r.run, r.redis_failed)
    end
  end
end
if #retries > 0 then
  print()
  print("EVALSHA answered with an error (NOSCRIPT: the script is not cached in a Redis that"
    .. " just started; then EVAL): " .. table.concat(retries, "; ") .. ".")
end
LUA
  echo
  echo "Workloads at this scale (loadgen arguments, as bench/run.sh):"
  echo
  for w in $WORKLOADS; do echo "- $w: \`${ARGS[$w]}\`"; done
} >"$OUT"
cat "$OUT"
exit "$status"
