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
    """The plain network under torch.compile and DDP wrappers (its state_dict keys carry no prefixes)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


# Batches each worker keeps ready: enough to cover a slow augmentation draw without holding many in memory.
PREFETCH_BATCHES = 4
MAX_AUTO_WORKERS = 12


def auto_workers(cfg: Config) -> int:
    """cfg.num_workers, or for -1 the cores each process may use minus its own main thread (at least 1)."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, min(MAX_AUTO_WORKERS, per_process - 1))


def loader_for(ds, cfg: Config, batch_size: int, sampler=None, workers: int | None = None,
               persistent: bool = False) -> DataLoader:
    """Pinned memory on CUDA; `persistent` keeps the workers across epochs (the loader must then be reused)."""
    workers = auto_workers(cfg) if workers is None else workers
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
    )


def shard_loader(ds, cfg: Config, rank: int, world: int, persistent: bool = False) -> DataLoader:
    """A prediction loader over every world-th item, starting at `rank`."""
    return loader_for(Subset(ds, list(range(rank, len(ds), world))), cfg, cfg.batch_size * 2, persistent=persistent)


def predict_sharded(model, loader: DataLoader, rt, tta: bool, desc: str, embeddings: bool = True
                    ) -> dict[str, np.ndarray]:
    """Each rank predicts its shard_loader; rank 0 gathers and restores dataset order. `rt` is a loop.Runtime."""
    out = predict_loader(
        unwrap(model),
        loader,
        rt.device,
        tta_flip=tta,
        amp_dtype=rt.amp_dtype,
        channels_last=rt.channels_last,
        progress=rt.rank == 0,
        desc=desc,
        embeddings=embeddings,
    )
    if rt.world > 1:
        gathered = [None] * rt.world
        dist.all_gather_object(gathered, out)
        out = {k: np.concatenate([g[k] for g in gathered]) for k in out}
    order = np.argsort(out["index"], kind="stable")
    return {k: v[order] for k, v in out.items()}
