"""One training epoch and one validation pass: the loop a reader follows top to bottom."""

from __future__ import annotations

import math
import time

import timm.optim
import torch
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from src.cnn.distributed import predict_sharded, unwrap
from src.cnn.losses import training_loss
from src.cnn.predict import to_input
from src.cnn.runtime import Runtime, no_sync
from src.cnn.schedule import Phase, lr_at
from src.config import Config
from src.errors import InputError
from src.metric import per_class_auc, weighted_log_loss

OPTIMIZERS = ("adamw", "adam")


def make_optimizer(cfg: Config, model: nn.Module, head_only: bool) -> torch.optim.Optimizer:
    """timm's optimizer factory over timm's parameter groups (no weight decay on norms and biases); the frozen
    parameters of a head-only phase are left out. Fused AdamW/Adam kernels on CUDA."""
    core = unwrap(model)
    head_ids = {id(p) for p in core.head_parameters()}
    for p in core.parameters():
        p.requires_grad_(not head_only or id(p) in head_ids)
    if cfg.optimizer not in OPTIMIZERS:
        raise InputError(f"config key optimizer: {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    fused = next(core.parameters()).is_cuda
    extra = {"fused": True, "foreach": False} if fused else {}
    params = core if cfg.head_lr_scale == 1.0 else head_scaled_groups(core, head_ids, cfg)
    return timm.optim.create_optimizer_v2(params, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def head_scaled_groups(core: nn.Module, head_ids: set[int], cfg: Config) -> list[dict]:
    """timm's weight-decay groups, each split into the head's parameters, whose `lr_scale` is cfg.head_lr_scale,
    and the rest. Adam moves a weight by about lr per step whatever its gradient, so at lr 1e-3 the ~90 steps of
    the head step here cannot take a weight past ~0.1: a linear head on frozen features is not fit, only started."""
    groups = []
    for group in timm.optim.param_groups_weight_decay(core, cfg.weight_decay):
        for in_head in (False, True):
            params = [p for p in group["params"] if (id(p) in head_ids) == in_head]
            if params:
                groups.append({**group, "params": params, "lr_scale": cfg.head_lr_scale if in_head else 1.0})
    return groups


def train_one_epoch(model: nn.Module, loader, optimizer, scaler, phase: Phase, epoch_in_phase: int, cfg: Config,
                    rt: Runtime, class_weights: torch.Tensor, desc: str, ema: ModelEmaV3 | None = None,
                    ema_step: int = 0) -> dict:
    """Run one epoch of `phase`; returns the epoch's mean loss and images/s.

    `cfg.accumulate` batches make one optimizer step (each scaled by 1/its group's size, so k batches of b match
    one batch of k·b). The loss is summed on the device and read back every `cfg.log_every` steps only: each
    read is a sync that stalls a GPU. `ema_step` is the number of optimizer steps before this epoch.
    """
    batches = len(loader)
    k = max(1, cfg.accumulate)
    steps_per_epoch = math.ceil(batches / k)
    total_steps = steps_per_epoch * phase.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch) if not phase.head_only else 0
    base_lr = cfg.head_step_lr if phase.head_only and cfg.head_step_lr > 0 else cfg.lr
    lr = base_lr
    model.train()
    if phase.head_only:
        model.eval()  # frozen encoder: keep BatchNorm statistics fixed too
    t0, seen = time.time(), 0
    loss_sum = torch.zeros((), device=rt.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, total=batches, desc=desc, disable=rt.rank != 0, leave=False)
    for i, batch in enumerate(bar):
        step, position = divmod(i, k)
        group = min(k, batches - step * k)  # the epoch's last group may be short
        last_in_group = position == group - 1
        lr = lr_at(epoch_in_phase * steps_per_epoch + step, total_steps, warmup, base_lr)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr * param_group.get("lr_scale", 1.0)
        sync = no_sync(model, skip=not last_in_group)
        sync.__enter__()
        x = to_input(batch["image"], rt.device, rt.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            out = model(x, batch["voxel_mm3"].to(rt.device))
        loss = training_loss(out, batch, phase, cfg, class_weights)
        scaler.scale(loss / group).backward()
        sync.__exit__(None, None, None)
        if last_in_group:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(unwrap(model), step=ema_step + step + 1)
            if rt.rank == 0 and (step + 1) % max(1, cfg.log_every) == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.4f}", lr=f"{lr:.2e}")
        seen += len(x)
        loss_sum += loss.detach().float() * len(x)
    bar.close()
    mean_loss = loss_sum.item() / max(seen, 1)  # the one sync of the epoch that is not a log line
    # lr: the last step's, the schedule's value at the epoch's end (a head's group may run at a multiple of it)
    return {"train_loss": mean_loss, "train_images_per_s": seen * rt.world / max(time.time() - t0, 1e-9), "lr": lr}


def validate(model: nn.Module, loader, valid_ds, rt: Runtime, desc: str) -> dict:
    """The competition metric and AUC(any) of the given weights (the EMA copy when on) on the held-out fold, from
    probabilities only (no TTA, no embeddings: those are predicted once, from the deployed checkpoint)."""
    pred = predict_sharded(model, loader, rt, False, desc, embeddings=False)
    y = valid_ds.labels
    return {"valid_wll": weighted_log_loss(y, pred["probs"]), "valid_auc_any": per_class_auc(y, pred["probs"])["any"]}
