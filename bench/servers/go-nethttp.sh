#!/usr/bin/env bash
# Go net/http peer (go-nethttp.go) on the benchmark contract: builds it once (standard
# library only; GOPROXY=off as no module is fetched) and execs it, so the PID the driver
# holds is the server's. Usage: bench/servers/go-nethttp.sh [port]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_pkgs golang-go

bin="$BENCH_SERVERS/../.build/go-nethttp"
if [ ! -x "$bin" ] || [ "$BENCH_SERVERS/go-nethttp.go" -nt "$bin" ]; then
  mkdir -p "$(dirname "$bin")"
  GOPROXY=off go build -o "$bin" "$BENCH_SERVERS/go-nethttp.go" >&2
fi
exec "$bin" "$PORT"
