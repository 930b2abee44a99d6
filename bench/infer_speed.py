"""CPU inference speed: per-slice latency and peak memory, naive vs batched, and whole-study time vs pure forward.

Usage: python bench/infer_speed.py [--threads 2] [--slices 32] [--repeats 3] [--out work/bench]

Each measurement runs in a fresh subprocess (peak RSS is per process and only ever grows). Models are randomly
initialised timm networks (nothing is downloaded): speed and memory do not depend on the weights.
- naive: one slice per forward, NCHW, torch.no_grad (how a straightforward port runs; the paper's setting)
- batched: the whole study in one forward, channels_last, torch.inference_mode (what src.triage.cli does)
- batched-nchw: the same without channels_last (what that memory format is worth on this CPU)
- study: DICOM files on disk -> src.triage.inputs.load_study_files + predict_study (flags, overlays), against the pure
  batched forward on the same slices; the flip TTA is off in both so the two count the same forwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {
    "default": {},  # src.config.Config defaults
    "resnet50-224": {"arch": "classifier", "backbone": "resnet50", "image_size": 224},  # the paper's model
}
PAPER_MS_PER_SLICE = 366.0  # Lewicki et al. 2020, ResNet50 at 224 px, laptop CPU
PAPER_PEAK_GB = 2.5
NATIVE_PX = 512  # RSNA slices are 512 x 512


def _rss_mb() -> float:
    """Resident set size now (MB), from /proc: ru_maxrss only gives the peak."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def _write_study(folder: Path, n: int) -> None:
    """n 512 px int16 CT slices (head-sized disc of brain HU in a skull ring), 5 mm apart, as RSNA-like DICOM."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:NATIVE_PX, :NATIVE_PX]
    r = np.hypot(yy - NATIVE_PX / 2, xx - NATIVE_PX / 2) / (NATIVE_PX * 0.42)
    base = np.where(r < 1.0, 1000.0, -1000.0)
    base = np.where(r < 0.9, 35.0, base)
    study, series = generate_uid(), generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "bench", study, series
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.45, 0.45]
        ds.Rows = ds.Columns = NATIVE_PX
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (base + 1024 + rng.normal(0, 5, base.shape)).astype(np.int16).tobytes()
        pydicom.dcmwrite(folder / f"slice{k:03d}.dcm", ds, enforce_file_format=True)


def worker(name: str, mode: str, threads: int, n_slices: int, repeats: int) -> dict:
    """One measurement in this process; returns its numbers."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from src.cnn.model import build_model
    from src.config import Config

    cfg = Config(**MODELS[name], tta_flip=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    size = cfg.image_size
    x = torch.rand(n_slices, cfg.in_chans, size, size)
    voxel = torch.full((n_slices,), 20.0)  # mm³ per pixel: BloodNet turns its mask into a volume (cost is the same)
    rss_before = _rss_mb()
    out = {"model": name, "mode": mode, "backbone": cfg.backbone, "arch": cfg.arch, "image_size": size,
           "params_m": n_params / 1e6, "threads": threads, "slices": n_slices, "repeats": repeats}

    if mode == "naive":
        with torch.no_grad():
            model(x[:1], voxel[:1])  # warm-up: first call allocates and picks kernels
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(n_slices):
                    model(x[i : i + 1], voxel[i : i + 1])
                times.append(time.perf_counter() - t0)
        out["ms_per_slice"] = 1000 * min(times) / n_slices
    elif mode in ("batched", "batched-nchw"):
        if mode == "batched":
            model = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last) if mode == "batched" else x
        with torch.inference_mode():
            model(xc, voxel)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(xc, voxel)
                times.append(time.perf_counter() - t0)
        out["ms_per_slice"] = 1000 * min(times) / n_slices
    elif mode == "study":
        from src.triage.ensemble import Ensemble, default_thresholds
        from src.triage.inputs import load_study_files
        from src.triage.predict import predict_study

        model = model.to(memory_format=torch.channels_last)
        # One random-init "fold 0" model: nothing is read from the (not existing) checkpoint path.
        ens = Ensemble(f"bench-{name}", cfg, [model], [Path("fold0") / "best.pt"], default_thresholds(0.8), "default")
        with tempfile.TemporaryDirectory() as tmp:
            _write_study(Path(tmp), n_slices)
            load_study_files([tmp], size)  # warm-up (also warms the page cache: files are read from memory)
            slices, images, _ = load_study_files([tmp], size)
            predict_study(ens, slices, images, batch_size=n_slices)
            whole, read, forward, ratio = [], [], [], []
            for _ in range(repeats):
                # Back to back, so that each ratio compares two timings taken under the same machine load.
                t0 = time.perf_counter()
                slices, images, _ = load_study_files([tmp], size)
                t1 = time.perf_counter()
                predict_study(ens, slices, images, batch_size=n_slices)
                t2 = time.perf_counter()
                with torch.inference_mode():
                    model(torch.from_numpy(images).float().div_(255).contiguous(memory_format=torch.channels_last),
                          voxel[: len(images)])
                t3 = time.perf_counter()
                whole.append(t2 - t0)
                read.append(t1 - t0)
                forward.append(t3 - t2)
                ratio.append((t2 - t0) / (t3 - t2))
        best = int(np.argmin(whole))
        out.update(study_s=whole[best], read_decode_s=read[best], forward_s=min(forward),
                   ms_per_slice=1000 * whole[best] / n_slices, study_over_forward_runs=ratio)
        out["study_over_forward"] = float(np.median(ratio))
    out["load_avg_1min"] = os.getloadavg()[0]  # other processes on the machine: timings under load are upper bounds
    out["peak_rss_mb"] = _peak_mb()
    out["rss_before_inference_mb"] = rss_before
    out["inference_extra_mb"] = max(0.0, out["peak_rss_mb"] - rss_before)
    return out


