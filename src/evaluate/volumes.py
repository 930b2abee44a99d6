"""Blood volume per study: predicted (sum of the slices' mm³) against the true painted volume, with a scatter plot."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from src import paths
from src.atomic import save_png, write_csv, write_json
from src.cnn.study_volumes import MM3_PER_ML, study_volumes, volume_summary
from src.constants import ID_COL, VOLUME_COL
from src.errors import InputError, run_cli
from src.predictions import run_config

PLOT_FLOOR_ML = 1e-3  # log axes cannot show 0: a study with no (predicted or true) blood is drawn at 1 mm³


def read_volume_predictions(pred: Path) -> pd.DataFrame:
    """An experiment folder's OOF files (fold*_valid.csv), or one prediction CSV; they need the volume column."""
    if not pred.exists():
        raise InputError(f"{pred}: prediction folder or file not found")
    files = sorted(pred.glob("fold*_valid.csv")) if pred.is_dir() else [pred]
    if not files:
        raise InputError(f"{pred}: no fold*_valid.csv prediction files in this folder")
    frames = []
    for f in files:
        frame = pd.read_csv(f, dtype={ID_COL: str})
        if VOLUME_COL not in frame:
            raise InputError(f"{f}: no {VOLUME_COL} column (only arch=bloodnet/multitask predict a volume)")
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    if table[ID_COL].duplicated().any():
        raise InputError(f"{pred}: image {table.loc[table[ID_COL].duplicated(), ID_COL].iloc[0]} is predicted twice")
    return table


def plot_volume_scatter(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Log-log predicted vs true study volume (mL); zeros are drawn at the floor, true negatives as crosses."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    true = table["true_volume_ml"].clip(lower=PLOT_FLOOR_ML)
    pred = table["pred_volume_ml"].clip(lower=PLOT_FLOOR_ML)
    pos = table["true_volume_mm3"] > 0
    ax.scatter(true[pos], pred[pos], s=18, alpha=0.8, label=f"positive studies ({int(pos.sum())})")
    if (~pos).any():
        ax.scatter(true[~pos], pred[~pos], s=24, marker="x", color="tab:red",
                   label=f"negative studies ({int((~pos).sum())}), drawn at {PLOT_FLOOR_ML * MM3_PER_ML:g} mm³")
    lo = PLOT_FLOOR_ML / 2
    hi = max(float(true.max()), float(pred.max()), 1.0) * 2
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="predicted = true")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="true blood volume (mL)",
           ylabel="predicted blood volume (mL)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def summary_line(summary: dict) -> str:
    """'MdAPE 48% [24–89], Spearman 0.81 [0.35–0.99] over 11 positive studies' (bootstrap 95% intervals)."""
    def figure(name: str, key: str, ci_key: str, fmt: str, unit: str = "") -> str:
        value, ci = summary.get(key), summary.get(ci_key)
        if value is None:
            return f"{name} n/a"
        interval = f" [{ci[0]:{fmt}}–{ci[1]:{fmt}}]" if ci else ""
        return f"{name} {value:{fmt}}{unit}{interval}"

    return (f"{figure('MdAPE', 'mdape_percent', 'mdape_ci95', '.0f', '%')}, "
            f"{figure('Spearman', 'spearman_positive', 'spearman_ci95', '.2f')} "
            f"over {summary.get('n_positive_studies', 0)} positive studies (95% bootstrap intervals)")


def run_volumes(pred: Path, data_dir: Path | None = None) -> dict:
    """study_volumes.csv, volume_summary.json and (with true volumes) volume_scatter.png under <pred>/bloodnet/.

    For one prediction file (e.g. oof/<exp>/fold0_valid.csv) the names gain its stem (study_volumes_fold0_valid.csv,
    ...), so one fold's figures never overwrite the experiment's, which triage reads."""
    from src.data.metadata import load_metadata

    pred = Path(pred)
    recorded = run_config(pred if pred.is_dir() else pred.parent).get("data_dir")  # the run record's data
    data_dir = Path(data_dir or recorded or paths.resolve_data_dir(None))
    table = read_volume_predictions(pred)
    true_csv = data_dir / paths.TRUE_VOLUMES_CSV
    true = pd.read_csv(true_csv, dtype={ID_COL: str}) if true_csv.exists() else None
    vols = study_volumes(table, load_metadata(data_dir, "train"), true)
    summary = volume_summary(vols)
    out_dir = (pred if pred.is_dir() else pred.parent) / "bloodnet"
    tag = "" if pred.is_dir() else f"_{pred.stem}"
    write_csv(vols, out_dir / f"study_volumes{tag}.csv")
    write_json({"predictions": str(pred), "data_dir": str(data_dir), **summary}, out_dir / f"volume_summary{tag}.json")
    if true is not None:
        title = f"{pred.parent.name}/{pred.name}" if tag else pred.name
        plot_volume_scatter(vols, out_dir / f"volume_scatter{tag}.png", f"{title}\n{summary_line(summary)}")
        print(summary_line(summary))
        if by_type := summary.get("by_type"):
            print("by type: " + "; ".join(f"{kind} MdAPE {v['mdape_percent']:.0f}% over {v['n_studies']} studies "
                                          f"(median {v['median_true_ml']:.1f} mL)" for kind, v in by_type.items()))
        if by_size := summary.get("by_size"):
            print("by size (halves at the median true volume): " + "; ".join(
                f"{half} MdAPE {v['mdape_percent']:.0f}%, predicted/true {v['median_ratio']:.2f} over {v['n_studies']} "
                f"studies (median {v['median_true_ml']:.1f} mL)" for half, v in by_size.items()))
    else:
        print(f"note: {true_csv} not found; no true volumes, no error or scatter plot")
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
                    if k not in ("by_type", "by_size")))
    print(f"wrote {out_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate.volumes", description=__doc__)
    parser.add_argument("--pred", required=True, type=Path, help="oof/<exp> folder (fold*_valid.csv) or one CSV")
    parser.add_argument("--data", help="data directory (default: the one in the run record, then $ICH_DATA, ...)")
    args = parser.parse_args(argv)
    data_dir = paths.resolve_data_dir(args.data) if args.data else None
    if data_dir is not None and not data_dir.exists():
        raise InputError(f"{data_dir}: data directory not found")
    run_volumes(args.pred, data_dir)
    return 0


if __name__ == "__main__":
    run_cli(main)
