#!/usr/bin/env bash
# Installs what the browser and Node tests in test/browser/ need, on Debian 12
# (idempotent: does nothing when everything is there):
#   - Chromium, the Debian package (/usr/bin/chromium); no browser is ever downloaded;
#   - Node.js and npm, Debian's packages, only when `node` is missing;
#   - test/browser/node_modules from the committed package-lock.json (npm ci), only when
#     node_modules is missing or the lock file changed since the last install.
#   bash scripts/setup-browser.sh        then: node --test test/browser/*.test.mjs
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[[ $(id -u) == 0 ]] || sudo="sudo"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
[[ -x /usr/bin/chromium ]] || installed chromium || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
  echo "setup-browser: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

major=$(node -p 'process.versions.node.split(".")[0]')
if ((major < 18)); then
  echo "setup-browser: Node.js $(node --version) is too old: the tests need Node 18 or newer" >&2
  exit 1
fi

# npm ci only when needed: the stamp holds the hash of the lock file it installed.
dir=test/browser
stamp=$dir/node_modules/.lua-sse-lock.sha256
want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
if [[ ! -d $dir/node_modules/playwright-core || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "setup-browser: npm ci in $dir"
  npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
  echo "$want" >"$stamp"
fi
