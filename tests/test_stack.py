"""Tests for the level-2 stackers: series assembly, neighbour features, estimator API, leakage, GRU, end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from src.constants import FOLD_COL, ID_COL, LABELS, VOLUME_COL
from src.errors import InputError
from src.metric import weighted_log_loss
from src.stack.__main__ import main
from src.stack.bundle import load_stackers, stack_model_dir
from src.stack.compare import compare_predictions
from src.stack.cv import cross_fit, level2_splits
from src.stack.features import (
    SERIES_ID,
    assemble_series,
    join_series,
    neighbour_features,
    sequence_inputs,
)
from src.stack.gru import GRUStacker, SliceSequenceNet, length_mask, pad_batch, reverse_sequences, series_segments
from src.stack.lgbm import LGBMStacker
from src.stack.run import run_stack

FAST_LGBM = {"n_estimators": 200, "learning_rate": 0.1, "early_stopping_rounds": 20, "n_jobs": 1, "n_seeds": 2}
FAST_GRU = {"epochs": 6, "hidden_size": 16, "proj_size": 16, "patience": 3, "n_seeds": 2}


def _series(ids, positions, patient="P1", study="S1", series="R1", probs=None):
    df = pd.DataFrame({ID_COL: ids, "PatientID": patient, "StudyInstanceUID": study, "SeriesInstanceUID": series,
                       "position": positions})
    for j, name in enumerate(LABELS):
        df[name] = probs[:, j] if probs is not None else 0.0
    return df


def fake_pipeline(n_patients: int = 40, n_folds: int = 5, seed: int = 0, emb_dim: int = 8, noise: float = 1.2):
    """Train/test metadata with labels, and CNN-like OOF/test predictions and embeddings.

    Each series carries a smooth latent blood signal per subtype (a Gaussian bump along the slices); labels are
    the signal thresholded, the CNN's logit is the signal plus independent per-slice noise, so a stacker that
    averages neighbours can recover what a single slice loses.
    """
    rng = np.random.RandomState(seed)

    def split_tables(prefix: str, n: int):
        rows, latent = [], []
        for p in range(n):
            length = rng.randint(12, 30)
            pos = 100.0 - 5.0 * np.arange(length) + rng.uniform(-50, 50)
            sig = np.zeros((length, 5))
            for s in range(5):
                if rng.rand() < 0.15:  # ~55% of series bleed; `any` on ~20% of slices
                    centre, width = rng.uniform(0, length), rng.uniform(1.5, 4.0)
                    sig[:, s] = 4.0 * np.exp(-((np.arange(length) - centre) ** 2) / (2 * width**2))
            for t in rng.permutation(length):  # rows arrive unordered, as in the metadata's raw scan
                rows.append({ID_COL: f"ID_{prefix}{p:03d}{t:02d}", "PatientID": f"{prefix}P{p}",
                             "StudyInstanceUID": f"{prefix}S{p}", "SeriesInstanceUID": f"{prefix}R{p}",
                             "position": pos[t], "_sig": sig[t]})
        meta = pd.DataFrame(rows)
        sig = np.stack(meta.pop("_sig").to_numpy())
        lab = (sig > 1.0).astype(float)
        for j, name in enumerate(LABELS[:5]):
            meta[name] = lab[:, j]
        meta["any"] = lab.max(1)
        latent = np.concatenate([sig, sig.max(1, keepdims=True)], axis=1)
        return meta, latent

    meta_train, lat_train = split_tables("tr", n_patients)
    meta_test, lat_test = split_tables("te", max(n_patients // 4, 4))
    meta_test = meta_test.drop(columns=list(LABELS))
    fold_of = {p: i % n_folds for i, p in enumerate(rng.permutation(meta_train["PatientID"].unique()))}
    proj = rng.normal(size=(6, emb_dim))

    def predict(meta, latent, fold):
        logit = 2.0 * (latent - 1.0) + rng.normal(scale=noise * 2.0, size=latent.shape) - 1.0
        df = pd.DataFrame(1 / (1 + np.exp(-logit)), columns=list(LABELS))
        df.insert(0, FOLD_COL, fold)
        df.insert(0, ID_COL, meta[ID_COL].to_numpy())
        df[VOLUME_COL] = np.clip(latent[:, 5] * 500 + rng.normal(scale=300, size=len(df)), 0, None)
        emb = (latent + rng.normal(scale=noise, size=latent.shape)) @ proj
        return df, emb.astype(np.float16)

    folds = meta_train["PatientID"].map(fold_of).to_numpy()
    valid = {f: predict(meta_train[folds == f], lat_train[folds == f], f) for f in range(n_folds)}
    test = {f: predict(meta_test, lat_test, f) for f in range(n_folds)}
    return meta_train, meta_test, valid, test


def write_oof(root, exp, valid, test, folds=None, with_emb=True):
    d = root / exp
    d.mkdir(parents=True)
    for f in folds if folds is not None else valid:
        for split, (df, emb) in (("valid", valid[f]), ("test", test[f])):
            df.to_csv(d / f"fold{f}_{split}.csv", index=False)
            if with_emb:
                np.save(d / f"fold{f}_{split}_emb.npy", emb)
                df[[ID_COL]].to_csv(d / f"fold{f}_{split}_emb_ids.csv", index=False)


# ---- series assembly and neighbour features ----

def test_assemble_orders_by_position_with_id_tie_break_and_gaps():
    a = _series(["ID_c", "ID_a", "ID_b", "ID_d"], [10.0, 0.0, 10.0, 25.0])
    b = _series(["ID_z"], [3.0], patient="P2", study="S2", series="R2")
    df = pd.concat([a, b], ignore_index=True)
    out = assemble_series(df)
    assert out[ID_COL].tolist() == ["ID_a", "ID_b", "ID_c", "ID_d", "ID_z"]
    assert out["slice_pos"].tolist() == [0, 1, 2, 3, 0]
    assert out["series_len"].tolist() == [4, 4, 4, 4, 1]
    np.testing.assert_allclose(out["rel_position"], [0, 1 / 3, 2 / 3, 1, 0.5])
    np.testing.assert_allclose(out["gap_prev_mm"], [np.nan, 10, 0, 15, np.nan])
    np.testing.assert_allclose(out["gap_next_mm"], [10, 0, 15, np.nan, np.nan])
    shuffled = assemble_series(df.sample(frac=1.0, random_state=3))
    pd.testing.assert_frame_equal(out, shuffled)


def test_assemble_rejects_duplicate_ids_and_missing_columns():
    with pytest.raises(InputError, match="more than once"):
        assemble_series(_series(["ID_a", "ID_a"], [0.0, 1.0]))
    with pytest.raises(InputError, match="position"):
        assemble_series(_series(["ID_a"], [0.0]).drop(columns="position"))


def test_neighbour_features_values_edges_and_duplicates():
    probs = np.tile(np.array([[0.1], [0.2], [0.3], [0.4]]), (1, 6)) + np.arange(6) * 0.01
    # ID_b and ID_c share a position: ordered by ID, they are each other's neighbours.
    df = _series(["ID_a", "ID_b", "ID_c", "ID_d"], [0.0, 5.0, 5.0, 10.0], probs=probs)
    df[VOLUME_COL] = [0.0, 100.0, 300.0, 50.0]
    table = assemble_series(df.iloc[[3, 1, 0, 2]])
    feats = neighbour_features(table, k=2)
    any_ = feats["any"].to_numpy()
    np.testing.assert_allclose(any_, probs[:, 5])
    np.testing.assert_allclose(feats["any_m1"], [np.nan, 0.15, 0.25, 0.35])
    np.testing.assert_allclose(feats["any_p1"], [0.25, 0.35, 0.45, np.nan])
    np.testing.assert_allclose(feats["any_m2"], [np.nan, np.nan, 0.15, 0.25])
    np.testing.assert_allclose(feats["epidural_d_p1"], [-0.1, -0.1, -0.1, np.nan])
    np.testing.assert_allclose(feats["any_win_mean"], [0.25, 0.30, 0.30, 0.35])
    np.testing.assert_allclose(feats["any_win_max"], [0.35, 0.45, 0.45, 0.45])
    np.testing.assert_allclose(feats["any_ser_mean"], 0.30)
    np.testing.assert_allclose(feats["any_ser_std"], np.std([0.15, 0.25, 0.35, 0.45]))
    np.testing.assert_allclose(feats["vol_m1"], [np.nan, 0, 100, 300])
    np.testing.assert_allclose(feats["vol_ser_sum"], 450.0)
    np.testing.assert_allclose(feats["gap_prev_mm"], [np.nan, 5, 0, 5])
    assert feats.shape[1] == 6 * (1 + 4 * 2 + 5) + 4 + (1 + 2 * 2 + 1)
    assert list(neighbour_features(table.drop(columns=VOLUME_COL), 2).columns) == list(feats.columns[:-6])


def test_neighbour_features_do_not_cross_series():
    a = _series(["ID_a", "ID_b"], [0.0, 1.0], probs=np.full((2, 6), 0.9))
    b = _series(["ID_c", "ID_d"], [0.0, 1.0], patient="P2", study="S2", series="R2", probs=np.full((2, 6), 0.1))
    feats = neighbour_features(assemble_series(pd.concat([a, b])), k=3)
    np.testing.assert_allclose(feats["any_p1"], [0.9, np.nan, 0.1, np.nan])
    np.testing.assert_allclose(feats["any_ser_max"], [0.9, 0.9, 0.1, 0.1])
    assert np.isnan(feats[["any_m3", "any_p3", "any_m2", "any_p2"]].to_numpy()).all()


def test_join_series_names_unknown_ids():
    meta = _series(["ID_a"], [0.0]).drop(columns=list(LABELS))
    preds = _series(["ID_a", "ID_x"], [0.0, 1.0])[[ID_COL, *LABELS]]
    with pytest.raises(InputError, match="ID_x"):
        join_series(meta, preds, what="fold0_valid.csv")


# ---- LightGBM estimator ----

def _fake_level2(seed=0, n_patients=40):
    meta_train, _, valid, _ = fake_pipeline(n_patients=n_patients, seed=seed, emb_dim=4)
    preds = pd.concat([df for df, _ in valid.values()], ignore_index=True)
    table = join_series(meta_train, preds)
    y = meta_train.set_index(ID_COL).loc[table[ID_COL], list(LABELS)].to_numpy()
    return table, neighbour_features(table, k=3), y


def test_lgbm_stacker_follows_sklearn_conventions():
    table, feats, y = _fake_level2()
    est = LGBMStacker(random_state=3, **FAST_LGBM)
    assert est.get_params()["random_state"] == 3
    assert not [a for a in vars(est) if a.endswith("_")]  # __init__ learns nothing
    twin = clone(est)
    assert twin.get_params() == est.get_params() and not hasattr(twin, "boosters_")
    y_const = y.copy()
    y_const[:, 0] = 0.0  # a label with one class falls back to a constant prediction
    assert est.fit(feats, y_const, table["PatientID"].to_numpy()) is est
    assert len(est.boosters_) == FAST_LGBM["n_seeds"] and len(est.boosters_[0]) == 6
    assert isinstance(est.boosters_[0][0], float)
    p = est.predict_proba(feats)
    assert p.shape == (len(feats), 6) and np.all((p > 0) & (p < 1))
    np.testing.assert_allclose(p[:, 0], 0.5 / (len(y) + 1))
    np.testing.assert_allclose(LGBMStacker(random_state=3, **FAST_LGBM).fit(feats, y_const, table["PatientID"])
                               .predict_proba(feats), p)
    with pytest.raises(ValueError, match="columns"):
        est.predict_proba(feats.iloc[:, ::-1])


def test_lgbm_bag_is_the_mean_of_its_seeds_and_round_trips():
    table, feats, y = _fake_level2()
    groups = table["PatientID"].to_numpy()
    params = {**FAST_LGBM, "n_seeds": 1}
    one, two = (LGBMStacker(**params, random_state=s).fit(feats, y, groups).predict_proba(feats) for s in (3, 4))
    bag = LGBMStacker(**{**params, "n_seeds": 2}, random_state=3).fit(feats, y, groups)
    np.testing.assert_allclose(bag.predict_proba(feats), (one + two) / 2, rtol=1e-9)
    assert np.abs(one - two).max() > 1e-3  # the seeds really differ (inner split, bagging)
    np.testing.assert_allclose(LGBMStacker.from_dict(bag.to_dict()).predict_proba(feats), bag.predict_proba(feats))
    old_format = {**bag.to_dict(), "boosters": bag.to_dict()["boosters"][0],
                  "best_iterations": bag.to_dict()["best_iterations"][0]}  # saved before seeds were bagged
    np.testing.assert_allclose(LGBMStacker.from_dict(old_format).predict_proba(feats), one, rtol=1e-9)


# ---- fold discipline ----

def test_level2_splits_same_folds_when_complete_else_inner_grouped():
    folds = np.repeat([0, 1, 2], 4)
    groups = np.repeat(np.arange(6), 2)
    mode, splits = level2_splits(folds, groups, n_folds=3)
    assert mode == "same_folds" and len(splits) == 3
    for f, (fit_rows, pred_rows) in enumerate(splits):
        assert set(folds[pred_rows]) == {f} and f not in set(folds[fit_rows])
    mode, splits = level2_splits(folds[:8], groups[:8], n_folds=5, n_inner=2)
    assert mode == "inner_group_cv" and len(splits) == 2
    predicted = np.concatenate([p for _, p in splits])
    assert sorted(predicted) == list(range(8))
    for fit_rows, pred_rows in splits:
        assert not set(groups[fit_rows]) & set(groups[pred_rows])
    with pytest.raises(InputError, match="patient"):
        level2_splits(folds[:2], groups[:2], n_folds=5)


def test_cross_fit_refuses_overlapping_split():
    with pytest.raises(RuntimeError, match="same row"):
        cross_fit([(np.array([0, 1]), np.array([1, 2]))], 3, fit=lambda r: None, predict=lambda m, r: 0)


def test_shuffled_labels_give_chance_auc_and_a_leaky_fit_would_not():
    table, feats, y = _fake_level2(seed=1, n_patients=50)
    rng = np.random.RandomState(0)
    y_shuf = y[rng.permutation(len(y))]
    groups = table["PatientID"].to_numpy()
    _, splits = level2_splits(table[FOLD_COL].to_numpy(), groups, n_folds=5)
    # Eager to overfit on purpose, so that a leak would show.
    params = {**FAST_LGBM, "n_estimators": 50, "early_stopping_rounds": 50, "num_leaves": 31, "min_child_samples": 2}
    res = cross_fit(splits, len(y), fit=lambda r: LGBMStacker(**params).fit(feats.iloc[r], y_shuf[r], groups[r]),
                    predict=lambda m, r: m.predict_proba(feats.iloc[r]))
    for entry in res.log:
        assert not set(table[ID_COL].iloc[entry["fit_rows"]]) & set(table[ID_COL].iloc[entry["pred_rows"]])
    assert sorted(np.concatenate([e["pred_rows"] for e in res.log])) == list(range(len(y)))
    auc = roc_auc_score(y_shuf[:, 5], res.oof[:, 5])
    assert abs(auc - 0.5) < 0.08, auc
    leaky = LGBMStacker(**params).fit(feats, y_shuf, groups).predict_proba(feats)
    assert roc_auc_score(y_shuf[:, 5], leaky[:, 5]) > 0.7  # predicting fit rows would show up here


# ---- GRU ----

def test_pad_mask_and_forward_shapes_ignore_padding():
    torch.manual_seed(0)
    feats = np.random.RandomState(0).normal(size=(7, 5)).astype(np.float32)
    rows = [np.arange(0, 4), np.arange(4, 6), np.arange(6, 7)]
    lengths, (x,) = pad_batch(rows, feats)
    assert x.shape == (3, 4, 5) and lengths.tolist() == [4, 2, 1]
    assert length_mask(lengths, 4).tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
    assert torch.equal(x[1, :2], torch.from_numpy(feats[4:6])) and not x[1, 2:].any()
    net = SliceSequenceNet(5, proj_size=8, hidden_size=6).eval()
    torch.nn.init.normal_(net.head.weight)  # the zero init would hide the GRU's output
    base = torch.zeros(3, 4, 6)
    out = net(x, lengths, base)
    assert out.shape == (3, 4, 6) and torch.isfinite(out).all()
    x2 = x.clone()
    x2[1, 2:] = 99.0  # junk in the padding must not reach real slices (packing)
    out2 = net(x2, lengths, base)
    assert torch.allclose(out[1, :2], out2[1, :2]) and torch.allclose(out[0], out2[0])
    one_len, (one_x,) = pad_batch([np.arange(4, 6)], feats)
    assert torch.allclose(net(one_x, one_len, base[:1, :2])[0], out[1, :2], atol=1e-6)


def test_reverse_sequences_keeps_labels_aligned():
    lengths = torch.tensor([3, 1, 2])
    x = torch.arange(9, dtype=torch.float32).reshape(3, 3, 1)
    y = x * 10
    rx, ry = reverse_sequences(lengths, x, y)
    assert rx[:, :, 0].tolist() == [[2, 1, 0], [3, 4, 5], [7, 6, 8]]
    assert torch.equal(ry, rx * 10)
    assert all(torch.equal(a, b) for a, b in zip(reverse_sequences(lengths, rx, ry), (x, y)))


def test_series_segments_require_contiguous_rows():
    assert [s.tolist() for s in series_segments(np.array([0, 0, 1, 2, 2]))] == [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="contiguous"):
        series_segments(np.array([0, 1, 0]))


def test_gru_stacker_is_seeded_and_beats_the_cnn_on_neighbour_structure():
    torch.set_num_threads(1)
    table, _, y = _fake_level2(seed=2)
    X = sequence_inputs(table)
    series, groups = table[SERIES_ID].to_numpy(), table["PatientID"].to_numpy()
    fit_rows = np.flatnonzero(table[FOLD_COL].to_numpy() != 0)
    pred_rows = np.flatnonzero(table[FOLD_COL].to_numpy() == 0)
    params = {**FAST_GRU, "epochs": 25, "patience": 25}
    a = GRUStacker(random_state=1, **params).fit(X[fit_rows], y[fit_rows], series[fit_rows], groups[fit_rows])
    b = GRUStacker(random_state=1, **params).fit(X[fit_rows], y[fit_rows], series[fit_rows], groups[fit_rows])
    pa = a.predict_proba(X[pred_rows], series[pred_rows])
    np.testing.assert_allclose(pa, b.predict_proba(X[pred_rows], series[pred_rows]), rtol=1e-5)
    assert pa.shape == (len(pred_rows), 6)
    assert weighted_log_loss(y[pred_rows], pa) < weighted_log_loss(y[pred_rows], X[pred_rows, :6])


# ---- end to end ----

def test_run_stack_end_to_end_writes_three_dirs(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    meta_train, meta_test, valid, test = fake_pipeline(n_patients=30, seed=4)
    write_oof(tmp_path, "exp", valid, test)
    out = run_stack("exp", tmp_path, meta_train, meta_test, n_folds=5, k=3, seed=0, lgbm_params=FAST_LGBM,
                    gru_params=FAST_GRU, parallel=True)
    assert out["lgbm"]["cv_mode"] == "same_folds" and out["gru"]["gru_inputs"] == "8-d embeddings"
    for kind in ("lgbm", "gru", "blend"):
        d = tmp_path / f"exp_stack_{kind}"
        v, t = pd.read_csv(d / "stack_valid.csv"), pd.read_csv(d / "stack_test.csv")
        assert list(v.columns) == [ID_COL, FOLD_COL, *LABELS] and list(t.columns) == list(v.columns)
        assert sorted(v[ID_COL]) == sorted(meta_train[ID_COL]) and sorted(t[ID_COL]) == sorted(meta_test[ID_COL])
        assert (t[FOLD_COL] == -1).all() and v[list(LABELS)].apply(lambda c: c.between(0, 1).all()).all()
        oof_fold = pd.concat([df for df, _ in valid.values()]).set_index(ID_COL)[FOLD_COL]
        assert (v.set_index(ID_COL)[FOLD_COL] == oof_fold.loc[v[ID_COL]]).all()
        assert json.loads((d / "metrics.json").read_text())["stacker"] == kind
    lg = out["lgbm"]
    assert lg["stacked"]["weighted_log_loss"] < 0.85 * lg["cnn_same_rows"]["weighted_log_loss"]
    blend = pd.read_csv(tmp_path / "exp_stack_blend" / "stack_valid.csv")
    mean = (pd.read_csv(tmp_path / "exp_stack_lgbm" / "stack_valid.csv")[list(LABELS)]
            + pd.read_csv(tmp_path / "exp_stack_gru" / "stack_valid.csv")[list(LABELS)]) / 2
    np.testing.assert_allclose(blend[list(LABELS)], mean, rtol=1e-6)

    import src.data.metadata

    fake = lambda d, split: meta_train if split == "train" else meta_test  # noqa: E731
    monkeypatch.setattr(src.data.metadata, "load_metadata", fake)
    assert main(["--exp", "exp", "--compare", "--oof-root", str(tmp_path)]) == 0
    text = (tmp_path / "exp_stack_compare.md").read_text()
    assert "stack_blend" in text and "study_wll" in text


def test_stackers_fit_side_by_side_give_what_they_give_one_after_the_other(tmp_path, monkeypatch):
    """The GRU in one thread, LightGBM's splits in another and then in the GRU's: the same files, to the byte, as
    fitting them in turn; and only when two fits' threads fit in the machine's CPUs."""
    import src.stack.run as stack_run

    torch.set_num_threads(1)
    meta_train, meta_test, valid, test = fake_pipeline(n_patients=24, seed=7)
    pools = []

    class CountedPool(stack_run.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(stack_run, "ThreadPoolExecutor", CountedPool)
    outputs = {}
    for cpus in (2, 1):
        monkeypatch.setattr(stack_run, "machine_threads", lambda cpus=cpus: cpus)
        root = tmp_path / f"cpus{cpus}"
        write_oof(root, "exp", valid, test)
        run_stack("exp", root, meta_train, meta_test, n_folds=5, k=2, lgbm_params=FAST_LGBM,
                  gru_params={**FAST_GRU, "epochs": 3})
        outputs[cpus] = {p.relative_to(root): p.read_bytes() for p in root.glob("exp_stack_*/stack_*.csv")}
        assert len(pools) == 1  # 2 CPUs: LightGBM got its thread; 1 CPU: no second one
    assert len(outputs[2]) == 6 and outputs[2] == outputs[1]


def test_partial_folds_use_inner_cv_and_cli_skip_gru(tmp_path, monkeypatch):
    meta_train, meta_test, valid, test = fake_pipeline(n_patients=30, seed=5)
    write_oof(tmp_path, "one", valid, test, folds=[0], with_emb=False)
    import src.data.metadata

    fake = lambda d, split: meta_train if split == "train" else meta_test  # noqa: E731
    monkeypatch.setattr(src.data.metadata, "load_metadata", fake)
    # --set reaches the config's stack section; flags override it; the resolved section is saved.
    argv = ["--exp", "one", "--skip-gru", "--k", "2", "--set", "stack.n_inner=3", "--set", "stack.k=4", "--threads",
            "1", "--oof-root", str(tmp_path)]
    assert main(argv) == 0
    settings = json.loads((tmp_path / "one_stack_settings.json").read_text())["stack"]
    assert (settings["k"], settings["n_inner"], settings["skip_gru"], settings["threads"]) == (2, 3, True, 1)
    metrics = json.loads((tmp_path / "one_stack_lgbm" / "metrics.json").read_text())
    assert metrics["cv_mode"] == "inner_group_cv" and metrics["n_models"] == 3 and metrics["folds_available"] == [0]
    v = pd.read_csv(tmp_path / "one_stack_lgbm" / "stack_valid.csv")
    assert sorted(v[ID_COL]) == sorted(valid[0][0][ID_COL]) and (v[FOLD_COL] == 0).all()
    assert not (tmp_path / "one_stack_gru").exists()
    with pytest.raises(InputError, match="no fold"):
        main(["--exp", "missing", "--oof-root", str(tmp_path)])
    (tmp_path / "one" / "fold1_valid.csv").write_bytes((tmp_path / "one" / "fold0_valid.csv").read_bytes())
    with pytest.raises(InputError, match="two fold"):
        main(argv)


def test_compare_uses_common_rows_and_study_max():
    meta = pd.DataFrame({ID_COL: ["a", "b", "c"], "StudyInstanceUID": ["s1", "s1", "s2"]})
    for name in LABELS:
        meta[name] = [0.0, 1.0, 0.0]
    good = pd.DataFrame({ID_COL: ["a", "b", "c"], **{n: [0.1, 0.9, 0.2] for n in LABELS}})
    worse = pd.DataFrame({ID_COL: ["b", "c"], **{n: [0.6, 0.4] for n in LABELS}})
    table = compare_predictions(meta, {"cnn": worse, "stack": good})
    assert table["slices"].tolist() == [2, 2] and table["studies"].tolist() == [2, 2]
    expected = -(np.log(0.9) + np.log(0.8)) / 2
    assert table["slice_wll"].iloc[1] == pytest.approx(expected)
    assert table["study_wll"].iloc[1] == pytest.approx(expected)  # study s1 = max(0.9) on rows b only
    assert table["slice_wll_cut_%"].iloc[1] > 0


# ---- saved stackers reused on new series ----

def test_saved_stackers_reproduce_stack_test_predictions(tmp_path):
    torch.set_num_threads(1)
    meta_train, meta_test, valid, test = fake_pipeline(n_patients=20, seed=6)
    for f in test:  # the CNN writes blood volume beside the probabilities; the stackers must carry it through
        for df, _ in (valid[f], test[f]):
            df[VOLUME_COL] = np.random.RandomState(f).uniform(0, 500, len(df))
    write_oof(tmp_path, "rt", valid, test)
    fast_gru = {**FAST_GRU, "epochs": 3}
    run_stack("rt", tmp_path, meta_train, meta_test, n_folds=5, k=2, lgbm_params=FAST_LGBM, gru_params=fast_gru)
    assert load_stackers("no_such_exp") is None
    bundle = load_stackers("rt")
    assert bundle.kinds == ("lgbm", "gru", "blend") and bundle.path == stack_model_dir("rt")
    m = bundle.manifest
    assert m["cnn_folds"] == [0, 1, 2, 3, 4] and m["with_volume"] and m["emb_dim"] == 8 and len(bundle.gru) == 5
    # New series = four test studies, rows shuffled: the answer must not depend on the row order.
    keep = meta_test[meta_test["PatientID"].isin(meta_test["PatientID"].unique()[:4])].sample(frac=1, random_state=0)
    tables, embs = {}, {}
    for f, (df, emb) in test.items():
        rows = df.reset_index(drop=True).set_index(ID_COL).index.get_indexer(keep[ID_COL])
        tables[f] = keep[[ID_COL, "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "position"]].merge(
            df.drop(columns=FOLD_COL), on=ID_COL, validate="one_to_one")
        embs[f] = emb[rows]
    got = bundle.predict(tables, embs)
    for kind in ("lgbm", "gru", "blend"):
        want = pd.read_csv(tmp_path / f"rt_stack_{kind}" / "stack_test.csv").set_index(ID_COL).loc[keep[ID_COL]]
        np.testing.assert_allclose(got[kind], want[list(LABELS)].to_numpy(), rtol=1e-6, atol=1e-9, err_msg=kind)
    cnn_mean = np.mean([t[list(LABELS)].to_numpy() for t in tables.values()], axis=0)
    assert np.abs(got["blend"] - cnn_mean).max() > 1e-3  # the stacker really changed something
    assert set(bundle.predict(tables, embs, kinds=["lgbm"])) == {"lgbm"}
    with pytest.raises(InputError, match="embeddings"):
        bundle.predict(tables, None, kinds=["gru"])
    with pytest.raises(InputError, match="blood_volume_mm3"):
        bundle.predict({0: tables[0].drop(columns=VOLUME_COL)}, kinds=["lgbm"])


def test_gru_bag_is_the_mean_of_its_seeds_and_pca_is_fit_on_the_fit_rows():
    torch.set_num_threads(1)
    table, _, y = _fake_level2(seed=7, n_patients=20)
    emb = np.random.RandomState(0).normal(size=(len(table), 10)).astype(np.float32)
    X, start = sequence_inputs(table), sequence_inputs(table).shape[1]  # probabilities, position, volume
    series, groups = table[SERIES_ID].to_numpy(), table["PatientID"].to_numpy()
    fit_rows = np.flatnonzero(table[FOLD_COL].to_numpy() != 0)
    pred_rows = np.flatnonzero(table[FOLD_COL].to_numpy() == 0)
    params = {**FAST_GRU, "epochs": 3, "emb_components": 3}
    def fit(**kw):
        return GRUStacker(**{**params, **kw}).fit(X[fit_rows], y[fit_rows], series[fit_rows], groups[fit_rows],
                                                  emb=emb[fit_rows])
    bag, one, two = fit(n_seeds=2, random_state=5), fit(n_seeds=1, random_state=5), fit(n_seeds=1, random_state=6)
    assert len(bag.nets_) == 2 and bag.emb_axes_.shape == (10, 3)
    def predict(m):
        return m.predict_proba(X[pred_rows], series[pred_rows], emb=emb[pred_rows])
    np.testing.assert_allclose(predict(bag), (predict(one) + predict(two)) / 2, rtol=1e-5)
    centred = emb[fit_rows] - emb[fit_rows].mean(0)
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    assert abs(abs(float(bag.emb_axes_[:, 0] @ top)) - 1) < 1e-4  # first axis = the fit rows' first component
    assert bag.nets_[0].proj[0].in_features == start + 3  # all but the embedding, 3 components
    np.testing.assert_allclose(predict(GRUStacker.from_state(bag.to_state())), predict(bag), rtol=1e-5)
    with pytest.raises(ValueError, match="columns"):
        bag.predict_proba(X[pred_rows, :-1], series[pred_rows], emb=emb[pred_rows])
    with pytest.raises(ValueError, match="emb"):
        bag.predict_proba(X[pred_rows], series[pred_rows])


def test_cli_threads_default_to_the_measured_choice_and_follow_the_flag(tmp_path, monkeypatch):
    """Without --threads: LightGBM picks by the rows (n_jobs 0) and the GRU's torch runs on one thread (its steps are
    too small to share); with --threads N both take N."""
    import src.data.metadata
    import src.stack.__main__ as stack_cli

    meta_train, meta_test, valid, test = fake_pipeline(n_patients=12, seed=6)
    write_oof(tmp_path, "exp", valid, test, with_emb=False)
    fake = lambda d, split: meta_train if split == "train" else meta_test  # noqa: E731
    monkeypatch.setattr(src.data.metadata, "load_metadata", fake)
    calls = []
    monkeypatch.setattr(stack_cli, "run_stack", lambda *a, lgbm_params, **k: calls.append(
        (lgbm_params["n_jobs"], torch.get_num_threads())))
    monkeypatch.setattr(stack_cli, "run_compare", lambda *a, **k: None)
    try:
        torch.set_num_threads(2)
        main(["--exp", "exp", "--oof-root", str(tmp_path)])
        main(["--exp", "exp", "--threads", "2", "--oof-root", str(tmp_path)])
    finally:
        torch.set_num_threads(1)
    assert calls == [(0, 1), (2, 2)]
