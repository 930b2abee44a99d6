"""Where and how a process trains: device, precision, memory format, and the wrappers around the network
(DistributedDataParallel, torch.compile, the EMA copy of the weights)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from src.config import Config


@dataclass
class Runtime:
    """rank/world for DDP, device, AMP dtype, memory format (channels_last on every device)."""

    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def create(cls, cfg: Config, rank: int, world: int, device: torch.device) -> Runtime:
        is_cuda = device.type == "cuda"
        amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if (is_cuda and cfg.amp) else None
        if is_cuda:
            # Input shapes are fixed for a run: let cuDNN pick the fastest kernels once. The price is bitwise
            # reproducibility on GPU (a resumed epoch matches an uninterrupted one up to kernel choice).
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # channels_last on CPU as well: oneDNN's NHWC convolutions train the default faster there too
        # (`python bench/train_throughput.py` times both formats; the README has its figures).
        return cls(rank, world, device, amp, channels_last=True)


def wrap_model(core: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    """DDP and torch.compile around the plain network, built after the phase chose its trainable parameters.

    DDP registers only the parameters that require grad when it is built, so re-wrapping at each phase (BloodNet
    freezes the encoder in step 2) lets it run without find_unused_parameters: every registered parameter is in
    every step's graph (step 1, segmentation only, keeps the head in the loss with weight 0).
    """
    model = core
    if rt.world > 1:
        model = DistributedDataParallel(core, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync (no gradient all-reduce) for the micro-batches before the last of an accumulation group."""
    ddp = getattr(model, "_orig_mod", model)
    return ddp.no_sync() if skip and isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext()


def make_ema(core: nn.Module, cfg: Config) -> ModelEmaV3 | None:
    """timm's EMA of the weights (and BatchNorm statistics); its decay warms up from 0 with the optimizer step, so a
    short run is not dominated by the random initial weights."""
    return ModelEmaV3(core, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
