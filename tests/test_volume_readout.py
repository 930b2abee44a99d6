"""bench/volume_readout.py: each read-out of a map whose probabilities are known, and the per-read-out table."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.constants import FOLD_COL, ID_COL, SERIES_KEYS, STUDY, VOLUME_COL
from src.errors import InputError
from src.paths import ROOT

spec = importlib.util.spec_from_file_location("volume_readout", ROOT / "bench" / "volume_readout.py")
volume_readout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(volume_readout)


class FixedMap(nn.Module):
    """A 'model' whose seg probability is a fixed 2x4 map, read in image coordinates, whatever it is shown: a flipped
    input therefore sees the map mirrored once flipped back, which is what makes the two views disagree. Its
    mask_volume_mm3 follows BloodNet's rule (pixels at p >= volume_cutoff, times the voxel volume)."""

    def __init__(self, prob: torch.Tensor, cutoff: float = 0.5):
        super().__init__()
        self.logits = torch.logit(prob)
        self.volume_cutoff = cutoff

    def forward(self, image, voxel_mm3):
        logits = self.logits.expand(len(image), 1, *self.logits.shape)
        count = (torch.sigmoid(logits) >= self.volume_cutoff).sum(dim=(1, 2, 3)).float()
        return {"seg_logits": logits, "mask_volume_mm3": count * voxel_mm3.float()}


def test_readouts_of_a_known_map():
    # Flip-averaging mirrors column j onto 3 - j: column 0 pairs 0.8 with 0.1 (mean 0.45), column 1 pairs 0.6 with
    # 0.2 (mean 0.4); the second row is 0.55 everywhere (mean 0.55).
    prob = torch.tensor([[0.8, 0.6, 0.2, 0.1], [0.55, 0.55, 0.55, 0.55]])
    model = FixedMap(prob)
    out = volume_readout.readout_volumes(model, torch.zeros(2, 3, 2, 4), torch.tensor([2.0, 3.0]),
                                         cutoffs=(0.5, 0.42), soft_floors=(0.0, 0.5))
    # deployed: each view counts its own pixels at p >= 0.5 (0.8, 0.6 and the four 0.55 = 6 in both), averaged.
    np.testing.assert_allclose(out["deployed"], [6 * 2.0, 6 * 3.0])
    # On the averaged map the first row peaks at 0.45: hard@0.5 keeps the second row only, hard@0.42 adds columns
    # 0 and 3.
    np.testing.assert_allclose(out["hard@0.5"], [4 * 2.0, 4 * 3.0])
    np.testing.assert_allclose(out["hard@0.42"], [6 * 2.0, 6 * 3.0])
    # soft@0: the whole averaged map, 0.45 + 0.4 + 0.4 + 0.45 + 4 x 0.55 = 3.9 pixels; soft@0.5: the second row, 2.2.
    np.testing.assert_allclose(out["soft@0"], [3.9 * 2.0, 3.9 * 3.0], rtol=1e-5)
    np.testing.assert_allclose(out["soft@0.5"], [2.2 * 2.0, 2.2 * 3.0], rtol=1e-5)
    # A higher deployed cutoff (a weak-mode checkpoint's) counts fewer pixels: 0.8 and 0.6 only, per view.
    np.testing.assert_allclose(volume_readout.readout_volumes(FixedMap(prob, 0.58), torch.zeros(1, 3, 2, 4),
                                                              torch.tensor([1.0]))["deployed"], [2.0])


