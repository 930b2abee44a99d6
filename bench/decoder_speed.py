"""BloodNet's own U-Net decoder (src/cnn/model.py) vs segmentation_models_pytorch's Unet on the same timm encoder:
parameters and CPU forward+backward time per training batch; the numbers behind keeping the own decoder, and behind
its width (config key decoder_width).

    python bench/decoder_speed.py [--backbone resnet10t] [--size 128] [--batch 32] [--context 1] [--reps 5]
                                  [--widths 0.5 0.25] [--no-smp]

Prints each row's time as a ratio to the own decoder at the config's default width (the first row), all measured in
one run; writes work/bench/decoder_speed.{json,md}. Time is the process's CPU time on one thread: on cores shared
with other jobs, wall time measures the neighbours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from src.atomic import write_json, write_text
from src.cnn.model import build_model
from src.config import load_config
from src.paths import WORK

# smp's default decoder (256..16 channels), and one narrowed to our own decoder's widths at resnet10t (width 0.5).
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


def smp_rows(args: argparse.Namespace, in_chans: int, x: torch.Tensor) -> list[dict]:
    """One row per SMP_DECODERS entry: smp's Unet on the same timm encoder (smp takes ~10 s to import: only here)."""
    import segmentation_models_pytorch as smp

    rows = []
    for name, channels in SMP_DECODERS.items():
        net = smp.Unet(f"tu-{args.backbone}", encoder_weights=None, in_channels=in_chans, classes=1,
                       decoder_channels=channels).train()
        rows.append({"model": f"{name} {channels}", "params_total": sum(p.numel() for p in net.parameters()),
                     "params_decoder": sum(p.numel() for n, p in net.named_parameters()
                                           if n.startswith(("decoder", "segmentation_head"))),
                     "seconds": step_seconds(net, x, lambda m, t: m(t), args.reps)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 0.25],
                        help="decoder_width values of the own decoder, timed besides the config's default")
    parser.add_argument("--no-smp", action="store_true", help="time the own decoder only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base_sets = [f"backbone={args.backbone}", f"context={args.context}", "arch=bloodnet"]
    cfg = load_config(None, base_sets)
    x = torch.rand(args.batch, cfg.in_chans, args.size, args.size)
    rows = []
    widths = [cfg.decoder_width, *(w for w in dict.fromkeys(args.widths) if w != cfg.decoder_width)]
    for width in widths:
        own = build_model(load_config(None, [*base_sets, f"decoder_width={width}"])).train()
        if width == cfg.decoder_width:
            encoder = own.encoder  # the default's: what every decoder adds its time to (its own row below)
        own_decoder = [p for n, p in own.named_parameters() if n.startswith(("decoder", "seg_"))]
        default = " (the default)" if width == cfg.decoder_width else ""
        rows.append({"model": f"own decoder (src/cnn/model.py), decoder_width={width:g}{default}",
                     "decoder_channels": [block.block[0].out_channels for block in own.decoder],
                     "params_total": sum(p.numel() for p in own.parameters()),
                     "params_decoder": sum(p.numel() for p in own_decoder),
                     "seconds": step_seconds(own, x, lambda m, t: m(t, torch.ones(len(t)))["seg_logits"], args.reps)})
    rows.append({"model": "encoder alone (no decoder)", "decoder_channels": [],
                 "params_total": sum(p.numel() for p in encoder.parameters()), "params_decoder": 0,
                 "seconds": step_seconds(encoder, x, lambda m, t: m(t)[-1], args.reps)})
    if not args.no_smp:
        rows += smp_rows(args, cfg.in_chans, x)
    base = rows[0]["seconds"]
    lines = [f"{args.backbone}, {args.size} px, batch {args.batch}, {cfg.in_chans} channels, "
             f"1 thread, median CPU time of {args.reps} forward+backward steps", "",
             "| model | parameters | decoder parameters | CPU s / batch | time vs the first row |",
             "|---|---|---|---|---|"]
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
