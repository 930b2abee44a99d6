"""bench/recipes.py in --quick mode on the tiny set: one row per recipe, scored, named apart, resumable."""

import importlib.util
import json
import sys

import pandas as pd
import pytest

from src.config import load_config
from src.constants import LABELS
from src.errors import InputError
from src.metric import weighted_log_loss
from src.paths import ROOT, WORK

spec = importlib.util.spec_from_file_location("recipes", ROOT / "bench" / "recipes.py")
recipes = importlib.util.module_from_spec(spec)
sys.modules["recipes"] = recipes  # dataclasses look their module up while the class is built
spec.loader.exec_module(recipes)


def test_quick_run_trains_scores_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "bench"
    assert recipes.main(["--quick", "--data", str(tiny_data), "--only", "seg2", "--out", str(out)]) == 0
    (row,) = json.loads((out / "recipes-quick.json").read_text())["rows"]
    assert row["recipe"] == "seg2" and row["status"] == "ran" and row["train_min"] > 0
    assert row["exp"].startswith("bloodnet-resnet10t-64px-c1-")  # its own name: the quick keys are in the hash
    assert row["wll"] > 0 and 0 <= row["auc_any"] <= 1
    assert 0 <= row["study_auc_any"] <= 1 or pd.isna(row["study_auc_any"])
    assert "volume_mdape_pct" in row and "volume_spearman" in row  # a BloodNet recipe is scored on its volumes too
    text = (out / "recipes-quick.md").read_text()
    assert "QUICK MODE" in text and "load average" in text and "| seg2 |" in text
    assert {"volume_mdape_ci95", "volume_spearman_ci95"} <= set(row)  # with their bootstrap intervals
    # A second call (a killed bench started again) trains nothing, and its scores come from the fold's files, not
    # from the saved row: a row saved before the intervals existed, or with other scores (predictions written
    # again, e.g. under another select_epoch), shows the predictions as they are.
    saved = out / "recipes-quick" / f"{row['exp']}.json"
    saved.write_text(json.dumps({**{k: v for k, v in row.items() if not k.endswith("_ci95")}, "wll": 9.9}))
    last_pt = WORK / "models" / row["exp"] / "fold0" / "last.pt"
    trained_at = last_pt.stat().st_mtime_ns
    assert recipes.main(["--quick", "--data", str(tiny_data), "--only", "seg2", "--out", str(out)]) == 0
    (resumed,) = json.loads((out / "recipes-quick.json").read_text())["rows"]
    assert last_pt.stat().st_mtime_ns == trained_at
    assert resumed["volume_mdape_ci95"] == row["volume_mdape_ci95"] and "volume_mdape_ci95" in saved.read_text()
    assert resumed["wll"] == row["wll"] and resumed["status"] == "ran"
    # A fold trained outside the bench (run_fold.sh) is scored with its own epoch times, not a near-zero "rerun".
    (out / "recipes-quick" / f"{row['exp']}.json").unlink()
    assert recipes.main(["--quick", "--data", str(tiny_data), "--only", "seg2", "--out", str(out)]) == 0
    (again,) = json.loads((out / "recipes-quick.json").read_text())["rows"]
    epochs = pd.read_csv(recipes.OOF_DIR / row["exp"] / "fold0_epochs.csv")
    assert again["status"] == "ran before" and again["train_min"] == pytest.approx(epochs["epoch_time_s"].sum() / 60)
    assert again["wll"] == row["wll"]


