"""BloodNet's own U-Net decoder (src/cnn/model.py) vs segmentation_models_pytorch's Unet on the same timm encoder:
parameters and CPU forward+backward time per training batch; the numbers behind keeping the own decoder.

    python bench/decoder_speed.py [--backbone resnet10t] [--size 128] [--batch 32] [--context 1] [--reps 5]

Prints the ratio smp / own for each smp decoder width; writes work/bench/decoder_speed.{json,md}. Time is the
process's CPU time on one thread: on cores shared with other jobs, wall time measures the neighbours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import segmentation_models_pytorch as smp
import torch

from src.atomic import write_json, write_text
from src.cnn.model import build_model
from src.config import load_config
from src.paths import WORK

# smp's default decoder (256..16 channels), and one narrowed to our own decoder's widths at resnet10t.
SMP_DECODERS = {"smp Unet, default decoder": (256, 128, 64, 32, 16), "smp Unet, narrow decoder": (128, 64, 32, 16, 16)}


def step_seconds(model: torch.nn.Module, x: torch.Tensor, forward, reps: int) -> float:
    """Median CPU seconds of one forward + backward of the segmentation output (the warm-up step not counted)."""
    times = []
    for i in range(reps + 1):
        t0 = time.process_time()
        forward(model, x).float().mean().backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.process_time() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(None, [f"backbone={args.backbone}", f"context={args.context}", "arch=bloodnet"])
    x = torch.rand(args.batch, cfg.in_chans, args.size, args.size)
    rows = []
    own = build_model(cfg).train()
    own_decoder = [p for n, p in own.named_parameters() if n.startswith(("decoder", "seg_"))]
    rows.append({"model": "own decoder (src/cnn/model.py)", "params_total": sum(p.numel() for p in own.parameters()),
                 "params_decoder": sum(p.numel() for p in own_decoder),
                 "seconds": step_seconds(own, x, lambda m, t: m(t, torch.ones(len(t)))["seg_logits"], args.reps)})
    for name, channels in SMP_DECODERS.items():
        net = smp.Unet(f"tu-{args.backbone}", encoder_weights=None, in_channels=cfg.in_chans, classes=1,
                       decoder_channels=channels).train()
        rows.append({"model": f"{name} {channels}", "params_total": sum(p.numel() for p in net.parameters()),
                     "params_decoder": sum(p.numel() for n, p in net.named_parameters()
                                           if n.startswith(("decoder", "segmentation_head"))),
                     "seconds": step_seconds(net, x, lambda m, t: m(t), args.reps)})
    base = rows[0]["seconds"]
    lines = [f"{args.backbone}, {args.size} px, batch {args.batch}, {cfg.in_chans} channels, "
             f"1 thread, median CPU time of {args.reps} forward+backward steps", "",
             "| model | parameters | decoder parameters | CPU s / batch | time vs own |", "|---|---|---|---|---|"]
    for r in rows:
        r["ratio_vs_own"] = r["seconds"] / base
        lines.append(f"| {r['model']} | {r['params_total']:,} | {r['params_decoder']:,} | {r['seconds']:.3f} "
                     f"| {r['ratio_vs_own']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = WORK / "bench" / "decoder_speed"
    write_json({"args": vars(args), "rows": rows}, out.with_suffix(".json"))
    write_text(text, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
