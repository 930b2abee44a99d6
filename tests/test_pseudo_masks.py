"""Weak-mode pseudo-mask refinement: masks from a map whose answer is known, the dataset taking them, the epoch it
starts at, and a real run that computes them once and reads them back after a kill."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.cnn import fit
from src.cnn.model import MASK_CUTOFF
from src.cnn.pseudo_masks import PSEUDO_MASKS_FILE, apply_pseudo_masks, compute_pseudo_masks
from src.cnn.schedule import phases_for
from src.cnn.train import run_fold
from src.config import load_config
from src.constants import LABELS
from src.data.dataset import SliceDataset

S = 16


class _BrightIsBlood(nn.Module):
    """logit = 20·x − 10 of the first channel (x in [0, 1]): the map's answer is the image."""

    volume_cutoff = MASK_CUTOFF

    def forward(self, image: torch.Tensor, voxel_mm3: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"seg_logits": 20.0 * image[:, :1] - 10.0}


def _slices() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """8 empty slices with a 4-pixel mimic (p ≈ 0.98), 4 positives with a 3x3 bleed (p ≈ 1) beside the same mimic,
    and one positive whose bleed the map cannot see. Returns metadata, images and the true bleed of each slice."""
    n = 13
    images = np.full((n, 3, S, S), 20, np.uint8)
    images[:, :, 0, :4] = 180  # the mimic, on every slice
    truth = np.zeros((n, S, S), bool)
    for i in range(8, 12):
        truth[i, 5 + i - 8 : 8 + i - 8, 6:9] = True
    for i in range(8, 12):
        images[i, :, truth[i]] = 240
    any_label = np.r_[np.zeros(8), np.ones(5)].astype(int)
    meta = pd.DataFrame({
        "ID": [f"ID_{i:09x}" for i in range(n)], "PatientID": "ID_p", "StudyInstanceUID": "ID_s",
        "SeriesInstanceUID": "ID_r", "slice_index": np.arange(n), "cache_row": np.arange(n), "mask_row": -1,
        "rows": S, "cols": S, "pixel_spacing_row": 1.0, "pixel_spacing_col": 1.0, "slice_spacing": 1.0,
        **{name: any_label for name in LABELS},
    })
    return meta, images, truth


def test_pseudo_masks_keep_what_the_map_calls_blood_above_anything_on_empty_slices(tmp_path):
    meta, images, truth = _slices()
    ds = SliceDataset(meta, images)  # weak mode: no masks, positives unknown
    assert (ds.mask_state[8:] == -1).all() and (ds.mask_state[:8] == 0).all()
    path = tmp_path / PSEUDO_MASKS_FILE
    cutoff = compute_pseudo_masks(_BrightIsBlood(), ds, torch.device("cpu"), path, batch_size=4)
    p_mimic = 1 / (1 + np.exp(-(20 * 180 / 255 - 10)))
    assert p_mimic < cutoff < 1.0  # the mimic fills 4 of 256 pixels of every empty slice: far above 0.01%
    masks = np.load(path)
    assert masks.shape == (5, S, S) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[:4].astype(bool), truth[8:12])  # the bleeds exactly, the mimic left out
    assert not masks[4].any()  # the bleed the map cannot see

    assert apply_pseudo_masks(ds, path) == 4
    assert (ds.mask_state[8:12] == 1).all() and ds.mask_state[12] == -1 and (ds.mask_state[:8] == 0).all()
    for i in range(8, 12):  # items hand the loss the pseudo-mask, as they would a painted one
        np.testing.assert_array_equal(ds[i]["mask"][0].numpy().astype(bool), truth[i])
    assert not ds[12]["mask"].any() and int(ds[12]["mask_state"]) == -1


def test_refinement_starts_after_the_segment_epochs_of_the_weak_mode_only():
    weak = load_config(None, ["masks=none", "weak_refine=true", "seg_epochs=3", "head_epochs=1", "joint_epochs=6"])
    assert fit.refine_epoch(weak, phases_for(weak)) == 3
    for sets in (["masks=none"], ["masks=full", "weak_refine=true"], ["masks=none", "weak_refine=true", "seg_epochs=0"],
                 ["arch=classifier", "masks=none", "weak_refine=true"]):
        cfg = load_config(None, sets)
        assert fit.refine_epoch(cfg, phases_for(cfg)) is None, sets


def test_weak_refine_run_computes_pseudo_masks_once_and_reads_them_back_after_a_kill(tiny_data, monkeypatch):
    from src import paths

    cfg = load_config(None, ["arch=bloodnet", "backbone=resnet10t", "image_size=64", "batch_size=16", "num_workers=0",
                             "context=0", "tta_flip=false", "limit_train_batches=1", "seg_epochs=1", "head_epochs=0",
                             "joint_epochs=2", "masks=none", "weak_refine=true", "exp=t_refine"])
    cfg.data_dir = str(tiny_data)
    computed, applied = [], []
    real_compute, real_apply, real_write = fit.compute_pseudo_masks, fit.apply_pseudo_masks, fit.write_epochs
    monkeypatch.setattr(fit, "compute_pseudo_masks", lambda *a, **k: computed.append(1) or real_compute(*a, **k))
    monkeypatch.setattr(fit, "apply_pseudo_masks", lambda ds, p: applied.append(real_apply(ds, p)) or applied[-1])

    def write_then_die(history, out_dir, tag):
        real_write(history, out_dir, tag)
        if len(history) == 2:  # killed after the first refined epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(fit, "write_epochs", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_fold(cfg, 0, tiny_data)
    path = paths.WORK / "models" / "t_refine" / "fold0" / PSEUDO_MASKS_FILE
    assert computed == [1] and path.exists()
    first = np.load(path).copy()
    monkeypatch.setattr(fit, "write_epochs", real_write)
    run_fold(cfg, 0, tiny_data)  # resumes at epoch 3, past the refinement: the same masks, read back
    assert computed == [1] and len(applied) == 2 and applied[0] == applied[1]
    np.testing.assert_array_equal(np.load(path), first)
