"""Learned `any` vs `any` derived from the subtypes (the ResNet50 paper's Table III comparison)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from src.constants import LABELS, METRIC_CLIP, SUBTYPES
from src.evaluate.thresholds import threshold_table
from src.metric import auc_from_ranks


def derived_any(y_prob: np.ndarray) -> dict[str, np.ndarray]:
    """The three `any` scores of the paper's Table III: learned, max over subtypes, noisy-OR 1 - prod(1 - p)."""
    p = np.asarray(y_prob, dtype=np.float64)
    subtypes = p[:, : len(SUBTYPES)]
    return {
        "learned": p[:, LABELS.index("any")],
        "max_subtypes": subtypes.max(axis=1),
        "noisy_or": 1.0 - np.prod(1.0 - subtypes, axis=1),
    }


def any_comparison(y_true: np.ndarray, y_prob: np.ndarray, precision: float = 0.7) -> pd.DataFrame:
    """Learned vs derived `any`: log loss, AUC, and the recall-maximising operating point at a fixed precision."""
    y_any = np.asarray(y_true, dtype=np.float64)[:, LABELS.index("any")]
    rows = []
    for name, score in derived_any(y_prob).items():
        p = np.clip(score, METRIC_CLIP, 1.0 - METRIC_CLIP)
        point = threshold_table(y_any, score, [precision]).iloc[0]
        rows.append(
            {
                "any_variant": name,
                "log_loss": float(-(y_any * np.log(p) + (1.0 - y_any) * np.log1p(-p)).mean()),
                "auc": float(auc_from_ranks(y_any, score)[0]),
                "target_precision": precision,
                "threshold": point["threshold"],
                "precision": point["precision"],
                "recall": point["recall"],
                "accuracy": point["accuracy"],
            }
        )
    return pd.DataFrame(rows)
