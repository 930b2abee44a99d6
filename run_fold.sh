#!/usr/bin/env bash
# Train and evaluate fold K end to end: data → cache → folds → CNN → stackers → reports → submission.
#   bash run_fold.sh K [--config FILE.yaml] [--set key=value ...] [--data DIR]
# K = -1 trains on every fold's images (a final model; no OOF). Re-running after a kill resumes.
set -euo pipefail
cd "$(dirname "$0")"

usage() { echo "usage: bash run_fold.sh K [--config FILE.yaml] [--set key=value ...] [--data DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
fold="$1"; shift
[[ "$fold" =~ ^-?[0-9]+$ ]] || { echo "error: fold must be an integer (got '$fold')" >&2; usage; }

config_args=(); data_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || usage; config_args+=(--config "$2"); shift 2 ;;
    --set) [ $# -ge 2 ] || usage; config_args+=(--set "$2"); shift 2 ;;
    --data) [ $# -ge 2 ] || usage; data_args+=(--data "$2"); shift 2 ;;
    *) echo "error: unknown option '$1'" >&2; usage ;;
  esac
done

# Wall-clock seconds per stage, printed at the end and kept in work/: where a slow machine's minutes went.
stage_times=()
record_time() { stage_times+=("$((SECONDS - $1))"$'\t'"$2"); }  # bash's SECONDS: whole seconds since the start
setup_start=$SECONDS
source scripts/env.sh
record_time "$setup_start" "setup: Python packages (.venv/ built on a first run)"
data_start=$SECONDS