def test_several_folds_are_pooled_and_the_recipes_compared_paired(tiny_data, tmp_path):
    from src.data.metadata import load_metadata

    out = tmp_path / "bench"
    args = ["--quick", "--data", str(tiny_data), "--only", "seg2", "c0-seg2", "--folds", "1", "0", "--out", str(out)]
    assert recipes.main(args) == 0
    result = json.loads((out / "recipes-quick-folds01.json").read_text())
    meta = load_metadata(tiny_data, "train")
    for row in result["rows"]:
        assert row["status"].startswith("ran")
        exp_dir = recipes.OOF_DIR / row["exp"]
        valid = pd.concat([pd.read_csv(exp_dir / f"fold{k}_valid.csv", dtype={"ID": str}) for k in (0, 1)])
        truth = valid[["ID"]].merge(meta, on="ID", validate="one_to_one")
        assert row["wll"] == pytest.approx(weighted_log_loss(truth[list(LABELS)].to_numpy(),
                                                             valid[list(LABELS)].to_numpy()))
        assert row["wll"] != pytest.approx(json.loads((exp_dir / "fold0_metrics.json").read_text())
                                           ["weighted_log_loss"])  # both folds, not fold 0 alone
        seconds = sum(pd.read_csv(exp_dir / f"fold{k}_epochs.csv")["epoch_time_s"].sum() for k in (0, 1))
        assert row["train_min"] == pytest.approx(seconds / 60 / 2)  # per fold: what the budget is set for
    paired = result["paired"]
    assert [s["experiment"] for s in paired["scores"]] == [r["recipe"] for r in result["rows"]]
    assert paired["n_images"] == len(valid) and paired["differences"][0]["against"] == result["rows"][0]["recipe"]
    text = (out / "recipes-quick-folds01.md").read_text()
    assert "--folds 0 1" in text and "Folds 0, 1" in text and "Paired study bootstrap" in text
    with pytest.raises(InputError, match="--folds"):
        recipes.main(["--quick", "--data", str(tiny_data), "--only", "seg2", "--folds", "-1", "--out", str(out)])


def test_a_recipe_whose_key_is_missing_is_skipped_not_fatal(tmp_path):
    row = recipes.run_recipe(recipes.Recipe("x", "a key this checkout lacks", ("no_such_key=1",)), tmp_path, (),
                             tmp_path)
    assert row["status"].startswith("skipped:") and "no_such_key" in row["status"]


def test_study_auc_uses_the_max_over_each_study():
    meta = pd.DataFrame({"ID": ["a", "b", "c", "d"], "StudyInstanceUID": ["s1", "s1", "s2", "s2"],
                         "any": [0, 1, 0, 0]})
    valid = pd.DataFrame({"ID": ["a", "b", "c", "d"], "any": [0.1, 0.4, 0.3, 0.2]})
    assert recipes.study_auc_any(valid, meta) == 1.0  # s1 max 0.4 (positive) > s2 max 0.3
    valid.loc[0, "any"] = 0.2
    valid.loc[1, "any"] = 0.25  # now the positive study's max is below the negative's
    assert recipes.study_auc_any(valid, meta) == 0.0


def test_unknown_recipe_name_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no such recipe"):
        recipes.main(["--only", "nope", "--out", str(tmp_path)])


def test_every_recipe_loads_and_trains_into_its_own_folder():
    """A recipe's row is cached under its experiment name: two recipes sharing one would show one run twice."""
    names = [load_config(None, list(r.sets)).exp_name for r in recipes.RECIPES]
    assert len(set(names)) == len(names) == len(recipes.RECIPES)
    assert names[0] == load_config(None, []).exp_name  # the first row is the default itself


def test_a_recipe_that_training_refuses_is_skipped_and_the_bench_goes_on(tiny_data, tmp_path, monkeypatch):
    def refuse(cfg, fold, data_dir):
        raise InputError("work/models/x/fold0/last.pt: checkpoint was trained with other settings (lr)")

    monkeypatch.setattr("src.cnn.train.run_fold", refuse)
    monkeypatch.setattr(recipes, "OOF_DIR", tmp_path / "oof")  # no fold trained before under these names
    assert recipes.main(["--quick", "--data", str(tiny_data), "--only", "seg2", "c0-seg2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "recipes-quick.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["c0-seg2", "seg2"]
    assert all(r["status"].startswith("skipped: ") and "other settings" in r["status"] for r in rows)
