"""The compressed cache store: each uint8 row zstd-compressed on its own, one file per build chunk, read by row."""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import zstandard

from src.atomic import atomic_path, write_json, write_npy
from src.constants import CACHE_FORMATS
from src.errors import InputError

# Level 3 (zstd's default): on 256 px slices level 9 saves ~2% more bytes at 4x the encoding time, and the cache
# stage must not become slower than the DICOM decode it follows (bench/cache_store.py measured the candidates).
ZSTD_LEVEL = 3
# Bumped when the file layout below changes; part of the cache fingerprint, so an old store is rebuilt, not misread.
LAYOUT_VERSION = 1
_MAGIC = b"ICHZ"
_HEAD = struct.Struct("<4sQQ")  # magic, first row, number of rows; then n + 1 uint64 offsets into the blobs
MAX_OPEN_FILES = 64  # a full RSNA store has ~3,000 chunk files: more than a process may hold open


def check_format(fmt: str, source: str = "config key cache_format") -> str:
    if fmt not in CACHE_FORMATS:
        raise InputError(f"{source}: {fmt!r} is not one of {', '.join(CACHE_FORMATS)}")
    return fmt


def chunk_path(folder: Path, chunk: int) -> Path:
    return Path(folder) / f"chunk_{chunk:06d}.bin"


def encode(row: np.ndarray, compressor: zstandard.ZstdCompressor | None = None) -> bytes:
    return (compressor or zstandard.ZstdCompressor(level=ZSTD_LEVEL)).compress(np.ascontiguousarray(row).tobytes())


class ChunkWriter:
    """Rows first..first+n-1 of one build chunk, filled in place like a memmap's rows; flush() writes them as one
    chunk file, atomically (a kill leaves the whole chunk or none of it, so a resume just redoes the chunk)."""

    def __init__(self, folder: Path, chunk: int, first: int, n: int, row_shape: tuple[int, ...]):
        self.path, self.first = chunk_path(folder, chunk), first
        self.buf = np.zeros((n, *row_shape), dtype=np.uint8)  # rows never written (failed files) stay zero

    def __getitem__(self, row: int) -> np.ndarray:
        return self.buf[row - self.first]

    def __setitem__(self, row: int, value: np.ndarray) -> None:
        self.buf[row - self.first] = value

    def flush(self) -> None:
        if not len(self.buf):
            return
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        blobs = [encode(r, compressor) for r in self.buf]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype("<u8")
        with atomic_path(self.path) as tmp, open(tmp, "wb") as fh:
            fh.write(_HEAD.pack(_MAGIC, self.first, len(blobs)))
            fh.write(offsets.tobytes())
            fh.writelines(blobs)


def seal(folder: Path, shape: tuple[int, ...]) -> None:
    """Index every row of a finished store (rows.npy: chunk, start, end) from its chunk files' headers."""
    folder = Path(folder)
    rows = np.full((shape[0], 3), -1, dtype=np.int64)
    for path in sorted(folder.glob("chunk_*.bin")):
        with open(path, "rb") as fh:
            magic, first, n = _HEAD.unpack(fh.read(_HEAD.size))
            if magic != _MAGIC:
                raise InputError(f"{path}: not a chunk of the compressed cache; delete the cache folder")
            offsets = np.frombuffer(fh.read(8 * (n + 1)), dtype="<u8").astype(np.int64) + _HEAD.size + 8 * (n + 1)
        rows[first : first + n] = np.stack([np.full(n, int(path.stem[6:])), offsets[:-1], offsets[1:]], axis=1)
    if (rows[:, 0] < 0).any():
        raise InputError(f"{folder}: {int((rows[:, 0] < 0).sum())} rows have no chunk file; delete the cache folder")
    write_npy(rows, folder / "rows.npy")
    write_json({"shape": list(shape), "codec": "zstd", "level": ZSTD_LEVEL, "layout": LAYOUT_VERSION},
               folder / "store.json")


