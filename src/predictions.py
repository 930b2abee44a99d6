"""The prediction table, the contract between stages: the one place that knows its columns and file names.

One row per slice: `ID`, `fold`, the six probabilities in LABELS order (never logits), optionally
`blood_volume_mm3`. A CNN experiment writes `oof/<exp>/fold{K}_{valid,test}.csv`, float16 embeddings
`fold{K}_{split}_emb.npy` with their `fold{K}_{split}_emb_ids.csv`, `fold{K}_metrics.json` and the run record
`fold{K}_run.json` (docs/formats.md). Always join on ID, never on row position.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from src.atomic import write_csv, write_json, write_npy
from src.config import Config, run_record
from src.constants import FOLD_COL, ID_COL, LABELS, VOLUME_COL
from src.errors import InputError
from src.metric import score_table
from src.paths import OOF_DIR


def exp_dir(exp: str) -> Path:
    return OOF_DIR / exp


# ---------------------------------------------------------------- reading


def read_prediction_csv(path: Path, need_fold: bool = False) -> pd.DataFrame:
    """One prediction table; InputError naming the file when columns, IDs or values are bad."""
    try:
        df = pd.read_csv(path, dtype={ID_COL: str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read prediction table ({err})") from err
    missing = [c for c in (ID_COL, *([FOLD_COL] if need_fold else []), *LABELS) if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    values = df[list(LABELS)].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1) | ((values < 0) | (values > 1)).any(axis=1)
    if bad.any():
        raise InputError(
            f"{path}: {int(bad.sum())} row(s) with a missing, non-numeric or out-of-[0,1] probability, "
            f"first ID {df.loc[bad.idxmax(), ID_COL]}"
        )
    df[list(LABELS)] = values
    if df[ID_COL].duplicated().any():
        raise InputError(f"{path}: ID {df.loc[df[ID_COL].duplicated(), ID_COL].iloc[0]} appears twice")
    return df


def fold_files(pred_dir: Path, split: str) -> dict[int, Path]:
    """{K: oof/<exp>/fold{K}_{split}.csv} for every numbered fold present, in fold order; refuses files made with
    different fold splits, or with a folds file that has changed since (check_fold_split)."""
    files = {}
    for path in Path(pred_dir).glob(f"fold*_{split}.csv"):
        tag = path.name[len("fold") : -len(f"_{split}.csv")]
        if tag.isdigit():
            files[int(tag)] = path
    files = dict(sorted(files.items()))
    check_fold_split(Path(pred_dir), files)
    return files


def recorded_split(pred_dir: Path, fold: int) -> dict:
    """The fold split a fold's outputs were made with ({"file", "sha1"} from fold{K}_run.json), {} if unrecorded."""
    path = Path(pred_dir) / f"fold{fold}_run.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get("folds") or {}
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable run record ({err})") from err


def check_fold_split(pred_dir: Path, files: dict[int, Path]) -> str | None:
    """The one fold split behind `files` (its sha1; None when no run record names it); InputError naming the files
    when they come from different splits, or when their folds file now holds another split (the data changed)."""
    by_split: dict[str, list[str]] = {}
    for fold, path in files.items():
        split = recorded_split(pred_dir, fold)
        if split.get("sha1"):
            by_split.setdefault(split["sha1"], []).append(path.name)
            now = split_digest(Path(split["file"])) if split.get("file") else None
            if now is not None and now != split["sha1"]:
                raise InputError(f"{path}: made with fold split {split['sha1'][:10]}, but {split['file']} now holds "
                                 f"{now[:10]}: that fold was trained on other folds; re-run it (delete its model dir)")
    if len(by_split) > 1:
        shown = "; ".join(f"{', '.join(names)} with split {sha[:10]}" for sha, names in by_split.items())
        raise InputError(f"{pred_dir}: predictions from different fold splits ({shown}); re-run the stale folds")
    return next(iter(by_split), None)


