"""Does the data loader keep up? Loader-only images/s vs the model's training images/s, and CPU inference ms/slice.

    python bench/train_throughput.py [--config F] [--set key=value ...] [--data DIR] [--batches 20]

Measured in one run at the default settings (or the given overrides) on the cached train split; the goal is a
loader that delivers at least 2x what the model consumes. Writes work/bench/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from src.atomic import write_json, write_text
from src.cnn.distributed import loader_for
from src.cnn.losses import weighted_bce
from src.cnn.model import build_model
from src.cnn.predict import to_input
from src.config import load_config
from src.constants import LABEL_WEIGHTS
from src.data.cache import load_cache
from src.data.dataset import SliceDataset, build_augment
from src.paths import WORK, resolve_data_dir


def loader_rate(ds, cfg, batches: int) -> float:
    loader = loader_for(ds, cfg, cfg.batch_size, sampler=torch.utils.data.RandomSampler(ds))
    it = iter(loader)
    next(it)  # worker start-up is paid once per epoch, not per batch
    seen, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            seen += len(next(it)["image"])
        except StopIteration:
            it = iter(loader)
    return seen / (time.perf_counter() - t0)


def train_rate(ds, cfg, batches: int) -> float:
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batch = next(iter(loader_for(ds, cfg, cfg.batch_size, workers=0)))
    x, labels, voxel = to_input(batch["image"], torch.device("cpu"), False), batch["labels"], batch["voxel_mm3"]
    weights = torch.tensor(LABEL_WEIGHTS)

    def step():
        loss = weighted_bce(model(x, voxel)["logits"], labels, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator and kernels
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * len(x) / (time.perf_counter() - t0)


@torch.inference_mode()
def inference_ms(ds, cfg, batches: int) -> float:
    model = build_model(cfg).eval()
    batch = next(iter(loader_for(ds, cfg, cfg.batch_size, workers=0)))
    x, voxel = to_input(batch["image"], torch.device("cpu"), False), batch["voxel_mm3"]
    model(x, voxel)
    t0 = time.perf_counter()
    for _ in range(batches):
        model(x, voxel)
    return 1000 * (time.perf_counter() - t0) / (batches * len(x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--data")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    data_dir = resolve_data_dir(args.data or cfg.data_dir or None)
    meta, images, masks = load_cache(data_dir, cfg.image_size, "train")
    ds = SliceDataset(meta, images, cfg.context, masks, augment=build_augment(cfg.aug))
    torch.set_num_threads(torch.get_num_threads())

    loader = loader_rate(ds, cfg, args.batches)
    train = train_rate(ds, cfg, max(3, args.batches // 4))
    infer = inference_ms(ds, cfg, max(3, args.batches // 4))
    result = {
        "exp": cfg.exp_name,
        "backbone": cfg.backbone,
        "arch": cfg.arch,
        "image_size": cfg.image_size,
        "in_chans": cfg.in_chans,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "torch_threads": torch.get_num_threads(),
        "loader_images_per_s": loader,
        "train_images_per_s": train,
        "loader_to_train_ratio": loader / train,
        "inference_ms_per_slice": infer,
        "goal_ratio": 2.0,
    }
    table = (
        "| loader images/s | model training images/s | loader / training | inference ms/slice (CPU) |\n"
        "|---|---|---|---|\n"
        f"| {loader:.0f} | {train:.1f} | {loader / train:.1f}x (goal >= 2x) | {infer:.1f} |\n"
    )
    header = (
        f"{cfg.arch} {cfg.backbone}, {cfg.image_size} px, in_chans {cfg.in_chans}, batch {cfg.batch_size}, "
        f"{cfg.num_workers} loader worker(s), {torch.get_num_threads()} torch threads\n\n"
    )
    print(header + table)
    write_json(result, WORK / "bench" / "train_throughput.json")
    write_text(header + table, WORK / "bench" / "train_throughput.md")
    return 0 if loader / train >= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
