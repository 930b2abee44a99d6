"""Cross-fitted operating points: each part's threshold is chosen on the other parts' rows and measured on its own.

A threshold chosen and scored on the same rows sits on their noise (selection bias: epidural has a handful of
positives per fold), so its precision is optimistic. Here every row is scored by a threshold that never saw it,
and the pooled held-out confusion counts give the precision a reader can expect on unseen data, with a percentile
bootstrap CI that resamples studies (the thresholds stay fixed: the CI is the evaluation's sampling error).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from src.constants import LABELS
from src.errors import InputError
from src.evaluate.thresholds import threshold_table

N_INNER = 5  # parts of the patient-grouped split when the OOF holds one CNN fold only (as the stackers do)
HELDOUT_METRICS: tuple[str, ...] = ("precision", "recall", "specificity", "f1")


def heldout_parts(folds: np.ndarray | None, patients: np.ndarray, n_inner: int = N_INNER, seed: int = 0
                  ) -> tuple[str, np.ndarray]:
    """(how, part of each row): the CNN folds when two or more are present, else patients split n_inner ways."""
    if folds is not None and len(np.unique(folds)) >= 2:
        codes, present = pd.factorize(np.asarray(folds), sort=True)
        return f"leave one CNN fold out ({len(present)} folds: {', '.join(map(str, present))})", codes
    codes, uniq = pd.factorize(np.asarray(patients))
    k = min(n_inner, len(uniq))
    if k < 2:
        raise InputError(f"held-out operating points need at least 2 patients; the OOF holds {len(uniq)}")
    part_of_patient = np.random.default_rng(seed).permutation(len(uniq)) % k
    return f"patient-grouped {k}-part split inside the single fold's OOF (seed {seed})", part_of_patient[codes]


def heldout_flags(y: np.ndarray, score: np.ndarray, part: np.ndarray, targets: Sequence[float]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(flags [N, T], parts where the target was reachable [T]). A part whose other parts cannot reach a target
    flags nothing at it: that is what the deployed rule would do there."""
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    flags = np.zeros((len(y), len(targets)), dtype=bool)
    reached = np.zeros(len(targets), dtype=np.int64)
    for p in np.unique(part):
        held = part == p
        table = threshold_table(y[~held], score[~held], targets)
        for t, (ok, threshold) in enumerate(zip(table["reachable"], table["threshold"])):
            if ok:
                flags[held, t] = score[held] >= threshold
                reached[t] += 1
    return flags, reached


def rates(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, specificity and F1 from (arrays of) confusion counts; NaN where undefined."""
    tp, fp, fn, tn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn, tn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "recall": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
        }


def study_weights(groups: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(group code of each row, [n_boot, G] multiplicity of each group in each resample of whole groups)."""
    codes, uniq = pd.factorize(np.asarray(groups))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    offsets = np.arange(n_boot)[:, None] * len(uniq)
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * len(uniq))
    return codes, counts.reshape(n_boot, len(uniq)).astype(np.float32)


def heldout_table(y: np.ndarray, score: np.ndarray, part: np.ndarray, targets: Sequence[float],
                  codes: np.ndarray, weights: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
    """Per target: pooled held-out counts and rates, each rate with its study-bootstrap CI (`<rate>_lo/_hi`)."""
    y = np.asarray(y, dtype=bool)
    flags, reached = heldout_flags(y, score, part, targets)
    n_groups = weights.shape[1]
    rows = []
    for t, target in enumerate(targets):
        f = flags[:, t]
        cells = np.stack([f & y, f & ~y, ~f & y, ~f & ~y], axis=1).astype(np.float64)
        per_group = np.stack([np.bincount(codes, cells[:, c], minlength=n_groups) for c in range(4)], axis=1)
        boot = weights @ per_group.astype(np.float32)
        point = rates(*cells.sum(axis=0))
        spread = rates(*boot.T)
        row = {"target_precision": float(target), "parts_reached": int(reached[t]), "parts": len(np.unique(part))}
        for name in HELDOUT_METRICS:
            valid = spread[name][~np.isnan(spread[name])]
            lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2]) if len(valid) else (np.nan, np.nan)
            row.update({name: float(point[name]), f"{name}_lo": float(lo), f"{name}_hi": float(hi)})
        row.update(dict(zip(("tp", "fp", "fn", "tn"), cells.sum(axis=0).astype(int).tolist())))
        rows.append(row)
    return pd.DataFrame(rows)


def heldout_tables(y: np.ndarray, scores: np.ndarray, part: np.ndarray, groups: np.ndarray,
                   targets: Sequence[float], names: Sequence[str] = LABELS, level: str = "slice",
                   n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """heldout_table for every column of [N, K] labels/scores (the same study resamples for all), stacked with
    `level` and `label` columns. groups: the study of each row (its own study at study level)."""
    y = np.asarray(y).reshape(len(y), -1)
    s = np.asarray(scores).reshape(len(scores), -1)
    codes, weights = study_weights(groups, n_boot, seed)
    parts = []
    for j, name in enumerate(names):
        table = heldout_table(y[:, j], s[:, j], np.asarray(part), targets, codes, weights)
        table.insert(0, "label", name)
        table.insert(0, "level", level)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)
