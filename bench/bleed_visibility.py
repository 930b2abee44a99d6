"""Can the images show the bleeds the map misses? Each positive study's painted blood against its surroundings, in
Hounsfield units, beside the volume error of one or more experiments.

    python bench/bleed_visibility.py --pred oof/EXP [oof/EXP2 ...] [--data DIR] [--size 128]

For every slice with painted blood (the cache at --size px; 128 is the embedded set's native size, so nothing is
resampled there) it reads the blood window's channel back to HU and compares the blood with a ring RING_PX pixels
wide around it, soft tissue and fluid only (SOFT_HU: bone and air are not what a bleed must stand out from).
Per study, pixel-weighted over its slices: the blood's mean HU, the ring's mean HU and spread (its standard
deviation: noise and anatomy together, the clutter a bleed must stand out from), the contrast (blood - ring) and the
contrast-to-clutter ratio (contrast / spread). Then each experiment's per-study volume error
(oof/EXP/bloodnet/study_volumes.csv, from `python -m src.evaluate.volumes --pred oof/EXP`) by the small and large
halves (split at the median true volume, as the volume reports split them) and by low and high contrast (split at
the median contrast of the positive studies, declared before looking), and the rank correlation of contrast with
the error inside each half. Writes work/bench/bleed_visibility.{csv,md}.

A diagnostic: it says where the misses sit, not how to score better.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.stats import spearmanr
from tqdm import tqdm

from src.atomic import write_csv, write_text
from src.constants import ID_COL, STUDY
from src.data.cache import load_cache
from src.data.windows import window_channel
from src.errors import InputError, run_cli
from src.markdown import markdown_table
from src.paths import WORK, resolve_data_dir

RING_PX = 3
SOFT_HU = (-20.0, 100.0)  # fluid and soft tissue: the ring leaves out bone, air and the skull's edge
CONTRAST_WINDOW = "subdural"  # -20..180 HU: no blood saturates it, unlike the brain window's 0..80


def slice_sums(hu: np.ndarray, mask: np.ndarray) -> tuple[float, int, float, float, int]:
    """(blood HU sum, blood pixels, ring HU sum, ring HU sum of squares, ring pixels) of one slice."""
    blood = mask > 0
    near = ndimage.binary_dilation(blood, np.ones((3, 3), bool), RING_PX)  # a square ring, RING_PX on every side
    ring = near & ~blood & (hu > SOFT_HU[0]) & (hu < SOFT_HU[1])
    ring_hu = hu[ring].astype(np.float64)
    return float(hu[blood].sum()), int(blood.sum()), float(ring_hu.sum()), float((ring_hu**2).sum()), int(ring.sum())


def study_visibility(meta: pd.DataFrame, images, masks, channel: int, low: float, width: float) -> pd.DataFrame:
    """One row per study with painted blood: blood_hu, ring_hu, ring_sd_hu, contrast_hu, cnr (pixel-weighted)."""
    painted = meta[meta["mask_row"] >= 0]
    rows = []
    for study, group in tqdm(painted.groupby(STUDY, sort=True), desc="studies", unit="study"):
        sums = np.zeros(5)
        for cache_row, mask_row in zip(group["cache_row"], group["mask_row"]):
            mask = np.asarray(masks[mask_row])
            if mask.any():
                hu = low + np.asarray(images[cache_row][channel], dtype=np.float32) / 255.0 * width
                sums += slice_sums(hu, mask)
        blood_sum, blood_n, ring_sum, ring_sq, ring_n = sums
        if blood_n == 0 or ring_n < 2:
            continue
        ring_mean = ring_sum / ring_n
        ring_sd = float(np.sqrt(max(ring_sq / ring_n - ring_mean**2, 0.0)))
        contrast = blood_sum / blood_n - ring_mean
        rows.append({STUDY: study, "blood_px": int(blood_n), "blood_hu": blood_sum / blood_n, "ring_hu": ring_mean,
                     "ring_sd_hu": ring_sd, "contrast_hu": contrast, "cnr": contrast / max(ring_sd, 1e-6)})
    return pd.DataFrame(rows)


def split_errors(vis: pd.DataFrame, volumes: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, list[dict]]:
    """Per-study table (visibility + each experiment's error) and the summary rows by size half x contrast half."""
    table = vis.copy()
    truth = next(iter(volumes.values())).set_index(STUDY)["true_volume_ml"]  # the data's, the same in every file
    table["true_ml"] = table[STUDY].map(truth)
    for name, vol in volumes.items():
        cols = vol.set_index(STUDY)
        table[f"{name}_abs_pct_error"] = table[STUDY].map(cols["abs_pct_error"])
        table[f"{name}_pred_over_true"] = table[STUDY].map(cols["pred_volume_ml"] / cols["true_volume_ml"])
    table = table.dropna(subset=["true_ml"]).reset_index(drop=True)
    small = table["true_ml"] < table["true_ml"].median()
    low = table["contrast_hu"] < table["contrast_hu"].median()
    every = pd.Series(True, index=table.index)
    summary = []
    for size_name, size_rows in (("small half", small), ("large half", ~small), ("all", every)):
        for contrast_name, contrast_rows in (("low contrast", low), ("high contrast", ~low), ("any contrast", every)):
            rows = size_rows & contrast_rows
            part = table[rows]
            entry = {"studies": f"{size_name}, {contrast_name}", "n": len(part),
                     "median true mL": part["true_ml"].median(), "median contrast HU": part["contrast_hu"].median(),
                     "median CNR": part["cnr"].median()}
            for name in volumes:
                entry[f"{name} MdAPE %"] = part[f"{name}_abs_pct_error"].median()
                if contrast_rows is every and len(part) > 2:
                    entry[f"{name} Spearman(contrast, error)"] = spearmanr(part["contrast_hu"],
                                                                           part[f"{name}_abs_pct_error"])[0]
            summary.append(entry)
    return table, summary


def read_volumes(pred: str) -> pd.DataFrame:
    path = Path(pred) / "bloodnet" / "study_volumes.csv"
    if not path.exists():
        raise InputError(f"{path}: not found; write it with `python -m src.evaluate.volumes --pred {pred}`")
    vol = pd.read_csv(path, dtype={STUDY: str})
    missing = {STUDY, "true_volume_ml", "pred_volume_ml", "abs_pct_error"} - set(vol.columns)
    if missing:
        raise InputError(f"{path}: missing columns {sorted(missing)}")
    return vol[vol["true_volume_ml"] > 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", nargs="+", required=True, help="oof/<exp> folders with bloodnet/study_volumes.csv")
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--size", type=int, default=128, help="cache size in px (default 128)")
    args = parser.parse_args(argv)
    names = [Path(p).resolve().name for p in args.pred]
    if len(set(names)) < len(names):
        raise InputError(f"--pred {' '.join(args.pred)}: two folders share a name; the columns are named by it")
    volumes = {name: read_volumes(p) for name, p in zip(names, args.pred)}
    data_dir = resolve_data_dir(args.data)
    meta, images, masks = load_cache(data_dir, args.size, "train")
    if masks is None or not (meta["mask_row"] >= 0).any():
        raise InputError(f"{data_dir}: no painted masks in the cache; visibility needs them")
    channel, low, width = window_channel(CONTRAST_WINDOW)
    vis = study_visibility(meta[[ID_COL, STUDY, "cache_row", "mask_row"]], images, masks, channel, low, width)
    table, summary = split_errors(vis, volumes)
    out = WORK / "bench"
    write_csv(table, out / "bleed_visibility.csv")
    header = (f"Painted blood against a {RING_PX}-px ring of soft tissue and fluid ({data_dir}, cache {args.size} px, "
              f"{len(table)} positive studies; contrast and CNR pixel-weighted per study):\n\n")
    text = header + markdown_table(pd.DataFrame(summary), digits=3) + "\n"
    write_text(text, out / "bleed_visibility.md")
    print(text + f"wrote {out / 'bleed_visibility.csv'} and .md")
    return 0


if __name__ == "__main__":
    run_cli(main)
