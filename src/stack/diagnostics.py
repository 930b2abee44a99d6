"""How much a slice's neighbours can tell a stacker, measured on the CNN's OOF before any stacker is fit.

A stacker gains where the CNN's errors on neighbouring slices are independent: averaging evidence along the
series then cancels them. Where a CNN misses a whole bleed (or flags a calcification on every slice it spans),
its residuals move together along the series and no amount of neighbour context recovers the miss. Two numbers
say which case a dataset is in: the lag-1 correlation of the residuals, and what a small linear stacker on the
neighbour window reaches when fit on the very rows it scores (an optimistic bound for such features).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from src.constants import LABELS
from src.metric import score_table
from src.stack.features import SERIES_ID, SLICE_POS, clipped_logit, series_shift

WINDOW_WIDTHS = (1, 2, 4)  # half-widths (slices) of the window means a linear stacker sees


def residual_lag1_correlation(table: pd.DataFrame, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Per label, the Pearson correlation of the residual y - p between each slice and the next one of its series
    (`table` assembled by `assemble_series`, y and p [N, 6] in its row order). NaN where a residual is constant."""
    nxt = np.flatnonzero(table[SLICE_POS].to_numpy()[1:] > 0) + 1  # rows whose previous row is the same series
    resid = np.asarray(y, float) - np.asarray(p, float)
    out = {}
    for j, name in enumerate(LABELS):
        a, b = resid[nxt - 1, j], resid[nxt, j]
        ok = len(a) > 1 and a.std() > 0 and b.std() > 0
        out[name] = float(np.corrcoef(a, b)[0, 1]) if ok else float("nan")
    return out


def window_features(table: pd.DataFrame, p: np.ndarray, label: int) -> np.ndarray:
    """[N, 2 + len(WINDOW_WIDTHS) + 2] for one label: own logit, series max and mean logit, window-mean logits."""
    logit = clipped_logit(p)[:, [label]]
    cols = [logit[:, 0]]
    series = pd.Series(logit[:, 0]).groupby(table[SERIES_ID].to_numpy())
    cols += [series.transform("max").to_numpy(), series.transform("mean").to_numpy()]
    for width in WINDOW_WIDTHS:
        window = [logit] + [series_shift(logit, table, j) for j in range(1, width + 1)]
        window += [series_shift(logit, table, -j) for j in range(1, width + 1)]
        cols.append(np.nanmean(np.stack(window), axis=0)[:, 0])
    return np.column_stack(cols)


def linear_stack(table: pd.DataFrame, y: np.ndarray, p: np.ndarray,
                 splits: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """Per-label logistic regression on `window_features`. With `splits` [(fit rows, predicted rows)], each row is
    predicted by a model not fit on it; without, one model is fit on all rows and scores them (the ceiling)."""
    y = np.asarray(y, float)
    out = np.empty_like(y)
    everything = np.arange(len(y))
    for j in range(len(LABELS)):
        X = window_features(table, p, j)
        for fit_rows, pred_rows in splits or [(everything, everything)]:
            if len(np.unique(y[fit_rows, j])) < 2:  # a label absent from the fit rows: its rate is all there is
                out[pred_rows, j] = y[fit_rows, j].mean()
                continue
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            out[pred_rows, j] = model.fit(X[fit_rows], y[fit_rows, j]).predict_proba(X[pred_rows])[:, 1]
    return out


def neighbour_information(table: pd.DataFrame, y: np.ndarray, p: np.ndarray,
                          splits: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Residual lag-1 correlations and the weighted log loss of the CNN, of the cross-fitted linear stacker and of
    the same stacker fit on the rows it scores (an optimistic ceiling for neighbour-window features)."""
    cnn = score_table(y, p)["weighted_log_loss"]
    crossed = score_table(y, linear_stack(table, y, p, splits))["weighted_log_loss"]
    ceiling = score_table(y, linear_stack(table, y, p))["weighted_log_loss"]
    return {
        "residual_lag1_correlation": residual_lag1_correlation(table, y, p),
        "cnn_wll": cnn, "linear_cv_wll": crossed, "linear_in_sample_wll": ceiling,
        "linear_cv_cut_%": 100.0 * (cnn - crossed) / cnn, "in_sample_ceiling_cut_%": 100.0 * (cnn - ceiling) / cnn,
    }


def information_markdown(info: dict) -> str:
    corr = info["residual_lag1_correlation"]
    lines = [
        "## How much the neighbours can tell",
        "",
        "Lag-1 correlation of the CNN's residual (label - probability) between neighbouring slices; near 1 means "
        "the CNN's errors span whole bleeds, which neighbour context cannot undo.",
        "",
        "| " + " | ".join(LABELS) + " |",
        "|" + "---|" * len(LABELS),
        "| " + " | ".join(f"{corr[name]:.3f}" for name in LABELS) + " |",
        "",
        "A per-label logistic stacker on the CNN logit, its ±" + ", ±".join(map(str, WINDOW_WIDTHS))
        + " slice window means and the series max and mean:",
        "",
        "| predictions | slice_wll | cut_% |",
        "|---|---|---|",
        f"| cnn | {info['cnn_wll']:.5f} | 0.0 |",
        f"| linear, level-2 CV | {info['linear_cv_wll']:.5f} | {info['linear_cv_cut_%']:.1f} |",
        f"| linear, fit on the rows it scores (ceiling, not a result) | {info['linear_in_sample_wll']:.5f} "
        f"| {info['in_sample_ceiling_cut_%']:.1f} |",
        "",
    ]
    return "\n".join(lines)
