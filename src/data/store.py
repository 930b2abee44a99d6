"""What the image cache will take on disk (its format's size), checked against the free space before a byte of it
is written."""

from __future__ import annotations

import shutil
from pathlib import Path

from src.constants import WINDOWS
from src.data.dicom import DicomError
from src.data.dicom_fast import read_channels
from src.data.packed import estimate_bytes
from src.errors import InputError

SAMPLE_ROWS = 16  # slices encoded to estimate a compressed store's size: ~0.1 s, spread over the whole plan


def cache_bytes(n_images: int, n_masks: int, size: int) -> int:
    """Bytes of the uint8 cache rows: 3 windows per image and one plane per mask, size x size each."""
    return (n_images * len(WINDOWS) + n_masks) * size * size


def ensure_room(folder: Path, need: int, what: str) -> None:
    """Print what `what` will take; raise InputError (one line) when the disk under `folder` has less free.

    The cache's memmaps are created sparse, so the disk fills up only as rows are written: without this check a
    full disk would surface hours in, as a bus error or a half-written chunk."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    free = shutil.disk_usage(probe).free
    print(f"{what}: {need / 1e9:.2f} GB to write in {folder} ({free / 1e9:.1f} GB free)")
    if need > free:
        raise InputError(f"{folder}: {what} needs {need / 1e9:.1f} GB, the disk has {free / 1e9:.1f} GB free; free "
                         "space, choose a smaller --size, or set ICH_OUT to a larger disk")


def format_bytes(fmt: str, records: list[tuple], data_dir: Path, size: int) -> tuple[int, str]:
    """(bytes, how they were reckoned) for the cache rows still to write: exact for the memmap; for a compressed
    store, images from a few sampled slices encoded for real, masks at their uncompressed size (an upper bound:
    the RSNA data has none, and a mask plane is mostly zeros). `records` are (ID, path, rows, cols, cache_row,
    mask_row) as the cache stage plans them."""
    n_masks = sum(r[5] >= 0 for r in records)
    if fmt == "memmap":
        return cache_bytes(len(records), n_masks, size), ""
    samples = []
    for r in records[:: max(1, len(records) // SAMPLE_ROWS)][:SAMPLE_ROWS]:
        try:
            samples.append(read_channels(Path(data_dir) / r[1], size))
        except DicomError:
            continue  # the build will skip it too
    images = estimate_bytes(samples, len(records), len(WINDOWS) * size * size)
    return images + cache_bytes(0, n_masks, size), f", estimated from {len(samples)} sampled slices"
