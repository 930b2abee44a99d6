"""Train one fold (`python -m src.train --fold K`), resume after a kill, and write OOF/test predictions and embeddings.

Runs as is on CPU or one GPU, and under `torchrun --nproc_per_node N -m src.train ...` with DistributedDataParallel
(NCCL on GPUs, gloo on CPU); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

from src import outputs
from src.cache import load_cache
from src.config import Config, load_config
from src.data import SliceDataset, build_augment
from src.errors import InputError, run_cli
from src.folds import load_folds
from src.losses import masked_seg_loss, weighted_bce
from src.metrics import per_class_auc, weighted_log_loss
from src.model import build_model
from src.paths import WORK, resolve_data_dir
from src.predict import predict_loader, to_input


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed() -> tuple[int, int, torch.device]:
    """rank, world size and device; a process group only when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def make_optimizer(cfg: Config, model: nn.Module, head_only: bool) -> torch.optim.Optimizer:
    core = unwrap(model)
    head = core.head_parameters()
    head_ids = {id(p) for p in head}
    for p in core.parameters():
        p.requires_grad_(not head_only or id(p) in head_ids)
    params = [p for p in core.parameters() if p.requires_grad]
    # No weight decay on norms and biases (1-D tensors), as timm's param groups do.
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    raise InputError(f"config key optimizer: {cfg.optimizer!r} is not adamw or adam")


def split_fold(
    cfg: Config, data_dir: Path, fold: int
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray | None]:
    meta, images, masks = load_cache(data_dir, cfg.image_size, "train")
    folds = load_folds(data_dir, cfg.n_folds, cfg.fold_seed)
    meta = meta.merge(folds[["ID", "fold"]], on="ID", how="left", validate="one_to_one")
    if meta["fold"].isna().any():
        raise InputError(
            f"fold file for {data_dir} misses {int(meta['fold'].isna().sum())} images; delete it to rebuild"
        )
    meta["fold"] = meta["fold"].astype(int)
    if fold >= cfg.n_folds or fold < -1:
        raise InputError(f"--fold {fold}: expected -1 (all folds) or 0..{cfg.n_folds - 1}")
    valid = meta[meta["fold"] == fold].reset_index(drop=True)
    train = meta[meta["fold"] != fold].reset_index(drop=True)
    return train, valid, images, masks


def loader_for(ds, cfg: Config, batch_size: int, sampler=None, workers: int | None = None) -> DataLoader:
    workers = cfg.num_workers if workers is None else workers
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        persistent_workers=False,
    )


