"""Per-image metadata table: header-only DICOM reads, slice order and spacing from positions, labels pivoted by name."""

from __future__ import annotations

import argparse
import json
import os
import re
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from src import paths
from src.atomic import write_csv, write_json
from src.constants import ID_COL, LABELS, SERIES_KEYS
from src.data.dicom import DicomError, read_header
from src.data.geometry import NORMAL_COLUMNS, slice_geometry, split_orientations
from src.errors import InputError, run_cli

META_COLUMNS = [
    "ID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "position", "slice_index", "series_length",
    "slice_spacing", "pixel_spacing_row", "pixel_spacing_col", "rows", "cols", "path",
]  # fmt: skip
BAD_HEADER_COLUMNS = ["ID", "path", "reason"]
# A series with one distinct position has no gap to measure; 5 mm is the usual RSNA head-CT reconstruction
# thickness, the least-wrong guess for a volume estimate (such series are very rare).
DEFAULT_SLICE_SPACING = 5.0
# Positions closer than this (mm) count as the same slice (RSNA has series with two images at one position).
SAME_POSITION_MM = 1e-3
POOL_MIN_FILES = 200  # below this a process pool costs more than it saves
_LABEL_ID = re.compile(r"^(ID_[0-9A-Za-z]+)_([a-z]+)$")


def list_images(data_dir: Path, split: str) -> list[Path]:
    """Every `*.dcm` in the split's image folder, sorted by name."""
    folder = paths.image_dir(Path(data_dir), split)
    return sorted(Path(e.path) for e in os.scandir(folder) if e.name.endswith(".dcm") and e.is_file())


def _header_row(path: Path) -> tuple[str, dict | None, str]:
    try:
        h = read_header(path)
        geometry = slice_geometry(h, path)  # the one geometry function, shared with triage (src.triage.inputs)
    except DicomError as err:
        return path.stem, None, err.reason
    row = {
        # Kaggle names each file after its image ID; labels, masks and the submission use that name.
        "ID": path.stem,
        "PatientID": h["PatientID"],
        "StudyInstanceUID": h["StudyInstanceUID"],
        "SeriesInstanceUID": h["SeriesInstanceUID"],
        **geometry,
        "pixel_spacing_row": h["PixelSpacing"][0],
        "pixel_spacing_col": h["PixelSpacing"][1],
        "rows": h["Rows"],
        "cols": h["Columns"],
        "sop_id": h["ID"],
        "path": str(path),
    }
    return path.stem, row, ""


def _slice_spacing(positions: np.ndarray) -> np.ndarray:
    """Per slice (positions sorted): median of the nonzero gaps to the neighbouring distinct positions, in mm."""
    distinct = [0]
    for i in range(1, len(positions)):
        if positions[i] - positions[distinct[-1]] > SAME_POSITION_MM:
            distinct.append(i)
    levels = positions[distinct]
    group = np.searchsorted(np.asarray(distinct), np.arange(len(positions)), side="right") - 1
    gaps = np.diff(levels)
    if len(gaps) == 0:
        return np.full(len(positions), DEFAULT_SLICE_SPACING)
    per_level = np.empty(len(levels))
    for k in range(len(levels)):
        near = gaps[max(k - 1, 0) : k + 1]
        per_level[k] = float(np.median(near))
    return per_level[group]


