"""The cache stage states its size and refuses, in one line and before writing, when the disk lacks room."""

from __future__ import annotations

import shutil
from collections import namedtuple

import numpy as np
import pytest

from src.data import cache, store
from src.data.store import cache_bytes
from src.errors import InputError

Usage = namedtuple("Usage", "total used free")


def test_cache_bytes_at_rsna_scale():
    assert cache_bytes(752_803, 0, 256) == 752_803 * 3 * 256 * 256  # ~148 GB: the figure
    assert cache_bytes(2, 1, 4) == (2 * 3 + 1) * 16


def test_cache_refuses_when_the_disk_is_too_small_then_builds_with_room(tiny_data, monkeypatch, capsys):
    size = 16  # a cache of its own, apart from the other tests' 64 px one
    real = shutil.disk_usage
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 100, 100))
    with pytest.raises(InputError, match=r"needs .* GB, the disk has 0.0 GB free") as err:
        cache.build_cache(tiny_data, size, "train", workers=1)
    assert "\n" not in str(err.value)
    assert not cache._files(tiny_data, size, "train")["images"].exists()
    monkeypatch.setattr(store.shutil, "disk_usage", real)
    cache.build_cache(tiny_data, size, "train", workers=1)
    _, images, masks = cache.load_cache(tiny_data, size, "train", workers=1)
    n_masks = 0 if masks is None else len(masks)
    out = capsys.readouterr().out
    assert f"{cache_bytes(len(images), n_masks, size) / 1e9:.2f} GB to write" in out
    assert images.shape[1:] == (3, size, size) and np.asarray(images).any()
