"""The competition metric (weighted multi-label log loss) and per-class scores, shared by every stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from src.constants import LABEL_WEIGHTS, LABELS, METRIC_CLIP


def _bce(y_true: np.ndarray, y_prob: np.ndarray, clip: float) -> np.ndarray:
    """Binary log loss of every cell, probabilities clipped as Kaggle's scorer does."""
    y_true = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_prob, dtype=np.float64), clip, 1.0 - clip)
    return -(y_true * np.log(p) + (1.0 - y_true) * np.log1p(-p))


def per_class_log_loss(y_true: np.ndarray, y_prob: np.ndarray, clip: float = METRIC_CLIP) -> np.ndarray:
    """Mean binary log loss of each label column; y arrays are [N, 6] in LABELS order."""
    return _bce(y_true, y_prob, clip).mean(axis=0)


def weighted_log_loss(y_true: np.ndarray, y_prob: np.ndarray, clip: float = METRIC_CLIP) -> float:
    """Kaggle's score: per-label log loss weighted (any = 2, subtypes = 1) and divided by the weight sum."""
    weights = np.asarray(LABEL_WEIGHTS)
    return float((per_class_log_loss(y_true, y_prob, clip) * weights).sum() / weights.sum())


def per_row_weighted_log_loss(y_true: np.ndarray, y_prob: np.ndarray, clip: float = METRIC_CLIP) -> np.ndarray:
    """Each image's share of the score: Σ_j w_j·BCE_ij / Σ_j w_j, so weighted_log_loss is their mean (bootstraps
    that reweight images need it per image)."""
    weights = np.asarray(LABEL_WEIGHTS)
    return (_bce(y_true, y_prob, clip) * weights).sum(axis=1) / weights.sum()


