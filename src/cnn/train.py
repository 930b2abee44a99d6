"""Train one fold (`python -m src.cnn.train --fold K`), resume after a kill, write OOF/test predictions and embeddings.

Runs as is on CPU or one GPU, and under `torchrun --nproc_per_node N -m src.cnn.train ...` with DistributedDataParallel
(NCCL on GPUs, gloo on CPU); only rank 0 writes files. The steps of `run_fold`, in order: data, model, resume state,
the epoch loop (train, validate, checkpoint), then predictions from the best checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, RandomSampler

from src import predictions
from src.cnn.checkpoints import load_checkpoint, save_checkpoint
from src.cnn.distributed import barrier, loader_for, predict_sharded, setup_distributed, unwrap
from src.cnn.history import write_epochs
from src.cnn.loop import Runtime, make_optimizer, train_one_epoch, validate
from src.cnn.model import build_model
from src.cnn.schedule import Phase, phase_at, phases_for
from src.config import Config, load_config
from src.constants import FOLD_COL, ID_COL
from src.data.cache import load_cache
from src.data.dataset import SliceDataset, build_augment
from src.data.folds import load_folds
from src.errors import InputError, run_cli
from src.paths import WORK, resolve_data_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_fold(
    cfg: Config, data_dir: Path, fold: int
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray | None]:
    meta, images, masks = load_cache(data_dir, cfg.image_size, "train")
    folds = load_folds(data_dir, cfg.n_folds, cfg.fold_seed)
    meta = meta.merge(folds[[ID_COL, FOLD_COL]], on=ID_COL, how="left", validate="one_to_one")
    if meta[FOLD_COL].isna().any():
        raise InputError(
            f"fold file for {data_dir} misses {int(meta[FOLD_COL].isna().sum())} images; delete it to rebuild"
        )
    meta[FOLD_COL] = meta[FOLD_COL].astype(int)
    if fold >= cfg.n_folds or fold < -1:
        raise InputError(f"--fold {fold}: expected -1 (all folds) or 0..{cfg.n_folds - 1}")
    valid = meta[meta[FOLD_COL] == fold].reset_index(drop=True)
    train = meta[meta[FOLD_COL] != fold].reset_index(drop=True)
    return train, valid, images, masks


@dataclass
class Progress:
    """What a resumed run carries over from last.pt; a fresh run starts from the defaults."""

    start_epoch: int = 0
    best: float = math.inf
    stale: int = 0
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    state: dict | None = None  # the checkpoint itself (optimizer state, phase)

    @classmethod
    def resume(cls, path: Path, cfg: Config, model: nn.Module) -> Progress:
        state = load_checkpoint(path, cfg)
        if state is None:
            return cls()
        unwrap(model).load_state_dict(state["model"])
        return cls(state["epoch"], state["best"], state["stale"], state["history"],
                   bool(state.get("stopped_early", False)), state)


def prepare_data(cfg: Config, data_dir: Path, fold: int, rt: Runtime):
    """Caches and folds built once by rank 0, then each rank's train/valid datasets."""
    if rt.rank == 0:  # build caches and folds once, before the other ranks read them
        load_cache(data_dir, cfg.image_size, "test")
        split_fold(cfg, data_dir, fold)
    barrier(rt.world)
    train_meta, valid_meta, images, masks = split_fold(cfg, data_dir, fold)
    if rt.rank == 0 and cfg.arch != "classifier" and (masks is None or (train_meta["mask_row"] < 0).all()):
        print(f"[train] warning: {data_dir} has no masks/: the segmentation branch only learns from known-empty "
              "slices (any = 0), so its volume feature carries little; consider arch=classifier")
    train_ds = SliceDataset(train_meta, images, cfg.context, masks, augment=build_augment(cfg.aug))
    valid_ds = SliceDataset(valid_meta, images, cfg.context, masks) if len(valid_meta) else None
    return train_meta, images, train_ds, valid_ds


def prepare_model(cfg: Config, rt: Runtime) -> nn.Module:
    model = build_model(cfg).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.world > 1:
        # find_unused_parameters: BloodNet's phases leave the decoder or the head out of the loss.
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                        find_unused_parameters=cfg.arch != "classifier")
    return model


def epoch_sampler(train_ds, cfg: Config, rt: Runtime, epoch: int):
    if rt.world > 1:
        sampler = DistributedSampler(train_ds, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return sampler
    # Seeded by epoch, so an epoch re-run after a kill sees the same order.
    return RandomSampler(train_ds, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))


