"""Cross-fitted operating points and deployed thresholds, checked on scores whose truth is known."""

import numpy as np
import pandas as pd
import pytest

from src.constants import FOLD_COL, ID_COL, SERIES, SLICE_INDEX, STUDY
from src.errors import InputError
from src.evaluate.crossfit import heldout_flags, heldout_parts, heldout_tables, rates
from src.evaluate.deploy import deploy_thresholds, ensemble_threshold
from src.evaluate.simulate import LABEL, simulate_cv
from src.evaluate.thresholds import (
    aggregate_studies,
    apply_thresholds,
    level_tables,
    threshold_tables,
    thresholds_to_dict,
)

TARGET = 0.8
SEEDS = range(12)


def _one_run(seed: int, prevalence: float):
    oof, members, test = simulate_cv(n_studies=300, n_test_studies=3000, prevalence=prevalence, seed=seed)
    y, s = oof[f"true_{LABEL}"].to_numpy(), oof[LABEL].to_numpy()
    _, part = heldout_parts(oof[FOLD_COL].to_numpy(), oof["PatientID"].to_numpy())
    chosen = threshold_tables(y, s, [TARGET], [LABEL]).iloc[0]
    held = heldout_tables(y, s, part, oof[STUDY].to_numpy(), [TARGET], [LABEL], n_boot=300, seed=seed).iloc[0]
    scores = np.stack([m[LABEL].to_numpy() for m in members.values()])
    y_test = test[f"true_{LABEL}"].to_numpy().astype(bool)
    return chosen, held, scores, y_test


