"""Fold runs with the engine's features on the tiny synthetic set: an exact resume (augmentation, dropout, EMA and
accumulation included) and `seeds: n` averaged into the fold's predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from src.cnn import fit
from src.cnn.checkpoints import load_model
from src.cnn.distributed import loader_for
from src.cnn.predict import predict_loader
from src.cnn.train import run_fold
from src.config import load_config
from src.constants import LABELS
from src.data.dataset import SliceDataset
from src.errors import InputError
from src.paths import WORK
from src.predictions import exp_dir

FAST = ["arch=classifier", "backbone=resnet10t", "image_size=64", "batch_size=8", "tta_flip=false",
        "limit_train_batches=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(data_dir, exp, *extra):
    cfg = load_config(None, [*FAST, f"exp={exp}", *extra])
    cfg.data_dir = str(data_dir)
    return cfg


def read_json(path):
    return json.loads(path.read_text())


def checkpoint(exp: str, fold: int, name: str = "last.pt", seed_dir: str = "") -> dict:
    return torch.load(WORK / "models" / exp / f"fold{fold}" / seed_dir / name, map_location="cpu", weights_only=False)


def test_resumed_run_equals_uninterrupted_run(tiny_data, monkeypatch):
    # Augmentation (default aug), dropout (drop_rate 0.1), EMA and accumulation all draw on or carry state that a
    # resume must restore; the resumed run also loads through a persistent worker, the reference in-process.
    features = ["epochs=2", "ema=true", "accumulate=2"]
    real_write = fit.write_epochs

    def die_after(epochs: int):
        def write_then_die(history, out_dir, tag):
            real_write(history, out_dir, tag)
            if len(history) == epochs:
                raise KeyboardInterrupt  # killed right after this epoch's checkpoint

        monkeypatch.setattr(fit, "write_epochs", write_then_die)

    die_after(2)  # both runs stop after epoch 2's checkpoint: the final predictions are not under test here
    with pytest.raises(KeyboardInterrupt):
        run_fold(config(tiny_data, "t_exact_ref", *features, "num_workers=0"), 0, tiny_data)
    die_after(1)
    with pytest.raises(KeyboardInterrupt):
        run_fold(config(tiny_data, "t_exact_kill", *features, "num_workers=1"), 0, tiny_data)
    assert checkpoint("t_exact_kill", 0)["epoch"] == 1
    die_after(2)
    with pytest.raises(KeyboardInterrupt):
        run_fold(config(tiny_data, "t_exact_kill", *features, "num_workers=1"), 0, tiny_data)

    ref, resumed = checkpoint("t_exact_ref", 0), checkpoint("t_exact_kill", 0)
    assert ref["epoch"] == resumed["epoch"] == 2
    for part in ("model", "ema"):
        for name, value in ref[part].items():
            assert torch.equal(resumed[part][name], value), f"{part}.{name} differs after resume"
    # The EMA copy is a different set of weights, and it is what best.pt keeps.
    assert any(not torch.equal(ref["ema"][k], ref["model"][k]) for k in ref["model"])
    assert checkpoint("t_exact_ref", 0, "best.pt")["ema_weights"] is True
    epochs = [pd.read_csv(exp_dir(e) / "fold0_epochs.csv") for e in ("t_exact_ref", "t_exact_kill")]
    np.testing.assert_array_equal(epochs[0]["valid_wll"], epochs[1]["valid_wll"])


def test_seeds_are_averaged_into_the_fold_predictions(tiny_data):
    cfg = config(tiny_data, "t_seeds", "epochs=1", "seeds=2", "num_workers=0", "limit_train_batches=2")
    out_dir = run_fold(cfg, 3, tiny_data)
    assert (WORK / "models" / "t_seeds" / "fold3" / "seed1" / "best.pt").exists()
    assert (out_dir / "fold3_epochs.csv").exists() and (out_dir / "fold3_seed1_epochs.csv").exists()
    valid = pd.read_csv(out_dir / "fold3_valid.csv")

    per_seed = []
    for seed_dir in ("", "seed1"):
        model, _ = load_model(WORK / "models" / "t_seeds" / "fold3" / seed_dir / "best.pt")
        meta = pd.read_csv(out_dir / "fold3_valid_emb_ids.csv")
        ds = SliceDataset(*_valid_split(tiny_data, cfg, meta), cfg.context)
        pred = predict_loader(model, loader_for(ds, cfg, 16), torch.device("cpu"), progress=False)
        per_seed.append(pred["probs"])
    assert not np.allclose(per_seed[0], per_seed[1], atol=1e-4)  # two seeds, two different models
    np.testing.assert_allclose(valid[list(LABELS)].to_numpy(), np.mean(per_seed, axis=0), rtol=1e-4, atol=1e-6)


def _valid_split(data_dir, cfg, ids: pd.DataFrame):
    from src.cnn.train import split_fold

    _, valid, images, _ = split_fold(cfg, data_dir, 3)
    assert list(valid["ID"]) == list(ids["ID"])  # the OOF rows in the order they were written
    return valid, images


def test_early_stopping_waits_for_the_second_half_of_the_final_phase(tiny_data, monkeypatch):
    """Validation that never beats epoch 1 (as on a fold whose first epoch sat near the prior): patience 1 would
    stop at epoch 2 of 8; the run goes on to epoch 4, half the schedule, then stops and keeps epoch 1's weights."""
    losses = iter(np.linspace(0.30, 0.40, 8))
    monkeypatch.setattr(fit, "validate", lambda *a, **k: {"valid_wll": float(next(losses)), "valid_auc_any": 0.5})
    run_fold(config(tiny_data, "t_early_half", "epochs=8", "select_epoch=valid", "early_stopping=1",
                    "num_workers=0"), 0, tiny_data)
    state = checkpoint("t_early_half", 0)
    assert state["stopped_early"] and [row["epoch"] for row in state["history"]] == [1, 2, 3, 4]
    assert checkpoint("t_early_half", 0, "best.pt")["epoch"] == 1
    assert [fit.may_stop_early(e, 8) for e in range(8)] == [False] * 3 + [True] * 5
    assert fit.may_stop_early(0, 1) and not fit.may_stop_early(1, 5) and fit.may_stop_early(2, 5)

    # Run again with the defaults (last epoch, no early stopping): the run goes on to epoch 8 from where it stopped,
    # and the fold is predicted again from epoch 8, its predictions having come from epoch 1.
    losses = iter(np.linspace(0.30, 0.40, 8)[4:])
    run_fold(config(tiny_data, "t_early_half", "epochs=8", "num_workers=0"), 0, tiny_data)
    state = checkpoint("t_early_half", 0)
    assert not state["stopped_early"] and [row["epoch"] for row in state["history"]] == list(range(1, 9))
    assert checkpoint("t_early_half", 0, "best.pt")["epoch"] == 8
    assert read_json(exp_dir("t_early_half") / "fold0_run.json")["deployed_epochs"] == [8]


