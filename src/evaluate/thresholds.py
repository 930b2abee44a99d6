"""Fixed-precision operating points per class, study-level aggregation (max and RADnet's 3-consecutive rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from src.config import ReportConfig
from src.constants import LABELS, SERIES, SLICE_INDEX, STUDY

DEFAULT_PRECISIONS: tuple[float, ...] = ReportConfig.precisions  # the config's report section holds the defaults
# The paper's Table IV: `any` at precision 0.50, 0.55, ..., 0.95.
ANY_SWEEP: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
RADNET_RUN: int = ReportConfig.run  # RADnet: a study is positive when >= 3 consecutive slices pass the threshold
LEVELS: tuple[str, ...] = ("slice", "study_max", "study_radnet")
# Precision is a ratio of counts while targets are decimals; 0.7 must accept 7/10 whatever the rounding.
_PRECISION_TOL = 1e-9


def operating_curve(y_true: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    """Counts at every distinct threshold t (flag = score >= t), thresholds descending: sort once + cumsums."""
    y = np.asarray(y_true, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="stable")
    s_sorted = score[order]
    tp_cum = np.cumsum(y[order], dtype=np.int64)
    flagged = np.arange(1, len(y) + 1, dtype=np.int64)
    # The last row of each tie group: flagging "score >= t" takes the whole group at once.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True]) if len(y) else np.array([], dtype=np.int64)
    return {"threshold": s_sorted[ends], "tp": tp_cum[ends], "fp": flagged[ends] - tp_cum[ends]}


def _confusion_row(tp: int, fp: int, n_pos: int, n: int) -> dict[str, float]:
    fn, tn = n_pos - tp, n - n_pos - fp
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / n_pos if n_pos else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {
        "precision": precision,
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "accuracy": (tp + tn) / n if n else float("nan"),
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "n_flagged": tp + fp,
    }


def threshold_table(
    y_true: np.ndarray, score: np.ndarray, precisions: Sequence[float] = DEFAULT_PRECISIONS
) -> pd.DataFrame:
    """Per target precision: the threshold with the highest recall whose precision >= target (flag = score >= t).

    Among thresholds with the same (maximal) recall the highest is taken: it has the fewest false positives.
    Rows for unreachable targets have reachable=False and NaN metrics.
    """
    y = np.asarray(y_true, dtype=bool)
    curve = operating_curve(y, score)
    tp, fp = curve["tp"], curve["fp"]
    n, n_pos = len(y), int(y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
    rows = []
    for target in precisions:
        ok = np.flatnonzero((precision >= target - _PRECISION_TOL) & (tp > 0))
        row: dict = {"target_precision": float(target), "support": n_pos, "n": n}
        if len(ok) == 0:
            row.update({"reachable": False, "threshold": float("nan")})
            row.update({k: float("nan") for k in _confusion_row(0, 0, 0, 0)})
        else:
            # tp and fp never decrease along the curve, so the first candidate with the best tp has the fewest fp.
            best = ok[np.argmax(tp[ok] == tp[ok].max())]
            row.update({"reachable": True, "threshold": float(curve["threshold"][best])})
            row.update(_confusion_row(int(tp[best]), int(fp[best]), n_pos, n))
        rows.append(row)
    columns = [
        "target_precision",
        "reachable",
        "threshold",
        "precision",
        "recall",
        "specificity",
        "accuracy",
        "f1",
        "support",
        "n",
        "tp",
        "fp",
        "fn",
        "tn",
        "n_flagged",
    ]
    table = pd.DataFrame(rows)[columns]
    # Counts stay integers beside the NaN of unreachable rows (written as empty cells).
    return table.astype({c: "Int64" for c in ("tp", "fp", "fn", "tn", "n_flagged")})


def threshold_tables(
    y_true: np.ndarray,
    scores: np.ndarray,
    precisions: Sequence[float] = DEFAULT_PRECISIONS,
    names: Sequence[str] = LABELS,
    level: str = "slice",
) -> pd.DataFrame:
    """threshold_table for every column of [N, K] labels/scores, stacked with `level` and `label` columns."""
    y = np.asarray(y_true).reshape(len(y_true), -1)
    s = np.asarray(scores).reshape(len(scores), -1)
    parts = []
    for j, name in enumerate(names):
        table = threshold_table(y[:, j], s[:, j], precisions)
        table.insert(0, "label", name)
        table.insert(0, "level", level)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def run_scores(series: np.ndarray, slice_index: np.ndarray, probs: np.ndarray, run: int = RADNET_RUN) -> np.ndarray:
    """Per row: the min probability over it and the next run-1 slices of its series (slice order); -inf past the end.

    A row's window passes threshold t exactly when all `run` slices pass, so a series has `run` consecutive
    passing slices iff its largest window score >= t. Slices are consecutive by rank among the rows present:
    a slice without a prediction (unreadable file) does not break a run.
    """
    p = np.asarray(probs, dtype=np.float64)
    squeeze = p.ndim == 1
    p = p.reshape(len(p), -1)
    series_codes = pd.factorize(np.asarray(series))[0]
    order = np.lexsort((np.asarray(slice_index), series_codes))
    codes_sorted, p_sorted = series_codes[order], p[order]
    window = p_sorted.copy()
    valid = np.ones(len(p), dtype=bool)
    for k in range(1, run):
        shifted = np.full_like(p_sorted, -np.inf)
        shifted[:-k] = p_sorted[k:]
        same = np.zeros(len(p), dtype=bool)
        same[:-k] = codes_sorted[k:] == codes_sorted[:-k]
        valid &= same
        window = np.minimum(window, shifted)
    window[~valid] = -np.inf
    out = np.empty_like(window)
    out[order] = window
    return out[:, 0] if squeeze else out


def aggregate_studies(
    meta: pd.DataFrame,
    probs: np.ndarray,
    labels: np.ndarray | None = None,
    run: int = RADNET_RUN,
    names: Sequence[str] = LABELS,
) -> pd.DataFrame:
    """One row per study: `max_<c>` (BloodNet: max over slices), `radnet_<c>` (best run-window score), `true_<c>`.

    meta holds StudyInstanceUID, SeriesInstanceUID and slice_index aligned with the rows of probs/labels. A study
    whose series are all shorter than `run` slices gets radnet score 0.0: it can only be flagged at threshold 0.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    window = run_scores(meta[SERIES].to_numpy(), meta[SLICE_INDEX].to_numpy(), p, run)
    frame = {STUDY: meta[STUDY].to_numpy()}
    for j, name in enumerate(names):
        frame[f"max_{name}"] = p[:, j]
        frame[f"radnet_{name}"] = window[:, j]
        if labels is not None:
            frame[f"true_{name}"] = np.asarray(labels)[:, j]
    grouped = pd.DataFrame(frame).groupby(STUDY, sort=True)
    studies = grouped.max()
    studies.insert(0, "n_slices", grouped.size())
    radnet_cols = [f"radnet_{name}" for name in names]
    studies[radnet_cols] = studies[radnet_cols].replace(-np.inf, 0.0)
    return studies.reset_index()


