"""Level-2 stacking over slice sequences: LightGBM on neighbour features, a BiGRU, their blend; fold-safe CV."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupKFold
from tqdm import tqdm

from src.atomic import write_csv, write_json, write_text
from src.constants import FOLD_COL, ID_COL, LABELS, VOLUME_COL
from src.errors import InputError, run_cli
from src.metrics import score_table
from src.stack_bundle import gru_over_folds, mean_over_folds, save_stackers
from src.stack_diagnostics import information_markdown, neighbour_information
from src.stack_features import SERIES_ID, join_series, neighbour_features, sequence_emb_start, sequence_inputs
from src.stack_gru import GRUStacker
from src.stack_lgbm import LGBMStacker

KINDS = ("lgbm", "gru", "blend")


def level2_splits(folds: np.ndarray, groups: np.ndarray, n_folds: int, n_inner: int = 5,
                  seed: int = 0) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(mode, [(fit rows, predicted rows)]). All n_folds present: leave one CNN fold out, on the same folds.
    Otherwise: patient-grouped K-fold inside the available OOF rows. Every row is predicted exactly once."""
    present = sorted(np.unique(folds).tolist())
    if present == list(range(n_folds)) and n_folds >= 2:
        return "same_folds", [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in present]
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise InputError(f"the available OOF holds {n_groups} patient(s); stacking needs at least 2")
    splitter = GroupKFold(n_splits=min(n_inner, n_groups), shuffle=True, random_state=seed)
    return "inner_group_cv", [(tr, va) for tr, va in splitter.split(folds, groups=groups)]


@dataclass
class CVResult:
    oof: np.ndarray
    test: np.ndarray | None
    log: list[dict] = field(default_factory=list)  # per model: fit rows and predicted rows (row numbers)
    models: list = field(default_factory=list)  # the fitted split models, kept for reuse on new series


def cross_fit(splits: list[tuple[np.ndarray, np.ndarray]], n_rows: int, fit: Callable[[np.ndarray], object],
              predict: Callable[[object, np.ndarray], np.ndarray],
              predict_test: Callable[[object], np.ndarray] | None = None, desc: str = "stack") -> CVResult:
    """Fit one model per split on its fit rows, predict its held-out rows; test = mean over the split models
    (each fit on OOF rows only, so the test path never sees a model fit on what it scores)."""
    oof = np.full((n_rows, len(LABELS)), np.nan)
    tests, log, models = [], [], []
    for fit_rows, pred_rows in tqdm(splits, desc=desc, leave=False):
        if np.intersect1d(fit_rows, pred_rows).size:
            raise RuntimeError("a split fits and predicts the same row")
        model = fit(fit_rows)
        oof[pred_rows] = predict(model, pred_rows)
        if predict_test is not None:
            tests.append(predict_test(model))
        log.append({"fit_rows": fit_rows, "pred_rows": pred_rows})
        models.append(model)
    if np.isnan(oof).any():
        raise RuntimeError("some OOF rows were never predicted")
    return CVResult(oof, np.mean(tests, axis=0) if tests else None, log, models)


