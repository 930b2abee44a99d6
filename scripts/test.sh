#!/usr/bin/env bash
# The test command: sets up the environment (Python packages; Debian's chromium for the browser test) if needed,
# then runs the whole suite on CPU. Without chromium the browser test is skipped with its reason, never faked.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/install_browser.sh || echo "[browser] could not install chromium: the browser test will be skipped"
exec "$PY" -m pytest -q tests "$@"
