"""report.md: the report's prose around its tables, saying how each threshold was chosen and where it was measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from src.constants import LABELS
from src.evaluate.thresholds import LEVELS
from src.markdown import markdown_table

LEVEL_TITLES = {
    "slice": "Slice level",
    "study_max": "Study level, max over slices (BloodNet)",
    "study_radnet": "Study level, >= {run} consecutive slices pass (RADnet)",
}
MD_THRESHOLD_COLS = ["label", "target_precision", "threshold", "precision", "recall", "specificity", "accuracy", "f1",
                     "support", "n_flagged"]


def threshold_markdown(table: pd.DataFrame) -> str:
    shown = table[MD_THRESHOLD_COLS].astype(object)
    shown.loc[~table["reachable"].to_numpy(), "threshold"] = "not reachable"
    return markdown_table(shown)


def leveled_markdown(table: pd.DataFrame, levels: Sequence[str], run: int) -> str:
    """One Markdown table per level of a side_by_side table, each under its title."""
    return "".join(f"\n{LEVEL_TITLES[lv].format(run=run)}:\n\n"
                   + markdown_table(table[table["level"] == lv].drop(columns="level")) for lv in levels)


def deployed_text(thresholds: dict) -> str:
    deployed = thresholds.get("deployed")
    if not deployed or len(deployed.get("members", [])) < 2:
        return ("The test predictions come from one file, not from the fold test files of two folds or more, so "
                "thresholds.json's `threshold` is the one chosen on the OOF rows. Where that file averages several "
                "models (a stacker's CV models), its probabilities may be somewhat shrunk against the OOF ones.\n")
    return (f"The test predictions (and triage) are the {deployed['scale']}; averaging shrinks probabilities, so "
            f"an OOF threshold would mean another operating point there. thresholds.json's `threshold` is therefore "
            f"the ensemble's: {deployed['how']} ({deployed['n_images']} test images, no labels used); "
            "`threshold_oof` is the one in the tables. On unseen data expect at least the held-out precision: the "
            "ensemble flags as many images as one fold model and ranks them at least as well.\n")


def operating_text(how: str, n_rows: int, n_boot: int, seed: int, run: int, thresholds: dict) -> list[str]:
    return [
        "\n## Operating points at fixed precision\n",
        (f"**How each threshold was chosen.** Per class and target precision: on all {n_rows} OOF rows (each "
         "predicted by the fold model that did not train on it), the threshold with the highest recall whose "
         "precision is at least the target (flag = score >= threshold); `not reachable` when none gets there. "
         f"Study level uses the study's max slice probability (BloodNet) or RADnet's rule (positive when >= {run} "
         "consecutive slices, in slice order within the series, pass).\n"),
        ("**Where its figures were measured.** `in-sample` columns: on the same rows that chose the threshold, so "
         "optimistic (the chosen point sits on their noise; worst for classes with few positives). `held-out` "
         f"columns: {how}; each part's threshold is chosen on the other parts' rows and applied to its own, and "
         "precision, recall, specificity and F1 are pooled over the held-out rows, with a 95% CI from "
         f"{n_boot} bootstrap resamples of studies (seed {seed}; thresholds fixed). The held-out precision is the "
         "one to expect on unseen data. `parts reached`: in how many parts the other parts reached the target (a "
         "part where they did not flags nothing).\n"),
        deployed_text(thresholds),
    ]


def report_markdown(title: str, intro: str, wll: float, md: dict[str, str], how: str, n_rows: int, n_boot: int,
                    seed: int, run: int, precisions: Sequence[float], thresholds: dict, pngs: list[Path],
                    plot_dir: Path) -> str:
    text = [
        f"# Evaluation report: {title}\n", intro,
        "## Competition metric\n",
        f"Weighted log loss (any x2, subtypes x1, / 7, clip 1e-15): **{wll:.5f}**\n",
        md["folds"],
        (f"\nPer class: log loss, ROC AUC and its 95% CI from {n_boot} bootstrap resamples of **studies** "
         f"(seed {seed}; slices of a study are correlated, so resampling slices would understate the width).\n"),
        md["scores"],
        *operating_text(how, n_rows, n_boot, seed, run, thresholds),
    ]
    for level in LEVELS:
        text += [f"\n### {LEVEL_TITLES[level].format(run=run)}\n", md[level]]
    text += [
        "\n## `any`: precision sweep (paper's Table IV)\n",
        "Chosen and measured as above: threshold on all OOF rows, in-sample and held-out figures.\n",
        md["sweep"],
        f"\n## `any`: learned vs derived from subtypes (paper's Table III), at precision {min(precisions):g}\n",
        "`max_subtypes` = max over the five subtype probabilities; `noisy_or` = 1 - prod(1 - p_subtype). "
        "In-sample (threshold chosen and measured on all OOF rows).\n\n",
        md["variants"],
        "\n## Curves\n",
        "Slice level, operating points (in-sample) marked:\n\n",
        " ".join(f"![{c} PR](plots/pr_{c}.png) ![{c} ROC](plots/roc_{c}.png)"
                 for c in LABELS if (plot_dir / f"pr_{c}.png") in pngs) + "\n",
        "\nStudy level (max rule): "
        + ", ".join(f"[{c}](plots/study_pr_{c}.png)" for c in LABELS if (plot_dir / f"study_pr_{c}.png") in pngs)
        + "\n",
        "\n## Files\n",
        ("scores, folds, thresholds_{slice,study_max,study_radnet} (in-sample), heldout_thresholds (held-out, all "
         "levels), operating_points (both, side by side), any_sweep, any_sweep_heldout, any_variants: `.csv` + "
         "`.md`; thresholds.json (apply with `python -m src.evaluate.report --pred DIR --triage-only`); "
         "plots/*.png.\n"),
    ]
    # Blank lines around every piece: Markdown needs them before a table and between paragraphs.
    return "\n".join(piece.strip("\n") + "\n" for piece in text)
