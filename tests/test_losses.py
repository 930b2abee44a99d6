"""Losses: weighted BCE and BCE + Dice against hand calculations, on toy slices where the answer is known; unknown
masks are ignored; the weak (mask-free) loss; how training_loss composes them per phase and mask mode."""

import math

import pytest
import torch

from src.cnn.losses import (
    batch_dice_loss,
    lse_pool,
    masked_seg_loss,
    soft_dice_loss,
    training_loss,
    tversky_loss,
    weak_seg_loss,
    weighted_bce,
)
from src.errors import InputError


def test_weighted_bce_matches_hand_calculation():
    logits = torch.tensor([[0.0, 2.0, -1.0, 0.5, -3.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 1.0]])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    sig = [1 / (1 + math.exp(-v)) for v in logits[0].tolist()]
    per = [-(y * math.log(p) + (1 - y) * math.log(1 - p)) for y, p in zip(labels[0].tolist(), sig)]
    expected = (sum(per[:5]) + 2 * per[5]) / 7
    assert math.isclose(float(weighted_bce(logits, labels, weights)), expected, rel_tol=1e-6)


def test_weighted_bce_weights_any_twice():
    labels = torch.zeros(1, 6)
    only_any_wrong = torch.tensor([[-9.0] * 5 + [3.0]])
    only_epidural_wrong = torch.tensor([[3.0] + [-9.0] * 5])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    a, b = float(weighted_bce(only_any_wrong, labels, w)), float(weighted_bce(only_epidural_wrong, labels, w))
    assert math.isclose(a - b, (math.log1p(math.exp(3.0)) - math.log1p(math.exp(-9.0))) / 7, rel_tol=1e-5)


def test_seg_loss_ignores_unknown_masks():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8)
    masks = torch.zeros(3, 1, 8, 8)
    masks[0, 0, 2:5, 2:5] = 1
    known = masked_seg_loss(logits[:2], masks[:2], torch.tensor([1, 0]))
    # A third slice with state -1 (positive, no mask) must not change the loss, whatever its logits.
    with_unknown = masked_seg_loss(logits, masks, torch.tensor([1, 0, -1]))
    assert torch.isclose(known, with_unknown)
    logits2 = logits.clone()
    logits2[2] = 50.0
    assert torch.isclose(known, masked_seg_loss(logits2, masks, torch.tensor([1, 0, -1])))


