"""Resumable uint8 image cache: every metadata row as 3 CT windows at S px (plus train masks), memory-mapped or
zstd-compressed per row (src/data/packed.py), read through one array-like accessor either way."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from src import paths
from src.atomic import write_csv, write_json
from src.config import Config
from src.constants import CACHE_FORMATS, ID_COL, WINDOWS
from src.data import dicom
from src.data.dicom import DicomError
from src.data.dicom_fast import read_channels
from src.data.metadata import load_metadata
from src.data.packed import LAYOUT_VERSION, ChunkWriter, PackedRows, check_format, open_rows, seal
from src.data.store import ensure_room, format_bytes
from src.data.windows import mask_to_size
from src.errors import InputError, run_cli

CHUNK_ROWS = 256  # progress is recorded per chunk: a kill loses at most one chunk per worker
INDEX_COLUMNS = ["ID", "cache_row", "mask_row", "ok"]
BAD_COLUMNS = ["ID", "path", "reason"]


def _files(data_dir: Path, size: int, split: str, fmt: str = "memmap") -> dict[str, Path]:
    """Each format has its own files beside the others' (the memmap's names predate formats and stay as they were)."""
    d = paths.cache_dir(data_dir, size)
    ext, tag = (".npy", "") if fmt == "memmap" else (f".{fmt}", f"_{fmt}")
    return {
        "images": d / f"images_{split}{ext}",
        "images_partial": d / f"images_{split}{ext}.partial",
        "masks": d / f"masks_train{ext}",
        "masks_partial": d / f"masks_train{ext}.partial",
        "index": d / f"index_{split}{tag}.csv",
        "bad": d / f"bad_files_{split}{tag}.csv",
        "progress": d / f"progress_{split}{tag}.json",
        "info": d / f"cache_{split}{tag}.json",  # written last: the fingerprint a complete cache was built with
    }


def _plan(meta: pd.DataFrame, split: str) -> pd.DataFrame:
    plan = meta[[ID_COL, "path", "rows", "cols"]].copy()
    plan["cache_row"] = np.arange(len(plan), dtype=np.int64)
    has_mask = meta["has_mask"].astype(bool).to_numpy() if split == "train" and "has_mask" in meta else None
    if has_mask is None:
        plan["mask_row"] = -1
    else:
        plan["mask_row"] = np.where(has_mask, np.cumsum(has_mask) - 1, -1)
    return plan


def _code_version() -> str:
    """sha1 of the code that turns DICOM into cached pixels (the modules of the reader, the mask resizer and the
    slow-path reader it mirrors): a change there must not leave old pixels in use."""
    modules = {sys.modules[f.__module__] for f in (read_channels, mask_to_size)} | {dicom}
    h = hashlib.sha1()
    for module in sorted(modules, key=lambda m: m.__name__):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def _fingerprint(plan: pd.DataFrame, size: int, fmt: str = "memmap") -> str:
    """What the cached values depend on: the images (IDs, in order), masks, image size, windows and writer code, and
    the store's format and layout. The memmap's string is the one it had before formats existed: its caches stay."""
    store = "" if fmt == "memmap" else f"{fmt}|layout{LAYOUT_VERSION}|"
    h = hashlib.sha1(f"{size}|{int((plan['mask_row'] >= 0).sum())}|{WINDOWS!r}|{store}".encode())
    h.update(_code_version().encode())
    h.update("\n".join(plan[ID_COL]).encode())
    return h.hexdigest()


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise InputError(f"{path}: mask PNG missing or unreadable")
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != shape:
        raise InputError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]}, image is {shape[0]}x{shape[1]}")
    return mask


def _process_chunk(task: dict) -> tuple[int, list[list]]:
    """Fill the chunk's rows of the .partial store; returns [ID, path, reason, kind] for what was skipped."""
    data_dir, size, records = Path(task["data_dir"]), task["size"], task["rows"]
    if task["format"] == "memmap":
        images = np.lib.format.open_memmap(task["images"], mode="r+")
        masks = np.lib.format.open_memmap(task["masks"], mode="r+") if task["masks"] else None
    else:  # a chunk's cache rows, and its mask rows, are consecutive
        images = ChunkWriter(task["images"], task["chunk"], records[0][4], len(records), (len(WINDOWS), size, size))
        mask_rows = [r[5] for r in records if r[5] >= 0]
        masks = ChunkWriter(task["masks"], task["chunk"], mask_rows[0] if mask_rows else 0, len(mask_rows),
                            (size, size)) if task["masks"] else None
    bad: list[list] = []
    for image_id, rel, rows, cols, cache_row, mask_row in records:
        try:
            read_channels(data_dir / rel, size, out=images[cache_row])
        except DicomError as err:
            images[cache_row] = 0
            bad.append([image_id, rel, err.reason, "image"])
        if mask_row >= 0:
            mask_rel = os.path.join(paths.MASKS_DIR, f"{image_id}.png")
            try:
                masks[mask_row] = mask_to_size(_read_mask(data_dir / mask_rel, (rows, cols)), size)
            except InputError as err:
                masks[mask_row] = 0
                bad.append([image_id, mask_rel, f"mask skipped: {err}", "mask"])
    images.flush()
    if masks is not None:
        masks.flush()
    return task["chunk"], bad


