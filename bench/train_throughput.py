"""Does the data loader keep up? Loader images/s vs the model's training images/s (and CPU inference ms/slice).

    python bench/train_throughput.py [--config F] [--set key=value ...] [--data DIR] [--batches 20]
        [--gpu-backbones resnet50d,efficientnet_b2,convnext_tiny] [--gpu-sizes 256,512] [--no-compile]

GPU mode, whenever a CUDA device is present: for each backbone and image size, the model's training images/s
through the training loop itself (bf16 autocast, channels_last, fused AdamW, with and without torch.compile; model
only, batches already in pinned memory) against the loader's images/s at that size (the cached slices upsampled,
the default augmentation, persistent workers, num_workers from the machine). Goal: loader >= 1.5x the model.
Without CUDA it measures the CPU at the configured settings and says so. Writes work/bench/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import torch

from src.atomic import write_json, write_text
from src.cnn.distributed import PREFETCH_BATCHES, auto_workers, loader_for
from src.cnn.loop import make_optimizer, train_one_epoch
from src.cnn.model import build_model
from src.cnn.predict import to_input
from src.cnn.runtime import Runtime, wrap_model
from src.cnn.sampling import EpochSampler, SeededItems
from src.cnn.schedule import phases_for
from src.config import Config, load_config
from src.constants import LABELS
from src.data.cache import load_cache
from src.data.dataset import SliceDataset, build_augment, resolve_mask_mode
from src.paths import WORK, resolve_data_dir

GOAL_CPU = 2.0  # on CPU the loader's worker takes cores from the model: it must be well ahead
GOAL_GPU = 1.5
GPU_BATCH = {256: 64, 512: 32}  # per size; other sizes scale 64 by area


def loader_rate(ds, cfg: Config, batch: int, batches: int) -> tuple[float, int]:
    """Steady-state images/s of the training loader (seeded items, persistent workers, pinned memory on CUDA) and
    its worker count. One epoch long enough for every worker: the dataset's indices repeated, as a real epoch of
    thousands of batches keeps them all busy. The first workers x prefetch batches are not timed: they come in a
    burst, made while the workers started. (The first GPU table timed 4-batch epochs of a 256-item set: 4 of 12
    workers busy and the queue refilled at every epoch start, so it read the loader at about a quarter of its rate.)"""
    workers = auto_workers(cfg)
    skipped, timed = workers * PREFETCH_BATCHES, max(batches, 4 * workers)
    repeated = np.resize(np.arange(len(ds)), (skipped + timed) * batch)
    sampler = EpochSampler(len(ds), seed=0, subset=lambda epoch: repeated)
    loader = loader_for(SeededItems(ds, 0), cfg, batch, sampler, workers=workers, persistent=True)
    seen, t0 = 0, 0.0
    for n, item in enumerate(loader):
        if n == skipped:
            t0 = time.perf_counter()
        elif n > skipped:
            seen += len(item["image"])
    return seen / (time.perf_counter() - t0), workers


def fake_batches(cfg: Config, batch: int, n: int, pin: bool) -> list[dict]:
    """n identical training batches in host memory (pinned on CUDA), so that the model alone is timed."""
    s, g = cfg.image_size, torch.Generator().manual_seed(0)
    item = {"image": torch.randint(0, 256, (batch, cfg.in_chans, s, s), dtype=torch.uint8, generator=g),
            "labels": (torch.rand(batch, len(LABELS), generator=g) > 0.8).float(),
            "mask": torch.zeros(batch, 1, s, s, dtype=torch.uint8),
            "mask_state": torch.zeros(batch, dtype=torch.int8), "voxel_mm3": torch.full((batch,), 1.5)}
    if pin:
        item = {k: v.pin_memory() for k, v in item.items()}
    return [item] * n


def model_rate(cfg: Config, rt: Runtime, batch: int, batches: int) -> float:
    """images/s of the training loop (the last, full-model phase) on fixed batches; the first pass warms up
    (cuDNN autotuning, torch.compile) and is not timed."""
    core = build_model(cfg).to(rt.device)
    if rt.channels_last:
        core = core.to(memory_format=torch.channels_last)
    phase = phases_for(cfg)[-1]
    optimizer = make_optimizer(cfg, core, phase.head_only)
    model = wrap_model(core, cfg, rt)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
    weights = torch.tensor(cfg.class_weights, device=rt.device)
    data = fake_batches(cfg, batch, batches, pin=rt.device.type == "cuda")
    train_one_epoch(model, data[: max(2, batches // 4)], optimizer, scaler, phase, 0, cfg, rt, weights, "warm-up")
    return train_one_epoch(model, data, optimizer, scaler, phase, 0, cfg, rt, weights, "timed")["train_images_per_s"]


@torch.inference_mode()
def inference_ms(ds, cfg: Config, batches: int, channels_last: bool) -> float:
    model = build_model(cfg).eval()
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    batch = next(iter(loader_for(ds, cfg, cfg.batch_size, workers=0)))
    x, voxel = to_input(batch["image"], torch.device("cpu"), channels_last), batch["voxel_mm3"]
    model(x, voxel)
    t0 = time.perf_counter()
    for _ in range(batches):
        model(x, voxel)
    return 1000 * (time.perf_counter() - t0) / (batches * len(x))


def resized_dataset(meta, images, cfg: Config, size: int, n: int) -> SliceDataset:
    """The first n cached slices upsampled to `size` px, with the configured augmentation: the loader's real work
    at that size (masks left out: every slice reads an empty one, which costs the same)."""
    sub = meta.head(n).reset_index(drop=True).copy()
    planes = [cv2.resize(np.ascontiguousarray(images[row].transpose(1, 2, 0)), (size, size),
                         interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1) for row in sub["cache_row"]]
    sub["cache_row"] = np.arange(len(sub))
    return SliceDataset(sub, np.stack(planes), cfg.context, augment=build_augment(cfg.aug))


def accelerator_rows(cfg: Config, meta, images, rt: Runtime, backbones: list[str], sizes: list[int],
                     compile_modes: list[bool], batches: int, batch: int = 0, on_row=None) -> list[dict]:
    """One row per backbone x size x compile: model images/s, loader images/s at that size, their ratio.
    `batch` 0 takes GPU_BATCH for each size. `on_row(rows)` is called after each row, so that a run stopped by a
    time limit keeps what it measured (on a GPU the first batch of each model can spend a minute in cuDNN's
    autotuning or torch.compile)."""
    rows = []
    for size in sizes:
        size_batch = batch or GPU_BATCH.get(size, max(8, 64 * 256**2 // size**2))
        sized = dataclasses.replace(cfg, image_size=size)
        data = resized_dataset(meta, images, sized, size, n=4 * size_batch)
        loader, workers = loader_rate(data, sized, size_batch, batches)
        print(f"loader at {size} px, batch {size_batch}, {workers} workers: {loader:.0f} images/s "
              f"({loader / max(workers, 1):.0f} per process)", flush=True)
        for backbone in backbones:
            for compiled in compile_modes:
                run_cfg = dataclasses.replace(sized, backbone=backbone, compile=compiled, log_every=10**9)
                model = model_rate(run_cfg, rt, size_batch, batches)
                rows.append({"backbone": backbone, "image_size": size, "batch": size_batch, "compile": compiled,
                             "model_images_per_s": model, "loader_images_per_s": loader, "loader_workers": workers,
                             "loader_to_model_ratio": loader / model})
                if on_row is not None:
                    on_row(rows)
    return rows


def gpu_table(rows: list[dict]) -> str:
    lines = ["| backbone | px | batch | compile | model images/s | loader images/s | loader / model |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['image_size']} | {r['batch']} | {'yes' if r['compile'] else 'no'} | "
              f"{r['model_images_per_s']:.0f} | {r['loader_images_per_s']:.0f} | "
              f"{r['loader_to_model_ratio']:.2f}x (goal >= {GOAL_GPU}x) |" for r in rows]
    return "\n".join(lines) + "\n"


def cpu_result(ds, cfg: Config, batches: int) -> tuple[dict, str]:
    """Loader vs the training loop on CPU, the loop timed in both memory formats: each twice, alternated, the faster
    of each kept, so that a busy moment does not decide the ratio. Training uses the format Runtime.create picks."""
    loader, _ = loader_rate(ds, cfg, cfg.batch_size, batches)
    # `batches` steps per timing (20 by default): 5 steps a format read 1.04x where 15 read 1.29x on one machine
    timed_cfg, steps = dataclasses.replace(cfg, log_every=10**9), max(3, batches)
    rates: dict[bool, float] = {False: 0.0, True: 0.0}
    for channels_last in (False, True, False, True):
        rt = Runtime(rank=0, world=1, device=torch.device("cpu"), amp_dtype=None, channels_last=channels_last)
        rates[channels_last] = max(rates[channels_last], model_rate(timed_cfg, rt, cfg.batch_size, steps))
    deployed = Runtime.create(cfg, 0, 1, torch.device("cpu")).channels_last
    train = rates[deployed]
    infer = inference_ms(ds, cfg, max(3, batches // 4), deployed)
    result = {"loader_images_per_s": loader, "train_images_per_s": train, "loader_to_train_ratio": loader / train,
              "train_images_per_s_contiguous": rates[False], "train_images_per_s_channels_last": rates[True],
              "channels_last_speedup": rates[True] / rates[False], "training_channels_last": deployed,
              "inference_ms_per_slice": infer, "goal_ratio": GOAL_CPU}
    table = ("| loader images/s | model training images/s | loader / training | training images/s, contiguous / "
             "channels_last | channels_last speed-up | inference ms/slice (CPU) |\n|---|---|---|---|---|---|\n"
             f"| {loader:.0f} | {train:.1f} | {loader / train:.1f}x (goal >= {GOAL_CPU}x) | {rates[False]:.1f} / "
             f"{rates[True]:.1f} | {rates[True] / rates[False]:.2f}x | {infer:.1f} |\n")
    return result, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--data")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--gpu-backbones", default="resnet50d,efficientnet_b2,convnext_tiny")
    parser.add_argument("--gpu-sizes", default="256,512")
    parser.add_argument("--no-compile", action="store_true", help="GPU mode: skip the torch.compile rows")
    parser.add_argument("--gpu-batch", type=int, default=0, help="GPU mode: batch (0: GPU_BATCH)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    data_dir = resolve_data_dir(args.data or cfg.data_dir or None)
    meta, images, masks = load_cache(data_dir, cfg.image_size, "train", fmt=cfg.cache_format)
    # As training does: `auto` becomes full or none by whether the data has masks (the loss takes no `auto`).
    mode = resolve_mask_mode(cfg.masks, masks, meta["mask_row"].to_numpy(), str(data_dir))
    cfg = dataclasses.replace(cfg, masks=mode)
    workers = auto_workers(cfg)
    common = {"exp": cfg.exp_name, "arch": cfg.arch, "context": cfg.context, "in_chans": cfg.in_chans,
              "num_workers": workers, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        rt = Runtime.create(cfg, 0, 1, torch.device("cuda", 0))
        name = torch.cuda.get_device_name(0)
        header = (f"GPU mode on {name}: {cfg.arch}, in_chans {cfg.in_chans}, {rt.amp_dtype} autocast, channels_last, "
                  f"fused AdamW; loader: {workers} workers, default augmentation\n\n")

        def save(rows: list[dict], partial: bool = True) -> None:
            write_json({"device": "cuda", "device_name": name, **common, "amp_dtype": str(rt.amp_dtype),
                        "goal_ratio": GOAL_GPU, "partial": partial, "rows": rows},
                       WORK / "bench" / "train_throughput.json")
            write_text(header + gpu_table(rows), WORK / "bench" / "train_throughput.md")

        def measured(rows: list[dict]) -> None:
            save(rows)
            print(gpu_table(rows[-1:]).splitlines()[-1], flush=True)

        rows = accelerator_rows(cfg, meta, images, rt, args.gpu_backbones.split(","),
                                [int(s) for s in args.gpu_sizes.split(",")], [False] if args.no_compile else
                                [False, True], args.batches, args.gpu_batch, on_row=measured)
        save(rows, partial=False)
        table, met = gpu_table(rows), all(r["loader_to_model_ratio"] >= GOAL_GPU for r in rows)
        print(header + table)
        return 0 if met else 1

    ds = SliceDataset(meta, images, cfg.context, masks, augment=build_augment(cfg.aug))
    measured, table = cpu_result(ds, cfg, args.batches)
    result = {"device": "cpu", **common, "backbone": cfg.backbone, "image_size": cfg.image_size,
              "batch_size": cfg.batch_size, **measured}
    header = (f"CPU mode (no CUDA device found: these are CPU figures): {cfg.arch} {cfg.backbone}, "
              f"{cfg.image_size} px, in_chans {cfg.in_chans}, batch {cfg.batch_size}, {workers} loader worker(s), "
              f"{torch.get_num_threads()} torch threads\n\n")
    met = measured["loader_to_train_ratio"] >= GOAL_CPU
    print(header + table)
    write_json(result, WORK / "bench" / "train_throughput.json")
    write_text(header + table, WORK / "bench" / "train_throughput.md")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
