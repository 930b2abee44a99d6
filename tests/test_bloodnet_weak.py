"""BloodNet without masks: the weak mode finds a blob from slice labels alone, `masks: auto` picks it on data without
masks, and the scale augmentation rescales the voxel volume it hands the model."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from src.cnn.loop import Runtime, make_optimizer, train_one_epoch
from src.cnn.model import build_model
from src.cnn.schedule import Phase
from src.config import AugConfig, load_config
from src.constants import LABELS
from src.data.dataset import SliceDataset, build_augment, resolve_mask_mode
from src.errors import InputError

S = 32
BLOB = 6


def _blob_set(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """n slices of noise; every other one holds a bright BLOB x BLOB square at a random place (labels say only
    whether it is there). Returns the metadata, uint8 images [n, 3, S, S] and the true blob masks [n, S, S]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(40, 110, (n, 3, S, S)).astype(np.uint8)
    truth = np.zeros((n, S, S), bool)
    positive = np.arange(n) % 2 == 0
    for i in np.flatnonzero(positive):
        y, x = rng.integers(2, S - BLOB - 2, 2)
        truth[i, y : y + BLOB, x : x + BLOB] = True
        images[i, :, y : y + BLOB, x : x + BLOB] = 230
    meta = pd.DataFrame({
        "ID": [f"ID_{i:09x}" for i in range(n)], "PatientID": "ID_p", "StudyInstanceUID": "ID_s",
        "SeriesInstanceUID": "ID_r", "slice_index": np.arange(n), "cache_row": np.arange(n), "mask_row": -1,
        "rows": S, "cols": S, "pixel_spacing_row": 1.0, "pixel_spacing_col": 1.0, "slice_spacing": 1.0,
    })
    for name in LABELS:
        meta[name] = positive.astype(int)
    return meta, images, truth


def _recalibrate_batchnorm(model: torch.nn.Module, loader: DataLoader) -> None:
    """Exact BatchNorm averages over the training set: 24 steps at momentum 0.1 leave the running statistics far
    from the batch statistics the weights were trained with, and eval mode would score that gap, not the map."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in loader:
            model(batch["image"].float() / 255.0, batch["voxel_mm3"])


def test_weak_mode_learns_where_the_blob_is_from_slice_labels_alone():
    """Real training code (train_one_epoch, masks=none): after training on image labels only, the map's brightest
    pixels on unseen positive slices lie inside the blob, far above chance (the blob is 3.5% of the slice)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 32 px tensors: a second thread only waits on the first (10x slower on busy cores)
    try:
        torch.manual_seed(0)
        cfg = load_config(None, ["backbone=resnet10t", "arch=bloodnet", "masks=none", "context=0", "drop_rate=0",
                                 "lr=3e-3", "warmup_epochs=0", "batch_size=16"])
        meta, images, _ = _blob_set(64, seed=0)
        train_ds = SliceDataset(meta, images)  # no masks at all: positives are unknown, negatives known empty
        assert sorted(set(train_ds.mask_state.tolist())) == [-1, 0]
        model = build_model(cfg)
        rt = Runtime(0, 1, torch.device("cpu"), None, False)
        phase = Phase("segment", 6, 1.0)
        optimizer = make_optimizer(cfg, model, head_only=False)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        for epoch in range(phase.epochs):
            loader = DataLoader(train_ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(epoch))
            train_one_epoch(model, loader, optimizer, scaler, phase, epoch, cfg, rt, torch.tensor(cfg.class_weights),
                            "weak")
        _recalibrate_batchnorm(model, DataLoader(train_ds, batch_size=16))
        test_meta, test_images, truth = _blob_set(16, seed=1)
        with torch.no_grad():
            x = torch.from_numpy(test_images).float() / 255.0
            seg = model.eval()(x, torch.ones(len(x)))["seg_logits"][:, 0].numpy()
    finally:
        torch.set_num_threads(threads)
    hits = []
    for i in np.flatnonzero(test_meta["any"].to_numpy()):
        top = np.argsort(seg[i].ravel())[-BLOB * BLOB:]  # as many pixels as the blob has
        hits.append(truth[i].ravel()[top].mean())
    chance = BLOB * BLOB / S / S
    assert np.mean(hits) > 7 * chance, f"top pixels inside the blob: {np.mean(hits):.2f} (chance {chance:.3f})"


def test_resolve_mask_mode():
    rows_with, rows_without = np.array([-1, 0, -1]), np.array([-1, -1])
    masks = np.zeros((1, S, S), np.uint8)
    assert resolve_mask_mode("auto", masks, rows_with) == "full"
    assert resolve_mask_mode("auto", None, rows_without) == "none"
    assert resolve_mask_mode("auto", masks, rows_without) == "none"  # a masks array that no slice points into
    assert resolve_mask_mode("none", masks, rows_with) == "none"  # masks withheld on purpose
    with pytest.raises(InputError, match="masks=full but no training slice has a mask"):
        resolve_mask_mode("full", None, rows_without, "dataX")
    with pytest.raises(InputError, match="config key masks"):
        resolve_mask_mode("some", masks, rows_with)


def test_masks_auto_picks_the_weak_mode_on_data_without_masks(tiny_data, tmp_path):
    """The trainer's data step on a copy of the tiny set without masks/: masks=auto becomes none, and no positive
    slice is called empty; on the set with masks it stays full."""
    from src.cnn.train import prepare_data

    bare = tmp_path / "bare"
    shutil.copytree(tiny_data, bare, ignore=shutil.ignore_patterns("masks", "true_volumes.csv"))
    rt = Runtime(0, 1, torch.device("cpu"), None, False)
    for data, expected in ((bare, "none"), (tiny_data, "full")):
        cfg = load_config(None, ["image_size=64", "arch=bloodnet"])
        _, _, train_ds, _ = prepare_data(cfg, data, 0, rt)
        assert cfg.masks == expected
        positive = train_ds.labels[:, LABELS.index("any")] == 1
        assert positive.any() and (train_ds.mask_state[positive] != 0).all()
        assert (train_ds.mask_state[positive] == 1).any() == (expected == "full")


def test_scale_augmentation_scales_the_voxel_volume():
    """A zoom by s spreads one voxel's tissue over s² pixels: the item's voxel volume is divided by s²."""
    meta, images, _ = _blob_set(2, seed=0)
    zoom = AugConfig(hflip=0.0, shift_scale_rotate=1.0, brightness_contrast=0.0, coarse_dropout=0.0)
    ds = SliceDataset(meta, images, augment=build_augment(zoom))
    plain = SliceDataset(meta, images)
    seen = []
    # OpenCV's worker threads, once started here, leave a later fork (the cache builder's process pool in
    # test_data_layer) deadlocked; one thread keeps this test from changing the process for the tests after it.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(0)
    try:
        for _ in range(6):
            seen.append(float(ds[0]["voxel_mm3"]) / float(plain[0]["voxel_mm3"]))
    finally:
        cv2.setNumThreads(threads)
    assert all(1 / 1.1**2 - 1e-4 <= r <= 1 / 0.9**2 + 1e-4 for r in seen) and len({round(r, 6) for r in seen}) > 1
    assert float(plain[0]["voxel_mm3"]) == pytest.approx(1.0)  # no augmentation: the voxel as measured