def _is_complete(files: dict[str, Path], plan: pd.DataFrame, size: int, fingerprint: str, fmt: str) -> bool:
    if not (files["index"].exists() and files["images"].exists() and files["info"].exists()):
        return False
    try:
        if json.loads(files["info"].read_text()).get("fingerprint") != fingerprint:
            print(f"{files['images']}: built from other images, size, windows, store layout or code; rebuilding")
            return False
        index = pd.read_csv(files["index"], dtype={ID_COL: str})
        images = open_rows(files["images"], fmt)
        masks = open_rows(files["masks"], fmt) if files["masks"].exists() else None
    except (OSError, ValueError, pd.errors.ParserError, InputError):  # json.JSONDecodeError is a ValueError
        return False
    if images.shape != (len(plan), len(WINDOWS), size, size) or list(index[ID_COL]) != list(plan[ID_COL]):
        return False
    n_masks = int((plan["mask_row"] >= 0).sum())
    return not n_masks or (masks is not None and masks.shape == (n_masks, size, size))


def _start(files: dict[str, Path], plan: pd.DataFrame, size: int, fingerprint: str, fmt: str) -> dict:
    """Resume a matching .partial build, or start a fresh one (zero-filled memmaps or empty chunk folders, empty
    progress)."""
    n_masks = int((plan["mask_row"] >= 0).sum())
    progress: dict = {}
    if files["progress"].exists():
        try:
            progress = json.loads(files["progress"].read_text())
        except (json.JSONDecodeError, OSError):
            progress = {}

        def have(key: str) -> bool:  # a kill between _finish's renames leaves some final files, not .partial ones
            return files[f"{key}_partial"].exists() or (progress.get("finishing", False) and files[key].exists())

        if progress.get("fingerprint") == fingerprint and have("images") and (n_masks == 0 or have("masks")):
            print(f"resuming: {len(progress['done'])} chunks already done")
            return progress
    # A stale index or fingerprint beside a new build could later pass for complete: remove them first.
    files["index"].unlink(missing_ok=True)
    files["info"].unlink(missing_ok=True)
    files["images"].parent.mkdir(parents=True, exist_ok=True)
    shape = (len(plan), len(WINDOWS), size, size)
    if fmt != "memmap":  # chunk files of an abandoned build would be indexed with the new ones by packed.seal
        for key in ("images_partial", "masks_partial"):
            shutil.rmtree(files[key], ignore_errors=True)
        files["images_partial"].mkdir()
        if n_masks:
            files["masks_partial"].mkdir()
        progress = {"fingerprint": fingerprint, "done": [], "bad": []}
        write_json(progress, files["progress"])
        return progress
    # New memmap files are sparse zeros: rows never written (failed files) stay zero-filled.
    np.lib.format.open_memmap(files["images_partial"], mode="w+", dtype=np.uint8, shape=shape).flush()
    if n_masks:
        np.lib.format.open_memmap(
            files["masks_partial"], mode="w+", dtype=np.uint8, shape=(n_masks, size, size)
        ).flush()
    progress = {"fingerprint": fingerprint, "done": [], "bad": []}
    write_json(progress, files["progress"])
    return progress