def test_last_epoch_is_deployed_however_the_validation_fold_scores_it(tiny_data, monkeypatch):
    """select_epoch=last (the default): the validation fold's log loss falls until epoch 1 and rises after, yet the
    fold predicts with epoch 3's weights; with select_epoch=valid the same run predicts with epoch 1's. An old run,
    whose best.pt and predictions came from the validation fold's best epoch, is predicted again from its last epoch
    without training."""
    monkeypatch.setattr(fit, "validate", lambda *a, **k: {"valid_wll": float(next(losses)), "valid_auc_any": 0.5})
    losses = iter([0.30, 0.35, 0.40])
    run_fold(config(tiny_data, "t_select_valid", "epochs=3", "select_epoch=valid", "num_workers=0"), 0, tiny_data)
    assert checkpoint("t_select_valid", 0, "best.pt")["epoch"] == 1
    assert read_json(exp_dir("t_select_valid") / "fold0_run.json")["deployed_epochs"] == [1]

    losses = iter([0.30, 0.35, 0.40])
    run_fold(config(tiny_data, "t_select_last", "epochs=3", "num_workers=0"), 0, tiny_data)
    assert checkpoint("t_select_last", 0, "best.pt")["epoch"] == 3
    last_oof = pd.read_csv(exp_dir("t_select_last") / "fold0_valid.csv")
    valid_oof = pd.read_csv(exp_dir("t_select_valid") / "fold0_valid.csv")
    assert not np.allclose(last_oof[list(LABELS)], valid_oof[list(LABELS)])  # other weights, other predictions

    # The select_epoch=valid run read under today's default: its own epoch 3, exactly as the run trained that way.
    record = exp_dir("t_select_valid") / "fold0_run.json"
    saved = read_json(record)
    del saved["config"]["select_epoch"]  # as records written before the key existed
    record.write_text(json.dumps(saved))
    trained_at = (WORK / "models" / "t_select_valid" / "fold0" / "last.pt").stat().st_mtime_ns
    monkeypatch.setattr(fit, "validate", lambda *a, **k: pytest.fail("a finished run must not train or validate"))
    run_fold(config(tiny_data, "t_select_valid", "epochs=3", "num_workers=0"), 0, tiny_data)
    assert (WORK / "models" / "t_select_valid" / "fold0" / "last.pt").stat().st_mtime_ns == trained_at
    assert checkpoint("t_select_valid", 0, "best.pt")["epoch"] == 3
    again = pd.read_csv(exp_dir("t_select_valid") / "fold0_valid.csv")
    np.testing.assert_allclose(again[list(LABELS)], last_oof[list(LABELS)], atol=1e-6)

    # The epoch best on validation kept nowhere once a fold deploys its last: asking for it is a clear error.
    with pytest.raises(InputError, match=r"select_epoch=last.*not kept"):
        run_fold(config(tiny_data, "t_select_last", "epochs=3", "select_epoch=valid", "num_workers=0"), 0, tiny_data)