def test_error_parts_split_the_deployed_mask():
    """A painted 2x2 bleed; view 1 calls it plus one pixel beside it and one far away, view 2 (its own map) only
    half the bleed: found/missed/edge/far are each view's pixel counts averaged, times the voxel volume."""
    blood = torch.zeros(2, 1, 8, 8)
    blood[0, 0, 2:4, 2:4] = 1
    first, second = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    first[0, 0, 2:4, 2:4] = 0.9
    first[0, 0, 2, 5] = 0.7  # two columns right of the bleed: within NEAR_PX, its edge drawn too wide
    first[0, 0, 7, 7] = 0.6  # far from it: a mimic
    second[0, 0, 2, 2:4] = 0.8
    first[1, 0, 0, 0] = 0.99  # slice 1: no mask known, so no parts
    parts = volume_readout.error_parts([first, second], 0.5, blood, torch.tensor([True, False]),
                                       torch.tensor([10.0, 10.0]))
    assert volume_readout.NEAR_PX >= 2
    assert parts["found"][0] == pytest.approx((4 + 2) / 2 * 10)
    assert parts["missed"][0] == pytest.approx((0 + 2) / 2 * 10)
    assert parts["false_edge"][0] == pytest.approx((1 + 0) / 2 * 10)
    assert parts["false_far"][0] == pytest.approx((1 + 0) / 2 * 10)
    assert all(np.isnan(parts[p][1]) for p in volume_readout.ERROR_PARTS)
    # A cutoff above every value calls nothing: all painted blood is missed.
    none_called = volume_readout.error_parts([first, second], 0.995, blood, torch.tensor([True, True]),
                                             torch.tensor([10.0, 10.0]))
    assert none_called["missed"][0] == pytest.approx(40.0) and none_called["found"][0] == 0


def test_error_table_by_slice_type_and_bleed_size():
    # Studies A (1 mL true, small) and B (10 mL true, large) positive, C negative; parts in mm³ per slice.
    study = ["A", "A", "B", "B", "C"]
    meta = pd.DataFrame({ID_COL: ["a1", "a2", "b1", "b2", "c1"], STUDY: study, **{k: study for k in SERIES_KEYS},
                         "position": [0.0, 5.0, 0.0, 5.0, 0.0], "any": [1, 0, 1, 1, 0]})
    true = pd.DataFrame({ID_COL: meta[ID_COL], VOLUME_COL: [1000.0, 0.0, 6000.0, 4000.0, 0.0]})
    slices = pd.DataFrame({ID_COL: meta[ID_COL], FOLD_COL: 0,
                           "found": [500.0, 0, 5000, 4000, 0], "missed": [500.0, 0, 1000, 0, 0],
                           "false_edge": [2000.0, 0, 0, 0, 0], "false_far": [0.0, 300, 0, 0, 100]})
    table = volume_readout.error_table(slices, meta, true).set_index("rows")
    negative = table.loc["negative slices, mean per slice"]
    assert negative["n"] == 2 and negative["false_far"] == pytest.approx(0.2)  # (300 + 100) / 2 mm³ in mL
    positive = table.loc["positive slices, mean per slice"]
    assert positive["n"] == 3 and positive["false_edge"] == pytest.approx(2000 / 3 / 1000)
    small = table.loc[next(r for r in table.index if r.startswith("positive studies under"))]
    assert small["n"] == 1 and small["true_ml"] == pytest.approx(1.0)
    assert small["false_edge"] == pytest.approx(2.0) and small["false_far"] == pytest.approx(0.3)
    large = table.loc[next(r for r in table.index if r.startswith("positive studies from"))]
    assert large["found"] == pytest.approx(9.0) and large["missed"] == pytest.approx(1.0)