def _precision_recall(flags: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    tp = (flags & y).sum()
    return tp / flags.sum(), tp / (y.sum() * (flags.size // y.size))


def test_heldout_precision_is_honest_and_in_sample_is_optimistic():
    inside_target = inside_truth = 0
    in_sample, held_out = [], []
    for seed in SEEDS:
        chosen, held, members, y_test = _one_run(seed, prevalence=0.15)
        assert chosen.precision >= TARGET
        in_sample.append(chosen.precision)
        held_out.append(held.precision)
        inside_target += held.precision_lo <= TARGET <= held.precision_hi
        # The truth: a fold model at the chosen threshold on 3000 fresh studies it never saw.
        truth, _ = _precision_recall(members >= chosen.threshold, np.tile(y_test, (len(members), 1)))
        inside_truth += held.precision_lo <= truth <= held.precision_hi
    assert inside_target >= 10 and inside_truth >= 10
    assert np.mean(in_sample) > np.mean(held_out) + 0.01


def test_small_class_in_sample_precision_is_far_more_optimistic():
    gaps = []
    for seed in SEEDS:
        chosen, held, _, _ = _one_run(seed, prevalence=0.03)
        gaps.append(chosen.precision - held.precision)
    assert np.mean(gaps) > 0.1


def test_deployed_threshold_holds_for_the_fold_ensemble():
    for seed in SEEDS:
        chosen, held, members, y_test = _one_run(seed, prevalence=0.15)
        ensemble = members.mean(axis=0)
        deployed = ensemble_threshold(chosen.threshold, list(members), ensemble)
        precision, recall = _precision_recall(ensemble >= deployed, y_test)
        _, member_recall = _precision_recall(members >= chosen.threshold, np.tile(y_test, (len(members), 1)))
        # Never below the promise, and no recall lost to the ensemble's shrunk probabilities.
        assert precision >= held.precision_lo
        assert recall >= member_recall


def test_ensemble_threshold_flags_the_members_mean_fraction():
    rng = np.random.default_rng(0)
    members = [rng.random(1000) ** k for k in (1, 2, 3)]
    ensemble = np.mean(members, axis=0)
    t = ensemble_threshold(0.5, members, ensemble)
    assert (ensemble >= t).sum() == round(np.mean([(m >= 0.5).mean() for m in members]) * 1000)
    assert not (ensemble >= ensemble_threshold(1.5, members, ensemble)).any()


def test_heldout_flags_never_see_their_own_labels():
    rng = np.random.default_rng(1)
    y = rng.random(600) < 0.3
    s = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    part = np.arange(600) % 3
    flags, reached = heldout_flags(y, s, part, [0.7, 0.9])
    shuffled = y.copy()
    shuffled[part == 1] = rng.permutation(y[part == 1])
    again, _ = heldout_flags(shuffled, s, part, [0.7, 0.9])
    np.testing.assert_array_equal(flags[part == 1], again[part == 1])  # part 1's threshold ignores part 1's labels
    assert not np.array_equal(flags[part == 0], again[part == 0])  # the others' thresholds do depend on it
    assert reached.tolist() == [3, 3]


def test_heldout_parts_folds_or_patients():
    how, part = heldout_parts(np.array([2, 0, 2, 0]), np.array(["a", "b", "c", "d"]))
    assert part.tolist() == [1, 0, 1, 0] and "fold" in how
    patients = np.repeat(np.arange(20), 3).astype(str)
    how, part = heldout_parts(np.zeros(60), patients)
    assert "patient-grouped 5-part" in how
    assert all(len(set(part[patients == p])) == 1 for p in set(patients))  # no patient in two parts
    assert sorted(np.bincount(part)) == [12] * 5
    with pytest.raises(InputError, match="at least 2 patients"):
        heldout_parts(np.zeros(3), np.array(["a"] * 3))


def test_rates_and_study_ci():
    r = rates(8, 2, 4, 86)
    assert (r["precision"], r["recall"], r["specificity"]) == (0.8, 8 / 12, 86 / 88)
    assert r["f1"] == pytest.approx(2 * 0.8 * (2 / 3) / (0.8 + 2 / 3))
    y = np.array([1, 1, 0, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3])
    table = heldout_tables(y, s, np.array([0, 0, 0, 1, 1, 1]), np.array(["A"] * 6), [0.9], ["any"], n_boot=50)
    row = table.iloc[0]
    assert row.precision == row.precision_lo == row.precision_hi == 1.0  # one study: every resample is the same


def _frame(n_studies: int = 60):
    oof, members, test = simulate_cv(n_studies=n_studies, n_test_studies=40, seed=3)
    return oof, members, test


def test_deploy_thresholds_keeps_the_json_shape():
    oof, members, test = _frame()
    y, p = oof[[f"true_{LABEL}"]].to_numpy(), oof[[LABEL]].to_numpy()
    studies = aggregate_studies(oof, p, y, names=[LABEL])
    saved = thresholds_to_dict(level_tables(y, p, studies, [0.7], names=[LABEL]))
    deployed = deploy_thresholds(saved, members, test[[ID_COL, STUDY, SERIES, SLICE_INDEX]], names=[LABEL])
    assert deployed["precisions"] == saved["precisions"] and deployed["deployed"]["members"] == list(range(5))
    for level, labels in saved["levels"].items():
        point, moved = labels[LABEL]["0.7"], deployed["levels"][level][LABEL]["0.7"]
        assert moved["threshold_oof"] == point["threshold"] and moved["precision"] == point["precision"]
    short = {**members, 1: members[1].iloc[1:]}
    with pytest.raises(InputError, match=r"fold1_test\.csv: no prediction for 1 test image"):
        deploy_thresholds(saved, short, test, names=[LABEL])
    one = deploy_thresholds(saved, {0: members[0]}, test, names=[LABEL])
    assert one["levels"] == saved["levels"] and "one fold model" in one["deployed"]["scale"]
    ens = pd.concat(members.values()).groupby(ID_COL, sort=False)[LABEL].mean()
    images, _ = apply_thresholds(test, ens.loc[test[ID_COL]].to_numpy()[:, None], deployed, names=[LABEL])
    assert images[f"{LABEL}_p70"].mean() == pytest.approx(
        np.mean([(m[LABEL] >= saved["levels"]["slice"][LABEL]["0.7"]["threshold"]).mean() for m in members.values()]),
        abs=1 / len(test),
    )
