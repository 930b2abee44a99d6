"""Which of BloodNet's per-slice signals ranks slices, and studies, for `any` best: the head's probability or the map
read as a detector? What made the head read the pooled map (config key map_evidence_r, stop 38).

    python bench/map_evidence.py --exp bloodnet-resnet10t-96px-c1-790e40 [--folds 0 1 2 3 4] [--data DIR]

Each fold's deployed checkpoint (work/models/EXP/foldK/best.pt) predicts its validation slices, both flip views
averaged as the OOF is. The signals, per slice:
- `head`: the head's p(any), what the OOF holds;
- `map max`: the map's largest logit;
- `map lse r`: the map's logits pooled by log-sum-exp at r = 2, 4, 8 (losses.lse_pool: the head's evidence feature
  when map_evidence_r = r; the weak mode trains its r = 2 pool against the label);
- `soft volume`: the paper's feature, the sum of the map's probabilities over the slice times the voxel volume;
- `hard volume`: the reported volume, pixels at p >= the model's cutoff.
For each: AUC(any) over slices and over studies (a study scored by its highest slice), pooled over the folds and on
the first fold alone. With two folds or more, `head + map lse 8` adds a logistic regression on the head's logit and
the pooled map fit on the other folds' rows and scoring the held-out fold's, never a row it was fit on: about what a
head reading both can reach. Writes work/bench/map_evidence_EXP.md.

A diagnostic: r was chosen among 2, 4 and 8 on the default's rows, where the three were within 0.01 of each other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from bench.volume_readout import deployed_model, validation_slices
from src import paths
from src.atomic import write_text
from src.cnn.losses import lse_pool
from src.cnn.predict import to_input
from src.constants import FOLD_COL, ID_COL, LABELS, STUDY
from src.errors import InputError, run_cli
from src.markdown import markdown_table

POOL_RS: tuple[float, ...] = (2.0, 4.0, 8.0)
COMBINED = "head + map lse 8"  # the cross-fitted logistic regression on the head's logit and this pool


@torch.inference_mode()
def batch_signals(model: torch.nn.Module, images: torch.Tensor, voxel_mm3: torch.Tensor) -> dict[str, np.ndarray]:
    """Every signal of one batch, each the mean of the two flip views (pooling and sums do not care about the flip)."""
    per_view: dict[str, list[torch.Tensor]] = {}
    for view in (images, torch.flip(images, dims=[-1])):
        out = model(view, voxel_mm3)
        logits = out["seg_logits"].float()
        signals = {"head": torch.sigmoid(out["logits"][:, LABELS.index("any")].float()),
                   "map max": logits.flatten(1).max(dim=1).values,
                   **{f"map lse {r:g}": lse_pool(logits, r) for r in POOL_RS},
                   "soft volume": out["volume_mm3"].float(),  # the model's own: Σ p × voxel, the head's feature
                   "hard volume": out["mask_volume_mm3"].float()}
        for name, value in signals.items():
            per_view.setdefault(name, []).append(value)
    return {name: torch.stack(views).mean(0).cpu().numpy() for name, views in per_view.items()}


def fold_signals(exp: str, fold: int, data_dir: Path, batch_size: int = 64) -> pd.DataFrame:
    """ID, fold, study, the `any` label and every signal for the fold's validation slices."""
    from src.data.dataset import SliceDataset

    model, cfg = deployed_model(exp, fold)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    valid, images, _ = validation_slices(data_dir, cfg, fold, cfg.image_size)
    loader = torch.utils.data.DataLoader(SliceDataset(valid, images, cfg.context), batch_size=batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(loader, desc=f"{exp} fold {fold}", leave=False):
        signals = batch_signals(model, to_input(batch["image"], device, False), batch["voxel_mm3"].to(device))
        for name, values in signals.items():
            parts.setdefault(name, []).append(values)
    columns = {name: np.concatenate(v) for name, v in parts.items()}
    return pd.DataFrame({ID_COL: valid[ID_COL].to_numpy(), FOLD_COL: fold, STUDY: valid[STUDY].to_numpy(),
                         "any": valid["any"].to_numpy().astype(int)} | columns)


def cross_fitted(slices: pd.DataFrame, features: list[str]) -> np.ndarray:
    """P(any) from a logistic regression on `features`, each fold's rows scored by a fit on the other folds' rows."""
    out = np.full(len(slices), np.nan)
    for fold in slices[FOLD_COL].unique():
        held = (slices[FOLD_COL] == fold).to_numpy()
        fit = LogisticRegression().fit(slices.loc[~held, features], slices.loc[~held, "any"])
        out[held] = fit.predict_proba(slices.loc[held, features])[:, 1]
    return out


def signal_table(slices: pd.DataFrame) -> pd.DataFrame:
    """One row per signal: slice and study AUC(any), pooled over the folds and on the first fold."""
    frame = slices.copy()
    signals = [c for c in frame.columns if c not in (ID_COL, FOLD_COL, STUDY, "any")]
    if frame[FOLD_COL].nunique() > 1:
        head = frame["head"].clip(1e-6, 1 - 1e-6)
        frame["head logit"] = np.log(head / (1 - head))
        frame[COMBINED] = cross_fitted(frame, ["head logit", "map lse 8"])
        signals.append(COMBINED)
    first = frame[FOLD_COL] == frame[FOLD_COL].iloc[0]

    def aucs(part: pd.DataFrame, signal: str) -> tuple[float, float]:
        studies = part.groupby(STUDY)[["any", signal]].max()
        return roc_auc_score(part["any"], part[signal]), roc_auc_score(studies["any"], studies[signal])

    rows = []
    for signal in signals:
        pooled, alone = aucs(frame, signal), aucs(frame[first], signal)
        rows.append({"signal": signal, "slice_auc_any": pooled[0], "study_auc_any": pooled[1],
                     "first_fold_slice_auc_any": alone[0], "first_fold_study_auc_any": alone[1]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/map_evidence.py", description=__doc__.splitlines()[0])
    parser.add_argument("--exp", required=True, help="a BloodNet experiment with trained folds (work/models/EXP)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", help="data directory (default: input/ or the embedded set)")
    args = parser.parse_args(argv)
    if any(k < 0 for k in args.folds):
        raise InputError(f"--folds {' '.join(map(str, args.folds))}: fold numbers are 0 or more")
    data_dir = paths.resolve_data_dir(args.data)
    slices = pd.concat([fold_signals(args.exp, k, data_dir) for k in args.folds], ignore_index=True)
    table = signal_table(slices)
    machine = f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    text = (f"# Which signal ranks `any`: {args.exp}, folds {' '.join(map(str, args.folds))}\n\n"
            f"{len(slices)} validation slices, {slices[STUDY].nunique()} studies; first fold = fold {args.folds[0]}. "
            f"Command: `python bench/map_evidence.py --exp {args.exp} --folds {' '.join(map(str, args.folds))}` "
            f"({machine}).\n\n" + markdown_table(table) + "\n")
    out = write_text(text, paths.WORK / "bench" / f"map_evidence_{args.exp}.md")
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
