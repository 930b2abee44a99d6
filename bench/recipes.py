"""Training recipes on the embedded default (fold 0 unless --folds), each trained once and timed: the README's recipe
table.

    python bench/recipes.py [--only NAME ...] [--folds K ...] [--budget-min 12] [--data DIR] [--quick]

Each recipe is the default config plus a few `--set` overrides (RECIPES below: one line each). It trains fold 0
with `run_fold` (the same code as `python -m src.cnn.train --fold 0`) under its own experiment name, so its
predictions land in oof/<exp>/ beside every other run and on `python -m src.evaluate.experiments`. Scores, from
the fold's OOF file: weighted log loss, slice AUC(any), study AUC(any) from the max `any` over each study's slices;
for BloodNet recipes, the study blood volume's median absolute error and Spearman over the positive studies (as
src.evaluate.volumes scores them). Time (train_min): the sum of the fold's logged epoch times (train + validate), the
same for a fold trained here or before, outside the bench; wall_min adds the final predictions (the cache for a new
image size is built first and timed apart). A fold trained before goes through run_fold again (at once when it is
finished; predicted again when its predictions came from another select_epoch) and is scored from its files, so a
row always shows today's predictions; timings are kept per experiment in work/bench/recipes/, so a killed run
resumes with the next recipe, and a killed fold resumes from its last epoch. A recipe whose key
this checkout lacks (e.g. `ema` before EMA lands) is listed as skipped.
`--folds 0 1 2 3 4` trains each recipe on every listed fold and scores their pooled OOF (fold 0 alone has misled
four times); the recipes that ran are then compared on one paired bootstrap of those folds' studies
(src.evaluate.compare), so a lead shows with the share of resamples it holds in.
`--quick` shrinks every recipe (64 px, two batches, one epoch): a check of the machinery, not a result.
Writes work/bench/recipes.{json,md} (with --folds: recipes-folds01234.{json,md}).
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

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from src.atomic import write_json, write_text
from src.cnn.study_volumes import study_volumes, volume_summary
from src.config import load_config
from src.constants import ID_COL, LABELS, STUDY, VOLUME_COL
from src.errors import InputError
from src.evaluate.compare import as_markdown, compare
from src.evaluate.experiments import train_minutes
from src.markdown import markdown_table
from src.metric import weighted_log_loss
from src.paths import OOF_DIR, TRUE_VOLUMES_CSV, WORK, resolve_data_dir
from src.predictions import read_prediction_csv


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
# Until stop 38 the head read the volume alone, not the pooled map: `PLAIN_HEAD`, in every BloodNet row measured then.
# Until stop 39 `any` read the embedding too, not the map's features alone: `ANY_FROM_HEAD`, likewise.
ANY_FROM_HEAD: tuple[str, ...] = ("any_from_map=false",)
PLAIN_HEAD: tuple[str, ...] = ("map_evidence_r=0", *ANY_FROM_HEAD)
WIDE: tuple[str, ...] = (*PLAIN_HEAD, "decoder_width=0.5")
BEFORE: tuple[str, ...] = ("volume_feature_grad=true", "seg_hard_negatives=0", *WIDE)
AT_128: tuple[str, ...] = (*BEFORE, "image_size=128", "seg_epochs=4", "joint_epochs=3")
RECIPES: tuple[Recipe, ...] = (
    Recipe("default", "the default: BloodNet, 96 px, context 1, 3 balanced segment + 1 head + 6 joint epochs, the "
           "map's gradient kept out of the head's features, hard negatives 0.5, the decoder at a quarter of the "
           "encoder's channels, the head reading the volume and the map pooled by log-sum-exp (r = 8), `any` read "
           "from the map's features alone"),
    Recipe("default-seed1", "the default again with seed 1: the draw", ("seed=1",)),
    Recipe("head-step-lr1e-2-any-map", "the default with the head step at lr 1e-2: head-step-lr1e-2 (the best fold-0 "
           "row of stop 39) on top of `any` from the map", ("head_step_lr=0.01",)),
    Recipe("any-from-head", "the default of stop 38: `any` read from the embedding too, beside the map's features",
           ANY_FROM_HEAD),
    Recipe("any-from-head-seed1", "any-from-head with seed 1", (*ANY_FROM_HEAD, "seed=1")),
    Recipe("dropout0.5", "any-from-head with dropout 0.5 (0.1) on the pooled features, not on the map's: the pooled "
           "map alone ranked slices better than the head that reads it (AUC 0.910 vs 0.890, five folds)",
           (*ANY_FROM_HEAD, "drop_rate=0.5")),
    Recipe("freeze-map", "any-from-head with the head's weights on the map's features kept as the head step fit "
           "them (the encoder frozen then), so the joint step cannot trade the map for the embedding fit to the "
           "training rows", (*ANY_FROM_HEAD, "freeze_map_weights=true")),
    Recipe("freeze-map-seed1", "freeze-map with seed 1", (*ANY_FROM_HEAD, "freeze_map_weights=true", "seed=1")),
    Recipe("head-lr10", "any-from-head with the head at 10x the learning rate: Adam moves a weight ~lr per step, and "
           "the head step's ~90 steps at 1e-3 left the head's weight on the pooled map at 0.07",
           (*ANY_FROM_HEAD, "head_lr_scale=10")),
    Recipe("head-lr10-seed1", "head-lr10 with seed 1", (*ANY_FROM_HEAD, "head_lr_scale=10", "seed=1")),
    Recipe("head-step-lr1e-2", "any-from-head with the head step (the last layer alone, on frozen features) at lr "
           "1e-2, the rest at 1e-3: head-lr10's fit without its 10x head in the joint step",
           (*ANY_FROM_HEAD, "head_step_lr=0.01")),
    Recipe("head-step-lr1e-2-seed1", "head-step-lr1e-2 with seed 1", (*ANY_FROM_HEAD, "head_step_lr=0.01", "seed=1")),
    Recipe("plain-head", "the default until stop 38: the head reads the volume alone (the paper's), not the pooled "
           "map", PLAIN_HEAD),
    Recipe("plain-head-seed1", "plain-head with seed 1", (*PLAIN_HEAD, "seed=1")),
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
    Recipe("study-balance", "plain-head with the segment epochs' positives drawn towards an equal share per "
           "study: the small bleeds' few slices trained as often as the large ones' many",
           (*PLAIN_HEAD, "seg_study_balance=1")),
    Recipe("joint7", "plain-head with a 7th joint epoch (~40-65 s of the chain's margin under 15 min)",
           (*PLAIN_HEAD, "joint_epochs=7")),
    Recipe("lr2e-3", "plain-head at twice the learning rate (2e-3): the model trains from scratch, never tuned",
           (*PLAIN_HEAD, "lr=0.002")),
    Recipe("wd0.05", "plain-head with AdamW's usual weight decay (0.05 for 1e-4): regularization for a small set "
           "trained from scratch", (*PLAIN_HEAD, "weight_decay=0.05")),
    Recipe("batch16", "plain-head at batch 16: twice the optimizer steps for the same images",
           (*PLAIN_HEAD, "batch_size=16")),
    Recipe("lr2e-3-wd0.05", "both: twice the learning rate and weight decay 0.05",
           (*PLAIN_HEAD, "lr=0.002", "weight_decay=0.05")),
    Recipe("batch16-lambda0.75", "batch16 with the map's loss weighted 0.75 in the joint epochs (0.5): batch 16 "
           "classified better over five folds but drew a worse map",
           (*PLAIN_HEAD, "batch_size=16", "joint_lambda=0.75")),
    Recipe("nomask-weak-evidence", "the weak mode as configs/real_rsna_bloodnet.yaml runs it (no masks, pseudo-masks, "
           "the weak term at 0.25 in the joint epochs) with stop 38's head, which reads the pooled map",
           (*ANY_FROM_HEAD, "masks=none", "weak_refine=true", "joint_lambda=0.25")),
    Recipe("nomask-weak-evidence-seed1", "nomask-weak-evidence with seed 1",
           (*ANY_FROM_HEAD, "masks=none", "weak_refine=true", "joint_lambda=0.25", "seed=1")),
    Recipe("nomask-weak-any-map", "nomask-weak-evidence with `any` from the map's features alone (the default since "
           "stop 39, measured with masks only): the weak map is trained as an `any` detector",
           ("masks=none", "weak_refine=true", "joint_lambda=0.25")),
    Recipe("nomask-weak-any-map-seed1", "nomask-weak-any-map with seed 1",
           ("masks=none", "weak_refine=true", "joint_lambda=0.25", "seed=1")),
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
COLUMNS = ("recipe", "what", "exp", "status", "train_min", "within_budget", "wll", "auc_any", "study_auc_any",
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


def pooled_valid(out_dir: Path, folds: tuple[int, ...]) -> pd.DataFrame:
    """The listed folds' OOF predictions, one table (each image is in exactly one fold), read and validated by the
    project's one prediction reader."""
    return pd.concat([read_prediction_csv(out_dir / f"fold{k}_valid.csv") for k in folds], ignore_index=True)


