"""The pixel probability the reported blood volume counts as blood, and its calibration for the weak mode.

With painted masks (`masks: full`) the cutoff is model.MASK_CUTOFF (0.5): the masks fix the map's scale, and a
calibrated cutoff measured worse there (five folds of the embedded default: median volume error 37% against 31%).
Without masks (`masks: none`, the real RSNA data) nothing fixes it. The pooled map is trained to reach each
positive slice's label, and how far its halo spreads past the blood differs from run to run: at p ≥ 0.5 the five
fold models of the embedded default call 1.4 to 33 pixels blood on an average known-empty training slice. So after
training, the weak mode's cutoff is set where the training fold's known-empty slices (their labels say so, no mask
needed) show at most FALSE_BLOOD_SHARE of their pixels as blood, and never below 0.5.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from src.atomic import atomic_path
from src.cnn.checkpoints import VOLUME_CUTOFF_KEY, deploy, read_checkpoint
from src.cnn.model import MASK_CUTOFF
from src.cnn.predict import to_input
from src.data.dataset import SliceDataset

FALSE_BLOOD_SHARE = 1e-4  # of a known-empty slice's pixels called blood: ~1 pixel at 96 px, ~7 at 256 px
CALIBRATION_SLICES = 2000  # known-empty training slices drawn (seeded) to set it: a few seconds on a GPU
LOGIT_RANGE = 30.0  # the histogram spans logits ±30 (p from 1e-13 to 1 - 1e-13) ...
LOGIT_BINS = 6000  # ... in steps of 0.01


def calibration_rows(rows: np.ndarray, n: int = CALIBRATION_SLICES, seed: int = 0) -> np.ndarray:
    """Up to n of `rows`, drawn without replacement, in their order."""
    return np.sort(np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False))


def known_empty_sample(train_meta: pd.DataFrame, n: int = CALIBRATION_SLICES, seed: int = 0) -> pd.DataFrame:
    """Up to n training slices whose labels say they hold no blood (any = 0); none when the labels name no empty
    slice."""
    rows = calibration_rows(np.flatnonzero(train_meta["any"].to_numpy() == 0), n, seed)
    return train_meta.iloc[rows].reset_index(drop=True)


def cutoff_from_histogram(counts: torch.Tensor, share: float = FALSE_BLOOD_SHARE, floor: float = MASK_CUTOFF) -> float:
    """The lowest probability whose tail holds at most `share` of the histogram's pixels (LOGIT_BINS bins over
    ±LOGIT_RANGE logits), never below `floor`. A pixel at the cutoff counts as blood, as in the model's volume."""
    counts = counts.double()
    tail = counts.flip(0).cumsum(0).flip(0) / counts.sum()  # tail[k]: share of pixels in bins k and above
    edges = torch.linspace(-LOGIT_RANGE, LOGIT_RANGE, LOGIT_BINS + 1, dtype=torch.float64)[:-1]
    allowed = torch.nonzero(tail <= share)
    logit = float(edges[int(allowed[0])]) if len(allowed) else LOGIT_RANGE
    return max(floor, float(torch.sigmoid(torch.tensor(logit))))


@torch.inference_mode()
def calibrate(model: nn.Module, dataset: SliceDataset, device: torch.device, tta_flip: bool, batch_size: int = 64,
              amp_dtype: torch.dtype | None = None, channels_last: bool = False,
              share: float = FALSE_BLOOD_SHARE) -> float:
    """The weak mode's volume cutoff from the model's maps of known-empty slices; each flip view counts, as the
    reported volume is the mean of the views' counts."""
    counts = torch.zeros(LOGIT_BINS, dtype=torch.float64)
    for views in seg_logit_batches(model, dataset, device, batch_size, amp_dtype, channels_last, tta_flip,
                                   "volume cutoff"):
        for logits in views:
            clipped = logits.clamp(-LOGIT_RANGE, LOGIT_RANGE - 1e-6)
            counts += torch.histc(clipped, LOGIT_BINS, -LOGIT_RANGE, LOGIT_RANGE).double().cpu()
    return cutoff_from_histogram(counts, share)


def seg_logit_batches(model: nn.Module, dataset, device: torch.device, batch_size: int,
                      amp_dtype: torch.dtype | None, channels_last: bool, tta_flip: bool,
                      desc: str) -> Iterator[list[torch.Tensor]]:
    """The model's float seg logits [B, 1, S, S] of each batch of `dataset`, in order, one per view (the flipped
    view's as the model saw it: a histogram or a count does not care). Call under torch.inference_mode()."""
    model.eval()
    for batch in tqdm(torch.utils.data.DataLoader(dataset, batch_size=batch_size), desc=desc, leave=False):
        x = to_input(batch["image"], device, channels_last)
        views = []
        for view in ([x, torch.flip(x, dims=[-1])] if tta_flip else [x]):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                views.append(model(view, batch["voxel_mm3"].to(device))["seg_logits"].float())
        yield views


def calibrate_checkpoint(path: Path, model: nn.Module, dataset: SliceDataset, device: torch.device, tta_flip: bool,
                         **kwargs) -> float:
    """The checkpoint's calibrated cutoff; on first use computed with its deployed weights and written into the
    file (atomically), so triage, overlays and a re-prediction read the same number."""
    state = read_checkpoint(path)
    if VOLUME_CUTOFF_KEY in state:
        return float(state[VOLUME_CUTOFF_KEY])
    deploy(model, state)
    cutoff = calibrate(model, dataset, device, tta_flip, **kwargs)
    state[VOLUME_CUTOFF_KEY] = cutoff
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    print(f"[train] volume cutoff p >= {cutoff:.4f}: at most {FALSE_BLOOD_SHARE:.2%} of the pixels of {len(dataset)} "
          f"known-empty training slices called blood (written into {path})", flush=True)
    return cutoff
