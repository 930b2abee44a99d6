"""BloodNet reports: the Table 3 ablation (classifier / multitask / bloodnet), study blood volumes, mask overlays."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from src import paths
from src.atomic import atomic_path, write_csv, write_json, write_text
from src.config import Config, load_config
from src.constants import ID_COL, LABELS, VOLUME_COL
from src.errors import InputError, run_cli
from src.metrics import auc_from_ranks, bootstrap_auc, weighted_log_loss

# Table 3 of Bar et al. 2019, in its row order.
VARIANTS: dict[str, str] = {
    "classifier": "Single task, classification",
    "multitask": "Multi task, classification and segmentation",
    "bloodnet": "Task dependent, segmentation dependent classification",
}
MM3_PER_ML = 1000.0
PLOT_FLOOR_ML = 1e-3  # log axes cannot show 0: a study with no (predicted or true) blood is drawn at 1 mm³
STUDY = "StudyInstanceUID"


def _save_png(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _json_safe(value):
    """NaN is not JSON: missing numbers are written as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- ablation (Table 3)


def ablation_configs(cfg: Config) -> dict[str, Config]:
    """The three variants of one base config; the classifier gets the same total epochs as the 3-step schedule."""
    budget = cfg.seg_epochs + cfg.head_epochs + cfg.joint_epochs
    # Without an explicit exp each variant keeps its derived name (<arch>-<backbone>-<size>px-c<context>), so a fold
    # that `run_fold.sh` already trained under the same settings is reused rather than trained again.
    return {arch: dataclasses.replace(cfg, arch=arch, exp=f"{cfg.exp}-{arch}" if cfg.exp else "", epochs=budget,
                                      aug=dataclasses.replace(cfg.aug)) for arch in VARIANTS}


