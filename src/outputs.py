"""Training artefacts: checkpoints (atomic, resumable), the epoch log and curve plot, prediction and embedding files."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from src.atomic import atomic_path, write_csv, write_json, write_npy
from src.config import Config, run_record
from src.constants import FOLD_COL, ID_COL, LABELS, VOLUME_COL
from src.errors import InputError
from src.metrics import score_table
from src.paths import OOF_DIR

# Keys that may change between a kill and a resume without invalidating the checkpoint.
RESUME_SAFE_KEYS = {"num_workers", "tta_flip"}


def exp_dir(exp: str) -> Path:
    return OOF_DIR / exp


def save_checkpoint(path: Path, model: nn.Module, cfg: Config, epoch: int, optimizer=None, **extra: Any) -> None:
    state = {"model": model.state_dict(), "config": dataclasses.asdict(cfg), "epoch": epoch, **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, cfg: Config) -> dict[str, Any] | None:
    """The last checkpoint of this run, or None; refuses one trained under a different config."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a checkpoint torch cannot read is a user-facing problem, not a traceback
        raise InputError(f"{path}: cannot read checkpoint ({err}); delete it to start the fold again") from err
    now, then = dataclasses.asdict(cfg), state.get("config", {})
    changed = sorted(k for k in now if k not in RESUME_SAFE_KEYS and now[k] != then.get(k))
    if changed:
        raise InputError(
            f"{path}: checkpoint was trained with other settings ({', '.join(changed)}); "
            "delete its folder or choose another exp name"
        )
    return state


def write_epochs(history: list[dict], out_dir: Path, tag: str) -> None:
    """The epoch-metrics CSV, and the same as a learning-curve plot."""
    frame = pd.DataFrame(history)
    write_csv(frame, out_dir / f"{tag}_epochs.csv")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(frame["epoch"], frame["train_loss"], marker="o", label="train loss")
    if "valid_wll" in frame:
        ax.plot(frame["epoch"], frame["valid_wll"], marker="o", label="valid weighted log loss")
    ax.set_xlabel("epoch")
    ax.set_title(f"{out_dir.name} {tag}")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / f"{tag}_curves.png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def prediction_frame(meta: pd.DataFrame, pred: dict[str, np.ndarray], fold: int) -> pd.DataFrame:
    frame = pd.DataFrame({ID_COL: meta[ID_COL].to_numpy(), FOLD_COL: fold})
    for j, name in enumerate(LABELS):
        frame[name] = pred["probs"][:, j]
    if "volume_mm3" in pred:
        frame[VOLUME_COL] = pred["volume_mm3"]
    return frame


def write_predictions(out_dir: Path, tag: str, fold: int, results: dict[str, tuple], cfg: Config) -> None:
    """fold{K}_valid.csv / _test.csv, embeddings for train/valid/test, metrics and the run record."""
    for split, (meta, pred) in results.items():
        if split != "train":
            write_csv(prediction_frame(meta, pred, fold), out_dir / f"{tag}_{split}.csv")
        write_npy(pred["embedding"].astype(np.float16), out_dir / f"{tag}_{split}_emb.npy")
        write_csv(meta[[ID_COL]], out_dir / f"{tag}_{split}_emb_ids.csv")
    record = run_record(cfg)
    if "valid" in results:
        meta, pred = results["valid"]
        record["metrics"] = score_table(meta[list(LABELS)].to_numpy(), pred["probs"])
        write_json(record["metrics"], out_dir / f"{tag}_metrics.json")
    write_json(record, out_dir / f"{tag}_run.json")


def predictions_complete(out_dir: Path, tag: str, has_valid: bool) -> bool:
    names = [f"{tag}_test.csv", f"{tag}_run.json", f"{tag}_train_emb.npy", f"{tag}_test_emb.npy"]
    if has_valid:
        names += [f"{tag}_valid.csv", f"{tag}_valid_emb.npy", f"{tag}_metrics.json"]
    return all((out_dir / n).exists() for n in names)
