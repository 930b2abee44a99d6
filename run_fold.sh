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

source scripts/env.sh

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
stage() { echo; echo "== $1"; shift; "$PY" "$@"; }

stage "metadata" -m src.data.metadata "${data_args[@]}"
stage "cache" -m src.data.cache "${data_args[@]}" --size "$("$PY" -m src.config "${config_args[@]}" --get image_size)"
stage "folds" -m src.data.folds "${data_args[@]}" --n-folds "$("$PY" -m src.config "${config_args[@]}" --get n_folds)" \
  --seed "$("$PY" -m src.config "${config_args[@]}" --get fold_seed)"
stage "train fold $fold" -m src.cnn.train --fold "$fold" "${config_args[@]}" "${data_args[@]}"

# Everything below works on whatever predictions exist after this fold (one fold, or all of them).
if [ "$("$PY" -m src.config "${config_args[@]}" --get arch)" != "classifier" ] && [ "$fold" -ge 0 ]; then
  stage "blood volume per study" -m src.evaluate.volumes --pred "oof/$exp" "${data_args[@]}"
  stage "overlays of predicted blood" -m src.cnn.overlays --exp "$exp" --fold "$fold" "${data_args[@]}"
fi
if compgen -G "oof/$exp/fold[0-9]*_valid.csv" > /dev/null; then
  stage "sequence stackers on the available OOF" -m src.stack --exp "$exp" "${config_args[@]}" "${data_args[@]}"
fi
for pred in "oof/$exp" "oof/${exp}_stack_lgbm" "oof/${exp}_stack_gru" "oof/${exp}_stack_blend"; do
  if compgen -G "$pred/*_valid.csv" > /dev/null; then
    stage "report: $pred" -m src.evaluate.report --pred "$pred" "${config_args[@]}" "${data_args[@]}" --triage
  fi
done
# Submit from whichever predictions score best on the same OOF rows: a stacker fit on one fold's OOF can be worse
# than the CNN it stacks, and then the CNN's own test predictions go in.
best_pred="$("$PY" - "$exp" <<'PYEOF'
import json, sys
from pathlib import Path

exp = sys.argv[1]
scores = {}  # prediction dir -> OOF weighted log loss; every stacker reports the CNN's on the same rows
for kind in ("blend", "lgbm", "gru"):
    folder = Path(f"oof/{exp}_stack_{kind}")
    if (folder / "metrics.json").exists() and (folder / "stack_test.csv").exists():
        metrics = json.loads((folder / "metrics.json").read_text())
        scores[str(folder)] = metrics["stacked"]["weighted_log_loss"]
        scores[f"oof/{exp}"] = metrics["cnn_same_rows"]["weighted_log_loss"]
print(min(scores, key=scores.get) if scores else f"oof/{exp}")
PYEOF
)"
stage "submission from $best_pred" -m src.evaluate.submit --pred "$best_pred" --name "${exp}_fold${fold}" "${data_args[@]}"
data_dir="$("$PY" -c 'import sys; from src.paths import resolve_data_dir; print(resolve_data_dir(sys.argv[1] or None))' "${data_args[1]:-}")"
stage "check the submission" -m src.evaluate.submit --check "submissions/${exp}_fold${fold}.csv" \
  --sample "$data_dir/stage_2_sample_submission.csv"
if compgen -G "oof/*/fold[0-9]*_metrics.json" > /dev/null; then
  stage "leaderboard of every experiment in oof/" -m src.evaluate.experiments
fi
echo
echo "done: predictions in oof/$exp/, reports in oof/*/report/, submission in submissions/${exp}_fold${fold}.csv"
