# Sourced by run_fold.sh and scripts/test.sh: sets $PY to a Python that has requirements.txt installed.
# $ICH_PYTHON, when set, is used as it is, unchecked: an interpreter you manage yourself, e.g. a GPU image's own
# CUDA build of torch, which the CPU pins in requirements.txt would replace. Otherwise the current python3 when it
# already has the pinned packages, else .venv/, built once (and again whenever requirements.txt changes: the stamp
# holds its hash).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/requirements.txt"
stamp="$root/.venv/.requirements.sha1"
want="$(sha1sum "$req" | cut -d' ' -f1)"

has_packages() {
  # True when every requirement is installed, at the pinned version where one is pinned.
  "$1" - "$req" <<'PYEOF' 2>/dev/null
import importlib.metadata as md
import sys

for line in open(sys.argv[1]):
    spec = line.split("#")[0].strip()
    if not spec:
        continue
    name, _, pinned = spec.partition("==")
    try:
        have = md.version(name.strip())
    except md.PackageNotFoundError:
        sys.exit(1)
    if pinned and have.split("+")[0] != pinned.strip():
        sys.exit(1)
PYEOF
}

install_side_by_side() {
  # pip installs one wheel after another, each unpacked on one core: 6 GB for torch and its CUDA wheels. Resolved
  # once (pip's own --report, the same versions), the wheels are split by size among one pip per CPU (at most 4),
  # each installing its share with --no-deps; `pip check` then confirms the set. Any failure: the caller falls
  # back to the plain install, which completes whatever is missing.
  local venv="$root/.venv" plan="$root/.venv/.install-plan" cpus part pids=() status=0
  cpus="$("$venv/bin/python" -c 'import os; print(min(4, len(os.sched_getaffinity(0))))' 2>/dev/null || echo 1)"
  [ "$cpus" -ge 2 ] || return 1
  "$venv/bin/pip" install --quiet --dry-run --report "$plan.json" -r "$req" >/dev/null 2>&1 \
    && "$venv/bin/python" "$root/scripts/split_install.py" "$plan.json" "$cpus" "$plan" || status=1
  if [ "$status" -eq 0 ] && compgen -G "$plan.*.txt" > /dev/null; then
    echo "[setup] installing $(cat "$plan".*.txt | wc -l) wheels with $(ls "$plan".*.txt | wc -l) pip processes at once"
    for part in "$plan".*.txt; do
      "$venv/bin/pip" install --quiet --no-deps --no-compile -r "$part" >/dev/null 2>&1 &
      pids+=($!)
    done
    for part in "${pids[@]}"; do wait "$part" || status=1; done
  fi
  rm -f "$plan".*
  [ "$status" -eq 0 ] && "$venv/bin/pip" check >/dev/null 2>&1
}

if [ -n "${ICH_PYTHON:-}" ]; then
  command -v "$ICH_PYTHON" >/dev/null || { echo "error: ICH_PYTHON=$ICH_PYTHON is not an executable" >&2; exit 1; }
  PY="$ICH_PYTHON"
elif [ -x "$root/.venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  PY="$root/.venv/bin/python"
elif has_packages python3; then
  PY="$(command -v python3)"
else
  echo "[setup] creating $root/.venv from requirements.txt (first run only; a few minutes)"
  python3 -m venv "$root/.venv" || { echo "error: python3 -m venv failed (install python3-venv)" >&2; exit 1; }
  "$root/.venv/bin/pip" install --quiet --upgrade pip >/dev/null 2>&1 || true
  if ! install_side_by_side; then
    echo "[setup] installing with one pip process"
    "$root/.venv/bin/pip" install --quiet --no-compile -r "$req" \
      || { echo "error: pip install -r $req failed" >&2; exit 1; }
  fi
  # pip byte-compiles each file on one core (13k files of torch & co: about a minute here); compileall on every
  # core does the same work in half that on 2 cores. The .pyc files matter: where PYTHONDONTWRITEBYTECODE is set
  # (as on these machines) Python never writes them itself, and each stage would compile torch again (~10 s).
  site_packages="$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
  # A few packages ship files that do not parse (templates, Python 2 tests): pip skips them too.
  "$root/.venv/bin/python" -m compileall -q -j 0 "$site_packages" >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
  PY="$root/.venv/bin/python"
fi
export PY
