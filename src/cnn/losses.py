"""Losses: weighted BCE over the six labels (the metric's weighting), the segmentation losses, and the one function
that composes them for a training step (`training_loss`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from src.config import Config
from src.constants import LABELS
from src.errors import InputError

SEG_LOSSES = ("bce", "bce_dice", "bce_batch_dice", "bce_tversky")
# Tversky weights of false blood and missed blood (Salehi et al. 2017, their best for small lesions): a missed
# pixel costs more than a false one, against the map's measured failure, small bleeds missed (README, BloodNet).
TVERSKY_FALSE_WEIGHT, TVERSKY_MISSED_WEIGHT = 0.3, 0.7
ANY = LABELS.index("any")


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over images of Σ_j w_j·BCE_ij / Σ_j w_j: the competition metric, differentiable."""
    per_label = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return (per_label * weights).sum(dim=1).mean() / weights.sum()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over slices of 1 − soft Dice (+1 smoothing). On an empty slice it is 1 − 1/(Σp + 1): every stray pixel
    of false blood costs, which plain BCE forgives when blood is well under 1% of the pixels."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1.0 - (2.0 * inter + 1.0) / (denom + 1.0)).mean()


def tversky_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over slices of 1 − Tversky index (+1 smoothing): TP / (TP + a·FP + b·FN) in soft counts, a and b the
    TVERSKY_* weights above. Dice is a = b = 0.5; weighting misses over false blood pulls a half-seen small bleed up
    harder than Dice does."""
    prob = torch.sigmoid(logits)
    dims = (1, 2, 3)
    true_blood = (prob * target).sum(dim=dims)
    false_blood = (prob * (1 - target)).sum(dim=dims)
    missed = ((1 - prob) * target).sum(dim=dims)
    index = (true_blood + 1.0) / (true_blood + TVERSKY_FALSE_WEIGHT * false_blood + TVERSKY_MISSED_WEIGHT * missed
                                  + 1.0)
    return (1.0 - index).mean()


def batch_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − soft Dice over all the batch's pixels at once (nnU-Net's batch Dice, +1 smoothing).

    Per-slice Dice saturates on an empty slice: its loss 1 − 1/(Σp + 1) has gradient 1/(Σp + 1)², so a slice that
    already paints 50 pixels of false blood is pushed back with 1/2601 of the force a positive slice is pulled to
    paint. Pooled over the batch, false blood on empty slices enters the same denominator as the true blood and
    costs in proportion to its pixels, which is what a volume needs: the sum of predicted pixels to match the truth."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)


def masked_seg_loss(
    seg_logits: torch.Tensor, masks: torch.Tensor, mask_state: torch.Tensor, kind: str = "bce"
) -> torch.Tensor:
    """Per-pixel BCE (+ soft Dice per slice for kind="bce_dice", over the batch for "bce_batch_dice", Tversky per
    slice for "bce_tversky") over the slices whose mask is known (state 1 = painted, 0 = known empty).

    State -1 (a positive slice without a mask) is left out entirely: calling it empty would teach the
    decoder to erase real blood. A batch without any known mask contributes an exact zero with a graph.
    """
    if kind not in SEG_LOSSES:
        raise InputError(f"config key seg_loss: {kind!r} is not one of {', '.join(SEG_LOSSES)}")
    known = mask_state >= 0
    if not bool(known.any()):
        return seg_logits.sum() * 0.0
    logits = seg_logits[known].float()
    target = masks[known].float()
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if kind == "bce_dice":
        loss = loss + soft_dice_loss(logits, target)
    elif kind == "bce_batch_dice":
        loss = loss + batch_dice_loss(logits, target)
    elif kind == "bce_tversky":
        loss = loss + tversky_loss(logits, target)
    return loss


def lse_pool(seg_logits: torch.Tensor, r: float) -> torch.Tensor:
    """Log-sum-exp pooling of a [B, 1, H, W] logit map to one logit per slice: (1/r)·log(mean(exp(r·x))).

    r → ∞ is max pooling (one pixel decides), r → 0 the mean (every pixel must agree); in between, a bleed that
    covers a fraction f of the slice at logit a pools to about a + log(f)/r, so small bleeds still reach the label.
    """
    flat = seg_logits.float().flatten(1)
    return (torch.logsumexp(r * flat, dim=1) - math.log(flat.shape[1])) / r


def weak_seg_loss(seg_logits: torch.Tensor, labels_any: torch.Tensor, masks: torch.Tensor, mask_state: torch.Tensor,
                  kind: str, r: float) -> torch.Tensor:
    """Mask-free supervision: the map pooled (LSE) into the slice's `any` logit, BCE against the slice label, plus
    the pixel loss on known-empty slices. Slice labels alone then say where the blood is: the only pixels that can
    raise a positive slice's pooled logit without costing on negatives are the ones that differ from normal."""
    pooled = lse_pool(seg_logits, r)
    mil = F.binary_cross_entropy_with_logits(pooled, labels_any.float())
    return mil + masked_seg_loss(seg_logits, masks, mask_state, kind)


def training_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], phase, cfg: Config,
                  class_weights: torch.Tensor) -> torch.Tensor:
    """L = (1 − λ)·weighted BCE + λ·segmentation loss for one batch of `phase` (src.cnn.schedule.Phase).

    The segmentation term follows cfg.masks, which the trainer has resolved from `auto` to `full` (painted masks)
    or `none` (the weak mode above: data such as the real RSNA set, whose positives carry no mask).
    """
    device = out["logits"].device
    labels = batch["labels"].to(device)
    loss = (1.0 - phase.seg_lambda) * weighted_bce(out["logits"], labels, class_weights)
    if "seg_logits" not in out:
        return loss
    if phase.seg_lambda <= 0:
        return loss + 0.0 * out["seg_logits"].sum()  # keeps DDP's gradient buckets complete
    masks, state = batch["mask"].to(device), batch["mask_state"].to(device)
    if cfg.masks == "full":
        seg = masked_seg_loss(out["seg_logits"], masks, state, cfg.seg_loss)
    elif cfg.masks == "none":
        seg = weak_seg_loss(out["seg_logits"], labels[:, ANY], masks, state, cfg.seg_loss, cfg.weak_pool_r)
    else:
        raise ValueError(f"masks={cfg.masks!r}: resolve it to full or none (src.data.dataset.resolve_mask_mode)")
    return loss + phase.seg_lambda * seg
