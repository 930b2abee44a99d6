"""Metadata (order, spacing, labels), the resumable image cache and patient-grouped folds on crafted DICOMs."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest
from dicom_factory import make_dicom, tilted_orientation

from src import paths
from src.constants import LABELS
from src.data import cache, metadata
from src.data.dicom import read_hu
from src.data.folds import load_folds, make_folds
from src.data.metadata import build_metadata, load_metadata, order_series, read_labels
from src.data.windows import to_channels
from src.errors import InputError

TILT = 20.0
DZ = 5.0  # table step along z; under a 20 degree tilt the slices are DZ * cos(20) = 4.698 mm apart
SIZE = 8
ROWS, COLS = 12, 16


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "WORK", tmp_path / "work")
    monkeypatch.setattr(paths, "FOLDS_DIR", tmp_path / "folds")


def _labels_for(i: int) -> dict[str, int]:
    subtype = LABELS[i % 5] if i % 3 else None
    out = {s: int(s == subtype) for s in LABELS[:5]}
    out["any"] = int(subtype is not None)
    return out


def _hu_slice(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(-1024, 200, size=(ROWS, COLS)).astype(np.int16)


@pytest.fixture
def dataset(tmp_path):
    """3 patients: a tilted 5-slice series with shuffled names, a series with a duplicate position, a 1-slice series;
    plus a corrupt-pixel file, a non-DICOM file, a file without labels and a label row without a file."""
    data = tmp_path / "data"
    img = data / "stage_2_train"
    img.mkdir(parents=True)
    (data / "masks").mkdir()
    names = [f"ID_{n:09x}" for n in (0xF00, 0x300, 0xA00, 0x100, 0xC00)]  # names deliberately not in slice order
    truth = {}  # ID -> expected (series, slice_index, position, spacing)
    tilt = tilted_orientation(TILT)
    normal_z = np.cos(np.deg2rad(TILT))
    normal_y = np.sin(np.deg2rad(TILT))
    for k, name in enumerate(names):
        ipp = (-100.0, -90.0, 10.0 + k * DZ)
        make_dicom(img / f"{name}.dcm", _hu_slice(k) + 1024, patient="ID_p1", study="ID_s1", series="ID_r1",
                   position=ipp, orientation=tilt)  # fmt: skip
        truth[name] = ("ID_r1", k, ipp[1] * normal_y + ipp[2] * normal_z, DZ * normal_z)
    # duplicate position at z=5; levels 0, 5, 15 give gaps 5 and 10
    for k, (name, z) in enumerate([("ID_000000b01", 0.0), ("ID_000000b03", 5.0), ("ID_000000b02", 5.0),
                                   ("ID_000000b04", 15.0)]):  # fmt: skip
        make_dicom(img / f"{name}.dcm", _hu_slice(10 + k) + 1024, patient="ID_p2", study="ID_s2", series="ID_r2",
                   position=(0.0, 0.0, z))  # fmt: skip
    truth["ID_000000b01"] = ("ID_r2", 0, 0.0, 5.0)
    truth["ID_000000b02"] = ("ID_r2", 1, 5.0, 7.5)  # tie at z=5 broken by ID
    truth["ID_000000b03"] = ("ID_r2", 2, 5.0, 7.5)
    truth["ID_000000b04"] = ("ID_r2", 3, 15.0, 10.0)
    make_dicom(img / "ID_000000d01.dcm", _hu_slice(20) + 1024, patient="ID_p3", study="ID_s3", series="ID_r3",
               position=(0.0, 0.0, 42.0))  # fmt: skip
    truth["ID_000000d01"] = ("ID_r3", 0, 42.0, 5.0)
    # corrupt pixels (header fine): in metadata, not decodable in the cache
    make_dicom(img / "ID_6431af929.dcm", np.zeros((ROWS, COLS)), patient="ID_p3", study="ID_s3", series="ID_r4",
               position=(0.0, 0.0, 0.0), truncate_to=50)  # fmt: skip
    truth["ID_6431af929"] = ("ID_r4", 0, 0.0, 5.0)
    (img / "ID_000000e01.dcm").write_bytes(b"not a dicom at all")
    make_dicom(
        img / "ID_000000e02.dcm",
        _hu_slice(30) + 1024,
        patient="ID_p3",
        study="ID_s3",
        series="ID_r3",
        position=(0.0, 0.0, 47.0),
    )  # no labels: left out

    labelled = [*sorted(truth), "ID_000000e01", "ID_0000ghost"]
    labels = {name: _labels_for(i) for i, name in enumerate(labelled)}
    rows = [(f"{name}_{s}", labels[name][s]) for name in labelled for s in LABELS]
    csv = pd.DataFrame(rows, columns=["ID", "Label"])
    csv = pd.concat([csv, csv.iloc[:12]])  # two images' blocks duplicated, as in the real CSV
    csv = csv.sample(frac=1.0, random_state=3)  # shuffled: any pivot by position would break
    csv.to_csv(data / "stage_2_train.csv", index=False)

    mask = np.zeros((ROWS, COLS), dtype=np.uint8)
    mask[2:10, 8:16] = 255
    cv2.imwrite(str(data / "masks" / f"{names[1]}.png"), mask)
    cv2.imwrite(str(data / "masks" / f"{names[2]}.png"), np.zeros((5, 5), dtype=np.uint8))  # wrong shape
    return data, truth, labels, names


def test_metadata_order_position_spacing_and_labels(dataset, capsys):
    data, truth, labels, _ = dataset
    meta = build_metadata(data, "train", workers=1)
    out = capsys.readouterr().out
    assert "1 labelled images without a file, e.g. ID_0000ghost" in out
    assert "1 train files without labels, e.g. ID_000000e02" in out
    assert "1 train files with unreadable headers" in out
    assert sorted(meta["ID"]) == sorted(truth)
    for row in meta.itertuples():
        series, index, position, spacing = truth[row.ID]
        assert row.SeriesInstanceUID == series
        assert row.slice_index == index, row.ID
        assert row.position == pytest.approx(position, abs=1e-4)
        assert row.slice_spacing == pytest.approx(spacing, abs=1e-4), row.ID
        assert [getattr(row, s) for s in LABELS] == [labels[row.ID][s] for s in LABELS]
        assert row.path == f"stage_2_train/{row.ID}.dcm"
    r1 = meta[meta["SeriesInstanceUID"] == "ID_r1"]
    assert list(r1["slice_index"]) == [0, 1, 2, 3, 4] and (r1["series_length"] == 5).all()
    assert list(r1["ID"]) == ["ID_000000f00", "ID_000000300", "ID_000000a00", "ID_000000100", "ID_000000c00"]
    assert (meta[["rows", "cols"]].to_numpy() == [ROWS, COLS]).all()
    assert (meta["pixel_spacing_row"] == 0.5).all()
    assert set(meta.loc[meta["has_mask"], "ID"]) == {"ID_000000300", "ID_000000a00"}
    bad = pd.read_csv(paths.metadata_csv(data, "train").with_name("bad_headers_train.csv"))
    assert list(bad["ID"]) == ["ID_000000e01"] and "not a readable DICOM" in bad["reason"][0]


def test_order_series_is_independent_of_input_order():
    df = pd.DataFrame({
        "ID": ["c", "a", "b", "d"], "PatientID": "p", "StudyInstanceUID": "s", "SeriesInstanceUID": "r",
        "position": [2.0, 2.0, -1.0, 4.5],
    })  # fmt: skip
    ordered = order_series(df)
    again = order_series(df.iloc[::-1])
    pd.testing.assert_frame_equal(ordered, again)
    assert list(ordered["ID"]) == ["b", "a", "c", "d"]
    assert list(ordered["slice_spacing"]) == [3.0, 2.75, 2.75, 2.5]


def test_labels_csv_duplicates_dropped_and_malformed_rejected(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    rows = [f"ID_abc_{s},{int(s in ('subdural', 'any'))}" for s in reversed(LABELS)]
    path.write_text("ID,Label\n" + "\n".join(rows + rows[:2]) + "\n")
    wide = read_labels(path)
    assert list(wide.columns) == ["ID", *LABELS]
    assert wide.iloc[0].tolist() == ["ID_abc", 0, 0, 0, 0, 1, 1]

    bad = [*rows[:3], "ID_abc_subdurall,1", *rows[3:]]
    path.write_text("ID,Label\n" + "\n".join(bad) + "\n")
    with pytest.raises(InputError, match=r"stage_2_train.csv: line 5 .*ID_abc_subdurall"):
        read_labels(path)
    path.write_text("ID,Label\n" + "\n".join([*rows[:5], "ID_abc_epidural,2"]) + "\n")
    with pytest.raises(InputError, match=r"stage_2_train.csv: line 7 "):
        read_labels(path)
    path.write_text("image,target\nID_abc_any,1\n")
    with pytest.raises(InputError, match="expected columns ID,Label"):
        read_labels(path)
    path.write_text("ID,Label\n" + "\n".join([*rows, rows[0].replace(",1", ",0")]) + "\n")
    with pytest.raises(InputError, match="conflicting labels"):
        read_labels(path)


def test_metadata_cache_rebuilt_when_files_change(dataset):
    data, *_ = dataset
    first = load_metadata(data, "train", workers=1)
    stamp = paths.metadata_csv(data, "train").with_suffix(".json")
    assert json.loads(stamp.read_text())["n_files"] == 13
    assert load_metadata(data, "train", workers=1).equals(first)  # fresh: read back, same dtypes
    make_dicom(data / "stage_2_train" / "ID_000000e03.dcm", np.zeros((ROWS, COLS)), position=(0, 0, 1))
    with open(data / "stage_2_train.csv", "a") as fh:
        fh.writelines(f"ID_000000e03_{s},0\n" for s in LABELS)
    again = load_metadata(data, "train", workers=1)
    assert json.loads(stamp.read_text())["n_files"] == 14
    assert set(again["ID"]) - set(first["ID"]) == {"ID_000000e03"}


def test_metadata_cli_reuses_a_fresh_table_and_rereads_edited_labels(dataset, capsys):
    data, *_ = dataset
    metadata.main(["--data", str(data), "--split", "train", "--workers", "1"])
    assert "wrote" in capsys.readouterr().out
    metadata.main(["--data", str(data), "--split", "train", "--workers", "1"])  # run_fold.sh's second run
    out = capsys.readouterr().out
    assert "wrote" not in out and "(--force reads again)" in out
    labels = data / "stage_2_train.csv"
    st = labels.stat()
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an edited label file, same image files
    load_metadata(data, "train", workers=1)
    assert "wrote" in capsys.readouterr().out  # rebuilt: the labels are joined into the table
    metadata.main(["--data", str(data), "--split", "train", "--workers", "1", "--force"])
    assert "wrote" in capsys.readouterr().out


def _check_cache(data, names):
    meta, images, masks = cache.load_cache(data, SIZE, "train", workers=1)
    cdir = paths.cache_dir(data, SIZE)
    index = pd.read_csv(cdir / "index_train.csv")
    assert images.shape == (len(index), 3, SIZE, SIZE) and images.dtype == np.uint8
    assert index.loc[index["ID"] == "ID_6431af929", "ok"].item() == 0
    assert int(index["ok"].sum()) == len(index) - 1
    bad = pd.read_csv(cdir / "bad_files_train.csv")
    reasons = dict(zip(bad["ID"], bad["reason"]))
    assert "pixel data too short" in reasons["ID_6431af929"]
    assert "mask skipped" in reasons[names[2]] and "5x5" in reasons[names[2]]
    assert "ID_6431af929" not in set(meta["ID"]) and len(meta) == len(index) - 1
    assert meta.attrs["bad_ids"] == ["ID_000000e01", "ID_6431af929"]
    assert cache.bad_ids(data, SIZE, "train") == ["ID_000000e01", "ID_6431af929"]
    assert not images[index.loc[index["ID"] == "ID_6431af929", "cache_row"].item()].any()
    for row in meta.itertuples():
        expected = to_channels(read_hu(data / row.path), SIZE)
        np.testing.assert_array_equal(images[row.cache_row], expected)
    assert masks.shape == (2, SIZE, SIZE)
    good = meta.loc[meta["ID"] == names[1]].iloc[0]
    # blood rows 2:10, cols 8:16 of 12x16 -> padded 16x16 (2 air rows on top): rows 4:12 -> halved: rows 2:6, cols 4:8
    expected_mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    expected_mask[2:6, 4:8] = 1
    np.testing.assert_array_equal(masks[good.mask_row], expected_mask)
    assert meta.loc[meta["ID"] == names[2], "mask_row"].item() == -1
    return images


def test_cache_values_bad_files_and_masks_with_pool(dataset, capsys):
    data, _, _, names = dataset
    cache.build_cache(data, SIZE, "train", workers=2, chunk_rows=3)
    out = capsys.readouterr().out
    assert "skipped 2 files (1 images, 1 masks)" in out and "images/s" in out
    _check_cache(data, names)


def test_cache_resumes_after_interruption(dataset, monkeypatch, kill_cache_after):
    data, _, _, names = dataset
    real = cache._process_chunk
    kill_cache_after(2)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(data, SIZE, "train", workers=1, chunk_rows=2)
    cdir = paths.cache_dir(data, SIZE)
    assert not (cdir / "images_train.npy").exists() and (cdir / "images_train.npy.partial").exists()
    assert json.loads((cdir / "progress_train.json").read_text())["done"] == [0, 1]

    resumed: list[int] = []
    monkeypatch.setattr(cache, "_process_chunk", lambda task: (resumed.append(task["chunk"]), real(task))[1])
    cache.build_cache(data, SIZE, "train", workers=1, chunk_rows=2)
    assert resumed == [2, 3, 4, 5]  # 11 images in chunks of 2; chunks 0 and 1 were not redone
    assert not (cdir / "progress_train.json").exists()
    _check_cache(data, names)

    resumed.clear()
    cache.build_cache(data, SIZE, "train", workers=1, chunk_rows=2)
    assert resumed == []  # complete caches are kept


def _fold_meta(n_patients: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        for s in range(1 + p % 2):
            positive = p % 4 == 0
            for k in range(int(rng.integers(3, 9))):
                rows.append((f"ID_{p:03d}{s}{k:02d}", f"ID_pat{p}", f"ID_st{p}_{s}", int(positive and k in (1, 2))))
    return pd.DataFrame(rows, columns=["ID", "PatientID", "StudyInstanceUID", "any"])


def test_folds_group_patients_and_cover_every_image():
    meta = _fold_meta(40)
    folds = make_folds(meta, 5, seed=42)
    assert list(folds.columns) == ["ID", "PatientID", "StudyInstanceUID", "fold"]
    assert sorted(folds["ID"]) == sorted(meta["ID"]) and folds["ID"].is_unique
    assert set(folds["fold"]) == {0, 1, 2, 3, 4}
    assert (folds.groupby("PatientID")["fold"].nunique() == 1).all()
    positive = set(meta.loc[meta["any"] == 1, "PatientID"])
    per_fold = folds[folds["PatientID"].isin(positive)].groupby("fold")["PatientID"].nunique()
    assert per_fold.min() >= 1 and per_fold.max() <= 3  # 10 positive patients spread over 5 folds
    shuffled = make_folds(meta.sample(frac=1.0, random_state=1), 5, seed=42)
    assert shuffled.set_index("ID")["fold"].equals(folds.set_index("ID")["fold"])
    other = make_folds(meta, 5, seed=7)
    assert not other.set_index("ID")["fold"].equals(folds.set_index("ID")["fold"].loc[other["ID"]])


def test_fewer_patients_than_folds_is_an_input_error():
    with pytest.raises(InputError, match="3 patients cannot fill 5 folds"):
        make_folds(_fold_meta(3), 5, seed=0)


def test_load_folds_writes_the_contract_file(dataset):
    data, truth, *_ = dataset
    folds = load_folds(data, n_folds=2, seed=0)
    written = pd.read_csv(paths.folds_csv(2, 0, data))
    assert sorted(written["ID"]) == sorted(truth) == sorted(folds["ID"])
    assert (written.groupby("PatientID")["fold"].nunique() == 1).all()