def _run_worker(name: str, mode: str, args: argparse.Namespace) -> dict:
    n = args.naive_slices if mode == "naive" else args.slices
    cmd = [sys.executable, __file__, "--worker", name, mode, "--threads", str(args.threads), "--slices", str(n),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}/{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"CPU inference, {meta['threads']} threads ({meta['cpu']}; {meta['torch']}), random-init weights, "
        f"study = {meta['slices']} slices of {NATIVE_PX} px, best of {meta['repeats']} runs, each row a fresh process; "
        f"load avg = 1-min load of the machine after the row ({meta['cores']} cores): above the thread count, other "
        "work competed for the cores and the time is an upper bound.",
        "",
        "| model | mode | ms / slice | vs paper (366 ms) | peak RSS (MB) | extra RSS while inferring (MB) | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = f"{r['ms_per_slice'] / PAPER_MS_PER_SLICE:.2f}x" if r["model"] == "resnet50-224" else ""
        lines.append(f"| {r['model']} ({r['backbone']} {r['image_size']} px) | {r['mode']} | {r['ms_per_slice']:.1f} "
                     f"| {paper} | {r['peak_rss_mb']:.0f} | {r['inference_extra_mb']:.0f} | {r['load_avg_1min']:.1f} |")
    lines += ["", "| model | whole study (s) | read + decode (s) | pure forward (s) | whole / forward (median of runs) "
              "| batched / naive |", "|---|---|---|---|---|---|"]
    for name in MODELS:
        by = {r["mode"]: r for r in rows if r["model"] == name}
        s = by["study"]
        speedup = by["batched"]["ms_per_slice"] / by["naive"]["ms_per_slice"]
        lines.append(f"| {name} | {s['study_s']:.2f} | {s['read_decode_s']:.2f} | {s['forward_s']:.2f} "
                     f"| {s['study_over_forward']:.2f} | {speedup:.2f} |")
    lines += ["", f"Paper (ResNet50, 224 px, laptop CPU): {PAPER_MS_PER_SLICE:.0f} ms per slice, {PAPER_PEAK_GB} GB. "
              "Whole study = load_study_files + predict_study (DICOM read, HU, windows, forward, flags, "
              "overlay PNGs); pure forward = one model call on the already windowed batch. Flip TTA off in both."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=32, help="slices in the benchmark study (batched, study)")
    parser.add_argument("--naive-slices", type=int, default=8, help="slices timed one by one in naive mode")
    parser.add_argument("--repeats", type=int, default=5, help="the best run counts (a shared machine is noisy)")
    parser.add_argument("--out", type=Path, default=None, help="default: work/bench/")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.threads, args.slices, args.repeats)))
        return 0
    import torch

    from src.atomic import write_json, write_text
    from src.paths import WORK

    rows = []
    for name in MODELS:
        for mode in ("naive", "batched-nchw", "batched", "study"):
            print(f"[bench] {name} {mode} ...", flush=True)
            rows.append(_run_worker(name, mode, args))
    meta = {"threads": args.threads, "slices": args.slices, "naive_slices": args.naive_slices,
            "repeats": args.repeats, "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as fh:
            meta["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    text = markdown(rows, meta)
    out = args.out or WORK / "bench"
    write_json({"meta": meta, "paper": {"ms_per_slice": PAPER_MS_PER_SLICE, "peak_gb": PAPER_PEAK_GB}, "rows": rows},
               out / "infer_speed.json")
    write_text(text, out / "infer_speed.md")
    print(text + f"\nwritten: {out / 'infer_speed.json'}, {out / 'infer_speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
