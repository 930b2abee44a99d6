"""The competition metric, AUC (weighted, tied), the study-level bootstrap and the learned vs derived `any`."""

import math
import time

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from src.constants import LABEL_WEIGHTS, LABELS
from src.evaluate.any_variants import any_comparison, derived_any
from src.metric import (
    auc_from_ranks,
    bootstrap_auc,
    per_class_log_loss,
    score_table,
    weighted_log_loss,
)


def test_weighted_log_loss_by_hand():
    y = np.array([[0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    p = np.array([[0.1, 0.8, 0.2, 0.1, 0.1, 0.9], [0.2, 0.3, 0.1, 0.1, 0.4, 0.25]])
    per_label = [
        -(math.log(0.9) + math.log(0.8)) / 2,
        -(math.log(0.8) + math.log(0.7)) / 2,
        -(math.log(0.8) + math.log(0.9)) / 2,
        -(math.log(0.9) + math.log(0.9)) / 2,
        -(math.log(0.9) + math.log(0.6)) / 2,
        -(math.log(0.9) + math.log(0.75)) / 2,
    ]
    expected = (sum(per_label[:5]) + 2 * per_label[5]) / 7
    assert np.allclose(per_class_log_loss(y, p), per_label)
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_weighted_log_loss_matches_sklearn_with_sample_weights():
    rng = np.random.default_rng(3)
    y = (rng.random((200, 6)) < 0.2).astype(float)
    p = rng.random((200, 6))
    weights = np.tile(LABEL_WEIGHTS, (200, 1))
    expected = log_loss(y.ravel(), p.ravel(), sample_weight=weights.ravel())
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-10)


def test_confident_miss_is_clipped_at_kaggle_value():
    y = np.zeros((1, 6))
    y[0, 5] = 1
    p = np.zeros((1, 6))
    assert weighted_log_loss(y, p) == pytest.approx(2 * -math.log(1e-15) / 7, rel=1e-9)
    assert score_table(y, np.full((1, 6), 0.5))["weighted_log_loss"] == pytest.approx(math.log(2))


def test_auc_handles_ties_and_weights_like_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = rng.integers(0, 10, 300) / 10  # many ties
    assert auc_from_ranks(y, s)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    w = rng.integers(0, 4, size=(3, 300))
    got = auc_from_ranks(y, s, w)
    for b in range(3):
        assert got[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-9)
        # Integer weights are row multiplicities: the same as repeating rows.
        rep = np.repeat(np.arange(300), w[b])
        assert got[b] == pytest.approx(roc_auc_score(y[rep], s[rep]), abs=1e-9)
    assert np.isnan(auc_from_ranks(np.zeros(5), np.arange(5.0))[0])


def _clustered(n_studies=40, per_study=30, seed=1):
    """Every slice of a study shares its label and (almost) its score: the study is the unit of information."""
    rng = np.random.default_rng(seed)
    label = np.arange(n_studies) % 2
    score = rng.normal(label * 1.0, 1.0)
    groups = np.repeat(np.arange(n_studies), per_study)
    y = label[groups]
    s = score[groups] + rng.normal(0, 0.01, len(groups))
    return y, s, groups


def test_bootstrap_resamples_studies_not_slices():
    y, s, groups = _clustered()
    by_study = bootstrap_auc(y, s, groups=groups, n_boot=400, seed=0, names=("x",)).iloc[0]
    by_slice = bootstrap_auc(y, s, groups=None, n_boot=400, seed=0, names=("x",)).iloc[0]
    assert by_study["auc"] == pytest.approx(roc_auc_score(y, s))
    assert by_study["n_groups"] == 40 and by_slice["n_groups"] == 1200
    width_study = by_study["ci_high"] - by_study["ci_low"]
    width_slice = by_slice["ci_high"] - by_slice["ci_low"]
    # 40 independent studies vs 1200 "independent" slices: about sqrt(30) ~ 5x apart.
    assert width_study > 3 * width_slice
    assert by_study["ci_low"] < by_study["auc"] < by_study["ci_high"]


def test_bootstrap_is_seeded_and_paired_across_classes():
    y, s, groups = _clustered(seed=2)
    y2 = np.stack([y, y], axis=1)
    s2 = np.stack([s, s], axis=1)
    a = bootstrap_auc(y2, s2, groups, n_boot=100, seed=7, names=("a", "b"))
    b = bootstrap_auc(y2, s2, groups, n_boot=100, seed=7, names=("a", "b"), max_cells=5000)  # other chunking
    c = bootstrap_auc(y2, s2, groups, n_boot=100, seed=8, names=("a", "b"))
    assert a.equals(b)
    assert a.loc[0, "ci_low"] == a.loc[1, "ci_low"]  # identical columns see identical resamples
    assert a.loc[0, "ci_low"] != c.loc[0, "ci_low"]


def test_bootstrap_separable_and_single_class():
    y = np.array([0, 0, 1, 1] * 10)
    s = y + 0.1 * np.arange(40) / 40
    groups = np.repeat(np.arange(10), 4)
    two = np.stack([y, np.zeros(40)], axis=1)
    out = bootstrap_auc(two, np.stack([s, s], axis=1), groups, n_boot=50, seed=0, names=("sep", "empty"))
    assert out.loc[0, ["auc", "ci_low", "ci_high"]].tolist() == [1.0, 1.0, 1.0]
    assert out.loc[0, "n_boot_valid"] == 50
    assert np.isnan(out.loc[1, "auc"]) and out.loc[1, "n_boot_valid"] == 0


def test_bootstrap_1000_resamples_on_4k_slices_is_fast():
    rng = np.random.default_rng(0)
    y = (rng.random((4000, 6)) < 0.15).astype(float)
    p = np.clip(0.3 * y + rng.random((4000, 6)), 0, 1)
    groups = np.repeat(np.arange(130), 31)[:4000]
    start = time.perf_counter()
    out = bootstrap_auc(y, p, groups, n_boot=1000, seed=0)
    assert time.perf_counter() - start < 20  # ~0.4 s on one core; generous for a shared machine
    assert list(out["label"]) == list(LABELS)
    assert (out["ci_low"] < out["auc"]).all() and (out["auc"] < out["ci_high"]).all()


def test_derived_any_by_hand():
    p = np.array([[0.1, 0.2, 0.0, 0.0, 0.0, 0.7]])
    d = derived_any(p)
    assert d["learned"][0] == 0.7
    assert d["max_subtypes"][0] == pytest.approx(0.2)
    assert d["noisy_or"][0] == pytest.approx(1 - 0.9 * 0.8)


def test_any_comparison_prefers_the_better_score():
    y = np.zeros((8, 6))
    y[:4, 5] = 1
    y[:4, 0] = 1
    p = np.full((8, 6), 0.05)
    p[:, 5] = [0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1]  # learned any: perfect
    p[:, 0] = [0.9, 0.2, 0.9, 0.2, 0.1, 0.8, 0.1, 0.1]  # subtypes: one positive ranked below a negative
    table = any_comparison(y, p, precision=0.7).set_index("any_variant")
    assert table.loc["learned", "auc"] == 1.0
    assert table.loc["learned", "recall"] == 1.0 and table.loc["learned", "threshold"] == pytest.approx(0.9)
    assert table.loc["max_subtypes", "auc"] < 1.0
    assert table.loc["learned", "log_loss"] == pytest.approx(-math.log(0.9))
    assert table.loc["noisy_or", "log_loss"] > table.loc["learned", "log_loss"]
