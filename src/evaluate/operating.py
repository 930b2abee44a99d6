"""The report's operating points: thresholds chosen on all OOF rows, their in-sample and held-out figures, side by side.

In-sample figures are measured on the rows that chose the threshold (optimistic); held-out figures come from
cross-fitting (src/evaluate/crossfit.py) and are what to expect on unseen data. Both go to the tables and to
thresholds.json, which keeps its shape (level -> label -> precision -> point) and gains a `heldout` entry per point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from src.constants import FOLD_COL, LABELS, PATIENT, STUDY
from src.evaluate.crossfit import HELDOUT_METRICS, heldout_parts, heldout_tables
from src.evaluate.thresholds import ANY_SWEEP, LEVELS, level_tables, threshold_tables

KEYS = ["level", "label", "target_precision"]


@dataclass
class OperatingPoints:
    how: str  # how the held-out parts were made
    in_sample: pd.DataFrame  # level_tables: chosen on all OOF rows, measured on them
    heldout: pd.DataFrame  # heldout_tables for every level: each part scored by the others' threshold
    sweep: pd.DataFrame  # `any` at ANY_SWEEP, in-sample (slice, study_max)
    sweep_heldout: pd.DataFrame


def study_parts(frame: pd.DataFrame, part: np.ndarray, studies: pd.DataFrame) -> np.ndarray:
    """The part of each study (rows of `studies`); parts group patients, so a study never straddles two."""
    of_study = pd.Series(part, index=frame[STUDY].to_numpy()).groupby(level=0).first()
    return of_study.reindex(studies[STUDY].to_numpy()).to_numpy()


def operating_points(frame: pd.DataFrame, y: np.ndarray, p: np.ndarray, studies: pd.DataFrame,
                     precisions: Sequence[float], n_boot: int, seed: int) -> OperatingPoints:
    """Every threshold table of the report, in-sample and held-out. frame: the OOF rows (fold, study, patient)."""
    folds = frame[FOLD_COL].to_numpy() if FOLD_COL in frame.columns else None
    patients = frame[PATIENT if PATIENT in frame.columns else STUDY].to_numpy()
    how, part = heldout_parts(folds, patients, seed=seed)
    s_part, s_groups = study_parts(frame, part, studies), studies[STUDY].to_numpy()
    y_st = studies[[f"true_{c}" for c in LABELS]].to_numpy()
    rows = frame[STUDY].to_numpy()

    def held(targets, names, cols, level):
        j = [LABELS.index(n) for n in names]
        if level == "slice":
            return heldout_tables(y[:, j], p[:, j], part, rows, targets, names, level, n_boot, seed)
        scores = studies[[f"{cols}_{n}" for n in names]].to_numpy()
        return heldout_tables(y_st[:, j], scores, s_part, s_groups, targets, names, level, n_boot, seed)

    heldout = pd.concat([held(precisions, LABELS, rule, lv) for lv, rule in zip(LEVELS, ("", "max", "radnet"))],
                        ignore_index=True)
    j_any = LABELS.index("any")
    sweep = pd.concat([
        threshold_tables(y[:, j_any], p[:, j_any], ANY_SWEEP, ["any"], "slice"),
        threshold_tables(y_st[:, j_any], studies["max_any"].to_numpy(), ANY_SWEEP, ["any"], "study_max"),
    ], ignore_index=True)
    sweep_heldout = pd.concat([held(ANY_SWEEP, ["any"], "", "slice"), held(ANY_SWEEP, ["any"], "max", "study_max")],
                              ignore_index=True)
    return OperatingPoints(how, level_tables(y, p, studies, precisions), heldout, sweep, sweep_heldout)


def _ci(value: float, lo: float, hi: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def side_by_side(in_sample: pd.DataFrame, heldout: pd.DataFrame) -> pd.DataFrame:
    """One row per (level, label, target): the threshold, its in-sample precision/recall, held-out figures + CIs."""
    both = in_sample.merge(heldout, on=KEYS, suffixes=("", "_ho"), validate="one_to_one")
    out = pd.DataFrame({
        "label": both["label"],
        "target": both["target_precision"],
        "threshold (all OOF)": [f"{t:.4g}" if ok else "not reachable" for t, ok in zip(both["threshold"],
                                                                                        both["reachable"])],
        "precision in-sample": both["precision"].round(3),
        "recall in-sample": both["recall"].round(3),
    })
    for name in HELDOUT_METRICS:
        ho = both[f"{name}_ho"]
        out[f"{name} held-out [95% CI]"] = [_ci(v, lo, hi) for v, lo, hi in zip(ho, both[f"{name}_lo"],
                                                                                 both[f"{name}_hi"])]
    out["parts reached"] = [f"{a}/{b}" for a, b in zip(both["parts_reached"], both["parts"])]
    return out


def attach_heldout(thresholds: dict, heldout: pd.DataFrame, how: str, n_rows: int) -> dict:
    """thresholds.json with each point's held-out figures (what to expect on unseen data) and how both were made."""
    for row in heldout.itertuples(index=False):
        point = thresholds["levels"].get(row.level, {}).get(row.label, {}).get(f"{row.target_precision:g}")
        if point is None:
            continue
        point["heldout"] = {name: getattr(row, name) for name in HELDOUT_METRICS}
        point["heldout"].update({f"{name}_ci": [getattr(row, f"{name}_lo"), getattr(row, f"{name}_hi")]
                                 for name in ("precision", "recall")})
        point["heldout"]["parts_reached"] = f"{row.parts_reached}/{row.parts}"
    thresholds["chosen_on"] = (f"all {n_rows} OOF rows (each predicted by the fold model that did not train on it); "
                               "precision/recall/specificity are in-sample (optimistic)")
    thresholds["heldout_method"] = (f"{how}: each part's threshold chosen on the other parts, figures pooled over "
                                    "the held-out rows, 95% CI from study bootstrap")
    return thresholds
