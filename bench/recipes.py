"""Training recipes on fold 0 of the embedded default, each trained once and timed: the README's recipe table.

    python bench/recipes.py [--only NAME ...] [--budget-min 12] [--data DIR] [--quick]

Each recipe is the default config plus a few `--set` overrides (RECIPES below: one line each). It trains fold 0
with `run_fold` (the same code as `python -m src.cnn.train --fold 0`) under its own experiment name, so its
predictions land in oof/<exp>/ beside every other run and on `python -m src.evaluate.experiments`. Scores: fold-0
weighted log loss and slice AUC(any) from fold0_metrics.json, study AUC(any) from the max `any` over each study's
slices; for BloodNet recipes, the study blood volume's median absolute error and Spearman over fold 0's positive
studies (src.evaluate.volumes). Time (train_min): the sum of the fold's logged epoch times (train + validate), the
same for a fold trained here or before, outside the bench; wall_min adds the final predictions (the cache for a new
image size is built first and timed apart). A fold trained before goes through run_fold again (at once when it is
finished; predicted again when its predictions came from another select_epoch) and is scored from its files, so a
row always shows today's predictions; timings are kept per experiment in work/bench/recipes/, so a killed run
resumes with the next recipe, and a killed fold resumes from its last epoch. A recipe whose key
this checkout lacks (e.g. `ema` before EMA lands) is listed as skipped.
`--quick` shrinks every recipe (64 px, two batches, one epoch): a check of the machinery, not a result.
Writes work/bench/recipes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from src.atomic import write_json, write_text
from src.config import load_config
from src.constants import ID_COL, STUDY
from src.errors import InputError
from src.evaluate.experiments import train_minutes
from src.evaluate.volumes import run_volumes
from src.markdown import markdown_table
from src.paths import OOF_DIR, TRUE_VOLUMES_CSV, WORK, resolve_data_dir


@dataclass(frozen=True)
class Recipe:
    name: str
    what: str
    sets: tuple[str, ...] = ()


# Each recipe spells out every key it runs at that differs from today's default or from the defaults it was
# measured around, so a row names the same run whatever the default becomes (rows are cached by experiment name).
# Most alternatives were measured around two 128 px defaults: `AT_128` (context 1, 4 balanced
# segment + 1 head + 3 joint, the default before the 96 px runs) and the c0 rows (context 0, 2 + 1 + 3, last
# stop's).
# Segment epochs are balanced (seg_balance: every painted slice and as many empty ones, ~2/5 of an epoch). An epoch
# costs ~ pixels, so 96 px affords ~1.8x the epochs of 128 px and 160 px ~0.65x; context widens only the first
# convolution. Listed in the order they run, the ones the decisions hang on first.
# Until stop 26 the volume feature passed its gradient into the map and segment epochs drew negatives uniformly:
# `BEFORE` spells that out for every BloodNet row measured then (a classifier never reads either key).
# Until stop 32 the U-Net decoder was half the encoder's width: `WIDE`, in every BloodNet row measured then.
WIDE: tuple[str, ...] = ("decoder_width=0.5",)
BEFORE: tuple[str, ...] = ("volume_feature_grad=true", "seg_hard_negatives=0", *WIDE)
AT_128: tuple[str, ...] = (*BEFORE, "image_size=128", "seg_epochs=4", "joint_epochs=3")
RECIPES: tuple[Recipe, ...] = (
    Recipe("default", "the default: BloodNet, 96 px, context 1, 3 balanced segment + 1 head + 6 joint epochs, the "
           "volume feature's gradient kept out of the map, hard negatives 0.5, the decoder at a quarter of the "
           "encoder's channels"),
    Recipe("default-wide", "the default of stops 26-31: the decoder at half the encoder's channels (its 48 px block "
           "was a third of a CPU training step)", WIDE),
    Recipe("seed1", "default-wide again with seed 1: how much of a row is the draw", (*WIDE, "seed=1")),
    Recipe("default-before", "the default until stop 26: the volume feature's gradient into the map, uniform "
           "negatives", BEFORE),
    Recipe("seed1-before", "default-before with seed 1", (*BEFORE, "seed=1")),
    Recipe("128px", "128 px, 4 balanced segment + 1 + 3 (the default before the 96 px runs)", AT_128),
    Recipe("128px-nomask-hu", "128px without masks (weak: pooled map) + Hounsfield prior",
           (*AT_128, "masks=none", "hu_prior=true")),
    Recipe("128px-nomask", "128px without masks (weak: pooled map), no prior", (*AT_128, "masks=none")),
    Recipe("128px-batchdice", "128px with BCE + Dice over the batch", (*AT_128, "seg_loss=bce_batch_dice")),
    Recipe("128px-hardneg", "128px, segment epochs' negatives skewed to hyperdense slices",
           (*AT_128, "seg_hard_negatives=0.5")),  # the later key wins
    Recipe("hardneg", "default-before with the segment epochs' negatives skewed to hyperdense slices",
           ("volume_feature_grad=true", "seg_hard_negatives=0.5", *WIDE)),
    Recipe("seg8", "the default with 8 balanced segment epochs instead of 3 (~+75 s): more for the map to learn",
           (*BEFORE, "seg_epochs=8")),
    Recipe("nomask", "default-before without masks (weak: slice labels through the pooled map), as on the real "
           "data", (*BEFORE, "masks=none")),
    Recipe("nomask-default", "default-wide without masks (weak): are its two keys safe there too?",
           (*WIDE, "masks=none")),
    Recipe("nomask-refine", "nomask, then pseudo-masks from the map itself after the segment epochs",
           (*BEFORE, "masks=none", "weak_refine=true")),
    Recipe("nomask-r4", "nomask with sharper pooling of the map (log-sum-exp r = 4, nearer max pooling)",
           (*BEFORE, "masks=none", "weak_pool_r=4")),
    Recipe("nomask-joint", "nomask trained classification-first: no segment-only or head-only epochs, 7 joint (the "
           "same minutes)", (*BEFORE, "masks=none", "seg_epochs=0", "head_epochs=0", "joint_epochs=7")),
    Recipe("nomask-lambda", "nomask with a lighter weak term in the joint epochs (lambda 0.25 instead of 0.5)",
           (*BEFORE, "masks=none", "joint_lambda=0.25")),
    Recipe("nomask-lambda-refine", "nomask with both: the lighter weak term and pseudo-masks (five folds: the best "
           "weak run; configs/real_rsna_bloodnet.yaml)",
           (*BEFORE, "masks=none", "joint_lambda=0.25", "weak_refine=true")),
    Recipe("volume-nograd", "the volume feature's gradient kept out of the map (only the pixel loss shapes it), "
           "uniform negatives", (*WIDE, "seg_hard_negatives=0")),
    Recipe("tversky", "default-wide with BCE + Tversky per slice (a missed blood pixel costs 0.7, a false one 0.3) "
           "for BCE + Dice: against the small bleeds the map misses", (*WIDE, "seg_loss=bce_tversky")),
    Recipe("default-128px", "default-wide at the embedded set's native 128 px (~1.8x the pixels per bleed, ~1.8x "
           "the minutes): does the map find the small bleeds it misses at 96 px?", (*WIDE, "image_size=128")),
    Recipe("study-balance", "the default with the segment epochs' positives drawn towards an equal share per "
           "study: the small bleeds' few slices trained as often as the large ones' many", ("seg_study_balance=1",)),
    Recipe("joint7", "the default with a 7th joint epoch (~40-65 s of the chain's margin under 15 min)",
           ("joint_epochs=7",)),
    Recipe("lr2e-3", "the default at twice the learning rate (2e-3): the model trains from scratch, never tuned",
           ("lr=0.002",)),
    Recipe("wd0.05", "the default with AdamW's usual weight decay (0.05 for 1e-4): regularization for a small set "
           "trained from scratch", ("weight_decay=0.05",)),
    Recipe("batch16", "the default at batch 16: twice the optimizer steps for the same images", ("batch_size=16",)),
    Recipe("lr2e-3-wd0.05", "both: twice the learning rate and weight decay 0.05", ("lr=0.002", "weight_decay=0.05")),
    Recipe("fullres", "the default with one more decoder block at the input's size, reading the image",
           (*BEFORE, "seg_full_res=true")),
    Recipe("classifier-96px", "plain timm classifier at the default's size and context, 8 epochs (BloodNet's 3 "
           "balanced + 1 + 6 see ~8 epochs of images)", ("arch=classifier", "epochs=8")),
    Recipe("classifier-96px-seed1", "classifier-96px again with seed 1", ("arch=classifier", "epochs=8", "seed=1")),
    Recipe("classifier-96px-12ep", "classifier-96px, 12 epochs (~BloodNet's training minutes)",
           ("arch=classifier", "epochs=12")),
    Recipe("96px-longer", "the default, longer still (4 + 1 + 9)", (*BEFORE, "seg_epochs=4", "joint_epochs=9")),
    Recipe("classifier-c0", "plain timm classifier, 128 px, no context (6 epochs)",
           ("arch=classifier", "image_size=128", "context=0")),
    Recipe("classifier", "plain timm classifier, 128 px, context 1 (6 epochs)", ("arch=classifier", "image_size=128")),
    Recipe("c0-seg2", "last stop's default, segment epochs balanced: 128 px, context 0, 2 + 1 + 3",
           (*BEFORE, "image_size=128", "context=0", "seg_epochs=2", "joint_epochs=3")),
    Recipe("seg2", "128 px, context 1, 2 segment + 1 + 3",
           (*BEFORE, "image_size=128", "seg_epochs=2", "joint_epochs=3")),
    Recipe("c2-seg2", "128 px, context 2 (15 channels), 2 segment + 1 + 3",
           (*BEFORE, "image_size=128", "context=2", "seg_epochs=2", "joint_epochs=3")),
    Recipe("c0-seg2-ema", "c0-seg2 + EMA of the weights",
           (*BEFORE, "image_size=128", "context=0", "seg_epochs=2", "joint_epochs=3", "ema=true")),
    Recipe("c0-96px-long", "c0-seg2 at 96 px, longer (3 + 1 + 6)", (*BEFORE, "context=0")),
    Recipe("c0-160px-short", "c0-seg2 at 160 px, shorter (1 + 1 + 2)",
           (*BEFORE, "context=0", "image_size=160", "seg_epochs=1", "joint_epochs=2")),
)
# Applied after each recipe's own keys in --quick mode.
QUICK: tuple[str, ...] = ("image_size=64", "limit_train_batches=2", "batch_size=16", "epochs=1", "seg_epochs=0",
                          "head_epochs=0", "joint_epochs=1", "num_workers=0", "tta_flip=false")
COLUMNS = ("recipe", "what", "exp", "status", "train_min", "within_budget", "fold0_wll", "auc_any", "study_auc_any",
           "volume_mdape_pct", "volume_mdape_ci95", "volume_spearman", "volume_spearman_ci95", "wall_min")


def study_auc_any(valid: pd.DataFrame, meta: pd.DataFrame) -> float:
    """AUC of a study's max `any` probability over its slices against its label (any slice positive)."""
    joined = valid[[ID_COL, "any"]].merge(meta[[ID_COL, STUDY, "any"]], on=ID_COL, suffixes=("_p", "_y"),
                                          validate="one_to_one")
    if len(joined) != len(valid):
        raise InputError(f"{len(valid) - len(joined)} predicted IDs are not in the training metadata")
    studies = joined.groupby(STUDY)[["any_p", "any_y"]].max()
    if studies["any_y"].nunique() < 2:
        return float("nan")
    return float(roc_auc_score(studies["any_y"], studies["any_p"]))


