"""src.data.dicom_fast.read_channels (the cache's fast path) against to_channels(read_hu(path))."""

from __future__ import annotations

import numpy as np
import pydicom
import pydicom.config
import pytest
from dicom_factory import make_dicom
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from src.data import dicom, dicom_fast
from src.data.dicom import DicomError, read_hu
from src.data.dicom_fast import read_channels
from src.data.windows import to_channels

# Stated tolerance: bit for bit when slope is 1, the intercept an integer and the shrink factor an integer (RSNA
# 512 px to 256/128 px: every sum is exact) or when nothing is resized; otherwise within 1 grey level, because the
# fast path resizes stored values before the rescale and float rounding can then tip a value over a .5 boundary.
TOLERANCE = 1


@pytest.fixture
def generic_calls(monkeypatch):
    """Counts calls of the generic decoder (pydicom's pixel_array): 0 proves the fast path ran."""
    calls = []
    real = dicom._pixels

    def spy(ds, path):
        calls.append(path)
        return real(ds, path)

    monkeypatch.setattr(dicom, "_pixels", spy)
    return calls


def _head(shape, rng, lo=-1024, hi=2500):
    """Air around a disc of brain-range values with a bone ring: hard edges where clipping and averaging meet."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    hu = np.where(r < 0.8, rng.integers(0, 90, size=shape), lo)
    hu = np.where((r >= 0.7) & (r < 0.8), rng.integers(800, hi, size=shape), hu)
    return hu.astype(np.int64)


def _compare(path, size, exact):
    ref = to_channels(read_hu(path), size)
    fast = read_channels(path, size)
    assert fast.shape == ref.shape == (3, size, size) and fast.dtype == np.uint8
    diff = np.abs(fast.astype(int) - ref.astype(int))
    if exact:
        np.testing.assert_array_equal(fast, ref)
    else:
        assert diff.max() <= TOLERANCE and diff.mean() < 0.01
    return ref


@pytest.mark.parametrize("size, exact", [(16, True), (64, True), (24, False), (100, False)])
def test_signed_16bit(tmp_path, generic_calls, size, exact):
    hu = _head((64, 64), np.random.default_rng(0))
    path = make_dicom(tmp_path / "ID_s16.dcm", hu + 1024, intercept=-1024.0)
    ref = _compare(path, size, exact)
    assert generic_calls == [path]  # only the reference decoded generically
    assert ref[0].min() == 0 and ref[0].max() == 255  # the image spans the brain window: a real comparison


def test_unsigned_16bit_negative_intercept(tmp_path, generic_calls):
    stored = _head((64, 64), np.random.default_rng(1)) + 1024
    stored[0, 0] = 65000  # far above any window
    path = make_dicom(tmp_path / "ID_u16.dcm", stored, signed=False, bits_stored=16, intercept=-1024.0)
    _compare(path, 16, exact=True)
    _compare(path, 64, exact=True)
    assert len(generic_calls) == 2


@pytest.mark.parametrize("intercept", [0.0, 1.0])
def test_rsna_12bit_bug_file(tmp_path, generic_calls, intercept):
    true_hu = np.clip(_head((64, 64), np.random.default_rng(2)), -1000, 3095)
    stored = np.mod(true_hu, 4096).astype(np.uint16)  # air reads 3096, as in the faulty RSNA files
    path = make_dicom(tmp_path / "ID_bug12.dcm", stored, signed=False, bits_stored=12, intercept=intercept)
    for size in (16, 24, 64):
        _compare(path, size, exact=True)  # the LUT path: exact HU at full size
    assert len(generic_calls) == 3


def test_normal_12bit_file_ignores_unused_high_bits(tmp_path, generic_calls):
    rng = np.random.default_rng(3)
    stored = _head((64, 64), rng) + 1024
    garbage = rng.integers(0, 16, size=stored.shape) << 12  # bits 12-15 are not part of the value (PS3.5 8.1.1)
    path = make_dicom(tmp_path / "ID_ok12.dcm", stored | garbage, signed=False, bits_stored=12, intercept=-1024.0)
    ref = _compare(path, 16, exact=True)
    np.testing.assert_array_equal(ref, to_channels((stored - 1024).astype(np.float32), 16))  # garbage was dropped
    _compare(path, 64, exact=True)
    assert len(generic_calls) == 2


def test_signed_12bit_is_sign_extended(tmp_path, generic_calls):
    hu = np.clip(_head((32, 32), np.random.default_rng(4)), -2048, 2047)
    raw = (hu & 0x0FFF) | (np.random.default_rng(5).integers(0, 16, size=hu.shape) << 12)  # garbage above bit 11
    path = make_dicom(tmp_path / "ID_s12.dcm", raw.astype(np.uint16).view(np.int16), bits_stored=12, intercept=0.0)
    ref = _compare(path, 8, exact=True)
    np.testing.assert_array_equal(ref, to_channels(hu.astype(np.float32), 8))
    assert len(generic_calls) == 1


@pytest.mark.parametrize("slope, intercept", [(2.0, -1000.0), (0.5, -1024.5), (1.0, -1024.25)])
def test_slope_and_fractional_intercept(tmp_path, generic_calls, slope, intercept):
    stored = ((_head((64, 64), np.random.default_rng(6)) - intercept) / slope).astype(np.int64)
    path = make_dicom(tmp_path / "ID_slope.dcm", stored, slope=slope, intercept=intercept)
    _compare(path, 64, exact=True)  # no resize: per-pixel LUT, exact whatever the rescale
    _compare(path, 16, exact=False)
    _compare(path, 24, exact=False)
    assert len(generic_calls) == 3


@pytest.mark.parametrize("signed, bits", [(True, 16), (False, 12), (False, 16)])
def test_monochrome1(tmp_path, generic_calls, signed, bits):
    """MONOCHROME1 is a display instruction: the rescale gives HU as for MONOCHROME2 (PS3.3 C.11.1.1.2)."""
    stored = _head((64, 64), np.random.default_rng(7), hi=2000) + 1024
    m1 = make_dicom(tmp_path / "ID_m1.dcm", stored, bits_stored=bits, signed=signed, photometric="MONOCHROME1")
    m2 = make_dicom(tmp_path / "ID_m2.dcm", stored, bits_stored=bits, signed=signed, photometric="MONOCHROME2")
    for size in (16, 64):
        np.testing.assert_array_equal(_compare(m1, size, exact=True), read_channels(m2, size))
    assert len(generic_calls) == 2


@pytest.mark.parametrize("shape, size", [((40, 64), 16), ((64, 40), 64), ((33, 47), 16), ((47, 33), 20)])
def test_non_square_and_odd_sizes(tmp_path, generic_calls, shape, size):
    path = make_dicom(tmp_path / "ID_odd.dcm", _head(shape, np.random.default_rng(8)) + 1024)
    ref = _compare(path, size, exact=True)  # padding takes the exact LUT path
    assert (ref[:, 0] == 0).all() and (ref[:, :, 0] == 0).all()  # air padding, not water (26 in subdural)
    assert len(generic_calls) == 1


def test_odd_square_size_within_tolerance(tmp_path, generic_calls):
    path = make_dicom(tmp_path / "ID_63.dcm", _head((63, 63), np.random.default_rng(9)) + 1024)
    _compare(path, 16, exact=False)  # 63/16 is not an integer factor
    _compare(path, 63, exact=True)
    assert len(generic_calls) == 2


def test_implicit_vr_and_sequences(tmp_path, generic_calls):
    """Implicit VR goes to pydicom; a defined-length sequence before the pixels is skipped by the fast scanner."""
    path = make_dicom(tmp_path / "ID_impl.dcm", _head((32, 32), np.random.default_rng(10)) + 1024)
    seq = make_dicom(tmp_path / "ID_seq.dcm", _head((32, 32), np.random.default_rng(10)) + 1024, slope=2.0)
    with pydicom.config.disable_value_validation():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
        ds = pydicom.dcmread(seq)
        item = Dataset()
        item.RescaleSlope = "5"  # nested: must not be taken for the top-level slope
        item.Rows = 7
        ds.ReferencedImageSequence = [item]
        ds.save_as(seq, enforce_file_format=True)
    with open(seq, "rb") as fh:
        assert b"\xff\xff\xff\xff" not in fh.read()[:2000]  # pydicom wrote the sequence with a defined length
    _compare(path, 8, exact=True)
    assert len(generic_calls) == 2  # reference and fallback
    _compare(seq, 32, exact=True)
    assert len(generic_calls) == 3  # the reference only


def test_compressed_file_falls_back(tmp_path, generic_calls):
    hu = _head((24, 24), np.random.default_rng(11))
    path = make_dicom(tmp_path / "ID_rle.dcm", hu + 1024, syntax="rle")
    out = read_channels(path, 12)
    assert generic_calls == [path]  # decoded by pydicom's RLE handler, not read as raw bytes
    np.testing.assert_array_equal(out, to_channels(hu.astype(np.float32), 12))


def test_bad_files_raise_like_read_hu(tmp_path):
    short = make_dicom(tmp_path / "ID_6431af929.dcm", np.zeros((16, 16)), truncate_to=100)
    with pytest.raises(DicomError, match="pixel data too short: 100 bytes") as err:
        read_channels(short, 8)
    assert err.value.path == str(short)
    text = tmp_path / "ID_text.dcm"
    text.write_text("hello")
    with pytest.raises(DicomError, match=r"ID_text\.dcm: not a readable DICOM"):
        read_channels(text, 8)


def test_lut_matches_pydicom_for_every_code_word(tmp_path):
    """All 65536 code words of a 12-bit unsigned file through pydicom's pixel_array vs the cached HU LUT."""
    codes = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    path = make_dicom(tmp_path / "ID_all.dcm", codes, signed=False, bits_stored=12, intercept=-1024.0)
    np.testing.assert_array_equal(dicom_fast._hu_lut(1.0, -1024.0, 12, False, False).reshape(256, 256), read_hu(path))
    signed = make_dicom(tmp_path / "ID_alls.dcm", codes.view(np.int16), bits_stored=10, intercept=-3.0, slope=0.5)
    np.testing.assert_array_equal(dicom_fast._hu_lut(0.5, -3.0, 10, True, False).reshape(256, 256), read_hu(signed))
