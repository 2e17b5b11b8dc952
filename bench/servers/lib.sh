# Shared by the server scripts in this folder (sourced, not run).
# Everything but the final "ready <port> [pid]" line goes to stderr: stdout is the
# driver's channel.

# need_pkgs PKG...: installs the Debian packages that are missing (and only those), so a
# second start costs nothing and a machine without them still gets them.
need_pkgs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # An install can fail on stale package lists: refresh them once and retry.
  apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update >&2 && apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
}

# free_port: prints a port no socket uses, for servers that cannot bind port 0 and report
# it (nginx). It is taken below the ephemeral range, where the load generator's own client
# sockets (and their TIME_WAIT remains) would otherwise collide with it.
free_port() {
  local low p
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range
  for _ in $(seq 100); do
    p=$((10000 + RANDOM % (low - 10000)))
    grep -qi ":$(printf '%04X' "$p") " /proc/net/tcp /proc/net/tcp6 2>/dev/null || { echo "$p"; return 0; }
  done
  return 1
}

# wait_port PORT PID: waits until PORT accepts connections while PID is alive.
wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# Every subscriber is a descriptor: use the whole hard limit.
ulimit -n "$(ulimit -Hn)"

# The servers bind what the first argument or PORT says; 0 means any free port.
PORT=${1:-${PORT:-8080}}
BENCH_SERVERS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
