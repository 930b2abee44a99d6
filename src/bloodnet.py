"""BloodNet reports: the Table 3 ablation (classifier / multitask / bloodnet), study blood volumes, mask overlays."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from src import outputs, paths
from src.atomic import atomic_path, write_csv, write_json, write_text
from src.config import AugConfig, Config, load_config
from src.constants import FOLD_COL, ID_COL, LABELS, VOLUME_COL
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
    base = cfg.exp or f"ablation-{cfg.backbone}-{cfg.image_size}px-c{cfg.context}"
    return {arch: dataclasses.replace(cfg, arch=arch, exp=f"{base}-{arch}", epochs=budget,
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
            raise InputError(f"{path}: validation predictions missing after training {variant.exp}")
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


# ---------------------------------------------------------------- checkpoints and overlays


def config_from_dict(values: dict) -> Config:
    """A Config from dataclasses.asdict output; keys this code no longer knows are dropped with a note."""
    known = {f.name for f in dataclasses.fields(Config)}
    aug_known = {f.name for f in dataclasses.fields(AugConfig)}
    dropped = sorted(set(values) - known) + [f"aug.{k}" for k in sorted(set(values.get("aug") or {}) - aug_known)]
    if dropped:
        print(f"note: checkpoint config keys not in this version, ignored: {', '.join(dropped)}", file=sys.stderr)
    kwargs = {k: v for k, v in values.items() if k in known and k != "aug"}
    if "class_weights" in kwargs:
        kwargs["class_weights"] = tuple(kwargs["class_weights"])
    aug = AugConfig(**{k: v for k, v in (values.get("aug") or {}).items() if k in aug_known})
    return Config(**kwargs, aug=aug)


def load_model(checkpoint_path: str | os.PathLike) -> tuple[nn.Module, Config]:
    """Rebuild the model a checkpoint was trained as (its own config), load the weights, return it in eval mode."""
    from src.model import build_model

    path = Path(checkpoint_path)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file is a user-facing problem, not a traceback
        raise InputError(f"{path}: cannot read checkpoint ({err})") from err
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise InputError(f"{path}: not a training checkpoint (expects 'config' and 'model' entries)")
    cfg = config_from_dict(state["config"])
    # The weights come from the checkpoint: never re-read the pretrained file (it may be gone on this machine).
    model = build_model(dataclasses.replace(cfg, pretrained_path=""))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise InputError(f"{path}: weights do not fit {cfg.arch}/{cfg.backbone} ({str(err).splitlines()[0]})") from err
    return model.eval(), cfg


def pick_studies(meta: pd.DataFrame, n_positive: int, oof: pd.DataFrame | None = None) -> list[tuple[str, str]]:
    """(study, why) for the n studies with most positive slices, plus one negative: the one with the highest
    predicted max p(any) in the OOF table when given (the hardest), else the first by id."""
    per = meta.groupby(STUDY)["any"].agg(["sum", "size"]).reset_index()
    positives = per[per["sum"] > 0].sort_values(["sum", STUDY], ascending=[False, True]).head(n_positive)
    picks = [(s, f"positive: {int(k)}/{int(n)} positive slices") for s, k, n in positives.itertuples(index=False)]
    negatives = per.loc[per["sum"] == 0, STUDY].sort_values()
    if len(negatives):
        study, why = negatives.iloc[0], "negative"
        if oof is not None and "any" in oof:
            p = oof[[ID_COL, "any"]].merge(meta[[ID_COL, STUDY]], on=ID_COL).groupby(STUDY)["any"].max()
            p = p[p.index.isin(negatives)]
            if len(p):
                study, why = p.idxmax(), f"hardest negative: max p(any) = {p.max():.3f}"
        picks.append((study, why))
    return picks


@torch.inference_mode()
def predict_study(model: nn.Module, cfg: Config, meta: pd.DataFrame, images: np.ndarray,
                  masks: np.ndarray | None, device: torch.device) -> dict[str, np.ndarray]:
    """Seg probabilities [n, S, S], p(any) and predicted volume per slice of one study (meta: its rows only)."""
    from src.data import SliceDataset
    from src.predict import to_input

    ds = SliceDataset(meta, images, cfg.context, masks)
    seg, p_any, vol = [], [], []
    for start in range(0, len(ds), 16):
        items = [ds[i] for i in range(start, min(start + 16, len(ds)))]
        x = to_input(torch.stack([it["image"] for it in items]), device, False)
        out = model(x, torch.stack([it["voxel_mm3"] for it in items]).to(device))
        seg.append(torch.sigmoid(out["seg_logits"][:, 0].float()).cpu().numpy())
        p_any.append(torch.sigmoid(out["logits"][:, LABELS.index("any")].float()).cpu().numpy())
        vol.append(out["volume_mm3"].float().cpu().numpy())
    return {"seg": np.concatenate(seg), "any": np.concatenate(p_any), "volume_mm3": np.concatenate(vol),
            "mask_state": ds.mask_state, "voxel_mm3": ds.voxel_mm3}


def _blend(gray: np.ndarray, alpha: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    rgb = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    return rgb * (1 - a) + np.asarray(colour, dtype=np.float32) * a


def plot_study_overlay(meta: pd.DataFrame, pred: dict[str, np.ndarray], images: np.ndarray, masks: np.ndarray | None,
                       n_slices: int, window: int, title: str, path: Path) -> Path:
    """Rows = the study's bloodiest slices (true area, then predicted volume); predicted mask red, true mask green."""
    true_area = np.array([float(masks[r].sum()) if r >= 0 and masks is not None else 0.0 for r in meta["mask_row"]])
    order = np.lexsort((-pred["volume_mm3"], -true_area, -meta["any"].to_numpy()))[:n_slices]
    order = np.sort(order)  # top to bottom in slice order
    cols = 2 if masks is not None else 1
    fig = Figure(figsize=(3.2 * cols, 3.3 * len(order) + 0.4))
    fig.suptitle(title, fontsize=9)
    for r, i in enumerate(order):
        gray = images[int(meta["cache_row"].iloc[i]), window]
        prob = pred["seg"][i]
        ax = fig.add_subplot(len(order), cols, r * cols + 1)
        ax.imshow(_blend(gray, np.where(prob > 0.1, 0.7 * prob, 0.0), (1.0, 0.1, 0.1)))
        ax.set_title(f"{meta[ID_COL].iloc[i]} p(any)={pred['any'][i]:.2f}\npredicted {pred['volume_mm3'][i]:.0f} mm³",
                     fontsize=7)
        ax.axis("off")
        if cols == 2:
            ax = fig.add_subplot(len(order), cols, r * cols + 2)
            state = int(pred["mask_state"][i])
            truth = masks[int(meta["mask_row"].iloc[i])] if state == 1 else np.zeros_like(gray)
            ax.imshow(_blend(gray, 0.5 * truth.astype(np.float32), (0.1, 0.9, 0.1)))
            what = {1: f"true {true_area[i] * pred['voxel_mm3'][i]:.0f} mm³", 0: "true: no blood",
                    -1: "positive, no painted mask"}[state]
            ax.set_title(f"label any={int(meta['any'].iloc[i])}\n{what}", fontsize=7)
            ax.axis("off")
    return _save_png(fig, path)


