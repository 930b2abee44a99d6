#!/usr/bin/env bash
# The GPU figures in the README, on a CUDA machine: a timed smoke run of `bash run_fold.sh 0` on the embedded
# default (smoke), the GPU mode of bench/train_throughput.py with every backbone eager (eager) and torch.compile on
# the first (compile), and the LightGBM stacker's threads on this machine's cores (stack).
#   bash scripts/gpu_check.sh [OUT_DIR]        (default work/gpu_check; set ICH_PYTHON to use your own CUDA torch)
# STEPS picks the steps (default "smoke eager compile stack"); each has its own time limit in seconds (SMOKE_S,
# EAGER_S, COMPILE_S, STACK_S), so one that hangs costs only its share, and every log lands in OUT_DIR as it is
# written. On the first H100 run each model's first batch took 18-80 s (cuDNN autotuning, compiling): all four steps
# want ~15 minutes, so on a machine lent by the 10 minutes split them, e.g. STEPS="eager compile", then the rest.
# Without the smoke step the benches read a small synthetic set built here. GPU_BACKBONES and GPU_SIZES pick the
# eager rows; COMPILE_SIZES (default GPU_SIZES) the compiled ones, each of which pays a compile first (e.g. 256 only,
# to fit one call). DRY_RUN=1 prints each step's command.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-work/gpu_check}"
mkdir -p "$out"
source scripts/env.sh
export PYTHONUNBUFFERED=1

if [ -z "${DRY_RUN:-}" ]; then
  "$PY" - > "$out/machine.txt" 2>&1 <<'PYEOF' || { cat "$out/machine.txt" >&2; exit 1; }
import os, platform, sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA device: scripts/gpu_check.sh measures a GPU")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}; {os.cpu_count()} CPU cores; Python {platform.python_version()}")
PYEOF
  cat "$out/machine.txt"
fi

step() {  # step NAME SECONDS COMMAND...: run it under a limit, log to OUT_DIR/NAME.log, report its time and status
  local name="$1" limit="$2"; shift 2
  if [ -n "${DRY_RUN:-}" ]; then echo "[gpu_check] $name ($limit s): $*"; return; fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local status=$?
  echo "[gpu_check] $name: exit $status after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/machine.txt"
}

steps=" ${STEPS:-smoke eager compile stack} "
data_args=()
if [[ "$steps" == *" smoke "* ]]; then
  step run_fold "${SMOKE_S:-300}" bash run_fold.sh 0
elif [[ "$steps" == *" eager "* || "$steps" == *" compile "* ]]; then  # the benches upsample a few cached slices
  small=work/gpu_check_data
  step small_data 120 bash -c "'$PY' -m src.synth $small --studies 24 && '$PY' -m src.data.metadata --data $small \
    && '$PY' -m src.data.cache --data $small --size 96 --format memmap"
  data_args=(--data "$small")
fi
backbones="${GPU_BACKBONES:-resnet50d,efficientnet_b2,convnext_tiny}"
sizes="${GPU_SIZES:-256,512}"
if [[ "$steps" == *" eager "* ]]; then
  step bench_eager "${EAGER_S:-300}" "$PY" bench/train_throughput.py "${data_args[@]}" --no-compile \
    --gpu-backbones "$backbones" --gpu-sizes "$sizes"
  cp work/bench/train_throughput.md "$out/train_throughput_eager.md" 2>/dev/null
fi
if [[ "$steps" == *" compile "* ]]; then
  step bench_compile "${COMPILE_S:-300}" "$PY" bench/train_throughput.py "${data_args[@]}" \
    --gpu-backbones "${backbones%%,*}" --gpu-sizes "${COMPILE_SIZES:-$sizes}"
  cp work/bench/train_throughput.md "$out/train_throughput_compile.md" 2>/dev/null
fi
if [[ "$steps" == *" stack "* ]]; then  # the stackers run on the CPU: LightGBM's fit time on this machine's cores
  step stack_threads "${STACK_S:-240}" "$PY" bench/stack_threads.py --rows 30000,3000 --threads "1,4,$(nproc)"
fi
echo "[gpu_check] logs and tables in $out/"