def test_seg_loss_without_known_masks_is_zero_with_gradient():
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = masked_seg_loss(logits, torch.zeros(2, 1, 4, 4), torch.tensor([-1, -1]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def _toy(size: int = 16, blob: slice = slice(6, 9)):
    """One slice with a 3 x 3 blob of blood (3.5% of the pixels) and the logits of three answers."""
    mask = torch.zeros(1, 1, size, size)
    mask[0, 0, blob, blob] = 1
    right = torch.where(mask > 0, 6.0, -6.0)
    empty = torch.full_like(mask, -6.0)  # "never blood": what plain BCE makes cheap
    shifted = torch.roll(right, shifts=(5, 5), dims=(2, 3))
    return mask, right, empty, shifted


def test_bce_dice_matches_hand_calculation():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1  # 4 blood pixels
    logits = torch.zeros(1, 1, 4, 4)  # p = 0.5 everywhere: BCE = log 2; Dice = (2·2 + 1) / (8 + 4 + 1)
    state = torch.tensor([1])
    assert math.isclose(float(masked_seg_loss(logits, mask, state, "bce")), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(masked_seg_loss(logits, mask, state, "bce_dice")), math.log(2) + 1 - 5 / 13,
                        rel_tol=1e-6)


def test_dice_makes_missing_a_small_bleed_expensive():
    """On a toy slice where the answer is known, the right mask wins under both losses; predicting no blood at all
    costs BCE almost nothing (the blob is 3.5% of the pixels) but costs BCE + Dice close to a whole point."""
    mask, right, empty, shifted = _toy()
    state = torch.tensor([1])
    for kind in ("bce", "bce_dice"):
        best = float(masked_seg_loss(right, mask, state, kind))
        assert best < float(masked_seg_loss(empty, mask, state, kind)) < float(masked_seg_loss(shifted, mask, state,
                                                                                                kind))
    gap_bce = float(masked_seg_loss(empty, mask, state, "bce") - masked_seg_loss(right, mask, state, "bce"))
    gap_dice = float(masked_seg_loss(empty, mask, state, "bce_dice") - masked_seg_loss(right, mask, state, "bce_dice"))
    assert gap_bce < 0.25 and gap_dice > 0.9


def test_batch_dice_keeps_pushing_false_blood_off_empty_slices():
    """A batch of one painted slice (right) and one empty slice with a 10 x 10 patch of false blood: per-slice Dice
    has all but stopped pulling the false patch down (its gradient is 1/(Σp + 1)² ~ 1e-4 a pixel), batch Dice still
    pulls with force comparable to what a blood pixel gets. Both equal the hand formula."""
    mask, right, empty, _ = _toy()
    false_patch = empty.clone()
    false_patch[0, 0, :10, :10] = 6.0
    masks = torch.cat([mask, torch.zeros_like(mask)])
    grads = {}
    for kind, fn in (("bce_dice", soft_dice_loss), ("bce_batch_dice", batch_dice_loss)):
        logits = torch.cat([right, false_patch]).requires_grad_(True)
        fn(logits, masks).backward()
        grads[kind] = float(logits.grad[1, 0, :10, :10].mean())
    assert grads["bce_batch_dice"] > 20 * grads["bce_dice"] > 0
    # Hand value: p = 0.5 on 2 pixels, 1 of them blood: 1 − (2·0.5 + 1) / (1 + 1 + 1).
    assert math.isclose(float(batch_dice_loss(torch.zeros(2), torch.tensor([1.0, 0.0]))), 1 - 2.0 / 3.0, rel_tol=1e-6)


def test_lse_pool_hand_values():
    flat = torch.full((1, 1, 10, 10), 1.5)
    assert math.isclose(float(lse_pool(flat, 5.0)), 1.5, rel_tol=1e-6)  # a uniform map pools to itself
    blob = torch.full((1, 1, 10, 10), -200.0)
    blob[0, 0, :2, :5] = 3.0  # 10% of the slice at logit 3: pools to 3 + log(0.1)/r
    for r in (1.0, 5.0):
        assert math.isclose(float(lse_pool(blob, r)), 3.0 + math.log(0.1) / r, rel_tol=1e-5)


def test_weak_loss_rewards_blood_only_on_positive_slices():
    """Slice labels alone: a blob on the positive slice lowers the loss; the same blob on the negative raises it."""
    _, right, empty, _ = _toy()
    logits = torch.cat([right, empty])  # slice 0 positive (blob lit), slice 1 negative (nothing lit)
    labels_any = torch.tensor([1.0, 0.0])
    no_masks = torch.zeros(2, 1, 16, 16)
    state = torch.tensor([-1, 0])  # a positive without a mask, a known-empty negative
    good = weak_seg_loss(logits, labels_any, no_masks, state, "bce", 5.0)
    swapped = weak_seg_loss(logits.flip(0), labels_any, no_masks, state, "bce", 5.0)
    dark = weak_seg_loss(torch.cat([empty, empty]), labels_any, no_masks, state, "bce", 5.0)
    assert float(good) < float(dark) < float(swapped)


def test_training_loss_composes_phase_and_mask_mode():
    from src.cnn.schedule import Phase
    from src.config import load_config

    mask, right, empty, _ = _toy()
    out = {"logits": torch.zeros(2, 6), "seg_logits": torch.cat([right, empty])}
    batch = {"labels": torch.tensor([[0, 0, 0, 0, 1, 1], [0] * 6], dtype=torch.float32),
             "mask": torch.cat([mask, torch.zeros_like(mask)]), "mask_state": torch.tensor([1, 0])}
    w = torch.tensor([1.0, 1, 1, 1, 1, 2])
    cls = weighted_bce(out["logits"], batch["labels"], w)
    full, none = load_config(None, ["masks=full"]), load_config(None, ["masks=none"])
    seg = masked_seg_loss(out["seg_logits"], batch["mask"], batch["mask_state"], full.seg_loss)
    assert torch.isclose(training_loss(out, batch, Phase("head", 1, 0.0, True), full, w), cls)
    assert torch.isclose(training_loss(out, batch, Phase("joint", 1, 0.5), full, w), 0.5 * cls + 0.5 * seg)
    weak = weak_seg_loss(out["seg_logits"], batch["labels"][:, -1], batch["mask"], batch["mask_state"],
                         none.seg_loss, none.weak_pool_r)
    assert torch.isclose(training_loss(out, batch, Phase("segment", 1, 1.0), none, w), weak)
    assert not torch.isclose(weak, seg)
    with pytest.raises(ValueError, match="resolve"):
        training_loss(out, batch, Phase("segment", 1, 1.0), load_config(None, []), w)  # masks=auto unresolved
    with pytest.raises(InputError, match="seg_loss"):
        masked_seg_loss(right, mask, torch.tensor([1]), "focal")


def test_tversky_costs_a_missed_pixel_more_than_a_false_one():
    """On the toy blob: painting it 3 pixels short costs more than painting it 3 pixels too wide, by a ratio near twice
    Dice's (Dice: 3/16 against 3/22; Tversky: 2.1/9.1 against 0.9/10.9), the right mask beats both, and the index
    equals the hand formula TP / (TP + 0.3 FP + 0.7 FN)."""
    mask, right, _, _ = _toy()
    short = right.clone()
    short[0, 0, 6, 6:9] = -6.0  # one row of the blob missed: 3 pixels
    wide = right.clone()
    wide[0, 0, 5, 6:9] = 6.0  # one row of false blood beside it: 3 pixels
    cost = {name: float(tversky_loss(logits, mask)) for name, logits in
            (("right", right), ("short", short), ("wide", wide))}
    assert cost["right"] < cost["wide"] < cost["short"]
    dice_ratio = float(soft_dice_loss(short, mask) / soft_dice_loss(wide, mask))
    assert math.isclose(dice_ratio, 22 / 16, rel_tol=0.03)  # logits ±6 are p = 0.9975, not 1
    assert cost["short"] / cost["wide"] > 1.6 * dice_ratio
    state = torch.tensor([1])
    assert masked_seg_loss(short, mask, state, "bce_tversky") > masked_seg_loss(wide, mask, state, "bce_tversky")
    half = torch.zeros(1, 1, 2, 2)  # p = 0.5 on 2 blood and 2 empty pixels: TP 1, FP 1, FN 1
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert math.isclose(float(tversky_loss(half, target)), 1 - 2.0 / (2.0 + 0.3 + 0.7), rel_tol=1e-6)