def build_cache(data_dir: str | os.PathLike, size: int, split: str, workers: int = 2, chunk_rows: int = CHUNK_ROWS,
                fmt: str = "memmap") -> Path:
    """Build (or resume, or keep) the split's cache in format `fmt` under paths.cache_dir; returns the cache folder."""
    check_format(fmt)
    data_dir = Path(data_dir).resolve()
    meta = load_metadata(data_dir, split, workers)
    plan = _plan(meta, split)
    files = _files(data_dir, size, split, fmt)
    fingerprint = _fingerprint(plan, size, fmt)
    if _is_complete(files, plan, size, fingerprint, fmt):
        print(f"{files['images']} is complete ({len(plan)} images)")
        return files["images"].parent
    # The chunking is part of a resume (done chunks are numbered), not of the cached values.
    progress = _start(files, plan, size, f"{fingerprint}|{chunk_rows}", fmt)
    done = set(progress["done"])
    n_masks = int((plan["mask_row"] >= 0).sum())
    records = [
        (i, p, int(r), int(k), int(cr), int(mr))
        for i, p, r, k, cr, mr in plan[[ID_COL, "path", "rows", "cols", "cache_row", "mask_row"]].itertuples(
            index=False, name=None
        )
    ]
    common = {
        "data_dir": str(data_dir),
        "size": size,
        "format": fmt,
        "images": str(files["images_partial"]),
        "masks": str(files["masks_partial"]) if n_masks else "",
    }
    tasks = [
        {**common, "chunk": c, "rows": records[s : s + chunk_rows]}
        for c, s in enumerate(range(0, len(records), chunk_rows))
        if c not in done
    ]
    todo_rows = sum(len(t["rows"]) for t in tasks)
    if todo_rows:
        need, how = format_bytes(fmt, [r for t in tasks for r in t["rows"]], data_dir, size)
        ensure_room(files["images"].parent, need, f"{split} cache at {size} px ({fmt}{how})")
    start = time.perf_counter()
    with tqdm(total=todo_rows, desc=f"cache {split} {size}px", disable=todo_rows == 0) as bar:
        pool, cv2_threads = None, cv2.getNumThreads()
        if workers > 1 and len(tasks) > 1:
            # A child forked while OpenCV's thread pool runs deadlocks in its first cv2 call (a notebook or test that
            # resized anything before building the cache hung here for good): no OpenCV threads across the fork.
            # The children inherit 0 too, which is what they want: one process per core already.
            cv2.setNumThreads(0)
            pool = Pool(workers)
        try:
            results = pool.imap_unordered(_process_chunk, tasks) if pool else map(_process_chunk, tasks)
            sizes = {t["chunk"]: len(t["rows"]) for t in tasks}
            for chunk, bad in results:
                progress["done"].append(chunk)
                progress["bad"].extend(bad)
                write_json(progress, files["progress"])
                bar.update(sizes[chunk])
        finally:
            if pool:
                pool.terminate()
                pool.join()
            cv2.setNumThreads(cv2_threads)
    elapsed = time.perf_counter() - start
    if todo_rows:
        print(f"cached {todo_rows} images in {elapsed:.1f} s ({todo_rows / max(elapsed, 1e-9):.1f} images/s)")
    _finish(files, plan, progress, n_masks, fingerprint, size)
    return files["images"].parent


