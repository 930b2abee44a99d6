"""Training data: cached slices with same-series neighbours (2.5D), masks, augmentation."""

from __future__ import annotations

import os

# albumentations asks the internet for a newer version on import: a warning (and a DNS wait) on every offline
# machine, GPU boxes included. A value the user set wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from src.config import AugConfig
from src.constants import LABELS, SERIES_KEYS
from src.errors import InputError

MASK_MODES = ("auto", "full", "none")


def neighbour_rows(meta: pd.DataFrame, context: int) -> np.ndarray:
    """[N, 2c+1] cache rows of each slice's neighbours in slice order; edge slices repeat.

    `meta` must hold `cache_row`, the series keys and `slice_index`; neighbours are looked up among the
    rows present (a slice dropped as unreadable is skipped over, so its neighbours close ranks).
    """
    ordered = meta.reset_index(drop=True).sort_values([*SERIES_KEYS, "slice_index"], kind="stable")
    positions = np.empty(len(ordered), dtype=np.int64)
    table = np.empty((len(ordered), 2 * context + 1), dtype=np.int64)
    start = 0
    for _, group in ordered.groupby(list(SERIES_KEYS), sort=False):
        rows = group["cache_row"].to_numpy()
        n = len(rows)
        offsets = np.clip(np.arange(n)[:, None] + np.arange(-context, context + 1)[None, :], 0, n - 1)
        table[start : start + n] = rows[offsets]
        positions[start : start + n] = group.index.to_numpy()
        start += n
    out = np.empty_like(table)
    out[positions] = table
    return out


def resolve_mask_mode(setting: str, masks: np.ndarray | None, mask_rows: np.ndarray, source: str = "data") -> str:
    """Config `masks` to the mode training uses: `full` (painted masks) or `none` (weak, slice labels only).

    `auto` is `full` when any training slice has a painted mask, else `none`: on data like the real RSNA set (no
    masks at all) the decoder would otherwise learn from known-empty slices alone, i.e. learn "never blood".
    """
    if setting not in MASK_MODES:
        raise InputError(f"config key masks: {setting!r} is not one of {', '.join(MASK_MODES)}")
    has_masks = masks is not None and bool((np.asarray(mask_rows) >= 0).any())
    if setting == "full" and not has_masks:
        raise InputError(f"{source}: masks=full but no training slice has a mask (masks/ID_*.png); use masks=auto")
    if setting == "auto":
        return "full" if has_masks else "none"
    return setting


def voxel_volume_mm3(meta: pd.DataFrame, image_size: int) -> np.ndarray:
    """mm³ of one cached pixel × the slice spacing: the image was padded to a square of max(rows, cols)
    native pixels and resized to image_size, so each cached pixel spans that ratio of native pixels."""
    scale = np.maximum(meta["rows"], meta["cols"]).to_numpy(dtype=np.float64) / image_size
    area = meta["pixel_spacing_row"].to_numpy(np.float64) * meta["pixel_spacing_col"].to_numpy(np.float64)
    return (area * scale**2 * meta["slice_spacing"].to_numpy(np.float64)).astype(np.float32)


def build_augment(aug: AugConfig) -> A.Compose:
    """Geometric transforms move image and mask together; intensity ones touch the image only.

    The applied parameters are kept (save_applied_params) so that the dataset can rescale the voxel volume by the
    area the affine magnified: a bleed zoomed by 1.1 covers 1.21x the pixels but holds the same millilitres.
    """
    return A.Compose(
        [
            A.HorizontalFlip(p=aug.hflip),
            A.Affine(
                translate_percent=(-0.06, 0.06),
                scale=(0.9, 1.1),
                rotate=(-15, 15),
                border_mode=0,  # cv2.BORDER_CONSTANT: 0 is air in every window
                p=aug.shift_scale_rotate,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=aug.brightness_contrast),
            A.CoarseDropout(
                num_holes_range=(1, 4),
                hole_height_range=(0.05, 0.12),
                hole_width_range=(0.05, 0.12),
                fill=0,
                fill_mask=None,
                p=aug.coarse_dropout,
            ),
        ],
        save_applied_params=True,
    )


def area_scale(applied: list) -> float:
    """Area magnification of the applied geometric transforms: |det| of each affine's linear part, multiplied."""
    scale = 1.0
    for _, params in applied:
        matrix = params.get("matrix") if isinstance(params, dict) else None
        if matrix is not None:
            scale *= abs(float(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:2, :2])))
    return scale


class SliceDataset(Dataset):
    """One item per metadata row: image [C, S, S] float in [0, 1], labels, mask state, voxel volume."""

    def __init__(
        self,
        meta: pd.DataFrame,
        images: np.ndarray,
        context: int = 0,
        masks: np.ndarray | None = None,
        augment: A.Compose | None = None,
        with_labels: bool = True,
    ):
        self.meta = meta.reset_index(drop=True)
        self.images = images
        self.masks = masks
        self.augment = augment
        self.neighbours = neighbour_rows(self.meta, context)
        self.labels = self.meta[list(LABELS)].to_numpy(np.float32) if with_labels else None
        size = images.shape[-1]
        self.voxel_mm3 = voxel_volume_mm3(self.meta, size)
        # Mask state: 1 = a painted mask, 0 = known empty (any == 0), -1 = unknown (a positive without a mask,
        # which is every positive of the real RSNA data): left out of the segmentation loss, never called empty.
        mask_row = self.meta["mask_row"].to_numpy() if "mask_row" in self.meta else np.full(len(self.meta), -1)
        self.mask_row = mask_row if masks is not None else np.full(len(self.meta), -1)
        if self.labels is not None:
            empty = self.labels[:, LABELS.index("any")] == 0
            self.mask_state = np.where(self.mask_row >= 0, 1, np.where(empty, 0, -1))
        else:
            self.mask_state = np.full(len(self.meta), -1)

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rows = self.neighbours[i]
        image = self.images[rows].reshape(-1, *self.images.shape[-2:])  # [3*(2c+1), S, S], uint8
        # np.array copies: a memmap row is read-only and torch.from_numpy warns on it.
        mask = np.array(self.masks[self.mask_row[i]]) if self.mask_row[i] >= 0 else np.zeros(image.shape[1:], np.uint8)
        voxel = float(self.voxel_mm3[i])
        if self.augment is not None:
            out = self.augment(image=np.ascontiguousarray(image.transpose(1, 2, 0)), mask=mask)
            image, mask = out["image"].transpose(2, 0, 1), out["mask"]
            voxel /= area_scale(out.get("applied_transforms", []))
        item = {
            "index": torch.tensor(i),
            "image": torch.from_numpy(np.ascontiguousarray(image)),  # uint8: scaled on the device, 4x less to copy
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0),
            "mask_state": torch.tensor(self.mask_state[i], dtype=torch.int8),
            "voxel_mm3": torch.tensor(voxel, dtype=torch.float32),
        }
        if self.labels is not None:
            item["labels"] = torch.tensor(self.labels[i])  # a copy: pandas may hand out a read-only array
        return item
