"""Precision-recall and ROC curve PNGs per class, with the fixed-precision operating points marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from src.atomic import save_png
from src.constants import LABELS
from src.evaluate.thresholds import operating_curve

# Figure objects without pyplot render with the Agg canvas: no display, no global backend state to switch.
MAX_POINTS = 2000  # a curve over 750k distinct scores is drawn from this many points; the eye sees no difference


def _thin(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int)) if n else np.array([], dtype=int)


def curve_points(y_true: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    """Recall, precision and false-positive rate at every distinct threshold (descending), thinned for plotting."""
    y = np.asarray(y_true, dtype=bool)
    curve = operating_curve(y, score)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    keep = _thin(len(curve["tp"]))
    tp, fp = curve["tp"][keep].astype(float), curve["fp"][keep].astype(float)
    return {
        "recall": tp / n_pos if n_pos else np.full(len(tp), np.nan),
        "precision": tp / np.maximum(tp + fp, 1),
        "fpr": fp / n_neg if n_neg else np.full(len(tp), np.nan),
    }


def plot_curves(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    out_dir: str | Path,
    points: pd.DataFrame | None = None,
    aucs: dict[str, float] | None = None,
    names: Sequence[str] = LABELS,
    prefix: str = "",
) -> list[Path]:
    """Write `<prefix>pr_<label>.png` and `<prefix>roc_<label>.png` per column; returns the paths written.

    points: a threshold table (label, target_precision, reachable, precision, recall, specificity) whose
    reachable operating points are marked on both curves.
    """
    out_dir = Path(out_dir)
    y = np.asarray(y_true).reshape(len(y_true), -1)
    p = np.asarray(y_prob).reshape(len(y_prob), -1)
    written = []
    for j, name in enumerate(names):
        if y[:, j].sum() == 0 or y[:, j].sum() == len(y):
            continue  # one class only: neither curve is defined
        c = curve_points(y[:, j], p[:, j])
        marks = pd.DataFrame() if points is None else points[(points["label"] == name) & points["reachable"]]
        prevalence = y[:, j].mean()

        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        ax.plot(c["recall"], c["precision"], lw=1.5)
        ax.axhline(prevalence, color="grey", ls=":", lw=1, label=f"prevalence {prevalence:.3f}")
        for row in marks.itertuples(index=False):
            ax.plot(row.recall, row.precision, "o", ms=5, label=f"P>={row.target_precision:g}: R={row.recall:.3f}")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01), title=f"{prefix}{name}: PR")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(loc="lower left", fontsize=7)
        written.append(save_png(fig, out_dir / f"{prefix}pr_{name}.png"))

        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        auc = (aucs or {}).get(name)
        ax.plot(
            np.r_[0.0, c["fpr"]], np.r_[0.0, c["recall"]], lw=1.5, label=f"AUC {auc:.4f}" if auc is not None else None
        )
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        for row in marks.itertuples(index=False):
            ax.plot(1 - row.specificity, row.recall, "o", ms=5, label=f"P>={row.target_precision:g}")
        ax.set(
            xlabel="false positive rate",
            ylabel="recall (sensitivity)",
            xlim=(0, 1),
            ylim=(0, 1.01),
            title=f"{prefix}{name}: ROC",
        )
        if ax.get_legend_handles_labels()[1]:  # no curve when a class has no positives
            ax.legend(loc="lower right", fontsize=7)
        written.append(save_png(fig, out_dir / f"{prefix}roc_{name}.png"))
    return written
