"""Slice geometry shared by metadata and triage: the unit slice normal, the position on it, mixed orientations."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from src.data.dicom import DicomError

# Direction cosines whose dot product exceeds this are not perpendicular (about 0.6 degrees off a right angle).
MAX_COSINE_DOT = 0.01
# Two slices share an orientation when their unit normals differ by less than about 0.8 degrees; gantry tilt is
# the same on every slice of a series, so a larger difference is another acquisition or a localizer.
SAME_NORMAL_DOT = 1.0 - 1e-4
NORMAL_COLUMNS = ("normal_x", "normal_y", "normal_z")


def slice_normal(orientation: Sequence[float], path: str | os.PathLike) -> np.ndarray:
    """Unit normal (row cosines x column cosines) of ImageOrientationPatient; DicomError if it defines no plane.

    The cosines are normalised first: some writers store them scaled or rounded, and an unnormalised normal would
    scale every position (cosines at half length gave 1.25 mm spacing instead of 5)."""
    iop = np.asarray(orientation, dtype=np.float64).reshape(-1)
    if iop.shape != (6,) or not np.isfinite(iop).all():
        raise DicomError(path, f"ImageOrientationPatient {tuple(iop.tolist())} is not six finite numbers")
    row, col = iop[:3], iop[3:]
    norms = np.linalg.norm(row), np.linalg.norm(col)
    if min(norms) < 1e-6:
        raise DicomError(path, f"ImageOrientationPatient {tuple(iop.tolist())} does not define a slice plane")
    row, col = row / norms[0], col / norms[1]
    if abs(float(np.dot(row, col))) > MAX_COSINE_DOT:
        raise DicomError(path, f"ImageOrientationPatient {tuple(iop.tolist())}: row and column are not perpendicular")
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def slice_geometry(header: dict, path: str | os.PathLike) -> dict[str, float]:
    """{position, normal_x, normal_y, normal_z} of a read_header() result: ImagePositionPatient on the unit normal,
    which orders slices correctly under gantry tilt, unlike z or InstanceNumber."""
    normal = slice_normal(header["ImageOrientationPatient"], path)
    ipp = np.asarray(header["ImagePositionPatient"], dtype=np.float64)
    if not np.isfinite(ipp).all():
        raise DicomError(path, f"ImagePositionPatient {tuple(ipp.tolist())} is not finite")
    return {"position": float(np.dot(ipp, normal)), **dict(zip(NORMAL_COLUMNS, map(float, normal)))}


def split_orientations(df: pd.DataFrame, keys: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, refused): in each series (`keys`), the slices whose normal differs from the series' most common one.

    refused has the columns of df plus `reason`; positions along different normals cannot be ordered together."""
    if df.empty:
        return df, df.assign(reason=pd.Series(dtype=str))
    normals = df[list(NORMAL_COLUMNS)].to_numpy(dtype=np.float64)
    binned = pd.DataFrame(np.round(normals, 3), columns=list(NORMAL_COLUMNS), index=df.index)
    group = df[list(keys)].astype(str).agg("\x1f".join, axis=1)
    counts = binned.groupby([group, *[binned[c] for c in NORMAL_COLUMNS]]).size()
    # The most common orientation of each series (ties: the first in sorted order, so the result is deterministic).
    counts = counts.sort_index().sort_values(ascending=False, kind="mergesort")
    reference = counts[~counts.index.get_level_values(0).duplicated()]
    ref_normal = {g: np.asarray(n) for g, *n in reference.index}
    ref_size = {g: int(c) for (g, *_), c in reference.items()}
    ref = np.stack([ref_normal[g] for g in group])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    off = np.einsum("ij,ij->i", normals, ref) < SAME_NORMAL_DOT
    if not off.any():
        return df, df.iloc[:0].assign(reason=pd.Series(dtype=str))
    refused = df[off].copy()
    refused["reason"] = [
        f"orientation (normal {tuple(np.round(n, 3).tolist())}) differs from the {ref_size[g]} slices of its series "
        f"(normal {tuple(np.round(ref_normal[g], 3).tolist())}); slices on different normals cannot be ordered"
        for n, g in zip(normals[off], group[off])
    ]
    return df[~off], refused
