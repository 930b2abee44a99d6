"""src.data.geometry: the unit slice normal, checked; metadata and triage order slices by it, refuse the same files."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import make_dicom

from src.data.dicom import DicomError
from src.data.geometry import slice_normal
from src.data.metadata import build_metadata
from src.triage.inputs import load_study_files


def _series(folder, orientations, z_step=5.0):
    folder.mkdir(parents=True, exist_ok=True)
    for k, iop in enumerate(orientations):
        make_dicom(folder / f"ID_{k:09x}.dcm", np.full((8, 8), 1064), position=(0.0, 0.0, k * z_step),
                   orientation=iop)  # fmt: skip
    return folder


def test_normal_is_unit_and_checked():
    np.testing.assert_allclose(slice_normal((0.5, 0, 0, 0, 0.5, 0), "x.dcm"), [0, 0, 1])
    for bad, why in [((0, 0, 0, 0, 0, 0), "does not define a slice plane"), ((1, 0, 0, 1, 0, 0), "perpendicular"),
                     ((1, 0, 0, 0, float("nan"), 0), "finite"), ((1, 0, 0), "six")]:  # fmt: skip
        with pytest.raises(DicomError, match=why):
            slice_normal(bad, "x.dcm")


def test_scaled_cosines_keep_the_true_spacing(tmp_path):
    _series(tmp_path / "stage_2_test", [(0.5, 0, 0, 0, 0.5, 0)] * 3)
    meta = build_metadata(tmp_path, "test", workers=1)
    np.testing.assert_allclose(meta["slice_spacing"], 5.0)  # unnormalised cosines gave 1.25 mm
    slices, _, _ = load_study_files([tmp_path / "stage_2_test"], 16)
    np.testing.assert_allclose(slices["slice_spacing"], 5.0)
    np.testing.assert_allclose(slices["position"], meta["position"])


def test_zero_orientation_refused_by_metadata_and_triage_alike(tmp_path):
    folder = _series(tmp_path / "stage_2_test", [(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 1, 0), (0, 0, 0, 0, 0, 0)])
    build_metadata(tmp_path, "test", workers=1)
    import pandas as pd

    from src import paths

    bad = pd.read_csv(paths.metadata_csv(tmp_path, "test").with_name("bad_headers_test.csv"))
    slices, _, skipped = load_study_files([folder], 16)
    assert list(bad["ID"]) == ["ID_000000002"] and len(slices) == 2 and len(skipped) == 1
    assert (
        "does not define a slice plane" in bad["reason"][0] and "does not define a slice plane" in skipped["reason"][0]
    )


def test_mixed_orientations_refused_with_a_reason(tmp_path):
    axial, coronal = (1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1)
    folder = _series(tmp_path / "stage_2_test", [axial, axial, axial, coronal])
    meta = build_metadata(tmp_path, "test", workers=1)
    slices, images, skipped = load_study_files([folder], 16)
    assert sorted(meta["ID"]) == sorted(slices["ID"]) == ["ID_000000000", "ID_000000001", "ID_000000002"]
    assert len(images) == 3 and list(skipped["path"]) == [str(folder / "ID_000000003.dcm")]
    assert "orientation" in skipped["reason"][0] and "differs from the 3 slices of its series" in skipped["reason"][0]
