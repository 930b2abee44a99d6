"""Cache stores compared: bytes per slice and the training loader's images/s, memmap vs zstd (cache_format).

    python bench/cache_store.py [--data DIR] [--sizes 256,128] [--loader-size 256] [--workers 0,1,2]
                                [--batches 30] [--repeats 2] [--out DIR] [--quick]

Generates (or reuses) a synthetic set at 512 px (--studies, default 12: ~300 slices, ~1 min; or --data), builds both
stores at each size in a scratch work folder, and reports:
- bytes per slice, images (3 windows) and masks, memmap vs zstd, plus the other candidates measured on the same rows
  (PNG via OpenCV, zstd at other levels) with their encode/decode rates on one core;
- the same on the real CT files in pydicom's test corpus (not head CT; synthetic phantoms are smoother than real CT
  and may compress differently);
- the training loader's images/s (the real SliceDataset, augmentation on, 2.5D context 1, the training DataLoader,
  sampler and batch size) with each --workers count, best of --repeats, first batch (worker start) left out; per
  core = images/s / max(workers, 1); projected to a 16-core machine at the project's auto_workers there.
Writes OUT/cache_store.{json,md} (default work/bench); --quick: a tiny set, for the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import torch
import zstandard

from src import paths
from src.atomic import write_json, write_text
from src.cnn.distributed import MAX_AUTO_WORKERS, loader_for
from src.cnn.sampling import EpochSampler, SeededItems
from src.config import Config
from src.data import cache
from src.data.dataset import SliceDataset, build_augment
from src.data.dicom_fast import read_channels
from src.data.packed import ZSTD_LEVEL

GOAL_RATIO, GOAL_IMAGES_S, CORES = 3.0, 2000.0, 16
SEED = 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in info if x.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} cores"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def store_bytes(folder: Path) -> int:
    return folder.stat().st_size if folder.is_file() else sum(f.stat().st_size for f in folder.iterdir())


def candidates(rows: np.ndarray) -> dict[str, dict]:
    """Bytes per row and encode/decode rows/s (one core) of each codec tried, checked lossless on every row."""
    def png(level):
        flags = [cv2.IMWRITE_PNG_COMPRESSION, level]
        return (lambda r: cv2.imencode(".png", np.ascontiguousarray(r.transpose(1, 2, 0)), flags)[1].tobytes(),
                lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED).transpose(2, 0, 1))

    def zstd(level):
        c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        return (lambda r: c.compress(r.tobytes()),
                lambda b: np.frombuffer(d.decompress(b), np.uint8).reshape(rows.shape[1:]))

    out = {}
    for name, (enc, dec) in {"png level 3": png(3), "png level 6": png(6), "zstd level 1": zstd(1),
                             f"zstd level {ZSTD_LEVEL} (chosen)": zstd(ZSTD_LEVEL), "zstd level 9": zstd(9)}.items():
        t0 = time.perf_counter()
        blobs = [enc(np.ascontiguousarray(r)) for r in rows]
        t1 = time.perf_counter()
        back = [dec(b) for b in blobs]
        t2 = time.perf_counter()
        assert all(np.array_equal(a, b) for a, b in zip(back, rows)), name
        mean = float(np.mean([len(b) for b in blobs]))
        out[name] = {"bytes": mean, "ratio": rows[0].nbytes / mean, "encode_per_s": len(rows) / (t1 - t0),
                     "decode_per_s": len(rows) / (t2 - t1)}
    return out


def installed_test_dicoms() -> list[Path]:
    """pydicom's own test files and the pydicom-data package's, as installed. Never pydicom.data.get_testdata_files:
    it fetches any listed file that is not on disk from the network, and offline it retries each one for ~20 s."""
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return sorted(p for root in roots for p in root.rglob("*.dcm"))


def real_ct(size: int) -> dict:
    """Bytes per row, raw vs zstd, on pydicom's CT test files (distinct pixels only)."""
    import pydicom

    rows, seen = [], set()
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corpus is full of deliberately odd files
        for f in installed_test_dicoms():
            try:
                if pydicom.dcmread(f, stop_before_pixels=True).get("Modality") != "CT":
                    continue
                row = read_channels(f, size)
            except Exception:  # a corpus of odd files: whatever does not read is not counted
                continue
            if row.tobytes() not in seen:
                seen.add(row.tobytes())
                rows.append(row)
    if not rows:
        return {"files": 0}
    c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    mean = float(np.mean([len(c.compress(r.tobytes())) for r in rows]))
    return {"files": len(rows), "raw_bytes": rows[0].nbytes, "zstd_bytes": mean, "ratio": rows[0].nbytes / mean}