def run_overlays(exp: str, fold: int, data_dir: Path | None = None, n_studies: int = 3, n_slices: int = 3,
                 window: str = "brain") -> list[Path]:
    """Overlay PNGs for the fold's most positive validation studies and one negative, under oof/<exp>/bloodnet/."""
    from src.cache import load_cache
    from src.folds import load_folds

    model_dir = paths.WORK / "models" / exp / f"fold{fold}"
    checkpoint = model_dir / "best.pt" if (model_dir / "best.pt").exists() else model_dir / "last.pt"
    if not checkpoint.exists():
        raise InputError(f"{model_dir}: no best.pt or last.pt (train it: python -m src.train --fold {fold} ...)")
    model, cfg = load_model(checkpoint)
    if cfg.arch == "classifier":
        raise InputError(f"{checkpoint}: arch=classifier has no segmentation branch to draw")
    data_dir = Path(data_dir or cfg.data_dir or paths.resolve_data_dir(None))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    meta, images, masks = load_cache(data_dir, cfg.image_size, "train")
    folds = load_folds(data_dir, cfg.n_folds, cfg.fold_seed)
    meta = meta.merge(folds[[ID_COL, FOLD_COL]], on=ID_COL, how="inner", validate="one_to_one")
    valid = meta[meta[FOLD_COL] == fold]
    if valid.empty:
        raise InputError(f"--fold {fold}: no validation images in {data_dir}")
    oof_path = outputs.exp_dir(exp) / f"fold{fold}_valid.csv"
    oof = pd.read_csv(oof_path, dtype={ID_COL: str}) if oof_path.exists() else None
    channel = {"brain": 0, "subdural": 1}[window]
    written = []
    for rank, (study, why) in enumerate(pick_studies(valid, n_studies, oof)):
        rows = valid[valid[STUDY] == study].reset_index(drop=True)
        pred = predict_study(model, cfg, rows, images, masks, device)
        title = f"{exp} fold {fold}: study {study} ({why}), {window} window"
        path = outputs.exp_dir(exp) / "bloodnet" / "overlays" / f"fold{fold}_{rank}_{study}.png"
        written.append(plot_study_overlay(rows, pred, images, masks, n_slices, channel, title, path))
        print(f"wrote {path}")
    return written


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
        run_overlays(args.exp, args.fold, data_dir, args.n_studies, args.n_slices, args.window)
    return 0


if __name__ == "__main__":
    run_cli(main)
