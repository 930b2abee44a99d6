"""The config's values, checked once after loading: a wrong one stops in one line naming the key, before any cache
is built or epoch trained (a negative learning rate or a batch of 0 would otherwise fail deep inside torch, or
worse, train). Keys whose choices live with the code that reads them (masks, seg_loss, optimizer) are checked
there."""

from __future__ import annotations

import math
from typing import Any

from src.constants import CACHE_FORMATS, LABEL_WEIGHTS
from src.errors import InputError

ARCHS = ("classifier", "multitask", "bloodnet")
SELECT_EPOCH = ("last", "valid")
CHOICES: dict[str, tuple[str, ...]] = {"arch": ARCHS, "cache_format": CACHE_FORMATS, "select_epoch": SELECT_EPOCH}

# (low, high, low inclusive, high inclusive). Dotted keys reach sections.
INF = math.inf
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    # 32 px: the smallest image a timm ResNet's five stride-2 stages leave at least one pixel of
    "image_size": (32, INF, True, True),
    "n_folds": (2, INF, True, True),
    "context": (0, INF, True, True),
    "drop_rate": (0, 1, True, False),
    "epochs": (0, INF, True, True),
    "batch_size": (1, INF, True, True),
    "lr": (0, INF, False, True),
    "weight_decay": (0, INF, True, True),
    "warmup_epochs": (0, INF, True, True),
    "head_lr_scale": (0, INF, False, True),
    "head_step_lr": (0, INF, True, True),  # 0: lr
    "grad_clip": (0, INF, True, True),  # 0: no clipping
    "early_stopping": (0, INF, True, True),
    "seg_epochs": (0, INF, True, True),
    "head_epochs": (0, INF, True, True),
    "joint_epochs": (0, INF, True, True),
    "joint_lambda": (0, INF, True, True),
    "weak_pool_r": (0, INF, False, True),
    "map_evidence_r": (0, INF, True, True),  # 0: off
    "seg_hard_negatives": (0, 1, True, True),
    "seg_study_balance": (0, 1, True, True),
    "decoder_width": (0, 4, False, True),
    "ema_decay": (0, 1, False, False),
    "accumulate": (1, INF, True, True),
    "seeds": (1, INF, True, True),
    "log_every": (1, INF, True, True),
    "num_workers": (-1, INF, True, True),
    "limit_train_batches": (0, INF, True, True),
    "aug.hflip": (0, 1, True, True),
    "aug.shift_scale_rotate": (0, 1, True, True),
    "aug.brightness_contrast": (0, 1, True, True),
    "aug.coarse_dropout": (0, 1, True, True),
}


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _interval(low: float, high: float, low_in: bool, high_in: bool) -> str:
    if high == INF:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_config(cfg: Any) -> None:
    """Raise InputError naming the first key whose value is out of its range or choices."""
    for key, choices in CHOICES.items():
        if (value := _value(cfg, key)) not in choices:
            raise InputError(f"config key {key}: {value!r} is not one of {', '.join(choices)}")
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = _value(cfg, key)
        inside = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
        if not inside or value != value:  # NaN compares false both ways
            raise InputError(f"config key {key}: {value} is not {_interval(low, high, low_in, high_in)}")
    if len(cfg.class_weights) != len(LABEL_WEIGHTS) or min(cfg.class_weights) < 0:
        raise InputError(f"config key class_weights: expected {len(LABEL_WEIGHTS)} values >= 0 (label order: "
                         f"src/constants.py), got {list(cfg.class_weights)}")
    if cfg.freeze_map_weights and cfg.arch == "bloodnet" and cfg.head_epochs < 1:
        raise InputError("config key freeze_map_weights=true keeps the head's map weights as the head step fit "
                         "them, and head_epochs=0 has no head step: set head_epochs >= 1")
    if cfg.early_stopping > 0 and cfg.select_epoch != "valid":
        raise InputError(f"config key early_stopping={cfg.early_stopping}: early stopping judges epochs on the "
                         "validation fold, whose rows the OOF then scores; set select_epoch=valid to accept that "
                         "optimism, or early_stopping=0")