def loader_rate(meta, images, masks, workers: int, batches: int, batch_size: int) -> float:
    """Images/s of the training loader over `batches` batches after the first (worker start-up left out)."""
    ds = SliceDataset(meta, images, context=1, masks=masks, augment=build_augment(Config().aug))
    sampler = EpochSampler(len(ds), SEED)
    loader = loader_for(SeededItems(ds, SEED), Config(), batch_size, sampler, workers=workers, persistent=True)
    seen, start, epoch = -1, 0.0, 0
    while seen < batches:
        sampler.set_epoch(epoch)
        for _ in loader:
            seen += 1
            if seen == 0:
                start = time.perf_counter()
            if seen == batches:
                break
        epoch += 1
    return batches * batch_size / (time.perf_counter() - start)


def measure(data: Path, args: argparse.Namespace) -> dict:
    result: dict = {"machine": machine(), "load_start": load(), "sizes": {}, "loader": [],
                    "loader_size": args.loader_size, "batch_size": args.batch_size}
    for size in args.sizes:
        entry: dict = {}
        for fmt in ("memmap", "zstd"):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                t0 = time.perf_counter()
                cache.build_cache(data, size, "train", workers=2, fmt=fmt)
                build_s = time.perf_counter() - t0
                _, images, masks = cache.load_cache(data, size, "train", workers=1, fmt=fmt)
            files = cache._files(data, size, "train", fmt)
            entry[fmt] = {"rows": len(images), "image_bytes": store_bytes(files["images"]) / len(images),
                          "mask_rows": 0 if masks is None else len(masks), "build_s": build_s, "load": load()}
            if masks is not None:
                entry[fmt]["mask_bytes"] = store_bytes(files["masks"]) / len(masks)
        entry["ratio"] = entry["memmap"]["image_bytes"] / entry["zstd"]["image_bytes"]
        entry["candidates"] = candidates(np.asarray(cache.load_cache(data, size, "train", workers=1)[1]))
        entry["real_ct"] = real_ct(size)
        entry["load"] = load()
        result["sizes"][size] = entry
        print(f"{size} px: {entry['ratio']:.2f}x smaller (load {entry['load']})", flush=True)
    stores = {fmt: cache.load_cache(data, args.loader_size, "train", workers=1, fmt=fmt) for fmt in ("memmap", "zstd")}
    torch.set_num_threads(1)  # workers=0 runs in this process: one core, like each worker
    for workers in args.workers:
        for fmt in ("memmap", "zstd"):
            meta, images, masks = stores[fmt]
            rates = [loader_rate(meta, images, masks, workers, args.batches, args.batch_size)
                     for _ in range(args.repeats)]
            best = max(rates)
            row = {"format": fmt, "workers": workers, "images_s": best, "per_core": best / max(workers, 1),
                   "runs": rates, "load": load()}
            result["loader"].append(row)
            print(f"loader {fmt:6s} workers={workers}: {best:7.1f} images/s ({row['per_core']:.1f} per core, "
                  f"load {row['load']})", flush=True)
    auto16 = min(MAX_AUTO_WORKERS, CORES - 1)
    one = {r["format"]: r["per_core"] for r in result["loader"] if r["workers"] == 1}
    result["projection"] = {fmt: {"workers_16_cores": auto16, "images_s": v * auto16,
                                  "goal_met": v * auto16 >= GOAL_IMAGES_S} for fmt, v in one.items()}
    result["load_end"] = load()
    return result