def run_recipe(recipe: Recipe, data_dir: Path, extra: tuple[str, ...], results_dir: Path) -> dict:
    """Train fold 0 under the recipe (or reuse its saved result) and score it; a bad key is a 'skipped' row."""
    from src.cnn.train import run_fold
    from src.data.cache import load_cache
    from src.data.metadata import load_metadata

    row = {"recipe": recipe.name, "what": recipe.what, "settings": " ".join(recipe.sets) or "(defaults)"}
    try:
        cfg = load_config(None, [*recipe.sets, *extra])
    except InputError as err:
        return {**row, "exp": "", "status": f"skipped: {str(err).split(' (known')[0]}"}
    cfg.data_dir = str(data_dir)
    row["exp"] = cfg.exp_name
    saved = results_dir / f"{cfg.exp_name}.json"
    out_dir = OOF_DIR / cfg.exp_name
    trained = (out_dir / "fold0_metrics.json").exists()
    if trained:
        # Trained before (here or outside the bench, e.g. by run_fold.sh): run_fold returns at once for a finished
        # fold, predicts again one whose predictions came from another select_epoch, and trains on one that early
        # stopping ended; the scores below are then read from its files every time (seconds).
        row = {**(json.loads(saved.read_text()) if saved.exists() else {"status": "ran before"}), **row}
        try:
            run_fold(cfg, 0, data_dir)
        except InputError as err:
            return {**row, "status": f"skipped: {err}"}
    else:
        started = time.perf_counter()
        for split in ("train", "test"):
            load_cache(data_dir, cfg.image_size, split, fmt=cfg.cache_format)
        cache_s = time.perf_counter() - started
        started = time.perf_counter()
        try:
            run_fold(cfg, 0, data_dir)
        except InputError as err:  # e.g. a stale checkpoint under this name: one row lost, not the whole bench
            return {**row, "status": f"skipped: {err}"}
        # wall_min adds the final predictions to the epochs (and is this call's part only).
        row.update(status="ran", wall_min=(time.perf_counter() - started) / 60, cache_min=cache_s / 60)
    # train_min: the logged epoch times, the same for a fold trained here or elsewhere, or killed and resumed.
    row["train_min"] = train_minutes(out_dir, [0])
    metrics = json.loads((out_dir / "fold0_metrics.json").read_text())
    valid = pd.read_csv(out_dir / "fold0_valid.csv", dtype={ID_COL: str})
    row.update(fold0_wll=metrics["weighted_log_loss"], auc_any=metrics["auc"]["any"],
               study_auc_any=study_auc_any(valid, load_metadata(data_dir, "train")))
    row.update(volume_columns(cfg, out_dir, data_dir))
    write_json(row, saved)
    return row


