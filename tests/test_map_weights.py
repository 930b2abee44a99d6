"""freeze_map_weights: from the joint step on, the head's weights on the map's features stay as the head step fit
them while the rest of the head goes on learning."""

from __future__ import annotations

import pytest
import torch

from src.cnn import fit
from src.cnn.train import run_fold
from src.config import load_config
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
