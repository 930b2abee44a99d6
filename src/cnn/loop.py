"""One training epoch and one validation pass: the loop a reader follows top to bottom."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from src.cnn.distributed import predict_sharded, unwrap
from src.cnn.losses import training_loss
from src.cnn.predict import to_input
from src.cnn.schedule import Phase, lr_at
from src.config import Config
from src.errors import InputError
from src.metric import per_class_auc, weighted_log_loss


@dataclass
class Runtime:
    """Where and how this process trains: rank/world for DDP, device, AMP dtype, memory format."""

    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def create(cls, cfg: Config, rank: int, world: int, device: torch.device) -> Runtime:
        is_cuda = device.type == "cuda"
        amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if (is_cuda and cfg.amp) else None
        return cls(rank, world, device, amp, channels_last=is_cuda)


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


def train_one_epoch(model: nn.Module, loader, optimizer, scaler, phase: Phase, epoch_in_phase: int, cfg: Config,
                    rt: Runtime, class_weights: torch.Tensor, desc: str) -> dict:
    """Run one epoch of `phase`; returns the epoch's mean loss and images/s."""
    steps_per_epoch = len(loader) if not cfg.limit_train_batches else min(len(loader), cfg.limit_train_batches)
    total_steps = steps_per_epoch * phase.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch) if not phase.head_only else 0
    model.train()
    if phase.head_only:
        model.eval()  # frozen encoder: keep BatchNorm statistics fixed too
    t0, seen, loss_sum = time.time(), 0, 0.0
    bar = tqdm(loader, total=steps_per_epoch, desc=desc, disable=rt.rank != 0, leave=False)
    for step, batch in enumerate(bar):
        if step >= steps_per_epoch:
            break
        lr = lr_at(epoch_in_phase * steps_per_epoch + step, total_steps, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = to_input(batch["image"], rt.device, rt.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            out = model(x, batch["voxel_mm3"].to(rt.device))
        loss = training_loss(out, batch, phase, cfg, class_weights)
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
    return {"train_loss": loss_sum / max(seen, 1),
            "train_images_per_s": seen * rt.world / max(time.time() - t0, 1e-9)}


def validate(model: nn.Module, valid_ds, cfg: Config, rt: Runtime, desc: str) -> dict:
    """The competition metric and AUC(any) of the current weights on the held-out fold (no TTA)."""
    pred = predict_sharded(model, valid_ds, cfg, rt.device, rt.world, rt.rank, rt.amp_dtype, rt.channels_last,
                           False, desc)
    y = valid_ds.labels
    return {"valid_wll": weighted_log_loss(y, pred["probs"]), "valid_auc_any": per_class_auc(y, pred["probs"])["any"]}
