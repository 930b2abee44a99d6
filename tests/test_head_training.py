"""How the head trains: freeze_map_weights (from the joint step on, the head's weights on the map's features stay as
the head step fit them) and head_lr_scale (the head's learning rate as a multiple of the rest's)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from src.cnn import fit
from src.cnn.loop import make_optimizer, train_one_epoch
from src.cnn.model import build_model
from src.cnn.runtime import Runtime
from src.cnn.schedule import Phase
from src.cnn.train import run_fold
from src.config import load_config
from src.constants import LABELS
from src.data.dataset import SliceDataset
from src.errors import InputError


@pytest.mark.parametrize("freeze", [True, False])
def test_joint_step_keeps_the_head_steps_map_weights_only_when_frozen(tiny_data, monkeypatch, freeze):
    cfg = load_config(None, ["arch=bloodnet", "backbone=resnet10t", "image_size=64", "batch_size=16", "num_workers=0",
                             "context=0", "tta_flip=false", "limit_train_batches=2", "seg_epochs=1", "head_epochs=1",
                             "joint_epochs=2", "weight_decay=0", "warmup_epochs=0", "lr=1e-2",
                             f"freeze_map_weights={str(freeze).lower()}", f"exp=t_freeze_{freeze}"])
    cfg.data_dir = str(tiny_data)
    head_after_epoch = []
    real_save = fit.save_checkpoint

    def keep_head(path, module, *args, **kwargs):
        if path.name == "last.pt":
            head_after_epoch.append(module.head.weight.detach().clone())
        return real_save(path, module, *args, **kwargs)

    monkeypatch.setattr(fit, "save_checkpoint", keep_head)
    run_fold(cfg, 0, tiny_data)
    segment, head, _, joint = head_after_epoch
    n_map = 2  # log1p(volume) and the pooled map (map_evidence_r > 0 by default)
    assert not torch.equal(head[:, -n_map:], segment[:, -n_map:])  # the head step fits them
    assert not torch.equal(joint[:, :-n_map], head[:, :-n_map])  # the embedding's weights learn on
    assert torch.equal(joint[:, -n_map:], head[:, -n_map:]) == freeze


def test_freeze_without_a_head_step_is_a_config_error():
    with pytest.raises(InputError, match=r"freeze_map_weights.*head_epochs"):
        load_config(None, ["arch=bloodnet", "head_epochs=0", "freeze_map_weights=true"])


def test_model_without_map_features_has_nothing_to_freeze():
    from src.cnn.model import build_model

    model = build_model(load_config(None, ["arch=multitask", "backbone=resnet10t", "context=0"]))
    assert model.freeze_map_weights() is None


@pytest.mark.parametrize("head_only", [False, True])
def test_head_lr_scale_puts_the_head_in_its_own_groups_at_that_multiple(head_only):
    cfg = load_config(None, ["backbone=resnet10t", "context=0", "head_lr_scale=10", "weight_decay=0.01"])
    model = build_model(cfg)
    optimizer = make_optimizer(cfg, model, head_only=head_only)
    head_ids = {id(p) for p in model.head_parameters()}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)  # each once, none frozen
    for group in optimizer.param_groups:
        in_head = {id(p) in head_ids for p in group["params"]}
        assert len(in_head) == 1 and group["lr_scale"] == (10.0 if in_head.pop() else 1.0)
        decays = {p.ndim > 1 for p in group["params"]}  # timm's rule: no decay on biases and norms
        assert len(decays) == 1 and group["weight_decay"] == (0.01 if decays.pop() else 0.0)
    assert {g["lr_scale"] for g in optimizer.param_groups} == ({10.0} if head_only else {1.0, 10.0})


@pytest.fixture
def noise_slices() -> SliceDataset:
    """16 noise slices of 32 px, half labelled positive."""
    n, size = 16, 32
    images = np.random.default_rng(0).integers(0, 255, (n, 3, size, size)).astype(np.uint8)
    meta = pd.DataFrame({
        "ID": [f"ID_{i:09x}" for i in range(n)], "PatientID": "ID_p", "StudyInstanceUID": "ID_s",
        "SeriesInstanceUID": "ID_r", "slice_index": np.arange(n), "cache_row": np.arange(n), "mask_row": -1,
        "rows": size, "cols": size, "pixel_spacing_row": 1.0, "pixel_spacing_col": 1.0, "slice_spacing": 1.0,
    })
    for name in LABELS:
        meta[name] = np.arange(n) % 2
    return SliceDataset(meta, images)


def test_the_loop_runs_the_head_at_its_multiple_of_the_schedule(noise_slices):
    cfg = load_config(None, ["backbone=resnet10t", "arch=classifier", "context=0", "head_lr_scale=10",
                             "warmup_epochs=0", "batch_size=8"])
    model = build_model(cfg)
    optimizer = make_optimizer(cfg, model, head_only=False)
    loader = DataLoader(noise_slices, batch_size=8)
    phase = Phase("classify", 2, 0.0)
    row = train_one_epoch(model, loader, optimizer, torch.amp.GradScaler("cuda", enabled=False), phase, 0, cfg,
                          Runtime(0, 1, torch.device("cpu"), None, False), torch.tensor(cfg.class_weights), "t")
    head_ids = {id(p) for p in model.head_parameters()}
    rates = {id(p) in head_ids: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rates[False] > 0 and rates[True] == pytest.approx(10 * rates[False])
    assert row["lr"] == pytest.approx(rates[False])  # the epoch's logged lr is the schedule's, not the head's


def test_default_head_lr_scale_keeps_timms_own_groups():
    cfg = load_config(None, ["backbone=resnet10t", "context=0"])
    assert all("lr_scale" not in g for g in make_optimizer(cfg, build_model(cfg), head_only=False).param_groups)


@pytest.mark.parametrize(("phase", "expected_base"), [(Phase("head", 1, 0.0, head_only=True), 1e-2),
                                                      (Phase("joint", 1, 0.5), 1e-3)])
def test_head_step_lr_sets_the_head_steps_schedule_only(noise_slices, phase, expected_base):
    """The head step runs its cosine from head_step_lr; every other step from lr. One epoch of 2 steps, no warmup:
    the last step's rate is the schedule's at step 1 of 2, the middle of the cosine."""
    from src.cnn.schedule import lr_at

    cfg = load_config(None, ["backbone=resnet10t", "arch=bloodnet", "masks=none", "context=0", "lr=1e-3",
                             "head_step_lr=1e-2", "warmup_epochs=0", "batch_size=8"])
    model = build_model(cfg)
    optimizer = make_optimizer(cfg, model, head_only=phase.head_only)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_one_epoch(model, DataLoader(noise_slices, batch_size=8), optimizer, scaler, phase, 0, cfg,
                    Runtime(0, 1, torch.device("cpu"), None, False), torch.tensor(cfg.class_weights), "t")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(1, 2, 0, expected_base))


def test_any_from_map_reads_the_maps_features_alone_and_starts_as_the_pool():
    """any_from_map: the `any` logit is exactly the pooled map at the start (weight 1, bias 0) and no change to the
    embedding moves it; the subtypes still read the embedding."""
    from src.cnn.losses import ANY, lse_pool

    torch.manual_seed(0)
    model = build_model(load_config(None, ["backbone=resnet10t", "context=0", "any_from_map=true"])).eval()
    embedding_columns = model.head.in_features - model.n_map_features
    image = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model(image, torch.full((3,), 2.5))
        torch.testing.assert_close(out["logits"][:, ANY], lse_pool(out["seg_logits"], model.map_evidence_r))
        model.head.weight[:, :embedding_columns] += 1.0
        moved = model(image, torch.full((3,), 2.5))["logits"]
    torch.testing.assert_close(moved[:, ANY], out["logits"][:, ANY])
    assert not torch.allclose(moved[:, :ANY], out["logits"][:, :ANY])
    assert {id(p) for p in model.any_head.parameters()} <= {id(p) for p in model.head_parameters()}


@pytest.mark.parametrize("sets", [["arch=multitask"], ["map_evidence_r=0"]])
def test_any_from_map_is_ignored_where_the_head_reads_no_pooled_map(sets):
    model = build_model(load_config(None, ["backbone=resnet10t", "context=0", "any_from_map=true", *sets]))
    assert model.any_head is None