def test_readout_table_scores_each_readout():
    # Four positive studies (true 100, 50, 30, 200 mm³ over two slices each; A, D large, B, C small) and a negative.
    study = ["A", "A", "B", "B", "C", "C", "D", "D", "E"]
    meta = pd.DataFrame({ID_COL: [f"s{i}" for i in range(9)], STUDY: study, **{k: study for k in SERIES_KEYS},
                         "position": [0.0, 5.0] * 4 + [0.0], "any": [1, 1, 1, 1, 1, 1, 1, 1, 0]})
    exact = np.array([50.0, 50, 25, 25, 15, 15, 100, 100, 0])
    true = pd.DataFrame({ID_COL: meta[ID_COL], VOLUME_COL: exact})
    small = np.array([False, False, True, True, True, True, False, False, False])
    slices = pd.DataFrame({ID_COL: meta[ID_COL], FOLD_COL: [0, 0, 0, 0, 1, 1, 1, 1, 1],
                           "deployed": exact * 2 + np.r_[np.zeros(8), 1000.0],  # +100% on each, 1 mL on the negative
                           "exact": exact,
                           "small_doubled": np.where(small, exact * 2, exact)})
    table = volume_readout.readout_table(slices, meta, true, n_boot=200).set_index("readout")
    assert table.loc["exact", "mdape_pct"] == pytest.approx(0.0)
    assert table.loc["deployed", "mdape_pct"] == pytest.approx(100.0)
    assert table.loc["deployed", "fold0_mdape_pct"] == pytest.approx(100.0)
    assert table.loc["exact", "spearman"] == pytest.approx(1.0)
    assert table.loc["deployed", "false_blood_negative_ml"] == pytest.approx(1.0)
    assert table.loc["exact", "false_blood_negative_ml"] == pytest.approx(0.0)
    # The halves split at the median true volume: the small bleeds doubled, the large ones exact.
    assert table.loc["small_doubled", "small_half_mdape_pct"] == pytest.approx(100.0)
    assert table.loc["small_doubled", "large_half_mdape_pct"] == pytest.approx(0.0)
    # Paired against deployed on the same resamples: exact is lower in every one, by exactly 100 points.
    assert table.loc["exact", "p_lower_mdape_than_deployed"] == pytest.approx(1.0)
    assert table.loc["exact", "mdape_diff_lo"] == pytest.approx(-100.0)
    assert table.loc["exact", "mdape_diff_hi"] == pytest.approx(-100.0)
    assert 0 < table.loc["small_doubled", "p_lower_mdape_than_deployed"] <= 1
    assert np.isnan(table.loc["deployed", "p_lower_mdape_than_deployed"])
    # Without a deployed column there is nothing to pair against.
    alone = volume_readout.readout_table(slices.drop(columns="deployed"), meta, true, n_boot=200)
    assert alone["p_lower_mdape_than_deployed"].isna().all()


class AllBlood(nn.Module):
    """Calls every pixel of whatever it is shown blood, at BloodNet's rule (pixels at p >= cutoff x voxel volume)."""

    volume_cutoff = 0.5

    def forward(self, image, voxel_mm3):
        logits = torch.full((len(image), 1, *image.shape[-2:]), 10.0)
        count = (torch.sigmoid(logits) >= self.volume_cutoff).sum(dim=(1, 2, 3)).float()
        return {"seg_logits": logits, "mask_volume_mm3": count * voxel_mm3.float()}


def test_a_slice_read_at_any_input_size_holds_the_same_millilitres(tiny_data):
    """The cache at a larger size has more, smaller pixels: a map that calls the whole slice blood reads the field
    of view's volume at either size (padded square of max(rows, cols) native pixels x slice spacing), in the order
    of the IDs asked for."""
    from src.config import load_config

    cfg = load_config(None, ["context=0"])
    valid, _, _ = volume_readout.validation_slices(tiny_data, cfg, 0, 48)
    ids = valid[ID_COL].to_numpy()[::-1]
    at_48 = volume_readout.deployed_at_size(AllBlood(), cfg, tiny_data, 0, ids, 48)
    at_80 = volume_readout.deployed_at_size(AllBlood(), cfg, tiny_data, 0, ids, 80)
    rows = valid.set_index(ID_COL).loc[ids]
    field_mm3 = (np.maximum(rows["rows"], rows["cols"]) ** 2 * rows["pixel_spacing_row"] * rows["pixel_spacing_col"]
                 * rows["slice_spacing"]).to_numpy()
    np.testing.assert_allclose(at_48, field_mm3, rtol=1e-5)
    np.testing.assert_allclose(at_80, field_mm3, rtol=1e-5)
    with pytest.raises(InputError, match=r"cache at 48 px lacks 1 of fold 0's validation slices \(e\.g\. ID_nope\)"):
        volume_readout.deployed_at_size(AllBlood(), cfg, tiny_data, 0, np.append(ids, "ID_nope"), 48)


