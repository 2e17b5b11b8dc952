# Shared by nchan.sh and openresty.sh (sourced after lib.sh): runs nginx with the
# configuration on stdin and prints "ready <port> <worker pid>".
#
# nginx runs ONE worker process so its figures compare with single-threaded servers;
# the master stays (Nchan relies on it) but only forks the worker and waits, so the
# driver is given the worker's PID for CPU and RSS. Configuration text may use @PORT@,
# @PREFIX@, @NOFILE@ (the hard descriptor limit) and @MODULES@; everything lives in a
# temporary prefix removed at exit.
run_nginx() {
  need_pkgs nginx "$@"
  local conf want=$PORT
  conf=$(cat)
  # globals: the EXIT trap runs after the function's locals are gone
  nginx_prefix=$(mktemp -d /tmp/bench-nginx.XXXXXX) nginx_master='' nginx_worker=''
  trap nginx_cleanup EXIT
  trap 'exit 0' TERM INT
  # With port 0 the port is ours to choose: another process may take it first, so try
  # a few.
  for _ in 1 2 3; do
    [ "$want" = 0 ] && PORT=$(free_port)
    sed -e "s|@PORT@|$PORT|g" -e "s|@PREFIX@|$nginx_prefix|g" -e "s|@NOFILE@|$(ulimit -Hn)|g" \
      -e "s|@MODULES@|/usr/lib/nginx/modules|g" <<<"$conf" >"$nginx_prefix/nginx.conf"
    nginx -p "$nginx_prefix" -c "$nginx_prefix/nginx.conf" -e stderr -g 'daemon off;' &
    nginx_master=$!
    # The master forks its worker once it has bound the port (it retries a busy port
    # for a few seconds, then exits).
    for _ in $(seq 200); do
      nginx_worker=$(pgrep -P "$nginx_master" | head -n1 || true)
      [ -n "$nginx_worker" ] || ! kill -0 "$nginx_master" 2>/dev/null && break
      sleep 0.05
    done
    [ -n "$nginx_worker" ] && wait_port "$PORT" "$nginx_master" && break
    nginx_stop
    [ "$want" = 0 ] || break
  done
  [ -n "$nginx_worker" ] || { echo "nginx did not start" >&2; exit 1; }
  echo "ready $PORT $nginx_worker"
  wait "$nginx_master" || true
}

nginx_stop() {
  [ -n "$nginx_master" ] || return 0
  kill -TERM "$nginx_master" 2>/dev/null || true
  wait "$nginx_master" 2>/dev/null || true
  nginx_master='' nginx_worker=''
}

nginx_cleanup() {
  nginx_stop
  rm -rf "$nginx_prefix"
}

# The part of nginx.conf both servers share.
NGINX_MAIN='
worker_processes 1;
worker_rlimit_nofile @NOFILE@;
user root;
pid @PREFIX@/nginx.pid;
error_log stderr warn;
events { worker_connections @NOFILE@; }
'
NGINX_HTTP='
  access_log off;
  client_body_temp_path @PREFIX@/body;
  proxy_temp_path @PREFIX@/proxy;
  fastcgi_temp_path @PREFIX@/fastcgi;
  uwsgi_temp_path @PREFIX@/uwsgi;
  scgi_temp_path @PREFIX@/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 3600s;
  send_timeout 3600s;
'