def results_name(exp: str, folds: tuple[int, ...]) -> str:
    """Saved row per experiment and fold set: fold 0 alone keeps the name rows had before `--folds` existed."""
    return exp if folds == (0,) else f"{exp}_folds{'-'.join(map(str, folds))}"


def run_recipe(recipe: Recipe, data_dir: Path, extra: tuple[str, ...], results_dir: Path,
               folds: tuple[int, ...] = (0,)) -> dict:
    """Train the listed folds under the recipe (or reuse them) and score their pooled OOF; a bad key is a 'skipped'
    row."""
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
    saved = results_dir / f"{results_name(cfg.exp_name, folds)}.json"
    out_dir = OOF_DIR / cfg.exp_name
    trained = all((out_dir / f"fold{k}_metrics.json").exists() for k in folds)
    started = time.perf_counter()
    if trained:
        # Trained before (here or outside the bench, e.g. by run_fold.sh): run_fold returns at once for a finished
        # fold, predicts again one whose predictions came from another select_epoch, and trains on one that early
        # stopping ended; the scores below are then read from its files every time (seconds). Only the timing of the
        # call that trained it is kept from the saved row.
        timed = json.loads(saved.read_text()) if saved.exists() else {"status": "ran before"}
        row = {**{k: v for k, v in timed.items() if k in ("status", "wall_min", "cache_min")}, **row}
    else:
        for split in ("train", "test"):
            load_cache(data_dir, cfg.image_size, split, fmt=cfg.cache_format)
        row["cache_min"] = (time.perf_counter() - started) / 60
        started = time.perf_counter()
    try:
        for fold in folds:
            run_fold(cfg, fold, data_dir)
    except InputError as err:  # e.g. a stale checkpoint under this name: one row lost, not the whole bench
        return {**row, "status": f"skipped: {err}"}
    if not trained:  # wall_min adds the final predictions to the epochs (and is this call's part only)
        row.update(status="ran", wall_min=(time.perf_counter() - started) / 60)
    # train_min: the logged epoch times per fold (what one run_fold.sh trains), the same for a fold trained here or
    # elsewhere, or killed and resumed.
    row["train_min"] = train_minutes(out_dir, list(folds)) / len(folds)
    meta, valid = load_metadata(data_dir, "train"), pooled_valid(out_dir, folds)
    row.update(scores(valid, meta))
    row.update(volume_columns(cfg, valid, meta, data_dir))
    write_json(row, saved)
    return row


