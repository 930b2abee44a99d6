"""Mask overlays: predicted vs painted blood on a fold's most positive validation studies and its hardest negative;
and the Dice of the predicted mask on every painted validation slice."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from src import paths
from src.atomic import save_png, write_json
from src.cnn.checkpoints import load_model
from src.cnn.model import MASK_CUTOFF
from src.config import Config
from src.constants import FOLD_COL, ID_COL, LABELS, STUDY
from src.errors import InputError, run_cli
from src.predictions import exp_dir


def pick_studies(meta: pd.DataFrame, n_positive: int, oof: pd.DataFrame | None = None) -> list[tuple[str, str]]:
    """(study, why) for the n studies with most positive slices, plus one negative: the one with the highest
    predicted max p(any) in the OOF table when given (the hardest), else the first by id."""
    per = meta.groupby(STUDY)["any"].agg(["sum", "size"]).reset_index()
    positives = per[per["sum"] > 0].sort_values(["sum", STUDY], ascending=[False, True]).head(n_positive)
    picks = [(s, f"positive: {int(k)}/{int(n)} positive slices") for s, k, n in positives.itertuples(index=False)]
    negatives = per.loc[per["sum"] == 0, STUDY].sort_values()
    if len(negatives):
        study, why = negatives.iloc[0], "negative"
        if oof is not None and "any" in oof:
            p = oof[[ID_COL, "any"]].merge(meta[[ID_COL, STUDY]], on=ID_COL).groupby(STUDY)["any"].max()
            p = p[p.index.isin(negatives)]
            if len(p):
                study, why = p.idxmax(), f"hardest negative: max p(any) = {p.max():.3f}"
        picks.append((study, why))
    return picks


@torch.inference_mode()
def predict_study(model: nn.Module, cfg: Config, meta: pd.DataFrame, images: np.ndarray,
                  masks: np.ndarray | None, device: torch.device) -> dict[str, np.ndarray]:
    """Seg probabilities [n, S, S], p(any) and predicted volume per slice of one study (meta: its rows only)."""
    from src.cnn.predict import to_input
    from src.data.dataset import SliceDataset

    ds = SliceDataset(meta, images, cfg.context, masks)
    seg, p_any, vol = [], [], []
    for start in range(0, len(ds), 16):
        items = [ds[i] for i in range(start, min(start + 16, len(ds)))]
        x = to_input(torch.stack([it["image"] for it in items]), device, False)
        out = model(x, torch.stack([it["voxel_mm3"] for it in items]).to(device))
        seg.append(torch.sigmoid(out["seg_logits"][:, 0].float()).cpu().numpy())
        p_any.append(torch.sigmoid(out["logits"][:, LABELS.index("any")].float()).cpu().numpy())
        vol.append(out["mask_volume_mm3"].cpu().numpy())
    return {"seg": np.concatenate(seg), "any": np.concatenate(p_any), "volume_mm3": np.concatenate(vol),
            "mask_state": ds.mask_state, "voxel_mm3": ds.voxel_mm3}


def slice_dice(seg: np.ndarray, truth: np.ndarray, cutoff: float = MASK_CUTOFF) -> np.ndarray:
    """Dice per slice of the predicted mask (p >= cutoff) against the painted one; [n, S, S] each."""
    pred = seg >= cutoff
    true = truth > 0
    inter = (pred & true).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + true.sum(axis=(1, 2))
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def fold_dice(model: nn.Module, cfg: Config, valid: pd.DataFrame, images: np.ndarray, masks: np.ndarray | None,
              device: torch.device) -> dict:
    """Dice on the fold's positive validation slices that have a painted mask: mean, median and count."""
    studies = valid.loc[valid["mask_row"] >= 0, STUDY].unique() if masks is not None else []
    if not len(studies):
        return {"n_slices": 0, "mean_dice": None, "median_dice": None}
    # Whole studies go in, so that 2.5D neighbours are the slice's real neighbours, not the next painted slice.
    rows = valid[valid[STUDY].isin(studies)].reset_index(drop=True)
    painted = (rows["mask_row"] >= 0).to_numpy()
    seg = predict_study(model, cfg, rows, images, masks, device)["seg"][painted]
    dice = slice_dice(seg, np.stack([masks[r] for r in rows.loc[painted, "mask_row"]]), model.volume_cutoff)
    return {"n_slices": len(dice), "mean_dice": float(dice.mean()), "median_dice": float(np.median(dice))}


