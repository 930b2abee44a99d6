"""The weak mode's volume cutoff: the histogram rule on known logits, calibration on a model whose maps are known,
and the trainer writing it into the checkpoint that predictions, triage and overlays then read."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.cnn import volume_cutoff as vc
from src.cnn.checkpoints import VOLUME_CUTOFF_KEY, load_model, read_checkpoint
from src.cnn.model import MASK_CUTOFF
from src.cnn.train import run_fold, split_fold
from src.config import load_config
from src.constants import LABELS, VOLUME_COL
from src.data.dataset import SliceDataset
from src.predictions import exp_dir

S = 16


def _histogram(logits: np.ndarray) -> torch.Tensor:
    clipped = torch.as_tensor(logits, dtype=torch.float32).clamp(-vc.LOGIT_RANGE, vc.LOGIT_RANGE - 1e-6)
    return torch.histc(clipped, vc.LOGIT_BINS, -vc.LOGIT_RANGE, vc.LOGIT_RANGE)


def test_cutoff_from_histogram_lets_through_at_most_the_share():
    logits = np.full(10_000, -5.0)
    logits[:5] = 3.0  # 5 pixels in 10,000 are confident false blood
    # A share of 1 in 1,000 tolerates them: the floor (0.5) is the cutoff.
    assert vc.cutoff_from_histogram(_histogram(logits), share=1e-3) == MASK_CUTOFF
    # 1 in 10,000 does not: the cutoff goes just above them, so they no longer count.
    cutoff = vc.cutoff_from_histogram(_histogram(logits), share=1e-4)
    assert 1 / (1 + math.exp(-3.0)) < cutoff <= 1 / (1 + math.exp(-3.02))
    # Logits spread evenly over ±5: the cutoff sits at the matching quantile (the top 1% lie above logit 4.9).
    spread = np.linspace(-5, 5, 100_001)
    cutoff = vc.cutoff_from_histogram(_histogram(spread), share=0.01)
    assert abs(math.log(cutoff / (1 - cutoff)) - 4.9) <= 0.02
    # A floor above every candidate wins.
    assert vc.cutoff_from_histogram(_histogram(spread), share=0.5, floor=0.9) == 0.9


class _BrightIsBlood(nn.Module):
    """A map that calls each pixel's first channel blood: logit = 20·x − 10 (x in [0, 1])."""

    volume_cutoff = MASK_CUTOFF

    def forward(self, image: torch.Tensor, voxel_mm3: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"seg_logits": 20.0 * image[:, :1] - 10.0}


def _empty_slices(n: int, bright_px: int, level: int) -> tuple[pd.DataFrame, np.ndarray]:
    """n known-empty slices of dark pixels, `bright_px` of them at uint8 `level` (a mimic the map calls blood)."""
    images = np.full((n, 3, S, S), 20, np.uint8)
    images[:, :, 0, :bright_px] = level
    meta = pd.DataFrame({
        "ID": [f"ID_{i:09x}" for i in range(n)], "PatientID": "ID_p", "StudyInstanceUID": "ID_s",
        "SeriesInstanceUID": "ID_r", "slice_index": np.arange(n), "cache_row": np.arange(n), "mask_row": -1,
        "rows": S, "cols": S, "pixel_spacing_row": 1.0, "pixel_spacing_col": 1.0, "slice_spacing": 1.0,
        **{name: 0 for name in LABELS},
    })
    return meta, images


@pytest.mark.parametrize("tta", [False, True])
def test_calibrate_raises_the_cutoff_above_false_blood_on_empty_slices(tta):
    meta, images = _empty_slices(8, bright_px=4, level=204)  # 4 of 256 pixels at logit 20·0.8 − 10 = 6
    ds = SliceDataset(meta, images)
    p_mimic = 1 / (1 + math.exp(-(20 * 204 / 255 - 10)))
    cutoff = vc.calibrate(_BrightIsBlood(), ds, torch.device("cpu"), tta_flip=tta, share=1e-3)
    assert p_mimic < cutoff < 1.0  # 4/256 of the pixels would be 16x the share: they are cut out
    assert vc.calibrate(_BrightIsBlood(), ds, torch.device("cpu"), tta_flip=tta, share=0.05) == MASK_CUTOFF


def test_known_empty_sample_draws_only_negatives():
    meta, _ = _empty_slices(10, 0, 0)
    meta.loc[:3, "any"] = 1
    sample = vc.known_empty_sample(meta, n=4, seed=1)
    assert len(sample) == 4 and (sample["any"] == 0).all() and sample["ID"].is_unique
    assert len(vc.known_empty_sample(meta, n=100)) == 6
    assert vc.known_empty_sample(meta.assign(any=1)).empty


