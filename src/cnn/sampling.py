"""Seeded epochs: the order, the augmentation of every item and the torch RNG are functions of (seed, epoch).

A DataLoader with persistent workers keeps one copy of the dataset per worker for the whole run, so an epoch
number set on the dataset in the main process never reaches them. The sampler therefore hands each worker
`(index, epoch)` pairs, and the worker seeds the augmentation from (seed, epoch, index) before building the
item. The result does not depend on the number of workers, and an epoch re-run after a kill sees exactly the
images, crops and flips the uninterrupted run saw.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def mixed_seed(*parts: int) -> int:
    """One 32-bit seed from several integers; SeedSequence keeps nearby tuples (epoch 1 vs 2) far apart."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_all(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """The process RNGs at the start of an epoch (dropout, stochastic depth): the same after a resume."""
    seed_all(mixed_seed(seed, epoch, rank))


class EpochSampler(Sampler):
    """A shuffle of range(n) drawn from (seed, epoch), sharded over ranks like DistributedSampler, each index
    tagged with its epoch. `limit` keeps only the first items of the epoch (smoke runs)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, limit: int = 0):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        per_rank = -(-n // world)  # ranks get equal shares (a few items repeat) so they step in lockstep
        self.length = min(per_rank, limit) if limit else per_rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=generator).tolist()
        order += order[: self.world * -(-self.n // self.world) - self.n]
        mine = order[self.rank :: self.world][: self.length]
        return iter([(i, self.epoch) for i in mine])


class SeededItems(Dataset):
    """A dataset whose `augment` (an albumentations Compose) is seeded per item from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        augment = getattr(self.dataset, "augment", None)
        if augment is not None:
            augment.set_random_seed(mixed_seed(self.seed, epoch, index))
        return self.dataset[index]
