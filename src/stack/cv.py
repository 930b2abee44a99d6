"""Fold-safe level-2 cross-fitting: which rows each stacker model is fit on and which it predicts."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import GroupKFold
from tqdm import tqdm

from src.constants import LABELS
from src.errors import InputError


def level2_splits(folds: np.ndarray, groups: np.ndarray, n_folds: int, n_inner: int = 5,
                  seed: int = 0) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(mode, [(fit rows, predicted rows)]). All n_folds present: leave one CNN fold out, on the same folds.
    Otherwise: patient-grouped K-fold inside the available OOF rows. Every row is predicted exactly once."""
    present = sorted(np.unique(folds).tolist())
    if present == list(range(n_folds)) and n_folds >= 2:
        return "same_folds", [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in present]
    n_groups = len(np.unique(groups))
    # Each fit set needs >= 2 patients: the stackers hold one out for early stopping.
    if n_groups < 3:
        raise InputError(f"the available OOF holds {n_groups} patient(s); stacking needs at least 3")
    splitter = GroupKFold(n_splits=min(n_inner, n_groups), shuffle=True, random_state=seed)
    splits = [(tr, va) for tr, va in splitter.split(folds, groups=groups)]
    fewest = min(len(np.unique(groups[tr])) for tr, _ in splits)
    if fewest < 2:
        raise InputError(f"the available OOF holds {n_groups} patients: with {len(splits)} inner folds a fit set "
                         f"keeps {fewest}; stacking needs 2 per fit set (raise stack.n_inner)")
    return "inner_group_cv", splits


@dataclass
class CVResult:
    oof: np.ndarray
    test: np.ndarray | None
    log: list[dict] = field(default_factory=list)  # per model: fit rows and predicted rows (row numbers)
    models: list = field(default_factory=list)  # the fitted split models, kept for reuse on new series


def cross_fit(splits: list[tuple[np.ndarray, np.ndarray]], n_rows: int, fit: Callable[[np.ndarray], object],
              predict: Callable[[object, np.ndarray], np.ndarray],
              predict_test: Callable[[object], np.ndarray] | None = None, desc: str = "stack",
              executor: Executor | None = None) -> CVResult:
    """Fit one model per split on its fit rows, predict its held-out rows; test = mean over the split models
    (each fit on OOF rows only, so the test path never sees a model fit on what it scores). With `executor` the
    splits fit side by side (each model its own; the results are gathered in split order, as without)."""
    for fit_rows, pred_rows in splits:
        if np.intersect1d(fit_rows, pred_rows).size:
            raise RuntimeError("a split fits and predicts the same row")

    def one(fit_rows: np.ndarray, pred_rows: np.ndarray) -> tuple[object, np.ndarray, np.ndarray | None]:
        model = fit(fit_rows)
        return model, predict(model, pred_rows), None if predict_test is None else predict_test(model)

    if executor is None:
        done = (one(*split) for split in splits)
    else:
        futures = [executor.submit(one, *split) for split in splits]
        done = (future.result() for future in futures)
    oof = np.full((n_rows, len(LABELS)), np.nan)
    tests, log, models = [], [], []
    for (fit_rows, pred_rows), (model, pred, test) in zip(splits, tqdm(done, total=len(splits), desc=desc,
                                                                         leave=False)):
        oof[pred_rows] = pred
        if test is not None:
            tests.append(test)
        log.append({"fit_rows": fit_rows, "pred_rows": pred_rows})
        models.append(model)
    if np.isnan(oof).any():
        raise RuntimeError("some OOF rows were never predicted")
    return CVResult(oof, np.mean(tests, axis=0) if tests else None, log, models)