def test_weak_mode_writes_its_cutoff_into_the_checkpoint_and_predicts_with_it(tiny_data):
    """run_fold with masks=none calibrates once, stores it in best.pt; load_model (triage, overlays) reads it back;
    with painted masks nothing is calibrated and the cutoff stays 0.5."""
    from src import paths

    # decoder_width=0.5: the barely trained map this was written against, which calls a few empty pixels p > 0.5, so
    # calibration has something to raise (a narrower decoder's first steps may call none, and keep the floor of 0.5)
    sets = ["arch=bloodnet", "backbone=resnet10t", "image_size=64", "batch_size=16", "num_workers=0", "context=0",
            "tta_flip=false", "limit_train_batches=2", "seg_epochs=1", "head_epochs=0", "joint_epochs=1",
            "decoder_width=0.5"]
    cutoffs = {}
    for masks in ("none", "full"):
        cfg = load_config(None, [*sets, f"masks={masks}", f"exp=t_cutoff_{masks}"])
        cfg.data_dir = str(tiny_data)
        run_fold(cfg, 0, tiny_data)
        best = paths.WORK / "models" / f"t_cutoff_{masks}" / "fold0" / "best.pt"
        state = read_checkpoint(best)
        cutoffs[masks] = state.get(VOLUME_CUTOFF_KEY)
        model, _ = load_model(best)
        assert model.volume_cutoff == (cutoffs[masks] if masks == "none" else MASK_CUTOFF)
        if masks == "none":  # the OOF volumes are the calibrated model's: pixels at p >= its cutoff
            _, valid, images, _ = split_fold(cfg, tiny_data, 0)
            ds = SliceDataset(valid, images, cfg.context)
            batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
            with torch.inference_mode():
                expected = model(batch["image"].float() / 255.0, batch["voxel_mm3"])["mask_volume_mm3"].numpy()
            oof = pd.read_csv(exp_dir(f"t_cutoff_{masks}") / "fold0_valid.csv").set_index("ID").loc[valid["ID"]]
            np.testing.assert_allclose(oof[VOLUME_COL].to_numpy(), expected, rtol=1e-4, atol=1e-3)
    assert cutoffs["full"] is None
    assert MASK_CUTOFF < cutoffs["none"] < 1.0  # this barely trained map calls 0.01% of empty pixels p > 0.51


def test_weak_mode_without_empty_training_slices_keeps_its_model_and_says_so(tiny_data, monkeypatch, capsys):
    """Labels that name no empty slice: the run still writes its predictions; the cutoff stays 0.5, with a warning."""
    from src import paths

    monkeypatch.setattr("src.cnn.train.known_empty_sample", lambda meta: meta.iloc[:0])
    cfg = load_config(None, ["arch=bloodnet", "backbone=resnet10t", "image_size=64", "batch_size=16",
                             "num_workers=0", "context=0", "tta_flip=false", "limit_train_batches=1", "seg_epochs=1",
                             "head_epochs=0", "joint_epochs=1", "masks=none", "exp=t_cutoff_noempty"])
    cfg.data_dir = str(tiny_data)
    run_fold(cfg, 0, tiny_data)
    assert "volume cutoff cannot be calibrated and stays 0.5" in capsys.readouterr().out
    best = paths.WORK / "models" / "t_cutoff_noempty" / "fold0" / "best.pt"
    assert VOLUME_CUTOFF_KEY not in read_checkpoint(best)
    assert load_model(best)[0].volume_cutoff == MASK_CUTOFF
    assert (exp_dir("t_cutoff_noempty") / "fold0_valid.csv").exists()


def test_triage_overlay_draws_blood_at_the_models_cutoff():
    """Triage draws the mean map at the mean of its models' cutoffs: a pixel at p = 0.7 is red under 0.5, not 0.8."""
    import cv2

    from src.triage.ensemble import Ensemble
    from src.triage.outputs import overlay_png

    cfg = load_config(None, ["arch=bloodnet"])
    models = [_BrightIsBlood(), _BrightIsBlood()]
    models[0].volume_cutoff, models[1].volume_cutoff = 0.7, 0.9
    ens = Ensemble("e", cfg, models, [], {}, "none")
    assert ens.seg_cutoff == pytest.approx(0.8)
    image = np.full((3, S, S), 100, np.uint8)
    seg = np.zeros((S, S), np.float32)
    seg[4:8, 4:8] = 0.7

    def red_pixels(cutoff: float) -> int:
        bgr = cv2.imdecode(np.frombuffer(overlay_png(image, seg, cutoff), np.uint8), cv2.IMREAD_COLOR).astype(int)
        return int(((bgr[..., 2] - bgr[..., 1]) > 60).sum())

    assert red_pixels(MASK_CUTOFF) > 0 and red_pixels(ens.seg_cutoff) == 0
