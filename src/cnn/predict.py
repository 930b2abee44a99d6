"""Batched inference over a dataset: probabilities, pre-logit embeddings and blood volume, with optional flip TTA."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm


def to_input(batch_images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, C, S, S] from the loader → float in [0, 1] on the device (scaling there copies 4× less)."""
    x = batch_images.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def predict_loader(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    tta_flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "predict",
    embeddings: bool = True,
) -> dict[str, np.ndarray]:
    """Run the model over a loader of SliceDataset items; returns arrays in loader order plus `index`.

    `embeddings=False` keeps only probabilities (and volumes): what per-epoch validation needs, without copying
    and gathering a [N, features] array every epoch."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {"index": [], "probs": [], "embedding": [], "volume_mm3": []}
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = to_input(batch["image"], device, channels_last)
        voxel = batch["voxel_mm3"].to(device)
        views = [x, torch.flip(x, dims=[-1])] if tta_flip else [x]
        outs = []
        for view in views:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outs.append(model(view, voxel))
        parts["index"].append(batch["index"].numpy())
        parts["probs"].append(torch.stack([torch.sigmoid(o["logits"].float()) for o in outs]).mean(0).cpu().numpy())
        if embeddings:
            parts["embedding"].append(torch.stack([o["embedding"].float() for o in outs]).mean(0).cpu().numpy())
        if "mask_volume_mm3" in outs[0]:  # the reported volume: pixels at p >= 0.5 (see model.MASK_CUTOFF)
            parts["volume_mm3"].append(torch.stack([o["mask_volume_mm3"] for o in outs]).mean(0).cpu().numpy())
    kept = {"index", "probs", *(["embedding"] if embeddings else [])}
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items() if v or k in kept}
