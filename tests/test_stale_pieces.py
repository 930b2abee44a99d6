"""No stale pieces: fold splits recorded and never mixed, cache fingerprints, moved data, resume between renames."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_data_layer import SIZE, _check_cache, _work_in_tmp, dataset  # noqa: F401 (fixtures)
from torch import nn

from src import paths
from src.cnn.checkpoints import load_checkpoint, save_checkpoint
from src.config import Config
from src.constants import FOLD_COL, ID_COL, LABELS
from src.data import cache
from src.data.folds import fold_split, guard_model_split, load_folds
from src.errors import InputError
from src.predictions import (
    fold_assignment_digest,
    load_test_predictions,
    load_valid_predictions,
    split_digest,
)


def _chunks_run(monkeypatch) -> list[int]:
    real, seen = cache._process_chunk, []
    monkeypatch.setattr(cache, "_process_chunk", lambda task: (seen.append(task["chunk"]), real(task))[1])
    return seen


def test_cache_resumes_a_kill_between_its_final_renames(dataset, monkeypatch):  # noqa: F811
    data, _, _, names = dataset
    real_replace = os.replace

    def dies_before_images(src, dst):
        if Path(dst).name == "images_train.npy":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", dies_before_images)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(data, SIZE, "train", workers=1, chunk_rows=4)
    cdir = paths.cache_dir(data, SIZE)
    assert (cdir / "masks_train.npy").exists() and not (cdir / "masks_train.npy.partial").exists()
    monkeypatch.setattr(cache.os, "replace", real_replace)
    seen = _chunks_run(monkeypatch)
    cache.build_cache(data, SIZE, "train", workers=1, chunk_rows=4)
    assert seen == []  # resumed with nothing left to decode, not restarted
    assert not (cdir / "progress_train.json").exists()
    _check_cache(data, names)


def test_cache_fingerprint_covers_windows_and_writer_code(dataset, monkeypatch, capsys):  # noqa: F811
    data, *_ = dataset
    cache.build_cache(data, SIZE, "train", workers=1)
    seen = _chunks_run(monkeypatch)
    cache.build_cache(data, SIZE, "train", workers=1, chunk_rows=3)  # another chunking: still complete
    assert seen == []
    monkeypatch.setattr(cache, "WINDOWS", (*cache.WINDOWS[:2], ("bone", 500.0, 2000.0)))
    cache.build_cache(data, SIZE, "train", workers=1)
    assert seen and "rebuilding" in capsys.readouterr().out
    seen.clear()
    monkeypatch.setattr(cache, "_code_version", lambda: "a changed DICOM reader")
    cache.build_cache(data, SIZE, "train", workers=1)
    assert seen


def test_moved_data_directory_reuses_caches_and_resumes(dataset, tmp_path, monkeypatch):  # noqa: F811
    data, *_ = dataset
    cache.build_cache(data, SIZE, "train", workers=1)
    moved = tmp_path / "kaggle" / "input" / "rsna"
    shutil.copytree(data, moved)
    seen = _chunks_run(monkeypatch)
    cache.build_cache(moved, SIZE, "train", workers=1)
    assert seen == [] and paths.cache_dir(moved, SIZE) == paths.cache_dir(data, SIZE)
    assert paths.metadata_csv(moved, "train") == paths.metadata_csv(data, "train")
    # Same split from the moved copy, so a checkpoint trained from `data` may resume from `moved`.
    assert fold_split(moved, 2, 0)["sha1"] == fold_split(data, 2, 0)["sha1"]
    cfg = Config(data_dir=str(data))
    save_checkpoint(tmp_path / "last.pt", nn.Linear(2, 1), cfg, epoch=1)
    assert load_checkpoint(tmp_path / "last.pt", Config(data_dir=str(moved)))["epoch"] == 1
    # Other content under the moved path: its own cache.
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "stage_2_train" / "ID_000000d01.dcm").unlink()
    assert paths.cache_dir(other, SIZE) != paths.cache_dir(data, SIZE)


def test_fold_split_digest_and_model_guard(dataset, tmp_path):  # noqa: F811
    data, *_ = dataset
    split = fold_split(data, 2, 0)
    folds = load_folds(data, 2, 0)
    assert split["sha1"] == fold_assignment_digest(folds) == split_digest(Path(split["file"]))
    assert fold_assignment_digest(folds.sample(frac=1.0, random_state=0)) == split["sha1"]  # row order is no split
    swapped = folds.assign(**{FOLD_COL: 1 - folds[FOLD_COL]})
    assert fold_assignment_digest(swapped) != split["sha1"]
    model_dir = tmp_path / "models" / "fold0"
    guard_model_split(model_dir, split)
    guard_model_split(model_dir, split)  # same split: resumes
    with pytest.raises(InputError, match="trained on fold split"):
        guard_model_split(model_dir, {**split, "sha1": fold_assignment_digest(swapped)})



def test_model_guard_refuses_other_data_with_the_same_images_and_folds(tmp_path):
    """A copy of the data without its masks (or a changed extra_train folder) has the same fold split: the data's
    identity tells them apart. A marker from before the identity was recorded is adopted and gains it."""
    split = {"file": "folds.csv", "sha1": "abc"}
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    guard_model_split(old_dir, split)  # written without an identity, as before
    guard_model_split(old_dir, {**split, "data": "with-masks"})  # adopted, and now recorded
    assert json.loads((old_dir / "folds.json").read_text())["data"] == "with-masks"
    guard_model_split(new_dir, {**split, "data": "with-masks"})
    guard_model_split(new_dir, {**split, "data": "with-masks"})
    for model_dir in (old_dir, new_dir):
        with pytest.raises(InputError, match="trained on other data with the same images and folds"):
            guard_model_split(model_dir, {**split, "data": "without-masks"})


def _write_fold(pred_dir: Path, fold: int, split: dict | None, ids: list[str], value: float, kind: str) -> None:
    frame = pd.DataFrame({ID_COL: ids, FOLD_COL: fold, **{c: value for c in LABELS}})
    frame.to_csv(pred_dir / f"fold{fold}_{kind}.csv", index=False)
    record = {"config": {}} | ({"folds": split} if split else {})
    (pred_dir / f"fold{fold}_run.json").write_text(json.dumps(record))


def test_predictions_of_different_fold_splits_are_refused(tmp_path):
    folds_csv = tmp_path / "folds.csv"
    pd.DataFrame({ID_COL: ["ID_a", "ID_b"], FOLD_COL: [0, 1]}).to_csv(folds_csv, index=False)
    split = {"file": str(folds_csv), "sha1": split_digest(folds_csv)}
    pred = tmp_path / "exp"
    pred.mkdir()
    _write_fold(pred, 0, split, ["ID_a"], 0.2, "valid")
    _write_fold(pred, 1, {"file": "", "sha1": "0" * 40}, ["ID_b"], 0.4, "valid")
    with pytest.raises(InputError, match=r"fold0_valid\.csv with split .*fold1_valid\.csv with split"):
        load_valid_predictions(pred)
    _write_fold(pred, 1, split, ["ID_b"], 0.4, "valid")
    assert len(load_valid_predictions(pred)) == 2
    pd.DataFrame({ID_COL: ["ID_a", "ID_b"], FOLD_COL: [1, 0]}).to_csv(folds_csv, index=False)  # the data changed
    with pytest.raises(InputError, match=r"fold0_valid\.csv: made with fold split .* now holds"):
        load_valid_predictions(pred)


def test_test_predictions_average_exactly_the_fold_files(tmp_path, capsys):
    pred = tmp_path / "exp"
    pred.mkdir()
    ids = ["ID_x", "ID_y"]
    for fold, value in ((0, 0.2), (1, 0.4)):
        _write_fold(pred, fold, None, ids, value, "test")
    pd.DataFrame({ID_COL: ids, **{c: 0.9 for c in LABELS}}).to_csv(pred / "full_test.csv", index=False)
    mean = load_test_predictions(pred)
    np.testing.assert_allclose(mean[list(LABELS)].to_numpy(), 0.3)
    assert "left out full_test.csv" in capsys.readouterr().out
    for fold in (0, 1):
        (pred / f"fold{fold}_test.csv").unlink()
    assert load_test_predictions(pred)["any"].tolist() == [0.9, 0.9]  # one unnumbered file: a stacker's
    shutil.copy(pred / "full_test.csv", pred / "old_test.csv")
    with pytest.raises(InputError, match=r"full_test\.csv, old_test\.csv"):
        load_test_predictions(pred)


def test_run_record_carries_the_fold_split(tmp_path):
    from src.predictions import recorded_split, write_predictions

    meta = pd.DataFrame({ID_COL: ["ID_x", "ID_y"]})
    results = {"test": (meta, {"probs": np.full((2, len(LABELS)), 0.5)})}
    split = {"file": "folds/x.csv", "sha1": "f" * 40}
    write_predictions(tmp_path, "fold3", 3, results, Config(), split)
    assert recorded_split(tmp_path, 3) == split and recorded_split(tmp_path, 4) == {}