def one_row(key: int, n: int) -> int:
    """A row number as numpy reads it (negative from the end), checked against n rows."""
    i = int(key) + (n if key < 0 else 0)
    if not 0 <= i < n:
        raise IndexError(f"row {key} out of range for {n} rows")
    return i


def row_index(key, n: int) -> np.ndarray:
    """The rows a slice, a list or array of rows, or a boolean mask picks out of n, as numpy would pick them."""
    if isinstance(key, slice):
        return np.arange(*key.indices(n))
    key = np.asarray(key)
    index = np.flatnonzero(key) if key.dtype == bool else key.astype(np.int64, copy=False).ravel()
    if len(index) and not (-n <= index.min() and index.max() < n):
        raise IndexError(f"rows {key} out of range for {n} rows")
    return np.where(index < 0, index + n, index)


def within_rows(store, key: tuple) -> np.ndarray:
    """store[rows, ...]: read the rows, then index within each, as numpy would."""
    picked = store[key[0]]
    return picked[key[1:] if isinstance(key[0], (int, np.integer)) else (slice(None), *key[1:])]


class PackedRows:
    """A sealed store read like the memmap it replaces: shape, dtype, len, and [i], [array of i], [a:b] give uint8
    arrays equal bit for bit to what the memmap would hold."""

    dtype = np.dtype(np.uint8)

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            info = json.loads((self.folder / "store.json").read_text())
            self.rows = np.load(self.folder / "rows.npy")
        except (OSError, ValueError) as err:
            raise InputError(f"{self.folder}: compressed cache unreadable ({err}); delete it to rebuild") from err
        self.shape = tuple(info["shape"])
        self.ndim = len(self.shape)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._dctx: zstandard.ZstdDecompressor | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:  # a DataLoader worker that is spawned, not forked, opens its own files
        return {**self.__dict__, "_fds": OrderedDict(), "_dctx": None}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _fd(self, chunk: int) -> int:
        if chunk in self._fds:
            self._fds.move_to_end(chunk)
            return self._fds[chunk]
        if len(self._fds) >= MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[chunk] = fd = os.open(chunk_path(self.folder, chunk), os.O_RDONLY)
        return fd

    def _row(self, i: int, out: np.ndarray) -> None:
        chunk, start, end = (int(v) for v in self.rows[i])
        # pread, not seek + read: forked DataLoader workers share these descriptors and so their file offsets.
        blob = os.pread(self._fd(chunk), end - start, start)
        self._dctx = self._dctx or zstandard.ZstdDecompressor()
        out[...] = np.frombuffer(self._dctx.decompress(blob), dtype=np.uint8).reshape(self.shape[1:])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # images[rows, window]: decode the rows, then index within each, as numpy would
            return within_rows(self, key)
        if isinstance(key, (int, np.integer)):
            out = np.empty(self.shape[1:], dtype=np.uint8)
            self._row(one_row(key, self.shape[0]), out)
            return out
        index = row_index(key, self.shape[0])
        out = np.empty((len(index), *self.shape[1:]), dtype=np.uint8)
        for j, i in enumerate(index):
            self._row(int(i), out[j])
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


def open_rows(path: Path, fmt: str) -> np.ndarray | PackedRows:
    """The cache array at `path` (a .npy memmap or a sealed compressed store), read-only."""
    return np.load(path, mmap_mode="r") if fmt == "memmap" else PackedRows(path)


def estimate_bytes(samples: list[np.ndarray], n: int, raw_row_bytes: int) -> int:
    """Bytes n rows will take, from a few encoded sample rows with a 1.5x margin (CT slices vary in how much
    head they show), never more than the rows uncompressed plus zstd's frame overhead."""
    bound = n * (raw_row_bytes + raw_row_bytes // 128 + 64) + 8 * n
    if not samples or not n:
        return bound if n else 0
    mean = float(np.mean([len(encode(s)) for s in samples]))
    return min(bound, int(1.5 * mean * n) + 8 * n)