def ablation_table(
    preds: dict[str, pd.DataFrame], labels: pd.DataFrame, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Slice-level AUC of `any` with a study-resampling bootstrap CI, study AUC (max over slices), weighted log loss.

    preds: variant -> prediction table (ID + LABELS); labels: ID, StudyInstanceUID + LABELS. Every variant must
    cover the same images; all variants see the same bootstrap resamples (a paired comparison).
    """
    names = list(preds)
    ids = None
    for name, frame in preds.items():
        if ids is not None and set(frame[ID_COL]) != ids:
            raise InputError(f"ablation: variant {name} predicts other images than {names[0]}; re-run the fold")
        ids = set(frame[ID_COL])
    truth = labels[[ID_COL, STUDY, *LABELS]].drop_duplicates(ID_COL)
    truth = truth[truth[ID_COL].isin(ids or set())].sort_values(ID_COL).reset_index(drop=True)
    if len(truth) != len(ids or ()):
        raise InputError(f"ablation: {len(ids or ()) - len(truth)} predicted images have no labels in the metadata")
    probs = {}
    for name, frame in preds.items():
        aligned = truth[[ID_COL]].merge(frame, on=ID_COL, how="left", validate="one_to_one")
        probs[name] = aligned[list(LABELS)].to_numpy(np.float64)
    y = truth[list(LABELS)].to_numpy(np.float64)
    any_j = LABELS.index("any")
    boot = bootstrap_auc(np.repeat(y[:, [any_j]], len(names), axis=1),
                         np.stack([probs[n][:, any_j] for n in names], axis=1),
                         groups=truth[STUDY].to_numpy(), n_boot=n_boot, seed=seed, names=tuple(names))
    study_y = pd.Series(y[:, any_j]).groupby(truth[STUDY]).max()
    rows = []
    for j, name in enumerate(names):
        study_p = pd.Series(probs[name][:, any_j]).groupby(truth[STUDY]).max()
        study_auc = float(auc_from_ranks(study_y.to_numpy(), study_p.loc[study_y.index].to_numpy())[0])
        rows.append({
            "variant": name,
            "network": VARIANTS.get(name, name),
            "auc_any": boot.loc[j, "auc"],
            "ci_low": boot.loc[j, "ci_low"],
            "ci_high": boot.loc[j, "ci_high"],
            "study_auc_any": study_auc,
            "weighted_log_loss": weighted_log_loss(y, probs[name]),
            "n_slices": len(y),
            "n_positive_slices": int(y[:, any_j].sum()),
            "n_studies": int(study_y.size),
            "n_boot_valid": int(boot.loc[j, "n_boot_valid"]),
        })
    return pd.DataFrame(rows)


def ablation_markdown(table: pd.DataFrame, caption: str) -> str:
    """Table 3 as Markdown: one row per variant, AUC with its 95% CI, then the caption."""
    epochs = "epochs_run" in table
    header = "| Network | AUC (any, slices) | 95% CI | study AUC (max) | weighted log loss |"
    lines = [header + " epochs run |" * epochs, "|---|---|---|---|---|" + "---|" * epochs]
    for r in table.itertuples():
        extra = f" {r.epochs_run} |" if epochs else ""
        lines.append(f"| {r.network} (`{r.variant}`) | {r.auc_any:.4f} | [{r.ci_low:.4f}, {r.ci_high:.4f}] "
                     f"| {r.study_auc_any:.4f} | {r.weighted_log_loss:.4f} |{extra}")
    return "\n".join(lines) + f"\n\n{caption}\n"


def ablation_caption(cfg: Config, fold: int, table: pd.DataFrame, n_boot: int) -> str:
    budget = cfg.seg_epochs + cfg.head_epochs + cfg.joint_epochs
    first = table.iloc[0]
    return (
        f"Ablation on fold {fold} ({int(first.n_slices)} validation slices, {int(first.n_positive_slices)} positive, "
        f"{int(first.n_studies)} studies), backbone {cfg.backbone}, {cfg.image_size} px, context {cfg.context}. "
        f"Same epoch budget for every variant: the classifier trains {budget} epochs = segment {cfg.seg_epochs} + "
        f"head {cfg.head_epochs} + joint {cfg.joint_epochs} (λ = 1, 0, {cfg.joint_lambda}) of the two segmentation "
        f"variants (early stopping after {cfg.early_stopping} stale epochs may end a run sooner; 0 = off); each is "
        f"scored with its best-validation checkpoint. AUC CI: percentile bootstrap ({n_boot} resamples of whole "
        f"studies, the same resamples for every variant). Study AUC: max `any` probability over a study's slices, "
        f"as the paper's inference."
    )


def run_ablation(cfg: Config, fold: int, data_dir: Path, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Train (or resume) the three variants on one fold, then write oof/bloodnet_ablation_fold{K}.{csv,md}."""
    from src.metadata import load_metadata
    from src.train import run_fold

    if fold < 0:
        raise InputError(f"--fold {fold}: the ablation needs a held-out fold (0..{cfg.n_folds - 1})")
    preds, epochs_run = {}, {}
    for name, variant in ablation_configs(cfg).items():
        out_dir = run_fold(variant, fold, data_dir)
        path = out_dir / f"fold{fold}_valid.csv"
        if not path.exists():
            raise InputError(f"{path}: validation predictions missing after training {variant.exp_name}")
        preds[name] = pd.read_csv(path, dtype={ID_COL: str})
        epochs_run[name] = len(pd.read_csv(out_dir / f"fold{fold}_epochs.csv"))
    table = ablation_table(preds, load_metadata(data_dir, "train"), n_boot=n_boot, seed=seed)
    table["epochs_run"] = table["variant"].map(epochs_run)
    base = paths.OOF_DIR / f"bloodnet_ablation_fold{fold}"
    write_csv(table, base.with_suffix(".csv"))
    write_text(ablation_markdown(table, ablation_caption(cfg, fold, table, n_boot)), base.with_suffix(".md"))
    print(table.to_string(index=False))
    print(f"wrote {base}.csv and {base}.md")
    return table


# ---------------------------------------------------------------- study volumes


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


def study_volumes(pred: pd.DataFrame, meta: pd.DataFrame, true: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per study: slice counts, predicted (and true) blood volume in mm³ and mL, absolute % error."""
    df = pred[[ID_COL, VOLUME_COL]].merge(meta[[ID_COL, STUDY, "any"]], on=ID_COL, how="left", validate="one_to_one")
    if df[STUDY].isna().any():
        raise InputError(f"{int(df[STUDY].isna().sum())} predicted images are not in the train metadata "
                         f"(e.g. {df.loc[df[STUDY].isna(), ID_COL].iloc[0]}): wrong --data?")
    agg = {"n_slices": (ID_COL, "size"), "n_positive_slices": ("any", "sum"), "pred_volume_mm3": (VOLUME_COL, "sum")}
    if true is not None:
        t = true[[ID_COL, VOLUME_COL]].rename(columns={VOLUME_COL: "true_mm3"})
        df = df.merge(t, on=ID_COL, how="left", validate="one_to_one")
        if df["true_mm3"].isna().any():
            raise InputError(f"{paths.TRUE_VOLUMES_CSV}: {int(df['true_mm3'].isna().sum())} predicted images lack a "
                             "true volume")
        agg["true_volume_mm3"] = ("true_mm3", "sum")
    table = df.groupby(STUDY, sort=True).agg(**agg).reset_index()
    table["n_positive_slices"] = table["n_positive_slices"].astype(int)
    table["pred_volume_ml"] = table["pred_volume_mm3"] / MM3_PER_ML
    if true is not None:
        table["true_volume_ml"] = table["true_volume_mm3"] / MM3_PER_ML
        positive = table["true_volume_mm3"] > 0
        err = (table["pred_volume_mm3"] - table["true_volume_mm3"]).abs() / table["true_volume_mm3"].where(positive)
        table["abs_pct_error"] = 100.0 * err
    return table


def volume_summary(table: pd.DataFrame) -> dict:
    """Median absolute percentage error over positive studies (true volume > 0), and the false blood on negatives."""
    out = {"n_studies": len(table), "median_pred_ml": float(table["pred_volume_ml"].median())}
    if "true_volume_mm3" not in table:
        return {k: _json_safe(v) for k, v in out.items()}
    pos = table[table["true_volume_mm3"] > 0]
    neg = table[table["true_volume_mm3"] <= 0]
    out.update({
        "n_positive_studies": len(pos),
        "mdape_percent": float(pos["abs_pct_error"].median()) if len(pos) else float("nan"),
        "spearman_positive": float(pos["pred_volume_mm3"].corr(pos["true_volume_mm3"], method="spearman"))
        if len(pos) > 1 else float("nan"),
        "n_negative_studies": len(neg),
        "median_pred_ml_negative_studies": float(neg["pred_volume_ml"].median()) if len(neg) else float("nan"),
    })
    return {k: _json_safe(v) for k, v in out.items()}


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
           ylabel="predicted blood volume (mL)", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return _save_png(fig, path)


def _run_data_dir(pred: Path) -> Path | None:
    """The data directory recorded in the experiment's run record, if any."""
    import json

    folder = pred if pred.is_dir() else pred.parent
    for record in sorted(folder.glob("*_run.json")):
        try:
            data_dir = json.loads(record.read_text()).get("config", {}).get("data_dir")
        except (OSError, ValueError):
            continue
        if data_dir:
            return Path(data_dir)
    return None


def run_volumes(pred: Path, data_dir: Path | None = None) -> dict:
    """study_volumes.csv, volume_summary.json and (with true volumes) volume_scatter.png under <pred>/bloodnet/."""
    from src.metadata import load_metadata

    pred = Path(pred)
    data_dir = Path(data_dir) if data_dir else (_run_data_dir(pred) or paths.resolve_data_dir(None))
    table = read_volume_predictions(pred)
    true_csv = data_dir / paths.TRUE_VOLUMES_CSV
    true = pd.read_csv(true_csv, dtype={ID_COL: str}) if true_csv.exists() else None
    vols = study_volumes(table, load_metadata(data_dir, "train"), true)
    summary = volume_summary(vols)
    out_dir = (pred if pred.is_dir() else pred.parent) / "bloodnet"
    write_csv(vols, out_dir / "study_volumes.csv")
    write_json({"predictions": str(pred), "data_dir": str(data_dir), **summary}, out_dir / "volume_summary.json")
    if true is not None:
        mdape = summary.get("mdape_percent")
        title = f"{pred.name}: MdAPE {mdape:.1f}% over positive studies" if mdape is not None else pred.name
        plot_volume_scatter(vols, out_dir / "volume_scatter.png", title)
    else:
        print(f"note: {true_csv} not found; no true volumes, no error or scatter plot")
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print(f"wrote {out_dir}")
    return summary


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.bloodnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    abl = sub.add_parser("ablation", help="train classifier/multitask/bloodnet on one fold; write the Table 3 analogue")
    abl.add_argument("--fold", type=int, required=True)
    abl.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    abl.add_argument("--config", help="YAML config overrides shared by the three variants (e.g. bloodnet.yaml)")
    abl.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    abl.add_argument("--n-boot", type=int, default=1000)
    abl.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    vol = sub.add_parser("volumes", help="study-level predicted (and true) blood volumes from prediction files")
    vol.add_argument("--pred", required=True, type=Path, help="oof/<exp> folder (fold*_valid.csv) or one CSV")
    vol.add_argument("--data", help="data directory (default: the one in the run record, then $ICH_DATA, ...)")
    ovl = sub.add_parser("overlays", help="predicted vs true mask PNGs for a few validation studies")
    ovl.add_argument("--exp", required=True)
    ovl.add_argument("--fold", type=int, required=True)
    ovl.add_argument("--data", help="data directory (default: the one in the checkpoint's config)")
    ovl.add_argument("--n-studies", type=int, default=3, help="most positive studies (one negative is added)")
    ovl.add_argument("--n-slices", type=int, default=3, help="slices drawn per study")
    ovl.add_argument("--window", choices=("brain", "subdural"), default="brain")
    args = parser.parse_args(argv)
    data_dir = paths.resolve_data_dir(args.data) if args.data else None
    if data_dir is not None and not data_dir.exists():
        raise InputError(f"{data_dir}: data directory not found")
    if args.command == "ablation":
        if args.n_boot < 0:
            raise InputError(f"--n-boot {args.n_boot}: must be >= 0")
        cfg = load_config(args.config, args.sets)
        data_dir = data_dir or paths.resolve_data_dir(cfg.data_dir or None)
        if not data_dir.exists():
            raise InputError(f"{data_dir}: data directory not found (set --data or ICH_DATA)")
        cfg.data_dir = str(data_dir)  # as src.train does, so a fold started there resumes here
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        run_ablation(cfg, args.fold, data_dir, args.n_boot, args.seed)
    elif args.command == "volumes":
        run_volumes(args.pred, data_dir)
    else:
        if args.n_studies < 1 or args.n_slices < 1:
            raise InputError("--n-studies and --n-slices must be at least 1")
        from src.overlays import run_overlays  # here, not at the top: src.overlays imports this module

        run_overlays(args.exp, args.fold, data_dir, args.n_studies, args.n_slices, args.window)
    return 0


if __name__ == "__main__":
    run_cli(main)
