"""The training schedule as pure functions: BloodNet's phases and the learning rate at every step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from src.config import Config


@dataclass
class Phase:
    """A stretch of epochs with one loss mix and one set of trainable parameters (BloodNet's three steps)."""

    name: str
    epochs: int
    seg_lambda: float  # L = (1 - λ)·classification + λ·segmentation
    head_only: bool = False


def phases_for(cfg: Config) -> list[Phase]:
    if cfg.arch == "classifier":
        return [Phase("classify", cfg.epochs, 0.0)]
    return [
        Phase("segment", cfg.seg_epochs, 1.0),
        Phase("head", cfg.head_epochs, 0.0, head_only=True),
        Phase("joint", cfg.joint_epochs, cfg.joint_lambda),
    ]


def phase_at(phases: list[Phase], epoch: int) -> tuple[Phase, int]:
    """The phase that global epoch `epoch` (0-based) belongs to, and the epoch's index inside it."""
    for phase in phases:
        if epoch < phase.epochs:
            return phase, epoch
        epoch -= phase.epochs
    raise ValueError("epoch past the schedule")


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warmup, then cosine decay to 1% of base: a pure function of the step, so resuming is exact."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
