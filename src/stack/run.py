"""Fit the stackers on an experiment's OOF and write oof/<exp>_stack_{lgbm,gru,blend}/ (+ the saved models)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from src.atomic import write_csv, write_json
from src.constants import FOLD_COL, ID_COL, LABELS, PATIENT, VOLUME_COL
from src.errors import InputError
from src.metric import score_table
from src.predictions import fold_files, read_embeddings, read_prediction_csv
from src.stack.bundle import gru_over_folds, mean_by_id, save_stackers
from src.stack.cv import CVResult, cross_fit, level2_splits
from src.stack.features import SERIES_ID, join_series, neighbour_features, sequence_inputs
from src.stack.gru import GRUStacker
from src.stack.lgbm import LGBMStacker
from src.stack.threads import lgbm_threads, machine_threads


def valid_embeddings(exp_dir: Path, valid_files: dict[int, Path], parts: list[pd.DataFrame],
                     ids: pd.Series) -> np.ndarray | None:
    """The OOF embeddings [N, D] in the row order of `ids`, float16 as stored, filled fold by fold (one fold's
    copy at a time beside the result: 3 GB + 0.6 GB at 752k x 2048); None unless every fold has them."""
    where = pd.Index(ids)
    out = None
    for f, part in zip(valid_files, parts):
        emb = read_embeddings(exp_dir, f, "valid", part[ID_COL])
        if emb is None:
            return None
        if out is None:
            out = np.empty((len(ids), emb.shape[1]), dtype=emb.dtype)
        elif emb.shape[1] != out.shape[1]:
            raise InputError(f"{exp_dir}: fold{f}_valid_emb.npy is {emb.shape[1]}-d, other folds {out.shape[1]}-d")
        out[where.get_indexer(part[ID_COL])] = emb
    return out


def work_done(models: list) -> dict:
    """What the fit cost in units that scale: LightGBM boosting rounds trained, GRU epochs run (all seeds)."""
    if models and isinstance(models[0], LGBMStacker):
        return {"boosting_rounds": int(sum(b.current_iteration() for m in models for seed in m.boosters_
                                           for b in seed if not isinstance(b, float)))}
    if models and isinstance(models[0], GRUStacker):
        return {"gru_epochs": int(sum(len(h) for m in models for h in m.history_))}
    return {}


def run_stack(exp: str, oof_root: Path, meta_train: pd.DataFrame, meta_test: pd.DataFrame | None, n_folds: int,
              k: int = 5, seed: int = 0, skip_gru: bool = False, lgbm_params: dict | None = None,
              gru_params: dict | None = None, n_inner: int = 5, parallel: bool | None = None) -> dict[str, dict]:
    """Fit the stackers on oof/<exp>/fold*_valid.csv and write oof/<exp>_stack_{lgbm,gru,blend}/; returns metrics.

    `parallel`: fit the GRU and LightGBM's splits side by side, the same models as in turn (None: when two fits'
    threads fit in the machine's CPUs)."""
    exp_dir = oof_root / exp
    valid_files = fold_files(exp_dir, "valid")
    if not valid_files:
        raise InputError(f"{exp_dir}: no fold*_valid.csv (run the CNN folds first)")
    parts = [read_prediction_csv(p, need_fold=True) for p in valid_files.values()]
    all_valid = pd.concat(parts, ignore_index=True)
    if all_valid[ID_COL].duplicated().any():
        raise InputError(f"{exp_dir}: ID {all_valid.loc[all_valid[ID_COL].duplicated(), ID_COL].iloc[0]} "
                         "appears in two fold*_valid.csv files")
    valid = join_series(meta_train, all_valid, what=f"{exp_dir}/fold*_valid.csv")
    labels = meta_train.set_index(ID_COL).loc[valid[ID_COL], list(LABELS)].to_numpy(dtype=np.float64)
    if np.isnan(labels).any():
        raise InputError("metadata_train lacks labels for some OOF rows")
    groups = valid[PATIENT].to_numpy()
    mode, splits = level2_splits(valid[FOLD_COL].to_numpy(), groups, n_folds, n_inner, seed)

    test_files = fold_files(exp_dir, "test") if meta_test is not None else {}
    test_tables = {f: join_series(meta_test, read_prediction_csv(p, need_fold=True).drop(columns=FOLD_COL),
                                  what=str(p)) for f, p in test_files.items()}
    test_ids = pd.Series(pd.concat([t[ID_COL] for t in test_tables.values()]).unique()) if test_tables else None

    feats = neighbour_features(valid, k)
    # Test rows reach each stacker exactly as its fit rows did: one CNN fold model's predictions at a time (the
    # OOF rows are single-model predictions too), the stacker's outputs then averaged over the fold models. The
    # mean of K models' probabilities is smoother than any one of them, so features built on it would be
    # out of the distribution the stacker was fit on.
    test_feats = [(t[ID_COL], neighbour_features(t, k)) for t in test_tables.values()]
    lgbm_kw = {"random_state": seed, **(lgbm_params or {})}
    results, seconds = {}, {}

    def fit_lgbm(executor: ThreadPoolExecutor | None = None) -> None:
        clock = time.perf_counter()
        results["lgbm"] = cross_fit(
            splits, len(valid),
            fit=lambda rows: LGBMStacker(**lgbm_kw).fit(feats.iloc[rows], labels[rows], groups[rows]),
            predict=lambda m, rows: m.predict_proba(feats.iloc[rows]),
            predict_test=(lambda m: mean_by_id([(ids, m.predict_proba(f)) for ids, f in test_feats], test_ids))
            if test_feats else None, desc="lgbm", executor=executor)
        seconds["lgbm"] = time.perf_counter() - clock

    # Workers that each keep their own cores busy: one LightGBM fit, or the GRU, takes that many threads.
    workers = machine_threads() // max(lgbm_kw.get("n_jobs") or lgbm_threads(len(valid)), torch.get_num_threads())
    if parallel is None:
        parallel = workers >= 2
    emb_note = "none"
    fit_gru: Callable[[], None] | None = None
    if not skip_gru:
        emb_valid = valid_embeddings(exp_dir, valid_files, parts, valid[ID_COL])
        if emb_valid is not None:
            emb_note = f"{emb_valid.shape[1]}-d embeddings"
        X = sequence_inputs(valid)
        series = valid[SERIES_ID].to_numpy()
        for f in test_tables:
            if emb_valid is not None and not (exp_dir / f"fold{f}_test_emb.npy").exists():
                raise InputError(f"{exp_dir}: fold{f}_test_emb.npy missing while the valid embeddings exist")

        def gru_tests():
            """Each fold's test inputs, its embedding read when its turn comes: five of them at once would be
            2.5 GB of float16 at 2048-d."""
            for f, t in test_tables.items():
                emb = read_embeddings(exp_dir, f, "test", t[ID_COL]) if emb_valid is not None else None
                yield t, sequence_inputs(t), emb

        def part(rows):
            return None if emb_valid is None else emb_valid[rows]

        def fit_gru() -> None:
            gru_kw = {"random_state": seed, **(gru_params or {})}
            clock = time.perf_counter()
            results["gru"] = cross_fit(
                splits, len(valid),
                fit=lambda rows: GRUStacker(**gru_kw).fit(X[rows], labels[rows], series[rows], groups[rows],
                                                          emb=part(rows)),
                predict=lambda m, rows: m.predict_proba(X[rows], series[rows], emb=part(rows)),
                predict_test=(lambda m: gru_over_folds(m, gru_tests(), test_ids)) if test_tables else None,
                desc="gru")
            seconds["gru"] = time.perf_counter() - clock

    # Each fit keeps its cores busy from C (LightGBM's rounds, torch's kernels; both let go of the GIL there). The
    # GRU's splits stay in turn (torch's one global random stream); LightGBM's splits, each seeded by its own
    # parameters, fill the other workers and then the GRU's: the same models as in turn.
    pool = ThreadPoolExecutor(max(2, workers), thread_name_prefix="stack") if parallel else None
    with pool or nullcontext():
        gru_done = pool.submit(fit_gru) if pool is not None and fit_gru is not None else None
        fit_lgbm(pool)
        if gru_done is not None:
            gru_done.result()
        elif fit_gru is not None:
            fit_gru()
    if not skip_gru:
        results = {"lgbm": results["lgbm"], "gru": results["gru"]}  # in this order whichever finished first
        # Blend = plain mean: choosing weights on the same OOF it is scored on would leak a little.
        blend_test = None if results["lgbm"].test is None else (results["lgbm"].test + results["gru"].test) / 2
        results["blend"] = CVResult((results["lgbm"].oof + results["gru"].oof) / 2, blend_test)

    save_stackers(exp, results, {
        "exp": exp, "cv_mode": mode, "n_models": len(splits), "k": k, "seed": seed,
        "cnn_folds": list(test_tables) or list(valid_files), "folds_available": list(valid_files),
        "with_volume": VOLUME_COL in valid.columns, "lgbm_features": list(feats.columns),
        "emb_dim": None if emb_note == "none" else int(emb_valid.shape[1]), "lgbm_test": "per fold model, averaged",
        "gru_n_features": None if skip_gru else int(X.shape[1]),
    })
    cnn = valid[list(LABELS)].to_numpy(dtype=np.float64)
    out = {}
    for kind, res in results.items():
        target = oof_root / f"{exp}_stack_{kind}"
        frame = pd.DataFrame(res.oof, columns=list(LABELS))
        write_csv(pd.concat([valid[[ID_COL, FOLD_COL]], frame], axis=1), target / "stack_valid.csv")
        if res.test is not None:
            test_frame = pd.DataFrame(res.test, columns=list(LABELS))
            test_frame.insert(0, FOLD_COL, -1)
            test_frame.insert(0, ID_COL, test_ids.to_numpy())
            write_csv(test_frame, target / "stack_test.csv")
        metrics = {
            "exp": exp, "stacker": kind, "cv_mode": mode, "folds_available": list(valid_files),
            "n_folds": n_folds, "n_models": len(splits), "k": k, "seed": seed, "gru_inputs": emb_note,
            "test_source": "each CNN fold model's test predictions through each CV model (fit on OOF rows only), "
                           "averaged; no refit on all OOF",
            "blend": "plain mean of lgbm and gru", "stacked": score_table(labels, res.oof),
            "cnn_same_rows": score_table(labels, cnn),
            "seconds": round(sum(seconds.values()) if kind == "blend" else seconds[kind], 1),
            "work": work_done(res.models),
        }
        write_json(metrics, target / "metrics.json")
        out[kind] = metrics
        print(f"{kind}: weighted log loss {metrics['stacked']['weighted_log_loss']:.5f} "
              f"(CNN {metrics['cnn_same_rows']['weighted_log_loss']:.5f}) -> {target}")
    return out
