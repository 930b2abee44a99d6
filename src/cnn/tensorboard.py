"""TensorBoard event files per fold (`oof/<exp>/tensorboard/fold{K}/`): loss, lr, metrics, epoch time. Offline: the
writer only writes local files; `tensorboard --logdir oof` compares experiments side by side."""

from __future__ import annotations

import numbers
import shutil
from pathlib import Path

TB_DIR = "tensorboard"
# Row keys that are bookkeeping, not curves.
NOT_SCALARS = frozenset({"epoch", "phase"})


def scalar_tag(key: str) -> str:
    """`train_loss` -> `train/loss`, `valid_auc_any` -> `valid/auc_any`: TensorBoard groups by the part before '/'."""
    head, _, rest = key.partition("_")
    return f"{head}/{rest}" if head in ("train", "valid") and rest else key


def log_history(out_dir: Path, tag: str, history: list[dict]) -> Path:
    """Write the fold's whole epoch history as one event file, replacing the last one.

    Why not append one epoch per call: every writer opens a new file, and TensorBoard reads a folder's files in name
    order. The names end in a per-process counter that does not sort as a number (`...9` after `...10`), so after a
    resume the killed run's epoch could be read last and win over the retrained one. One file written from the
    history (the same list the CSV is written from) has one point per epoch by construction. The new file is
    written beside the folder and swapped in, so a kill never leaves a fold with no curves."""
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run writes events

    log_dir = Path(out_dir) / TB_DIR / tag
    fresh, stale = log_dir.with_name(f".{tag}.writing"), log_dir.with_name(f".{tag}.replaced")
    for leftover in (fresh, stale):  # from a run killed mid-swap
        shutil.rmtree(leftover, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(fresh))
    try:
        for row in history:
            step = int(row["epoch"])
            for key, value in row.items():
                if key not in NOT_SCALARS and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    writer.add_scalar(scalar_tag(key), float(value), step)
    finally:
        writer.close()
    if log_dir.exists():
        log_dir.rename(stale)
    fresh.rename(log_dir)
    shutil.rmtree(stale, ignore_errors=True)
    return log_dir
