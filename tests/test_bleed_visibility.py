"""bench/bleed_visibility.py: a bleed's contrast against its ring on images whose HU are known, and the split of
each experiment's volume error by size and contrast."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from src.constants import STUDY
from src.data.windows import window_channel
from src.errors import InputError
from src.paths import ROOT

spec = importlib.util.spec_from_file_location("bleed_visibility", ROOT / "bench" / "bleed_visibility.py")
bleed_visibility = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bleed_visibility)


def blob_slice(blood_hu: float, background_hu: float, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A 6x6 bleed on a flat background, bone (400 HU) two pixels to its right: the ring must leave the bone out."""
    hu = np.full((size, size), background_hu, dtype=np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[10:16, 10:16] = 1
    hu[mask > 0] = blood_hu
    hu[:, 18:] = 400.0
    return hu, mask


def test_slice_sums_compare_the_bleed_with_a_soft_tissue_ring():
    hu, mask = blob_slice(70.0, 30.0)
    blood_sum, blood_n, ring_sum, ring_sq, ring_n = bleed_visibility.slice_sums(hu, mask)
    assert blood_n == 36 and blood_sum == pytest.approx(36 * 70.0)
    # A 3-px ring around a 6x6 square, clipped at column 18 by the bone: rows 7..18, columns 7..17, less the blood.
    assert ring_n == 12 * 11 - 36
    assert ring_sum / ring_n == pytest.approx(30.0) and ring_sq / ring_n == pytest.approx(900.0)


def test_study_visibility_reads_the_blood_window_back_to_hu():
    channel, low, width = window_channel(bleed_visibility.CONTRAST_WINDOW)
    slices = [blob_slice(70.0, 30.0), blob_slice(50.0, 30.0), blob_slice(0.0, 30.0)]
    images = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    for row, (hu, _) in enumerate(slices):
        images[row, channel] = np.rint(np.clip((hu - low) / width, 0, 1) * 255)
    masks = np.stack([mask for _, mask in slices[:2]])
    meta = pd.DataFrame({STUDY: ["a", "a", "b"], "cache_row": [0, 1, 2], "mask_row": [0, 1, -1]})
    vis = bleed_visibility.study_visibility(meta, images, masks, channel, low, width)
    assert list(vis[STUDY]) == ["a"]  # study b has no painted blood
    (row,) = vis.itertuples()
    step = width / 255  # one uint8 level in HU
    assert row.blood_hu == pytest.approx(60.0, abs=step) and row.ring_hu == pytest.approx(30.0, abs=step)
    assert row.contrast_hu == pytest.approx(30.0, abs=2 * step) and row.ring_sd_hu < step


def test_split_errors_by_size_and_contrast():
    vis = pd.DataFrame({STUDY: list("abcd"), "contrast_hu": [10.0, 40.0, 12.0, 50.0], "cnr": [1.0, 4.0, 1.2, 5.0]})
    volumes = {"exp": pd.DataFrame({STUDY: list("abcd"), "true_volume_ml": [2.0, 3.0, 40.0, 60.0],
                                    "pred_volume_ml": [0.0, 3.3, 30.0, 60.0],
                                    "abs_pct_error": [100.0, 10.0, 25.0, 0.0]})}
    table, summary = bleed_visibility.split_errors(vis, volumes)
    assert list(table["exp_pred_over_true"]) == pytest.approx([0.0, 1.1, 0.75, 1.0])
    rows = {entry["studies"]: entry for entry in summary}
    assert rows["small half, low contrast"]["n"] == 1 and rows["small half, low contrast"]["exp MdAPE %"] == 100.0
    assert rows["large half, high contrast"]["exp MdAPE %"] == 0.0
    assert rows["all, any contrast"]["exp MdAPE %"] == pytest.approx(17.5)
    # contrast ranks 1 3 2 4, error ranks 4 2 3 1
    assert rows["all, any contrast"]["exp Spearman(contrast, error)"] == pytest.approx(-1.0)


def test_a_folder_without_study_volumes_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"study_volumes\.csv: not found"):
        bleed_visibility.read_volumes(str(tmp_path))


def test_two_folders_of_one_name_are_a_clear_error(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "exp").mkdir(parents=True)
    with pytest.raises(InputError, match="share a name"):
        bleed_visibility.main(["--pred", str(tmp_path / "a" / "exp"), str(tmp_path / "b" / "exp")])
