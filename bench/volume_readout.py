"""Is BloodNet's volume error in the map or in how the map is read out? Study volumes from each fold's validation
maps under several read-outs (threshold, soft sum above a floor), against the painted truth.

    python bench/volume_readout.py --exp bloodnet-resnet10t-96px-c1 [--folds 0 1 2 3 4] [--data DIR]
        [--input-sizes 96 112 128]

Each fold's deployed checkpoint (work/models/EXP/foldK/best.pt) predicts its validation slices once, both flip
views. The read-outs:
- `deployed`: what the OOF's blood_volume_mm3 holds: each view thresholded at the model's volume cutoff (0.5 with
  painted masks), the two counts averaged;
- `hard@c`: the flip-averaged probability thresholded at c (average, then threshold: the usual way to merge TTA);
- `soft@c`: the sum of the flip-averaged probability over pixels at p >= c (`soft@0` is the paper's soft volume,
  the head's feature);
- `cached_mask`: not the model's, the painted mask as the model is trained on it (resized to the cache's S px):
  the best any map at this size could do.
`--input-sizes S [S ...]` adds, for each S, `deployed@Spx`: the same weights shown every slice from the cache at S
px (enlarged by S / the model's size; its voxel volume shrunk to match, so the millilitres stay the tissue's), and
`deployed@sizes-mean`, their mean (two sizes or more): does a small bleed that covers more pixels get found?
Pre-declare the sizes; choosing the best of many on these rows would score a choice made on them.
For each: MdAPE and Spearman of the study volume over positive studies, pooled and per fold, the MdAPE of their
small and large halves (split at the median true volume), the median false blood on negative studies, and against
`deployed` a paired bootstrap of the positive studies (the MdAPE difference's 95% interval, how often it is lower).
Writes work/bench/volume_readout_EXP.{csv,md} (the table) and _slices.csv (per slice).

Where the deployed volume's error sits: each slice's deployed mask against its painted one, split into true blood
found, blood missed, false blood at a bleed's edge (within NEAR_PX pixels of painted blood: a halo, the bleed drawn
too wide) and false blood away from any bleed (mimics: falx, sinuses, the skull's inner table). Per slice type and
per positive study, small and large bleeds apart: work/bench/volume_readout_EXP_errors.{csv,md}.

This is a diagnostic, not a tuner: picking the read-out that scores best on these rows and quoting its score would
choose on the rows it scores. What it answers is whether any read-out of today's maps reaches a goal; if none
does, the error is in the maps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src import paths
from src.atomic import write_csv, write_text
from src.cnn.checkpoints import load_model
from src.cnn.predict import to_input
from src.cnn.study_volumes import MM3_PER_ML, study_volumes, volume_summary
from src.config import Config
from src.constants import FOLD_COL, ID_COL, STUDY, VOLUME_COL
from src.errors import InputError, run_cli
from src.evaluate.compare import bootstrap_volumes, interval
from src.markdown import markdown_table

CUTOFFS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SOFT_FLOORS: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)
NEAR_PX = 2  # false blood this close to painted blood is the bleed's edge drawn too wide, not a mimic
ERROR_PARTS: tuple[str, ...] = ("found", "missed", "false_edge", "false_far")


@torch.inference_mode()
def flip_views(model: nn.Module, images: torch.Tensor, voxel_mm3: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both flip views of one batch: the model's own deployed volume per view and its probability map, flipped back
    into image coordinates."""
    views, deployed = [], []
    for flipped in (False, True):
        out = model(torch.flip(images, dims=[-1]) if flipped else images, voxel_mm3)
        deployed.append(out["mask_volume_mm3"])  # the model's own rule, as predict.py averages it over the views
        prob = torch.sigmoid(out["seg_logits"].float())
        views.append(torch.flip(prob, dims=[-1]) if flipped else prob)
    return deployed, views


