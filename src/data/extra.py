"""Extra training data (config `extra_train`): other folders in Kaggle layout whose train images join every fold's
training part and never a validation fold, the OOF or the test predictions.

The use it is built for: the real RSNA data has no masks, so the segmentation branch learns from slice labels alone
(the weak mode). A public set with painted masks beside it gives the map pixels to learn from, while the classifier
is still scored on RSNA's folds only. Each folder is cached and read exactly as the main data is (src/data/cache.py);
its rows are appended after the main ones, with their cache and mask rows shifted past the main cache's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from src import paths
from src.constants import FOLD_COL, ID_COL
from src.data.cache import load_cache
from src.data.packed import one_row, row_index, within_rows
from src.errors import InputError

NEVER_VALIDATED = -1  # the fold column of an extra row: it belongs to no fold, so no fold ever validates on it


class StackedRows:
    """Several row stores (memmaps or packed zstd rows, same row shape) read as one, the first part's rows first.

    Indexes as the stores do: [i], [array of i], [a:b] and [rows, channel] give the same uint8 arrays that one
    store holding every row in this order would."""

    dtype = np.dtype(np.uint8)

    def __init__(self, parts: list):
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"row stores of different shapes cannot be stacked: {sorted(shapes)}")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *shapes.pop())
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            return within_rows(self, key)
        if isinstance(key, (int, np.integer)):
            i = one_row(key, self.shape[0])
            part = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.asarray(self.parts[part][i - self.starts[part]])
        index = row_index(key, self.shape[0])
        out = np.empty((len(index), *self.shape[1:]), dtype=np.uint8)
        part_of = np.searchsorted(self.starts, index, side="right") - 1
        for part in np.unique(part_of):  # one gather per store, in the asked order within it
            at = np.flatnonzero(part_of == part)
            out[at] = self.parts[part][index[at] - self.starts[part]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


def check_extra_dirs(extra: tuple[str, ...] | list[str], data_dir: Path) -> tuple[str, ...]:
    """The extra folders as absolute paths, each checked before any work: a folder without a label CSV, one listed
    twice or the main data folder itself is a clear error."""
    resolved: list[str] = []
    for entry in extra:
        folder = Path(entry).expanduser().resolve()
        if not (folder / paths.TRAIN_CSV).is_file():
            raise InputError(f"config key extra_train: {folder} has no {paths.TRAIN_CSV} (a folder in Kaggle layout "
                             "is expected)")
        if folder == Path(data_dir).resolve() or str(folder) in resolved:
            raise InputError(f"config key extra_train: {folder} is "
                             + ("the main data itself" if str(folder) not in resolved else "listed twice"))
        resolved.append(str(folder))
    return tuple(resolved)


def training_data_identity(data_dir: Path, extra_dirs: tuple[str, ...]) -> str:
    """sha1 of every dataset a fold trains on (paths.data_identity: labels, image and mask names), main one first."""
    digests = [paths.data_identity(Path(d)) for d in (data_dir, *extra_dirs)]
    return hashlib.sha1("\n".join(digests).encode()).hexdigest()


def _check_disjoint(main: pd.DataFrame, extra: pd.DataFrame, folder: Path, seen: set[str]) -> None:
    """An extra patient or image that is also in the main data could sit in a validation fold: a leak."""
    for column, what in (("PatientID", "patients"), (ID_COL, "images")):
        shared = sorted(set(extra[column].astype(str)) & (set(main[column].astype(str)) | seen))
        if shared:
            raise InputError(f"config key extra_train: {folder} shares {len(shared)} {what} with the other training "
                             f"data (e.g. {shared[0]}); an extra set must hold other patients, or it leaks into "
                             "the validation folds")


def join_extra_training(train: pd.DataFrame, every_row: pd.DataFrame, images, masks, extra_dirs: tuple[str, ...],
                        data_dir: Path, image_size: int, fmt: str, verbose: bool = True):
    """(train rows + every extra folder's usable train rows, the stacked images, the stacked masks or None).

    `every_row` is the main data's whole train metadata (all folds): no extra patient may appear in any of it."""
    if not extra_dirs:
        return train, images, masks
    identity = paths.data_identity(Path(data_dir))
    metas, image_parts, mask_parts = [train], [images], [masks] if masks is not None else []
    n_images, n_masks = len(images), len(masks) if masks is not None else 0
    seen: set[str] = set()
    for entry in extra_dirs:
        folder = Path(entry)
        if paths.data_identity(folder) == identity:
            raise InputError(f"config key extra_train: {folder} holds the same data as {data_dir}")
        meta, extra_images, extra_masks = load_cache(folder, image_size, "train", fmt=fmt)
        lacking = [c for c in train.columns if c not in meta.columns and c != FOLD_COL]
        if lacking:
            raise InputError(f"config key extra_train: {folder}'s metadata lacks columns the main data has: {lacking}")
        _check_disjoint(every_row, meta, folder, seen)
        seen |= set(meta["PatientID"].astype(str)) | set(meta[ID_COL].astype(str))
        meta = meta.copy()
        meta["cache_row"] = meta["cache_row"] + n_images
        has_mask = (meta["mask_row"].to_numpy() >= 0) & (extra_masks is not None)
        meta["mask_row"] = np.where(has_mask, meta["mask_row"] + n_masks, -1)
        meta[FOLD_COL] = NEVER_VALIDATED
        metas.append(meta)
        image_parts.append(extra_images)
        n_images += len(extra_images)
        if extra_masks is not None:
            mask_parts.append(extra_masks)
            n_masks += len(extra_masks)
        if verbose:
            studies = meta["StudyInstanceUID"].nunique()
            print(f"[train] extra_train: +{len(meta)} training slices from {folder} ({studies} studies, "
                  f"{int(has_mask.sum())} with a painted mask); never validated", flush=True)
    joined = pd.concat(metas, ignore_index=True)[list(train.columns)]
    return joined, StackedRows(image_parts), StackedRows(mask_parts) if mask_parts else None
