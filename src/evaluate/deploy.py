"""Thresholds for the model that is deployed: OOF thresholds carried to the fold ensemble's scale by rank.

An OOF threshold is chosen on one fold model's scores, but test and triage score with the mean of all fold models
(flip TTA), whose probabilities are shrunk towards the middle: the same number means a different operating point.
Every fold model sees the test images as unseen data, like its OOF rows, so threshold t flags the fraction r_k of
them that model k would flag on unseen data. The deployed threshold is the ensemble score that flags the mean r of
those fractions on the same (unlabelled) test images. It needs no labels and assumes only that the ensemble ranks
at least as well as one member, which averaging gives; tests/test_operating_points.py checks it on data whose
answer is known.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pandas as pd

from src.constants import ID_COL, LABELS
from src.errors import InputError
from src.evaluate.thresholds import RADNET_RUN, aggregate_studies

SCALE_OOF = "one fold model (OOF rows), as chosen"


def ensemble_threshold(threshold: float, members: Sequence[np.ndarray], ensemble: np.ndarray) -> float:
    """The ensemble score that flags, on the same rows, the mean fraction the members flag at `threshold`."""
    ensemble = np.asarray(ensemble, dtype=np.float64)
    rate = float(np.mean([np.mean(np.asarray(m) >= threshold) for m in members]))
    n_flag = round(rate * len(ensemble))
    if n_flag == 0:
        return float(np.nextafter(ensemble.max(), np.inf))  # the members flag nothing: neither does the ensemble
    return float(np.sort(ensemble)[::-1][n_flag - 1])


def level_scores(meta: pd.DataFrame, probs: np.ndarray, run: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """[rows, K] scores per thresholds.json level: slices, study max, study RADnet window (studies sorted)."""
    studies = aggregate_studies(meta, probs, None, run, names)
    return {
        "slice": np.asarray(probs, dtype=np.float64).reshape(len(probs), -1),
        "study_max": studies[[f"max_{n}" for n in names]].to_numpy(),
        "study_radnet": studies[[f"radnet_{n}" for n in names]].to_numpy(),
    }


def deploy_thresholds(thresholds: dict, members: dict[int, pd.DataFrame], meta: pd.DataFrame,
                      names: Sequence[str] = LABELS) -> dict:
    """A thresholds.json payload whose `threshold`s apply to the mean of `members` (fold -> test predictions with
    ID + names), the OOF choice kept as `threshold_oof`. meta: ID, study, series, slice_index of the test rows.
    With fewer than two members the ensemble is the member itself and the payload is returned unchanged."""
    out = copy.deepcopy(thresholds)
    if len(members) < 2:
        out["deployed"] = {"scale": SCALE_OOF, "members": sorted(members)}
        return out
    rows = meta.reset_index(drop=True)
    row_of = pd.Index(rows[ID_COL])
    tables = []
    for fold, frame in sorted(members.items()):
        probs = np.full((len(rows), len(names)), np.nan)
        at = row_of.get_indexer(frame[ID_COL])
        probs[at[at >= 0]] = frame.loc[at >= 0, list(names)].to_numpy(dtype=np.float64)
        if np.isnan(probs).any():
            raise InputError(f"fold{fold}_test.csv: no prediction for {int(np.isnan(probs).any(axis=1).sum())} test "
                             "image(s) the other folds predict; re-run that fold's prediction")
        tables.append(probs)
    run = int(thresholds.get("radnet_run", RADNET_RUN))
    member_levels = [level_scores(rows, p, run, names) for p in tables]
    ensemble_levels = level_scores(rows, np.mean(tables, axis=0), run, names)
    for level, per_label in out["levels"].items():
        for j, name in enumerate(names):
            for point in per_label.get(name, {}).values():
                if point is None:
                    continue
                point["threshold_oof"] = point["threshold"]
                point["threshold"] = ensemble_threshold(
                    point["threshold_oof"], [m[level][:, j] for m in member_levels], ensemble_levels[level][:, j]
                )
    out["deployed"] = {
        "scale": f"mean of {len(members)} fold models' test predictions",
        "members": sorted(members),
        "how": "rank-matched: flags the fraction of the test images the fold models flag at threshold_oof",
        "n_images": len(rows),
    }
    return out
