"""Tests for the neighbour-information diagnostic that the stacking report prints beside the stackers' scores."""

from __future__ import annotations

import numpy as np
import pandas as pd

from src.constants import ID_COL, LABELS
from src.metric import weighted_log_loss
from src.stack.cv import level2_splits
from src.stack.diagnostics import information_markdown, linear_stack, neighbour_information, residual_lag1_correlation
from src.stack.features import assemble_series
from tests.test_stack import _fake_level2


def _table(n_series: int, length: int) -> pd.DataFrame:
    rows = [{ID_COL: f"I{s:03d}_{t:02d}", "PatientID": f"P{s}", "StudyInstanceUID": f"S{s}",
             "SeriesInstanceUID": f"R{s}", "position": -5.0 * t} for s in range(n_series) for t in range(length)]
    return assemble_series(pd.DataFrame(rows))


def test_residual_correlation_tells_whole_series_errors_from_slice_noise():
    table = _table(60, 10)
    rng = np.random.RandomState(0)
    y = np.zeros((len(table), len(LABELS)))
    noise = rng.uniform(0, 1, size=y.shape)
    assert max(abs(v) for v in residual_lag1_correlation(table, y, noise).values()) < 0.15
    # One error per series, the same on all its slices: within-series pairs agree exactly, so the correlation is
    # 1; pairs across a series boundary would differ and pull it below 1.
    per_series = rng.uniform(0, 1, size=(60, len(LABELS)))[table["series_id"].to_numpy()]
    assert min(residual_lag1_correlation(table, y, per_series).values()) > 0.999
    constant = np.full_like(y, 0.3)
    assert np.isnan(residual_lag1_correlation(table, y, constant)["any"])


def test_linear_stack_gains_only_where_neighbours_carry_information():
    table, _, y = _fake_level2(seed=3)  # CNN logit = smooth signal + independent per-slice noise
    cnn = table[list(LABELS)].to_numpy()
    _, splits = level2_splits(table["fold"].to_numpy(), table["PatientID"].to_numpy(), 5)
    info = neighbour_information(table, y, cnn, splits)
    assert info["linear_cv_cut_%"] > 10 and info["in_sample_ceiling_cut_%"] >= info["linear_cv_cut_%"]
    assert "ceiling, not a result" in information_markdown(info)

    # Calibrated probabilities with labels drawn slice by slice: the neighbours know nothing more.
    rng = np.random.RandomState(1)
    truth = rng.uniform(0.02, 0.5, size=cnn.shape)
    labels = (rng.uniform(size=cnn.shape) < truth).astype(float)
    crossed = linear_stack(table, labels, truth, splits)
    assert weighted_log_loss(labels, crossed) > 0.99 * weighted_log_loss(labels, truth)


def test_linear_stack_cross_fit_never_scores_its_own_rows():
    table, _, y = _fake_level2(seed=4)
    cnn = table[list(LABELS)].to_numpy()
    shuffled = y[np.random.RandomState(0).permutation(len(y))]
    _, splits = level2_splits(table["fold"].to_numpy(), table["PatientID"].to_numpy(), 5)
    crossed = linear_stack(table, shuffled, cnn, splits)
    prior = np.tile(shuffled.mean(0), (len(y), 1))
    # Shuffled labels: fit on other rows it can do no better than the base rate; fit on its own rows it beats it,
    # so a cross-fit that leaked its own rows would fail the first assert.
    assert weighted_log_loss(shuffled, crossed) > weighted_log_loss(shuffled, prior)
    assert weighted_log_loss(shuffled, linear_stack(table, shuffled, cnn)) < weighted_log_loss(shuffled, prior)
