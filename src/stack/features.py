"""Series assembly (slices ordered along the normal) and the neighbour feature table for the level-2 stackers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from src.constants import ID_COL, LABELS, SERIES_KEYS, VOLUME_COL
from src.errors import InputError

SERIES_ID = "series_id"
SLICE_POS = "slice_pos"
SERIES_LEN = "series_len"
REL_POSITION = "rel_position"
GAP_PREV = "gap_prev_mm"
GAP_NEXT = "gap_next_mm"


def clipped_logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [eps, 1 - eps], so CNN outputs of exactly 0 or 1 stay finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def assemble_series(df: pd.DataFrame) -> pd.DataFrame:
    """Sort slices by series then position (ties broken by ID) and add per-series order columns.

    Adds `series_id` (0..S-1 in sorted series order), `slice_pos` (0..n-1 along the normal), `series_len`,
    `rel_position` (0 at the first slice, 1 at the last; 0.5 for a one-slice series, which has no direction),
    and `gap_prev_mm` / `gap_next_mm` (distance to the neighbouring slice; NaN at the series edges). Slices
    sharing a position stay separate rows, ordered by ID, with a gap of 0 between them; a missing slice shows
    up as a large gap rather than as a hole, because neighbours are counted in slices, not millimetres.
    """
    missing = [c for c in (ID_COL, *SERIES_KEYS, "position") if c not in df.columns]
    if missing:
        raise InputError(f"series table lacks columns {missing}")
    if df[ID_COL].duplicated().any():
        dup = df.loc[df[ID_COL].duplicated(), ID_COL].iloc[0]
        raise InputError(f"series table holds ID {dup} more than once")
    # mergesort is stable and the ID key makes the order independent of the input row order.
    out = df.sort_values([*SERIES_KEYS, "position", ID_COL], kind="mergesort", na_position="last")
    out = out.reset_index(drop=True)
    series_id = out.groupby(list(SERIES_KEYS), sort=False, dropna=False).ngroup().to_numpy()
    out[SERIES_ID] = series_id
    out[SLICE_POS] = out.groupby(SERIES_ID).cumcount().to_numpy()
    out[SERIES_LEN] = out.groupby(SERIES_ID)[ID_COL].transform("size").to_numpy()
    denom = np.maximum(out[SERIES_LEN].to_numpy() - 1, 1)
    out[REL_POSITION] = np.where(out[SERIES_LEN] > 1, out[SLICE_POS] / denom, 0.5)
    pos = out["position"].to_numpy(dtype=np.float64)
    out[GAP_PREV] = np.abs(pos - series_shift(pos[:, None], out, 1)[:, 0])
    out[GAP_NEXT] = np.abs(series_shift(pos[:, None], out, -1)[:, 0] - pos)
    return out


def join_series(meta: pd.DataFrame, preds: pd.DataFrame, what: str = "predictions") -> pd.DataFrame:
    """Attach metadata (series keys, position) to prediction rows on ID and assemble the series.

    Only the predicted slices enter a series: metadata rows without a prediction (other folds, unreadable
    images) are left out, so the neighbours are the nearest predicted slices.
    """
    lost = ~preds[ID_COL].isin(meta[ID_COL])
    if lost.any():
        raise InputError(f"{what}: {int(lost.sum())} IDs not in the metadata, e.g. {preds.loc[lost, ID_COL].iloc[0]}")
    keep = [c for c in meta.columns if c not in preds.columns or c == ID_COL]
    return assemble_series(preds.merge(meta[keep], on=ID_COL, how="inner", validate="one_to_one"))


def series_shift(values: np.ndarray, table: pd.DataFrame, j: int) -> np.ndarray:
    """values of the slice j places earlier (j > 0) or later (j < 0) in the same series; NaN past an edge."""
    pos = table[SLICE_POS].to_numpy()
    length = table[SERIES_LEN].to_numpy()
    out = np.full(values.shape, np.nan, dtype=np.float64)
    valid = pos >= j if j > 0 else pos - j < length
    rows = np.flatnonzero(valid)
    out[rows] = values[rows - j]
    return out


def neighbour_features(table: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """LightGBM features per slice of an assembled table (see `assemble_series`), in the table's row order.

    Per label: the slice's probability; those of the ±1..±k neighbours and the differences to them; the mean
    and max over the ±k window; the series mean, max and std. Plus relative position, series length, gaps
    in mm and, when the table has `blood_volume_mm3`, the volume of the slice, of its neighbours and the series
    sum. Past a series edge a neighbour is NaN, not a repeat of the edge slice: LightGBM routes missing values
    on its own, and repeating would invent blood (or its absence) beyond the scanned range.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    probs = table[list(LABELS)].to_numpy(dtype=np.float64)
    cols: dict[str, np.ndarray] = {}
    window = [probs]
    for j in range(1, k + 1):
        prev, nxt = series_shift(probs, table, j), series_shift(probs, table, -j)
        window += [prev, nxt]
        for c, name in enumerate(LABELS):
            cols[f"{name}_m{j}"] = prev[:, c]
            cols[f"{name}_p{j}"] = nxt[:, c]
            cols[f"{name}_d_m{j}"] = probs[:, c] - prev[:, c]
            cols[f"{name}_d_p{j}"] = probs[:, c] - nxt[:, c]
    stacked = np.stack(window)
    win_mean, win_max = np.nanmean(stacked, axis=0), np.nanmax(stacked, axis=0)
    grouped = pd.DataFrame(probs, columns=list(LABELS)).groupby(table[SERIES_ID].to_numpy())
    # Built-in (cythonised) group reductions: a Python lambda per series costs minutes at 21k series.
    stats = {s: grouped.transform(s).to_numpy() for s in ("mean", "max")}
    stats["std"] = grouped.transform("std", ddof=0).to_numpy()
    for c, name in enumerate(LABELS):
        cols[name] = probs[:, c]
        cols[f"{name}_win_mean"] = win_mean[:, c]
        cols[f"{name}_win_max"] = win_max[:, c]
        for s, arr in stats.items():
            cols[f"{name}_ser_{s}"] = arr[:, c]
    for name in (REL_POSITION, SERIES_LEN, GAP_PREV, GAP_NEXT):
        cols[name] = table[name].to_numpy(dtype=np.float64)
    if VOLUME_COL in table.columns:
        vol = table[VOLUME_COL].to_numpy(dtype=np.float64)[:, None]
        cols["vol"] = vol[:, 0]
        for j in range(1, k + 1):
            cols[f"vol_m{j}"] = series_shift(vol, table, j)[:, 0]
            cols[f"vol_p{j}"] = series_shift(vol, table, -j)[:, 0]
        cols["vol_ser_sum"] = pd.Series(vol[:, 0]).groupby(table[SERIES_ID].to_numpy()).transform("sum").to_numpy()
    ordered = [c for c in _column_order(k, VOLUME_COL in table.columns) if c in cols]
    return pd.DataFrame({c: cols[c] for c in ordered}, index=table.index)


