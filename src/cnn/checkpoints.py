"""Checkpoints: atomic save, resume (refusing other settings), and rebuilding the network from its own config."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.atomic import atomic_path
from src.config import AFTER_TRAINING_SECTIONS, BEFORE_KEY_EXISTED, Config, unused_keys
from src.errors import InputError
from src.naming import as_trained, flatten

# Keys that may change between a kill and a resume without invalidating the checkpoint.
# `seeds` may grow: the seeds already trained are kept and the new ones train beside them. data_dir: the same data
# under another path (a notebook's input mount) resumes; other data is refused by the fold split recorded in the
# model folder (src/data/folds.py guard_model_split), which covers every image ID.
# cache_format too: both stores hand the loader the same uint8 pixels, so a run may move to the zstd store mid-way.
# select_epoch only picks which saved weights to deploy, and early_stopping only when a run ends (one it stopped
# continues when run without it): neither makes the weights of an epoch differ.
RESUME_SAFE_KEYS = {"num_workers", "tta_flip", "log_every", "compile", "seeds", "data_dir", "predict_train",
                    "cache_format", "select_epoch", "early_stopping", *AFTER_TRAINING_SECTIONS}


VOLUME_CUTOFF_KEY = "volume_cutoff"  # a weak-mode checkpoint's calibrated volume cutoff (src/cnn/volume_cutoff.py)


def save_checkpoint(path: Path, model: nn.Module | dict, cfg: Config, epoch: int, optimizer=None,
                    **extra: Any) -> None:
    """model: the network, or its state_dict."""
    weights = model if isinstance(model, dict) else model.state_dict()
    state = {"model": weights, "config": dataclasses.asdict(cfg), "epoch": epoch, **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, cfg: Config) -> dict[str, Any] | None:
    """The last checkpoint of this run, or None; refuses one trained under a different config."""
    if not path.exists():
        return None
    state = read_checkpoint(path)
    # Compared key by key (dotted for the nested sections); a key the checkpoint's config lacks was added to the
    # code after it was saved and is read as the experiment name reads it (src/naming.py::as_trained).
    now = flatten(dataclasses.asdict(cfg))
    then = as_trained(state.get("config", {}), dataclasses.asdict(Config()), BEFORE_KEY_EXISTED)
    ignored = RESUME_SAFE_KEYS | unused_keys(cfg.arch)
    changed = sorted({k.split(".")[0] for k in now if k.split(".")[0] not in ignored and now[k] != then[k]})
    if changed:
        raise InputError(
            f"{path}: checkpoint was trained with other settings ({', '.join(changed)}); "
            "delete its folder or choose another exp name"
        )
    return state


def read_checkpoint(path: Path, advice: str = "; delete it to train the fold again") -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file is a user-facing problem, not a traceback
        raise InputError(f"{path}: cannot read checkpoint ({err}){advice}") from err


def deployed_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a run predicts with: best.pt holds the validated ones (the EMA copy when `ema` is on); a last.pt
    (a run without validation that stopped before saving best.pt) holds the EMA copy beside the raw weights."""
    return state.get("ema") or state["model"]


def deployed_checkpoint(model_dir: Path, cfg: Config, write: bool = True) -> Path:
    """best.pt: the weights a fold deploys (its OOF, test and triage predictions), last.pt when there is no best.pt.

    With select_epoch=last, a best.pt that holds another epoch (one chosen on the validation fold, as runs did before
    select_epoch existed) is rewritten from last.pt's deployed weights (rank 0 writes; `write=False` only looks)."""
    best, last = model_dir / "best.pt", model_dir / "last.pt"
    if cfg.select_epoch == "valid" and best.exists() and read_checkpoint(best).get("select_epoch") == "last":
        raise InputError(f"{best}: holds the last epoch (trained with select_epoch=last), not the one best on the "
                         "validation fold, which was not kept: train the fold under select_epoch=valid")
    if cfg.select_epoch == "last" and last.exists() and write:
        final = read_checkpoint(last)
        kept = read_checkpoint(best) if best.exists() else {}
        if kept.get("select_epoch") != "last" or kept.get("epoch") != final["epoch"]:
            # The same epoch holds the same weights: a weak-mode cutoff calibrated on them still holds.
            same = {VOLUME_CUTOFF_KEY: kept[VOLUME_CUTOFF_KEY]} \
                if kept.get("epoch") == final["epoch"] and VOLUME_CUTOFF_KEY in kept else {}
            save_checkpoint(best, deployed_weights(final), cfg, epoch=final["epoch"],
                            ema_weights=bool(final.get("ema")), select_epoch="last", **same)
    return best if best.exists() else last


def deploy(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Load a checkpoint's deployed weights and, for BloodNet, the pixel cutoff of its reported volume (the weak
    mode's calibrated one, src/cnn/volume_cutoff.py; 0.5 for checkpoints that have none)."""
    from src.cnn.model import MASK_CUTOFF

    model.load_state_dict(deployed_weights(state))
    if hasattr(model, "volume_cutoff"):
        model.volume_cutoff = float(state.get(VOLUME_CUTOFF_KEY, MASK_CUTOFF))
    return model


def config_from_dict(values: dict) -> Config:
    """A Config from dataclasses.asdict output; keys this code no longer knows are dropped with a note."""
    values = {**BEFORE_KEY_EXISTED, **values}  # a key it lacks whose default changed since: what such runs trained with
    kwargs, dropped = {}, []
    for f in dataclasses.fields(Config):
        if f.name not in values:
            continue  # a checkpoint older than the key: its default
        value = values[f.name]
        section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            known = {s.name for s in dataclasses.fields(section)}
            dropped += [f"{f.name}.{k}" for k in sorted(set(value or {}) - known)]
            value = dataclasses.replace(section, **{k: tuple(v) if isinstance(getattr(section, k), tuple) else v
                                                    for k, v in (value or {}).items() if k in known})
        kwargs[f.name] = value
    dropped = sorted(set(values) - set(kwargs) - {f.name for f in dataclasses.fields(Config)}) + dropped
    if dropped:
        print(f"note: checkpoint config keys not in this version, ignored: {', '.join(dropped)}", file=sys.stderr)
    for f in dataclasses.fields(Config):  # JSON and torch.save hand tuples (class_weights, extra_train) back as lists
        if isinstance(kwargs.get(f.name), list):
            kwargs[f.name] = tuple(kwargs[f.name])
    return Config(**kwargs)


def load_model(checkpoint_path: str | os.PathLike) -> tuple[nn.Module, Config]:
    """Rebuild the model a checkpoint was trained as (its own config), load the weights, return it in eval mode."""
    from src.cnn.model import build_model

    path = Path(checkpoint_path)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found")
    state = read_checkpoint(path, advice="")
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise InputError(f"{path}: not a training checkpoint (expects 'config' and 'model' entries)")
    cfg = config_from_dict(state["config"])
    # The weights come from the checkpoint: never re-read the pretrained file (it may be gone on this machine).
    model = build_model(dataclasses.replace(cfg, pretrained_path=""))
    try:
        deploy(model, state)
    except RuntimeError as err:
        raise InputError(f"{path}: weights do not fit {cfg.arch}/{cfg.backbone} ({str(err).splitlines()[0]})") from err
    return model.eval(), cfg
