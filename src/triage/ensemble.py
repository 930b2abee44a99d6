"""The triage ensemble: an experiment's fold checkpoints, its saved stacker and the thresholds to flag with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src import paths
from src.cnn.checkpoints import load_model
from src.cnn.model import MASK_CUTOFF
from src.config import Config, TriageConfig
from src.constants import LABELS
from src.errors import InputError
from src.evaluate.thresholds import RADNET_RUN
from src.stack.bundle import KINDS, StackerBundle, load_stackers, stack_model_dir

DEFAULT_PRECISION: float = TriageConfig.threshold_precision  # the config's triage section holds the defaults
# Without a saved thresholds.json (python -m src.evaluate.report) flags fall back to p >= 0.5, and every output says so.
# The stacker applied by default when python -m src.stack saved one for the experiment.
DEFAULT_STACKER = "blend"
DEFAULT_THRESHOLD = 0.5
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

    @property
    def seg_cutoff(self) -> float:
        """The pixel probability drawn as blood on the mean map: the mean of the models' volume cutoffs (0.5 with
        painted masks; the weak mode calibrates one per model, src/cnn/volume_cutoff.py)."""
        return float(np.mean([getattr(m, "volume_cutoff", MASK_CUTOFF) for m in self.models]))

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
            raise InputError(f"{root}: no trained models (*/fold*/best.pt); train one with python -m src.cnn.train")
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
    """A thresholds.json payload (thresholds_to_dict's shape) with one fixed threshold everywhere."""
    point = {"threshold": value}
    levels = {lvl: {n: {f"{precision:g}": point} for n in LABELS} for lvl in ("slice", "study_max", "study_radnet")}
    return {"radnet_run": RADNET_RUN, "precisions": [precision], "levels": levels}


def load_thresholds(exp: str, precision: float, stacker_kind: str | None = None) -> tuple[dict, str]:
    """The stacker's oof/<exp>_stack_<kind>/report/thresholds.json, else the CNN's oof/<exp>/report/thresholds.json,
    else the documented default; the source line names the one used (a file must hold the precision)."""
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


def check_stacker(name: str) -> None:
    """The triage section's `stacker` (a flag's choices are checked by argparse; a config value is not)."""
    if name not in ("", *KINDS, "none"):
        raise InputError(f"triage.stacker {name!r}: expected one of {', '.join(KINDS)}, none, or empty for the default")


def load_ensemble(exp: str | None = None, precision: float = DEFAULT_PRECISION,
                  stacker: str | None = None) -> Ensemble:
    """Every checkpoint of the experiment, on CPU, eval mode, channels_last; they must share input geometry; then
    the saved stacker (`stacker`: one of src.stack.bundle.KINDS, "none", or None for the default) and its thresholds."""
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
