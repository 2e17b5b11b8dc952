#!/usr/bin/env bash
# Installs what lua-sse needs on Debian 12 (idempotent: only missing packages are
# installed), then builds and installs the rock system-wide so require("sse") works.
#   bash scripts/setup.sh            # runtime + build
#   SSE_SETUP_TEST=1 bash scripts/setup.sh   # also what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config git lua5.4 liblua5.4-dev luarocks
          libmicrohttpd-dev zlib1g-dev libcurl4-openssl-dev libhiredis-dev lua-cjson curl
          ca-certificates)
if [[ "${SSE_SETUP_TEST:-0}" == 1 ]]; then
  packages+=(lua-busted lua-socket valgrind openssl clang-14 libclang-rt-14-dev redis-server
            lua-luv lua-cqueues lua-check prometheus nginx-light gnutls-bin)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The rock: builds through CMakeLists.txt and installs sse + sse.core system-wide.
luarocks --lua-version=5.4 make --deps-mode=none lua-sse-scm-1.rockspec >/tmp/lua-sse-luarocks.log 2>&1 \
  || { cat /tmp/lua-sse-luarocks.log; echo "setup: luarocks make failed"; exit 1; }
rm -rf build.luarocks
lua5.4 -e 'local sse = require("sse"); io.write("setup: lua-sse ", sse.version, " installed\n")'