def per_class_auc(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """ROC AUC per label; NaN where a label has a single class in y_true (AUC undefined)."""
    y_true = np.asarray(y_true)
    out = {}
    for j, name in enumerate(LABELS):
        column = y_true[:, j]
        out[name] = float(roc_auc_score(column, y_prob[:, j])) if 0 < column.sum() < len(column) else float("nan")
    return out


def score_table(y_true: np.ndarray, y_prob: np.ndarray) -> dict:
    """The metrics JSON written beside predictions: weighted log loss, per-class log loss and AUC."""
    losses = per_class_log_loss(y_true, y_prob)
    return {
        "weighted_log_loss": weighted_log_loss(y_true, y_prob),
        "log_loss": {name: float(v) for name, v in zip(LABELS, losses)},
        "auc": per_class_auc(y_true, y_prob),
        "n_images": len(y_true),
    }


def auc_from_ranks(y_true: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC (ties count half) for one or many weight vectors: weights [B, N] gives B AUCs, NaN if undefined.

    Sorting once and summing weights inside each tie group makes every extra weight vector cost O(N), which is
    what lets the bootstrap below run 1000 resamples in seconds.
    """
    prep = _rank_prep(y_true, score)
    return _weighted_auc(prep, None if weights is None else np.atleast_2d(weights), prep[0])


def group_weighted_aucs(y_true: np.ndarray, score: np.ndarray, codes: np.ndarray, counts: np.ndarray,
                        max_cells: int = 4_000_000) -> np.ndarray:
    """One AUC per row of counts [B, G], row i weighted by counts[:, codes[i]] (e.g. bootstrap multiplicities of
    studies), in chunks of at most max_cells weights; NaN where a resample has one class only."""
    prep = _rank_prep(y_true, score)
    group_sorted = np.asarray(codes)[prep[0]]
    counts = np.atleast_2d(counts)
    chunk = max(1, max_cells // max(len(group_sorted), 1))
    return np.concatenate([_weighted_auc(prep, counts[start : start + chunk], group_sorted)
                           for start in range(0, len(counts), chunk)])


def _rank_prep(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, ...]:
    """Ascending sort order, tie-group starts, and for the groups holding positives: their index and the starts of
    their runs among the sorted positive rows."""
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(score, kind="stable")
    s_sorted = score[order]
    new_group = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    starts = np.flatnonzero(new_group)
    y_sorted = np.asarray(y_true, dtype=bool)[order]
    pos_rows = np.flatnonzero(y_sorted)
    pos_group = (np.cumsum(new_group) - 1)[pos_rows]
    first = np.r_[True, pos_group[1:] != pos_group[:-1]] if len(pos_rows) else np.array([], dtype=bool)
    return order, starts, pos_rows, pos_group[first], np.flatnonzero(first)


def _weighted_auc(
    prep: tuple[np.ndarray, ...], counts: np.ndarray | None, group_sorted: np.ndarray | None = None
) -> np.ndarray:
    """AUC per row of counts [B, n_groups], row i weighted by counts[:, group of row i]; group_sorted lists the
    rows' groups in sorted-score order. Gathering from the small per-study table is cache-friendly, and only
    tie groups holding positives enter the numerator: one gather, one reduceat and one cumsum over all rows."""
    order, starts, pos_rows, pos_groups, pos_starts = prep
    if counts is None:
        w = np.ones((1, len(order)), dtype=np.float32)
    else:
        # Bootstrap multiplicities are integers: sums stay exact in float32 below 2**24 and run ~3x faster.
        w = np.take(np.asarray(counts, dtype=np.float32), group_sorted, axis=1)
    if len(pos_rows) == 0:
        return np.full(len(w), np.nan)
    total = np.add.reduceat(w, starts, axis=1)
    total_below = (np.cumsum(total, axis=1) - total)[:, pos_groups].astype(np.float64)
    total_at = total[:, pos_groups].astype(np.float64)
    all_weight = total.sum(axis=1, dtype=np.float64)
    pos = np.add.reduceat(w[:, pos_rows], pos_starts, axis=1).astype(np.float64)
    pos_below = np.cumsum(pos, axis=1) - pos
    neg_below, neg_at = total_below - pos_below, total_at - pos
    numerator = (pos * (neg_below + 0.5 * neg_at)).sum(axis=1)
    pos_weight = pos.sum(axis=1)
    denominator = pos_weight * (all_weight - pos_weight)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def bootstrap_auc(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    names: tuple[str, ...] = LABELS,
    max_cells: int = 4_000_000,
) -> pd.DataFrame:
    """AUC per column with a percentile bootstrap CI that resamples whole groups (studies), not slices.

    Slices of one study are strongly correlated, so resampling slices understates the CI width. Every column
    sees the same resamples (paired). groups=None resamples rows. Resamples where a class has one label only
    are dropped (n_boot_valid says how many were kept). max_cells bounds the [resamples, rows] weight matrix.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    p = np.asarray(y_prob, dtype=np.float64).reshape(len(y_prob), -1)
    group_idx = np.arange(len(y)) if groups is None else pd.factorize(np.asarray(groups))[0]
    n_groups = int(group_idx.max()) + 1 if len(group_idx) else 0
    preps = [_rank_prep(y[:, j], p[:, j]) for j in range(y.shape[1])]
    group_sorted = [group_idx[prep[0]] for prep in preps]
    rng = np.random.default_rng(seed)
    boots = np.full((n_boot, y.shape[1]), np.nan)
    chunk = max(1, min(n_boot, max_cells // max(len(y), 1)))
    for start in tqdm(range(0, n_boot, chunk), desc="bootstrap AUC", unit="chunk", disable=n_boot <= chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        # Multiplicity of each group in each resample: one bincount over row-offset draws.
        counts = np.bincount((draws + np.arange(b)[:, None] * n_groups).ravel(), minlength=b * n_groups)
        counts = counts.reshape(b, n_groups).astype(np.float32)
        for j in range(y.shape[1]):
            boots[start : start + b, j] = _weighted_auc(preps[j], counts, group_sorted[j])
    rows = []
    for j in range(y.shape[1]):
        point = _weighted_auc(preps[j], None)[0]
        valid = boots[:, j][~np.isnan(boots[:, j])]
        lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2]) if len(valid) else (np.nan, np.nan)
        rows.append(
            {
                "label": names[j] if j < len(names) else str(j),
                "auc": float(point),
                "ci_low": float(lo),
                "ci_high": float(hi),
                "n_boot_valid": len(valid),
                "n_pos": int(y[:, j].sum()),
                "n_neg": int(len(y) - y[:, j].sum()),
                "n_groups": n_groups,
            }
        )
    return pd.DataFrame(rows)