def level_tables(
    y_slice: np.ndarray,
    p_slice: np.ndarray,
    studies: pd.DataFrame,
    precisions: Sequence[float] = DEFAULT_PRECISIONS,
    names: Sequence[str] = LABELS,
) -> pd.DataFrame:
    """Threshold tables at slice level and at study level under both aggregation rules, stacked."""
    y_study = studies[[f"true_{n}" for n in names]].to_numpy()
    return pd.concat(
        [
            threshold_tables(y_slice, p_slice, precisions, names, "slice"),
            threshold_tables(y_study, studies[[f"max_{n}" for n in names]].to_numpy(), precisions, names, "study_max"),
            threshold_tables(
                y_study, studies[[f"radnet_{n}" for n in names]].to_numpy(), precisions, names, "study_radnet"
            ),
        ],
        ignore_index=True,
    )


def thresholds_to_dict(tables: pd.DataFrame, run: int = RADNET_RUN) -> dict:
    """The thresholds.json payload: level -> label -> "<precision>" -> operating point, null when unreachable."""
    out: dict = {
        "rule": {
            "slice": "p >= threshold",
            "study_max": "max over slices >= threshold",
            "study_radnet": f">= {run} consecutive slices (slice order) with p >= threshold",
        },
        "radnet_run": run,
        "precisions": sorted({float(x) for x in tables["target_precision"]}),
        "levels": {},
    }
    for row in tables.itertuples(index=False):
        entry = None
        if row.reachable:
            entry = {
                "threshold": row.threshold,
                "precision": row.precision,
                "recall": row.recall,
                "specificity": row.specificity,
                "support": int(row.support),
            }
        out["levels"].setdefault(row.level, {}).setdefault(row.label, {})[f"{row.target_precision:g}"] = entry
    return out


def flag_name(label: str, precision: float) -> str:
    return f"{label}_p{round(precision * 100):d}"


def apply_thresholds(
    meta: pd.DataFrame,
    probs: np.ndarray,
    thresholds: dict,
    names: Sequence[str] = LABELS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flags for new predictions: per image (slice thresholds) and per study (max rule and RADnet rule).

    Returns (images, studies). Flag columns are named `<label>_p<precision%>` (prefixed `max_`/`radnet_` for
    studies); a target that was unreachable on the OOF data gets no column. `triage_any` is the highest target
    precision at which the study's `any` is flagged by the max rule (0 = not flagged): a worklist priority.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    levels = thresholds["levels"]
    run = int(thresholds.get("radnet_run", RADNET_RUN))
    images = meta[["ID", STUDY]].copy()
    for j, name in enumerate(names):
        images[name] = p[:, j]
        for key, point in levels.get("slice", {}).get(name, {}).items():
            if point is not None:
                images[flag_name(name, float(key))] = p[:, j] >= point["threshold"]
    studies = aggregate_studies(meta, p, None, run, names)
    flags = {}
    for rule in ("max", "radnet"):
        for name in names:
            for key, point in levels.get(f"study_{rule}", {}).get(name, {}).items():
                if point is not None:
                    flags[f"{rule}_{flag_name(name, float(key))}"] = studies[f"{rule}_{name}"] >= point["threshold"]
    studies = pd.concat([studies, pd.DataFrame(flags, index=studies.index)], axis=1)
    priority = np.zeros(len(studies))
    if "any" in names:
        for key, point in levels.get("study_max", {}).get("any", {}).items():
            if point is not None:
                hit = studies["max_any"].to_numpy() >= point["threshold"]
                priority = np.where(hit, np.maximum(priority, float(key)), priority)
    studies["triage_any"] = priority
    return images, studies