def render(r: dict, cmd: str) -> str:
    busy = " (busy machine)" if max(r["load_start"], r["load_end"]) > 2 else ""
    lines = [f"Machine: {r['machine']}; 1-min load average {r['load_start']} at the start, {r['load_end']} at the "
             f"end{busy}. Command: `{cmd}`.", "", "| size | store | bytes per slice (3 windows) | bytes per mask |"
             " build s (2 procs) |", "|---|---|---|---|---|"]
    for size, e in r["sizes"].items():
        for fmt in ("memmap", "zstd"):
            m = e[fmt]
            mask = f"{m['mask_bytes']:,.0f}" if "mask_bytes" in m else "-"
            lines.append(f"| {size} | {fmt} | {m['image_bytes']:,.0f} | {mask} | {m['build_s']:.1f} |")
        lines.append(f"| {size} | **zstd / memmap** | **{e['ratio']:.2f}x smaller** (goal >= {GOAL_RATIO:.0f}x) | | |")
    lines += ["", "Candidates on the same rows (one core; bytes per slice, x smaller, encode/s, decode/s):", ""]
    lines += ["| size | codec | bytes | x smaller | encode/s | decode/s |", "|---|---|---|---|---|---|"]
    for size, e in r["sizes"].items():
        for name, c in e["candidates"].items():
            lines.append(f"| {size} | {name} | {c['bytes']:,.0f} | {c['ratio']:.2f} | {c['encode_per_s']:,.0f} | "
                         f"{c['decode_per_s']:,.0f} |")
    for size, e in r["sizes"].items():
        ct = e["real_ct"]
        if ct["files"]:
            lines.append(f"\nReal CT ({ct['files']} distinct CT files of pydicom's test corpus, not head CT) at {size} "
                         f"px: {ct['zstd_bytes']:,.0f} bytes per slice with zstd vs {ct['raw_bytes']:,} raw "
                         f"({ct['ratio']:.2f}x).")
    lines += ["", f"Training loader at {r['loader_size']} px (SliceDataset, augmentation on, context 1, batch "
              f"{r['batch_size']}), best of the runs:", "",
              "| store | workers | images/s | per core | load |", "|---|---|---|---|---|"]
    for row in r["loader"]:
        lines.append(f"| {row['format']} | {row['workers']} | {row['images_s']:.0f} | {row['per_core']:.0f} | "
                     f"{row['load']} |")
    for fmt, p in r["projection"].items():
        lines.append(f"\n{fmt}: {p['images_s']:,.0f} images/s projected on {CORES} cores ({p['workers_16_cores']} "
                     f"workers, auto_workers' cap) from the 1-worker rate: goal >= {GOAL_IMAGES_S:,.0f} "
                     f"{'met' if p['goal_met'] else 'MISSED'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a data directory with a train split (default: generated)")
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--sizes", default="256,128")
    parser.add_argument("--loader-size", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=paths.WORK / "bench")
    parser.add_argument("--quick", action="store_true", help="a tiny set, 32 px, 2 batches: for the test suite")
    args = parser.parse_args(argv)
    cmd = "python bench/cache_store.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.studies, args.sizes, args.loader_size, args.workers = 3, "32", 32, "0,1"
        args.batches, args.batch_size, args.repeats = 2, 4, 1
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.workers = [int(w) for w in args.workers.split(",")]
    if args.loader_size not in args.sizes:
        args.sizes.append(args.loader_size)
    cv2.setNumThreads(1)  # one core per process, as in the loader's workers
    data = args.data.resolve() if args.data else args.out / ("cache_store_data_quick" if args.quick else
                                                               "cache_store_data")
    if not args.data and not (data / paths.TRAIN_CSV).exists():
        from src.synth.generator import generate

        with contextlib.redirect_stderr(io.StringIO()):
            generate(data, args.studies, seed=0, size=64 if args.quick else 512)
    scratch, work = args.out / "cache_store_work", paths.WORK
    paths.WORK = scratch  # the bench's caches and metadata stay out of the pipeline's work/
    try:
        result = measure(data, args)
    finally:
        paths.WORK = work  # a caller in the same process (the test suite) goes on with its own
        shutil.rmtree(scratch, ignore_errors=True)
    result["command"], result["quick"] = cmd, args.quick
    text = ("QUICK MODE: numbers mean nothing\n\n" if args.quick else "") + render(result, cmd)
    print(text)
    write_json(result, args.out / "cache_store.json")
    write_text(text, args.out / "cache_store.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
