"""What the image cache will take on disk, checked against the free space before a byte of it is written."""

from __future__ import annotations

import shutil
from pathlib import Path

from src.constants import WINDOWS
from src.errors import InputError


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
