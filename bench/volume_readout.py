"""Is BloodNet's volume error in the map or in how the map is read out? Study volumes from each fold's validation
maps under several read-outs (threshold, soft sum above a floor), against the painted truth.

    python bench/volume_readout.py --exp bloodnet-resnet10t-96px-c1 [--folds 0 1 2 3 4] [--data DIR]

Each fold's deployed checkpoint (work/models/EXP/foldK/best.pt) predicts its validation slices once, both flip
views. The read-outs:
- `deployed`: what the OOF's blood_volume_mm3 holds: each view thresholded at the model's volume cutoff (0.5 with
  painted masks), the two counts averaged;
- `hard@c`: the flip-averaged probability thresholded at c (average, then threshold: the usual way to merge TTA);
- `soft@c`: the sum of the flip-averaged probability over pixels at p >= c (`soft@0` is the paper's soft volume,
  the head's feature).
For each: MdAPE and Spearman of the study volume over positive studies, pooled and per fold, and the median false
blood on negative studies. Writes work/bench/volume_readout_EXP.{csv,md} (the table) and _slices.csv (per slice).

This is a diagnostic, not a tuner: picking the read-out that scores best on these rows and quoting its score would
choose on the rows it scores. What it answers is whether any read-out of today's maps reaches a goal; if none
does, the error is in the maps.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from src import paths
from src.atomic import write_csv, write_text
from src.cnn.checkpoints import load_model
from src.cnn.predict import to_input
from src.cnn.study_volumes import study_volumes, volume_summary
from src.config import Config
from src.constants import FOLD_COL, ID_COL, VOLUME_COL
from src.errors import InputError, run_cli
from src.markdown import markdown_table

CUTOFFS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SOFT_FLOORS: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)


@torch.inference_mode()
def readout_volumes(model: nn.Module, images: torch.Tensor, voxel_mm3: torch.Tensor,
                    cutoffs: Sequence[float] = CUTOFFS, soft_floors: Sequence[float] = SOFT_FLOORS
                    ) -> dict[str, np.ndarray]:
    """Per-slice volume (mm³) of one batch under every read-out; images [B, C, S, S] and voxel_mm3 [B] on the
    model's device."""
    views, deployed = [], []
    for flipped in (False, True):
        out = model(torch.flip(images, dims=[-1]) if flipped else images, voxel_mm3)
        deployed.append(out["mask_volume_mm3"])  # the model's own rule, as predict.py averages it over the views
        prob = torch.sigmoid(out["seg_logits"].float())
        views.append(torch.flip(prob, dims=[-1]) if flipped else prob)
    voxel = voxel_mm3.float()

    def count(mask: torch.Tensor) -> np.ndarray:
        return (mask.sum(dim=(1, 2, 3)).float() * voxel).cpu().numpy()

    out = {"deployed": ((deployed[0] + deployed[1]) / 2).float().cpu().numpy()}
    mean = (views[0] + views[1]) / 2
    out.update({f"hard@{c:g}": count(mean >= c) for c in cutoffs})
    out.update({f"soft@{c:g}": ((mean * (mean >= c)).sum(dim=(1, 2, 3)) * voxel).cpu().numpy() for c in soft_floors})
    return out


def deployed_model(exp: str, fold: int) -> tuple[nn.Module, Config]:
    """The fold's deployed BloodNet weights (best.pt) and config."""
    checkpoint = paths.WORK / "models" / exp / f"fold{fold}" / "best.pt"
    if not checkpoint.exists():
        raise InputError(f"{checkpoint}: not found (train it: python -m src.cnn.train --fold {fold} ...)")
    model, cfg = load_model(checkpoint)
    if cfg.arch == "classifier":
        raise InputError(f"{checkpoint}: arch=classifier has no segmentation map to read out")
    return model.eval(), cfg


