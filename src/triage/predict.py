"""One study through the ensemble: fold models (flip TTA), the stacker, thresholds -> verdict, volume, overlays."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from src.cnn.predict import to_input
from src.cnn.study_volumes import MM3_PER_ML, slab_total_mm3
from src.constants import ID_COL, LABELS, PATIENT, SERIES, SLICE_INDEX, STUDY, VOLUME_COL
from src.data.dataset import SliceDataset
from src.errors import InputError
from src.evaluate.thresholds import apply_thresholds, flag_name
from src.triage.ensemble import DEFAULT_PRECISION, Ensemble
from src.triage.outputs import overlay_png

N_TOP_SLICES = 5
MAX_OVERLAYS = 8  # per study: the flagged slices with the highest p(any)


@torch.inference_mode()
def run_models(ens: Ensemble, slices: pd.DataFrame, images: np.ndarray, batch_size: int = 32,
               tta: bool | None = None) -> dict[str, np.ndarray]:
    """Mean over models (and the flip view when the config used it) of probs [N, 6], volume_mm3 [N], seg [N, S, S];
    with a stacker also `per_fold`: CNN fold -> that model's probs, volume and float16 embedding (view means)."""
    tta = ens.cfg.tta_flip if tta is None else tta
    ds = SliceDataset(slices.assign(cache_row=np.arange(len(slices))), images, ens.cfg.context, with_labels=False)
    n, size = len(ds), images.shape[-1]
    probs = np.zeros((n, len(LABELS)), np.float32)
    volume = np.zeros(n, np.float32)
    seg = np.zeros((n, size, size), np.float32) if ens.has_seg else None
    views = (False, True) if tta else (False,)
    k = len(ens.models) * len(views)
    wanted = set(ens.stacker_folds())
    per_fold: dict[int, dict[str, np.ndarray]] = {}
    for start in range(0, n, batch_size):
        idx = slice(start, min(start + batch_size, n))
        batch = np.stack([ds[i]["image"].numpy() for i in range(idx.start, idx.stop)])
        x = to_input(torch.from_numpy(batch), torch.device("cpu"), True)
        voxel = torch.from_numpy(ds.voxel_mm3[idx])
        for m, model in enumerate(ens.models):
            fold = ens.fold_of(m)
            for flipped in views:
                out = model(torch.flip(x, dims=[-1]) if flipped else x, voxel)
                probs[idx] += torch.sigmoid(out["logits"].float()).numpy() / k
                if fold in wanted:
                    _add_fold_outputs(per_fold, fold, idx, n, out, len(views))
                if seg is not None:
                    s = torch.sigmoid(out["seg_logits"][:, 0].float())
                    seg[idx] += (torch.flip(s, dims=[-1]) if flipped else s).numpy() / k
                    volume[idx] += out["mask_volume_mm3"].numpy() / k
    for part in per_fold.values():
        # Embeddings are stored as float16 for the stacker's training; feed it the same rounding.
        part["embedding"] = part["embedding"].astype(np.float16)
    return {"probs": probs, "volume_mm3": volume if seg is not None else None, "seg": seg, "per_fold": per_fold}


def _add_fold_outputs(per_fold: dict, fold: int, idx: slice, n: int, out: dict, n_views: int) -> None:
    """Accumulate one view's outputs of one fold model: the mean over views, as the stacker's test inputs were."""
    part = per_fold.get(fold)
    if part is None:
        part = per_fold[fold] = {"probs": np.zeros((n, len(LABELS))),
                                 "embedding": np.zeros((n, out["embedding"].shape[1])),
                                 "volume_mm3": np.zeros(n) if "mask_volume_mm3" in out else None}
    part["probs"][idx] += torch.sigmoid(out["logits"].float()).numpy() / n_views
    part["embedding"][idx] += out["embedding"].float().numpy() / n_views
    if part["volume_mm3"] is not None:
        part["volume_mm3"][idx] += out["mask_volume_mm3"].numpy() / n_views


