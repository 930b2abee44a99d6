"""The training dataset: 2.5D neighbours come from the same series in slice order, and augmentation moves the
image and its mask together (a shifted mask would teach the decoder blood where there is none)."""

import numpy as np
import pandas as pd
import pytest

from src.config import AugConfig
from src.constants import LABELS
from src.data.dataset import SliceDataset, build_augment, neighbour_rows


def series_meta() -> pd.DataFrame:
    """Two series of one study, rows shuffled in the table and in the cache; one slice of series B unreadable."""
    rows = []
    for series, n in (("B", 4), ("A", 3)):
        for k in range(n):
            rows.append({"PatientID": "P", "StudyInstanceUID": "S", "SeriesInstanceUID": series, "slice_index": k})
    meta = pd.DataFrame(rows)
    meta = meta[~((meta["SeriesInstanceUID"] == "B") & (meta["slice_index"] == 2))]  # dropped: neighbours close ranks
    meta = meta.sample(frac=1.0, random_state=3).reset_index(drop=True)
    meta["cache_row"] = np.random.default_rng(1).permutation(len(meta)) + 100
    return meta


def by_slice(meta: pd.DataFrame, series: str, k: int) -> int:
    row = meta[(meta["SeriesInstanceUID"] == series) & (meta["slice_index"] == k)]
    return int(row["cache_row"].iloc[0])


def test_neighbours_are_same_series_in_slice_order_with_repeated_edges():
    meta = series_meta()
    table = neighbour_rows(meta, context=1)
    assert table.shape == (len(meta), 3)
    for i, r in meta.iterrows():
        assert table[i, 1] == r["cache_row"]  # the centre is the slice itself
    i = meta.index[(meta["SeriesInstanceUID"] == "A") & (meta["slice_index"] == 1)][0]
    assert list(table[i]) == [by_slice(meta, "A", 0), by_slice(meta, "A", 1), by_slice(meta, "A", 2)]
    first_a = meta.index[(meta["SeriesInstanceUID"] == "A") & (meta["slice_index"] == 0)][0]
    assert table[first_a, 0] == by_slice(meta, "A", 0)  # edge repeats, never borrows series B
    # Series B lost slice 2: slice 1's next neighbour is slice 3, and slice 3 (the last) repeats itself.
    b1 = meta.index[(meta["SeriesInstanceUID"] == "B") & (meta["slice_index"] == 1)][0]
    b3 = meta.index[(meta["SeriesInstanceUID"] == "B") & (meta["slice_index"] == 3)][0]
    assert list(table[b1]) == [by_slice(meta, "B", 0), by_slice(meta, "B", 1), by_slice(meta, "B", 3)]
    assert list(table[b3]) == [by_slice(meta, "B", 1), by_slice(meta, "B", 3), by_slice(meta, "B", 3)]
    wide = neighbour_rows(meta, context=2)
    a_rows = {by_slice(meta, "A", k) for k in range(3)}
    assert set(wide[first_a]) <= a_rows


def test_dataset_stacks_the_neighbours_channels():
    meta = series_meta()
    size = 8
    images = np.zeros((200, 3, size, size), np.uint8)
    for r in meta["cache_row"]:
        images[r] = r  # each cached slice is filled with its own row number
    meta = meta.assign(**{c: 0 for c in LABELS}, rows=size, cols=size, pixel_spacing_row=1.0, pixel_spacing_col=1.0,
                       slice_spacing=5.0, mask_row=-1)
    ds = SliceDataset(meta, images, context=1)
    i = meta.index[(meta["SeriesInstanceUID"] == "A") & (meta["slice_index"] == 1)][0]
    image = ds[i]["image"].numpy()
    assert image.shape == (9, size, size)
    expected = [by_slice(meta, "A", k) for k in (0, 1, 2)]
    assert [int(image[3 * j, 0, 0]) for j in range(3)] == expected


@pytest.mark.parametrize("seed", range(6))
def test_geometric_augmentation_moves_image_and_mask_together(seed):
    # A bright square painted identically in the image and as the mask: after flips, shifts, scales and
    # rotations the mask must still cover the square (intensity transforms and dropout touch the image only).
    size = 64
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    image[20:34, 24:40] = 200
    mask[20:34, 24:40] = 1
    geometric_only = AugConfig(hflip=0.5, shift_scale_rotate=1.0, brightness_contrast=0.0, coarse_dropout=0.0)
    aug = build_augment(geometric_only)
    aug.set_random_seed(seed)
    out = aug(image=image, mask=mask)
    bright = out["image"][..., 0] > 100
    moved = out["mask"] > 0
    assert moved.sum() > 0.7 * mask.sum()
    overlap = (bright & moved).sum() / (bright | moved).sum()
    assert overlap > 0.85, f"mask and image drifted apart (IoU {overlap:.2f})"
    assert not np.array_equal(moved, mask > 0)  # the affine always applies here: the mask did move


def test_intensity_augmentation_leaves_the_mask_alone():
    size = 32
    image = np.full((size, size, 3), 100, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[8:16, 8:16] = 1
    aug = build_augment(AugConfig(hflip=0.0, shift_scale_rotate=0.0, brightness_contrast=1.0, coarse_dropout=1.0))
    aug.set_random_seed(0)
    out = aug(image=image, mask=mask)
    assert not np.array_equal(out["image"], image)
    np.testing.assert_array_equal(out["mask"], mask)
