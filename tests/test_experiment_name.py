"""Experiment names: every key that changes training changes the name; runtime keys and later stages do not."""

import dataclasses
import json

import pytest
import torch

import src.config
from src.cnn.checkpoints import config_from_dict, load_checkpoint, save_checkpoint
from src.config import (
    BEFORE_KEY_EXISTED,
    NAME_KEYS,
    NON_TRAINING_KEYS,
    Config,
    load_config,
    training_overrides,
    unused_keys,
)
from src.errors import InputError
from src.naming import flatten


def test_two_experiments_differing_only_in_lr_get_different_names():
    a, b = load_config(None, ["lr=3e-4"]), load_config(None, ["lr=1e-4"])
    assert a.exp_name != b.exp_name
    assert a.exp_name.startswith(a.readable_name + "-") and b.exp_name.startswith(b.readable_name + "-")
    assert load_config(None, ["lr=3e-4"]).exp_name == a.exp_name  # the same settings, the same folder


def test_defaults_keep_the_readable_name_runs_had_before():
    assert load_config().exp_name == "bloodnet-resnet10t-96px-c1"
    assert load_config(None, ["context=2"]).exp_name == "bloodnet-resnet10t-96px-c2"
    assert load_config(None, ["lr=0.001"]).exp_name == load_config().exp_name  # a default spelled out is the default


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, tuple):
        return tuple(v * 2 + 1 for v in value) if value else ("other",)  # an empty default (extra_train) gains one
    return f"{value}-other"


def _training_keys(cfg) -> list[tuple[str, ...]]:
    """Every leaf key of the config (dotted into sections), except the runtime ones and the readable part."""
    keys = []
    for f in dataclasses.fields(cfg):
        if f.name in NON_TRAINING_KEYS or f.name in NAME_KEYS:
            continue
        value = getattr(cfg, f.name)
        keys += [(f.name, *sub) for sub in _training_keys(value)] if dataclasses.is_dataclass(value) else [(f.name,)]
    return keys


def _with(cfg, key: tuple[str, ...], value):
    if len(key) == 1:
        return dataclasses.replace(cfg, **{key[0]: value})
    return dataclasses.replace(cfg, **{key[0]: _with(getattr(cfg, key[0]), key[1:], value)})


def _get(cfg, key):
    for part in key:
        cfg = getattr(cfg, part)
    return cfg


def test_every_training_key_changes_the_name_including_keys_added_later():
    # Walks the dataclass, so a key another change adds is covered without touching this test.
    base = Config()
    keys = [key for key in _training_keys(base) if key[0] not in unused_keys(base.arch)]
    assert ("lr",) in keys and ("aug", "hflip") in keys and ("seed",) in keys
    names = {key: _with(base, key, _changed(_get(base, key))).exp_name for key in keys}
    assert base.exp_name not in names.values()
    assert len(set(names.values())) == len(keys), "two different settings share one experiment name"


@pytest.mark.parametrize("sets", [["num_workers=4"], ["stack.k=2"], ["report.n_boot=10"], ["triage.port=9000"],
                                  ["data_dir=/elsewhere"]])
def test_runtime_keys_and_later_stages_keep_the_name(sets):
    assert load_config(None, sets).exp_name == load_config().exp_name


def test_an_explicit_exp_is_used_as_given():
    assert load_config(None, ["exp=mine", "lr=3e-4"]).exp_name == "mine"


def _finished_run(root, name, cfg):
    (root / name).mkdir(parents=True)
    record = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "exp": name}  # as JSON stores it
    (root / name / "fold0_run.json").write_text(json.dumps(record))