def apply_stacker(ens: Ensemble, slices: pd.DataFrame, per_fold: dict[int, dict[str, np.ndarray]]) -> np.ndarray:
    """The ensemble's stacker on one study's slices: probs [N, 6] from the fold models' outputs."""
    keys = slices[[ID_COL, PATIENT, STUDY, SERIES, "position"]].reset_index(drop=True)
    tables, embeddings = {}, {}
    for fold, part in sorted(per_fold.items()):
        table = keys.copy()
        for j, name in enumerate(LABELS):
            table[name] = part["probs"][:, j]
        if part["volume_mm3"] is not None:
            table[VOLUME_COL] = part["volume_mm3"]
        tables[fold], embeddings[fold] = table, part["embedding"]
    return ens.stacker.predict(tables, embeddings, kinds=[ens.stacker_kind])[ens.stacker_kind]


def predict_study(ens: Ensemble, slices: pd.DataFrame, images: np.ndarray, precision: float = DEFAULT_PRECISION,
                  batch_size: int = 32, tta: bool | None = None) -> dict:
    """One study's result: verdict, max-over-slices probabilities, flags, volume (mL), top slices, per-slice rows,
    and `overlays` (PNG bytes of flagged slices). `slices`/`images` hold that study's rows only, in any order."""
    studies = slices[STUDY].unique()
    if len(studies) != 1:
        raise InputError(f"predict_study: expected one study, got {len(studies)}")
    slices = slices.reset_index(drop=True)
    t0 = time.perf_counter()
    out = run_models(ens, slices, images, batch_size, tta)
    p = out["probs"] if ens.stacker is None else apply_stacker(ens, slices, out["per_fold"])
    seconds = time.perf_counter() - t0
    per_slice, per_study = apply_thresholds(slices, p, ens.thresholds)
    study_row = per_study.iloc[0]
    key = f"{precision:g}"
    study_thr = {n: (ens.thresholds["levels"].get("study_max", {}).get(n, {}).get(key) or {}).get("threshold")
                 for n in LABELS}
    flags = {n: bool(study_row.get(f"max_{flag_name(n, precision)}", False)) for n in LABELS}
    slice_flag = per_slice.get(flag_name("any", precision), pd.Series(False, index=per_slice.index)).to_numpy(bool)
    any_j = LABELS.index("any")
    table = slices[[STUDY, SERIES, ID_COL, SLICE_INDEX, "position", "path"]].copy()
    for j, name in enumerate(LABELS):
        table[name] = p[:, j]
    table[VOLUME_COL] = out["volume_mm3"] if out["volume_mm3"] is not None else np.nan
    table["flag_any"] = slice_flag
    top = np.argsort(-p[:, any_j], kind="stable")[:N_TOP_SLICES]
    flagged = [i for i in np.argsort(-p[:, any_j], kind="stable") if slice_flag[i]][:MAX_OVERLAYS]
    overlays = [{"ID": slices[ID_COL].iloc[i], "series": slices[SERIES].iloc[i],
                 SLICE_INDEX: int(slices[SLICE_INDEX].iloc[i]), "any": float(p[i, any_j]),
                 "volume_mm3": None if out["volume_mm3"] is None else float(out["volume_mm3"][i]),
                 "png": overlay_png(images[i], None if out["seg"] is None else out["seg"][i], ens.seg_cutoff)}
                for i in sorted(flagged, key=lambda i: (slices[SERIES].iloc[i], slices[SLICE_INDEX].iloc[i]))]
    volume_ml = None if out["volume_mm3"] is None else slab_total_mm3(out["volume_mm3"], slices) / MM3_PER_ML
    return {
        "study": str(studies[0]),
        "patient": str(slices[PATIENT].iloc[0]),
        "series": [str(s) for s in slices[SERIES].unique()],
        "n_slices": len(slices),
        "verdict": "ICH suspected" if any(flags.values()) else "no ICH flagged",
        "probabilities": {n: float(p[:, j].max()) for j, n in enumerate(LABELS)},
        "flags": flags,
        "thresholds": {"precision": precision, "source": ens.thresholds_source, "study_max": study_thr},
        "blood_volume_ml": volume_ml,
        "top_slices": [{"ID": slices[ID_COL].iloc[i], "series": slices[SERIES].iloc[i],
                        SLICE_INDEX: int(slices[SLICE_INDEX].iloc[i]), "any": float(p[i, any_j])} for i in top],
        "slices": table,
        "overlays": overlays,
        "model": ens.describe(),
        "probabilities_from": ens.source(),
        "seconds_model": seconds,
    }
