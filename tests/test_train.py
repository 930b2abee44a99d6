"""Fold training end to end on a tiny synthetic set: OOF rows for exactly the fold, resume after a kill."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from src.cnn import fit
from src.cnn.schedule import lr_at, phase_at, phases_for
from src.cnn.train import run_fold
from src.config import load_config
from src.constants import LABELS
from src.data.cache import load_cache
from src.data.folds import load_folds
from src.predictions import exp_dir

FAST = [
    "arch=classifier",
    "backbone=resnet10t",
    "image_size=64",
    "batch_size=16",
    "num_workers=0",
    "tta_flip=false",
    "limit_train_batches=3",
]


def fast_config(data_dir, exp, *extra):
    cfg = load_config(None, [*FAST, f"exp={exp}", *extra])
    cfg.data_dir = str(data_dir)
    return cfg


def test_oof_rows_are_exactly_the_held_out_fold(tiny_data):
    cfg = fast_config(tiny_data, "t_oof", "epochs=1")
    out_dir = run_fold(cfg, 1, tiny_data)
    valid = pd.read_csv(out_dir / "fold1_valid.csv")
    folds = load_folds(tiny_data, cfg.n_folds, cfg.fold_seed)
    meta, _, _ = load_cache(tiny_data, 64, "train")  # readable images only: the corrupt file has no row
    expected = set(folds.loc[folds["fold"] == 1, "ID"]) & set(meta["ID"])
    assert set(valid["ID"]) == expected and len(valid) == len(expected)
    assert list(valid.columns[:8]) == ["ID", "fold", *LABELS]
    probs = valid[list(LABELS)].to_numpy()
    assert (valid["fold"] == 1).all() and ((probs >= 0) & (probs <= 1)).all()
    test = pd.read_csv(out_dir / "fold1_test.csv")
    test_meta, _, _ = load_cache(tiny_data, 64, "test")
    assert set(test["ID"]) == set(test_meta["ID"])
    assert not (out_dir / "fold1_train_emb.npy").exists()  # in-sample predictions only when predict_train asks
    for split, n in (("valid", len(expected)), ("test", len(test_meta))):
        emb = np.load(out_dir / f"fold1_{split}_emb.npy")
        ids = pd.read_csv(out_dir / f"fold1_{split}_emb_ids.csv")
        assert emb.shape[0] == len(ids) == n and emb.dtype == np.float16 and np.isfinite(emb).all()
    metrics = json.loads((out_dir / "fold1_metrics.json").read_text())
    assert metrics["n_images"] == len(expected) and metrics["weighted_log_loss"] > 0
    record = json.loads((out_dir / "fold1_run.json").read_text())
    assert record["config"]["exp"] == "t_oof" and "torch" in record["packages"]
    epochs = pd.read_csv(out_dir / "fold1_epochs.csv")  # lr and epoch time, also in the TensorBoard events
    assert epochs.loc[0, "lr"] > 0 and epochs.loc[0, "epoch_time_s"] > 0
    assert list((out_dir / "tensorboard" / "fold1").glob("events.out.tfevents.*"))


def test_killed_run_resumes_from_epoch_two(tiny_data, monkeypatch):
    cfg = fast_config(tiny_data, "t_resume", "epochs=2")
    real_write = fit.write_epochs

    def write_then_die(history, out_dir, tag):
        real_write(history, out_dir, tag)
        raise KeyboardInterrupt  # the kill lands right after epoch 1's checkpoint

    monkeypatch.setattr(fit, "write_epochs", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_fold(cfg, 0, tiny_data)
    first = pd.read_csv(exp_dir("t_resume") / "fold0_epochs.csv")
    assert list(first["epoch"]) == [1]
    monkeypatch.setattr(fit, "write_epochs", real_write)

    started = []
    real_phase_at = phase_at

    def spy(phases, epoch):
        started.append(epoch)
        return real_phase_at(phases, epoch)

    monkeypatch.setattr("src.cnn.fit.phase_at", spy)
    run_fold(cfg, 0, tiny_data)
    assert started == [1]  # only epoch 2 (index 1) ran again
    history = pd.read_csv(exp_dir("t_resume") / "fold0_epochs.csv")
    assert list(history["epoch"]) == [1, 2]
    assert history["train_loss"].iloc[0] == first["train_loss"].iloc[0]  # epoch 1 kept, not retrained
    assert (exp_dir("t_resume") / "fold0_valid.csv").exists()


def test_changed_config_refuses_to_resume(tiny_data):
    from src.errors import InputError

    out_dir = run_fold(fast_config(tiny_data, "t_cfg", "epochs=1", "predict_train=true"), 2, tiny_data)
    train_ids = pd.read_csv(out_dir / "fold2_train_emb_ids.csv")["ID"]
    folds = load_folds(tiny_data, 5, 42).set_index("ID")["fold"]
    assert len(train_ids) == len(np.load(out_dir / "fold2_train_emb.npy")) and (folds.loc[train_ids] != 2).all()
    with pytest.raises(InputError, match="lr"):
        run_fold(fast_config(tiny_data, "t_cfg", "epochs=1", "lr=0.5"), 2, tiny_data)


def test_bloodnet_three_step_schedule():
    cfg = load_config(None, ["arch=bloodnet", "seg_epochs=2", "head_epochs=1", "joint_epochs=3"])
    phases = phases_for(cfg)
    assert [(p.name, p.epochs, p.seg_lambda, p.head_only) for p in phases] == [
        ("segment", 2, 1.0, False),
        ("head", 1, 0.0, True),
        ("joint", 3, 0.5, False),
    ]
    assert phase_at(phases, 2)[0].name == "head" and phase_at(phases, 5) == (phases[2], 2)


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 0.02


def test_checkpoint_from_before_a_new_key_still_resumes(tmp_path):
    """A key added to the code after a checkpoint was saved counts as its default (as in the experiment name), so
    the run still resumes and re-predicts, unless the key's default has changed since: then it counts as what such
    runs trained with (BEFORE_KEY_EXISTED), and today's default is refused by name. A real change, nested ones
    included, is still refused by name."""
    import dataclasses

    import torch

    from src.cnn.checkpoints import load_checkpoint, save_checkpoint
    from src.config import BEFORE_KEY_EXISTED
    from src.errors import InputError

    as_trained = [f"{key}={value}" for key, value in BEFORE_KEY_EXISTED.items()]
    cfg = load_config(None, ["arch=bloodnet", *as_trained])
    path = tmp_path / "last.pt"
    save_checkpoint(path, torch.nn.Linear(2, 2), cfg, epoch=1)
    state = torch.load(path, weights_only=False)
    old = dataclasses.asdict(cfg)
    del old["seg_full_res"], old["aug"][next(iter(old["aug"]))]  # saved before these keys existed
    for key in BEFORE_KEY_EXISTED:
        del old[key]
    torch.save({**state, "config": old}, path)
    assert load_checkpoint(path, cfg)["epoch"] == 1
    changed_defaults = ", ".join(sorted(BEFORE_KEY_EXISTED))  # decoder_width, seg_hard_negatives, volume_feature_grad
    with pytest.raises(InputError, match=rf"other settings \({changed_defaults}\)"):
        load_checkpoint(path, load_config(None, ["arch=bloodnet"]))  # today's defaults: not what it trained with
    with pytest.raises(InputError, match=r"other settings \(seg_full_res\)"):
        load_checkpoint(path, load_config(None, ["arch=bloodnet", *as_trained, "seg_full_res=true"]))
    aug_key = next(iter(old["aug"]))  # a key the old checkpoint still has
    value = old["aug"][aug_key]
    other = (not value) if isinstance(value, bool) else (0.25 if value != 0.25 else 0.75)  # a probability: in [0, 1]
    changed = load_config(None, ["arch=bloodnet", *as_trained, f"aug.{aug_key}={other}"])
    with pytest.raises(InputError, match=r"other settings \(aug\)"):
        load_checkpoint(path, changed)
    # BloodNet never reads `epochs` (its three phases have their own): not a reason to refuse.
    assert load_checkpoint(path, load_config(None, ["arch=bloodnet", *as_trained, "epochs=9"]))["epoch"] == 1


def test_a_classifier_checkpoint_ignores_bloodnet_only_keys(tmp_path):
    """A classifier trained before a BloodNet default changed (seg_epochs 2 -> 3) still resumes and re-predicts: it
    never read the key. Its own keys still refuse."""
    import torch

    from src.cnn.checkpoints import load_checkpoint, save_checkpoint
    from src.errors import InputError

    path = tmp_path / "last.pt"
    save_checkpoint(path, torch.nn.Linear(2, 2), load_config(None, ["arch=classifier", "seg_epochs=2",
                                                                      "joint_epochs=3", "masks=none"]), epoch=4)
    assert load_checkpoint(path, load_config(None, ["arch=classifier"]))["epoch"] == 4
    with pytest.raises(InputError, match=r"other settings \(epochs\)"):
        load_checkpoint(path, load_config(None, ["arch=classifier", "epochs=9"]))


def test_deployed_checkpoint_follows_select_epoch_and_keeps_a_valid_cutoff(tmp_path):
    """select_epoch=last rewrites a best.pt chosen on validation from last.pt; a weak-mode volume cutoff calibrated
    on the same epoch's weights is kept, one calibrated on another epoch's is not (it belongs to other weights)."""
    import torch

    from src.cnn.checkpoints import VOLUME_CUTOFF_KEY, deployed_checkpoint, read_checkpoint, save_checkpoint

    cfg = load_config(None, ["masks=none"])
    net = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "last.pt", net, cfg, epoch=10)
    for best_epoch, kept in ((10, True), (7, False)):
        save_checkpoint(tmp_path / "best.pt", net, cfg, epoch=best_epoch, **{VOLUME_CUTOFF_KEY: 0.83})
        assert deployed_checkpoint(tmp_path, cfg) == tmp_path / "best.pt"
        best = read_checkpoint(tmp_path / "best.pt")
        assert best["epoch"] == 10 and best["select_epoch"] == "last"
        assert (best.get(VOLUME_CUTOFF_KEY) == 0.83) is kept