def _column_order(k: int, with_volume: bool) -> list[str]:
    """A fixed feature order, so train and test tables line up column for column."""
    names = list(LABELS)
    for name in LABELS:
        names += [f"{name}_{side}{j}" for j in range(1, k + 1) for side in ("m", "p")]
        names += [f"{name}_d_{side}{j}" for j in range(1, k + 1) for side in ("m", "p")]
        names += [f"{name}_win_mean", f"{name}_win_max", f"{name}_ser_mean", f"{name}_ser_max", f"{name}_ser_std"]
    names += [REL_POSITION, SERIES_LEN, GAP_PREV, GAP_NEXT]
    if with_volume:
        names += ["vol", *[f"vol_{side}{j}" for j in range(1, k + 1) for side in ("m", "p")], "vol_ser_sum"]
    return names


def sequence_inputs(table: pd.DataFrame) -> np.ndarray:
    """Per-slice GRU inputs [N, F] float32 in the table's row order: the six probabilities first (the GRU's residual
    reads them there), then relative position, then log1p(volume) when present. The embedding goes to the GRU as
    its own array (`emb=`), so that a float16 [N, 2048] block is never widened to float32 beside these columns."""
    parts = [table[list(LABELS)].to_numpy(dtype=np.float32), table[[REL_POSITION]].to_numpy(dtype=np.float32)]
    if VOLUME_COL in table.columns:
        parts.append(np.log1p(np.clip(table[[VOLUME_COL]].to_numpy(dtype=np.float32), 0, None)))
    return np.concatenate(parts, axis=1)
