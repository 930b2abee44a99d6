"""Floor to beat: LightGBM on per-slice HU histograms, patient-grouped K-fold CV over the train split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src import paths
from src.atomic import write_json, write_text
from src.constants import FOLD_COL, ID_COL, LABELS
from src.data.dicom import DicomError, read_hu
from src.data.folds import load_folds
from src.data.metadata import load_metadata
from src.errors import run_cli
from src.metric import per_class_auc, weighted_log_loss

FINE_EDGES = np.linspace(-100, 200, 65)  # 64 bins of 4.7 HU over the soft-tissue range
COARSE_EDGES = np.array([-3000, -500, -100, 200, 500, 1000, 5000])
PARAMS = dict(
    objective="binary",
    learning_rate=0.03,
    num_leaves=7,
    min_child_samples=40,
    feature_fraction=0.8,
    bagging_fraction=0.8,
    bagging_freq=1,
    lambda_l2=1.0,
    num_threads=2,
    verbose=-1,
    seed=0,
)
N_ROUNDS = 200  # fixed, no early stopping on the held-out fold (that would leak)


def slice_features(hu: np.ndarray, pixel_area_mm2: float) -> np.ndarray:
    """Histogram areas (mm²) over fine and coarse HU bins, plus brain-region (0-100 HU) fractions and moments."""
    fine = np.histogram(hu, FINE_EDGES)[0] * pixel_area_mm2
    coarse = np.histogram(hu, COARSE_EDGES)[0] * pixel_area_mm2
    brain = hu[(hu >= 0) & (hu <= 100)]
    n = max(len(brain), 1)
    fracs = [((brain >= lo) & (brain < hi)).sum() / n for lo, hi in ((38, 55), (50, 90), (60, 100), (0, 20))]
    moments = [brain.mean(), brain.std(), np.percentile(brain, 95), np.percentile(brain, 99)] if len(brain) else [0] * 4
    return np.concatenate([fine, coarse, fracs, moments, [len(brain) * pixel_area_mm2]]).astype(np.float32)


def build_features(data_dir: Path, meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix for the metadata rows whose pixels decode; returns (features, kept-row mask)."""
    feats, keep = [], np.zeros(len(meta), bool)
    rows = meta.itertuples(index=False)
    for i, row in enumerate(tqdm(rows, total=len(meta), desc="histograms", unit="img")):
        try:
            hu = read_hu(data_dir / row.path)
        except DicomError as err:
            print(f"skipping {row.ID}: {err}")
            continue
        area = float(row.pixel_spacing_row) * float(row.pixel_spacing_col)
        position = row.slice_index / max(row.series_length - 1, 1)  # where in the head: base vs vertex
        feats.append(np.concatenate([slice_features(hu, area), [position]]))
        keep[i] = True
    return np.stack(feats), keep


def run(data_dir: Path, n_folds: int, seed: int) -> dict:
    meta = load_metadata(data_dir, "train")
    folds = load_folds(data_dir, n_folds, seed)[[ID_COL, FOLD_COL]]
    meta = meta.merge(folds, on=ID_COL, how="inner", validate="one_to_one")
    x, keep = build_features(data_dir, meta)
    meta = meta[keep].reset_index(drop=True)
    y = meta[list(LABELS)].to_numpy().astype(int)
    oof = np.zeros(y.shape, dtype=np.float64)
    per_fold = {}
    for k in range(n_folds):
        tr, va = (meta[FOLD_COL] != k).to_numpy(), (meta[FOLD_COL] == k).to_numpy()
        for j in range(len(LABELS)):
            if y[tr, j].min() == y[tr, j].max():  # a label absent from this fold's training part
                oof[va, j] = y[tr, j].mean()
                continue
            model = lgb.train(PARAMS, lgb.Dataset(x[tr], y[tr, j]), N_ROUNDS)
            oof[va, j] = model.predict(x[va])
        per_fold[k] = {
            "weighted_log_loss": weighted_log_loss(y[va], oof[va]),
            "auc": per_class_auc(y[va], oof[va]),
            "n_images": int(va.sum()),
        }
        print(
            f"fold {k}: weighted log loss {per_fold[k]['weighted_log_loss']:.4f}, "
            f"AUC any {per_fold[k]['auc']['any']:.4f} ({int(va.sum())} images)"
        )
    return {
        "data": str(data_dir),
        "n_folds": n_folds,
        "seed": seed,
        "features": int(x.shape[1]),
        "n_images": len(y),
        "prevalence": dict(zip(LABELS, y.mean(axis=0).round(4).tolist())),
        "fold0": per_fold[0],
        "per_fold": per_fold,
        "oof": {"weighted_log_loss": weighted_log_loss(y, oof), "auc": per_class_auc(y, oof)},
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Histogram floor ({result['data']}, {result['n_images']} images, {result['n_folds']} folds)",
        "",
        "| split | weighted log loss | " + " | ".join(f"AUC {name}" for name in LABELS) + " |",
        "|---|---|" + "---|" * len(LABELS),
    ]
    rows = [(f"fold {k}", v) for k, v in result["per_fold"].items()] + [("OOF (all folds)", result["oof"])]
    for name, res in rows:
        aucs = " | ".join(f"{res['auc'][label]:.4f}" for label in LABELS)
        lines.append(f"| {name} | {res['weighted_log_loss']:.4f} | {aucs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/floor_histogram.py", description=__doc__)
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=paths.WORK / "bench" / "floor_histogram.json")
    args = parser.parse_args(argv)
    result = run(paths.resolve_data_dir(args.data), args.n_folds, args.seed)
    write_json(result, args.out)
    table = markdown(result)
    write_text(table, args.out.with_suffix(".md"))
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
