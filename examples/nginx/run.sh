#!/usr/bin/env bash
# lua-sse behind nginx, TLS + HTTP/2 to the browser (see nginx.conf.in for the why of each
# setting). Starts an app (default: examples/clock.lua) on 127.0.0.1:$SSE_PORT, makes a
# self-signed certificate in a temporary directory, fills in nginx.conf.in there, starts
# nginx in front on 127.0.0.1:$HTTPS_PORT (both in the foreground, no daemon) and prints
# the https URL. Ctrl-C stops both and removes the directory.
#   bash examples/nginx/run.sh [app.lua]         SSE_PORT=8080 HTTPS_PORT=8443 by default
# The certificate is self-signed: the browser asks once (or, for a try-out, start Chromium
# with --ignore-certificate-errors). Needs nginx with http_v2 (Debian: nginx-light) and
# openssl. Uses this checkout's lua/ and build/lib/ first, then the installed rock.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
app=${1:-$root/examples/clock.lua}
sse_port=${SSE_PORT:-8080}
https_port=${HTTPS_PORT:-8443}

for cmd in nginx openssl lua5.4 curl; do
  command -v "$cmd" >/dev/null || { echo "run.sh: $cmd not found (Debian: apt-get install nginx-light openssl lua5.4 curl)" >&2; exit 1; }
done
[[ -f $app ]] || { echo "run.sh: no such app $app" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/lua-sse-nginx.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
mkdir -p "$dir/tmp"
sed -e "s|@LISTEN@|127.0.0.1:$https_port|g" -e "s|@UPSTREAM@|127.0.0.1:$sse_port|g" \
    -e "s|@DIR@|$dir|g" "$here/nginx.conf.in" >"$dir/nginx.conf"

export LUA_PATH="$root/lua/?.lua;$root/lua/?/init.lua;;"
export LUA_CPATH="$root/build/lib/?.so;;"
alive() {
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "run.sh: a process exited during start-up" >&2; exit 1; }
  done
}

PORT=$sse_port lua5.4 "$app" &
pids+=($!)
# nginx once lua-sse answers (at most 10 s), so its first requests do not get a 502.
for _ in $(seq 100); do
  alive
  curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$sse_port/" && break
  sleep 0.1
done
nginx -p "$dir" -c "$dir/nginx.conf" -g "daemon off; pid $dir/nginx.pid;" &
pids+=($!)

# Ready once nginx answers over HTTP/2 with lua-sse behind it (at most 10 s).
proto=""
for _ in $(seq 100); do
  alive
  proto=$(curl -sk -o /dev/null -w '%{http_version} %{http_code}' --max-time 1 \
    "https://127.0.0.1:$https_port/" 2>/dev/null || true)
  [[ $proto == "2 "[2-4]* ]] && break
  sleep 0.1
done
[[ $proto == "2 "[2-4]* ]] || { echo "run.sh: nginx did not answer over HTTP/2 (got '$proto')" >&2; exit 1; }

echo
echo "lua-sse behind nginx (HTTP/2, self-signed certificate): https://127.0.0.1:$https_port/"
echo "  (lua-sse itself: http://127.0.0.1:$sse_port; nginx files: $dir; Ctrl-C stops both)"
wait -n "${pids[@]}"
