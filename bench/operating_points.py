"""Do the report's operating points hold on unseen data? In-sample vs held-out vs the truth, on simulated scores.

src.evaluate.simulate draws OOF rows of K fold models and a large fresh labelled test set from one known
distribution. Per scenario and target precision, over many seeds: the in-sample precision (threshold chosen and
measured on all OOF rows), the held-out (cross-fitted) precision and how often its 95% CI covers the target and
the truth, the truth (one fold model at the chosen threshold on the fresh studies), and the fold ensemble on the
fresh studies at the deployed (rank-matched) threshold and at the OOF threshold as is. Results depend on the seeds
only, not on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src import paths
from src.atomic import write_json, write_text
from src.constants import FOLD_COL, PATIENT, STUDY
from src.errors import run_cli
from src.evaluate.crossfit import heldout_parts, heldout_tables
from src.evaluate.deploy import ensemble_threshold
from src.evaluate.simulate import LABEL, simulate_cv
from src.evaluate.thresholds import threshold_tables
from src.markdown import markdown_table

SCENARIOS = {"common class (15% of studies)": 0.15, "rare class (3% of studies)": 0.03}
TARGETS = (0.7, 0.8, 0.9)


def precision_recall(flags: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    tp = float((flags & y).sum())
    return (tp / flags.sum() if flags.sum() else np.nan), tp / y.sum()


def one_seed(prevalence: float, seed: int, n_studies: int, n_test: int, n_boot: int) -> list[dict]:
    oof, members, test = simulate_cv(n_studies=n_studies, n_test_studies=n_test, prevalence=prevalence, seed=seed)
    y, s = oof[f"true_{LABEL}"].to_numpy(), oof[LABEL].to_numpy()
    _, part = heldout_parts(oof[FOLD_COL].to_numpy(), oof[PATIENT].to_numpy())
    chosen = threshold_tables(y, s, TARGETS, [LABEL])
    held = heldout_tables(y, s, part, oof[STUDY].to_numpy(), TARGETS, [LABEL], n_boot=n_boot, seed=seed)
    scores = np.stack([m[LABEL].to_numpy() for m in members.values()])
    ensemble = scores.mean(axis=0)
    y_test = test[f"true_{LABEL}"].to_numpy().astype(bool)
    rows = []
    for c, h in zip(chosen.itertuples(), held.itertuples()):
        row = {"target": c.target_precision, "in_sample": c.precision, "heldout": h.precision,
               "target_in_ci": h.precision_lo <= c.target_precision <= h.precision_hi}
        if c.reachable:
            truth, _ = precision_recall(scores >= c.threshold, np.broadcast_to(y_test, scores.shape))
            deployed = ensemble_threshold(c.threshold, list(scores), ensemble)
            row.update({"truth": truth, "truth_in_ci": h.precision_lo <= truth <= h.precision_hi})
            row["deployed_precision"], row["deployed_recall"] = precision_recall(ensemble >= deployed, y_test)
            row["as_is_precision"], row["as_is_recall"] = precision_recall(ensemble >= c.threshold, y_test)
        rows.append(row)
    return rows


def run(n_seeds: int, n_studies: int, n_test: int, n_boot: int) -> pd.DataFrame:
    parts = []
    for name, prevalence in SCENARIOS.items():
        rows = [r | {"seed": seed} for seed in range(n_seeds) for r in one_seed(prevalence, seed, n_studies, n_test,
                                                                                  n_boot)]
        parts.append(pd.DataFrame(rows).assign(scenario=name))
    return pd.concat(parts, ignore_index=True)


def summarise(raw: pd.DataFrame) -> pd.DataFrame:
    grouped = raw.groupby(["scenario", "target"], sort=False)
    table = grouped.agg(
        seeds=("seed", "size"), in_sample=("in_sample", "mean"), heldout=("heldout", "mean"),
        target_in_ci=("target_in_ci", "mean"), truth=("truth", "mean"), truth_in_ci=("truth_in_ci", "mean"),
        ensemble_deployed_p=("deployed_precision", "mean"), ensemble_deployed_r=("deployed_recall", "mean"),
        ensemble_as_is_p=("as_is_precision", "mean"), ensemble_as_is_r=("as_is_recall", "mean"),
    ).reset_index()
    return table.round(3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--studies", type=int, default=300, help="OOF studies per seed (8 slices each)")
    parser.add_argument("--test-studies", type=int, default=4000, help="fresh labelled studies per seed")
    parser.add_argument("--n-boot", type=int, default=500)
    args = parser.parse_args(argv)
    table = summarise(run(args.seeds, args.studies, args.test_studies, args.n_boot))
    out = paths.WORK / "bench"
    write_json({"args": vars(args), "rows": table.to_dict(orient="records")}, out / "operating_points.json")
    text = (f"# Operating points on simulated scores ({args.seeds} seeds, {args.studies} OOF studies, "
            f"{args.test_studies} fresh studies per seed)\n\nMeans over seeds; `*_in_ci`: share of seeds whose "
            "held-out 95% CI covers the target / the truth.\n\n" + markdown_table(table))
    write_text(text, out / "operating_points.md")
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main)
