#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole suite (CPU only, ~minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$PY" -m pytest -q tests "$@"