def read_predictions(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={ID_COL: str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{path}: cannot read ({err})") from err
    missing = [c for c in (ID_COL, FOLD_COL, *LABELS) if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}")
    if df[ID_COL].duplicated().any():
        raise InputError(f"{path}: duplicate IDs, e.g. {df.loc[df[ID_COL].duplicated(), ID_COL].iloc[0]}")
    return df


def read_embeddings(exp_dir: Path, fold: int, split: str, ids: pd.Series) -> np.ndarray | None:
    """fold{K}_{split}_emb.npy rows aligned to `ids`; None when the pair of files is absent."""
    npy, ids_csv = exp_dir / f"fold{fold}_{split}_emb.npy", exp_dir / f"fold{fold}_{split}_emb_ids.csv"
    if not (npy.exists() and ids_csv.exists()):
        return None
    emb = np.load(npy)
    emb_ids = pd.read_csv(ids_csv, dtype={ID_COL: str})[ID_COL]
    if len(emb_ids) != len(emb):
        raise InputError(f"{ids_csv}: {len(emb_ids)} IDs for {len(emb)} embedding rows in {npy.name}")
    row = pd.Series(np.arange(len(emb_ids)), index=emb_ids.to_numpy())
    lost = ~ids.isin(row.index)
    if lost.any():
        raise InputError(f"{npy}: no embedding for {int(lost.sum())} IDs, e.g. {ids[lost].iloc[0]}")
    return emb[row.loc[ids.to_numpy()].to_numpy()]


def _fold_files(exp_dir: Path, split: str) -> dict[int, Path]:
    files = {}
    for path in exp_dir.glob(f"fold*_{split}.csv"):
        tag = path.name[len("fold") : -len(f"_{split}.csv")]
        if tag.isdigit():
            files[int(tag)] = path
    return dict(sorted(files.items()))


def _run_config(exp_dir: Path) -> dict:
    """The resolved training config saved beside the OOF (fold*_run.json), or {} when there is none."""
    for path in sorted(exp_dir.glob("fold*_run.json")):
        try:
            return json.loads(path.read_text()).get("config", {})
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable run record ({err})") from err
    return {}


def run_stack(exp: str, oof_root: Path, meta_train: pd.DataFrame, meta_test: pd.DataFrame | None, n_folds: int,
              k: int = 5, seed: int = 0, skip_gru: bool = False, lgbm_params: dict | None = None,
              gru_params: dict | None = None, n_inner: int = 5) -> dict[str, dict]:
    """Fit the stackers on oof/<exp>/fold*_valid.csv and write oof/<exp>_stack_{lgbm,gru,blend}/; returns metrics."""
    exp_dir = oof_root / exp
    valid_files = _fold_files(exp_dir, "valid")
    if not valid_files:
        raise InputError(f"{exp_dir}: no fold*_valid.csv (run the CNN folds first)")
    parts = [read_predictions(p) for p in valid_files.values()]
    all_valid = pd.concat(parts, ignore_index=True)
    if all_valid[ID_COL].duplicated().any():
        raise InputError(f"{exp_dir}: ID {all_valid.loc[all_valid[ID_COL].duplicated(), ID_COL].iloc[0]} "
                         "appears in two fold*_valid.csv files")
    valid = join_series(meta_train, all_valid, what=f"{exp_dir}/fold*_valid.csv")
    labels = meta_train.set_index(ID_COL).loc[valid[ID_COL], list(LABELS)].to_numpy(dtype=np.float64)
    if np.isnan(labels).any():
        raise InputError("metadata_train lacks labels for some OOF rows")
    groups = valid["PatientID"].to_numpy()
    mode, splits = level2_splits(valid[FOLD_COL].to_numpy(), groups, n_folds, n_inner, seed)

    test_files = _fold_files(exp_dir, "test") if meta_test is not None else {}
    test_parts = {f: read_predictions(p) for f, p in test_files.items()}
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


def compare_predictions(meta_train: pd.DataFrame, preds: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Weighted log loss and AUC (`any`, mean of six) per prediction set, at slice and study level (study
    probability and label = max over its slices), all on the rows every set shares."""
    common = set.intersection(*(set(df[ID_COL]) for df in preds.values()))
    meta = meta_train.set_index(ID_COL)
    ids = meta.index[meta.index.isin(common)]
    if len(ids) == 0:
        raise InputError("the prediction sets share no rows")
    y = meta.loc[ids, list(LABELS)].to_numpy(dtype=np.float64)
    study = meta.loc[ids, "StudyInstanceUID"].to_numpy()
    y_study = pd.DataFrame(y).groupby(study).max()
    rows = []
    for name, df in preds.items():
        p = df.set_index(ID_COL).loc[ids, list(LABELS)].to_numpy(dtype=np.float64)
        p_study = pd.DataFrame(p).groupby(study).max().loc[y_study.index]
        row = {"predictions": name, "slices": len(ids), "studies": len(y_study)}
        for level, (yt, yp) in {"slice": (y, p), "study": (y_study.to_numpy(), p_study.to_numpy())}.items():
            scores = score_table(yt, yp)
            row[f"{level}_wll"] = scores["weighted_log_loss"]
            row[f"{level}_auc_any"] = scores["auc"]["any"]
            row[f"{level}_auc_mean"] = float(np.nanmean(list(scores["auc"].values())))
        rows.append(row)
    table = pd.DataFrame(rows)
    for level in ("slice", "study"):
        base = table[f"{level}_wll"].iloc[0]
        table[f"{level}_wll_cut_%"] = 100.0 * (base - table[f"{level}_wll"]) / base
    return table


def markdown_table(table: pd.DataFrame) -> str:
    cells = [[f"{v:.5f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


def run_compare(exp: str, oof_root: Path, meta_train: pd.DataFrame, n_folds: int, n_inner: int = 5,
                seed: int = 0) -> pd.DataFrame:
    """Print and write oof/<exp>_stack_compare.md: the CNN's OOF vs each stacker present, then how much the
    neighbouring slices can tell at all (`src.stack_diagnostics`), on the same level-2 splits as the stackers."""
    valid_files = _fold_files(oof_root / exp, "valid")
    if not valid_files:
        raise InputError(f"{oof_root / exp}: no fold*_valid.csv")
    preds = {"cnn": pd.concat([read_predictions(p) for p in valid_files.values()], ignore_index=True)}
    cnn = join_series(meta_train, preds["cnn"], what=f"{oof_root / exp}/fold*_valid.csv")
    y = meta_train.set_index(ID_COL).loc[cnn[ID_COL], list(LABELS)].to_numpy(dtype=np.float64)
    _, splits = level2_splits(cnn[FOLD_COL].to_numpy(), cnn["PatientID"].to_numpy(), n_folds, n_inner, seed)
    info = neighbour_information(cnn, y, cnn[list(LABELS)].to_numpy(dtype=np.float64), splits)
    for kind in KINDS:
        path = oof_root / f"{exp}_stack_{kind}" / "stack_valid.csv"
        if path.exists():
            preds[f"stack_{kind}"] = read_predictions(path)
    if len(preds) == 1:
        raise InputError(f"{oof_root}: no {exp}_stack_*/stack_valid.csv (run python -m src.stack --exp {exp})")
    table = compare_predictions(meta_train, preds)
    text = (f"# Stacking vs CNN: {exp}\n\nOOF rows of folds {list(valid_files)}; wll = weighted log loss; "
            f"study = max over slices; cut = reduction of the CNN's wll.\n\n{markdown_table(table)}\n"
            f"{information_markdown(info)}")
    write_text(text, oof_root / f"{exp}_stack_compare.md")
    print(text)
    return table


def main(argv: list[str] | None = None) -> int:
    # Imported here: the metadata stage pulls in pydicom, which the pure stacking functions never need.
    from src.config import Config
    from src.metadata import load_metadata
    from src.paths import OOF_DIR, resolve_data_dir

    parser = argparse.ArgumentParser(prog="python -m src.stack", description=__doc__)
    parser.add_argument("--exp", required=True, help="experiment name: reads oof/EXP/fold*_{valid,test}.csv")
    parser.add_argument("--data", help="data directory (default: the one in oof/EXP/fold*_run.json, else "
                        "$ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--k", type=int, default=5, help="neighbours on each side for the LightGBM features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-gru", action="store_true", help="LightGBM only (no GRU, no blend)")
    parser.add_argument("--compare", action="store_true", help="only write the comparison of existing outputs")
    parser.add_argument("--n-folds", type=int, help="folds of the CNN's CV (default: from fold*_run.json)")
    parser.add_argument("--n-inner", type=int, default=5, help="inner CV folds when some CNN folds are missing")
    parser.add_argument("--device", default="cpu", help="GRU device: cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for LightGBM and torch")
    parser.add_argument("--oof-root", default=str(OOF_DIR), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.k < 0:
        raise InputError(f"--k must be >= 0, got {args.k}")
    oof_root = Path(args.oof_root)
    run_cfg = _run_config(oof_root / args.exp)
    recorded = run_cfg.get("data_dir") or ""
    data_dir = resolve_data_dir(args.data or (recorded if recorded and Path(recorded).is_dir() else None))
    n_folds = args.n_folds or int(run_cfg.get("n_folds") or Config().n_folds)
    meta_train = load_metadata(data_dir, "train")
    if not args.compare:
        has_test = bool(_fold_files(oof_root / args.exp, "test"))
        meta_test = load_metadata(data_dir, "test") if has_test else None
        torch.set_num_threads(args.threads)
        run_stack(args.exp, oof_root, meta_train, meta_test, n_folds, args.k, args.seed, args.skip_gru,
                  lgbm_params={"n_jobs": args.threads}, gru_params={"device": args.device}, n_inner=args.n_inner)
    run_compare(args.exp, oof_root, meta_train, n_folds, args.n_inner, args.seed)
    return 0


if __name__ == "__main__":
    run_cli(main)
