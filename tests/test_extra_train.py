"""extra_train: more folders whose train images join every fold's training part, never a validation fold or the OOF."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from src.cnn.runtime import Runtime
from src.cnn.train import prepare_data, run_fold
from src.config import load_config
from src.constants import FOLD_COL, ID_COL, LABELS
from src.data.cache import load_cache
from src.data.extra import NEVER_VALIDATED, StackedRows, _check_disjoint, check_extra_dirs
from src.data.folds import load_folds
from src.data.packed import ChunkWriter, PackedRows, seal
from src.errors import InputError


@pytest.fixture(scope="module")
def extra_data(tmp_path_factory):
    """A second tiny synthetic set: other patients (another seed), with painted masks."""
    from src.synth.generator import generate

    out = tmp_path_factory.mktemp("tiny_extra")
    generate(out, n_studies=8, seed=11, size=64)
    return out


@pytest.fixture
def bare_main(tiny_data, tmp_path):
    """The tiny set without its masks: the real RSNA situation."""
    bare = tmp_path / "bare"
    shutil.copytree(tiny_data, bare, ignore=shutil.ignore_patterns("masks", "true_volumes.csv"))
    return bare


def _packed(tmp_path, rows: np.ndarray) -> PackedRows:
    (tmp_path / "packed").mkdir()
    writer = ChunkWriter(tmp_path / "packed", 0, 0, len(rows), rows.shape[1:])
    for i, row in enumerate(rows):
        writer[i] = row
    writer.flush()
    seal(tmp_path / "packed", rows.shape)
    return PackedRows(tmp_path / "packed")


def test_stacked_rows_read_like_one_store_of_every_row(tmp_path):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    second = rng.integers(0, 256, (4, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "first.npy", first)
    whole = np.concatenate([first, second])
    for parts in ([np.load(tmp_path / "first.npy", mmap_mode="r"), second], [first, _packed(tmp_path, second)]):
        stacked = StackedRows(parts)
        assert stacked.shape == whole.shape and len(stacked) == 9
        for key in (0, 6, -1, np.int64(8), [7, 0, 5, 4, 8, 1], np.array([-1, 2]), slice(3, 7), whole[:, 0, 0, 0] > 99,
                    (np.array([8, 1, 6]), 2), (5, 1)):
            np.testing.assert_array_equal(stacked[key], whole[key])
        np.testing.assert_array_equal(np.asarray(stacked), whole)
        with pytest.raises(IndexError):
            stacked[[0, 9]]
        with pytest.raises(IndexError):
            stacked[-10]
    with pytest.raises(ValueError, match="different shapes"):
        StackedRows([first, second[:, :2]])


def test_extra_train_key_reads_absolute_paths_and_changes_the_experiment_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["extra_train=a, b/c"])
    assert cfg.extra_train == (str(tmp_path / "a"), str(tmp_path / "b" / "c"))
    assert load_config(None, ["extra_train="]).extra_train == ()
    plain, other = load_config().exp_name, load_config(None, ["extra_train=elsewhere"]).exp_name
    assert cfg.exp_name not in (plain, other) and plain != other
    assert plain == load_config(None, ["extra_train="]).exp_name


def test_extra_folders_are_checked_before_any_work(tiny_data, extra_data, tmp_path):
    with pytest.raises(InputError, match=r"has no stage_2_train\.csv"):
        check_extra_dirs((str(tmp_path / "nothing"),), tiny_data)
    with pytest.raises(InputError, match="the main data itself"):
        check_extra_dirs((str(tiny_data),), tiny_data)
    with pytest.raises(InputError, match="listed twice"):
        check_extra_dirs((str(extra_data), str(extra_data)), tiny_data)
    assert check_extra_dirs((str(extra_data),), tiny_data) == (str(extra_data),)


def test_an_extra_set_sharing_patients_or_images_with_the_main_data_is_refused():
    main = pd.DataFrame({ID_COL: ["ID_a", "ID_b"], "PatientID": ["P1", "P2"]})
    with pytest.raises(InputError, match="shares 1 patients"):
        _check_disjoint(main, pd.DataFrame({ID_COL: ["ID_c"], "PatientID": ["P2"]}), "x", set())
    with pytest.raises(InputError, match="shares 1 images"):
        _check_disjoint(main, pd.DataFrame({ID_COL: ["ID_a"], "PatientID": ["P9"]}), "x", set())
    with pytest.raises(InputError, match="shares 1 patients"):  # two extra sets must not share patients either
        _check_disjoint(main, pd.DataFrame({ID_COL: ["ID_d"], "PatientID": ["P7"]}), "x", {"P7"})
    _check_disjoint(main, pd.DataFrame({ID_COL: ["ID_e"], "PatientID": ["P8"]}), "x", set())


def test_a_copy_of_the_main_data_under_another_path_is_refused(tiny_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    cfg = load_config(None, ["image_size=64", "arch=classifier", f"extra_train={copy}"])
    with pytest.raises(InputError, match="holds the same data"):
        prepare_data(cfg, tiny_data, 0, Runtime(0, 1, torch.device("cpu"), None, False))


def test_masked_extra_data_teaches_the_map_beside_mask_free_main_data(bare_main, extra_data):
    """Main data without masks (as RSNA) + a masked extra set: masks=auto trains the pixel loss on the extra masks;
    the main positives stay unknown, the validation fold is the main data's alone, and every extra row reads its own
    image and mask."""
    rt = Runtime(0, 1, torch.device("cpu"), None, False)
    cfg = load_config(None, ["image_size=64", "arch=bloodnet", f"extra_train={extra_data}"])
    _, images, train_ds, valid_ds = prepare_data(cfg, bare_main, 0, rt)
    assert cfg.masks == "full"
    main, _, _ = load_cache(bare_main, 64, "train")
    extra, extra_images, extra_masks = load_cache(extra_data, 64, "train")
    folds = load_folds(bare_main, cfg.n_folds, cfg.fold_seed)
    valid_ids = set(folds.loc[folds[FOLD_COL] == 0, ID_COL]) & set(main[ID_COL])
    assert set(valid_ds.meta[ID_COL]) == valid_ids
    assert len(train_ds) == len(main) - len(valid_ids) + len(extra)
    is_extra = train_ds.meta[FOLD_COL].to_numpy() == NEVER_VALIDATED
    assert set(train_ds.meta.loc[is_extra, ID_COL]) == set(extra[ID_COL])
    by_id = extra.set_index(ID_COL)
    for i in np.flatnonzero(is_extra)[::7]:
        row = by_id.loc[train_ds.meta.at[i, ID_COL]]
        np.testing.assert_array_equal(images[train_ds.meta.at[i, "cache_row"]], extra_images[row["cache_row"]])
        if row["mask_row"] >= 0:
            np.testing.assert_array_equal(train_ds.masks[train_ds.mask_row[i]], extra_masks[row["mask_row"]])
    positive = train_ds.labels[:, LABELS.index("any")] == 1
    assert (train_ds.mask_state[positive & ~is_extra] == -1).all()  # RSNA-like positives: unknown, never empty
    assert (train_ds.mask_state[positive & is_extra] == 1).any()
    assert not (train_ds.mask_state[is_extra & (train_ds.mask_row >= 0)] != 1).any()


def test_extra_rows_never_reach_the_oof_or_the_test_predictions(tiny_data, extra_data):
    cfg = load_config(None, ["arch=classifier", "image_size=64", "batch_size=16", "num_workers=0", "tta_flip=false",
                             "limit_train_batches=2", "epochs=1", "exp=t_extra", f"extra_train={extra_data}"])
    out_dir = run_fold(cfg, 0, tiny_data)
    main, _, _ = load_cache(tiny_data, 64, "train")
    test, _, _ = load_cache(tiny_data, 64, "test")
    folds = load_folds(tiny_data, cfg.n_folds, cfg.fold_seed)
    assert set(pd.read_csv(out_dir / "fold0_valid.csv")[ID_COL]) == set(
        folds.loc[folds[FOLD_COL] == 0, ID_COL]) & set(main[ID_COL])
    assert set(pd.read_csv(out_dir / "fold0_test.csv")[ID_COL]) == set(test[ID_COL])


def test_a_finished_run_is_not_reused_for_a_copy_of_its_data_without_masks(tiny_data, bare_main):
    """The experiment name leaves the data folder out, so the model folder's record of the data must refuse."""
    sets = ["image_size=64", "batch_size=16", "num_workers=0", "tta_flip=false", "limit_train_batches=1",
            "seg_epochs=0", "head_epochs=0", "joint_epochs=1", "exp=t_copy"]
    run_fold(load_config(None, sets), 0, tiny_data)
    with pytest.raises(InputError, match="trained on other data"):
        run_fold(load_config(None, sets), 0, bare_main)
