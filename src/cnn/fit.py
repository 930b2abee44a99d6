"""The epoch loop of one seed of a fold: train, validate (the EMA weights when on), checkpoint, stop early; resumable.

The loaders are built once per run with persistent workers; each epoch re-seeds the sampler, the augmentation
(per item, see sampling.py) and the process RNGs from (seed, epoch), so a run resumed after a kill trains the
same epochs on the same batches as one that was never interrupted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.cnn.checkpoints import load_checkpoint, save_checkpoint
from src.cnn.distributed import barrier, loader_for, shard_loader
from src.cnn.history import write_epochs
from src.cnn.loop import make_optimizer, train_one_epoch, validate
from src.cnn.pseudo_masks import PSEUDO_MASKS_FILE, apply_pseudo_masks, compute_pseudo_masks
from src.cnn.runtime import Runtime, make_ema, wrap_model
from src.cnn.sampling import (
    EpochSampler,
    SeededItems,
    balanced_subset,
    hard_negative_weights,
    seed_epoch,
    study_balanced_weights,
)
from src.cnn.schedule import Phase, phase_at
from src.config import Config
from src.data.windows import hyperdense_share


@dataclass
class SeedRun:
    """One seed of a fold: its seed, checkpoint folder and epoch-log tag (seed 0 keeps the single-seed layout)."""

    seed: int
    model_dir: Path
    tag: str

    @classmethod
    def all_for(cls, cfg: Config, fold_dir: Path, tag: str) -> list[SeedRun]:
        return [cls(cfg.seed + i, fold_dir / f"seed{i}" if i else fold_dir, f"{tag}_seed{i}" if i else tag)
                for i in range(max(1, cfg.seeds))]


@dataclass
class Progress:
    """What a resumed run carries over from last.pt; a fresh run starts from the defaults."""

    start_epoch: int = 0
    best: float = math.inf
    stale: int = 0
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    state: dict | None = None  # the checkpoint itself (optimizer, scaler and EMA state, phase)

    @classmethod
    def resume(cls, path: Path, cfg: Config, core: nn.Module) -> Progress:
        state = load_checkpoint(path, cfg)
        if state is None:
            return cls()
        core.load_state_dict(state["model"])
        # A run early stopping ended goes on to the end of its schedule when run again with it off or looser (the
        # learning rate is a pure function of the step, so the continuation is exact).
        stopped = bool(state.get("stopped_early", False)) and 0 < cfg.early_stopping <= state["stale"]
        return cls(state["epoch"], state["best"], state["stale"], state["history"], stopped, state)

    def finished(self, total_epochs: int) -> bool:
        return self.state is not None and (self.start_epoch >= total_epochs or self.stopped_early)


def may_stop_early(epoch_in_phase: int, phase_epochs: int) -> bool:
    """Early stopping may end the final phase only in its second half (epoch_in_phase counts from 0).

    The learning rate is still near its peak early in a cosine schedule and the validation loss jumps about there: a
    12-epoch classifier on fold 2 of the embedded default saw its best log loss after epoch 1 (near the prior), no
    better in epochs 2–4, and stopped at epoch 4 keeping epoch 1's weights (slice AUC 0.71 against 0.85–0.93 on the
    other folds)."""
    return epoch_in_phase + 1 >= math.ceil(phase_epochs / 2)


def segment_subset(train_ds, cfg: Config, phases: list[Phase], seed: int) -> Callable[[int], np.ndarray | None] | None:
    """With `seg_balance`, the segmentation-only epochs draw each slice that teaches blood (a painted mask, or in
    the weak mode a positive label) and as many known-empty ones; the other phases, which train the classifier and
    must see the data's own label mix, draw every slice. None when there is nothing to balance."""
    if not cfg.seg_balance or cfg.arch == "classifier":
        return None
    state = train_ds.mask_state  # 1 painted, 0 known empty, -1 positive without a mask (every positive when weak)
    positive = np.flatnonzero(state == (1 if cfg.masks == "full" else -1))
    negative = np.flatnonzero(state == 0)
    segment_epochs = {e for e in range(sum(p.epochs for p in phases)) if phase_at(phases, e)[0].seg_lambda >= 1.0}
    if not len(positive) or not len(negative) or not segment_epochs:
        return None
    weight = None
    if cfg.seg_hard_negatives > 0:
        started = time.perf_counter()
        centre = train_ds.neighbours[negative, train_ds.neighbours.shape[1] // 2]
        share = hyperdense_share(train_ds.images, centre)
        weight = hard_negative_weights(share, cfg.seg_hard_negatives)
        print(f"[train] seg_hard_negatives={cfg.seg_hard_negatives:g}: {len(negative)} negatives scored by their "
              f"hyperdense pixels (median {np.median(share):.2%}, max {share.max():.2%}) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    positive_weight = None
    if cfg.seg_study_balance > 0:
        study = train_ds.meta["StudyInstanceUID"].to_numpy()[positive]
        positive_weight = study_balanced_weights(study, cfg.seg_study_balance)
        _, per_study = np.unique(study, return_counts=True)
        print(f"[train] seg_study_balance={cfg.seg_study_balance:g}: {len(positive)} positives over {len(per_study)} "
              f"studies ({per_study.min()}-{per_study.max()} a study, median {np.median(per_study):g}) drawn towards "
              "an equal share per study", flush=True)
    return lambda epoch: (balanced_subset(positive, negative, seed, epoch, weight, positive_weight)
                          if epoch in segment_epochs else None)


def refine_epoch(cfg: Config, phases: list[Phase]) -> int | None:
    """The epoch (0-based) from which `weak_refine` trains on pseudo-masks: the first after the segment-only ones.
    None when off, with painted masks, or with no segment-only epochs to learn the map from first."""
    if not cfg.weak_refine or cfg.arch == "classifier" or cfg.masks != "none":
        return None
    segment = sum(p.epochs for p in phases if p.seg_lambda >= 1.0)
    return segment if 0 < segment < sum(p.epochs for p in phases) else None


def train_epochs(core: nn.Module, train_ds, valid_ds, cfg: Config, rt: Runtime, phases: list[Phase],
                 progress: Progress, run: SeedRun, out_dir: Path) -> None:
    """Train `core` (the plain network) from progress.start_epoch to the end of the schedule or an early stop."""
    total_epochs = sum(p.epochs for p in phases)
    weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=rt.device)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
    state = progress.state or {}
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ema = make_ema(core, cfg)
    if ema is not None and state.get("ema"):
        ema.module.load_state_dict(state["ema"])
    sampler = EpochSampler(len(train_ds), run.seed, rt.rank, rt.world, limit=cfg.limit_train_batches * cfg.batch_size,
                           subset=segment_subset(train_ds, cfg, phases, run.seed))
    loader = loader_for(SeededItems(train_ds, run.seed), cfg, cfg.batch_size, sampler, persistent=True)
    refine_at = refine_epoch(cfg, phases)

    def refine() -> None:
        """Pseudo-masks on the positives from here on (computed once per seed, then read back); the loader is
        rebuilt so that its persistent workers see them."""
        nonlocal loader
        path = run.model_dir / PSEUDO_MASKS_FILE
        if rt.rank == 0 and not path.exists():
            started = time.perf_counter()
            cutoff = compute_pseudo_masks(ema.module if ema is not None else core, train_ds, rt.device, path,
                                          cfg.batch_size * 2, rt.amp_dtype, rt.channels_last, run.seed)
            print(f"[train] weak_refine: pseudo-masks at p >= {cutoff:.4f} in {time.perf_counter() - started:.1f} s "
                  f"({path})", flush=True)
        barrier(rt.world)
        painted = apply_pseudo_masks(train_ds, path)
        if rt.rank == 0:
            print(f"[train] weak_refine: {painted} of {painted + int((train_ds.mask_state == -1).sum())} positive "
                  "slices train the pixel loss on their pseudo-mask", flush=True)
        loader = loader_for(SeededItems(train_ds, run.seed), cfg, cfg.batch_size, sampler, persistent=True)

    if refine_at is not None and progress.start_epoch >= refine_at:  # resumed past the refinement: same masks
        refine()
    valid_loader = shard_loader(valid_ds, cfg, rt.rank, rt.world, persistent=True) if valid_ds is not None else None

    def optimizer_steps(epoch: int) -> int:
        sampler.set_epoch(epoch)
        return math.ceil(len(loader) / max(1, cfg.accumulate))

    ema_step = sum(optimizer_steps(e) for e in range(progress.start_epoch))  # EMA warmup counts optimizer steps
    model, optimizer, current_phase, frozen_map_weights = core, None, None, None
    for epoch in range(progress.start_epoch, total_epochs):
        if progress.stopped_early:
            break
        if epoch == refine_at:
            refine()
        phase, epoch_in_phase = phase_at(phases, epoch)
        if phase is not current_phase:
            optimizer = make_optimizer(cfg, core, phase.head_only)
            model = wrap_model(core, cfg, rt)  # after make_optimizer: DDP registers what this phase trains
            if state.get("phase") == phase.name and state.get("optimizer"):
                optimizer.load_state_dict(state["optimizer"])
            if phase.name != state.get("phase"):
                progress.stale = 0  # early stopping counts within a phase
            if frozen_map_weights is not None:
                frozen_map_weights.remove()
            frozen_map_weights = (core.freeze_map_weights() if cfg.freeze_map_weights and phase.name == "joint"
                                  else None)
            current_phase = phase
        seed_epoch(run.seed, epoch, rt.rank)
        sampler.set_epoch(epoch)
        desc = f"{run.tag} epoch {epoch + 1}/{total_epochs} [{phase.name}]"
        started = time.perf_counter()
        row = {"epoch": epoch + 1, "phase": phase.name,
               **train_one_epoch(model, loader, optimizer, scaler, phase, epoch_in_phase, cfg, rt, weights, desc,
                                 ema=ema, ema_step=ema_step)}
        judged = ema.module if ema is not None else core  # the weights that are validated, kept and deployed
        improved = False
        # The last epoch is the model unless select_epoch=valid (and there is a validation fold to choose on).
        deploy = valid_ds is None or cfg.select_epoch == "last"
        # Segmentation-only epochs leave the head untrained: their slice scores mean nothing and they never become
        # "best", so they are not validated (a validation pass costs about half a balanced segment epoch).
        if valid_ds is not None and phase.seg_lambda < 1.0:
            row.update(validate(judged, valid_loader, valid_ds, rt, f"{run.tag} valid"))
            if row["valid_wll"] < progress.best:
                progress.best, progress.stale, improved = row["valid_wll"], 0, True
            else:
                progress.stale += 1
            deploy = deploy or improved
        row["epoch_time_s"] = time.perf_counter() - started
        ema_step += math.ceil(len(loader) / max(1, cfg.accumulate))
        progress.history.append(row)
        progress.stopped_early = bool(valid_ds is not None and cfg.early_stopping > 0 and phase is phases[-1]
                                      and progress.stale >= cfg.early_stopping
                                      and may_stop_early(epoch_in_phase, phase.epochs))
        if rt.rank == 0:
            if deploy:  # best.pt: the weights this fold deploys, whichever epoch select_epoch picks
                save_checkpoint(run.model_dir / "best.pt", judged, cfg, epoch=epoch + 1, ema_weights=ema is not None,
                                select_epoch=cfg.select_epoch)
            extra = {"ema": ema.module.state_dict()} if ema is not None else {}
            save_checkpoint(run.model_dir / "last.pt", core, cfg, epoch=epoch + 1, optimizer=optimizer,
                            phase=phase.name, best=progress.best, stale=progress.stale, history=progress.history,
                            stopped_early=progress.stopped_early, scaler=scaler.state_dict(), **extra)
            write_epochs(progress.history, out_dir, run.tag)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            print(f"[train] {shown}{'  *best valid*' if improved else ''}", flush=True)
        barrier(rt.world)
        if progress.stopped_early and rt.rank == 0:
            print(f"[train] early stop: no improvement for {cfg.early_stopping} epochs")
