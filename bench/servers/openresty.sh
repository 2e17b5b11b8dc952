#!/usr/bin/env bash
# OpenResty-style server: Debian's nginx with the ngx_lua module (LuaJIT) running the
# handlers in openresty_sse.lua. One nginx worker: see nginx-lib.sh.
# Usage: bench/servers/openresty.sh [port]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx-lib.sh"

run_nginx libnginx-mod-http-lua <<EOF_CONF
load_module @MODULES@/ndk_http_module.so;
load_module @MODULES@/ngx_http_lua_module.so;
$NGINX_MAIN
http {
  $NGINX_HTTP
  lua_package_path "$BENCH_SERVERS/?.lua;;";
  lua_check_client_abort on;   # for ngx.on_abort in /sub
  lua_socket_log_errors off;
  server {
    listen 127.0.0.1:@PORT@ backlog=4096;
    location = /sub   { content_by_lua_block { require("openresty_sse").sub() } }
    location = /pub   { content_by_lua_block { require("openresty_sse").pub() } }
    location = /count { content_by_lua_block { require("openresty_sse").count() } }
  }
}
EOF_CONF
