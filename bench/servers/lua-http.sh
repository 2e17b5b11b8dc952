#!/usr/bin/env bash
# lua-http peer (lua-http.lua) on the benchmark contract. Debian 12 packages lua-http for
# Lua 5.1-5.3, but some of its dependencies only up to 5.2: it runs on lua5.2.
# Execs the interpreter, so the PID the driver holds is the server's.
# Usage: bench/servers/lua-http.sh [port]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_pkgs lua5.2 lua-http
exec lua5.2 "$BENCH_SERVERS/lua-http.lua" "$PORT"