def scores(valid: pd.DataFrame, meta: pd.DataFrame) -> dict:
    """Weighted log loss and AUC(any) over the pooled OOF images (the metric is a mean over rows, so pooling is
    exact), and the study AUC(any)."""
    labels = valid[[ID_COL]].merge(meta[[ID_COL, *LABELS]], on=ID_COL, how="left", validate="one_to_one")
    if labels[list(LABELS)].isna().any().any():
        raise InputError("predicted IDs are not in the training metadata (wrong --data?)")
    y, p = labels[list(LABELS)].to_numpy(np.float64), valid[list(LABELS)].to_numpy(np.float64)
    any_col = LABELS.index("any")
    return {"wll": weighted_log_loss(y, p), "auc_any": float(roc_auc_score(y[:, any_col], p[:, any_col])),
            "study_auc_any": study_auc_any(valid, meta)}


def true_volumes(data_dir: Path) -> pd.DataFrame | None:
    path = data_dir / TRUE_VOLUMES_CSV
    return pd.read_csv(path, dtype={ID_COL: str}) if path.exists() else None


def volume_columns(cfg, valid: pd.DataFrame, meta: pd.DataFrame, data_dir: Path) -> dict:
    """Study blood volume against the generator's truth over the folds' positive studies (as
    src.evaluate.volumes scores it), with bootstrap 95% intervals; nothing for a classifier or data without true
    volumes."""
    true = true_volumes(data_dir)
    if cfg.arch == "classifier" or true is None or VOLUME_COL not in valid:
        return {}
    summary = volume_summary(study_volumes(valid[[ID_COL, VOLUME_COL]], meta, true))

    def interval(key: str, fmt: str) -> str:
        ci = summary.get(key)
        return f"{ci[0]:{fmt}}–{ci[1]:{fmt}}" if ci else "n/a"

    return {"volume_mdape_pct": summary.get("mdape_percent"), "volume_mdape_ci95": interval("mdape_ci95", ".0f"),
            "volume_spearman": summary.get("spearman_positive"),
            "volume_spearman_ci95": interval("spearman_ci95", ".2f")}


