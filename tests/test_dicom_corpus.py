"""Real-file corpus: every reader gives pydicom's modality-LUT HU, or a one-line DicomError naming the file.

Files: pydicom's test files and the pydicom-data package (real), edited copies and non-DICOM files named .dcm
(crafted), and truncated copies swept over byte offsets. The reference and the documented differences (RSNA 12-bit
fix, padding -> air) are in tests/dicom_corpus.py; `python bench/dicom_corpus.py` prints the whole table.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_corpus import crafted, real_files, reference, run_readers, truncation_offsets, verdict

from src import paths
from src.data.dicom import DicomError, read_header, read_hu
from src.data.dicom_fast import read_channels
from src.data.metadata import build_metadata

pytest.importorskip("data_store", reason="pydicom-data is a test dependency (requirements.txt)")

REAL = real_files()
# Single-frame grayscale images that plain pydicom decodes: each must be read, never refused.
IMAGES = [p for p in REAL if reference(p).hu is not None]
# ~10 cuts per file for these: every syntax and photometric among the images, plus non-image kinds.
CUT_FILES = sorted({p for p in IMAGES if not p.name.isdigit()} | {p for p in REAL if p.name in (
    "rtplan.dcm", "test-SR.dcm", "SC_rgb_rle.dcm", "OBXXXX1A.dcm", "emri_small_jpeg_ls_lossless.dcm")})  # fmt: skip


def _check(outcomes: dict, name: str) -> None:
    bad = {r: f"{o.kind}: {o.detail}" for r, o in outcomes.items() if o.kind in ("WRONG", "ERROR")}
    assert not bad, f"{name}: {bad}"
    assert verdict(outcomes) in ("read", "refused"), f"{name}: {outcomes}"


def test_corpus_is_there():
    assert len(REAL) >= 240 and len(IMAGES) >= 70  # pydicom 3.0 test files + pydicom-data 1.0


@pytest.mark.parametrize("path", REAL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_file(path: Path):
    ref = reference(path)
    outcomes = run_readers(path, ref)
    _check(outcomes, path.name)
    if ref.hu is not None:
        assert outcomes["hu"].kind == "exact", outcomes["hu"]
        assert outcomes["fast"].kind in ("exact", "close"), outcomes["fast"]
    else:
        assert verdict(outcomes) == "refused", outcomes


def test_crafted_files(tmp_path):
    results = {}
    for name, path in crafted(tmp_path):
        ref = reference(path) if path.is_file() else reference(tmp_path / "missing")
        outcomes = run_readers(path, ref)
        _check(outcomes, name)
        results[name] = verdict(outcomes)
    read = {
        "CT_small as MONOCHROME1",
        "CT_small padding -2000",
        "CT_small 12-bit fault",
        "CT_small 12-bit fault, slope 2",
    }
    assert {n for n, v in results.items() if v == "read"} == read, results


@pytest.mark.parametrize("path", CUT_FILES, ids=lambda p: p.name)
def test_truncated_copies(tmp_path, path: Path):
    """A copy cut anywhere gives the original's pixels (cut only after them) or a one-line refusal."""
    data = path.read_bytes()
    ref = reference(path)
    cut_path = tmp_path / f"cut_{path.stem}.dcm"
    for cut in truncation_offsets(data, 10):
        cut_path.write_bytes(data[:cut])
        _check(run_readers(cut_path, ref), f"{path.name} cut at {cut}")


def test_ct_small_cut_across_the_header(tmp_path):
    """Every third byte offset through CT_small's header and PixelData element header (both parities), plus the
    issue's repro: 10 bytes past the last (7FE0,0010) tag."""
    import pydicom.data

    data = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    tag = data.rfind(b"\xe0\x7f\x10\x00")
    cut_path = tmp_path / "ID_cut.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cut in [*range(0, tag + 16, 3), tag + 10]:
            cut_path.write_bytes(data[:cut])
            for read in (read_header, read_hu, lambda p: read_channels(p, 32)):
                try:
                    read(cut_path)
                except DicomError as err:
                    assert "\n" not in str(err) and str(err).startswith(str(cut_path)), (cut, str(err))
                else:
                    assert read is read_header, f"pixels from a file cut at {cut}"


def test_metadata_stage_goes_on_and_lists_every_bad_file(tmp_path):
    """The header table over a folder of real, truncated and non-DICOM files: no exception, every skipped file
    in bad_headers_test.csv with a one-line reason."""
    import pydicom.data

    folder = tmp_path / "stage_2_test"
    folder.mkdir()
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    tag = ct.rfind(b"\xe0\x7f\x10\x00")
    (folder / "ID_good.dcm").write_bytes(ct)
    (folder / "ID_cut_header.dcm").write_bytes(ct[: tag + 10])  # the repro
    (folder / "ID_cut_early.dcm").write_bytes(ct[:700])
    (folder / "ID_empty.dcm").write_bytes(b"")
    for k, path in enumerate(p for p in REAL if p.name in ("rtplan.dcm", "SC_rgb.dcm", "README.txt", "emri_small.dcm")):
        (folder / f"ID_real{k}.dcm").write_bytes(path.read_bytes())
    meta = build_metadata(tmp_path, "test", workers=1)
    bad = pd.read_csv(paths.metadata_csv(tmp_path, "test").with_name("bad_headers_test.csv"))
    assert "ID_good" in set(meta["ID"]) and set(meta["ID"]) <= {"ID_good", "ID_cut_header"}  # pixels cut: may read
    assert set(bad["ID"]) | set(meta["ID"]) == {p.stem for p in folder.iterdir()}
    assert all("\n" not in r and r for r in bad["reason"])
    with pytest.raises(DicomError, match=r"ID_cut_header\.dcm: "):
        read_hu(folder / "ID_cut_header.dcm")  # the cache lists it (src.data.cache catches DicomError)
    assert np.isfinite(read_hu(folder / "ID_good.dcm")).all()
