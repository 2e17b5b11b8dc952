#!/usr/bin/env bash
# Nchan (nginx pub/sub module) on the benchmark contract: /sub is an EventSource
# subscriber and /pub the publisher of one channel. /count is not something Nchan does:
# it answers 404 and the driver marks it n/a. One nginx worker: see nginx-lib.sh.
# Nchan serves /sub as EventSource only to requests that accept text/event-stream, as
# browsers and loadgen do: by hand, curl -N -H 'Accept: text/event-stream' .../sub
# Usage: bench/servers/nchan.sh [port]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx-lib.sh"

run_nginx libnginx-mod-nchan <<EOF_CONF
load_module @MODULES@/ngx_nchan_module.so;
$NGINX_MAIN
http {
  $NGINX_HTTP
  # Memory for messages in flight; no replay: a new subscriber starts at the newest message.
  nchan_shared_memory_size 256m;
  server {
    listen 127.0.0.1:@PORT@ backlog=4096;
    location = /sub {
      nchan_subscriber eventsource;
      nchan_channel_id bench;
      nchan_subscriber_first_message newest;
    }
    location = /pub {
      nchan_publisher;
      nchan_channel_id bench;
      # a short history (the default length) that expires: messages are not kept for replay
      nchan_message_buffer_length 10;
      nchan_message_timeout 60s;
    }
  }
}
EOF_CONF