def train_epochs(model: nn.Module, train_ds, valid_ds, cfg: Config, rt: Runtime, phases: list[Phase],
                 progress: Progress, model_dir: Path, out_dir: Path, tag: str) -> None:
    """The epoch loop: train, validate, keep best.pt and last.pt (resumable), stop early when stale."""
    total_epochs = sum(p.epochs for p in phases)
    weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=rt.device)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
    optimizer, current_phase, state = None, None, progress.state
    for epoch in range(progress.start_epoch, total_epochs):
        if progress.stopped_early:
            break
        phase, epoch_in_phase = phase_at(phases, epoch)
        if phase is not current_phase:
            optimizer = make_optimizer(cfg, model, phase.head_only)
            if state is not None and state.get("phase") == phase.name and state.get("optimizer"):
                optimizer.load_state_dict(state["optimizer"])
            if phase.name != (state or {}).get("phase"):
                progress.stale = 0  # early stopping counts within a phase
            current_phase = phase
        loader = loader_for(train_ds, cfg, cfg.batch_size, epoch_sampler(train_ds, cfg, rt, epoch))
        desc = f"{tag} epoch {epoch + 1}/{total_epochs} [{phase.name}]"
        row = {"epoch": epoch + 1, "phase": phase.name,
               **train_one_epoch(model, loader, optimizer, scaler, phase, epoch_in_phase, cfg, rt, weights, desc)}
        improved = valid_ds is None  # training on all folds: the last epoch is the model
        if valid_ds is not None:
            row.update(validate(model, valid_ds, cfg, rt, f"{tag} valid"))
            # Segmentation-only epochs leave the head untrained: they never become "best".
            if phase.seg_lambda < 1.0 and row["valid_wll"] < progress.best:
                progress.best, progress.stale, improved = row["valid_wll"], 0, True
            elif phase.seg_lambda < 1.0:
                progress.stale += 1
        progress.history.append(row)
        progress.stopped_early = bool(valid_ds is not None and cfg.early_stopping
                                      and progress.stale >= cfg.early_stopping and phase is phases[-1])
        if rt.rank == 0:
            if improved:
                save_checkpoint(model_dir / "best.pt", unwrap(model), cfg, epoch=epoch + 1)
            save_checkpoint(model_dir / "last.pt", unwrap(model), cfg, epoch=epoch + 1, optimizer=optimizer,
                            phase=phase.name, best=progress.best, stale=progress.stale, history=progress.history,
                            stopped_early=progress.stopped_early)
            write_epochs(progress.history, out_dir, tag)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            print(f"[train] {shown}{'  *best*' if improved and valid_ds is not None else ''}", flush=True)
        barrier(rt.world)
        if progress.stopped_early and rt.rank == 0:
            print(f"[train] early stop: no improvement for {cfg.early_stopping} epochs")


def predict_outputs(model: nn.Module, cfg: Config, rt: Runtime, data_dir: Path, model_dir: Path, tag: str,
                    train_meta: pd.DataFrame, images: np.ndarray, valid_ds) -> dict[str, tuple]:
    """Predictions of the best checkpoint: OOF for the held-out fold, test, and embeddings for the stacker."""
    chosen = model_dir / "best.pt" if (model_dir / "best.pt").exists() else model_dir / "last.pt"
    unwrap(model).load_state_dict(torch.load(chosen, map_location="cpu", weights_only=False)["model"])

    def predict(ds, tta: bool, desc: str) -> dict[str, np.ndarray]:
        return predict_sharded(model, ds, cfg, rt.device, rt.world, rt.rank, rt.amp_dtype, rt.channels_last, tta,
                               desc)

    results = {}
    if valid_ds is not None:
        results["valid"] = (valid_ds.meta, predict(valid_ds, cfg.tta_flip, f"{tag} valid"))
    test_meta, test_images, _ = load_cache(data_dir, cfg.image_size, "test")
    test_ds = SliceDataset(test_meta, test_images, cfg.context, with_labels=False)
    results["test"] = (test_meta, predict(test_ds, cfg.tta_flip, f"{tag} test"))
    if cfg.predict_train:  # in-sample predictions: nothing in the pipeline reads them, a stacker must not
        results["train"] = (train_meta, predict(SliceDataset(train_meta, images, cfg.context), False, f"{tag} train"))
    return results


def run_fold(cfg: Config, fold: int, data_dir: Path) -> Path:
    rank, world, device = setup_distributed()
    rt = Runtime.create(cfg, rank, world, device)
    seed_everything(cfg.seed + rank)
    exp, tag = cfg.exp_name, (f"fold{fold}" if fold >= 0 else "full")
    model_dir, out_dir = WORK / "models" / exp / tag, predictions.exp_dir(exp)
    if rank == 0:
        print(f"[train] exp={exp} {tag} data={data_dir} device={device} world={world}")

    train_meta, images, train_ds, valid_ds = prepare_data(cfg, data_dir, fold, rt)
    has_valid = valid_ds is not None
    model = prepare_model(cfg, rt)
    phases = phases_for(cfg)
    total_epochs = sum(p.epochs for p in phases)
    progress = Progress.resume(model_dir / "last.pt", cfg, model)
    if rank == 0 and 0 < progress.start_epoch < total_epochs and not progress.stopped_early:
        print(f"[train] resuming {tag} at epoch {progress.start_epoch + 1}/{total_epochs} from {model_dir / 'last.pt'}")
    finished = progress.state is not None and (progress.start_epoch >= total_epochs or progress.stopped_early)

    train_epochs(model, train_ds, valid_ds, cfg, rt, phases, progress, model_dir, out_dir, tag)

    emb_splits = ("test", "valid")[: 1 + has_valid] + (("train",) if cfg.predict_train else ())
    if finished and predictions.predictions_complete(out_dir, tag, has_valid, emb_splits):
        if rank == 0:
            print(f"[train] {tag} is complete: {out_dir}/{tag}_* (delete {model_dir} to train it again)")
        return out_dir
    results = predict_outputs(model, cfg, rt, data_dir, model_dir, tag, train_meta, images, valid_ds)
    if rank == 0:
        predictions.write_predictions(out_dir, tag, fold, results, cfg)
        print(f"[train] wrote {out_dir}/{tag}_*")
    barrier(world)
    if world > 1:
        dist.destroy_process_group()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, required=True, help="held-out fold; -1 trains on every fold's images")
    parser.add_argument("--config", help="YAML file of config overrides (a path, or a name under configs/)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable; dotted keys for sections, e.g. aug.hflip=0)",
    )
    parser.add_argument("--data", help="data directory (Kaggle stage-2 layout); default: $ICH_DATA, input/")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    data_dir = resolve_data_dir(args.data or cfg.data_dir or None)
    if not data_dir.exists():
        raise InputError(f"{data_dir}: data directory not found (set --data or ICH_DATA)")
    cfg.data_dir = str(data_dir)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    run_fold(cfg, args.fold, data_dir)
    return 0


if __name__ == "__main__":
    run_cli(main)