def predict_sharded(model, ds, cfg, device, world, rank, amp_dtype, channels_last, tta, desc) -> dict[str, np.ndarray]:
    """Each rank predicts every world-th item; rank 0 gathers and restores dataset order."""
    shard = Subset(ds, list(range(rank, len(ds), world)))
    out = predict_loader(
        unwrap(model),
        loader_for(shard, cfg, cfg.batch_size * 2),
        device,
        tta_flip=tta,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        progress=rank == 0,
        desc=desc,
    )
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        out = {k: np.concatenate([g[k] for g in gathered]) for k in out}
    order = np.argsort(out["index"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def run_fold(cfg: Config, fold: int, data_dir: Path) -> Path:
    rank, world, device = setup_distributed()
    seed_everything(cfg.seed + rank)
    exp = cfg.exp_name
    tag = f"fold{fold}" if fold >= 0 else "full"
    model_dir = WORK / "models" / exp / tag
    out_dir = outputs.exp_dir(exp)
    is_cuda = device.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if (is_cuda and cfg.amp) else None
    channels_last = is_cuda

    if rank == 0:
        print(f"[train] exp={exp} {tag} data={data_dir} device={device} world={world}")
    if rank == 0:  # build caches and folds once, before the other ranks read them
        load_cache(data_dir, cfg.image_size, "test")
        split_fold(cfg, data_dir, fold)
    barrier(world)
    train_meta, valid_meta, images, masks = split_fold(cfg, data_dir, fold)
    has_valid = len(valid_meta) > 0
    if rank == 0 and cfg.arch != "classifier" and (masks is None or (train_meta["mask_row"] < 0).all()):
        print(f"[train] warning: {data_dir} has no masks/: the segmentation branch only learns from known-empty "
              "slices (any = 0), so its volume feature carries little; consider arch=classifier")
    train_ds = SliceDataset(train_meta, images, cfg.context, masks, augment=build_augment(cfg.aug))
    valid_ds = SliceDataset(valid_meta, images, cfg.context, masks) if has_valid else None

    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        # find_unused_parameters: BloodNet's phases leave the decoder or the head out of the loss.
        model = DistributedDataParallel(
            model, device_ids=[device.index] if is_cuda else None, find_unused_parameters=cfg.arch != "classifier"
        )
    weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device)
    phases = phases_for(cfg)
    total_epochs = sum(p.epochs for p in phases)

    state = outputs.load_checkpoint(model_dir / "last.pt", cfg)
    start_epoch, best, stale, history = 0, math.inf, 0, []
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        start_epoch, best, stale, history = state["epoch"], state["best"], state["stale"], state["history"]
        if rank == 0 and start_epoch < total_epochs and not state.get("stopped_early"):
            print(f"[train] resuming {tag} at epoch {start_epoch + 1}/{total_epochs} from {model_dir / 'last.pt'}")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    optimizer, current_phase = None, None
    stopped_early = state is not None and state.get("stopped_early", False)

    for epoch in range(start_epoch, total_epochs):
        if stopped_early:
            break
        phase, epoch_in_phase = phase_at(phases, epoch)
        if phase is not current_phase:
            optimizer = make_optimizer(cfg, model, phase.head_only)
            if state is not None and state.get("phase") == phase.name and state.get("optimizer"):
                optimizer.load_state_dict(state["optimizer"])
            if phase.name != (state or {}).get("phase"):
                stale = 0  # early stopping counts within a phase
            current_phase = phase
        if world > 1:
            sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        else:
            # Seeded by epoch, so an epoch re-run after a kill sees the same order.
            sampler = RandomSampler(train_ds, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        loader = loader_for(train_ds, cfg, cfg.batch_size, sampler)
        steps_per_epoch = len(loader) if not cfg.limit_train_batches else min(len(loader), cfg.limit_train_batches)
        total_steps = steps_per_epoch * phase.epochs
        warmup = int(cfg.warmup_epochs * steps_per_epoch) if not phase.head_only else 0

        model.train()
        if phase.head_only:
            model.eval()  # frozen encoder: keep BatchNorm statistics fixed too
        t0, seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"{tag} epoch {epoch + 1}/{total_epochs} [{phase.name}]",
            disable=rank != 0,
            leave=False,
        )
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            lr = lr_at(epoch_in_phase * steps_per_epoch + step, total_steps, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = to_input(batch["image"], device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(x, batch["voxel_mm3"].to(device))
            loss = (1.0 - phase.seg_lambda) * weighted_bce(out["logits"], batch["labels"].to(device), weights)
            if phase.seg_lambda > 0:
                seg = masked_seg_loss(
                    out["seg_logits"], batch["mask"].to(device), batch["mask_state"].to(device), cfg.seg_dice
                )
                loss = loss + phase.seg_lambda * seg
            elif "seg_logits" in out:
                loss = loss + 0.0 * out["seg_logits"].sum()  # keeps DDP's gradient buckets complete
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            seen += len(x)
            loss_sum += loss.detach().item() * len(x)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{lr:.2e}")
        bar.close()
        row = {
            "epoch": epoch + 1,
            "phase": phase.name,
            "train_loss": loss_sum / max(seen, 1),
            "train_images_per_s": seen * world / max(time.time() - t0, 1e-9),
        }

        improved = False
        if has_valid:
            pred = predict_sharded(
                model, valid_ds, cfg, device, world, rank, amp_dtype, channels_last, False, f"{tag} valid"
            )
            y = valid_ds.labels
            row["valid_wll"] = weighted_log_loss(y, pred["probs"])
            row["valid_auc_any"] = per_class_auc(y, pred["probs"])["any"]
            # Segmentation-only epochs leave the head untrained: they never become "best".
            if phase.seg_lambda < 1.0 and row["valid_wll"] < best:
                best, stale, improved = row["valid_wll"], 0, True
            elif phase.seg_lambda < 1.0:
                stale += 1
        else:
            improved = True  # training on all folds: the last epoch is the model
        history.append(row)
        stopped_early = bool(has_valid and cfg.early_stopping and stale >= cfg.early_stopping and phase is phases[-1])
        if rank == 0:
            if improved:
                outputs.save_checkpoint(model_dir / "best.pt", unwrap(model), cfg, epoch=epoch + 1)
            outputs.save_checkpoint(
                model_dir / "last.pt",
                unwrap(model),
                cfg,
                epoch=epoch + 1,
                optimizer=optimizer,
                phase=phase.name,
                best=best,
                stale=stale,
                history=history,
                stopped_early=stopped_early,
            )
            outputs.write_epochs(history, out_dir, tag)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            print(f"[train] {shown}{'  *best*' if improved and has_valid else ''}", flush=True)
        barrier(world)
        if stopped_early and rank == 0:
            print(f"[train] early stop: no improvement for {cfg.early_stopping} epochs")

    finished = state is not None and (start_epoch >= total_epochs or state.get("stopped_early", False))
    if finished and outputs.predictions_complete(out_dir, tag, has_valid):
        if rank == 0:
            print(f"[train] {tag} is complete: {out_dir}/{tag}_* (delete {model_dir} to train it again)")
        return out_dir
    # Predict with the best checkpoint: OOF for the held-out fold, test, and embeddings for the stacker.
    chosen = model_dir / "best.pt" if (model_dir / "best.pt").exists() else model_dir / "last.pt"
    best_state = torch.load(chosen, map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(best_state["model"])
    results = {}
    if has_valid:
        results["valid"] = (
            valid_meta,
            predict_sharded(
                model, valid_ds, cfg, device, world, rank, amp_dtype, channels_last, cfg.tta_flip, f"{tag} valid"
            ),
        )
    test_meta, test_images, _ = load_cache(data_dir, cfg.image_size, "test")
    test_ds = SliceDataset(test_meta, test_images, cfg.context, with_labels=False)
    results["test"] = (
        test_meta,
        predict_sharded(
            model, test_ds, cfg, device, world, rank, amp_dtype, channels_last, cfg.tta_flip, f"{tag} test"
        ),
    )
    plain_train = SliceDataset(train_meta, images, cfg.context)
    results["train"] = (
        train_meta,
        predict_sharded(model, plain_train, cfg, device, world, rank, amp_dtype, channels_last, False, f"{tag} train"),
    )
    if rank == 0:
        outputs.write_predictions(out_dir, tag, fold, results, cfg)
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
