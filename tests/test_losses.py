"""Losses: weighted BCE against a hand calculation; the segmentation loss ignores slices with unknown masks."""

import math

import torch

from src.cnn.losses import masked_seg_loss, weighted_bce


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
