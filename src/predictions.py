"""The prediction table, the contract between stages: the one place that knows its columns and file names.

One row per slice: `ID`, `fold`, the six probabilities in LABELS order (never logits), optionally
`blood_volume_mm3`. A CNN experiment writes `oof/<exp>/fold{K}_{valid,test}.csv`, float16 embeddings
`fold{K}_{split}_emb.npy` with their `fold{K}_{split}_emb_ids.csv`, `fold{K}_metrics.json` and the run record
`fold{K}_run.json` (docs/formats.md). Always join on ID, never on row position.
"""

from __future__ import annotations

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
    """{K: oof/<exp>/fold{K}_{split}.csv} for every numbered fold present, in fold order."""
    files = {}
    for path in Path(pred_dir).glob(f"fold*_{split}.csv"):
        tag = path.name[len("fold") : -len(f"_{split}.csv")]
        if tag.isdigit():
            files[int(tag)] = path
    return dict(sorted(files.items()))


def read_prediction_files(pred_dir: str | Path, split: str) -> list[tuple[Path, pd.DataFrame]]:
    """Every `*_{split}.csv` of a prediction directory, read and validated; none at all is an error."""
    pred_dir = Path(pred_dir)
    files = sorted(pred_dir.glob(f"*_{split}.csv"))
    if not files:
        raise InputError(f"{pred_dir}: no *_{split}.csv prediction files")
    return [(path, read_prediction_csv(path)) for path in files]


def load_valid_predictions(pred_dir: str | Path) -> pd.DataFrame:
    """All `*_valid.csv` of a prediction directory concatenated; an ID in two files is an error naming both."""
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


def load_test_predictions(pred_dir: str | Path) -> pd.DataFrame:
    """ID + six probabilities: the mean over every `*_test.csv` in pred_dir (e.g. one per fold), per ID."""
    parts = [df[[ID_COL, *LABELS]] for _, df in read_prediction_files(pred_dir, "test")]
    return mean_over_folds(parts)[[ID_COL, *LABELS]]


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


def write_predictions(out_dir: Path, tag: str, fold: int, results: dict[str, tuple], cfg: Config) -> None:
    """fold{K}_valid.csv / _test.csv, their embeddings, metrics and the run record (written last: it marks done)."""
    for split, (meta, pred) in results.items():
        if split != "train":
            write_csv(prediction_frame(meta, pred, fold), out_dir / f"{tag}_{split}.csv")
        if "embedding" in pred:
            write_npy(pred["embedding"].astype(np.float16), out_dir / f"{tag}_{split}_emb.npy")
            write_csv(meta[[ID_COL]], out_dir / f"{tag}_{split}_emb_ids.csv")
    record = run_record(cfg)
    if "valid" in results:
        meta, pred = results["valid"]
        record["metrics"] = score_table(meta[list(LABELS)].to_numpy(), pred["probs"])
        write_json(record["metrics"], out_dir / f"{tag}_metrics.json")
    write_json(record, out_dir / f"{tag}_run.json")


def predictions_complete(out_dir: Path, tag: str, has_valid: bool, splits_with_emb: Sequence[str] = ()) -> bool:
    names = [f"{tag}_test.csv", f"{tag}_run.json"] + [f"{tag}_{s}_emb.npy" for s in splits_with_emb]
    if has_valid:
        names += [f"{tag}_valid.csv", f"{tag}_metrics.json"]
    return all((out_dir / n).exists() for n in names)
