"""The CNN's held-out fold against the histogram-LightGBM floor on the same fold: the table the README shows.

    python bench/cnn_vs_floor.py [--exp EXP] [--fold 0]

Reads oof/<exp>/fold{K}_metrics.json (written by `bash run_fold.sh K`) and work/bench/floor_histogram.json (written by
`python bench/floor_histogram.py`); exits non-zero unless the CNN beats the floor on weighted log loss and AUC `any`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src.atomic import write_text
from src.config import load_config
from src.constants import LABELS
from src.paths import OOF_DIR, WORK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default=load_config().exp_name)
    parser.add_argument("--fold", type=int, default=0)
    args = parser.parse_args(argv)
    cnn_file = OOF_DIR / args.exp / f"fold{args.fold}_metrics.json"
    floor_file = WORK / "bench" / "floor_histogram.json"
    for path, command in ((cnn_file, f"bash run_fold.sh {args.fold}"), (floor_file, "python bench/floor_histogram.py")):
        if not path.exists():
            print(f"error: {path} not found; run `{command}` first", file=sys.stderr)
            return 2
    cnn = json.loads(cnn_file.read_text())
    floor = json.loads(floor_file.read_text())["per_fold"][str(args.fold)]
    if cnn["n_images"] != floor["n_images"]:
        print(f"error: fold {args.fold} has {cnn['n_images']} images in the CNN's OOF but {floor['n_images']} in the "
              "floor's: not the same data or folds", file=sys.stderr)
        return 2
    rows = [("CNN (`" + args.exp + "`)", cnn), ("histogram + LightGBM floor", floor)]
    lines = [
        f"Fold {args.fold} of the embedded default ({cnn['n_images']} held-out images).",
        "",
        "| model | weighted log loss | " + " | ".join(f"AUC {name}" for name in LABELS) + " |",
        "|---|---|" + "---|" * len(LABELS),
    ]
    for name, m in rows:
        aucs = " | ".join(f"{m['auc'][label]:.3f}" for label in LABELS)
        lines.append(f"| {name} | {m['weighted_log_loss']:.4f} | {aucs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(text, WORK / "bench" / "cnn_vs_floor.md")
    beats = cnn["weighted_log_loss"] < floor["weighted_log_loss"] and cnn["auc"]["any"] > floor["auc"]["any"]
    print("CNN beats the floor on weighted log loss and AUC any" if beats else "CNN does NOT beat the floor")
    return 0 if beats else 1


if __name__ == "__main__":
    sys.exit(main())
