"""bench/map_evidence.py: the signals of a map whose logits are known, and the table's AUCs and cross-fitting."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pandas as pd
import torch
from torch import nn

from src.cnn.losses import lse_pool
from src.constants import FOLD_COL, ID_COL, STUDY
from src.paths import ROOT

sys.path.insert(0, str(ROOT))  # the bench imports bench.volume_readout
spec = importlib.util.spec_from_file_location("map_evidence", ROOT / "bench" / "map_evidence.py")
map_evidence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(map_evidence)


class KnownMap(nn.Module):
    """A 'model' with a fixed logit map per image (mirrored by a flipped input, as a real map would be) and a head
    whose `any` logit is a fixed number per image."""

    def __init__(self, seg_logits: torch.Tensor, any_logit: torch.Tensor):
        super().__init__()
        self.seg_logits, self.any_logit = seg_logits, any_logit

    def forward(self, image, voxel_mm3):
        flipped = bool(image[0, 0, 0, 0] < 0)  # the test marks the unflipped input's left edge with +1
        seg = torch.flip(self.seg_logits, dims=[-1]) if flipped else self.seg_logits
        logits = torch.zeros(len(image), 6)
        logits[:, 5] = self.any_logit
        prob = torch.sigmoid(seg)
        return {"seg_logits": seg, "logits": logits, "volume_mm3": prob.sum(dim=(1, 2, 3)) * voxel_mm3.float(),
                "mask_volume_mm3": (prob >= 0.5).sum(dim=(1, 2, 3)).float() * voxel_mm3.float()}


def test_signals_of_a_known_map_are_flip_invariant_and_exact():
    seg = torch.full((2, 1, 4, 4), -5.0)
    seg[1, 0, 0, 0] = 3.0  # one bright pixel, which the flipped view sees in the other corner
    image = torch.zeros(2, 3, 4, 4)
    image[:, :, :, 0], image[:, :, :, -1] = 1.0, -1.0
    model = KnownMap(seg, torch.tensor([0.0, 2.0]))
    out = map_evidence.batch_signals(model, image, torch.tensor([2.0, 2.0]))
    np.testing.assert_allclose(out["head"], torch.sigmoid(torch.tensor([0.0, 2.0])).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["map max"], [-5.0, 3.0])
    np.testing.assert_allclose(out["map lse 8"], lse_pool(seg, 8.0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["hard volume"], [0.0, 2.0])  # one pixel at p >= 0.5, 2 mm³ a pixel
    soft = torch.sigmoid(seg).sum(dim=(1, 2, 3)).numpy() * 2.0
    np.testing.assert_allclose(out["soft volume"], soft, rtol=1e-6)


def test_the_table_ranks_a_perfect_signal_first_and_never_fits_a_row_it_scores():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    slices = pd.DataFrame({ID_COL: [f"ID_{i}" for i in range(n)], FOLD_COL: np.arange(n) % 4,
                           STUDY: [f"S{i // 4}" for i in range(n)], "any": y,
                           "head": rng.uniform(0.01, 0.99, n),  # noise: AUC near 0.5
                           "map lse 8": y * 3.0 + rng.normal(0, 0.1, n)})  # separates the labels
    table = map_evidence.signal_table(slices).set_index("signal")
    assert table.loc["map lse 8", "slice_auc_any"] == 1.0
    assert abs(table.loc["head", "slice_auc_any"] - 0.5) < 0.1
    assert table.loc[map_evidence.COMBINED, "slice_auc_any"] > 0.99
    # Cross-fitting: flipping every label of fold 0 changes no fold-0 prediction (it was fit on folds 1-3 only).
    features = slices.assign(**{"head logit": 0.0})
    before = map_evidence.cross_fitted(features, ["head logit", "map lse 8"])
    flipped = features.copy()
    flipped.loc[flipped[FOLD_COL] == 0, "any"] = 1 - flipped.loc[flipped[FOLD_COL] == 0, "any"]
    after = map_evidence.cross_fitted(flipped, ["head logit", "map lse 8"])
    fold0 = (slices[FOLD_COL] == 0).to_numpy()
    np.testing.assert_allclose(before[fold0], after[fold0])
    assert not np.allclose(before[~fold0], after[~fold0])
