"""Seeded epochs: the order, the augmentation of every item and the torch RNG are functions of (seed, epoch).

A DataLoader with persistent workers keeps one copy of the dataset per worker for the whole run, so an epoch
number set on the dataset in the main process never reaches them. The sampler therefore hands each worker
`(index, epoch)` pairs, and the worker seeds the augmentation from (seed, epoch, index) before building the
item. The result does not depend on the number of workers, and an epoch re-run after a kill sees exactly the
images, crops and flips the uninterrupted run saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

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
    """A shuffle drawn from (seed, epoch), sharded over ranks like DistributedSampler, each index tagged with its
    epoch. `subset(epoch)` may narrow an epoch to some indices (None: all n); `limit` keeps only the first items
    of the epoch (smoke runs). The length follows the epoch, so call set_epoch before asking for it."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, limit: int = 0,
                 subset: Callable[[int], np.ndarray | None] | None = None):
        self.n, self.seed, self.rank, self.world, self.limit, self.subset = n, seed, rank, world, limit, subset
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.pool = self.subset(epoch) if self.subset is not None else None
        size = self.n if self.pool is None else len(self.pool)
        per_rank = -(-size // self.world)  # ranks get equal shares (a few items repeat) so they step in lockstep
        self.length = min(per_rank, self.limit) if self.limit else per_rank

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        size = self.n if self.pool is None else len(self.pool)
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
        order = torch.randperm(size, generator=generator).tolist()
        order += order[: self.world * -(-size // self.world) - size]
        if self.pool is not None:
            order = [int(self.pool[i]) for i in order]
        mine = order[self.rank :: self.world][: self.length]
        return iter([(i, self.epoch) for i in mine])


def balanced_subset(positive: np.ndarray, negative: np.ndarray, seed: int, epoch: int,
                    negative_weight: np.ndarray | None = None, positive_weight: np.ndarray | None = None) -> np.ndarray:
    """Every positive index and as many negatives, the negatives drawn afresh from (seed, epoch); sorted.

    Blood is on ~1 slice in 5 of the embedded set and ~1 in 7 of RSNA's, and on well under 1% of a positive
    slice's pixels: a segmentation epoch over all slices spends most of its steps on empty ones. Half-positive
    epochs give the decoder the same number of bleeds at about 2/5 of the cost (a seed-fixed draw, so resumable).
    `negative_weight` (one per negative, summing to 1) skews the draw towards hard negatives. `positive_weight`
    replaces "every positive once" by as many positives drawn with replacement by those weights (a slice drawn twice
    sees the same augmentation twice: its loss counts double). The negatives are drawn first, so they do not change."""
    rng = np.random.default_rng(mixed_seed(seed, epoch, 0x5E6))
    take = min(len(negative), len(positive))
    negatives = rng.choice(negative, size=take, replace=False, p=negative_weight)
    if positive_weight is not None:
        positive = rng.choice(positive, size=len(positive), replace=True, p=positive_weight)
    return np.sort(np.concatenate([positive, negatives]))


def hard_negative_weights(hyperdense: np.ndarray, hardness: float) -> np.ndarray:
    """Draw weights (1 - h)/n + h x share of the hyperdense pixels: h = 0 is uniform, h = 1 follows the pixels alone.

    A floor of 1e-9 keeps every negative drawable, so a draw without replacement never runs out of candidates."""
    share = hyperdense / hyperdense.sum() if hyperdense.sum() > 0 else np.full(len(hyperdense), 1.0 / len(hyperdense))
    weight = (1.0 - hardness) / len(hyperdense) + hardness * share + 1e-9
    return weight / weight.sum()


def study_balanced_weights(study: np.ndarray, balance: float) -> np.ndarray:
    """Draw weights (1 - b)/n + b / (studies x the slice's study's positives): b = 0 is uniform over slices, b = 1
    gives every study the same share of the draws however many slices its blood spans.

    The volume error is scored per study, each study once, but a uniform draw trains each study in proportion to its
    positive slices: a 60 mL bleed over 15 slices is seen ~5x as often as a 5 mL one over 3, and the small bleeds are
    the ones the map misses (README, BloodNet section)."""
    _, inverse, counts = np.unique(np.asarray(study), return_inverse=True, return_counts=True)
    per_study = 1.0 / (len(counts) * counts[inverse])
    weight = (1.0 - balance) / len(inverse) + balance * per_study
    return weight / weight.sum()


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