# Default input: the user's Kaggle files in input/, else the embedded synthetic set, built once.
if [ ${#data_args[@]} -eq 0 ] && [ -z "${ICH_DATA:-}" ] && [ ! -f input/stage_2_train.csv ]; then
  if [ ! -f input/synthetic/.complete ]; then
    echo "[data] no Kaggle data in input/ and ICH_DATA is unset: building the embedded synthetic set in input/synthetic/"
    rm -rf input/synthetic
    "$PY" -m src.synth input/synthetic
    touch input/synthetic/.complete
  else
    echo "[data] using the embedded synthetic set in input/synthetic/ (put Kaggle files in input/ or set ICH_DATA)"
  fi
fi

exp="$("$PY" -m src.config "${config_args[@]}" --get exp_name)"
# Outputs go under $ICH_OUT when set (as every Python stage does), else under the repository.
out="${ICH_OUT:-.}"
record_time "$data_start" "setup: input data (the synthetic set built on a first run), config"
# Written on the way out, of a finished, failed or killed run alike: the stages done so far, a failed one last.
write_stage_times() {
  local times_file="$out/work/run_fold${fold}_stage_seconds.tsv"
  mkdir -p "$out/work"
  { printf 'seconds\tstage\n'; printf '%s\n' "${stage_times[@]}"; printf '%s\ttotal\n' "$SECONDS"; } > "$times_file.tmp"
  mv "$times_file.tmp" "$times_file"
  echo
  echo "== wall clock per stage (also in $times_file)"
  printf '%s\n' "${stage_times[@]}" | awk -F'\t' '{ printf "%6d s  %s\n", $1, $2 }'
  printf '%6d s  total\n' "$SECONDS"
}
trap 'write_stage_times || true' EXIT
# The status is passed on by hand: a caller's `|| status=$?` turns set -e off inside the function.
stage() {
  local name="$1" start=$SECONDS rc=0; shift
  echo; echo "== $name"
  "$PY" "$@" || rc=$?
  record_time "$start" "$name$([ "$rc" = 0 ] || echo " (failed: exit status $rc)")"
  return "$rc"
}

stage "metadata" -m src.data.metadata "${data_args[@]}"
stage "cache" -m src.data.cache "${data_args[@]}" --size "$("$PY" -m src.config "${config_args[@]}" --get image_size)" \
  --format "$("$PY" -m src.config "${config_args[@]}" --get cache_format)"
stage "folds" -m src.data.folds "${data_args[@]}" --n-folds "$("$PY" -m src.config "${config_args[@]}" --get n_folds)" \
  --seed "$("$PY" -m src.config "${config_args[@]}" --get fold_seed)"
stage "train fold $fold" -m src.cnn.train --fold "$fold" "${config_args[@]}" "${data_args[@]}"

# Everything below works on whatever predictions exist after this fold (one fold, or all of them).
if [ "$("$PY" -m src.config "${config_args[@]}" --get arch)" != "classifier" ] && [ "$fold" -ge 0 ]; then
  stage "blood volume per study" -m src.evaluate.volumes --pred "$out/oof/$exp" "${data_args[@]}"
  stage "overlays of predicted blood" -m src.cnn.overlays --exp "$exp" --fold "$fold" "${data_args[@]}"
fi
if compgen -G "$out/oof/$exp/fold[0-9]*_valid.csv" > /dev/null; then
  # Stacking is optional: when it cannot run (status 2, e.g. too few patients in one fold's OOF) the run goes on
  # with the CNN's predictions and says so; any other failure still stops the run.
  status=0
  stage "sequence stackers on the available OOF" -m src.stack --exp "$exp" "${config_args[@]}" "${data_args[@]}" || status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 2 ] || exit "$status"
  [ "$status" -eq 0 ] || echo "[stack] skipped: the message above says why; reports and submission use the CNN"
fi
reported=()
for pred in "$out/oof/$exp" "$out/oof/${exp}_stack_lgbm" "$out/oof/${exp}_stack_gru" "$out/oof/${exp}_stack_blend"; do
  if compgen -G "$pred/*_valid.csv" > /dev/null; then reported+=("$pred"); fi
done
# One process, the reports side by side on the CPUs (each alone would import its libraries again). Fold -1 has none.
if [ ${#reported[@]} -gt 0 ]; then
  stage "reports and triage: ${reported[*]}" -m src.evaluate.report --pred "${reported[@]}" "${config_args[@]}" \
    "${data_args[@]}" --triage
fi
# Submit from whichever predictions score best on the same OOF rows: a stacker fit on one fold's OOF can be worse
# than the CNN it stacks, and then the CNN's own test predictions go in.
best_pred="$("$PY" - "$out/oof" "$exp" <<'PYEOF'
import json, sys
from pathlib import Path

oof, exp = Path(sys.argv[1]), sys.argv[2]
scores = {}  # prediction dir -> OOF weighted log loss; every stacker reports the CNN's on the same rows
for kind in ("blend", "lgbm", "gru"):
    folder = oof / f"{exp}_stack_{kind}"
    if (folder / "metrics.json").exists() and (folder / "stack_test.csv").exists():
        metrics = json.loads((folder / "metrics.json").read_text())
        scores[str(folder)] = metrics["stacked"]["weighted_log_loss"]
        scores[str(oof / exp)] = metrics["cnn_same_rows"]["weighted_log_loss"]
print(min(scores, key=scores.get) if scores else str(oof / exp))
PYEOF
)"
stage "submission from $best_pred" -m src.evaluate.submit --pred "$best_pred" --name "${exp}_fold${fold}" "${data_args[@]}"
data_dir="$("$PY" -c 'import sys; from src.paths import resolve_data_dir; print(resolve_data_dir(sys.argv[1] or None))' "${data_args[1]:-}")"
stage "check the submission" -m src.evaluate.submit --check "$out/submissions/${exp}_fold${fold}.csv" \
  --sample "$data_dir/stage_2_sample_submission.csv"
if compgen -G "$out/oof/*/fold[0-9]*_metrics.json" > /dev/null; then
  stage "leaderboard of every experiment in oof/" -m src.evaluate.experiments
fi
echo
echo "done: predictions in $out/oof/$exp/, reports in $out/oof/*/report/, submission in $out/submissions/${exp}_fold${fold}.csv"