def paired_comparison(rows: list[dict], folds: tuple[int, ...], data_dir: Path) -> dict | None:
    """The recipes that ran, each against the first, on one paired bootstrap of the folds' studies
    (src.evaluate.compare): whether a row's lead is more than which studies the folds hold. None under two."""
    from src.data.metadata import load_metadata

    ran = [r for r in rows if str(r.get("status", "")).startswith("ran")]
    if len(ran) < 2:
        return None
    preds = {r["recipe"]: pooled_valid(OOF_DIR / r["exp"], folds) for r in ran}
    return compare(preds, load_metadata(data_dir, "train"), true=true_volumes(data_dir))


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
    parser.add_argument("--folds", nargs="+", type=int, default=[0], metavar="K",
                        help="folds each recipe trains, scored on their pooled OOF (default: 0; fold 0 alone has "
                        "misled: `--folds 0 1 2 3 4` decides)")
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
    folds = tuple(sorted(set(args.folds)))
    if folds[0] < 0:
        raise InputError(f"--folds {' '.join(map(str, args.folds))}: folds are numbered from 0")
    extra = QUICK if args.quick else ()
    results_dir = args.out / ("recipes-quick" if args.quick else "recipes")
    before = machine()
    rows = []
    for recipe in RECIPES:
        if args.only and recipe.name not in args.only:
            continue
        print(f"[recipes] {recipe.name}: {' '.join(recipe.sets) or '(defaults)'}", flush=True)
        rows.append(run_recipe(recipe, data_dir, extra, results_dir, folds))
    frame = table(rows, args.budget_min)
    which = "Fold 0" if folds == (0,) else f"Folds {', '.join(map(str, folds))} (their OOF pooled)"
    header = [
        f"QUICK MODE: tiny runs that check the machinery; these numbers are not results ({which})." if args.quick else
        f"{which} of `{data_dir.name}`, each recipe trained once (seed 0); train_min per fold; budget for the "
        f"training step {args.budget_min:g} min.",
        f"Machine at start: {before}.", f"Machine at end: {machine()}.",
        "Load averages above the core count mean other work shared the cores: times are then upper bounds.",
        "Command: `python bench/recipes.py" + (" --quick" if args.quick else "")
        + ("" if folds == (0,) else f" --folds {' '.join(map(str, folds))}") + "`.",
    ]
    text = "\n".join(header) + "\n\n" + markdown_table(frame, digits=4)
    paired = paired_comparison(rows, folds, data_dir)
    if paired:
        text += "\n\nPaired study bootstrap of the recipes that ran (src.evaluate.compare):\n\n" + as_markdown(paired)
    print(text)
    stem = ("recipes-quick" if args.quick else "recipes") + ("" if folds == (0,) else
                                                            f"-folds{''.join(map(str, folds))}")
    write_json({"header": header, "rows": rows, "paired": paired}, args.out / f"{stem}.json")
    write_text(text, args.out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    from src.errors import run_cli

    run_cli(main)
