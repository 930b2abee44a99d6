"""src.data.dicom: HU (12-bit fix, compressed syntaxes, corrupt files), windowing and the pad/resize geometry."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import make_dicom, set_transfer_syntax

from src.constants import AIR_HU, WINDOWS
from src.data.dicom import DicomError, read_header, read_hu
from src.data.windows import mask_to_size, pad_to_square, resize, to_channels, window
from src.errors import InputError


def test_window_matches_hand_computed_values():
    hu = np.array([[-1000.0, 0.0, 40.0], [60.0, 80.0, 3000.0]])
    # brain window 40/80 spans [0, 80] HU
    expected = np.array([[0.0, 0.0, 0.5], [0.75, 1.0, 1.0]], dtype=np.float32)
    out = window(hu, 40.0, 80.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-7)
    # subdural 80/200 spans [-20, 180]: 30 HU sits at a quarter
    np.testing.assert_allclose(window(np.array([30.0, -20.0, 180.0]), 80.0, 200.0), [0.25, 0.0, 1.0], atol=1e-7)


def test_plain_signed_file_reads_hu(tmp_path):
    hu = np.array([[-1024, 0, 40], [80, 1000, -5]], dtype=np.int16)
    path = make_dicom(tmp_path / "ID_plain.dcm", hu + 1024, intercept=-1024.0)
    out = read_hu(path)
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, hu.astype(np.float32))


def test_unsigned_pixels_with_negative_intercept_do_not_overflow(tmp_path):
    stored = np.array([[0, 1024, 1064, 65000]], dtype=np.uint16)
    path = make_dicom(tmp_path / "ID_u16.dcm", stored, signed=False, bits_stored=16, intercept=-1024.0, slope=1.0)
    np.testing.assert_array_equal(read_hu(path), [[-1024.0, 0.0, 40.0, 65000.0 - 1024.0]])


def test_slope_applied_before_intercept(tmp_path):
    path = make_dicom(tmp_path / "ID_slope.dcm", np.array([[0, 10], [100, 600]]), slope=2.0, intercept=-1000.0)
    np.testing.assert_array_equal(read_hu(path), [[-1000.0, -980.0], [-800.0, 200.0]])


@pytest.mark.parametrize("intercept", [0.0, 1.0])
def test_rsna_12bit_fix(tmp_path, intercept):
    true_hu = np.array([[-1000, -500, 0, 40], [80, 1000, 2000, 3095]], dtype=np.int64)
    stored = np.mod(true_hu, 4096).astype(np.uint16)  # the fault: stored value = HU mod 4096
    assert stored[0, 0] == 3096  # air as seen in the real files
    path = make_dicom(tmp_path / "ID_12bit.dcm", stored, signed=False, bits_stored=12, intercept=intercept)
    np.testing.assert_array_equal(read_hu(path), true_hu.astype(np.float32))


def test_12bit_fix_not_applied_to_a_correct_12bit_file(tmp_path):
    true_hu = np.array([[-1024, 0, 40, 1000]])
    path = make_dicom(tmp_path / "ID_ok12.dcm", true_hu + 1024, signed=False, bits_stored=12, intercept=-1024.0)
    np.testing.assert_array_equal(read_hu(path), true_hu.astype(np.float32))


@pytest.mark.parametrize("bits_stored, signed", [(16, True), (12, False), (16, False)])
def test_monochrome1_rescales_like_monochrome2(tmp_path, bits_stored, signed):
    """Rescale Slope/Intercept give HU whatever the photometric interpretation (PS3.3 C.11.1.1.2); MONOCHROME1 is
    a display instruction (low values white), so the same stored values give the same HU."""
    hu = np.array([[-1024, 40], [80, 1500]])
    stored = hu + 1024
    m2 = read_hu(make_dicom(tmp_path / "ID_m2.dcm", stored, bits_stored=bits_stored, signed=signed,
                            intercept=-1024.0, photometric="MONOCHROME2"))
    m1 = read_hu(make_dicom(tmp_path / "ID_m1.dcm", stored, bits_stored=bits_stored, signed=signed,
                            intercept=-1024.0, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m2, hu.astype(np.float32))
    np.testing.assert_array_equal(m1, m2)


def test_header_fields_two_valued_window_and_missing_optionals(tmp_path):
    path = make_dicom(
        tmp_path / "ID_hdr.dcm", np.zeros((4, 6)), position=(-125.0, -120.5, 33.25), pixel_spacing=(0.48, 0.5),
        window_center=("00040", "00040"), window_width=("00080", "00150"), intercept=-1024.0,
    )  # fmt: skip
    h = read_header(path)
    assert h["ID"] == "ID_hdr" and h["PatientID"] == "ID_patient0"
    assert h["ImagePositionPatient"] == (-125.0, -120.5, 33.25)
    assert h["ImageOrientationPatient"] == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert h["PixelSpacing"] == (0.48, 0.5)
    assert (h["Rows"], h["Columns"]) == (4, 6)
    assert h["WindowCenter"] == 40.0 and h["WindowWidth"] == 80.0
    assert h["RescaleSlope"] == 1.0 and h["RescaleIntercept"] == -1024.0
    assert h["BitsStored"] == 16 and h["PixelRepresentation"] == 1
    single = read_header(make_dicom(tmp_path / "ID_one.dcm", np.zeros((4, 4)), window_center="50", window_width="100"))
    assert (single["WindowCenter"], single["WindowWidth"]) == (50.0, 100.0)


def test_missing_position_is_a_dicom_error(tmp_path):
    path = make_dicom(tmp_path / "ID_nopos.dcm", np.zeros((4, 4)), with_position=False)
    with pytest.raises(DicomError, match="ImagePositionPatient") as err:
        read_header(path)
    assert isinstance(err.value, InputError) and err.value.path == str(path)


def test_truncated_pixel_data_raises_with_file_and_reason(tmp_path):
    path = make_dicom(tmp_path / "ID_6431af929.dcm", np.zeros((16, 16)), truncate_to=100)
    read_header(path)  # the header still reads, as in the real corrupt file
    with pytest.raises(DicomError) as err:
        read_hu(path)
    assert str(err.value).startswith(str(path))
    assert "pixel data too short" in err.value.reason and "100 bytes" in err.value.reason


def test_not_a_dicom_file(tmp_path):
    path = tmp_path / "ID_text.dcm"
    path.write_text("hello")
    with pytest.raises(DicomError, match=r"ID_text\.dcm: not a readable DICOM"):
        read_hu(path)


def test_rle_lossless_round_trip(tmp_path):
    hu = np.arange(-1024, -1024 + 24 * 20).reshape(24, 20)
    path = make_dicom(tmp_path / "ID_rle.dcm", hu + 1024, syntax="rle")
    assert read_header(path)["TransferSyntaxUID"] == "1.2.840.10008.1.2.5"
    np.testing.assert_array_equal(read_hu(path), hu.astype(np.float32))


def test_jpeg_baseline_decodes(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 32), (32, 1)).astype(np.uint8)
    path = make_dicom(tmp_path / "ID_jpeg.dcm", ramp, syntax="jpeg-baseline", intercept=-100.0)
    assert read_header(path)["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.50"
    out = read_hu(path)
    assert out.shape == (32, 32)
    # lossy at quality 95: within a few grey levels of the original
    assert np.abs(out - (ramp.astype(np.float32) - 100.0)).max() <= 4.0


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90"])
def test_undecodable_compressed_file_names_the_syntax(tmp_path, uid):
    path = make_dicom(tmp_path / "ID_jbad.dcm", np.zeros((8, 8)))
    set_transfer_syntax(path, uid, b"\xff\xd8 not a codestream \xff\xd9")  # complete, but garbage inside
    with pytest.raises(DicomError, match=rf"ID_jbad.dcm: compressed transfer syntax .*\({uid}\) cannot be decoded"):
        read_hu(path)


def test_pad_to_square_uses_air_and_centres():
    img = np.full((2, 4), 40.0, dtype=np.float32)
    out = pad_to_square(img)
    assert out.shape == (4, 4)
    np.testing.assert_array_equal(out[0], np.full(4, AIR_HU))
    np.testing.assert_array_equal(out[3], np.full(4, AIR_HU))
    np.testing.assert_array_equal(out[1:3], img)
    tall = pad_to_square(np.zeros((5, 2), dtype=np.float32))
    assert tall.shape == (5, 5) and (tall[:, [0, 3, 4]] == AIR_HU).all() and (tall[:, 1:3] == 0).all()


def test_non_square_file_to_channels_pads_with_air_not_water(tmp_path):
    hu = np.full((8, 16), 40, dtype=np.int16)  # brain-grey band, 8 rows x 16 cols
    ch = to_channels(read_hu(make_dicom(tmp_path / "ID_wide.dcm", hu + 1024)), 16)
    assert ch.shape == (len(WINDOWS), 16, 16) and ch.dtype == np.uint8
    # Padding rows are air: 0 in every window (water, 0 HU, would give 26 in the subdural window).
    assert (ch[:, :4] == 0).all() and (ch[:, 12:] == 0).all()
    # 40 HU: brain 0.5 -> 127.5 -> 128; subdural (40+20)/200 and bone (40-600+1400)/2800 are both 0.3 -> 76.5 -> 76
    # (np.rint rounds half to even)
    assert (ch[0, 4:12] == 128).all() and (ch[1, 4:12] == 76).all() and (ch[2, 4:12] == 76).all()


def test_resize_area_average_and_nearest():
    img = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [20, 20, 30, 30]], dtype=np.float32)
    np.testing.assert_array_equal(resize(img, 2), [[0, 10], [20, 30]])
    np.testing.assert_array_equal(resize(img, 2, nearest=True), [[0, 10], [20, 30]])
    assert resize(img, 8).shape == (8, 8)


def test_mask_follows_image_geometry():
    mask = np.zeros((8, 16), dtype=np.uint8)
    mask[2:6, 8:16] = 255  # right half of the middle rows
    out = mask_to_size(mask, 8)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    # same geometry as the image: 8x16 padded to 16x16 (4 rows of air above), then halved
    hu = np.where(mask > 0, 60.0, -1000.0).astype(np.float32)
    brain = to_channels(hu, 8)[0]
    np.testing.assert_array_equal(out, (brain > 127).astype(np.uint8))
    assert out.sum() == 2 * 4


def test_real_ct_from_pydicom_matches_its_modality_lut():
    """pydicom's own CT_small.dcm (a real scanner file) reads to the HU that pydicom's modality LUT gives."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    hu = read_hu(path)
    assert hu.shape == (128, 128) and hu.dtype == np.float32
    np.testing.assert_array_equal(hu, expected)
    assert hu.min() < -800 and hu.max() > 500  # air (with noise) and bone are where they should be
