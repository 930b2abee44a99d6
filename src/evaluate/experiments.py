"""Leaderboard of every experiment under oof/ (`python -m src.evaluate.experiments`): folds done, CV weighted log loss
and AUC(any), the stacked scores, training time and the key settings; grouped by the folds each finished (most
first: CV over other folds is not comparable) and sorted by CV weighted log loss within a group. For a difference
against its noise, on the rows two experiments share, use python -m src.evaluate.compare.

It reads only what training and stacking wrote (fold{K}_metrics.json, fold{K}_run.json, fold{K}_epochs.csv,
<exp>_stack_{kind}/metrics.json), so it needs no data directory. The CV log loss is exact: the metric is a mean over
rows, so the pooled value is the row-weighted mean of the folds'. AUC does not pool that way: it is the mean of the
folds' AUCs (the stackers' metrics.json and the report hold the pooled AUC over the same rows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from src.atomic import write_csv, write_text
from src.config import NAME_KEYS, training_overrides
from src.errors import InputError, run_cli
from src.markdown import markdown_table
from src.naming import describe
from src.paths import OOF_DIR
from src.predictions import fold_files, recorded_select_epoch

STACK_KINDS: tuple[str, ...] = ("lgbm", "gru", "blend")  # the level-2 folders python -m src.stack writes
LEADERBOARD = "leaderboard"  # oof/leaderboard.{csv,md}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable ({err})") from err
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def _score(metrics: dict, path: Path) -> tuple[float, float, int]:
    try:
        return float(metrics["weighted_log_loss"]), float(metrics["auc"]["any"]), int(metrics["n_images"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: no weighted_log_loss / auc.any / n_images ({err})") from err


def train_minutes(pred_dir: Path, folds: list[int]) -> float:
    """Minutes of training and validation of these folds (sum of fold{K}_epochs.csv's epoch_time_s); NaN if unknown."""
    total = 0.0
    for k in folds:
        path = pred_dir / f"fold{k}_epochs.csv"
        if not path.exists():
            return float("nan")
        epochs = pd.read_csv(path)
        if "epoch_time_s" not in epochs:
            return float("nan")  # runs from before the epoch time was logged
        total += float(epochs["epoch_time_s"].sum())
    return total / 60


def experiment_row(pred_dir: Path) -> dict | None:
    """One leaderboard row, or None when the folder holds no finished fold (a stacker's or a report's folder)."""
    folds = [k for k in fold_files(pred_dir, "valid") if (pred_dir / f"fold{k}_metrics.json").exists()]
    if not folds:
        return None
    scores = [_score(_read_json(pred_dir / f"fold{k}_metrics.json"), pred_dir / f"fold{k}_metrics.json")
              for k in folds]
    wll, auc, n = (np.array(col, dtype=np.float64) for col in zip(*scores))
    config = _read_json(pred_dir / f"fold{folds[0]}_run.json").get("config", {}) \
        if (pred_dir / f"fold{folds[0]}_run.json").exists() else {}
    row = {
        "exp": pred_dir.name,
        "folds": f"{len(folds)}/{config.get('n_folds', '?')}",
        "done": " ".join(map(str, folds)),
        "cv_wll": float((wll * n).sum() / n.sum()),
        "cv_auc_any": float(auc.mean()),
        "n_images": int(n.sum()),
    }
    notes = []
    for kind in STACK_KINDS:
        path = pred_dir.parent / f"{pred_dir.name}_stack_{kind}" / "metrics.json"
        stacked = _read_json(path) if path.exists() else None
        row[f"{kind}_wll"] = _score(stacked["stacked"], path)[0] if stacked else float("nan")
        if stacked and kind == "blend":
            row["blend_auc_any"] = _score(stacked["stacked"], path)[1]
        if stacked and sorted(stacked.get("folds_available", [])) != folds:
            notes.append(f"stackers fit on folds {' '.join(map(str, stacked.get('folds_available', [])))}")
    # Records from before select_epoch existed read as "valid": their CV is optimistic and should not be ranked
    # against runs that predict with their last epoch without saying so.
    if chosen := [k for k in folds if recorded_select_epoch(pred_dir, f"fold{k}") == "valid"]:
        notes.append(f"epoch chosen on the validation fold (optimistic): fold {' '.join(map(str, chosen))}")
    row["note"] = "; ".join(notes)
    row.setdefault("blend_auc_any", float("nan"))
    row["train_min"] = train_minutes(pred_dir, folds)
    row.update({key: config.get(key, "") for key in NAME_KEYS})
    row["other_settings"] = "(no run record)"
    if config:  # training_overrides leaves out the keys the arch never reads, as the experiment name does
        row["other_settings"] = describe(training_overrides(config))
    return row


def leaderboard(oof_root: Path) -> pd.DataFrame:
    """Every experiment folder under oof_root: grouped by the folds finished (most first), best CV log loss first."""
    rows = [row for d in sorted(Path(oof_root).iterdir()) if d.is_dir() and (row := experiment_row(d))] \
        if Path(oof_root).is_dir() else []
    if not rows:
        raise InputError(f"{oof_root}: no experiment with a finished fold (fold*_valid.csv + fold*_metrics.json)")
    table = pd.DataFrame(rows)
    # CV figures compare only over the same folds (fold 0 of the embedded default is easy: wll 0.154 where the
    # default's five folds pool to 0.172), so experiments are grouped by the folds they finished, most first.
    table["_n_done"] = -table["done"].str.split().str.len()
    return table.sort_values(["_n_done", "done", "cv_wll", "exp"], kind="stable").drop(columns="_n_done") \
        .reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--oof-root", type=Path, default=OOF_DIR, help="folder of experiment folders (default: oof/)")
    parser.add_argument("--out", type=Path, help="where leaderboard.{csv,md} go (default: the oof root)")
    args = parser.parse_args(argv)
    table = leaderboard(args.oof_root)
    out = args.out or args.oof_root
    text = (f"# Experiments in {args.oof_root}\n\nSorted by CV weighted log loss (pooled over the folds done). "
            "cv_auc_any is the mean of the folds' AUC(any); *_wll are the level-2 stackers' scores on the same "
            "OOF rows; train_min sums the epoch times.\n\n" + markdown_table(table))
    write_csv(table, out / f"{LEADERBOARD}.csv")
    write_text(text, out / f"{LEADERBOARD}.md")
    print(markdown_table(table), end="")
    print(f"written to {out / LEADERBOARD}.csv and .md")
    return 0


if __name__ == "__main__":
    run_cli(main)