def _blend(gray: np.ndarray, alpha: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    rgb = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    return rgb * (1 - a) + np.asarray(colour, dtype=np.float32) * a


def plot_study_overlay(meta: pd.DataFrame, pred: dict[str, np.ndarray], images: np.ndarray, masks: np.ndarray | None,
                       n_slices: int, window: int, title: str, path: Path) -> Path:
    """Rows = the study's bloodiest slices (true area, then predicted volume); predicted mask red, true mask green."""
    true_area = np.array([float(masks[r].sum()) if r >= 0 and masks is not None else 0.0 for r in meta["mask_row"]])
    order = np.lexsort((-pred["volume_mm3"], -true_area, -meta["any"].to_numpy()))[:n_slices]
    order = np.sort(order)  # top to bottom in slice order
    cols = 2 if masks is not None else 1
    fig = Figure(figsize=(3.2 * cols, 3.3 * len(order) + 0.4))
    fig.suptitle(title, fontsize=9)
    for r, i in enumerate(order):
        gray = images[int(meta["cache_row"].iloc[i]), window]
        prob = pred["seg"][i]
        ax = fig.add_subplot(len(order), cols, r * cols + 1)
        ax.imshow(_blend(gray, np.where(prob > 0.1, 0.7 * prob, 0.0), (1.0, 0.1, 0.1)))
        ax.set_title(f"{meta[ID_COL].iloc[i]} p(any)={pred['any'][i]:.2f}\npredicted {pred['volume_mm3'][i]:.0f} mm³",
                     fontsize=7)
        ax.axis("off")
        if cols == 2:
            ax = fig.add_subplot(len(order), cols, r * cols + 2)
            state = int(pred["mask_state"][i])
            truth = masks[int(meta["mask_row"].iloc[i])] if state == 1 else np.zeros_like(gray)
            ax.imshow(_blend(gray, 0.5 * truth.astype(np.float32), (0.1, 0.9, 0.1)))
            what = {1: f"true {true_area[i] * pred['voxel_mm3'][i]:.0f} mm³", 0: "true: no blood",
                    -1: "positive, no painted mask"}[state]
            ax.set_title(f"label any={int(meta['any'].iloc[i])}\n{what}", fontsize=7)
            ax.axis("off")
    return save_png(fig, path)


def run_overlays(exp: str, fold: int, data_dir: Path | None = None, n_studies: int = 3, n_slices: int = 3,
                 window: str = "brain") -> list[Path]:
    """Overlay PNGs for the fold's most positive validation studies and one negative, under oof/<exp>/bloodnet/."""
    from src.data.cache import load_cache
    from src.data.folds import load_folds

    model_dir = paths.WORK / "models" / exp / f"fold{fold}"
    checkpoint = model_dir / "best.pt" if (model_dir / "best.pt").exists() else model_dir / "last.pt"
    if not checkpoint.exists():
        raise InputError(f"{model_dir}: no best.pt or last.pt (train it: python -m src.cnn.train --fold {fold} ...)")
    model, cfg = load_model(checkpoint)
    if cfg.arch == "classifier":
        raise InputError(f"{checkpoint}: arch=classifier has no segmentation branch to draw")
    data_dir = Path(data_dir or cfg.data_dir or paths.resolve_data_dir(None))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    meta, images, masks = load_cache(data_dir, cfg.image_size, "train", fmt=cfg.cache_format)
    folds = load_folds(data_dir, cfg.n_folds, cfg.fold_seed)
    meta = meta.merge(folds[[ID_COL, FOLD_COL]], on=ID_COL, how="inner", validate="one_to_one")
    valid = meta[meta[FOLD_COL] == fold]
    if valid.empty:
        raise InputError(f"--fold {fold}: no validation images in {data_dir}")
    oof_path = exp_dir(exp) / f"fold{fold}_valid.csv"
    oof = pd.read_csv(oof_path, dtype={ID_COL: str}) if oof_path.exists() else None
    dice = fold_dice(model, cfg, valid, images, masks, device)
    write_json({"exp": exp, "fold": fold, "cutoff": model.volume_cutoff, **dice},
               exp_dir(exp) / "bloodnet" / f"dice_fold{fold}.json")
    print(f"Dice on {dice['n_slices']} painted validation slices: mean {dice['mean_dice']}, "
          f"median {dice['median_dice']}")
    channel = {"brain": 0, "subdural": 1}[window]
    written = []
    for rank, (study, why) in enumerate(pick_studies(valid, n_studies, oof)):
        rows = valid[valid[STUDY] == study].reset_index(drop=True)
        pred = predict_study(model, cfg, rows, images, masks, device)
        title = f"{exp} fold {fold}: study {study} ({why}), {window} window"
        path = exp_dir(exp) / "bloodnet" / "overlays" / f"fold{fold}_{rank}_{study}.png"
        written.append(plot_study_overlay(rows, pred, images, masks, n_slices, channel, title, path))
        print(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.cnn.overlays", description=__doc__)
    parser.add_argument("--exp", required=True)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--data", help="data directory (default: the one in the checkpoint's config)")
    parser.add_argument("--n-studies", type=int, default=3, help="most positive studies (one negative is added)")
    parser.add_argument("--n-slices", type=int, default=3, help="slices drawn per study")
    parser.add_argument("--window", choices=("brain", "subdural"), default="brain")
    args = parser.parse_args(argv)
    if args.n_studies < 1 or args.n_slices < 1:
        raise InputError("--n-studies and --n-slices must be at least 1")
    data_dir = paths.resolve_data_dir(args.data) if args.data else None
    if data_dir is not None and not data_dir.exists():
        raise InputError(f"{data_dir}: data directory not found")
    run_overlays(args.exp, args.fold, data_dir, args.n_studies, args.n_slices, args.window)
    return 0


if __name__ == "__main__":
    run_cli(main)
