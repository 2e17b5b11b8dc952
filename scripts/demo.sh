#!/usr/bin/env bash
# Sets everything up and runs the clock demo (open the URL it prints; Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec lua5.4 examples/clock.lua "$@"