def volume_columns(cfg, out_dir: Path, data_dir: Path) -> dict:
    """Study blood volume against the generator's truth over fold 0's positive studies (evaluate.volumes), with
    bootstrap 95% intervals; nothing for a classifier or data without true volumes."""
    if cfg.arch == "classifier" or not (data_dir / TRUE_VOLUMES_CSV).exists():
        return {}
    summary = run_volumes(out_dir / "fold0_valid.csv", data_dir)  # fold 0 only, whatever other folds exist

    def interval(key: str, fmt: str) -> str:
        ci = summary.get(key)
        return f"{ci[0]:{fmt}}–{ci[1]:{fmt}}" if ci else "n/a"

    return {"volume_mdape_pct": summary.get("mdape_percent"), "volume_mdape_ci95": interval("mdape_ci95", ".0f"),
            "volume_spearman": summary.get("spearman_positive"),
            "volume_spearman_ci95": interval("spearman_ci95", ".2f")}


def machine() -> str:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads; load average (1/5/15 min) {load}")


def table(rows: list[dict], budget_min: float) -> pd.DataFrame:
    frame = pd.DataFrame(rows).reindex(columns=[*COLUMNS[:4], "settings", *COLUMNS[4:]])
    frame["within_budget"] = [bool(minutes <= budget_min) if status.startswith("ran") and minutes == minutes else None
                              for status, minutes in zip(frame["status"], frame["train_min"])]
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = ", ".join(r.name for r in RECIPES)
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"recipes to run ({names}; default: all)")
    parser.add_argument("--budget-min", type=float, default=12.0,
                        help="minutes the training step may take: run_fold.sh 0's 15 min less an assumed 3 min "
                        "for its other stages")
    parser.add_argument("--data", help="data directory (default: the embedded synthetic set)")
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the machinery, measures nothing")
    parser.add_argument("--out", type=Path, default=WORK / "bench", help="where recipes.{json,md} go")
    args = parser.parse_args(argv)
    known = {r.name for r in RECIPES}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        raise InputError(f"--only {', '.join(unknown)}: no such recipe (known: {', '.join(sorted(known))})")
    data_dir = resolve_data_dir(args.data)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: no data; run `bash run_fold.sh 0` or `python -m src.synth {data_dir}` first")
    extra = QUICK if args.quick else ()
    results_dir = args.out / ("recipes-quick" if args.quick else "recipes")
    before = machine()
    rows = []
    for recipe in RECIPES:
        if args.only and recipe.name not in args.only:
            continue
        print(f"[recipes] {recipe.name}: {' '.join(recipe.sets) or '(defaults)'}", flush=True)
        rows.append(run_recipe(recipe, data_dir, extra, results_dir))
    frame = table(rows, args.budget_min)
    header = [
        "QUICK MODE: tiny runs that check the machinery; these numbers are not results." if args.quick else
        f"Fold 0 of `{data_dir.name}`, each recipe trained once (seed 0); budget for the training step "
        f"{args.budget_min:g} min.",
        f"Machine at start: {before}.", f"Machine at end: {machine()}.",
        "Load averages above the core count mean other work shared the cores: times are then upper bounds.",
        "Command: `python bench/recipes.py" + (" --quick" if args.quick else "") + "`.",
    ]
    text = "\n".join(header) + "\n\n" + markdown_table(frame, digits=4)
    print(text)
    write_json({"header": header, "rows": rows}, args.out / ("recipes-quick.json" if args.quick else "recipes.json"))
    write_text(text, args.out / ("recipes-quick.md" if args.quick else "recipes.md"))
    return 0


if __name__ == "__main__":
    from src.errors import run_cli

    run_cli(main)
