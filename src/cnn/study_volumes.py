"""Blood volume per study from per-slice volumes: one count per slice position, error and rank against the truth."""

from __future__ import annotations

import numpy as np
import pandas as pd

from src import paths
from src.constants import ID_COL, SERIES_KEYS, STUDY, SUBTYPES, VOLUME_COL
from src.data.metadata import SAME_POSITION_MM
from src.errors import InputError

MM3_PER_ML = 1000.0
VOLUME_N_BOOT = 1000  # resamples of positive studies for the volume figures' 95% intervals


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
    """One row per study: slice counts, predicted (and true) blood volume in mm³ and mL, absolute % error, and
    which hemorrhage types the study has (1 when any of its slices is labelled so; when meta has the labels).

    meta: the train metadata (ID, StudyInstanceUID, any, the series keys and position); true: ID + the true volume.
    """
    meta = meta.assign(level=position_levels(meta))
    types = [t for t in SUBTYPES if t in meta]
    df = pred[[ID_COL, VOLUME_COL]].merge(meta[[ID_COL, STUDY, "any", "level", *types]], on=ID_COL, how="left",
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
    table = table.join(slabs.groupby(level=STUDY).sum()).join(df.groupby(STUDY)[types].max().astype(int))
    table = table.reset_index()
    table["n_positive_slices"] = table["n_positive_slices"].astype(int)
    table["pred_volume_ml"] = table["pred_volume_mm3"] / MM3_PER_ML
    if true is not None:
        table["true_volume_ml"] = table["true_volume_mm3"] / MM3_PER_ML
        positive = table["true_volume_mm3"] > 0
        err = (table["pred_volume_mm3"] - table["true_volume_mm3"]).abs() / table["true_volume_mm3"].where(positive)
        table["abs_pct_error"] = 100.0 * err
    return table


def spearman_rho(pred: np.ndarray, true: np.ndarray) -> float:
    """Spearman's rho (Pearson on average ranks); NaN when either side is constant, as when a resample repeats one
    study. Written out because pandas' and scipy's versions warn on every such resample."""
    a, b = pd.Series(pred).rank().to_numpy(), pd.Series(true).rank().to_numpy()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def bootstrap_volume_ci(pos: pd.DataFrame, n_boot: int = VOLUME_N_BOOT, seed: int = 0) -> dict:
    """95% percentile intervals of MdAPE and Spearman over positive studies resampled with replacement.

    Fold 0 of the embedded default has ~11 positive studies: one study more or less moves either figure by more
    than most recipe changes do, and these intervals say how much."""
    if len(pos) < 3:
        return {}
    rng = np.random.default_rng(seed)
    ape = pos["abs_pct_error"].to_numpy(dtype=np.float64)
    pred, true = pos["pred_volume_mm3"].to_numpy(np.float64), pos["true_volume_mm3"].to_numpy(np.float64)
    mdape, rho = [], []
    for _ in range(n_boot):
        pick = rng.integers(0, len(pos), len(pos))
        mdape.append(np.median(ape[pick]))
        rho.append(spearman_rho(pred[pick], true[pick]))
    rho = np.asarray(rho)
    rho = rho[np.isfinite(rho)]
    out = {"mdape_ci95": [float(x) for x in np.percentile(mdape, [2.5, 97.5])], "ci_n_boot": n_boot}
    if len(rho):
        out["spearman_ci95"] = [float(x) for x in np.percentile(rho, [2.5, 97.5])]
    return out


def volume_summary(table: pd.DataFrame, n_boot: int = VOLUME_N_BOOT) -> dict:
    """Median absolute percentage error and Spearman over positive studies (true volume > 0), with bootstrap 95%
    intervals over those studies, and the false blood on negatives."""
    out = {"n_studies": len(table), "median_pred_ml": float(table["pred_volume_ml"].median())}
    if "true_volume_mm3" not in table:
        return {k: _json_safe(v) for k, v in out.items()}
    pos = table[table["true_volume_mm3"] > 0]
    neg = table[table["true_volume_mm3"] <= 0]
    out.update({
        "n_positive_studies": len(pos),
        "mdape_percent": float(pos["abs_pct_error"].median()) if len(pos) else float("nan"),
        "spearman_positive": spearman_rho(pos["pred_volume_mm3"].to_numpy(), pos["true_volume_mm3"].to_numpy())
        if len(pos) > 1 else float("nan"),
        "n_negative_studies": len(neg),
        "median_pred_ml_negative_studies": float(neg["pred_volume_ml"].median()) if len(neg) else float("nan"),
    })
    out.update(bootstrap_volume_ci(pos, n_boot) if n_boot else {})
    out = {k: _json_safe(v) for k, v in out.items()}
    if by_type := error_by_type(pos):
        out["by_type"] = by_type
    if by_size := error_by_size(pos):
        out["by_size"] = by_size
    return out


def error_by_size(pos: pd.DataFrame) -> dict:
    """{"small", "large": studies, MdAPE, median predicted/true, median true mL} of the positive studies below and
    from the median true volume: the two halves fail differently (a small bleed missed, a large one's edge drawn
    wide), which one pooled median hides. Empty under four positive studies: halves of one say nothing."""
    if len(pos) < 4:
        return {}
    cut = float(pos["true_volume_mm3"].median())
    halves = {"small": pos[pos["true_volume_mm3"] < cut], "large": pos[pos["true_volume_mm3"] >= cut]}
    return {name: {"n_studies": len(half), "mdape_percent": float(half["abs_pct_error"].median()),
                   "median_ratio": float((half["pred_volume_mm3"] / half["true_volume_mm3"]).median()),
                   "median_true_ml": float(half["true_volume_mm3"].median() / 1000.0)}
            for name, half in halves.items()}


def error_by_type(pos: pd.DataFrame) -> dict:
    """{type: studies, MdAPE, median true mL} over the positive studies that have that hemorrhage type (a study with
    two types counts in both): where the volume error lives, e.g. thin subarachnoid blood against subdural crescents."""
    out = {}
    for kind in [t for t in SUBTYPES if t in pos]:
        has = pos[pos[kind] > 0]
        if len(has):
            out[kind] = {"n_studies": len(has), "mdape_percent": float(has["abs_pct_error"].median()),
                         "median_true_ml": float(has["true_volume_ml"].median())}
    return out
