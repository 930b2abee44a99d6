"""The BloodNet ablation (Bar et al. 2019, Table 3): classifier / multitask / bloodnet, and bloodnet with its masks
withheld (the real RSNA data's situation), on one fold, same budget; AUC, log loss and study-volume error."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from src import paths
from src.atomic import write_csv, write_text
from src.cnn.study_volumes import study_volumes, volume_summary
from src.config import Config, load_config
from src.constants import ID_COL, LABELS, STUDY, VOLUME_COL
from src.errors import InputError, run_cli
from src.metric import auc_from_ranks, bootstrap_auc, weighted_log_loss

# Table 3 of Bar et al. 2019, in its row order.
VARIANTS: dict[str, str] = {
    "classifier": "Single task, classification",
    "multitask": "Multi task, classification and segmentation",
    "bloodnet": "Task dependent, segmentation dependent classification",
    "bloodnet_nomask": "Segmentation dependent classification, masks withheld (slice labels only)",
}
ARCHS = ("classifier", "multitask", "bloodnet")


def ablation_configs(cfg: Config) -> dict[str, Config]:
    """The variants of one base config; the classifier gets the same total epochs as the 3-step schedule.

    The segmentation variants keep the base config's `masks` (auto: painted masks where the data has them); the
    mask-free row forces masks=none, so on the embedded set it shows what BloodNet learns from slice labels alone.
    """
    budget = cfg.seg_epochs + cfg.head_epochs + cfg.joint_epochs
    # Without an explicit exp each variant keeps its derived name (<arch>-<backbone>-<size>px-c<context>), so a fold
    # that `run_fold.sh` already trained under the same settings is reused rather than trained again.
    out = {arch: dataclasses.replace(cfg, arch=arch, exp=f"{cfg.exp}-{arch}" if cfg.exp else "", epochs=budget,
                                     aug=dataclasses.replace(cfg.aug)) for arch in VARIANTS if arch in ARCHS}
    bloodnet = out["bloodnet"]
    # masks=none is a training key: the derived name's hash keeps this run apart from the bloodnet row.
    out["bloodnet_nomask"] = dataclasses.replace(bloodnet, masks="none", exp=f"{cfg.exp}-bloodnet_nomask" if cfg.exp
                                                 else "", aug=dataclasses.replace(cfg.aug))
    return out


def ablation_table(
    preds: dict[str, pd.DataFrame], labels: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
    true_volumes: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Slice-level AUC of `any` with a study-resampling bootstrap CI, study AUC (max over slices), weighted log loss,
    and for variants that predict a volume (with true_volumes given) the study volume's median abs % error and
    Spearman over positive studies.

    preds: variant -> prediction table (ID + LABELS [+ blood_volume_mm3]); labels: the train metadata (ID, study,
    series keys, position + LABELS). Every variant must cover the same images; all variants see the same bootstrap
    resamples (a paired comparison).
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
            **_volume_columns(preds[name], labels, true_volumes),
        })
    return pd.DataFrame(rows)


def _volume_columns(pred: pd.DataFrame, labels: pd.DataFrame, true_volumes: pd.DataFrame | None) -> dict:
    """Median abs % error and Spearman of the study volume over positive studies; NaN without a volume or truth."""
    if VOLUME_COL not in pred or true_volumes is None:
        return {"volume_mdape_percent": float("nan"), "volume_spearman": float("nan")}
    summary = volume_summary(study_volumes(pred, labels, true_volumes))
    return {"volume_mdape_percent": _nan(summary.get("mdape_percent")),
            "volume_spearman": _nan(summary.get("spearman_positive"))}


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def ablation_markdown(table: pd.DataFrame, caption: str) -> str:
    """Table 3 as Markdown: one row per variant, AUC with its 95% CI, then the caption."""
    epochs = "epochs_run" in table
    header = ("| Network | AUC (any, slices) | 95% CI | study AUC (max) | weighted log loss "
              "| volume median abs error | volume Spearman |")
    lines = [header + " epochs run |" * epochs, "|---|---|---|---|---|---|---|" + "---|" * epochs]
    for r in table.itertuples():
        extra = f" {r.epochs_run} |" if epochs else ""
        mdape = "–" if np.isnan(r.volume_mdape_percent) else f"{r.volume_mdape_percent:.0f}%"
        rho = "–" if np.isnan(r.volume_spearman) else f"{r.volume_spearman:.2f}"
        lines.append(f"| {r.network} (`{r.variant}`) | {r.auc_any:.4f} | [{r.ci_low:.4f}, {r.ci_high:.4f}] "
                     f"| {r.study_auc_any:.4f} | {r.weighted_log_loss:.4f} | {mdape} | {rho} |{extra}")
    return "\n".join(lines) + f"\n\n{caption}\n"


def ablation_caption(cfg: Config, fold: int, table: pd.DataFrame, n_boot: int) -> str:
    budget = cfg.seg_epochs + cfg.head_epochs + cfg.joint_epochs
    first = table.iloc[0]
    return (
        f"Ablation on fold {fold} ({int(first.n_slices)} validation slices, {int(first.n_positive_slices)} positive, "
        f"{int(first.n_studies)} studies), backbone {cfg.backbone}, {cfg.image_size} px, context {cfg.context}. "
        f"Same epoch budget for every variant: the classifier trains {budget} epochs = segment {cfg.seg_epochs} + "
        f"head {cfg.head_epochs} + joint {cfg.joint_epochs} (λ = 1, 0, {cfg.joint_lambda}) of the two segmentation "
        f"variants; each is scored with the weights of the epoch select_epoch={cfg.select_epoch} picks"
        f"{' (the last: none is chosen on the rows scored here)' if cfg.select_epoch == 'last' else ''}. "
        f"AUC CI: percentile bootstrap ({n_boot} resamples of whole "
        f"studies, the same resamples for every variant). Study AUC: max `any` probability over a study's slices, "
        f"as the paper's inference. Volume: study blood volume (duplicate slice positions counted once) against "
        f"true_volumes.csv, over the positive studies; `bloodnet_nomask` trains with masks=none (slice labels only)."
    )


def run_ablation(cfg: Config, fold: int, data_dir: Path, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Train (or resume) the four variants on one fold, then write oof/bloodnet_ablation_fold{K}.{csv,md}."""
    from src.cnn.train import run_fold
    from src.data.metadata import load_metadata

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
    true_csv = data_dir / paths.TRUE_VOLUMES_CSV
    true = pd.read_csv(true_csv, dtype={ID_COL: str}) if true_csv.exists() else None
    table = ablation_table(preds, load_metadata(data_dir, "train"), n_boot=n_boot, seed=seed, true_volumes=true)
    table["epochs_run"] = table["variant"].map(epochs_run)
    base = paths.OOF_DIR / f"bloodnet_ablation_fold{fold}"
    write_csv(table, base.with_suffix(".csv"))
    write_text(ablation_markdown(table, ablation_caption(cfg, fold, table, n_boot)), base.with_suffix(".md"))
    print(table.to_string(index=False))
    print(f"wrote {base}.csv and {base}.md")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.cnn.ablation", description=__doc__)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--config", help="YAML config overrides shared by the variants (e.g. bloodnet.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    if args.n_boot < 0:
        raise InputError(f"--n-boot {args.n_boot}: must be >= 0")
    cfg = load_config(args.config, args.sets)
    data_dir = paths.resolve_data_dir(args.data or cfg.data_dir or None)
    if not data_dir.exists():
        raise InputError(f"{data_dir}: data directory not found (set --data or ICH_DATA)")
    cfg.data_dir = str(data_dir)  # as src.cnn.train does, so a fold started there resumes here
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run_ablation(cfg, args.fold, data_dir, args.n_boot, args.seed)
    return 0


if __name__ == "__main__":
    run_cli(main)