def _finish(files: dict[str, Path], plan: pd.DataFrame, progress: dict, n_masks: int, fingerprint: str,
            size: int) -> None:
    """Tables first, renames last, the fingerprint after them: a kill anywhere in between resumes with nothing to
    do and finishes here again (progress says `finishing`, so renamed files count as done)."""
    progress["finishing"] = True
    write_json(progress, files["progress"])
    bad = pd.DataFrame([b[:3] for b in progress["bad"]], columns=BAD_COLUMNS)
    failed_images = {b[0] for b in progress["bad"] if b[3] == "image"}
    failed_masks = {b[0] for b in progress["bad"] if b[3] == "mask"}
    index = plan[[ID_COL, "cache_row", "mask_row"]].copy()
    index["ok"] = (~index[ID_COL].isin(failed_images)).astype(np.int8)
    index.loc[index[ID_COL].isin(failed_masks), "mask_row"] = -1
    write_csv(bad, files["bad"])
    write_csv(index, files["index"])
    for key in ("masks", "images") if n_masks else ("images",):
        partial = files[f"{key}_partial"]
        if partial.is_dir():  # a compressed store: index its chunks, then swap folders (os.replace needs an empty one)
            seal(partial, (n_masks, size, size) if key == "masks" else (len(plan), len(WINDOWS), size, size))
            shutil.rmtree(files[key], ignore_errors=True)
        if partial.exists():
            os.replace(partial, files[key])
    write_json({"fingerprint": fingerprint, "rows": len(index), "windows": WINDOWS}, files["info"])
    files["progress"].unlink(missing_ok=True)
    if len(bad):
        shown = "; ".join(f"{r.ID}: {r.reason}" for r in bad.head(3).itertuples())
        print(
            f"skipped {len(bad)} files ({len(failed_images)} images, {len(failed_masks)} masks), listed in "
            f"{files['bad']}: {shown}"
        )
    print(f"wrote {files['images']} ({len(index)} rows, {int(index['ok'].sum())} ok)")


def bad_ids(data_dir: str | os.PathLike, size: int, split: str, fmt: str = "memmap") -> list[str]:
    """Images with no cached pixels: unreadable headers (not in metadata) and undecodable pixels (ok = 0)."""
    data_dir = Path(data_dir).resolve()
    files = _files(data_dir, size, split, fmt)
    ids: list[str] = []
    headers = paths.metadata_csv(data_dir, split).with_name(f"bad_headers_{split}.csv")
    if headers.exists():
        ids += list(pd.read_csv(headers, dtype={ID_COL: str})[ID_COL])
    if files["index"].exists():
        index = pd.read_csv(files["index"], dtype={ID_COL: str})
        ids += list(index.loc[index["ok"] == 0, ID_COL])
    return sorted(set(ids))


def load_cache(
    data_dir: str | os.PathLike, size: int, split: str, workers: int = 2, fmt: str = "memmap"
) -> tuple[pd.DataFrame, np.memmap | PackedRows, np.memmap | PackedRows | None]:
    """(metadata of usable images + cache_row/mask_row, images [N,3,S,S], train masks [M,S,S] or None); builds if
    needed. Rows with ok = 0 are dropped; their IDs (and unreadable headers) are in meta.attrs["bad_ids"]. Both
    formats index alike (images[row], images[rows]) and give the same uint8 values."""
    data_dir = Path(data_dir).resolve()
    build_cache(data_dir, size, split, workers, fmt=fmt)
    files = _files(data_dir, size, split, fmt)
    meta = load_metadata(data_dir, split, workers)
    index = pd.read_csv(files["index"], dtype={ID_COL: str})
    merged = meta.merge(index, on=ID_COL, how="inner", validate="one_to_one")
    if len(merged) != len(meta) or not (merged["cache_row"].to_numpy() == np.arange(len(meta))).all():
        raise InputError(f"{files['index']}: does not match {paths.metadata_csv(data_dir, split)}; delete the cache")
    usable = merged[merged["ok"] == 1].reset_index(drop=True)
    usable.attrs["bad_ids"] = bad_ids(data_dir, size, split, fmt)
    images = open_rows(files["images"], fmt)
    masks = open_rows(files["masks"], fmt) if split == "train" and files["masks"].exists() else None
    return usable, images, masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.data.cache", description=__doc__)
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--size", type=int, default=Config.image_size, help="pixels a side (default: the config's)")
    parser.add_argument("--split", choices=("train", "test", "both"), default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--format", default="memmap", help=f"{' | '.join(CACHE_FORMATS)} (config key cache_format)")
    args = parser.parse_args(argv)
    check_format(args.format, "--format")
    if args.size < 8:
        raise InputError(f"--size {args.size}: too small")
    data_dir = paths.resolve_data_dir(args.data)
    for split in ("train", "test") if args.split == "both" else (args.split,):
        build_cache(data_dir, args.size, split, args.workers, fmt=args.format)
    return 0


if __name__ == "__main__":
    run_cli(main)
