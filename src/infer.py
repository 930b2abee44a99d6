"""Triage new head-CT studies: DICOM files, folders or zips -> per-study verdict, probabilities, volume, overlays."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from src import paths
from src.checkpoints import load_model
from src.config import Config
from src.constants import ID_COL, LABELS, VOLUME_COL
from src.data import SliceDataset
from src.errors import InputError, run_cli
from src.infer_inputs import load_study_files
from src.infer_outputs import SERIES, STUDY, overlay_png, summary_text, write_outputs
from src.predict import to_input
from src.stack import KINDS
from src.stack_bundle import StackerBundle, load_stackers, stack_model_dir
from src.thresholds import RADNET_RUN, apply_thresholds, flag_name

DEFAULT_PRECISION = 0.8
# Without a saved thresholds.json (python -m src.report) flags fall back to p >= 0.5, and every output says so.
# The stacker applied by default when python -m src.stack saved one for the experiment.
DEFAULT_STACKER = "blend"
DEFAULT_THRESHOLD = 0.5
N_TOP_SLICES = 5
MAX_OVERLAYS = 8  # per study: the flagged slices with the highest p(any)


# ---------------------------------------------------------------- models


@dataclass
class Ensemble:
    """The fold models of one experiment, averaged, optionally a saved stacker on top, and the flag thresholds."""

    exp: str
    cfg: Config
    models: list[nn.Module]
    checkpoints: list[Path]
    thresholds: dict
    thresholds_source: str
    stacker: StackerBundle | None = None
    stacker_kind: str | None = None  # lgbm / gru / blend when `stacker` is applied
    stacker_note: str = ""  # why no stacker is applied
    has_seg: bool = field(init=False)

    def __post_init__(self) -> None:
        self.has_seg = self.cfg.arch != "classifier"

    def fold_of(self, k: int) -> int | None:
        return checkpoint_fold(self.checkpoints[k])

    def stacker_folds(self) -> list[int]:
        """The stacker's CNN folds that have a checkpoint here: their outputs are what the stacker reads."""
        if self.stacker is None:
            return []
        have = {self.fold_of(k) for k in range(len(self.models))}
        return [f for f in self.stacker.manifest["cnn_folds"] if f in have]

    def source(self) -> str:
        """One line: which model produced the probabilities."""
        if self.stacker is None:
            return f"mean of {len(self.models)} CNN fold models of {self.exp}, no stacker ({self.stacker_note})"
        return f"{self.stacker.describe(self.stacker_kind)} of {self.exp} (after the CNN fold models)"

    def describe(self) -> str:
        names = ", ".join(p.parent.name for p in self.checkpoints)
        c = self.cfg
        cnn = (f"mean of {len(self.models)} CNN fold models of {self.exp} ({names}; {c.arch}/{c.backbone} "
               f"{c.image_size} px, context {c.context})")
        if self.stacker is None:
            return f"{cnn}; no stacker: {self.stacker_note}"
        return f"{cnn}; probabilities from the {self.stacker.describe(self.stacker_kind)} (volume from the CNN)"


