"""Train one fold (`python -m src.cnn.train --fold K`), resume after a kill, write OOF/test predictions and embeddings.

Runs as is on CPU or one GPU, and under `torchrun --nproc_per_node N -m src.cnn.train ...` with DistributedDataParallel
(NCCL on GPUs, gloo on CPU); only rank 0 writes files. The steps of `run_fold`, in order: data; for each seed the
model, its resume state and the epoch loop (fit.py: train, validate, checkpoint); then predictions from each seed's
deployed checkpoint (its last epoch, or with select_epoch=valid the one best on the validation fold), averaged over
seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from src import predictions
from src.cnn.checkpoints import deploy, deployed_checkpoint, read_checkpoint
from src.cnn.distributed import barrier, predict_sharded, setup_distributed, shard_loader
from src.cnn.fit import Progress, SeedRun, train_epochs
from src.cnn.model import build_model
from src.cnn.runtime import Runtime
from src.cnn.sampling import seed_all
from src.cnn.schedule import phases_for
from src.cnn.volume_cutoff import calibrate_checkpoint, known_empty_sample
from src.config import Config, load_config
from src.constants import FOLD_COL, ID_COL
from src.data.cache import load_cache
from src.data.dataset import SliceDataset, build_augment, resolve_mask_mode
from src.data.extra import check_extra_dirs, join_extra_training, training_data_identity
from src.data.folds import fold_split, guard_model_split, load_folds
from src.errors import InputError, run_cli
from src.paths import WORK, resolve_data_dir


def split_fold(
    cfg: Config, data_dir: Path, fold: int
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray | None]:
    meta, images, masks = load_cache(data_dir, cfg.image_size, "train", fmt=cfg.cache_format)
    folds = load_folds(data_dir, cfg.n_folds, cfg.fold_seed)
    meta = meta.merge(folds[[ID_COL, FOLD_COL]], on=ID_COL, how="left", validate="one_to_one")
    if meta[FOLD_COL].isna().any():
        raise InputError(
            f"fold file for {data_dir} misses {int(meta[FOLD_COL].isna().sum())} images; delete it to rebuild"
        )
    meta[FOLD_COL] = meta[FOLD_COL].astype(int)
    if fold >= cfg.n_folds or fold < -1:
        raise InputError(f"--fold {fold}: expected -1 (all folds) or 0..{cfg.n_folds - 1}")
    valid = meta[meta[FOLD_COL] == fold].reset_index(drop=True)
    train = meta[meta[FOLD_COL] != fold].reset_index(drop=True)
    return train, valid, images, masks


def prepare_data(cfg: Config, data_dir: Path, fold: int, rt: Runtime):
    """Caches and folds built once by rank 0, then each rank's train/valid datasets."""
    if rt.rank == 0:  # build caches and folds once, before the other ranks read them
        load_cache(data_dir, cfg.image_size, "test", fmt=cfg.cache_format)
        split_fold(cfg, data_dir, fold)
        for folder in cfg.extra_train:
            load_cache(folder, cfg.image_size, "train", fmt=cfg.cache_format)
    barrier(rt.world)
    train_meta, valid_meta, images, masks = split_fold(cfg, data_dir, fold)
    # Extra folders join the training part only; the validation set keeps reading the main cache, whose rows come
    # first in the stacked one, so its cache rows need no shift.
    train_meta, images, masks = join_extra_training(
        train_meta, pd.concat([train_meta, valid_meta]), images, masks, cfg.extra_train, data_dir, cfg.image_size,
        cfg.cache_format, verbose=rt.rank == 0)
    train_masks = masks
    if cfg.arch != "classifier":
        cfg.masks = resolve_mask_mode(cfg.masks, masks, train_meta["mask_row"].to_numpy(), str(data_dir))
        train_masks = masks if cfg.masks == "full" else None  # none: positives are unknown, never empty
        if rt.rank == 0:
            print(f"[train] masks={cfg.masks}: segmentation from "
                  + ("painted masks" if cfg.masks == "full" else "slice labels (weak, pooled map)"))
    train_ds = SliceDataset(train_meta, images, cfg.context, train_masks, augment=build_augment(cfg.aug))
    valid_ds = SliceDataset(valid_meta, images, cfg.context, masks) if len(valid_meta) else None
    return train_meta, images, train_ds, valid_ds


