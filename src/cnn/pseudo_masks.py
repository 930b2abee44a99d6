"""Pseudo-mask refinement for the weak mode (`masks: none`, `weak_refine: true`).

After the segment-only epochs the map has learnt from slice labels where blood is, with a halo of uncertain pixels
around it. From the next epoch on, each positive training slice gets a pseudo-mask: its own map at the volume cutoff
calibrated on known-empty training slices (src/cnn/volume_cutoff.py), i.e. only pixels the map calls blood more
surely than anything it sees on empty slices. Those slices then train the pixel loss (BCE + soft Dice) as painted
ones would, beside the pooled slice-label loss; a positive whose map has nothing above the cutoff stays unknown (never
taught "empty"). The masks are computed once, with the weights the run validates (the EMA copy when on), and kept
in the seed's model folder, so a resumed run trains on the same ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from src.atomic import atomic_path
from src.cnn.model import MASK_CUTOFF
from src.cnn.volume_cutoff import calibrate, calibration_rows, seg_logit_batches
from src.data.dataset import SliceDataset

PSEUDO_MASKS_FILE = "pseudo_masks.npy"  # uint8 [n positives, S, S] in the seed's model folder
UNKNOWN, EMPTY = -1, 0  # SliceDataset mask states


def unaugmented(train_ds: SliceDataset) -> SliceDataset:
    """The training slices as the model sees them at prediction time (no augmentation, same neighbours)."""
    context = (train_ds.neighbours.shape[1] - 1) // 2
    return SliceDataset(train_ds.meta, train_ds.images, context)


@torch.inference_mode()
def compute_pseudo_masks(model: nn.Module, train_ds: SliceDataset, device: torch.device, out_path: Path,
                         batch_size: int = 64, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                         seed: int = 0) -> float:
    """Write the pseudo-masks of train_ds's unknown (positive, unpainted) slices, in their order, to out_path
    (atomically; a memmap, so RSNA's ~100k positives at 256 px never sit in memory). Returns the cutoff used."""
    plain = unaugmented(train_ds)
    empty = calibration_rows(np.flatnonzero(train_ds.mask_state == EMPTY), seed=seed)
    cutoff = calibrate(model, Subset(plain, empty), device, tta_flip=False, batch_size=batch_size,
                       amp_dtype=amp_dtype, channels_last=channels_last) if len(empty) else MASK_CUTOFF
    positives = np.flatnonzero(train_ds.mask_state == UNKNOWN)
    size = train_ds.images.shape[-1]
    with atomic_path(out_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(positives), size, size))
        done = 0
        for (logits,) in seg_logit_batches(model, Subset(plain, positives), device, batch_size, amp_dtype,
                                           channels_last, False, "pseudo-masks"):
            prob = torch.sigmoid(logits)[:, 0]
            out[done : done + len(prob)] = (prob >= cutoff).to(torch.uint8).cpu().numpy()
            done += len(prob)
        out.flush()
        del out
    return cutoff


def apply_pseudo_masks(train_ds: SliceDataset, path: Path) -> int:
    """Give train_ds's unknown slices their pseudo-masks from `path` (as compute_pseudo_masks wrote them); those
    with an empty one stay unknown. Returns how many slices now carry a mask."""
    positives = np.flatnonzero(train_ds.mask_state == UNKNOWN)
    masks = np.load(path, mmap_mode="r")
    if len(masks) != len(positives):
        raise ValueError(f"{path}: {len(masks)} pseudo-masks for {len(positives)} positive slices; delete it")
    painted = np.array([bool(m.any()) for m in masks], dtype=bool)
    train_ds.masks = masks
    train_ds.mask_row = np.full(len(train_ds), -1)
    train_ds.mask_row[positives[painted]] = np.flatnonzero(painted)
    train_ds.mask_state[positives[painted]] = 1
    return int(painted.sum())