def find_checkpoints(exp: str | None = None) -> tuple[str, list[Path]]:
    """(exp, its fold*/best.pt and full/best.pt); without exp, the experiment with the newest checkpoint."""
    root = paths.WORK / "models"
    if exp is None:
        found = sorted(root.glob("*/*/best.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise InputError(f"{root}: no trained models (*/fold*/best.pt); train one with python -m src.train")
        exp = found[-1].parent.parent.name
    ckpts = sorted((root / exp).glob("fold*/best.pt")) + sorted((root / exp).glob("full/best.pt"))
    if not ckpts:
        raise InputError(f"{root / exp}: no fold*/best.pt checkpoints for experiment {exp}")
    return exp, ckpts


def checkpoint_fold(path: Path) -> int | None:
    """CNN fold number of a fold<K>/best.pt checkpoint; None for the all-data model (full/best.pt)."""
    tag = path.parent.name[len("fold"):]
    return int(tag) if path.parent.name.startswith("fold") and tag.isdigit() else None


def default_thresholds(precision: float, value: float = DEFAULT_THRESHOLD) -> dict:
    """A thresholds.json payload (src.thresholds.thresholds_to_dict's shape) with one fixed threshold everywhere."""
    point = {"threshold": value}
    levels = {lvl: {n: {f"{precision:g}": point} for n in LABELS} for lvl in ("slice", "study_max", "study_radnet")}
    return {"radnet_run": RADNET_RUN, "precisions": [precision], "levels": levels}


def load_thresholds(exp: str, precision: float, stacker_kind: str | None = None) -> tuple[dict, str]:
    """The stacker's oof/<exp>_stack_<kind>/report/thresholds.json, else the CNN's oof/<exp>/report/thresholds.json,
    else the documented default; the source line names the one used (a file must hold the precision)."""
    import json

    tried = [paths.OOF_DIR / f"{exp}_stack_{stacker_kind}"] if stacker_kind else []
    tried = [d / "report" / "thresholds.json" for d in [*tried, paths.OOF_DIR / exp]]
    found = [p for p in tried if p.exists()]
    if not found:
        return default_thresholds(precision), (f"default p >= {DEFAULT_THRESHOLD} "
                                               f"({' and '.join(map(str, tried))} not found)")
    path = found[0]
    whose = f"the {stacker_kind} stacker's" if stacker_kind and path == tried[0] else "the CNN's"
    if stacker_kind and path != tried[0]:
        whose += f" ({tried[0]} not found)"
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    have = {f"{float(p):g}" for p in saved.get("precisions", [])}
    if f"{precision:g}" not in have:
        raise InputError(f"{path}: no thresholds at precision {precision:g} (has {', '.join(sorted(have))}); "
                         "pick one of those with --threshold-precision")
    return saved, f"{path}: {whose} thresholds (fixed precision {precision:g} on the OOF predictions)"


def pick_stacker(exp: str, stacker: str | None, folds: set[int]) -> tuple[StackerBundle | None, str | None, str]:
    """(bundle, kind, note): the requested stacker (None = DEFAULT_STACKER when saved, else lgbm, else no stacker).

    An explicit request that cannot be met is an InputError; the default falls back and says why in `note`."""
    if stacker == "none":
        return None, None, "turned off with --stacker none"
    explicit, kind = stacker is not None, stacker or DEFAULT_STACKER
    bundle = load_stackers(exp)
    if bundle is None:
        note = f"none saved in {stack_model_dir(exp)} (python -m src.stack --exp {exp})"
    elif not set(bundle.manifest["cnn_folds"]) & folds:
        note = (f"it reads CNN folds {bundle.manifest['cnn_folds']}, none of which has a checkpoint here "
                f"(folds {sorted(folds)})")
    elif kind not in bundle.kinds:
        note = f"{kind} not saved (saved: {', '.join(bundle.kinds)})"
        if not explicit:
            return bundle, bundle.kinds[0], note
    else:
        return bundle, kind, ""
    if explicit:
        raise InputError(f"--stacker {kind}: {note}")
    return None, None, note


def load_ensemble(exp: str | None = None, precision: float = DEFAULT_PRECISION,
                  stacker: str | None = None) -> Ensemble:
    """Every checkpoint of the experiment, on CPU, eval mode, channels_last; they must share input geometry; then
    the saved stacker (`stacker`: one of src.stack.KINDS, "none", or None for the default) and its thresholds."""
    exp, ckpts = find_checkpoints(exp)
    models, cfg = [], None
    for path in ckpts:
        model, c = load_model(path)
        if cfg is not None and (c.image_size, c.context, c.arch) != (cfg.image_size, cfg.context, cfg.arch):
            raise InputError(f"{path}: image_size/context/arch differ from {ckpts[0]}; one experiment, one geometry")
        cfg = cfg or c
        models.append(model.to(memory_format=torch.channels_last).eval())
    bundle, kind, note = pick_stacker(exp, stacker, {checkpoint_fold(p) for p in ckpts} - {None})
    thresholds, source = load_thresholds(exp, precision, kind)
    return Ensemble(exp, cfg, models, ckpts, thresholds, source, bundle, kind, note)


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
    keys = slices[[ID_COL, "PatientID", STUDY, SERIES, "position"]].reset_index(drop=True)
    tables, embeddings = {}, {}
    for fold, part in sorted(per_fold.items()):
        table = keys.copy()
        for j, name in enumerate(LABELS):
            table[name] = part["probs"][:, j]
        if part["volume_mm3"] is not None:
            table[VOLUME_COL] = part["volume_mm3"]
        tables[fold], embeddings[fold] = table, part["embedding"]
    return ens.stacker.predict(tables, embeddings, kinds=[ens.stacker_kind])[ens.stacker_kind]


# ---------------------------------------------------------------- one study


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
    table = slices[[STUDY, SERIES, ID_COL, "slice_index", "position", "path"]].copy()
    for j, name in enumerate(LABELS):
        table[name] = p[:, j]
    table[VOLUME_COL] = out["volume_mm3"] if out["volume_mm3"] is not None else np.nan
    table["flag_any"] = slice_flag
    top = np.argsort(-p[:, any_j], kind="stable")[:N_TOP_SLICES]
    flagged = [i for i in np.argsort(-p[:, any_j], kind="stable") if slice_flag[i]][:MAX_OVERLAYS]
    overlays = [{"ID": slices[ID_COL].iloc[i], "series": slices[SERIES].iloc[i],
                 "slice_index": int(slices["slice_index"].iloc[i]), "any": float(p[i, any_j]),
                 "volume_mm3": None if out["volume_mm3"] is None else float(out["volume_mm3"][i]),
                 "png": overlay_png(images[i], None if out["seg"] is None else out["seg"][i])}
                for i in sorted(flagged, key=lambda i: (slices[SERIES].iloc[i], slices["slice_index"].iloc[i]))]
    volume_ml = None if out["volume_mm3"] is None else float(out["volume_mm3"].sum()) / 1000.0
    return {
        "study": str(studies[0]),
        "patient": str(slices["PatientID"].iloc[0]),
        "series": [str(s) for s in slices[SERIES].unique()],
        "n_slices": len(slices),
        "verdict": "ICH suspected" if any(flags.values()) else "no ICH flagged",
        "probabilities": {n: float(p[:, j].max()) for j, n in enumerate(LABELS)},
        "flags": flags,
        "thresholds": {"precision": precision, "source": ens.thresholds_source, "study_max": study_thr},
        "blood_volume_ml": volume_ml,
        "top_slices": [{"ID": slices[ID_COL].iloc[i], "series": slices[SERIES].iloc[i],
                        "slice_index": int(slices["slice_index"].iloc[i]), "any": float(p[i, any_j])} for i in top],
        "slices": table,
        "overlays": overlays,
        "model": ens.describe(),
        "probabilities_from": ens.source(),
        "seconds_model": seconds,
    }


def run(inputs: Sequence[str | os.PathLike], ens: Ensemble, out_dir: Path, precision: float = DEFAULT_PRECISION,
        batch_size: int = 32, tta: bool | None = None) -> tuple[list[dict], pd.DataFrame]:
    """Load, predict every study, write the outputs; returns (results, skipped)."""
    slices, images, skipped = load_study_files(inputs, ens.cfg.image_size, progress=True)
    results = []
    groups = slices.groupby(STUDY, sort=True).indices if len(slices) else {}
    for _, rows in tqdm(groups.items(), desc="studies", disable=len(groups) < 2, leave=False):
        results.append(predict_study(ens, slices.iloc[rows], images[rows], precision, batch_size, tta))
    write_outputs(results, skipped, out_dir, ens)
    return results, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.infer", description=__doc__)
    parser.add_argument("inputs", nargs="+", help="study folders, DICOM files or zips")
    parser.add_argument("--exp", help="experiment under work/models/ (default: the one with the newest checkpoint)")
    parser.add_argument("--out", type=Path, help="output folder (default: work/infer/<time>)")
    parser.add_argument("--threshold-precision", type=float, default=DEFAULT_PRECISION,
                        help="flag at the thresholds saved for this precision (oof/<exp>/report/thresholds.json)")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    parser.add_argument("--no-tta", action="store_true", help="skip the flip view even if validation used it")
    parser.add_argument("--stacker", choices=[*KINDS, "none"],
                        help=f"saved level-2 stacker applied after the CNN folds (default: {DEFAULT_STACKER} when "
                        "python -m src.stack saved one, else the CNN fold mean)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    ens = load_ensemble(args.exp, args.threshold_precision, args.stacker)
    out_dir = args.out or paths.WORK / "infer" / time.strftime("%Y%m%d-%H%M%S")
    results, skipped = run(args.inputs, ens, out_dir, args.threshold_precision, args.batch_size,
                           False if args.no_tta else None)
    print(summary_text(results, skipped, ens, out_dir))
    return 0 if results else 2


if __name__ == "__main__":
    run_cli(main)
