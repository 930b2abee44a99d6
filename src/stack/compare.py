"""The CNN's OOF against each stacker's, at slice and study level: oof/<exp>_stack_compare.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.atomic import write_text
from src.constants import FOLD_COL, ID_COL, LABELS, PATIENT, STUDY
from src.errors import InputError
from src.markdown import markdown_table
from src.metric import score_table
from src.predictions import fold_files, read_prediction_csv
from src.stack.bundle import KINDS
from src.stack.cv import level2_splits
from src.stack.diagnostics import information_markdown, neighbour_information
from src.stack.features import join_series


def compare_predictions(meta_train: pd.DataFrame, preds: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Weighted log loss and AUC (`any`, mean of six) per prediction set, at slice and study level (study
    probability and label = max over its slices), all on the rows every set shares."""
    common = set.intersection(*(set(df[ID_COL]) for df in preds.values()))
    meta = meta_train.set_index(ID_COL)
    ids = meta.index[meta.index.isin(common)]
    if len(ids) == 0:
        raise InputError("the prediction sets share no rows")
    y = meta.loc[ids, list(LABELS)].to_numpy(dtype=np.float64)
    study = meta.loc[ids, STUDY].to_numpy()
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


def run_compare(exp: str, oof_root: Path, meta_train: pd.DataFrame, n_folds: int, n_inner: int = 5,
                seed: int = 0) -> pd.DataFrame:
    """Print and write oof/<exp>_stack_compare.md: the CNN's OOF vs each stacker present, then how much the
    neighbouring slices can tell at all (`src.stack.diagnostics`), on the same level-2 splits as the stackers."""
    valid_files = fold_files(oof_root / exp, "valid")
    if not valid_files:
        raise InputError(f"{oof_root / exp}: no fold*_valid.csv")
    parts = [read_prediction_csv(p, need_fold=True) for p in valid_files.values()]
    preds = {"cnn": pd.concat(parts, ignore_index=True)}
    cnn = join_series(meta_train, preds["cnn"], what=f"{oof_root / exp}/fold*_valid.csv")
    y = meta_train.set_index(ID_COL).loc[cnn[ID_COL], list(LABELS)].to_numpy(dtype=np.float64)
    _, splits = level2_splits(cnn[FOLD_COL].to_numpy(), cnn[PATIENT].to_numpy(), n_folds, n_inner, seed)
    info = neighbour_information(cnn, y, cnn[list(LABELS)].to_numpy(dtype=np.float64), splits)
    for kind in KINDS:
        path = oof_root / f"{exp}_stack_{kind}" / "stack_valid.csv"
        if path.exists():
            preds[f"stack_{kind}"] = read_prediction_csv(path, need_fold=True)
    if len(preds) == 1:
        raise InputError(f"{oof_root}: no {exp}_stack_*/stack_valid.csv (run python -m src.stack --exp {exp})")
    table = compare_predictions(meta_train, preds)
    text = (f"# Stacking vs CNN: {exp}\n\nOOF rows of folds {list(valid_files)}; wll = weighted log loss; "
            f"study = max over slices; cut = reduction of the CNN's wll.\n\n{markdown_table(table, digits=5)}\n"
            f"{information_markdown(info)}")
    write_text(text, oof_root / f"{exp}_stack_compare.md")
    print(text)
    return table
