"""Is one experiment better than another, or is it the draw? Paired study bootstrap over their common OOF rows.

    python -m src.evaluate.compare --pred oof/A oof/B [oof/C ...] [--data DIR] [--n-boot 1000] [--out DIR]

Every experiment is scored on the same OOF images (those all of them predicted), and every bootstrap resample
draws the same studies for all of them (paired), so a difference is measured against the noise it shares: weighted
log loss, slice AUC(any) and study AUC(any) (a study's max `any` against "any slice positive"), each with its 95%
percentile interval; then each experiment against the first (the baseline): the difference, its interval, and the
share of resamples in which it does better (a tie is not better). The resamples measure which studies happened to
be held out, not the training draw: two seeds of one recipe can differ "significantly" here, so compare seeds too.
On fold 0 of the embedded default (28 studies) the intervals are wide; five folds' OOF (~140 studies) is what this
is for.
When every experiment predicted a blood volume (BloodNet) and the data has true volumes (painted masks), a paired
resampling of the positive studies (its own draws, the same for every experiment) compares the study volumes as
`python -m src.evaluate.volumes` scores them: median absolute percentage error and Spearman, and each one's
difference from the first with its P(better).
Writes <out>/compare.{md,json} (default out: oof/compare/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from src.atomic import write_json, write_text
from src.cnn.study_volumes import spearman_rho, study_volumes
from src.constants import ID_COL, LABELS, STUDY, VOLUME_COL
from src.errors import InputError, run_cli
from src.evaluate.crossfit import study_weights
from src.markdown import markdown_table
from src.metric import auc_from_ranks, group_weighted_aucs, per_row_weighted_log_loss
from src.paths import OOF_DIR, TRUE_VOLUMES_CSV, resolve_data_dir
from src.predictions import load_valid_predictions

ANY = "any"
ANY_COL = LABELS.index(ANY)
METRICS = ("weighted_log_loss", "slice_auc_any", "study_auc_any")
VOLUME_METRICS = ("volume_mdape_percent", "volume_spearman")
LOWER_IS_BETTER = {"weighted_log_loss": True, "slice_auc_any": False, "study_auc_any": False,
                   "volume_mdape_percent": True, "volume_spearman": False}


def common_rows(preds: dict[str, pd.DataFrame], meta: pd.DataFrame) -> pd.DataFrame:
    """The OOF images every experiment predicted, with their study and labels (columns <exp>:<label>)."""
    ids = set.intersection(*(set(df[ID_COL]) for df in preds.values()))
    if not ids:
        raise InputError(f"{', '.join(preds)}: no OOF image is predicted by all of them (different folds?)")
    base = meta[[ID_COL, STUDY, *LABELS]][meta[ID_COL].isin(ids)]
    if len(base) != len(ids):
        raise InputError(f"{len(ids) - len(base)} predicted IDs are not in the training metadata (wrong --data?)")
    frame = base.sort_values(ID_COL).reset_index(drop=True)
    for name, df in preds.items():
        part = df.set_index(ID_COL).loc[frame[ID_COL], list(LABELS)]
        frame[[f"{name}:{c}" for c in LABELS]] = part.to_numpy(dtype=np.float64)
    return frame


def bootstrap_scores(frame: pd.DataFrame, names: list[str], n_boot: int, seed: int) -> dict[str, dict]:
    """{exp: {metric: (point, [n_boot] resampled values)}}, every experiment on the same study resamples."""
    codes, counts = study_weights(frame[STUDY].to_numpy(), n_boot, seed)  # [n_boot, n_studies]
    n_studies = counts.shape[1]
    y = frame[list(LABELS)].to_numpy(dtype=np.float64)
    images_per_study = np.bincount(codes, minlength=n_studies).astype(np.float64)
    study_y = np.zeros(n_studies)
    np.maximum.at(study_y, codes, y[:, ANY_COL])
    out = {}
    for name in names:
        p = frame[[f"{name}:{c}" for c in LABELS]].to_numpy(dtype=np.float64)
        loss_per_study = np.bincount(codes, per_row_weighted_log_loss(y, p), minlength=n_studies)
        p_any = p[:, ANY_COL]
        study_p = np.full(n_studies, -np.inf)
        np.maximum.at(study_p, codes, p_any)
        out[name] = {
            "weighted_log_loss": (float(loss_per_study.sum() / images_per_study.sum()),
                                  (counts @ loss_per_study) / (counts @ images_per_study)),
            "slice_auc_any": (float(auc_from_ranks(y[:, ANY_COL], p_any)[0]),
                              group_weighted_aucs(y[:, ANY_COL], p_any, codes, counts)),
            "study_auc_any": (float(auc_from_ranks(study_y, study_p)[0]), auc_from_ranks(study_y, study_p, counts)),
        }
    return out


def bootstrap_volumes(preds: dict[str, pd.DataFrame], ids: pd.Series, meta: pd.DataFrame, true: pd.DataFrame,
                      n_boot: int, seed: int) -> tuple[dict[str, dict], int]:
    """{exp: {metric: (point, [n_boot] resampled values)}} for the study volume over positive studies (the same
    studies, resampled the same way, for every experiment), and how many positive studies there are."""
    per_exp = {}
    for name, df in preds.items():
        rows = df[df[ID_COL].isin(ids)]
        per_exp[name] = study_volumes(rows[[ID_COL, VOLUME_COL]], meta, true).set_index(STUDY).sort_index()
    first = next(iter(per_exp.values()))
    positive = first.index[first["true_volume_mm3"] > 0]
    true_mm3 = first.loc[positive, "true_volume_mm3"].to_numpy(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(positive), (n_boot, len(positive)))
    out = {}
    for name, table in per_exp.items():
        pred = table.loc[positive, "pred_volume_mm3"].to_numpy(np.float64)
        ape = np.abs(pred - true_mm3) / true_mm3 * 100.0
        out[name] = {
            "volume_mdape_percent": (float(np.median(ape)), np.median(ape[picks], axis=1)),
            "volume_spearman": (spearman_rho(pred, true_mm3),
                                np.array([spearman_rho(pred[p], true_mm3[p]) for p in picks])),
        }
    return out, len(positive)


def interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return tuple(float(x) for x in np.percentile(finite, [2.5, 97.5])) if len(finite) else (np.nan, np.nan)


def compare(preds: dict[str, pd.DataFrame], meta: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
            true: pd.DataFrame | None = None) -> dict:
    """Scores with intervals per experiment, and each one's difference from the first (see the module doc); the
    volume figures too when `true` (ID + true volume) is given and every experiment predicted a volume."""
    if len(preds) < 2:
        raise InputError("--pred: give at least two experiments to compare")
    frame = common_rows(preds, meta)
    names = list(preds)
    scores = bootstrap_scores(frame, names, n_boot, seed)
    metrics, n_positive_volumes = METRICS, 0
    if true is not None and all(VOLUME_COL in df for df in preds.values()):
        volumes, n_positive_volumes = bootstrap_volumes(preds, frame[ID_COL], meta, true, n_boot, seed)
        if n_positive_volumes >= 3:
            metrics = METRICS + VOLUME_METRICS
            for name in names:
                scores[name].update(volumes[name])
        else:
            n_positive_volumes = 0  # too few to compare: no volume columns
    rows, diffs = [], []
    for name in names:
        row = {"experiment": name}
        for metric in metrics:
            point, boot = scores[name][metric]
            row[metric] = point
            row[f"{metric}_ci95"] = interval(boot)
        rows.append(row)
    baseline = names[0]
    for name in names[1:]:
        row = {"experiment": name, "against": baseline}
        for metric in metrics:
            delta = scores[name][metric][1] - scores[baseline][metric][1]
            better = delta < 0 if LOWER_IS_BETTER[metric] else delta > 0
            valid = np.isfinite(delta)
            row[f"{metric}_diff"] = scores[name][metric][0] - scores[baseline][metric][0]
            row[f"{metric}_diff_ci95"] = interval(delta)
            row[f"{metric}_p_better"] = float(better[valid].mean()) if valid.any() else np.nan
        diffs.append(row)
    return {"n_images": len(frame), "n_studies": int(frame[STUDY].nunique()),
            "n_positive_studies": int(frame.groupby(STUDY)[ANY].max().sum()), "n_boot": n_boot, "seed": seed,
            "metrics": list(metrics), "n_positive_volume_studies": n_positive_volumes,
            "scores": rows, "differences": diffs}


def as_markdown(result: dict) -> str:
    metrics = result.get("metrics", METRICS)

    def fmt(value: float, ci: tuple[float, float], metric: str) -> str:
        digits = 1 if metric == "volume_mdape_percent" else 4
        return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"

    scores = pd.DataFrame([{"experiment": r["experiment"],
                            **{m: fmt(r[m], r[f"{m}_ci95"], m) for m in metrics}} for r in result["scores"]])
    diffs = pd.DataFrame([{"experiment": r["experiment"], "against": r["against"],
                           **{f"{m} diff": fmt(r[f"{m}_diff"], r[f"{m}_diff_ci95"], m) for m in metrics},
                           **{f"P({m} better)": f"{r[f'{m}_p_better']:.2f}" for m in metrics}}
                          for r in result["differences"]])
    head = (f"{result['n_images']} OOF images common to all, {result['n_studies']} studies "
            f"({result['n_positive_studies']} positive); 95% intervals from {result['n_boot']} paired bootstrap "
            f"resamples of studies (seed {result['seed']}).")
    if result.get("n_positive_volume_studies"):
        head += (f" Volumes: MdAPE (%) and Spearman of the study volume over the {result['n_positive_volume_studies']}"
                 " studies with painted blood, resampled the same way.")
    better = ("lower log loss and volume error, higher AUC and Spearman" if "volume_spearman" in metrics
              else "lower log loss, higher AUC")
    return (head + "\n\n" + markdown_table(scores) + "\n\nEach against the first (difference = it minus the first; "
            f"P(better) = share of resamples where it does better: {better}):\n\n" + markdown_table(diffs) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--pred", nargs="+", required=True, help="prediction folders (oof/<exp>), baseline first")
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples of studies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OOF_DIR / "compare", help="where compare.{md,json} go")
    args = parser.parse_args(argv)
    if args.n_boot < 1:
        raise InputError("--n-boot must be >= 1")
    folders = [Path(f) for f in args.pred]
    if missing := [f for f in folders if not f.is_dir()]:
        raise InputError(f"{missing[0]}: prediction folder not found")
    if len({f.resolve() for f in folders}) < len(folders):
        raise InputError("--pred: the same experiment is given twice")
    # Labelled by folder name; two folders of one name (an experiment and a copy of its earlier predictions) by the
    # paths as given.
    names = [f.resolve().name for f in folders]
    labels = names if len(set(names)) == len(names) else [str(f) for f in folders]
    preds = {label: load_valid_predictions(f) for label, f in zip(labels, folders)}
    from src.data.metadata import load_metadata  # reads the header table: only the CLI needs it

    data_dir = resolve_data_dir(args.data)
    true_csv = data_dir / TRUE_VOLUMES_CSV  # painted masks' volumes: only then are volumes compared
    true = pd.read_csv(true_csv, dtype={ID_COL: str}) if true_csv.exists() else None
    result = compare(preds, load_metadata(data_dir, "train"), args.n_boot, args.seed, true)
    text = as_markdown(result)
    print(text)
    write_text(text, args.out / "compare.md")
    write_json(result, args.out / "compare.json")
    print(f"wrote {args.out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