@torch.inference_mode()
def error_parts(views: list[torch.Tensor], cutoff: float, masks: torch.Tensor, known: torch.Tensor,
                voxel_mm3: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-slice mm³ of each ERROR_PARTS entry for the deployed rule (each view at p >= cutoff, averaged over the
    views); NaN where the slice's mask is unknown (a positive without a painted mask)."""
    blood = masks.bool()
    near = F.max_pool2d(blood.float(), 2 * NEAR_PX + 1, stride=1, padding=NEAR_PX) > 0
    parts = {name: torch.zeros(len(blood), device=blood.device) for name in ERROR_PARTS}
    for prob in views:
        called = prob >= cutoff
        for name, where in (("found", called & blood), ("missed", ~called & blood),
                            ("false_edge", called & ~blood & near), ("false_far", called & ~near)):
            parts[name] += where.sum(dim=(1, 2, 3)).float() / len(views)
    unknown = ~known.bool()
    return {name: (v * voxel_mm3.float()).masked_fill(unknown, float("nan")).cpu().numpy()
            for name, v in parts.items()}


@torch.inference_mode()
def readout_volumes(model: nn.Module, images: torch.Tensor, voxel_mm3: torch.Tensor,
                    cutoffs: Sequence[float] = CUTOFFS, soft_floors: Sequence[float] = SOFT_FLOORS,
                    views: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> dict[str, np.ndarray]:
    """Per-slice volume (mm³) of one batch under every read-out; images [B, C, S, S] and voxel_mm3 [B] on the
    model's device (`views`: flip_views' result, when already computed)."""
    deployed, views = views or flip_views(model, images, voxel_mm3)
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


def validation_slices(data_dir: Path, cfg: Config, fold: int, size: int):
    """(the fold's validation metadata, the cached images at `size` px, the cached masks): the trainer's own split."""
    from src.cnn.train import split_fold

    _, valid, images, masks = split_fold(dataclasses.replace(cfg, image_size=size), data_dir, fold)
    if valid.empty:
        raise InputError(f"--folds {fold}: no validation images in {data_dir}")
    return valid, images, masks


@torch.inference_mode()
def deployed_at_size(model: nn.Module, cfg: Config, data_dir: Path, fold: int, ids: np.ndarray, size: int,
                     batch_size: int = 64) -> np.ndarray:
    """The deployed volume (mm³) of the slices `ids` with each read from the cache at `size` px: the model's own
    rule on both flip views, averaged. The dataset's voxel volume follows the size, so a slice the model called all
    blood reads the same millilitres at any size."""
    from src.data.dataset import SliceDataset

    valid, images, _ = validation_slices(data_dir, cfg, fold, size)
    missing = set(ids) - set(valid[ID_COL])
    if missing:
        raise InputError(f"cache at {size} px lacks {len(missing)} of fold {fold}'s validation slices "
                         f"(e.g. {min(missing)})")
    valid = valid.set_index(ID_COL).loc[ids].reset_index()  # in the order of the model's own pass
    device = next(model.parameters(), torch.zeros(())).device
    parts = []
    loader = torch.utils.data.DataLoader(SliceDataset(valid, images, cfg.context), batch_size=batch_size)
    for batch in tqdm(loader, desc=f"fold {fold} at {size} px", leave=False):
        deployed, _ = flip_views(model, to_input(batch["image"], device, False), batch["voxel_mm3"].to(device))
        parts.append(((deployed[0] + deployed[1]) / 2).float().cpu().numpy())
    return np.concatenate(parts)


def fold_readouts(exp: str, fold: int, data_dir: Path, batch_size: int = 64,
                  input_sizes: Sequence[int] = ()) -> pd.DataFrame:
    """ID, fold and one column per read-out for the fold's validation slices (`input_sizes`: the deployed rule
    with the slices read at those sizes, and their mean)."""
    from src.data.dataset import SliceDataset

    model, cfg = deployed_model(exp, fold)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    valid, images, masks = validation_slices(data_dir, cfg, fold, cfg.image_size)
    loader = torch.utils.data.DataLoader(SliceDataset(valid, images, cfg.context, masks), batch_size=batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(loader, desc=f"{exp} fold {fold}", leave=False):
        images, voxel = to_input(batch["image"], device, False), batch["voxel_mm3"].to(device)
        known = batch["mask_state"] >= 0
        views = flip_views(model, images, voxel)
        errors = error_parts(views[1], model.volume_cutoff, batch["mask"].to(device), known.to(device), voxel)
        painted = (batch["mask"].sum(dim=(1, 2, 3)).float() * batch["voxel_mm3"].float()).masked_fill(~known, np.nan)
        for name, values in (readout_volumes(model, images, voxel, views=views) | errors
                             | {"cached_mask": painted.numpy()}).items():
            parts.setdefault(name, []).append(values)
    columns = {name: np.concatenate(v) for name, v in parts.items()}
    by_size = {f"deployed@{size}px": deployed_at_size(model, cfg, data_dir, fold, valid[ID_COL].to_numpy(), size,
                                                      batch_size) for size in input_sizes}
    if len(by_size) > 1:  # a mean of one size would repeat its column
        by_size["deployed@sizes-mean"] = np.mean(list(by_size.values()), axis=0)
    return pd.DataFrame({ID_COL: valid[ID_COL].to_numpy(), FOLD_COL: fold} | columns | by_size)


def readout_table(slices: pd.DataFrame, meta: pd.DataFrame, true: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """One row per read-out: pooled and per-fold MdAPE, Spearman, false blood on negative studies, the MdAPE of the
    small and large halves of the positive studies, and against `deployed` (paired bootstrap of the positive studies,
    the same resamples for every read-out): the MdAPE difference's 95% interval and how often it is lower."""
    readouts = [c for c in slices.columns if c not in (ID_COL, FOLD_COL, *ERROR_PARTS)]
    volumes = {r: slices[[ID_COL]].assign(**{VOLUME_COL: slices[r].to_numpy()}) for r in readouts}

    def summary(part: pd.DataFrame, readout: str) -> dict:
        return volume_summary(study_volumes(volumes[readout].loc[part.index], meta, true), n_boot=0)

    pooled = {r: summary(slices, r) for r in readouts}
    paired = {}
    if "deployed" in readouts and n_boot and pooled["deployed"].get("n_positive_studies", 0) >= 3:
        paired = bootstrap_volumes(volumes, slices[ID_COL], meta, true, n_boot, seed=0)[0]
    rows = []
    for readout in readouts:
        row = {"readout": readout, "mdape_pct": pooled[readout]["mdape_percent"],
               "spearman": pooled[readout]["spearman_positive"],
               "false_blood_negative_ml": pooled[readout]["median_pred_ml_negative_studies"]}
        halves = pooled[readout].get("by_size", {})
        row["small_half_mdape_pct"] = halves.get("small", {}).get("mdape_percent", np.nan)
        row["large_half_mdape_pct"] = halves.get("large", {}).get("mdape_percent", np.nan)
        row["mdape_diff_lo"] = row["mdape_diff_hi"] = row["p_lower_mdape_than_deployed"] = np.nan
        if paired and readout != "deployed":
            delta = paired[readout]["volume_mdape_percent"][1] - paired["deployed"]["volume_mdape_percent"][1]
            row["mdape_diff_lo"], row["mdape_diff_hi"] = interval(delta)
            row["p_lower_mdape_than_deployed"] = float((delta < 0).mean())
        for fold, part in slices.groupby(FOLD_COL):
            row[f"fold{fold}_mdape_pct"] = summary(part, readout)["mdape_percent"]
        rows.append(row)
    return pd.DataFrame(rows)


def error_table(slices: pd.DataFrame, meta: pd.DataFrame, true: pd.DataFrame) -> pd.DataFrame:
    """Where the deployed volume's error sits (ERROR_PARTS, in mL): mean per slice over negative and positive
    slices with a known mask, then the median per positive study, bleeds below and at or above the median true
    volume apart. A study's part counts each slice position once, as its volume does."""
    known = slices.dropna(subset=list(ERROR_PARTS))
    labels = meta.set_index(ID_COL)["any"]
    rows = []
    for name, positive in (("negative slices, mean per slice", False), ("positive slices, mean per slice", True)):
        part = known[(labels.reindex(known[ID_COL]).to_numpy() > 0) == positive]
        rows.append({"rows": name, "n": len(part), "true_ml": np.nan}
                    | {p: part[p].mean() / MM3_PER_ML for p in ERROR_PARTS})
    studies = None
    for p in ERROR_PARTS:
        per_study = study_volumes(known[[ID_COL]].assign(**{VOLUME_COL: known[p].to_numpy()}), meta, true)
        if studies is None:
            studies = per_study[[STUDY, "true_volume_ml"]].copy()
        studies[p] = per_study["pred_volume_ml"].to_numpy()
    positive = studies[studies["true_volume_ml"] > 0]
    middle = positive["true_volume_ml"].median()
    small = positive["true_volume_ml"] < middle
    for name, part in ((f"positive studies under {middle:.1f} mL, median", positive[small]),
                       (f"positive studies from {middle:.1f} mL, median", positive[~small])):
        rows.append({"rows": name, "n": len(part), "true_ml": part["true_volume_ml"].median()}
                    | {p: part[p].median() for p in ERROR_PARTS})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", required=True, help="experiment name (work/models/EXP/foldK/best.pt)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", help="data directory (default: the one in the checkpoint's config)")
    parser.add_argument("--input-sizes", type=int, nargs="+", default=[],
                        help="also read the deployed volume with the slices cached at these sizes (px), and their mean")
    args = parser.parse_args(argv)
    if any(size < 16 for size in args.input_sizes):
        raise InputError(f"--input-sizes {' '.join(map(str, args.input_sizes))}: sizes are pixels, at least 16")
    from src.data.metadata import load_metadata

    cfg = deployed_model(args.exp, args.folds[0])[1]
    data_dir = paths.resolve_data_dir(args.data or cfg.data_dir or None)
    if not data_dir.exists():
        raise InputError(f"{data_dir}: data directory not found")
    true_csv = data_dir / paths.TRUE_VOLUMES_CSV
    if not true_csv.exists():
        raise InputError(f"{true_csv}: no true volumes (painted masks) for this data: nothing to measure against")
    slices = pd.concat([fold_readouts(args.exp, k, data_dir, input_sizes=args.input_sizes) for k in args.folds],
                       ignore_index=True)
    meta, true = load_metadata(data_dir, "train"), pd.read_csv(true_csv, dtype={ID_COL: str})
    table = readout_table(slices, meta, true)
    out = paths.WORK / "bench" / f"volume_readout_{args.exp}"
    write_csv(slices, out.with_name(out.name + "_slices.csv"))
    write_csv(table, out.with_suffix(".csv"))
    shown = table.round({c: 1 if c.endswith("_pct") else 2 for c in table.columns if c != "readout"})
    text = (f"# Volume read-outs of {args.exp}, folds {' '.join(map(str, args.folds))}\n\n"
            f"Study volumes from {len(slices)} validation slices: MdAPE (%) and Spearman over positive studies, "
            "pooled and per fold; median false blood on negative studies (mL). deployed = what the OOF holds.\n\n"
            + markdown_table(shown, digits=2))
    write_text(text, out.with_suffix(".md"))
    print(markdown_table(shown, digits=2), end="")
    errors = error_table(slices, meta, true)
    errors_out = out.with_name(out.name + "_errors")
    write_csv(errors, errors_out.with_suffix(".csv"))
    shown = errors.round(2)
    text = (f"# Where the deployed volume's error sits: {args.exp}, folds {' '.join(map(str, args.folds))}\n\n"
            f"mL. found / missed: painted blood the mask calls / misses; false_edge: false blood within {NEAR_PX} "
            "px of painted blood (the bleed drawn too wide); false_far: false blood away from any bleed (mimics)."
            "\n\n" + markdown_table(shown, digits=2))
    write_text(text, errors_out.with_suffix(".md"))
    print(markdown_table(shown, digits=2), end="")
    print(f"wrote {out}.csv, .md, _slices.csv and _errors.csv, .md")
    return 0


if __name__ == "__main__":
    run_cli(main)
