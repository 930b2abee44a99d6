#!/usr/bin/env bash
# Installs the headless browser that tests/test_serve.py drives: Debian's chromium + chromium-driver (a matched
# pair from the distribution's packages; nothing is downloaded outside the package manager). Idempotent.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "[browser] $(chromium --version 2>/dev/null | head -1); chromedriver at $(command -v chromedriver)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: apt-get not found; install chromium and its chromedriver with this system's package manager" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "error: need root (or sudo) to apt-get install chromium" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "[browser] installed $(chromium --version 2>/dev/null | head -1); chromedriver at $(command -v chromedriver)"
