"""The stackers at scale: same input distribution at fit and test time, lean memory, one binning, machine threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
import torch

from src.constants import LABELS
from src.stack import pca
from src.stack import run as stack_run
from src.stack import threads as stack_threads
from src.stack.features import SERIES_ID, clipped_logit, sequence_inputs
from src.stack.gru import GRUStacker
from src.stack.lgbm import LGBMStacker
from src.stack.pca import fit_axes, project
from src.stack.threads import ROWS_PER_LGBM_THREAD, lgbm_threads, machine_threads
from tests.test_stack import _fake_level2, fake_pipeline, write_oof

TINY_LGBM = {"n_estimators": 30, "learning_rate": 0.1, "early_stopping_rounds": 10, "n_jobs": 1, "n_seeds": 1}
TINY_GRU = {"epochs": 1, "hidden_size": 8, "proj_size": 8, "n_seeds": 1, "emb_components": 2}


def _spy(monkeypatch, cls, method: str, probs_of, seen: list) -> None:
    real = getattr(cls, method)

    def spy(self, X, *args, **kwargs):
        seen.append(np.asarray(probs_of(X), dtype=np.float64))
        return real(self, X, *args, **kwargs)

    monkeypatch.setattr(cls, method, spy)


def _matches(block: np.ndarray, table: np.ndarray) -> bool:
    """Same rows up to order (float32 rounding allowed)."""
    return block.shape == table.shape and np.allclose(np.sort(block, 0), np.sort(table, 0), atol=1e-6)


def test_both_stackers_score_test_rows_per_fold_model_like_their_fit_rows(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    meta_train, meta_test, valid, test = fake_pipeline(n_patients=25, seed=11)
    write_oof(tmp_path, "dist", valid, test)
    seen = {"lgbm_fit": [], "lgbm_pred": [], "gru_fit": [], "gru_pred": []}
    _spy(monkeypatch, LGBMStacker, "fit", lambda X: X[list(LABELS)], seen["lgbm_fit"])
    _spy(monkeypatch, LGBMStacker, "predict_proba", lambda X: X[list(LABELS)], seen["lgbm_pred"])
    _spy(monkeypatch, GRUStacker, "fit", lambda X: X[:, :6], seen["gru_fit"])
    _spy(monkeypatch, GRUStacker, "predict_proba", lambda X: X[:, :6], seen["gru_pred"])
    stack_run.run_stack("dist", tmp_path, meta_train, meta_test, n_folds=5, k=2, lgbm_params=TINY_LGBM,
                        gru_params=TINY_GRU)

    fold_tests = [df[list(LABELS)].to_numpy() for df, _ in test.values()]
    mean_test = np.mean(fold_tests, axis=0)
    for kind in ("lgbm", "gru"):
        test_calls = [b for b in seen[f"{kind}_pred"] if len(b) == len(mean_test)]
        # 5 level-2 models x 5 CNN fold models: every call holds exactly one fold model's predictions.
        assert len(test_calls) == 25, kind
        for b in test_calls:
            assert sum(_matches(b, f) for f in fold_tests) == 1, kind
            assert not _matches(b, mean_test), kind
        # Same distribution: the spread of the CNN logits the stacker reads at test time is that of its fit rows
        # (single-model predictions); the mean over five models would be visibly narrower.
        fit_sd = np.mean([clipped_logit(b).std() for b in seen[f"{kind}_fit"]])
        test_sd = np.mean([clipped_logit(b).std() for b in test_calls])
        assert 0.85 < test_sd / fit_sd < 1.15, (kind, test_sd, fit_sd)
        assert clipped_logit(mean_test).std() / fit_sd < 0.8  # what the check above would catch


def test_pca_on_a_float16_matrix_never_widens_it_whole():
    rng = np.random.RandomState(0)
    emb = (rng.normal(size=(20_000, 64)) * 3 * 0.6 ** np.arange(64)).astype(np.float16)
    tracemalloc.start()
    mean, axes = fit_axes(emb, 4, sample_rows=2_000, random_state=0)
    reduced = project(emb, mean, axes, chunk_rows=1_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.5 * emb.size * 4  # a float32 copy of emb would be 5 MB, a float64 one 10 MB
    assert axes.shape == (64, 4) and reduced.shape == (20_000, 4) and reduced.dtype == np.float32
    # The sample's axes are the full matrix's top axes (the spectrum falls steeply) ...
    full = emb.astype(np.float64)
    top = np.linalg.svd(full - full.mean(0), full_matrices=False)[2][:4]
    assert np.all(np.abs(np.sum(axes.T * top, axis=1)) > 0.99)
    # ... and the chunked projection is the plain one.
    np.testing.assert_allclose(reduced, (emb.astype(np.float32) - mean) @ axes, rtol=1e-4, atol=1e-3)


def test_gru_keeps_a_float16_embedding_float16(monkeypatch):
    table, _, y = _fake_level2(seed=3, n_patients=20)
    emb = np.random.RandomState(1).normal(size=(len(table), 2048)).astype(np.float16)
    X, series = sequence_inputs(table), table[SERIES_ID].to_numpy()
    gru = GRUStacker(**{**TINY_GRU, "pca_sample": 100}).fit(X, y, series, emb=emb)
    monkeypatch.setattr(pca, "CHUNK_ROWS", 16)  # many chunks, as 16k-row chunks are at 752k rows
    tracemalloc.start()
    gru.predict_proba(X, series, emb=emb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.5 * emb.size * 4  # a float32 copy of the embedding would be twice this
    assert gru.emb_axes_.shape == (2048, 2) and gru.emb_dim_ == 2048


def test_lgbm_bins_the_fit_rows_once_for_every_seed_and_label(monkeypatch):
    table, feats, y = _fake_level2(seed=4, n_patients=12)
    built = []
    real = lgb.Dataset.__init__

    def count(self, data, *args, **kwargs):
        if data is not None:  # a subset passes data=None: it reuses its parent's bins
            built.append(data.shape)
        real(self, data, *args, **kwargs)

    monkeypatch.setattr(lgb.Dataset, "__init__", count)
    LGBMStacker(**{**TINY_LGBM, "n_seeds": 3}).fit(feats, y, table["PatientID"].to_numpy())
    assert built == [feats.shape]


def test_thread_counts_come_from_the_machine(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        assert machine_threads() == len(os.sched_getaffinity(0))
    assert LGBMStacker(n_jobs=3)._params(0)["num_threads"] == 3
    assert LGBMStacker()._params(0, threads=5)["num_threads"] == 5
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert machine_threads() == 7


@pytest.mark.parametrize("with_pca", [True, False])
def test_gru_bundles_saved_with_the_embedding_inside_x_still_load(with_pca):
    table, _, y = _fake_level2(seed=5, n_patients=8)
    emb = np.random.RandomState(2).normal(size=(len(table), 6)).astype(np.float32)
    X, series = sequence_inputs(table), table[SERIES_ID].to_numpy()
    gru = GRUStacker(**TINY_GRU).fit(X, y, series, emb=emb)
    state = gru.to_state()
    emb_start = X.shape[1] if with_pca else None  # the embedding was X's last columns, from emb_start on
    old = {**state, "params": {**state["params"], "emb_start": emb_start}, "n_features_in": X.shape[1] + 6}
    del old["emb_dim"]
    if not with_pca:
        del old["emb_axes"], old["emb_mean"]
        with pytest.raises(ValueError, match="re-run"):
            GRUStacker.from_state(old)
        return
    back = GRUStacker.from_state(old)
    np.testing.assert_allclose(back.predict_proba(X, series, emb=emb), gru.predict_proba(X, series, emb=emb),
                               rtol=1e-6)


def test_stack_cli_makes_openmp_wait_passively_unless_told_otherwise():
    code = "import os, src.stack.__main__; print(os.environ['OMP_WAIT_POLICY'])"
    root = Path(__file__).resolve().parent.parent
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
        assert out.stdout.strip() == want, out.stderr[-500:]


def test_stack_cli_caps_seeds_and_rounds_and_records_the_work(tmp_path, monkeypatch):
    import src.data.metadata
    from src.errors import InputError
    from src.stack.__main__ import main

    meta_train, meta_test, valid, test = fake_pipeline(n_patients=30, seed=12)
    write_oof(tmp_path, "cli", valid, test, folds=[0], with_emb=False)
    tables = {"train": meta_train, "test": meta_test}
    monkeypatch.setattr(src.data.metadata, "load_metadata", lambda d, split: tables[split])
    base = ["--exp", "cli", "--skip-gru", "--k", "1", "--n-inner", "2", "--threads", "1", "--oof-root", str(tmp_path)]
    assert main([*base, "--seeds", "1", "--max-rounds", "3"]) == 0
    metrics = json.loads((tmp_path / "cli_stack_lgbm" / "metrics.json").read_text())
    assert 0 < metrics["work"]["boosting_rounds"] <= 2 * 6 * 3 and metrics["seconds"] >= 0
    with pytest.raises(InputError, match="--seeds"):
        main([*base, "--seeds", "-1"])  # 0 = the stacker's default


def test_lightgbm_threads_follow_the_rows_within_the_machine(monkeypatch):
    """Small fits on one thread (waking idle threads costs more than they save), big ones on up to every CPU."""
    monkeypatch.setattr(stack_threads, "machine_threads", lambda: 16)
    assert lgbm_threads(0) == lgbm_threads(3_000) == lgbm_threads(ROWS_PER_LGBM_THREAD - 1) == 1
    assert lgbm_threads(5 * ROWS_PER_LGBM_THREAD) == 5
    assert lgbm_threads(600_000) == lgbm_threads(10**7) == 16


def test_the_stacker_picks_its_threads_by_the_rows_unless_told(monkeypatch):
    table, feats, y = _fake_level2()
    seen = []
    real_train, real_predict = lgb.train, lgb.Booster.predict

    def train(params, *args, **kwargs):
        seen.append(("fit", params["num_threads"]))
        return real_train(params, *args, **kwargs)

    def predict(self, data, *args, num_threads=0, **kwargs):
        seen.append(("predict", num_threads))
        return real_predict(self, data, *args, num_threads=num_threads, **kwargs)

    monkeypatch.setattr(lgb, "train", train)
    monkeypatch.setattr(lgb.Booster, "predict", predict)
    monkeypatch.setattr(stack_threads, "machine_threads", lambda: 64)
    monkeypatch.setattr(stack_threads, "ROWS_PER_LGBM_THREAD", 10)
    model = LGBMStacker(**{**TINY_LGBM, "n_jobs": 0}).fit(feats, y, table["PatientID"].to_numpy())
    model.predict_proba(feats.head(25))
    assert {n for kind, n in seen if kind == "fit"} == {min(64, len(feats) // 10)} and len(feats) >= 30
    assert {n for kind, n in seen if kind == "predict"} == {2}
    seen.clear()
    told = LGBMStacker(**{**TINY_LGBM, "n_jobs": 3}).fit(feats, y, table["PatientID"].to_numpy())
    told.predict_proba(feats)
    assert {n for _, n in seen} == {3}
