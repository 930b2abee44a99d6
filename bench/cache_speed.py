"""Cache builder speed on 512 x 512 slices vs a naive loop and vs pydicom decode alone, measured in one run.

    python bench/cache_speed.py [--n 300] [--workers 2] [--size 128] [--repeats 3] [--data DIR]

Generates (or reuses) N synthetic 512 x 512 CT slices (signed 16-bit, unsigned 12-bit and a few RSNA 12-bit-bug
files) in DIR/stage_2_test (default work/bench/cache_speed_data), then times, interleaved, best of --repeats:
- naive: pydicom.dcmread + pixel_array, float64 HU, each window with np.clip, cv2 INTER_AREA, one file at a time
- decode: pydicom.dcmread + pixel_array only (no HU, no windows, no resize, nothing written)
- builder: src.data.cache.build_cache for the split (metadata prebuilt, untimed), 1 process and --workers processes,
  everything included (pool start, memmap writes, index tables)
Also checks the builder's path against the reference to_channels(read_hu(...)) and measures what windowing before
resizing (instead of after) would change. Goals: builder (1 process) >= 5x naive and >= 70% of decode.
Writes work/bench/cache_speed.{json,md}; exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from src import paths
from src.atomic import write_json, write_text
from src.constants import WINDOWS
from src.data import cache
from src.data.dicom import read_hu
from src.data.dicom_fast import read_channels
from src.data.metadata import load_metadata
from src.data.windows import resize, to_channels, window

PX = 512
GOAL_VS_NAIVE = 5.0
GOAL_VS_DECODE = 0.70


def _phantom(rng: np.random.Generator) -> np.ndarray:
    """int HU: air, a skull ring (bone), brain grey with noise, a bright blob; shifted a little per slice."""
    cy, cx = PX / 2 + rng.uniform(-20, 20, size=2)
    yy, xx = np.mgrid[:PX, :PX]
    r = np.hypot((yy - cy) / (PX * 0.40), (xx - cx) / (PX * 0.34))
    hu = np.full((PX, PX), -1000.0)
    hu[r < 1.0] = 1500.0
    hu[r < 0.92] = 35.0
    hu += np.where(r < 1.0, rng.normal(0, 6, size=hu.shape), rng.normal(0, 15, size=hu.shape))
    blob = np.hypot(yy - cy - 60, xx - cx + 40) < rng.uniform(8, 25)
    hu[blob] = 70.0
    return np.rint(np.clip(hu, -1024, 3000)).astype(np.int32)


def _write_slice(path: Path, k: int, rng: np.random.Generator) -> None:
    hu = _phantom(rng)
    kind = k % 50  # 2% RSNA 12-bit bug, ~38% unsigned 12-bit, the rest signed 16-bit
    if kind == 0:
        stored, bits, rep, intercept = np.mod(np.maximum(hu, -1000), 4096).astype(np.uint16), 12, 0, 0.0
    elif kind % 3 == 0:
        stored, bits, rep, intercept = np.clip(hu + 1024, 0, 4095).astype(np.uint16), 12, 0, -1024.0
    else:
        stored, bits, rep, intercept = (hu + 1024).astype(np.int16), 16, 1, -1024.0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = path.stem
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPInstanceUID = path.stem
    ds.Modality = "CT"
    ds.PatientID = "ID_benchpatient"
    ds.StudyInstanceUID = "ID_benchstudy"
    ds.SeriesInstanceUID = "ID_benchseries"
    ds.ImagePositionPatient = ["-125", "-125", f"{5 * k}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = PX
    ds.PixelSpacing = ["0.488281", "0.488281"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, rep
    ds.WindowCenter, ds.WindowWidth = ["00040", "00040"], ["00080", "00080"]
    ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:.0f}", "1"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


def make_data(data_dir: Path, n: int) -> list[Path]:
    """N slices in data_dir/stage_2_test, reused when exactly N are there already."""
    folder = data_dir / "stage_2_test"
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if len(files) == n:
        return files
    shutil.rmtree(data_dir, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with pydicom.config.disable_value_validation():  # RSNA-style `ID_...` UIDs
        for k in range(n):
            _write_slice(folder / f"ID_{k:09x}.dcm", k, rng)
    print(f"wrote {n} slices of {PX} x {PX} to {folder}")
    return sorted(folder.glob("*.dcm"))


def naive(files: list[Path], size: int) -> None:
    """What a straightforward loop does: float64 HU, np.clip per window, stack, resize, scale to uint8."""
    out = np.empty((len(files), len(WINDOWS), size, size), dtype=np.uint8)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        chans = [np.clip((hu - (c - w / 2)) / w, 0.0, 1.0) for _, c, w in WINDOWS]
        img = cv2.resize(np.stack(chans, axis=-1), (size, size), interpolation=cv2.INTER_AREA)
        out[i] = np.rint(img * 255.0).astype(np.uint8).transpose(2, 0, 1)


def decode(files: list[Path]) -> None:
    for f in files:
        pydicom.dcmread(f).pixel_array  # noqa: B018 -- decoding is the point


def builder(data_dir: Path, size: int, workers: int, chunk_rows: int) -> None:
    shutil.rmtree(paths.cache_dir(data_dir, size), ignore_errors=True)
    cache.build_cache(data_dir, size, "test", workers=workers, chunk_rows=chunk_rows)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check_paths(files: list[Path], size: int, k: int = 40) -> dict:
    """Builder path vs reference, and window-then-resize vs the reference's resize-then-window (uint8 levels)."""
    fast_max, swap_max, swap_sum, swap_px, n_px = 0, 0, 0.0, 0, 0
    for f in files[:k]:
        hu = read_hu(f)
        ref = to_channels(hu, size).astype(np.int16)
        fast_max = max(fast_max, int(np.abs(read_channels(f, size).astype(np.int16) - ref).max()))
        swapped = np.stack([resize(np.rint(window(hu, c, w) * 255.0), size) for _, c, w in WINDOWS])
        diff = np.abs(np.rint(swapped) - ref)
        swap_max, swap_sum = max(swap_max, int(diff.max())), swap_sum + float(diff.sum())
        swap_px, n_px = swap_px + int((diff > 1).sum()), n_px + diff.size
    return {
        "slices_checked": min(k, len(files)),
        "builder_vs_reference_max_abs": fast_max,
        "window_then_resize_max_abs": swap_max,
        "window_then_resize_mean_abs": swap_sum / n_px,
        "window_then_resize_frac_px_over_1": swap_px / n_px,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of 512 x 512 slices")
    parser.add_argument("--workers", type=int, default=2, help="processes for the parallel builder run")
    parser.add_argument("--size", type=int, default=128, help="cache size (the pipeline's default image_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=paths.WORK / "bench" / "cache_speed_data")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # one core per process, as in the builder's workers
    files = make_data(args.data.resolve(), args.n)
    data_dir = args.data.resolve()
    out = paths.WORK / "bench"
    work = out / "cache_speed_work"
    paths.WORK = work  # the bench's caches and metadata stay out of the pipeline's work/cache
    try:
        load_metadata(data_dir, "test", workers=1)
        for f in files:  # page cache warm for every contender
            f.read_bytes()
        # Small chunks so that a few hundred rows still spread over the workers (CHUNK_ROWS is 256).
        chunk = max(8, math.ceil(args.n / (4 * args.workers)))
        runs = {
            "naive": lambda: naive(files, args.size),
            "decode": lambda: decode(files),
            "builder_1": lambda: builder(data_dir, args.size, 1, cache.CHUNK_ROWS),
            f"builder_{args.workers}": lambda: builder(data_dir, args.size, args.workers, chunk),
        }
        seconds: dict[str, list[float]] = {k: [] for k in runs}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # no bars
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    seconds[name].append(_timed(fn))
        checks = check_paths(files, args.size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = {k: args.n / min(v) for k, v in seconds.items()}
    vs_naive = rate["builder_1"] / rate["naive"]
    vs_decode = rate["builder_1"] / rate["decode"]
    par = f"builder_{args.workers}"
    result = {
        "n": args.n,
        "size": args.size,
        "workers": args.workers,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "slices_per_s": rate,
        "seconds": seconds,
        "builder_vs_naive_per_process": vs_naive,
        "builder_vs_decode_per_process": vs_decode,
        "goal_vs_naive": GOAL_VS_NAIVE,
        "goal_vs_decode": GOAL_VS_DECODE,
        **checks,
    }
    ok = vs_naive >= GOAL_VS_NAIVE and vs_decode >= GOAL_VS_DECODE
    table = (
        f"{args.n} slices of {PX} x {PX} -> {args.size} px cache, best of {args.repeats}; "
        f"`python bench/cache_speed.py --n {args.n} --workers {args.workers} --size {args.size}`\n\n"
        "| naive (1 proc) | decode only (1 proc) | builder (1 proc) | "
        f"builder ({args.workers} procs) | builder / naive | builder / decode |\n"
        "|---|---|---|---|---|---|\n"
        f"| {rate['naive']:.0f}/s | {rate['decode']:.0f}/s | {rate['builder_1']:.0f}/s | {rate[par]:.0f}/s | "
        f"{vs_naive:.1f}x (goal >= {GOAL_VS_NAIVE:.0f}x) | {vs_decode:.0%} (goal >= {GOAL_VS_DECODE:.0%}) |\n\n"
        f"Builder vs reference to_channels(read_hu()): max |diff| {checks['builder_vs_reference_max_abs']} grey "
        f"levels on {checks['slices_checked']} slices. Windowing before resizing instead would change: max "
        f"{checks['window_then_resize_max_abs']}, mean {checks['window_then_resize_mean_abs']:.3f} levels, "
        f"{checks['window_then_resize_frac_px_over_1']:.2%} of pixels by more than 1 (the builder keeps "
        "resize-then-window).\n"
    )
    print(table)
    write_json(result, out / "cache_speed.json")
    write_text(table, out / "cache_speed.md")
    if not ok:
        print("goal missed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
