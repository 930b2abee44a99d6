"""Scores with a known distribution: K fold models, their OOF rows and a fresh labelled test set.

The real OOF cannot tell whether a promised precision holds (its labels chose the threshold). Here the truth is
known: the fresh test set is as large as wanted and labelled, so the precision a threshold realises on unseen data
can be measured and compared with what the report promises (tests/test_operating_points.py,
bench/operating_points.py). Fold models differ in scale and offset, like models stopped at different epochs, so
their mean is shrunk against any single one: the shift between OOF and test thresholds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from src.constants import FOLD_COL, ID_COL, PATIENT, SERIES, SLICE_INDEX, STUDY

LABEL = "any"
SCALES = (0.9, 0.95, 1.0, 1.05, 1.1)  # per fold model: the spread of its logits
OFFSET = -2.5  # logit at latent 0: negatives sit low, as in a 14%-positive label


def _studies(rng: np.random.Generator, n_studies: int, slices: int, prevalence: float, tag: str) -> pd.DataFrame:
    """Slices of n_studies one-series studies (one patient each); a positive study has one run of positive slices."""
    study = np.repeat(np.arange(n_studies), slices)
    k = np.tile(np.arange(slices), n_studies)
    positive = rng.random(n_studies) < prevalence
    start = rng.integers(0, slices - 1, n_studies)
    length = rng.integers(2, slices + 1, n_studies)
    y = positive[study] & (k >= start[study]) & (k < start[study] + length[study])
    # A study-level effect makes slices of a study correlated, as in CT: the reason CIs resample studies.
    latent = 3.5 * y + rng.normal(0, 0.6, n_studies)[study] + rng.normal(0, 1, len(y))
    names = np.array([f"{tag}{s:05d}" for s in range(n_studies)])
    return pd.DataFrame({
        ID_COL: [f"ID_{tag}{s:05d}_{i:02d}" for s, i in zip(study, k)],
        PATIENT: names[study], STUDY: names[study], SERIES: names[study], SLICE_INDEX: k,
        f"true_{LABEL}": y.astype(np.int8), "latent": latent,
    })


def _member(latent: np.ndarray, fold: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Fold model `fold`'s probability: its own scale and noise on the shared latent score."""
    logit = SCALES[fold % len(SCALES)] * (latent + rng.normal(0, noise, len(latent)) - 1.0) + OFFSET
    return 1.0 / (1.0 + np.exp(-logit))


def simulate_cv(n_studies: int = 400, n_test_studies: int = 4000, slices: int = 8, prevalence: float = 0.15,
                n_folds: int = 5, noise: float = 0.6, seed: int = 0) -> tuple[pd.DataFrame, dict[int, pd.DataFrame],
                                                                              pd.DataFrame]:
    """(oof, test members, test truth). oof: one row per slice with fold, study keys, true_any and model fold's
    `any`; members: fold -> ID + `any` of that fold model on every test slice; truth: test keys and true_any."""
    rng = np.random.default_rng(seed)
    oof = _studies(rng, n_studies, slices, prevalence, "S")
    oof[FOLD_COL] = rng.permutation(n_studies)[pd.factorize(oof[STUDY])[0]] % n_folds
    oof[LABEL] = 0.0
    for fold in range(n_folds):
        rows = oof[FOLD_COL].to_numpy() == fold
        oof.loc[rows, LABEL] = _member(oof.loc[rows, "latent"].to_numpy(), fold, rng, noise)
    test = _studies(rng, n_test_studies, slices, prevalence, "T")
    members = {f: pd.DataFrame({ID_COL: test[ID_COL], LABEL: _member(test["latent"].to_numpy(), f, rng, noise)})
               for f in range(n_folds)}
    return oof.drop(columns="latent"), members, test.drop(columns="latent")
