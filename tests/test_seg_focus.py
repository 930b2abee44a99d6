"""BloodNet's segmentation focus: half-positive segment epochs (seg_balance) and the Hounsfield prior (hu_prior)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.cnn.fit import segment_subset
from src.cnn.model import blood_hu_prior, build_model, gate_logits
from src.cnn.sampling import EpochSampler, balanced_subset
from src.cnn.schedule import phases_for
from src.config import load_config
from src.constants import BLOOD_HU, WINDOWS


class States:
    """The two SliceDataset fields segment_subset reads."""

    def __init__(self, mask_state):
        self.mask_state = np.asarray(mask_state)


def test_balanced_subset_keeps_every_positive_and_draws_as_many_negatives_per_epoch():
    positive, negative = np.arange(0, 10), np.arange(10, 100)
    first = balanced_subset(positive, negative, seed=1, epoch=0)
    assert len(first) == 20 and set(positive) <= set(first) and len(set(first) & set(negative)) == 10
    assert np.array_equal(first, balanced_subset(positive, negative, seed=1, epoch=0))  # resumable
    assert not np.array_equal(first, balanced_subset(positive, negative, seed=1, epoch=1))  # fresh negatives
    few = balanced_subset(np.arange(5), np.arange(5, 8), seed=0, epoch=0)  # fewer negatives than positives
    assert sorted(few) == list(range(8))


def test_epoch_sampler_follows_the_subset_of_each_epoch():
    pool = np.array([3, 5, 7, 11])
    sampler = EpochSampler(20, seed=0, subset=lambda epoch: pool if epoch == 1 else None)
    assert len(sampler) == 20
    sampler.set_epoch(1)
    drawn = [i for i, _ in sampler]
    assert len(sampler) == 4 and sorted(drawn) == pool.tolist()
    sampler.set_epoch(2)
    assert len(sampler) == 20 and sorted(i for i, _ in sampler) == list(range(20))
    shards = [EpochSampler(20, seed=0, rank=r, world=3, subset=lambda e: pool) for r in range(3)]
    assert all(len(s) == 2 for s in shards) and {i for s in shards for i, _ in s} == set(pool.tolist())


def test_segment_subset_balances_only_the_segment_epochs_on_the_slices_that_teach_blood():
    cfg = load_config(None, ["arch=bloodnet", "seg_epochs=2", "head_epochs=1", "joint_epochs=2", "masks=full",
                             "seg_hard_negatives=0"])  # a uniform draw of negatives: the balance alone
    phases = phases_for(cfg)
    ds = States([1, 1, 0, 0, 0, 0, 0, -1, 0, 0])  # -1: a positive without a mask teaches nothing in full mode
    subset = segment_subset(ds, cfg, phases, seed=0)
    for epoch in (0, 1):
        pool = subset(epoch)
        assert {0, 1} <= set(pool) and 7 not in pool and len(pool) == 4
    assert all(subset(e) is None for e in (2, 3, 4))  # head and joint epochs see the data's own label mix
    cfg.masks = "none"  # weak: every positive is unknown (-1) and teaches through the pooled map
    weak = segment_subset(States([-1, -1, 0, 0, 0, 0]), cfg, phases, seed=0)(0)
    assert {0, 1} <= set(weak) and len(weak) == 4
    cfg.seg_balance = False
    assert segment_subset(ds, cfg, phases, seed=0) is None
    classifier = load_config(None, ["arch=classifier"])
    assert segment_subset(ds, classifier, phases_for(classifier), seed=0) is None


def _window_value(hu: float, window: str = "subdural") -> float:
    _, center, width = next(w for w in WINDOWS if w[0] == window)
    return float(np.clip((hu - center + width / 2) / width, 0, 1))


def test_hu_prior_admits_blood_and_shuts_out_csf_white_matter_and_bone():
    hu = [5.0, 25.0, (BLOOD_HU[0] + BLOOD_HU[1]) / 2, 70.0, 400.0]
    prior = blood_hu_prior(torch.tensor([_window_value(h) for h in hu])).tolist()
    assert prior[2] > 0.99 and prior[3] > 0.95
    assert prior[0] < 0.01 and prior[1] < 0.06 and prior[4] < 0.01


@pytest.mark.parametrize("logit", [-8.0, -1.0, 0.0, 3.0, 12.0])
def test_gated_logit_is_the_logit_of_probability_times_prior(logit):
    seg = torch.full((1, 1, 2, 2), logit, requires_grad=True)
    prior = torch.tensor([0.0, 0.1, 0.5, 1.0]).reshape(1, 1, 2, 2)
    gated = gate_logits(seg, prior)
    expected = torch.sigmoid(torch.tensor(logit)) * prior
    assert torch.allclose(torch.sigmoid(gated), expected.clamp(max=1 - 1e-6), atol=2e-6)
    gated.sum().backward()
    assert torch.isfinite(seg.grad).all()


def test_model_with_hu_prior_cannot_paint_bone_or_air():
    """The gate reads the centre slice's subdural channel: with 2.5D context, a neighbour's blood-range pixels
    must not open it."""
    torch.manual_seed(0)
    cfg = load_config(None, ["arch=bloodnet", "hu_prior=true", "context=1"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.seg_head.bias.fill_(20.0)  # a decoder that calls every pixel blood
    image = torch.zeros(1, cfg.in_chans, 32, 32)
    centre = 3 * cfg.context + 1
    image[:, centre, :16] = _window_value(400.0)  # bone on the top half
    image[:, centre, 16:, :16] = _window_value(60.0)  # blood-range pixels bottom left, air bottom right
    image[:, 1, 16:, 16:] = _window_value(60.0)  # a neighbour slice's blood under the centre's air
    with torch.no_grad():
        prob = torch.sigmoid(model(image, torch.ones(1))["seg_logits"])[0, 0]
    assert prob[20:, 4:12].min() > 0.9
    assert prob[:12].max() < 0.01 and prob[20:, 20:].max() < 0.01


def _cache_with_hyperdense_share(shares: list[float], size: int = 20) -> np.ndarray:
    """uint8 cache rows [n, windows, S, S] from HU slices: 30 HU parenchyma with the given share of 60 HU (a falx,
    a sinus) and a 150 HU bone rim that must not count."""
    from src.data.windows import to_channels

    rows = []
    for share in shares:
        hu = np.full((size, size), 30.0, np.float32)
        hu[0] = 150.0  # bone: above the band
        hu.flat[size : size + round(share * size * size)] = 60.0
        rows.append(to_channels(hu, size))
    return np.stack(rows)


def test_hyperdense_share_counts_the_band_only_from_memmap_or_packed_rows(tmp_path):
    from src.data.packed import ChunkWriter, PackedRows, seal
    from src.data.windows import hyperdense_share

    images = _cache_with_hyperdense_share([0.0, 0.1, 0.25])
    share = hyperdense_share(images, np.array([2, 0, 1]))
    assert share == pytest.approx([0.25, 0.0, 0.1], abs=1e-6)

    writer = ChunkWriter(tmp_path, 0, 0, len(images), images.shape[1:])  # the zstd cache store, one chunk
    for row, image in enumerate(images):
        writer[row] = image
    writer.flush()
    seal(tmp_path, images.shape)
    assert hyperdense_share(PackedRows(tmp_path), np.array([2, 0, 1]), chunk=2) == pytest.approx(share)
    with pytest.raises(ValueError, match="does not fit"):
        hyperdense_share(images, np.array([0]), band=(150.0, 300.0))


def test_hard_negative_weights_go_from_uniform_to_the_hyperdense_pixels():
    from src.cnn.sampling import hard_negative_weights

    share = np.array([0.0, 0.1, 0.3])
    assert hard_negative_weights(share, 0.0) == pytest.approx([1 / 3] * 3)
    strict = hard_negative_weights(share, 1.0)
    assert strict == pytest.approx([0.0, 0.25, 0.75], abs=1e-6) and strict[0] > 0  # still drawable
    half = hard_negative_weights(share, 0.5)
    assert half.sum() == pytest.approx(1.0) and half[0] < 1 / 3 < half[2]
    assert hard_negative_weights(np.zeros(4), 1.0) == pytest.approx([0.25] * 4)  # nothing hyperdense: uniform


def test_seg_hard_negatives_draws_the_mimic_slices_more_often_and_zero_keeps_the_plain_draw():
    shares = [0.2, 0.2] + [0.0] * 6 + [0.3, 0.3]  # two positives, six plain negatives, two mimic-rich negatives
    state = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    ds = States(state)
    ds.images = _cache_with_hyperdense_share(shares)
    ds.neighbours = np.arange(len(state))[:, None]
    cfg = load_config(None, ["arch=bloodnet", "seg_epochs=40", "masks=full", "seg_hard_negatives=0.9"])
    hard = segment_subset(ds, cfg, phases_for(cfg), seed=0)
    mimic_draws = sum(len({8, 9} & set(hard(e))) for e in range(40))
    assert mimic_draws > 0.6 * 80  # uniform would draw each of the eight negatives 2/8 of the time: 20 of 80
    cfg.seg_hard_negatives = 0.0
    plain = segment_subset(ds, cfg, phases_for(cfg), seed=0)
    positive, negative = np.array([0, 1]), np.arange(2, 10)
    assert all(np.array_equal(plain(e), balanced_subset(positive, negative, 0, e)) for e in range(5))
    with pytest.raises(Exception, match="seg_hard_negatives"):
        load_config(None, ["seg_hard_negatives=1.5"])


def test_study_balanced_weights_go_from_uniform_over_slices_to_an_equal_share_per_study():
    from src.cnn.sampling import study_balanced_weights

    study = np.array(["big"] * 4 + ["small"])
    assert study_balanced_weights(study, 0.0) == pytest.approx([0.2] * 5)
    equal = study_balanced_weights(study, 1.0)
    assert equal[:4].sum() == pytest.approx(0.5) and equal[4] == pytest.approx(0.5)
    half = study_balanced_weights(study, 0.5)
    assert half.sum() == pytest.approx(1.0) and half[0] < 0.2 < half[4] < 0.5


def test_seg_study_balance_trains_a_small_bleeds_slices_as_often_as_a_large_ones_and_keeps_the_negatives():
    import pandas as pd

    state = [1] * 6 + [0] * 12  # a 5-slice bleed (study A), a 1-slice bleed (study B), twelve empty slices
    ds = States(state)
    ds.meta = pd.DataFrame({"StudyInstanceUID": ["A"] * 5 + ["B"] + ["C"] * 12})
    cfg = load_config(None, ["arch=bloodnet", "seg_epochs=200", "masks=full", "seg_hard_negatives=0",
                             "seg_study_balance=1"])
    balanced = segment_subset(ds, cfg, phases_for(cfg), seed=0)
    draws = [balanced(e) for e in range(200)]
    small = sum(int((d == 5).sum()) for d in draws)
    large = sum(int((d < 5).sum()) for d in draws)
    assert all(len(d) == 12 for d in draws)  # as many positives as before, as many negatives
    assert 0.8 < small / large < 1.25  # uniform over slices would give 1/5
    cfg.seg_study_balance = 0.0
    plain = segment_subset(ds, cfg, phases_for(cfg), seed=0)
    assert all(np.array_equal(d[d >= 6], plain(e)[plain(e) >= 6]) for e, d in enumerate(draws))  # same negatives
    assert all(set(range(6)) <= set(plain(e)) for e in range(5))  # 0: every positive once, as before
    with pytest.raises(Exception, match="seg_study_balance"):
        load_config(None, ["seg_study_balance=-0.1"])