def order_series(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by series then position (ties by ID); add slice_index, series_length and slice_spacing (mm)."""
    need = [*SERIES_KEYS, "position", ID_COL]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(f"order_series: missing columns {missing}")
    out = df.sort_values([*SERIES_KEYS, "position", ID_COL], kind="mergesort").reset_index(drop=True)
    groups = out.groupby(list(SERIES_KEYS), sort=False).indices
    slice_index = np.empty(len(out), dtype=np.int64)
    length = np.empty(len(out), dtype=np.int64)
    spacing = np.empty(len(out), dtype=np.float64)
    pos = out["position"].to_numpy(dtype=np.float64)
    for rows in groups.values():
        slice_index[rows] = np.arange(len(rows))
        length[rows] = len(rows)
        spacing[rows] = _slice_spacing(pos[rows])
    out["slice_index"] = slice_index
    out["series_length"] = length
    out["slice_spacing"] = spacing
    return out


def read_labels(csv_path: Path) -> pd.DataFrame:
    """stage_2_train.csv validated, de-duplicated and pivoted to one row per image with LABELS columns by name."""
    if not csv_path.exists():
        raise InputError(f"{csv_path}: labels file not found")
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{csv_path}: not a readable CSV ({err})") from err
    if list(raw.columns[:2]) != ["ID", "Label"]:
        raise InputError(f"{csv_path}: expected columns ID,Label, found {','.join(map(str, raw.columns))}")
    parts = raw["ID"].str.extract(_LABEL_ID)
    bad = parts[0].isna() | ~parts[1].isin(LABELS) | ~raw["Label"].str.strip().isin(["0", "1"])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{csv_path}: line {i + 2} is not `ID_<image>_<subtype>,<0|1>` with a known subtype: "
            f"{raw['ID'].iloc[i]},{raw['Label'].iloc[i]}"
        )
    table = pd.DataFrame({"image": parts[0], "subtype": parts[1], "Label": raw["Label"].str.strip().astype(np.int8)})
    table = table.drop_duplicates()
    clash = table.duplicated(["image", "subtype"], keep=False)
    if clash.any():
        first = table[clash].iloc[0]
        raise InputError(f"{csv_path}: {first['image']}_{first['subtype']} has conflicting labels")
    wide = table.pivot(index="image", columns="subtype", values="Label")
    wide = wide.reindex(columns=list(LABELS))
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        image = wide.index[incomplete.to_numpy()][0]
        raise InputError(f"{csv_path}: {int(incomplete.sum())} images lack some of the six labels, e.g. {image}")
    wide = wide.astype(np.int8).rename_axis(None, axis=1).reset_index().rename(columns={"image": ID_COL})
    return wide


def _read_headers(files: list[Path], workers: int, split: str) -> tuple[list[dict], list[tuple[str, Path, str]]]:
    rows, bad = [], []
    desc = f"headers {split}"
    if workers > 1 and len(files) >= POOL_MIN_FILES:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(_header_row, files, chunksize=256), total=len(files), desc=desc))
    else:
        results = [_header_row(f) for f in tqdm(files, desc=desc, disable=len(files) < POOL_MIN_FILES)]
    for path, (stem, row, reason) in zip(files, results):
        if row is None:
            bad.append((stem, path, reason))
        else:
            rows.append(row)
    return rows, bad


def _report(what: str, ids: list[str]) -> None:
    if ids:
        print(f"{len(ids)} {what}, e.g. {', '.join(sorted(ids)[:5])}; left out")


def build_metadata(data_dir: str | os.PathLike, split: str, workers: int = 2) -> pd.DataFrame:
    """One row per readable image (docs/formats.md); writes bad_headers_{split}.csv beside the metadata cache."""
    data_dir = Path(data_dir)
    files = list_images(data_dir, split)
    if not files:
        raise InputError(f"{paths.image_dir(data_dir, split)}: no .dcm files")
    labels = read_labels(data_dir / paths.TRAIN_CSV) if split == "train" else None
    rows, bad = _read_headers(files, workers, split)
    meta = pd.DataFrame(rows)
    if rows:
        meta, mixed = split_orientations(meta, SERIES_KEYS)
        bad += [(i, Path(p), r) for i, p, r in mixed[["ID", "path", "reason"]].itertuples(index=False)]
        meta = meta.drop(columns=list(NORMAL_COLUMNS))
    bad_df = pd.DataFrame([(i, os.path.relpath(p, data_dir), r) for i, p, r in bad], columns=BAD_HEADER_COLUMNS)
    write_csv(bad_df, paths.metadata_csv(data_dir, split).with_name(f"bad_headers_{split}.csv"))
    _report(f"{split} files with unreadable headers (see bad_headers_{split}.csv)", list(bad_df["ID"]))
    if meta.empty:
        raise InputError(f"{paths.image_dir(data_dir, split)}: no readable DICOM headers")
    mismatch = meta["sop_id"] != meta[ID_COL]
    if mismatch.any():
        print(f"{int(mismatch.sum())} files whose SOPInstanceUID differs from the file name; the file name is the ID")
    meta["path"] = [os.path.relpath(p, data_dir) for p in meta["path"]]
    meta = meta.drop(columns="sop_id")
    if labels is not None:
        have = set(meta[ID_COL])
        unreadable = set(bad_df["ID"])
        _report("labelled images without a file", [i for i in labels[ID_COL] if i not in have and i not in unreadable])
        _report("train files without labels", sorted(have - set(labels[ID_COL])))
        meta = meta.merge(labels, on=ID_COL, how="inner", validate="one_to_one")
        if meta.empty:
            raise InputError(f"{data_dir / paths.TRAIN_CSV}: no labelled image has a readable file")
        meta["has_mask"] = [(data_dir / paths.MASKS_DIR / f"{i}.png").exists() for i in meta[ID_COL]]
    meta = order_series(meta)
    extra = [*LABELS, "has_mask"] if labels is not None else []
    return meta[META_COLUMNS + extra]


def _count_images(data_dir: Path, split: str) -> int:
    folder = paths.image_dir(data_dir, split)
    return sum(1 for e in os.scandir(folder) if e.name.endswith(".dcm"))


def _labels_stamp(data_dir: Path, split: str) -> list[int] | None:
    """Size and mtime of the labels CSV the train table was joined with: an edited label file rebuilds it."""
    if split != "train" or not (data_dir / paths.TRAIN_CSV).exists():
        return None
    st = (data_dir / paths.TRAIN_CSV).stat()
    return [st.st_size, st.st_mtime_ns]


def write_metadata(data_dir: str | os.PathLike, split: str, workers: int = 2) -> pd.DataFrame:
    """Build and write metadata_{split}.csv plus a stamp (image count, labels file) that load_metadata checks."""
    data_dir = Path(data_dir).resolve()
    n_files, labels = _count_images(data_dir, split), _labels_stamp(data_dir, split)
    meta = build_metadata(data_dir, split, workers)
    out = paths.metadata_csv(data_dir, split)
    write_csv(meta, out)
    write_json({"n_files": n_files, "labels": labels, "rows": len(meta)}, out.with_suffix(".json"))
    print(f"wrote {out} ({len(meta)} rows)")
    return _read_meta(out)  # same dtypes whether built now or loaded later


def _read_meta(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={c: str for c in ("ID", *SERIES_KEYS, "path")})


def load_metadata(data_dir: str | os.PathLike, split: str, workers: int = 2) -> pd.DataFrame:
    """Cached metadata; rebuilt when missing, when the number of files in the image folder changed, or when the
    labels CSV did (size or mtime)."""
    data_dir = Path(data_dir).resolve()
    out = paths.metadata_csv(data_dir, split)
    stamp = out.with_suffix(".json")
    if out.exists() and stamp.exists():
        try:
            saved = json.loads(stamp.read_text())
            fresh = (saved.get("n_files") == _count_images(data_dir, split)
                     and saved.get("labels") == _labels_stamp(data_dir, split))
        except (json.JSONDecodeError, OSError):
            fresh = False
        if fresh:
            return _read_meta(out)
    return write_metadata(data_dir, split, workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.data.metadata", description=__doc__)
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--split", choices=("train", "test", "both"), default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="read every header again even if the table is fresh")
    args = parser.parse_args(argv)
    data_dir = paths.resolve_data_dir(args.data)
    for split in ("train", "test") if args.split == "both" else (args.split,):
        if args.force:
            write_metadata(data_dir, split, args.workers)
        else:  # run_fold.sh calls this stage every run: 874k headers are read once, then checked by a file count
            meta = load_metadata(data_dir, split, args.workers)
            print(f"{paths.metadata_csv(Path(data_dir).resolve(), split)}: {len(meta)} rows (--force reads again)")
    return 0


if __name__ == "__main__":
    run_cli(main)