def test_a_fold_whose_best_epoch_was_its_last_keeps_its_predictions(tiny_data, monkeypatch):
    """Recorded under select_epoch=valid, but the best epoch on validation was the last: the predictions are those
    select_epoch=last makes, so only the record (and best.pt's tag) change; nothing is predicted again."""
    monkeypatch.setattr(fit, "validate", lambda *a, **k: {"valid_wll": float(next(losses)), "valid_auc_any": 0.5})
    losses = iter([0.40, 0.35, 0.30])
    run_fold(config(tiny_data, "t_select_moot", "epochs=3", "select_epoch=valid", "num_workers=0"), 0, tiny_data)
    record = exp_dir("t_select_moot") / "fold0_run.json"
    saved = read_json(record)
    del saved["config"]["select_epoch"]
    record.write_text(json.dumps(saved))
    oof = (exp_dir("t_select_moot") / "fold0_valid.csv").read_bytes()
    monkeypatch.setattr("src.cnn.train.predict_outputs", lambda *a, **k: pytest.fail("predicted again"))
    run_fold(config(tiny_data, "t_select_moot", "epochs=3", "num_workers=0"), 0, tiny_data)
    assert read_json(record)["config"]["select_epoch"] == "last" and read_json(record)["deployed_epochs"] == [3]
    assert (exp_dir("t_select_moot") / "fold0_valid.csv").read_bytes() == oof
    assert checkpoint("t_select_moot", 0, "best.pt")["select_epoch"] == "last"


def test_early_stopping_needs_select_epoch_valid():
    with pytest.raises(InputError, match=r"early_stopping=3.*select_epoch=valid"):
        load_config(None, ["early_stopping=3"])
    assert load_config(None, ["early_stopping=3", "select_epoch=valid"]).early_stopping == 3
    with pytest.raises(InputError, match="select_epoch"):
        load_config(None, ["select_epoch=best"])
