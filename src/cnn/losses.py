"""Losses: weighted BCE over the six labels (the metric's weighting) and the masked segmentation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over images of Σ_j w_j·BCE_ij / Σ_j w_j: the competition metric, differentiable."""
    per_label = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return (per_label * weights).sum(dim=1).mean() / weights.sum()


def masked_seg_loss(
    seg_logits: torch.Tensor, masks: torch.Tensor, mask_state: torch.Tensor, dice: bool = False
) -> torch.Tensor:
    """Per-pixel BCE over the slices whose mask is known (state 1 = painted, 0 = known empty).

    State -1 (a positive slice without a mask) is left out entirely: calling it empty would teach the
    decoder to erase real blood. A batch without any known mask contributes an exact zero with a graph.
    """
    known = mask_state >= 0
    if not bool(known.any()):
        return seg_logits.sum() * 0.0
    logits = seg_logits[known].float()
    target = masks[known].float()
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if dice:
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum(dim=(1, 2, 3))
        denom = prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
        loss = loss + (1.0 - (2.0 * inter + 1.0) / (denom + 1.0)).mean()
    return loss
