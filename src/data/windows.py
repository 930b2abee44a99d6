"""HU image -> the cached uint8 channels: air padding to a square, resize, the three CT windows; masks to size."""

from __future__ import annotations

import cv2
import numpy as np

from src.constants import AIR_HU, BLOOD_WINDOW, HYPERDENSE_HU, WINDOWS


def pad_to_square(hu: np.ndarray, fill: float = AIR_HU) -> np.ndarray:
    """Centre a [H, W] image on a square canvas filled with `fill` (air by default; 0 HU would be water)."""
    h, w = hu.shape[:2]
    side = max(h, w)
    if h == w:
        return hu
    out = np.full((side, side, *hu.shape[2:]), fill, dtype=hu.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = hu
    return out


def resize(img: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Square image to [size, size]: area averaging when shrinking, bilinear when enlarging, or exact nearest."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    if nearest:
        interp = cv2.INTER_NEAREST_EXACT  # plain INTER_NEAREST samples half a pixel off the other modes' grid
    elif size < img.shape[0]:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear CT window: center - width/2 -> 0, center + width/2 -> 1, clipped; float32."""
    low = center - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width), 0.0, 1.0)


def to_channels(hu: np.ndarray, size: int) -> np.ndarray:
    """HU -> pad with air -> resize -> the constants.WINDOWS channels -> uint8 [3, size, size]."""
    img = resize(pad_to_square(hu.astype(np.float32, copy=False)), size)
    out = np.empty((len(WINDOWS), *img.shape), dtype=np.uint8)
    _windows_u8(img, out)
    return out


_LOW = np.array([c - w / 2.0 for _, c, w in WINDOWS], dtype=np.float32)
_WIDTH = np.array([w for _, _, w in WINDOWS], dtype=np.float32)


def _windows_u8(img: np.ndarray, out: np.ndarray) -> None:
    """out[i] = rint(window(img, WINDOWS[i]) * 255) as uint8: window()'s float32 steps, all channels at once."""
    shape = (len(WINDOWS),) + (1,) * img.ndim
    buf = np.subtract(img, _LOW.reshape(shape))
    np.divide(buf, _WIDTH.reshape(shape), out=buf)
    np.clip(buf, 0.0, 1.0, out=buf)
    np.multiply(buf, np.float32(255.0), out=buf)
    np.rint(buf, out=buf)
    out[...] = buf


def mask_to_size(mask: np.ndarray, size: int) -> np.ndarray:
    """Blood mask (nonzero = blood) through the image's geometry (centred pad, same resize grid) -> uint8 {0, 1}."""
    binary = (np.asarray(mask) > 0).astype(np.float32)
    # Area-average then threshold at half coverage: same pixel grid as the image resize, unlike INTER_NEAREST.
    scaled = resize(pad_to_square(binary, fill=0.0), size)
    return (scaled >= 0.5).astype(np.uint8)


def window_channel(name: str) -> tuple[int, float, float]:
    """A constants.WINDOWS entry by name: its channel in the cache, its lowest HU and its width in HU."""
    channel = [w[0] for w in WINDOWS].index(name)
    _, center, width = WINDOWS[channel]
    return channel, center - width / 2.0, width


def hyperdense_share(images, rows: np.ndarray, band: tuple[float, float] = HYPERDENSE_HU,
                     window_name: str = BLOOD_WINDOW, chunk: int = 512) -> np.ndarray:
    """Fraction of each cached slice's pixels inside `band` HU, read back from its uint8 `window_name` channel.

    `images` is the cache (memmap or packed rows, [n, windows, S, S]); rows are read `chunk` at a time, one channel
    (a memmap reads only that channel's bytes; packed rows decode whole rows)."""
    channel, low, width = window_channel(window_name)
    if not low <= band[0] < band[1] <= low + width:
        raise ValueError(f"HU band {band} does not fit the {window_name} window ({low:g} to {low + width:g} HU)")
    first_code = np.ceil((band[0] - low) / width * 255.0)  # code v stands for low + v / 255 x width HU
    last_code = np.floor((band[1] - low) / width * 255.0)
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        block = np.asarray(images[rows[start : start + chunk], channel])
        out[start : start + len(block)] = ((block >= first_code) & (block <= last_code)).mean(axis=(1, 2))
    return out
