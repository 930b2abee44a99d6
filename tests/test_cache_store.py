"""The zstd cache store: the memmap's rows bit for bit, the same batches, a resumable build, its own fingerprint,
a one-line refusal of an unknown format, and a disk-room check at its own (compressed) size."""

from __future__ import annotations

import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from src.config import load_config
from src.data import cache, store
from src.data.dataset import SliceDataset
from src.data.packed import PackedRows
from src.data.store import cache_bytes
from src.errors import InputError

SIZE = 32  # caches of their own, apart from the other tests' 64 and 16 px ones
CHUNK = 64  # several chunks on the tiny set (~270 train rows)
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def both(tiny_data):
    """(memmap cache, zstd cache) of the tiny set's train split."""
    cache.build_cache(tiny_data, SIZE, "train", workers=2, chunk_rows=CHUNK)
    cache.build_cache(tiny_data, SIZE, "train", workers=2, chunk_rows=CHUNK, fmt="zstd")
    return (cache.load_cache(tiny_data, SIZE, "train", workers=1),
            cache.load_cache(tiny_data, SIZE, "train", workers=1, fmt="zstd"))


def test_zstd_store_holds_the_memmaps_rows_bit_for_bit(both):
    (meta_m, images_m, masks_m), (meta_z, images_z, masks_z) = both
    assert isinstance(images_z, PackedRows) and isinstance(masks_z, PackedRows)
    assert meta_m.equals(meta_z) and meta_m.attrs["bad_ids"] == meta_z.attrs["bad_ids"]
    assert images_z.shape == images_m.shape and images_z.dtype == images_m.dtype == np.uint8
    np.testing.assert_array_equal(images_z[:], images_m)
    np.testing.assert_array_equal(masks_z[:], masks_m)
    assert masks_m.any()  # the tiny set has painted masks: they went through the store too
    rows = np.array([5, 0, len(images_m) - 1, 5])
    np.testing.assert_array_equal(images_z[rows], images_m[rows])
    np.testing.assert_array_equal(images_z[rows, 1], images_m[rows, 1])  # rows and a window, as numpy indexes them
    np.testing.assert_array_equal(images_z[2:5, 0, 3], images_m[2:5, 0, 3])
    np.testing.assert_array_equal(images_z[3, 2], images_m[3, 2])
    np.testing.assert_array_equal(images_z[-1], images_m[-1])
    np.testing.assert_array_equal(images_z[3, 1], images_m[3, 1])
    np.testing.assert_array_equal(images_z[10:20:3], images_m[10:20:3])
    with pytest.raises(IndexError):
        images_z[len(images_m)]


def _batches(meta, images, masks, workers: int) -> list[dict]:
    ds = SliceDataset(meta, images, context=1, masks=masks)
    return list(DataLoader(ds, batch_size=16, shuffle=False, num_workers=workers))


def test_loader_yields_the_same_batches_from_either_store(both):
    (meta, images_m, masks_m), (_, images_z, masks_z) = both
    want = _batches(meta, images_m, masks_m, 0)
    for workers in (0, 2):  # forked workers share the store's open files: reads must not race on offsets
        got = _batches(meta, images_z, masks_z, workers)
        assert len(got) == len(want)
        for a, b in zip(want, got):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key


def test_killed_zstd_build_resumes_and_matches(tiny_data, monkeypatch, both, kill_cache_after):
    (_, images_m, _), _ = both
    size = 24  # a fresh cache: the module fixture's stays intact
    real = cache._process_chunk
    kill_cache_after(2)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(tiny_data, size, "train", workers=1, chunk_rows=CHUNK, fmt="zstd")
    files = cache._files(tiny_data, size, "train", "zstd")
    assert not files["images"].exists() and len(list(files["images_partial"].glob("chunk_*.bin"))) == 2
    resumed: list[int] = []
    monkeypatch.setattr(cache, "_process_chunk", lambda task: (resumed.append(task["chunk"]), real(task))[1])
    cache.build_cache(tiny_data, size, "train", workers=1, chunk_rows=CHUNK, fmt="zstd")
    n_chunks = -(-len(images_m) // CHUNK)
    assert resumed == list(range(2, n_chunks)) and not files["progress"].exists()
    cache.build_cache(tiny_data, size, "train", workers=1, chunk_rows=CHUNK)  # the memmap at the same size
    _, images_z, masks_z = cache.load_cache(tiny_data, size, "train", workers=1, fmt="zstd")
    _, images_r, masks_r = cache.load_cache(tiny_data, size, "train", workers=1)
    np.testing.assert_array_equal(images_z[:], images_r)
    np.testing.assert_array_equal(masks_z[:], masks_r)
    shutil.rmtree(files["images"].parent)


def test_fingerprint_and_files_differ_by_format(tiny_data, both):
    plan = cache._plan(both[0][0], "train")
    assert cache._fingerprint(plan, SIZE, "memmap") != cache._fingerprint(plan, SIZE, "zstd")
    memmap, zstd = cache._files(tiny_data, SIZE, "train"), cache._files(tiny_data, SIZE, "train", "zstd")
    assert all(memmap[k] != zstd[k] for k in memmap)
    assert memmap["images"].name == "images_train.npy"  # caches built before formats existed keep their names


def test_unknown_format_is_a_one_line_error():
    with pytest.raises(InputError, match=r"config key cache_format: 'png' is not one of memmap, zstd") as err:
        load_config(None, ["cache_format=png"])
    assert "\n" not in str(err.value)
    assert load_config(None, ["cache_format=zstd"]).cache_format == "zstd"
    with pytest.raises(InputError, match=r"--format: 'lz4' is not one of memmap, zstd"):
        cache.main(["--format", "lz4"])


def test_room_check_uses_the_formats_size(tiny_data, both, monkeypatch, capsys):
    (_, images, masks), _ = both
    size = 20  # fresh caches of both formats
    memmap_need = cache_bytes(len(images), len(masks), size)
    needs: list[int] = []
    monkeypatch.setattr(cache, "ensure_room", lambda folder, need, what: (needs.append(need),
                                                                          store.ensure_room(folder, need, what))[1])
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: Usage(10**12, 10**12, memmap_need - 1))
    with pytest.raises(InputError, match="needs"):
        cache.build_cache(tiny_data, size, "train", workers=1)
    cache.build_cache(tiny_data, size, "train", workers=1, fmt="zstd")  # fits: it is the compressed size
    assert needs[0] == memmap_need and needs[1] < 0.6 * memmap_need
    assert "(zstd, estimated from 16 sampled slices)" in capsys.readouterr().out
    folder = cache._files(tiny_data, size, "train", "zstd")["images"]
    written = sum(f.stat().st_size for d in (folder, folder.with_name("masks_train.zstd")) for f in d.iterdir())
    assert written <= needs[1]  # the estimate (1.5x margin on images, masks uncompressed) covers what was written