def split_digest(folds_csv: Path) -> str | None:
    """sha1 of a folds file's (ID, fold) assignment, independent of row order; None when the file is absent."""
    if not folds_csv.exists():
        return None
    stat = folds_csv.stat()
    key = (str(folds_csv.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _DIGESTS:  # 752k rows: read once per process, not once per fold file
        _DIGESTS[key] = _read_split_digest(folds_csv)
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


def _read_split_digest(folds_csv: Path) -> str:
    try:
        folds = pd.read_csv(folds_csv, usecols=[ID_COL, FOLD_COL], dtype={ID_COL: str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{folds_csv}: unreadable folds file ({err})") from err
    return fold_assignment_digest(folds)


def fold_assignment_digest(folds: pd.DataFrame) -> str:
    """sha1 of the (ID, fold) pairs sorted by ID: two folds tables get the same digest iff they split alike."""
    pairs = folds[[ID_COL, FOLD_COL]].sort_values(ID_COL, kind="mergesort")
    text = "\n".join(f"{i},{int(f)}" for i, f in pairs.itertuples(index=False, name=None))
    return hashlib.sha1(text.encode()).hexdigest()


def read_prediction_files(pred_dir: str | Path, split: str) -> list[tuple[Path, pd.DataFrame]]:
    """Every `*_{split}.csv` of a prediction directory, read and validated; none at all is an error."""
    pred_dir = Path(pred_dir)
    files = sorted(pred_dir.glob(f"*_{split}.csv"))
    if not files:
        raise InputError(f"{pred_dir}: no *_{split}.csv prediction files")
    return [(path, read_prediction_csv(path)) for path in files]


def load_valid_predictions(pred_dir: str | Path) -> pd.DataFrame:
    """All `*_valid.csv` of a prediction directory concatenated; an ID in two files is an error naming both."""
    fold_files(Path(pred_dir), "valid")  # refuses OOF of different fold splits before anything is read
    parts = [df.assign(source=path.name) for path, df in read_prediction_files(pred_dir, "valid")]
    valid = pd.concat(parts, ignore_index=True)
    dup = valid[ID_COL].duplicated(keep=False)
    if dup.any():
        first = valid.loc[dup, ID_COL].iloc[0]
        where = sorted(set(valid.loc[valid[ID_COL] == first, "source"]))
        raise InputError(
            f"{pred_dir}: ID {first} appears {int((valid[ID_COL] == first).sum())} times "
            f"(in {', '.join(where)}); {valid.loc[dup, ID_COL].nunique()} duplicated ID(s) in all"
        )
    return valid


def mean_over_folds(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """ID + every numeric column averaged over the fold models' tables (probabilities, volume), first-seen ID order."""
    stacked = pd.concat(parts)
    num = [c for c in stacked.columns if c != ID_COL and pd.api.types.is_numeric_dtype(stacked[c])]
    return stacked.groupby(ID_COL, sort=False)[num].mean().reset_index()


def load_fold_test_predictions(pred_dir: str | Path) -> dict[int, pd.DataFrame]:
    """{K: ID + six probabilities of fold K's model on the test images}, for the folds of one fold split."""
    return {k: read_prediction_csv(path)[[ID_COL, *LABELS]] for k, path in fold_files(Path(pred_dir), "test").items()}


def load_test_predictions(pred_dir: str | Path) -> pd.DataFrame:
    """ID + six probabilities: the mean over exactly the fold{K}_test.csv of one fold split when there are any
    (other *_test.csv, e.g. a stale or all-folds model's, are named and left out); otherwise the directory's one
    *_test.csv (a stacker's); several unnumbered ones are an error naming them."""
    pred_dir = Path(pred_dir)
    members = load_fold_test_predictions(pred_dir)
    others = sorted(p.name for p in pred_dir.glob("*_test.csv") if p.name not in {f"fold{k}_test.csv" for k in members})
    if members:
        if others:
            print(f"note: {pred_dir}: averaging fold{','.join(map(str, members))}_test.csv only; left out "
                  f"{', '.join(others)}")
        return mean_over_folds(list(members.values()))[[ID_COL, *LABELS]]
    if len(others) > 1:
        raise InputError(f"{pred_dir}: several test prediction files and no fold{{K}}_test.csv ({', '.join(others)}); "
                         "point --pred at a folder holding one model's")
    return read_prediction_files(pred_dir, "test")[0][1][[ID_COL, *LABELS]]


def read_embeddings(pred_dir: Path, fold: int, split: str, ids: pd.Series) -> np.ndarray | None:
    """fold{K}_{split}_emb.npy rows aligned to `ids`; None when the pair of files is absent."""
    npy, ids_csv = pred_dir / f"fold{fold}_{split}_emb.npy", pred_dir / f"fold{fold}_{split}_emb_ids.csv"
    if not (npy.exists() and ids_csv.exists()):
        return None
    emb = np.load(npy, mmap_mode="r")
    emb_ids = pd.read_csv(ids_csv, dtype={ID_COL: str})[ID_COL]
    if len(emb_ids) != len(emb):
        raise InputError(f"{ids_csv}: {len(emb_ids)} IDs for {len(emb)} embedding rows in {npy.name}")
    row = pd.Series(np.arange(len(emb_ids)), index=emb_ids.to_numpy())
    lost = ~ids.isin(row.index)
    if lost.any():
        raise InputError(f"{npy}: no embedding for {int(lost.sum())} IDs, e.g. {ids[lost].iloc[0]}")
    return np.asarray(emb[row.loc[ids.to_numpy()].to_numpy()])


def run_config(pred_dir: Path) -> dict:
    """The resolved training config saved beside the OOF (fold*_run.json), or {} when there is none."""
    for path in sorted(Path(pred_dir).glob("*_run.json")):
        try:
            config = json.loads(path.read_text()).get("config", {})
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable run record ({err})") from err
        if config:
            return config
    return {}


# ---------------------------------------------------------------- writing (the CNN stage)


def prediction_frame(meta: pd.DataFrame, pred: dict[str, np.ndarray], fold: int) -> pd.DataFrame:
    frame = pd.DataFrame({ID_COL: meta[ID_COL].to_numpy(), FOLD_COL: fold})
    for j, name in enumerate(LABELS):
        frame[name] = pred["probs"][:, j]
    if "volume_mm3" in pred:
        frame[VOLUME_COL] = pred["volume_mm3"]
    return frame


def write_predictions(out_dir: Path, tag: str, fold: int, results: dict[str, tuple], cfg: Config,
                      fold_split: dict | None = None, deployed_epochs: Sequence[int] = ()) -> None:
    """fold{K}_valid.csv / _test.csv, their embeddings, metrics and the run record (written last: it marks done).
    fold_split ({"file", "sha1"} of the folds file used) goes into the record: readers refuse to mix splits;
    deployed_epochs: the epoch each seed's predicting weights come from (select_epoch picks it)."""
    for split, (meta, pred) in results.items():
        if split != "train":
            write_csv(prediction_frame(meta, pred, fold), out_dir / f"{tag}_{split}.csv")
        if "embedding" in pred:
            write_npy(pred["embedding"].astype(np.float16), out_dir / f"{tag}_{split}_emb.npy")
            write_csv(meta[[ID_COL]], out_dir / f"{tag}_{split}_emb_ids.csv")
    record = run_record(cfg)
    if fold_split:
        record["folds"] = fold_split
    if deployed_epochs:
        record["deployed_epochs"] = [int(e) for e in deployed_epochs]
    if "valid" in results:
        meta, pred = results["valid"]
        record["metrics"] = score_table(meta[list(LABELS)].to_numpy(), pred["probs"])
        write_json(record["metrics"], out_dir / f"{tag}_metrics.json")
    write_json(record, out_dir / f"{tag}_run.json")


def recorded_select_epoch(out_dir: Path, tag: str) -> str:
    """The select_epoch a fold's predictions were made with; records from before the key existed chose the epoch on
    the validation fold ("valid")."""
    try:
        record = json.loads((Path(out_dir) / f"{tag}_run.json").read_text())
    except (OSError, ValueError):
        return "unknown"  # missing or unreadable: the fold is predicted again
    return record.get("config", {}).get("select_epoch", "valid")


def record_selection(out_dir: Path, tag: str, select_epoch: str, deployed_epochs: Sequence[int]) -> None:
    """Rewrite a fold's run record for predictions that stand under another select_epoch (same weights)."""
    path = Path(out_dir) / f"{tag}_run.json"
    record = json.loads(path.read_text())
    record.setdefault("config", {})["select_epoch"] = select_epoch
    record["deployed_epochs"] = [int(e) for e in deployed_epochs]
    write_json(record, path)


def predictions_complete(out_dir: Path, tag: str, has_valid: bool, splits_with_emb: Sequence[str] = ()) -> bool:
    names = [f"{tag}_test.csv", f"{tag}_run.json"] + [f"{tag}_{s}_emb.npy" for s in splits_with_emb]
    if has_valid:
        names += [f"{tag}_valid.csv", f"{tag}_metrics.json"]
    return all((out_dir / n).exists() for n in names)
