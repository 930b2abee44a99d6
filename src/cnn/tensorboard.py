"""TensorBoard event files per fold (`oof/<exp>/tensorboard/fold{K}/`): loss, lr, metrics, epoch time. Offline: the
writer only appends to local files; `tensorboard --logdir oof` compares experiments side by side."""

from __future__ import annotations

import numbers
from pathlib import Path

TB_DIR = "tensorboard"
# Row keys that are bookkeeping, not curves.
NOT_SCALARS = frozenset({"epoch", "phase"})


def scalar_tag(key: str) -> str:
    """`train_loss` -> `train/loss`, `valid_auc_any` -> `valid/auc_any`: TensorBoard groups by the part before '/'."""
    head, _, rest = key.partition("_")
    return f"{head}/{rest}" if head in ("train", "valid") and rest else key


def log_epoch(out_dir: Path, tag: str, row: dict) -> Path:
    """Append one epoch's numbers at step = epoch. A resumed run re-logs an epoch a kill cut short: purge_step makes
    TensorBoard drop what the killed run wrote from that step on, so each curve has one point per epoch."""
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run writes events

    log_dir = Path(out_dir) / TB_DIR / tag
    step = int(row["epoch"])
    writer = SummaryWriter(log_dir=str(log_dir), purge_step=step)
    try:
        for key, value in row.items():
            if key not in NOT_SCALARS and isinstance(value, numbers.Real) and not isinstance(value, bool):
                writer.add_scalar(scalar_tag(key), float(value), step)
    finally:
        writer.close()
    return log_dir
