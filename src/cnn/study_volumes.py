"""Blood volume per study from per-slice volumes: one count per slice position, error and rank against the truth."""

from __future__ import annotations

import numpy as np
import pandas as pd

from src import paths
from src.constants import ID_COL, SERIES_KEYS, STUDY, VOLUME_COL
from src.data.metadata import SAME_POSITION_MM
from src.errors import InputError

MM3_PER_ML = 1000.0


def _json_safe(value):
    """NaN is not JSON: missing numbers are written as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def position_levels(meta: pd.DataFrame) -> pd.Series:
    """An id per distinct slice position within each series (meta's index): two images at one position (RSNA has
    such series) share an id, so a study's volume counts that slab of tissue once, not twice."""
    need = [*SERIES_KEYS, "position"]
    if missing := [c for c in need if c not in meta]:
        raise InputError(f"metadata lacks {', '.join(missing)}: rebuild it with python -m src.data.metadata")
    ordered = meta.sort_values(need, kind="stable")
    gap = ordered.groupby(list(SERIES_KEYS), sort=False)["position"].diff()
    return (gap.isna() | (gap > SAME_POSITION_MM)).cumsum().reindex(meta.index)


def slab_total_mm3(volume_mm3: np.ndarray, meta: pd.DataFrame) -> float:
    """One study's volume from its slices' (meta rows in the same order): duplicate positions averaged, then summed."""
    levels = position_levels(meta.reset_index(drop=True))
    return float(pd.Series(np.asarray(volume_mm3, dtype=np.float64)).groupby(levels.to_numpy()).mean().sum())


def study_volumes(pred: pd.DataFrame, meta: pd.DataFrame, true: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per study: slice counts, predicted (and true) blood volume in mm³ and mL, absolute % error.

    meta: the train metadata (ID, StudyInstanceUID, any, the series keys and position); true: ID + the true volume.
    """
    meta = meta.assign(level=position_levels(meta))
    df = pred[[ID_COL, VOLUME_COL]].merge(meta[[ID_COL, STUDY, "any", "level"]], on=ID_COL, how="left",
                                          validate="one_to_one")
    if df[STUDY].isna().any():
        raise InputError(f"{int(df[STUDY].isna().sum())} predicted images are not in the train metadata "
                         f"(e.g. {df.loc[df[STUDY].isna(), ID_COL].iloc[0]}): wrong --data?")
    agg = {"n_slices": (ID_COL, "size"), "n_positive_slices": ("any", "sum"), "pred_volume_mm3": (VOLUME_COL, "sum")}
    if true is not None:
        t = true[[ID_COL, VOLUME_COL]].rename(columns={VOLUME_COL: "true_mm3"})
        df = df.merge(t, on=ID_COL, how="left", validate="one_to_one")
        if df["true_mm3"].isna().any():
            raise InputError(f"{paths.TRUE_VOLUMES_CSV}: {int(df['true_mm3'].isna().sum())} predicted images lack a "
                             "true volume")
        agg["true_volume_mm3"] = ("true_mm3", "sum")
    table = df.groupby(STUDY, sort=True).agg(**{k: v for k, v in agg.items() if k.startswith("n_")})
    # Images at one position hold the same tissue: their mean is that slab's volume (both predicted and true).
    slabs = df.groupby([STUDY, "level"]).agg(**{k: (v[0], "mean") for k, v in agg.items() if k.endswith("_mm3")})
    table = table.join(slabs.groupby(level=STUDY).sum()).reset_index()
    table["n_positive_slices"] = table["n_positive_slices"].astype(int)
    table["pred_volume_ml"] = table["pred_volume_mm3"] / MM3_PER_ML
    if true is not None:
        table["true_volume_ml"] = table["true_volume_mm3"] / MM3_PER_ML
        positive = table["true_volume_mm3"] > 0
        err = (table["pred_volume_mm3"] - table["true_volume_mm3"]).abs() / table["true_volume_mm3"].where(positive)
        table["abs_pct_error"] = 100.0 * err
    return table


def volume_summary(table: pd.DataFrame) -> dict:
    """Median absolute percentage error over positive studies (true volume > 0), and the false blood on negatives."""
    out = {"n_studies": len(table), "median_pred_ml": float(table["pred_volume_ml"].median())}
    if "true_volume_mm3" not in table:
        return {k: _json_safe(v) for k, v in out.items()}
    pos = table[table["true_volume_mm3"] > 0]
    neg = table[table["true_volume_mm3"] <= 0]
    out.update({
        "n_positive_studies": len(pos),
        "mdape_percent": float(pos["abs_pct_error"].median()) if len(pos) else float("nan"),
        "spearman_positive": float(pos["pred_volume_mm3"].corr(pos["true_volume_mm3"], method="spearman"))
        if len(pos) > 1 else float("nan"),
        "n_negative_studies": len(neg),
        "median_pred_ml_negative_studies": float(neg["pred_volume_ml"].median()) if len(neg) else float("nan"),
    })
    return {k: _json_safe(v) for k, v in out.items()}
