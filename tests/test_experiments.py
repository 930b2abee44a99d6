"""The experiment leaderboard over a fixture of two experiments: folds done, pooled CV, stacked scores, settings."""

import dataclasses
import json

import pandas as pd
import pytest

from src.config import load_config
from src.constants import ID_COL, LABELS
from src.errors import InputError
from src.evaluate.experiments import leaderboard, main


def _fold(pred_dir, k, wll, auc_any, n, cfg, epoch_times=(30.0, 30.0)):
    pred_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({ID_COL: [f"ID_{k}{i}" for i in range(n)], "fold": k, **{c: 0.1 for c in LABELS}}) \
        .to_csv(pred_dir / f"fold{k}_valid.csv", index=False)
    auc = {c: 0.5 for c in LABELS} | {"any": auc_any}
    (pred_dir / f"fold{k}_metrics.json").write_text(json.dumps({"weighted_log_loss": wll, "auc": auc, "n_images": n}))
    (pred_dir / f"fold{k}_run.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "exp": pred_dir.name}))
    pd.DataFrame({"epoch": range(1, len(epoch_times) + 1), "epoch_time_s": epoch_times}) \
        .to_csv(pred_dir / f"fold{k}_epochs.csv", index=False)


@pytest.fixture
def two_experiments(tmp_path):
    slow, fast = load_config(None, ["lr=3e-4"]), load_config(None, ["lr=1e-4", "aug.hflip=0"])
    a, b = tmp_path / slow.exp_name, tmp_path / fast.exp_name
    _fold(a, 0, wll=0.20, auc_any=0.90, n=100, cfg=slow)
    _fold(a, 1, wll=0.30, auc_any=0.80, n=300, cfg=slow)
    _fold(b, 0, wll=0.22, auc_any=0.95, n=100, cfg=fast)
    stack = tmp_path / f"{b.name}_stack_lgbm"
    stack.mkdir()
    scores = {"weighted_log_loss": 0.18, "auc": {"any": 0.97}, "n_images": 100}
    (stack / "metrics.json").write_text(json.dumps({"stacked": scores, "folds_available": [0]}))
    (tmp_path / "report_only").mkdir()  # no fold: not an experiment
    return tmp_path, slow, fast


def test_leaderboard_reads_two_experiments_grouped_by_folds_then_sorted_by_cv(two_experiments):
    root, slow, fast = two_experiments
    table = leaderboard(root)
    # Two folds before one, although 0.22 < 0.275: CV over other folds does not compare.
    assert list(table["exp"]) == [slow.exp_name, fast.exp_name]
    second, first = table.iloc[0], table.iloc[1]
    assert second["cv_wll"] == pytest.approx((0.20 * 100 + 0.30 * 300) / 400)  # pooled by rows, not 0.25
    assert second["cv_auc_any"] == pytest.approx(0.85) and second["folds"] == "2/5" and second["done"] == "0 1"
    assert first["folds"] == "1/5" and first["lgbm_wll"] == pytest.approx(0.18) and pd.isna(first["gru_wll"])
    assert pd.isna(second["lgbm_wll"]) and second["train_min"] == pytest.approx(2.0)
    assert first["other_settings"] == "aug.hflip=0.0 lr=0.0001" and second["other_settings"] == "lr=0.0003"
    assert first["arch"] == "bloodnet" and first["image_size"] == load_config().image_size


def test_a_classifier_lists_no_bloodnet_key_it_never_read(tmp_path):
    """A classifier trained when a BloodNet default was different (its record holds the old volume_feature_grad and
    seg_hard_negatives) lists only the keys it reads; a BloodNet run with the same old keys lists them."""
    old = ["volume_feature_grad=true", "seg_hard_negatives=0", "lr=3e-4"]
    classifier, bloodnet = load_config(None, ["arch=classifier", *old]), load_config(None, ["arch=bloodnet", *old])
    _fold(tmp_path / classifier.exp_name, 0, wll=0.2, auc_any=0.9, n=100, cfg=classifier)
    _fold(tmp_path / bloodnet.exp_name, 0, wll=0.2, auc_any=0.9, n=100, cfg=bloodnet)
    settings = leaderboard(tmp_path).set_index("arch")["other_settings"]
    assert settings["classifier"] == "lr=0.0003"
    assert settings["bloodnet"] == "lr=0.0003 seg_hard_negatives=0.0 volume_feature_grad=True"


def test_cli_prints_and_writes_the_table(two_experiments, capsys):
    root, slow, fast = two_experiments
    assert main(["--oof-root", str(root), "--out", str(root / "lb")]) == 0
    out = capsys.readouterr().out
    assert out.index(slow.exp_name) < out.index(fast.exp_name)
    assert len(pd.read_csv(root / "lb" / "leaderboard.csv")) == 2
    assert slow.exp_name in (root / "lb" / "leaderboard.md").read_text()


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no experiment"):
        leaderboard(tmp_path)
    _fold(tmp_path / "x", 0, 0.2, 0.9, 10, load_config())
    (tmp_path / "x" / "fold0_metrics.json").write_text("{not json")
    with pytest.raises(InputError, match=r"fold0_metrics\.json"):
        leaderboard(tmp_path)


def test_within_the_same_folds_the_lower_cv_comes_first(two_experiments):
    root, slow, fast = two_experiments
    third = load_config(None, ["lr=2e-4"])
    _fold(root / third.exp_name, 0, wll=0.21, auc_any=0.9, n=100, cfg=third)
    _fold(root / third.exp_name, 1, wll=0.25, auc_any=0.9, n=300, cfg=third)
    assert list(leaderboard(root)["exp"]) == [third.exp_name, slow.exp_name, fast.exp_name]


def test_folds_whose_epoch_was_chosen_on_the_validation_fold_are_flagged(two_experiments):
    """A fold predicted with select_epoch=valid (or recorded before the key existed) is optimistic: the note says so
    and names the folds; folds predicted with their last epoch carry no such note."""
    root, slow, fast = two_experiments
    record = root / slow.exp_name / "fold1_run.json"
    saved = json.loads(record.read_text())
    del saved["config"]["select_epoch"]  # as written before the key existed: the validation fold chose the epoch
    record.write_text(json.dumps(saved))
    table = leaderboard(root).set_index("exp")
    assert table.loc[slow.exp_name, "note"] == "epoch chosen on the validation fold (optimistic): fold 1"
    assert "optimistic" not in table.loc[fast.exp_name, "note"]
    assert table.loc[fast.exp_name, "note"] == ""  # its stackers saw the same folds as the CNN
