"""python -m src.evaluate.compare: paired study bootstrap of experiments on their common OOF rows."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from src.constants import ID_COL, LABELS, STUDY
from src.errors import InputError
from src.evaluate import compare
from src.metric import auc_from_ranks, group_weighted_aucs, per_row_weighted_log_loss, weighted_log_loss


def _meta(n_studies: int = 30, per_study: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        bleed = s % 2 == 0
        for k in range(per_study):
            labels = {c: 0 for c in LABELS}
            if bleed and k in (3, 4, 5):
                labels.update({"any": 1, LABELS[int(rng.integers(0, 5))]: 1})
            rows.append({ID_COL: f"ID_{s}_{k}", STUDY: f"S{s}", **labels})
    return pd.DataFrame(rows)


def _pred(meta: pd.DataFrame, skill: float, seed: int) -> pd.DataFrame:
    """Probabilities that lean towards the labels by `skill` (0 = noise, 1 = the labels themselves)."""
    rng = np.random.default_rng(seed)
    y = meta[list(LABELS)].to_numpy(dtype=float)
    p = np.clip(skill * y + (1 - skill) * rng.uniform(0, 1, y.shape), 0.01, 0.99)
    return pd.DataFrame(p, columns=list(LABELS)).assign(**{ID_COL: meta[ID_COL].to_numpy()})


def test_points_are_the_metric_and_a_better_model_wins_its_resamples():
    meta = _meta()
    good, noise = _pred(meta, 0.8, 1), _pred(meta, 0.0, 2)
    result = compare.compare({"noise": noise, "good": good}, meta, n_boot=300)
    scores = {r["experiment"]: r for r in result["scores"]}
    y = meta[list(LABELS)].to_numpy()
    assert scores["good"]["weighted_log_loss"] == pytest.approx(weighted_log_loss(y, good[list(LABELS)].to_numpy()))
    assert scores["noise"]["slice_auc_any"] == pytest.approx(roc_auc_score(meta["any"], noise["any"]))
    study_y = meta.groupby(STUDY)["any"].max()
    study_p = good.assign(**{STUDY: meta[STUDY]}).groupby(STUDY)["any"].max()
    assert scores["good"]["study_auc_any"] == pytest.approx(roc_auc_score(study_y, study_p.loc[study_y.index]))
    for metric in compare.METRICS:
        lo, hi = scores["noise"][f"{metric}_ci95"]
        assert lo <= scores["noise"][metric] <= hi and hi > lo
    (diff,) = result["differences"]
    assert diff["experiment"] == "good" and diff["against"] == "noise"
    assert diff["weighted_log_loss_diff"] < 0 and diff["slice_auc_any_diff"] > 0
    assert all(diff[f"{m}_p_better"] > 0.95 for m in compare.METRICS)
    assert result["n_studies"] == 30 and result["n_positive_studies"] == 15


def test_the_same_predictions_differ_by_nothing_and_are_never_better():
    meta = _meta()
    pred = _pred(meta, 0.5, 3)
    (diff,) = compare.compare({"a": pred, "b": pred.copy()}, meta, n_boot=100)["differences"]
    for metric in compare.METRICS:
        assert diff[f"{metric}_diff"] == 0 and diff[f"{metric}_diff_ci95"] == (0.0, 0.0)
        assert diff[f"{metric}_p_better"] == 0.0


def test_only_rows_every_experiment_predicted_are_scored():
    meta = _meta()
    full, part = _pred(meta, 0.5, 4), _pred(meta, 0.5, 5).iloc[: 8 * 10]  # 10 studies of 30
    result = compare.compare({"full": full, "part": part}, meta, n_boot=50)
    assert result["n_images"] == 80 and result["n_studies"] == 10
    with pytest.raises(InputError, match="no OOF image is predicted by all"):
        compare.compare({"a": full.iloc[:8], "b": full.iloc[8:16]}, meta, n_boot=10)
    with pytest.raises(InputError, match="at least two"):
        compare.compare({"a": full}, meta)
    with pytest.raises(InputError, match="not in the training metadata"):
        compare.compare({"a": full, "b": full}, meta.iloc[1:], n_boot=10)


def test_group_weighted_aucs_match_explicit_row_weights_in_any_chunking():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.uniform(0, 1, 200), 1)  # ties, which count half
    codes = rng.integers(0, 25, 200)
    counts = rng.integers(0, 3, (7, 25)).astype(np.float32)
    expected = auc_from_ranks(y, score, counts[:, codes])
    assert np.allclose(group_weighted_aucs(y, score, codes, counts), expected, equal_nan=True)
    assert np.allclose(group_weighted_aucs(y, score, codes, counts, max_cells=450), expected, equal_nan=True)
    assert group_weighted_aucs(y, score, codes, np.ones((1, 25)))[0] == pytest.approx(roc_auc_score(y, score))


def test_per_row_losses_average_to_the_metric():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, (50, 6))
    p = rng.uniform(0, 1, (50, 6))
    assert per_row_weighted_log_loss(y, p).mean() == pytest.approx(weighted_log_loss(y, p))


def test_cli_writes_markdown_and_json(tmp_path, monkeypatch):
    import src.data.metadata

    meta = _meta()
    for name, skill in (("base", 0.3), ("new", 0.6)):
        folder = tmp_path / "oof" / name
        folder.mkdir(parents=True)
        _pred(meta, skill, 8).to_csv(folder / "fold0_valid.csv", index=False)
    monkeypatch.setattr(src.data.metadata, "load_metadata", lambda data_dir, split: meta)
    out = tmp_path / "cmp"
    argv = ["--pred", str(tmp_path / "oof" / "base"), str(tmp_path / "oof" / "new"), "--n-boot", "50", "--out",
            str(out), "--data", str(tmp_path)]
    assert compare.main(argv) == 0
    saved = json.loads((out / "compare.json").read_text())
    assert [r["experiment"] for r in saved["scores"]] == ["base", "new"]
    assert "| new | base |" in (out / "compare.md").read_text()
    with pytest.raises(InputError, match="not found"):
        compare.main(["--pred", str(tmp_path / "nope"), str(tmp_path / "oof" / "new")])
    with pytest.raises(InputError, match="twice"):
        compare.main(["--pred", str(tmp_path / "oof" / "new"), str(tmp_path / "oof" / "new")])
    # A copy of an experiment's earlier predictions under the same folder name: labelled by the paths given.
    earlier = tmp_path / "before" / "new"
    earlier.mkdir(parents=True)
    _pred(meta, 0.5, 8).to_csv(earlier / "fold0_valid.csv", index=False)
    assert compare.main(["--pred", str(earlier), str(tmp_path / "oof" / "new"), "--n-boot", "20", "--out", str(out),
                         "--data", str(tmp_path)]) == 0
    saved = json.loads((out / "compare.json").read_text())
    assert [r["experiment"] for r in saved["scores"]] == [str(earlier), str(tmp_path / "oof" / "new")]


def test_volumes_are_compared_when_every_experiment_has_one():
    """Study volumes over positive studies, paired: exact volumes beat doubled ones on MdAPE in every resample and
    tie on Spearman (a tie is not better); a classifier's OOF (no volume) drops the volume columns."""
    from src.constants import SERIES_KEYS, VOLUME_COL

    meta = _meta(n_studies=12, per_study=4)
    meta = meta.assign(**{k: meta[STUDY] for k in SERIES_KEYS}, position=np.tile(np.arange(4) * 5.0, 12))
    rng = np.random.default_rng(3)
    true_mm3 = np.where(meta["any"] > 0, rng.uniform(100, 5000, len(meta)), 0.0)
    true = pd.DataFrame({ID_COL: meta[ID_COL], VOLUME_COL: true_mm3})
    exact = _pred(meta, 0.5, 1).assign(**{VOLUME_COL: true_mm3})
    doubled = _pred(meta, 0.5, 1).assign(**{VOLUME_COL: 2 * true_mm3})
    result = compare.compare({"doubled": doubled, "exact": exact}, meta, n_boot=200, true=true)
    assert result["n_positive_volume_studies"] == 6
    scores = {r["experiment"]: r for r in result["scores"]}
    assert scores["doubled"]["volume_mdape_percent"] == pytest.approx(100.0)
    assert scores["exact"]["volume_mdape_percent"] == pytest.approx(0.0)
    assert scores["exact"]["volume_spearman"] == pytest.approx(1.0)
    diff = result["differences"][0]
    assert diff["volume_mdape_percent_diff"] == pytest.approx(-100.0)
    assert diff["volume_mdape_percent_p_better"] == 1.0
    assert diff["volume_spearman_p_better"] == 0.0
    assert "volume_mdape_percent" in compare.as_markdown(result)
    # Classification figures are the same with or without the volume comparison.
    plain = compare.compare({"doubled": doubled, "exact": exact.drop(columns=VOLUME_COL)}, meta, n_boot=200,
                            true=true)
    assert plain["metrics"] == list(compare.METRICS) and plain["n_positive_volume_studies"] == 0
    assert plain["scores"][0]["weighted_log_loss"] == scores["doubled"]["weighted_log_loss"]
    assert "volume" not in compare.as_markdown(plain)
