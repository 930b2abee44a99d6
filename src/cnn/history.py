"""The epoch log of a training run: one CSV row per epoch, the same as a learning-curve plot and TensorBoard events."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from src.atomic import save_png, write_csv
from src.cnn.tensorboard import log_history


def write_epochs(history: list[dict], out_dir: Path, tag: str) -> None:
    frame = pd.DataFrame(history)
    write_csv(frame, out_dir / f"{tag}_epochs.csv")
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(frame["epoch"], frame["train_loss"], marker="o", label="train loss")
    if "valid_wll" in frame:
        ax.plot(frame["epoch"], frame["valid_wll"], marker="o", label="valid weighted log loss")
    ax.set_xlabel("epoch")
    ax.set_title(f"{out_dir.name} {tag}")
    ax.legend()
    save_png(fig, out_dir / f"{tag}_curves.png", dpi=90)
    log_history(out_dir, tag, history)