def test_a_run_under_the_old_name_is_pointed_to(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(src.config, "OOF_DIR", tmp_path)
    cfg = load_config(None, ["lr=3e-4", "aug.hflip=0"])
    _finished_run(tmp_path, cfg.readable_name, cfg)  # names had no hash before
    assert src.config.main(["--set", "lr=3e-4", "--set", "aug.hflip=0", "--get", "exp_name"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == cfg.exp_name  # stdout stays the bare name: run_fold.sh reads it
    assert err.count("\n") == 1 and cfg.exp_name in err and f"oof/{cfg.readable_name}" in err
    # Other settings, or the new folder already there: nothing to say.
    assert src.config.renamed_run_note(load_config(None, ["lr=1e-4"])) is None
    (tmp_path / cfg.exp_name).mkdir()
    assert src.config.renamed_run_note(cfg) is None


def test_resume_ignores_later_stage_sections_and_rebuilds_them(tmp_path):
    cfg = load_config(None, ["report.precisions=0.9", "stack.k=3"])
    save_checkpoint(tmp_path / "last.pt", torch.nn.Linear(2, 2), cfg, epoch=1)
    assert load_checkpoint(tmp_path / "last.pt", load_config(None, ["stack.k=7"])) is not None
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["config"]
    assert config_from_dict(json.loads(json.dumps(saved))) == cfg
    old = {k: v for k, v in saved.items() if k not in ("stack", "report", "triage")}  # a checkpoint from before
    assert config_from_dict(old).stack == Config().stack


def test_flatten_spells_sections_with_dots():
    flat = flatten({"aug": {"hflip": 0.5}, "class_weights": (1.0, 2.0)})
    assert flat == {"aug.hflip": 0.5, "class_weights": [1.0, 2.0]}


def test_the_keys_left_out_of_the_hash_exist():
    # A misspelt or renamed entry would silently put a runtime key back into every name (or leave one out).
    fields = {f.name for f in dataclasses.fields(Config)}
    assert not NON_TRAINING_KEYS - fields and not set(NAME_KEYS) - fields


def test_a_record_from_before_a_key_whose_default_changed_reads_as_it_trained():
    """volume_feature_grad came in as true and is false today: a run record saved before the key existed was trained
    end to end, and the leaderboard and names must say so, not read it as today's default. A key whose default never
    changed (seg_full_res) still counts as its default."""
    assert set(BEFORE_KEY_EXISTED) <= {f.name for f in dataclasses.fields(Config)}
    assert all(getattr(Config(), key) != value for key, value in BEFORE_KEY_EXISTED.items())  # else not needed
    old = dataclasses.asdict(load_config())
    for key in (*BEFORE_KEY_EXISTED, "seg_full_res"):
        del old[key]
    assert training_overrides(old) == BEFORE_KEY_EXISTED
    trained_so = load_config(None, [f"{k}={v}" for k, v in BEFORE_KEY_EXISTED.items()])
    assert training_overrides(dataclasses.asdict(trained_so)) == training_overrides(old)


def test_resume_across_cache_formats_and_from_before_the_key(tmp_path):
    """Both stores give the same pixels: a run started on the memmap resumes on zstd, and a checkpoint saved before
    cache_format existed still resumes (a bench killed across that change refused until this was fixed)."""
    save_checkpoint(tmp_path / "last.pt", torch.nn.Linear(2, 2), load_config(None, []), epoch=1)
    assert load_checkpoint(tmp_path / "last.pt", load_config(None, ["cache_format=zstd"])) is not None
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    del state["config"]["cache_format"]
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt", load_config(None, [])) is not None
    with pytest.raises(InputError, match="lr"):
        load_checkpoint(tmp_path / "last.pt", load_config(None, ["lr=0.5"]))


def test_a_checkpoint_from_before_decoder_width_loads_as_the_wide_decoder_it_is(tmp_path):
    """Triage, overlays and the read-out bench rebuild the model from the checkpoint's own config: one saved before
    decoder_width existed holds a decoder at half the encoder's channels, which today's default (a quarter) would
    not fit. A missing key reads as what such runs trained with (BEFORE_KEY_EXISTED), not as today's default."""
    from src.cnn.checkpoints import load_model
    from src.cnn.model import build_model

    assert Config().decoder_width != BEFORE_KEY_EXISTED["decoder_width"]
    cfg = load_config(None, ["backbone=resnet10t", "context=0", "decoder_width=0.5"])
    path = tmp_path / "best.pt"
    save_checkpoint(path, build_model(cfg), cfg, epoch=1)
    state = torch.load(path, weights_only=False)
    del state["config"]["decoder_width"]  # saved before the key existed
    torch.save(state, path)
    model, loaded = load_model(path)
    assert loaded.decoder_width == 0.5 and [b.block[0].out_channels for b in model.decoder] == [128, 64, 32, 32]
    assert config_from_dict(state["config"]).volume_feature_grad is False  # a key the record holds keeps its value


@pytest.mark.parametrize(("key", "old_value", "old_head", "new_head"), [
    # until stop 38 the head read the volume alone (513 inputs on resnet10t); today also the pooled map (514)
    ("map_evidence_r", "0", lambda m: m.head.weight.shape[1] == 513, lambda m: m.head.weight.shape[1] == 514),
    # until stop 39 `any` was read by the head beside the embedding; today from the map's features alone
    ("any_from_map", "false", lambda m: m.any_head is None, lambda m: m.any_head is not None),
])
def test_a_checkpoint_from_before_a_head_key_loads_with_the_head_it_was_trained_with(tmp_path, key, old_value,
                                                                                     old_head, new_head):
    """A checkpoint saved before the key existed rebuilds the head it trained, loads, and predicts the same."""
    from src.cnn.checkpoints import load_model
    from src.cnn.model import build_model

    assert getattr(Config(), key) != BEFORE_KEY_EXISTED[key]
    torch.manual_seed(0)
    cfg = load_config(None, ["backbone=resnet10t", "context=0", f"{key}={old_value}"])
    old_model = build_model(cfg).eval()
    path = tmp_path / "best.pt"
    save_checkpoint(path, old_model, cfg, epoch=1)
    state = torch.load(path, weights_only=False)
    del state["config"][key]  # saved before the key existed
    torch.save(state, path)
    model, loaded = load_model(path)
    assert getattr(loaded, key) == BEFORE_KEY_EXISTED[key] and old_head(model)
    x, voxel = torch.rand(2, 3, 32, 32), torch.full((2,), 2.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, voxel)["logits"], old_model(x, voxel)["logits"])
    assert new_head(build_model(load_config(None, ["backbone=resnet10t", "context=0"])))


def test_a_classifiers_name_ignores_bloodnet_keys_it_never_reads():
    """A BloodNet default that changes (any_from_map at stop 39) must not rename classifier runs, nor may a
    BloodNet key set on a classifier give it a second name."""

    plain = load_config(None, ["arch=classifier", "epochs=8"])
    assert load_config(None, ["arch=classifier", "epochs=8", "seg_epochs=5"]).exp_name == plain.exp_name
    record = dataclasses.asdict(plain)
    del record["any_from_map"]  # a classifier record from before the key: reads as False, BloodNet's old default
    assert training_overrides(record) == {"epochs": 8}
    assert load_config(None, ["seg_epochs=5"]).exp_name != load_config(None, []).exp_name  # BloodNet reads it


@pytest.mark.parametrize("arch", ["bloodnet", "multitask"])
def test_a_segmentation_models_name_ignores_the_classifiers_epochs(arch):
    """The three-step schedule never reads `epochs`: the ablation, which sets it for every variant, must find the
    BloodNet fold `run_fold.sh` trained instead of training the same run again under a second name."""
    plain = load_config(None, [f"arch={arch}"])
    assert load_config(None, [f"arch={arch}", "epochs=10"]).exp_name == plain.exp_name
    classifier = load_config(None, ["arch=classifier"]).exp_name
    assert load_config(None, ["arch=classifier", "epochs=10"]).exp_name != classifier