def test_input_sizes_are_pixels():
    with pytest.raises(InputError, match="--input-sizes 96 0: sizes are pixels"):
        volume_readout.main(["--exp", "x", "--input-sizes", "96", "0"])


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(volume_readout.paths, "WORK", tmp_path)
    with pytest.raises(InputError, match=r"best\.pt: not found"):
        volume_readout.deployed_model("no-such-exp", 0)


def test_deployed_readout_is_what_the_oof_holds(tiny_data):
    """On a trained fold, the bench's `deployed` column reproduces the OOF's blood_volume_mm3 slice for slice (both
    flip views), and the table and per-slice files are written."""
    from src import paths
    from src.cnn.train import run_fold
    from src.config import load_config
    from src.predictions import exp_dir

    cfg = load_config(None, ["arch=bloodnet", "backbone=resnet10t", "image_size=64", "batch_size=16", "num_workers=0",
                             "context=0", "tta_flip=true", "limit_train_batches=2", "seg_epochs=1", "head_epochs=0",
                             "joint_epochs=1", "exp=t_readout"])
    cfg.data_dir = str(tiny_data)
    run_fold(cfg, 0, tiny_data)
    assert volume_readout.main(["--exp", "t_readout", "--folds", "0", "--data", str(tiny_data),
                                "--input-sizes", "64", "48"]) == 0
    out = paths.WORK / "bench" / "volume_readout_t_readout"
    slices = pd.read_csv(out.with_name(out.name + "_slices.csv"), dtype={ID_COL: str}).set_index(ID_COL)
    oof = pd.read_csv(exp_dir("t_readout") / "fold0_valid.csv", dtype={ID_COL: str}).set_index(ID_COL)
    assert len(slices) == len(oof)
    np.testing.assert_allclose(slices.loc[oof.index, "deployed"], oof[VOLUME_COL], rtol=1e-4, atol=1e-3)
    # Read at the model's own size the input-size path is the deployed read-out; the mean is over the sizes asked.
    np.testing.assert_allclose(slices["deployed@64px"], slices["deployed"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(slices["deployed@sizes-mean"], (slices["deployed@64px"] + slices["deployed@48px"]) / 2,
                               rtol=1e-5)
    table = pd.read_csv(out.with_suffix(".csv"))
    assert {"deployed", "hard@0.5", "soft@0", "deployed@48px", "deployed@sizes-mean"} <= set(table["readout"])
    assert "fold0_mdape_pct" in table
    assert not set(volume_readout.ERROR_PARTS) & set(table["readout"])  # parts of the error are not read-outs
    # The painted masks at the cache's size, read out like a map: the error a perfect map of this size would have.
    assert table.set_index("readout").loc["cached_mask", "mdape_pct"] < 10
    from src.data.metadata import load_metadata

    labels = load_metadata(tiny_data, "train").set_index(ID_COL).loc[slices.index, "any"]
    assert (labels == 0).any() and (slices.loc[labels == 0, "cached_mask"] == 0).all()
    assert (slices.loc[(labels > 0) & slices["cached_mask"].notna(), "cached_mask"] > 0).any()
    assert out.with_suffix(".md").read_text().startswith("# Volume read-outs of t_readout")
    # The error parts add up to the deployed volume on every slice with a known mask.
    known = slices.dropna(subset=list(volume_readout.ERROR_PARTS))
    assert len(known) > 0
    np.testing.assert_allclose(known["found"] + known["false_edge"] + known["false_far"], known["deployed"],
                               rtol=1e-4, atol=1e-3)
    errors = pd.read_csv(out.with_name(out.name + "_errors.csv"))
    assert errors["rows"].str.startswith("positive studies").sum() == 2