def fold_readouts(exp: str, fold: int, data_dir: Path, batch_size: int = 64) -> pd.DataFrame:
    """ID, fold and one column per read-out for the fold's validation slices."""
    from src.data.cache import load_cache
    from src.data.dataset import SliceDataset
    from src.data.folds import load_folds

    model, cfg = deployed_model(exp, fold)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    meta, images, masks = load_cache(data_dir, cfg.image_size, "train", fmt=cfg.cache_format)
    folds = load_folds(data_dir, cfg.n_folds, cfg.fold_seed)
    meta = meta.merge(folds[[ID_COL, FOLD_COL]], on=ID_COL, how="inner", validate="one_to_one")
    valid = meta[meta[FOLD_COL] == fold].reset_index(drop=True)
    if valid.empty:
        raise InputError(f"--folds {fold}: no validation images in {data_dir}")
    loader = torch.utils.data.DataLoader(SliceDataset(valid, images, cfg.context, masks), batch_size=batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(loader, desc=f"{exp} fold {fold}", leave=False):
        for name, values in readout_volumes(model, to_input(batch["image"], device, False),
                                            batch["voxel_mm3"].to(device)).items():
            parts.setdefault(name, []).append(values)
    return pd.DataFrame({ID_COL: valid[ID_COL].to_numpy(), FOLD_COL: fold}
                        | {name: np.concatenate(v) for name, v in parts.items()})


def readout_table(slices: pd.DataFrame, meta: pd.DataFrame, true: pd.DataFrame) -> pd.DataFrame:
    """One row per read-out: pooled and per-fold MdAPE, Spearman, false blood on negative studies."""
    def summary(part: pd.DataFrame, readout: str) -> dict:
        pred = part[[ID_COL]].assign(**{VOLUME_COL: part[readout].to_numpy()})
        return volume_summary(study_volumes(pred, meta, true), n_boot=0)

    rows = []
    for readout in [c for c in slices.columns if c not in (ID_COL, FOLD_COL)]:
        pooled = summary(slices, readout)
        row = {"readout": readout, "mdape_pct": pooled["mdape_percent"], "spearman": pooled["spearman_positive"],
               "false_blood_negative_ml": pooled["median_pred_ml_negative_studies"]}
        for fold, part in slices.groupby(FOLD_COL):
            row[f"fold{fold}_mdape_pct"] = summary(part, readout)["mdape_percent"]
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", required=True, help="experiment name (work/models/EXP/foldK/best.pt)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", help="data directory (default: the one in the checkpoint's config)")
    args = parser.parse_args(argv)
    from src.data.metadata import load_metadata

    cfg = deployed_model(args.exp, args.folds[0])[1]
    data_dir = paths.resolve_data_dir(args.data or cfg.data_dir or None)
    if not data_dir.exists():
        raise InputError(f"{data_dir}: data directory not found")
    true_csv = data_dir / paths.TRUE_VOLUMES_CSV
    if not true_csv.exists():
        raise InputError(f"{true_csv}: no true volumes (painted masks) for this data: nothing to measure against")
    slices = pd.concat([fold_readouts(args.exp, k, data_dir) for k in args.folds], ignore_index=True)
    table = readout_table(slices, load_metadata(data_dir, "train"), pd.read_csv(true_csv, dtype={ID_COL: str}))
    out = paths.WORK / "bench" / f"volume_readout_{args.exp}"
    write_csv(slices, out.with_name(out.name + "_slices.csv"))
    write_csv(table, out.with_suffix(".csv"))
    shown = table.round({c: 1 if c.endswith("_pct") else 2 for c in table.columns if c != "readout"})
    text = (f"# Volume read-outs of {args.exp}, folds {' '.join(map(str, args.folds))}\n\n"
            f"Study volumes from {len(slices)} validation slices: MdAPE (%) and Spearman over positive studies, "
            "pooled and per fold; median false blood on negative studies (mL). deployed = what the OOF holds.\n\n"
            + markdown_table(shown))
    write_text(text, out.with_suffix(".md"))
    print(markdown_table(shown), end="")
    print(f"wrote {out}.csv, .md and _slices.csv")
    return 0


if __name__ == "__main__":
    run_cli(main)
