"""Fit the stackers on an experiment's OOF and write oof/<exp>_stack_{lgbm,gru,blend}/ (+ the saved models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.atomic import write_csv, write_json
from src.constants import FOLD_COL, ID_COL, LABELS, PATIENT, VOLUME_COL
from src.errors import InputError
from src.metric import score_table
from src.predictions import fold_files, mean_over_folds, read_embeddings, read_prediction_csv
from src.stack.bundle import gru_over_folds, save_stackers
from src.stack.cv import CVResult, cross_fit, level2_splits
from src.stack.features import SERIES_ID, join_series, neighbour_features, sequence_emb_start, sequence_inputs
from src.stack.gru import GRUStacker
from src.stack.lgbm import LGBMStacker


def run_stack(exp: str, oof_root: Path, meta_train: pd.DataFrame, meta_test: pd.DataFrame | None, n_folds: int,
              k: int = 5, seed: int = 0, skip_gru: bool = False, lgbm_params: dict | None = None,
              gru_params: dict | None = None, n_inner: int = 5) -> dict[str, dict]:
    """Fit the stackers on oof/<exp>/fold*_valid.csv and write oof/<exp>_stack_{lgbm,gru,blend}/; returns metrics."""
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
    test_parts = {f: read_prediction_csv(p, need_fold=True) for f, p in test_files.items()}
    test_mean = None
    if test_parts:
        mean = mean_over_folds([p.drop(columns=FOLD_COL) for p in test_parts.values()])
        test_mean = join_series(meta_test, mean, what=f"{exp_dir}/fold*_test.csv")

    feats = neighbour_features(valid, k)
    test_feats = neighbour_features(test_mean, k) if test_mean is not None else None
    lgbm_kw = {"random_state": seed, **(lgbm_params or {})}
    results = {"lgbm": cross_fit(
        splits, len(valid),
        fit=lambda rows: LGBMStacker(**lgbm_kw).fit(feats.iloc[rows], labels[rows], groups[rows]),
        predict=lambda m, rows: m.predict_proba(feats.iloc[rows]),
        predict_test=(lambda m: m.predict_proba(test_feats)) if test_feats is not None else None, desc="lgbm")}

    emb_note = "none"
    if not skip_gru:
        embs = [read_embeddings(exp_dir, f, "valid", p[ID_COL]) for f, p in zip(valid_files, parts)]
        use_emb = all(e is not None for e in embs)
        if use_emb:
            emb_ids = pd.Index(pd.concat([p[ID_COL] for p in parts], ignore_index=True))
            emb_valid = np.concatenate(embs)[emb_ids.get_indexer(valid[ID_COL])]
            emb_note = f"{emb_valid.shape[1]}-d embeddings"
        X = sequence_inputs(valid, emb_valid if use_emb else None)
        series = valid[SERIES_ID].to_numpy()
        gru_tests = []
        for f, part in test_parts.items():
            table = join_series(meta_test, part.drop(columns=FOLD_COL), what=f"{exp_dir}/fold{f}_test.csv")
            emb = read_embeddings(exp_dir, f, "test", table[ID_COL]) if use_emb else None
            if use_emb and emb is None:
                raise InputError(f"{exp_dir}: fold{f}_test_emb.npy missing while the valid embeddings exist")
            gru_tests.append((table, sequence_inputs(table, emb)))
        gru_kw = {"random_state": seed, "emb_start": sequence_emb_start(valid) if use_emb else None,
                  **(gru_params or {})}

        results["gru"] = cross_fit(
            splits, len(valid),
            fit=lambda rows: GRUStacker(**gru_kw).fit(X[rows], labels[rows], series[rows], groups[rows]),
            predict=lambda m, rows: m.predict_proba(X[rows], series[rows]),
            predict_test=(lambda m: gru_over_folds(m, gru_tests, test_mean[ID_COL])) if gru_tests else None,
            desc="gru")
        # Blend = plain mean: choosing weights on the same OOF it is scored on would leak a little.
        blend_test = None if results["lgbm"].test is None else (results["lgbm"].test + results["gru"].test) / 2
        results["blend"] = CVResult((results["lgbm"].oof + results["gru"].oof) / 2, blend_test)

    save_stackers(exp, results, {
        "exp": exp, "cv_mode": mode, "n_models": len(splits), "k": k, "seed": seed,
        "cnn_folds": list(test_parts) or list(valid_files), "folds_available": list(valid_files),
        "with_volume": VOLUME_COL in valid.columns, "lgbm_features": list(feats.columns),
        "emb_dim": None if emb_note == "none" else int(emb_valid.shape[1]),
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
            test_frame.insert(0, ID_COL, test_mean[ID_COL].to_numpy())
            write_csv(test_frame, target / "stack_test.csv")
        metrics = {
            "exp": exp, "stacker": kind, "cv_mode": mode, "folds_available": list(valid_files),
            "n_folds": n_folds, "n_models": len(splits), "k": k, "seed": seed, "gru_inputs": emb_note,
            "test_source": "mean over the CV models (each fit on OOF rows only); no refit on all OOF",
            "blend": "plain mean of lgbm and gru", "stacked": score_table(labels, res.oof),
            "cnn_same_rows": score_table(labels, cnn),
        }
        write_json(metrics, target / "metrics.json")
        out[kind] = metrics
        print(f"{kind}: weighted log loss {metrics['stacked']['weighted_log_loss']:.5f} "
              f"(CNN {metrics['cnn_same_rows']['weighted_log_loss']:.5f}) -> {target}")
    return out
