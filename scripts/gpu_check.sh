#!/usr/bin/env bash
# The GPU figures in the README, in one go on a CUDA machine: a timed smoke run of `bash run_fold.sh 0` on the
# embedded default, then the GPU mode of bench/train_throughput.py (every backbone eagerly, then torch.compile on
# the first one, since compiling every backbone at two sizes takes longer than the rest together).
#   bash scripts/gpu_check.sh [OUT_DIR]        (default work/gpu_check; set ICH_PYTHON to use your own CUDA torch)
# Each step has its own time limit (seconds: SMOKE_S, EAGER_S, COMPILE_S, STACK_S), so one that hangs costs only its
# share, and every log lands in OUT_DIR as it is written. SMOKE_S=0 skips the smoke run (a small set feeds the benches).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-work/gpu_check}"
mkdir -p "$out"
source scripts/env.sh
export PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF' 2>&1 | tee "$out/machine.txt" || exit 1
import os, platform, sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA device: scripts/gpu_check.sh measures a GPU")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}; {os.cpu_count()} CPU cores; Python {platform.python_version()}")
PYEOF

step() {  # step NAME SECONDS COMMAND...: run it under a limit, log to OUT_DIR/NAME.log, report its time and status
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local status=$?
  echo "[gpu_check] $name: exit $status after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/machine.txt"
}

data_args=()
if [ "${SMOKE_S:-300}" -gt 0 ]; then
  step run_fold "${SMOKE_S:-300}" bash run_fold.sh 0
else  # no smoke run: the benches need only a small cached set (they upsample its slices)
  small=work/gpu_check_data
  step small_data 120 bash -c "'$PY' -m src.synth $small --studies 24 && '$PY' -m src.data.metadata --data $small \
    && '$PY' -m src.data.cache --data $small --size 96 --format memmap"
  data_args=(--data "$small")
fi
backbones="${GPU_BACKBONES:-resnet50d,efficientnet_b2,convnext_tiny}"
step bench_eager "${EAGER_S:-150}" "$PY" bench/train_throughput.py "${data_args[@]}" --no-compile \
  --gpu-backbones "$backbones"
cp work/bench/train_throughput.md "$out/train_throughput_eager.md" 2>/dev/null
step bench_compile "${COMPILE_S:-200}" "$PY" bench/train_throughput.py "${data_args[@]}" \
  --gpu-backbones "${backbones%%,*}"
cp work/bench/train_throughput.md "$out/train_throughput_compile.md" 2>/dev/null
# The stackers run on the CPU: how LightGBM's fit time scales with this machine's many cores.
step stack_threads "${STACK_S:-120}" "$PY" bench/stack_threads.py --rows 30000,3000 --threads "1,4,$(nproc)"
echo "[gpu_check] logs and tables in $out/"
