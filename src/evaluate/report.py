"""OOF evaluation report (metric, AUC CIs, fixed-precision thresholds, curves) and test triage from its thresholds."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from src.atomic import write_csv, write_json, write_text
from src.constants import FOLD_COL, ID_COL, LABELS, PATIENT, SERIES, SLICE_INDEX, STUDY
from src.cpus import machine_threads
from src.errors import InputError, run_cli
from src.evaluate.any_variants import any_comparison
from src.evaluate.deploy import deploy_thresholds
from src.evaluate.operating import attach_heldout, operating_points, side_by_side
from src.evaluate.plots import plot_curves
from src.evaluate.report_text import LEVEL_TITLES, leveled_markdown, report_markdown, threshold_markdown
from src.evaluate.thresholds import (
    DEFAULT_PRECISIONS,
    LEVELS,
    RADNET_RUN,
    aggregate_studies,
    apply_thresholds,
    thresholds_to_dict,
)
from src.markdown import markdown_table
from src.metric import bootstrap_auc, per_class_log_loss, weighted_log_loss
from src.paths import resolve_data_dir
from src.predictions import load_fold_test_predictions, load_test_predictions, load_valid_predictions
from src.stage_settings import parse_with_section, section_record

META_COLS = (ID_COL, STUDY, SERIES, SLICE_INDEX)
OPTIONAL_META = (PATIENT,)  # held-out parts group patients; without it, studies stand in for them


def join_metadata(preds: pd.DataFrame, meta: pd.DataFrame, what: str, need_labels: bool) -> pd.DataFrame:
    """Predictions joined on ID with study/series/slice order (and the labels as true_<c>); unknown IDs raise."""
    cols = list(META_COLS) + (list(LABELS) if need_labels else [])
    absent = [c for c in cols if c not in meta.columns]
    if absent:
        raise InputError(f"{what} metadata lacks column(s) {', '.join(absent)}")
    cols += [c for c in OPTIONAL_META if c in meta.columns and c not in preds.columns]
    keep = meta[cols].rename(columns={c: f"true_{c}" for c in LABELS})
    merged = preds.merge(keep, on=ID_COL, how="left", validate="one_to_one", indicator=True)
    unknown = merged["_merge"] == "left_only"
    if unknown.any():
        raise InputError(
            f"{what}: {int(unknown.sum())} predicted ID(s) not in the metadata, "
            f"e.g. {merged.loc[unknown, ID_COL].iloc[0]} (wrong --data?)"
        )
    return merged.drop(columns="_merge")


def write_table(df: pd.DataFrame, out_dir: Path, stem: str, markdown: str | None = None) -> str:
    """CSV + Markdown twins; returns the Markdown for report.md."""
    write_csv(df, out_dir / f"{stem}.csv")
    markdown = markdown if markdown is not None else markdown_table(df)
    write_text(markdown, out_dir / f"{stem}.md")
    return markdown


def build_report(
    valid: pd.DataFrame,
    meta_train: pd.DataFrame,
    out_dir: str | Path,
    precisions: Sequence[float] = DEFAULT_PRECISIONS,
    n_boot: int = 1000,
    seed: int = 0,
    run: int = RADNET_RUN,
    title: str = "",
    test_members: dict[int, pd.DataFrame] | None = None,
    meta_test: pd.DataFrame | None = None,
) -> dict:
    """Every table (CSV + Markdown), PR/ROC PNGs, thresholds.json and report.md under out_dir; returns a summary.

    test_members (fold -> that fold model's test predictions) with meta_test move the saved thresholds to the
    scale of their mean, the model test and triage use (src/evaluate/deploy.py)."""
    out_dir = Path(out_dir)
    frame = join_metadata(valid, meta_train, "OOF", need_labels=True)
    y = frame[[f"true_{c}" for c in LABELS]].to_numpy(dtype=np.float64)
    p = frame[list(LABELS)].to_numpy(dtype=np.float64)
    md: dict[str, str] = {}

    wll = weighted_log_loss(y, p)
    auc = bootstrap_auc(y, p, groups=frame[STUDY].to_numpy(), n_boot=n_boot, seed=seed)
    scores = auc.assign(log_loss=per_class_log_loss(y, p))[
        ["label", "log_loss", "auc", "ci_low", "ci_high", "n_pos", "n_neg", "n_groups", "n_boot_valid"]
    ]
    md["scores"] = write_table(scores, out_dir, "scores")
    folds = [{"fold": "all", "n_images": len(frame), "weighted_log_loss": wll}]
    if FOLD_COL in frame.columns:
        for fold, part in frame.groupby(FOLD_COL, sort=True):
            idx = part.index.to_numpy()
            folds.append(
                {"fold": str(fold), "n_images": len(idx), "weighted_log_loss": weighted_log_loss(y[idx], p[idx])}
            )
    md["folds"] = write_table(pd.DataFrame(folds), out_dir, "folds")

    studies = aggregate_studies(frame, p, y, run)
    ops = operating_points(frame, y, p, studies, precisions, n_boot, seed)
    tables = ops.in_sample
    for level in LEVELS:
        part = tables[tables["level"] == level].reset_index(drop=True)
        write_table(part, out_dir, f"thresholds_{level}", threshold_markdown(part))
    write_table(ops.heldout, out_dir, "heldout_thresholds")
    both = pd.concat([side_by_side(tables[tables["level"] == lv], ops.heldout).assign(level=lv) for lv in LEVELS],
                     ignore_index=True)
    md.update({lv: markdown_table(both[both["level"] == lv].drop(columns="level")) for lv in LEVELS})
    write_table(both, out_dir, "operating_points", leveled_markdown(both, LEVELS, run))
    thresholds = attach_heldout(thresholds_to_dict(tables, run), ops.heldout, ops.how, len(frame))
    if test_members and meta_test is not None:
        test_frame = join_metadata(next(iter(test_members.values()))[[ID_COL]], meta_test, "test", False)
        thresholds = deploy_thresholds(thresholds, test_members, test_frame)
    write_json(thresholds, out_dir / "thresholds.json")

    write_table(ops.sweep, out_dir, "any_sweep", "".join(
        f"\n{LEVEL_TITLES[lv]}:\n\n" + threshold_markdown(ops.sweep[ops.sweep["level"] == lv])
        for lv in ("slice", "study_max")))
    write_table(ops.sweep_heldout, out_dir, "any_sweep_heldout")
    sweep_both = pd.concat([side_by_side(ops.sweep[ops.sweep["level"] == lv], ops.sweep_heldout).assign(level=lv)
                            for lv in ("slice", "study_max")], ignore_index=True)
    md["sweep"] = leveled_markdown(sweep_both, ("slice", "study_max"), run)
    variants = any_comparison(y, p, precision=min(precisions))
    md["variants"] = write_table(variants, out_dir, "any_variants")

    auc_map = dict(zip(auc["label"], auc["auc"]))
    plot_dir = out_dir / "plots"
    pngs = plot_curves(y, p, plot_dir, tables[tables["level"] == "slice"], auc_map)
    y_st = studies[[f"true_{c}" for c in LABELS]].to_numpy()
    pngs += plot_curves(y_st, studies[[f"max_{c}" for c in LABELS]].to_numpy(), plot_dir,
                        tables[tables["level"] == "study_max"], None, prefix="study_")

    sources = ", ".join(sorted(set(frame["source"]))) if "source" in frame.columns else "the given table"
    intro = (f"{len(frame)} OOF images in {len(studies)} studies from {sources}. Labels and study/series/slice order "
             "from the training metadata. Study label = any slice positive.\n")
    write_text(report_markdown(title or out_dir.parent.name, intro, wll, md, ops.how, len(frame), n_boot, seed, run,
                               precisions, thresholds, pngs, plot_dir), out_dir / "report.md")
    return {
        "weighted_log_loss": wll,
        "n_images": len(frame),
        "n_studies": len(studies),
        "thresholds": thresholds,
        "tables": tables,
        "heldout": ops.heldout,
        "auc": auc,
        "n_plots": len(pngs),
    }


def triage(test: pd.DataFrame, meta_test: pd.DataFrame, thresholds: dict, out_dir: str | Path) -> dict:
    """Apply saved thresholds to test predictions: triage_images.csv and triage_studies.csv under out_dir."""
    out_dir = Path(out_dir)
    frame = join_metadata(test, meta_test, "test", need_labels=False)
    images, studies = apply_thresholds(frame, frame[list(LABELS)].to_numpy(dtype=np.float64), thresholds)
    write_csv(images, out_dir / "triage_images.csv")
    write_csv(studies, out_dir / "triage_studies.csv")
    flagged = {col: int(studies[col].sum()) for col in studies.columns if col.startswith(("max_any_p", "radnet_any_p"))}
    return {"n_images": len(images), "n_studies": len(studies), "flagged_studies": flagged}


def parse_precisions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise InputError(f"--precisions {text!r}: expected comma-separated numbers like 0.7,0.8,0.9") from err
    if not values or any(not 0 < v <= 1 for v in values):
        raise InputError(f"--precisions {text!r}: every target must be in (0, 1]")
    return sorted(set(values))


def load_meta(data_dir: Path, split: str) -> pd.DataFrame:
    from src.data.metadata import load_metadata  # heavy (reads or builds the header table); only the CLI needs it

    return load_metadata(data_dir, split)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate.report", description=__doc__)
    parser.add_argument("--pred", required=True, nargs="+", help="prediction directories, e.g. oof/<exp> (several: "
                        "reported side by side, one process per CPU)")
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--out", help="report folder (default: <pred>/report; one --pred only)")
    # Defaults from the config's `report` section (--config F / --set report.key=v); these flags override it.
    parser.add_argument("--precisions", help="target precisions, comma-separated")
    parser.add_argument("--n-boot", type=int, help="bootstrap resamples of studies for AUC CIs")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--run", type=int, help="consecutive slices for the RADnet study rule")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--triage", action="store_true", help="after the report, flag the *_test.csv predictions")
    mode.add_argument("--triage-only", action="store_true", help="flag test predictions with a saved thresholds.json")
    args, cfg = parse_with_section(parser, argv, "report")
    pred_dirs = [Path(p) for p in args.pred]
    for pred_dir in pred_dirs:
        if not pred_dir.is_dir():
            raise InputError(f"{pred_dir}: not a directory")
    if args.out and len(pred_dirs) > 1:
        raise InputError(f"--out names one report folder; --pred gave {len(pred_dirs)} directories")
    if args.n_boot < 1 or args.run < 1:
        raise InputError("--n-boot and --run must be >= 1")
    data_dir = resolve_data_dir(args.data)
    workers = min(len(pred_dirs), machine_threads())
    if workers < 2:
        for pred_dir in pred_dirs:
            report_one(pred_dir, args, cfg, data_dir)
        return 0
    # One process each (numpy and matplotlib hold the GIL for much of a report); spawned, not forked, as elsewhere.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for done in [pool.submit(report_one, pred_dir, args, cfg, data_dir) for pred_dir in pred_dirs]:
            done.result()
    return 0


def report_one(pred_dir: Path, args: argparse.Namespace, cfg, data_dir: Path) -> None:
    """The report (and triage, when asked) of one prediction directory, as `main` parsed the flags."""
    out_dir = Path(args.out) if args.out else pred_dir / "report"
    if not args.triage_only:
        valid = load_valid_predictions(pred_dir)
        members = load_fold_test_predictions(pred_dir)  # the fold models test and triage average
        summary = build_report(
            valid,
            load_meta(data_dir, "train"),
            out_dir,
            parse_precisions(",".join(map(str, cfg.report.precisions))),
            args.n_boot,
            args.seed,
            args.run,
            title=pred_dir.resolve().name,
            test_members=members,
            meta_test=load_meta(data_dir, "test") if len(members) >= 2 else None,
        )
        print(
            f"{summary['n_images']} OOF images, {summary['n_studies']} studies: weighted log loss "
            f"{summary['weighted_log_loss']:.5f}; report in {out_dir / 'report.md'}"
        )
    if args.triage or args.triage_only:
        json_path = out_dir / "thresholds.json"
        if not json_path.exists():
            raise InputError(f"{json_path}: not found; run `python -m src.evaluate.report --pred {pred_dir}` first")
        try:
            thresholds = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{json_path}: not valid JSON ({err})") from err
        result = triage(load_test_predictions(pred_dir), load_meta(data_dir, "test"), thresholds, out_dir)
        print(
            f"triage: {result['n_images']} images, {result['n_studies']} studies; flagged studies "
            + ", ".join(f"{k}={v}" for k, v in result["flagged_studies"].items())
            + f"; written to {out_dir / 'triage_studies.csv'} and triage_images.csv"
        )
    write_json(section_record(cfg, "report", pred=str(pred_dir), data_dir=str(data_dir)),
               out_dir / "report_settings.json")


if __name__ == "__main__":
    run_cli(main)
