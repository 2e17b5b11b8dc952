#!/usr/bin/env bash
# Node http peer (node-http.js) on the benchmark contract; execs node, so the PID the
# driver holds is the server's. Node 20 comes with the project's test setup; the Debian
# package is the fallback. Usage: bench/servers/node-http.sh [port]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
command -v node >/dev/null || need_pkgs nodejs
exec node "$BENCH_SERVERS/node-http.js" "$PORT"