def prepare_model(cfg: Config, rt: Runtime, seed: int) -> nn.Module:
    """The plain network of one seed on the device; fit.train_epochs wraps it (DDP, compile) phase by phase."""
    seed_all(seed + rt.rank)  # the initial weights of this seed
    model = build_model(cfg).to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.channels_last else model


def mean_of_seeds(outs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Probabilities and volumes averaged over seeds. Embeddings stay the first seed's: each seed learns its own
    feature space, so a mean of embeddings would describe none of them."""
    mean = {k: np.mean([o[k] for o in outs], axis=0) for k in outs[0] if k not in ("embedding", "index")}
    return {**outs[0], **mean}


def last_epochs_if_best(runs: list[SeedRun]) -> list[int] | None:
    """Each seed's last epoch when it is also the one its best.pt holds (the best on the validation fold), else
    None: a fold predicted with select_epoch=valid then has the very predictions select_epoch=last would make."""
    epochs = []
    for run in runs:
        best, last = run.model_dir / "best.pt", run.model_dir / "last.pt"
        if not (best.exists() and last.exists()):
            return None
        epochs.append(read_checkpoint(last)["epoch"])
        if read_checkpoint(best)["epoch"] != epochs[-1]:
            return None
    return epochs


def predict_outputs(model: nn.Module, cfg: Config, rt: Runtime, data_dir: Path, runs: list[SeedRun], tag: str,
                    train_meta: pd.DataFrame, images: np.ndarray, valid_ds) -> tuple[dict[str, tuple], list[int]]:
    """Predictions of each seed's deployed checkpoint (select_epoch), averaged over seeds: OOF for the held-out
    fold, test, and embeddings for the stacker; and the epoch each checkpoint holds."""
    chosen = [deployed_checkpoint(r.model_dir, cfg, write=rt.rank == 0) for r in runs]
    barrier(rt.world)  # rank 0 may have rewritten a best.pt for select_epoch=last
    if cfg.arch != "classifier" and cfg.masks == "none" and rt.rank == 0:  # once, written into each checkpoint
        empty = known_empty_sample(train_meta)
        if empty.empty:  # the trained model is kept either way; only its volume goes uncalibrated
            print("[train] warning: no training slice is labelled empty (any = 0): the volume cutoff cannot be "
                  "calibrated and stays 0.5", flush=True)
        for path in chosen if len(empty) else []:
            calibrate_checkpoint(path, model, SliceDataset(empty, images, cfg.context), rt.device, cfg.tta_flip,
                                 batch_size=cfg.batch_size * 2, amp_dtype=rt.amp_dtype,
                                 channels_last=rt.channels_last)
    barrier(rt.world)
    states = [read_checkpoint(path) for path in chosen]  # read once (after calibration), deployed for every split

    def predict(ds, tta: bool, desc: str) -> dict[str, np.ndarray]:
        loader, outs = shard_loader(ds, cfg, rt.rank, rt.world), []
        for path, state in zip(chosen, states):
            deploy(model, state)
            outs.append(predict_sharded(model, loader, rt, tta, f"{desc} {path.parent.name}"))
        return mean_of_seeds(outs)

    results = {}
    if valid_ds is not None:
        results["valid"] = (valid_ds.meta, predict(valid_ds, cfg.tta_flip, f"{tag} valid"))
    test_meta, test_images, _ = load_cache(data_dir, cfg.image_size, "test", fmt=cfg.cache_format)
    test_ds = SliceDataset(test_meta, test_images, cfg.context, with_labels=False)
    results["test"] = (test_meta, predict(test_ds, cfg.tta_flip, f"{tag} test"))
    if cfg.predict_train:  # in-sample predictions: nothing in the pipeline reads them, a stacker must not
        results["train"] = (train_meta, predict(SliceDataset(train_meta, images, cfg.context), False, f"{tag} train"))
    return results, [int(state["epoch"]) for state in states]


def run_fold(cfg: Config, fold: int, data_dir: Path) -> Path:
    # A copy: prepare_data resolves masks=auto into the run's config (what its checkpoints record), and a caller
    # that trains several folds with one config must get the same experiment name for each.
    cfg = dataclasses.replace(cfg)
    rank, world, device = setup_distributed()
    rt = Runtime.create(cfg, rank, world, device)
    exp, tag = cfg.exp_name, (f"fold{fold}" if fold >= 0 else "full")
    model_dir, out_dir = WORK / "models" / exp / tag, predictions.exp_dir(exp)
    if rank == 0:
        print(f"[train] exp={exp} {tag} data={data_dir} device={device} world={world}")

    train_meta, images, train_ds, valid_ds = prepare_data(cfg, data_dir, fold, rt)
    split = {**fold_split(data_dir, cfg.n_folds, cfg.fold_seed),
             "data": training_data_identity(data_dir, cfg.extra_train)}
    guard_model_split(model_dir, split, write=rank == 0)  # before resuming: last.pt may predate a new split
    has_valid = valid_ds is not None
    phases = phases_for(cfg)
    total_epochs = sum(p.epochs for p in phases)
    runs = SeedRun.all_for(cfg, model_dir, tag)
    finished = True
    for run in runs:
        model = prepare_model(cfg, rt, run.seed)
        progress = Progress.resume(run.model_dir / "last.pt", cfg, model)
        if rank == 0 and 0 < progress.start_epoch < total_epochs and not progress.stopped_early:
            print(f"[train] resuming {run.tag} at epoch {progress.start_epoch + 1}/{total_epochs} "
                  f"from {run.model_dir / 'last.pt'}")
        finished = finished and progress.finished(total_epochs)
        train_epochs(model, train_ds, valid_ds, cfg, rt, phases, progress, run, out_dir)

    emb_splits = ("test", "valid")[: 1 + has_valid] + (("train",) if cfg.predict_train else ())
    complete = finished and predictions.predictions_complete(out_dir, tag, has_valid, emb_splits)
    if complete and has_valid and (made_with := predictions.recorded_select_epoch(out_dir, tag)) != cfg.select_epoch:
        if made_with == "valid" and (epochs := last_epochs_if_best(runs)):
            if rank == 0:  # the same weights either way: only best.pt's tag and the record change
                for r in runs:
                    deployed_checkpoint(r.model_dir, cfg)
                predictions.record_selection(out_dir, tag, cfg.select_epoch, epochs)
                print(f"[train] {tag}: the epoch best on its validation fold was its last, so its predictions are "
                      f"those select_epoch={cfg.select_epoch} makes: kept, record updated")
            barrier(world)
        else:
            if rank == 0:
                print(f"[train] {tag}: its predictions came from select_epoch={made_with}; predicting again from "
                      f"the epoch select_epoch={cfg.select_epoch} picks (no training)")
            complete = False
    if complete:
        if rank == 0:
            print(f"[train] {tag} is complete: {out_dir}/{tag}_* (delete {model_dir} to train it again)")
        return out_dir
    results, epochs = predict_outputs(model, cfg, rt, data_dir, runs, tag, train_meta, images, valid_ds)
    if rank == 0:
        predictions.write_predictions(out_dir, tag, fold, results, cfg, split, deployed_epochs=epochs)
        print(f"[train] wrote {out_dir}/{tag}_*")
    barrier(world)
    if world > 1:
        dist.destroy_process_group()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, required=True, help="held-out fold; -1 trains on every fold's images")
    parser.add_argument("--config", help="YAML file of config overrides (a path, or a name under configs/)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable; dotted keys for sections, e.g. aug.hflip=0)",
    )
    parser.add_argument("--data", help="data directory (Kaggle stage-2 layout); default: $ICH_DATA, input/")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    data_dir = resolve_data_dir(args.data or cfg.data_dir or None)
    if not data_dir.exists():
        raise InputError(f"{data_dir}: data directory not found (set --data or ICH_DATA)")
    cfg.data_dir = str(data_dir)
    check_extra_dirs(cfg.extra_train, data_dir)  # each one readable and not the main data, before any work
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    run_fold(cfg, args.fold, data_dir)
    return 0


if __name__ == "__main__":
    run_cli(main)
