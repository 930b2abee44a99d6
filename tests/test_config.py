"""Config: YAML and --set overrides with type coercion; unknown keys and bad values are clear errors."""

import importlib.metadata

import numpy as np
import pytest
import torch

from src.cnn.losses import weighted_bce
from src.config import load_config, run_record
from src.constants import LABELS
from src.errors import InputError
from src.metric import weighted_log_loss
from src.paths import ROOT


def test_defaults_and_overrides(tmp_path):
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("backbone: resnet10t\ncontext: 2\naug:\n  hflip: 0.0\n")
    cfg = load_config(
        str(yaml_file), ["epochs=3", "aug.coarse_dropout=0", "tta_flip=false", "class_weights=1,1,1,1,1,3"]
    )
    assert cfg.backbone == "resnet10t" and cfg.context == 2 and cfg.in_chans == 15
    assert cfg.aug.hflip == 0.0 and cfg.aug.coarse_dropout == 0.0
    assert cfg.epochs == 3 and cfg.tta_flip is False
    assert cfg.class_weights == (1.0, 1.0, 1.0, 1.0, 1.0, 3.0)
    # The readable part, then a hash of the keys changed here beyond it (tests/test_experiment_name.py).
    assert cfg.readable_name == "bloodnet-resnet10t-96px-c2"
    assert cfg.exp_name.startswith("bloodnet-resnet10t-96px-c2-")


def test_default_training_loss_is_the_competition_metric():
    # Training with the default class weights must optimise exactly what Kaggle scores: the weighted BCE of the
    # default config equals the competition metric on the same probabilities (a change to either breaks this).
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(0, 2, (64, len(LABELS))), dtype=torch.float64)
    labels = torch.tensor(rng.random((64, len(LABELS))) < 0.3, dtype=torch.float64)
    weights = torch.tensor(load_config().class_weights, dtype=torch.float64)
    loss = float(weighted_bce(logits, labels, weights))
    metric = weighted_log_loss(labels.numpy(), torch.sigmoid(logits).numpy())
    assert loss == pytest.approx(metric, rel=1e-6)
    uniform = float(weighted_bce(logits, labels, torch.ones(len(LABELS), dtype=torch.float64)))
    assert uniform != pytest.approx(metric, rel=1e-3)  # the check can tell the weighting apart


@pytest.mark.parametrize(
    "sets, message",
    [
        (["nope=1"], "unknown config key 'nope'"),
        (["aug.nope=1"], "unknown config key 'aug.nope'"),
        (["epochs=many"], "cannot read 'many' as int"),
        (["tta_flip=maybe"], "expected true/false"),
        (["arch=vit"], "arch"),
        (["epochs"], "expected key=value"),
    ],
)
def test_bad_overrides_raise(sets, message):
    with pytest.raises(InputError, match=message):
        load_config(None, sets)


@pytest.mark.parametrize(
    "key, bad, good",
    [("lr", "0", "3e-4"), ("lr", "nan", "1e-2"), ("batch_size", "0", "1"), ("image_size", "31", "32"),
     ("weight_decay", "-0.1", "0"), ("ema_decay", "1", "0.9999"), ("accumulate", "0", "2"), ("seeds", "0", "3"),
     ("aug.hflip", "1.5", "1"), ("drop_rate", "1", "0"), ("decoder_width", "0", "4"), ("n_folds", "1", "2"),
     ("num_workers", "-2", "-1"), ("class_weights", "1,1,1,1,1", "1,1,1,1,1,1"),
     ("class_weights", "1,1,1,1,1,-2", "0,0,0,0,0,1"), ("select_epoch", "best", "valid"),
     ("cache_format", "npy", "zstd"), ("map_evidence_r", "-1", "0")],
)
def test_values_out_of_range_name_the_key_and_the_edge_passes(key, bad, good):
    with pytest.raises(InputError, match=rf"^config key {key}: ") as err:
        load_config(None, [f"{key}={bad}"])
    assert "\n" not in str(err.value)
    load_config(None, [f"{key}={good}"])  # the edge of the range is allowed


def test_unknown_yaml_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbon: resnet18\n")
    with pytest.raises(InputError, match=r"bad\.yaml: unknown config key 'backbon'"):
        load_config(str(bad))


def test_run_record_has_versions_and_git():
    record = run_record(load_config())
    # The record holds what is installed, and requirements.txt pins torch and torchvision as one pair.
    assert record["packages"]["torch"] == importlib.metadata.version("torch")
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert {"torch", "torchvision"} <= set(pins)
    assert record["config"]["backbone"] == "resnet10t" and record["git"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    # A shipped config with a key this version no longer knows would fail on the user's GPU, hours from here.
    cfg = load_config(str(path))
    assert cfg.exp_name.startswith(f"{cfg.arch}-{cfg.backbone}-{cfg.image_size}px-c{cfg.context}")
