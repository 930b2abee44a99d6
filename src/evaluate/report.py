"""OOF evaluation report (metric, AUC CIs, fixed-precision thresholds, curves) and test triage from its thresholds."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from src.atomic import write_csv, write_json, write_text
from src.constants import FOLD_COL, ID_COL, LABELS, SERIES, SLICE_INDEX, STUDY
from src.errors import InputError, run_cli
from src.evaluate.any_variants import any_comparison
from src.evaluate.plots import plot_curves
from src.evaluate.thresholds import (
    ANY_SWEEP,
    DEFAULT_PRECISIONS,
    LEVELS,
    RADNET_RUN,
    aggregate_studies,
    apply_thresholds,
    level_tables,
    threshold_tables,
    thresholds_to_dict,
)
from src.markdown import markdown_table
from src.metric import bootstrap_auc, per_class_log_loss, weighted_log_loss
from src.paths import resolve_data_dir
from src.predictions import load_test_predictions, load_valid_predictions
from src.stage_settings import parse_with_section, section_record

META_COLS = (ID_COL, STUDY, SERIES, SLICE_INDEX)
LEVEL_TITLES = {
    "slice": "Slice level",
    "study_max": "Study level, max over slices (BloodNet)",
    "study_radnet": "Study level, >= {run} consecutive slices pass (RADnet)",
}
MD_THRESHOLD_COLS = [
    "label",
    "target_precision",
    "threshold",
    "precision",
    "recall",
    "specificity",
    "accuracy",
    "f1",
    "support",
    "n_flagged",
]


def join_metadata(preds: pd.DataFrame, meta: pd.DataFrame, what: str, need_labels: bool) -> pd.DataFrame:
    """Predictions joined on ID with study/series/slice order (and the labels as true_<c>); unknown IDs raise."""
    cols = list(META_COLS) + (list(LABELS) if need_labels else [])
    absent = [c for c in cols if c not in meta.columns]
    if absent:
        raise InputError(f"{what} metadata lacks column(s) {', '.join(absent)}")
    keep = meta[cols].rename(columns={c: f"true_{c}" for c in LABELS})
    merged = preds.merge(keep, on=ID_COL, how="left", validate="one_to_one", indicator=True)
    unknown = merged["_merge"] == "left_only"
    if unknown.any():
        raise InputError(
            f"{what}: {int(unknown.sum())} predicted ID(s) not in the metadata, "
            f"e.g. {merged.loc[unknown, ID_COL].iloc[0]} (wrong --data?)"
        )
    return merged.drop(columns="_merge")


def threshold_markdown(table: pd.DataFrame) -> str:
    shown = table[MD_THRESHOLD_COLS].astype(object)
    shown.loc[~table["reachable"].to_numpy(), "threshold"] = "not reachable"
    return markdown_table(shown)


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
) -> dict:
    """Every table (CSV + Markdown), PR/ROC PNGs, thresholds.json and report.md under out_dir; returns a summary."""
    out_dir = Path(out_dir)
    frame = join_metadata(valid, meta_train, "OOF", need_labels=True)
    y = frame[[f"true_{c}" for c in LABELS]].to_numpy(dtype=np.float64)
    p = frame[list(LABELS)].to_numpy(dtype=np.float64)
    studies_id = frame[STUDY].to_numpy()
    md: dict[str, str] = {}

    wll = weighted_log_loss(y, p)
    auc = bootstrap_auc(y, p, groups=studies_id, n_boot=n_boot, seed=seed)
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
    tables = level_tables(y, p, studies, precisions)
    for level in LEVELS:
        part = tables[tables["level"] == level].reset_index(drop=True)
        md[level] = write_table(part, out_dir, f"thresholds_{level}", threshold_markdown(part))
    thresholds = thresholds_to_dict(tables, run)
    write_json(thresholds, out_dir / "thresholds.json")

    j_any = LABELS.index("any")
    sweep = pd.concat(
        [
            threshold_tables(y[:, j_any], p[:, j_any], ANY_SWEEP, ["any"], "slice"),
            threshold_tables(
                studies["true_any"].to_numpy(), studies["max_any"].to_numpy(), ANY_SWEEP, ["any"], "study_max"
            ),
        ],
        ignore_index=True,
    )
    md["sweep"] = write_table(
        sweep,
        out_dir,
        "any_sweep",
        "".join(
            f"\n{LEVEL_TITLES[lv]}:\n\n" + threshold_markdown(sweep[sweep["level"] == lv])
            for lv in ("slice", "study_max")
        ),
    )
    variants = any_comparison(y, p, precision=min(precisions))
    md["variants"] = write_table(variants, out_dir, "any_variants")

    auc_map = dict(zip(auc["label"], auc["auc"]))
    slice_points = tables[tables["level"] == "slice"]
    pngs = plot_curves(y, p, out_dir / "plots", slice_points, auc_map)
    y_st = studies[[f"true_{c}" for c in LABELS]].to_numpy()
    pngs += plot_curves(
        y_st,
        studies[[f"max_{c}" for c in LABELS]].to_numpy(),
        out_dir / "plots",
        tables[tables["level"] == "study_max"],
        None,
        prefix="study_",
    )

    n_studies = len(studies)
    sources = ", ".join(sorted(set(frame["source"]))) if "source" in frame.columns else "the given table"
    text = [
        f"# Evaluation report: {title or out_dir.parent.name}\n",
        (
            f"{len(frame)} OOF images in {n_studies} studies from {sources}. "
            f"Labels and study/series/slice order from the training metadata. Study label = any slice positive.\n"
        ),
        "## Competition metric\n",
        f"Weighted log loss (any x2, subtypes x1, / 7, clip 1e-15): **{wll:.5f}**\n",
        md["folds"],
        (
            f"\nPer class: log loss, ROC AUC and its 95% CI from {n_boot} bootstrap resamples of **studies** "
            f"(seed {seed}; slices of a study are correlated, so resampling slices would understate the width).\n"
        ),
        md["scores"],
        "\n## Operating points at fixed precision\n",
        (
            "Per class and target precision, the threshold with the highest recall whose precision is at least the "
            "target (flag = score >= threshold), chosen on these OOF predictions; `not reachable` when no threshold "
            "gets there. Study level uses the study's max slice probability (BloodNet) or RADnet's rule (positive when "
            f">= {run} consecutive slices, in slice order within the series, pass); both are in thresholds.json.\n"
        ),
    ]
    for level in LEVELS:
        text += [f"\n### {LEVEL_TITLES[level].format(run=run)}\n", md[level]]
    text += [
        "\n## `any`: precision sweep (paper's Table IV)\n",
        md["sweep"],
        f"\n## `any`: learned vs derived from subtypes (paper's Table III), at precision {min(precisions):g}\n",
        "`max_subtypes` = max over the five subtype probabilities; `noisy_or` = 1 - prod(1 - p_subtype).\n\n",
        md["variants"],
        "\n## Curves\n",
        "Slice level, operating points marked:\n\n",
        " ".join(
            f"![{c} PR](plots/pr_{c}.png) ![{c} ROC](plots/roc_{c}.png)"
            for c in LABELS
            if (out_dir / "plots" / f"pr_{c}.png") in pngs
        )
        + "\n",
        "\nStudy level (max rule): "
        + ", ".join(
            f"[{c}](plots/study_pr_{c}.png)" for c in LABELS if (out_dir / "plots" / f"study_pr_{c}.png") in pngs
        )
        + "\n",
        "\n## Files\n",
        (
            "scores, folds, thresholds_{slice,study_max,study_radnet}, any_sweep, any_variants: `.csv` + `.md`; "
            "thresholds.json (apply with `python -m src.evaluate.report --pred DIR --triage-only`); plots/*.png.\n"
        ),
    ]
    # Blank lines around every piece: Markdown needs them before a table and between paragraphs.
    write_text("\n".join(piece.strip("\n") + "\n" for piece in text), out_dir / "report.md")
    return {
        "weighted_log_loss": wll,
        "n_images": len(frame),
        "n_studies": n_studies,
        "thresholds": thresholds,
        "tables": tables,
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
    parser.add_argument("--pred", required=True, help="prediction directory, e.g. oof/<exp>")
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--out", help="report folder (default: <pred>/report)")
    # Defaults from the config's `report` section (--config F / --set report.key=v); these flags override it.
    parser.add_argument("--precisions", help="target precisions, comma-separated")
    parser.add_argument("--n-boot", type=int, help="bootstrap resamples of studies for AUC CIs")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--run", type=int, help="consecutive slices for the RADnet study rule")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--triage", action="store_true", help="after the report, flag the *_test.csv predictions")
    mode.add_argument("--triage-only", action="store_true", help="flag test predictions with a saved thresholds.json")
    args, cfg = parse_with_section(parser, argv, "report")
    pred_dir = Path(args.pred)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: not a directory")
    if args.n_boot < 1 or args.run < 1:
        raise InputError("--n-boot and --run must be >= 1")
    out_dir = Path(args.out) if args.out else pred_dir / "report"
    data_dir = resolve_data_dir(args.data)
    if not args.triage_only:
        summary = build_report(
            load_valid_predictions(pred_dir),
            load_meta(data_dir, "train"),
            out_dir,
            parse_precisions(",".join(map(str, cfg.report.precisions))),
            args.n_boot,
            args.seed,
            args.run,
            title=pred_dir.resolve().name,
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
    return 0


if __name__ == "__main__":
    run_cli(main)
