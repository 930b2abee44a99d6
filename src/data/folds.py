"""Patient-grouped, stratified K folds over the train images (no patient in two folds)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from src import paths
from src.atomic import write_csv, write_json
from src.constants import FOLD_COL, ID_COL
from src.data.metadata import load_metadata
from src.errors import InputError, run_cli
from src.predictions import fold_assignment_digest

SPLIT_MARKER = "folds.json"  # in a fold's model folder: the split its checkpoints were trained on

FOLD_COLUMNS = [ID_COL, "PatientID", "StudyInstanceUID", FOLD_COL]


def make_folds(meta: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """StratifiedGroupKFold grouped by PatientID, stratified on whether the patient has any positive slice."""
    missing = [c for c in (ID_COL, "PatientID", "StudyInstanceUID", "any") if c not in meta.columns]
    if missing:
        raise InputError(f"make_folds: metadata lacks columns {missing} (train metadata with labels is needed)")
    if n_folds < 2:
        raise InputError(f"--n-folds {n_folds}: need at least 2 folds")
    # Sort by ID so the assignment depends on the data and the seed only, not on the row order given.
    df = meta[[ID_COL, "PatientID", "StudyInstanceUID", "any"]].sort_values(ID_COL, kind="mergesort")
    df = df.reset_index(drop=True)
    n_patients = df["PatientID"].nunique()
    if n_patients < n_folds:
        raise InputError(f"{n_patients} patients cannot fill {n_folds} folds: use --n-folds {n_patients} or fewer")
    positive_patient = df.groupby("PatientID")["any"].transform("max").astype(int).to_numpy()
    # With fewer positive (or negative) patients than folds, stratifying is impossible; group-only split then.
    n_pos = df.loc[positive_patient == 1, "PatientID"].nunique()
    y = positive_patient if min(n_pos, n_patients - n_pos) >= n_folds else np.zeros(len(df), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(df), -1, dtype=np.int64)
    for k, (_, valid) in enumerate(splitter.split(np.zeros(len(df)), y, groups=df["PatientID"].to_numpy())):
        fold[valid] = k
    df[FOLD_COL] = fold
    return df[FOLD_COLUMNS]


def load_folds(data_dir: str | os.PathLike, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """paths.folds_csv for (data, k, seed), built from the train metadata and written if missing."""
    data_dir = Path(data_dir).resolve()
    out = paths.folds_csv(n_folds, seed, data_dir)
    meta = load_metadata(data_dir, "train")
    if out.exists():
        folds = pd.read_csv(out, dtype={ID_COL: str, "PatientID": str, "StudyInstanceUID": str})
        if set(folds[ID_COL]) == set(meta[ID_COL]):
            return folds
        # The data changed under the same folder name: folds (and any OOF made with them) are stale.
        print(f"{out}: does not match the images in {data_dir}; rebuilding it (re-train folds made with the old one)")
    folds = make_folds(meta, n_folds, seed)
    write_csv(folds, out)
    counts = folds.groupby(FOLD_COL).agg(images=(ID_COL, "size"), patients=("PatientID", "nunique"))
    print(f"wrote {out}\n{counts.to_string()}")
    return folds


def fold_split(data_dir: str | os.PathLike, n_folds: int = 5, seed: int = 42) -> dict:
    """{"file", "sha1"} of the folds in use (load_folds): recorded beside checkpoints and predictions."""
    folds = load_folds(data_dir, n_folds, seed)
    path = paths.folds_csv(n_folds, seed, Path(data_dir).resolve())
    return {"file": str(path), "sha1": fold_assignment_digest(folds)}


def guard_model_split(model_dir: Path, split: dict, write: bool = True) -> None:
    """Refuse to resume or reuse a fold whose checkpoints were trained on another split (its valid rows may have
    been training rows); otherwise record the split (model folders from before this record are adopted)."""
    marker = Path(model_dir) / SPLIT_MARKER
    if marker.exists():
        try:
            then = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{marker}: unreadable ({err}); delete it to adopt the current folds") from err
        if then.get("sha1") != split["sha1"]:
            raise InputError(f"{model_dir}: trained on fold split {str(then.get('sha1'))[:10]}, but {split['file']} is "
                             f"{split['sha1'][:10]} (the data or the folds changed); delete {model_dir} and its "
                             "fold's predictions to train it again")
        # The same images and folds can still be other training data: a copy with its masks removed, or another
        # extra_train folder under the same path. A marker from before this record carries no identity: adopted.
        if then.get("data") and split.get("data") and then["data"] != split["data"]:
            raise InputError(f"{model_dir}: trained on other data with the same images and folds (e.g. a copy with "
                             f"or without its masks, or a changed extra_train folder); delete {model_dir} and its "
                             "fold's predictions, or set another exp, to train on this data")
        if write and split.get("data") and not then.get("data"):  # adopted: from now on its data is known
            write_json(split, marker)
    elif write:
        write_json(split, marker)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.data.folds", description=__doc__)
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    load_folds(paths.resolve_data_dir(args.data), args.n_folds, args.seed)
    return 0


if __name__ == "__main__":
    run_cli(main)
