"""One process or many (torchrun): rank, device, barriers, and prediction sharded over ranks."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from src.cnn.predict import predict_loader
from src.config import Config


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
