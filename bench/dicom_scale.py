"""The header and cache stages on >= 20,000 real-size DICOM files: slices/s and peak memory, projected to RSNA.

    python bench/dicom_scale.py [--files 20000] [--base-studies 12] [--size 256] [--workers 2]
                                [--formats memmap,zstd] [--workdir DIR] [--keep] [--quick]

Rendering a phantom slice at 512 px takes ~0.2 s, so the bench renders --base-studies studies with the synthetic
generator (src.synth, 512 x 512) and writes --files DICOM files from them, each a real file of its own: the base
slices re-saved by pydicom under new SOP, series, study and patient UIDs (one new patient and study per copy of a
base study). The header stage therefore reads --files distinct headers, and the cache stage decodes --files full
512 x 512 pixel arrays (the pixels repeat every ~300 files, which changes no stage's work). Files go to the test
split (the real data has no masks; test needs no labels). Before each stage our files are dropped from the page
cache (fsync, then posix_fadvise DONTNEED on each file: the other jobs' cached pages stay), since 874,035 files
(~450 GB) never sit in RAM. Each stage runs as its own process, as run_fold.sh runs it; peak RSS from os.wait4
(the largest of the stage and its pool workers). Both stages also run on the first quarter of the files (hard
links) to see how time and memory grow. Projection: seconds per file x 874,035 (752,803 train + 121,232 test);
peak RSS affine in N from the two sizes. Writes work/bench/dicom_scale.{json,md}; the files are deleted unless
--keep.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
import pydicom.config  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src import paths  # noqa: E402
from src.atomic import write_json, write_text  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from scale import measure as run_stage  # noqa: E402  -- (wall s, peak RSS GB) of a stage run as its own process

RSNA_FILES = 752_803 + 121_232


def make_files(work: Path, n: int, base_studies: int, px: int) -> Path:
    """`n` distinct DICOM files in work/data/stage_2_test, from a rendered synthetic set of base_studies studies."""
    from src.synth.generator import generate

    base, data = work / "base", work / "data"
    folder = data / "stage_2_test"
    if folder.is_dir() and sum(1 for _ in os.scandir(folder)) == n:
        return data
    shutil.rmtree(data, ignore_errors=True)
    folder.mkdir(parents=True)
    if not (base / paths.TRAIN_CSV).exists():
        with contextlib.redirect_stderr(io.StringIO()):
            generate(base, base_studies, seed=0, size=px)
    sources = sorted((base / "stage_2_train").glob("*.dcm")) + sorted((base / "stage_2_test").glob("*.dcm"))
    # The generator makes a few series of other shapes (640 x 512, 768 x 768): 512 x 512 only here.
    sources = [f for f in sources if pydicom.dcmread(f, stop_before_pixels=True).Rows == px
               and pydicom.dcmread(f, stop_before_pixels=True).Columns == px]
    with pydicom.config.disable_value_validation():  # RSNA-style `ID_...` UIDs, as the generator writes them
        for k in tqdm(range(n), desc="write DICOM", unit="file", mininterval=2):
            copy, src = divmod(k, len(sources))
            ds = pydicom.dcmread(sources[src])
            image_id = f"ID_{k:09x}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = image_id
            # One new patient, study and series per copy of each base series: series stay whole and ordered.
            ds.PatientID = f"ID_p{copy:04x}{ds.PatientID[-4:]}"
            ds.StudyInstanceUID = f"ID_s{copy:04x}{ds.StudyInstanceUID[-6:]}"
            ds.SeriesInstanceUID = f"ID_r{copy:04x}{ds.SeriesInstanceUID[-6:]}"
            ds.save_as(folder / f"{image_id}.dcm", enforce_file_format=True)
    return data


def subset(data: Path, work: Path, n: int) -> Path:
    """The first n files of `data` as hard links in a data folder of their own (same files, no extra disk)."""
    out = work / f"data_{n}"
    folder = out / "stage_2_test"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for name in sorted(os.listdir(data / "stage_2_test"))[:n]:
            os.link(data / "stage_2_test" / name, folder / name)
    return out


def evict(data: Path) -> None:
    """Drop our files' pages from the page cache (theirs only: other jobs on the machine keep theirs)."""
    os.sync()
    for entry in os.scandir(data / "stage_2_test"):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(data: Path, n: int, args: argparse.Namespace, work: Path) -> list[dict]:
    out = work / f"out_{n}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "ICH_OUT": str(out), "PYTHONPATH": str(ROOT)}
    env.pop("ICH_DATA", None)
    py, common = sys.executable, ["--data", str(data), "--split", "test", "--workers", str(args.workers)]
    stages = [("headers (metadata stage)", [py, "-m", "src.data.metadata", *common], True),
              ("metadata again (freshness check)", [py, "-m", "src.data.metadata", *common], False)]
    stages += [(f"cache {args.size} px, {fmt}", [py, "-m", "src.data.cache", *common, "--size", str(args.size),
                                                  "--format", fmt], True) for fmt in args.formats]
    rows = []
    for name, cmd, cold in stages:
        if cold:
            evict(data)
        wall, peak = run_stage(cmd, env, work / "stages.log")
        row = {"files": n, "stage": name, "seconds": round(wall, 2), "files_per_s": round(n / wall, 1),
               "per_core": round(n / wall / (1 if "again" in name else args.workers), 1),
               "peak_gb": round(peak, 3), "load_1min": round(os.getloadavg()[0], 2)}
        if name.startswith("cache"):
            store = next((out / "work" / "cache").rglob(f"images_test.{'npy' if 'memmap' in name else 'zstd'}"))
            row["cache_gb"] = round(sum(f.stat().st_size for f in ([store] if store.is_file() else store.iterdir()))
                                    / 1e9, 3)
        rows.append(row)
        print(f"n={n:>6}  {name:<34} {wall:8.1f} s  {row['files_per_s']:8.1f} files/s  {peak:6.3f} GB  "
              f"load {row['load_1min']}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def project(rows: list[dict], n: int) -> dict[str, dict]:
    """Per stage at RSNA's 874,035 files: time at the largest size's rate; peak RSS affine in N (two sizes)."""
    out = {}
    for name in dict.fromkeys(r["stage"] for r in rows):
        at = sorted((r for r in rows if r["stage"] == name), key=lambda r: r["files"])
        big = at[-1]
        slope = (big["peak_gb"] - at[0]["peak_gb"]) / (big["files"] - at[0]["files"]) if len(at) > 1 else 0.0
        # The freshness check is a directory count after a process start: affine in N, not a cost per file.
        per_file = (big["seconds"] - at[0]["seconds"]) / (big["files"] - at[0]["files"]) if len(at) > 1 else 0.0
        seconds = (big["seconds"] + max(per_file, 0.0) * (RSNA_FILES - big["files"]) if "again" in name
                   else big["seconds"] / big["files"] * RSNA_FILES)
        out[name] = {"hours": seconds / 3600,
                     "peak_gb": big["peak_gb"] + max(slope, 0.0) * (RSNA_FILES - big["files"]),
                     "cache_gb": big["cache_gb"] / big["files"] * RSNA_FILES if "cache_gb" in big else None}
    return out


def render(result: dict, cmd: str) -> str:
    busy = " (busy machine)" if max(r["load_1min"] for r in result["rows"]) > 2 else ""
    sizes = sorted({r["files"] for r in result["rows"]})
    lines = [f"{result['files']:,} DICOM files of {result['px']} x {result['px']} ({result['data_gb']:.1f} GB), "
             f"{result['workers']} worker processes, {os.cpu_count()} cores; 1-min load average "
             f"{result['load_start']} at the start{busy}. Command: `{cmd}`.", "",
             "| stage | " + " | ".join(f"n={n:,}: files/s (per core), peak RSS" for n in sizes)
             + f" | projected at {RSNA_FILES:,} files |", "|---|" + "---|" * (len(sizes) + 1)]
    for name, p in result["projection"].items():
        cells = []
        for n in sizes:
            r = next((r for r in result["rows"] if r["stage"] == name and r["files"] == n), None)
            cells.append("-" if r is None else f"{r['files_per_s']:,.0f}/s ({r['per_core']:,.0f}), "
                                               f"{r['peak_gb']:.2f} GB, load {r['load_1min']}")
        disk = f", {p['cache_gb']:.0f} GB on disk" if p["cache_gb"] else ""
        when = f"{p['hours'] * 3600:.1f} s" if p["hours"] < 0.1 else f"{p['hours']:.2f} h"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {when}, {p['peak_gb']:.2f} GB{disk} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--base-studies", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--formats", default="memmap,zstd")
    parser.add_argument("--scales", default="4,1", help="also run on files/k for each k (growth of time, memory)")
    parser.add_argument("--workdir", type=Path, default=paths.WORK / "bench" / "dicom_scale")
    parser.add_argument("--out", type=Path, default=paths.WORK / "bench")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (a re-run reuses them)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (64 px, 60 files) for the test suite")
    args = parser.parse_args(argv)
    cmd = "python bench/dicom_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    px = 512
    if args.quick:
        args.files, args.base_studies, args.size, args.scales, px = 60, 3, 32, "1", 64
    args.formats = args.formats.split(",")
    work = args.workdir.resolve()
    result = {"files": args.files, "px": px, "workers": args.workers, "size": args.size, "quick": args.quick,
              "load_start": round(os.getloadavg()[0], 2), "command": cmd, "rows": []}
    try:
        data = make_files(work, args.files, args.base_studies, px)
        result["data_gb"] = sum(e.stat().st_size for e in os.scandir(data / "stage_2_test")) / 1e9
        for k in sorted({int(s) for s in args.scales.split(",")}, reverse=True):
            n = math.ceil(args.files / k)
            result["rows"] += measure(data if k == 1 else subset(data, work, n), n, args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["projection"] = project(result["rows"], args.files)
    text = ("QUICK MODE: numbers mean nothing\n\n" if args.quick else "") + render(result, cmd)
    print(text)
    write_json(result, args.out / "dicom_scale.json")
    write_text(text, args.out / "dicom_scale.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
