"""Reading a new study for triage: files, folders and zips to ordered slices and window images, bad files reported."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from src.constants import ID_COL, SERIES, SERIES_KEYS, STUDY
from src.data.dicom import DicomError, read_header
from src.data.dicom_fast import read_channels
from src.data.geometry import NORMAL_COLUMNS, slice_geometry, split_orientations
from src.data.metadata import order_series
from src.triage.outputs import SLICE_COLUMNS

MAX_ZIP_BYTES = 4 << 30  # uncompressed; a zip bomb is refused, not extracted
SKIPPED_COLUMNS = ["path", "reason"]


def _expand(inputs: Sequence[str | os.PathLike], tmp: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(file on disk, name shown to the user) for every file under the inputs; zips (given or inside a folder)
    are extracted into tmp."""
    files: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file())
        elif item.exists():
            found.append(item)
        else:
            skipped.append((str(item), "file not found"))
    for k, item in enumerate(found):
        if item.suffix.lower() != ".dcm" and zipfile.is_zipfile(item):
            files += _unzip(item, tmp / f"zip{k}", skipped)
        else:
            files.append((item, str(item)))
    return files, skipped


def _unzip(archive: Path, dest: Path, skipped: list[tuple[str, str]]) -> list[tuple[Path, str]]:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                skipped.append((str(archive), f"zip holds more than {MAX_ZIP_BYTES >> 30} GiB uncompressed"))
                return []
            # extract() strips absolute paths and `..`, so a member cannot land outside dest.
            return [(Path(zf.extract(m, dest)), f"{archive}!{m.filename}") for m in members]
    except (zipfile.BadZipFile, OSError, RuntimeError) as err:  # RuntimeError: an encrypted member
        skipped.append((str(archive), f"unreadable zip: {err}"))
        return []


def _read_slice(path: Path, name: str, image_size: int) -> tuple[dict, np.ndarray]:
    h = read_header(path)
    geometry = slice_geometry(h, name)  # the one geometry function, shared with src.data.metadata
    # One fast pass to the three windows (src.data.dicom_fast falls back to read_hu for anything unusual).
    channels = read_channels(path, image_size)
    row = {
        "sop": h["ID"],
        "PatientID": h["PatientID"],
        STUDY: h[STUDY],
        SERIES: h[SERIES],
        **geometry,
        "pixel_spacing_row": h["PixelSpacing"][0],
        "pixel_spacing_col": h["PixelSpacing"][1],
        "rows": h["Rows"],
        "cols": h["Columns"],
        "path": name,
        "stem": Path(name.split("!")[-1]).stem,
    }
    return row, channels


def load_study_files(
    inputs: Sequence[str | os.PathLike], image_size: int, progress: bool = False
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Read every file under the inputs (files, folders, zips) -> (slices, images, skipped).

    slices: one row per usable slice, ordered by series then position on the slice normal, with the columns of
    docs/formats.md's metadata table (slice_index, slice_spacing, ...); images: uint8 [N, 3, S, S] aligned with it;
    skipped: `path, reason` for every file that was not used (not DICOM, no geometry, undecodable pixels, duplicate).
    """
    rows, images = [], []
    with tempfile.TemporaryDirectory(prefix="ich-infer-") as tmp:
        files, skipped = _expand(inputs, Path(tmp))
        seen: dict[str, str] = {}
        for path, name in tqdm(files, desc="read DICOM", disable=not progress, leave=False):
            try:
                row, img = _read_slice(path, name, image_size)
            except DicomError as err:  # the readers raise nothing else per file (src.data.dicom.per_file)
                skipped.append((name, err.reason))
                continue
            if row["sop"] in seen:
                skipped.append((name, f"duplicate SOPInstanceUID {row['sop']} (same image as {seen[row['sop']]})"))
                continue
            seen[row["sop"]] = name
            rows.append(row)
            images.append(img)
    if rows:
        slices = pd.DataFrame(rows)
        slices["order"] = np.arange(len(slices))  # row of `images`, kept through the filtering and sorting below
        slices, mixed = split_orientations(slices, SERIES_KEYS)
        skipped += list(mixed[["path", "reason"]].itertuples(index=False, name=None))
    skipped_df = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    if not rows:
        return pd.DataFrame(columns=SLICE_COLUMNS), np.zeros((0, 3, image_size, image_size), np.uint8), skipped_df
    slices = slices.drop(columns=list(NORMAL_COLUMNS))
    # Kaggle names files after the image id; elsewhere names repeat across folders, so fall back to the SOP UID.
    slices[ID_COL] = slices["stem"].where(~slices["stem"].duplicated(keep=False), slices["sop"])
    slices = order_series(slices.drop(columns=["stem"]))
    return slices.drop(columns=["order", "sop"]), np.stack(images)[slices["order"].to_numpy()], skipped_df
